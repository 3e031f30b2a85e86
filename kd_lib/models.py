"""Teacher and student ResNets of the paper.

Every model is ``nn.Sequential(body, head)`` in fastai's layout. The body keeps
torchvision's child names (``conv1``, ``bn1``, ``relu``, ``maxpool``,
``layer1`` ... ``layer4``), so the same stage points address the same places in
the teacher and in every student: `kd_lib.stages.Stages.paper` names them.

Their convolutions are `TapConv2d` modules: where a convolution's output map is 1x1 (at 16 px, layer3 and layer4; at
32 px, layer4), it multiplies the input by the kernel taps that meet it only (a 3x3 kernel's centre on a 1x1 map),
not by the eight that multiply padding, as a matrix product: the same numbers within float rounding, several times
faster on a CPU. `live_taps` makes a model about to train at a given size keep only those taps as parameters, so
its optimizer skips the others too (the same numbers bit for bit).
"""
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator
from urllib.error import URLError

import torch
import torch.nn.functional as F
from fastai.callback.hook import Hooks
from fastai.layers import AdaptiveConcatPool2d, Flatten
from fastai.vision.learner import create_head
from torch import nn
from torchvision.models import ResNet, ResNet34_Weights
from torchvision.models.resnet import BasicBlock

__all__ = ["BLOCKS", "STUDENTS", "PretrainedUnavailable", "TapConv2d", "tapped", "untapped", "live_taps", "n_params",
           "resnet", "teacher", "student_head", "evaluating"]

# Blocks per layer (Table 1 of the paper); ResNet18 is torchvision's own.
BLOCKS = {
    "resnet10": [1, 1, 1, 1],
    "resnet14": [1, 1, 2, 2],
    "resnet18": [2, 2, 2, 2],
    "resnet20": [2, 2, 3, 2],
    "resnet26": [3, 3, 3, 3],
    "resnet34": [3, 4, 6, 3],
}
STUDENTS = ["resnet10", "resnet14", "resnet18", "resnet20", "resnet26"]
BODY_NAMES = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
N_FEATURES = 512  # channels out of layer4, for every BasicBlock ResNet


class PretrainedUnavailable(RuntimeError):
    """ImageNet weights were asked for but could not be loaded."""


class TapConv2d(nn.Conv2d):
    """An `nn.Conv2d` that, where its output map is 1x1, computes only the products that count: the input rows and
    columns the one output position sees times the kernel taps they meet (a 3x3 kernel's centre on a 1x1 map with
    padding 1; with stride 2 on a 2x2 map, its lower right taps), as the matrix product they are (`F.linear`, which
    runs faster than a convolution of a 1x1 map, a 1x1 kernel's included). The taps left out multiply padding, so
    the result is the plain convolution's within float rounding; the weight tensor is the same (state dict,
    optimizer and gradient keep their shapes; the taps left out get a zero gradient, as they do in the plain
    convolution). Elsewhere it is `nn.Conv2d`. `live_taps` goes one step further for training: only the taps that
    count stay parameters."""
    live = None  # the kernel's rows and columns (slices) that count, once `live_taps` kept only them as `weight`

    def window(self, hw) -> tuple:
        """For an input map of size `hw`: the input rows and columns the one output position sees and the kernel's
        rows and columns they meet (slices); None where the output map is larger than 1x1, or the convolution is
        not a plain one (groups, dilation, a padding mode other than zeros or given as a string)."""
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or self.dilation != (1, 1) or self.groups != 1:
            return None
        (h, w), (kh, kw), (sh, sw), (ph, pw) = hw, self.kernel_size, self.stride, self.padding
        if ((h + 2 * ph - kh) // sh, (w + 2 * pw - kw) // sw) != (0, 0): return None
        hh, ww = min(h, kh - ph), min(w, kw - pw)
        return hh, ww, (slice(ph, ph + hh), slice(pw, pw + ww))

    def whole_weight(self) -> torch.Tensor:
        "The whole kernel: `weight`, or after `live_taps` the kept taps put back among the others (differentiable)."
        if self.live is None: return self.weight
        w = self.whole.clone()
        w[(..., *self.live)] = self.weight
        return w

    def forward(self, x):
        win = self.window(x.shape[-2:])
        if self.live is not None and (win is None or win[2] != self.live) and torch.is_grad_enabled() \
                and self.weight.requires_grad:
            raise RuntimeError(f"This convolution trains only the kernel taps {self.live} (kd_lib.models.live_taps), "
                               f"but an input map of {tuple(x.shape[-2:])} meets others: train the model at the size "
                               "live_taps was given, or build it again for this size.")
        if win is None: return self._conv_forward(x, self.whole_weight(), self.bias)
        hh, ww, taps = win
        taps = self.weight if taps == self.live else self.whole_weight()[(..., *taps)]
        taps = taps.flatten(1).contiguous()  # the kept taps' layout: one matrix product, whichever path, bit for bit
        return F.linear(x[..., :hh, :ww].flatten(1), taps, self.bias).view(len(x), -1, 1, 1)

    def keep_live(self, taps: tuple) -> None:
        """Make the kernel's rows and columns `taps` (slices) its only trainable taps (`weight`); the others stay in
        the buffer `whole`, unchanged, outside the optimizer. The state dict keeps the whole kernel."""
        whole = self.whole_weight().detach().clone()
        self.register_buffer("whole", whole, persistent=False)
        self.weight = nn.Parameter(whole[(..., *taps)].clone(), requires_grad=self.weight.requires_grad)
        self.live = taps

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.live is not None: destination[prefix + "weight"] = self.whole_weight().detach()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        key = prefix + "weight"
        if self.live is not None and key in state_dict and state_dict[key].shape == self.whole.shape:
            with torch.no_grad(): self.whole.copy_(state_dict[key])
            state_dict = {**{k: v for k, v in state_dict.items() if k.startswith(prefix)},
                          key: state_dict[key][(..., *self.live)]}
        super()._load_from_state_dict(state_dict, prefix, *args)


def live_taps(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """`model` (in place) training only the kernel taps that count for inputs shaped like the batch `x`: each
    `TapConv2d` whose output map is 1x1 keeps the taps its input meets as its `weight` and the others (which multiply
    padding, so their gradient is zero) outside the parameters, so the optimizer, the gradient and its zeroing
    skip them (at 16 px, 8 of every 9 weights of layer3 and layer4). Outputs and the kept taps' gradients and
    updates are those of the whole kernel; the state dict keeps the whole kernel. Left out, the other taps keep their
    values where a decoupled weight decay (AdamW) would shrink them: they never meet an input of this size. An input
    of another size trains with an error that says so (evaluation without gradients works at any size)."""
    convs = [m for m in model.modules() if isinstance(m, TapConv2d) and m.live is None]
    with Hooks(convs, lambda m, i, o: m.window(i[0].shape[-2:]), detach=False) as hooks, evaluating(model), \
            torch.no_grad():
        model(x)
    for m, win in zip(convs, hooks.stored):
        if win is not None and win[:2] != m.kernel_size: m.keep_live(win[2])  # some taps only ever meet padding
    return model


def _split(model: nn.Module) -> list:
    "The `TapConv2d` modules of `model` that `live_taps` split."
    return [m for m in model.modules() if isinstance(m, TapConv2d) and m.live is not None]


def n_params(model: nn.Module) -> int:
    "The number of parameters of `model`'s architecture, trainable or not (after `live_taps`, the taps left out too)."
    return sum(p.numel() for p in model.parameters()) + sum(m.whole.numel() - m.weight.numel() for m in _split(model))


def _swap(model: nn.Module, old: type, new: type) -> list:
    "Make every module of `model` whose class is exactly `old` one of class `new` (the same object); the swapped."
    mods = [m for m in model.modules() if type(m) is old]
    for m in mods: m.__class__ = new
    return mods


def tapped(model: nn.Module) -> nn.Module:
    "`model` with each of its `nn.Conv2d` modules a `TapConv2d` (the same modules and parameters: in place)."
    _swap(model, nn.Conv2d, TapConv2d)
    return model


@contextmanager
def untapped(model: nn.Module) -> Iterator[nn.Module]:
    "`model` with its `TapConv2d` modules plain `nn.Conv2d` inside the block (every tap computed), as they were after."
    if _split(model):
        raise ValueError("untapped needs every tap of the model trainable; this one trains only some after live_taps: "
                         "build the model again to compare it with the plain convolution.")
    mods = _swap(model, TapConv2d, nn.Conv2d)
    try: yield model
    finally:
        for m in mods: m.__class__ = TapConv2d


def _body(tv: ResNet) -> nn.Sequential:
    "The torchvision ResNet `tv` without its pool and fc, children keeping their names."
    return nn.Sequential(OrderedDict((n, getattr(tv, n)) for n in BODY_NAMES))


def student_head(n_classes: int = 10, nf: int = N_FEATURES) -> nn.Sequential:
    "The paper's student head: concat pool -> Linear(2nf, 256) -> ReLU -> Linear(256, n_classes)."
    return nn.Sequential(AdaptiveConcatPool2d(1), Flatten(),
                         nn.Linear(2 * nf, 256), nn.ReLU(inplace=True), nn.Linear(256, n_classes))


def resnet(name: str, n_classes: int = 10) -> nn.Sequential:
    "Randomly initialised (Kaiming) student `name` of Table 1 with the paper's student head."
    if name not in BLOCKS:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(BLOCKS)}.")
    return tapped(nn.Sequential(OrderedDict(body=_body(ResNet(BasicBlock, BLOCKS[name])),
                                            head=student_head(n_classes))))


def teacher(n_classes: int = 10, pretrained: bool = True) -> nn.Sequential:
    """The paper's teacher: torchvision ResNet34 body and fastai's default head.

    With `pretrained`, the ImageNet weights (IMAGENET1K_V1, those of 2019) come
    from torchvision's cache or its download; if neither works the error says
    how to get them, never a silent fall back to random weights.
    """
    weights = ResNet34_Weights.IMAGENET1K_V1 if pretrained else None
    try:
        tv = ResNet(BasicBlock, BLOCKS["resnet34"])
        if weights is not None:
            tv.load_state_dict(weights.get_state_dict(progress=False, check_hash=True))
    except (URLError, OSError, RuntimeError) as e:
        raise PretrainedUnavailable(
            f"Could not load the ImageNet ResNet34 weights ({type(e).__name__}: {e}). "
            f"Download {weights.url} into {torch.hub.get_dir()}/checkpoints/ on a machine "
            "with network access (or set TORCH_HOME to a folder that holds them), "
            "or pass pretrained=False to train the teacher from scratch.") from e
    return tapped(nn.Sequential(OrderedDict(body=_body(tv), head=create_head(N_FEATURES, n_classes))))


@contextmanager
def evaluating(*models: nn.Module):
    "Every module of `models` in eval mode inside the block, and its own mode restored after."
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models: model.eval()
    try: yield
    finally:
        for m, training in modes: m.train(training)
