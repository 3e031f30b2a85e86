"""The fits behind `converged`: one row per fit of the complete records (judged again by the rule of now), a table per
step, their curves, and the rule's calibration."""
import json

import numpy as np
import pytest

from conftest import complete
from kd_lib.evidence.fits import calibration, fit_curves, fit_table, step_convergence
from kd_lib.recipes.fitting import CONVERGENCE_ERROR, convergence


def fit(name, values, cap, stopped=False, target="labels", monitor="accuracy"):
    "A fit as a record holds it, with a `converged` flag of an older rule that `fit_table` must not trust."
    return dict(name=name, target=target, monitor=monitor, epochs=cap, epochs_run=len(values), stopped_early=stopped,
                converged=True, convergence=dict(window=5, projected=0.0, noise=1.0),
                history=[{"epoch": i, monitor: v} for i, v in enumerate(values)])


FALLING = list(np.geomspace(1.0, 0.1, 10))  # a feature MSE still falling smoothly: far beyond its own scatter
HEADS = {0: [0.5, 0.6, 0.7, 0.5, 0.7, 0.5], 1: [0.5, 0.55, 0.6, 0.65, 0.7, 0.75]}  # flat and noisy; a straight rise


def write(folder, name, kind, stages, status="complete", **params):
    (folder / name).mkdir(parents=True)
    (folder / name / "record.json").write_text(json.dumps(complete(kind, dict(dataset="d", **params), stages=stages,
                                                                   status=status)))


@pytest.fixture
def records(tmp_path):
    for seed in (0, 1):
        write(tmp_path, f"sw{seed}", "student", student="resnet10", method="stagewise", fraction=0.5, seed=seed,
              stages=[fit("layer1", FALLING, 10, target="layer1", monitor="valid_loss"),
                      fit("head", HEADS[seed], 10, stopped=True)])
    write(tmp_path, "nt0", "student", student="resnet10", method="no_teacher", fraction=0.5, seed=0,
          stages=[fit("all", [0.4, 0.5, 0.55, 0.6], 4)])  # too few epochs to judge
    write(tmp_path, "teacher", "teacher", seed=0, stages=[fit("teacher", [0.5] * 8, 8)])
    write(tmp_path, "unfinished", "student", status=None, student="resnet10", method="no_teacher", fraction=0.5,
          seed=1, stages=[fit("all", [0.1] * 5, 5)])
    return tmp_path


def test_one_row_per_fit_of_the_complete_records(records):
    f = fit_table(records)
    assert len(f) == 2 * 2 + 1 + 1  # the unfinished run is left out
    assert set(f["method"]) == {"stagewise", "no_teacher", "teacher"} and f["fraction"].tolist().count(1.0) == 1
    sw = f[f["method"] == "stagewise"].set_index(["seed", "step"])
    assert sw.loc[(0, "layer1"), "ran_to_cap"] and not sw.loc[(0, "head"), "ran_to_cap"]  # head stopped early
    assert sw.loc[(1, "layer1"), "target"] == "layer1" and sw.loc[(1, "head"), "target"] == "labels"
    assert sw.loc[(1, "layer1"), "values"][-1] == pytest.approx(0.1)
    assert f.loc[f["method"] == "no_teacher", "ran_to_cap"].item()  # all 4 epochs of its cap
    assert sw.loc[(0, "head"), "converged"] and not sw.loc[(1, "head"), "converged"]  # judged again, not the flag


def test_the_step_table_counts_each_step_in_the_order_runs_took_them(records):
    t = step_convergence(fit_table(records))
    sw = t[t["method"] == "stagewise"]
    assert sw["step"].tolist() == ["layer1", "head"]  # the runs' order, not the alphabet
    layer1, head = sw.iloc[0], sw.iloc[1]
    assert (layer1["fits"], layer1["converged"], layer1["at_cap"], layer1["stopped"]) == (2, 0, 2, 0)
    assert (head["fits"], head["converged"], head["at_cap"], head["stopped"]) == (2, 1, 0, 2)
    c = convergence(FALLING, lower=True)
    assert c["converged"] is False and layer1["gain/noise"] == pytest.approx(c["projected"] / c["noise"])
    # seed 0's head: slope -0.02 over its last 5 epochs, scatter sqrt(0.036 / 3) about it; seed 1's straight rise has
    # no scatter (its ratio is not a number), so the median is seed 0's
    assert head["gain/noise"] == pytest.approx(-0.1 / np.sqrt(0.036 / 3))
    nt = t[t["method"] == "no_teacher"].iloc[0]
    assert (nt["judged"], nt["converged"]) == (0, 0)  # a fit that could not be judged is not counted converged
    assert t.loc[t["method"] == "teacher", "fits"].item() == 1


def test_the_curves_draw_a_panel_per_step_and_a_line_per_seed(records):
    fig = fit_curves(fit_table(records), "d", "stagewise", 0.5)
    layer1, head = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert "0 of 2 converged, 2 at the cap" in layer1.get_title() and "1 of 2" in head.get_title()
    curves = [ln for ln in layer1.lines if len(ln.get_xdata()) > 2]
    assert len(curves) == 2 and all(ln.get_linestyle() == "--" for ln in curves)  # neither converged
    assert sorted(ln.get_linestyle() for ln in head.lines if len(ln.get_xdata()) > 2) == ["-", "--"]
    assert layer1.get_yscale() == "log" and head.get_yscale() == "linear"  # an MSE spans decades
    assert max(ln.get_ydata().max() for ln in head.lines if len(ln.get_xdata()) > 2) == pytest.approx(75)  # in %
    with pytest.raises(ValueError, match="No fits of resnet18 by stagewise"):
        fit_curves(fit_table(records), "d", "stagewise", 0.5, student="resnet18")


def test_the_rule_calls_flat_curves_converged_at_its_stated_rate_whatever_their_scatter():
    """The calibration the issue asks for: flat curves (white noise about a level) are called converged at least 95 %
    of the time per fit, by design 1 - CONVERGENCE_ERROR = 97.5 %, at any scatter (the test uses the curve's own);
    curves still rising by two noise units a window are caught only sometimes (the power, which the book states)."""
    t = calibration(epochs=(10, 60), n=3000).set_index("epochs")
    flat, rising = t["flat fits called converged"], t["fits rising 2 noise units a window called unconverged"]
    assert (flat >= 0.95).all() and np.allclose(flat, 1 - CONVERGENCE_ERROR, atol=0.015)
    assert (rising > 1 - flat).all() and (rising < 0.5).all()  # more than the error rate: some power, not much
    rng = np.random.default_rng(1)
    for scale in (1e-3, 1e3):  # the noise's size does not matter: the rule measures the curve's own
        calls = [convergence(list(scale * rng.standard_normal(20)), lower=False)["converged"] for _ in range(2000)]
        assert np.mean(calls) == pytest.approx(1 - CONVERGENCE_ERROR, abs=0.015)
