# Two commands on a fresh clone: `make test` and `make book` (each creates .venv itself).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= digits
JOBS ?=
# the optional dependencies installed: test, or test,cluster for the Dask tests too (as CI does)
EXTRAS ?= test
comma := ,

.PHONY: test book html clean clean-runs help
help:
	@echo "make test [EXTRAS=test,cluster]   create .venv if needed and run the tests (with the Dask ones)"
	@echo "make book [PROFILE=...] [JOBS=n]  run the notebooks of a profile (digits|smoke|paper or a YAML file) and build _build/html"
	@echo "make html                         rebuild the book from the notebooks already run"
	@echo "make clean                        remove _build and the book's executed notebooks (runs/ stays)"
	@echo "make clean-runs PROFILE=...       remove the runs and records of a profile (runs/<profile>)"

# The venv is (re)installed whenever the dependency list or the extras change.
STAMP := $(BIN)/.installed-$(subst $(comma),-,$(EXTRAS))
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "pip: installing kd_lib and its dependencies (torch, fastai, jupyter-book, ...) into $(VENV), quietly: about 3 minutes on a fresh machine, less from pip's cache"
	@start=$$(date +%s); (while sleep 30; do echo "pip: still installing ($$(( $$(date +%s) - start ))s)"; done) & \
	ticker=$$!; trap 'kill $$ticker 2>/dev/null' EXIT; \
	$(BIN)/python -m pip install -q --upgrade pip && $(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"; \
	status=$$?; echo "pip: done in $$(( $$(date +%s) - start ))s"; exit $$status
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest

book: $(STAMP)
	$(BIN)/python -m kd_lib.runner --profile $(PROFILE) $(if $(JOBS),--jobs $(JOBS))

html: $(STAMP)
	$(BIN)/python -m kd_lib.runner --profile $(PROFILE) --book-only

clean:
	rm -rf _build book/generated

clean-runs:
	rm -rf runs/$(notdir $(basename $(PROFILE)))
