"""Run records: self-describing JSON files written atomically, and a collector into one DataFrame."""
import errno
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

__all__ = ["DiskFull", "atomic_write", "write_json", "read_json", "versions", "code_version", "collect", "run_name",
           "param_conflicts", "complete_record", "recorded_params", "RECORD"]

RECORD = "record.json"  # the file name of a run's record inside its run folder


class DiskFull(OSError):
    "A file could not be written for lack of space; nothing half-written was left."


def _umask() -> int:
    "This process's umask (from /proc on Linux, where reading it changes nothing)."
    try:
        return next(int(line.split()[1], 8) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def atomic_write(path, write) -> Path:
    """Call `write(tmp_path)` then rename onto `path`, so a reader (or a killed run) never sees a half file.
    The file gets the permissions the umask gives new files; a full disk is a `DiskFull` in plain words."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() makes a new file, not mkstemp's 0600: a group may share runs
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if getattr(e, "errno", None) == errno.ENOSPC or "file write failed" in str(e):
            free = shutil.disk_usage(path.parent).free / 2**20
            raise DiskFull(errno.ENOSPC, f"The disk is full: could not write {path} ({free:.0f} MB free there). "
                                         "Nothing half-written was kept; free some space (old runs, data/cache) "
                                         "and start the run again: it resumes.") from e
        raise
    finally:
        if os.path.exists(tmp): os.remove(tmp)
    return path


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


def read_json(path):
    "The JSON object in `path`, or None when there is no such file."
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def versions() -> dict:
    "Library versions and hardware of this process, for a record."
    import fastai
    import torchvision
    from . import __version__
    return dict(kd_lib=__version__, python=platform.python_version(), torch=torch.__version__,
                torchvision=torchvision.__version__, fastai=fastai.__version__, platform=platform.platform(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
                torch_threads=torch.get_num_threads(), argv=sys.argv[:1], code=code_version())


def code_version() -> dict:
    """The git commit of the code running (`commit`, None outside a git checkout) and whether the library,
    notebooks or profiles differ from it (`dirty`): a kept record names the code that made it."""
    def git(*args):
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), *args], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None
    try: commit = git("rev-parse", "HEAD")
    except OSError: commit = None  # no git
    dirty = bool(git("status", "--porcelain", "--", "kd_lib", "notebooks")) if commit else None
    return dict(commit=commit, dirty=dirty)


def collect(folder) -> pd.DataFrame:
    """One row per complete run record under `folder` (searched recursively): its parameters, final accuracies
    (valid, test, and on the training part a `fraction` left unused), whether it converged, the best test
    accuracy of any epoch of its last label step (when recorded: the paper's test-set selection), the
    teacher's accuracy, wall and CPU time, device and torch threads, the commit of the code, the record's path,
    and for a distilled student its feature maps' MSE to the teacher's per stage (`mse_<stage>`)."""
    rows = []
    for p in sorted(Path(folder).rglob(RECORD)):
        if (r := complete_record(p.parent)) is None: continue
        label_steps = [s for s in r.get("stages", []) if s.get("target", "labels") == "labels"]
        tested = [h["test_accuracy"] for h in (label_steps[-1]["history"] if label_steps else [])
                  if "test_accuracy" in h]
        rows.append({"kind": r["kind"], **r["params"],
                     "valid_accuracy": r["valid_accuracy"], "test_accuracy": r["test_accuracy"],
                     "converged": r.get("converged"), "unused_accuracy": r.get("unused_accuracy"),
                     "best_test_accuracy": max(tested) if tested else None,
                     "teacher_test_accuracy": r.get("teacher", {}).get("test_accuracy"),
                     "wall_time_s": r["wall_time_s"], "n_train": r["data"]["sizes"]["train"],
                     "cpu_s": sum(s.get("cpu_s", 0) + s.get("cache_cpu_s", 0) for s in r.get("stages", [])),
                     **{f"mse_{k}": v for k, v in (r.get("feature_mse") or {}).items()},
                     "device": r.get("versions", {}).get("device", "unknown"),
                     "commit": (r.get("versions", {}).get("code") or {}).get("commit"),
                     "torch_threads": r.get("versions", {}).get("torch_threads"), "record": str(p)})
    return pd.DataFrame(rows)


def run_name(params: dict) -> str:
    """The name of a run's folder under `<out_dir>/<dataset>/`, from its parameters (a record's `params`):
    'teacher', or '<student>-<method>-f<fraction:g>-s<seed>' as `kd_lib.train.train_student` names it."""
    if params.get("kind") == "teacher" or "student" not in params: return "teacher"
    return f"{params['student']}-{params['method']}-f{float(params['fraction']):g}-s{params['seed']}"


def param_conflicts(recorded: dict, wanted: dict, ignore=(), defaults: dict = None) -> dict:
    """The parameters, but those in `ignore`, on which a run's `recorded` params (its record's or its
    params.json) and the `wanted` ones (a configuration's `params()`) differ: {name: (recorded, wanted)};
    empty when it is the same run. A parameter the record lacks takes its value from `defaults`: a setting
    added after the run was made, whose default keeps what runs did before it."""
    old = dict(defaults or {}, **recorded)
    return {k: (old.get(k), wanted.get(k)) for k in dict.fromkeys([*wanted, *old])
            if k not in ignore and old.get(k) != wanted.get(k)}


def complete_record(run) -> dict:
    "The record of the run in folder `run` when that run is complete, else None."
    record = read_json(Path(run) / RECORD)
    return record if record is not None and record.get("status") == "complete" else None


def recorded_params(run) -> dict:
    """The params of the run in folder `run`: its record's, or, for a run that started training (its
    `progress.json` or a `*.state.pth` exists), its `params.json`'s; None for a folder holding no progress."""
    run = Path(run)
    if (record := read_json(run / RECORD)) is not None: return record.get("params")
    started = (run / "progress.json").exists() or any(run.glob("*.state.pth"))
    return read_json(run / "params.json") if started else None
