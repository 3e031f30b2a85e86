"""The paper's four claims, each checked by a stated rule on paired runs, with its uncertainty.

Runs are paired when they share dataset, student and seed (so the same split and the same sampled
fraction): each claim is a mean over such pairs of a difference of test accuracies, with a 95% t-interval
over the pairs. A verdict is `reproduced` when the interval lies on the claim's side of its threshold,
`not reproduced` when it lies on the other side, and `inconclusive` when it straddles it, when there are
fewer than two pairs, or when fewer than `MIN_CONVERGED` of the runs involved converged (an unconverged
run is not evidence). "No teacher" is the stronger of the two no-teacher baselines present at each dataset
and fraction: `no_teacher` (the paper's) and `no_teacher_budget` (as many optimizer steps as stagewise).
"""
import numpy as np
import pandas as pd
from scipy import stats

from .results import PAPER_DATASETS, fraction_label, paper_as_records

__all__ = ["BASELINES", "MIN_CONVERGED", "LEVEL", "paired", "interval", "verdict", "stronger_baseline", "claims",
           "verdicts"]

BASELINES = ("no_teacher", "no_teacher_budget")
MIN_CONVERGED = 0.9  # the least share of converged runs a verdict other than inconclusive needs
LEVEL = 0.95
PAIR = ["dataset", "student", "seed"]


def _students(records: pd.DataFrame, dataset: str, fraction: float) -> pd.DataFrame:
    if records is None or records.empty or "kind" not in records: return pd.DataFrame(columns=PAIR + ["method"])
    s = records[(records["kind"] == "student") & (records["dataset"] == dataset)]
    return s[np.isclose(s["fraction"].astype(float), fraction)]


def paired(records: pd.DataFrame, dataset: str, fraction: float, methods: list,
           metric: str = "test_accuracy") -> pd.DataFrame:
    """One row per student and seed that every one of `methods` ran at `dataset` and `fraction`: a column of
    `metric` per method, and `converged`, the number of those runs that converged (None where unrecorded)."""
    s = _students(records, dataset, fraction)
    s = s[s["method"].isin(methods)]
    if s.empty: return pd.DataFrame(columns=PAIR + list(methods) + ["converged"])
    wide = s.pivot_table(index=PAIR, columns="method", values=metric, aggfunc="mean")
    wide = wide.reindex(columns=list(methods)).dropna()
    conv = s.assign(c=s["converged"].astype(float) if "converged" in s else np.nan) \
        .pivot_table(index=PAIR, columns="method", values="c", aggfunc="mean", dropna=False)
    wide["converged"] = conv.reindex(index=wide.index, columns=list(methods)).sum(axis=1, min_count=1)
    return wide.reset_index()


def interval(d, level: float = LEVEL) -> tuple:
    "(mean, low, high, n) of the differences `d`: a `level` t-interval for their mean (infinite for one pair)."
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n == 0: return np.nan, np.nan, np.nan, 0
    if n == 1: return float(d[0]), -np.inf, np.inf, 1
    half = stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / np.sqrt(n)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), n


def verdict(low: float, high: float, threshold: float = 0.0, above: bool = True, converged: float = 1.0) -> str:
    """'reproduced' when the interval [low, high] is above `threshold` (below it when not `above`), 'not
    reproduced' when on the other side, else (or with a `converged` share under `MIN_CONVERGED`) 'inconclusive'."""
    if not np.isfinite(low) or not np.isfinite(high) or (np.isfinite(converged) and converged < MIN_CONVERGED):
        return "inconclusive"
    if (low > threshold) if above else (high < threshold): return "reproduced"
    if (high < threshold) if above else (low > threshold): return "not reproduced"
    return "inconclusive"


def stronger_baseline(records: pd.DataFrame, dataset: str, fraction: float, metric: str = "test_accuracy"):
    "The baseline of `BASELINES` with the higher mean `metric` at `dataset` and `fraction` (None if none ran)."
    s = _students(records, dataset, fraction)
    means = s[s["method"].isin(BASELINES)].groupby("method")[metric].mean()
    return None if means.empty else str(means.idxmax())


def _share(pairs: pd.DataFrame, runs_per_pair: int) -> float:
    "The share of the runs of `pairs` that converged (NaN when no run recorded it)."
    c = pairs["converged"].astype(float)
    return float(c.sum() / (runs_per_pair * len(pairs))) if len(pairs) and c.notna().any() else np.nan


def _fmt(mean, low, high, n) -> str:
    if n == 0: return "n/a"
    ci = f" [{low:+.1f}, {high:+.1f}]" if np.isfinite(low) else " (one pair: no interval)"
    return f"{mean:+.1f}{ci} over {n} pair{'s' * (n != 1)}"


# Each claim's statistic: `_claim_k(records, dataset, metric, small)` (`small`: the smallest fraction) gives the
# paired differences, the share of their runs that converged and a note for the table, or None without runs.
def _claim_1(r, ds, metric, small=None):
    base = stronger_baseline(r, ds, 1.0, metric)
    p = paired(r, ds, 1.0, ["stagewise", base], metric) if base else pd.DataFrame()
    if p.empty: return None
    return p["stagewise"] - p[base], _share(p, 2), f"stronger baseline: {base}"


def _claim_2(r, ds, metric, small=None):
    base = stronger_baseline(r, ds, 1.0, metric)
    p = paired(r, ds, 1.0, ["stagewise", "simultaneous", base], metric) if base else pd.DataFrame()
    if p.empty: return None
    return (p["stagewise"] - p[base]) / 2 - (p["simultaneous"] - p[base]), _share(p, 3), f"baseline: {base}"


def _claim_3(r, ds, metric, small):
    bases = [stronger_baseline(r, ds, f, metric) for f in (small, 1.0)]
    if None in bases: return None
    lo, hi = (paired(r, ds, f, ["stagewise", b], metric).set_index(PAIR)
              .rename(columns={"stagewise": f"sw_{k}", b: f"base_{k}", "converged": f"conv_{k}"})
              for f, b, k in zip((small, 1.0), bases, ("small", "full")))
    both = lo.join(hi, how="inner")
    if both.empty: return None
    d = (both["sw_small"] - both["base_small"]) - (both["sw_full"] - both["base_full"])
    conv = both[["conv_small", "conv_full"]].astype(float)
    share = float(conv.sum().sum() / (4 * len(both))) if conv.notna().any().any() else np.nan
    return d, share, f"baselines: {bases[0]} at {fraction_label(small)}, {bases[1]} at full data"


def _claim_4(r, ds, metric, small=None):
    t = r[(r["kind"] == "teacher") & (r["dataset"] == ds)][metric] if len(r) and "kind" in r else []
    p = paired(r, ds, 1.0, ["stagewise"], metric)
    if not len(t) or p.empty: return None
    return float(np.mean(t)) - p["stagewise"], _share(p, 1), "teacher minus stagewise"


CLAIMS = [
    ("1. stagewise beats no teacher (full data)", _claim_1, 0.0, True,
     "stagewise minus the stronger no-teacher baseline, paired by student and seed: 95% interval above 0"),
    ("2. simultaneous gains less than half as much as stagewise (full data)", _claim_2, 0.0, True,
     "half the stagewise gain minus the simultaneous gain over the same baseline, paired: 95% interval above 0"),
    ("3. the stagewise gain is larger with less data", _claim_3, 0.0, True,
     "gain (stagewise minus the stronger baseline) on the smallest fraction minus the gain on full data, paired "
     "by student and seed: 95% interval above 0"),
    ("4. stagewise students come close to the teacher (full data)", _claim_4, 2.0, False,
     "teacher minus stagewise, per student and seed: 95% interval below 2 points"),
]
_RULE_END = ("; below (above for claim 4) it: not reproduced; across it, with fewer than 2 pairs, or with fewer "
             f"than {MIN_CONVERGED:.0%} of the runs converged: inconclusive")


def claims(records: pd.DataFrame, paper: pd.DataFrame = None, metric: str = "test_accuracy") -> pd.DataFrame:
    """The paper's claims checked against `records`, a row per claim and dataset: our mean difference with its
    95% interval, the share of the runs involved that converged, the same statistic from the paper's own
    numbers (their range over the paper's datasets when it did not run ours), the verdict and its rule."""
    rows = []
    pr = paper_as_records(paper) if paper is not None and len(paper) else pd.DataFrame(columns=["kind"])
    s = records[records["kind"] == "student"] if records is not None and len(records) and "kind" in records \
        else pd.DataFrame(columns=["dataset", "fraction"])
    for ds in sorted(set(s["dataset"])):
        fractions = sorted({float(f) for f in s.loc[s["dataset"] == ds, "fraction"]})
        small = fractions[0] if fractions and fractions[0] < 1 else None
        for name, fn, threshold, above, rule in CLAIMS:
            if fn is _claim_3 and small is None: continue
            res = fn(records, ds, metric, small)
            if res is None: continue
            d, share, note = res
            mean, low, high, n = interval(d)
            conv = "n/a" if not np.isfinite(share) else f"{share:.0%}"
            rows.append(dict(claim=name if fn is not _claim_3 else f"{name} ({fraction_label(small)})", dataset=ds,
                             ours=f"{_fmt(mean, low, high, n)} ({note}; runs converged: {conv})",
                             paper=_paper_cell(fn, pr, ds, metric), converged=share,
                             verdict=verdict(low, high, threshold, above, share), rule=rule + _RULE_END))
    return pd.DataFrame(rows, columns=["claim", "dataset", "ours", "paper", "converged", "verdict", "rule"])


def _paper_cell(fn, pr: pd.DataFrame, ds: str, metric: str) -> str:
    "The claim's statistic from the paper's numbers: on `ds` when the paper ran it, else its range over its datasets."
    def mean(d):
        res = fn(pr, d, "test_accuracy", 0.25) if len(pr) else None
        return interval(res[0])[0] if res is not None else np.nan
    if ds in PAPER_DATASETS:
        m = mean(ds)
        return "n/a" if not np.isfinite(m) else f"{m:+.1f} (mean over students, one run each)"
    vals = [v for v in map(mean, PAPER_DATASETS) if np.isfinite(v)]
    return f"range {min(vals):+.1f} to {max(vals):+.1f} over its datasets" if vals else "n/a"


def verdicts(table: pd.DataFrame) -> dict:
    "`verdict_1` to `verdict_4`: each claim's verdicts in a `claims` table, as 'verdict on dataset; ...'."
    out = {}
    for n in range(1, 5):
        r = table[table["claim"].str.startswith(f"{n}.")]
        out[f"verdict_{n}"] = ("; ".join(f"{v} on {d}" for v, d in zip(r["verdict"], r["dataset"])) if len(r)
                               else "not tested by these runs")
    return out
