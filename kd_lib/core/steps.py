"""The kinds of step a method is made of, each owning its model, loss, metric, monitored value and callbacks:

* `Labels`: stages trained on the labels (cross entropy, best valid accuracy), with what the method adds (a
  teacher term in the loss, `Method.callbacks`).
* `Features`: stages trained on the MSE to the teacher's map at a `target` stage (through the stage's adapter
  where the student's map differs), lowest valid MSE kept.
* `Forced`: every feature stage at once, each on the teacher's map of the stage before (teacher forcing), each
  stage's own best epoch kept.

`StopOnNaN` stops a fit at a loss that is not finite; `ValidateOn` validates a part of the student on cached valid
inputs and targets (the feature cache's, `kd_lib.speed.cache`) while it trains on images.

`Step.learner(setting, cache)` builds the step's fastai `Learner` from a `Setting` (the run's configuration,
method, models, stages, adapters, data and folder); with a `kd_lib.speed.cache.FeatureCache`, on cached tensors.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastcore.basics import store_attr
from torch import nn

from .distill import FreezeOthers, StudentStage, TeacherFeatures
from .forced import BestStages, ForcedStages, TeacherInputs, forced_loss, stage_mse
from .optim import paper_adam
from .stages import Stages

__all__ = ["Setting", "Step", "Labels", "Features", "Forced", "StopOnNaN", "ValidateOn"]


@dataclass
class Setting:
    """What the steps of one run share: its `config` (a `StudentConfig`), `method`, `student` and frozen `teacher`
    (None without one), their `stages`, the `adapters` of the stages whose maps differ (an `nn.ModuleDict`), the
    data `dls`, the run folder `run`, and what the run's record says of its teacher (`teacher_info`)."""
    config: object
    method: object
    student: nn.Module
    teacher: nn.Module
    stages: Stages
    adapters: nn.ModuleDict
    dls: object
    run: Path = None
    teacher_info: dict = None

    def adapter(self, stage: str):
        "The adapter of `stage`, or None where the student's map is the teacher's shape."
        return self.adapters[stage] if stage in self.adapters else None


@dataclass(frozen=True)
class Step:
    """One fit of a method: train the stages `parts` (names of the run's `Stages`, 'head' included) for the
    configuration's field `epochs` (another one it names, e.g. `finetune_epochs`), from the best checkpoint of the
    step before. Subclasses say on what it trains."""
    name: str
    parts: tuple
    epochs: str = "epochs"
    monitor: ClassVar[str] = "valid_loss"

    def loss(self): return nn.MSELoss()
    def metrics(self, setting: Setting) -> list: return []
    def model(self, setting: Setting) -> nn.Module: raise NotImplementedError
    def own_callbacks(self, setting: Setting) -> list: return []
    def teacher_callbacks(self, setting: Setting, run_valid: bool) -> list: return []
    def from_cache(self, cache) -> tuple: raise NotImplementedError
    def wrap(self, part: nn.Module, setting: Setting) -> nn.Module: return part

    def first(self, stages: Stages) -> str: return min(self.parts, key=stages.index)
    def trained(self, setting: Setting) -> list:
        "The parameters this step trains: its stages' (and their adapters')."
        return setting.stages.parameters(setting.student, self.parts)

    def learner(self, setting: Setting, cache=None) -> Learner:
        """The Learner of this step. With a `cache` of all splits, it trains the student's part of the step on the
        step's cached inputs and targets; with a cache of the valid split, it validates that part on them (no
        teacher, no frozen prefix)."""
        c, trained = setting.config, self.trained(setting)
        common = dict(opt_func=paper_adam, lr=c.lr, splitter=lambda m: [trained], path=setting.run, model_dir="models",
                      loss_func=self.loss(), metrics=self.metrics(setting))
        cbs = [FreezeOthers(c.freeze_bn), StopOnNaN(), *([MixedPrecision(c.amp)] if c.amp else []),
               *([ChannelsLast()] if c.channels_last else []), *self.own_callbacks(setting)]
        if cache is not None:
            inputs, targets, part = self.from_cache(cache)
            part = self.wrap(part, setting)
            if cache.train: return Learner(cache.dataloaders(inputs, targets), part, cbs=cbs, **common)
            cbs.append(ValidateOn(part, *inputs, *targets))
        return Learner(setting.dls, self.model(setting), cbs=cbs + self.teacher_callbacks(setting, cache is None),
                       **common)


@dataclass(frozen=True)
class Labels(Step):
    "Train `parts` on the labels: cross entropy, accuracy; the method's callbacks add what else the loss has."
    monitor: ClassVar[str] = "accuracy"

    def loss(self): return CrossEntropyLossFlat()
    def metrics(self, setting): return accuracy
    def model(self, setting): return setting.student
    def teacher_callbacks(self, setting, run_valid): return setting.method.label_callbacks(setting)
    def from_cache(self, cache): return cache.labels(self.first(cache.stages))


@dataclass(frozen=True)
class Features(Step):
    "Train `parts` on the MSE between the student's map at stage `target` (through its adapter) and the teacher's."
    target: str = None

    def trained(self, setting):
        a = setting.adapter(self.target)
        return super().trained(setting) + (list(a.parameters()) if a is not None else [])

    def model(self, setting):
        return StudentStage(setting.student, setting.stages, self.target, setting.config.truncate,
                            setting.adapter(self.target))

    def teacher_callbacks(self, setting, run_valid):
        return [TeacherFeatures(setting.teacher, setting.stages, self.target, setting.config.truncate, run_valid)]

    def from_cache(self, cache): return cache.features(self.first(cache.stages), self.target)

    def wrap(self, part, setting):
        a = setting.adapter(self.target)
        return part if a is None else nn.Sequential(part, a)


@dataclass(frozen=True)
class Forced(Step):
    """Train every stage of `parts` at once, each on the teacher's map of the stage before as its input and the
    teacher's map of its own as its target (teacher forcing); each stage keeps its own best epoch. The teacher's maps
    are the student stages' inputs, so the maps must match: no adapter can serve here."""
    def loss(self): return forced_loss
    def metrics(self, setting): return [stage_mse(s, k) for k, s in enumerate(setting.stages.names)]
    def model(self, setting): return ForcedStages(setting.student, setting.stages)
    def own_callbacks(self, setting): return [BestStages(setting.student, setting.stages, setting.run, self.name)]
    def teacher_callbacks(self, setting, run_valid): return [TeacherInputs(setting.teacher, setting.stages, run_valid)]
    def from_cache(self, cache): return cache.forced()

    def learner(self, setting, cache=None):
        if len(setting.adapters):
            raise ValueError(f"Teacher-forced stages feed the teacher's maps to the student's stages, and they differ "
                             f"in shape at {', '.join(setting.adapters)}: choose a method without teacher forcing "
                             "(stagewise), or a pair whose maps match.")
        return super().learner(setting, cache)


class StopOnNaN(Callback):
    "Stop the run with a clear error at the first loss that is not finite (fastai's TerminateOnNaN stops silently)."
    order = -9

    def after_loss(self):
        if not torch.isfinite(self.loss).all():
            raise FloatingPointError(f"The loss became {self.loss.item()} at epoch {self.epoch}, batch {self.iter}: "
                                     "the run is stopped and no record is written. Lower the learning rate.")


def listed(t) -> list:
    "`t` as a list of tensors: a tensor alone, or the tensors of a list or tuple."
    return list(t) if isinstance(t, (list, tuple)) else [t]


def as_float(t: torch.Tensor) -> torch.Tensor:
    "A cached tensor in the dtype the plain path computes in: float32 if floating, else as is."
    return t.float() if t.is_floating_point() else t


class ValidateOn(Callback):
    """Validate `model`, the part of the learner's model after a frozen prefix, on the valid items' cached
    `inputs` and `targets` (in order) in place of each batch's own: neither the prefix nor the teacher runs.
    The valid loader still runs, so the random numbers its transforms draw, used or not, are drawn as before."""
    run_train = False

    def __init__(self, model: nn.Module, inputs, targets): store_attr()  # each a tensor or a list of them
    def before_validate(self): self.whole, self.learn.model, self.done = self.learn.model, self.model, 0

    def before_batch(self):
        i, self.done = self.done, self.done + len(self.yb[0])
        self.learn.xb, self.learn.yb = [tuple(as_float(t[i:self.done].to(self.dls.device)) for t in listed(ts))
                                        for ts in (self.inputs, self.targets)]

    def after_validate(self): self.learn.model = self.whole
