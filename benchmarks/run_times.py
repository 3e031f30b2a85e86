"""The recorded times of a profile's finished runs, for the estimate's test: each run's start and end (seconds from
the first start, from its record's `finished` and `wall_time_s`) and the epochs each of its steps ran, with the
machine, its load and what ran it, written as JSON (``tests/data/digits_run_times.json`` is this script's output for
a `make book` of the digits profile). See benchmarks/README.md.

    .venv/bin/python benchmarks/run_times.py runs/digits --note "make book, fresh clone, AVX2, idle" \
        --out tests/data/digits_run_times.json
"""
import argparse
import json
from datetime import datetime
from pathlib import Path

from kd_lib.recipes.records import complete_record


def run_times(out_dir: Path) -> dict:
    "Run name (`<dataset>/<run>`) -> start, end (seconds from the first start), seconds, epochs of each step."
    runs = {}
    for path in sorted(Path(out_dir).glob("*/*/record.json")):
        r = complete_record(path.parent)
        if r is None: continue
        end = datetime.fromisoformat(r["finished"]).timestamp()
        runs[f"{path.parent.parent.name}/{path.parent.name}"] = dict(
            end=end, seconds=r["wall_time_s"], epochs_run=[s["epochs_run"] for s in r["stages"]],
            threads=r["versions"]["torch_threads"])
    first = min(r["end"] - r["seconds"] for r in runs.values())
    for r in runs.values():
        r["end"] = round(r["end"] - first, 1)
        r["start"] = round(r["end"] - r["seconds"], 1)
        r["seconds"] = round(r["seconds"], 1)
    return dict(sorted(runs.items(), key=lambda kv: kv[1]["end"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path, help="a profile's runs folder (runs/<profile>)")
    p.add_argument("--note", required=True, help="how the runs were made: machine, ISA, load, commit")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.write_text(json.dumps(dict(note=args.note, runs=run_times(args.out_dir)), indent=1) + "\n")
    print(f"{args.out}: {len(json.loads(args.out.read_text())['runs'])} runs")


if __name__ == "__main__":
    main()
