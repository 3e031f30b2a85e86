"""The notebooks: one documented `parameters` cell each and no committed outputs; the student notebook
runs end to end through papermill on tiny parameters and writes its record; the figures notebook draws
from the records it finds, however few."""
import json
import re
from pathlib import Path

import nbformat
import numpy as np
import papermill as pm
import pytest
import torch
from PIL import Image

from kd_lib.core.models import teacher
from kd_lib.runner import NOTEBOOKS, run_notebook

NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_notebooks_are_there():
    assert {p.stem for p in NOTEBOOK_FILES} >= {"table1", "method", "teacher", "student", "figures"}


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.name)
def test_one_documented_parameters_cell_and_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged parameters"
    for line in tagged[0].source.splitlines():
        if re.match(r"^\w+\s*(:[^=]+)?=", line):
            assert re.search(r"\S\s+#\s*\S", line), f"{path.name}: parameter without a comment: {line!r}"
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{path.name}: committed outputs"
    params = pm.inspect_notebook(str(path))
    assert params and all(p["help"] for p in params.values()), f"{path.name}: papermill sees undocumented parameters"
    names = [re.match(r"^(\w+)", line).group(1) for line in tagged[0].source.splitlines() if re.match(r"^\w+\s*(:[^=]+)?=", line)]
    assert names == list(params), f"{path.name}: papermill cannot read {set(names) - set(params)}"


def test_the_figures_margin_defaults_to_the_claims_own():
    "One margin: the figures notebook's default is kd_lib.evidence.claims.MARGIN, and a profile's `margin` reaches it."
    from kd_lib.evidence.claims import MARGIN
    assert pm.inspect_notebook(str(NOTEBOOKS / "figures.ipynb"))["margin"]["default"] == repr(MARGIN)


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    "student.ipynb executed by papermill on tiny parameters, with a random teacher saved in a tmp folder."
    tmp = tmp_path_factory.mktemp("nb")
    mp = pytest.MonkeyPatch()
    mp.setenv("KD_DATA", str(tmp / "data"))
    tpath = tmp / "teacher.pth"
    torch.manual_seed(0)
    torch.save(teacher(10, pretrained=False).state_dict(), tpath)
    params = dict(dataset="digits", size=16, bs=16, student="resnet10", method="stagewise", epochs=1, fraction=0.1,
                  lr=1e-3, augment=False, teacher_path=str(tpath), out_dir=str(tmp / "runs"))
    out = run_notebook("student", tmp / "student.ipynb", threads=1, **params)
    yield tmp, out
    mp.undo()


def test_student_notebook_writes_its_record_and_figures(student_run):
    tmp, out = student_run
    record = json.loads((tmp / "runs" / "digits" / "resnet10-stagewise-f0.1-s0" / "record.json").read_text())
    assert record["status"] == "complete" and record["params"]["epochs"] == 1
    assert [s["name"] for s in record["stages"]] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert record["data"]["path"] == "digits" and (tmp / "data" / "digits" / "train").is_dir()  # under KD_DATA
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the loss curves and the feature maps
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "teacher_path" in injected[0].source
    _reads_as_a_book(outputs)


def test_figures_notebook_draws_from_a_single_run(student_run):
    tmp, _ = student_run
    out = run_notebook("figures", tmp / "figures.ipynb", threads=1, out_dir=str(tmp / "runs"), profile="test")
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    glued = {o["metadata"]["scrapbook"]["name"] for o in outputs if "scrapbook" in o.get("metadata", {})}
    assert {"figure3", "figure4", "gap_full", "gap_small", "verdict_1", "profile", "hardware", "claims_table",
            "step_table", "stagewise_curves", "calibration_table", "flat_fit", "rising_caught", "saturation_table",
            "saturated_share", "claims_summary", "claims_figure", "budget_rule", "n_twins", "baseline_full"} <= glued
    _reads_as_a_book(outputs)


def _reads_as_a_book(outputs) -> None:
    "No table of the book shows a 6-decimal number, NaN, True or False (its tables are `kd_lib.evidence.tables.book_table`s)."
    import re
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", html, re.S)
    assert cells, "no table was shown"
    assert not [c for c in cells if c.strip() in ("NaN", "nan", "True", "False", "None")]
    assert not [c for c in cells if re.fullmatch(r"\s*[-+]?\d+\.\d{5,}\s*", c)]


def test_a_notebook_logs_into_a_folder_not_made_yet(tmp_path):
    "The book's first page once started before any run had made runs/<profile>/notebooks/, and failed to log."
    log = tmp_path / "runs" / "notebooks" / "table1.log"
    out = run_notebook("table1", tmp_path / "table1.ipynb", threads=1, log=log, size=32, n_classes=10)
    assert out.exists() and log.exists()


def test_figures_and_claims_from_the_papers_numbers_and_from_nothing():
    import pandas as pd
    from kd_lib.evidence import claims, figures, results
    from kd_lib.evidence.paper import paper_results
    paper = paper_results()
    as_runs = results.paper_as_records(paper)
    g = results.gaps(as_runs)
    assert set(g["dataset"]) == {"imagenette", "imagewoof", "cifar10"} and (g["wins"] == 5).all()
    c = claims.claims(as_runs, paper)  # no long twins: the budget column is empty, and gates nothing
    assert len(c) == 21 and (c["budget"] == "").all() and c["at_2x"].isna().all()
    for claim in ("verdict_1", "verdict_1_less"):  # at full data and at the smallest fraction each dataset ran
        assert claims.verdicts(c)[claim] == "supported on cifar10; supported on imagenette; supported on imagewoof"
    assert claims.verdicts(c)["verdict_4"] == ("undetermined on cifar10; supported on imagenette; "
                                               "supported on imagewoof")  # its CIFAR10 interval spans 2 points
    assert results.headline(as_runs) == dict(gap_full="+9.3", gap_small="+18.7", small_fraction="25% of the data",
                                             wins_full="15 of 15", wins_small="15 of 15", sim_gap_full="+0.5",
                                             baseline_full="no_teacher", baseline_small="no_teacher",
                                             teacher_accuracy="92.7")
    mine = as_runs.assign(method=as_runs["method"].replace({"simultaneous": "mine"}))  # a method not registered
    assert results.summary(mine)["method"].drop_duplicates().tolist() == ["no_teacher", "stagewise", "mine"]
    for fig in (figures.figure3(as_runs, paper), figures.figure4(as_runs, paper), figures.paper_figure(paper, True),
                figures.figure3(mine)):
        assert fig._repr_png_()[:4] == b"\x89PNG"
    empty = pd.DataFrame()
    assert results.summary(empty).empty and results.gaps(empty).empty and claims.claims(empty, paper).empty
    assert results.provenance(empty)["runs"] == 0 and results.provenance_text(empty)["datasets"] == "none"
    assert set(results.headline(empty).values()) == {"n/a"}
    assert set(claims.verdicts(claims.claims(empty, paper)).values()) == {"not tested by these runs"}
    assert figures.figure3(empty, paper)._repr_png_()[:4] == b"\x89PNG"
    assert figures.stage_diagram("resnet14", 32)._repr_png_()[:4] == b"\x89PNG"


def colour_tree(root: Path) -> Path:
    "A data folder unlike the digits: RGB JPEGs of mixed sizes, 3 classes told apart by colour, a `test/` split."
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for k, c in enumerate(("red", "green", "blue")):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (rng.integers(20, 40), rng.integers(20, 40), 3), dtype=np.uint8)
                img[..., k] += 150
                Image.fromarray(img).save(root / split / c / f"{i}.jpg")
    return root


def test_teacher_then_student_on_a_folder_never_seen(tmp_path, monkeypatch):
    "What a user does with their own data: teacher.ipynb, then student.ipynb finding that teacher in out_dir."
    monkeypatch.setenv("KD_DATA", str(tmp_path / "data"))
    tree, runs = colour_tree(tmp_path / "colours"), tmp_path / "runs"
    common = dict(dataset="folder", data_path=str(tree), size=24, bs=8, lr=1e-3, augment=True, out_dir=str(runs))
    run_notebook("teacher", tmp_path / "teacher.ipynb", threads=1, epochs=2, pretrained=False, **common)
    out = run_notebook("student", tmp_path / "student.ipynb", threads=1, student="resnet10", method="stagewise",
                       epochs=1, cache="valid", **common)
    record = json.loads((runs / "folder" / "resnet10-stagewise-f1-s0" / "record.json").read_text())
    assert record["status"] == "complete" and record["data"]["vocab"] == ["blue", "green", "red"]
    assert record["data"]["sizes"]["test"] == 12 and record["teacher"]["path"] == "folder/teacher"
    nb = nbformat.read(out, as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
