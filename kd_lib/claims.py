"""The paper's claims, each checked by a stated rule on paired runs, with its uncertainty.

Runs are paired when they share dataset, student and seed (so the same split and the same sampled fraction); a
pair holds one run of each method, never two runs of other settings averaged. Each claim is a mean over pairs of
a difference of test accuracies, with a 95% t-interval over the pairs (`SHARED_RULE`). A verdict is `reproduced`
when the interval lies on the claim's side of its threshold, `not reproduced` when it lies on the other side, and
`inconclusive` when it touches or crosses it, when there are fewer than two pairs, or when an arm it rests on (or
the teacher) was not shown saturated by its long twin (`kd_lib.saturation`: twice the budget added a point or more,
or no twin ran): a run that more budget would still improve is not evidence. Claim 2's second part is an
equivalence test: the 90% interval of simultaneous minus no teacher within the profile's `margin` (two one-sided
tests at 5%). Long twins take part in no pair.

"No teacher" is the stronger of the two no-teacher baselines present at each dataset and fraction: `no_teacher`
(the paper's, early-stopped) and `no_teacher_budget` (trained for as many epochs as its stagewise twin used). Two
baselines whose records are identical are an error (`IdenticalArms`): one of them never ran. Claim 4 adds the
teacher's own uncertainty (the binomial standard error of its test accuracy) to the interval; claim 3 is also
reported as the share of the teacher's gap over the baseline that stagewise closes. The verdicts are not corrected
for multiplicity: each interval is at 95% on its own.
"""
import numpy as np
import pandas as pd
from scipy import stats

from .results import PAPER_DATASETS, fraction_label, paper_as_records
from .saturation import SATURATED_BELOW, normal_runs, saturation, unsaturated

__all__ = ["BASELINES", "LEVEL", "MARGIN", "SHARED_RULE", "IdenticalArms", "paired", "interval",
           "verdict", "equivalence", "stronger_baseline", "check_arms", "claims", "verdicts"]

BASELINES = ("no_teacher", "no_teacher_budget")
LEVEL = 0.95
MARGIN = 2.0  # claim 2's equivalence margin (points) where a profile states none
PAIR = ["dataset", "student", "seed"]
SHARED_RULE = ("Runs are paired by student and seed (same split, same sampled fraction), one run of each method per "
               "pair. Each claim is a mean difference of test accuracies over the pairs, with its 95% t-interval. "
               "Reproduced: the interval lies wholly on the claim's side of its threshold; not reproduced: wholly on "
               "the other side; inconclusive: it touches or crosses the threshold, or fewer than 2 pairs, or an arm "
               f"the claim rests on, or the teacher, gained {SATURATED_BELOW:g} point or more from twice its budget "
               "(or has no long twin to tell). Verdicts are not corrected for multiplicity.")


class IdenticalArms(ValueError):
    "Two arms that should differ gave identical records: one of them never ran."


def _students(records: pd.DataFrame, dataset: str, fraction: float) -> pd.DataFrame:
    if records is None or records.empty or "kind" not in records: return pd.DataFrame(columns=PAIR + ["method"])
    s = normal_runs(records)  # long twins take part in no pair
    s = s[(s["kind"] == "student") & (s["dataset"] == dataset)]
    return s[np.isclose(s["fraction"].astype(float), fraction)]


def paired(records: pd.DataFrame, dataset: str, fraction: float, methods: list,
           metric: str = "test_accuracy") -> pd.DataFrame:
    """One row per student and seed that every one of `methods` ran at `dataset` and `fraction`: a column of
    `metric` per method. A method run twice for one pair (two records of other settings) is a ValueError: pairs are
    never averaged."""
    s = _students(records, dataset, fraction)
    s = s[s["method"].isin(methods)]
    if s.empty: return pd.DataFrame(columns=PAIR + list(methods))
    if (twice := s.groupby(PAIR + ["method"]).size()).max() > 1:
        key = twice[twice > 1].index[0]
        raise ValueError(f"{key[3]} ran {twice.max()} times for {dict(zip(PAIR, key[:3]))} at fraction {fraction} "
                         "(records of other settings in one folder?): a pair holds one run of each method. Keep one "
                         "profile's records per folder.")
    return s.pivot(index=PAIR, columns="method", values=metric).reindex(columns=list(methods)).dropna().reset_index()


def interval(d, level: float = LEVEL, extra_se: float = 0.0) -> tuple:
    """(mean, low, high, n) of the differences `d`: a `level` t-interval for their mean (infinite for one pair),
    widened by `extra_se`, the standard error of a term every pair shares (the teacher's accuracy, say)."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n == 0: return np.nan, np.nan, np.nan, 0
    if n == 1: return float(d[0]), -np.inf, np.inf, 1
    half = stats.t.ppf(0.5 + level / 2, n - 1) * np.sqrt(d.var(ddof=1) / n + extra_se ** 2)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), n


def verdict(low: float, high: float, threshold: float = 0.0, above: bool = True) -> str:
    """'reproduced' when the interval [low, high] is above `threshold` (below it when not `above`), 'not
    reproduced' when on the other side, else 'inconclusive' (touching the threshold included)."""
    if not np.isfinite(low) or not np.isfinite(high): return "inconclusive"
    if (low > threshold) if above else (high < threshold): return "reproduced"
    if (high < threshold) if above else (low > threshold): return "not reproduced"
    return "inconclusive"


def equivalence(low: float, high: float, margin: float) -> str:
    """An equivalence verdict on a 90% interval [low, high] (two one-sided tests at 5%): 'reproduced' when it lies
    within (-`margin`, `margin`), 'not reproduced' when it lies wholly beyond one of them, else 'inconclusive'."""
    if not np.isfinite(low) or not np.isfinite(high): return "inconclusive"
    if -margin < low and high < margin: return "reproduced"
    if low >= margin or high <= -margin: return "not reproduced"
    return "inconclusive"


def stronger_baseline(records: pd.DataFrame, dataset: str, fraction: float, metric: str = "test_accuracy"):
    "The baseline of `BASELINES` with the higher mean `metric` at `dataset` and `fraction` (None if none ran)."
    s = _students(records, dataset, fraction)
    means = s[s["method"].isin(BASELINES)].groupby("method")[metric].mean()
    return None if means.empty else str(means.idxmax())


def check_arms(records: pd.DataFrame, arms=BASELINES) -> None:
    """Raise `IdenticalArms` when two `arms` of one dataset, fraction, student and seed have identical records
    (the same curve, epochs and accuracies): a control that gives its twin's record never ran."""
    cols = ["curve", "epochs_run", "valid_accuracy", "test_accuracy"]
    if records is None or records.empty or not set(cols) <= set(records): return
    s = records[(records["kind"] == "student") & records["method"].isin(arms)]
    for key, g in s.groupby(["dataset", "fraction", "student", "seed"]):
        if len(g) > 1 and len(g[cols].drop_duplicates()) < len(g):
            where = dict(zip(["dataset", "fraction", "student", "seed"], key))
            raise IdenticalArms(f"{' and '.join(g['method'])} of {where} "
                                f"have identical records ({g['epochs_run'].iloc[0]} epochs, test accuracy "
                                f"{g['test_accuracy'].iloc[0]}): one of them never ran, so it controls nothing. "
                                f"Look at {g['record'].iloc[-1]}.")


def _teacher(r: pd.DataFrame, ds: str, metric: str) -> tuple:
    "The teacher's `metric` and its binomial standard error (points); (None, 0) if there is none."
    t = r[(r["kind"] == "teacher") & (r["dataset"] == ds)] if len(r) and "kind" in r else pd.DataFrame()
    if t.empty: return None, 0.0
    acc = float(t[metric].mean())
    n = float(t["n_test"].iloc[0]) if "n_test" in t and pd.notna(t["n_test"].iloc[0]) else np.nan
    se = 100 * np.sqrt(acc / 100 * (1 - acc / 100) / n) / np.sqrt(len(t)) if np.isfinite(n) else 0.0
    return acc, float(se)


def _fmt(mean, low, high, n) -> str:
    if n == 0: return "n/a"
    ci = f" [{low:+.2f}, {high:+.2f}]" if np.isfinite(low) else " (one pair: no interval)"
    return f"{mean:+.2f}{ci} over {n} pair{'s' * (n != 1)}"


# Each claim's statistic: `fn(records, dataset, metric, small)` (`small`: the smallest fraction) gives a dict of the
# paired differences `d`, the `arms` it rests on ((student, method, fraction) each), a `note` for the table, and
# `extra_se` (a standard error all pairs share), or None without runs.
def _arms(pairs: pd.DataFrame, methods: list, fraction: float) -> list:
    "The arms behind `pairs`: each student of theirs by each of `methods` at `fraction`."
    return [(st, m, fraction) for st in sorted(set(pairs["student"])) for m in methods]


def _claim_1(r, ds, metric, small=None):
    base = stronger_baseline(r, ds, 1.0, metric)
    p = paired(r, ds, 1.0, ["stagewise", base], metric) if base else pd.DataFrame()
    if p.empty: return None
    return dict(d=p["stagewise"] - p[base], arms=_arms(p, ["stagewise", base], 1.0),
                note=f"stagewise minus {base}, the stronger baseline")


def _claim_2(r, ds, metric, small=None):
    p = paired(r, ds, 1.0, ["stagewise", "simultaneous"], metric)
    if p.empty: return None
    return dict(d=p["stagewise"] - p["simultaneous"], arms=_arms(p, ["stagewise", "simultaneous"], 1.0),
                note="stagewise minus simultaneous")


def _claim_2_equivalence(r, ds, metric, small=None):
    base = stronger_baseline(r, ds, 1.0, metric)
    p = paired(r, ds, 1.0, ["simultaneous", base], metric) if base else pd.DataFrame()
    if p.empty: return None
    return dict(d=p["simultaneous"] - p[base], arms=_arms(p, ["simultaneous", base], 1.0),
                note=f"simultaneous minus {base}")


def _gains(r, ds, metric, small, share_of_gap: bool):
    "Per pair, the stagewise gain over the stronger baseline at `small` minus at full data (or of the gap's share)."
    bases = [stronger_baseline(r, ds, f, metric) for f in (small, 1.0)]
    if None in bases: return None
    lo, hi = (paired(r, ds, f, ["stagewise", b], metric).set_index(PAIR)
              .rename(columns={"stagewise": f"sw_{k}", b: f"base_{k}"})
              for f, b, k in zip((small, 1.0), bases, ("small", "full")))
    both = lo.join(hi, how="inner")
    if both.empty: return None
    teacher = _teacher(r, ds, metric)[0] if share_of_gap else None
    if share_of_gap and teacher is None: return None
    def gain(k): return both[f"sw_{k}"] - both[f"base_{k}"]
    pairs = both.reset_index()
    arms = _arms(pairs, ["stagewise", bases[0]], small) + _arms(pairs, ["stagewise", bases[1]], 1.0)
    left_out = ""
    if share_of_gap:  # a baseline as good as the teacher leaves no gap to close: that pair has no share
        gap = (teacher > both["base_small"]) & (teacher > both["base_full"])
        if n := int((~gap).sum()):
            left_out = f"; {n} pair{'s' * (n != 1)} left out, the baseline as good as the teacher"
        both = both[gap]
    d = gain("small") - gain("full") if not share_of_gap else \
        gain("small") / (teacher - both["base_small"]) - gain("full") / (teacher - both["base_full"])
    what = "share of the teacher's gap over the baseline closed by stagewise" if share_of_gap else "stagewise gain"
    return dict(d=d, arms=arms, note=f"{what} at {fraction_label(small)} minus at full data (baselines: "
                                       f"{bases[0]} at {fraction_label(small)}, {bases[1]} at full data){left_out}")


def _claim_3(r, ds, metric, small): return _gains(r, ds, metric, small, share_of_gap=False)
def _claim_3_share(r, ds, metric, small): return _gains(r, ds, metric, small, share_of_gap=True)


def _claim_4(r, ds, metric, small=None):
    teacher, se = _teacher(r, ds, metric)
    p = paired(r, ds, 1.0, ["stagewise"], metric)
    if teacher is None or p.empty: return None
    return dict(d=teacher - p["stagewise"], arms=_arms(p, ["stagewise"], 1.0), extra_se=se,
                note=f"teacher minus stagewise, the teacher's standard error ({se:.2f}) added")


# (id, claim, statistic, threshold, above, what differs from the shared rule)
CLAIMS = [
    ("1", "1. stagewise beats no teacher (full data)", _claim_1, 0.0, True, "interval above 0"),
    ("2", "2. stagewise beats simultaneous (full data)", _claim_2, 0.0, True, "interval above 0"),
    ("2_equivalence", "2. simultaneous gains little over no teacher (full data)", _claim_2_equivalence, None, None,
     "equivalence: the 90% interval within ± the margin (two one-sided tests at 5%); not reproduced when wholly "
     "beyond it"),
    ("3", "3. the stagewise gain is larger with less data", _claim_3, 0.0, True, "interval above 0"),
    ("3_share", "3. stagewise closes more of the teacher's gap with less data", _claim_3_share, 0.0, True,
     "interval above 0 (shares, not points; a pair whose baseline is as good as the teacher has no share)"),
    ("4", "4. stagewise students come within 2 points of the teacher (full data)", _claim_4, 2.0, False,
     "interval below 2 points"),
]


def claims(records: pd.DataFrame, paper: pd.DataFrame = None, metric: str = "test_accuracy",
           margin: float = MARGIN) -> pd.DataFrame:
    """The paper's claims checked against `records` (a `collect` table, long twins included), a row per claim and
    dataset: our mean difference with its interval and the pairs, the doubling check of the arms it rests on
    (`saturation`), the same statistic from the paper's own numbers (their range over the paper's datasets when it
    did not run ours), the verdict ('inconclusive: <why>' when an arm is not shown saturated), what the interval
    alone would say were every arm saturated (`interval_alone`: not a verdict, it tells an inconclusive verdict's two
    causes apart) and what of the rule is the claim's own (`SHARED_RULE` is the rest). `margin`: claim 2's
    equivalence margin, stated in the profile before the runs. Raises `IdenticalArms` when a control never ran."""
    sat = saturation(records, metric)
    records = normal_runs(records)
    check_arms(records)
    rows = []
    pr = paper_as_records(paper) if paper is not None and len(paper) else pd.DataFrame(columns=["kind"])
    s = records[records["kind"] == "student"] if records is not None and len(records) and "kind" in records \
        else pd.DataFrame(columns=["dataset", "fraction"])
    for ds in sorted(set(s["dataset"])):
        fractions = sorted({float(f) for f in s.loc[s["dataset"] == ds, "fraction"]})
        small = fractions[0] if fractions and fractions[0] < 1 else None
        for cid, name, fn, threshold, above, rule in CLAIMS:
            if fn in (_claim_3, _claim_3_share) and small is None: continue
            res = fn(records, ds, metric, small)
            if res is None: continue
            level = 1 - 2 * (1 - LEVEL) if threshold is None else LEVEL  # 90% for the equivalence test
            mean, low, high, n = interval(res["d"], level, res.get("extra_se", 0.0))
            alone = equivalence(low, high, margin) if threshold is None else verdict(low, high, threshold, above)
            ok, n_arms, why = unsaturated(sat, ds, res["arms"])
            rows.append(dict(id=cid, claim=name if small is None or fn not in (_claim_3, _claim_3_share)
                             else f"{name} ({fraction_label(small)})", dataset=ds,
                             ours=f"{_fmt(mean, low, high, n)}{' (90%)' if threshold is None else ''}: {res['note']}",
                             paper=_paper_cell(fn, pr, ds, metric),
                             budget=f"{ok} of {n_arms} arms saturated (the teacher one of them)",
                             verdict=f"inconclusive: {why}" if why else alone, interval_alone=alone,
                             rule=rule.replace("the margin", f"the margin ({margin:g} points)")))
    return pd.DataFrame(rows, columns=["id", "claim", "dataset", "ours", "paper", "budget", "verdict",
                                       "interval_alone", "rule"])


def _paper_cell(fn, pr: pd.DataFrame, ds: str, metric: str) -> str:
    "The claim's statistic from the paper's numbers: on `ds` when the paper ran it, else its range over its datasets."
    def mean(d):
        res = fn(pr, d, "test_accuracy", 0.25) if len(pr) else None
        return interval(res["d"])[0] if res is not None else np.nan
    if ds in PAPER_DATASETS:
        m = mean(ds)
        return "n/a" if not np.isfinite(m) else f"{m:+.2f} (mean over students, one run each)"
    vals = [v for v in map(mean, PAPER_DATASETS) if np.isfinite(v)]
    return f"range {min(vals):+.2f} to {max(vals):+.2f} over its datasets" if vals else "n/a"


def verdicts(table: pd.DataFrame) -> dict:
    "`verdict_<id>` for each claim of `CLAIMS`: its verdicts in a `claims` table, as 'verdict on dataset; ...'."
    out = {}
    for cid, *_ in CLAIMS:
        r = table[table["id"] == cid]
        out[f"verdict_{cid}"] = ("; ".join(f"{v} on {d}" for v, d in zip(r["verdict"], r["dataset"])) if len(r)
                                 else "not tested by these runs")
    return out
