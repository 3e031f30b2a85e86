"""Kept results: the records of a profile whose runs take hours, copied into the repository as JSON (the
profile's `keep` folder, e.g. ``results/cifar10``), each naming the commit of the code that made it, so the
book's chapter on them (``notebooks/<profile>.ipynb``) builds from a fresh clone without running them again."""
import json
import shutil
import subprocess
from pathlib import Path

from ..records import RECORD, complete_record
from .profiles import NOTEBOOKS, ROOT, ProfileError, load_profile, profiles

__all__ = ["kept_profiles", "keep_records", "kept_records", "check_kept"]


def kept_profiles() -> list:
    """The shipped profiles whose records are kept (a `keep` folder), each with its chapter notebook
    `notebooks/<name>.ipynb`; a `ProfileError` when that notebook is missing."""
    out = [p for p in map(load_profile, profiles()) if p.get("keep")]
    for p in out:
        if not (NOTEBOOKS / f"{p['name']}.ipynb").exists():
            raise ProfileError(f"Profile {p['name']!r} keeps its records in {p['keep']} but has no chapter "
                               f"notebook notebooks/{p['name']}.ipynb to show them.")
    return out


def keep_records(prof: dict, jobs: list) -> Path:
    """Copy the record of each complete job of `prof` into its `keep` folder as `<dataset>/<run>/record.json`
    (nothing else of the run folder: weights and notebooks stay out of git), replacing what was kept before."""
    dest = ROOT / prof["keep"]
    if dest.exists(): shutil.rmtree(dest)
    for j in jobs:
        if complete_record(j.run) is None: continue
        target = dest / j.name / RECORD
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(j.run / RECORD, target)
    return dest


def kept_records(folder) -> list:
    "The paths of the kept records under `folder`, sorted."
    return sorted(Path(folder).rglob(RECORD))


def _git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def check_kept(folder) -> list:
    """What is wrong with the kept records under `folder`, one line each (empty when nothing is): a record
    that is not complete, names no commit, was made from code that differed from its commit, or names a
    commit that is not in this repository's history (an ancestor of HEAD)."""
    problems = []
    for p in kept_records(folder):
        r = json.loads(p.read_text())
        code = r.get("versions", {}).get("code") or {}
        commit = code.get("commit")
        if r.get("status") != "complete": problems.append(f"{p}: not a complete record")
        elif not commit: problems.append(f"{p}: names no commit of the code that made it")
        elif code.get("dirty"): problems.append(f"{p}: made from code with changes not committed in {commit[:8]}")
        elif _git("merge-base", "--is-ancestor", commit, "HEAD").returncode != 0:
            problems.append(f"{p}: commit {commit[:8]} is not in this repository's history "
                            "(a shallow clone? `git fetch --unshallow`)")
    return problems
