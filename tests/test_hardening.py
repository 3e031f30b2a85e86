"""Crafted files give named errors, never a crash or a hang (issue 29, items 7 to 10; issue 38): malformed or
deeply nested records, manifests and logs, locks naming impossible or unprovable owners, a full disk, profiles that
expand without bound, are not text or name paths no file system takes, unreadable resume states, data folders of
links and FIFOs."""
import errno
import importlib
import json
import os
import pathlib
import pickle
import socket
import time

import pytest
import torch
import yaml
from conftest import complete
from test_kept import _runs, repo  # noqa: F401 -- repo: the fixture of a stand-in repository
from test_reliability import _jpeg_tree

from kd_lib.data.loaders import get_data
from kd_lib.data.folders import _listing, digits_tree
from kd_lib.infra.locks import LOCK, STALE_S, RunLock, lock_holder
from kd_lib.recipes.records import RECORD, complete_record
from kd_lib.infra.files import CorruptFile, DiskFull
from kd_lib.evidence.collect import collect
from kd_lib.runner import ROOT, ProfileError, check_kept, keep_records, kept_records, load_profile, profiles
from kd_lib.runner.cli import main
from kd_lib.runner.kept import LOG, MANIFEST


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


# ---- Nothing lost III (issue 38): each test below failed before its fix.

NESTED = "[" * 100_000 + "]" * 100_000  # JSON nested past Python's recursion limit


def _lock(run: pathlib.Path, crafted: str) -> None:
    "Write `run`'s lock as `crafted` says: one whose owner cannot be shown to be alive."
    run.mkdir(parents=True)
    path = run / LOCK
    if crafted == "folder": return path.mkdir()
    path.write_bytes({"no start time": json.dumps(dict(host=socket.gethostname(), pid=1, token="x")).encode(),
                      "invalid UTF-8": b'{"host": "\xff\xfe"}', "nested": NESTED.encode(),
                      "ahead": json.dumps(dict(host="elsewhere-" + socket.gethostname(), pid=1, token="x")).encode()
                      }[crafted])
    if crafted == "ahead": os.utime(path, (time.time() + STALE_S,) * 2)  # a heartbeat of the future


@pytest.mark.parametrize("crafted", ["no start time", "invalid UTF-8", "folder", "nested", "ahead"])
def test_a_lock_whose_owner_cannot_be_shown_alive_is_stale_and_taken_over(crafted, tmp_path):
    "Each once blocked the runner for ever ('waiting: ... pid 1') or crashed lock_holder (UnicodeDecodeError, ...)."
    _lock(tmp_path / "r", crafted)
    with pytest.warns(UserWarning, match="taken as stale|cannot be shown to be running|ahead of this host's clock"):
        with RunLock(tmp_path / "r") as lock: assert lock_holder(tmp_path / "r")["token"] == lock.token
    assert not (tmp_path / "r" / LOCK).exists()


def test_an_out_dir_inside_results_is_refused(write_profile):
    "--out-dir results/cifar10 once wrote params.json and a lock into the kept folder, which the chapter then refused."
    with pytest.raises(SystemExit, match="out_dir='results/cifar10' lies inside .*results, which holds the kept "
                                         "records.*outside results/"):
        main(["--profile", str(write_profile()), "--out-dir", "results/cifar10", "--dry-run"])
    assert not (ROOT / "results" / "cifar10" / "digits").exists()


def test_deeply_nested_json_is_a_corrupt_file_that_names_it(write_profile, tmp_path, repo, capsys):  # noqa: F811
    "In a record.json it crashed --dry-run (RecursionError), in MANIFEST.json check_kept and keeping, in the log too."
    teacher = tmp_path / "runs" / "digits" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / RECORD).write_text(NESTED)
    main(["--profile", str(write_profile()), "--dry-run"])
    assert f"{teacher / RECORD} nests lists or objects too deeply" in capsys.readouterr().out
    runs = _runs(tmp_path)
    dest = keep_records(dict(keep="results/x"), runs)
    for name in (LOG, MANIFEST):
        (dest / name).write_text(NESTED)
        with pytest.raises(CorruptFile, match=f"{dest / name} nests lists or objects too deeply"):
            keep_records(dict(keep="results/x"), runs)
    assert check_kept(dest) == [f"{dest / MANIFEST} nests lists or objects too deeply to be read (a crafted file?): "
                                "restore it from git (git checkout -- it)."]


@pytest.mark.parametrize("change, what", [(dict(valid_accuracy=None), "it has no valid_accuracy"),
                                          (dict(data=dict(sizes="x")), "data.sizes is x, not a mapping"),
                                          (dict(wall_time_s="1 h"), "wall_time_s is a str, not a int or float")])
def test_a_complete_record_without_what_readers_read_is_named_not_complete(change, what, tmp_path):
    "{status: complete, kind, params} counted as complete in the plan; then collect() raised KeyError: valid_accuracy."
    record = {k: v for k, v in dict(complete("teacher", dict(dataset="digits")), **change).items() if v is not None}
    (tmp_path / "digits" / "teacher").mkdir(parents=True)
    (tmp_path / "digits" / "teacher" / RECORD).write_text(json.dumps(record))
    with pytest.raises(CorruptFile, match=what): complete_record(tmp_path / "digits" / "teacher")
    with pytest.warns(UserWarning, match=f"left out of the results: .*{what}"): assert collect(tmp_path).empty


@pytest.mark.parametrize("key, value, error", [
    ("keep", "results/x\0y", "keep holds a NUL byte"),
    ("keep", "results/" + "k" * 300, "keep: the name k+... is 300 bytes long, and a file or folder name has at most"),
    ("name", "n" * 300, "a profile's name names its folders .* at most 200"),
    ("out_dir", "runs/a\0b", "out_dir holds a NUL byte"),
    ("imports", [".x"], r"imports=\['.x'\]: imports takes a list of module names \(absolute, dotted\)"),
    ("imports", [""], r"imports=\[''\]: imports takes a list of module names"),
    ("own_models", {"bogus": 1}, r"own_models: unknown key\(s\) \['bogus'\]; the keys here are bs, epochs")])
def test_profile_values_no_file_system_or_notebook_takes_are_refused_by_the_dry_run(key, value, error, tmp_path):
    "Each was a traceback (embedded null byte, OSError 36, TypeError, ValueError), or own_models: {bogus: 1} passed."
    with pytest.raises(SystemExit, match=error):
        main(["--profile", str(_profile(tmp_path, **{"out_dir": str(tmp_path / "runs"), key: value})), "--dry-run"])
    if key == "out_dir":
        with pytest.raises(SystemExit, match=error):
            main(["--profile", str(_profile(tmp_path)), "--out-dir", value, "--dry-run"])


class _Payload:
    "A pickle that would make a folder when unpickled without weights_only."
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return os.mkdir, (self.path,)


@pytest.mark.parametrize("crafted", ["empty", "payload"])
def test_an_unreadable_resume_state_is_named_and_its_fit_trains_from_its_start(crafted, tmp_path):
    "A 0-byte state gave a bare EOFError (no path); a payload torch's advice to load with weights_only=False."
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from kd_lib.recipes.fitting import fit
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    data = list(zip(x, (x[:, 0] > 0).long()))
    learn = Learner(DataLoaders(DataLoader(data[:24], bs=8, shuffle=True), DataLoader(data[24:], bs=8)),
                    torch.nn.Linear(4, 2), loss_func=torch.nn.CrossEntropyLoss(), path=tmp_path)
    state = tmp_path / "toy.state.pth"
    state.write_bytes(b"" if crafted == "empty" else pickle.dumps(_Payload(tmp_path / "ran"), protocol=2))
    with pytest.warns(UserWarning, match=f"{state}, the resume state of the fit 'toy', is unreadable .*trains again "
                                         "from its start") as warned:
        summary = fit(learn, "toy", epochs=2, lr=0.01, monitor="valid_loss", run=tmp_path, progress=False)
    assert summary["resumed_after"] == 0 and summary["epochs_run"] == 2
    assert not (tmp_path / "ran").exists() and not any("weights_only" in str(w.message) for w in warned)


def test_a_data_folder_follows_no_linked_folder_and_reads_only_regular_files(tmp_path):
    "A link train/a/loop -> .. made 12 images 394 train and 98 valid, the same ones in both; a FIFO f.png hung."
    root = _jpeg_tree(tmp_path / "t")
    (root / "train" / "a" / "loop").symlink_to("..", target_is_directory=True)
    os.mkfifo(root / "train" / "b" / "f.png")
    with pytest.warns(UserWarning, match=r"2 entries passed over.*train/a/loop, train/b/f\.png"):
        classes, items = _listing(root, "train")
    assert classes == ["a", "b"] and len(items) == 12
    with pytest.warns(UserWarning, match="passed over"):
        sizes = get_data("folder", root, size=16, bs=4, resident=False).split_info["sizes"]
    assert sizes["train"] + sizes["valid"] == 12
