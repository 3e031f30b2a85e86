"""Run records: self-describing JSON files, their schema and the run folders that hold them (`RunFolder`, the one
owner of a run's paths and file names)."""
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..infra.files import CorruptFile, _rerun, read_json, write_json

__all__ = ["versions", "git", "code_version", "run_name", "param_conflicts", "run_dir", "RunFolder", "checked_record",
           "complete_record", "recorded_params", "RECORD"]

RECORD = "record.json"  # the file name of a run's record inside its run folder


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
    import fastai  # here, not above: reading records (the evidence) needs no torch
    import torch
    import torchvision
    from .. import __version__
    return dict(kd_lib=__version__, python=platform.python_version(), torch=torch.__version__,
                torchvision=torchvision.__version__, fastai=fastai.__version__, platform=platform.platform(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
                cpu=cpu_model(), torch_threads=torch.get_num_threads(), argv=[Path(a).name for a in sys.argv[:1]],
                code=code_version())  # the program's name only: no machine path in a record


def git(*args) -> str:
    "What `git <args>` prints in the repository of this code, or None when it fails (or outside a git checkout)."
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[2]), *args], capture_output=True,
                             text=True, timeout=30)
    except OSError: return None  # no git
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict:
    """The git commit of the code running (`commit`, None outside a git checkout) and whether the library,
    notebooks or profiles differ from it (`dirty`): a kept record names the code that made it."""
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "kd_lib", "notebooks")) if commit else None
    return dict(commit=commit, dirty=dirty)


def run_name(params: dict) -> str:
    """The name of a run's folder under `<out_dir>/<dataset>/`, from its parameters (a record's `params`):
    'teacher', or '<student>-<method>-f<fraction:g>-s<seed>' as `kd_lib.recipes.train.train_student` names it; a long
    twin (`budget` 2) adds '-x2'."""
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


def run_dir(out_dir, dataset: str, name: str) -> Path:
    "The folder of one run: `<out_dir>/<dataset>/<name>` (a `RunFolder`'s path)."
    return Path(out_dir) / dataset / name


class RunFolder:
    """One run's folder, `<out_dir>/<dataset>/<run name>`: the names of its files, and its record, params and
    progress read and written. Every writer and reader of a run goes through it.

    Files: `record.json` (the record, once complete), `params.json` (the settings, once the run started),
    `progress.json` (the steps done), `stages/<step>.pth` (the weights the last step done kept), `teacher.pth` (a
    teacher's weights), `adapters.pth` (the adapters of stages whose maps differ), `<fit>.state.pth` and
    `models/` (what a killed fit resumes from), `.lock` (`kd_lib.infra.locks`). A record says its folder (`run`).
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
