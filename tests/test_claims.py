"""The claims' rules: paired differences, intervals, convergence and the stronger baseline decide a verdict,
which may be 'inconclusive'. Built on records whose answer is known."""
import numpy as np
import pandas as pd

from kd_lib.claims import claims, interval, paired, stronger_baseline, verdict
from kd_lib.results import convergence, selection

STUDENTS = ["resnet10", "resnet14", "resnet18"]


def runs(acc: dict, fractions=(1.0,), seeds=(0, 1, 2), converged=True, teacher=95.0, noise=0.5) -> pd.DataFrame:
    "Records as `collect` gives them: per method a mean accuracy (plus a seeded noise per student and seed)."
    rng = np.random.default_rng(0)
    rows = [dict(kind="teacher", dataset="d", fraction=1.0, method=None, test_accuracy=teacher, converged=True)]
    for f in fractions:
        for m, a in acc.items():
            for st in STUDENTS:
                for s in seeds:
                    value = (a(f) if callable(a) else a) + noise * rng.standard_normal()
                    rows.append(dict(kind="student", dataset="d", fraction=f, method=m, student=st, seed=s,
                                     test_accuracy=value, converged=converged, epochs=3))
    return pd.DataFrame(rows)


def tied(r: pd.DataFrame, baseline: str) -> pd.DataFrame:
    "`r` with stagewise at `baseline`'s accuracy plus 1, -1, 1, ... point, pair by pair: a mean gain near 0."
    sw, base = r["method"] == "stagewise", r["method"] == baseline
    r.loc[sw, "test_accuracy"] = r.loc[base, "test_accuracy"].to_numpy() + np.resize([1.0, -1.0], sw.sum())
    return r


def row(table, n):
    return table[table["claim"].str.startswith(f"{n}.")].iloc[0]


def test_interval_and_verdict():
    mean, lo, hi, n = interval([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and lo < 2 < hi and np.isclose(hi - mean, 4.303 * 1 / np.sqrt(3), atol=1e-3)
    assert interval([5.0])[1] == -np.inf and verdict(*interval([5.0])[1:3]) == "inconclusive"
    assert verdict(0.5, 2.0) == "reproduced" and verdict(-2.0, -0.5) == "not reproduced"
    assert verdict(-0.5, 2.0) == "inconclusive" and verdict(0.5, 2.0, converged=0.8) == "inconclusive"
    assert verdict(0.5, 1.5, threshold=2.0, above=False) == "reproduced"


def test_a_clear_gain_is_reproduced_and_no_gain_is_not():
    clear = claims(runs(dict(no_teacher=80, stagewise=90, simultaneous=81), fractions=(1.0, 0.25)))
    assert row(clear, 1)["verdict"] == "reproduced" and row(clear, 2)["verdict"] == "reproduced"
    assert row(clear, 4)["verdict"] == "not reproduced"  # 5 points below the teacher
    worse = claims(runs(dict(no_teacher=90, stagewise=80)))
    assert row(worse, 1)["verdict"] == "not reproduced"
    same = tied(runs(dict(no_teacher=85, stagewise=85)), "no_teacher")
    assert row(claims(same), 1)["verdict"] == "inconclusive"  # the interval spans 0


def test_unconverged_runs_make_a_verdict_inconclusive():
    table = claims(runs(dict(no_teacher=80, stagewise=90), converged=False))
    assert row(table, 1)["verdict"] == "inconclusive" and "runs converged: 0%" in row(table, 1)["ours"]


def test_stagewise_is_compared_with_the_stronger_no_teacher_baseline():
    r = tied(runs(dict(no_teacher=80, no_teacher_budget=90, stagewise=90)), "no_teacher_budget")
    assert stronger_baseline(r, "d", 1.0) == "no_teacher_budget"
    first = row(claims(r), 1)
    assert first["verdict"] == "inconclusive" and "stronger baseline: no_teacher_budget" in first["ours"]
    p = paired(r, "d", 1.0, ["stagewise", "no_teacher_budget"])
    assert len(p) == len(STUDENTS) * 3 and (p["converged"] == 2).all()


def test_the_gain_with_less_data_is_the_paired_difference_of_gains():
    r = runs(dict(no_teacher=lambda f: 80 if f == 1 else 50, stagewise=lambda f: 90 if f == 1 else 75),
             fractions=(1.0, 0.25), noise=0.0)
    assert row(claims(r), 3)["verdict"] == "reproduced" and row(claims(r), 3)["ours"].startswith("+15.0 [+15.0, +15.0]")


def test_convergence_and_selection_tables():
    r = runs(dict(no_teacher=80, stagewise=90))
    r.loc[r["method"] == "no_teacher", "converged"] = [True] * 8 + [False]
    c = convergence(r).set_index("method")
    assert c.loc["no_teacher", "converged"] == 8 and c.loc["stagewise", "share"] == 1.0
    assert c.loc["teacher", "runs"] == 1
    r["best_test_accuracy"], r["unused_accuracy"] = r["test_accuracy"] + 1.5, np.nan
    s = selection(r).set_index("method")
    assert np.isclose(s.loc["stagewise", "added"], 1.5) and s.loc["stagewise", "runs"] == 9


def test_a_real_gain_is_one_beyond_the_noise():
    from kd_lib.fitting import last_gain
    assert last_gain([0.5, 0.6, 0.9, 0.8, 0.85], lower=False) == 2  # accuracy: no better epoch after the third
    assert last_gain([0.5, 0.6, 0.9, 0.8, 0.95], lower=False, noise=[0.1] * 5) == 2  # +0.05: within the noise
    assert last_gain([0.5, 0.6, 0.9, 0.8, 1.05], lower=False, noise=[0.1] * 5) == 4  # +0.15: beyond it
    assert last_gain([1.0, 0.5, 0.3, 0.299, 0.298, 0.2975], lower=True, noise=[0.01] * 6) == 2  # creeping within it
    assert last_gain([1.0, 1.2, 1.1], lower=True) == 0 and last_gain([0.3], lower=False) == 0
