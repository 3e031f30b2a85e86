"""Every fit's convergence, judged again from its curve by `kd_lib.recipes.fitting.CONVERGENCE_RULE` (whatever rule the
record was made under), so a reader can look at the curves instead of trusting a flag. A diagnostic: the verdicts
rest on the doubling check (`kd_lib.evidence.saturation`). A stagewise run has six fits, one per step; the other
methods one. These show which steps still improved when they ended, and how they ended:

* `fit_table`: one row per fit of the complete records under a folder: the run's settings, the step, its epoch cap,
  the epochs it ran, whether early stopping ended it, its convergence (the projected gain, the curve's own noise, the
  slope's t statistic) and its curve (the monitored value per epoch).
* `step_convergence`: per group (dataset, fraction, method) and step: fits, how many converged, how many ran to their
  cap and how many early stopping ended, the median epochs run, the median projected gain in units of the noise.
* `calibration`: how often the rule calls simulated fits converged that have truly stopped improving, and fits still
  improving by two noise units a window unconverged: its error rate and its power.
* `fit_curves`: a figure, a panel per step of one group, a line per seed; an unconverged fit dashed, the cap dotted.
"""
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from ..recipes.fitting import CONVERGENCE_ERROR, convergence
from .collect import complete_records
from .figures import Figure, _grid
from .results import _ranks, fraction_label

__all__ = ["fit_table", "step_convergence", "fit_curves", "calibration"]

FIT_COLUMNS = ["dataset", "fraction", "method", "student", "seed", "budget", "step", "target", "monitor", "cap",
               "epochs_run", "stopped_early", "ran_to_cap", "converged", "window", "projected", "noise", "t", "values"]


def fit_table(folder) -> pd.DataFrame:
    """One row per fit of each complete record under `folder` (`FIT_COLUMNS`): a teacher's fit has method
    'teacher'; `budget` is 2 for a long twin's fits; `target` is 'labels' or the teacher's stage a feature step
    matches; `cap` is the fit's epoch limit, `ran_to_cap` whether it used them all; `converged`, `window`,
    `projected`, `noise` (the window's scatter about its line) and `t` are its `convergence`, judged again from
    `values`, its monitored value per epoch."""
    rows = []
    for _, r in complete_records(folder):
        p = r["params"]
        who = dict(dataset=p.get("dataset"), fraction=float(p.get("fraction") or 1.0),
                   method=p.get("method") if r["kind"] == "student" else "teacher",
                   student=p.get("student", "teacher"), seed=p.get("seed"), budget=p.get("budget", 1))
        for s in r.get("stages", []):
            n = s.get("epochs_run", 0)
            values = [h.get(s["monitor"]) for h in s.get("history", [])]
            c = convergence(values, lower=s["monitor"] != "accuracy")
            rows.append(dict(who, step=s["name"], target=s.get("target") or "labels", monitor=s["monitor"],
                             cap=s.get("epochs"), epochs_run=n, stopped_early=bool(s.get("stopped_early")),
                             ran_to_cap=bool(s.get("epochs") is not None and n >= s["epochs"]),
                             converged=c["converged"], window=c["window"], projected=c["projected"],
                             noise=c["noise"], t=c["t"], values=values))
    return pd.DataFrame(rows, columns=FIT_COLUMNS)


def step_convergence(fits: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, fraction, method and step (steps in the order the runs took them), from `fit_table`: `fits`,
    how many could be `judged` and `converged`, how many ran to their cap (`at_cap`) and how many early stopping
    ended (`stopped`), the median epochs run, the median `gain/noise` (the gain one more window of the last
    slope projects, over the curve's own scatter about it) and the median `t` (the slope's t statistic, which the
    rule tests)."""
    cols = ["dataset", "fraction", "method", "step", "fits", "judged", "converged", "at_cap", "stopped",
            "epochs_run", "gain/noise", "t"]
    if fits is None or fits.empty: return pd.DataFrame(columns=cols)
    noise = pd.to_numeric(fits["noise"], errors="coerce")
    f = fits.assign(ratio=pd.to_numeric(fits["projected"], errors="coerce") / noise.where(noise > 0),
                    t=pd.to_numeric(fits["t"], errors="coerce").replace([np.inf, -np.inf], np.nan),
                    order=fits.groupby(["dataset", "fraction", "method", "student", "seed"]).cumcount())
    g = f.groupby(["dataset", "fraction", "method", "step"], sort=False)
    out = g.agg(fits=("step", "size"), judged=("converged", "count"),
                converged=("converged", lambda v: int((v == True).sum())),  # noqa: E712
                at_cap=("ran_to_cap", "sum"), stopped=("stopped_early", "sum"),
                epochs_run=("epochs_run", "median"), ratio=("ratio", "median"), t=("t", "median"),
                order=("order", "min")).reset_index()
    out = out.rename(columns={"ratio": "gain/noise"})
    out = out.assign(rank=out["method"].map(_ranks(out["method"])))
    out = out.sort_values(["dataset", "fraction", "rank", "order"], ascending=[True, False, True, True])
    return out[cols].reset_index(drop=True)


def fit_curves(fits: pd.DataFrame, dataset: str, method: str, fraction: float = 1.0, student: str = None) -> Figure:
    """The monitored value per epoch of every fit of one group (`dataset`, `method`, `fraction`, and `student` when
    given, else every student's), a panel per step and a line per seed: solid when the fit converged, dashed when
    not, thin when it could not be judged; the dotted vertical line is the step's epoch cap. Feature steps (an MSE
    to the teacher) are drawn on a log scale."""
    f = fits[(fits["dataset"] == dataset) & (fits["method"] == method) & np.isclose(fits["fraction"], fraction)
             & ((fits["student"] == student) if student else True)]
    who = f"{student} by {method}" if student else method
    if f.empty: raise ValueError(f"No fits of {who} on {dataset} at {fraction_label(fraction)} in these records.")
    steps = list(dict.fromkeys(f["step"]))
    fig, axes = _grid(len(steps), width=3.6 if len(steps) > 1 else 7.0, height=2.7)  # one panel: room for the title
    seeds = sorted(set(f["seed"].dropna()))
    colors = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    for ax, step in zip(axes, steps):
        rows = f[f["step"] == step]
        accuracy = rows["monitor"].iloc[0] == "accuracy"
        for _, r in rows.iterrows():
            y = np.asarray([np.nan if v is None else v for v in r["values"]], dtype=float) * (100 if accuracy else 1)
            style = dict(ls="-", lw=1.4) if r["converged"] is True else \
                dict(ls="--", lw=1.4) if r["converged"] is False else dict(ls="-", lw=0.6)
            ax.plot(np.arange(1, len(y) + 1), y, color=colors.get(r["seed"], "C0"), **style)
        if rows["cap"].notna().any(): ax.axvline(rows["cap"].max(), color="gray", ls=":", lw=1)
        if not accuracy and (np.concatenate([np.asarray(v, dtype=float) for v in rows["values"]]) > 0).all():
            ax.set_yscale("log")
        n_conv = int((rows["converged"] == True).sum())  # noqa: E712
        ax.set_title(f"{step}: {n_conv} of {len(rows)} converged, {int(rows['ran_to_cap'].sum())} at the cap",
                     fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("valid accuracy (%)" if accuracy else "valid MSE to the teacher"
                      if rows["target"].iloc[0] != "labels" else f"valid {rows['monitor'].iloc[0]}")
        ax.grid(alpha=0.3)
    fig.legend([Line2D([], [], color=c) for c in colors.values()], [f"seed {s}" for s in colors],
               loc="outside lower center", ncols=min(len(colors), 5), fontsize=8, frameon=False)
    fig.suptitle(f"{who} on {dataset}, {fraction_label(fraction)}\nmonitored value per epoch (dashed: not "
                 "converged by the rule; dotted: the epoch cap)", fontsize=10)
    return fig


def calibration(epochs=(10, 30, 60), rise: float = 2.0, n: int = 4000, seed: int = 0) -> pd.DataFrame:
    """How `kd_lib.recipes.fitting.convergence` judges simulated fits of known state (Gaussian epoch-to-epoch noise,
    seeded), per number of epochs: the share of truly flat fits it calls converged (1 - `CONVERGENCE_ERROR` by design,
    whatever the noise's size), and the share of fits still rising by `rise` noise units over one window that it calls
    unconverged (its power against them)."""
    rng, rows = np.random.default_rng(seed), []
    for e in epochs:
        k = convergence([0.0] * e, lower=False)["window"]
        def calls(slope): return np.array([convergence(list(slope * np.arange(e) + rng.standard_normal(e)),
                                                       lower=False)["converged"] for _ in range(n)], dtype=bool)
        rows.append({"epochs": e, "window": k, "flat fits called converged": calls(0.0).mean(),
                     f"fits rising {rise:g} noise units a window called unconverged": 1 - calls(rise / k).mean()})
    return pd.DataFrame(rows).assign(**{"design": f"{1 - CONVERGENCE_ERROR:.1%} of flat fits"})
