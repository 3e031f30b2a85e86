"""The paper's models: block counts, heads, stage points, and the offline-weights error."""
from urllib.error import URLError

import pytest
import torch
from torch import nn
from torchvision.models import _api as tv_api

from kd_lib.models import (BLOCKS, FEATURE_STAGES, STAGES, PretrainedUnavailable, resnet, stage_modules,
                           stage_part, stage_shapes, teacher)

EXPECTED_SHAPES = {  # (channels, side) of each stage output, per input side
    32: dict(stem=(64, 16), layer1=(64, 8), layer2=(128, 4), layer3=(256, 2), layer4=(512, 1)),
    224: dict(stem=(64, 112), layer1=(64, 56), layer2=(128, 28), layer3=(256, 14), layer4=(512, 7)),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_counts(name):
    m = resnet(name)
    assert [len(getattr(m.body, f"layer{i}")) for i in range(1, 5)] == BLOCKS[name]


def test_student_head_is_the_papers():
    head = resnet("resnet10", n_classes=7).head
    kinds = [type(l).__name__ for l in head]
    assert kinds == ["AdaptiveConcatPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    assert (head[2].in_features, head[2].out_features, head[4].out_features) == (1024, 256, 7)
    assert not any(isinstance(l, (nn.BatchNorm1d, nn.Dropout)) for l in head)


def test_teacher_head_is_fastais_default():
    head = teacher(n_classes=5, pretrained=False).head
    assert sum(isinstance(l, nn.BatchNorm1d) for l in head.modules()) == 2
    assert sum(isinstance(l, nn.Dropout) for l in head.modules()) == 2
    assert [l.out_features for l in head.modules() if isinstance(l, nn.Linear)] == [512, 5]


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="resnet10, resnet14"):
        resnet("resnet99")


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", ["resnet10", "resnet14", "resnet18", "resnet20", "resnet26", "teacher"])
def test_stage_shapes(name, size):
    m = teacher(pretrained=False) if name == "teacher" else resnet(name)
    shapes = stage_shapes(m, size)
    assert list(shapes) == FEATURE_STAGES
    assert {s: (c, h) for s, (c, h, w) in shapes.items()} == EXPECTED_SHAPES[size]


def test_teacher_and_student_stage_shapes_agree():
    t = stage_shapes(teacher(pretrained=False), 64)
    for name in BLOCKS:
        assert stage_shapes(resnet(name), 64) == t


def test_forward_gives_logits():
    assert resnet("resnet14", n_classes=3)(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert teacher(n_classes=4, pretrained=False).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_stage_modules_name_every_stage():
    m = resnet("resnet10")
    mods = stage_modules(m)
    assert list(mods) == STAGES
    assert mods["stem"] is m.body.relu and mods["layer3"] is m.body.layer3 and mods["head"] is m.head


def test_stage_parts_partition_the_parameters():
    m = resnet("resnet18")
    ids = [id(p) for s in STAGES for p in stage_part(m, s).parameters()]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    stem = {id(p) for p in stage_part(m, "stem").parameters()}
    assert stem == {id(p) for p in [*m.body.conv1.parameters(), *m.body.bn1.parameters()]}


def test_stage_parts_compose_to_the_feature_maps():
    m = resnet("resnet10").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        from fastai.callback.hook import hook_outputs
        with hook_outputs([stage_modules(m)[s] for s in FEATURE_STAGES]) as hooks:
            m(x)
        for s, expected in zip(FEATURE_STAGES, hooks.stored):
            x = stage_part(m, s)(x)
            assert torch.equal(x, expected)


def test_pretrained_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedUnavailable, match="pretrained=False") as e:
        teacher(pretrained=True)
    assert "resnet34" in str(e.value) and str(tmp_path) in str(e.value)


def test_pretrained_weights_are_loaded(monkeypatch):
    from torchvision.models import resnet34
    weights = resnet34().state_dict()
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", lambda *a, **k: weights)
    t = teacher(pretrained=True)
    assert torch.equal(t.body.layer4[2].conv2.weight, weights["layer4.2.conv2.weight"])
    assert torch.equal(t.body.conv1.weight, weights["conv1.weight"])
