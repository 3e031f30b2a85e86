"""Run-folder locks: one process trains a run folder at a time, on this machine or across machines that share it.

`RunLock(run)` creates ``<run>/.lock`` atomically (a complete file hard-linked into place, which fails when
one exists: atomic on local file systems and on NFS) holding the host, pid and start time of its owner. A
lock whose owner is a dead process of this host is stale: it is taken over, with a warning. A lock held by
a live process, or by a process of another host (whose life cannot be checked from here), is refused
with `RunLocked`, which names the owner and how to clear a lock its owner left behind.
"""
import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path

__all__ = ["LOCK", "RunLocked", "RunLock", "lock_holder"]

LOCK = ".lock"  # the lock's file name in a run folder


class RunLocked(RuntimeError):
    "Another process holds the run folder's lock."


def _alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    except PermissionError: return True
    return True


def _read(path: Path):
    try: return json.loads(path.read_text())
    except (FileNotFoundError, ValueError): return None


def lock_holder(run) -> dict:
    """The owner of `run`'s lock ({host, pid, started, token}) when it is held: by a live process, or by one
    of another host; None when the folder is free or its lock is stale."""
    owner = _read(Path(run) / LOCK)
    if owner is None: return None
    if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))): return None
    return owner


class RunLock:
    "Hold `run`'s lock for a `with` block: created on entry (or `RunLocked` raised), removed on exit."
    def __init__(self, run):
        self.path = Path(run) / LOCK
        self.me = dict(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       token=uuid.uuid4().hex)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{LOCK}.{self.me['token']}")
        tmp.write_text(json.dumps(self.me))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
            raise RunLocked(f"Could not lock {self.path.parent}: its lock keeps changing hands.")
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        owner = _read(self.path)
        if owner is not None and lock_holder(self.path.parent) is not None:
            raise RunLocked(f"{self.path.parent} is being trained by pid {owner.get('pid')} on {owner.get('host')} "
                            f"(since {owner.get('started')}); wait for it to finish. If that process is gone (on "
                            f"another machine), delete {self.path} and start again.")
        moved = self.path.with_name(f"{LOCK}.stale.{self.me['token']}")
        try: os.rename(self.path, moved)  # of several takers, one moves it
        except FileNotFoundError: return  # another process took it over first: try again
        if _read(moved) != owner:  # a new owner came between the reading and the moving: give it back
            try: os.link(moved, self.path)
            except FileExistsError: pass
            moved.unlink()
            return
        moved.unlink()
        if owner is not None:
            warnings.warn(f"Took over the lock of {self.path.parent} from pid {owner.get('pid')}, which is no "
                          "longer running (a killed run): resuming it.")

    def __exit__(self, *exc):
        if (_read(self.path) or {}).get("token") == self.me["token"]: self.path.unlink(missing_ok=True)
