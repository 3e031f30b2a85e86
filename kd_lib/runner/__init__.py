"""The runner: a profile (YAML) -> the runs of its recipes -> the book.

    python -m kd_lib.runner --profile digits            # what `make book` runs
    python -m kd_lib.runner --profile smoke --jobs 2    # the tiny profile of the tests and CI
    python -m kd_lib.runner --profile my.yaml           # a profile file of your own
    python -m kd_lib.runner --profile digits --dry-run  # list the runs, run nothing
    python -m kd_lib.runner --profile digits --book-only  # rebuild the book from what already ran
    python -m kd_lib.runner --profile smoke --notebooks  # every run as its executed notebook (papermill)
    python -m kd_lib.runner --profile paper --scheduler tcp://host:8786 --gpu  # on a Dask cluster

A profile (``kd_lib/profiles/<name>.yaml``) names, per dataset, the teacher's settings and groups of
student runs; list-valued ``student``, ``method``, ``fraction`` and ``seed`` of a group expand to every
combination. The runner trains each dataset's teacher, then each student run, with the recipes the notebooks
call (`kd_lib.recipes.train`), in worker processes that live as long as the runner (``--notebooks``: by executing
``notebooks/teacher.ipynb`` and ``notebooks/student.ipynb`` with papermill, a kernel per run, into
``<out_dir>/notebooks/``); ``out_dir`` is ``runs/<profile>`` unless the profile says otherwise, and the records
land in ``<out_dir>/<dataset>/...``. A run whose record is complete is not started again. The runs execute on
this machine, a few at a time (one per GPU where there are GPUs), or on the workers of a Dask cluster
(`kd_lib.runner.executors`). On stderr it says when each run starts and ends, with an estimate of the time
left (`kd_lib.runner.estimate`), and each run says where it is every 30 s (`kd_lib.infra.heartbeat`). Then it writes
the book's notebooks into ``book/generated/`` (Table 1, the method diagram, the figures, models of one's own, and
the notebooks of one teacher and one student run, executed from their records) and builds the book with
``jupyter-book build . -W -n --keep-going``.

A profile with a ``keep`` folder (``cifar10``: ``results/cifar10``) has runs that take hours: once they
complete, their records are copied there (JSON only) to be committed, and every build of the book draws
that profile's chapter (``notebooks/<profile>.ipynb``) from the kept records, without running them again.
"""
from .book import GENERATED, build_book, write_book_notebooks
from .executors import DaskExecutor, LocalExecutor, visible_gpus
from .jobs import Outcome, Progress, kernel_env, run_job, run_jobs, run_notebook, train_job
from .kept import add_set, check_kept, keep_records, kept_profiles, kept_records, reseal, seal
from .profiles import (NOTEBOOKS, PROFILES, ROOT, Job, ProfileError, RunConflict, example, expand, load_profile, plan,
                       profiles, strays)

__all__ = ["ROOT", "PROFILES", "NOTEBOOKS", "GENERATED", "Job", "ProfileError", "RunConflict", "profiles",
           "load_profile", "expand", "plan", "strays", "example", "kernel_env", "run_notebook", "Progress", "Outcome",
           "run_job", "train_job", "run_jobs", "LocalExecutor", "DaskExecutor", "visible_gpus", "write_book_notebooks",
           "build_book", "kept_profiles", "keep_records", "add_set", "kept_records", "check_kept", "seal", "reseal"]
