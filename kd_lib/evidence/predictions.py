"""What the models of a record set called each test image, from the `test_predictions` their records keep
(`kd_lib.recipes.fitting.predictions_of`: labels and predicted classes in the test split's order), so a page shows a
model's answers without its weights: `class_accuracy`, the accuracy per class of the teacher and of each arm, and
`predictions_grid`, a few test images per class with each model's answer (where the images are at hand)."""
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..data.loaders import split_items
from ..infra.files import read_json
from .figures import Figure
from .saturation import arm_label
from .style import method_order

__all__ = ["answers", "class_accuracy", "predictions_grid"]


def _model(row) -> str:
    return "teacher" if row["kind"] == "teacher" else arm_label(row["student"], row["method"], row["fraction"])


def answers(records: pd.DataFrame) -> pd.DataFrame:
    """One row per record of `records` (`kd_lib.evidence.collect.collect`) that keeps its test predictions, at its
    normal budget: `model` (the teacher, or '<student> <method> at <fraction>'), `seed`, `vocab`, `labels`, `predicted`,
    `data` (its record's split info), `record` (its path), in the order of the book's tables (the teacher first)."""
    rows = []
    for _, row in records.iterrows():
        if not pd.isna(row.get("budget", 1)) and row.get("budget", 1) != 1: continue  # long twins: not shown
        record = read_json(Path(row["record"]))
        if not (kept := record.get("test_predictions")): continue
        rows.append(dict(model=_model(row), method="teacher" if row["kind"] == "teacher" else row["method"],
                         fraction=row.get("fraction"), seed=row.get("seed"), vocab=record["data"]["vocab"],
                         labels=kept["labels"], predicted=kept["predicted"], data=record["data"],
                         record=row["record"]))
    out = pd.DataFrame(rows, columns=["model", "method", "fraction", "seed", "vocab", "labels", "predicted", "data",
                                      "record"])
    if out.empty: return out
    order = {m: i for i, m in enumerate(["teacher", *method_order(out["method"])])}
    out = out.assign(_m=out["method"].map(order), _f=-out["fraction"].fillna(2.0))
    return out.sort_values(["_f", "_m", "seed"]).drop(columns=["_m", "_f"]).reset_index(drop=True)


def class_accuracy(records: pd.DataFrame) -> pd.DataFrame:
    """The test accuracy (%) per class (rows, by the records' class names) of the teacher and of each arm (columns,
    the mean over its seeds; `n` in the column name when more than one), from the records' test predictions."""
    ans = answers(records)
    if ans.empty: return pd.DataFrame()
    columns = {}
    for model, runs in ans.groupby("model", sort=False):
        per_run = [pd.Series(np.asarray(r.predicted) == np.asarray(r.labels)).groupby(np.asarray(r.labels)).mean()
                   for r in runs.itertuples()]
        columns[model if len(runs) == 1 else f"{model} (n={len(runs)})"] = 100 * pd.concat(per_run, axis=1).mean(1)
    table = pd.DataFrame(columns)
    table.index = [ans["vocab"].iloc[0][i] for i in table.index]
    return table.rename_axis("class").reset_index()


def predictions_grid(records: pd.DataFrame, root, per_class: int = 3, seed: int = 0) -> Figure:
    """`per_class` test images of each class (drawn by `seed`), from the dataset tree at `root`, each with the
    answers of the teacher and of each arm's run at `seed` (ticked when right); the test split is drawn again from
    the records' split info and checked against its hash (`kd_lib.data.loaders.split_items`)."""
    ans = answers(records)
    if not ((ans["method"] != "teacher") & (ans["seed"] == seed)).any():
        raise ValueError(f"No student's record keeps test predictions at seed {seed}: nothing to show.")
    ans = ans[(ans["method"] == "teacher") | (ans["seed"] == seed)]
    items = split_items(ans["data"].iloc[0], root, "test")
    vocab, labels = ans["vocab"].iloc[0], np.asarray(ans["labels"].iloc[0])
    if len(items) != len(labels):
        raise ValueError(f"{len(items)} test images in {root} and {len(labels)} predictions kept: other data.")
    rng = np.random.default_rng(seed)
    shown = [i for c in range(len(vocab)) for i in sorted(rng.permutation(np.flatnonzero(labels == c))[:per_class])]
    cols = min(6, len(shown))
    rows = -(-len(shown) // cols)
    fig = Figure(figsize=(2.6 * cols, (2.2 + 0.14 * len(ans)) * rows + 0.6))
    for k, i in enumerate(shown):
        ax = fig.add_subplot(rows, cols, k + 1)
        with Image.open(Path(root) / items[i][0]) as im: ax.imshow(np.asarray(im.convert("RGB")))
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(vocab[labels[i]], fontsize=9, fontweight="bold")
        lines = [f"{'✓' if r.predicted[i] == r.labels[i] else '✗'} {vocab[r.predicted[i]]}" for r in ans.itertuples()]
        ax.set_xlabel("\n".join(lines), fontsize=7, loc="left", linespacing=1.25)
    fig.suptitle("Test images under their class; below each, what each model called it, top to bottom: "
                 + "; ".join(ans["model"]) + f" (students at seed {seed})", fontsize=9, wrap=True)
    fig.tight_layout()
    return fig
