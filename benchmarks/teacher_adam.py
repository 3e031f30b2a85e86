"""What the teacher's optimizer step costs: fastai's Adam (a loop over parameters, what a `Learner` without `opt_func`
uses) against `kd_lib.core.optim.fastai_adam` (the same updates as one fused torch AdamW), in one run.

For the teacher (ResNet34, 21.3M parameters) and resnet10: CPU milliseconds of one optimizer step (gradients
given), one torch thread, the two taking turns (each first in every other round), the median of `--rounds`; and of a
whole training step at 16 px, batch 32 (forward, backward, step), so the step's share is seen. Writes
`<out>/teacher_adam.json`. See benchmarks/README.md.
"""
import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fastai.optimizer import Adam
from fastai.torch_core import norm_bias_params

from kd_lib.core.optim import fastai_adam
from kd_lib.core.models import resnet, teacher
from kd_lib.recipes.records import versions
from kd_lib.infra.files import write_json


def _fastai(model):
    opt = Adam(list(model.parameters()), lr=1e-3)
    for p in norm_bias_params(model): opt.state[p]["do_wd"] = False  # as Learner.create_opt does
    return opt


def _cpu_ms(fn, n: int) -> float:
    t = time.process_time()
    for _ in range(n): fn()
    return 1000 * (time.process_time() - t) / n


def costs(name: str, rounds: int, steps: int) -> dict:
    "Median CPU ms of an optimizer step and of a training step, fastai's Adam and the fused one."
    torch.manual_seed(0)
    model = teacher(10, pretrained=False) if name == "teacher" else resnet(name)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    opts = {"fastai": _fastai(model), "fused": fastai_adam(model)(model.parameters(), lr=1e-3)}
    F.cross_entropy(model(x), y).backward()  # gradients for the optimizer steps alone

    def train(opt):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    times = {(k, o): [] for k in ("optimizer step", "training step") for o in opts}
    for o in opts.values(): o.step(); train(o)  # warm up, and make each optimizer's state
    for r in range(rounds):
        for o in list(opts)[::1 if r % 2 else -1]:
            times["optimizer step", o].append(_cpu_ms(opts[o].step, steps))
            times["training step", o].append(_cpu_ms(lambda: train(opts[o]), steps))
    out = {}
    for kind in ("optimizer step", "training step"):
        a, b = (statistics.median(times[kind, o]) for o in opts)
        out[kind] = dict(fastai_ms=a, fused_ms=b, speedup=a / b)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="teacher,resnet10")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="steps timed per round and optimizer")
    p.add_argument("--out", default="benchmarks/runs", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    rows = {m: costs(m, args.rounds, args.steps) for m in args.models.split(",")}
    print(f"CPU ms, one thread (load average {load0:.1f} to {os.getloadavg()[0]:.1f}):")
    for m, r in rows.items():
        for kind, v in r.items():
            print(f"  {m:9s} {kind:15s} fastai {v['fastai_ms']:7.1f}  fused {v['fused_ms']:6.1f}  "
                  f"{v['speedup']:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "teacher_adam.json", dict(rows=rows, load=[load0, os.getloadavg()[0]], versions=versions()))


if __name__ == "__main__":
    main()
