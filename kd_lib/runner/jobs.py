"""Jobs: each run of a profile is its recipe run in an executor's worker (`train_job`), or its notebook executed by
papermill in a kernel of its own (`run_job`, `run_notebook`); `run_jobs` runs them a few at a time, teachers before
the students that distil them, with progress on stderr."""
import importlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..infra.files import CorruptFile
from ..infra.locks import INHERIT, RunLock, RunLocked, handed_down, lock_holder
from ..recipes.records import complete_record
from .estimate import Estimate
from .executors import LocalExecutor, cores as _cores
from .profiles import Job, NOTEBOOKS, ROOT

__all__ = ["kernel_env", "run_notebook", "Progress", "run_job", "train_job", "run_jobs"]


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


def kernel_env(threads: int, gpu: str = None) -> dict:
    """The environment of a papermill kernel: `threads` for torch/OpenMP/MKL, fastai's bars and the progress lines
    off (the kernel's output goes to its notebook), and when `gpu` is given, that GPU only (`CUDA_VISIBLE_DEVICES`)."""
    t = str(max(1, threads))
    env = dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, KD_PROGRESS="0", KD_LINES="0",
               PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning"))
    if gpu is not None: env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def _die_with_parent() -> None:
    """In a child before it starts: be killed when the thread that started it dies (Linux), so no kernel outlives a
    killed runner."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError): pass


def _whole(path: Path) -> bool:
    "Whether `path` holds a whole notebook (JSON that parses), not one cut off while it was written."
    try: return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError): return False


def run_notebook(name: str, out: Path, threads: int = None, log: Path = None, gpu: str = None, lock: str = None,
                 **parameters) -> Path:
    """Execute `notebooks/<name>.ipynb` with `parameters` into `out` with papermill, in a kernel of its own
    (`threads` torch threads, all cores by default; `gpu`: the one GPU it sees), from the repository root;
    returns `out`. `lock`: the token of the run-folder lock the caller holds, handed to the kernel. Papermill
    writes a temporary file that replaces `out` once it has finished, so a killed run never leaves a half (or
    empty) notebook; it runs in a session of its own, is killed at once when the caller is interrupted, and dies
    with the calling thread (its kernel with it). On failure raises `RuntimeError` naming the executed notebook
    (which shows the failing cell) and the log."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"): stale.unlink(missing_ok=True)  # left by a killed run
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    log = Path(log) if log else out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)  # the book's pages log into a folder no run may have made yet
    cmd = [sys.executable, "-m", "papermill", str(NOTEBOOKS / f"{name}.ipynb"), str(tmp), "--cwd", str(ROOT),
           "-k", "python3", "--no-progress-bar", "--log-level", "WARNING", "-y", yaml.safe_dump(parameters)]
    env = kernel_env(threads or _cores(), gpu)
    if lock: env[INHERIT] = lock
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
                             preexec_fn=_die_with_parent)
        try: code = p.wait()
        except BaseException:  # Ctrl-C or a signal: papermill goes now, not after it has saved a notebook
            p.kill()
            p.wait()
            tmp.unlink(missing_ok=True)
            raise
    if _whole(tmp): os.replace(tmp, out)  # papermill saves what ran, failed cells too
    tmp.unlink(missing_ok=True)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"papermill failed on notebooks/{name}.ipynb (exit {code}); executed notebook: "
                           f"{out}, log: {log}\n{tail}")
    return out


class Progress:
    """Run i of N, elapsed and estimated remaining time, on stderr. The estimate (`kd_lib.runner.estimate.Estimate`)
    comes from the runs' sizes and this machine's seconds per unit of work on the runs finished (in this process, or
    before it: their records), the `slots` that run at once. `verb`: what submitting a job does (`start`, or `send`
    to a cluster's queue)."""
    def __init__(self, jobs: list, stream=None, slots: int = 1, verb: str = "start"):
        self.jobs, self.stream, self.slots, self.verb = jobs, stream or sys.stderr, max(1, slots), verb
        self.t0 = time.perf_counter()
        self.estimate, self.running = Estimate(jobs, self.slots), {}  # running: job name -> (job, when it started)
        for j in jobs:
            if j.status == "complete" and (r := _record(j)) and r.get("wall_time_s"):
                self.estimate.finished(j, r["wall_time_s"], r)
        self.i = self.started = sum(j.status == "complete" for j in jobs)

    def say(self, msg: str): print(msg, file=self.stream, flush=True)

    def start(self, job: Job):
        self.started += 1
        self.running[job.name] = (job, time.perf_counter())
        self.say(f"[{self.started:>3}/{len(self.jobs)}] {self.verb:6} {job.name} (elapsed {self.elapsed})")

    @property
    def elapsed(self) -> str: return _fmt(time.perf_counter() - self.t0)

    def finish(self, job: Job, host: str = None):
        self.i += 1
        self.running.pop(job.name, None)
        if job.status == "done": self.estimate.finished(job, job.seconds, _record(job))
        now = time.perf_counter()
        left = self.estimate.left([j for j in self.jobs if j.status == "todo"],
                                  [(j, now - t) for j, t in self.running.values()])
        what = {"done": "done", "complete": "done by another runner"}.get(job.status, "FAILED")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        self.say(f"[{self.i:>3}/{len(self.jobs)}] {what:6} {job.name}{where} in {_fmt(job.seconds)} | elapsed "
                 f"{self.elapsed} | about {_fmt(left)} left")


def _record(job: Job) -> dict:
    "The complete record of `job`'s run, or None (none yet, or one that cannot be read)."
    try: return complete_record(job.run)
    except CorruptFile: return None


@dataclass
class Outcome:
    "What became of a job where it ran: `done`, `complete` (by another process) or `failed` (with `error`)."
    status: str
    seconds: float = 0.0
    error: str = None
    host: str = None


def _locked(run: Path, poll_s: float) -> RunLock:
    "Take `run`'s lock, waiting while another process holds it."
    while True:
        try: return RunLock(run).__enter__()
        except RunLocked: time.sleep(poll_s)


def _locked_run(job: Job, work, poll_s: float) -> Outcome:
    """Take `job`'s run-folder lock (waiting while another process holds it) and, unless the run is complete by
    then, `work(lock token)`. Never raises: a failure, by any exception, is a failed `Outcome` with its cause."""
    t, host = time.perf_counter(), socket.gethostname()
    try:
        lock = _locked(job.run, poll_s)
        try:
            if complete_record(job.run) is not None: return Outcome("complete", time.perf_counter() - t, host=host)
            work(lock.token)
        finally: lock.__exit__()
        return Outcome("done", time.perf_counter() - t, host=host)
    except Exception as e:  # noqa: BLE001 -- whatever stops a run fails that run, and the runner goes on
        error = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
        return Outcome("failed", time.perf_counter() - t, error, host)


def run_job(job: Job, threads: int = None, gpu: str = None, poll_s: float = 2.0) -> Outcome:
    """Run `job` by executing its notebook with papermill (`threads`, `gpu`: see `run_notebook`), here (on this
    machine, or on the cluster worker it was sent to), its run folder's lock handed to the kernel: every run's
    executed notebook is kept (`--notebooks`), at the cost of a kernel started per run."""
    return _locked_run(job, lambda token: run_notebook(job.kind, job.output, threads=threads, gpu=gpu, lock=token,
                                                       **job.params), poll_s)


def train_job(job: Job, threads: int = None, gpu: str = None, poll_s: float = 2.0) -> Outcome:
    """Run `job` in this process (a `LocalExecutor` slot's worker, or a Dask worker): its recipe (`train_teacher`
    or `train_student` of its configuration, into its `out_dir`), after importing the profile's `imports`, under
    its run folder's lock. What its notebook would do, without a kernel per run; the book re-executes the notebooks
    of the runs it shows, from their records."""
    def work(token):
        from ..recipes.train import train_student, train_teacher
        for m in job.imports: importlib.import_module(m)
        if threads: torch.set_num_threads(threads)
        recipe = train_teacher if job.kind == "teacher" else train_student
        with handed_down(token): recipe(job.config, out_dir=job.out_dir, progress=False)
    return _locked_run(job, work, poll_s)


def _result(future) -> Outcome:
    "A finished future's outcome; an exception (a lost worker, a failing `execute`) fails the job with its cause."
    try: return future.result()
    except Exception as e:  # noqa: BLE001
        lost = " (its workers kept dying: Dask's allowed-failures ran out; start the runner again to resume it)" \
            if type(e).__name__ == "KilledWorker" else ""
        return Outcome("failed", error=f"{type(e).__name__}: {e}{lost}")


def run_jobs(jobs: list, n_jobs: int = 1, stream=None, execute=None, poll_s: float = 5.0, executor=None) -> list:
    """Run the `todo` jobs on `executor` (default: a `LocalExecutor` of `n_jobs` runs at once), in order,
    except that a job is submitted only once the jobs it waits for (`Job.after`: a distilling student's teacher, a
    budget control's twin) are complete (no_teacher runs and other datasets need not wait), and that a run folder
    another process is training (its lock held) is passed over, checked every `poll_s` seconds, and not trained
    again if that process completed it. On a machine without GPUs, a teacher runs alone, with every core (its
    students wait for it, and a core left to the few runs that need no teacher would soon idle).
    `execute(job, threads=, gpu=)` runs one job where the executor puts it and returns an `Outcome` (default:
    `train_job`, in the executor's worker processes; `run_job`: papermill executes each run's notebook). A job
    whose run fails, or whose worker is lost for good, is reported failed with its cause, and the students of a
    failed teacher as not started. Progress goes to
    `stream` (stderr) as the futures complete. Returns the jobs; raises `RuntimeError` listing the failures."""
    own = executor is None
    executor = executor or LocalExecutor(n_jobs, workers=execute is None)  # a given `execute` runs in a thread
    execute = execute or train_job
    cpu0 = _children_cpu()
    progress = Progress(jobs, stream, executor.slots, executor.verb)
    n_done = sum(j.status == "complete" for j in jobs)
    progress.say(f"{len(jobs)} runs: {n_done} complete already, {len(jobs) - n_done} to run, on {executor}")
    status = {j.name: j.status for j in jobs}  # a job waits until every job of its `after` is complete or done
    pending, waiting, running, finished = [j for j in jobs if j.status == "todo"], set(), {}, queue.SimpleQueue()

    def settle(j: Job, outcome: Outcome) -> None:
        j.status, j.seconds, j.error = outcome.status, outcome.seconds, outcome.error
        status[j.name] = j.status
        progress.finish(j, outcome.host)

    awaited = {a for j in jobs for a in j.after}  # the teachers students distil (not a long twin, which none does)

    def teachers_alone() -> bool:
        "While a teacher students wait for is to run, it runs alone, on every core."
        lone = getattr(executor, "lone_threads", None)
        return bool(lone and lone() > executor.threads and any(
            j.kind == "teacher" and j.name in awaited and status[j.name] in ("todo", "running") for j in jobs))

    def submit_ready() -> None:
        alone = teachers_alone()
        for j in list(pending):
            if alone and (j.kind != "teacher" or j.name not in awaited or running): continue
            after = [status.get(a, "done") for a in j.after]  # one not in `jobs` is taken as done
            if failed := [a for a, st in zip(j.after, after) if st == "failed"]:
                pending.remove(j)
                what = f"the teacher of {j.config.dataset}" if failed[0].endswith("/teacher") else \
                    f"its budget twin {failed[0]}"
                settle(j, Outcome("failed", error=f"not started: {what} failed"))
            elif not executor.queues and len(running) >= executor.slots: return
            elif any(st not in ("done", "complete") for st in after): continue
            elif (owner := lock_holder(j.run)) is not None:
                if j.name not in waiting:
                    waiting.add(j.name)
                    progress.say(f"waiting: {j.name} is being trained by pid {owner.get('pid')} on {owner.get('host')}")
            else:
                pending.remove(j)
                if j.name in waiting and _record(j) is not None:  # another runner completed it
                    settle(j, Outcome("complete"))
                    continue
                j.status, j.log = "running", j.output.with_suffix(".log")
                status[j.name] = j.status
                progress.start(j)
                future = executor.submit(execute, j, **({"threads": executor.lone_threads()} if alone else {}))
                running[future] = j
                future.add_done_callback(finished.put)

    try:
        while True:
            submit_ready()
            if not running and not pending: break
            try: future = finished.get(timeout=poll_s if waiting or not running else None)
            except queue.Empty: continue
            settle(running.pop(future), _result(future))
    finally:
        if own: executor.shutdown()
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} run(s) failed:\n"
                           + "\n".join(f"* {j.name}: {j.error}" for j in failed))
    cpu = _children_cpu() - cpu0
    progress.say(f"all {len(jobs)} runs complete (elapsed {progress.elapsed}"
                 + (f", CPU time of the kernels {_fmt(cpu)})" if cpu > 0 else ")"))
    return jobs
