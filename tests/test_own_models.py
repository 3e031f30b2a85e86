"""Models of one's own, tried from the docs (issue 29, items 11 to 14): their mistakes caught before any training,
in one dry forward pass that names the stage and the side; a teacher at chance warned of; a teacher of one's own
trained; run folders found by the names the docs give."""
import re
import shutil

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock

import kd_lib.recipes.train
from conftest import complete
from kd_lib.data.loaders import get_data
from kd_lib.data.folders import read_tree
from kd_lib.core.models import resnet
from kd_lib.recipes.records import RECORD, complete_record
from kd_lib.infra.files import write_json
from kd_lib.runner import ROOT
from kd_lib.core.stages import Stage, Stages
from kd_lib.recipes.train import load_student, load_teacher, train_student, train_teacher

TV = Stages.torchvision_resnet()
X = torch.zeros(1, 3, 16, 16)


def _tv(n_classes=10) -> ResNet:
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=n_classes)


def _with(head=TV.head, **paths) -> Stages:
    "torchvision's stages with the `head` and some stages' `paths` changed: stage=(student paths[, teacher paths])."
    return Stages(tuple(Stage(s.name, *paths.get(s.name, (s.student,))) for s in TV.stages), head, flatten=True)


@pytest.mark.parametrize("stages, student, error", [
    (_with(head=("avgpool", "fcc")), _tv(), r"Stage 'head' of the student: 'fcc' names no module of the ResNet"),
    (TV, _tv(5), "The student gives 5 outputs an image and the data has 10 classes"),
    (_with(layer2=(("layer3",),), layer3=(("layer2",),)), _tv(),
     r"Stage 'layer3' of the student: its module 'layer2' runs before 'layer3' \(stage 'layer2'\)"),
    (_with(layer4=(("layer4",), ("layer5",))), _tv(), r"Stage 'layer4' of the teacher: 'layer5' names no module")])
def test_stages_are_checked_in_one_dry_pass_naming_stage_and_side(stages, student, error):
    "A head typo and too few classes once failed only after every feature stage had trained."
    student.train()
    with pytest.raises(ValueError, match=error):
        stages.check(student, _tv(), X, n_classes=10)
    assert all(m.training for m in student.modules())  # its mode restored


def test_empty_teacher_paths_are_refused_not_taken_for_the_students():
    "teacher=() once silently became the student's paths."
    with pytest.raises(ValueError, match=r"Stage 'layer1': teacher paths \(\): give the teacher's module paths"):
        Stage("layer1", ("layer1",), ())
    with pytest.raises(ValueError, match="The head: student paths"): Stages(TV.stages, ())


def test_an_own_models_mistake_stops_the_run_before_any_training_and_leaves_no_folder(tmp_path, tiny, monkeypatch):
    def trained(*args, **kwargs): raise AssertionError("a step was trained")
    monkeypatch.setattr(kd_lib.recipes.train, "fit", trained)
    with pytest.raises(ValueError, match="Stage 'head' of the student: 'fcc'"), pytest.warns(UserWarning):
        train_student(**(tiny | dict(epochs=1, out_dir=tmp_path, progress=False)), student=_tv(), teacher=_tv(),
                      stages=_with(head=("avgpool", "fcc")), method="stagewise")
    assert not list(tmp_path.iterdir())  # a refused run leaves no run folder


def _teacher_folder(tmp_path, teacher_path, **record) -> str:
    "A teacher folder: the session's random ResNet34 and a record of the split it trained on, and `record`."
    folder = tmp_path / "teacher"
    folder.mkdir()
    shutil.copy(teacher_path, folder / "teacher.pth")
    write_json(folder / RECORD, dict(kind="teacher", status="complete", params={},
                                     data=get_data("digits", size=16, bs=32).split_info, **record))
    return str(folder)


def test_a_teacher_at_chance_is_warned_of(tmp_path, tiny, teacher_path, monkeypatch):
    "A teacher of 10.6% on 10 classes once distilled without a word."
    class Stop(Exception): pass
    def stop(*args, **kwargs): raise Stop
    monkeypatch.setattr(kd_lib.recipes.train, "_train_steps", stop)
    args = tiny | dict(method="stagewise", epochs=1, out_dir=tmp_path / "runs", progress=False)
    with pytest.warns(UserWarning, match=r"reached 10.6% on its valid split, not clearly above chance \(10.0% on "
                                         r"10 classes; a teacher to distil has at least 1.5 x chance"), \
            pytest.raises(Stop):
        train_student(**args, teacher_path=_teacher_folder(tmp_path, teacher_path, valid_accuracy=10.6))


def test_a_refused_run_leaves_no_run_folder(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="No teacher at"):
        train_student(**(tiny | dict(method="stagewise", epochs=1, out_dir=tmp_path, progress=False)),
                      teacher_path=str(tmp_path / "none"))
    assert not list(tmp_path.iterdir())


class Tiny(nn.Module):
    def __init__(self, n_classes=10):
        super().__init__()
        self.features, self.fc = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)), \
            nn.Linear(8, n_classes)

    def forward(self, x): return self.fc(self.features(x).flatten(1))


def test_a_teacher_of_ones_own_trains_is_recorded_and_loads_with_its_model(tmp_path):
    "train_teacher trained only the paper's ResNet34."
    args = dict(dataset="digits", size=16, bs=64, epochs=1, lr=1e-3, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="The teacher gives 5 outputs an image and the data has 10 classes"):
        train_teacher(**args, model=Tiny(5))
    assert not list(tmp_path.iterdir())
    torch.manual_seed(0)
    record = train_teacher(**args, model=Tiny(), name="tiny")
    assert record["params"]["model"] == "tiny" and record["model"]["cls"].endswith("Tiny")
    assert record["model"]["params"] == sum(p.numel() for p in Tiny().parameters())
    with pytest.raises(ValueError, match=r"a teacher of your own \('tiny'\).*load_teacher\(path, n_classes, model"):
        load_teacher(tmp_path / "digits" / "teacher", 10)
    loaded = load_teacher(tmp_path / "digits" / "teacher", 10, model=Tiny())
    assert torch.equal(loaded.fc.weight, torch.load(tmp_path / "digits" / "teacher" / "teacher.pth")["fc.weight"])
    with pytest.raises(kd_lib.recipes.train.RunExists, match="model"):
        train_teacher(**args)  # the paper's teacher is another run than this one


def _finished_student(folder):
    "A finished resnet10 run as train_student leaves one (its record and the weights of its last step)."
    (folder / "stages").mkdir(parents=True)
    write_json(folder / RECORD, complete("student", dict(student="resnet10"), stages=[dict(name="all")],
                                         data=dict(vocab=[str(i) for i in range(10)], sizes=dict(train=8, test=2))))
    torch.save(resnet("resnet10", 10).state_dict(), folder / "stages" / "all.pth")


def test_a_run_folder_is_found_by_the_name_the_docs_give_and_says_its_name(tmp_path):
    "The docs said f<fraction>, the folders are -f1-: load_student('...-f1.0-s0') failed."
    _finished_student(tmp_path / "digits" / "resnet10-no_teacher-f1-s0")
    assert load_student(tmp_path / "digits" / "resnet10-no_teacher-f1.0-s0") is not None
    with pytest.raises(FileNotFoundError, match=r"digits holds resnet10-no_teacher-f1-s0\. A student's run folder is "
                                                r"named <student>-<method>-f<fraction:g>-s<seed>"):
        load_student(tmp_path / "digits" / "resnet10-no_teacher-f0.5-s0")
    assert complete_record(tmp_path / "digits" / "resnet10-no_teacher-f1-s0")["run"] == \
        "digits/resnet10-no_teacher-f1-s0"


def test_the_docs_name_run_folders_as_they_are():
    for doc in (ROOT / "book" / "reproducing.md", ROOT / "notebooks" / "student.ipynb"):
        text = doc.read_text()
        assert "-f<fraction:g>-" in text and "-f<fraction>-" not in text, doc
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        assert (ROOT / link).exists(), link
    assert "(notebooks/own_models.ipynb)" in readme  # the page on one's own models, readable before make book


def test_a_folder_dataset_may_call_its_test_folder_valid(tmp_path):
    for split in ("train", "valid"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):  # each image its own (a copy across splits would be left out of training)
                Image.new("RGB", (8, 8), (i * 90, ord(c), 9 * (split == "train"))).save(tmp_path / split / c / f"{i}.png")
    classes, train, test, test_name, _, _ = read_tree(tmp_path, skip_bad=False)
    assert classes == ["a", "b"] and test_name == "valid" and len(train) == len(test) == 4
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="has val/ and valid/: keep only the test set's folder"):
        read_tree(tmp_path, skip_bad=False)
