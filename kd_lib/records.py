"""Run records: self-describing JSON files written atomically, and a collector into one DataFrame."""
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pandas as pd
import torch

__all__ = ["DiskFull", "CorruptFile", "disk_full_said", "atomic_write", "save_weights", "write_json", "read_json",
           "versions", "git", "code_version", "complete_records", "collect", "run_name",
           "param_conflicts", "RunFolder", "checked_record", "complete_record", "recorded_params", "RECORD"]

RECORD = "record.json"  # the file name of a run's record inside its run folder


class DiskFull(OSError):
    "A file could not be written for lack of space; nothing half-written was left."


class CorruptFile(ValueError):
    "A file the project wrote cannot be read back (truncated, emptied, or of the wrong shape); the message names it."


# What torch's zip writer says when a write fails part-way (a full disk or quota): it loses the errno.
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
    return atomic_write(path, partial(torch.save, obj))


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


_NUMBER = (int, float)
_TYPES = dict(kind=str, params=dict, data=dict, stages=list, versions=dict, models=dict, teacher=dict,
              wall_time_s=_NUMBER, valid_accuracy=_NUMBER, test_accuracy=(*_NUMBER, type(None)),
              test_predictions=dict)  # of a record
_RESULTS = ("params", "data", "wall_time_s", "valid_accuracy", "test_accuracy")  # what `collect` reads of a record


def _split_sizes(sizes) -> bool:
    "Whether `sizes` (a record's `data.sizes`) maps each split, train at least, to its number of images."
    return isinstance(sizes, dict) and "train" in sizes and all(type(n) is int for n in sizes.values())


def _type_name(t) -> str: return " or ".join(c.__name__ for c in t) if isinstance(t, tuple) else t.__name__


def checked_record(record: dict, path, fix: str = None) -> dict:
    """`record`, read from `path` (None passes), when it has a record's shape: the fields it holds of their types
    (`params` a mapping, ...), and when complete, a `kind` of `RunFolder.FIELDS`, the results `collect` reads and
    `data.sizes` a mapping of split to its number of images; else a `CorruptFile` that names what is wrong and says
    what to do (`fix`; by default, run it again)."""
    if record is None: return None
    wrong = [f"{k} is a {type(record[k]).__name__}, not a {_type_name(t)}" for k, t in _TYPES.items()
             if k in record and not isinstance(record[k], t)]
    if record.get("status") == "complete":
        if record.get("kind") not in RunFolder.FIELDS:
            wrong.append(f"kind {record.get('kind')!r} is not one of {', '.join(RunFolder.FIELDS)}")
        if missing := [k for k in _RESULTS if k not in record]: wrong.append(f"it has no {', '.join(missing)}")
        if isinstance(data := record.get("data"), dict) and not _split_sizes(data.get("sizes")):
            wrong.append(f"data.sizes is {str(data.get('sizes'))[:80]}, not a mapping of each split (train, valid, "
                         "...) to its number of images")
    if wrong: raise CorruptFile(f"{path} is not a record as kd_lib writes one ({'; '.join(wrong)}): "
                                f"{fix or _rerun(Path(path))}.")
    return record


def cpu_model() -> str:
    """This machine's CPU model and its widest vector extension (`avx512`, `avx2` or none), e.g. 'AMD EPYC 9454
    (avx512)': a kept set's runs are extended on the same kind of CPU, since another one changes the last bits."""
    try: info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError: return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else None
    return f"{model} ({isa})" if isa else model


def versions() -> dict:
    "Library versions and hardware of this process, for a record."
    import fastai
    import torchvision
    from . import __version__
    return dict(kd_lib=__version__, python=platform.python_version(), torch=torch.__version__,
                torchvision=torchvision.__version__, fastai=fastai.__version__, platform=platform.platform(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
                cpu=cpu_model(), torch_threads=torch.get_num_threads(), argv=[Path(a).name for a in sys.argv[:1]],
                code=code_version())  # the program's name only: no machine path in a record


def git(*args) -> str:
    "What `git <args>` prints in the repository of this code, or None when it fails (or outside a git checkout)."
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), *args], capture_output=True,
                             text=True, timeout=30)
    except OSError: return None  # no git
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict:
    """The git commit of the code running (`commit`, None outside a git checkout) and whether the library,
    notebooks or profiles differ from it (`dirty`): a kept record names the code that made it."""
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "kd_lib", "notebooks")) if commit else None
    return dict(commit=commit, dirty=dirty)


def _curve(record: dict) -> str:
    "A short hash of every fit's monitored values, epoch by epoch: two runs with the same curve trained alike."
    values = [[h.get(s["monitor"]) for h in s.get("history", [])] for s in record.get("stages", [])]
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:12]


def complete_records(folder):
    """(path, record) of each complete run record under `folder` (searched recursively), sorted by path; one that
    cannot be read is left out with a warning that names it."""
    for p in sorted(Path(folder).rglob(RECORD)):
        try: r = complete_record(p.parent)
        except CorruptFile as e:
            warnings.warn(f"left out of the results: {e}")
            continue
        if r is not None: yield p, r


def _device(v: dict) -> str:
    "What a record ran on: its GPU, or its CPU's model and cores (a record made before CPUs were named: its cores)."
    device = v.get("device", "unknown")
    return f"{v['cpu']}, {device}" if v.get("cpu") and str(device).startswith("cpu") else device


def collect(folder) -> pd.DataFrame:
    """One row per complete run record under `folder` (searched recursively): its parameters, final accuracies
    (valid, test, and on the training part a `fraction` left unused), whether it converged, the best test
    accuracy of any epoch of its last label step (when recorded: the paper's test-set selection), the
    teacher's accuracy, wall and CPU time, the test set's size, the epochs run in all and a hash of the monitored
    curves (`curve`: two runs that trained alike have the same), device and torch threads, the commit of the code,
    the record's path, and for a distilled student its feature maps' MSE to the teacher's per stage (`mse_<stage>`)."""
    rows = []
    for p, r in complete_records(folder):
        label_steps = [s for s in r.get("stages", []) if s.get("target", "labels") == "labels"]
        tested = [h["test_accuracy"] for h in (label_steps[-1]["history"] if label_steps else [])
                  if "test_accuracy" in h]
        rows.append({"kind": r["kind"], **r["params"],
                     "valid_accuracy": r["valid_accuracy"], "test_accuracy": r["test_accuracy"],
                     "converged": r.get("converged"), "unused_accuracy": r.get("unused_accuracy"),
                     "best_test_accuracy": max(tested) if tested else None,
                     "teacher_test_accuracy": r.get("teacher", {}).get("test_accuracy"),
                     "wall_time_s": r["wall_time_s"], "n_train": r["data"]["sizes"]["train"],
                     "n_test": r["data"]["sizes"].get("test"),
                     "epochs_run": sum(s.get("epochs_run", 0) for s in r.get("stages", [])),
                     "fits": len(r.get("stages", [])),
                     "fits_converged": sum(s.get("converged") is True for s in r.get("stages", [])),
                     "curve": _curve(r),
                     "cpu_s": sum(s.get("cpu_s", 0) + s.get("cache_cpu_s", 0) for s in r.get("stages", [])),
                     **{f"mse_{k}": v for k, v in (r.get("feature_mse") or {}).items()},
                     "device": _device(r.get("versions", {})),
                     "commit": (r.get("versions", {}).get("code") or {}).get("commit"),
                     "torch_threads": r.get("versions", {}).get("torch_threads"), "record": str(p)})
    return pd.DataFrame(rows)


def run_name(params: dict) -> str:
    """The name of a run's folder under `<out_dir>/<dataset>/`, from its parameters (a record's `params`):
    'teacher', or '<student>-<method>-f<fraction:g>-s<seed>' as `kd_lib.train.train_student` names it; a long twin
    (`budget` 2) adds '-x2'."""
    twin = f"-x{params['budget']}" if params.get("budget", 1) != 1 else ""
    if params.get("kind") == "teacher" or "student" not in params: return f"teacher{twin}"
    return f"{params['student']}-{params['method']}-f{float(params['fraction']):g}-s{params['seed']}{twin}"


def param_conflicts(recorded: dict, wanted: dict, ignore=(), defaults: dict = None) -> dict:
    """The parameters, but those in `ignore`, on which a run's `recorded` params (its record's or its
    params.json) and the `wanted` ones (a configuration's `params()`) differ: {name: (recorded, wanted)};
    empty when it is the same run. A parameter the record lacks takes its value from `defaults`: a setting
    added after the run was made, whose default keeps what runs did before it."""
    old = dict(defaults or {}, **recorded)
    return {k: (old.get(k), wanted.get(k)) for k in dict.fromkeys([*wanted, *old])
            if k not in ignore and old.get(k) != wanted.get(k)}


class RunFolder:
    """One run's folder, `<out_dir>/<dataset>/<run name>`: the names of its files, and its record, params and
    progress read and written. Every writer and reader of a run goes through it.

    Files: `record.json` (the record, once complete), `params.json` (the settings, once the run started),
    `progress.json` (the steps done), `stages/<step>.pth` (the weights the last step done kept), `teacher.pth` (a
    teacher's weights), `adapters.pth` (the adapters of stages whose maps differ), `<fit>.state.pth` and
    `models/` (what a killed fit resumes from), `.lock` (`kd_lib.locks`). A record says its folder (`run`).
    """
    FIELDS = dict(  # what a complete record holds, by kind (`finish` checks it)
        teacher=("kind", "params", "data", "stages", "weights", "converged", "wall_time_s", "valid_accuracy",
                 "test_accuracy"),
        student=("kind", "params", "data", "stages", "models", "teacher", "converged", "wall_time_s",
                 "valid_accuracy", "test_accuracy"))

    def __init__(self, path): self.path = Path(path)
    def __repr__(self): return f"RunFolder({str(self.path)!r})"
    def __truediv__(self, name) -> Path: return self.path / name

    record_file = property(lambda self: self.path / RECORD)
    params_file = property(lambda self: self.path / "params.json")
    progress_file = property(lambda self: self.path / "progress.json")
    teacher_file = property(lambda self: self.path / "teacher.pth")
    adapters_file = property(lambda self: self.path / "adapters.pth")
    def stage_file(self, step: str) -> Path: return self.path / "stages" / f"{step}.pth"
    def state_file(self, fit: str) -> Path: return self.path / f"{fit}.state.pth"

    @property
    def name(self) -> str: return f"{self.path.parent.name}/{self.path.name}"  # '<dataset>/<run>', as in out_dir

    def _record(self) -> dict: return checked_record(read_json(self.record_file), self.record_file)

    def record(self) -> dict:
        """The record when the run is complete, with its folder as `run` ('<dataset>/<run name>', in its out_dir),
        else None (a `CorruptFile` when it cannot be read or is not of a record's shape)."""
        record = self._record()
        return dict(record, run=self.name) if record is not None and record.get("status") == "complete" else None

    def params(self) -> dict:
        """The run's params: its record's, or, for a run that started training (its progress or a resume state
        exists), its `params.json`'s; None for a folder holding no progress."""
        if (record := self._record()) is not None: return record.get("params")
        started = self.progress_file.exists() or any(self.path.glob("*.state.pth"))
        return read_json(self.params_file) if started else None

    def begin(self, params: dict) -> None:
        "Mark the run started with `params`, once every check that can refuse it has passed."
        write_json(self.params_file, params)

    def progress(self) -> list: return (read_json(self.progress_file) or {}).get("steps", [])
    def write_progress(self, steps: list) -> None: write_json(self.progress_file, dict(steps=steps))

    def finish(self, record: dict) -> dict:
        """Write `record` as the run's complete record, then delete what only a resumed run needs (resume states,
        best-epoch files): until the record is written, a killed run resumes its finished fits, not new ones."""
        if missing := [k for k in self.FIELDS[record["kind"]] if k not in record]:
            raise ValueError(f"A {record['kind']} record needs {missing}: a bug in the code writing it.")
        record.update(status="complete", run=self.name, versions=versions(),
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json(self.record_file, record)
        for p in self.path.glob("*.state.pth"): p.unlink()
        shutil.rmtree(self.path / "models", ignore_errors=True)
        return self.record()


def complete_record(run) -> dict:
    "The record of the run in folder `run` when that run is complete, else None (`RunFolder.record`)."
    return RunFolder(run).record()


def recorded_params(run) -> dict:
    "The params of the run in folder `run` (`RunFolder.params`)."
    return RunFolder(run).params()
