"""Complete run records under a folder, collected into one DataFrame (one row a run) for the book's evidence."""
import hashlib
import json
import warnings
from pathlib import Path

import pandas as pd

from ..infra.files import CorruptFile
from ..recipes.budget import epochs_run
from ..recipes.records import RECORD, complete_record

__all__ = ["complete_records", "collect"]


def _curve(record: dict) -> str:
    "A short hash of every fit's monitored values, epoch by epoch: two runs with the same curve trained alike."
    values = [[h.get(s["monitor"]) for h in s.get("history", [])] for s in record.get("stages", [])]
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:12]


def complete_records(folder):
    """(path, record) of each complete run record under `folder` (searched recursively), sorted by path; one that
    cannot be read is left out with a warning that names it."""
    for p in sorted(Path(folder).rglob(RECORD)):
        try: r = complete_record(p.parent)
        except CorruptFile as e:
            warnings.warn(f"left out of the results: {e}")
            continue
        if r is not None: yield p, r


def _device(v: dict) -> str:
    "What a record ran on: its GPU, or its CPU's model and cores (a record made before CPUs were named: its cores)."
    device = v.get("device", "unknown")
    return f"{v['cpu']}, {device}" if v.get("cpu") and str(device).startswith("cpu") else device


def collect(folder) -> pd.DataFrame:
    """One row per complete run record under `folder` (searched recursively): its parameters, final accuracies
    (valid, test, and on the training part a `fraction` left unused), whether it converged, the best test
    accuracy of any epoch of its last label step (when recorded: the paper's test-set selection), the
    teacher's accuracy, wall and CPU time, the test set's size, the epochs run in all and a hash of the monitored
    curves (`curve`: two runs that trained alike have the same), device and torch threads, the commit of the code,
    the record's path, and for a distilled student its feature maps' MSE to the teacher's per stage (`mse_<stage>`)."""
    rows = []
    for p, r in complete_records(folder):
        label_steps = [s for s in r.get("stages", []) if s.get("target", "labels") == "labels"]
        tested = [h["test_accuracy"] for h in (label_steps[-1]["history"] if label_steps else [])
                  if "test_accuracy" in h]
        rows.append({"kind": r["kind"], **r["params"],
                     "valid_accuracy": r["valid_accuracy"], "test_accuracy": r["test_accuracy"],
                     "converged": r.get("converged"), "unused_accuracy": r.get("unused_accuracy"),
                     "best_test_accuracy": max(tested) if tested else None,
                     "teacher_test_accuracy": r.get("teacher", {}).get("test_accuracy"),
                     "wall_time_s": r["wall_time_s"], "n_train": r["data"]["sizes"]["train"],
                     "n_test": r["data"]["sizes"].get("test"),
                     "epochs_run": epochs_run(r), "budget_twin": (r.get("budget") or {}).get("twin"),
                     "fits": len(r.get("stages", [])),
                     "fits_converged": sum(s.get("converged") is True for s in r.get("stages", [])),
                     "curve": _curve(r),
                     "cpu_s": sum(s.get("cpu_s", 0) + s.get("cache_cpu_s", 0) for s in r.get("stages", [])),
                     **{f"mse_{k}": v for k, v in (r.get("feature_mse") or {}).items()},
                     "device": _device(r.get("versions", {})),
                     "commit": (r.get("versions", {}).get("code") or {}).get("commit"),
                     "torch_threads": r.get("versions", {}).get("torch_threads"), "record": str(p)})
    return pd.DataFrame(rows)
