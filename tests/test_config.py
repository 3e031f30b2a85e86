"""The run configurations: one place for every setting, checked when made, and the notebooks' parameters
cells, the records' params and the runner's profiles derived from them."""
import json
from pathlib import Path

import papermill as pm
import pytest

from kd_lib.recipes.config import GROUPS, StudentConfig, TeacherConfig, parameters_cell
from kd_lib.core.methods import METHODS
from kd_lib.runner import NOTEBOOKS

NOTEBOOK_ONLY = {"teacher": {"out_dir", "imports"}, "student": {"out_dir", "image_index", "imports"}}  # not settings


def _parameters_source(kind: str) -> str:
    nb = json.loads((NOTEBOOKS / f"{kind}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    return "".join(cell["source"])


@pytest.mark.parametrize("config", [TeacherConfig, StudentConfig], ids=lambda c: c.kind)
def test_notebook_parameters_are_the_configuration_fields(config):
    "Names, types, defaults and meanings: the cell is what `parameters_cell` writes, then the notebook's own."
    source = _parameters_source(config.kind)
    own = [line for line in source.splitlines() if line.split(":")[0].split(" =")[0] in NOTEBOOK_ONLY[config.kind]]
    assert source == parameters_cell(config, own), "regenerate the cell with kd_lib.recipes.config.parameters_cell"
    names = set(pm.inspect_notebook(str(NOTEBOOKS / f"{config.kind}.ipynb")))
    assert names == set(config.names()) | NOTEBOOK_ONLY[config.kind]


def test_every_field_has_a_group_and_a_meaning():
    for config in (TeacherConfig, StudentConfig):
        for o in config.options():
            assert o.group in GROUPS and len(o.help) > 10, o
    assert {o.name for o in StudentConfig.options("speed")} == {"num_workers", "truncate", "cache", "cache_dtype",
                                                                "cache_bytes", "amp", "channels_last", "resident"}


def test_values_are_normalised_and_params_hold_every_field():
    c = StudentConfig(fraction=1, lr=1, data_path=Path("/x"), teacher_path=Path("t"))
    assert c.fraction == 1.0 and isinstance(c.lr, float) and c.data_path == "/x" and c.teacher_path == "t"
    p = c.params()
    assert p["kind"] == "student" and set(p) == {"kind", *StudentConfig.names()}
    assert json.loads(json.dumps(p)) == p  # a record holds it as is
    assert c.run_name == "resnet10-stagewise-f1-s0" and c.replace(seed=3).run_name == "resnet10-stagewise-f1-s3"


@pytest.mark.parametrize("kw,match", [
    (dict(augment="false"), r"augment='false' \(str\).*true or false"),
    (dict(epochs=1.5), "epochs=1.5"),
    (dict(bs=True), "bs=True"),
    (dict(epochs=0), "at least 1 epoch"),
    (dict(lr=-1e-3), "must be positive"),
    (dict(fraction=0), r"in \(0, 1\]"),
    (dict(size=0), "8 to 2048 pixels"),
    (dict(student="resnet 11"), "resnet10, resnet14"),
    (dict(method="stagewize"), ", ".join(METHODS)),
    (dict(dataset="folder"), "needs data_path"),
    (dict(selection="train"), "valid, test"),
    (dict(amp="fp8"), "bf16, fp16"),
])
def test_bad_settings_are_refused_when_made(kw, match):
    with pytest.raises((TypeError, ValueError), match=match): StudentConfig(**kw)


def test_from_mapping_takes_the_fields_and_can_refuse_the_rest():
    ns = dict(student="resnet14", epochs=3, image_index=2, out_dir="runs")
    assert StudentConfig.from_mapping(ns) == StudentConfig(student="resnet14", epochs=3)
    with pytest.raises(ValueError, match="image_index"): StudentConfig.from_mapping(ns, strict=True)
    assert TeacherConfig.from_mapping(ns).epochs == 3


def test_gpu_options_are_settings_that_only_the_run_checks_against_the_device():
    c = StudentConfig(amp="bf16", channels_last=True)  # made anywhere, e.g. from a profile on a laptop
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"): c.check_device()


def test_a_setting_passed_by_position_is_a_clear_error(tmp_path):
    from kd_lib.recipes.train import train_student
    with pytest.raises(TypeError, match="pass the settings as keywords"): train_student("resnet10", out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_setting_added_after_a_run_takes_its_default_when_compared():
    "Records made before a setting existed still match a configuration that keeps its default, and only that."
    c = StudentConfig(dataset="digits", size=16)
    old = {k: v for k, v in c.params().items() if k != "finetune_epochs"}
    assert c.conflicts(old) == {}
    assert c.replace(finetune_epochs=7).conflicts(old) == {"finetune_epochs": (3, 7)}
