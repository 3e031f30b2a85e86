"""What each stage of the paper's models costs on this machine, and what the centre tap saves, measured in one run.

For the teacher and students at 16 px (batch 32, the digits profile) and 32 px (batch 64, CIFAR-10): CPU
milliseconds per batch of each stage's forward and backward (`kd_lib.core.stages.Stages.paper`, each stage on the
previous stage's map, train mode), and of a whole training step (forward, backward, the paper's Adam), with the
models' `TapConv2d`s (`tap`) and with every tap computed (`plain`, `kd_lib.speed.taps.untapped`), the two taking turns
(each first in every other round; the median of the rounds), and the whole training step of the tapped model
training only the taps that meet its inputs (`live`, `kd_lib.speed.taps.live_taps`); one torch thread. Each oneDNN
instruction set asked for (`--isa`: the machine's own, and AVX2 as an AVX2-only CPU has it, by ONEDNN_MAX_CPU_ISA)
runs in a process of its own, and the table names the set oneDNN reports (ONEDNN_VERBOSE) and the kernels it picks
for a 3x3 convolution on a 1x1 map.
See benchmarks/README.md.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from kd_lib.core.optim import paper_adam
from kd_lib.speed.memory import keep_freed_memory
from kd_lib.speed.taps import live_taps, untapped
from kd_lib.core.models import resnet, teacher
from kd_lib.recipes.records import versions
from kd_lib.infra.files import write_json
from kd_lib.core.stages import Stages

STAGES = Stages.paper()
SETTINGS = ((16, 32), (32, 64))  # (size, batch): the digits profile's, CIFAR-10's
PROBE = """
import torch, torch.nn.functional as F
torch.set_num_threads(1)
x, w = torch.randn(32, 512, 1, 1, requires_grad=True), torch.randn(512, 512, 3, 3, requires_grad=True)
F.conv2d(x, w, padding=1).sum().backward()
print("TAPPED", flush=True)
from kd_lib.speed.taps import TapConv2d
tap = TapConv2d(512, 512, 3, padding=1, bias=False)
tap(x).sum().backward()
"""


def onednn(env: dict) -> dict:
    """The instruction set oneDNN reports under `env`, and its kernels (forward; backward data; backward weights) for a
    512-channel 3x3 convolution of a 1x1 map, batch 32: plain, and as `TapConv2d` computes it (a matrix product,
    which torch gives to its BLAS, not to oneDNN)."""
    out = subprocess.run([sys.executable, "-c", PROBE], env=dict(env, ONEDNN_VERBOSE="1"), capture_output=True,
                         text=True).stdout
    isa = next((ln.split("isa:", 1)[1] for ln in out.splitlines() if "isa:" in ln), "unknown")
    plain, _, tapped = out.partition("TAPPED")
    def kernels(text):
        return "; ".join(ln.split(",")[6] for ln in text.splitlines() if ",exec,cpu,convolution," in ln)
    return dict(isa=isa, plain_kernels=kernels(plain), tapped_kernels=kernels(tapped) or "no oneDNN convolution")


def _model(name: str):
    torch.manual_seed(0)
    return (teacher(10, pretrained=False) if name == "teacher" else resnet(name)).train()


def _cpu_ms(fn, batches: int) -> float:
    t = time.process_time()
    for _ in range(batches): fn()
    return 1000 * (time.process_time() - t) / batches


def costs(name: str, size: int, bs: int, rounds: int, batches: int) -> list:
    """Rows of CPU ms per batch, plain and tapped: each stage's forward and backward, and a whole training step."""
    model = _model(name)
    x, y = torch.randn(bs, 3, size, size), torch.randint(0, 10, (bs,))
    opt = paper_adam(list(model.parameters()), lr=1e-3)
    inputs, parts = [x], [STAGES.part(model, s) for s in STAGES.all]
    with torch.no_grad():
        for p in parts[:-1]: inputs.append(p(inputs[-1]))

    def stage(i):
        out = parts[i](inputs[i])
        (F.cross_entropy(out, y) if STAGES.all[i] == "head" else out.pow(2).mean()).backward()

    live = live_taps(copy.deepcopy(model), x)  # the same model training only the taps that meet its inputs
    live_opt = paper_adam(list(live.parameters()), lr=1e-3)

    def step(m=model, o=opt):
        F.cross_entropy(m(x), y).backward()
        o.step()
        o.zero_grad()
    jobs = {**{s: (lambda i=i: stage(i)) for i, s in enumerate(STAGES.all)}, "training step": step}
    times = {(j, m): [] for j in jobs for m in ("plain", "tap")} | {("training step", "live"): []}
    for fn in jobs.values(): fn()  # warm up: oneDNN makes its kernels at the first call of each shape
    step(live, live_opt)
    with untapped(model):
        for fn in jobs.values(): fn()
    for r in range(rounds):
        for j, fn in jobs.items():
            for mode in ("plain", "tap")[::1 if r % 2 else -1]:  # each path first in every other round
                with untapped(model) if mode == "plain" else nullcontext():
                    times[j, mode].append(_cpu_ms(fn, batches))
        times["training step", "live"].append(_cpu_ms(lambda: step(live, live_opt), batches))
    rows = []
    for j in jobs:
        plain, tap = statistics.median(times[j, "plain"]), statistics.median(times[j, "tap"])
        shape = "x".join(map(str, inputs[STAGES.all.index(j) + 1].shape[2:])) if j in STAGES.names else ""
        live_ms = statistics.median(times[j, "live"]) if (j, "live") in times else float("nan")
        rows.append(dict(model=name, size=size, bs=bs, stage=j, map=shape, plain_ms=plain, tap_ms=tap,
                         speedup=plain / tap, live_ms=live_ms, live_speedup=tap / live_ms))
    return rows


def one_isa(args) -> dict:
    """The measurements of this process (its oneDNN instruction set fixed by its environment), with freed memory
    kept as every fit keeps it (`keep_freed_memory`; benchmarks/freed_memory.py measures what that saves)."""
    torch.set_num_threads(1)
    keep_freed_memory()
    load0, rows = os.getloadavg()[0], []
    for size, bs in SETTINGS:
        for name in args.models.split(","):
            rows += costs(name, size, bs, args.rounds, args.batches)
            print(f"  {name} {size} px done", file=sys.stderr, flush=True)
    return dict(rows=rows, load=[load0, os.getloadavg()[0]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="teacher,resnet10,resnet14,resnet18,resnet20,resnet26")
    p.add_argument("--isa", default="native,AVX2", help="oneDNN instruction sets (ONEDNN_MAX_CPU_ISA; native: none)")
    p.add_argument("--rounds", type=int, default=4, help="rounds, plain and tapped taking turns (median)")
    p.add_argument("--batches", type=int, default=3, help="batches timed per stage, path and round")
    p.add_argument("--out", default="benchmarks/runs", type=Path)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: print its JSON
    args = p.parse_args(argv)
    if args.one: return print(json.dumps(one_isa(args)))
    report, tables = dict(versions=versions(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), isa={}), []
    for isa in args.isa.split(","):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        if isa != "native": env["ONEDNN_MAX_CPU_ISA"] = isa
        probe = onednn(env)
        print(f"oneDNN ISA {isa}: {probe['isa']}", flush=True)
        child = [sys.executable, __file__, "--one", "--models", args.models, "--rounds", str(args.rounds),
                 "--batches", str(args.batches)]
        res = json.loads(subprocess.run(child, env=env, capture_output=False, stdout=subprocess.PIPE, text=True,
                                        check=True).stdout.splitlines()[-1])
        report["isa"][isa] = dict(probe, **res)
        tables.append(pd.DataFrame(res["rows"]).assign(isa=probe["isa"]))
        with pd.option_context("display.width", 250, "display.max_rows", 500, "display.precision", 2):
            print(tables[-1].drop(columns="isa").to_string(index=False))
        print(f"a 3x3 convolution of a 1x1 map: plain {probe['plain_kernels']}; tapped {probe['tapped_kernels']}; "
              f"load average {res['load'][0]:.1f} to {res['load'][1]:.1f}", flush=True)
    print(f"{versions()['device']}, one torch thread, CPU ms per batch (forward and backward; the training step with "
          "Adam), median of the rounds")
    path = write_json(args.out / "stage_costs.json", report)
    print(f"wrote {path}")
    return pd.concat(tables)


if __name__ == "__main__":
    main()
