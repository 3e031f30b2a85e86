"""The benchmarks run: the GPU check (its script, CPU-sized here) writes its throughputs and projection; the teacher's
optimizer and the freed-memory benchmarks time both of what they compare."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_a_cpu_and_projects_the_papers_cifar10_runs(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--small", "--dataset", "digits", "--size",
                        "16", "--bs", "16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rates = report["images_per_second"]
    assert set(rates) == {"teacher", "no_teacher", "simultaneous", "stagewise", "teacher_forced"}
    assert list(rates["stagewise"]) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert all(v > 0 for per in rates.values() for v in per.values())
    assert report["projection"]["runs"] == 52 and report["projection"]["hours"] > 0  # 2 teachers, 50 students
    per_run = report["projection"]["per_run"]
    assert per_run["cifar10/teacher-x2"] == pytest.approx(2 * per_run["cifar10/teacher"])  # a long twin: twice
    assert "img/s" in p.stdout and "the paper profile's CIFAR-10 part" in p.stdout


def test_the_teacher_adam_benchmark_times_both_optimizers(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "teacher_adam.py"), "--models", "resnet10",
                        "--rounds", "1", "--steps", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    rows = json.loads((tmp_path / "teacher_adam.json").read_text())["rows"]["resnet10"]
    assert set(rows) == {"optimizer step", "training step"}
    assert all(r["fastai_ms"] > 0 and r["fused_ms"] > 0 for r in rows.values())


def test_the_freed_memory_benchmark_measures_both_allocators(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "freed_memory.py"), "--models", "resnet10",
                        "--rounds", "1", "--steps", "2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    rows = json.loads((tmp_path / "freed_memory.json").read_text())["rows"]
    assert set(rows) == {"resnet10 16px", "resnet10 32px"}
    assert all(r["default_ms"] > 0 and r["kept_ms"] > 0 and r["default_faults"] >= 0 and r["kept_faults"] >= 0
               for r in rows.values())  # the ratio is the machine's (its allocator and kernel): printed, not tested
