"""The book's figures, drawn from run records (`kd_lib.evidence.collect.collect`), the paper's published numbers
(`kd_lib.evidence.paper.paper_results`), a run's record or its models; the numbers come from `kd_lib.evidence.results`.

Every function returns a matplotlib `Figure`; nothing here trains, and nothing here types in a result. Figures
are built without pyplot, so a notebook shows each one once, as the value of its cell, and `myst_nb.glue` can
paste it elsewhere in the book. Methods are drawn in the order, colour and marker of `kd_lib.evidence.style`.

* `accuracy_vs_layers` (`figure3`, `figure4`): the paper's Figures 3 and 4, ours beside the paper's (one student:
  its methods side by side); `paper_figure`: the paper's own, redrawn from its numbers.
* `claims_figure`: the claims' paired differences, intervals, thresholds and budget column.
* `history_figure`: a run's loss (and accuracy) per epoch, one panel per step.
* `feature_maps_figure`: teacher vs student feature maps at each stage, for one image.
* `stage_diagram`: teacher, student, the hook points and the order of the stages.
"""
import io

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as _MplFigure
from matplotlib.patches import FancyBboxPatch, Rectangle
from scipy import stats

from ..core.distill import stage_features
from ..core.models import BLOCKS, evaluating, resnet
from ..core.stages import Stages
from .results import PAPER_DATASETS, fraction_label, n_layers, paper_as_records, summary, teachers
from .style import method_order, style

__all__ = ["Figure", "accuracy_vs_layers", "figure3", "figure4", "paper_figure", "claims_figure", "history_figure",
           "feature_maps_figure", "stage_diagram"]

DATASET_TITLES = {"digits": "digits", "imagenette": "Imagenette", "imagewoof": "Imagewoof", "cifar10": "CIFAR10"}


class Figure(_MplFigure):
    """A matplotlib figure that shows itself as a PNG in Jupyter (and in `myst_nb.glue`) without pyplot:
    no global figure state, so a notebook shows it once, as the value of its cell."""
    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        FigureCanvasAgg(self).print_png(buf)
        return buf.getvalue()


def _title(dataset: str) -> str:
    return DATASET_TITLES.get(dataset, dataset)


# ---------------------------------------------------------------- Figures 3 and 4
def _errorbar(ax, rows: pd.DataFrame, method: str, label: str, dashed=False, paper=False):
    r = rows[rows["method"] == method].sort_values("layers")
    if r.empty: return
    m = style(method)
    ax.errorbar(r["layers"], r["mean"], yerr=None if paper else r["std"], color=m.color, marker=m.marker, ls=":" if
    paper else "--" if dashed else "-",
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
            if len(full): out.append((ds, 1.0, full, method_order(full["method"]), teach.get(ds), None))
            continue
        for fr in sorted({float(f) for f in d["fraction"] if f < 1}, reverse=True):
            r = d[np.isclose(d["fraction"].astype(float), fr)]
            methods = method_order(r["method"])
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
    one = bool(panels) and all(rows["student"].nunique() == 1 for _, _, rows, *_ in panels)
    for ax, (ds, fr, rows, methods, teach, ref) in zip(axes, panels):
        theirs = pr[(pr["dataset"] == ds) & np.isclose(pr["fraction"].astype(float), fr)] if pr is not None else ()
        title = f"ours: {_title(ds)}, {fraction_label(fr)}" + (" (with the paper's)" if len(theirs) else "")
        if one:  # one student: its methods side by side, not a line over student sizes
            student = rows["student"].iloc[0]
            _by_method(ax, rows, methods, ref, theirs[theirs["student"] == student] if len(theirs) else theirs)
            _teacher_line(ax, teach, "teacher (resnet34)")
            if len(theirs): _teacher_line(ax, _paper_teacher(paper, ds), "paper: teacher", paper=True)
            ax.set_title(f"{title}: {student}", fontsize=10)
            ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
            ax.grid(alpha=0.3, axis="y")
            continue
        for m in methods: _errorbar(ax, rows, m, m)
        if ref is not None:
            for m in methods: _errorbar(ax, ref, m, f"{m}, full data", dashed=True)
        _teacher_line(ax, teach, "teacher (resnet34)")
        for m in methods:
            if len(theirs): _errorbar(ax, theirs, m, f"paper: {m}", paper=True)
        if len(theirs): _teacher_line(ax, _paper_teacher(paper, ds), "paper: teacher", paper=True)
        _style(ax, title, f"{metric.replace('_', ' ')} (%)")
    if not panels:
        axes[0].text(0.5, 0.5, "no runs recorded yet", ha="center", va="center")
        axes[0].set_axis_off()
    _legend(fig, axes, ("Figure 4, ours: less training data" if reduced else "Figure 3, ours: full training data")
            + (" (mean and 95% interval over seeds)" if one else " (mean \u00b1 std over seeds)"))
    return fig


def _ci95(rows: pd.DataFrame) -> np.ndarray:
    "Half the 95% t-interval of each row's mean over its `n` seeds (0 for one seed)."
    n = rows["n"].to_numpy(float)
    return np.where(n > 1, stats.t.ppf(0.975, np.maximum(n - 1, 1)) * rows["std"].to_numpy(float)
                    / np.sqrt(np.maximum(n, 1)), 0.0)


def _by_method(ax, rows: pd.DataFrame, methods: list, ref, theirs) -> None:
    """One student's methods side by side: our mean with its 95% interval over seeds, the full-data run of the same
    method beside it (a panel of less data), and the paper's number (hollow)."""
    for i, m in enumerate(methods):
        colour, marker = style(m)
        r = rows[rows["method"] == m]
        ax.errorbar([i], r["mean"], yerr=_ci95(r), color=colour, marker=marker, ms=7, capsize=4, lw=1.8, ls="none",
                    label=m)
        if ref is not None and len(f := ref[ref["method"] == m]):
            ax.errorbar([i + 0.22], f["mean"], yerr=_ci95(f), color=colour, marker=marker, ms=5, capsize=3,
                        alpha=0.4, ls="none", label="the same, full data")
        if len(theirs) and len(t := theirs[theirs["method"] == m]):
            ax.plot([i - 0.22], t["mean"], marker=marker, color=colour, mfc="white", ms=7, ls="none",
                    label="paper (one run)")
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(methods) - 0.4)


# the claims' verdicts, as colours
VERDICT_COLOURS = {"supported": "#1b7837", "contradicted": "#b2182b", "undetermined": "#777777"}


def claims_figure(table: pd.DataFrame, title: str = "The paper's claims: our paired differences") -> Figure:
    """A `kd_lib.evidence.claims.claims` table drawn: a row per claim in points (claim 3's share of the gap aside, it is
    not in points), our mean and 95% interval coloured by its verdict, the claim's threshold as a red tick, and the
    seed-0 differences at the normal and at twice the budget (the budget column) as hollow markers."""
    t = table[table["id"] != "3_share"].reset_index(drop=True)
    fig = Figure(figsize=(7.6, 0.55 * max(len(t), 1) + 1.5), layout="constrained")
    ax = fig.subplots()
    if t.empty:
        ax.text(0.5, 0.5, "no claim could be computed from these runs", ha="center", va="center")
        ax.set_axis_off()
        return fig
    y = np.arange(len(t))[::-1]
    for yi, (_, r) in zip(y, t.iterrows()):
        colour = VERDICT_COLOURS.get(r["verdict"], "black")
        lo, hi = (r["low"], r["high"]) if np.isfinite(r["low"]) else (r["mean"], r["mean"])
        ax.plot([lo, hi], [yi, yi], color=colour, lw=2.5, solid_capstyle="butt")
        ax.plot([r["mean"]], [yi], "o", color=colour, ms=7, label=r["verdict"])
        ax.plot([r["threshold"]] * 2, [yi - 0.3, yi + 0.3], color="red", lw=1.5, label="threshold")
        for x, dy, marker, label in ((r["at_1x"], 0.25, "s", "seed 0, normal budget"),
                                     (r["at_2x"], -0.25, "D", "seed 0, twice the budget")):
            if np.isfinite(x): ax.plot([x], [yi + dy], marker, mfc="white", color="black", ms=5, label=label)
    ax.set_yticks(y, [f"{r['claim'].split('. ', 1)[0]}. {r['difference']}" + (f" ({r['dataset']})" if
                      t["dataset"].nunique() > 1 else "") for _, r in t.iterrows()], fontsize=8)
    ax.set_xlabel("difference of test accuracy (points): mean, 95% interval over the pairs")
    ax.grid(alpha=0.3, axis="x")
    seen = {}
    for h, label in zip(*ax.get_legend_handles_labels()): seen.setdefault(label, h)
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(len(seen), 3), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=11)
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
                        stages: Stages = None, image: np.ndarray = None) -> Figure:
    """For one image `x` (1 x C x H x W, normalised as in training): each feature stage's map (`stages`, default
    the paper's), a row for the teacher and a row for the student (either may be None), a column per stage, one
    colour scale per column, the MSE between the two maps under the student's (where their shapes agree). A map is
    drawn as its channel mean; a map of 4 pixels or fewer (the deep stages of small images) as its channels' means
    on a grid."""
    stages = stages or Stages.paper()
    rows = [(n, m) for n, m in (("teacher", teacher), ("student", student)) if m is not None]
    with evaluating(*(m for _, m in rows)):
        maps = {name: [f[0] for f in stage_features(m, x.to(next(m.parameters()).device), stages, side=name)]
                for name, m in rows}
    names = stages.names
    ncols = len(names) + 1
    fig = Figure(figsize=(1.9 * ncols, 2.0 * max(len(rows), 1) + 0.5), layout="constrained")
    axes = np.array(fig.subplots(max(len(rows), 1), ncols, squeeze=False))
    img = image if image is not None else x[0].float().mean(0).cpu().numpy()
    gridded = False
    for i, (name, _) in enumerate(rows):
        axes[i, 0].imshow(img, cmap="gray" if np.ndim(img) == 2 else None)
        axes[i, 0].set_title("input" if i == 0 else "", fontsize=8)
        axes[i, 0].set_ylabel(name, fontsize=10)
        for j, s in enumerate(names):
            a, f = axes[i, j + 1], maps[name][j]
            pics = [_picture(maps[n][j]) for n, _ in rows]
            vmin, vmax = min(p.min() for p in pics), max(p.max() for p in pics)
            a.imshow(_picture(f), cmap="viridis", vmin=vmin, vmax=vmax)
            c, h, w = f.shape
            gridded |= h * w <= 4
            if i == 0: a.set_title(f"{s}\n{c}x{h}x{w}" + (" (channels)" if h * w <= 4 else ""), fontsize=8)
            if i == len(rows) - 1 and len(rows) == 2 and maps["student"][j].shape == maps["teacher"][j].shape:
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
    shapes = Stages.paper().shapes(resnet(student, 10), torch.zeros(1, 3, size, size))
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
    for k, st in enumerate(shapes):
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
