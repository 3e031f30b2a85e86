"""The paper's models: block counts, heads, and the offline-weights error (their stages: test_stages)."""
from urllib.error import URLError

import pytest
import torch
from torch import nn
from torchvision.models import _api as tv_api

from kd_lib.core.models import BLOCKS, PretrainedUnavailable, resnet, teacher


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


def test_forward_gives_logits():
    assert resnet("resnet14", n_classes=3)(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert teacher(n_classes=4, pretrained=False).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)


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
