"""Teacher-forced stages: each stage learns from its own MSE only, on the teacher's inputs; the method trains,
keeps each stage's best epoch, and its fine-tune variant trains the stages again on the student's own inputs."""

import pytest
import torch

from kd_lib.core.forced import ForcedStages, forced_loss
from kd_lib.core.distill import stage_features
from kd_lib.core.models import resnet, teacher
from kd_lib.core.stages import Stages
from kd_lib.recipes.train import train_student

PAPER = Stages.paper()
FEATURE_STAGES = PAPER.names


def test_each_stage_learns_from_its_own_mse_only():
    torch.manual_seed(0)
    student, tchr = resnet("resnet10"), teacher(10, pretrained=False).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(): maps = stage_features(tchr, x, PAPER, side="teacher")
    model = ForcedStages(student, PAPER)
    outs = model(x, *maps[:-1])
    for k, stage in enumerate(FEATURE_STAGES):
        student.zero_grad()
        torch.nn.functional.mse_loss(outs[k], maps[k]).backward(retain_graph=True)
        for j, other in enumerate(FEATURE_STAGES):
            grads = [p.grad for p in PAPER.part(student, other).parameters()]
            touched = any(g is not None and g.abs().sum() > 0 for g in grads)
            assert touched == (j == k), (stage, other)
    assert torch.isclose(forced_loss(outs, *maps), sum(torch.nn.functional.mse_loss(o, t) for o, t in zip(outs, maps)))


@pytest.fixture(scope="module")
def forced_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forced")
    torch.manual_seed(0)
    torch.save(teacher(10, pretrained=False).state_dict(), tmp / "teacher.pth")
    return tmp


def _run(tmp, method, **kw):
    settings = dict(dataset="digits", size=16, bs=32, fraction=0.25, lr=1e-3, epochs=3, augment=False, method=method,
                    student="resnet10", teacher_path=str(tmp / "teacher.pth"), out_dir=str(tmp / "runs"),
                    progress=False)
    return train_student(**(settings | kw))


def test_teacher_forced_keeps_each_stages_best_epoch(forced_teacher):
    record = _run(forced_teacher, "teacher_forced")
    stages, head = record["stages"]
    assert stages["target"] == "forced" and head["name"] == "head" and len(stages["history"]) == 3
    for s in FEATURE_STAGES: assert all(f"mse_{s}" in h for h in stages["history"])
    assert not list((forced_teacher / "runs").rglob("stages-*.pth"))  # the per-stage bests are loaded and removed


def test_the_fine_tune_trains_each_stage_on_the_students_own_inputs(forced_teacher):
    record = _run(forced_teacher, "teacher_forced_finetune", finetune_epochs=1)
    names = [s["name"] for s in record["stages"]]
    assert names == ["stages", *(f"{s}_finetune" for s in FEATURE_STAGES), "head"]
    fine = record["stages"][1:-1]
    assert all(len(s["history"]) == 1 and s["target"] in FEATURE_STAGES for s in fine)


@pytest.mark.parametrize("cache", [True, "valid"])
def test_the_cached_path_gives_the_plain_paths_numbers(forced_teacher, cache):
    "One cache of the teacher's five maps (and the images) serves the step: in float32, the same numbers exactly."
    plain = _run(forced_teacher, "teacher_forced", seed=1)
    cached = _run(forced_teacher, "teacher_forced", out_dir=str(forced_teacher / f"cached-{cache}"), seed=1,
                  cache=cache, cache_dtype="float32")
    for a, b in zip(plain["stages"], cached["stages"]):
        assert [h["valid_loss"] for h in a["history"]] == [h["valid_loss"] for h in b["history"]]
    assert plain["test_accuracy"] == cached["test_accuracy"]


def test_each_stage_keeps_the_weights_of_its_own_best_epoch(forced_teacher):
    "Each stage of the trained student gives, teacher-forced on the valid split, the lowest MSE of its history."
    from kd_lib.data.loaders import get_data
    from kd_lib.recipes.train import load_student, load_teacher
    record = _run(forced_teacher, "teacher_forced", seed=2, epochs=4)
    history = record["stages"][0]["history"]
    run = forced_teacher / "runs" / "digits" / "resnet10-teacher_forced-f0.25-s2"
    student, tchr = load_student(run), load_teacher(forced_teacher / "teacher.pth", 10).eval()
    dls = get_data("digits", size=16, bs=32, fraction=0.25, seed=2, augment=False)
    totals, n = dict.fromkeys(FEATURE_STAGES, 0.0), 0
    with torch.no_grad():
        for x, _ in dls.valid:
            maps = stage_features(tchr, x, PAPER, side="teacher")
            for s, out, t in zip(FEATURE_STAGES, ForcedStages(student, PAPER)(x, *maps[:-1]), maps):
                totals[s] += float(torch.nn.functional.mse_loss(out, t)) * len(x)
            n += len(x)
    for s in FEATURE_STAGES:
        assert totals[s] / n == pytest.approx(min(h[f"mse_{s}"] for h in history), rel=1e-4), s


def test_a_fine_tune_step_feeds_each_stage_the_students_own_features(forced_teacher):
    from kd_lib.recipes.config import StudentConfig
    from kd_lib.data.loaders import get_data
    from kd_lib.core.methods import get_method
    from kd_lib.recipes.train import load_teacher
    from conftest import step_learner
    torch.manual_seed(0)
    student, tchr = resnet("resnet10"), load_teacher(forced_teacher / "teacher.pth", 10)
    dls = get_data("digits", size=16, bs=32, fraction=0.25, augment=False)
    step = next(s for s in get_method("teacher_forced_finetune").steps_for() if s.name == "layer2_finetune")
    learn = step_learner(step, StudentConfig(dataset="digits", size=16, bs=32, method="teacher_forced_finetune"),
                         student, tchr, dls, forced_teacher)
    seen = []
    handle = student.body.layer2.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    x = dls.one_batch()[0]
    with torch.no_grad(): learn.model.eval()(x)
    handle.remove()
    with torch.no_grad(): own = student.body[:5](x)  # the student's stem and layer1
    assert torch.equal(seen[0], own)
