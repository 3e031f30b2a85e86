# Two commands on a fresh clone: `make test` and `make book` (each creates .venv itself).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= digits
JOBS ?= 1

.PHONY: test book html clean help
help:
	@echo "make test                 create .venv if needed and run the tests"
	@echo "make book [PROFILE=...]   run the notebooks of a profile (digits|smoke|paper) and build _build/html"
	@echo "make html                 rebuild the book from the notebooks already run"
	@echo "make clean                remove _build and the executed notebooks"

# The venv is (re)installed whenever the dependency list changes.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest

book: $(BIN)/.installed
	$(BIN)/python -m kd_lib.reproduce --profile $(PROFILE) --jobs $(JOBS)

html: $(BIN)/.installed
	$(BIN)/python -m kd_lib.reproduce --profile $(PROFILE) --book-only

clean:
	rm -rf _build book/generated
