"""Distillation as fastai callbacks: teacher feature targets, stage freezing and the extra losses. Every one
takes the models' `kd_lib.core.stages.Stages`, so it works on any teacher/student pair.

* `stage_features`: a model's feature maps at named stages, captured with fastai
  hooks, running the model only as far as needed (or, the paper's way, all of it).
* `feature_mse`: how far a student's own feature maps are from the teacher's, stage by stage.
* `StudentStage`: the student as far as one stage (and its adapter), the model of a stagewise Learner.
* `TeacherFeatures`: swaps the labels of each batch for the frozen teacher's
  feature map, so an MSE loss distils that stage (stagewise, FitNets hints).
* `FreezeOthers`: freezes what the optimizer does not train, BatchNorm included.
* `FeatureLoss` (simultaneous) and `SoftTargets` (Hinton) add a teacher term to
  the training loss the way fastai's MixUp swaps its loss.
"""
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.hook import HookCallback
from fastai.callback.training import set_bn_eval
from fastcore.basics import store_attr
from torch import nn

from .models import evaluating
from .stages import Stages, outputs

__all__ = ["stage_features", "feature_mse", "frozen", "StudentStage", "TeacherFeatures", "FreezeOthers", "TeacherLoss",
           "FeatureLoss", "SoftTargets"]


def stage_features(model: nn.Module, x: torch.Tensor, stages: Stages, names=None, side: str = "student",
                   truncate: bool = True) -> list:
    """Feature maps of `model` (the `side` of `stages`) at the stages `names` (default: all feature stages) for the
    batch `x`, by fastai hooks on the stages' output modules. With `truncate` the model runs only as far as the
    last of them; without it the whole model runs, as the paper's code did. Both give the same tensors."""
    return outputs(model, x, [stages.output(model, n, side) for n in (names or stages.names)], truncate)


def _adapted(adapters, name: str, m: torch.Tensor) -> torch.Tensor:
    "A student's map `m` of stage `name` through its adapter (`kd_lib.core.stages.adapter`), when it has one."
    return adapters[name](m) if adapters is not None and name in adapters else m


@torch.no_grad()
def feature_mse(student: nn.Module, teacher: nn.Module, dl, stages: Stages, adapters: nn.ModuleDict = None) -> dict:
    """Per stage, the MSE between the feature maps of `student`, composed (each stage on its own stages'
    output; through its adapter where it has one), and of `teacher` on the batches of `dl`, all in eval mode: how
    far a distilled student drifts from its teacher stage by stage."""
    total, n = dict.fromkeys(stages.names, 0.0), 0
    with evaluating(student, teacher, *([adapters] if adapters is not None else [])):
        for xb, *_ in dl:
            pairs = zip(stages.names, stage_features(student, xb, stages),
                        stage_features(teacher, xb, stages, side="teacher"))
            for s, a, b in pairs: total[s] += float(F.mse_loss(_adapted(adapters, s, a), b)) * len(xb)
            n += len(xb)
    return {s: v / max(n, 1) for s, v in total.items()}


def frozen(teacher: nn.Module, device=None) -> nn.Module:
    "The teacher on `device`, in eval mode, with gradients off: it is never trained."
    return teacher.to(device).eval().requires_grad_(False)


class StudentStage(nn.Module):
    """The student as far as feature `stage` of `stages`: its output is that stage's feature map, through the
    stage's `adapter` when the student's map differs from the teacher's (the adapter trains with the stage)."""
    def __init__(self, student: nn.Module, stages: Stages, stage: str, truncate: bool = True,
                 adapter: nn.Module = None):
        super().__init__()
        store_attr()

    def forward(self, x):
        m = stage_features(self.student, x, self.stages, [self.stage], truncate=self.truncate)[0]
        return self.adapter(m) if self.adapter is not None else m


class TeacherFeatures(Callback):
    """Replace each batch's labels by the teacher's feature map at `stage` of `stages` (no_grad, eval), the
    target of an MSE loss; in validation too unless `run_valid` is False (validation targets come from a cache)."""
    order = MixedPrecision.order + 1  # the teacher runs under MixedPrecision's autocast too, before the loss reads yb

    def __init__(self, teacher: nn.Module, stages: Stages, stage: str, truncate: bool = True, run_valid: bool = True):
        store_attr()

    def before_fit(self): frozen(self.teacher, self.dls.device)

    def before_batch(self):
        with torch.no_grad():
            self.learn.yb = tuple(stage_features(self.teacher, self.x, self.stages, [self.stage], "teacher",
                                                 self.truncate))


class FreezeOthers(Callback):
    """Freeze every parameter the optimizer does not train; their BatchNorm layers stay in eval mode.

    `freeze_bn=False` keeps frozen BatchNorm layers in train mode, so their running
    statistics drift as in the paper's code. Restored after fit.
    """
    def __init__(self, freeze_bn: bool = True): store_attr()

    def before_fit(self):
        trained = {id(p) for p in self.opt.all_params(with_grad=False).itemgot(0)}
        self.old = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.old: p.requires_grad_(id(p) in trained)

    def before_train(self):
        if self.freeze_bn: set_bn_eval(self.model)

    def after_fit(self):
        for p, r in getattr(self, "old", []): p.requires_grad_(r)
        self.old = []

    after_cancel_fit = after_fit


class TeacherLoss(Callback):
    """Base of the callbacks that add a teacher term to the training loss, swapped in like fastai's MixUp.

    Subclasses compute `teacher_out(x)` (run under no_grad on training batches only)
    and `extra(pred)`, the term added to the original loss. The teacher is not run
    during validation, where the loss is the original one.
    """
    run_valid, order = False, MixedPrecision.order + 1  # the teacher runs under MixedPrecision's autocast too

    def before_fit(self): frozen(self.teacher, self.dls.device)
    def before_train(self): self.old_lf, self.learn.loss_func = self.learn.loss_func, self.lf

    def after_train(self):
        if hasattr(self, "old_lf"): self.learn.loss_func = self.old_lf

    after_cancel_train = after_cancel_fit = after_train

    def before_batch(self):
        with torch.no_grad(): self.target = self.teacher_out(self.x)

    def lf(self, pred, *yb): return self.old_lf(pred, *yb) + self.extra(pred)


class FeatureLoss(TeacherLoss, HookCallback):
    """Simultaneous training of `student`: cross entropy + `weight` x the sum of the MSEs between its feature
    maps (through `adapters` where they differ) and the teacher's at every feature stage of `stages`; its maps come
    from fastai hooks (`HookCallback`) on its stage modules."""
    def __init__(self, teacher: nn.Module, student: nn.Module, stages: Stages, weight: float = 1.0,
                 truncate: bool = True, adapters: nn.ModuleDict = None):
        super().__init__(modules=[stages.output(student, n) for n in stages.names], detach=False, cpu=False)
        store_attr("teacher,stages,weight,truncate,adapters")

    def before_fit(self):
        TeacherLoss.before_fit(self)  # the teacher frozen; neither base's before_fit calls the other's
        HookCallback.before_fit(self)  # the hooks registered (HookCallback.after_fit removes them)

    def hook(self, m, i, o): return o
    def teacher_out(self, x):
        return stage_features(self.teacher, x, self.stages, side="teacher", truncate=self.truncate)

    def extra(self, pred):
        return self.weight * sum(F.mse_loss(_adapted(self.adapters, n, s), t)
                                 for n, s, t in zip(self.stages.names, self.hooks.stored, self.target))


class SoftTargets(TeacherLoss):
    """Hinton et al.'s knowledge distillation: (1 - alpha) x cross entropy on the labels
    + alpha x T^2 x KL(teacher || student) of the temperature-`T` softmaxes, on logits."""
    def __init__(self, teacher: nn.Module, T: float = 4.0, alpha: float = 0.9): store_attr()
    def teacher_out(self, x): return self.teacher(x)
    def lf(self, pred, *yb): return (1 - self.alpha) * self.old_lf(pred, *yb) + self.extra(pred)

    def extra(self, pred):
        kl = F.kl_div(F.log_softmax(pred / self.T, 1), F.log_softmax(self.target / self.T, 1),
                      log_target=True, reduction="batchmean")
        return self.alpha * self.T ** 2 * kl
