"""Shared fixtures: generated data in a temporary KD_DATA, a saved random teacher, tiny settings and profiles."""
from pathlib import Path

import pytest
import torch
import yaml

from kd_lib.core.models import teacher

# One thread: these tiny convolutions gain nothing from two, and two threads slow to a crawl
# whenever another process holds a core (OpenMP workers spin on the busy one).
torch.set_num_threads(1)
# On a GPU, the exactness tests (cache against plain path, truncated against whole forwards, resume against an
# uninterrupted run) hold with TF32 off and deterministic kernels: float32 all the way, the same algorithm each time.
if torch.cuda.is_available():
    import os
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)

# Small enough to train in seconds on 2 CPU cores: 16 px digits, a quarter of the train part.
TINY = dict(dataset="digits", size=16, bs=32, fraction=0.25, lr=1e-3)
# The smallest profile of the runner's tests: a teacher and two students of one epoch each.
TINY_STUDENTS = [dict(student="resnet10", method=["no_teacher", "stagewise"], epochs=1)]


@pytest.fixture(scope="session", autouse=True)
def kd_data(tmp_path_factory):
    "Generated data (the digits tree) goes to a temporary folder, never into the repository."
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("kd_data")
    mp.setenv("KD_DATA", str(path))
    mp.setenv("KD_PROGRESS", "0")
    mp.setenv("KD_LINES", "0")  # the runner's progress lines too (its command line sets them where not set)
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory):
    "A randomly initialised ResNet34 teacher saved as train_teacher saves one (frozen features are all we need)."
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(teacher(10, pretrained=False).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny():
    return dict(TINY)


@pytest.fixture
def write_profile(tmp_path):
    """`write_profile(students=None)`: the path of a tiny profile file (digits, 16 px, a one-epoch teacher and
    `students`, by default `TINY_STUDENTS`) whose runs go to `tmp_path / "runs"`."""
    def write(students: list = None) -> Path:
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(dict(
            name="tiny", out_dir=str(tmp_path / "runs"),
            datasets=[dict(dataset="digits", common=dict(size=16, bs=16, lr=1e-3),
                           teacher=dict(epochs=1, pretrained=False), students=students or TINY_STUDENTS)])))
        return path
    return write


def step_learner(step, config, student, tchr, dls, run=None, cache=None, stages=None):
    "The Learner of one `step` (kd_lib.core.steps) of `config.method` on the paper's stages, outside a run."
    from torch import nn
    from kd_lib.core.methods import get_method
    from kd_lib.core.stages import Stages
    from kd_lib.core.steps import Setting
    setting = Setting(config, get_method(config.method), student, tchr, stages or Stages.paper(), nn.ModuleDict(), dls,
                      run)
    return step.learner(setting, cache)


def complete(kind: str, params: dict, **fields) -> dict:
    "A complete record of `kind` with `params`, and made-up results where `fields` gives none (what readers read)."
    return dict(dict(status="complete", kind=kind, params=params, data=dict(sizes=dict(train=8, valid=2, test=2)),
                     valid_accuracy=50.0, test_accuracy=50.0, wall_time_s=1.0), **fields)
