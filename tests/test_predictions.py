"""What the models of a record set called each test image: per-class accuracies and the grid of test images, from
the test predictions the records keep, checked against the split they claim."""
import numpy as np
import pytest

from kd_lib.data.loaders import DatasetError
from kd_lib.evidence.predictions import answers, class_accuracy, predictions_grid
from kd_lib.evidence.collect import collect
from kd_lib.recipes.train import train_student, train_teacher
from test_data import make_tree

SET = dict(dataset="folder", size=16, bs=4, lr=1e-3)


@pytest.fixture(scope="module")
def record_set(tmp_path_factory):
    "A teacher and two students of one epoch on a small image tree, and the tree."
    tmp = tmp_path_factory.mktemp("predictions")
    tree = make_tree(tmp / "tree", train={"a": 12, "b": 12, "c": 12}, test={"a": 4, "b": 3, "c": 5})
    out = tmp / "runs"
    train_teacher(**SET, data_path=tree, epochs=2, pretrained=False, out_dir=out, progress=False)
    for method in ("no_teacher", "stagewise"):
        train_student(**SET, data_path=tree, student="resnet10", method=method, epochs=1, out_dir=out,
                      progress=False)
    return collect(out), tree


def test_per_class_accuracy_adds_up_to_each_models_test_accuracy(record_set):
    records, _ = record_set
    ans = answers(records)
    assert ans["model"].tolist() == ["teacher", "resnet10 no_teacher at full data", "resnet10 stagewise at full data"]
    table = class_accuracy(records)
    assert table["class"].tolist() == ["a", "b", "c"] and list(table.columns[1:]) == ans["model"].tolist()
    counts = np.array([4, 3, 5])  # the test images per class
    for model, record in zip(ans["model"], ans["record"]):
        overall = (table[model].to_numpy() * counts).sum() / counts.sum()
        assert overall == pytest.approx(records.set_index("record").loc[record, "test_accuracy"], abs=1e-3)


def test_the_grid_shows_the_test_images_of_the_split_the_records_name(record_set, tmp_path):
    records, tree = record_set
    assert predictions_grid(records, tree, per_class=2)._repr_png_()[:4] == b"\x89PNG"
    other = make_tree(tmp_path / "other", train={"a": 12, "b": 12, "c": 12}, test={"a": 4, "b": 4, "c": 5})
    with pytest.raises(DatasetError, match="test hash"): predictions_grid(records, other)
    with pytest.raises(ValueError, match="seed 7"): predictions_grid(records, tree, seed=7)
