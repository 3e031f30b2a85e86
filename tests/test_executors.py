"""Where runs execute: one GPU per local run, locks that hold across machines and outlive no owner, kernels
that die with their runner, two runners that share an out_dir and train every run once."""
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
from pathlib import Path

import psutil
import pytest
import torch

from kd_lib.infra import locks
from kd_lib import runner as rp
from kd_lib.infra.locks import INHERIT, LOCK, RunLock, RunLocked, handed_down, lock_holder
from kd_lib.runner.cli import main

ROOT = Path(__file__).resolve().parents[1]
def test_each_local_run_at_a_time_sees_a_gpu_of_its_own(write_profile):
    jobs = rp.plan(rp.expand(rp.load_profile(write_profile())))
    seen, lock, now = [], threading.Lock(), {}

    def execute(job, threads=None, gpu=None):
        with lock:
            assert gpu not in now.values(), "two runs at once on one GPU"
            now[job.name] = gpu
        time.sleep(0.1)
        with lock: seen.append(now.pop(job.name))
        return rp.Outcome("done")
    ex = rp.LocalExecutor(2, gpus=["3", "5"], workers=False)  # the stand-in `execute` runs in the slots' threads
    assert ex.threads >= 1 and "GPUs 3,5" in repr(ex)
    rp.run_jobs(jobs, stream=io.StringIO(), execute=execute, executor=ex)
    ex.shutdown()
    assert sorted(set(seen)) == ["3", "5"] and len(seen) == 3
    assert rp.kernel_env(1, "5")["CUDA_VISIBLE_DEVICES"] == "5"


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 7")
    assert rp.visible_gpus() == ["2", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert rp.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # unset: every CUDA device, as torch counts them
    assert rp.visible_gpus() == ["0", "1", "2"]


def test_a_teacher_runs_on_every_core_unless_threads_were_given(monkeypatch):
    "A run's weights depend on its torch threads: a count given holds for the teacher too (the Dask runs' count)."
    monkeypatch.setattr(rp.executors, "cores", lambda: 8)
    assert rp.LocalExecutor(2, gpus=[], workers=False).lone_threads() == 8
    assert rp.LocalExecutor(2, gpus=[], threads=1, workers=False).lone_threads() == 1
    assert rp.LocalExecutor(2, gpus=["0", "1"], workers=False).lone_threads() == 4


def _foreign_lock(run: Path, age_s: float) -> dict:
    "A lock of a process of another machine whose last heartbeat was `age_s` seconds ago."
    run.mkdir(parents=True)
    owner = dict(host="elsewhere-" + socket.gethostname(), pid=1, started="then", token="t0")
    (run / LOCK).write_text(json.dumps(owner))
    os.utime(run / LOCK, (time.time() - age_s,) * 2)
    return owner


def test_a_lock_of_another_machine_holds_while_it_beats_and_goes_stale_after(tmp_path):
    owner = _foreign_lock(tmp_path / "fresh", 10)
    assert lock_holder(tmp_path / "fresh") == owner
    with pytest.raises(locks.RunLocked, match="goes stale 10 minutes after its last heartbeat"):
        RunLock(tmp_path / "fresh").__enter__()
    _foreign_lock(tmp_path / "old", locks.STALE_S + 60)
    assert lock_holder(tmp_path / "old") is None
    with pytest.warns(UserWarning, match="from pid 1 on elsewhere-"), RunLock(tmp_path / "old") as lock:
        assert lock_holder(tmp_path / "old")["token"] == lock.token


def test_a_held_lock_beats(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    with RunLock(tmp_path) as lock:
        os.utime(lock.path, (time.time() - 3600,) * 2)
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 60
    assert not lock.path.exists()


HANDED = ("import sys\nfrom kd_lib.infra.locks import RunLock\n"
          "with RunLock(sys.argv[1]) as l: print(l.inherited, flush=True)")


def test_the_lock_is_handed_to_the_child_that_trains_and_stays_its_holders(tmp_path):
    with RunLock(tmp_path) as lock:
        child = subprocess.run([sys.executable, "-c", HANDED, str(tmp_path)], capture_output=True, text=True,
                               env=os.environ | {INHERIT: lock.token})
        assert child.stdout.strip() == "True", child.stderr
        assert lock_holder(tmp_path)["token"] == lock.token  # the child did not remove it
        stranger = subprocess.run([sys.executable, "-c", HANDED, str(tmp_path)], capture_output=True, text=True,
                                  env=os.environ | {INHERIT: "another token"})
        assert "RunLocked" in stranger.stderr
    assert not (tmp_path / LOCK).exists()


def test_threads_of_one_process_each_use_the_lock_handed_to_them(tmp_path):
    """Two runs trained at once in one process (a Dask worker's two threads): each recipe's RunLock uses its own
    thread's lock. Handed down through the process's environment, the second thread's token replaced the first's,
    and the first run refused its own lock."""
    barrier, seen = threading.Barrier(2), {}

    def train(run):
        with RunLock(run) as outer, handed_down(outer.token):
            barrier.wait()  # both have handed their lock down before either recipe takes one
            try:
                with RunLock(run) as inner: seen[run.name] = inner.inherited
            except RunLocked as e: seen[run.name] = e

    threads = [threading.Thread(target=train, args=(tmp_path / n,)) for n in ("a", "b")]
    for t in threads: t.start()
    for t in threads: t.join()
    assert seen == {"a": True, "b": True}
    assert not (tmp_path / "a" / LOCK).exists() and not (tmp_path / "b" / LOCK).exists()
    with RunLock(tmp_path / "a") as lock, handed_down("another token"), pytest.raises(RunLocked):
        RunLock(tmp_path / "a").__enter__()  # a token of no lock here hands down nothing


STUDENT_ONLY = """
import sys
from kd_lib import runner as rp
jobs = rp.plan(rp.expand(rp.load_profile(sys.argv[1])))
notebooks = sys.argv[2] == "True"
rp.run_jobs([j for j in jobs if j.kind == "student"], execute=rp.run_job if notebooks else rp.train_job,
            executor=rp.LocalExecutor(1, gpus=[], threads=1, workers=not notebooks))
"""
LONG = [dict(student="resnet10", method="no_teacher", epochs=8)]  # a student run long enough to be killed


@pytest.mark.parametrize("notebooks", [False, True], ids=["workers", "papermill"])
def test_a_killed_runner_takes_its_workers_with_it_and_a_new_one_finishes(notebooks, tmp_path, write_profile):
    "Papermill and its kernel once outlived a killed runner and went on training the run folder; so could a worker."
    cmd = [sys.executable, "-c", STUDENT_ONLY, str(write_profile(LONG)), str(notebooks)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "runs" / "digits" / "resnet10-no_teacher-f1-s0"
    deadline = time.time() + 240
    while not list(run.glob("*.state.pth")) and time.time() < deadline and p.poll() is None: time.sleep(0.05)
    kids = psutil.Process(p.pid).children(recursive=True)
    assert p.poll() is None and kids, "no worker to kill"
    assert not notebooks or any("ipykernel" in " ".join(k.cmdline()) for k in kids), "no kernel to kill"
    p.send_signal(signal.SIGKILL)
    p.wait()
    gone, alive = psutil.wait_procs(kids, timeout=15)
    assert not alive, f"outlived their runner: {[k.cmdline() for k in alive]}"
    assert lock_holder(run) is None  # its owner is dead: stale
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "complete" and record["stages"][0]["resumed_after"] >= 1


def test_two_runners_on_one_out_dir_train_every_run_once(tmp_path, write_profile):
    profile = write_profile()
    cmd = [sys.executable, "-m", "kd_lib.runner", "--profile", str(profile), "--runs-only", "--jobs", "1"]
    ps = [subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in ps]
    assert all(p.returncode == 0 for p in ps), logs
    trained = [name for log in logs for name in re.findall(r"\] done\s+(\S+) in ", log)]
    assert sorted(trained) == sorted(j.name for j in rp.expand(rp.load_profile(profile))), logs
    for path in (tmp_path / "runs").glob("*/*/record.json"):
        record = json.loads(path.read_text())
        assert record["status"] == "complete" and record["test_accuracy"] > 0, path
    assert not list((tmp_path / "runs").glob(f"*/*/{LOCK}*")) and not list((tmp_path / "runs").glob("*/*/*.state.pth"))


def test_cluster_flags_say_what_they_need(write_profile, monkeypatch, capsys):
    with pytest.raises(SystemExit): main(["--gpu"])
    assert "give --scheduler too" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "distributed", None)  # Dask absent
    with pytest.raises(SystemExit) as e:
        main(["--profile", str(write_profile()), "--runs-only", "--scheduler", "tcp://nowhere:8786"])
    assert "pip install -e '.[cluster]'" in str(e.value.code)


TWO = [dict(student="resnet10", method="no_teacher", epochs=2, seed=[0, 1])]  # two runs that need no teacher


def test_a_worker_killed_mid_run_fails_that_run_only_and_the_next_runner_resumes_it(write_profile):
    """A worker killed by SIGKILL (the OOM killer) once failed its run with a bare BrokenProcessPool, and every later
    run of its slot at once ('the process pool is not usable anymore')."""
    profile = write_profile(TWO)
    jobs = [j for j in rp.plan(rp.expand(rp.load_profile(profile))) if j.kind == "student"]
    ex = rp.LocalExecutor(1, gpus=[], threads=1)

    def kill_the_first_runs_worker():
        deadline = time.time() + 240
        while not list(jobs[0].run.glob("*.state.pth")) and time.time() < deadline: time.sleep(0.05)
        os.kill(next(iter(ex.workers[0]._processes)), signal.SIGKILL)  # its first epoch is saved, the second not
    killer = threading.Thread(target=kill_the_first_runs_worker)
    killer.start()
    with pytest.raises(RuntimeError) as e: rp.run_jobs(jobs, stream=io.StringIO(), executor=ex)
    killer.join()
    ex.shutdown()
    assert f"1 of 2 run(s) failed:\n* {jobs[0].name}: WorkerLost: its worker process was killed by signal 9 " \
           "(SIGKILL; the kernel's OOM killer does this). Start the runner again" in str(e.value)
    assert [j.status for j in jobs] == ["failed", "done"]
    again = [j for j in rp.plan(rp.expand(rp.load_profile(profile))) if j.kind == "student"]
    assert [j.status for j in again] == ["todo", "complete"]
    ex = rp.LocalExecutor(1, gpus=[], threads=1)
    rp.run_jobs(again, stream=io.StringIO(), executor=ex)
    ex.shutdown()
    record = json.loads((again[0].run / "record.json").read_text())
    assert record["status"] == "complete" and record["stages"][0]["resumed_after"] == 1
