"""Tap convolutions, a CPU speed-up the recipes apply to every model they train (kept records stay bit for bit).

`TapConv2d` is an `nn.Conv2d` that, where its output map is 1x1 (at 16 px, layer3 and layer4; at 32 px, layer4),
multiplies the input by the kernel taps that meet it only (a 3x3 kernel's centre on a 1x1 map), not by the eight
that multiply padding, as a matrix product: the same numbers within float rounding, several times faster on a CPU.
`tapped` swaps a model's convolutions for them in place; `live_taps` makes a model about to train at a given size
keep only those taps as parameters, so its optimizer skips the others too (the same numbers bit for bit).
"""
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from fastai.callback.hook import Hooks
from torch import nn

from ..core.models import evaluating

__all__ = ["TapConv2d", "tapped", "untapped", "live_taps", "n_params"]


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
            raise RuntimeError(f"This convolution trains only the kernel taps {self.live} "
                               "(kd_lib.speed.taps.live_taps), "
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
