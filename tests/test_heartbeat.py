"""Progress lines under the runner: a run says where it is (run, step, epoch, monitored value, elapsed) on stderr as
often as KD_LINES asks, and says nothing where it is unset or 0 (tests, papermill's kernels)."""
import io
import re

import pytest

from kd_lib.infra.heartbeat import ProgressLines
from kd_lib.runner.executors import LocalExecutor
from kd_lib.runner.jobs import kernel_env, run_jobs
from kd_lib.runner.profiles import expand, load_profile, plan
from kd_lib.recipes.train import train_student

LINE = re.compile(r"^  digits/resnet10-no_teacher-f0.25-s0 all: epoch (\d)/2(, batch \d+/\d+)?, accuracy "
                  r"(\d\.\d+|not yet measured), elapsed \dm\d\ds$")


@pytest.mark.parametrize("every", ["1e-9", "0", None])
def test_a_run_says_where_it_is_as_often_as_asked(every, tmp_path, tiny, monkeypatch, capsys):
    if every is None: monkeypatch.delenv("KD_LINES", raising=False)
    else: monkeypatch.setenv("KD_LINES", every)
    monkeypatch.setattr(ProgressLines, "said", None)
    train_student(**(tiny | dict(method="no_teacher", epochs=2, out_dir=tmp_path, progress=False)))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("  digits/")]
    if every != "1e-9":
        assert not lines
        return
    assert lines and all(LINE.match(ln) for ln in lines), lines[:5]
    ends = [ln for ln in lines if "batch" not in ln]  # one after each epoch, with that epoch's accuracy
    assert [LINE.match(ln)[1] for ln in ends] == ["1", "2"] and "not yet measured" not in ends[0]
    assert "not yet measured" in lines[0]  # a batch of the first epoch, before any validation


def test_papermills_kernels_say_nothing(monkeypatch):
    monkeypatch.setenv("KD_LINES", "30")
    assert kernel_env(1)["KD_LINES"] == "0"


def test_the_runners_workers_say_where_they_are(write_profile, monkeypatch, capfd):
    "Through the runner: each run in its forked worker writes its lines to the terminal's stderr."
    monkeypatch.setenv("KD_LINES", "1e-9")
    executor = LocalExecutor(1, threads=1)  # one thread: two crawl while another process holds a core
    try: run_jobs(plan(expand(load_profile(write_profile()))), executor=executor, stream=io.StringIO())
    finally: executor.shutdown()
    err = capfd.readouterr().err
    assert re.search(r"^  digits/teacher teacher: epoch 1/1, accuracy \d\.\d+, elapsed", err, re.M)
    assert re.search(r"^  digits/resnet10-stagewise-f1-s0 layer4: epoch 1/1", err, re.M)


def test_the_book_notebooks_say_which_are_still_being_written(monkeypatch):
    "While the book's notebooks run (the page on models of one's own trains for minutes), a line names those running."
    import time
    from concurrent.futures import ThreadPoolExecutor

    from kd_lib.runner.book import _say_while_running
    monkeypatch.setenv("KD_LINES", "0.1")
    out = io.StringIO()
    with ThreadPoolExecutor(2) as pool:
        futures = {pool.submit(time.sleep, 0.45): "own_models", pool.submit(time.sleep, 0.05): "figures"}
        _say_while_running(futures, out)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(re.fullmatch(r"  still writing own_models \(book notebooks, 0m00s\)", ln)
                                   for ln in lines), lines
    monkeypatch.setenv("KD_LINES", "0")
    out = io.StringIO()
    with ThreadPoolExecutor(1) as pool: _say_while_running({pool.submit(time.sleep, 0.2): "figures"}, out)
    assert out.getvalue() == ""
