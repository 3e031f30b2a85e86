"""Runs on a Dask cluster (the `cluster` extra): a LocalCluster of 2 workers gives the local executor's
records, and the run of a killed worker is resubmitted and resumes to the uninterrupted weights."""
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from kd_lib import runner as rp
from kd_lib.infra.locks import LOCK, lock_holder

distributed = pytest.importorskip("distributed", reason="the Dask tests need the cluster extra: "
                                                        "pip install -e '.[cluster]'")


@pytest.fixture(scope="module")
def cluster():
    "A LocalCluster of 2 worker processes (with nannies, which restart a killed worker), 1 task thread each."
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            distributed.Client(c) as client:
        yield client


def _records(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/*/record.json")}


def _weights(run: Path) -> dict:
    "The weights a run keeps: the teacher's, or each stage's of a student."
    return {p.name: torch.load(p, map_location="cpu") for p in [*run.glob("*.pth"), *run.glob("stages/*.pth")]
            if ".state" not in p.name}


def _resnet10_only(prof: dict) -> dict:
    "The smoke profile with its resnet10 students only (every method, fraction and long twin; half the runs)."
    return dict(prof, datasets=[dict(d, students=[dict(g, student="resnet10") for g in d["students"]])
                                for d in prof["datasets"]])


def test_the_smoke_profile_on_a_local_cluster_gives_the_local_records(tmp_path, cluster):
    prof = _resnet10_only(rp.load_profile("smoke"))
    local, dask = tmp_path / "local", tmp_path / "dask"
    rp.run_jobs(rp.plan(rp.expand(prof, local)), stream=io.StringIO(),
                executor=rp.LocalExecutor(2, gpus=[], threads=1))
    out = io.StringIO()
    rp.run_jobs(rp.plan(rp.expand(prof, dask)), stream=out, executor=rp.DaskExecutor(cluster, threads=1))
    assert "send" in out.getvalue() and "the Dask cluster at" in out.getvalue()
    a, b = _records(local), _records(dask)
    assert set(a) == set(b) and len(a) == len(rp.expand(prof, local))
    for name in a:
        assert b[name]["status"] == "complete"
        assert b[name]["test_accuracy"] == a[name]["test_accuracy"], name
        for stage_a, stage_b in zip(a[name]["stages"], b[name]["stages"]):
            assert stage_a["history"] == stage_b["history"], name
    run = "digits/resnet10-stagewise-f1-s0"
    wa, wb = _weights(local / run), _weights(dask / run)
    assert wa and all(torch.equal(wa[f][k], wb[f][k]) for f in wa for k in wa[f])


LONG = [dict(student="resnet10", method="no_teacher", epochs=8)]  # a student run long enough to be killed


def test_a_killed_workers_run_is_resubmitted_and_resumes_to_the_uninterrupted_weights(tmp_path, cluster,
                                                                                    write_profile):
    prof = rp.load_profile(write_profile(LONG))
    whole, killed = ([j for j in rp.plan(rp.expand(prof, tmp_path / d)) if j.kind == "student"]
                     for d in ("whole", "killed"))
    rp.run_jobs(whole, stream=io.StringIO(), executor=rp.LocalExecutor(1, gpus=[], threads=1))
    run, out = killed[0].run, io.StringIO()
    t = threading.Thread(target=rp.run_jobs, args=(killed,),
                         kwargs=dict(stream=out, executor=rp.DaskExecutor(cluster, threads=1), poll_s=0.5))
    t.start()
    deadline = time.time() + 240
    while not list(run.glob("*.state.pth")) and time.time() < deadline: time.sleep(0.05)
    worker = lock_holder(run)["pid"]
    assert worker in cluster.run(os.getpid).values(), "the run's lock is held by its Dask worker"
    os.kill(worker, signal.SIGKILL)
    t.join(300)
    assert not t.is_alive() and killed[0].status == "done", out.getvalue()
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "complete" and record["stages"][0]["resumed_after"] >= 1
    assert record["stages"][0]["history"] == json.loads((whole[0].run / "record.json").read_text())["stages"][0]["history"]
    wa, wb = _weights(whole[0].run), _weights(run)
    assert wa and all(torch.equal(wa[f][k], wb[f][k]) for f in wa for k in wa[f])
    assert not (run / LOCK).exists()





def test_workers_of_one_host_share_its_cores(cluster, monkeypatch):
    "Each worker once divided the cores by its own task threads: two workers of one host took all cores each."
    from kd_lib.runner import executors
    def threads_given(job, threads=None): return threads
    got = cluster.submit(executors._on_worker, threads_given, None, None, pure=False).result()
    assert cluster.submit(executors.host_slots, pure=False).result() == 2  # 2 workers x 1 thread, on this host
    assert got == max(1, executors.cores() // 2)
