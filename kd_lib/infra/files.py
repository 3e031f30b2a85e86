"""Files written atomically (a kill or a full disk never leaves half a file) and JSON read by one reader that names
the file it could not read."""
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DiskFull", "CorruptFile", "disk_full_said", "atomic_write", "save_weights", "write_json", "read_json"]


class DiskFull(OSError):
    "A file could not be written for lack of space; nothing half-written was left."


class CorruptFile(ValueError):
    "A file the project wrote cannot be read back (truncated, emptied, or of the wrong shape); the message names it."


# what torch's zip writer says when a write fails part-way (a full disk or quota): it loses the errno
_SERIALIZER_FAILURES = ("file write failed", "unexpected pos", "PytorchStreamWriter failed")


def _disk_full(e: BaseException) -> bool:
    "Whether `e`, raised while writing a file, means the disk (or the user's quota) is full."
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT): return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _SERIALIZER_FAILURES)


def _fsync(path, directory: bool = False) -> None:
    "Flush `path` (a file, or a folder's entries) to the disk, so a rename survives a power loss, not only a kill."
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try: os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP): raise  # some file systems cannot sync a folder
    finally: os.close(fd)


def _umask() -> int:
    "This process's umask (from /proc on Linux, where reading it changes nothing)."
    try:
        return next(int(line.split()[1], 8) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0)
        os.umask(mask)
        return mask


_FREE_AND_RESUME = ("Nothing half-written was kept; free some space (old runs, data/cache) and start the run again: "
                    "it resumes.")


def _free_mb(path: Path) -> float:
    "The free space (MB) on the disk of `path`, or of its nearest existing parent."
    path = Path(path).absolute()
    while not path.exists() and path != path.parent: path = path.parent
    return shutil.disk_usage(path).free / 2**20


@contextmanager
def disk_full_said(path, fix: str = _FREE_AND_RESUME):
    """Within the block, an error that means a full disk (by its errno, or torch's serializer failing part-way) is
    a `DiskFull` naming `path`, the space free there and `fix`, what to do."""
    try: yield
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if isinstance(e, DiskFull) or not _disk_full(e): raise
        full = DiskFull(f"The disk is full: could not write {path} ({_free_mb(path):.0f} MB free there). {fix}")
        full.errno = errno.ENOSPC
        raise full from e


def atomic_write(path, write) -> Path:
    """Call `write(tmp_path)`, flush it to the disk, then rename it onto `path` (and flush the folder), so a reader,
    a killed run or a power loss never leaves a half file. The file gets the permissions the umask gives new
    files; a full disk (by its errno, or by torch's serializer failing part-way) is a `DiskFull` naming `path`."""
    path = Path(path)
    with disk_full_said(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # as open() makes a new file, not mkstemp's 0600: a group may share runs
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(path.parent, directory=True)
        finally:
            if os.path.exists(tmp): os.remove(tmp)
    return path


def save_weights(path, obj) -> Path:
    "`torch.save(obj)` to `path` atomically (`atomic_write`): a kill or a full disk never leaves half a file."
    import torch  # here, not above: reading records (the evidence) needs no torch
    return atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path, obj) -> Path:
    "Write `obj` as indented JSON to `path`, atomically."
    def write(tmp):
        with open(tmp, "w") as f: json.dump(obj, f, indent=1, default=_jsonable)
    return atomic_write(path, write)


def _jsonable(o):
    if isinstance(o, Path): return str(o)
    if hasattr(o, "item"): return o.item()  # numpy and torch scalars
    if hasattr(o, "tolist"): return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def read_json(path, fix: str = None):
    """The JSON object (a dict) in `path`, or None when there is no such file. Every JSON file the project reads
    (records, params, progress, locks, manifests) is read here: one that is empty, truncated or not an object is
    a `CorruptFile` that names it and says what to do (`fix`; by default, delete its run folder and run again)."""
    path = Path(path)
    try: text = path.read_text()
    except FileNotFoundError: return None
    except (OSError, UnicodeDecodeError) as e: problem = f"cannot be read ({type(e).__name__}: {e})"
    else:
        try: obj = json.loads(text)
        except ValueError as e: problem = "is empty" if not text.strip() else f"is not valid JSON ({e})"
        except RecursionError: problem = "nests lists or objects too deeply to be read (a crafted file?)"
        else:
            if isinstance(obj, dict): return obj
            problem = f"holds a JSON {type(obj).__name__}, not the object it should"
    raise CorruptFile(f"{path} {problem}: {fix or _rerun(path)}.")


def _rerun(path: Path) -> str:
    "What to do about a corrupt file of a run folder: run it again."
    return f"delete the run folder {path.parent} and run it again (a run resumes from what is left, or starts afresh)"
