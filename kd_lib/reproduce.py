"""The runner: a profile (YAML) -> papermill runs of the notebooks -> the book.

    python -m kd_lib.reproduce --profile digits            # what `make book` runs
    python -m kd_lib.reproduce --profile smoke --jobs 2    # the tiny profile of the tests and CI
    python -m kd_lib.reproduce --profile my.yaml           # a profile file of your own
    python -m kd_lib.reproduce --profile digits --dry-run  # list the runs, run nothing
    python -m kd_lib.reproduce --profile digits --book-only  # rebuild the book from what already ran

A profile (``kd_lib/profiles/<name>.yaml``) names, per dataset, the teacher's settings and groups of
student runs; list-valued ``student``, ``method``, ``fraction`` and ``seed`` of a group expand to every
combination. The runner executes ``notebooks/teacher.ipynb`` once per dataset, then
``notebooks/student.ipynb`` once per student run, with papermill, into ``<out_dir>/notebooks/``
(``out_dir`` is ``runs/<profile>`` unless the profile says otherwise); the records land in
``<out_dir>/<dataset>/...``. A run whose record is complete is not started again. Then it writes the
book's notebooks into ``book/generated/`` (Table 1, the method diagram, the figures, one teacher and
one student run) and builds the book with ``jupyter-book build . -W -n --keep-going``.
"""
import argparse
import itertools
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .records import RECORD, read_json, run_name

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "book" / "generated"
PROFILES = Path(__file__).resolve().parent / "profiles"
NOTEBOOKS = ROOT / "notebooks"

__all__ = ["Job", "ProfileError", "RunConflict", "load_profile", "profiles", "expand", "plan", "run_notebook",
           "run_jobs", "prune", "strays", "write_book_notebooks", "build_book", "main"]

EXPANDED = ("student", "method", "fraction", "seed")  # group keys that may hold a list
# for the profile check: the parameters of the teacher and student notebooks (read from them) and `common`
_NOTEBOOK_PARAMS = {}


def notebook_parameters(kind: str) -> set:
    "The names in the `parameters` cell of `notebooks/<kind>.ipynb` (papermill's reading of it)."
    if kind not in _NOTEBOOK_PARAMS:
        import papermill as pm
        _NOTEBOOK_PARAMS[kind] = set(pm.inspect_notebook(str(NOTEBOOKS / f"{kind}.ipynb")))
    return _NOTEBOOK_PARAMS[kind]


# relative cost of one epoch per method (resnet10, 1 thread, digits at 16 px), for the time estimate only
_METHOD_COST = dict(no_teacher=1.0, simultaneous=1.4, stagewise=3.4, hinton=1.3, fitnets=2.0)
_CACHED_COST = 1.3  # stagewise with cache=True
_START_COST = 2.0  # a kernel's start, imports and figures, in the same unit


class ProfileError(ValueError):
    "A profile is missing or malformed; the message says what to change."


class RunConflict(RuntimeError):
    "A run folder holds a run with other parameters than the profile asks for."


@dataclass
class Job:
    "One papermill run: `notebook` with `params`, recorded in `run` (its folder), executed into `output`."
    kind: str  # "teacher" or "student"
    name: str  # "<dataset>/<run folder name>"
    params: dict
    run: Path
    output: Path
    status: str = "todo"  # todo | complete | running | failed | done
    seconds: float = 0.0
    log: Path = None
    error: str = None
    extra: dict = field(default_factory=dict)

    @property
    def notebook(self) -> Path: return NOTEBOOKS / f"{self.kind}.ipynb"

    @property
    def cost(self) -> float:
        "A rough relative cost (for the time estimate): epochs x steps x data, from the parameters."
        p = self.params
        if self.kind == "teacher": return _START_COST + 3.3 * p.get("epochs", 1)
        layers = int("".join(c for c in p["student"] if c.isdigit()) or 10)
        depth = 1 + 0.1 * (layers - 10)  # resnet26 ~ 2.6 x resnet10
        valid = 0.1 if p["method"] == "no_teacher" else 0.35  # the validation share, which no fraction shrinks
        method = _CACHED_COST if p.get("cache") is True else _METHOD_COST.get(p["method"], 1.5)
        return _START_COST + p.get("epochs", 1) * method * depth \
            * (p.get("fraction", 1.0) + valid) / (1 + valid)


# ---------------------------------------------------------------- profiles
def profiles() -> list:
    "The names of the profiles that ship with kd_lib."
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def load_profile(profile) -> dict:
    """The profile `profile`: the name of one in `kd_lib/profiles/` (smoke, digits, paper) or the path of a
    YAML file. Checked for the keys the runner needs; `name` defaults to the file's stem and `out_dir` to
    `runs/<name>`."""
    path = Path(profile)
    if not (path.suffix in (".yaml", ".yml") or path.exists()): path = PROFILES / f"{profile}.yaml"
    if not path.is_file():
        raise ProfileError(f"No profile {profile!r}: choose one of {', '.join(profiles())} "
                           f"(kd_lib/profiles/) or give the path of a YAML file.")
    try: prof = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e: raise ProfileError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(prof, dict): raise ProfileError(f"{path}: a profile is a YAML mapping.")
    prof.setdefault("name", path.stem)
    prof.setdefault("out_dir", f"runs/{prof['name']}")
    prof["path"] = str(path)
    datasets = prof.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise ProfileError(f"{path}: `datasets` must be a list with one entry per dataset.")
    teacher_keys, student_keys = notebook_parameters("teacher"), notebook_parameters("student")
    for d in datasets:
        if not isinstance(d, dict) or "dataset" not in d:
            raise ProfileError(f"{path}: each entry of `datasets` needs a `dataset` name.")
        for g in d.get("students", []):
            if bad := set(g) - student_keys:
                raise ProfileError(f"{path}: {sorted(bad)} for {d['dataset']}: not parameters of "
                                   f"notebooks/student.ipynb.")
        if bad := set(d.get("teacher", {})) - teacher_keys:
            raise ProfileError(f"{path}: {sorted(bad)} for {d['dataset']}'s teacher: not parameters of "
                               f"notebooks/teacher.ipynb.")
        if bad := set(d.get("common", {})) - (teacher_keys & student_keys):
            raise ProfileError(f"{path}: `common` may only hold parameters of both notebooks; not {sorted(bad)}.")
    return prof


def _listify(v) -> list: return list(v) if isinstance(v, (list, tuple)) else [v]


def expand(prof: dict, out_dir=None) -> list:
    """The profile's jobs in order: each dataset's teacher, then every student run of every group (the
    product of the group's `student`, `method`, `fraction` and `seed` lists), duplicates dropped."""
    out = Path(out_dir or prof["out_dir"])
    out = out if out.is_absolute() else ROOT / out
    shown = _shown(out)
    teachers, students, seen = [], [], set()
    for d in prof["datasets"]:
        ds = d["dataset"]
        base = dict(dataset=ds, data_path=d.get("data_path"), **d.get("common", {}))
        tp = dict(base, **d.get("teacher", {}), out_dir=shown)
        teachers.append(Job("teacher", f"{ds}/teacher", tp, out / ds / "teacher",
                            out / "notebooks" / ds / "teacher.ipynb"))
        for g in d.get("students", []):
            lists = [_listify(g.get(k, _STUDENT_DEFAULTS[k])) for k in EXPANDED]
            for combo in itertools.product(*lists):
                p = dict(base, **{k: v for k, v in g.items() if k not in EXPANDED}, **dict(zip(EXPANDED, combo)))
                p["fraction"] = float(p["fraction"])
                p["out_dir"] = shown
                p.setdefault("teacher_path", None)
                name = run_name(p)
                if (ds, name) in seen: continue
                seen.add((ds, name))
                students.append(Job("student", f"{ds}/{name}", p, out / ds / name,
                                    out / "notebooks" / ds / f"{name}.ipynb"))
    for j in teachers + students: j.extra.update(prune=bool(prof.get("prune", True)), out_dir=out)
    return teachers + students


def _shown(path: Path) -> str:
    "`path` as the notebooks get it: relative to the repository root (their working folder) when inside it."
    try: return path.relative_to(ROOT).as_posix()
    except ValueError: return str(path)


_STUDENT_DEFAULTS = dict(student="resnet10", method="stagewise", fraction=1.0, seed=0)
_IGNORED = {"out_dir"}  # job parameters that are not recorded parameters


def _norm(v):
    "Values as a record holds them (paths as strings, numbers as floats) for comparison."
    if isinstance(v, Path): return str(v)
    if isinstance(v, bool) or v is None: return v
    if isinstance(v, (int, float)): return float(v)
    return v


def _conflicts(job: Job, recorded: dict) -> dict:
    "Parameters of `job` that `recorded` (a record's params) has with another value: {key: (recorded, wanted)}."
    out = {}
    for k, v in job.params.items():
        if k in _IGNORED: continue
        if k == "teacher_path" and v is None: continue  # the default teacher, wherever out_dir is
        if _norm(recorded.get(k)) != _norm(v): out[k] = (recorded.get(k), v)
    return out


def plan(jobs: list) -> list:
    """Mark each job `complete` when its run folder holds a complete record with the job's parameters
    (it is not started again), else `todo`; raise `RunConflict` when a folder holds other parameters."""
    bad = []
    for j in jobs:
        rec = read_json(j.run / RECORD)
        params = (rec or {}).get("params") or read_json(j.run / "params.json")
        if params is not None and (c := _conflicts(j, params)):
            bad.append(f"{j.run}: {', '.join(f'{k} was {a!r}, the profile wants {b!r}' for k, (a, b) in c.items())}")
            continue
        j.status = "complete" if rec is not None and rec.get("status") == "complete" else "todo"
    if bad:
        raise RunConflict("These run folders hold runs with other parameters than the profile's:\n  "
                          + "\n  ".join(bad) + "\nDelete them, or give the profile another out_dir.")
    return jobs


def strays(jobs: list) -> list:
    "Record files under the jobs' out_dir that belong to none of the jobs (the figures would include them)."
    if not jobs: return []
    mine = {j.run / RECORD for j in jobs}
    return sorted(p for p in jobs[0].extra["out_dir"].rglob(RECORD) if p not in mine)


# ---------------------------------------------------------------- running
def _fmt(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _children_cpu() -> float:
    "CPU seconds (user + system) of the finished child processes (the kernels), for the summary line."
    try:
        import resource
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    except (ImportError, OSError): return 0.0


def _cores() -> int:
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1


def kernel_env(threads: int) -> dict:
    "The environment of a papermill kernel: `threads` for torch/OpenMP/MKL, fastai's bars off."
    t = str(max(1, threads))
    return dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, KD_PROGRESS="0",
                PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning"))


def run_notebook(name: str, out: Path, threads: int = None, log: Path = None, **parameters) -> Path:
    """Execute `notebooks/<name>.ipynb` with `parameters` into `out` with papermill, in a kernel of its own
    (`threads` torch threads, all cores by default), from the repository root; returns `out`. On failure
    raises `RuntimeError` naming the executed notebook (which shows the failing cell) and the log."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Path(log) if log else out.with_suffix(".log")
    cmd = [sys.executable, "-m", "papermill", str(NOTEBOOKS / f"{name}.ipynb"), str(out), "--cwd", str(ROOT),
           "-k", "python3", "--no-progress-bar", "--log-level", "WARNING", "-y", yaml.safe_dump(parameters)]
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=kernel_env(threads or _cores()), cwd=ROOT)
    if r.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"papermill failed on notebooks/{name}.ipynb (exit {r.returncode}); executed notebook: "
                           f"{out}, log: {log}\n{tail}")
    return out


class Progress:
    "Run i of N, elapsed and estimated remaining time, on stderr; the estimate scales by the jobs' costs and slots."
    def __init__(self, jobs: list, stream=None, n_jobs: int = 1):
        self.jobs, self.stream, self.n_jobs = jobs, stream or sys.stderr, max(1, n_jobs)
        self.t0, self.lock = time.perf_counter(), threading.Lock()
        self.todo_cost = sum(j.cost for j in jobs if j.status == "todo")
        self.done_cost, self.done_s, self.i = 0.0, 0.0, sum(j.status == "complete" for j in jobs)
        self.started = self.i

    def say(self, msg: str):
        with self.lock: print(msg, file=self.stream, flush=True)

    def start(self, job: Job):
        with self.lock: self.started += 1; k = self.started
        self.say(f"[{k:>3}/{len(self.jobs)}] start  {job.name} (elapsed {self.elapsed})")

    @property
    def elapsed(self) -> str: return _fmt(time.perf_counter() - self.t0)

    def finish(self, job: Job):
        with self.lock:
            self.i += 1
            self.done_cost += job.cost
            self.done_s += job.seconds
            spent = time.perf_counter() - self.t0
            # seconds per unit of cost in one slot, from the finished runs (a long run still going does not skew it)
            left = self.done_s / self.done_cost * (self.todo_cost - self.done_cost) / self.n_jobs if self.done_cost else 0
            what = "done" if job.status == "done" else "FAILED"
            print(f"[{self.i:>3}/{len(self.jobs)}] {what:6} {job.name} in {_fmt(job.seconds)} | elapsed {_fmt(spent)}"
                  f" | about {_fmt(left)} left", file=self.stream, flush=True)


def prune(run: Path) -> int:
    """Delete what a complete run no longer needs: fastai's copies of the best epochs (`models/`) and the
    checkpoints of all steps but the last (`stages/`), which only a killed run resumes from. The record,
    the teacher's `teacher.pth` and the student's final weights (`stages/<last step>.pth`) stay.
    Returns the bytes freed; does nothing unless the run's record is complete."""
    record = read_json(run / RECORD) or {}
    if record.get("status") != "complete": return 0
    last = f"{record['stages'][-1]['name']}.pth" if record.get("kind") == "student" and record.get("stages") else None
    doomed = list((run / "models").glob("*.pth")) + [p for p in (run / "stages").glob("*.pth") if p.name != last]
    freed = 0
    for p in doomed:
        freed += p.stat().st_size
        p.unlink()
    if (run / "models").is_dir() and not any((run / "models").iterdir()): (run / "models").rmdir()
    return freed


def _execute(job: Job, threads: int, progress: Progress) -> Job:
    progress.start(job)
    job.status, t = "running", time.perf_counter()
    job.log = job.output.with_suffix(".log")
    try:
        run_notebook(job.kind, job.output, threads=threads, log=job.log, **job.params)
        job.status = "done"
        if job.extra.get("prune", True): prune(job.run)
    except RuntimeError as e:
        job.status, job.error = "failed", str(e)
    job.seconds = time.perf_counter() - t
    progress.finish(job)
    return job


def _needs_teacher(job: Job) -> bool:
    "A student that distils its dataset's default teacher (so waits for it); no_teacher runs and teachers do not."
    return job.kind == "student" and job.params.get("method") != "no_teacher" and not job.params.get("teacher_path")


def run_jobs(jobs: list, n_jobs: int = 1, stream=None, execute=None) -> list:
    """Run the `todo` jobs, `n_jobs` at a time, each kernel with cores / `n_jobs` torch threads, in order,
    except that a student which distils a teacher starts only once its dataset's teacher is complete
    (no_teacher runs need not wait); a student whose teacher failed is not started. `execute(job, threads,
    progress)` runs one job (default: papermill). Returns the jobs; raises `RuntimeError` listing failures."""
    execute = execute or _execute
    cpu0 = _children_cpu()
    progress = Progress(jobs, stream, n_jobs)
    n_done = sum(j.status == "complete" for j in jobs)
    threads = max(1, _cores() // max(1, n_jobs))
    progress.say(f"{len(jobs)} runs: {n_done} complete already, {len(jobs) - n_done} to run, {n_jobs} at a time "
                 f"on {_cores()} cores, {threads} torch thread(s) each")
    teacher = {j.params["dataset"]: ("done" if j.status == "complete" else "todo") for j in jobs if j.kind == "teacher"}
    pending = [j for j in jobs if j.status == "todo"]
    cond = threading.Condition()

    def next_job():
        with cond:
            while True:
                for j in [j for j in pending if _needs_teacher(j) and teacher.get(j.params["dataset"]) == "failed"]:
                    pending.remove(j)
                    j.status, j.error = "failed", f"not started: the teacher of {j.params['dataset']} failed"
                    progress.finish(j)
                if not pending: return None
                j = next((j for j in pending if not _needs_teacher(j)
                          or teacher.get(j.params["dataset"], "done") == "done"), None)
                if j is not None:
                    pending.remove(j)
                    return j
                cond.wait()

    def worker():
        while (j := next_job()) is not None:
            try: execute(j, threads, progress)
            finally:
                with cond:
                    if j.kind == "teacher": teacher[j.params["dataset"]] = "done" if j.status == "done" else "failed"
                    cond.notify_all()

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(n_jobs, len(pending))))]
    for w in workers: w.start()
    for w in workers: w.join()
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed:\n" + "\n".join(f"* {j.name}: {j.error}" for j in failed))
    progress.say(f"all {len(jobs)} runs complete (elapsed {progress.elapsed}, CPU time of the kernels "
                 f"{_fmt(_children_cpu() - cpu0)})")
    return jobs


# ---------------------------------------------------------------- the book
def _example(prof: dict, jobs: list):
    "The teacher and student jobs the book shows: the profile's `example` (dataset, student, method, ...)."
    ex = dict(prof.get("example") or {})
    ds = ex.pop("dataset", prof["datasets"][0]["dataset"])
    teacher = next(j for j in jobs if j.kind == "teacher" and j.params["dataset"] == ds)
    students = [j for j in jobs if j.kind == "student" and j.params["dataset"] == ds
                and all(_norm(j.params.get(k)) == _norm(v) for k, v in ex.items())]
    if not students: raise ProfileError(f"The profile's example {prof.get('example')} matches none of its runs.")
    return teacher, students[0]


def write_book_notebooks(prof: dict, jobs: list, stream=None) -> None:
    """Write `book/generated/`: Table 1 and the method diagram (run now), the figures of the profile's records
    (run now), and the executed notebooks of the example teacher and student runs (copied; executed again
    first when missing or older than `notebooks/<kind>.ipynb`, which only reads the complete run's record)."""
    stream = stream or sys.stderr
    GENERATED.mkdir(parents=True, exist_ok=True)
    out = jobs[0].extra["out_dir"]
    teacher, student = _example(prof, jobs)
    for j in (teacher, student):
        if not j.output.exists() or j.output.stat().st_mtime < j.notebook.stat().st_mtime:
            print(f"executing {j.kind}.ipynb again for {j.name}: its run is complete (nothing is trained again) but "
                  "its executed notebook is missing or older than the notebook", file=stream, flush=True)
            run_notebook(j.kind, j.output, **j.params)
        shutil.copyfile(j.output, GENERATED / f"{j.kind}.ipynb")
    size = teacher.params.get("size")  # the teacher's parameters include the dataset's `common` ones
    steps = [("table1", dict(size=224, n_classes=10)),
             ("method", dict(student=student.params["student"], size=224, run_size=size,
                             dataset=teacher.params["dataset"])),
             ("figures", dict(out_dir=_shown(out), profile=prof["name"], dataset=None))]
    for name, params in steps:
        print(f"writing book/generated/{name}.ipynb", file=stream, flush=True)
        run_notebook(name, GENERATED / f"{name}.ipynb", log=out / "notebooks" / f"{name}.log", **params)


def build_book() -> None:
    "Build the Jupyter Book into `_build/html`, failing on any warning (SystemExit naming the cause)."
    jb = str(Path(sys.executable).with_name("jupyter-book"))
    r = subprocess.run([jb, "build", str(ROOT), "-W", "-n", "--keep-going"], cwd=ROOT)
    if r.returncode != 0:
        sys.exit("error: jupyter-book build failed: the warnings above name the page and line (a broken glue key or "
                 "link, a notebook missing from book/generated/ ...)")
    print(f"the book is in {ROOT / '_build' / 'html' / 'index.html'}", file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m kd_lib.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="digits", help=f"a profile ({', '.join(profiles())}) or a YAML file")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs executed at once (default: the profile's `jobs`, else 1)")
    p.add_argument("--out-dir", default=None, help="where runs and executed notebooks go (default: the profile's)")
    p.add_argument("--book-only", action="store_true", help="build the book from notebooks already run")
    p.add_argument("--runs-only", action="store_true", help="run the profile's notebooks, build no book")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether each is complete; run nothing")
    args = p.parse_args(argv)
    if args.book_only:
        build_book()
        return
    try:
        prof = load_profile(args.profile)
        jobs = plan(expand(prof, args.out_dir))
    except (ProfileError, RunConflict) as e:
        sys.exit(f"error: {e}")
    if stray := strays(jobs):
        print(f"note: {len(stray)} record(s) under {stray[0].parents[2]} are not runs of the profile "
              f"{prof['name']!r} (for example {stray[0].parent.name}); the figures include every record there. "
              "Move them away, or give the profile another out_dir, to show the profile's runs only.",
              file=sys.stderr)
    if args.dry_run:
        for j in jobs: print(f"{j.status:9} {j.name}  {j.params}")
        todo = [j for j in jobs if j.status == "todo"]
        print(f"{len(jobs)} runs, {len(todo)} to run", file=sys.stderr)
        return
    n_jobs = args.jobs or int(prof.get("jobs", 1))
    try:
        run_jobs(jobs, n_jobs)
        if args.runs_only: return
        write_book_notebooks(prof, jobs)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    build_book()


if __name__ == "__main__":
    main()
