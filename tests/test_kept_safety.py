"""Keeping records touches nothing outside its folder in results/ (issue 29, items 1 to 5): a crafted manifest, a
symbolic link, another profile's sealed set, a nested or escaping folder, an emptied or malformed seal."""
import json
import os
import subprocess

import pytest
import yaml
from test_kept import _chapter, _runs, _set2, repo  # noqa: F401 -- repo: the fixture of a stand-in repository

from kd_lib.recipes.records import RECORD
from kd_lib.infra.files import CorruptFile
from kd_lib.runner import ROOT, ProfileError, check_kept, keep_records, kept, kept_records, load_profile, seal
from kd_lib.runner.cli import main
from kd_lib.runner.kept import LOG, MANIFEST, keep_plan

X = dict(keep="results/x")


def _files(folder) -> dict:
    "Every file under `folder` with its bytes: what keeping must leave as it was."
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("crafted", ["../../../elsewhere/record.json", "absolute"])
def test_a_crafted_manifest_removes_nothing_outside_its_folder(crafted, tmp_path, repo):  # noqa: F811
    "A manifest naming ../../../elsewhere/record.json, or an absolute path, once made keeping delete that file."
    dest = keep_records(X, _runs(tmp_path))
    victim = tmp_path / "elsewhere" / RECORD
    victim.parent.mkdir()
    victim.write_text("{}")
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["files"][str(victim) if crafted == "absolute" else crafted] = "0" * 64
    (dest / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ProfileError, match="lies outside"):
        keep_records(X, _runs(tmp_path))
    assert victim.read_text() == "{}"
    assert any("lies outside" in p for p in check_kept(dest))


@pytest.mark.parametrize("link", ["results/x/a", "results/x"])
def test_keeping_writes_nothing_through_a_symbolic_link(link, tmp_path, repo):  # noqa: F811
    "With results/x/<dataset> a link to a folder elsewhere, keeping once wrote the records there."
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo / link).parent.mkdir(parents=True)
    (repo / link).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ProfileError, match="is a symbolic link"):
        keep_records(X, _runs(tmp_path))
    assert not list(elsewhere.iterdir())


def test_keeping_over_another_settings_sealed_set_needs_replace_and_removes_only_committed_records(
        tmp_path, repo, monkeypatch):  # noqa: F811
    "Any profile with keep: results/cifar10 once replaced the committed CIFAR-10 set: all its records deleted."
    dest = keep_records(X, _runs(tmp_path))
    before = _files(dest)
    other = _runs(tmp_path / "other", ("b/teacher",))  # another profile's runs: other settings
    with pytest.raises(ProfileError, match="kept for other run settings.*--replace"):
        keep_records(X, other)
    with pytest.raises(ProfileError, match="only records git holds committed.*2 in .* are not"):
        keep_records(X, other, replace=True)  # the stand-in repository is no git checkout: nothing is committed
    assert _files(dest) == before
    monkeypatch.setattr(kept, "_committed", lambda path: True)
    keep_records(X, other, replace=True)
    assert [p.relative_to(dest).as_posix() for p in kept_records(dest)] == ["b/teacher/record.json"]
    assert check_kept(dest) == []


def test_git_says_what_it_holds_committed(tmp_path):
    tracked = ROOT / "pyproject.toml"
    clean = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", str(tracked)], capture_output=True,
                           text=True).stdout == ""
    assert kept._committed(tracked) == clean and not kept._committed(tmp_path / "pyproject.toml")


def test_the_runner_refuses_to_replace_a_kept_set_before_any_run(tmp_path, repo, write_profile):  # noqa: F811
    keep_records(X, _runs(tmp_path / "made"))
    path = write_profile()
    path.write_text(yaml.safe_dump(dict(yaml.safe_load(path.read_text()), keep="results/x")))
    with pytest.raises(SystemExit, match="--replace"):
        main(["--profile", str(path), "--runs-only"])
    assert not (tmp_path / "runs").exists()  # refused before the first run
    with pytest.raises(SystemExit, match="--replace replaces kept records, and the profile 'tiny' keeps none"):
        main(["--profile", str(write_profile()), "--replace", "--dry-run"])


def test_a_dry_run_says_that_keeping_would_be_refused(tmp_path, repo, write_profile, capsys):  # noqa: F811
    keep_records(X, _runs(tmp_path / "made"))
    path = write_profile()
    path.write_text(yaml.safe_dump(dict(yaml.safe_load(path.read_text()), keep="results/x")))
    main(["--profile", str(path), "--dry-run"])
    out = capsys.readouterr()
    assert "note: keeping this profile's records would be refused" in out.err and "--replace" in out.err
    assert "todo" in out.out and not (tmp_path / "runs").exists()  # listed, nothing run


@pytest.mark.parametrize("keep", ["results/cifar10/cifar10", "results/x/y"])
def test_a_keep_folder_nested_in_another_is_refused(keep, tmp_path, repo):  # noqa: F811
    with pytest.raises(ProfileError, match="a folder of their own inside results/"):
        keep_plan(dict(keep=keep), [])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(dict(keep=keep, datasets=[])))
    with pytest.raises(ProfileError, match="a folder of their own inside results/"):
        load_profile(path)


@pytest.mark.parametrize("name", ["../..", "..", ".hidden", "a/b", "a b"])
def test_a_profile_name_is_no_path(name, tmp_path):
    "name: ../.. once passed, and names runs/<name> and notebooks/<name>.ipynb."
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(dict(name=name, datasets=[])))
    with pytest.raises(ProfileError, match="a profile's name names its folders"):
        load_profile(path)


@pytest.mark.parametrize("files", [None, ["a/s1/record.json"], {"a/s1/record.json": 1}])
def test_a_malformed_manifest_is_a_problem_not_a_crash(files, tmp_path, repo):  # noqa: F811
    "A MANIFEST whose files is a list or null crashed check_kept with a TypeError."
    dest = keep_records(X, _runs(tmp_path))
    manifest = json.loads((dest / MANIFEST).read_text())
    (dest / MANIFEST).write_text(json.dumps(dict(manifest, files=files)))
    assert any("is not a mapping of file name to sha256" in p for p in check_kept(dest))
    with pytest.raises(Exception, match="is not a mapping of file name to sha256"):
        keep_records(X, _runs(tmp_path))


def test_a_set_whose_records_are_all_deleted_is_refused_by_the_chapter(tmp_path):
    "Deleting every kept record once made the chapter say 'none: no kept records' instead of refusing the set."
    copy = _set2(tmp_path)
    for p in kept_records(copy): os.remove(p)
    texts, _ = _chapter(copy, tmp_path / "emptied.ipynb")
    assert "refused: the kept records fail their check" in texts["kept_check"]
    assert "missing (the manifest lists it)" in texts["kept_check"]



# ---- Nothing lost III (issue 38, items 3 and 6): each test below failed before its fix.

def test_the_seal_binds_each_record_to_its_place(tmp_path, repo):  # noqa: F811
    "Two kept records swapped, one edited, and the folder sealed again with its old hash once passed check_kept."
    runs = _runs(tmp_path)
    dest = keep_records(X, runs)
    settings = json.loads((dest / MANIFEST).read_text())["settings_sha256"]
    teacher, student = (dest / r.name / RECORD for r in runs)
    kept_as = teacher.read_text(), student.read_text()
    teacher.write_text(json.dumps(dict(json.loads(kept_as[1]), test_accuracy=99.9)))
    student.write_text(kept_as[0])
    with pytest.raises(ProfileError, match=f"Not sealing {dest}: .*{teacher}: its params make it the record of "
                                           "a/r-m-f1-s1, not of a/teacher"):
        seal(dest, settings)
    assert any(f"{student}: its params make it the record of a/teacher" in p for p in check_kept(dest))
    teacher.write_text(kept_as[0])
    student.write_text(kept_as[1])
    assert check_kept(dest) == [] and check_kept(dest, runs[1:]) == [
        f"{teacher}: not a run of the profile",
        f"{dest}: kept for other run settings than the profile's now (make book PROFILE=... makes and keeps them "
        "again)"]


@pytest.mark.parametrize("crafted", ["folder", "nul", "log"])
def test_keeping_checks_everything_before_its_first_write(crafted, tmp_path, repo):  # noqa: F811
    "A manifest naming a folder or a name with a NUL, or a log of {'sets': 5}, once stopped keeping half-way."
    runs = _runs(tmp_path)
    dest = keep_records(X, runs)
    manifest = json.loads((dest / MANIFEST).read_text())
    if crafted == "log": (dest / LOG).write_text(json.dumps(dict(sets=5)))
    else:
        name = "a/folder" if crafted == "folder" else "a/x\0y"
        (dest / "a" / "folder").mkdir()
        (dest / MANIFEST).write_text(json.dumps(dict(manifest, files=dict(manifest["files"], **{name: "0" * 64}))))
    record = json.loads((runs[1].run / RECORD).read_text())
    (runs[1].run / RECORD).write_text(json.dumps(dict(record, test_accuracy=1.0)))  # what keeping would write
    before = _files(dest)
    with pytest.raises((ProfileError, CorruptFile), match={"folder": "lists 'a/folder', a folder",
                                                           "nul": "holds a NUL byte",
                                                           "log": "its `sets` is not a list of entries"}[crafted]):
        keep_records(X, runs)
    assert _files(dest) == before
