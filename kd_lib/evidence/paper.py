"""The paper's own published numbers (Table 1, Figures 3 and 4), as the paper printed them.

They live as CSV files in the package (``kd_lib/paper_numbers/``, installed with it); these are the
only typed-in numbers of the project, and they are always labelled as the paper's.
"""
from pathlib import Path

import pandas as pd

__all__ = ["PAPER_DIR", "paper_table1", "paper_results", "paper_format"]

PAPER_DIR = Path(__file__).resolve().parent / "paper_numbers"


def paper_table1() -> pd.DataFrame:
    "Table 1 as printed: `params` and `flops` strings such as '21.550M', indexed by model."
    return pd.read_csv(PAPER_DIR / "table1.csv", index_col="model", dtype=str)


def paper_results() -> pd.DataFrame:
    "Accuracies (%) of Figures 3 and 4: dataset, student, fraction, method, accuracy (teachers as method 'teacher')."
    return pd.read_csv(PAPER_DIR / "results.csv")


def paper_format(n: int) -> str:
    "An integer count written as the paper's Table 1 writes it: 3 decimals and a G or M suffix."
    return f"{n / 1e9:.3f}G" if n >= 1e9 else f"{n / 1e6:.3f}M"
