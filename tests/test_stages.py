"""Stages: the paper's cut of its ResNets, torchvision's ResNets, any pair of models of one's own by module path,
and adapters where a stage's maps differ. Own models train end to end through train_student."""
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from torch import nn
from torchvision.models import ResNet, resnet18
from torchvision.models.resnet import BasicBlock, Bottleneck

from kd_lib.recipes.config import StudentConfig
from kd_lib.data.loaders import get_data
from kd_lib.core.methods import METHODS
from kd_lib.core.models import resnet, teacher
from kd_lib.core.stages import Stage, StageMismatch, Stages, module_table, outputs
from kd_lib.core.steps import Features, Setting
from kd_lib.recipes.train import load_student, train_student

PAPER = Stages.paper()
EXPECTED_SHAPES = {  # (channels, side) of each stage output, per input side
    32: dict(stem=(64, 16), layer1=(64, 8), layer2=(128, 4), layer3=(256, 2), layer4=(512, 1)),
    224: dict(stem=(64, 112), layer1=(64, 56), layer2=(128, 28), layer3=(256, 14), layer4=(512, 7)),
}
TINY = dict(dataset="digits", size=16, bs=32, fraction=0.25, lr=1e-3, epochs=1, progress=False)


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", ["resnet10", "resnet14", "resnet18", "resnet20", "resnet26", "teacher"])
def test_the_papers_stage_shapes(name, size):
    m = teacher(pretrained=False) if name == "teacher" else resnet(name)
    shapes = PAPER.shapes(m, torch.zeros(1, 3, size, size))
    assert list(shapes) == PAPER.names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert {s: (c, h) for s, (c, h, w) in shapes.items()} == EXPECTED_SHAPES[size]


def test_the_papers_stages_name_every_stage_and_partition_the_parameters():
    m = resnet("resnet18")
    assert PAPER.all == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert PAPER.output(m, "stem") is m.body.relu and PAPER.output(m, "layer3") is m.body.layer3
    ids = [id(p) for s in PAPER.all for p in PAPER.part(m, s).parameters()]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert {id(p) for p in PAPER.part(m, "stem").parameters()} == \
        {id(p) for p in [*m.body.conv1.parameters(), *m.body.bn1.parameters()]}


@pytest.mark.parametrize("model,stages", [(lambda: resnet("resnet10"), PAPER),
                                          (lambda: resnet18(num_classes=10), Stages.torchvision_resnet())],
                         ids=["paper", "torchvision"])
def test_stages_compose_the_model(model, stages):
    "Each stage's part applied to the map before gives its map; all of them and the head give the model's output."
    m, x = model().eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = outputs(m, x, [stages.output(m, s) for s in stages.names])
        h = x
        for s, expected in zip(stages.names, maps):
            h = stages.part(m, s)(h)
            assert torch.equal(h, expected)
        assert torch.equal(stages.span(m, stages.names[0], "head")(x), m(x))
        assert torch.equal(stages.span(m, "layer2", "layer4")(maps[1]), maps[-1])


def test_truncation_stops_the_model_after_the_last_map_it_needs():
    m, ran = resnet18(num_classes=10).eval(), []
    m.layer3.register_forward_hook(lambda *a: ran.append("layer3"))
    m.fc.register_forward_hook(lambda *a: ran.append("fc"))
    tv = Stages.torchvision_resnet()
    with torch.no_grad():
        short = outputs(m, torch.randn(1, 3, 32, 32), [tv.output(m, "layer2")])
        assert ran == [] and short[0].shape == (1, 128, 4, 4)
        whole = outputs(m, torch.randn(1, 3, 32, 32), [tv.output(m, "layer2")], truncate=False)
        assert ran == ["layer3", "fc"] and whole[0].shape == short[0].shape


def test_the_module_table_lists_every_module_in_the_order_it_runs():
    table = module_table(resnet18(num_classes=10), torch.zeros(1, 3, 32, 32))
    assert list(table.index[:4]) == ["conv1", "bn1", "relu", "maxpool"] and table.index[-1] == "fc"
    assert table.loc["layer2", "output"] == (128, 4, 4) and table.loc["fc", "params"] == 512 * 10 + 10


def test_stages_of_ones_own_may_differ_on_each_side():
    student = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    tchr = nn.Sequential()
    tchr.add_module("features", nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                              nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2, padding=1)))
    tchr.add_module("classifier", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)))
    stages = Stages((Stage("low", ("0", "1"), ("features.0", "features.1")),
                     Stage("high", ("2",), ("features.2", "features.3", "features.4"))), ("3", "4", "5"),
                    teacher_head=("classifier",))
    x = torch.randn(2, 3, 16, 16)
    assert stages.shapes(student, x) == stages.shapes(tchr, x, "teacher") == dict(low=(8, 16, 16), high=(8, 8, 8))
    assert len(stages.check(student, tchr, x)) == 0
    with pytest.raises(ValueError, match="distinct and none may be 'head'"): Stages((Stage("head", ("0",)),), ("1",))


def _tv_small():
    "A custom smaller ResNet of torchvision's kind: one BasicBlock per layer."
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


def _wide_teacher():
    "A teacher of resnet50's widths (Bottleneck blocks: 256 to 2048 channels), one block per layer."
    torch.manual_seed(1)
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10)


def test_a_torchvision_teacher_distils_a_smaller_resnet_of_ones_own(tmp_path):
    torch.manual_seed(2)
    tchr = resnet18(num_classes=10)
    with pytest.warns(UserWarning, match="teacher of your own comes without a record"):
        r = train_student(**TINY, student=_tv_small(), name="tvresnet10", teacher=tchr, method="stagewise",
                          out_dir=tmp_path)
    assert [s["name"] for s in r["stages"]] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    m = r["models"]
    assert m["student"]["cls"] == "torchvision.models.resnet.ResNet" and m["student"]["name"] == "tvresnet10"
    assert m["teacher"]["params"] == sum(p.numel() for p in tchr.parameters()) and m["adapters"] == {}
    assert m["stages"]["name"] == "torchvision_resnet" and m["student"]["stages"]["layer1"] == ["maxpool", "layer1"]
    assert set(r["feature_mse"]) == {"stem", "layer1", "layer2", "layer3", "layer4"}
    run = tmp_path / "digits" / "tvresnet10-stagewise-f0.25-s0"
    with pytest.raises(ValueError, match="a model of your own .*load_student\\(run, model=...\\)"): load_student(run)
    assert isinstance(load_student(run, model=_tv_small()), ResNet)


def test_a_wide_teacher_without_adapters_is_refused_before_any_training(tmp_path):
    with pytest.raises(StageMismatch, match=r"layer1: student \(64, 4, 4\), teacher \(256, 4, 4\).*adapters=True"):
        train_student(**TINY, student=resnet18(num_classes=10), teacher=_wide_teacher(), method="stagewise",
                      out_dir=tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_wide_teacher_distils_resnet18_through_adapters(tmp_path):
    r = train_student(**TINY, student=resnet18(num_classes=10), teacher=_wide_teacher(), method="stagewise",
                      adapters=True, out_dir=tmp_path)
    assert set(r["models"]["adapters"]) == {"layer1", "layer2", "layer3", "layer4"}  # the stems match (64)
    run = tmp_path / "digits" / "resnet-stagewise-f0.25-s0"
    saved = torch.load(run / "adapters.pth", weights_only=True)
    assert saved["layer4.0.weight"].shape == (2048, 512, 1, 1)  # kept with the run, not part of the student
    assert not any(k.startswith(("layer4.0.weight",)) and v.shape[0] == 2048
                   for k, v in torch.load(run / "stages" / "head.pth", weights_only=True).items())
    with pytest.raises(ValueError, match="teacher's maps to the student's stages, and they differ"):
        train_student(**TINY, student=resnet18(num_classes=10), teacher=_wide_teacher(), method="teacher_forced",
                      adapters=True, out_dir=tmp_path)


class _Grads(Callback):
    "After the first backward pass, which parameters got a gradient; then stop."
    def __init__(self, named): self.named, self.got = named, None
    def after_backward(self):
        self.got = {n for n, p in self.named if p.grad is not None and p.grad.abs().sum() > 0}
        raise CancelFitException()


def test_each_stages_gradient_reaches_that_stage_and_its_adapter_only():
    dls = get_data("digits", size=16, bs=32, fraction=0.25, augment=False)
    student, tchr, tv = resnet18(num_classes=10), _wide_teacher(), Stages.torchvision_resnet()
    adapters = tv.check(student, tchr, torch.zeros(1, 3, 16, 16), adapters=True)
    config = StudentConfig(student="resnet", method="stagewise", lr=1e-3)
    s = Setting(config, METHODS["stagewise"], student, tchr, tv, adapters, dls)
    named = [(f"student.{n}", p) for n, p in student.named_parameters()] + \
        [(f"adapter.{n}", p) for n, p in adapters.named_parameters()]
    for step in METHODS["stagewise"].steps_for(tv):
        for _, p in named: p.grad = None  # a step's optimizer clears only its own parameters' gradients
        spy = _Grads(named)
        learn = step.learner(s)
        learn.add_cb(spy)
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
        own = {f"student.{n}" for n, p in student.named_parameters()
               if any(p is q for q in tv.parameters(student, step.parts))}
        if isinstance(step, Features) and step.target in adapters:
            own |= {f"adapter.{step.target}.{n}" for n, _ in adapters[step.target].named_parameters()}
        assert spy.got == own, step.name
