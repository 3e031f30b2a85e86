"""Crafted files give named errors, never a crash or a hang (issue 29, items 7 to 10): malformed records, locks
naming impossible pids, a full disk, profiles that expand without bound or are not text."""
import errno
import importlib
import json
import os
import pathlib
import socket

import pytest
import yaml
from test_kept import _runs, repo  # noqa: F401 -- repo: the fixture of a stand-in repository

from kd_lib.folders import digits_tree
from kd_lib.locks import LOCK, RunLock, lock_holder
from kd_lib.records import RECORD, CorruptFile, DiskFull, complete_record
from kd_lib.runner import ProfileError, keep_records, kept_records, load_profile, profiles
from kd_lib.runner.cli import main


@pytest.mark.parametrize("record", [dict(status="complete"), dict(status="complete", params="x"),
                                    dict(status="complete", kind="student", params={}, versions="x"),
                                    dict(status="running", params=[1])])
def test_a_malformed_record_is_a_corrupt_file_that_names_it(record, tmp_path):
    "{'status': 'complete'} once counted as complete, and crashed keeping with KeyError: 'versions'."
    (tmp_path / RECORD).write_text(json.dumps(record))
    with pytest.raises(CorruptFile, match=rf"{tmp_path / RECORD} is not a record as kd_lib writes one"):
        complete_record(tmp_path)


def test_keeping_leaves_out_a_malformed_record_and_keeps_the_others(tmp_path, repo):  # noqa: F811
    runs = _runs(tmp_path)
    (runs[1].run / RECORD).write_text(json.dumps(dict(status="complete")))
    dest = keep_records(dict(keep="results/x"), runs)
    assert [p.parent.name for p in kept_records(dest)] == ["teacher"]


def test_a_dry_run_reports_a_malformed_record_and_goes_on(write_profile, tmp_path, capsys):
    "{'status': 'complete', 'params': 'x'} once killed the whole runner in --dry-run."
    teacher = tmp_path / "runs" / "digits" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / RECORD).write_text(json.dumps(dict(status="complete", params="x")))
    main(["--profile", str(write_profile()), "--dry-run"])
    out = capsys.readouterr().out
    assert "failed    digits/teacher" in out and "params is a str, not a dict" in out
    assert "todo      digits/resnet10-stagewise-f1-s0" in out


@pytest.mark.parametrize("pid", [1099511627776, 0, -1])
def test_a_lock_naming_an_impossible_pid_is_stale(pid, tmp_path):
    "pid 1099511627776 once crashed the runner (OverflowError); pid 0 or -1 blocked it for ever."
    (tmp_path / LOCK).write_text(json.dumps(dict(host=socket.gethostname(), pid=pid, token="x")))
    with pytest.warns(UserWarning, match="taken as stale"):
        assert lock_holder(tmp_path) is None
    with RunLock(tmp_path): assert lock_holder(tmp_path)["pid"] == os.getpid()


def _full(monkeypatch, where: str, name: str):
    "Make `where`.`name` (a writing method) fail as on a full disk, after creating its file empty as a write does."
    def fail(self, *args, **kwargs):
        if isinstance(self, pathlib.Path): self.touch()
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(where, name, fail)


def test_a_lock_on_a_full_disk_says_so_and_leaves_no_file(tmp_path, monkeypatch):
    "A full disk once gave a bare [Errno 28] and left a 0-byte .lock.<token> behind."
    run = tmp_path / "out" / "digits" / "teacher"
    _full(monkeypatch, pathlib.Path, "write_text")
    with pytest.raises(DiskFull, match=rf"The disk is full: could not write {run}/\.lock\.\w+ .*Free some space"):
        with RunLock(run): pass
    assert not (tmp_path / "out").exists()  # neither a temporary lock file nor the folders made for it


def test_data_on_a_full_disk_says_so_and_names_kd_data(tmp_path, monkeypatch):
    from PIL import Image
    _full(monkeypatch, Image.Image, "save")
    with pytest.raises(DiskFull, match=rf"could not write {tmp_path / 'digits'} .*set KD_DATA to a folder"):
        digits_tree(tmp_path / "digits")
    assert not list(tmp_path.iterdir())  # the temporary tree is gone


def _profile(tmp_path, text: str = None, **prof) -> pathlib.Path:
    path = tmp_path / "p.yaml"
    if text is None:
        path.write_text(yaml.safe_dump(dict(dict(datasets=[dict(dataset="digits", students=[{}])]), **prof)))
    else: path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_profile_expanding_to_too_many_runs_is_refused_before_they_are_made(tmp_path, monkeypatch):
    "A profile of 8.5 KB whose product is 6,000,000 runs once hung --dry-run (1.2 GB)."
    p = importlib.import_module("kd_lib.runner.profiles")  # the module, not the function kd_lib.runner exports
    monkeypatch.setattr(p, "MAX_RUNS", 3)
    path = _profile(tmp_path, datasets=[dict(dataset="digits", students=[dict(seed=[0, 1], fraction=[1.0, 0.5])])])
    with pytest.raises(ProfileError, match="expand to 4 runs, more than 3: shorten their lists"):
        p.expand(load_profile(path))


def test_too_many_jobs_at_once_are_refused(tmp_path):
    "jobs: 1000000000 once hung the runner (2.4 GB)."
    with pytest.raises(ProfileError, match="jobs=1000000000: at most 256 runs at once"):
        load_profile(_profile(tmp_path, jobs=1_000_000_000))
    with pytest.raises(SystemExit):
        main(["--profile", "smoke", "--jobs", "1000000000", "--dry-run"])


@pytest.mark.parametrize("text, error", [
    (b"name: \xff\xfe\n", "not a valid profile: 'utf-8' codec can't decode"),
    ("? [a, b]\n: 1\n", "a key that is a list or a mapping"),
    ("datasets: " + "[" * 20_000 + "]" * 20_000 + "\n", "nests lists or mappings too deeply"),
    ("margin: .nan\ndatasets: []\n", "margin=nan: margin takes a number"),
    ("margin: .inf\ndatasets: []\n", "margin=inf: margin takes a number")])
def test_a_crafted_profile_is_a_profile_error(text, error, tmp_path):
    "Invalid UTF-8, a complex key and deep nesting gave tracebacks; margin: .nan was accepted."
    with pytest.raises(ProfileError, match=error):
        load_profile(_profile(tmp_path, text))


@pytest.mark.parametrize("name", profiles())
def test_the_shipped_profiles_stay_within_the_caps(name):
    p = importlib.import_module("kd_lib.runner.profiles")  # the module, not the function kd_lib.runner exports
    prof = load_profile(name)
    assert len(p.expand(prof)) <= p.MAX_RUNS and prof.get("jobs", 1) <= p.MAX_JOBS
