"""What a new user hit (issue 37): the distribution's name, re-runs that left the modules passed untrained, a teacher
module at chance taken without a word, seeds with models of one's own, image folders' layout and run folders, the
adapters `Stages.check` returns, torch's CPU build."""
import json
import shutil
import subprocess
import sys
import warnings
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock

import kd_lib.recipes.train
from kd_lib.core.stages import Stages
from kd_lib.recipes.train import RunExists, train_student, train_teacher

from test_own_models import Tiny

ROOT = Path(__file__).resolve().parents[1]
NAME = "stagewise-kd"


def _tv(seed=0) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# 1. The distribution's name

def test_the_wheel_is_named_stagewise_kd_and_holds_kd_lib(tmp_path):
    "name = 'kd_lib' normalised to PyPI's KD-Lib: `pip install kd_lib` installed another project."
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"): shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "kd_lib", src / "kd_lib", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = Parser().parsestr(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    assert meta["Name"] == NAME and wheel.name.startswith("stagewise_kd-")
    assert "kd_lib/__init__.py" in names and "kd_lib/recipes/train.py" in names
    assert {f"kd_lib/{w}/__init__.py" for w in ("core", "data", "speed", "infra", "recipes", "evidence", "runner")} \
        <= set(names)  # every wing
    assert any(n.startswith("kd_lib/profiles/") and n.endswith(".yaml") for n in names)  # package data too
    assert any(n.startswith("kd_lib/evidence/paper_numbers/") and n.endswith(".csv") for n in names)
    assert all(NAME not in r or "[book]" in r for r in meta.get_all("Requires-Dist"))  # `test` asks for its own book


def test_the_docs_install_the_distribution_by_its_own_name():
    readme = (ROOT / "README.md").read_text()
    assert "pip install kd_lib" not in readme.replace("\n", " ") and NAME in readme
    for page in (ROOT / "book").glob("*.md"):
        assert "pip install kd_lib" not in page.read_text().replace("\n", " "), page


# 2. A re-run loads the run's trained weights into the modules passed

def test_a_rerun_of_a_finished_teacher_loads_its_weights_into_the_model_passed(tmp_path):
    "A second train_teacher(model=m2) returned the old record and left m2 untrained."
    args = dict(dataset="digits", size=16, bs=64, epochs=1, lr=1e-3, out_dir=tmp_path, progress=False, name="tiny")
    torch.manual_seed(0)
    m1 = Tiny()
    first = train_teacher(**args, model=m1)
    torch.manual_seed(1)
    m2 = Tiny()
    assert not _same(m1, m2)
    assert train_teacher(**args, model=m2) == first
    assert _same(m1, m2)


def test_a_rerun_of_a_finished_student_loads_its_weights_into_the_student_passed(tmp_path, tiny, monkeypatch):
    "A second train_student(student=s2) returned the old record and left s2 untrained."
    args = tiny | dict(method="no_teacher", epochs=1, out_dir=tmp_path, progress=False, name="tvres10")
    s1 = _tv(0)
    first = train_student(**args, student=s1)
    s2 = _tv(1)
    assert not _same(s1, s2)
    monkeypatch.setattr(kd_lib.recipes.train, "fit", lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert train_student(**args, student=s2) == first
    assert _same(s1, s2)


# 3. A teacher passed as a module is measured, or checked by its record

def test_a_teacher_of_ones_own_that_train_teacher_made_is_checked_by_its_record(tmp_path, tiny):
    """A teacher module was always warned of as coming without a record, even one train_teacher(model=) made:
    with teacher_path= its record checks it (classes, no leak), and its weights load into the module passed."""
    torch.manual_seed(0)
    made = _tv(0)
    train_teacher(dataset="digits", size=16, bs=32, epochs=1, lr=3e-3, out_dir=tmp_path / "t", progress=False,
                  model=made, name="tvres10")
    given = _tv(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = train_student(**tiny, method="stagewise", epochs=1, out_dir=tmp_path / "s", progress=False,
                          student=_tv(2), name="student", teacher=given,
                          teacher_path=tmp_path / "t" / "digits" / "teacher")
    assert [str(w.message) for w in caught if "teacher" in str(w.message).lower()] == []
    assert _same(given, made) and r["models"]["teacher"]["name"] == "tvres10" and r["teacher"]["path"]
    with pytest.warns(UserWarning, match="pass the folder it wrote as teacher_path"):
        train_student(**tiny, method="stagewise", epochs=1, out_dir=tmp_path / "s2", progress=False, student=_tv(2),
                      name="student", teacher=made)


def test_a_teacher_module_at_chance_is_warned_of_with_its_accuracy_and_the_fix(tmp_path, tiny, monkeypatch):
    "train_student(teacher=<untrained module>) distilled it without a word."
    class Stop(Exception): pass
    def stop(*args, **kwargs): raise Stop
    monkeypatch.setattr(kd_lib.recipes.train, "_train_steps", stop)
    untrained = _tv(0)
    with torch.no_grad(): untrained.fc.weight.zero_(), untrained.fc.bias.zero_()  # it always answers class 0
    untrained.train()
    args = tiny | dict(method="stagewise", epochs=1, out_dir=tmp_path, progress=False)
    with pytest.warns(UserWarning) as caught, pytest.raises(Stop):
        train_student(**args, student=_tv(1), name="tvres10", teacher=untrained)
    said = [str(w.message) for w in caught if "above chance" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert said[0].startswith("The teacher given as teacher= (a ResNet) reached ")
    acc = float(said[0].split(" reached ")[1].split("%")[0])
    assert 5 < acc < 15  # the share of class 0 in the valid split
    assert "on this run's valid split, not clearly above chance (10.0% on 10 classes" in said[0]
    assert "Pass a trained teacher: train it first (train_teacher(model=<it>)" in said[0]
    assert all(m.training for m in untrained.modules())  # measured in eval mode, its mode restored
    assert all(p.grad is None for p in untrained.parameters())


# 4. Seeds and models of one's own

def test_the_docs_say_how_to_reproduce_a_run_of_ones_own_model():
    for doc in (train_teacher.__doc__, train_student.__doc__):
        assert "seed_everything(seed)" in doc and "before building it" in doc
    nb = json.loads((ROOT / "notebooks" / "own_models.ipynb").read_text())
    text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "kd_lib.seed_everything(seed)" in text and "does not by itself reproduce" in text
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")  # committed unexecuted


# 5. Image folders: the layout said, and two folders in one out_dir

def _folder(root: Path, shade: int) -> Path:
    "A tree train/{a,b}/10 images, val/{a,b}/3 images, each image its own."
    rng = np.random.default_rng(shade)
    for split, n in (("train", 10), ("val", 3)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_two_image_folders_in_one_out_dir_are_refused_naming_the_fix(tmp_path, monkeypatch):
    "Runs of every image folder go to <out_dir>/folder/: the second folder's was refused with 'pass force=True'."
    class Stop(Exception): pass
    a, b = _folder(tmp_path / "a", 1), _folder(tmp_path / "b", 2)
    args = dict(dataset="folder", size=16, bs=8, epochs=1, lr=1e-3, pretrained=False, out_dir=tmp_path / "runs",
                progress=False)
    train_teacher(**args, data_path=str(a))
    with pytest.raises(RunExists) as e:
        train_teacher(**args, data_path=str(b))
    said = str(e.value)
    assert "Runs of two image folders (dataset='folder') in one out_dir share" in said
    assert "give each folder an out_dir of its own" in said
    assert "in a notebook or with papermill (which have no force parameter), remove the run folder" in said
    assert "-p out_dir" in said
    # a student of the second folder beside the first folder's teacher is told whose teacher it is
    monkeypatch.setattr(kd_lib.recipes.train, "_train_steps", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    with pytest.warns(UserWarning, match=r"was trained on the image folder .*a, this run is on .*b: runs of every "
                                         r"image folder \(dataset='folder'\) share"), pytest.raises(Stop):
        train_student(dataset="folder", data_path=str(b), size=16, bs=8, epochs=1, method="stagewise",
                      out_dir=tmp_path / "runs", progress=False)


def test_a_run_exists_message_names_what_a_notebook_user_does(tmp_path, tiny):
    args = tiny | dict(method="no_teacher", epochs=1, out_dir=tmp_path, progress=False)
    train_student(**args)
    with pytest.raises(RunExists, match=r"pass force=True .*in a notebook or with papermill \(which have no force "
                                        r"parameter\), remove the run folder .*resnet10-no_teacher-f0.25-s0; to keep "
                                        r"it, choose another out_dir \(papermill: -p out_dir <folder>\)"):
        train_student(**(args | dict(epochs=2)))


def test_the_docs_say_val_is_the_test_set_of_a_folder():
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`val/` (or `valid/`, `test/`) is the **test** set" in readme and "drawn from `train/` (20%" in readme
    nb = json.loads((ROOT / "notebooks" / "teacher.ipynb").read_text())
    first = " ".join("".join(nb["cells"][0]["source"]).split())
    assert "`val/` is the **test** set" in first and "drawn from `train/` (20%" in first
    page = " ".join((ROOT / "book" / "reproducing.md").read_text().split())
    assert "`val/` (or `valid/`, `test/`) is the **test** set" in page


# 6. What Stages.check returns

def test_stages_check_is_documented_as_the_module_dict_it_returns():
    made = Stages.torchvision_resnet().check(_tv(), _tv(), torch.zeros(1, 3, 16, 16))
    assert isinstance(made, nn.ModuleDict)
    doc = " ".join(Stages.check.__doc__.split())
    assert "`nn.ModuleDict` keyed by stage name" in doc and "`name in adapters`" in doc and "`adapters[name]`" in doc


# 7. torch's CPU build, and no warning of fastai's on import

def test_the_readme_installs_torchs_cpu_build_on_a_cpu_only_machine():
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in readme
    assert readme.index("download.pytorch.org/whl/cpu") < readme.index('pip install -e ".[test]"    #')


@pytest.mark.parametrize("code", ["import kd_lib", "import kd_lib.recipes.train"])
def test_importing_kd_lib_prints_no_torch_jit_warning(code):
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.jit.script" not in out.stderr
