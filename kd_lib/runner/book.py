"""The book: the notebooks of `book/generated/` (Table 1, the method, the figures of a profile's records, one
teacher and one student run), then Jupyter Book's build of the whole book, failing on any warning."""
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from ..evidence.claims import MARGIN
from ..infra.heartbeat import every_s
from .executors import cores
from .jobs import run_notebook
from .kept import chapter, kept_profiles
from .profiles import ROOT, example, shown

__all__ = ["GENERATED", "write_book_notebooks", "build_book"]

GENERATED = ROOT / "book" / "generated"


def write_book_notebooks(prof: dict, jobs: list, stream=None, n_jobs: int = 2) -> None:
    """Write `book/generated/`: Table 1 and the method diagram (run now), the figures of the profile's records
    (run now), the page on models of one's own (run now, with the profile's `own_models` parameters, its runs in
    `<out_dir>-own_models`), the executed notebooks of the example teacher and student runs (copied; executed again
    first when missing or older than `notebooks/<kind>.ipynb`, which only reads the complete run's record),
    and the chapter of each profile whose records are kept in the repository (`kept_profiles`), from them.
    `n_jobs` notebooks run at once (the page on one's own models, which trains, beside the others)."""
    stream = stream or sys.stderr
    GENERATED.mkdir(parents=True, exist_ok=True)
    out = jobs[0].out_dir
    teacher, student = example(prof, jobs)
    chapters = {}  # chapter -> its parameters: a profile's records, and a companion's (`chapter:`) as its budget column
    for p in kept_profiles():
        chapters.setdefault(chapter(p), {})["records_dir" if chapter(p) == p["name"] else "budget_dir"] = p["keep"]
    kept = {name: params["records_dir"] for name, params in chapters.items() if "records_dir" in params}
    threads = max(1, cores() // max(1, n_jobs))
    steps = [("own_models", dict(out_dir=shown(out.with_name(f"{out.name}-own_models")),
                                 **(prof.get("own_models") or {}))),  # the longest first
             ("table1", dict(size=224, n_classes=10)),
             ("method", dict(student=student.config.student, size=224, run_size=teacher.config.size,
                             dataset=teacher.config.dataset)),
             ("figures", dict(out_dir=shown(out), profile=prof["name"], dataset=None,
                              margin=prof.get("margin", MARGIN))),
             *((name, params) for name, params in chapters.items() if "records_dir" in params)]

    def example_run(j):
        if not j.output.exists() or j.output.stat().st_mtime < j.notebook.stat().st_mtime:
            print(f"executing {j.kind}.ipynb again for {j.name}: its run is complete (nothing is trained again) but "
                  "its executed notebook is missing or older than the notebook", file=stream, flush=True)
            run_notebook(j.kind, j.output, threads=threads, **j.params)
        shutil.copyfile(j.output, GENERATED / f"{j.kind}.ipynb")

    def page(name, params):
        print(f"writing book/generated/{name}.ipynb" + (f" from the records kept in {kept[name]}, made before (make "
              f"book PROFILE={name} makes them again)" if name in kept else ""), file=stream, flush=True)
        run_notebook(name, GENERATED / f"{name}.ipynb", log=out / "notebooks" / f"{name}.log", threads=threads,
                     **params)

    with ThreadPoolExecutor(max(1, n_jobs)) as pool:
        done = {pool.submit(page, name, params): name for name, params in steps[:1]}
        done.update({pool.submit(example_run, j): f"{j.kind}.ipynb" for j in (teacher, student)})
        done.update({pool.submit(page, name, params): name for name, params in steps[1:]})
        _say_while_running(done, stream)
        for f in done: f.result()  # the first failure, with its notebook and log named


def _say_while_running(futures: dict, stream) -> None:
    "Until every future (-> the notebook it writes) is done, a line every `KD_LINES` seconds naming those running."
    every, t0 = every_s(), time.perf_counter()
    pending = set(futures)
    while pending:
        _, pending = wait(pending, timeout=every)
        if pending and every and (running := [futures[f] for f in pending if f.running()]):
            elapsed = int(time.perf_counter() - t0)
            print(f"  still writing {', '.join(running)} (book notebooks, {elapsed // 60}m{elapsed % 60:02d}s)",
                  file=stream, flush=True)


def build_book() -> None:
    "Build the Jupyter Book into `_build/html`, failing on any warning (SystemExit naming the cause)."
    jb = str(Path(sys.executable).with_name("jupyter-book"))
    r = subprocess.run([jb, "build", str(ROOT), "-W", "-n", "--keep-going"], cwd=ROOT)
    if r.returncode != 0:
        sys.exit("error: jupyter-book build failed: the warnings above name the page and line (a broken glue key or "
                 "link, a notebook missing from book/generated/ ...)")
    print(f"the book is in {ROOT / '_build' / 'html' / 'index.html'}", file=sys.stderr)
