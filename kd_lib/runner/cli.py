"""The command line of the runner, `python -m kd_lib.runner --profile digits` (see `kd_lib.runner`)."""
import argparse
import os
import sys

from .. import runner
from ..data.folders import where_data_is
from ..evidence.claims import MARGIN
from ..infra.files import CorruptFile
from ..infra.heartbeat import EVERY_S, LINES_ENV
from .book import build_book, write_book_notebooks
from .executors import DaskExecutor, LocalExecutor, visible_gpus
from .jobs import run_job, run_jobs, train_job
from .kept import claim_verdicts, keep_plan, keep_records
from .profiles import MAX_JOBS, ProfileError, RunConflict, example, expand, load_profile, plan, profiles, strays


def main(argv=None) -> None:
    "Run a profile's notebooks and build the book, or what the flags ask for (`--help`)."
    p = argparse.ArgumentParser(prog="python -m kd_lib.runner", description=runner.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="digits", help=f"a profile ({', '.join(profiles())}) or a YAML file")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs executed at once (default: the profile's `jobs`, else 1)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="send the runs to the workers of this Dask scheduler (tcp://host:8786; needs .[cluster])")
    p.add_argument("--gpu", action="store_true", help="with --scheduler: each run needs a worker resource GPU=1")
    p.add_argument("--out-dir", default=None, help="where runs and executed notebooks go (default: the profile's)")
    p.add_argument("--book-only", action="store_true", help="build the book from notebooks already run")
    p.add_argument("--runs-only", action="store_true", help="run the profile's notebooks, build no book")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether each is complete; run nothing")
    p.add_argument("--note", default=None, metavar="TEXT",
                   help="for a profile that keeps its records: how this set was made (machines, threads, stops), "
                        "written with it into the log of kept sets")
    p.add_argument("--replace", action="store_true",
                   help="for a profile that keeps its records: replace records kept in its folder for other run "
                        "settings (only those git holds committed, which git can restore)")
    p.add_argument("--notebooks", action="store_true",
                   help="execute each run's notebook with papermill (kept in <out_dir>/notebooks/; a kernel per run, "
                        "slower) instead of its recipe in a worker process")
    args = p.parse_args(argv)
    if args.jobs is not None and not 1 <= args.jobs <= MAX_JOBS:
        p.error(f"--jobs {args.jobs}: run at least 1 and at most {MAX_JOBS} jobs at a time.")
    if args.gpu and not args.scheduler: p.error("--gpu asks Dask workers for a GPU: give --scheduler too.")
    if args.book_only:
        build_book()
        return
    try:
        prof = load_profile(args.profile)
        jobs = plan(expand(prof, args.out_dir))
        example(prof, jobs)
        for flag, what in (("note", "goes into the log of kept records"), ("replace", "replaces kept records")):
            if getattr(args, flag) and not prof.get("keep"):
                raise ProfileError(f"--{flag} {what}, and the profile {prof['name']!r} keeps none (no `keep` "
                                   "folder).")
        if prof.get("keep") and not args.dry_run: keep_plan(prof, jobs, args.replace)  # refused before any run
    except (ProfileError, RunConflict, CorruptFile) as e:
        sys.exit(f"error: {e}")
    if prof.get("keep") and args.dry_run:  # what a run would refuse, said before anything runs
        try: keep_plan(prof, jobs, args.replace)
        except (ProfileError, CorruptFile) as e: print(f"note: keeping this profile's records would be refused: {e}",
                                                       file=sys.stderr)
    if stray := strays(jobs):
        print(f"note: {len(stray)} record(s) under {stray[0].parents[2]} are not runs of the profile "
              f"{prof['name']!r} (for example {stray[0].parent.name}); the figures include every record there. "
              "Move them away, or give the profile another out_dir, to show the profile's runs only.",
              file=sys.stderr)
    if args.dry_run:
        for d in prof["datasets"]:
            print(f"data     {d['dataset']}: {where_data_is(d['dataset'], d.get('data_path'))}")
        for j in jobs:
            print(f"{j.status:9} {j.name}  {j.config.changed()}" + (f"\n          {j.error}" if j.error else ""))
        todo = [j for j in jobs if j.status == "todo"]
        print(f"{len(jobs)} runs, {len(todo)} to run", file=sys.stderr)
        return
    os.environ.setdefault(LINES_ENV, str(EVERY_S))  # each run's worker says where it is every 30 s (KD_LINES=0: not)
    try:  # on a machine with GPUs, one run per GPU unless --jobs says otherwise
        executor = DaskExecutor(args.scheduler, gpu=args.gpu) if args.scheduler else \
            LocalExecutor(args.jobs or len(visible_gpus()) or int(prof.get("jobs", 1)), workers=not args.notebooks)
    except (ImportError, OSError) as e:
        sys.exit(f"error: {e}")
    try:
        run_jobs(jobs, executor=executor, execute=run_job if args.notebooks else train_job)
        if prof.get("keep"):
            margin = prof.get("margin", MARGIN)
            kept = keep_records(prof, jobs, verdicts=lambda folder: claim_verdicts(folder, margin), note=args.note,
                                replace=args.replace)
            print(f"records kept in {kept}", file=sys.stderr)
        if args.runs_only: return
        write_book_notebooks(prof, jobs, n_jobs=executor.slots if not args.scheduler else 1)
    except (RuntimeError, ProfileError, CorruptFile) as e:
        sys.exit(f"error: {e}")
    finally:
        executor.shutdown()
    build_book()
