"""Teacher and student ResNets of the paper.

Every model is ``nn.Sequential(body, head)`` in fastai's layout. The body keeps
torchvision's child names (``conv1``, ``bn1``, ``relu``, ``maxpool``,
``layer1`` ... ``layer4``), so the same stage points address the same places in
the teacher and in every student: `kd_lib.core.stages.Stages.paper` names them.

They are plain `nn.Conv2d` ResNets; the recipes make them faster on a CPU with `kd_lib.speed.taps`.
"""
from collections import OrderedDict
from contextlib import contextmanager
from urllib.error import URLError

import torch
from fastai.layers import AdaptiveConcatPool2d, Flatten
from fastai.vision.learner import create_head
from torch import nn
from torchvision.models import ResNet, ResNet34_Weights
from torchvision.models.resnet import BasicBlock

__all__ = ["BLOCKS", "STUDENTS", "PretrainedUnavailable", "resnet", "teacher", "student_head", "evaluating"]

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
    return nn.Sequential(OrderedDict(body=_body(ResNet(BasicBlock, BLOCKS[name])), head=student_head(n_classes)))


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
    return nn.Sequential(OrderedDict(body=_body(tv), head=create_head(N_FEATURES, n_classes)))


@contextmanager
def evaluating(*models: nn.Module):
    "Every module of `models` in eval mode inside the block, and its own mode restored after."
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models: model.eval()
    try: yield
    finally:
        for m, training in modes: m.train(training)
