"""The numbers of the book's results, from run records (`kd_lib.evidence.collect.collect`) and the paper's published
numbers (`kd_lib.evidence.paper.paper_results`): records in, DataFrames, dicts and strings out; nothing here draws or
types in a result (`kd_lib.evidence.figures` draws them).

* `summary`, `teachers`: our runs grouped over seeds; `gaps`: one method minus another, student by student.
* `comparison`: every number of the figures, ours beside the paper's; `provenance`: what produced the records.
* `selection`: what picking epochs on the test set adds, and the
  accuracy on the unused part of the training set (the paper's other description of "less data").
* `teacher_forcing`: sequential stagewise against teacher-forced stages: accuracy, time and drift.
* `provenance_text`, `headline`: what the book's text quotes of these, as strings to glue.

The paper's claims, with their rules and uncertainty, are `kd_lib.evidence.claims`.
"""
import numpy as np
import pandas as pd

from .style import method_order

__all__ = ["PAPER_DATASETS", "BASELINES", "stronger_baseline", "n_layers", "fraction_label", "summary", "teachers",
           "gaps", "comparison", "provenance", "provenance_text", "paper_as_records", "selection", "teacher_forcing",
           "headline"]

PAPER_DATASETS = ["imagenette", "imagewoof", "cifar10"]
BASELINES = ("no_teacher", "no_teacher_budget")  # the paper's early-stopped baseline, and the same-budget control
KEYS = ["dataset", "fraction", "student", "method"]


def n_layers(student: str) -> int:
    "The number of layers a student's name says: 'resnet26' -> 26."
    return int(str(student).removeprefix("resnet"))


def fraction_label(fraction: float) -> str:
    "1.0 -> 'full data', 0.25 -> '25% of the data'."
    return "full data" if fraction >= 1 else f"{100 * fraction:g}% of the data"


def _ranks(methods) -> dict:
    return {m: i for i, m in enumerate(method_order(methods))}


def stronger_baseline(records: pd.DataFrame, dataset: str, fraction: float, metric: str = "test_accuracy"):
    """The baseline of `BASELINES` with the higher mean `metric` at `dataset` and `fraction` over the runs at their
    set budget (None if none ran): the "no teacher" of every claim and headline."""
    if records is None or records.empty or "kind" not in records: return None
    s = records[(records["kind"] == "student") & (records["dataset"] == dataset) & records["method"].isin(BASELINES)]
    if "budget" in s: s = s[s["budget"].fillna(1) == 1]
    s = s[np.isclose(s["fraction"].astype(float), fraction)]
    means = s.groupby("method")[metric].mean()
    return None if means.empty else str(means.idxmax())


def summary(records: pd.DataFrame, metric: str = "test_accuracy") -> pd.DataFrame:
    """Student runs grouped over seeds: one row per dataset, fraction, student and method with the
    `mean`, `std` (0 for one seed) and `n` (seeds) of `metric`, the seeds and the epochs used."""
    cols = KEYS + ["layers", "mean", "std", "n", "seeds", "epochs"]
    if records is None or records.empty or "kind" not in records: return pd.DataFrame(columns=cols)
    s = records[records["kind"] == "student"]
    if s.empty: return pd.DataFrame(columns=cols)
    g = s.groupby(KEYS, sort=False)
    out = g[metric].agg(mean="mean", std=lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0, n="count")
    out["seeds"] = g["seed"].agg(lambda v: ",".join(str(int(x)) for x in sorted(v)))
    out["epochs"] = g["epochs"].agg(lambda v: ",".join(str(int(x)) for x in sorted(set(v))))
    out = out.reset_index()
    out["layers"] = out["student"].map(n_layers)
    return out.sort_values(["dataset", "fraction", "method", "layers"], ascending=[True, False, True, True],
                           key=lambda c: c.map(_ranks(c)) if c.name == "method" else c)[cols] \
              .reset_index(drop=True)


def teachers(records: pd.DataFrame, metric: str = "test_accuracy") -> pd.Series:
    "Teacher `metric` per dataset (mean over teacher runs) from the records' teacher rows."
    if records is None or records.empty or "kind" not in records: return pd.Series(dtype=float)
    t = records[records["kind"] == "teacher"]
    return t.groupby("dataset")[metric].mean()


def gaps(records: pd.DataFrame, better: str = "stagewise", than: str = "no_teacher",
         metric: str = "test_accuracy") -> pd.DataFrame:
    """Per dataset and fraction, `better` minus `than` in points of `metric`, student by student (means over
    seeds): the mean, min and max over students, how many students `better` beats `than` on, and on how
    many of them the gap exceeds the two std (over seeds) added, and the fewest seeds of any of those means.
    `than` may be a dict of fraction -> method (the baseline of each fraction)."""
    s = summary(records, metric).set_index(KEYS)
    cols = ["dataset", "fraction", "mean_gap", "min_gap", "max_gap", "students", "wins", "clear_wins", "seeds"]
    if s.empty: return pd.DataFrame(columns=cols)
    rows, per_fraction = [], than if isinstance(than, dict) else None
    for (ds, fr), grp in s.groupby(level=["dataset", "fraction"]):
        if per_fraction is not None and (than := per_fraction.get(float(fr))) is None: continue
        m = grp.reset_index().pivot(index="student", columns="method", values="mean")
        sd = grp.reset_index().pivot(index="student", columns="method", values="std")
        if better not in m or than not in m: continue
        d = (m[better] - m[than]).dropna()
        if d.empty: continue
        noise = (sd[better] + sd[than]).reindex(d.index)
        rows.append(dict(dataset=ds, fraction=fr, mean_gap=d.mean(), min_gap=d.min(), max_gap=d.max(),
                         students=len(d), wins=int((d > 0).sum()), clear_wins=int((d > noise).sum()),
                         seeds=int(grp.reset_index().query("method in [@better, @than]")["n"].min())))
    return pd.DataFrame(rows, columns=cols).sort_values(["dataset", "fraction"], ascending=[True, False]) \
             .reset_index(drop=True)


def comparison(records: pd.DataFrame, paper: pd.DataFrame = None, metric: str = "test_accuracy") -> pd.DataFrame:
    """Every number of the figures in one table: ours (mean, std, seeds) beside the paper's accuracy for the
    same dataset, fraction, student and method (empty where the paper has none), teachers included."""
    s = summary(records, metric).rename(columns={"mean": "ours", "std": "ours_std", "n": "ours_seeds"})
    t = teachers(records, metric)
    if len(t):
        trows = pd.DataFrame(dict(dataset=t.index, fraction=1.0, student="resnet34", method="teacher", layers=34,
                                  ours=t.values, ours_std=np.nan, ours_seeds=np.nan))
        s = pd.concat([trows, s], ignore_index=True) if len(s) else trows
    if s.empty: return pd.DataFrame(columns=KEYS + ["layers", "ours", "ours_std", "ours_seeds", "paper"])
    if paper is not None and len(paper):
        s = s.merge(paper.rename(columns={"accuracy": "paper"}), on=KEYS, how="left")
    else: s["paper"] = np.nan
    return s[KEYS + ["layers", "ours", "ours_std", "ours_seeds", "paper"]]


def provenance(records: pd.DataFrame) -> dict:
    """What produced `records`: datasets, seeds, epochs per kind/method, image sizes, batch sizes, learning
    rates, the devices, torch threads and code commits of the records' `versions`, and the compute time summed."""
    if records is None or records.empty:
        return dict(runs=0, datasets=[], seeds=[], epochs={}, sizes=[], bs=[], lr={}, fractions=[], devices=[],
                    threads=[], commits=[], schedules=[], patience=[], hours=0.0)
    st, te = records[records["kind"] == "student"], records[records["kind"] == "teacher"]
    epochs = {"teacher": sorted({int(e) for e in te["epochs"]})} if len(te) else {}
    for m in method_order(st.get("method", [])):  # a budget control's epochs are those it ran, its twin's
        col = "epochs_run" if "budget_twin" in st and st.loc[st["method"] == m, "budget_twin"].notna().any() \
            else "epochs"
        epochs[m] = sorted({int(e) for e in st.loc[st["method"] == m, col]})
    lr = {}
    if len(te): lr["teacher"] = sorted(set(te["lr"]))
    if len(st): lr["student"] = sorted(set(st["lr"]))
    return dict(runs=len(records), datasets=sorted(set(records["dataset"])),
                seeds=sorted({int(x) for x in st.get("seed", [])}),
                epochs=epochs, sizes=sorted({int(x) for x in records["size"].dropna()}) if "size" in records else [],
                bs=sorted({int(x) for x in records["bs"]}), lr=lr,
                fractions=sorted({float(x) for x in st.get("fraction", [])}, reverse=True),
                devices=sorted(set(records["device"])),
                threads=sorted({int(t) for t in records["torch_threads"].dropna()}),
                commits=sorted({c[:8] for c in records["commit"].dropna()}) if "commit" in records else [],
                schedules=sorted(set(st["schedule"].dropna())) if "schedule" in st else [],
                patience=sorted({int(p) if p == p and p is not None else None for p in st.get("patience", [])},
                                key=lambda p: -1 if p is None else p),
                hours=float(records["wall_time_s"].sum()) / 3600)


def _listing(values) -> str:
    return ", ".join(map(str, values)) if values else "none"


def provenance_text(records: pd.DataFrame) -> dict:
    """`provenance` written out for the book's text: `datasets`, `seeds`, `n_seeds`, `epochs`, `sizes`,
    `batch_sizes`, `lrs`, `fractions`, `hardware`, `commits`, `schedules`, `patience` (of the students: "none"
    for the paper's fixed epochs), `n_runs` and `compute_hours`."""
    f = provenance(records)
    def per(d): return "; ".join(f"{k} {_listing(v)}" for k, v in d.items()) or "none"
    return dict(datasets=_listing(f["datasets"]), seeds=_listing(f["seeds"]), n_seeds=len(f["seeds"]),
                epochs=per(f["epochs"]), sizes=_listing(f["sizes"]), batch_sizes=_listing(f["bs"]), lrs=per(f["lr"]),
                fractions=_listing(f["fractions"]),
                hardware=_listing(f["devices"]) + f", {_listing(f['threads'])} torch thread(s) per run",
                commits=_listing(f["commits"]) if f["commits"] else "not recorded",
                schedules=_listing(f["schedules"]),
                patience=_listing(["none" if p is None else p for p in f["patience"]]),
                n_runs=f["runs"], compute_hours=f"{f['hours']:.2f}")


def paper_as_records(paper: pd.DataFrame) -> pd.DataFrame:
    "The paper's numbers shaped like `collect`'s records (one seed, accuracy as test_accuracy), for `summary`/`gaps`."
    if paper is None or paper.empty: return pd.DataFrame(columns=["kind", "dataset", "test_accuracy"])
    st = paper[paper["method"] != "teacher"]
    te = paper[paper["method"] == "teacher"]
    rows = [dict(kind="student", dataset=r.dataset, student=r.student, method=r.method, fraction=float(r.fraction),
                 seed=0, epochs=100, test_accuracy=r.accuracy) for r in st.itertuples()]
    rows += [dict(kind="teacher", dataset=r.dataset, epochs=50, test_accuracy=r.accuracy) for r in te.itertuples()]
    return pd.DataFrame(rows)


def _num(x, fmt="{:+.1f}") -> str:
    return "n/a" if x is None or not np.isfinite(x) else fmt.format(x)


def _in_order(df: pd.DataFrame, cols: list) -> pd.DataFrame:
    "`df`'s `cols`, rows by dataset, fraction (largest first) and method (display order)."
    ranks = _ranks(df["method"])
    return df.sort_values(["dataset", "fraction", "method"], ascending=[True, False, True],
                          key=lambda c: c.map(ranks) if c.name == "method" else c)[cols].reset_index(drop=True)


def selection(records: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, fraction and method, means over the runs that recorded them: the test accuracy of the epoch
    picked on the valid split (ours), of the epoch picked on the test set (the paper's protocol) and the
    difference (what the paper's protocol adds), and the accuracy on the unused part of the training set."""
    cols = ["dataset", "fraction", "method", "runs", "valid_selected", "test_selected", "added", "unused"]
    if records is None or records.empty or "best_test_accuracy" not in records: return pd.DataFrame(columns=cols)
    s = records[(records["kind"] == "student") & (records["best_test_accuracy"].notna()
                                                 | records["unused_accuracy"].notna())]
    if s.empty: return pd.DataFrame(columns=cols)
    s = s.assign(added=s["best_test_accuracy"] - s["test_accuracy"])
    g = s.groupby(["dataset", "fraction", "method"], sort=False)
    out = g.agg(runs=("test_accuracy", "count"), valid_selected=("test_accuracy", "mean"),
                test_selected=("best_test_accuracy", "mean"), added=("added", "mean"),
                unused=("unused_accuracy", "mean")).reset_index()
    return _in_order(out, cols)


def teacher_forcing(records: pd.DataFrame, methods=("stagewise", "teacher_forced", "teacher_forced_finetune")):
    """Sequential stagewise against teacher-forced stages (with and without the fine-tune), per dataset, fraction,
    student and method, means over seeds: test accuracy, CPU seconds of training, and the MSE of the student's
    own (composed) feature maps to the teacher's at each stage on the valid split (the drift)."""
    mse = [c for c in records.columns if c.startswith("mse_")] if records is not None else []  # in stage order
    cols = ["dataset", "fraction", "student", "method", "runs", "test_accuracy", "cpu_s", *mse]
    if records is None or records.empty or "method" not in records: return pd.DataFrame(columns=cols)
    s = records[(records["kind"] == "student") & records["method"].isin(methods)]
    if s.empty or not s["method"].isin(methods[1:]).any(): return pd.DataFrame(columns=cols)
    s = s.assign(**{c: s[c] if c in s else np.nan for c in mse})
    g = s.groupby(["dataset", "fraction", "student", "method"], sort=False)
    out = g.agg(runs=("test_accuracy", "count"), test_accuracy=("test_accuracy", "mean"), cpu_s=("cpu_s", "mean"),
                **{c: (c, "mean") for c in mse}).reset_index()
    ranks = _ranks(out["method"])
    order = dict(method=lambda c: c.map(ranks), student=lambda c: c.map(n_layers))
    return out.sort_values(["dataset", "fraction", "student", "method"], ascending=[True, False, True, True],
                           key=lambda c: order[c.name](c) if c.name in order else c)[cols].reset_index(drop=True)


def _at(df: pd.DataFrame, fraction: float) -> pd.DataFrame:
    "The rows of `df` at training `fraction`."
    return df[np.isclose(df["fraction"].astype(float), fraction)] if len(df) else df


def headline(records: pd.DataFrame, metric: str = "test_accuracy") -> dict:
    """The numbers the results page quotes, as text: stagewise minus the stronger no-teacher baseline of each
    fraction (`stronger_baseline`, the claims' "no teacher"; the mean over datasets of `gaps`' `mean_gap`) at full
    data (`gap_full`) and at the smallest fraction (`gap_small`, `small_fraction`), the students it is better for
    there (`wins_full`, `wins_small`: 'k of n'), simultaneous minus that baseline at full data (`sim_gap_full`), the
    baselines (`baseline_full`, `baseline_small`) and the teachers' mean (`teacher_accuracy`); 'n/a' where the
    records have none."""
    has = records is not None and len(records) > 0 and "kind" in records
    fractions = {float(f) for f in records.loc[records["kind"] == "student", "fraction"]} if has else set()
    small = min(fractions) if fractions and min(fractions) < 1 else np.nan
    datasets = sorted(set(records.loc[records["kind"] == "student", "dataset"])) if has else []
    base = {f: stronger_baseline(records, datasets[0], f, metric) for f in fractions} if len(datasets) == 1 else \
        {f: "no_teacher" for f in fractions}  # several datasets: the paper's baseline, common to all
    g, gs = gaps(records, than=base, metric=metric), gaps(records, "simultaneous", than=base, metric=metric)
    t = records.loc[records["kind"] == "teacher", metric] if has else pd.Series(dtype=float)

    def gap(df, fraction): return _num(_at(df, fraction)["mean_gap"].mean())

    def wins(fraction):
        r = _at(g, fraction)
        return f"{int(r['wins'].sum())} of {int(r['students'].sum())}" if len(r) else "n/a"

    return dict(gap_full=gap(g, 1.0), gap_small=gap(g, small),
                small_fraction=fraction_label(small) if np.isfinite(small) else "n/a",
                wins_full=wins(1.0), wins_small=wins(small), sim_gap_full=gap(gs, 1.0),
                baseline_full=base.get(1.0) or "n/a", baseline_small=base.get(small) or "n/a",
                teacher_accuracy=_num(t.mean(), "{:.1f}"))
