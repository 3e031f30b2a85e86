"""Shared fixtures: generated data in a temporary KD_DATA, a saved random teacher, tiny settings."""
import pytest
import torch

from kd_lib.models import teacher

# One thread: these tiny convolutions gain nothing from two, and two threads slow to a crawl
# whenever another process holds a core (OpenMP workers spin on the busy one).
torch.set_num_threads(1)

# Small enough to train in seconds on 2 CPU cores: 16 px digits, a quarter of the train part.
TINY = dict(dataset="digits", size=16, bs=32, fraction=0.25, lr=1e-3)


@pytest.fixture(scope="session", autouse=True)
def kd_data(tmp_path_factory):
    "Generated data (the digits tree) goes to a temporary folder, never into the repository."
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("kd_data")
    mp.setenv("KD_DATA", str(path))
    mp.setenv("KD_PROGRESS", "0")
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
