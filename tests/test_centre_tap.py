"""The centre tap (`kd_lib.speed.taps.TapConv2d`): where a convolution's output map is 1x1 it multiplies the input by
only the kernel taps that meet it, as a matrix product, and gives the plain convolution's outputs, gradients and
trained weights within float rounding; elsewhere it is the plain convolution; the models keep their state dicts."""
import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lib.data.loaders import get_data
from kd_lib.core.optim import paper_adam
from kd_lib.recipes.fitting import seed_everything
from kd_lib.speed.taps import TapConv2d, tapped, untapped
from kd_lib.core.models import resnet, teacher

ROUNDING = 1e-5  # float32 rounding through a ResNet: a tensor's difference over its norm (measured: about 2e-6)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return tapped(teacher(10, pretrained=False) if name == "teacher" else resnet(name))  # as the recipes build them


def _step(model: nn.Module, x, y) -> list:
    "The output and every parameter's gradient of one training step (the teacher head's dropout seeded alike)."
    torch.manual_seed(1)
    model.zero_grad()
    out = model(x)
    F.cross_entropy(out, y).backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


def _apart(a: list, b: list) -> float:
    "The largest difference of two lists of tensors, each relative to the norm of `b`'s."
    return max(float((u.double() - v.double()).norm() / v.double().norm().clamp_min(1e-30)) for u, v in zip(a, b))


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("name", ["teacher", "resnet10"])
def test_outputs_and_gradients_are_the_plain_paths_within_rounding(name, size):
    """At 16 px layer3 and layer4 are 1x1 (and layer3 opens with a stride-2 convolution on a 2x2 map), at 32 px
    layer4. In float64 the two paths give the same outputs and gradients to 1e-10: the same function, its sums in
    another order. In float32 their outputs are as far from the float64 ones as each other. (Float32 gradients
    can differ by more than rounding: a ReLU input that rounds to the other side of zero in one path flips its
    gradient, and BatchNorm over 32 values of a 1x1 map spreads that over the layers below; measured once, one
    input of 16384 at layer4, -5e-8 against 4e-7, moved every gradient by about 1 %. The short runs below compare
    what training makes of it.)"""
    model = _model(name)
    x, y = torch.randn(32, 3, size, size), torch.randint(0, 10, (32,))
    exact = copy.deepcopy(model).double()
    tap64 = _step(exact, x.double(), y)
    with untapped(exact): plain64 = _step(exact, x.double(), y)
    assert _apart(tap64, plain64) < 1e-10
    tap = model(x).detach()
    with untapped(model): plain = model(x).detach()
    assert _apart([tap], [plain64[0]]) <= 1.5 * _apart([plain], [plain64[0]]) + ROUNDING
    # the taps left out get the plain path's gradient: zero
    grads = dict(zip([n for n, _ in model.named_parameters()], tap64[1:]))
    assert not grads["body.layer4.0.conv2.weight"][:, :, [0, 2]].any()


def _trained(name: str, optimizer: str, batches: list, plain: bool = False, double: bool = False) -> torch.Tensor:
    "Every parameter of `name`, flattened into one vector, after a step on each of `batches`."
    model = _model(name).double() if double else _model(name)
    params = list(model.parameters())
    opt = paper_adam(params, lr=3e-3) if optimizer == "adam" else torch.optim.SGD(params, lr=0.01)
    with untapped(model) if plain or double else nullcontext():
        for x, y in batches:
            _step(model, x.double() if double else x, y)
            opt.step()
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name,optimizer,steps", [("resnet10", "sgd", 4), ("resnet10", "adam", 8),
                                                  ("teacher", "adam", 4)])
def test_weights_after_a_short_run_are_the_plain_paths_within_rounding(name, optimizer, steps, tiny):
    """A few steps on the digits at 16 px, the same seed and batches. Training in float32 amplifies rounding (Adam
    turns a gradient element that is rounding noise into a step of lr, and BatchNorm on 1x1 maps of 32 values
    divides by small deviations): the plain path's own float32 weights are that far from a float64 computation
    of the same run. The tapped path is no farther from the plain path than that; with SGD on resnet10, whose
    training is well conditioned, it is within 1e-5 of the distance the weights moved."""
    seed_everything(0)  # the same batches whatever ran before (the shuffle draws from the global generators)
    dls = get_data("digits", size=16, bs=32, fraction=tiny["fraction"], augment=False)
    batches = [(x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)) for x, y in dls.train][:steps]
    start = torch.cat([p.detach().double().flatten() for p in _model(name).parameters()])
    tap, plain, exact = (_trained(name, optimizer, batches, plain=p, double=d) for p, d in
                         ((False, False), (True, False), (False, True)))
    moved = float((plain - start).norm())
    tap_plain, plain_exact = float((tap - plain).norm()) / moved, float((plain - exact).norm()) / moved
    assert tap_plain <= max(1e-5, 1.25 * plain_exact)
    assert float((tap - exact).norm()) / moved <= 1.25 * plain_exact + 1e-5
    if optimizer == "sgd": assert tap_plain < 1e-5


@pytest.mark.parametrize("size,stride,kernel,taps", [(1, 1, 3, (1, 2)), (1, 2, 3, (1, 2)), (2, 2, 3, (1, 3)),
                                                     (3, 4, 3, (1, 3)), (1, 1, 1, (0, 1)), (2, 2, 1, (0, 1))])
def test_a_1x1_output_is_the_product_of_the_taps_that_meet_the_input(size, stride, kernel, taps):
    """Bit for bit the matrix product of the input positions the output sees and the taps they meet, and within
    rounding the plain convolution; 1x1 kernels too (a ResNet's downsampling path on a 2x2 or 1x1 map)."""
    conv = TapConv2d(8, 16, kernel, stride=stride, padding=kernel // 2)
    x = torch.randn(4, 8, size, size)
    a, b = taps
    seen = x[..., :b - a, :b - a]  # with stride 4 on a 3x3 map, the one output position sees its first 2x2
    product = F.linear(seen.flatten(1), conv.weight[:, :, a:b, a:b].flatten(1), conv.bias).view(4, 16, 1, 1)
    assert torch.equal(conv(x), product)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias, stride, kernel // 2), atol=1e-6)


@pytest.mark.parametrize("size,kw", [(2, {}), (4, {}), (1, dict(padding_mode="circular")), (2, dict(kernel_size=1)),
                                     (4, dict(stride=2)), (1, dict(padding="same")), (1, dict(groups=2))])
def test_elsewhere_it_is_the_plain_convolution(size, kw):
    """An output map larger than 1x1, another padding mode, a grouped convolution: nn.Conv2d's own forward, bit for
    bit."""
    args = dict(kernel_size=3, padding=1) | kw
    tap, plain = TapConv2d(8, 16, **args), nn.Conv2d(8, 16, **args)
    plain.load_state_dict(tap.state_dict())
    x = torch.randn(4, 8, size, size)
    assert torch.equal(tap(x), plain(x))


def test_the_models_keep_their_state_dicts_and_modules():
    """kd_lib's models are plain `nn.Conv2d` ResNets; `tapped` (what the recipes apply) swaps in `TapConv2d`s in
    place, keeping every module and tensor."""
    assert all(type(m) is nn.Conv2d for m in resnet("resnet18").modules() if isinstance(m, nn.Conv2d))
    assert all(type(m) is nn.Conv2d for m in teacher(pretrained=False).modules() if isinstance(m, nn.Conv2d))
    model = tapped(resnet("resnet18"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is TapConv2d for m in convs)
    plain = tapped(resnet("resnet18"))
    with untapped(plain):  # a plain model's weights load, and the modules are swapped back after the block
        assert all(type(m) is nn.Conv2d for m in plain.modules() if isinstance(m, nn.Conv2d))
        model.load_state_dict(plain.state_dict())
    assert all(type(m) is TapConv2d for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
