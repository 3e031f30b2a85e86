"""`kd_lib.speed.taps.live_taps`: a model trains only the kernel taps that meet its inputs (at 16 px, one of nine in
layer3 and layer4), with the whole model's outputs, gradients and trained weights, and the whole kernel in its state
dict; another input size is refused in training, not trained wrongly."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lib.core.optim import fastai_adam, paper_adam
from kd_lib.speed.taps import TapConv2d, live_taps, n_params, tapped, untapped
from kd_lib.core.models import resnet, teacher

X = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return tapped(teacher(10, pretrained=False) if name == "teacher" else resnet(name))  # as the recipes build them


def _live(model: nn.Module) -> dict:
    "The modules `live_taps` split, by name."
    return {n: m for n, m in model.named_modules() if getattr(m, "live", None) is not None}


def _train(model: nn.Module, opt_func, steps: int) -> dict:
    "The state dict after `steps` steps on (X, Y) with the optimizer `opt_func(params)` (dropout seeded alike)."
    opt = opt_func(model)
    for i in range(steps):
        torch.manual_seed(i)
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("name,opt_func", [
    ("resnet10", lambda m: paper_adam(list(m.parameters()), lr=3e-3)),  # the students' optimizer
    ("resnet10", lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)),
    ("teacher", lambda m: fastai_adam(m)(list(m.parameters()), lr=3e-3))])  # the teacher's: AdamW, weight decay
def test_the_taps_it_keeps_train_as_the_whole_kernels_do_bit_for_bit(name, opt_func):
    """The same products in the same order: every weight of a short run equals the tapped model's bit for bit,
    except the taps left out, which keep their start values where the teacher's decoupled weight decay shrinks
    them (no gradient ever reaches them, with or without live_taps)."""
    whole = _model(name)
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    live = live_taps(copy.deepcopy(whole), X)
    split = _live(live)
    assert {n.split(".")[1] for n in split} == {"layer3", "layer4"}  # 1x1 outputs at 16 px
    a, b = _train(whole, opt_func, 4), _train(live, opt_func, 4)
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    decays = name == "teacher"
    for k in a:
        m = split.get(k.rsplit(".", 1)[0])
        if m is None or not k.endswith("weight"):
            assert torch.equal(a[k], b[k]), k
            continue
        kept = (..., *m.live)
        assert torch.equal(a[k][kept], b[k][kept]), k
        dead = torch.ones_like(a[k], dtype=torch.bool)
        dead[kept] = False
        assert torch.equal(b[k][dead], start[k][dead]), k
        assert torch.equal(a[k][dead], start[k][dead]) != decays, k


def test_only_the_live_taps_are_parameters_and_the_state_dict_is_the_whole_models():
    model = _model("resnet10")
    plain = _model("resnet10")
    trainable = sum(p.numel() for p in model.parameters())
    live_taps(model, X)
    conv = model.body.layer4[0].conv2
    assert conv.live == (slice(1, 2), slice(1, 2)) and conv.weight.shape == (512, 512, 1, 1)
    assert model.body.layer3[0].conv1.live == (slice(1, 3), slice(1, 3))  # stride 2 on a 2x2 map: four taps
    assert sum(p.numel() for p in model.parameters()) < trainable / 3
    assert n_params(model) == n_params(plain) == trainable  # the architecture's count, as Table 1 counts
    sd, psd = model.state_dict(), plain.state_dict()
    assert list(sd) == list(psd) and all(torch.equal(sd[k], psd[k]) for k in sd)
    # a whole model's weights load (here, others than its own), and give that model's outputs
    other = _model("resnet10")
    for p in other.parameters(): nn.init.normal_(p, std=0.05)
    model.load_state_dict(other.state_dict())
    with torch.no_grad(): assert torch.equal(model.eval()(X), other.eval()(X))
    key = "body.layer4.0.conv2.weight"
    assert torch.equal(model.state_dict()[key], other.state_dict()[key])


def test_another_input_size_evaluates_but_does_not_train():
    model = _model("resnet10").eval()
    whole = copy.deepcopy(model)
    live_taps(model, X)
    x32 = torch.randn(4, 3, 32, 32)
    with torch.no_grad(): assert torch.equal(model(x32), whole(x32))
    with pytest.raises(RuntimeError, match="live_taps"): model(x32)
    with pytest.raises(ValueError, match="live_taps"):
        with untapped(model): pass


def test_a_frozen_layer_stays_frozen_and_a_second_call_changes_nothing():
    model = _model("resnet10")
    model.body.layer4.requires_grad_(False)
    live_taps(model, X)
    assert not any(p.requires_grad for p in model.body.layer4.parameters())
    assert all(p.requires_grad for p in model.body.layer3.parameters())
    before = [id(p) for p in model.parameters()]
    live_taps(model, X)
    assert [id(p) for p in model.parameters()] == before
    assert all(type(m) is TapConv2d for m in model.modules() if isinstance(m, nn.Conv2d))
