"""Teacher-forced stages (Parallel Blockwise KD): the feature stages of a student trained at once, each on the
teacher's feature map of the stage before it as its input and the teacher's map of its own stage as its target.
No stage waits for the one before, so one teacher pass per batch serves them all. The maps must match in shape
(the teacher's map is the student stage's input): a pair whose widths differ is refused.

* `ForcedStages`: the student's stage parts, each on its own input; the model of the step.
* `TeacherInputs`: runs the frozen teacher once per batch as far as its last stage (eval, no gradients) and gives
  the stages their inputs and targets.
* `forced_loss`, `stage_mse`: the sum of the stages' MSEs (the loss), and each one as a metric.
* `BestStages`: keeps for each stage the weights of the epoch of its own lowest valid MSE.
"""
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.tracker import TrackerCallback
from fastcore.basics import store_attr
from torch import nn

from .distill import TeacherFeatures, stage_features
from .stages import Stages

__all__ = ["ForcedStages", "TeacherInputs", "forced_loss", "stage_mse", "BestStages"]


class ForcedStages(nn.Module):
    "The feature stages of `student`, stage k applied to input k (the image for the first): one output each."
    def __init__(self, student: nn.Module, stages: Stages):
        super().__init__()
        self.parts = nn.ModuleList(stages.part(student, s) for s in stages.names)

    def forward(self, x, *inputs): return tuple(p(i) for p, i in zip(self.parts, (x, *inputs)))


class TeacherInputs(TeacherFeatures):
    """`TeacherFeatures` for every stage: the teacher's maps of the first to the last but one stage become the
    inputs of the second to the last (after the image, the first's), all of them the targets. The teacher runs
    once, to the last stage."""
    def __init__(self, teacher: nn.Module, stages: Stages, run_valid: bool = True):  # False: valid maps cached
        super().__init__(teacher, stages, stages.names[-1], truncate=True, run_valid=run_valid)

    def before_batch(self):
        with torch.no_grad(): maps = stage_features(self.teacher, self.x, self.stages, side="teacher")
        self.learn.xb, self.learn.yb = (self.x, *maps[:-1]), tuple(maps)


def forced_loss(preds, *targets, reduction: str = "mean") -> torch.Tensor:
    """The sum of the stages' MSEs: each stage's gradient comes from its own term only (its input is the teacher's).
    `reduction="none"`: per item (fastai's `loss_not_reduced`), each stage's MSE over that item's map."""
    if reduction == "none":
        return sum(F.mse_loss(p, t, reduction="none").flatten(1).mean(1) for p, t in zip(preds, targets))
    return sum(F.mse_loss(p, t) for p, t in zip(preds, targets))


def stage_mse(stage: str, k: int):
    "A metric: the MSE of `stage`, the `k`-th output, alone, named `mse_<stage>`."
    def mse(preds, *targets): return F.mse_loss(preds[k], targets[k])
    mse.__name__ = f"mse_{stage}"
    return mse


class BestStages(Callback):
    """Keep, for each stage, the weights of the epoch of its lowest valid MSE (`mse_<stage>`), saved as
    `<run>/models/<step>-<stage>.pth` when it improves and loaded into the student's stage at the end. A resumed fit
    starts from the best values in the history of kd_lib's checkpoint callback (`learn.best_checkpoint`) when the
    Learner has one, so it keeps the same ones."""
    order = TrackerCallback.order + 2  # after the recorder's values and kd_lib's checkpoint of the epoch

    def __init__(self, student: nn.Module, stages: Stages, run: Path, step: str): store_attr()
    def _path(self, stage: str) -> Path: return Path(self.run) / "models" / f"{self.step}-{stage}.pth"

    def before_fit(self):
        past = getattr(getattr(self.learn, "best_checkpoint", None), "history", [])
        self.best = {s: min((h[f"mse_{s}"] for h in past), default=math.inf) for s in self.stages.names}

    def after_epoch(self):
        last = dict(zip(self.recorder.metric_names[1:-1], map(float, self.recorder.values[-1])))
        for s in self.stages.names:
            if last[f"mse_{s}"] < self.best[s]:
                self.best[s] = last[f"mse_{s}"]
                _save(self._path(s), self.stages.part(self.student, s).state_dict())

    def after_fit(self):
        for s in self.stages.names:
            if (path := self._path(s)).exists():
                self.stages.part(self.student, s).load_state_dict(torch.load(path, weights_only=True,
                                                                             map_location="cpu"))
                path.unlink()


def _save(path: Path, state: dict) -> None:
    "`torch.save` to `path` through a temporary file renamed onto it, so a kill never leaves half a file there."
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
