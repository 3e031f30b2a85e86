"""The public API: every module is in the book's API reference, and no code outside a module uses its private names."""
import pkgutil
import re
from pathlib import Path

import kd_lib

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_is_in_the_api_reference():
    page = (ROOT / "book" / "api.md").read_text()
    documented = set(re.findall(r"automodule:: (\S+)", page))
    modules = {m.name for m in pkgutil.walk_packages(kd_lib.__path__, "kd_lib.") if not m.name.endswith("__main__")}
    modules.add("kd_lib")  # the public face
    assert modules - documented == set(), "add them to book/api.md"
    assert documented - modules == set(), "book/api.md names modules that do not exist"


def test_no_private_names_are_used_outside_their_module():
    "Benchmarks and notebooks use kd_lib's public API only (no imports of `_name`, no `module._name`)."
    private = re.compile(r"import _[a-z]|from kd_lib\S* import [^\n#]*\b_[a-z]|\b(?:kd_lib\.\w+|kt|rp)\._[a-z]")
    for folder in ("benchmarks", "notebooks"):
        for p in (ROOT / folder).rglob("*.*"):
            if p.suffix in (".py", ".ipynb"):
                assert not private.search(p.read_text()), p
