"""The book's tables as a reader sees them: numbers to two decimals, yes/no for flags, a dash where there is
nothing, no index (`book_table`); and the claims in the form of the results in brief (`claims_summary`)."""
import numpy as np
import pandas as pd

__all__ = ["DASH", "book_table", "claims_summary"]

DASH = "\u2013"  # where a table has no value


def _cell(v, decimals: int, signed: bool, whole: bool = False) -> str:
    if isinstance(v, (bool, np.bool_)): return "yes" if v else "no"
    if v is None or (isinstance(v, float) and not np.isfinite(v)): return DASH
    if isinstance(v, (int, np.integer)) or whole: return f"{int(v):,}"  # 21,549,642
    if isinstance(v, (float, np.floating)): return f"{v:+.{decimals}f}" if signed else f"{v:.{decimals}f}"
    return DASH if pd.isna(v) else str(v)


def book_table(df: pd.DataFrame, signed=(), decimals: int = 2, whole=(), left: bool = True):
    """`df` as a styled table for the book: floats to `decimals` places (with a sign in the columns `signed`; as
    whole numbers in the columns `whole`, counts that a missing value made floats), flags as yes/no, missing values
    as a dash, no index; text aligned left when `left`."""
    shown = pd.DataFrame({c: [_cell(v, decimals, c in signed, c in whole) for v in df[c]] for c in df.columns})
    styler = shown.style.hide(axis="index")
    return styler.set_properties(**{"text-align": "left"}) if left else styler


def _budget_cell(r) -> str:
    if not r["n"]: return DASH  # no pair: nothing to take the budget of
    if not np.isfinite(r["at_1x"]) and not np.isfinite(r["at_2x"]): return "not run"
    pair = f"{_cell(r['at_1x'], 2, True)} \u2192 {_cell(r['at_2x'], 2, True)}"
    return f"{pair}: {r['budget']}" if r["budget"] else pair


def claims_summary(table: pd.DataFrame, dataset: bool = False) -> pd.DataFrame:
    """A `kd_lib.evidence.claims.claims` table in the results' form: the claim, ours (mean and 95% interval), n pairs,
    the minimum detectable effect, the paper's difference, the verdict and the budget column (the seed-0 difference at
    the normal budget -> at twice it, and the flag); `dataset`: a column naming it."""
    rows = [{"claim": r["claim"], **({"dataset": r["dataset"]} if dataset else {}),
             "ours": (f"{r['mean']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]" if np.isfinite(r["low"])
                      else f"{r['mean']:+.2f}" if np.isfinite(r["mean"]) else DASH),
             "n": int(r["n"]), "MDE": _cell(r["mde"], 2, False), "paper": r["paper"], "verdict": r["verdict"],
             "budget (seed 0: 1x \u2192 2x)": _budget_cell(r)} for _, r in table.iterrows()]
    return pd.DataFrame(rows, columns=["claim", *(["dataset"] if dataset else []), "ours", "n", "MDE", "paper",
                                       "verdict", "budget (seed 0: 1x \u2192 2x)"])
