"""Run-folder locks: one process trains a run folder at a time, on this machine or across machines that share it.

`RunLock(run)` creates ``<run>/.lock`` atomically (a complete file hard-linked into place, which fails when
one exists: atomic on local file systems and on NFS) holding the host, pid, the process's start time (as the
kernel counts it, `/proc/<pid>/stat`), the lock's start time and a token of its owner, and refreshes the file's
modification time every `HEARTBEAT_S` seconds while it is held. A lock is stale, and taken over with a warning,
when its owner cannot be shown to run on this host (no such pid, a pid reused by a process that started at another
time, or a lock naming no start time where this host counts them), when the lock file is not one this module wrote
(malformed, unreadable, a folder), or, for an owner on another host (whose processes cannot be checked from here),
when its heartbeat is older than `STALE_S` seconds or dated more than `SKEW_S` in the future: across machines the
lock relies on atomic hard links and on clocks that agree to within a minute. A live owner's lock is refused with
`RunLocked`, which names the owner.

The runner takes a run's lock before it starts the run and hands it down: a `RunLock` uses the lock it finds
instead of taking one when the lock's token is the one its thread was handed (`handed_down`, for a run trained in
the runner's own worker) or the one in its process's environment (`INHERIT`, for a kernel the runner started).
"""
import json
import os
import shutil
import socket
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

from .files import CorruptFile, disk_full_said, read_json

__all__ = ["LOCK", "INHERIT", "HEARTBEAT_S", "STALE_S", "SKEW_S", "MAX_PID", "RunLocked", "RunLock", "handed_down",
           "lock_holder"]

LOCK = ".lock"  # the lock's file name in a run folder
INHERIT = "KD_RUN_LOCK"  # the environment variable through which a lock's owner hands it to its child process
HEARTBEAT_S = 30.0  # how often a held lock's file is touched
STALE_S = 600.0  # a lock of another host untouched for this long is stale: its owner is gone
SKEW_S = 60.0  # how far the clocks of the hosts sharing a run folder may disagree
MAX_PID = 2**22  # the largest pid Linux gives (pid_max's ceiling): a lock naming another is not one this module wrote
_handed = threading.local()  # the token of the lock this thread's caller holds for it (`handed_down`)


class RunLocked(RuntimeError):
    "Another process holds the run folder's lock."


def _started(pid: int):
    "When process `pid` started, in clock ticks since boot (`/proc/<pid>/stat`), or None where that cannot be read."
    try: return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError): return None


def _alive(owner: dict) -> bool:
    """Whether the lock's owner (of this host) is running: its pid exists and started when the lock says it did
    (where this host does not say when a process started, its pid existing is all there is to go by)."""
    pid = owner["pid"]
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    except PermissionError: pass
    return _started(pid) in (None, owner.get("proc_start"))


_STALE = "not a lock this library wrote: taken as stale"


def _read(path: Path):
    """The lock file's owner ({host, pid, ...}), or None when there is none; a lock file this module did not write
    (unreadable, or not a JSON object with a host and a pid from 1 to `MAX_PID`) is stale: removed, with a warning."""
    try:
        owner = read_json(path, fix=_STALE)
        if owner is None or isinstance(owner.get("host"), str) and type(owner.get("pid")) is int \
                and 0 < owner["pid"] <= MAX_PID: return owner
        raise CorruptFile(f"{path} ({json.dumps(owner)[:80]}) is {_STALE}.")
    except CorruptFile as e: warnings.warn(str(e))
    try: shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    except FileNotFoundError: pass
    return None


def _age(path: Path) -> float:
    "Seconds since `path`'s last heartbeat (infinite when it is gone)."
    try: return time.time() - path.stat().st_mtime
    except FileNotFoundError: return float("inf")


def _gone(path: Path, owner: dict) -> str:
    "Why the owner of the lock `path` holds it no more (what the warning on taking it over says), or None."
    if owner["host"] == socket.gethostname():
        if _alive(owner): return None
        return "which is no longer running (a killed run)" if owner.get("proc_start") is not None else \
            "whose lock names no start time of its process, so it cannot be shown to be running"
    age = _age(path)
    if age >= STALE_S: return f"whose last heartbeat is {age / 60:.0f} minutes old"
    return f"whose heartbeat is dated {-age:.0f} s ahead of this host's clock" if age < -SKEW_S else None


def lock_holder(run) -> dict:
    """The owner of `run`'s lock ({host, pid, started, token}) when it is held: by a live process of this
    host, or by one of another host whose heartbeat is fresh; None when the folder is free or its lock stale."""
    path = Path(run) / LOCK
    owner = _read(path)
    return owner if owner is not None and _gone(path, owner) is None else None


@contextmanager
def handed_down(token: str):
    """Within the block, a `RunLock` this thread takes uses the lock of `token`, which its caller holds, where the
    lock file has that token: a run trained in the thread that locked it. Per thread, so the workers of one process
    (a Dask worker's threads) never use each other's locks, as a process-wide environment variable would."""
    before, _handed.token = getattr(_handed, "token", None), token
    try: yield
    finally: _handed.token = before


class RunLock:
    """Hold `run`'s lock for a `with` block: created on entry (or `RunLocked` raised), kept fresh by a
    heartbeat, removed on exit, with the folders it made when they are still empty (a refused run leaves none).
    A lock handed down by this process's parent (`INHERIT`) is used as it is."""
    def __init__(self, run):
        self.path = Path(run) / LOCK
        self.me = dict(host=socket.gethostname(), pid=os.getpid(), proc_start=_started(os.getpid()),
                       started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), token=uuid.uuid4().hex)
        self.inherited, self.made, self._stop = False, [], threading.Event()

    @property
    def token(self) -> str: return self.me["token"]

    def __enter__(self):
        held = (_read(self.path) or {}).get("token")
        if held and held in (getattr(_handed, "token", None), os.environ.get(INHERIT)):
            self.inherited = True
            return self
        self.made = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        tmp = self.path.with_name(f"{LOCK}.{self.token}")
        try:
            with disk_full_said(tmp, "Free some space there and start the run again."):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(self.me))
            for _ in range(3):
                try: os.link(tmp, self.path)
                except FileExistsError:
                    self._take_over_if_stale()
                    continue
                tmp.unlink()
                threading.Thread(target=self._heartbeat, daemon=True, name=f"heartbeat {self.path}").start()
                return self
            raise RunLocked(f"Could not lock {self.path.parent}: its lock keeps changing hands.")
        except BaseException:  # refused: nothing of the lock is left, nor the folders it made
            tmp.unlink(missing_ok=True)
            self._tidy()
            raise

    def _mine(self) -> bool: return (_read(self.path) or {}).get("token") == self.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and self._mine():
            try: os.utime(self.path)
            except FileNotFoundError: return

    def _take_over_if_stale(self) -> None:
        owner = _read(self.path)
        if owner is not None and (why := _gone(self.path, owner)) is None:
            raise RunLocked(f"{self.path.parent} is being trained by pid {owner.get('pid')} on {owner.get('host')} "
                            f"(since {owner.get('started')}); wait for it to finish. A lock of another machine "
                            f"whose owner is gone goes stale {STALE_S / 60:g} minutes after its last heartbeat.")
        moved = self.path.with_name(f"{LOCK}.stale.{self.token}")
        try: os.rename(self.path, moved)  # of several takers, one moves it
        except FileNotFoundError: return  # another process took it over first: try again
        if _read(moved) != owner:  # a new owner came between the reading and the moving: give it back
            try: os.link(moved, self.path)
            except FileExistsError: pass
            moved.unlink()
            return
        moved.unlink()
        if owner is not None:
            warnings.warn(f"Took over the lock of {self.path.parent} from pid {owner.get('pid')} on "
                          f"{owner.get('host')}, {why}: resuming it.")

    def __exit__(self, *exc):
        self._stop.set()
        if not self.inherited and self._mine(): self.path.unlink(missing_ok=True)
        self._tidy()

    def _tidy(self) -> None:
        "Remove the folders the lock made, deepest first, while they are empty: a refused run leaves no folder."
        for folder in self.made:
            try: folder.rmdir()
            except OSError: return  # it holds the run (or another run's files)
