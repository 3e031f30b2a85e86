"""Executors: where a profile's runs execute. Each has `submit(fn, job) -> future` (`concurrent.futures`
style), `slots` (runs at once), `queues` (whether it takes more than `slots` and queues them), `verb` and
`shutdown()`.

* `LocalExecutor` (the default): `n_jobs` runs at once on this machine, the cores shared between them; on a
  machine with GPUs, each run sees one of them (`CUDA_VISIBLE_DEVICES`), the next free one.
* `DaskExecutor`: every run goes to a worker of a Dask scheduler (``--scheduler tcp://host:8786``), with a
  ``GPU: 1`` worker resource when runs need a GPU. Dask moves the runs of a worker that died to another one
  (up to its ``distributed.scheduler.allowed-failures``), where they resume. The workers must see the
  repository, ``out_dir`` and ``data/`` at the same paths as the runner: a shared file system.
"""
import os
import queue
import uuid
from concurrent.futures import ThreadPoolExecutor

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


class LocalExecutor:
    """`n_jobs` runs at once in threads of this process (each run a papermill subprocess), each with
    `threads` torch threads (default: cores / `n_jobs`) and, when `gpus` (default: `visible_gpus()`) lists
    any, one GPU."""
    queues, verb = False, "start"

    def __init__(self, n_jobs: int = 1, gpus: list = None, threads: int = None):
        self.slots = max(1, n_jobs)
        self.gpus = visible_gpus() if gpus is None else list(gpus)
        self.threads = threads or max(1, cores() // self.slots)
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="kd-run")
        self._free = queue.SimpleQueue()  # slot numbers: slot k runs on GPU k mod len(gpus)
        for k in range(self.slots): self._free.put(k)

    def __repr__(self):
        gpus = f", GPUs {','.join(self.gpus)} (one per run)" if self.gpus else ""
        return f"this machine, {self.slots} at a time on {cores()} cores, {self.threads} torch thread(s) each{gpus}"

    def _in_slot(self, fn, job):
        k = self._free.get()
        try: return fn(job, threads=self.threads, gpu=self.gpus[k % len(self.gpus)] if self.gpus else None)
        finally: self._free.put(k)

    def submit(self, fn, job): return self._pool.submit(self._in_slot, fn, job)

    def shutdown(self): self._pool.shutdown(wait=True)


def host_slots() -> int:
    """On a Dask worker: the task threads of all the workers of its host (several workers may share a machine, and
    its cores)."""
    from distributed import get_client, get_worker
    me = get_worker()
    workers = get_client().scheduler_info()["workers"]
    host = workers.get(me.address, {}).get("host")
    return sum(w["nthreads"] for w in workers.values() if host and w.get("host") == host) or me.state.nthreads


def _on_worker(fn, job, threads):
    "A run on a Dask worker, with `threads` torch threads (default: the host's cores / the task threads of its workers)."
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
