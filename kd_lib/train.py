"""Recipes: train the teacher, train a student by any method, with best-epoch checkpoints,
exact resume after a crash, and a self-describing record per run.

A method is a list of `Step`s; each step is one fastai `fit` that trains some stages
of the student, either towards a teacher feature map (MSE) or on the labels.
"""
import os
import random
import shutil
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.schedule import ParamScheduler, combined_cos
from fastai.callback.tracker import SaveModelCallback, TrackerCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import OptimWrapper
from fastai.torch_core import set_seed
from fastcore.basics import store_attr
from torch import nn

from .cache import AMP_DTYPES, CACHE_DTYPES, FeatureCache, ValidateOn
from .data import get_data
from .distill import FeatureLoss, FreezeOthers, SoftTargets, StudentStage, TeacherFeatures
from .models import FEATURE_STAGES, STAGES, PretrainedUnavailable, resnet, stage_part, stage_shapes, teacher
from .records import RECORD, atomic_write, read_json, run_name, versions, write_json

__all__ = ["Step", "METHODS", "paper_adam", "BestCheckpoint", "StopOnNaN", "train_teacher", "train_student",
           "load_teacher", "run_dir", "RunExists"]


def paper_adam(params, lr: float = 1e-3, **kwargs) -> OptimWrapper:
    """The paper's optimizer, torch's Adam with its defaults (betas 0.9/0.999, eps 1e-8, no weight decay), as a
    fastai optimizer (schedulers set its `lr` and `mom`). Fused: one kernel for all parameters, the same update
    several times faster than a loop over them (on CPU, 16 ms instead of 110 ms a step for ResNet26's 17.7M)."""
    return OptimWrapper(params, opt=torch.optim.Adam, lr=lr, fused=True, **kwargs)


@dataclass(frozen=True)
class Step:
    "One fit of a method: train the stages `parts`, on `target`: a teacher feature stage (MSE) or 'labels'."
    name: str
    parts: tuple = tuple(STAGES)
    target: str = "labels"


METHODS = {
    "no_teacher": [Step("all")],
    "simultaneous": [Step("all")],  # + FeatureLoss on every feature stage
    "stagewise": [Step(s, (s,), s) for s in FEATURE_STAGES] + [Step("head", ("head",))],
    "hinton": [Step("all")],  # + SoftTargets
    "fitnets": [Step("hint", ("stem", "layer1", "layer2"), "layer2"),
                Step("classifier", ("layer3", "layer4", "head"))],
}


class RunExists(RuntimeError):
    "A run folder holds a run with other parameters."


class StopOnNaN(Callback):
    "Stop the run with a clear error at the first loss that is not finite (fastai's TerminateOnNaN stops silently)."
    order = -9

    def after_loss(self):
        if not torch.isfinite(self.loss).all():
            raise FloatingPointError(f"The loss became {self.loss.item()} at epoch {self.epoch}, batch {self.iter}: "
                                     "the run is stopped and no record is written. Lower the learning rate.")


def _rng_state(dls) -> dict:
    "Every random state a fit consumes: torch (and CUDA), numpy, Python, and each loader's own generator."
    keys, pos, gauss, cached = np.random.get_state()[1:]
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=[torch.from_numpy(keys.astype(np.int64)), pos, gauss, cached], python=random.getstate(),
                loaders=[dl.rng.getstate() for dl in dls.loaders])


def _set_rng_state(s: dict, dls) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"]: torch.cuda.set_rng_state_all(s["cuda"])
    keys, pos, gauss, cached = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, gauss, cached))
    random.setstate(s["python"])
    for dl, st in zip(dls.loaders, s["loaders"]): dl.rng.setstate(st)


def _seed(seed: int, dls) -> None:
    "Seed every generator a fit uses, loaders included, so that each step starts from a known state."
    set_seed(seed, reproducible=True)
    for i, dl in enumerate(dls.loaders): dl.rng = random.Random(seed * 10 + i)


class BestCheckpoint(SaveModelCallback):
    """fastai's SaveModelCallback (keep the epoch with the best `monitor`, reload it at the end,
    weights-only) that also saves, after every epoch and atomically, all a killed run needs to
    resume exactly: weights, optimizer, random states, smoothed loss, history and the best so far."""
    def __init__(self, monitor: str, fname: str, state_path: Path, state: dict = None):
        super().__init__(monitor=monitor, fname=fname)
        store_attr("state_path,state")

    def before_fit(self):
        super().before_fit()
        s = self.state or {}
        self.history, self.elapsed = list(s.get("history", [])), s.get("elapsed", 0.)
        self.best_epoch = s.get("best_epoch")
        if s:
            self.best = s["best"]
            self.learn.model.load_state_dict(s["model"])
            self.learn.opt.load_state_dict(s["opt"])
            count, val = s["smooth_loss"]
            self.recorder.smooth_loss.count, self.recorder.smooth_loss.val = count, torch.tensor(val)
            _set_rng_state(s["rng"], self.dls)
        self.t0 = time.perf_counter()

    def after_epoch(self):
        epoch = len(self.history)
        TrackerCallback.after_epoch(self)
        if self.new_best: self.best_epoch = epoch; self._save(self.fname)
        names = self.recorder.metric_names[1:-1]
        self.history.append(dict(epoch=epoch, **{n: float(v) for n, v in zip(names, self.recorder.values[-1])}))
        self.elapsed += time.perf_counter() - self.t0
        self.t0 = time.perf_counter()
        state = dict(model=self.learn.model.state_dict(), opt=self.opt.state_dict(),
                     rng=_rng_state(self.dls), history=self.history, best=float(self.best),
                     best_epoch=self.best_epoch, elapsed=self.elapsed,
                     smooth_loss=(self.recorder.smooth_loss.count, float(self.recorder.smooth_loss.val)))
        atomic_write(self.state_path, partial(torch.save, state))

    def after_fit(self):
        if self.best_epoch is not None: self.learn.load(self.fname, with_opt=False, weights_only=True)


def _load_state(path: Path):
    return torch.load(path, weights_only=True) if path.exists() else None


def _one_cycle(n_epoch: int, lr_max: float, start_epoch: int = 0, pct_start=0.25, div=25., div_final=1e5,
               moms=(0.95, 0.85, 0.95)) -> ParamScheduler:
    "fastai's fit_one_cycle schedules, entered `start_epoch` epochs in, so a resumed fit follows the same curve."
    def shifted(f): return lambda p: f((start_epoch + p * (n_epoch - start_epoch)) / n_epoch)
    return ParamScheduler({"lr": shifted(combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final)),
                           "mom": shifted(combined_cos(pct_start, *moms))})


def _quiet(progress) -> bool:
    "Progress bars and epoch tables are off when asked, or under the runner (which sets KD_PROGRESS=0)."
    return progress is False or (progress is None and os.environ.get("KD_PROGRESS") == "0")


def _fit(learn: Learner, name: str, epochs: int, lr: float, monitor: str, run: Path, one_cycle=False,
         progress=None) -> dict:
    """Fit `learn` for `epochs`, resuming from `run/<name>.state.pth` when a killed run left one,
    keep the best epoch by `monitor`; returns this fit's summary (history, best epoch and value, time)."""
    state_path = run / f"{name}.state.pth"
    state = _load_state(state_path)
    done = len(state["history"]) if state else 0
    ckpt = BestCheckpoint(monitor, name, state_path, state)
    cbs = [ckpt] + ([_one_cycle(epochs, lr, done)] if one_cycle else [])
    with ExitStack() as stack:
        if _quiet(progress): stack.enter_context(learn.no_bar()); stack.enter_context(learn.no_logging())
        learn.fit(epochs - done, lr, cbs=cbs)
    state_path.unlink(missing_ok=True)
    (learn.path / learn.model_dir / f"{name}.pth").unlink(missing_ok=True)  # the best weights now live in the model
    best = ckpt.history[ckpt.best_epoch] if ckpt.best_epoch is not None else {}
    return dict(name=name, epochs=epochs, monitor=monitor, best_epoch=ckpt.best_epoch, best_value=best.get(monitor),
                time_s=ckpt.elapsed, history=ckpt.history)


def run_dir(out_dir, dataset: str, name: str) -> Path:
    "The folder of one run: `<out_dir>/<dataset>/<name>`."
    return Path(out_dir) / dataset / name


def _start(run: Path, params: dict, force: bool):
    """The record of a finished run with these `params` (to return as is), or None after preparing
    `run`; a run folder holding progress made with other parameters is an error, not overwritten."""
    if force and run.exists(): shutil.rmtree(run)
    old = read_json(run / "params.json")
    progress = [run / RECORD, run / "progress.json", *run.glob("*.state.pth")]
    if old is not None and old != params and any(p.exists() for p in progress):
        diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
        raise RunExists(f"{run} holds a run with other parameters (was, now: {diff}); "
                        "pass force=True to replace it, or choose another out_dir.")
    record = read_json(run / RECORD)
    if record is not None and record.get("status") == "complete": return record
    write_json(run / "params.json", params)
    return None


def _evaluate(learn: Learner) -> dict:
    "Valid and test accuracy (%) of the learner's model, with the cross entropy and accuracy metric."
    with learn.no_bar():
        return {f"{k}_accuracy": round(100 * float(learn.validate(ds_idx=i)[1]), 4) for k, i in (("valid", 1), ("test", 2))}


def _finish(run: Path, record: dict) -> dict:
    record.update(status="complete", versions=versions(), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return read_json(write_json(run / RECORD, record))


def train_teacher(dataset: str = "digits", data_path=None, size: int = None, bs: int = 64, epochs: int = 50,
                  lr: float = 1e-4, seed: int = 0, pretrained=None, selection: str = "valid", augment: bool = True,
                  out_dir="runs", force: bool = False, progress=None) -> dict:
    """Train the paper's ResNet34 teacher with one-cycle (max lr `lr`), keeping the best valid accuracy.

    `pretrained`: True fine-tunes ImageNet weights (an error if they cannot be had), False trains
    from scratch, None uses the weights when they can be had and says so when not. Writes
    `<out_dir>/<dataset>/teacher/` with `teacher.pth` and `record.json`; returns the record.
    """
    params = dict(kind="teacher", dataset=dataset, data_path=str(data_path) if data_path else None, size=size,
                  bs=bs, epochs=epochs, lr=lr, seed=seed, pretrained=pretrained, selection=selection,
                  augment=augment)
    run = run_dir(out_dir, dataset, "teacher")
    if (done := _start(run, params, force)) is not None: return done
    dls = get_data(dataset, data_path, size=size, bs=bs, seed=seed, selection=selection, augment=augment)
    _seed(seed, dls)
    imagenet = pretrained is not False
    try: model = teacher(dls.c, pretrained=imagenet)
    except PretrainedUnavailable as e:
        if pretrained: raise
        warnings.warn(f"Training the teacher from scratch: {e}")
        imagenet, model = False, teacher(dls.c, pretrained=False)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, path=run, model_dir="models",
                    cbs=StopOnNaN())
    fit = _fit(learn, "teacher", epochs, lr, "accuracy", run, one_cycle=True, progress=progress)
    atomic_write(run / "teacher.pth", partial(torch.save, model.state_dict()))
    return _finish(run, dict(kind="teacher", params=params, data=dls.split_info, stages=[fit], weights="teacher.pth",
                             imagenet_weights=imagenet, wall_time_s=fit["time_s"],
                             **_evaluate(learn)))


def load_teacher(path, n_classes: int) -> nn.Module:
    "The teacher saved by `train_teacher` at `path` (its run folder or its .pth), loaded weights-only."
    path = Path(path)
    if path.is_dir(): path = path / "teacher.pth"
    if not path.exists():
        raise FileNotFoundError(f"No teacher at {path}: train it first with kd_lib.train.train_teacher(...) "
                                "or notebooks/teacher.ipynb, or pass teacher_path.")
    model = teacher(n_classes, pretrained=False)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def _check_shapes(student: nn.Module, tchr: nn.Module, size: int) -> None:
    s, t = stage_shapes(student, size), stage_shapes(tchr, size)
    if s != t:
        bad = {k: (s[k], t[k]) for k in s if s[k] != t[k]}
        raise ValueError(f"Student and teacher feature maps differ at {bad} (student, teacher) for {size} px "
                         "inputs: stage losses need equal shapes.")


def _step_learner(step: Step, method: str, student, tchr, dls, lr, run, freeze_bn, truncate, T, alpha, amp=None,
                  channels_last=False, cache: FeatureCache = None) -> Learner:
    """The Learner of one step: its model, loss, metric, trained parameters and distillation callbacks.
    With a `cache` of all splits, it trains the student's part of the step on the step's cached inputs and
    targets; with a cache of the valid split, it validates that part on them (no teacher, no frozen prefix)."""
    trained = [p for s in step.parts for p in stage_part(student, s).parameters()]
    common = dict(opt_func=paper_adam, lr=lr, splitter=lambda m: [trained], path=run, model_dir="models")
    if step.target == "labels": common.update(loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    else: common.update(loss_func=nn.MSELoss())
    cbs = [FreezeOthers(freeze_bn), StopOnNaN(), *([MixedPrecision(amp)] if amp else []),
           *([ChannelsLast()] if channels_last else [])]
    if cache is not None:
        inputs, targets, part = cache.step(step)
        if cache.train: return Learner(cache.dataloaders(inputs, targets), part, cbs=cbs, **common)
        cbs.append(ValidateOn(part, *inputs, *targets))
    if step.target != "labels":
        return Learner(dls, StudentStage(student, step.target, truncate),
                       cbs=cbs + [TeacherFeatures(tchr, step.target, truncate, run_valid=cache is None)], **common)
    if method == "simultaneous": cbs.append(FeatureLoss(tchr, truncate=truncate))
    if method == "hinton": cbs.append(SoftTargets(tchr, T, alpha))
    return Learner(dls, student, cbs=cbs, **common)


def train_student(student: str = "resnet10", method: str = "stagewise", dataset: str = "digits", data_path=None,
                  size: int = None, bs: int = 64, fraction: float = 1.0, seed: int = 0, selection: str = "valid",
                  augment: bool = True, epochs: int = 100, lr: float = 1e-4, teacher_path=None, out_dir="runs",
                  freeze_bn: bool = True, truncate: bool = True, T: float = 4.0, alpha: float = 0.9,
                  cache=False, cache_dtype: str = "float16", cache_bytes: int = 4 * 2**30, amp: str = None,
                  channels_last: bool = False, num_workers: int = 0, force: bool = False, progress=None) -> dict:
    """Train `student` by `method` (one of `METHODS`) and write its record; returns the record.

    Every step trains for `epochs` (per stage for stagewise) with the paper's Adam at `lr`, and
    starts from the best checkpoint of the step before. Feature steps keep the epoch with the
    lowest valid MSE, label steps the best valid accuracy. A killed run started again with the
    same arguments resumes from its last finished epoch; a finished run is returned, not retrained.
    `freeze_bn=False` lets frozen BatchNorm statistics drift (the paper's code); `truncate=False`
    runs whole models every batch (the paper's code). `T`, `alpha`: Hinton's temperature and weight.

    The fast path (book/performance.md): `cache=True` (needs `augment=False`) computes once what the
    frozen prefix and the teacher give each step, in `cache_dtype` ("float32": the plain path's result),
    in memory up to `cache_bytes`, beyond that in memory-mapped files under `data_dir()/"cache"`;
    `cache="valid"` does so for the valid split only (never augmented), so validation runs one stage.
    On CUDA, `amp` ("bf16" or "fp16") trains under fastai's MixedPrecision, teacher included, and
    `channels_last` puts student and teacher in that memory format. `num_workers`: data loading processes.
    """
    if method not in METHODS: raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    _check_fast(method, augment, freeze_bn, truncate, cache, cache_dtype, amp)
    params = dict(kind="student", student=student, method=method, dataset=dataset,
                  data_path=str(data_path) if data_path else None, size=size, bs=bs, fraction=fraction, seed=seed,
                  selection=selection, augment=augment, epochs=epochs, lr=lr,
                  teacher_path=str(teacher_path) if teacher_path else None, freeze_bn=freeze_bn, truncate=truncate,
                  cache=cache, cache_dtype=cache_dtype if cache else None, amp=amp, channels_last=channels_last,
                  num_workers=num_workers, **(dict(T=T, alpha=alpha) if method == "hinton" else {}))
    run = run_dir(out_dir, dataset, run_name(params))
    if (done := _start(run, params, force)) is not None: return done
    dls = get_data(dataset, data_path, size=size, bs=bs, fraction=fraction, seed=seed, selection=selection,
                   augment=augment, num_workers=num_workers)
    set_seed(seed, reproducible=True)
    model = resnet(student, dls.c)
    tchr, teacher_record = None, None
    if method != "no_teacher":
        tpath = Path(teacher_path) if teacher_path else run_dir(out_dir, dataset, "teacher")
        tchr = load_teacher(tpath, dls.c)
        teacher_record = read_json((tpath if tpath.is_dir() else tpath.parent) / RECORD) or {}
        _check_shapes(model, tchr, dls.split_info["size"])
        if channels_last: tchr.to(memory_format=torch.channels_last)
    progress_path = run / "progress.json"
    steps = (read_json(progress_path) or {}).get("steps", [])
    if steps: model.load_state_dict(torch.load(run / "stages" / f"{steps[-1]['name']}.pth", weights_only=True))
    with ExitStack() as stack:
        features = stack.enter_context(FeatureCache(dls, model, tchr, cache_dtype, cache_bytes, amp,
                                                    train=cache is True)) if cache else None
        for i, step in enumerate(METHODS[method][len(steps):], start=len(steps)):
            t0 = time.perf_counter()
            learn = _step_learner(step, method, model, tchr, dls, lr, run, freeze_bn, truncate, T, alpha, amp,
                                  channels_last, features)
            cached = dict(cache_time_s=time.perf_counter() - t0) if cache else {}
            _seed(seed * 1000 + i, learn.dls)
            monitor = "accuracy" if step.target == "labels" else "valid_loss"
            steps.append(dict(asdict(step), **_fit(learn, step.name, epochs, lr, monitor, run, progress=progress),
                              **cached))
            atomic_write(run / "stages" / f"{step.name}.pth", partial(torch.save, model.state_dict()))
            write_json(progress_path, dict(steps=steps))
            if i: (run / "stages" / f"{steps[-2]['name']}.pth").unlink(missing_ok=True)  # the last step's weights suffice
    final = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    scores = _evaluate(final)
    teacher_info = {k: teacher_record.get(k) for k in ("valid_accuracy", "test_accuracy")} if tchr else {}
    return _finish(run, dict(kind="student", params=params, data=dls.split_info, stages=steps,
                             teacher=dict(teacher_info, path=str(tpath) if tchr else None),
                             wall_time_s=sum(s["time_s"] + s.get("cache_time_s", 0) for s in steps), **scores))


def _check_fast(method, augment, freeze_bn, truncate, cache, cache_dtype, amp) -> None:
    "Reject fast-path options that could not give the plain path's result, saying what to change."
    if amp not in (None, *AMP_DTYPES): raise ValueError(f"amp={amp!r}: choose None, {', '.join(AMP_DTYPES)}.")
    if amp and not torch.cuda.is_available():
        raise ValueError(f"amp={amp!r} needs a CUDA GPU (fastai's MixedPrecision autocasts on CUDA) and there is "
                         "none: pass amp=None.")
    if cache not in (False, True, "valid"): raise ValueError(f"cache={cache!r}: choose False, True or 'valid'.")
    if not cache: return
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype={cache_dtype!r}: choose one of {', '.join(CACHE_DTYPES)}.")
    if augment and cache is True:
        raise ValueError("cache=True needs augment=False: augmentation gives new training images every epoch, "
                         "so there is nothing to compute once; cache='valid' caches the (never augmented) valid split.")
    if not freeze_bn: raise ValueError("cache needs freeze_bn=True: with freeze_bn=False the BatchNorm "
                                       "statistics of frozen stages drift every batch, which no cache can follow.")
    if not truncate: raise ValueError("cache never runs whole models: pass truncate=True (the default).")
    if method in ("simultaneous", "hinton"):
        raise ValueError(f"cache caches steps that train some stages on one target; {method!r} adds a "
                         "teacher loss over the whole student every batch: pass cache=False.")
