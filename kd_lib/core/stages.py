"""Stages: where a teacher and a student are cut into the stages that stagewise distillation trains one by one.

A `Stages` names, for each feature stage, the modules (dotted paths, `nn.Module.get_submodule`) that compute it
from the stage before's map, the last one's output being the stage's feature map, in the student and, where they
differ, in the teacher; then the head. Everything that distils (`kd_lib.core.distill`, `kd_lib.core.steps`, the cache)
takes a `Stages` and never a model's layout, so any pair of PyTorch modules can be distilled::

    stages = Stages.torchvision_resnet()            # conv1/bn1/relu, layer1 ... layer4, avgpool/fc
    stages = Stages.paper()                         # the paper's ResNets (kd_lib.core.models): the default
    print(module_table(model, torch.zeros(1, 3, 32, 32)))   # every module's output shape, to pick stage points

Where a student's and its teacher's maps differ (channels, or resolution), `adapter` makes a learnable map from
the student's to the teacher's, for the loss only (`check` finds the stages that need one, before any training).
"""
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Stage", "Stages", "StageMismatch", "Stop", "check_classes", "outputs", "module_table", "adapter"]


class StageMismatch(ValueError):
    "A student's and its teacher's feature maps differ at some stages and no adapter is asked for."


class Stop(Exception):
    "Raised by a forward hook once the last map needed is computed: the rest of the model need not run."


@dataclass(frozen=True)
class Stage:
    """One feature stage: `student`, the dotted paths of the student's modules that compute it from the stage
    before's map (the model's input for the first), in forward order, the last one's output being the stage's
    feature map; `teacher`, the same in the teacher (None: the student's paths)."""
    name: str
    student: tuple
    teacher: tuple = None

    def __post_init__(self): _check_paths(f"Stage {self.name!r}", self.student, self.teacher)

    def paths(self, side: str = "student") -> tuple:
        return tuple(self.teacher or self.student) if side == "teacher" else tuple(self.student)


def _check_paths(where: str, student, teacher) -> None:
    "Refuse paths that are not a tuple of one or more names (a string, or empty), naming `where` and the side."
    for side, paths in (("student", student), ("teacher", teacher)):
        if (paths is not None or side == "student") and (isinstance(paths, str) or not paths):
            raise ValueError(f"{where}: {side} paths {paths!r}: give the {side}'s module paths as a tuple of one or "
                             "more dotted names" + (" (None: the student's)." if side == "teacher" else "."))


@dataclass(frozen=True)
class Stages:
    """The feature stages of a teacher/student pair, in forward order, and the student's `head` (dotted paths in
    forward order; `teacher_head` the teacher's, None: the same). `flatten`: the model flattens the map between the
    head's first module and the rest (torchvision's ResNet: avgpool, flatten, fc). The stages compose the model
    (each stage's modules applied to the stage before's map, then the head's, give its output): what the cache and
    teacher-forced stages need."""
    stages: tuple
    head: tuple
    teacher_head: tuple = None
    flatten: bool = False
    name: str = "custom"
    _index: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_paths("The head", self.head, self.teacher_head)
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names) or "head" in names:
            raise ValueError(f"Stage names {names} must be distinct and none may be 'head'.")
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(names + ["head"])})

    @property
    def names(self) -> list: return [s.name for s in self.stages]  # the feature stages

    @property
    def all(self) -> list: return self.names + ["head"]  # every stage, the head last

    def index(self, name: str) -> int:
        "The place of stage `name` among `all` (the head's is the last)."
        if name not in self._index: raise ValueError(f"No stage {name!r}; the stages are {', '.join(self.all)}.")
        return self._index[name]

    def stage(self, name: str) -> Stage: return self.stages[self.index(name)]

    def paths(self, name: str, side: str = "student") -> tuple:
        "The dotted paths of the modules of stage `name` (or 'head') on `side`."
        if name == "head": return tuple(self.teacher_head or self.head) if side == "teacher" else tuple(self.head)
        return self.stage(name).paths(side)

    def output(self, model: nn.Module, name: str, side: str = "student") -> nn.Module:
        "The module of `model` whose output is stage `name`'s feature map."
        return model.get_submodule(self.paths(name, side)[-1])

    def part(self, model: nn.Module, name: str, side: str = "student") -> nn.Sequential:
        """The modules of `model` that stage `name` (or 'head') trains, as one `nn.Sequential` (the model's own
        modules, not copies) that maps the stage before's map to this one's."""
        return self.span(model, name, name, side)

    def span(self, model: nn.Module, first: str, last: str, side: str = "student") -> nn.Sequential:
        "`model` from the input of stage `first` to the output of stage `last` (names; 'head' for the head)."
        mods = OrderedDict()
        for name in self.all[self.index(first):self.index(last) + 1]:
            for i, path in enumerate(self.paths(name, side)):
                if name == "head" and i == 1 and self.flatten: mods["flatten"] = nn.Flatten(1)
                mods[path.replace(".", "_")] = model.get_submodule(path)
        return nn.Sequential(mods)

    def parameters(self, model: nn.Module, names) -> list:
        "The parameters of the stages `names` of `model` (the student), each once."
        return list({id(p): p for n in names for p in self.part(model, n).parameters()}.values())

    def trace(self, model: nn.Module, x: torch.Tensor, side: str = "student") -> tuple:
        """One dry forward pass of `model` on the batch `x` (no gradients, eval mode, its modes restored after):
        the shape of each feature stage's map (without the batch dimension) and the model's output (None for the
        teacher, whose pass stops at its last stage: its head is not distilled). A path that names no module of
        `model`, a module that never runs, or stages (or a stage's modules) out of forward order are a `ValueError`
        naming the stage and the side."""
        from .models import evaluating
        where = [(n, p) for n in (self.all if side == "student" else self.names) for p in self.paths(n, side)]
        done, maps, handles, out = {}, {}, [], None
        def hook(key):
            def record(m, i, o):
                if key not in done: maps[key], done[key] = o, len(done)
                if side == "teacher" and len(done) == len(where): raise Stop
            return record
        try:
            for n, p in where:
                try: module = model.get_submodule(p)
                except AttributeError as e:
                    raise ValueError(f"Stage {n!r} of the {side}: {p!r} names no module of the {type(model).__name__} "
                                     f"({e}); kd_lib.core.stages.module_table(model, x) lists its modules.") from None
                handles.append(module.register_forward_hook(hook((n, p))))
            with torch.no_grad(), evaluating(model): out = model(x.to(next(model.parameters(), x).device))
        except Stop: pass
        finally:
            for h in handles: h.remove()
        if never := [k for k in where if k not in done]:
            raise ValueError(f"Stage {never[0][0]!r} of the {side}: its module {never[0][1]!r} never runs in a forward "
                             f"pass of the {type(model).__name__}: name modules the model calls.")
        for before, after in zip(where, where[1:]):
            if done[after] < done[before]:
                raise ValueError(f"Stage {after[0]!r} of the {side}: its module {after[1]!r} runs before "
                                 f"{before[1]!r} (stage {before[0]!r}), which the stages put first: stages, and the "
                                 "modules of each, go in forward order.")
        return OrderedDict((n, tuple(maps[n, self.paths(n, side)[-1]].shape[1:])) for n in self.names), out

    def shapes(self, model: nn.Module, x: torch.Tensor, side: str = "student") -> "OrderedDict[str, tuple]":
        "The shape of each feature stage's map (without the batch dimension) for the input batch `x` (`trace`)."
        return self.trace(model, x, side)[0]

    def check(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, adapters=False,
              n_classes: int = None) -> nn.ModuleDict:
        """Check the stages on the student (and the teacher, unless None) in one dry forward pass each (`trace`),
        before any training: every path a module that runs, in forward order, and the student's output of
        `n_classes` (when given). Then compare the student's and the teacher's map at every stage for the input
        batch `x`. Where they differ, `adapters` (True: `adapter`, 1x1 convolution and BatchNorm; or a function
        (stage, student shape, teacher shape) -> module) makes the module that maps the student's to the teacher's
        for the loss. Returns an `nn.ModuleDict` keyed by stage name, holding the adapters of the mismatched
        stages only (empty when every map matches, or without a teacher): `name in adapters` says whether stage
        `name` has one, `adapters[name]` is it. Without `adapters`, a difference is a `StageMismatch` naming each
        stage and both shapes."""
        s, out = self.trace(student, x)
        if n_classes is not None: check_classes(out, n_classes)
        if teacher is None: return nn.ModuleDict()
        t, _ = self.trace(teacher, x, "teacher")
        bad = {n: (s[n], t[n]) for n in self.names if s[n] != t[n]}
        if bad and not adapters:
            where = "; ".join(f"{n}: student {a}, teacher {b}" for n, (a, b) in bad.items())
            raise StageMismatch(f"Student and teacher feature maps differ at {len(bad)} stage(s) ({where}) for a "
                                f"{tuple(x.shape[1:])} input: a feature loss needs equal shapes. Pass adapters=True "
                                "(a learnable 1x1 convolution and BatchNorm per stage, for the loss only), or "
                                "adapters=<function (stage, student shape, teacher shape) -> nn.Module>, or stages "
                                "whose maps match.")
        make = adapter if adapters is True else adapters
        return nn.ModuleDict({n: make(n, a, b) for n, (a, b) in bad.items()})

    def describe(self) -> dict:
        "What the record keeps of these stages: each one's paths on both sides, the head, the preset's name."
        return dict(name=self.name, stages={s.name: dict(student=list(s.paths()), teacher=list(s.paths("teacher")))
                                            for s in self.stages},
                    head=list(self.head), teacher_head=list(self.teacher_head or self.head), flatten=self.flatten)

    @classmethod
    def paper(cls) -> "Stages":
        """The paper's five stages and head on `kd_lib.core.models`' ResNets (`nn.Sequential(body, head)`): the stem
        ends at the ReLU before the maxpool, which opens layer1; then layer2 to layer4; the head is fastai's."""
        parts = dict(stem=("conv1", "bn1", "relu"), layer1=("maxpool", "layer1"), layer2=("layer2",),
                     layer3=("layer3",), layer4=("layer4",))
        return cls(tuple(Stage(n, tuple(f"body.{m}" for m in ms)) for n, ms in parts.items()), ("head",),
                   name="paper")

    @classmethod
    def torchvision_resnet(cls) -> "Stages":
        """The same five stages on torchvision's ResNets (resnet18 ... resnet152, wide_resnet, resnext, and
        `torchvision.models.ResNet` of any blocks): stem `conv1/bn1/relu`, `layer1` (after the maxpool) to
        `layer4`, head `avgpool` then `fc`."""
        parts = dict(stem=("conv1", "bn1", "relu"), layer1=("maxpool", "layer1"), layer2=("layer2",),
                     layer3=("layer3",), layer4=("layer4",))
        return cls(tuple(Stage(n, ms) for n, ms in parts.items()), ("avgpool", "fc"), flatten=True,
                   name="torchvision_resnet")


def check_classes(out: torch.Tensor, n_classes: int, side: str = "student") -> None:
    "Refuse a model's output `out` (of a dry forward pass) that does not give one value per class of the data."
    if isinstance(out, torch.Tensor) and out.shape[-1] != n_classes:
        raise ValueError(f"The {side} gives {out.shape[-1]} outputs an image and the data has {n_classes} classes: "
                         "its head (its last layer) must give one per class.")


def outputs(model: nn.Module, x: torch.Tensor, modules: list, truncate: bool = True) -> list:
    """The outputs of `modules` of `model` for the batch `x`, captured with fastai hooks. With `truncate`, the model
    stops once the last of them (in forward order) has run: the rest is never computed. Gradients flow through
    the outputs (they are not detached)."""
    from fastai.callback.hook import hook_outputs
    seen = set()
    def stop(m, i, o):
        seen.add(id(m))
        if len(seen) == len({id(x) for x in modules}): raise Stop
    with hook_outputs(modules, detach=False) as hooks:
        handles = [m.register_forward_hook(stop) for m in dict.fromkeys(modules)] if truncate else []
        try: model(x)
        except Stop: pass
        finally:
            for h in handles: h.remove()
    return hooks.stored


def module_table(model: nn.Module, x: torch.Tensor):
    """A pandas DataFrame of every named module of `model`: its class, parameters and output shape for the batch `x`
    (in the order they run), to pick stage points: a stage ends at a module whose output is the map to match."""
    from .models import evaluating
    order, shapes = [], {}
    named = dict(model.named_modules())
    def hook(name):
        def record(m, i, o):
            if name not in shapes: order.append(name)
            shapes[name] = tuple(o.shape[1:]) if isinstance(o, torch.Tensor) else type(o).__name__
        return record
    handles = [m.register_forward_hook(hook(n)) for n, m in named.items() if n]
    try:
        with torch.no_grad(), evaluating(model): model(x)
    finally:
        for h in handles: h.remove()
    import pandas as pd  # fastai installs it; imported here, as only this table needs it
    return pd.DataFrame([dict(module=n, type=type(named[n]).__name__,
                              params=sum(p.numel() for p in named[n].parameters()), output=shapes[n])
                         for n in order]).set_index("module")


def adapter(stage: str, student: tuple, teacher: tuple) -> nn.Module:
    """The default adapter of a stage whose student map (C, H, W) `student` differs from the teacher's `teacher`: a
    1x1 convolution to the teacher's channels and a BatchNorm, then (where the resolutions differ) an adaptive
    average pool to the teacher's size. It trains with its stage, for the loss only: it is not part of the student."""
    layers = [nn.Conv2d(student[0], teacher[0], 1, bias=False), nn.BatchNorm2d(teacher[0])]
    if tuple(student[1:]) != tuple(teacher[1:]): layers.append(nn.AdaptiveAvgPool2d(tuple(teacher[1:])))
    return nn.Sequential(*layers)
