"""The claims' rules: paired differences, their intervals and the stronger baseline decide a verdict (supported,
contradicted, undetermined), with its minimum detectable effect and the budget column beside it. Built on records
whose answer is known."""
import numpy as np
import pandas as pd
import pytest

from scipy import stats

from kd_lib.evidence.claims import IdenticalArms, budget_flag, claims, interval, mde, paired, stronger_baseline, verdict
from kd_lib.evidence.results import selection
from kd_lib.evidence.saturation import saturation

STUDENTS = ["resnet10", "resnet14", "resnet18"]


def runs(acc: dict, fractions=(1.0,), seeds=(0, 1, 2), converged=True, teacher=95.0, noise=0.5,
         doubling=0.5) -> pd.DataFrame:
    """Records as `collect` gives them: per method a mean accuracy (plus a seeded noise per student and seed), and
    for every arm and the teacher a long twin (budget 2) of the first seed, `doubling` points better (None: no twins;
    a dict: the gain per method, 'teacher' included, 0.5 for the others)."""
    rng = np.random.default_rng(0)
    gain = (lambda m: doubling.get(m, 0.5)) if isinstance(doubling, dict) else (lambda m: doubling)
    rows = [dict(kind="teacher", dataset="d", fraction=np.nan, method=None, seed=0, test_accuracy=teacher,
                 converged=True, budget=1)]
    if doubling is not None: rows.append(dict(rows[0], budget=2, test_accuracy=teacher + gain("teacher")))
    for f in fractions:
        for m, a in acc.items():
            for st in STUDENTS:
                for s in seeds:
                    value = (a(f) if callable(a) else a) + noise * rng.standard_normal()
                    rows.append(dict(kind="student", dataset="d", fraction=f, method=m, student=st, seed=s,
                                     test_accuracy=value, converged=converged, epochs=3, budget=1))
                    if s == seeds[0] and doubling is not None:
                        rows.append(dict(rows[-1], budget=2, test_accuracy=value + gain(m)))
    return pd.DataFrame(rows)


def tied(r: pd.DataFrame, baseline: str) -> pd.DataFrame:
    "`r` with stagewise at `baseline`'s accuracy plus 1, -1, 1, ... point, pair by pair: a mean gain near 0."
    sw, base = r["method"] == "stagewise", r["method"] == baseline
    r.loc[sw, "test_accuracy"] = r.loc[base, "test_accuracy"].to_numpy() + np.resize([1.0, -1.0], sw.sum())
    return r


def row(table, cid):
    return table[table["id"] == str(cid)].iloc[0]


def test_interval_and_verdict():
    mean, lo, hi, n = interval([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and lo < 2 < hi and np.isclose(hi - mean, 4.303 * 1 / np.sqrt(3), atol=1e-3)
    assert interval([5.0])[1] == -np.inf and verdict(*interval([5.0])[1:3]) == "undetermined"
    assert verdict(0.5, 2.0) == "supported" and verdict(-2.0, -0.5) == "contradicted"
    assert verdict(-0.5, 2.0) == "undetermined" and verdict(0.5, 1.5, threshold=2.0, above=False) == "supported"
    assert verdict(2.5, 3.0, threshold=2.0, above=False) == "contradicted"


def test_the_rules_at_their_boundaries():
    assert verdict(0.0, 2.0) == "undetermined"  # a bound equal to the threshold is not beyond it
    assert verdict(-2.0, 0.0) == "undetermined" and verdict(1.0, 2.0, threshold=2.0, above=False) == "undetermined"


def test_one_constructed_set_of_each_label():
    supported = claims(runs(dict(no_teacher=80, stagewise=90, simultaneous=81), fractions=(1.0, 0.25)))
    assert row(supported, 1)["verdict"] == "supported" and row(supported, 2)["verdict"] == "supported"
    assert row(supported, "2_little")["verdict"] == "supported"  # +1 point: below the 2-point margin
    assert row(supported, 4)["verdict"] == "contradicted"  # 5 points below the teacher
    assert row(claims(runs(dict(no_teacher=90, stagewise=80))), 1)["verdict"] == "contradicted"
    same = tied(runs(dict(no_teacher=85, stagewise=85)), "no_teacher")
    assert row(claims(same), 1)["verdict"] == "undetermined"  # the interval spans 0
    far = claims(runs(dict(no_teacher=80, stagewise=90, simultaneous=86)))
    assert row(far, "2_little")["verdict"] == "contradicted"  # 6 points: more than a little
    assert row(claims(runs(dict(no_teacher=80, stagewise=90, simultaneous=86)), margin=8.0),
               "2_little")["verdict"] == "supported"
    below = claims(runs(dict(no_teacher=86, stagewise=90, simultaneous=80)))
    assert row(below, "2_little")["verdict"] == "supported"  # one-sided: worse than no teacher is "little" too


def test_the_minimum_detectable_effect_is_the_closed_form():
    "(t_0.975 + t_0.80) * sd / sqrt(n) on n - 1 degrees of freedom: 80% power at 5% two-sided."
    for sd, n in ((0.87, 4), (1.0, 10), (2.5, 5)):
        assert mde(sd, n) == pytest.approx((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / np.sqrt(n))
    assert mde(0.87, 4) == pytest.approx((3.1824 + 0.9785) * 0.87 / 2, rel=1e-4)  # the tables' t values
    assert mde(1.0, 1) == np.inf and mde(1.0, 10) < mde(1.0, 5) < mde(2.0, 5)
    r = runs(dict(no_teacher=80, stagewise=90), noise=0.5)
    first = row(claims(r), 1)
    d = paired(r, "d", 1.0, ["stagewise", "no_teacher"])
    assert first["mde"] == pytest.approx(mde(float((d["stagewise"] - d["no_teacher"]).std(ddof=1)), len(d)))


def test_the_budget_column_flags_a_verdict_its_doubled_budget_would_turn():
    robust = row(claims(runs(dict(no_teacher=80, stagewise=90), doubling=dict(stagewise=1.5))), 1)
    assert robust["verdict"] == "supported" and robust["budget"] == "budget-robust"
    assert robust["at_2x"] == pytest.approx(robust["at_1x"] + 1.5 - 0.5)  # the seed-0 pairs, both arms doubled
    turned = row(claims(runs(dict(no_teacher=80, stagewise=90), doubling=dict(no_teacher=12.0))), 1)
    assert turned["verdict"] == "supported" and turned["at_2x"] < 0 and turned["budget"] == "budget-sensitive"
    worse = row(claims(runs(dict(no_teacher=90, stagewise=80), doubling=dict(stagewise=12.0))), 1)
    assert worse["verdict"] == "contradicted" and worse["budget"] == "budget-sensitive"
    near = row(claims(tied(runs(dict(no_teacher=85, stagewise=85)), "no_teacher")), 1)
    assert near["verdict"] == "undetermined" and near["budget"] == "" and np.isfinite(near["at_2x"])
    none = row(claims(runs(dict(no_teacher=80, stagewise=90), doubling=None)), 1)
    assert none["verdict"] == "supported" and np.isnan(none["at_2x"]) and none["budget"] == ""  # no gate
    assert budget_flag("supported", 0.5, threshold=2.0, above=False) == "budget-robust"
    assert budget_flag("supported", 2.5, threshold=2.0, above=False) == "budget-sensitive"


def test_the_budget_column_may_come_from_another_set():
    "CIFAR-10: verdicts from set 3's five seeds, the budget column from set 4's seed 0 (another teacher)."
    verdict_set = runs(dict(no_teacher=80, stagewise=90), doubling=None)
    budget_set = runs(dict(no_teacher=80, stagewise=81), doubling=dict(stagewise=-2.0), noise=0.0)
    first = row(claims(verdict_set, budget_records=budget_set), 1)
    assert first["verdict"] == "supported" and first["at_1x"] == pytest.approx(1.0)
    assert first["at_2x"] == pytest.approx(1.0 - 2.0 - 0.5) and first["budget"] == "budget-sensitive"


def test_the_doubling_gate_is_gone():
    "An arm that gained from twice its budget no longer blanks a verdict: the interval decides."
    import kd_lib.evidence.saturation as saturation_module
    assert not hasattr(saturation_module, "unsaturated")
    table = claims(runs(dict(no_teacher=80, stagewise=90), doubling=dict(stagewise=5.0, teacher=5.0)))
    assert set(table["verdict"]) <= {"supported", "contradicted", "undetermined"}
    assert "interval_alone" not in table and row(table, 1)["verdict"] == "supported"


def test_long_twins_join_no_pair_and_each_is_matched_to_its_own_run():
    r = runs(dict(no_teacher=80, stagewise=90), doubling=dict(stagewise=2.0, no_teacher=-1.0))
    sat = saturation(r).set_index(["student", "method"])
    assert len(sat) == 2 * len(STUDENTS) + 1 and np.isclose(sat.loc[("resnet34", "teacher"), "gain"], 0.5)
    assert np.allclose(sat.xs("stagewise", level="method")["gain"], 2.0)
    assert not sat.xs("stagewise", level="method")["saturated"].any()
    assert sat.xs("no_teacher", level="method")["saturated"].all()
    assert row(claims(r), 1)["n"] == 3 * len(STUDENTS)  # twins are in no pair


def test_stagewise_is_compared_with_the_stronger_no_teacher_baseline():
    r = tied(runs(dict(no_teacher=80, no_teacher_budget=90, stagewise=90)), "no_teacher_budget")
    assert stronger_baseline(r, "d", 1.0) == "no_teacher_budget"
    first = row(claims(r), 1)
    assert first["verdict"] == "undetermined" and first["note"] == "stagewise minus no_teacher_budget, the stronger baseline"
    p = paired(r, "d", 1.0, ["stagewise", "no_teacher_budget"])
    assert len(p) == len(STUDENTS) * 3


def test_identical_baselines_are_an_error_not_a_tie():
    "In every kept CIFAR-10 pair the budget control's record was its no_teacher twin's: it never ran."
    r = runs(dict(no_teacher=80, no_teacher_budget=80, stagewise=90), noise=0.0)
    r = r.assign(curve=r["method"].map(lambda m: "same" if m in ("no_teacher", "no_teacher_budget") else m),
                 epochs_run=10, valid_accuracy=80.0, record="r.json")
    with pytest.raises(IdenticalArms, match="no_teacher and no_teacher_budget of .* never ran"): claims(r)
    r.loc[r["method"] == "no_teacher_budget", "curve"] = "other"
    claims(r)


def test_runs_of_other_settings_are_never_averaged_into_a_pair():
    r = runs(dict(no_teacher=80, stagewise=90))
    again = r[r["method"] == "no_teacher"].assign(test_accuracy=60.0)  # the same pair run again with other settings
    with pytest.raises(ValueError, match="no_teacher ran 2 times .* a pair holds one run of each method"):
        claims(pd.concat([r, again]))


def test_the_gain_with_less_data_is_the_paired_difference_of_gains():
    r = runs(dict(no_teacher=lambda f: 80 if f == 1 else 50, stagewise=lambda f: 90 if f == 1 else 75),
             fractions=(1.0, 0.25), noise=0.0)
    assert row(claims(r), 3)["verdict"] == "supported" and row(claims(r), 3)["ours"].startswith("+15.00 [+15.00")
    # the teacher (95) left 15 points to close at full data (10 closed) and 45 at a quarter (25 closed)
    share = row(claims(r), "3_share")
    assert share["ours"].startswith(f"{25 / 45 - 10 / 15:+.2f}") and share["verdict"] == "contradicted"


def test_a_pair_whose_baseline_is_as_good_as_the_teacher_has_no_share_of_the_gap():
    "The share of the teacher's gap closed is undefined where the baseline leaves no gap: those pairs are left out."
    r = runs(dict(no_teacher=lambda f: 80 if f == 1 else 50, stagewise=lambda f: 90 if f == 1 else 75),
             fractions=(1.0, 0.25), noise=0.0)
    beats = (r["method"] == "no_teacher") & (r["fraction"] == 1.0) & (r["student"] == "resnet10")
    r.loc[beats, "test_accuracy"] = 95.0  # resnet10's baseline at full data reaches the teacher: no gap
    share = row(claims(r), "3_share")
    assert share["ours"].startswith(f"{25 / 45 - 10 / 15:+.2f} [") and share["n"] == 6
    assert share["note"].endswith("; 3 pairs left out, the baseline as good as the teacher")
    r.loc[(r["method"] == "no_teacher") & (r["fraction"] == 1.0), "test_accuracy"] = 96.0  # every pair
    share = row(claims(r), "3_share")
    assert share["ours"].startswith("n/a") and share["verdict"] == "undetermined"


def test_claim_4_is_over_the_student_seeds_of_one_teacher():
    "Teacher and students are scored on the same test images, so no binomial term: the seeds' spread alone."
    r = runs(dict(no_teacher=80, stagewise=94.6), noise=0.05).assign(n_test=400)
    four = row(claims(r), 4)
    assert four["verdict"] == "supported" and four["high"] < 2.0  # 0.4 points below, whatever the test set's size
    assert "the teacher is one run" in four["note"]


def test_the_selection_table():
    r = runs(dict(no_teacher=80, stagewise=90), doubling=None)
    r["best_test_accuracy"], r["unused_accuracy"] = r["test_accuracy"] + 1.5, np.nan
    s = selection(r).set_index("method")
    assert np.isclose(s.loc["stagewise", "added"], 1.5) and s.loc["stagewise", "runs"] == 9


def test_claim_1_is_also_checked_at_the_smallest_fraction_with_its_own_stronger_baseline():
    """Imagewoof's protocol: stagewise against the stronger baseline at a quarter, beside full data; a dataset run
    at full data only has no such row."""
    acc = dict(no_teacher=lambda f: 60 if f < 1 else 85, no_teacher_budget=lambda f: 70 if f < 1 else 84,
               stagewise=lambda f: 80 if f < 1 else 83)
    table = claims(runs(acc, fractions=(1.0, 0.25)))
    less, full = row(table, "1_less"), row(table, 1)
    assert less["verdict"] == "supported" and less["mean"] == pytest.approx(10, abs=1)  # against the budget control
    assert "no_teacher_budget" in less["note"] and less["claim"].endswith("(25% of the data)")
    assert full["verdict"] == "contradicted" and "no_teacher," in full["note"]  # at full data no_teacher is stronger
    assert less["at_2x"] == pytest.approx(less["at_1x"])  # both arms of the seed-0 pair doubled alike (+0.5)
    assert "1_less" not in set(claims(runs(dict(no_teacher=80, stagewise=90)))["id"])
