"""Recipes: train the teacher, train a student by any method of `kd_lib.methods.METHODS`, each run in a
folder of its own with best-epoch checkpoints, exact resume after a kill, and a self-describing record.

    record = train_student(student="resnet14", method="stagewise", epochs=5)   # or train_student(config)

A method's steps are fits of one Learner each (`step_learner`); `kd_lib.fitting.fit` runs them.
"""
import shutil
import time
import warnings
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from torch import nn

from .cache import FeatureCache, ValidateOn
from .config import StudentConfig, TeacherConfig
from .data import check_no_leak, get_data
from .distill import FreezeOthers, StudentStage, TeacherFeatures, feature_mse, frozen
from .fitting import StopOnNaN, accuracy_of, evaluate, fit, forget_fit, paper_adam, seed_everything, step_seed
from .forced import BestStages, ForcedStages, TeacherInputs, forced_loss, stage_mse
from .locks import LOCK, RunLock
from .methods import FORCED, Step, get_method
from .models import FEATURE_STAGES, PretrainedUnavailable, check_stage_shapes, resnet, stage_part, teacher
from .records import (RECORD, complete_record, read_json, recorded_params, run_name, save_weights, versions,
                      write_json)

__all__ = ["RunExists", "run_dir", "train_teacher", "train_student", "step_learner", "load_teacher",
           "load_student"]


class RunExists(RuntimeError):
    "A run folder holds a run with other parameters."


def run_dir(out_dir, dataset: str, name: str) -> Path:
    "The folder of one run: `<out_dir>/<dataset>/<name>`."
    return Path(out_dir) / dataset / name


def _start(run: Path, config, force: bool):
    """The record of a finished run of `config` (to return as is), or None when it is to be trained (its lock
    held; `_begin` then marks it started); a run folder holding progress made with other settings (but
    `config.same_result()`) is an error."""
    if force:
        for p in run.glob("*"):
            if p.name != LOCK: shutil.rmtree(p) if p.is_dir() else p.unlink()
    if (old := recorded_params(run)) is not None and (diff := config.conflicts(old)):
        raise RunExists(f"{run} holds a run with other parameters (was, now: {diff}); "
                        "pass force=True to replace it, or choose another out_dir.")
    if (record := complete_record(run)) is not None: return record
    return None


def _begin(run: Path, config) -> None:
    "Mark `run` started with `config`'s params, once every check that can refuse the run has passed."
    write_json(run / "params.json", config.params())


def _finish(run: Path, record: dict) -> dict:
    """Write `record` as the run's complete record, then delete what only a resumed run would need (resume states,
    best-epoch files): until the record is written, a killed run resumes its finished fits instead of redoing them."""
    record.update(status="complete", versions=versions(), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    record = read_json(write_json(run / RECORD, record))
    for p in run.glob("*.state.pth"): p.unlink()
    shutil.rmtree(run / "models", ignore_errors=True)
    return record


def _config(cls, config, changes: dict):
    "`config` (a `cls`) with `changes`, or a new `cls` of `changes` when there is none."
    if config is not None and not isinstance(config, cls):
        example = "train_student(student=..., method=...)" if cls is StudentConfig else "train_teacher(epochs=...)"
        raise TypeError(f"{config!r} is not a {cls.__name__}: pass the settings as keywords, for example {example}.")
    return cls(**changes) if config is None else config.replace(**changes)


def train_teacher(config: TeacherConfig = None, out_dir="runs", force: bool = False, progress=None,
                  **changes) -> dict:
    """Train the paper's ResNet34 teacher with one-cycle (max lr `lr`), keeping the best valid accuracy.

    `config`: a `TeacherConfig`, to which `changes` (its fields as keywords) apply; `pretrained`: True
    fine-tunes ImageNet weights (an error if they cannot be had), False trains from scratch, None uses
    them when they can be had and says so when not. Writes `<out_dir>/<dataset>/teacher/` with
    `teacher.pth` and `record.json`; returns the record.
    """
    c = _config(TeacherConfig, config, changes)
    run = run_dir(out_dir, c.dataset, "teacher")
    with RunLock(run):  # one process trains a run folder at a time
        if (done := _start(run, c, force)) is not None: return done
        dls = get_data(c.dataset, c.data_path, size=c.size, bs=c.bs, seed=c.seed, selection=c.selection,
                       augment=c.augment, num_workers=c.num_workers, per_class=c.per_class, split_seed=c.split_seed)
        _begin(run, c)
        seed_everything(c.seed, dls)
        imagenet = c.pretrained is not False
        try: model = teacher(dls.c, pretrained=imagenet)
        except PretrainedUnavailable as e:
            if c.pretrained: raise
            warnings.warn(f"Training the teacher from scratch: {e}")
            imagenet, model = False, teacher(dls.c, pretrained=False)
        learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, path=run, model_dir="models",
                        cbs=StopOnNaN())
        summary = fit(learn, "teacher", c.epochs, c.lr, "accuracy", run, one_cycle_lr=True, progress=progress)
        save_weights(run / "teacher.pth", model.state_dict())
        return _finish(run, dict(kind="teacher", params=c.params(), data=dls.split_info, stages=[summary],
                                 weights="teacher.pth", imagenet_weights=imagenet, converged=summary["converged"],
                                 wall_time_s=summary["time_s"], **evaluate(learn)))


def _load_weights(path: Path) -> dict:
    "The state dict saved at `path`, weights-only, on the CPU (weights saved on a GPU load anywhere)."
    try: return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on a file that is not a checkpoint (pickle, zip, index errors)
        raise ValueError(f"{path} is not a PyTorch weights file saved by kd_lib ({type(e).__name__}): it is corrupt, "
                         "truncated, or another kind of file. Train it again (delete its run folder first), or pass "
                         "the right file; never load a file you do not trust with weights_only=False.") from e


def load_teacher(path, n_classes: int) -> nn.Module:
    "The teacher saved by `train_teacher` at `path` (its run folder or its .pth), loaded weights-only."
    path = Path(path)
    if path.is_dir(): path = path / "teacher.pth"
    if not path.exists():
        raise FileNotFoundError(f"No teacher at {path}: train it first with kd_lib.train.train_teacher(...) "
                                "or notebooks/teacher.ipynb, or pass teacher_path.")
    model, weights = teacher(n_classes, pretrained=False), _load_weights(path)
    try: model.load_state_dict(weights)
    except RuntimeError as e:
        mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        extra, missing = sorted(set(weights) - set(mine)), sorted(set(mine) - set(weights))
        shapes = [k for k in mine if k in weights and tuple(weights[k].shape) != mine[k]]
        what = (f"{len(missing)} of the teacher's tensors are missing and {len(extra)} are not the teacher's "
                "(a student's weights?)" if missing or extra else f"tensors of other shapes ({shapes[:3]}: "
                f"a teacher of another number of classes than {n_classes}?)")
        raise ValueError(f"{path} does not hold a ResNet34 teacher of {n_classes} classes as train_teacher saves "
                         f"one: {what}. Pass the teacher's run folder or its teacher.pth.") from e
    return model


def load_student(run) -> nn.Module:
    "The trained student of a finished run folder (in eval mode): its model with the weights its last step kept."
    run = Path(run)
    if (record := complete_record(run)) is None:
        raise FileNotFoundError(f"No finished student run in {run}: train it with kd_lib.train.train_student(...).")
    model = resnet(record["params"]["student"], len(record["data"]["vocab"]))
    model.load_state_dict(_load_weights(run / "stages" / f"{record['stages'][-1]['name']}.pth"))
    return model.eval()


def step_learner(step: Step, config: StudentConfig, student: nn.Module, tchr: nn.Module, dls, run: Path = None,
                 cache: FeatureCache = None) -> Learner:
    """The Learner of one step of `config.method`: its model, loss, metric, trained parameters and callbacks.
    With a `cache` of all splits, it trains the student's part of the step on the step's cached inputs and
    targets; with a cache of the valid split, it validates that part on them (no teacher, no frozen prefix)."""
    trained = [p for s in step.parts for p in stage_part(student, s).parameters()]
    common = dict(opt_func=paper_adam, lr=config.lr, splitter=lambda m: [trained], path=run, model_dir="models")
    if step.target == "labels": common.update(loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    elif step.target == FORCED: common.update(loss_func=forced_loss, metrics=[stage_mse(s) for s in FEATURE_STAGES])
    else: common.update(loss_func=nn.MSELoss())
    cbs = [FreezeOthers(config.freeze_bn), StopOnNaN(), *([MixedPrecision(config.amp)] if config.amp else []),
           *([ChannelsLast()] if config.channels_last else []),
           *([BestStages(student, run, step.name)] if step.target == FORCED else [])]
    if cache is not None:
        inputs, targets, part = cache.step(step)
        if cache.train: return Learner(cache.dataloaders(inputs, targets), part, cbs=cbs, **common)
        cbs.append(ValidateOn(part, *inputs, *targets))
    if step.target == FORCED:
        return Learner(dls, ForcedStages(student), cbs=cbs + [TeacherInputs(tchr, run_valid=cache is None)], **common)
    if step.target != "labels":
        return Learner(dls, StudentStage(student, step.target, config.truncate),
                       cbs=cbs + [TeacherFeatures(tchr, step.target, config.truncate, run_valid=cache is None)],
                       **common)
    return Learner(dls, student, cbs=cbs + get_method(config.method).label_callbacks(tchr, student, config), **common)


def _teacher_of(c: StudentConfig, out_dir, dls, student: nn.Module) -> tuple:
    """The teacher a student run distils (frozen parts are checked: same classes, same stage shapes), its
    path and its record; (None, None, {}) for a method without a teacher."""
    if not get_method(c.method).needs_teacher: return None, None, {}
    tpath = Path(c.teacher_path) if c.teacher_path else run_dir(out_dir, c.dataset, "teacher")
    tchr = load_teacher(tpath, dls.c)
    record = read_json((tpath if tpath.is_dir() else tpath.parent) / RECORD) or {}
    vocab, theirs = dls.split_info["vocab"], (record.get("data") or {}).get("vocab")
    if theirs is not None and list(theirs) != vocab:
        raise ValueError(f"The teacher at {tpath} was trained on the classes {theirs}, this run's data has {vocab}: "
                         "a teacher labels its own classes. Train a teacher on this dataset (teacher.ipynb) or "
                         "pass the teacher_path of one.")
    if record.get("data"): check_no_leak(record["data"], dls, f"The teacher at {tpath}")
    else: warnings.warn(f"The teacher at {tpath} has no record beside it, so nothing can check that it did not train "
                        "on this run's valid or test images.")
    check_stage_shapes(student, tchr, dls.split_info["size"])
    if c.channels_last: tchr.to(memory_format=torch.channels_last)
    return tchr, tpath, record


def _budget(c: StudentConfig, out_dir) -> dict:
    """For a budget control (`Method.budget_of`), its twin (the run of that method with the same dataset, student,
    fraction and seed) and the `epochs` the twin used in all, read from its complete record; None otherwise."""
    of = get_method(c.method).budget_of
    if not of: return None
    twin = run_name(dict(c.params(), method=of))
    if (record := complete_record(run_dir(out_dir, c.dataset, twin))) is None:
        raise FileNotFoundError(f"{c.method} trains for as many epochs as its {of} twin used: train "
                                f"{run_dir(out_dir, c.dataset, twin)} first (the runner does, in that order).")
    return dict(twin=twin, epochs=sum(s["epochs_run"] for s in record["stages"]))


def _converged(fits: list):
    "A run converged when every fit did: False when any did not, None when any could not be judged, else True."
    flags = [f["converged"] for f in fits]
    return False if False in flags else None if None in flags else True


def _train_steps(c: StudentConfig, run: Path, dls, model: nn.Module, tchr, progress, budget: dict = None) -> list:
    """Fit the method's steps not yet done (`progress.json` lists the done ones; the last one's weights are
    in `stages/`), each from the weights the one before kept, for the configuration's epochs (the `budget`'s, for
    a budget control); returns every step's summary."""
    progress_path = run / "progress.json"
    steps = (read_json(progress_path) or {}).get("steps", [])
    if steps: model.load_state_dict(_load_weights(run / "stages" / f"{steps[-1]['name']}.pth"))
    with ExitStack() as stack:
        features = stack.enter_context(FeatureCache(dls, model, tchr, c.cache_dtype, c.cache_bytes, c.amp,
                                                    train=c.cache is True)) if c.cache else None
        method = get_method(c.method)
        for i, step in enumerate(method.steps[len(steps):], start=len(steps)):
            t0, c0 = time.perf_counter(), time.process_time()
            learn = step_learner(step, c, model, tchr, dls, run, features)
            cached = dict(cache_time_s=time.perf_counter() - t0, cache_cpu_s=time.process_time() - c0) \
                if c.cache else {}
            seed_everything(step_seed(c.seed, i), learn.dls)
            labels = step.target == "labels"
            tested = dict(test_accuracy=partial(accuracy_of, model, dls.test)) if c.test_each_epoch and labels else None
            summary = fit(learn, step.name, budget["epochs"] if budget else getattr(c, step.epochs), c.lr,
                          "accuracy" if labels else "valid_loss", run, one_cycle_lr=c.schedule == "one_cycle",
                          progress=progress, patience=c.patience, extras=tested)
            steps.append({"parts": step.parts, "target": step.target, **summary, **cached})
            save_weights(run / "stages" / f"{step.name}.pth", model.state_dict())
            write_json(progress_path, dict(steps=steps))
            forget_fit(learn, step.name, run)  # only now: a kill before progress.json resumes the finished fit
            if i: (run / "stages" / f"{steps[-2]['name']}.pth").unlink(missing_ok=True)  # the last weights suffice
    return steps


def train_student(config: StudentConfig = None, out_dir="runs", force: bool = False, progress=None,
                  **changes) -> dict:
    """Train a student as `config` (a `StudentConfig`, to which `changes`, its fields as keywords, apply)
    says, and write its record; returns the record.

    Every step of the method trains for `epochs` (per stage for stagewise) with the paper's Adam at `lr`,
    and starts from the best checkpoint of the step before. Feature steps keep the epoch with the lowest
    valid MSE, label steps the best valid accuracy. A killed run started again with the same settings
    resumes from its last finished epoch; a finished run is returned, not retrained. The fields of
    `StudentConfig` say what each setting does; book/performance.md explains the fast path.
    """
    c = _config(StudentConfig, config, changes)
    c.check_device()
    run = run_dir(out_dir, c.dataset, c.run_name)
    with RunLock(run):  # one process trains a run folder at a time
        if (done := _start(run, c, force)) is not None: return done
        dls = get_data(c.dataset, c.data_path, size=c.size, bs=c.bs, fraction=c.fraction, seed=c.seed,
                       selection=c.selection, augment=c.augment, num_workers=c.num_workers, per_class=c.per_class,
                       split_seed=c.split_seed)
        seed_everything(c.seed)
        model = resnet(c.student, dls.c)
        tchr, tpath, trecord = _teacher_of(c, out_dir, dls, model)
        budget = _budget(c, out_dir)
        _begin(run, c)
        steps = _train_steps(c, run, dls, model, tchr, progress, budget)
        scores = evaluate(Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy))
        if (unused := dls.unused_dl()) is not None: scores["unused_accuracy"] = round(accuracy_of(model, unused), 4)
        if tchr is not None: scores["feature_mse"] = feature_mse(model, frozen(tchr, dls.device), dls.valid)
        teacher = dict({k: trecord.get(k) for k in ("valid_accuracy", "test_accuracy", "converged")},
                       path=str(tpath)) if tchr else dict(path=None)
        return _finish(run, dict(kind="student", params=c.params(), data=dls.split_info, stages=steps,
                                 teacher=teacher, converged=_converged(steps), **({"budget": budget} if budget else {}),
                                 wall_time_s=sum(s["time_s"] + s.get("cache_time_s", 0) for s in steps), **scores))
