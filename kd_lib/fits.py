"""Every fit behind the runs' `converged` flags, so a reader can look at the curves instead of trusting a flag.

A run converged when each of its fits did, by `kd_lib.fitting.CONVERGENCE_RULE` (a stagewise run has six fits, one
per step; the other methods one). These show which steps did not, and how they ended:

* `fit_table`: one row per fit of the complete records under a folder: the run's settings, the step, its epoch cap,
  the epochs it ran, whether early stopping ended it, its convergence (the projected gain against the noise) and its
  curve (the monitored value per epoch).
* `step_convergence`: per group (dataset, fraction, method) and step: fits, how many converged, how many ran to their
  cap and how many early stopping ended, the median epochs run, the median projected gain in units of the noise.
* `fit_curves`: a figure, a panel per step of one group, a line per seed; an unconverged fit dashed, the cap dotted.
* `flat_fit_calls`: how often the rule calls a fit that has truly stopped improving converged (simulated), alone and
  for a run of several fits: what a gate that needs every fit converged can pass.
"""
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from .figures import Figure, _grid
from .fitting import convergence
from .records import complete_records
from .results import _ranks, fraction_label

__all__ = ["fit_table", "step_convergence", "fit_curves", "flat_fit_calls"]

FIT_COLUMNS = ["dataset", "fraction", "method", "student", "seed", "step", "target", "monitor", "cap", "epochs_run",
               "stopped_early", "ran_to_cap", "converged", "window", "projected", "noise", "scatter", "values"]


def _scatter(values: list, window: int):
    "The standard deviation of the last `window` of `values` about their least-squares line (None: too few)."
    y = np.asarray(values[-window:] if window else [], dtype=float)
    if len(y) < 3 or not np.isfinite(y).all(): return None
    x = np.arange(len(y))
    return float(np.sqrt(np.sum((y - np.polyval(np.polyfit(x, y, 1), x)) ** 2) / (len(y) - 2)))


def fit_table(folder) -> pd.DataFrame:
    """One row per fit of each complete record under `folder` (`FIT_COLUMNS`): a teacher's fit has method
    'teacher'; `target` is 'labels' or the teacher's stage a feature step matches; `cap` is the fit's epoch limit,
    `ran_to_cap` whether it used them all, `window`, `projected` and `noise` come from its `convergence`, `scatter`
    is the standard deviation of the window's values about their least-squares line (the curve's own epoch-to-epoch
    noise, to set beside the `noise` the rule uses), `values` is its monitored value per epoch."""
    rows = []
    for _, r in complete_records(folder):
        p = r["params"]
        who = dict(dataset=p.get("dataset"), fraction=float(p.get("fraction") or 1.0),
                   method=p.get("method") if r["kind"] == "student" else "teacher",
                   student=p.get("student", "teacher"), seed=p.get("seed"))
        for s in r.get("stages", []):
            c, n = s.get("convergence") or {}, s.get("epochs_run", 0)
            values = [h.get(s["monitor"]) for h in s.get("history", [])]
            rows.append(dict(who, step=s["name"], target=s.get("target") or "labels", monitor=s["monitor"],
                             cap=s.get("epochs"), epochs_run=n, stopped_early=bool(s.get("stopped_early")),
                             ran_to_cap=bool(s.get("epochs") is not None and n >= s["epochs"]),
                             converged=s.get("converged"), window=c.get("window"), projected=c.get("projected"),
                             noise=c.get("noise"), scatter=_scatter(values, c.get("window")), values=values))
    return pd.DataFrame(rows, columns=FIT_COLUMNS)


def step_convergence(fits: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, fraction, method and step (steps in the order the runs took them), from `fit_table`: `fits`,
    how many could be `judged` and `converged`, how many ran to their cap (`at_cap`) and how many early stopping
    ended (`stopped`), the median epochs run, the median `gain/noise` (the gain one more window of the last
    slope projects, over the noise: the rule calls a fit converged when it is at most 1) and the median
    `scatter/noise` (the curve's own scatter about that slope, over the same noise: `flat_fit_calls` says how
    often a flat curve of that scatter is called converged)."""
    cols = ["dataset", "fraction", "method", "step", "fits", "judged", "converged", "at_cap", "stopped",
            "epochs_run", "gain/noise", "scatter/noise"]
    if fits is None or fits.empty: return pd.DataFrame(columns=cols)
    noise = pd.to_numeric(fits["noise"], errors="coerce")
    f = fits.assign(ratio=pd.to_numeric(fits["projected"], errors="coerce") / noise,
                    spread=pd.to_numeric(fits["scatter"], errors="coerce") / noise,
                    order=fits.groupby(["dataset", "fraction", "method", "student", "seed"]).cumcount())
    g = f.groupby(["dataset", "fraction", "method", "step"], sort=False)
    out = g.agg(fits=("step", "size"), judged=("converged", "count"),
                converged=("converged", lambda v: int((v == True).sum())),  # noqa: E712
                at_cap=("ran_to_cap", "sum"), stopped=("stopped_early", "sum"),
                epochs_run=("epochs_run", "median"), ratio=("ratio", "median"), spread=("spread", "median"),
                order=("order", "min")).reset_index()
    out = out.rename(columns={"ratio": "gain/noise", "spread": "scatter/noise"})
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


def flat_fit_calls(noise_ratios=(0.5, 1.0, 1.5), epochs=(10, 30, 60), fits_per_run: int = 6, n: int = 3000,
                   seed: int = 0) -> pd.DataFrame:
    """How often `kd_lib.fitting.convergence` calls a fit converged whose curve is truly flat: per epoch-to-epoch
    noise (a standard deviation, as a multiple of the standard error the rule compares with) and number of epochs,
    the share of `n` simulated flat fits (flat plus Gaussian noise, seeded) called converged, and the share of runs of
    `fits_per_run` such fits (independent) called converged, all of them. A rule that judged flat curves perfectly
    would give 1 in both columns."""
    rng, rows = np.random.default_rng(seed), []
    for ratio in noise_ratios:
        for e in epochs:
            calls = np.array([convergence(list(ratio * rng.standard_normal(e)), [1.0] * e, lower=False)["converged"]
                              for _ in range(n)], dtype=bool)
            runs = calls[: n - n % fits_per_run].reshape(-1, fits_per_run).all(axis=1)
            rows.append({"noise/SE": ratio, "epochs": e, "fits called converged": calls.mean(),
                         f"runs of {fits_per_run} fits called converged": runs.mean()})
    return pd.DataFrame(rows)
