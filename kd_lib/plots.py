"""The book's figures and the numbers beside them, drawn from run records (`kd_lib.records.collect`)
and the paper's published numbers (`kd_lib.paper.paper_results`).

Every function takes data and returns a matplotlib `Figure` (or a DataFrame); nothing here trains,
and nothing here types in a result. Figures are built without pyplot, so a notebook shows each one
once, as the value of its cell, and `myst_nb.glue` can paste it elsewhere in the book.

* `summary`, `teachers`, `gaps`, `comparison`, `provenance`: records -> tables and facts.
* `accuracy_vs_layers` (`figure3`, `figure4`): the paper's Figures 3 and 4, ours beside the paper's.
* `history_figure`: a run's loss (and accuracy) per epoch, one panel per step.
* `feature_maps_figure`: teacher vs student feature maps at each stage, for one image.
* `stage_diagram`: teacher, student, the hook points and the order of the stages.
"""
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as _MplFigure
from matplotlib.patches import FancyBboxPatch, Rectangle

from .models import BLOCKS, FEATURE_STAGES, resnet, stage_shapes
from .records import RECORD, read_json

__all__ = ["METHOD_COLORS", "PAPER_DATASETS", "n_layers", "summary", "teachers", "gaps", "comparison", "provenance",
           "accuracy_vs_layers", "figure3", "figure4", "history_figure", "feature_maps_figure", "stage_diagram",
           "load_student", "fraction_label", "paper_as_records", "claims", "paper_figure"]

METHOD_ORDER = ["no_teacher", "simultaneous", "stagewise", "hinton", "fitnets"]
METHOD_COLORS = {"no_teacher": "tab:blue", "simultaneous": "tab:orange", "stagewise": "tab:green",
                 "hinton": "tab:purple", "fitnets": "tab:brown"}
METHOD_MARKERS = {"no_teacher": "o", "simultaneous": "s", "stagewise": "^", "hinton": "D", "fitnets": "v"}
PAPER_DATASETS = ["imagenette", "imagewoof", "cifar10"]
DATASET_TITLES = {"digits": "digits", "imagenette": "Imagenette", "imagewoof": "Imagewoof", "cifar10": "CIFAR10"}
KEYS = ["dataset", "fraction", "student", "method"]


class Figure(_MplFigure):
    """A matplotlib figure that shows itself as a PNG in Jupyter (and in `myst_nb.glue`) without pyplot:
    no global figure state, so a notebook shows it once, as the value of its cell."""
    def _repr_png_(self) -> bytes:
        import io
        buf = io.BytesIO()
        FigureCanvasAgg(self).print_png(buf)
        return buf.getvalue()


def n_layers(student: str) -> int:
    "The number of layers a student's name says: 'resnet26' -> 26."
    return int(str(student).removeprefix("resnet"))


def fraction_label(fraction: float) -> str:
    "1.0 -> 'full data', 0.25 -> '25% of the data'."
    return "full data" if fraction >= 1 else f"{100 * fraction:g}% of the data"


def _title(dataset: str) -> str:
    return DATASET_TITLES.get(dataset, dataset)


def _methods(present) -> list:
    present = list(dict.fromkeys(present))
    return [m for m in METHOD_ORDER if m in present] + sorted(m for m in present if m not in METHOD_ORDER)


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
                           key=lambda c: c.map(METHOD_ORDER.index) if c.name == "method" else c)[cols] \
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
    many of them the gap exceeds the two std (over seeds) added, and the fewest seeds of any of those means."""
    s = summary(records, metric).set_index(KEYS)
    cols = ["dataset", "fraction", "mean_gap", "min_gap", "max_gap", "students", "wins", "clear_wins", "seeds"]
    if s.empty: return pd.DataFrame(columns=cols)
    rows = []
    for (ds, fr), grp in s.groupby(level=["dataset", "fraction"]):
        m = grp.reset_index().pivot(index="student", columns="method", values="mean")
        sd = grp.reset_index().pivot(index="student", columns="method", values="std")
        if better not in m or than not in m: continue
        d = (m[better] - m[than]).dropna()
        if d.empty: continue
        noise = (sd[better] + sd[than]).reindex(d.index)
        rows.append(dict(dataset=ds, fraction=fr, mean_gap=d.mean(), min_gap=d.min(), max_gap=d.max(),
                         students=len(d), wins=int((d > 0).sum()), clear_wins=int((d > noise).sum()),
                         seeds=int(grp["n"].min())))
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
    rates, the devices and torch threads of the records' `versions`, and the compute time summed."""
    if records is None or records.empty:
        return dict(runs=0, datasets=[], seeds=[], epochs={}, sizes=[], bs=[], lr={}, fractions=[], devices=[],
                    threads=[], hours=0.0)
    st, te = records[records["kind"] == "student"], records[records["kind"] == "teacher"]
    epochs = {f"teacher": sorted({int(e) for e in te["epochs"]})} if len(te) else {}
    for m in _methods(st.get("method", [])):
        epochs[m] = sorted({int(e) for e in st.loc[st["method"] == m, "epochs"]})
    lr = {}
    if len(te): lr["teacher"] = sorted(set(te["lr"]))
    if len(st): lr["student"] = sorted(set(st["lr"]))
    return dict(runs=len(records), datasets=sorted(set(records["dataset"])),
                seeds=sorted({int(x) for x in st.get("seed", [])}),
                epochs=epochs, sizes=sorted({int(x) for x in records["size"].dropna()}) if "size" in records else [],
                bs=sorted({int(x) for x in records["bs"]}), lr=lr,
                fractions=sorted({float(x) for x in st.get("fraction", [])}, reverse=True),
                devices=sorted(set(records["device"])), threads=sorted({int(t) for t in records["torch_threads"].dropna()}),
                hours=float(records["wall_time_s"].sum()) / 3600)


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


def claims(records: pd.DataFrame, paper: pd.DataFrame = None, metric: str = "test_accuracy") -> pd.DataFrame:
    """The paper's claims checked against `records`, a row per claim and dataset: what we measured, what the
    paper's own numbers give for the same dataset (or their range over the paper's datasets when it has not
    run ours: 'range a to b' over its three datasets), and the verdict: 'reproduced' when the `rule` holds
    (for claim 1, 'partly reproduced' when it holds for some students), else 'not reproduced'.

    1. full data: stagewise above no_teacher for every student;
    2. full data: simultaneous gains less than half of stagewise's gain over no_teacher;
    3. the stagewise gain is larger on the smallest fraction than on full data;
    4. full data: stagewise students within 2 points of the teacher, on average."""
    rows = []
    pr = paper_as_records(paper) if paper is not None else None
    pg = gaps(pr) if pr is not None and len(pr) else pd.DataFrame(columns=["dataset"])
    pgs = gaps(pr, "simultaneous") if pr is not None and len(pr) else pd.DataFrame(columns=["dataset"])
    psum = summary(pr) if pr is not None and len(pr) else pd.DataFrame(columns=KEYS + ["mean"])
    pteach = teachers(pr) if pr is not None and len(pr) else pd.Series(dtype=float)
    g, gs, s, t = gaps(records, metric=metric), gaps(records, "simultaneous", metric=metric), \
        summary(records, metric), teachers(records, metric)

    def at(df, ds, fraction, col="mean_gap"):
        r = df[(df["dataset"] == ds) & np.isclose(df["fraction"].astype(float), fraction)] if len(df) else df
        return float(r[col].iloc[0]) if len(r) else None

    def teacher_gap(summ, teach, ds):
        sw = summ[(summ["dataset"] == ds) & np.isclose(summ["fraction"].astype(float), 1.0)
                  & (summ["method"] == "stagewise")] if len(summ) else summ
        return float(teach[ds] - sw["mean"].mean()) if len(sw) and ds in teach else None

    def paper_cell(fn, ds, fmt="{:+.1f}"):
        if ds in PAPER_DATASETS: return _num(fn(ds), fmt)
        vals = [v for v in (fn(d) for d in PAPER_DATASETS) if v is not None and np.isfinite(v)]
        return f"range {fmt.format(min(vals))} to {fmt.format(max(vals))}" if vals else "n/a"

    for ds in sorted(set(s["dataset"])) if len(s) else []:
        fr = sorted({float(f) for f in s.loc[s["dataset"] == ds, "fraction"]})
        small = fr[0] if fr and fr[0] < 1 else None
        # 1
        full = g[(g["dataset"] == ds) & np.isclose(g["fraction"].astype(float), 1.0)] if len(g) else g
        if len(full):
            r = full.iloc[0]
            verdict = ("reproduced" if r.wins == r.students else "partly reproduced" if r.wins else "not reproduced")
            rows.append(dict(claim="1. stagewise beats no_teacher (full data)", dataset=ds,
                             ours=f"{r.mean_gap:+.1f} points on average; above for {r.wins} of {r.students} students"
                                  + (f" ({r.clear_wins} by more than the two std over seeds added)" if r.seeds > 1
                                     else " (one seed)"),
                             paper=paper_cell(lambda d: at(pg, d, 1.0), ds) + " points",
                             verdict=verdict, rule="above for every student"))
        # 2
        sim, sw = at(gs, ds, 1.0), at(g, ds, 1.0)
        if sim is not None and sw is not None:
            rows.append(dict(claim="2. simultaneous gains little over no_teacher (full data)", dataset=ds,
                             ours=f"simultaneous {sim:+.1f}, stagewise {sw:+.1f} points over no_teacher",
                             paper="simultaneous " + paper_cell(lambda d: at(pgs, d, 1.0), ds) + ", stagewise "
                                   + paper_cell(lambda d: at(pg, d, 1.0), ds),
                             verdict="reproduced" if sim < sw / 2 else "not reproduced",
                             rule="simultaneous gain < half the stagewise gain"))
        # 3
        if small is not None and sw is not None and at(g, ds, small) is not None:
            lo = at(g, ds, small)
            rows.append(dict(claim=f"3. the stagewise gain is larger with less data ({fraction_label(small)})",
                             dataset=ds, ours=f"{lo:+.1f} points at {fraction_label(small)}, {sw:+.1f} at full data",
                             paper=paper_cell(lambda d: at(pg, d, 0.25), ds) + " at 25%, "
                                   + paper_cell(lambda d: at(pg, d, 1.0), ds) + " at full data",
                             verdict="reproduced" if lo > sw else "not reproduced",
                             rule="gain on the smallest fraction > gain on full data"))
        # 4
        tg = teacher_gap(s, t, ds)
        if tg is not None:
            rows.append(dict(claim="4. stagewise students come close to the teacher (full data)", dataset=ds,
                             ours=f"teacher minus stagewise: {tg:.1f} points on average",
                             paper=paper_cell(lambda d: teacher_gap(psum, pteach, d), ds, "{:.1f}") + " points",
                             verdict="reproduced" if tg <= 2 else "not reproduced",
                             rule="teacher minus stagewise at most 2 points"))
    return pd.DataFrame(rows, columns=["claim", "dataset", "ours", "paper", "verdict", "rule"])


# ---------------------------------------------------------------- Figures 3 and 4
def _errorbar(ax, rows: pd.DataFrame, method: str, label: str, dashed=False, paper=False):
    r = rows[rows["method"] == method].sort_values("layers")
    if r.empty: return
    ax.errorbar(r["layers"], r["mean"], yerr=None if paper else r["std"], color=METHOD_COLORS.get(method, "black"),
                marker=METHOD_MARKERS.get(method, "x"), ls=":" if paper else "--" if dashed else "-",
                alpha=0.45 if dashed else 1.0, capsize=3, lw=1.1 if paper else 1.6, ms=5,
                mfc="white" if paper else None, label=label)


def _teacher_line(ax, acc, label, paper=False):
    if acc is None or not np.isfinite(acc): return
    ax.axhline(acc, color="gray" if paper else "black", ls=(0, (1, 3)) if paper else ":", lw=1.2, label=label)


def _panels(summ: pd.DataFrame, teach: pd.Series, reduced: bool) -> list:
    "(dataset, fraction, rows, methods, teacher accuracy, full-data reference rows or None) per panel."
    out = []
    for ds in sorted(set(summ["dataset"])):
        d = summ[summ["dataset"] == ds]
        full = d[np.isclose(d["fraction"].astype(float), 1.0)]
        if not reduced:
            if len(full): out.append((ds, 1.0, full, _methods(full["method"]), teach.get(ds), None))
            continue
        for fr in sorted({float(f) for f in d["fraction"] if f < 1}, reverse=True):
            r = d[np.isclose(d["fraction"].astype(float), fr)]
            methods = _methods(r["method"])
            out.append((ds, fr, r, methods, teach.get(ds), full[full["method"].isin(methods)]))
    return out


def _grid(n: int, width=4.6, height=3.7):
    ncols = max(1, min(n, 3))
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(width * ncols, height * nrows + 0.5), layout="constrained")
    axes = np.array(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes[n:]: ax.set_axis_off()
    return fig, axes


def _style(ax, title, ylabel):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("student layers")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted(n_layers(s) for s in BLOCKS if s != "resnet34"))
    ax.grid(alpha=0.3)


def _legend(fig, axes, title: str):
    "One legend for all panels, below them, and a title that wraps on narrow figures."
    seen = {}
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()): seen.setdefault(l, h)
    if seen: fig.legend(list(seen.values()), list(seen), loc="outside lower center", fontsize=8,
                        ncols=min(len(seen), 4 if fig.get_figwidth() > 6 else 2), frameon=False)
    fig.suptitle(title.replace(" (", "\n(") if fig.get_figwidth() < 6 else title, fontsize=11)


def accuracy_vs_layers(records: pd.DataFrame, paper: pd.DataFrame = None, reduced: bool = False,
                       metric: str = "test_accuracy") -> Figure:
    """Our Figure 3 (`reduced=False`: full data, every method) or Figure 4 (`reduced=True`: a panel per
    fraction below 1, the full-data lines of the same methods dashed): `metric` (%) against the number of
    student layers, mean +- std over seeds, the teacher dotted; a panel per dataset. Where the paper has
    the panel's dataset and fraction, its published numbers are drawn in the same panel (hollow markers,
    dotted lines, labelled 'paper'); `paper_figure` draws the paper's own panels."""
    panels = _panels(summary(records, metric), teachers(records, metric), reduced)
    fig, axes = _grid(len(panels))
    pr = summary(paper_as_records(paper)) if paper is not None and len(paper) else None
    for ax, (ds, fr, rows, methods, teach, ref) in zip(axes, panels):
        for m in methods: _errorbar(ax, rows, m, m)
        if ref is not None:
            for m in methods: _errorbar(ax, ref, m, f"{m}, full data", dashed=True)
        _teacher_line(ax, teach, "teacher (resnet34)")
        theirs = pr[(pr["dataset"] == ds) & np.isclose(pr["fraction"].astype(float), fr)] if pr is not None else ()
        for m in methods:
            if len(theirs): _errorbar(ax, theirs, m, f"paper: {m}", paper=True)
        if len(theirs): _teacher_line(ax, _paper_teacher(paper, ds), "paper: teacher", paper=True)
        _style(ax, f"ours: {_title(ds)}, {fraction_label(fr)}" + (" (with the paper's)" if len(theirs) else ""),
               f"{metric.replace('_', ' ')} (%)")
    if not panels:
        axes[0].text(0.5, 0.5, "no runs recorded yet", ha="center", va="center")
        axes[0].set_axis_off()
    _legend(fig, axes, ("Figure 4, ours: less training data" if reduced else "Figure 3, ours: full training data")
            + " (mean \u00b1 std over seeds)")
    return fig


def _paper_teacher(paper: pd.DataFrame, dataset: str):
    t = paper[(paper["dataset"] == dataset) & (paper["method"] == "teacher")]["accuracy"]
    return float(t.iloc[0]) if len(t) else None


def paper_figure(paper: pd.DataFrame, reduced: bool = False, datasets=PAPER_DATASETS) -> Figure:
    """The paper's Figure 3 (`reduced=False`) or 4 (`reduced=True`: its quarter of the data, with its full-data
    lines dashed) redrawn from its published numbers, a panel per dataset, every title saying 'paper'."""
    p = paper[paper["dataset"].isin(list(datasets))] if paper is not None else pd.DataFrame()
    pr = paper_as_records(p)
    panels = _panels(summary(pr), teachers(pr), reduced)
    fig, axes = _grid(len(panels), width=4.0, height=3.3)
    for ax, (ds, fr, rows, methods, teach, ref) in zip(axes, panels):
        for m in methods: _errorbar(ax, rows, m, m, paper=False)
        if ref is not None:
            for m in methods: _errorbar(ax, ref, m, f"{m}, full data", dashed=True)
        _teacher_line(ax, teach, "teacher (resnet34)")
        _style(ax, f"paper: {_title(ds)}, {fraction_label(fr)}", "accuracy (%), as published")
    _legend(fig, axes, f"The paper's Figure {4 if reduced else 3}, redrawn from its published numbers (one run each)")
    return fig


def figure3(records: pd.DataFrame, paper: pd.DataFrame = None, metric: str = "test_accuracy") -> Figure:
    "Figure 3 from our records: accuracy against student layers at full data, every method (`accuracy_vs_layers`)."
    return accuracy_vs_layers(records, paper, reduced=False, metric=metric)


def figure4(records: pd.DataFrame, paper: pd.DataFrame = None, metric: str = "test_accuracy") -> Figure:
    "Figure 4 from our records: accuracy against student layers on less data, full-data lines dashed."
    return accuracy_vs_layers(records, paper, reduced=True, metric=metric)


# ---------------------------------------------------------------- one run
def history_figure(record: dict) -> Figure:
    """A run's training and validation loss per epoch, a panel per step (stage), the kept epoch marked;
    label steps also show the validation accuracy (right axis)."""
    stages = record.get("stages", [])
    n = max(len(stages), 1)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(max(3.7 * ncols, 6.5), 2.8 * nrows + 0.4), layout="constrained")
    axes = np.array(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, st in zip(axes, stages):
        h = pd.DataFrame(st.get("history", []))
        if h.empty: ax.set_title(f"{st['name']}: no epochs"); continue
        ep = h["epoch"] + 1
        ax.plot(ep, h["train_loss"], "o-", ms=3, label="train loss")
        ax.plot(ep, h["valid_loss"], "s-", ms=3, label="valid loss")
        target = st.get("target", "labels")
        ax.set_ylabel("MSE to the teacher" if target not in (None, "labels") else "cross entropy")
        ax.set_xlabel("epoch")
        handles = ax.get_legend_handles_labels()[0]
        if "accuracy" in h:
            ax2 = ax.twinx()
            handles += ax2.plot(ep, 100 * h["accuracy"], "^-", ms=3, color="tab:green", label="valid accuracy")
            ax2.set_ylabel("valid accuracy (%)")
        if st.get("best_epoch") is not None: ax.axvline(st["best_epoch"] + 1, color="gray", ls=":", lw=1)
        what = f"MSE to teacher {target}" if target not in (None, "labels") else "labels"
        parts = st.get("parts") or []
        ax.set_title(f"{st['name']} (" + (f"trains {', '.join(parts)}; " if parts else "") + f"{what})", fontsize=8)
        ax.legend(handles=handles, fontsize=7, loc="center right", framealpha=0.8)
        if len(ep) < 12: ax.set_xticks(list(ep))
    for ax in axes[len(stages):]: ax.set_axis_off()
    p = record.get("params", {})
    who = "teacher (resnet34)" if record.get("kind") == "teacher" else f"{p.get('student')} by {p.get('method')}"
    fig.suptitle(f"{who} on {p.get('dataset')}: loss per epoch (dotted line: the epoch kept)", fontsize=10)
    return fig


def load_student(run, n_classes: int = None) -> torch.nn.Module:
    "The trained student of a finished run folder: its model with the weights its last step kept."
    run = Path(run)
    record = read_json(run / RECORD)
    n = n_classes or len(record["data"]["vocab"])
    model = resnet(record["params"]["student"], n)
    model.load_state_dict(torch.load(run / "stages" / f"{record['stages'][-1]['name']}.pth", weights_only=True))
    return model.eval()


def _picture(f: torch.Tensor) -> np.ndarray:
    """What to draw of one feature map (C x H x W): its channel mean (H x W), or, when it has 4 pixels or
    fewer, each channel's spatial mean laid out as a grid (C values), which is what such a map carries."""
    f = f.float().cpu()
    c, h, w = f.shape
    if h * w > 4: return f.mean(0).numpy()
    rows = 2 ** int(np.floor(np.log2(np.sqrt(c))))
    return f.mean((1, 2)).reshape(rows, c // rows).numpy() if c % rows == 0 else f.mean((1, 2))[None].numpy()


@torch.no_grad()
def feature_maps_figure(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor,
                        stages=FEATURE_STAGES, image: np.ndarray = None) -> Figure:
    """For one image `x` (1 x C x H x W, normalised as in training): each stage's feature map, a row for the
    teacher and a row for the student (either may be None), a column per stage, one colour scale per column,
    the MSE between the two maps under the student's. A map is drawn as its channel mean; a map of 4 pixels
    or fewer (the deep stages of small images) as its channels' means on a grid."""
    from .distill import stage_features
    rows = [(n, m) for n, m in (("teacher", teacher), ("student", student)) if m is not None]
    maps = {}
    for name, m in rows:
        was = m.training
        m.eval()
        maps[name] = [f[0] for f in stage_features(m, x.to(next(m.parameters()).device), list(stages))]
        m.train(was)
    ncols = len(stages) + 1
    fig = Figure(figsize=(1.9 * ncols, 2.0 * max(len(rows), 1) + 0.5), layout="constrained")
    axes = np.array(fig.subplots(max(len(rows), 1), ncols, squeeze=False))
    img = image if image is not None else x[0].float().mean(0).cpu().numpy()
    gridded = False
    for i, (name, _) in enumerate(rows):
        axes[i, 0].imshow(img, cmap="gray" if np.ndim(img) == 2 else None)
        axes[i, 0].set_title("input" if i == 0 else "", fontsize=8)
        axes[i, 0].set_ylabel(name, fontsize=10)
        for j, s in enumerate(stages):
            a, f = axes[i, j + 1], maps[name][j]
            pics = [_picture(maps[n][j]) for n, _ in rows]
            vmin, vmax = min(p.min() for p in pics), max(p.max() for p in pics)
            a.imshow(_picture(f), cmap="viridis", vmin=vmin, vmax=vmax)
            c, h, w = f.shape
            gridded |= h * w <= 4
            if i == 0: a.set_title(f"{s}\n{c}x{h}x{w}" + (" (channels)" if h * w <= 4 else ""), fontsize=8)
            if i == len(rows) - 1 and len(rows) == 2:
                mse = float(torch.nn.functional.mse_loss(maps["student"][j].float(), maps["teacher"][j].float()))
                a.set_xlabel(f"MSE {mse:.3g}", fontsize=8)
    for a in axes.ravel(): a.set_xticks([]); a.set_yticks([])
    fig.suptitle("each stage's feature map, channel mean (channels x height x width)"
                 + ("; maps of 4 pixels or fewer: each channel's mean, on a grid" if gridded else ""), fontsize=9)
    return fig


# ---------------------------------------------------------------- the method
def stage_diagram(student: str = "resnet10", size: int = 224, teacher: str = "resnet34") -> Figure:
    """Teacher (top) and student (bottom) drawn stage by stage from their block counts, with the five hook
    points where feature maps are matched (red; their shapes at `size` px measured by running the student)
    and the order in which stagewise training trains the student's parts (stage 0 to 5)."""
    shapes = stage_shapes(resnet(student, 10), size)
    parts = ["stem", "maxpool", "layer1", "layer2", "layer3", "layer4", "head"]
    widths = dict(stem=1.25, maxpool=0.45, layer1=1.5, layer2=1.5, layer3=1.5, layer4=1.5, head=1.45)
    gap, x, pos = 0.45, {}, 0.0
    for p in parts:
        x[p] = pos
        pos += widths[p] + gap
    h, yt = 1.25, 3.0  # box height, teacher row's y
    fig = Figure(figsize=(10, 4.7), layout="constrained")
    ax = fig.add_subplot()
    for name, y, colour in ((teacher, yt, "#c9d6e8"), (student, 0.0, "#cfe8cf")):
        for p in parts:
            x0, w = x[p], widths[p]
            ax.add_patch(FancyBboxPatch((x0, y), w, h, boxstyle="round,pad=0.02", ec="black", lw=1,
                                        fc="white" if p == "maxpool" else colour))
            if p.startswith("layer"):
                k = BLOCKS[name][int(p[-1]) - 1]
                bw = (w - 0.16) / k
                for b in range(k):
                    ax.add_patch(Rectangle((x0 + 0.08 + b * bw + 0.025, y + 0.12), bw - 0.05, 0.33, fc="white",
                                           ec="gray", lw=0.8))
                label = f"{p}\n{k} block{'s' * (k > 1)}"
            elif p == "stem": label = "stem\nconv 7x7\nBN, ReLU"
            elif p == "maxpool": label = "max\npool"
            else: label = "head\n(fastai's)" if name == teacher else "head\n2 linear"
            ax.text(x0 + w / 2, y + h * (0.7 if p.startswith("layer") else 0.5), label, ha="center", va="center",
                    fontsize=9)
            if p != "head": ax.plot([x0 + w, x0 + w + gap], [y + h / 2] * 2, color="black", lw=1)
        ax.text(-0.25, y + h / 2, f"{'teacher' if name == teacher else 'student'}\n{name}", ha="right",
                va="center", fontsize=10, weight="bold")
    # hook points: the output of each feature stage (the stem's ReLU, before the max pool; each layer)
    for k, st in enumerate(FEATURE_STAGES):
        xe = x[st] + widths[st] + gap / 2
        ax.plot([xe, xe], [h, yt], color="tab:red", ls="--", lw=1.3)
        ax.plot([xe, xe], [h / 2, yt + h / 2], "o", color="tab:red", ms=6)
        c, hh, ww = shapes[st]
        ax.text(xe, (h + yt) / 2, f"MSE\n{c}x{hh}x{ww}", fontsize=8.5, color="tab:red", ha="center",
                va="center", bbox=dict(fc="white", ec="none", pad=1))
        ax.text(x[st] + widths[st] / 2, -0.3, f"stage {k}", ha="center", va="top", fontsize=10, weight="bold",
                color="darkgreen")
    ax.text(x["head"] + widths["head"] / 2, -0.3, "stage 5\nlabels", ha="center", va="top", fontsize=10,
            weight="bold", color="darkgreen")
    ax.set_xlim(-1.9, pos - gap + 0.1)
    ax.set_ylim(-1.0, yt + h + 0.15)
    ax.set_axis_off()
    fig.suptitle(f"Hook points (red) and stages at {size} px: stage k trains only the student's part k, on the MSE "
                 f"to the frozen teacher's\nfeature map at the same hook (shape: channels x height x width); "
                 f"stage 5 trains the head on the labels", fontsize=10)
    return fig
