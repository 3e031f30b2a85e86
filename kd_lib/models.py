"""Teacher and student ResNets of the paper, with stage points by name.

Every model is ``nn.Sequential(body, head)`` in fastai's layout. The body keeps
torchvision's child names (``conv1``, ``bn1``, ``relu``, ``maxpool``,
``layer1`` ... ``layer4``), so the same stage names address the same places in
the teacher and in every student: see `stage_modules`.
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

__all__ = ["BLOCKS", "STUDENTS", "STAGES", "FEATURE_STAGES", "PretrainedUnavailable",
           "resnet", "teacher", "student_head", "stage_modules", "stage_part", "stage_span", "stage_shapes",
           "STAGE_SLICES", "HEAD", "evaluating", "check_stage_shapes"]

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
FEATURE_STAGES = ["stem", "layer1", "layer2", "layer3", "layer4"]
STAGES = FEATURE_STAGES + ["head"]
HEAD = STAGES.index("head")  # the head's number among the stages
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
    return nn.Sequential(OrderedDict(body=_body(ResNet(BasicBlock, BLOCKS[name])),
                                     head=student_head(n_classes)))


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


def stage_modules(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """The module of each stage, by name, for a model built here.

    The output of a feature stage's module is that stage's feature map (``stem``
    is the ReLU before the maxpool); the parameters a stage trains are those of
    `stage_part`. ``head`` is the classifier.
    """
    body, head = model.body, model.head
    return OrderedDict(stem=body.relu, layer1=body.layer1, layer2=body.layer2,
                       layer3=body.layer3, layer4=body.layer4, head=head)


# The slice of the body each feature stage owns; together they cover the body in order.
# The parameter-free maxpool opens layer1, so the stem's output is the ReLU before it.
STAGE_SLICES = OrderedDict(stem=slice(0, 3), layer1=slice(3, 5), layer2=slice(5, 6),
                           layer3=slice(6, 7), layer4=slice(7, 8))


def stage_part(model: nn.Module, stage: str) -> nn.Module:
    "The part of `model` that `stage` trains: its slice of the body, or the head."
    return model.head if stage == "head" else model.body[STAGE_SLICES[stage]]


def stage_span(model: nn.Module, first: int, last: int) -> nn.Module:
    """`model` from the input of stage `STAGES[first]` to the output of `STAGES[last]` (numbers, `HEAD` for
    the head): a slice of the body, followed by the head when `last` is `HEAD`."""
    start = STAGE_SLICES[STAGES[first]].start if first < HEAD else len(model.body)
    if last < HEAD: return model.body[start:STAGE_SLICES[STAGES[last]].stop]
    return model.body[start:].append(model.head)


@contextmanager
def evaluating(*models: nn.Module):
    "Every module of `models` in eval mode inside the block, and its own mode restored after."
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models: model.eval()
    try: yield
    finally:
        for m, training in modes: m.train(training)


@torch.no_grad()
def stage_shapes(model: nn.Module, size: int = 224, channels: int = 3) -> "OrderedDict[str, tuple]":
    "The shape of each feature stage's output for one `size` x `size` image."
    from fastai.callback.hook import hook_outputs
    mods = stage_modules(model)
    with evaluating(model), hook_outputs([mods[s] for s in FEATURE_STAGES]) as hooks:
        model.body(torch.zeros(1, channels, size, size))
    return OrderedDict((s, tuple(o.shape[1:])) for s, o in zip(FEATURE_STAGES, hooks.stored))


def check_stage_shapes(student: nn.Module, teacher: nn.Module, size: int) -> None:
    "Raise ValueError naming the stages where `student`'s and `teacher`'s feature maps differ at `size` px."
    s, t = stage_shapes(student, size), stage_shapes(teacher, size)
    if s != t:
        bad = {k: (s[k], t[k]) for k in s if s[k] != t[k]}
        raise ValueError(f"Student and teacher feature maps differ at {bad} (student, teacher) for {size} px "
                         "inputs: stage losses need equal shapes.")
