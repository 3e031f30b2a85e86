"""Kept records (results/<profile>/): made by code at a commit in this repository's history, one for each run
of the profile as it stands, and enough for the profile's chapter, which builds from them."""
import json
import subprocess
from types import SimpleNamespace

import nbformat
import pytest

from kd_lib.records import RECORD
from kd_lib.runner import ROOT, check_kept, expand, keep_records, kept_profiles, kept_records, run_notebook

KEPT = kept_profiles()


def test_some_profile_keeps_its_records():
    assert [p["name"] for p in KEPT] == ["cifar10"]


@pytest.mark.parametrize("prof", KEPT, ids=lambda p: p["name"])
def test_every_kept_record_comes_from_a_commit_in_history(prof):
    shallow = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"], capture_output=True,
                             text=True).stdout.strip()
    assert shallow == "false", "a shallow clone cannot show where the kept records come from: git fetch --unshallow"
    assert kept_records(ROOT / prof["keep"]), f"no records kept in {prof['keep']}: make book PROFILE={prof['name']}"
    assert check_kept(ROOT / prof["keep"]) == []


@pytest.mark.parametrize("prof", KEPT, ids=lambda p: p["name"])
def test_the_kept_records_are_the_profiles_runs(prof):
    "One kept record per run of the profile file, with the parameters the file asks for: they have not drifted."
    for j in expand(prof):
        path = ROOT / prof["keep"] / j.name / RECORD
        assert path.exists(), f"{j.name} has no kept record: make book PROFILE={prof['name']}"
        params = json.loads(path.read_text())["params"]
        assert j.config.conflicts(params) == {}, j.name
    assert len(kept_records(ROOT / prof["keep"])) == len(expand(prof))


@pytest.mark.parametrize("prof", KEPT, ids=lambda p: p["name"])
def test_the_chapter_builds_from_the_kept_records(prof, tmp_path):
    out = run_notebook(prof["name"], tmp_path / "chapter.ipynb", threads=1, records_dir=prof["keep"])
    nb = nbformat.read(out, as_version=4)
    glued = {o["metadata"]["scrapbook"]["name"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if "scrapbook" in o.get("metadata", {})}
    assert {"verdict_1", "verdict_3", "commits", "kept_check", "cifar_figure3", "cifar_figure4"} <= glued
    kept = next(o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if o.get("metadata", {}).get("scrapbook", {}).get("name") == "kept_check")
    assert "in this repository's history" in kept["data"]["application/papermill.record/text/plain"]


def _record(folder, commit, dirty=False, status="complete"):
    folder.mkdir(parents=True)
    (folder / RECORD).write_text(json.dumps(dict(status=status, versions=dict(code=dict(commit=commit, dirty=dirty)))))


def test_check_kept_names_each_bad_record(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    _record(tmp_path / "good", head)
    _record(tmp_path / "unknown", "0" * 40)
    _record(tmp_path / "dirty", head, dirty=True)
    _record(tmp_path / "none", None)
    _record(tmp_path / "partial", head, status="running")
    problems = "\n".join(check_kept(tmp_path))
    assert "good" not in problems and len(check_kept(tmp_path)) == 4
    assert "00000000 is not in this repository's history" in problems and "not committed" in problems
    assert "names no commit" in problems and "not a complete record" in problems


def test_keep_records_copies_the_records_only(tmp_path):
    runs = []
    for name in ("a/teacher", "a/s1"):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / RECORD).write_text(json.dumps(dict(status="complete", params={})))
        (run / "teacher.pth").write_bytes(b"weights")
        runs.append(SimpleNamespace(name=name, run=run))
    unfinished = tmp_path / "runs" / "a" / "s2"
    unfinished.mkdir()
    runs.append(SimpleNamespace(name="a/s2", run=unfinished))
    dest = keep_records(dict(keep=str(tmp_path / "kept")), runs)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == \
        ["a/s1/record.json", "a/teacher/record.json"]


def test_a_record_names_the_commit_of_the_code_that_made_it():
    from kd_lib.records import code_version, versions
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "kd_lib", "notebooks"],
                             capture_output=True, text=True).stdout.strip()
    assert code_version() == dict(commit=head, dirty=bool(changed)) == versions()["code"]
