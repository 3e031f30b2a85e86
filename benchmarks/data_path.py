"""The data path: images opened per item (fastai's DataBlock) against images decoded once (`kd_lib.data.resident`), in
one run, on the same split, at 16 px (digits) and 32 px (CIFAR-10, when `data/cifar10` is there).

For each dataset and path it measures, with one torch thread and the paper's augmentation, the CPU time of
* the loader alone: every training batch of an epoch produced (decoding, resizing, augmentation, normalisation);
* a training step on those batches: resnet10's forward, backward and an Adam step, the batches taken from a list;
and prints images per second of each, and the loader's share of loader + step, the time a training epoch spends
getting its data. Writes the table as JSON beside. See benchmarks/README.md.
"""
import argparse
import os
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from kd_lib.data.loaders import data_dir, get_data
from kd_lib.core.optim import paper_adam
from kd_lib.recipes.fitting import seed_everything
from kd_lib.core.models import resnet
from kd_lib.recipes.records import versions
from kd_lib.infra.files import write_json


def _cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def measure(dataset: str, size: int, bs: int, resident: bool, epochs: int, per_class: int = None) -> dict:
    "Images per second of the loader alone and of the training step on its batches, and the loader's share."
    dls = get_data(dataset, size=size, bs=bs, augment=True, resident=resident, per_class=per_class)
    seed_everything(0, dls)
    n = len(dls.train) * bs
    batches = []
    loader_s = sum(_cpu(lambda: batches.extend(list(dls.train))) for _ in range(epochs))
    batches = [tuple(t.as_subclass(torch.Tensor) for t in b) for b in batches]  # plain, as a Learner's model sees
    model = resnet("resnet10", dls.c).train()
    opt = paper_adam(list(model.parameters()), lr=1e-3)
    def step():
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    step_s = _cpu(step)
    return dict(dataset=dataset, size=size, path="resident" if dls.split_info["resident"] else "per-item",
                images=n * epochs, loader_img_s=n * epochs / loader_s, step_img_s=n * epochs / step_s,
                loader_share=loader_s / (loader_s + step_s))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2, help="epochs of batches measured per path")
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--cifar-per-class", type=int, default=200, help="CIFAR-10 images per class (of its train folder)")
    p.add_argument("--out", default="benchmarks/runs", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cases = [("digits", 16, None)] + ([("cifar10", 32, args.cifar_per_class)]
                                      if (data_dir() / "cifar10" / "train").is_dir() else [])
    for dataset, size, per_class in cases:  # decoded once before timing: later runs find it on disk
        get_data(dataset, size=size, bs=args.bs, resident=True, per_class=per_class)
    rows = pd.DataFrame([measure(d, s, args.bs, r, args.epochs, pc) for d, s, pc in cases for r in (False, True)])
    with pd.option_context("display.width", 200, "display.precision", 3):
        print(rows.to_string(index=False))
    print(f"{versions()['device']}, 1 torch thread, load average {os.getloadavg()}")
    path = write_json(args.out / "data_path.json", dict(args=dict(epochs=args.epochs, bs=args.bs), versions=versions(),
                                                         date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                         rows=rows.to_dict("records")))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
