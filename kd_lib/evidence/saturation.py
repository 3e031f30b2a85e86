"""Was each arm's budget enough? Its long twin is a diagnostic: the arm's first seed run again with every budget
doubled (`kd_lib.recipes.budget.LONG_BUDGET`: every epoch cap and patience, a fixed schedule's epochs, a budget
control's twin epochs; a profile's `long_twins`). What doubling adds to its test accuracy (same seed) is the arm's
`gain`. One seed's gain is about as noisy as the difference of two seeds, so it gates nothing: the claims show the
budget as a column of their own (`kd_lib.evidence.claims`).

* `normal_runs`, `long_twins`: a `collect` table's runs at budget 1 and its long twins.
* `saturation`: a row per arm with a long twin: normal and long accuracy, the gain, whether it was under a point.
"""
import pandas as pd

from ..recipes.budget import LONG_BUDGET
from .results import fraction_label

__all__ = ["SATURATED_BELOW", "SATURATION_RULE", "ARM", "normal_runs", "long_twins", "saturation", "arm_label"]

SATURATED_BELOW = 1.0  # points of test accuracy: a gain under it is shown as "under a point" (a diagnostic)
SATURATION_RULE = (f"Each arm (a student, method and data fraction; and the teacher) has a long twin: its first seed "
                   f"with every budget multiplied by {LONG_BUDGET} (epoch caps and patience, fixed schedules, a budget "
                   "control's epochs), everything else equal. The table shows what doubling gave each arm's test "
                   f"accuracy (same seed), and whether that was under {SATURATED_BELOW:g} point: a diagnostic, not a "
                   "gate, since one seed's gain is about as noisy as the difference of two seeds.")
ARM = ["dataset", "student", "method", "fraction"]
TEACHER = ("resnet34", "teacher", 1.0)  # the teacher as an arm: (student, method, fraction)


def _budget(records: pd.DataFrame) -> pd.Series:
    "Each run's budget multiplier (1 for records made before runs had one)."
    if "budget" not in records: return pd.Series(1, index=records.index)
    return records["budget"].fillna(1).astype(int)


def normal_runs(records: pd.DataFrame) -> pd.DataFrame:
    "The runs of `records` (a `collect` table) at their set budget: what every table, figure and claim is made of."
    return records if records is None or records.empty else records[_budget(records) == 1]


def long_twins(records: pd.DataFrame) -> pd.DataFrame:
    "The long twins in `records` (a `collect` table): runs at `LONG_BUDGET`."
    return records.iloc[0:0] if records is None or records.empty else records[_budget(records) == LONG_BUDGET]


def _arms(records: pd.DataFrame) -> pd.DataFrame:
    "`records` with the teacher's row as an arm of its own (student resnet34, method teacher, full data)."
    r = records.copy()
    teacher = r["kind"] == "teacher"
    for col, value in zip(ARM[1:], TEACHER):  # a column no student gave (a teacher alone) is the teacher's
        r[col] = r[col].astype(object).where(~teacher, value) if col in r else value
    r["fraction"] = r["fraction"].astype(float)
    return r


def saturation(records: pd.DataFrame, metric: str = "test_accuracy") -> pd.DataFrame:
    """A row per arm of `records` (a `collect` table, long twins included) that has a long twin: its `seed`, the
    `normal` run's and the `long` twin's `metric`, the `gain` doubling gave and whether the arm is `saturated`."""
    cols = ARM + ["seed", "normal", "long", "gain", "saturated"]
    if records is None or records.empty or "kind" not in records: return pd.DataFrame(columns=cols)
    r = _arms(records)
    key = ARM + ["seed"]
    twins = long_twins(r)[key + [metric]].rename(columns={metric: "long"})
    normal = normal_runs(r)[key + [metric]].rename(columns={metric: "normal"})
    out = twins.merge(normal, on=key, how="left")
    out["gain"] = out["long"] - out["normal"]
    out["saturated"] = out["gain"] < SATURATED_BELOW
    return out[cols].sort_values(ARM).reset_index(drop=True)


def arm_label(student: str, method: str, fraction: float) -> str:
    "'resnet10 stagewise at full data', or 'the teacher'."
    return "the teacher" if method == "teacher" else f"{student} {method} at {fraction_label(fraction)}"
