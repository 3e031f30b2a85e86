"""One fastai fit that keeps its best epoch and resumes exactly after a kill: the building block of the recipes.

* `seed_everything`, `step_seed`: every generator a fit draws from, the loaders' own included.
* `BestCheckpoint`: keep the best epoch by a monitored value, and save all a killed run needs, every epoch.
* `MonitorNoise`: the standard error of the monitored value on the valid split, each epoch.
* `fit`: a fit with those, resumed from its state file when one is there, stopped early with `patience`;
  `convergence` says whether it converged by `CONVERGENCE_RULE`, judged from its curve's own scatter;
  `forget_fit` deletes its resume state once what it produced is written.
* `evaluate`: valid and test accuracy, and the test predictions; `accuracy_of` and `predictions_of`: a model's
  accuracy and predictions on any loader, random states untouched.
"""
import math
import os
import pickle
import random
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.schedule import ParamScheduler, combined_cos
from fastai.callback.tracker import TrackerCallback
from fastai.learner import Learner
from fastai.optimizer import Optimizer
from fastai.torch_core import set_seed
from fastcore.basics import store_attr
from fastcore.foundation import L

from ..core.models import evaluating
from ..infra.files import save_weights
from ..infra.heartbeat import ProgressLines, every_s
from ..speed.memory import FreedMemory
from .records import RunFolder

__all__ = ["seed_everything", "step_seed", "accuracy_of", "predictions_of",
           "WINDOW", "STATE_EVERY_S",
           "CONVERGENCE_ERROR", "CONVERGENCE_RULE",
           "MonitorNoise", "last_gain", "convergence", "BestCheckpoint", "one_cycle", "fit", "forget_fit", "evaluate",
           "quiet"]


def _untyped(t):
    "`t` as a plain `torch.Tensor` (the same storage) if it is a tensor of a subclass, such as fastai's `TensorImage`."
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor else t


def seed_everything(seed: int, dls=None) -> None:
    "Seed every generator a fit uses (torch, numpy, Python) and each loader of `dls`: a fit starts from a known state."
    set_seed(seed, reproducible=True)
    for i, dl in enumerate(dls.loaders if dls is not None else []): dl.rng = random.Random(seed * 10 + i)


def step_seed(seed: int, step: int) -> int:
    "The seed of a method's step number `step` in a run seeded `seed`."
    return seed * 1000 + step


def _rng_state(dls=None) -> dict:
    "Every random state a fit consumes: torch (and CUDA), numpy, Python, and each loader of `dls`'s own generator."
    keys, pos, gauss, cached = np.random.get_state()[1:]
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=[torch.from_numpy(keys.astype(np.int64)), pos, gauss, cached], python=random.getstate(),
                loaders=[dl.rng.getstate() for dl in (dls.loaders if dls is not None else [])])


def _set_rng_state(s: dict, dls=None) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"]: torch.cuda.set_rng_state_all(s["cuda"])
    keys, pos, gauss, cached = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, gauss, cached))
    random.setstate(s["python"])
    for dl, st in zip(dls.loaders if dls is not None else [], s["loaders"]): dl.rng.setstate(st)


@torch.no_grad()
def _predicted(model: torch.nn.Module, dl):
    """(predicted classes, labels) of each batch of `dl` by `model`, in eval mode (its modes restored after), leaving
    every global random state as it was (so a fit that measures each epoch trains exactly as one that does not). The
    batches go in as plain tensors, as a `Learner` gives them: fastai's `TensorImage` would send every torch
    operation of the model through Python (`__torch_function__`), a third more time for resnet10 at 16 px."""
    state = _rng_state()
    try:
        with evaluating(model):
            for xb, yb in dl: yield model(_untyped(xb)).argmax(1), _untyped(yb)
    finally: _set_rng_state(state)


def accuracy_of(model: torch.nn.Module, dl) -> float:
    "Accuracy (%) of `model` on the batches of `dl` (`_predicted`)."
    correct, n = 0, 0
    for p, y in _predicted(model, dl): correct, n = correct + int((p == y).sum()), n + len(y)
    return 100 * correct / max(n, 1)


def predictions_of(model: torch.nn.Module, dl) -> dict:
    "The `labels` of `dl`'s items and the classes `model` `predicted` for them, in the loader's order (`_predicted`)."
    out = dict(labels=[], predicted=[])
    for p, y in _predicted(model, dl): out["predicted"] += p.tolist(); out["labels"] += y.tolist()
    return out


WINDOW = 5  # the fewest last epochs whose trend judges a fit's convergence
STATE_EVERY_S = 120.0  # a fit's resume state is written at most this often (and after its first and last epochs)
CONVERGENCE_ERROR = 0.025  # the share of truly flat fits (white noise about a level) the rule calls unconverged
CONVERGENCE_RULE = ("a fit converged unless the least-squares slope of its monitored value over its last k epochs "
                    f"(k: the larger of {WINDOW} and a tenth of the epochs it ran) still improves beyond the curve's "
                    "own epoch-to-epoch noise: its residual scatter about that line (a one-sided t-test of the slope, "
                    f"k - 2 degrees of freedom, at {CONVERGENCE_ERROR:.1%}, the share of truly flat fits called "
                    "unconverged). The projected gain is the slope carried on for k epochs more. A fit of fewer than "
                    f"{WINDOW} epochs is not judged. Why the fit stopped (early stopping, or its last epoch) plays no "
                    "part. A diagnostic: the verdicts rest on the doubling check (kd_lib.evidence.saturation), not "
                    "on it")


class MonitorNoise(Callback):
    """The standard error (`se`) of a fit's monitored value on the valid split, each epoch: the standard deviation
    of its per-item values over the square root of their number. Per item, `accuracy` is 1 or 0 (the binomial
    standard error); any other monitor (the valid loss: a feature step's MSE) is the item's loss, the learner's
    loss function unreduced (fastai's `loss_not_reduced`) and averaged over all but the batch dimension."""
    order = TrackerCallback.order

    def __init__(self, monitor: str): store_attr()
    def before_validate(self): self.items = []

    def after_loss(self):
        if self.training: return
        if self.monitor == "accuracy": v = (self.pred.argmax(dim=-1) == self.yb[0]).float()
        else:
            with torch.no_grad(), self.learn.loss_not_reduced(): v = self.learn.loss_func(self.pred, *self.yb).float()
            if v.dim() > 1: v = v.flatten(1).mean(1)
        self.items.append(v.detach().cpu())

    def after_validate(self):
        v = torch.cat(self.items) if self.items else torch.zeros(0)
        self.se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else math.nan


def last_gain(values: list, lower: bool, noise: list = None) -> int:
    """The epoch of the last real improvement of a monitored value `values` (one per epoch; `lower`: smaller is
    better): one that beat the value of the last real improvement before it (the first epoch's, at first) by more
    than its own `noise` (its standard error, `MonitorNoise`; 0 where unknown). Measured from that reference, a
    steady climb of steps each smaller than the noise still counts once it adds up beyond it; a step within the noise
    is not evidence of progress. Early stopping (`patience` epochs after it) thus ends a fit whose curve has gone
    flat within its noise, the state `CONVERGENCE_RULE` asks of a converged one."""
    sign = 1 if lower else -1
    epoch, ref = 0, values[0] if values else None
    for i, v in enumerate(values[1:], 1):
        se = noise[i] if noise is not None and i < len(noise) and noise[i] is not None and noise[i] == noise[i] else 0.
        if sign * (ref - v) > se: epoch, ref = i, v
    return epoch


def convergence(values: list, lower: bool) -> dict:
    """Whether a fit whose monitored value was `values` (one per epoch; `lower`: smaller is better) converged by
    `CONVERGENCE_RULE`: the `window` of last epochs, the `slope` per epoch in the improving direction, the gain it
    `projects` over one more window, the `noise` (the window's residual scatter about its line), the slope's `t`
    statistic and `converged` (None when it cannot be judged: too few epochs, or values missing)."""
    n = len(values)
    k = min(max(WINDOW, math.ceil(n / 10)), n)
    out = dict(window=k, slope=None, projected=None, noise=None, t=None, converged=None)
    y = np.asarray([np.nan if v is None else v for v in values[-k:]], dtype=float)
    if n < WINDOW or not np.isfinite(y).all(): return out
    x = np.arange(k) - (k - 1) / 2
    slope = float(np.sum(x * (y - y.mean())) / np.sum(x * x))
    scatter = float(np.sqrt(np.sum((y - y.mean() - slope * x) ** 2) / (k - 2)))
    if scatter <= 1e-9 * np.abs(y).max(): scatter = 0.0  # a straight line, but for float rounding
    gain = slope * (-1 if lower else 1)
    t = gain / (scatter / math.sqrt(np.sum(x * x))) if scatter > 0 else math.copysign(math.inf, gain) if gain else 0.0
    return dict(window=k, slope=gain, projected=gain * k, noise=scatter, t=t,
                converged=bool(t <= stats.t.ppf(1 - CONVERGENCE_ERROR, k - 2)))


def _plain(o):
    "`o` with fastcore's `L` lists as plain lists, which a weights-only load reads back."
    if isinstance(o, (L, list)): return [_plain(x) for x in o]
    if isinstance(o, tuple): return tuple(_plain(x) for x in o)
    if isinstance(o, dict): return {k: _plain(v) for k, v in o.items()}
    return o


def _load_opt_state(opt, sd: dict) -> None:
    """Load `sd` (saved through `_plain`, on the CPU) into `opt`: torch's optimizers (`OptimWrapper`) move
    it to their parameters' device themselves; fastai's `Optimizer` gets its `hypers` as an `L` again and
    its state tensors moved to each parameter's device."""
    if not isinstance(opt, Optimizer): return opt.load_state_dict(sd)
    opt.load_state_dict(dict(sd, hypers=L(sd["hypers"])))
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor): st[k] = v.to(p.device)


class BestCheckpoint(TrackerCallback):
    """fastai's `TrackerCallback` (track the best `monitor`) that saves the best epoch's weights as `fname`
    and reloads them at the end, weights-only, as `SaveModelCallback` does (without its print per improvement),
    and that also saves atomically all a killed run needs to resume exactly: weights, optimizer (and fp16's loss
    scaler), random states, smoothed loss, history, the best so far and the time spent; after its first epoch, then
    at most every `state_every_s` seconds of training (a kill loses at most that much), and after its last.
    With `patience`, it stops the fit once `patience` epochs have passed without a real improvement
    (`last_gain`: one beyond the monitored value's noise, `<monitor>_se` in the history); `extras`
    (name -> function) adds values measured after every epoch to the history."""
    order = TrackerCallback.order + 1

    def __init__(self, monitor: str, fname: str, state_path: Path, state: dict = None, patience: int = None,
                 extras: dict = None, state_every_s: float = STATE_EVERY_S):
        super().__init__(monitor=monitor)
        store_attr("fname,state_path,state,patience,extras,state_every_s")

    def before_fit(self):
        super().before_fit()
        s = self.state or {}
        self.history, self.best_epoch = list(s.get("history", [])), s.get("best_epoch")
        self.stopped_early = s.get("stopped_early", False)
        self.elapsed, self.cpu_s = s.get("elapsed", 0.), s.get("cpu", 0.)
        self.saved_at = None  # when the resume state was last written (None: not yet in this process)
        if s:
            self.best = s["best"]
            self.learn.model.load_state_dict(s["model"])
            _load_opt_state(self.learn.opt, s["opt"])
            if s.get("scaler") and getattr(self.learn, "scaler", None) is not None:  # fp16's loss scale, and its steps
                self.learn.scaler.load_state_dict(s["scaler"])
            count, val = s["smooth_loss"]
            self.recorder.smooth_loss.count, self.recorder.smooth_loss.val = count, torch.tensor(val)
            _set_rng_state(s["rng"], self.dls)
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def after_epoch(self):
        epoch = len(self.history)
        super().after_epoch()
        if self.new_best:
            self.best_epoch = epoch
            save_weights(self.learn.path / self.learn.model_dir / f"{self.fname}.pth", self.learn.model.state_dict())
        names = self.recorder.metric_names[1:-1]
        self.history.append(dict(epoch=epoch, **{n: float(v) for n, v in zip(names, self.recorder.values[-1])},
                                 **{k: f() for k, f in (self.extras or {}).items()}))
        gained = last_gain([h[self.monitor] for h in self.history], lower=self.comp == np.less,
                           noise=[h.get(f"{self.monitor}_se") for h in self.history])
        self.stopped_early = self.patience is not None and epoch - gained >= self.patience
        t, c = time.perf_counter(), time.process_time()
        self.elapsed, self.cpu_s, self.t0, self.c0 = self.elapsed + t - self.t0, self.cpu_s + c - self.c0, t, c
        last = self.stopped_early or self.epoch + 1 >= self.n_epoch
        if last or self.saved_at is None or t - self.saved_at >= self.state_every_s:
            scaler = getattr(self.learn, "scaler", None)
            state = dict(model=self.learn.model.state_dict(), opt=_plain(self.opt.state_dict()),
                         rng=_rng_state(self.dls), history=self.history, best=float(self.best),
                         best_epoch=self.best_epoch, elapsed=self.elapsed, cpu=self.cpu_s,
                         stopped_early=self.stopped_early, scaler=scaler.state_dict() if scaler is not None else None,
                         smooth_loss=(self.recorder.smooth_loss.count, float(self.recorder.smooth_loss.val)))
            save_weights(self.state_path, state)
            self.saved_at = t
        if self.stopped_early: raise CancelFitException()

    def after_fit(self):
        super().after_fit()
        if self.best_epoch is not None: self.learn.load(self.fname, with_opt=False, weights_only=True)


def one_cycle(n_epoch: int, lr_max: float, start_epoch: int = 0, pct_start=0.25, div=25., div_final=1e5,
              moms=(0.95, 0.85, 0.95)) -> ParamScheduler:
    "fastai's fit_one_cycle schedules, entered `start_epoch` epochs in, so a resumed fit follows the same curve."
    def shifted(f): return lambda p: f((start_epoch + p * (n_epoch - start_epoch)) / n_epoch)
    return ParamScheduler({"lr": shifted(combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final)),
                           "mom": shifted(combined_cos(pct_start, *moms))})


def quiet(progress=None) -> bool:
    "Progress bars and epoch tables are off when asked, or under the runner (which sets KD_PROGRESS=0)."
    return progress is False or (progress is None and os.environ.get("KD_PROGRESS") == "0")


def fit(learn: Learner, name: str, epochs: int, lr: float, monitor: str, run: Path, one_cycle_lr: bool = False,
        progress=None, patience: int = None, extras: dict = None) -> dict:
    """Fit `learn` for at most `epochs` (fewer with `patience`: see `BestCheckpoint`), resuming from
    `run/<name>.state.pth` when a killed run left one (an unreadable one is warned of: the fit starts afresh), and
    keep the best epoch by `monitor` (with its standard error every epoch, `MonitorNoise`). Returns this fit's
    summary: history, best epoch and value, its `convergence` (`CONVERGENCE_RULE`) and whether it `converged`, wall
    and CPU time, and the epochs a killed run had finished before this process resumed it (`resumed_after`). The
    resume state stays until `forget_fit`, which the caller calls once what the fit produced is written: a kill
    before that resumes the finished fit, not a new one. Under the runner (`KD_LINES` set), a line on stderr at least
    that often says where it is (`ProgressLines`). The process keeps the memory its steps free for the next step,
    and hands it back after each epoch (`FreedMemory`)."""
    state_path = RunFolder(run).state_file(name)
    state = _resume_state(state_path, name)
    done = len(state["history"]) if state else 0
    noise = MonitorNoise(monitor)
    extras = {f"{monitor}_se": lambda: noise.se, **(extras or {})}
    ckpt = BestCheckpoint(monitor, name, state_path, state, patience, extras)
    cbs = [FreedMemory(), noise, ckpt] + ([one_cycle(epochs, lr, done)] if one_cycle_lr else []) + \
        ([ProgressLines(f"{run.parent.name}/{run.name}", name, monitor, every)] if (every := every_s()) else [])
    with ExitStack() as stack:
        if quiet(progress): stack.enter_context(learn.no_bar()); stack.enter_context(learn.no_logging())
        learn.fit(0 if state and state.get("stopped_early") else epochs - done, lr, cbs=cbs)
    best = ckpt.history[ckpt.best_epoch] if ckpt.best_epoch is not None else {}
    judged = convergence([h[monitor] for h in ckpt.history], lower=ckpt.comp == np.less)
    return dict(name=name, epochs=epochs, monitor=monitor, best_epoch=ckpt.best_epoch, best_value=best.get(monitor),
                epochs_run=len(ckpt.history), stopped_early=ckpt.stopped_early, converged=judged["converged"],
                convergence=judged, time_s=ckpt.elapsed, cpu_s=ckpt.cpu_s, resumed_after=done, history=ckpt.history)


def _resume_state(path: Path, name: str):
    """The resume state a killed fit left at `path`, or None: none, or one that cannot be read (empty, cut off, not
    a state this module writes), which is warned of, and the fit trains again from its start."""
    if not path.exists(): return None
    try: state = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e: why = type(e).__name__
    else:
        if isinstance(state, dict) and isinstance(state.get("history"), list): return state
        why = f"a {type(state).__name__}, not a resume state"
    warnings.warn(f"{path}, the resume state of the fit {name!r}, is unreadable ({why}): that fit trains again from "
                  "its start (the run's finished steps are kept).")
    return None


def forget_fit(learn: Learner, name: str, run: Path) -> None:
    "Delete fit `name`'s resume state and best-epoch file: call it once what the fit produced is written."
    RunFolder(run).state_file(name).unlink(missing_ok=True)
    (learn.path / learn.model_dir / f"{name}.pth").unlink(missing_ok=True)


def evaluate(learn: Learner) -> dict:
    """Valid and test accuracy (%) of the learner's model (loaders 1 and 2 of `learn.dls`; None without a test one),
    and with a test loader its `test_predictions` (`predictions_of`: what the model called each test image)."""
    with learn.no_bar():
        scores = {f"{k}_accuracy": round(100 * float(learn.validate(ds_idx=i)[1]), 4) if i < len(learn.dls.loaders)
                  else None for k, i in (("valid", 1), ("test", 2))}
    if len(learn.dls.loaders) > 2: scores["test_predictions"] = predictions_of(learn.model, learn.dls.loaders[2])
    return scores
