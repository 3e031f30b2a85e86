"""The fits behind `converged`: one row per fit of the complete records, a table per step, and their curves."""
import json

import numpy as np
import pytest

from scipy import stats

from kd_lib.fits import fit_curves, fit_table, flat_fit_calls, step_convergence


def fit(name, values, cap, converged, stopped=False, target="labels", monitor="accuracy", projected=0.5, noise=1.0):
    return dict(name=name, target=target, monitor=monitor, epochs=cap, epochs_run=len(values), stopped_early=stopped,
                converged=converged, convergence=dict(window=5, projected=projected, noise=noise),
                history=[{"epoch": i, monitor: v} for i, v in enumerate(values)])


def write(folder, name, kind, stages, status="complete", **params):
    (folder / name).mkdir(parents=True)
    (folder / name / "record.json").write_text(json.dumps(dict(kind=kind, params=dict(dataset="d", **params),
                                                               stages=stages, status=status)))


@pytest.fixture
def records(tmp_path):
    falling = list(np.geomspace(1.0, 0.1, 10))
    for seed in (0, 1):
        write(tmp_path, f"sw{seed}", "student", student="resnet10", method="stagewise", fraction=0.5, seed=seed,
              stages=[fit("layer1", falling, 10, False, target="layer1", monitor="valid_loss", projected=3.0),
                      fit("head", [0.5, 0.6, 0.7, 0.5, 0.7, 0.5], 10, seed == 0, stopped=True, projected=-0.5,
                          noise=0.1)])
    write(tmp_path, "nt0", "student", student="resnet10", method="no_teacher", fraction=0.5, seed=0,
          stages=[fit("all", [0.4, 0.5, 0.55, 0.6, 0.6], 5, None)])
    write(tmp_path, "teacher", "teacher", seed=0, stages=[fit("teacher", [0.5] * 8, 8, True)])
    write(tmp_path, "unfinished", "student", status=None, student="resnet10", method="no_teacher", fraction=0.5,
          seed=1, stages=[fit("all", [0.1] * 5, 5, True)])
    return tmp_path


def test_one_row_per_fit_of_the_complete_records(records):
    f = fit_table(records)
    assert len(f) == 2 * 2 + 1 + 1  # the unfinished run is left out
    assert set(f["method"]) == {"stagewise", "no_teacher", "teacher"} and f["fraction"].tolist().count(1.0) == 1
    sw = f[f["method"] == "stagewise"].set_index(["seed", "step"])
    assert sw.loc[(0, "layer1"), "ran_to_cap"] and not sw.loc[(0, "head"), "ran_to_cap"]  # head stopped early
    assert sw.loc[(1, "layer1"), "target"] == "layer1" and sw.loc[(1, "head"), "target"] == "labels"
    assert sw.loc[(1, "layer1"), "values"][-1] == pytest.approx(0.1)
    assert f.loc[f["method"] == "no_teacher", "ran_to_cap"].item()  # all 5 epochs of its cap


def test_the_step_table_counts_each_step_in_the_order_runs_took_them(records):
    t = step_convergence(fit_table(records))
    sw = t[t["method"] == "stagewise"]
    assert sw["step"].tolist() == ["layer1", "head"]  # the runs' order, not the alphabet
    layer1, head = sw.iloc[0], sw.iloc[1]
    assert (layer1["fits"], layer1["converged"], layer1["at_cap"], layer1["stopped"]) == (2, 0, 2, 0)
    assert (head["fits"], head["converged"], head["at_cap"], head["stopped"]) == (2, 1, 0, 2)
    assert layer1["gain/noise"] == pytest.approx(3.0) and head["gain/noise"] == pytest.approx(-5.0)
    # the head's last 5 values scatter about their line by sqrt(0.036 / 3): 1.1 times its noise of 0.1
    assert head["scatter/noise"] == pytest.approx(np.sqrt(0.036 / 3) / 0.1)
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
    assert max(ln.get_ydata().max() for ln in head.lines if len(ln.get_xdata()) > 2) == pytest.approx(70)  # in %
    with pytest.raises(ValueError, match="No fits of resnet18 by stagewise"):
        fit_curves(fit_table(records), "d", "stagewise", 0.5, student="resnet18")


def test_how_often_the_rule_calls_a_flat_curve_converged():
    """The rule projects the last 5 epochs' slope over 5 more: for a flat curve of scatter s that gain has a standard
    deviation of s * 5 * sqrt(12 / (5 * 24)), so it is called converged (gain at most the noise) with probability
    Phi(noise / that): 0.74 when the scatter equals the noise; a run of six such fits, 0.74 ** 6."""
    t = flat_fit_calls(noise_ratios=(1.0, 0.01), epochs=(10,), n=6000).set_index("noise/SE")
    p = stats.norm.cdf(1 / (5 * np.sqrt(12 / 120)))
    assert t.loc[1.0, "fits called converged"] == pytest.approx(p, abs=0.02)
    assert t.loc[1.0, "runs of 6 fits called converged"] == pytest.approx(p ** 6, abs=0.03)
    assert t.loc[0.01, "fits called converged"] == 1.0  # a flat curve with next to no scatter always
