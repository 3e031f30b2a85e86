"""One frozen configuration per run kind: `TeacherConfig` and `StudentConfig`.

Each field has its default, its group (what it governs: model, method, data, optimisation,
evaluation, speed) and a one-line meaning. A configuration checks itself when it is made, so a
bad setting fails before anything is written. Everything else derives from these classes: a run
record's `params` (`params`), the runner's profile keys and defaults, and the notebooks'
`parameters` cells (`parameters_cell` writes them; the tests compare).

    config = StudentConfig(student="resnet14", method="no_teacher", fraction=0.25)
    config.params()              # what the run's record holds
    StudentConfig.options("speed")  # the speed settings, with defaults and meanings
"""
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..core.methods import METHODS, Method, get_method
from ..core.models import STUDENTS
from ..data.loaders import DATASETS, SELECTIONS
from ..speed.cache import AMP_DTYPES, CACHE_DTYPES
from .records import param_conflicts, run_name

__all__ = ["GROUPS", "SCHEDULES", "MAX_SEED", "MAX_SIZE", "CUSTOM", "Option", "RunConfig", "TeacherConfig",
           "StudentConfig", "CONFIGS", "MAX_BUDGET", "parameters_cell"]

GROUPS = ("model", "method", "data", "optimisation", "evaluation", "speed")
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds
CUSTOM = "custom"  # the dataset of a run given data loaders of its own (train_student(dls=...))
MAX_SIZE = 2048  # the largest image side a run takes
MAX_BUDGET = 8  # the largest budget multiplier
SCHEDULES = ("constant", "one_cycle")


def option(default, group: str, help: str, same_result: bool = False):
    """A configuration field: its `default`, its `group` (one of `GROUPS`) and its one-line `help`;
    `same_result`: every value gives the same numbers, so a run may resume with another."""
    return field(default=default, metadata=dict(group=group, help=help, same_result=same_result))


@dataclass(frozen=True)
class Option:
    "A field of a configuration, as the notebooks and the docs show it."
    name: str
    type: str
    default: object
    group: str
    help: str


def _type_name(t) -> str:
    "'int' for int, 'str' for Optional[str], None for a choice of types: what a parameters cell declares."
    types = [a for a in (typing.get_args(t) or (t,)) if a is not type(None)]
    return types[0].__name__ if len(types) == 1 else None


def _need(ok, msg: str) -> None:
    "Raise ValueError(`msg`) unless `ok`."
    if not ok: raise ValueError(msg)


def _is(v, t: type) -> bool:
    "`v` is a `t`, where a bool is no int (YAML's `true` must not pass as 1)."
    return isinstance(v, t) and not (t in (int, float) and isinstance(v, bool))


@dataclass(frozen=True)
class RunConfig:
    "The fields of every run: which data, seen how. Subclasses add their model, method and optimisation."
    kind: typing.ClassVar[str] = ""

    dataset: str = option("digits", "data", "dataset: digits (embedded, no download), imagenette, imagewoof "
                                            "(fastai's 160 px release), cifar10, or folder")
    data_path: typing.Optional[str] = option(None, "data", "root of the dataset's folder tree (required for "
                                                           "folder; None: data/ or a download)")
    size: typing.Optional[int] = option(None, "data", "image side in pixels, 8 to 2048 (None: 32 for digits and "
                                                      "cifar10, 224 otherwise)")
    per_class: typing.Optional[int] = option(None, "data", "images per class taken from the training folder, the "
                                                           "same for every run (None: all of them)")
    bs: int = option(64, "data", "batch size (the paper: 64)")
    seed: int = option(0, "data", "random seed of the fraction sampled, the initialisation and the batch order")
    split_seed: int = option(0, "data", "random seed of the valid split, which a teacher and its students share (a "
                                        "student refuses a teacher that trained on its valid or test images)")
    selection: str = option("valid", "data", "set that picks the best epoch: valid (held out from train) or test "
                                             "(the paper's protocol)")
    augment: bool = option(True, "data", "the paper's augmentation on the training set (random crop, warp, "
                                         "rotation, zoom, lighting)")
    num_workers: int = option(0, "speed", "data-loading processes (to keep a GPU fed; with augmentation the "
                                          "random draws then differ)")
    resident: typing.Optional[bool] = option(None, "speed", "images decoded once and held as one tensor (on the GPU "
                                                            "under CUDA), batch transforms there: None where it fits, "
                                                            "True always, False an image opened per item")
    budget: int = option(1, "optimisation", "budget multiplier: 2 makes a run's long twin, every epoch cap, patience "
                                            "and fixed schedule doubled (a budget control: twice its twin's epochs), "
                                            "which says whether the budget was enough (kd_lib.evidence.saturation)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, self._coerce(f, getattr(self, f.name)))
        self.check()

    @staticmethod
    def _coerce(f, v):
        "`v` as field `f` holds it (whole numbers as floats where a float is asked, paths as strings), or a TypeError."
        types = [a for a in (typing.get_args(f.type) or (f.type,)) if a is not type(None)]
        optional = type(None) in typing.get_args(f.type)
        if v is None and optional: return None
        if isinstance(v, Path) and str in types: return str(v)
        if float in types and _is(v, int): return float(v)
        if any(_is(v, t) for t in types): return v
        want = " or ".join(t.__name__ for t in types) + (" or None" if optional else "")
        raise TypeError(f"{f.name}={v!r} ({type(v).__name__}): {f.name} takes a {want}"
                        + (" (true or false, unquoted in YAML)" if bool in types else "") + ".")

    def check(self) -> None:
        "Raise ValueError naming the field and the fix when a value cannot make a sensible run."
        _need(self.dataset in DATASETS or self.dataset == CUSTOM,
              f"dataset={self.dataset!r}: choose one of {', '.join(DATASETS)} (or {CUSTOM!r}, data loaders of your "
              "own given to train_student as dls=).")
        _need(self.dataset != "folder" or self.data_path, "dataset='folder' needs data_path, the root of its tree.")
        _need(self.size is None or 8 <= self.size <= MAX_SIZE,
              f"size={self.size}: give an image side of 8 to {MAX_SIZE} pixels (or None for the dataset's default).")
        _need(self.per_class is None or self.per_class >= 1,
              f"per_class={self.per_class}: take at least 1 image per class (or None for all).")
        _need(self.bs >= 1, f"bs={self.bs}: the batch size is at least 1.")
        for name in ("seed", "split_seed"):
            _need(0 <= getattr(self, name) <= MAX_SEED,
                  f"{name}={getattr(self, name)}: seeds are whole numbers from 0 to {MAX_SEED} (2**32 - 1).")
        _need(self.selection in SELECTIONS, f"selection={self.selection!r}: choose one of {', '.join(SELECTIONS)}.")
        _need(self.num_workers >= 0, f"num_workers={self.num_workers}: 0 (load in the main process) or more.")
        _need(self.epochs >= 1, f"epochs={self.epochs}: train at least 1 epoch per step.")
        _need(math.isfinite(self.lr) and self.lr > 0, f"lr={self.lr}: the learning rate must be positive.")
        _need(1 <= self.budget <= MAX_BUDGET, f"budget={self.budget}: a multiplier of the run's epochs from 1 (the "
                                              f"run as set) to {MAX_BUDGET} (2: its long twin).")

    def scaled(self, epochs):
        "`epochs` (an epoch cap or a patience; None stays None) times the `budget` multiplier."
        return None if epochs is None else epochs * self.budget

    @classmethod
    def options(cls, group: str = None) -> list:
        "The fields as `Option`s (name, type, default, group, help), in the order of `GROUPS`, or of one group."
        out = [Option(f.name, _type_name(f.type), f.default, f.metadata["group"], f.metadata["help"])
               for f in dataclasses.fields(cls)]
        out.sort(key=lambda o: GROUPS.index(o.group))
        return [o for o in out if group is None or o.group == group]

    @classmethod
    def names(cls) -> list: return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict: return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def same_result(cls) -> set:
        "The fields whose values do not change a run's numbers (a run resumes with other values of them)."
        return {f.name for f in dataclasses.fields(cls) if f.metadata["same_result"]}

    def conflicts(self, recorded: dict, extra: dict = None) -> dict:
        """Where a run's `recorded` params differ from this configuration's (and `extra`, params beyond its fields:
        a teacher of one's own's `model`), as `kd_lib.recipes.records.param_conflicts` says (settings that do not change
        results ignored, settings added since the run at their defaults)."""
        return param_conflicts(recorded, dict(self.params(), **(extra or {})), self.same_result(), self.defaults())

    @classmethod
    def from_mapping(cls, mapping: dict, strict: bool = False):
        """The configuration of the fields found in `mapping` (a notebook's `globals()`, a profile's group);
        other keys are ignored, or with `strict` refused with their names."""
        if strict and (bad := set(mapping) - set(cls.names())):
            raise ValueError(f"{sorted(bad)}: not settings of a {cls.kind} run; its settings are "
                             f"{', '.join(cls.names())}.")
        return cls(**{k: mapping[k] for k in cls.names() if k in mapping})

    def replace(self, **changes): return dataclasses.replace(self, **changes)
    def as_dict(self) -> dict: return {k: getattr(self, k) for k in self.names()}

    def changed(self) -> dict:
        "The fields whose values are not the defaults."
        defaults = self.defaults()
        return {k: v for k, v in self.as_dict().items() if v != defaults[k]}

    def params(self) -> dict:
        "What a run's record holds as `params`: the run kind and every field."
        return dict(kind=self.kind, **self.as_dict())

    @property
    def run_name(self) -> str: return run_name(self.params())


@dataclass(frozen=True)
class TeacherConfig(RunConfig):
    "The teacher run: the paper's ResNet34, one-cycle for `epochs` at max `lr`, best valid accuracy kept."
    kind: typing.ClassVar[str] = "teacher"

    pretrained: typing.Optional[bool] = option(None, "model", "True: ImageNet weights (error if unavailable); "
                                                              "False: from scratch; None: ImageNet if available")
    epochs: int = option(50, "optimisation", "epochs of one-cycle training (the paper: 50)")
    lr: float = option(1e-4, "optimisation", "maximum learning rate of the one-cycle schedule (the paper: 1e-4, "
                                             "5e-4 for Imagewoof)")


@dataclass(frozen=True)
class StudentConfig(RunConfig):
    "A student run: `student` trained by `method` (a key of `kd_lib.core.methods.METHODS`)."
    kind: typing.ClassVar[str] = "student"

    student: str = option("resnet10", "model", f"student model: {', '.join(STUDENTS)}, or the name of a model of "
                                               "your own (an nn.Module given to train_student as student)")
    method: str = option("stagewise", "method", f"a method of kd_lib.core.methods.METHODS: {', '.join(METHODS)} "
                                                "(stagewise: the paper's)")
    teacher_path: typing.Optional[str] = option(None, "method", "the teacher's run folder or .pth (None: "
                                                                "<out_dir>/<dataset>/teacher)")
    freeze_bn: bool = option(True, "method", "keep frozen stages' BatchNorm statistics fixed (False: let them "
                                             "drift, as the paper's code did)")
    T: float = option(4.0, "method", "temperature of the soft targets (method hinton only)")
    alpha: float = option(0.9, "method", "weight of the soft-target loss (method hinton only)")
    fraction: float = option(1.0, "data", "part of the training set used, sampled per class (the paper: 1.0 "
                                          "and 0.25)")
    epochs: int = option(100, "optimisation", "epochs per step: per stage for stagewise, in all for the one-step "
                                              "methods (the paper: 100); a budget control (no_teacher_budget) "
                                              "trains as many as its twin used instead")
    lr: float = option(1e-4, "optimisation", "learning rate of Adam, constant (the paper: 1e-4)")
    schedule: str = option("constant", "optimisation", "learning rate of each step: constant (the paper's) or "
                                                       "one_cycle (fastai's, with lr as the maximum)")
    finetune_epochs: int = option(3, "optimisation", "epochs per stage of the sequential fine-tune on the "
                                                     "student's own inputs (method teacher_forced_finetune)")
    patience: typing.Optional[int] = option(None, "optimisation", "stop a step once its monitored value has not "
                                                                  "really improved (kd_lib.recipes.fitting.last_gain) "
                                                                  "for "
                                                                  "this many epochs, epochs being the most (None: "
                                                                  "all epochs, the paper's protocol)")
    test_each_epoch: bool = option(False, "evaluation", "record the test accuracy at every epoch of the label "
                                                        "steps (to measure what picking epochs on the test set "
                                                        "adds)")
    truncate: bool = option(True, "speed", "run each model only as far as the stage trained (False: whole models, "
                                           "as the paper's code did)")
    cache: typing.Union[bool, str] = option(False, "speed", "fast path (book/performance.md): True caches per "
                                            "step what frozen parts and teacher give (needs augment off); valid: "
                                            "the valid split only")
    cache_dtype: str = option("float16", "speed", "dtype of the cache: float16, bfloat16, or float32 for exactly "
                                                  "the result without cache")
    cache_bytes: int = option(4 * 2**30, "speed", "cache kept in (device) memory; beyond it, memory-mapped "
                                                  "files under data/cache", same_result=True)
    amp: typing.Optional[str] = option(None, "speed", "mixed precision on CUDA: bf16 or fp16 (None: float32)")
    channels_last: bool = option(False, "speed", "student and teacher in channels_last memory format (for "
                                                 "GPUs)")

    @property
    def method_def(self) -> Method:
        "The registered `Method` this run's `method` names: where every user of a configuration resolves it."
        return get_method(self.method)

    def check(self) -> None:
        super().check()
        method = self.method_def
        _need(re.fullmatch(r"[A-Za-z0-9_.+-]+", self.student) is not None,
              f"student={self.student!r}: choose one of {', '.join(STUDENTS)}, or name a model of your own with "
              "letters, digits and _.+- only (it names the run's folder).")
        _need(0 < self.fraction <= 1, f"fraction={self.fraction}: a part of the training set, in (0, 1].")
        _need(self.schedule in SCHEDULES, f"schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}.")
        _need(self.patience is None or self.schedule == "constant",
              "patience stops a step early, which would cut a one_cycle schedule short: use one of them.")
        _need(not method.budget_of or (self.schedule == "one_cycle" and self.patience is None),
              f"{self.method} spends the budget of its {method.budget_of} twin: give it schedule='one_cycle' "
              "(lr is its maximum) and patience=None, so that it trains every epoch of that budget.")
        _need(self.finetune_epochs >= 1, f"finetune_epochs={self.finetune_epochs}: at least 1 epoch per stage.")
        _need(self.patience is None or self.patience >= 1,
              f"patience={self.patience}: at least 1 epoch without improvement, or None (no early stopping).")
        _need(self.T > 0, f"T={self.T}: the temperature must be positive.")
        _need(0 <= self.alpha <= 1, f"alpha={self.alpha}: a weight in [0, 1].")
        _need(self.amp is None or self.amp in AMP_DTYPES, f"amp={self.amp!r}: choose None, {', '.join(AMP_DTYPES)}.")
        _need(self.cache in (False, True, "valid"),
              f"cache={self.cache!r}: choose False, True or 'valid' (in YAML: false, true or valid).")
        _need(self.cache_dtype in CACHE_DTYPES,
              f"cache_dtype={self.cache_dtype!r}: choose one of {', '.join(CACHE_DTYPES)}.")
        _need(self.cache_bytes >= 0, f"cache_bytes={self.cache_bytes}: a number of bytes, 0 or more.")
        if not self.cache: return
        _need(not (self.augment and self.cache is True),
              "cache=True needs augment=False: augmentation gives new training images every epoch, so there is "
              "nothing to compute once; cache='valid' caches the (never augmented) valid split.")
        _need(self.freeze_bn, "cache needs freeze_bn=True: with freeze_bn=False the BatchNorm statistics of frozen "
                              "stages drift every batch, which no cache can follow.")
        _need(self.truncate, "cache never runs whole models: pass truncate=True (the default).")
        _need(method.cacheable, f"cache caches steps that train some stages on one target; {self.method!r} adds a "
                                "teacher loss over the whole student every batch: pass cache=False.")

    def check_device(self) -> None:
        "Raise ValueError when the options ask for hardware this machine lacks (checked before anything is written)."
        import torch
        if self.amp and not torch.cuda.is_available():
            raise ValueError(f"amp={self.amp!r} needs a CUDA GPU (fastai's MixedPrecision autocasts on CUDA) and "
                             "there is none: pass amp=None.")
        if self.amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"amp='bf16' needs a GPU with bfloat16 ({torch.cuda.get_device_name()} has none): pass "
                             "amp='fp16' (with its loss scaling) or amp=None.")


def _settings_doc(config: type) -> str:
    "The fields of `config` as a list for its docstring (pydoc and the book's API reference)."
    items = [f"* ``{o.name} = {o.default!r}`` ({o.group}): {o.help}" for o in config.options()]
    return "\n\n    Settings (``name = default`` (group): meaning):\n\n    " + "\n    ".join(items) + "\n"


for _c in (TeacherConfig, StudentConfig): _c.__doc__ += _settings_doc(_c)
CONFIGS = {c.kind: c for c in (TeacherConfig, StudentConfig)}


def parameters_cell(config: type, extra: list = ()) -> str:
    """The source of a notebook's `parameters` cell for `config`'s fields, grouped, each with its default
    and meaning, then `extra` lines (the notebook's own parameters, such as `out_dir`)."""
    lines, group = [], None
    for o in config.options():
        if o.group != group:
            lines.append(f"# {o.group}")
            group = o.group
        value = f'"{o.default}"' if isinstance(o.default, str) else repr(o.default)
        lines.append(f"{o.name}{f': {o.type}' if o.type else ''} = {value}  # {o.help}")
    if extra: lines += ["# this notebook", *extra]
    return "\n".join(lines)
