"""The kinds of step a method is made of, each owning its model, loss, metric, monitored value and callbacks:

* `Labels`: stages trained on the labels (cross entropy, best valid accuracy), with what the method adds (a
  teacher term in the loss, `Method.callbacks`).
* `Features`: stages trained on the MSE to the teacher's map at a `target` stage (through the stage's adapter
  where the student's map differs), lowest valid MSE kept.
* `Forced`: every feature stage at once, each on the teacher's map of the stage before (teacher forcing), each
  stage's own best epoch kept.

`Step.learner(setting, cache)` builds the step's fastai `Learner` from a `Setting` (the run's configuration,
method, models, stages, adapters, data and folder); with a `kd_lib.cache.FeatureCache`, on cached tensors.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fastai.callback.channelslast import ChannelsLast
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from torch import nn

from .cache import ValidateOn
from .distill import FreezeOthers, StudentStage, TeacherFeatures
from .fitting import StopOnNaN, paper_adam
from .forced import BestStages, ForcedStages, TeacherInputs, forced_loss, stage_mse
from .stages import Stages

__all__ = ["Setting", "Step", "Labels", "Features", "Forced"]


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
