"""Choices for training on a CPU, measured in one run: channels_last, torch.compile, torch threads per job, and the
batch size of evaluation, for resnet10 on the digits at 16 px (batch 32) and 32 px (batch 64).

Each number is images per second of process CPU time (one torch thread unless said), on random batches of the
right shape: a training step (forward, backward, the paper's fused Adam) and an evaluation pass (forward under
no_grad, eval mode). `torch.compile`'s first step (the compilation) is reported apart. For threads, the training
steps of one process with 2 threads are set against two processes of 1 thread each running at once (images per
second of wall time, both together). See book/performance.md for what was kept.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from kd_lib.core.optim import paper_adam
from kd_lib.core.models import resnet
from kd_lib.recipes.records import versions
from kd_lib.infra.files import write_json

STEPS = 30


def train_rate(size: int, bs: int, channels_last=False, compiled=False, steps=STEPS, wall=False) -> dict:
    "Images per second of training steps (CPU or wall time), and the first step's seconds (compilation)."
    torch.manual_seed(0)
    model = resnet("resnet10", 10).train()
    x, y = torch.randn(bs, 3, size, size), torch.randint(0, 10, (bs,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = paper_adam(list(model.parameters()), lr=1e-3)
    fn = torch.compile(model) if compiled else model
    clock = time.perf_counter if wall else time.process_time
    def step():
        F.cross_entropy(fn(x), y).backward()
        opt.step()
        opt.zero_grad()
    t = clock()
    step()
    first = clock() - t
    t = clock()
    for _ in range(steps): step()
    return dict(img_s=steps * bs / (clock() - t), first_step_s=first)


def eval_rate(size: int, bs: int, n: int = 1024) -> float:
    "Images per second (CPU time) of evaluating `n` images in batches of `bs`."
    model = resnet("resnet10", 10).eval()
    x = torch.randn(n, 3, size, size)
    t = time.process_time()
    with torch.no_grad():
        for i in range(0, n, bs): model(x[i:i + bs])
    return n / (time.process_time() - t)


def _one_process(size, bs, threads) -> float:
    "Wall images per second of a process training with `threads` torch threads (run as a subprocess)."
    code = (f"import json, torch; torch.set_num_threads({threads}); import sys; sys.path.insert(0, 'benchmarks');"
            f"from cpu_choices import train_rate; print(json.dumps(train_rate({size}, {bs}, wall=True)))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def threads_rate(size: int, bs: int) -> dict:
    "Wall images per second: one process of 2 threads, and two processes of 1 thread at once (their sum)."
    one = json.loads(_one_process(size, bs, 2).communicate()[0].splitlines()[-1])["img_s"]
    procs = [_one_process(size, bs, 1) for _ in range(2)]
    two = sum(json.loads(p.communicate()[0].splitlines()[-1])["img_s"] for p in procs)
    return {"1 job x 2 threads": one, "2 jobs x 1 thread": two}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/runs", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for size, bs in ((16, 32), (32, 64)):
        plain = train_rate(size, bs)
        row = {"size": size, "bs": bs, "train": plain["img_s"],
               "train channels_last": train_rate(size, bs, True)["img_s"]}
        try:
            comp = train_rate(size, bs, compiled=True)
            row.update({"train compiled": comp["img_s"], "compile s": comp["first_step_s"]})
        except Exception as e:  # noqa: BLE001 -- a compiler missing on the machine is a result too
            row.update({"train compiled": None, "compile s": f"failed: {type(e).__name__}"})
        row.update({f"eval bs {b}": eval_rate(size, b) for b in (32, 128, 512)})
        row.update(threads_rate(size, bs))
        rows.append(row)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.precision", 1):
        print(table.to_string(index=False))
    print(f"{versions()['device']}; images per second (CPU time, 1 thread; threads: wall time)")
    path = write_json(args.out / "cpu_choices.json",
                      dict(versions=versions(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           rows=table.to_dict("records")))
    print(f"wrote {path}")
    return table


if __name__ == "__main__":
    main()
