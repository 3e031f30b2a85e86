"""What keeping freed memory (`kd_lib.speed.memory.keep_freed_memory`, which every fit does) saves a training step.

For each of `--models` at 16 px, batch 32 (the digits profile) and 32 px, batch 64 (CIFAR-10): CPU milliseconds and
page faults of a training step (forward, backward, the student's fused Adam), one torch thread, with glibc's malloc
as it comes (`default`) and with the memory kept (`kept`). The setting is process-wide, so each is measured in a
process of its own, the two taking turns (each first in every other round), the median of `--rounds`. Set
ONEDNN_MAX_CPU_ISA=AVX2 to see what an AVX2-only CPU gets. Writes `<out>/freed_memory.json`. See benchmarks/README.md.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ((16, 32), (32, 64))  # (size, batch): the digits profile's, CIFAR-10's


def measure(mode: str, models: list, steps: int) -> dict:
    "In this process: CPU ms and page faults of a training step of each model and setting, memory `mode`."
    import torch
    import torch.nn.functional as F
    from kd_lib.speed.memory import keep_freed_memory
    from kd_lib.core.models import resnet, teacher
    torch.set_num_threads(1)
    if mode == "kept": keep_freed_memory()
    out = {}
    for name in models:
        for size, bs in SETTINGS:
            torch.manual_seed(0)
            model = teacher(10, pretrained=False) if name == "teacher" else resnet(name)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
            x, y = torch.randn(bs, 3, size, size), torch.randint(0, 10, (bs,))

            def step():
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            for _ in range(2): step()
            t, f = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(steps): step()
            out[f"{name} {size}px"] = dict(ms=1000 * (time.process_time() - t) / steps,
                                           faults=(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f) / steps)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="teacher,resnet10")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="steps timed per round, model and setting")
    p.add_argument("--out", default="benchmarks/runs", type=Path)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process: which memory mode
    args = p.parse_args(argv)
    models = args.models.split(",")
    if args.measure:
        print(json.dumps(measure(args.measure, models, args.steps)))
        return
    load0, runs = os.getloadavg()[0], {"default": [], "kept": []}
    for r in range(args.rounds):
        for mode in ("default", "kept")[::1 if r % 2 else -1]:
            done = subprocess.run([sys.executable, __file__, "--measure", mode, "--models", args.models, "--steps",
                                   str(args.steps)], capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = {}
    for key in runs["default"][0]:
        a, b = ({k: statistics.median(run[key][k] for run in runs[m]) for k in ("ms", "faults")} for m in runs)
        rows[key] = dict(default_ms=a["ms"], kept_ms=b["ms"], speedup=a["ms"] / b["ms"], default_faults=a["faults"],
                         kept_faults=b["faults"])
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "the machine's own")
    print(f"a training step, CPU ms and page faults, one thread, oneDNN ISA {isa} "
          f"(load average {load0:.1f} to {os.getloadavg()[0]:.1f}):")
    for key, v in rows.items():
        print(f"  {key:14s} default {v['default_ms']:7.1f} ms {v['default_faults']:7.0f} faults   kept "
              f"{v['kept_ms']:7.1f} ms {v['kept_faults']:5.0f} faults   {v['speedup']:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    from kd_lib.recipes.records import versions
    from kd_lib.infra.files import write_json
    write_json(args.out / "freed_memory.json", dict(rows=rows, isa=isa, load=[load0, os.getloadavg()[0]],
                                                     versions=versions()))


if __name__ == "__main__":
    main()
