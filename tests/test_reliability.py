"""Nothing lost, nothing false: every run kind resumes after a kill, a failing run is reported as failed,
bad settings and wrong files are refused early with a message that names the fix, one process trains a
run folder at a time, and results stay readable (on another device, by the group)."""
import errno
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastai.callback.core import Callback

from conftest import complete
from kd_lib import runner as rp
from kd_lib.data.loaders import DatasetError, get_data
from kd_lib.infra.locks import LOCK, RunLock, RunLocked, lock_holder
from kd_lib.core.models import resnet, teacher
from kd_lib.infra.files import CorruptFile, DiskFull, atomic_write, read_json, write_json
from kd_lib.evidence.collect import collect
from kd_lib.runner import jobs as runner_jobs
from kd_lib.runner.cli import main
from kd_lib.recipes.train import train_student, train_teacher

ROOT = Path(__file__).resolve().parents[1]
TEACHER = dict(dataset="digits", size=16, bs=32, epochs=3, lr=1e-3, pretrained=False, progress=False)
def _start_and_kill(code: str, out_dir: Path, state: Path) -> None:
    "Run `code` in a subprocess and `kill -9` it once `state` (a resume file) exists."
    p = subprocess.Popen([sys.executable, "-c", code, str(out_dir)], env=os.environ | {"KD_PROGRESS": "0"})
    deadline = time.time() + 180
    while not state.exists() and time.time() < deadline and p.poll() is None: time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()


KILLED_TEACHER = f"""
import sys, torch
from kd_lib.recipes.train import train_teacher
torch.set_num_threads(1)
train_teacher(**{TEACHER!r}, out_dir=sys.argv[1])
"""


def test_a_teacher_killed_mid_fit_resumes_to_the_uninterrupted_weights(tmp_path):
    "Its state holds fastai's optimizer (an `L` of hypers), which a weights-only load once refused."
    run = tmp_path / "b" / "digits" / "teacher"
    _start_and_kill(KILLED_TEACHER, tmp_path / "b", run / "teacher.state.pth")
    assert not (run / "record.json").exists()
    with pytest.warns(UserWarning, match="no longer running"):
        resumed = train_teacher(**TEACHER, out_dir=tmp_path / "b")
    whole = train_teacher(**TEACHER, out_dir=tmp_path / "a")
    assert [h for h in resumed["stages"][0]["history"]] == [h for h in whole["stages"][0]["history"]]
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    a, b = (torch.load(p / "digits" / "teacher" / "teacher.pth") for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(run.glob("*.state.pth")) and not (run / LOCK).exists()


def test_any_exception_in_a_run_fails_that_run_and_the_runner(tmp_path, monkeypatch, write_profile):
    "An OSError (a read-only out_dir) once killed the worker thread and the runner said 'all complete'."
    import kd_lib.recipes.train
    def read_only(config, out_dir, **kw): raise OSError(errno.EROFS, "Read-only file system", str(out_dir))
    for recipe in ("train_teacher", "train_student"): monkeypatch.setattr(kd_lib.recipes.train, recipe, read_only)
    jobs = rp.plan(rp.expand(rp.load_profile(write_profile())))
    with pytest.raises(RuntimeError) as e: rp.run_jobs(jobs, n_jobs=2, stream=io.StringIO())  # in forked workers
    lines = dict(re.findall(r"\* (\S+): (.*)", str(e.value)))
    assert "OSError" in lines["digits/teacher"] and "Read-only" in lines["digits/teacher"]
    assert "OSError" in lines["digits/resnet10-no_teacher-f1-s0"]  # its own failure, not the teacher's
    assert lines["digits/resnet10-stagewise-f1-s0"] == "not started: the teacher of digits failed"
    with pytest.raises(SystemExit) as e:
        main(["--profile", str(tmp_path / "tiny.yaml"), "--runs-only"])
    assert e.value.code != 0 and "3 of 3 run(s) failed" in str(e.value.code)


@pytest.mark.parametrize("kw", [dict(epochs=0), dict(epochs=-2), dict(lr=-1e-3), dict(size=0), dict(size=-16),
                                dict(pretrained="false"), dict(augment="no")])
def test_bad_settings_write_nothing(kw, tmp_path, tiny):
    "Each of these once trained (or crashed after writing) a record marked complete."
    with pytest.raises((TypeError, ValueError)): train_teacher(**(TEACHER | kw), out_dir=tmp_path)
    if "pretrained" not in kw:
        with pytest.raises((TypeError, ValueError)): train_student(**(tiny | kw), out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_folder_with_params_json_only_blocks_nothing(tmp_path, tiny):
    "A run stopped before it trained (a typo, since fixed) leaves params.json: neither recipe nor runner refuses."
    args = tiny | dict(method="no_teacher", epochs=1, out_dir=tmp_path, progress=False)
    run = tmp_path / "digits" / "resnet10-no_teacher-f0.25-s0"
    run.mkdir(parents=True)
    write_json(run / "params.json", dict(kind="student", epochs=99))
    assert train_student(**args)["params"]["epochs"] == 1


HOLD = ("import sys, time\nfrom kd_lib.infra.locks import RunLock\n"
        "with RunLock(sys.argv[1]):\n print('held', flush=True)\n time.sleep(120)")


def _hold(run: Path) -> subprocess.Popen:
    "A process that holds `run`'s lock until killed."
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_one_process_trains_a_run_folder_and_a_dead_ones_lock_is_taken_over(tmp_path, tiny):
    run = tmp_path / "digits" / "resnet10-no_teacher-f0.25-s0"
    args = tiny | dict(method="no_teacher", epochs=1, out_dir=tmp_path, progress=False)
    p = _hold(run)
    try:
        with pytest.raises(RunLocked, match=f"pid {p.pid} on .*wait for it"): train_student(**args)
        assert lock_holder(run)["pid"] == p.pid and not (run / "params.json").exists()
    finally:
        p.kill()
        p.wait()
    assert lock_holder(run) is None  # its owner is dead: stale
    with pytest.warns(UserWarning, match=f"from pid {p.pid} on .*, which is no longer running"):
        assert train_student(**args)["status"] == "complete"
    assert not (run / LOCK).exists() and not list(run.glob(f"{LOCK}*"))


def test_a_lock_is_one_owners_at_a_time_in_this_process_too(tmp_path):
    with RunLock(tmp_path / "r"):
        assert lock_holder(tmp_path / "r")["pid"] == os.getpid()
        with pytest.raises(RunLocked): RunLock(tmp_path / "r").__enter__()
    assert lock_holder(tmp_path / "r") is None and not (tmp_path / "r" / LOCK).exists()


def test_a_second_runner_waits_for_a_locked_run_and_does_not_train_it_again(write_profile):
    jobs = rp.plan(rp.expand(rp.load_profile(write_profile())))
    busy = jobs[1]  # the no_teacher run, which another runner is training
    executed, stream = [], io.StringIO()

    def execute(job, threads=None, gpu=None):
        executed.append(job.name)
        return rp.Outcome("done")

    other = _hold(busy.run)
    try:
        t = threading.Thread(target=rp.run_jobs, args=(jobs, 1, stream, execute, 0.05))
        t.start()
        deadline = time.time() + 30
        while "waiting: " + busy.name not in stream.getvalue() and time.time() < deadline: time.sleep(0.02)
        assert "is being trained by pid" in stream.getvalue() and busy.name not in executed
        write_json(busy.run / "record.json", complete("student", busy.config.params()))
    finally:
        other.kill()
        other.wait()
    t.join(30)
    assert not t.is_alive() and busy.name not in executed and busy.status == "complete"
    assert set(executed) == {j.name for j in jobs} - {busy.name} and "done by another runner" in stream.getvalue()


def test_a_run_another_runner_left_corrupt_fails_named_and_the_runner_goes_on(write_profile):
    "The record a waited-for run left unreadable once stopped the waiting runner with a bare CorruptFile."
    jobs = rp.plan(rp.expand(rp.load_profile(write_profile())))
    busy, stream, errors = jobs[1], io.StringIO(), []

    def execute(job, threads=None, gpu=None):  # as a worker runs it: the lock, then the record checked
        return rp.jobs._locked_run(job, lambda token: None, 0.05)

    def runner():
        try: rp.run_jobs(jobs, 1, stream, execute, 0.05)
        except RuntimeError as e: errors.append(str(e))
    other = _hold(busy.run)
    try:
        t = threading.Thread(target=runner)
        t.start()
        deadline = time.time() + 30
        while "waiting: " + busy.name not in stream.getvalue() and time.time() < deadline: time.sleep(0.02)
        (busy.run / "record.json").write_text('{"kind": "student", "status": "comp')
    finally:
        other.kill()
        other.wait()
    t.join(30)
    assert not t.is_alive() and len(errors) == 1
    assert f"{busy.name}: " in errors[0] and "record.json is not valid JSON" in errors[0]
    assert all(j.status == "done" for j in jobs if j is not busy)


def _jpeg_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


def test_a_truncated_jpeg_is_named_by_the_image_check(tmp_path):
    "It opens and verifies, and failed only mid-epoch with 'image file is truncated', naming no file."
    root = _jpeg_tree(tmp_path / "t")
    bad = root / "train" / "b" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:1200])
    with Image.open(bad) as im: im.verify()  # what the check once did: it passes
    with pytest.raises(DatasetError, match="train/b/3.jpg"): get_data("folder", root, size=16, bs=4)
    assert get_data("folder", root, size=16, bs=4, skip_bad=True).split_info["skipped_bad"] == 1


def test_wrong_teacher_paths_get_clear_errors(tmp_path, tiny):
    args = tiny | dict(method="stagewise", epochs=1, out_dir=tmp_path, progress=False)
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="notes.txt is not a PyTorch weights file"):
        train_student(**args, teacher_path=text)
    student = tmp_path / "student.pth"
    torch.save(resnet("resnet10").state_dict(), student)
    with pytest.raises(ValueError, match="does not hold a ResNet34 teacher of 10 classes.*a student's weights"):
        train_student(**args, teacher_path=student)
    other = tmp_path / "other" / "teacher"  # a teacher of another dataset with as many classes
    other.mkdir(parents=True)
    torch.save(teacher(10, pretrained=False).state_dict(), other / "teacher.pth")
    write_json(other / "record.json", dict(kind="teacher", data=dict(vocab=[f"c{i}" for i in range(10)])))
    with pytest.raises(ValueError, match=r"trained on the classes \['c0'.*this run's data has \['0'"):
        train_student(**args, teacher_path=other)


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_is_said_plainly_and_nothing_half_written_stays(failure, tmp_path):
    def write(tmp):
        Path(tmp).write_bytes(b"half")
        raise failure
    with pytest.raises(DiskFull, match="The disk is full: could not write .*w.pth.*it resumes"):
        atomic_write(tmp_path / "w.pth", write)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved_on_a_gpu(monkeypatch):
    "torch.save as a CUDA machine writes: every storage tagged cuda:0, which a plain load refuses on this CPU."
    import torch.serialization as ser
    def save(obj, path):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ser, "location_tag", lambda storage: "cuda:0")
            torch.save(obj, path)
    return save


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests loading GPU-saved files on a machine without a GPU")
def test_weights_and_resume_states_saved_on_a_gpu_load_here(tmp_path, tiny, saved_on_a_gpu):
    "The book is built on a laptop from GPU runs: the teacher, a student's stage weights and a resume state."
    path = tmp_path / "gpu" / "teacher.pth"
    path.parent.mkdir()
    saved_on_a_gpu(teacher(10, pretrained=False).state_dict(), path)
    with pytest.raises(RuntimeError, match="CUDA"): torch.load(path, weights_only=True)  # what a plain load does
    from kd_lib.recipes.train import load_student, load_teacher
    load_teacher(path, 10)
    args = tiny | dict(method="no_teacher", epochs=2, out_dir=tmp_path, progress=False)
    run = tmp_path / "digits" / "resnet10-no_teacher-f0.25-s0"
    with pytest.MonkeyPatch.context() as mp:  # stop after the first epoch, its resume state written as a GPU would
        from kd_lib.recipes import fitting
        def stop(path, obj):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            saved_on_a_gpu(obj, path)
            if Path(path).name.endswith(".state.pth"): raise KeyboardInterrupt
        mp.setattr(fitting, "save_weights", stop)
        with pytest.raises(KeyboardInterrupt): train_student(**args)
    record = train_student(**args)  # resumes from the GPU-tagged state
    assert record["stages"][0]["resumed_after"] == 1
    weights = run / "stages" / "all.pth"
    saved_on_a_gpu(torch.load(weights, weights_only=True), weights)
    load_student(run)


@pytest.mark.parametrize("umask,mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_written_files_are_as_readable_as_the_umask_allows(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "r.json", {})
        atomic_write(tmp_path / "w.pth", partial(torch.save, {}))
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {mode}
    assert read_json(tmp_path / "r.json") == {}


# ---- Nothing lost, nothing forged (issue 20): each test below failed before its fix.

STUDENT = dict(dataset="digits", size=16, bs=32, fraction=0.25, lr=1e-3, method="no_teacher", epochs=2,
               progress=False)
KILLED_AFTER_FIT = f"""
import os, sys, torch
import kd_lib.recipes.records as records, kd_lib.recipes.train as train
torch.set_num_threads(1)
def die(*args, **kwargs): os.kill(os.getpid(), 9)  # the fit is over, its outputs and record not yet written
if sys.argv[2] == "teacher": train.evaluate = die; train.train_teacher(**{TEACHER!r}, out_dir=sys.argv[1])
else:
    real = records.write_json
    records.write_json = lambda path, obj: die() if path.name == "progress.json" else real(path, obj)
    train.train_student(**{STUDENT!r}, out_dir=sys.argv[1])
"""


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_a_kill_between_a_fit_and_its_record_keeps_the_fit(kind, tmp_path):
    "fit() deleted the resume state before the weights and the record were written: the fit was trained again."
    p = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIT, str(tmp_path / "b"), kind],
                       env=os.environ | {"KD_PROGRESS": "0"})
    assert p.returncode == -signal.SIGKILL
    recipe, args = (train_teacher, TEACHER) if kind == "teacher" else (train_student, STUDENT)
    with pytest.warns(UserWarning, match="no longer running"): resumed = recipe(**args, out_dir=tmp_path / "b")
    whole = recipe(**args, out_dir=tmp_path / "a")
    fit = resumed["stages"][0]
    assert fit["resumed_after"] == fit["epochs_run"] == args["epochs"]  # no epoch trained again
    assert fit["history"] == whole["stages"][0]["history"] and resumed["test_accuracy"] == whole["test_accuracy"]
    assert not list((tmp_path / "b").rglob("*.state.pth")) and not list((tmp_path / "b").rglob("models/*.pth"))


def test_a_corrupt_json_names_its_file_and_what_to_do(tmp_path):
    for text, what in (("", "is empty"), ('{"status": "compl', "is not valid JSON"), ("[1, 2]", "holds a JSON list")):
        (tmp_path / "record.json").write_text(text)
        with pytest.raises(CorruptFile, match=f"{tmp_path / 'record.json'} {what}.*delete the run folder {tmp_path}"):
            read_json(tmp_path / "record.json")


def test_the_runner_reports_a_corrupt_run_as_failed_and_goes_on(tmp_path, write_profile, capsys):
    "A truncated record stopped --dry-run, collect and check_kept with a bare JSONDecodeError naming no file."
    path = write_profile()
    jobs = rp.expand(rp.load_profile(path))
    bad = jobs[1]
    bad.run.mkdir(parents=True)
    (bad.run / "record.json").write_text('{"kind": "student", "status": "comp')
    main(["--profile", str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert f"failed    {bad.name}" in out and f"{bad.run / 'record.json'} is not valid JSON" in out
    executed = []
    def execute(job, threads=None, gpu=None):
        executed.append(job.name)
        return rp.Outcome("done")
    with pytest.raises(RuntimeError, match=f"1 of 3 run\\(s\\) failed:\n\\* {bad.name}: .*record.json is not valid"):
        rp.run_jobs(rp.plan(jobs), stream=io.StringIO(), execute=execute)
    assert executed == [j.name for j in jobs if j is not bad]
    with pytest.warns(UserWarning, match="left out of the results: .*record.json is not valid JSON"):
        assert collect(tmp_path / "runs").empty


def test_a_full_disk_in_torchs_own_words_is_said_plainly(tmp_path):
    "The serializer's 'unexpected pos' (a tmpfs filling up) was not known as a full disk."
    def write(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1272384 vs 1272280")
    with pytest.raises(DiskFull, match=f"could not write {tmp_path / 'w.pth'}"): atomic_write(tmp_path / "w.pth", write)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    "A 40 MB tmpfs (root only: skipped where it cannot be mounted)."
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root); test_a_full_disk_in_torchs_own_words covers the message")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)  # lazily: a closed file may still be referenced


def test_a_run_filling_the_disk_stops_with_disk_full_and_leaves_no_half_file(tiny_disk, tiny):
    "A resnet10's resume state (about 60 MB) does not fit 40 MB: fastai's learn.save left a partial models/all.pth."
    with pytest.raises(DiskFull, match="The disk is full: could not write .*all"):
        train_student(**(tiny | dict(method="no_teacher", epochs=1, out_dir=tiny_disk, progress=False)))
    assert not [p for p in tiny_disk.rglob("*") if p.name.endswith(".tmp")]
    for p in tiny_disk.rglob("*.pth"): torch.load(p, map_location="cpu", weights_only=True)  # whole, if there


def test_atomic_write_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    "A rename survives a kill; only a flushed file and folder survive a power loss."
    from kd_lib.infra import files
    synced = []
    monkeypatch.setattr(files, "_fsync", lambda path, directory=False: synced.append((Path(path).parent, directory)))
    write_json(tmp_path / "r.json", {})
    assert synced == [(tmp_path, False), (tmp_path.parent, True)]  # the temporary file, then the folder


def test_a_reused_pid_is_no_owner(tmp_path):
    "A lock naming a live unrelated process (pid 1) once made the runner wait for ever."
    run = tmp_path / "r"
    run.mkdir()
    (run / LOCK).write_text(json.dumps(dict(host=socket.gethostname(), pid=1, proc_start=12345, token="x")))
    assert lock_holder(run) is None  # pid 1 is alive, but it started at another time than the lock's owner
    with pytest.warns(UserWarning, match="from pid 1 on"), RunLock(run): assert lock_holder(run)["pid"] == os.getpid()


@pytest.mark.parametrize("text", ["[1, 2]", '{"host": "h", "pid": "abc"}', "", "{"])
def test_a_malformed_lock_is_stale_with_a_warning(text, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / LOCK).write_text(text)
    with pytest.warns(UserWarning, match="not a lock this library wrote"):
        with RunLock(run): assert lock_holder(run)["pid"] == os.getpid()


def test_a_killed_papermill_leaves_the_notebook_as_it_was(tmp_path, monkeypatch):
    "A runner killed while papermill wrote left a 0-byte book notebook, and `make html` failed on it."
    out = tmp_path / "figures.ipynb"
    out.write_text('{"cells": []}')
    class Killed:  # papermill killed mid-write: an empty output, exit -9
        def __init__(self, cmd, **kwargs): Path(cmd[4]).write_text("")
        def wait(self): return -9
    monkeypatch.setattr(runner_jobs.subprocess, "Popen", Killed)
    with pytest.raises(RuntimeError, match="exit -9"): runner_jobs.run_notebook("figures", out, log=tmp_path / "l")
    assert out.read_text() == '{"cells": []}' and sorted(p.name for p in tmp_path.iterdir()) == ["figures.ipynb", "l"]


def test_an_interrupted_runner_kills_papermill_at_once(tmp_path, monkeypatch):
    killed = []
    class Interrupted:
        def __init__(self, cmd, **kwargs): self.new_session = kwargs.get("start_new_session")
        def wait(self):
            if not killed: raise KeyboardInterrupt
            return -9
        def kill(self): killed.append(self.new_session)
    monkeypatch.setattr(runner_jobs.subprocess, "Popen", Interrupted)
    with pytest.raises(KeyboardInterrupt): runner_jobs.run_notebook("figures", tmp_path / "o.ipynb", log=tmp_path / "l")
    assert killed == [True] and not (tmp_path / "o.ipynb").exists()


def test_records_name_data_by_a_path_relative_to_the_data_root(tmp_path, kd_data):
    assert get_data("digits", size=16, bs=32).split_info["path"] == "digits"
    root = _jpeg_tree(tmp_path / "mine")  # a folder of the user's own, outside the data root: as given
    assert get_data("folder", root, size=16, bs=4).split_info["path"] == str(root)
    from kd_lib.recipes.records import versions
    assert "/" not in versions()["argv"][0]


def test_a_corrupt_teacher_says_to_train_it_again(tmp_path, tiny):
    bad = tmp_path / "teacher.pth"
    torch.save(teacher(10, pretrained=False).state_dict(), bad)
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt, truncated.*Train it again") as e:
        train_student(**(tiny | dict(method="stagewise", epochs=1, out_dir=tmp_path, teacher_path=bad)))
    assert "Re-running `torch.load`" not in str(e.value)
    assert not [p for p in (tmp_path / "digits").rglob("*") if p.is_file()]  # refused before anything was written


def test_an_image_replaced_by_one_of_the_same_size_and_time_is_checked_again(tmp_path, monkeypatch):
    "The unreadable-image memo was keyed on size and modification time only."
    from kd_lib.data import resident
    def replace(img: Path, data: bytes, stat) -> None:
        new = img.with_name("new.tmp")
        new.write_bytes(data)
        os.utime(new, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(new, img)  # another file, of the same size and modification time
    root = _jpeg_tree(tmp_path / "t")
    monkeypatch.setattr(resident, "RACY_S", 0.0)  # the memo is kept at once
    get_data("folder", root, size=16, bs=4, resident=False)
    assert list((Path(os.environ["KD_DATA"]) / "checks").glob("*.json"))  # kept
    img = root / "train" / "a" / "1.jpg"
    data, stat = img.read_bytes(), img.stat()
    replace(img, b"not an image".ljust(len(data), b" "), stat)
    with pytest.raises(DatasetError, match="train/a/1.jpg"): get_data("folder", root, size=16, bs=4, resident=False)
    replace(img, data, stat)
    monkeypatch.undo()  # racy files (changed within RACY_S): nothing is kept, so a change in the same tick is seen
    other = _jpeg_tree(tmp_path / "u")
    get_data("folder", other, size=16, bs=4, resident=False)
    bad = other / "train" / "b" / "2.jpg"
    bad.write_bytes(b"not an image".ljust(bad.stat().st_size, b" "))
    with pytest.raises(DatasetError, match="train/b/2.jpg"): get_data("folder", other, size=16, bs=4, resident=False)


class _Scaler:
    "Stands in for fp16's GradScaler on the CPU: a loss scale that changes every optimizer step."
    def __init__(self): self.scale = 1.0
    def state_dict(self): return {"scale": self.scale}
    def load_state_dict(self, sd): self.scale = sd["scale"]


class _Amp(Callback):
    "Stands in for fastai's MixedPrecision: makes `learn.scaler` before the fit, which every step changes."
    order = 10
    def before_fit(self): self.learn.scaler = _Scaler()
    def after_step(self): self.learn.scaler.scale *= 1.5
    def after_fit(self): self.final, self.learn.scaler = self.learn.scaler.scale, None


class _KillAfter(Callback):
    "Interrupts a fit at the end of epoch `epoch`, after its checkpoints were written."
    order = 90
    def __init__(self, epoch): self.at = epoch
    def after_epoch(self):
        if self.epoch == self.at: raise KeyboardInterrupt


def test_a_resumed_fit_carries_on_the_loss_scalers_state(tmp_path):
    "fp16's GradScaler state was not in the resume state: a resumed fp16 run scaled its losses otherwise."
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from kd_lib.recipes.fitting import fit
    def learner(path):
        torch.manual_seed(0)
        x = torch.randn(64, 4)
        data = list(zip(x, (x[:, 0] > 0).long()))
        dls = DataLoaders(DataLoader(data[:48], bs=8, shuffle=True), DataLoader(data[48:], bs=8))
        return Learner(dls, torch.nn.Linear(4, 2), loss_func=torch.nn.CrossEntropyLoss(), path=path, cbs=_Amp())
    whole = learner(tmp_path / "a")
    fit(whole, "toy", epochs=3, lr=0.01, monitor="valid_loss", run=tmp_path / "a", progress=False)
    killed = learner(tmp_path / "b")
    killed.add_cb(_KillAfter(epoch=1))
    with pytest.raises(KeyboardInterrupt):
        fit(killed, "toy", epochs=3, lr=0.01, monitor="valid_loss", run=tmp_path / "b", progress=False)
    resumed = learner(tmp_path / "b")
    fit(resumed, "toy", epochs=3, lr=0.01, monitor="valid_loss", run=tmp_path / "b", progress=False)
    amp = [next(c for c in l.cbs if isinstance(c, _Amp)) for l in (whole, resumed)]
    assert amp[0].final == amp[1].final == 1.5 ** (3 * 6)
