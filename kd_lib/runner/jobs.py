"""Jobs: each run of a profile is one papermill execution of a notebook in a kernel of its own (`run_notebook`);
`run_jobs` runs them a few at a time, teachers before the students that distil them, with progress on stderr."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from ..locks import lock_holder
from ..records import complete_record
from .profiles import NOTEBOOKS, ROOT, Job

__all__ = ["kernel_env", "run_notebook", "Progress", "run_job", "run_jobs"]


def _fmt(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _children_cpu() -> float:
    "CPU seconds (user + system) of the finished child processes (the kernels), for the summary line."
    try:
        import resource
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    except (ImportError, OSError): return 0.0


def _cores() -> int:
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1


def kernel_env(threads: int) -> dict:
    "The environment of a papermill kernel: `threads` for torch/OpenMP/MKL, fastai's bars off."
    t = str(max(1, threads))
    return dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, KD_PROGRESS="0",
                PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning"))


def run_notebook(name: str, out: Path, threads: int = None, log: Path = None, **parameters) -> Path:
    """Execute `notebooks/<name>.ipynb` with `parameters` into `out` with papermill, in a kernel of its own
    (`threads` torch threads, all cores by default), from the repository root; returns `out`. On failure
    raises `RuntimeError` naming the executed notebook (which shows the failing cell) and the log."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Path(log) if log else out.with_suffix(".log")
    cmd = [sys.executable, "-m", "papermill", str(NOTEBOOKS / f"{name}.ipynb"), str(out), "--cwd", str(ROOT),
           "-k", "python3", "--no-progress-bar", "--log-level", "WARNING", "-y", yaml.safe_dump(parameters)]
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=kernel_env(threads or _cores()), cwd=ROOT)
    if r.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"papermill failed on notebooks/{name}.ipynb (exit {r.returncode}); executed notebook: "
                           f"{out}, log: {log}\n{tail}")
    return out


class Progress:
    "Run i of N, elapsed and estimated remaining time, on stderr; the estimate scales by the jobs' costs and slots."
    def __init__(self, jobs: list, stream=None, n_jobs: int = 1):
        self.jobs, self.stream, self.n_jobs = jobs, stream or sys.stderr, max(1, n_jobs)
        self.t0, self.lock = time.perf_counter(), threading.Lock()
        self.todo_cost = sum(j.cost for j in jobs if j.status == "todo")
        self.done_cost, self.done_s, self.i = 0.0, 0.0, sum(j.status == "complete" for j in jobs)
        self.started = self.i

    def say(self, msg: str):
        with self.lock: print(msg, file=self.stream, flush=True)

    def start(self, job: Job):
        with self.lock: self.started += 1; k = self.started
        self.say(f"[{k:>3}/{len(self.jobs)}] start  {job.name} (elapsed {self.elapsed})")

    @property
    def elapsed(self) -> str: return _fmt(time.perf_counter() - self.t0)

    def finish(self, job: Job):
        with self.lock:
            self.i += 1
            self.done_cost += job.cost
            self.done_s += job.seconds
            spent = time.perf_counter() - self.t0
            # seconds per unit of cost in one slot, from the finished runs (a long run still going does not skew it)
            left = self.done_s / self.done_cost * (self.todo_cost - self.done_cost) / self.n_jobs \
                if self.done_cost else 0
            what = {"done": "done", "complete": "done by another runner"}.get(job.status, "FAILED")
            print(f"[{self.i:>3}/{len(self.jobs)}] {what:6} {job.name} in {_fmt(job.seconds)} | elapsed {_fmt(spent)}"
                  f" | about {_fmt(left)} left", file=self.stream, flush=True)


def run_job(job: Job, threads: int, progress: Progress) -> Job:
    "Run `job` with papermill in a kernel of `threads` torch threads; any failure marks it failed, with its cause."
    progress.start(job)
    job.status, t = "running", time.perf_counter()
    job.log = job.output.with_suffix(".log")
    try:
        run_notebook(job.kind, job.output, threads=threads, log=job.log, **job.params)
        job.status = "done"
    except Exception as e:  # noqa: BLE001 -- whatever stops a run fails that run, and the runner goes on
        job.status, job.error = "failed", str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
    job.seconds = time.perf_counter() - t
    progress.finish(job)
    return job


def run_jobs(jobs: list, n_jobs: int = 1, stream=None, execute=None, poll_s: float = 5.0) -> list:
    """Run the `todo` jobs, `n_jobs` at a time, each kernel with cores / `n_jobs` torch threads, in order,
    except that a student which distils a teacher starts only once its dataset's teacher is complete
    (no_teacher runs need not wait), and that a run folder another process is training (its lock held) is
    waited for, checked every `poll_s` seconds, and not trained again if that process completed it. A job
    whose run fails, by any exception, is reported failed with its cause, and the students of a failed
    teacher as not started. `execute(job, threads, progress)` runs one job (default: `run_job`, papermill).
    Returns the jobs; raises `RuntimeError` listing the failures."""
    execute = execute or run_job
    cpu0 = _children_cpu()
    progress = Progress(jobs, stream, n_jobs)
    n_done = sum(j.status == "complete" for j in jobs)
    threads = max(1, _cores() // max(1, n_jobs))
    progress.say(f"{len(jobs)} runs: {n_done} complete already, {len(jobs) - n_done} to run, {n_jobs} at a time "
                 f"on {_cores()} cores, {threads} torch thread(s) each")
    teacher = {j.config.dataset: ("done" if j.status == "complete" else "todo") for j in jobs if j.kind == "teacher"}
    pending, waiting = [j for j in jobs if j.status == "todo"], set()
    cond = threading.Condition()

    def settle(j):
        "Record a finished job's outcome for the students that wait on it (under `cond`)."
        if j.kind == "teacher": teacher[j.config.dataset] = "done" if j.status in ("done", "complete") else "failed"
        cond.notify_all()

    def next_job():
        with cond:
            while True:
                for j in [j for j in pending if j.needs_teacher and teacher.get(j.config.dataset) == "failed"]:
                    pending.remove(j)
                    j.status, j.error = "failed", f"not started: the teacher of {j.config.dataset} failed"
                    progress.finish(j)
                if not pending: return None
                locked = False
                for j in [j for j in pending if not j.needs_teacher or teacher.get(j.config.dataset, "done") == "done"]:
                    if (owner := lock_holder(j.run)) is not None:
                        if j.name not in waiting:
                            waiting.add(j.name)
                            progress.say(f"waiting: {j.name} is being trained by pid {owner.get('pid')} on "
                                         f"{owner.get('host')}")
                        locked = True
                        continue
                    pending.remove(j)
                    if j.name in waiting and complete_record(j.run) is not None:  # another runner completed it
                        j.status = "complete"
                        progress.finish(j)
                        settle(j)
                        break
                    return j
                else: cond.wait(timeout=poll_s if locked else None)

    def worker():
        while (j := next_job()) is not None:
            try: execute(j, threads, progress)
            except Exception as e:  # noqa: BLE001 -- a failing `execute` fails its job, never the runner
                j.status, j.error = "failed", f"{type(e).__name__}: {e}"
            finally:
                with cond: settle(j)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(n_jobs, len(pending))))]
    for w in workers: w.start()
    for w in workers: w.join()
    for j in jobs:
        if j.status not in ("done", "complete", "failed"):
            j.status, j.error = "failed", f"ended {j.status}, without a result"
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} run(s) failed:\n"
                           + "\n".join(f"* {j.name}: {j.error}" for j in failed))
    progress.say(f"all {len(jobs)} runs complete (elapsed {progress.elapsed}, CPU time of the kernels "
                 f"{_fmt(_children_cpu() - cpu0)})")
    return jobs
