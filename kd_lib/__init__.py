"""kd_lib: Stagewise Knowledge Distillation on fastai, in wings by what each may import (nothing imports upward):

* `core`: the distillation itself, on torch and fastai alone (copy its files into your own fastai project):
  `models` (the paper's ResNets, plain `nn.Conv2d`), `stages` (where a pair is cut, adapters), `distill` (the
  callbacks), `forced` (teacher-forced stages), `steps` (the kinds of step, each building its Learner), `methods`
  (the registry), `optim` (the optimizers).
* `data`: `folders` (image trees on disk, the digits, downloads, checks), `loaders` (fastai DataLoaders with split
  metadata), `augment` (the paper's augmentation), `resident` (images held as tensors). Imports `infra`.
* `speed`: opt-in CPU speed, applied by the recipes on every run: `taps` (tap convolutions), `cache` (what frozen
  parts compute, computed once), `memory` (freed memory kept). Imports `core`, `data`, `infra`.
* `infra`: `files` (atomic writes, one JSON reader), `locks` (one process per run folder), `heartbeat` (progress
  lines). Imports nothing of kd_lib.
* `recipes`: `config` (every setting of a run), `records` (run folders and records), `budget` (budget twins),
  `fitting` (one fit with best-epoch checkpoints and exact resume), `train` (`train_teacher`, `train_student`),
  `loading`. Imports the wings above.
* `evidence`: `collect` (records into a DataFrame), `results`, `saturation`, `claims`, `fits`, `figures`, `style`,
  `tables`, `complexity` (Table 1), `paper` (the paper's numbers), `predictions`. Imports the wings above; the
  claims import no torch.
* `runner`: profiles, jobs, kept record sets and the book behind `make book` (`python -m kd_lib.runner`).

What the README and the book show is importable from here (``from kd_lib import train_student, Stages``); it is
loaded on first use, so importing one wing does not import the others.
"""
import importlib
import warnings

__version__ = "0.1.0"

# fastai's layers module compiles a helper with torch.jit.script on import, which torch now deprecates: a warning a
# user of kd_lib can do nothing about, printed on every import (and into every notebook of the book)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

_PUBLIC = {  # name -> the module that defines it
    **dict.fromkeys(["resnet", "teacher", "student_head", "evaluating", "BLOCKS", "STUDENTS"], "core.models"),
    **dict.fromkeys(["Stages", "Stage", "StageMismatch", "adapter"], "core.stages"),
    **dict.fromkeys(["StudentStage", "TeacherFeatures", "FreezeOthers", "FeatureLoss", "SoftTargets", "frozen",
                     "stage_features"], "core.distill"),
    **dict.fromkeys(["Labels", "Features", "Forced", "Setting"], "core.steps"),
    **dict.fromkeys(["Method", "METHODS", "register", "get_method"], "core.methods"),
    **dict.fromkeys(["paper_adam", "fastai_adam"], "core.optim"),
    **dict.fromkeys(["get_data", "DATASETS", "data_dir"], "data.loaders"),
    **dict.fromkeys(["TeacherConfig", "StudentConfig"], "recipes.config"),
    **dict.fromkeys(["train_teacher", "train_student", "RunExists"], "recipes.train"),
    **dict.fromkeys(["load_teacher", "load_student"], "recipes.loading"),
    "seed_everything": "recipes.fitting",
    "collect": "evidence.collect",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC: raise AttributeError(f"module 'kd_lib' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__(): return sorted([*globals(), *_PUBLIC])
