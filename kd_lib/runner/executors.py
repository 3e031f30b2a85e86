"""Executors: where a profile's runs execute. Each has `submit(fn, job) -> future` (`concurrent.futures`
style), `slots` (runs at once), `queues` (whether it takes more than `slots` and queues them), `verb` and
`shutdown()`.

* `LocalExecutor` (the default): `n_jobs` runs at once on this machine, the cores shared between them, each slot a
  worker process that lives as long as the executor (torch and fastai imported once, not once a run); on a
  machine with GPUs, each slot sees one of them (`CUDA_VISIBLE_DEVICES`). A worker killed during a run (by the
  OOM killer, say) fails that run, naming the signal, and the slot's next run gets a new worker.
* `DaskExecutor`: every run goes to a worker of a Dask scheduler (``--scheduler tcp://host:8786``), with a
  ``GPU: 1`` worker resource when runs need a GPU. Dask moves the runs of a worker that died to another one
  (up to its ``distributed.scheduler.allowed-failures``), where they resume. The workers must see the
  repository, ``out_dir`` and ``data/`` at the same paths as the runner: a shared file system.
"""
import multiprocessing
import os
import queue
import signal
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

__all__ = ["cores", "visible_gpus", "host_slots", "LocalExecutor", "DaskExecutor"]


def cores() -> int:
    "The cores this process may use."
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1


def visible_gpus() -> list:
    "The GPUs runs may use here: those `CUDA_VISIBLE_DEVICES` lists when it is set, else every CUDA device."
    if (listed := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def _watch(parent: int) -> None:
    "In a worker: exit as soon as the process that started it is gone (a killed runner takes its workers with it)."
    while os.getppid() == parent: time.sleep(0.5)
    os._exit(1)


def _worker_started(parent: int, threads: int, gpu) -> None:
    "A slot's worker process, as it starts: its torch threads, its GPU, no progress bars, and a watch on its runner."
    if gpu is not None: os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    os.environ["KD_PROGRESS"] = "0"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"): os.environ[var] = str(threads)
    import torch
    torch.set_num_threads(threads)
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="watch the runner").start()


class WorkerLost(RuntimeError):
    "A slot's worker process died during a run (killed by a signal, say): that run failed, the slot gets a new one."


def _lost(processes: list) -> str:
    """What became of a dead worker, from its pool's `processes` as they were at the run's start (the broken pool
    may already have dropped them; each is waited for a moment, as the kernel may not have reported its end yet)."""
    for p in processes: p.join(timeout=5)
    code = next((p.exitcode for p in processes if p.exitcode), None)
    if code is None: return "its worker process died"
    if code > 0: return f"its worker process exited with status {code}"
    how = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    oom = "; the kernel's OOM killer does this" if -code == signal.SIGKILL else ""
    return f"its worker process was killed by signal {-code} ({how}{oom})"


class LocalExecutor:
    """`n_jobs` runs at once on this machine, each with `threads` torch threads (default: cores / `n_jobs`) and,
    when `gpus` (default: `visible_gpus()`) lists any, one GPU. With `workers` (the default), each slot runs its
    runs in a worker process of its own, started (forked) at its first run and kept until `shutdown`: the function
    a run executes must then be picklable (a module's function); without, in a thread of this process (a run that
    starts a process of its own, papermill say, or a test's stand-in). A worker that dies during a run (killed by
    the OOM killer, say) fails that run (`WorkerLost`, naming the signal) and is replaced at the slot's next run."""
    queues, verb = False, "start"

    def __init__(self, n_jobs: int = 1, gpus: list = None, threads: int = None, workers: bool = True):
        self.slots = max(1, n_jobs)
        self.gpus = visible_gpus() if gpus is None else list(gpus)
        self.threads, self.threads_given = threads or max(1, cores() // self.slots), bool(threads)
        self.workers = {} if workers else None  # slot -> its worker process (a pool of one)
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="kd-run")
        self._free = queue.SimpleQueue()  # slot numbers: slot k runs on GPU k mod len(gpus)
        for k in range(self.slots): self._free.put(k)

    def __repr__(self):
        gpus = f", GPUs {','.join(self.gpus)} (one per run)" if self.gpus else ""
        where = "worker processes" if self.workers is not None else "threads"
        return (f"this machine, {self.slots} at a time on {cores()} cores ({where}), {self.threads} torch thread(s) "
                f"each{gpus}")

    def _worker(self, k: int, gpu) -> ProcessPoolExecutor:
        if k not in self.workers:
            fork = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            self.workers[k] = ProcessPoolExecutor(1, mp_context=fork, initializer=_worker_started,
                                                  initargs=(os.getpid(), self.threads, gpu))
        return self.workers[k]

    def lone_threads(self) -> int:
        """The torch threads of a run that runs alone: every core, on a machine without GPUs, unless `threads` was
        given (torch's sums depend on the thread count, so a run's weights do too; a given count holds for all)."""
        return self.threads if self.gpus or self.threads_given else cores()

    def _in_slot(self, fn, job, threads):
        k = self._free.get()
        gpu = self.gpus[k % len(self.gpus)] if self.gpus else None
        try:
            if self.workers is None: return fn(job, threads=threads, gpu=gpu)
            worker = self._worker(k, gpu)
            future = worker.submit(fn, job, threads=threads, gpu=gpu)
            processes = list((worker._processes or {}).values())  # noqa: SLF001 -- the pool gives no exit code
            try: return future.result()
            except BrokenProcessPool as e:
                lost = WorkerLost(f"{_lost(processes)}. Start the runner again: the run resumes from its last saved "
                                  "state.")
                del self.workers[k]  # the slot's next run starts a new worker
                worker.shutdown(wait=True)
                raise lost from e
        finally: self._free.put(k)

    def submit(self, fn, job, threads: int = None):
        "Run `fn(job, threads=, gpu=)` in a free slot (`threads`: torch threads of this run, default the slot's)."
        return self._pool.submit(self._in_slot, fn, job, threads or self.threads)

    def shutdown(self):
        self._pool.shutdown(wait=True)
        for w in (self.workers or {}).values(): w.shutdown(wait=True)


def host_slots() -> int:
    """On a Dask worker: the task threads of all the workers of its host (several workers may share a machine, and
    its cores)."""
    from distributed import get_client, get_worker
    me = get_worker()
    workers = get_client().scheduler_info()["workers"]
    host = workers.get(me.address, {}).get("host")
    return sum(w["nthreads"] for w in workers.values() if host and w.get("host") == host) or me.state.nthreads


def _on_worker(fn, job, threads):
    "A run on a Dask worker, with `threads` torch threads (default: the host's cores / its workers' task threads)."
    return fn(job, threads=threads or max(1, cores() // host_slots()))


class DaskExecutor:
    """Runs on the workers of a Dask scheduler: `scheduler` is its address (``tcp://host:8786``) or a
    `distributed.Client`. `gpu`: each run needs a worker resource ``GPU`` (start workers with
    ``--resources GPU=1``, one per GPU); `threads`: torch threads per run (default: see `_on_worker`)."""
    queues, verb = True, "send"

    def __init__(self, scheduler, gpu: bool = False, threads: int = None):
        try: import distributed
        except ImportError as e:
            raise ImportError("Running on a Dask cluster needs Dask: pip install -e '.[cluster]'") from e
        self._own = not isinstance(scheduler, distributed.Client)
        self.client = distributed.Client(scheduler) if self._own else scheduler
        self.gpu, self.threads = gpu, threads
        self.slots = max(1, sum(self.client.nthreads().values()))

    def __repr__(self):
        return (f"the Dask cluster at {self.client.scheduler.address} ({len(self.client.nthreads())} workers, "
                f"{self.slots} task threads{', one GPU per run' if self.gpu else ''})")

    def submit(self, fn, job):
        return self.client.submit(_on_worker, fn, job, self.threads, key=f"{job.name}-{uuid.uuid4().hex[:8]}",
                                  pure=False, resources={"GPU": 1} if self.gpu else None)

    def shutdown(self):
        if self._own: self.client.close()
