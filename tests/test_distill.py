"""The distillation callbacks: what trains, what stays frozen, what the teacher does and when."""
import copy

import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed

from kd_lib.data.loaders import get_data
from kd_lib.core.distill import FeatureLoss, FreezeOthers, SoftTargets, stage_features
from kd_lib.core.models import evaluating, resnet, teacher
from kd_lib.core.stages import Stages
from kd_lib.core.steps import Features
from kd_lib.recipes.config import StudentConfig
from kd_lib.recipes.fitting import seed_everything
from kd_lib.core.methods import METHODS
from conftest import step_learner

PAPER = Stages.paper()


@pytest.fixture(scope="module")
def dls(tiny):
    return get_data("digits", size=tiny["size"], bs=tiny["bs"], fraction=tiny["fraction"], augment=False)


@pytest.fixture()
def tchr():
    torch.manual_seed(1)
    return teacher(10, pretrained=False)


def _fit_step(step, method, dls, tchr, epochs=1, seed=0, **kw):
    "A fresh resnet10 (seeded), the learner of `step`, fitted `epochs`; returns (student, learner)."
    set_seed(seed)
    student = resnet("resnet10")
    learn = step_learner(step, StudentConfig(method=method, lr=1e-3, **kw), student, tchr, dls)
    seed_everything(seed, dls)
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs)
    return student, learn


def _changed(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("truncate", [True, False])
def test_stage_features_truncated_equal_whole_model(truncate, tchr):
    x = torch.randn(2, 3, 16, 16)
    for m in (tchr.eval(), resnet("resnet14").eval()):
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(stage_features(m, x, PAPER, truncate=truncate),
                                                          stage_features(m, x, PAPER, truncate=not truncate)))


@pytest.mark.parametrize("stage", ["stem", "layer2", "layer4"])
def test_feature_stage_trains_only_its_stage(stage, dls, tchr):
    set_seed(0)
    before_s = copy.deepcopy(resnet("resnet10").state_dict())
    before_t = copy.deepcopy(tchr.state_dict())
    student, learn = _fit_step(Features(stage, (stage,), target=stage), "stagewise", dls, tchr)
    changed = _changed(before_s, student.state_dict())
    prefix = ("body.conv1", "body.bn1") if stage == "stem" else (f"body.{stage}",)
    assert changed and all(k.startswith(prefix) for k in changed), changed
    # every weight of the stage moved, and so did its BatchNorm statistics
    assert {k for k in before_s if k.startswith(prefix) and "num_batches" not in k} <= changed
    assert not _changed(before_t, tchr.state_dict())  # the teacher never changes, BN statistics included
    assert not tchr.training
    assert all(p.requires_grad for p in student.parameters())  # FreezeOthers restored them


def test_head_stage_trains_only_the_head(dls):
    set_seed(0)
    before = copy.deepcopy(resnet("resnet10").state_dict())
    student, learn = _fit_step(METHODS["stagewise"].steps_for()[-1], "stagewise", dls, None)
    changed = _changed(before, student.state_dict())
    assert changed == {k for k in before if k.startswith("head.")}


def test_frozen_bn_statistics_drift_only_when_asked(dls, tchr):
    step = Features("layer2", ("layer2",), target="layer2")
    set_seed(0)
    before = copy.deepcopy(resnet("resnet10").state_dict())
    frozen_bn, _ = _fit_step(step, "stagewise", dls, tchr)
    drifting, _ = _fit_step(step, "stagewise", dls, tchr, freeze_bn=False)
    stats = ("body.bn1.running_mean", "body.layer1.0.bn2.running_var")
    assert all(torch.equal(before[k], frozen_bn.state_dict()[k]) for k in stats)
    assert not any(torch.equal(before[k], drifting.state_dict()[k]) for k in stats)
    # the weights of frozen stages stay put either way
    assert torch.equal(before["body.layer1.0.conv1.weight"], drifting.state_dict()["body.layer1.0.conv1.weight"])


def test_truncated_stage_equals_the_papers_whole_forward(dls, tchr):
    step = Features("layer1", ("layer1",), target="layer1")
    fast, lf = _fit_step(step, "stagewise", dls, tchr, epochs=2, truncate=True)
    plain, lp = _fit_step(step, "stagewise", dls, tchr, epochs=2, truncate=False)
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))
    assert lf.recorder.values == lp.recorder.values


class _Spy(Callback):
    """Recomputes each training batch's loss by its formula, running the teacher itself (its own calls aside), and
    counts how often the callback under test ran the teacher's `last` module, in training and in validation."""
    order = 50

    def __init__(self, tchr, last):
        self.tchr, self.terms, self.gaps, self.calls, self.own = tchr, [], [], {"train": 0, "valid": 0}, False
        last.register_forward_hook(lambda *a: None if self.own else self.calls.__setitem__(
            self._split(), self.calls[self._split()] + 1))

    def _split(self): return "train" if self.learn.training else "valid"

    def after_loss(self):
        if not self.training: return
        cb = next(c for c in self.learn.cbs if isinstance(c, (FeatureLoss, SoftTargets)))
        ce = CrossEntropyLossFlat()(self.pred, *self.yb)
        self.own = True
        with torch.no_grad(), evaluating(self.tchr):
            if isinstance(cb, SoftTargets):
                t = self.tchr(self.x)
                term = cb.alpha * cb.T ** 2 * F.kl_div(F.log_softmax(self.pred / cb.T, 1), F.softmax(t / cb.T, 1),
                                                       reduction="batchmean")
                expected = (1 - cb.alpha) * ce + term
            else:
                maps = stage_features(self.tchr, self.x, PAPER, side="teacher")
                term = sum(F.mse_loss(s, t) for s, t in zip(cb.hooks.stored, maps))
                expected = ce + term
        self.own = False
        self.terms.append(float(term))
        self.gaps.append(float((self.loss - expected).abs()))


@pytest.mark.parametrize("method,last", [("simultaneous", "layer4"), ("hinton", "head")])
def test_teacher_losses_add_their_term_in_training_only(method, last, dls, tchr):
    """The loss is the formula's, with a teacher term that is not zero; the teacher runs every training batch (as
    far as layer4 for the feature losses, to its head for soft targets) and never in validation."""
    spy = _Spy(tchr, getattr(tchr, "head") if last == "head" else tchr.body.layer4)
    set_seed(0)
    student = resnet("resnet10")
    learn = step_learner(METHODS[method].steps_for()[0], StudentConfig(method=method, lr=1e-3), student, tchr, dls)
    learn.add_cb(spy)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    n_train = len(dls.train)
    assert len(spy.terms) == n_train and min(spy.terms) > 1e-4 and max(spy.gaps) < 1e-5
    assert spy.calls == {"train": n_train, "valid": 0}
    assert learn.loss_func.__class__ is CrossEntropyLossFlat  # the loss is put back after training


def test_soft_targets_is_hintons_loss(tchr):
    cb = SoftTargets(tchr, T=3.0, alpha=0.25)
    pred, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    cb.old_lf, cb.target = CrossEntropyLossFlat(), t
    p_t = F.softmax(t / 3, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(pred / 3, 1))).sum(1).mean()
    expected = 0.75 * F.cross_entropy(pred, y) + 0.25 * 9 * kl
    assert torch.allclose(cb.lf(pred, y), expected, atol=1e-6)


def test_freeze_others_freezes_what_the_optimizer_does_not_train(dls):
    student = resnet("resnet10")
    head = list(student.head.parameters())
    seen = {}

    class Look(Callback):
        def before_train(self):
            seen["grad"] = {n for n, p in student.named_parameters() if p.requires_grad}
            seen["bn_training"] = student.body.bn1.training

    learn = Learner(dls, student, loss_func=CrossEntropyLossFlat(), splitter=lambda m: [head],
                    cbs=[FreezeOthers(), Look()])
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert seen["grad"] == {n for n, _ in student.head.named_parameters(prefix="head")}
    assert seen["bn_training"] is False
    assert all(p.requires_grad for p in student.parameters())
