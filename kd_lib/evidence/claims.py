"""The paper's claims, each checked by a stated rule on paired runs, with its uncertainty and its budget column.

Runs are paired when they share dataset, student and seed (so the same split and the same sampled fraction); a
pair holds one run of each method, never two runs of other settings averaged. Each claim is a mean over pairs of a
difference of test accuracies, with a 95% t-interval over the pairs (`SHARED_RULE`). A verdict is `supported`
when the interval lies wholly on the claim's side of its threshold, `contradicted` when wholly on the other side,
else `undetermined` (fewer than two pairs included). Beside it, the minimum detectable effect at that number of
pairs (`mde`: 80% power, 5% two-sided, from the pairs' SD) says what an undetermined verdict could have seen.

"No teacher" is the stronger of the two no-teacher baselines present at each dataset and fraction: `no_teacher`
(the paper's, early-stopped) and `no_teacher_budget` (trained for as many epochs as its stagewise twin used),
chosen once per build from the verdict's runs and used for every number of the claim. Claim 1 is also checked at
the smallest fraction a dataset ran (`1_less`), as claim 3 is. Two baselines whose records
are identical are an error (`IdenticalArms`): one of them never ran. Claim 3 is also reported as the share of the
teacher's gap over the baseline that stagewise closes. The verdicts are not corrected for multiplicity.

The budget is a sensitivity column, never a gate: each claim's difference from the seed-0 runs at their normal
budget and from their long twins (every budget doubled, `kd_lib.evidence.saturation`), all of one set that distils one
teacher. A supported or contradicted claim whose doubled difference lies on the other side of its threshold is
`budget-sensitive`, otherwise `budget-robust`; an undetermined one shows both differences without a flag.
"""
import numpy as np
import pandas as pd
from scipy import stats

from .results import BASELINES, PAPER_DATASETS, fraction_label, paper_as_records, stronger_baseline
from .saturation import long_twins, normal_runs

__all__ = ["BASELINES", "LEVEL", "POWER", "MARGIN", "SHARED_RULE", "BUDGET_RULE", "LABELS", "IdenticalArms",
           "paired", "interval", "mde", "verdict", "budget_flag", "stronger_baseline", "check_arms", "claims",
           "verdicts"]

LEVEL = 0.95
POWER = 0.80  # the power at which `mde` is stated
MARGIN = 2.0  # claim 2's "little" (points) where a profile states none
LABELS = ("supported", "contradicted", "undetermined")
PAIR = ["dataset", "student", "seed"]
SHARED_RULE = ("Runs are paired by student and seed (same split, same sampled fraction), one run of each method per "
               "pair. Each claim is a mean difference of test accuracies over the pairs, with its 95% t-interval. "
               "Supported: the interval lies wholly on the claim's side of its threshold; contradicted: wholly on "
               "the other side; undetermined: otherwise, or fewer than 2 pairs. The minimum detectable effect (MDE) "
               f"is the true difference the pairs would show with {POWER:.0%} power at 5% (two-sided). Verdicts are "
               "not corrected for multiplicity.")
BUDGET_RULE = ("The budget column: the claim's difference from the seed-0 runs at the normal budget (1x) and from "
               "their long twins (2x: every epoch cap, patience and fixed schedule doubled), one set distilling one "
               "teacher. A supported or contradicted claim is budget-sensitive when its 2x difference lies on the "
               "other side of the threshold, else budget-robust.")


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


def interval(d, level: float = LEVEL) -> tuple:
    "(mean, low, high, n) of the differences `d`: a `level` t-interval for their mean (infinite for one pair)."
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n == 0: return np.nan, np.nan, np.nan, 0
    if n == 1: return float(d[0]), -np.inf, np.inf, 1
    half = stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / np.sqrt(n)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), n


def mde(sd: float, n: int, level: float = LEVEL, power: float = POWER) -> float:
    """The minimum detectable effect of a paired t-test on `n` pairs whose differences have SD `sd`: the true mean
    difference found at two-sided `level` with probability `power`, (t_{(1+level)/2} + t_power) * sd / sqrt(n) on
    n - 1 degrees of freedom; infinite for fewer than two pairs."""
    if n < 2 or not np.isfinite(sd): return np.inf
    return float((stats.t.ppf(0.5 + level / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / np.sqrt(n))


def verdict(low: float, high: float, threshold: float = 0.0, above: bool = True) -> str:
    """'supported' when the interval [low, high] lies above `threshold` (below it when not `above`), 'contradicted'
    when wholly on the other side, else 'undetermined' (a bound on the threshold, or no interval, included)."""
    if not np.isfinite(low) or not np.isfinite(high): return "undetermined"
    if (low > threshold) if above else (high < threshold): return "supported"
    if (high < threshold) if above else (low > threshold): return "contradicted"
    return "undetermined"


def budget_flag(label: str, doubled: float, threshold: float = 0.0, above: bool = True) -> str:
    """For a supported or contradicted claim, 'budget-sensitive' when its difference at twice the budget
    (`doubled`) lies on the other side of `threshold` than the verdict says, else 'budget-robust'; '' for an
    undetermined claim, or without a doubled difference."""
    if label not in ("supported", "contradicted") or doubled is None or not np.isfinite(doubled): return ""
    claim_side = (doubled > threshold) if above else (doubled < threshold)
    return "budget-robust" if claim_side == (label == "supported") else "budget-sensitive"


def check_arms(records: pd.DataFrame, arms=BASELINES) -> None:
    """Raise `IdenticalArms` when two `arms` of one dataset, fraction, student and seed have identical records
    (the same curve, epochs and accuracies): a control that gives its twin's record never ran."""
    cols = ["curve", "epochs_run", "valid_accuracy", "test_accuracy"]
    if records is None or records.empty or not set(cols) <= set(records): return
    s = records[(records["kind"] == "student") & records["method"].isin(arms)]
    for key, g in s.groupby(["dataset", "fraction", "student", "seed", "budget"] if "budget" in s else
                            ["dataset", "fraction", "student", "seed"]):
        if len(g) > 1 and len(g[cols].drop_duplicates()) < len(g):
            where = dict(zip(["dataset", "fraction", "student", "seed"], key))
            raise IdenticalArms(f"{' and '.join(g['method'])} of {where} "
                                f"have identical records ({g['epochs_run'].iloc[0]} epochs, test accuracy "
                                f"{g['test_accuracy'].iloc[0]}): one of them never ran, so it controls nothing. "
                                f"Look at {g['record'].iloc[-1]}.")


def _teacher(r: pd.DataFrame, ds: str, metric: str):
    "The teacher's `metric` on `ds` (the mean, were there several), or None."
    t = r[(r["kind"] == "teacher") & (r["dataset"] == ds)] if len(r) and "kind" in r else pd.DataFrame()
    return None if t.empty else float(t[metric].mean())


# Each claim's statistic: `fn(records, dataset, metric, small, base)` (`small`: the smallest fraction; `base`: the
# baseline method at each fraction, chosen once) gives a dict of the paired differences `d` and a `note`, or None.
def _beats_baseline(r, ds, metric, fraction, base):
    "Per pair, stagewise minus the stronger baseline at `fraction`."
    p = paired(r, ds, fraction, ["stagewise", base[fraction]], metric) if base.get(fraction) else pd.DataFrame()
    if p.empty: return None
    return dict(d=p["stagewise"] - p[base[fraction]], note=f"stagewise minus {base[fraction]}, the stronger baseline")


def _claim_1(r, ds, metric, small, base): return _beats_baseline(r, ds, metric, 1.0, base)
def _claim_1_less(r, ds, metric, small, base): return _beats_baseline(r, ds, metric, small, base)


def _claim_2(r, ds, metric, small, base):
    p = paired(r, ds, 1.0, ["stagewise", "simultaneous"], metric)
    if p.empty: return None
    return dict(d=p["stagewise"] - p["simultaneous"], note="stagewise minus simultaneous")


def _claim_2_little(r, ds, metric, small, base):
    p = paired(r, ds, 1.0, ["simultaneous", base[1.0]], metric) if base.get(1.0) else pd.DataFrame()
    if p.empty: return None
    return dict(d=p["simultaneous"] - p[base[1.0]], note=f"simultaneous minus {base[1.0]}")


def _gains(r, ds, metric, small, base, share_of_gap: bool):
    "Per pair, the stagewise gain over the baseline at `small` minus at full data (or of the teacher gap's share)."
    bases = [base.get(small), base.get(1.0)]
    if None in bases: return None
    lo, hi = (paired(r, ds, f, ["stagewise", b], metric).set_index(PAIR)
              .rename(columns={"stagewise": f"sw_{k}", b: f"base_{k}"})
              for f, b, k in zip((small, 1.0), bases, ("small", "full")))
    both = lo.join(hi, how="inner")
    if both.empty: return None
    teacher = _teacher(r, ds, metric) if share_of_gap else None
    if share_of_gap and teacher is None: return None
    def gain(k): return both[f"sw_{k}"] - both[f"base_{k}"]
    left_out = ""
    if share_of_gap:  # a baseline as good as the teacher leaves no gap to close: that pair has no share
        gap = (teacher > both["base_small"]) & (teacher > both["base_full"])
        if n := int((~gap).sum()):
            left_out = f"; {n} pair{'s' * (n != 1)} left out, the baseline as good as the teacher"
        both = both[gap]
    d = gain("small") - gain("full") if not share_of_gap else \
        gain("small") / (teacher - both["base_small"]) - gain("full") / (teacher - both["base_full"])
    what = "share of the teacher's gap over the baseline closed by stagewise" if share_of_gap else "stagewise gain"
    return dict(d=d, note=f"{what} at {fraction_label(small)} minus at full data (baselines: {bases[0]} at "
                          f"{fraction_label(small)}, {bases[1]} at full data){left_out}")


def _claim_3(r, ds, metric, small, base): return _gains(r, ds, metric, small, base, share_of_gap=False)
def _claim_3_share(r, ds, metric, small, base): return _gains(r, ds, metric, small, base, share_of_gap=True)


def _claim_4(r, ds, metric, small, base):
    teacher = _teacher(r, ds, metric)
    p = paired(r, ds, 1.0, ["stagewise"], metric)
    if teacher is None or p.empty: return None
    return dict(d=teacher - p["stagewise"], note="teacher minus stagewise over the student seeds; the teacher is "
                                                 "one run (its own seed noise is not in the interval)")


# (id, claim, its difference in short, statistic, threshold (None: the profile's margin), above, what differs from
# the shared rule)
CLAIMS = [
    ("1", "1. stagewise beats no teacher (full data)", "stagewise \u2212 no teacher", _claim_1, 0.0, True,
     "interval above 0"),
    ("1_less", "1. stagewise beats no teacher (less data)", "stagewise \u2212 no teacher", _claim_1_less, 0.0, True,
     "interval above 0"),
    ("2", "2. stagewise beats simultaneous (full data)", "stagewise \u2212 simultaneous", _claim_2, 0.0, True,
     "interval above 0"),
    ("2_little", "2. simultaneous gains little over no teacher (full data)", "simultaneous \u2212 no teacher",
     _claim_2_little, None, False,
     "interval below the margin (one-sided: simultaneous minus no teacher less than the margin)"),
    ("3", "3. the stagewise gain is larger with less data", "stagewise gain, less \u2212 full data", _claim_3, 0.0,
     True, "interval above 0"),
    ("3_share", "3. stagewise closes more of the teacher's gap with less data", "share of the gap, less \u2212 full",
     _claim_3_share, 0.0, True,
     "interval above 0 (shares, not points; a pair whose baseline is as good as the teacher has no share)"),
    ("4", "4. stagewise students come within 2 points of the teacher (full data)", "teacher \u2212 stagewise",
     _claim_4, 2.0, False, "interval below 2 points"),
]
LESS_DATA = (_claim_1_less, _claim_3, _claim_3_share)  # the claims at the smallest fraction a dataset ran
COLUMNS = ["id", "claim", "difference", "dataset", "mean", "low", "high", "n", "mde", "threshold", "above", "verdict", "at_1x",
           "at_2x", "budget", "ours", "paper", "note", "rule"]


def _seed0(records: pd.DataFrame, doubled: bool) -> pd.DataFrame:
    """The seed-0 runs of `records` (the teacher's too) at the normal budget, or their long twins as if they were
    (`doubled`): one budget column's runs."""
    if records is None or records.empty or "kind" not in records: return pd.DataFrame(columns=["kind"])
    r = long_twins(records) if doubled else normal_runs(records)
    r = r[(r["kind"] == "teacher") | (r["seed"] == 0)]
    return r.assign(budget=1)


def _fmt(mean, low, high, n) -> str:
    if n == 0: return "n/a"
    ci = f" [{low:+.2f}, {high:+.2f}]" if np.isfinite(low) else " (one pair: no interval)"
    return f"{mean:+.2f}{ci}, n = {n}"


def claims(records: pd.DataFrame, paper: pd.DataFrame = None, metric: str = "test_accuracy",
           margin: float = MARGIN, budget_records: pd.DataFrame = None) -> pd.DataFrame:
    """The paper's claims checked against `records` (a `collect` table), a row per claim and dataset: our mean
    difference, its interval, n pairs and MDE, the verdict (`LABELS`), the budget column (`at_1x`, `at_2x`: the
    seed-0 differences at the normal and doubled budget from `budget_records`, default `records`' own seed 0 and
    long twins; `budget`: `budget_flag`), the same statistic from the paper's own numbers (their range over the
    paper's datasets when it did not run ours), and what of the rule is the claim's own (`SHARED_RULE` is the
    rest). `margin`: claim 2's "little", stated in the profile before the runs. Raises `IdenticalArms` when a control
    never ran."""
    budget_records = records if budget_records is None else budget_records
    if records is not None and len(records) and "method" not in records:  # no student (a set's teacher alone)
        records = budget_records = records.iloc[0:0]
    check_arms(records)
    check_arms(budget_records)
    records = normal_runs(records)
    rows = []
    pr = paper_as_records(paper) if paper is not None and len(paper) else pd.DataFrame(columns=["kind"])
    s = records[records["kind"] == "student"] if records is not None and len(records) and "kind" in records \
        else pd.DataFrame(columns=["dataset", "fraction"])
    at = {doubled: _seed0(budget_records, doubled) for doubled in (False, True)}
    for ds in sorted(set(s["dataset"])):
        fractions = sorted({float(f) for f in s.loc[s["dataset"] == ds, "fraction"]})
        small = fractions[0] if fractions and fractions[0] < 1 else None
        base = {f: stronger_baseline(records, ds, f, metric) for f in fractions}
        for cid, name, short, fn, threshold, above, rule in CLAIMS:
            if fn in LESS_DATA and small is None: continue
            res = fn(records, ds, metric, small, base)
            if res is None: continue
            threshold = margin if threshold is None else threshold
            mean, low, high, n = interval(res["d"])
            label = verdict(low, high, threshold, above)
            one, two = (_seed0_difference(fn, at[doubled], ds, metric, small, base) for doubled in (False, True))
            rows.append(dict(id=cid, claim=name if small is None or fn not in LESS_DATA
                             else f"{name} ({fraction_label(small)})", difference=short, dataset=ds, mean=mean, low=low, high=high,
                             n=n, threshold=threshold, above=above, mde=mde(np.std(np.asarray(res["d"], float), ddof=1) if n > 1 else np.nan, n),
                             verdict=label, at_1x=one, at_2x=two, budget=budget_flag(label, two, threshold, above),
                             ours=_fmt(mean, low, high, n), paper=_paper_cell(fn, pr, ds, metric),
                             note=res["note"], rule=rule.replace("the margin", f"the margin ({margin:g} points)")))
    return pd.DataFrame(rows, columns=COLUMNS)


def _seed0_difference(fn, r: pd.DataFrame, ds: str, metric: str, small, base: dict) -> float:
    "The claim's difference on one budget column's runs `r` (seed 0), NaN when they lack a run it needs."
    res = fn(r, ds, metric, small, base) if len(r) else None
    return float(np.mean(res["d"])) if res is not None and len(res["d"]) else np.nan


def _paper_cell(fn, pr: pd.DataFrame, ds: str, metric: str) -> str:
    "The claim's statistic from the paper's numbers: on `ds` when the paper ran it, else its range over its datasets."
    def mean(d):
        if not len(pr): return np.nan
        res = fn(pr, d, "test_accuracy", 0.25, {f: stronger_baseline(pr, d, f) for f in (0.25, 1.0)})
        return interval(res["d"])[0] if res is not None else np.nan
    if ds in PAPER_DATASETS:
        m = mean(ds)
        return "n/a" if not np.isfinite(m) else f"{m:+.2f}"
    vals = [v for v in map(mean, PAPER_DATASETS) if np.isfinite(v)]
    return f"{min(vals):+.2f} to {max(vals):+.2f} (its {len(vals)} datasets)" if vals else "n/a"


def verdicts(table: pd.DataFrame) -> dict:
    "`verdict_<id>` for each claim of `CLAIMS`: its verdicts in a `claims` table, as 'verdict on dataset; ...'."
    out = {}
    for cid, *_ in CLAIMS:
        r = table[table["id"] == cid]
        out[f"verdict_{cid}"] = ("; ".join(f"{v} on {d}" for v, d in zip(r["verdict"], r["dataset"])) if len(r)
                                 else "not tested by these runs")
    return out
