"""Stagewise distillation as the paper ran it, against kd_lib's fast path: one process, same data, same seed.

Variants, each one full 6-stage schedule (5 feature stages and the head), `--epochs` per stage:

* ``paper``    (a)  the authors' loop re-implemented in plain PyTorch: every batch the whole student and the
  whole teacher forward; the teacher as fastai v1's ``learn.freeze()`` left it (train mode, BatchNorm and
  head trainable, no ``no_grad``), so the MSE backpropagates into it too; the whole student in train mode
  (frozen BatchNorm statistics drift); torch's Adam over all parameters; the best epoch kept in memory.
* ``plain``    (a') the same with the obvious fixes only: ``train_student(truncate=False)``, the teacher in
  eval mode under ``no_grad``, frozen BatchNorm frozen, still whole forwards.
* ``truncate`` (b)  ``train_student()``: teacher and student run only as far as the stage.
* ``fast``     (b)  ``train_student(cache="valid", cache_dtype="float32")``: truncation, and the valid split
  (never augmented) computed once per stage: validation runs the trained stage only.
* ``cached``   (b)  ``train_student(cache=True)``: inputs and targets of every stage computed once, fp16
  (augmentation off only).
* ``forced``   (c)  ``train_student(method="teacher_forced")``: the five stages at once, each on the teacher's
  map before it (one teacher pass per batch), then the head; not the same numbers (another schedule).
* ``forced_ft`` (c) ``method="teacher_forced_finetune"``: the same, then each stage fine-tuned in turn on the
  student's own inputs for ``--finetune-epochs``.
* ``forced_cached`` (c) ``method="teacher_forced", cache=True``: one cache of the teacher's five maps
  (augmentation off only).

``truncate`` and ``fast`` give (a')'s numbers bit for bit. ``--augment both`` runs paper, plain, truncate,
fast, forced and forced_ft with the paper's augmentation, and paper, plain, cached and forced_cached without.
Times are process CPU time (one torch thread: what the run costs, which other jobs on a shared machine
disturb much less than wall time; the wall time of each whole run is shown too). Prints a table (time per
schedule, images per second per stage, speed-ups against (a), (a') and (b) +valid cache with the same
augmentation, accuracies, the trained student's feature MSE to the teacher per stage) and writes it, with
versions and settings, as JSON. See benchmarks/README.md, and its GPU settings.
"""
import argparse
import copy
import os
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from torch import nn

from kd_lib.data.loaders import get_data
from kd_lib.core.distill import stage_features
from kd_lib.recipes.fitting import evaluate, seed_everything, step_seed
from kd_lib.core.models import resnet
from kd_lib.recipes.records import run_name, versions
from kd_lib.infra.files import write_json
from kd_lib.core.stages import Stages
from kd_lib.recipes.records import run_dir
from kd_lib.recipes.train import load_teacher, train_student, train_teacher

VARIANTS = {"paper": "(a)", "plain": "(a')", "truncate": "(b) truncate", "fast": "(b) +valid cache",
            "cached": "(b) cache", "forced": "(c) teacher-forced", "forced_ft": "(c) +fine-tune",
            "forced_cached": "(c) cache"}
PLAN = {True: ["paper", "plain", "truncate", "fast", "forced", "forced_ft"],  # --augment both
        False: ["paper", "plain", "cached", "forced_cached"]}
AUGMENT_OFF = ("cached", "forced_cached")  # variants that cache the training split, so run without augmentation
PAPER = Stages.paper()  # the paper's models and stages


def papers_teacher(path, n_classes: int, device) -> nn.Module:
    "The teacher as the paper's loop had it: fastai v1 `learn.freeze()` (BatchNorm and head trainable), train mode."
    tchr = load_teacher(path, n_classes).to(device).train()
    tchr.body.requires_grad_(False)
    for m in tchr.body.modules():
        if isinstance(m, nn.BatchNorm2d): m.requires_grad_(True)
    return tchr


def _plain(dl):
    "The batches of `dl` as plain tensors, as fastai v1 gave them to the paper's loop."
    for b in dl: yield tuple(t.as_subclass(torch.Tensor) for t in b)


def _paper_loss(net, tchr, stage: str, x, y):
    "A stage's loss as the paper's loop computed it: both networks whole, MSE of hooked feature maps; the head: CE."
    if stage == "head": return F.cross_entropy(net(x), y)
    return F.mse_loss(stage_features(net, x, PAPER, [stage], truncate=False)[0],
                      stage_features(tchr, x, PAPER, [stage], truncate=False)[0])


def paper_stagewise(dls, student: str, teacher_path, epochs: int, lr: float, seed: int) -> tuple:
    """(a): the authors' stagewise loop, on the batches `train_student` sees (same seeds); returns the student
    and per stage its CPU and wall time and best valid value (lowest mean batch MSE, best accuracy for the head)."""
    set_seed(seed, reproducible=True)
    net = resnet(student, dls.c).to(dls.device)
    tchr = papers_teacher(teacher_path, dls.c, dls.device)
    stages = []
    for i, stage in enumerate(PAPER.all):
        seed_everything(step_seed(seed, i), dls)
        t0, c0 = time.perf_counter(), time.process_time()
        net.requires_grad_(False)
        PAPER.part(net, stage).requires_grad_(True)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        best, best_state = None, None
        for _ in range(epochs):
            net.train()
            for x, y in _plain(dls.train):
                opt.zero_grad()
                _paper_loss(net, tchr, stage, x, y).backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                batches = _plain(dls.valid)
                if stage == "head":
                    value = -sum((net(x).argmax(1) == y).sum().item() for x, y in batches) / len(dls.valid.dataset)
                else: value = sum(_paper_loss(net, tchr, stage, x, y).item() for x, y in batches) / len(dls.valid)
            if best is None or value < best: best, best_state = value, copy.deepcopy(net.state_dict())
        net.load_state_dict(best_state)
        stages.append(dict(name=stage, cache_cpu_s=0., cpu_s=time.process_time() - c0, time_s=time.perf_counter() - t0,
                           best_value=abs(best), epochs=epochs))
    return net, stages


def teacher_modes(dls, teacher_path, stage: str = "layer4", rounds: int = 3) -> dict:
    """CPU milliseconds per training batch of the frozen teacher's truncated forward up to `stage`, under
    `no_grad` and under `inference_mode` with the clone a loss that is backpropagated needs (best of
    `rounds`, the two taking turns)."""
    tchr = load_teacher(teacher_path, dls.c).to(dls.device).eval()
    xs = [x for x, _ in dls.train]
    modes = dict(no_grad=(torch.no_grad, lambda t: t), inference_mode_and_clone=(torch.inference_mode, torch.clone))
    res = {name: float("inf") for name in modes}
    for _ in range(rounds):
        for name, (mode, after) in modes.items():
            t0 = time.process_time()
            for x in xs:
                with mode(): t = stage_features(tchr, x, PAPER, [stage])[0]
                after(t)
            res[name] = min(res[name], 1000 * (time.process_time() - t0) / len(xs))
    return res


OPTIONS = dict(plain=dict(truncate=False), truncate={}, fast=dict(cache="valid", cache_dtype="float32"),
               cached=dict(cache=True), forced=dict(method="teacher_forced", cache="valid", cache_dtype="float32"),
               forced_ft=dict(method="teacher_forced_finetune", cache="valid", cache_dtype="float32"),
               forced_cached=dict(method="teacher_forced", cache=True))


def run(variant: str, augment: bool, args, teacher_path, out: Path) -> dict:
    "One schedule of `variant`: its stage summaries, accuracies and timings, as a row of the table."
    data = dict(size=args.size, bs=args.bs, fraction=args.fraction, seed=args.seed, augment=augment)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    if variant == "paper":
        dls = get_data(args.dataset, args.data_path, num_workers=args.num_workers, **data)
        net, stages = paper_stagewise(dls, args.student, teacher_path, args.epochs, args.lr, args.seed)
        learn = Learner(dls, net, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
        scores = evaluate(learn)
        n_train, n_valid, weights = len(dls.train) * args.bs, len(dls.valid.dataset), net.state_dict()
        drift = {}
    else:
        fast = {} if variant == "plain" else dict(amp=args.amp, channels_last=args.channels_last,
                                                  cache_bytes=args.cache_bytes)
        if variant in AUGMENT_OFF: fast["cache_dtype"] = args.cache_dtype
        run_out = out / variant / ("augment" if augment else "no-augment")
        r = train_student(student=args.student, dataset=args.dataset, data_path=args.data_path, epochs=args.epochs,
                          lr=args.lr, teacher_path=teacher_path, num_workers=args.num_workers, out_dir=run_out,
                          force=True, progress=False, finetune_epochs=args.finetune_epochs, **data,
                          **(dict(method="stagewise") | OPTIONS[variant] | fast))
        stages = [dict(name=s["name"], cache_cpu_s=s.get("cache_cpu_s", 0.), cpu_s=s["cpu_s"], time_s=s["time_s"],
                       epochs=s["epochs_run"]) for s in r["stages"]]  # the record's CPU times: each step's cache, fit
        drift = r.get("feature_mse", {})  # the composed student's MSE to the teacher per stage, on the valid split
        scores = {k: r[k] for k in ("valid_accuracy", "test_accuracy")}
        n_train, n_valid = r["data"]["sizes"]["train"] // args.bs * args.bs, r["data"]["sizes"]["valid"]
        run_path = run_dir(run_out, args.dataset, run_name(r["params"]))
        weights = torch.load(run_path / "stages" / "head.pth", weights_only=True)
    per_epoch = n_train + n_valid  # images through a stage each epoch: the training batches and validation
    row = dict(variant=variant, label=VARIANTS[variant], augment=augment, wall_s=time.perf_counter() - t0,
               cpu_s=sum(s["cache_cpu_s"] + s["cpu_s"] for s in stages),
               cache_cpu_s=sum(s["cache_cpu_s"] for s in stages),
               **{f"img/s {s['name']}": s["epochs"] * per_epoch / s["cpu_s"] for s in stages},
               projected_h=sum(s["cache_cpu_s"] + args.project_epochs * s["cpu_s"] / args.epochs
                               for s in stages) / 3600,
               **scores, **{f"mse {k}": v for k, v in drift.items()}, load_start=load0, load_end=os.getloadavg()[0])
    return dict(row=row, stages=stages, weights=weights)


def _difference(w: dict, w0: dict) -> float:
    "The largest difference of a float tensor of `w` from `w0`'s, relative to the largest value of the latter."
    return max(float((w[k] - w0[k]).abs().max() / w0[k].abs().max().clamp_min(1e-12))
               for k in w0 if w0[k].is_floating_point())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-path", default=None, help="dataset root (for dataset 'folder' or a local copy)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=2, help="epochs per stage")
    p.add_argument("--finetune-epochs", type=int, default=1, help="epochs per stage of forced_ft's fine-tune")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--student", default="resnet10")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--augment", choices=["on", "off", "both"], default="both")
    p.add_argument("--cache-dtype", default="float16")
    p.add_argument("--cache-bytes", type=int, default=4 * 2**30, help="cache kept in (device) memory; the rest spills")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="(b) under mixed precision (CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="(b) in channels_last memory format")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--teacher-path", default=None, help="a trained teacher (else one is trained into --out)")
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--pretrained", action="store_true", help="fine-tune the ImageNet teacher (else from scratch)")
    p.add_argument("--project-epochs", type=int, default=100, help="epochs per stage of the projected schedule")
    p.add_argument("--out", default="benchmarks/runs", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("KD_PROGRESS", "0")
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS): p.error(f"unknown variants {unknown}")
    teacher_path = args.teacher_path or run_dir(args.out, args.dataset, "teacher")
    if not args.teacher_path:
        train_teacher(dataset=args.dataset, data_path=args.data_path, size=args.size, bs=args.bs,
                      epochs=args.teacher_epochs, lr=args.teacher_lr, seed=args.seed, pretrained=args.pretrained,
                      out_dir=args.out, progress=False)
    plan = [(v, a) for a in {"on": [True], "off": [False], "both": [True, False]}[args.augment] for v in variants
            if not (v in AUGMENT_OFF and a) and (args.augment != "both" or v in PLAN[a])]
    results = {}
    for v, a in plan:
        print(f"running {VARIANTS[v]} {v}, augment={a} ...", flush=True)
        results[v, a] = run(v, a, args, teacher_path, args.out)
    rows = pd.DataFrame([r["row"] for r in results.values()])
    for ref, col in (("paper", "cpu_s"), ("plain", "cpu_s"), ("fast", "cpu_s"), ("plain", "wall_s")):
        base = {a: r["row"][col] for (v, a), r in results.items() if v == ref}
        rows[f"x vs {VARIANTS[ref]}" + (" (wall)" if col == "wall_s" else "")] = [
            base[a] / t if a in base else None for a, t in zip(rows.augment, rows[col])]
    same = {f"{v} augment={a}": _difference(r["weights"], results["plain", a]["weights"])
            for (v, a), r in results.items() if v in ("paper", "truncate", "fast", "cached") and ("plain", a) in results
            }
    modes = teacher_modes(get_data(args.dataset, args.data_path, size=args.size, bs=args.bs, fraction=args.fraction,
                                   seed=args.seed, augment=False), teacher_path)
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.precision", 2):
        print(rows.drop(columns=["load_start"]).to_string(index=False))
    print("largest difference of a weight tensor from (a')'s with the same augmentation, relative to its largest "
          "value:", same)
    print("teacher forward to layer4, CPU ms per batch:", {k: round(v, 2) for k, v in modes.items()})
    device = versions()["device"]
    print(f"{device}, torch threads {torch.get_num_threads()}, load average now {os.getloadavg()}")
    path = write_json(args.out / f"stagewise-{args.dataset}-{args.size}px.json",
                      dict(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           versions=versions(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), rows=rows.to_dict("records"),
                           stages={f"{v} augment={a}": r["stages"] for (v, a), r in results.items()},
                           weight_difference_from_plain=same, teacher_modes_ms=modes))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
