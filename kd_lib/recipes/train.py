"""Recipes: train the teacher, train a student by any method of `kd_lib.core.methods.METHODS`, each run in a
folder of its own (`kd_lib.recipes.records.RunFolder`) with best-epoch checkpoints, exact resume after a kill, and a
self-describing record::

    record = train_student(student="resnet14", method="stagewise", epochs=5)   # or train_student(config)
    record = train_student(student=my_net, teacher=my_big_net, stages=Stages.torchvision_resnet(), dls=my_dls,
                           adapters=True, method="stagewise", epochs=5)     # models and data of your own

A method's steps (`kd_lib.core.steps`) are fits of one Learner each; `kd_lib.recipes.fitting.fit` runs them. What a run
saved loads with `kd_lib.recipes.loading` (`load_teacher`, `load_student`, importable from here too).
"""
import gc
import shutil
import time
import warnings
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import torch
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from torch import nn

from ..core.distill import feature_mse, frozen
from ..core.models import PretrainedUnavailable, evaluating, resnet, teacher
from ..core.optim import fastai_adam
from ..core.stages import Stages, check_classes
from ..core.steps import Setting, StopOnNaN
from ..data.loaders import check_no_leak, get_data
from ..infra.files import read_json, save_weights
from ..infra.locks import LOCK, RunLock
from ..speed.cache import FeatureCache
from ..speed.taps import live_taps, n_params, tapped
from .budget import epochs_run, twin_epochs, twin_name
from .config import CUSTOM, StudentConfig, TeacherConfig
from .fitting import accuracy_of, evaluate, fit, forget_fit, seed_everything, step_seed
from .loading import load_student, load_teacher, load_weights  # noqa: F401 -- load_student: importable from here too
from .records import RunFolder, run_dir

__all__ = ["ABOVE_CHANCE", "RunExists", "train_teacher", "train_student", "setting", "describe_model"]


ABOVE_CHANCE = 1.5  # a teacher whose valid accuracy is below this many times chance is warned of: it teaches little


class RunExists(RuntimeError):
    "A run folder holds a run with other parameters."


def _start(run: RunFolder, config, force: bool, extra: dict = None):
    """The record of a finished run of `config` (to return as is), or None when it is to be trained (its lock
    held; `RunFolder.begin` then marks it started); a run folder holding progress made with other settings (but
    `config.same_result()`; `extra`: params beyond the configuration's) is an error."""
    if force:
        for p in run.path.glob("*"):
            if p.name != LOCK: shutil.rmtree(p) if p.is_dir() else p.unlink()
    if (old := run.params()) is not None and (diff := config.conflicts(old, extra)):
        folders = (f" Runs of two image folders (dataset='folder') in one out_dir share {run.path.parent}: give "
                   "each folder an out_dir of its own." if "data_path" in diff and config.dataset == "folder" else "")
        raise RunExists(f"{run.path} holds a run with other parameters (was, now: {diff}).{folders} To replace it, "
                        "pass force=True (train_teacher/train_student), or, in a notebook or with papermill (which "
                        f"have no force parameter), remove the run folder {run.path}; to keep it, choose another "
                        "out_dir (papermill: -p out_dir <folder>).")
    return run.record()


def _config(cls, config, changes: dict):
    "`config` (a `cls`) with `changes`, or a new `cls` of `changes` when there is none."
    if config is not None and not isinstance(config, cls):
        example = "train_student(student=..., method=...)" if cls is StudentConfig else "train_teacher(epochs=...)"
        raise TypeError(f"{config!r} is not a {cls.__name__}: pass the settings as keywords, for example {example}.")
    return cls(**changes) if config is None else config.replace(**changes)


def describe_model(model: nn.Module, name: str, stages: Stages = None, side: str = "student") -> dict:
    "What a record says of a model: its name, class, number of parameters and (given `stages`) stage paths."
    return dict(name=name, cls=f"{type(model).__module__}.{type(model).__qualname__}",
                params=n_params(model),
                **({"stages": {n: list(stages.paths(n, side)) for n in stages.all}} if stages else {}))


def train_teacher(config: TeacherConfig = None, out_dir="runs", force: bool = False, progress=None, *,
                  model: nn.Module = None, name: str = None, **changes) -> dict:
    """Train the paper's ResNet34 teacher (or `model`, a teacher of your own, named `name`, default its class)
    with one-cycle (max lr `lr`), keeping the best valid accuracy.

    `config`: a `TeacherConfig`, to which `changes` (its fields as keywords) apply; `pretrained`: True
    fine-tunes ImageNet weights (an error if they cannot be had), False trains from scratch, None uses
    them when they can be had and says so when not. Writes `<out_dir>/<dataset>/teacher/` with
    `teacher.pth` and `record.json`; returns the record. `progress=False` (or the environment's
    `KD_PROGRESS=0`, which the runner sets) turns fastai's progress bars and epoch tables off. A teacher of your
    own is recorded with its name (`params["model"]`, and `model`: its class and size); `load_teacher` then
    needs it passed. `model` is trained in place; when the run in `out_dir` is already finished (a re-run), its
    record is returned and its trained weights (`teacher.pth`) are loaded into `model` (`load_teacher`), so the
    module passed always ends trained.

    `seed` seeds the batch order and augmentation (and the paper's ResNet34's initialisation, built here); a
    `model` of your own is initialised when you build it, before anything here seeds, so `seed=0` alone does not
    reproduce its run: call `kd_lib.seed_everything(seed)` before building it.
    """
    c = _config(TeacherConfig, config, changes)
    if model is not None and c.pretrained:
        raise ValueError("pretrained=True loads ImageNet weights into the paper's ResNet34: a teacher of your own "
                         "(model=) comes with the weights it has. Leave pretrained unset.")
    extra = dict(model=name or type(model).__name__.lower()) if model is not None else {}
    run = RunFolder(run_dir(out_dir, c.dataset, c.run_name))
    with RunLock(run.path):  # one process trains a run folder at a time
        if (done := _start(run, c, force, extra)) is not None:
            if model is not None: load_teacher(run.path, len(done["data"]["vocab"]), model=model)  # trained, as kept
            return done
        dls = get_data(c.dataset, c.data_path, size=c.size, bs=c.bs, seed=c.seed, selection=c.selection,
                       augment=c.augment, num_workers=c.num_workers, per_class=c.per_class, split_seed=c.split_seed,
                       resident=c.resident)
        if model is not None:
            with torch.no_grad(), evaluating(model): check_classes(model(_dry_batch(dls)), dls.c, "teacher")
        run.begin(dict(c.params(), **extra))
        seed_everything(c.seed, dls)
        imagenet = None  # a teacher of your own comes with the weights it has
        if model is None:
            imagenet = c.pretrained is not False
            try: model = tapped(teacher(dls.c, pretrained=imagenet))
            except PretrainedUnavailable as e:
                if c.pretrained: raise
                warnings.warn(f"Training the teacher from scratch: {e}")
                imagenet, model = False, tapped(teacher(dls.c, pretrained=False))
        live_taps(model, _dry_batch(dls))  # the optimizer skips the taps that only ever meet padding
        learn = Learner(dls, model, opt_func=fastai_adam(model), loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                        path=run.path, model_dir="models", cbs=StopOnNaN())
        summary = fit(learn, "teacher", c.scaled(c.epochs), c.lr, "accuracy", run.path, one_cycle_lr=True,
                      progress=progress)
        save_weights(run.teacher_file, _rounded_to_fp16(model))  # evaluated and distilled as kept
        return run.finish(dict(kind="teacher", params=dict(c.params(), **extra), data=dls.split_info,
                               stages=[summary], model=describe_model(model, extra.get("model", "resnet34")),
                               weights=run.teacher_file.name, imagenet_weights=imagenet,
                               converged=summary["converged"], wall_time_s=summary["time_s"], **evaluate(learn)))


def _rounded_to_fp16(model: nn.Module) -> dict:
    """The model's state dict with its floating tensors in fp16, the model's own weights rounded to them: a teacher
    is kept at half the size, and the teacher its students distil is exactly the one its file holds."""
    weights = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    return weights


def _teacher_of(c: StudentConfig, out_dir, dls, given: nn.Module = None) -> tuple:
    """The teacher a student run distils: the one `train_teacher` saved (at `teacher_path`, or the dataset's in
    `out_dir`), loaded into `given` when given (a model of your own, built as it was), checked (same classes, no leak
    of its training images into this run's valid or test split), with its path and record; `given` alone (no
    `teacher_path`: no record to check), with path None; (None, None, {}) without a teacher."""
    if not c.method_def.needs_teacher: return None, None, {}
    if given is not None and not c.teacher_path:
        warnings.warn("A teacher of your own comes without a record, so nothing can check that it did not train on "
                      "this run's valid or test images: train it with train_teacher(model=...) and pass the folder it "
                      "wrote as teacher_path= too.")
        return given, None, dict(name=type(given).__name__.lower())
    tpath = Path(c.teacher_path) if c.teacher_path else run_dir(out_dir, c.dataset, "teacher")
    tchr = load_teacher(tpath, dls.c, model=given)
    record = read_json((tpath if tpath.is_dir() else tpath.parent) / "record.json") or {}
    _above_chance(record, f"at {tpath}", dls.c)
    vocab, theirs = dls.split_info["vocab"], (record.get("data") or {}).get("vocab")
    if theirs is not None and list(theirs) != vocab:
        raise ValueError(f"The teacher at {tpath} was trained on the classes {theirs}, this run's data has {vocab}: "
                         "a teacher labels its own classes. Train a teacher on this dataset (teacher.ipynb) or "
                         "pass the teacher_path of one.")
    there, here = (record.get("params") or {}).get("data_path"), c.data_path  # as each run was given it
    if c.dataset == "folder" and there and here and Path(there).resolve() != Path(here).resolve():
        warnings.warn(f"The teacher at {tpath} was trained on the image folder {there}, this run is on {here}: runs "
                      f"of every image folder (dataset='folder') share {Path(out_dir) / 'folder'}. Unless it is the "
                      "same folder moved, give each folder an out_dir of its own (its teacher, then its students), "
                      "or pass the teacher_path of this folder's teacher.")
    if record.get("data"): check_no_leak(record["data"], dls, f"The teacher at {tpath}")
    else: warnings.warn(f"The teacher at {tpath} has no record beside it, so nothing can check that it did not train "
                        "on this run's valid or test images.")
    return tchr, tpath, record


def _above_chance(record: dict, where: str, n_classes: int, split: str = "its valid split",
                  fix: str = "Train it longer or at another lr, or check its data.") -> None:
    """Warn when the teacher's (`where`: "at <path>", or how it was given) valid accuracy (the record's, or
    measured on `split`) is below `ABOVE_CHANCE` times chance on `n_classes` classes, saying the `fix`."""
    acc, chance = record.get("valid_accuracy"), 100 / n_classes
    if isinstance(acc, (int, float)) and acc < ABOVE_CHANCE * chance:
        warnings.warn(f"The teacher {where} reached {acc:.1f}% on {split}, not clearly above chance "
                      f"({chance:.1f}% on {n_classes} classes; a teacher to distil has at least {ABOVE_CHANCE:g} x "
                      f"chance): it has little to teach. {fix}")


def _dry_batch(dls) -> torch.Tensor:
    "A batch of one zero image of the data's size, for the dry forward passes that check models before training."
    size = dls.split_info["size"] if hasattr(dls, "split_info") else dls.one_batch()[0].shape[-1]
    return torch.zeros(1, 3, size, size)


def _budget(c: StudentConfig, out_dir) -> dict:
    """For a budget control (`Method.budget_of`), its twin (the run of that method with the same dataset, student,
    fraction and seed, at budget 1) and the `epochs` the twin used in all times the control's `budget` (a long twin
    gets twice them), read from its complete record; None otherwise."""
    of = c.method_def.budget_of
    if not of: return None
    twin = twin_name(c, of)
    if (record := RunFolder(run_dir(out_dir, c.dataset, twin)).record()) is None:
        raise FileNotFoundError(f"{c.method} trains for as many epochs as its {of} twin used: train "
                                f"{run_dir(out_dir, c.dataset, twin)} first (the runner does, in that order).")
    return dict(twin=twin, epochs=twin_epochs(c, epochs_run(record)))


def _converged(fits: list):
    "A run converged when every fit did: False when any did not, None when any could not be judged, else True."
    flags = [f["converged"] for f in fits]
    return False if False in flags else None if None in flags else True


def _train_steps(s: Setting, run: RunFolder, progress, budget: dict = None) -> list:
    """Fit the method's steps not yet done (`progress.json` lists the done ones; the last one's weights are
    in `stages/`, the adapters in `adapters.pth`), each from the weights the one before kept, for the
    configuration's epochs (the `budget`'s, for a budget control); returns every step's summary."""
    c, model = s.config, s.student
    steps = run.progress()
    if steps: model.load_state_dict(load_weights(run.stage_file(steps[-1]["name"])))
    if steps and len(s.adapters): s.adapters.load_state_dict(load_weights(run.adapters_file))
    with ExitStack() as stack:
        features = stack.enter_context(FeatureCache(s.dls, model, s.teacher, c.cache_dtype, c.cache_bytes, c.amp,
                                                    train=c.cache is True, stages=s.stages,
                                                    channels_last=c.channels_last)) if c.cache else None
        plan = s.method.steps_for(s.stages)
        for i, step in enumerate(plan[len(steps):], start=len(steps)):
            t0, c0 = time.perf_counter(), time.process_time()
            learn = step.learner(s, features)
            cached = dict(cache_time_s=time.perf_counter() - t0, cache_cpu_s=time.process_time() - c0) \
                if c.cache else {}
            seed_everything(step_seed(c.seed, i), learn.dls)
            labels = step.monitor == "accuracy"
            test = getattr(s.dls, "test", None)
            tested = dict(test_accuracy=partial(accuracy_of, model, test)) if c.test_each_epoch and labels and test \
                else None
            summary = fit(learn, step.name, budget["epochs"] if budget else c.scaled(getattr(c, step.epochs)), c.lr,
                          step.monitor, run.path, one_cycle_lr=c.schedule == "one_cycle", progress=progress,
                          patience=c.scaled(c.patience), extras=tested)
            steps.append({"parts": step.parts, "target": getattr(step, "target", None) or
                          ("labels" if labels else "forced"), **summary, **cached})
            save_weights(run.stage_file(step.name), model.state_dict())
            if len(s.adapters): save_weights(run.adapters_file, s.adapters.state_dict())
            run.write_progress(steps)
            forget_fit(learn, step.name, run.path)  # only now: a kill before progress.json resumes the finished fit
            if i: run.stage_file(steps[-2]["name"]).unlink(missing_ok=True)  # the last weights suffice
            learn = None  # its loaders hold this step's cache: freed before the next one is built (cache_bytes) ...
            gc.collect()  # ... now, not whenever the Learner's reference cycles are next collected
    return steps


def _custom_data(dls) -> dict:
    "What a record says of data loaders of your own (no split hashes: kd_lib did not draw them)."
    loaders = dict(zip(("train", "valid", "test"), dls.loaders))
    x = dls.one_batch()[0]
    return dict(name="custom", path=None, size=int(x.shape[-1]), bs=dls.bs, vocab=[str(v) for v in dls.vocab],
                sizes={k: dl.n for k, dl in loaders.items()}, hashes={}, augment=None)


def setting(c: StudentConfig, out_dir="runs", student: nn.Module = None, teacher: nn.Module = None,
            stages: Stages = None, dls=None, adapters=False) -> Setting:
    """The objects a student run of configuration `c` trains with, built and checked before anything is written:
    the data (`dls`, or the configuration's dataset), the student (`student`, or Table 1's by name), the teacher
    (`teacher`, or the dataset's), the `stages` (default: the paper's for Table 1's students, torchvision's ResNet
    layout for models that have it) and the adapters of the stages whose maps differ (`adapters`: True or a
    factory; see `kd_lib.core.stages.Stages.check`, which refuses a mismatch without them). The stages are checked on
    both models in one dry forward pass before any training: every path a module that runs, in forward order, the
    student's output one value per class. kd_lib's own models run on `kd_lib.speed.taps.TapConv2d`s (faster on a CPU,
    the same numbers within float rounding); the student's then keep as parameters only the kernel taps that meet
    images of the data's size (`kd_lib.speed.taps.live_taps`, in place), and so do the teacher's when it is the one
    `train_teacher` saved (a teacher given is left as it is): its forward then copies no taps each batch."""
    if dls is None:
        dls = get_data(c.dataset, c.data_path, size=c.size, bs=c.bs, fraction=c.fraction, seed=c.seed,
                       selection=c.selection, augment=c.augment, num_workers=c.num_workers, per_class=c.per_class,
                       split_seed=c.split_seed, resident=c.resident)
    seed_everything(c.seed)
    model = student if student is not None else tapped(resnet(c.student, dls.c))
    if stages is None: stages = Stages.paper() if student is None else _guess_stages(model)
    tchr, tpath, trecord = _teacher_of(c, out_dir, dls, teacher)
    made = stages.check(model, tchr, _dry_batch(dls), adapters, n_classes=dls.c)  # before any training
    if teacher is not None and tchr is not None and tpath is None:  # a module without a record: measured, once
        device = next(iter(teacher.parameters()), torch.zeros(0)).device  # eval mode, no_grad: `accuracy_of`
        acc = accuracy_of(teacher, ((x.to(device), y.to(device)) for x, y in dls.valid))
        _above_chance(dict(valid_accuracy=acc), f"given as teacher= (a {type(teacher).__name__})", dls.c,
                      split="this run's valid split", fix="Pass a trained teacher: train it first (train_teacher("
                      "model=<it>) trains a teacher of your own and leaves it trained), or load its weights into it.")
    for m in (model, tchr if teacher is None else None):  # the student's optimizer, and the teacher kd_lib loaded,
        if m is not None: live_taps(m, _dry_batch(dls))  # skip the taps that only ever meet padding (bit for bit)
    if tchr is not None and c.channels_last: tchr.to(memory_format=torch.channels_last)
    info = dict({k: trecord.get(k) for k in ("valid_accuracy", "test_accuracy", "converged")},
                path=_relative(tpath, out_dir),
                name=(trecord.get("params") or {}).get("model", "resnet34") if tpath else trecord.get("name")) \
        if tchr is not None else dict(path=None)
    return Setting(c, c.method_def, model, tchr, stages, made, dls, teacher_info=info)


def _relative(path, out_dir):
    "`path` as a record keeps it: relative to `out_dir` when inside it (no machine's folders in a record), else as is."
    if path is None: return None
    try: return Path(path).resolve().relative_to(Path(out_dir).resolve()).as_posix()
    except ValueError: return str(path)


def _guess_stages(model: nn.Module) -> Stages:
    "torchvision's ResNet layout when `model` has it, else an error asking for `stages`."
    names = {n for n, _ in model.named_children()}
    if {"conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"} <= names:
        return Stages.torchvision_resnet()
    raise ValueError(f"Cannot tell the stages of a {type(model).__name__}: pass stages=kd_lib.core.stages.Stages(...) "
                     "naming the module that ends each stage (kd_lib.core.stages.module_table lists them).")


def train_student(config: StudentConfig = None, out_dir="runs", force: bool = False, progress=None, *,
                  teacher: nn.Module = None, stages: Stages = None, dls=None, adapters=False, **changes) -> dict:
    """Train a student as `config` (a `StudentConfig`, to which `changes`, its fields as keywords, apply)
    says, and write its record; returns the record.

    Every step of the method trains for `epochs` (per stage for stagewise) with the paper's Adam at `lr`,
    and starts from the best checkpoint of the step before. Feature steps keep the epoch with the lowest
    valid MSE, label steps the best valid accuracy. A killed run started again with the same settings
    resumes from its last finished epoch; a finished run is returned, not retrained (a student module passed then
    gets the run's trained weights loaded, `load_student`, and is left in eval mode). The fields of
    `StudentConfig` say what each setting does; book/performance.md explains the fast path.

    Models and data of your own: `student=<nn.Module>` (its run is named by `name=`, default its class; trained in
    place, or given the finished run's weights), `teacher=<nn.Module>` (trained, frozen here; its accuracy on the
    run's valid split is measured once, and a teacher not clearly above chance is warned of), `stages` (a
    `kd_lib.core.stages.Stages`; torchvision's ResNets are recognised), `dls` (fastai `DataLoaders` of train,
    valid and, optionally, test) and `adapters` (True, or a
    factory, where the student's maps differ from the teacher's). `progress=False` (or `KD_PROGRESS=0`) turns
    fastai's progress bars off; the digits and downloads live in `KD_DATA` (default: the repository's `data/`).

    `seed` seeds the fraction sampled, the batch order and a Table 1 student's initialisation (built here after
    seeding); a `student` module of your own was initialised when you built it, before anything here seeds, so
    `seed=0` alone does not reproduce its run: call `kd_lib.seed_everything(seed)` before building it.
    """
    own = changes.pop("student") if isinstance(changes.get("student"), nn.Module) else None
    name = changes.pop("name", None)
    if own is not None: changes["student"] = name or type(own).__name__.lower()
    if dls is not None: changes.setdefault("dataset", CUSTOM)
    c = _config(StudentConfig, config, changes)
    c.check_device()
    run = RunFolder(run_dir(out_dir, c.dataset, c.run_name))
    with RunLock(run.path):  # one process trains a run folder at a time
        if (done := _start(run, c, force)) is not None:
            if own is not None: load_student(run.path, model=own)  # the module passed ends trained, as the run kept it
            return done
        s = setting(c, out_dir, own, teacher, stages, dls, adapters)
        s.run = run.path
        budget = _budget(c, out_dir)
        run.begin(c.params())
        steps = _train_steps(s, run, progress, budget)
        scores = evaluate(Learner(s.dls, s.student, loss_func=CrossEntropyLossFlat(), metrics=accuracy))
        unused = s.dls.unused_dl() if hasattr(s.dls, "unused_dl") else None
        if unused is not None: scores["unused_accuracy"] = round(accuracy_of(s.student, unused), 4)
        if s.teacher is not None:
            scores["feature_mse"] = feature_mse(s.student, frozen(s.teacher, s.dls.device), s.dls.valid, s.stages,
                                                s.adapters)
        tinfo = {k: v for k, v in s.teacher_info.items() if k != "name"}
        models = dict(student=describe_model(s.student, c.student, s.stages),
                      teacher=describe_model(s.teacher, s.teacher_info["name"], s.stages, "teacher")
                      if s.teacher is not None else None,
                      stages=s.stages.describe(), adapters={n: str(a) for n, a in s.adapters.items()})
        data = s.dls.split_info if hasattr(s.dls, "split_info") else _custom_data(s.dls)
        return run.finish(dict(kind="student", params=c.params(), data=data, stages=steps, models=models,
                               teacher=tinfo, converged=_converged(steps), **({"budget": budget} if budget else {}),
                               wall_time_s=sum(x["time_s"] + x.get("cache_time_s", 0) for x in steps), **scores))
