"""Throughput of the paper's CIFAR-10 runs on this machine, and the time the `paper` profile's CIFAR-10 part would take.

With the GPU settings where there is a GPU (images resident on it, bf16 autocast where it has bfloat16, else fp16,
channels_last), it measures on CIFAR-10 at 32 px (or `--dataset`):
* the teacher (ResNet34, one-cycle) for `--epochs` epochs,
* resnet10 without a teacher, and simultaneous, for `--epochs` epochs,
* resnet10 stagewise on the fast path (`cache="valid"`, float32 cache) and teacher-forced, `--epochs` per stage,
and prints images per second of each stage (training and validation images of an epoch, over its wall time), then
projects the `paper` profile's CIFAR-10 runs (kd_lib/profiles/paper.yaml: its epochs, students and fractions, the
whole training set) from those rates, the other students scaled by their multiply-accumulates (Table 1's count at
32 px). Writes all of it as JSON. `--small` runs a few images per class for one epoch: a check that it works, on
a CPU too (the tests run it so). benchmarks/gpu_check.sh runs it after the tests that need CUDA.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

from kd_lib.evidence.complexity import table1
from kd_lib.recipes.records import versions
from kd_lib.infra.files import write_json
from kd_lib.runner import expand, load_profile
from kd_lib.recipes.train import train_student, train_teacher


def settings() -> dict:
    "The fast settings of this machine: on a GPU bf16 (fp16 without it) and channels_last; on a CPU, none."
    if not torch.cuda.is_available(): return {}
    return dict(amp="bf16" if torch.cuda.is_bf16_supported() else "fp16", channels_last=True)


def rates(record: dict) -> dict:
    "Images per second of each step of a run's record: the training and validation images of its epochs, over its time."
    sizes = record["data"]["sizes"]
    bs = record["params"]["bs"]
    per_epoch = sizes["train"] // bs * bs + sizes["valid"]
    return {s["name"]: s["epochs_run"] * per_epoch / max(s["time_s"], 1e-9) for s in record["stages"]}


def project(measured: dict, macs: dict) -> dict:
    """Hours of the `paper` profile's CIFAR-10 runs (a long twin at twice the epochs) at the `measured` images per
    second (teacher, and per method of resnet10), the other students' rates scaled by resnet10's multiply-accumulates
    over theirs (`macs`)."""
    jobs = [j for j in expand(load_profile("paper")) if j.config.dataset == "cifar10"]
    train, valid = 50_000, 10_000  # the whole training set; selection "test": the test set is the valid split
    hours = {}
    for j in jobs:
        c = j.config
        if j.kind == "teacher":
            s = c.scaled(c.epochs) * (train + valid) / measured["teacher"]["teacher"]
        else:
            per = measured[c.method]
            scale = macs[c.student] / macs["resnet10"]
            images = int(train * c.fraction) + valid
            s = sum(c.scaled(c.epochs) * images * scale / rate for rate in per.values())
        hours[j.name] = s / 3600
    return dict(runs=len(jobs), hours=sum(hours.values()), per_run=hours)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-path", default=None)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--per-class", type=int, default=500, help="images per class of the training folder measured")
    p.add_argument("--epochs", type=int, default=2, help="epochs measured (per stage for stagewise)")
    p.add_argument("--small", action="store_true", help="a few images, one epoch: a check that it runs (CPU too)")
    p.add_argument("--out", default="benchmarks/runs/gpu_check", type=Path)
    args = p.parse_args(argv)
    if args.small: args.per_class, args.epochs = 8, 1
    os.environ.setdefault("KD_PROGRESS", "0")
    fast = settings()
    data = dict(dataset=args.dataset, data_path=args.data_path, size=args.size, bs=args.bs, per_class=args.per_class,
                augment=True, seed=0)
    t0 = time.perf_counter()
    teacher = train_teacher(**data, epochs=args.epochs, lr=2e-3, pretrained=False, out_dir=args.out, force=True,
                            progress=False)
    measured, records = {"teacher": rates(teacher)}, {"teacher": teacher}
    for method, extra in (("no_teacher", {}), ("simultaneous", {}),
                          ("stagewise", dict(cache="valid", cache_dtype="float32")),
                          ("teacher_forced", dict(cache="valid", cache_dtype="float32"))):
        r = train_student(**data, **fast, **extra, student="resnet10", method=method, epochs=args.epochs, lr=1e-3,
                          out_dir=args.out, force=True, progress=False)
        measured[method], records[method] = rates(r), r
    macs = table1(size=32, n_classes=10)["macs"].to_dict()
    projection = project(measured, macs)
    for name, per in measured.items():
        print(f"{name:15} " + "  ".join(f"{k} {v:,.0f} img/s" for k, v in per.items()))
    print(f"the paper profile's CIFAR-10 part ({projection['runs']} runs, 100 epochs per step): about "
          f"{projection['hours']:.1f} hours on {versions()['device']}, settings {fast or 'float32, CPU'}, resident "
          f"data {teacher['data'].get('resident')}")
    path = write_json(args.out / "gpu_check.json",
                      dict(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           settings=fast, versions=versions(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           images_per_second=measured, projection=projection, wall_s=time.perf_counter() - t0,
                           resident=teacher["data"].get("resident"),
                           test_accuracy={k: r["test_accuracy"] for k, r in records.items()}))
    print(f"wrote {path}")
    return json.loads(path.read_text())


if __name__ == "__main__":
    main()
