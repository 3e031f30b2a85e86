"""The method registry: a method is one definition, which the recipes, the runner and the figures follow."""
import pytest
import torch

from kd_lib.recipes.config import StudentConfig
from kd_lib.evidence.figures import figure4
from kd_lib.recipes.fitting import seed_everything
from kd_lib.core.methods import METHODS, Method, get_method, register
from kd_lib.core.models import resnet
from kd_lib.evidence.collect import collect
from kd_lib.infra.files import read_json
from kd_lib.core.steps import Labels
from kd_lib.evidence.style import STYLES, Style, method_order
from kd_lib.runner.estimate import COSTS
from kd_lib.runner import expand, load_profile
from kd_lib.recipes.train import load_student, train_student


@pytest.fixture()
def head_only():
    "A toy method, registered for one test: only the head trains, on the labels, with the body left random."
    m = register(Method("head_only", (Labels("head", ("head",)),), needs_teacher=False, cacheable=True,
                        description="the head alone"))
    STYLES["head_only"] = Style("tab:pink", "*")  # how the figures draw it: presentation, beside the figures
    yield m
    del METHODS["head_only"], STYLES["head_only"]


def test_the_papers_methods_are_registered_in_display_order():
    assert list(METHODS)[:4] == ["no_teacher", "no_teacher_budget", "simultaneous", "stagewise"]
    assert METHODS["no_teacher_budget"].budget_of == "stagewise" and len(METHODS["stagewise"].steps_for()) == 6
    assert [s.name for s in METHODS["stagewise"].steps_for()] == ["stem", "layer1", "layer2", "layer3", "layer4",
                                                                  "head"]
    assert not METHODS["no_teacher"].needs_teacher and METHODS["stagewise"].needs_teacher
    assert {m for m in METHODS if not METHODS[m].cacheable} == {"simultaneous", "hinton"}
    assert not METHODS["no_teacher_budget"].needs_teacher
    with pytest.raises(ValueError, match="choose one of no_teacher"): get_method("stagewize")


def test_each_registered_method_has_its_style_and_cost_in_the_registrys_order():
    """Presentation (the figures' style) and cost (the runner's estimate) live beside their users, out of `Method`:
    the three lists name the same methods, in the same order."""
    assert list(STYLES) == list(METHODS) == list(COSTS)
    assert method_order(["stagewise", "zz_mine", "no_teacher", "aa_mine"]) == ["no_teacher", "stagewise", "aa_mine",
                                                                               "zz_mine"]


def test_a_new_method_is_one_definition_and_runs_end_to_end(head_only, tmp_path, tiny):
    r = train_student(**(tiny | dict(method="head_only", epochs=2, out_dir=tmp_path, progress=False)))
    assert [s["name"] for s in r["stages"]] == ["head"] and r["teacher"]["path"] is None
    assert StudentConfig(method="head_only", cache=True, augment=False).cache is True  # the configuration knows it
    seed_everything(0)  # the run's initialisation: only the head moved from it
    init = resnet("resnet10").state_dict()
    trained = load_student(tmp_path / "digits" / "resnet10-head_only-f0.25-s0").state_dict()
    assert {k.split(".")[0] for k, v in trained.items() if not torch.equal(v, init[k])} == {"head"}
    fig = figure4(collect(tmp_path))  # the figures draw it (less data: Figure 4), in its colour
    assert any(line.get_color() == "tab:pink" for ax in fig.axes for line in ax.get_lines())
    prof = dict(load_profile("smoke"), datasets=[dict(dataset="digits", students=[dict(method="head_only")])])
    jobs = expand(prof, tmp_path / "runs")
    student = next(j for j in jobs if j.kind == "student")
    assert student.config.method == "head_only" and not student.needs_teacher


def test_a_method_registered_in_a_module_reaches_the_runners_kernels(tmp_path, monkeypatch, write_profile):
    "The docstring once said so and it did not: each papermill kernel starts afresh, without the user's register()."
    import io
    from kd_lib import runner as rp
    (tmp_path / "my_methods.py").write_text(
        "from kd_lib.core.methods import Method, register\nfrom kd_lib.core.steps import Labels\n"
        "register(Method('head_only', (Labels('head', ('head',)),), needs_teacher=False))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the kernels find it as the repository's root would
    path = write_profile([dict(student="resnet10", method="no_teacher", epochs=1)])
    path.write_text(path.read_text().replace("method: no_teacher", "method: head_only") + "imports: [my_methods]\n")
    try:
        jobs = rp.plan(rp.expand(rp.load_profile(path)))  # loading it imports my_methods: head_only is known
        assert jobs[1].params["imports"] == ["my_methods"]
        rp.run_jobs(jobs[1:], stream=io.StringIO())  # the student alone: it needs no teacher
        record = read_json(jobs[1].run / "record.json")
        assert record["params"]["method"] == "head_only" and [s["name"] for s in record["stages"]] == ["head"]
    finally:
        METHODS.pop("head_only", None)
