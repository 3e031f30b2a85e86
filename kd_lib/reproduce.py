"""The runner: execute the book's notebooks with papermill, then build the book.

    python -m kd_lib.reproduce --profile digits      # what `make book` runs
"""
import argparse
import subprocess
import sys
from pathlib import Path

import papermill as pm

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "book" / "generated"


def run_notebook(name: str, out: Path, **parameters) -> Path:
    "Execute `notebooks/<name>.ipynb` with `parameters` into `out` (papermill), returning `out`."
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(ROOT / "notebooks" / f"{name}.ipynb", out, parameters=parameters,
                        cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    return out


def build_book() -> None:
    "Build the Jupyter Book into `_build/html`, failing on any warning."
    subprocess.run([str(Path(sys.executable).with_name("jupyter-book")), "build", str(ROOT), "-W", "-n", "--keep-going"],
                   check=True, cwd=ROOT)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="digits", help="parameter profile (digits, smoke, paper)")
    p.add_argument("--jobs", type=int, default=1, help="runs executed at once")
    p.add_argument("--book-only", action="store_true", help="build the book from notebooks already run")
    args = p.parse_args(argv)
    if not args.book_only:
        run_notebook("table1", GENERATED / "table1.ipynb", size=224, n_classes=10)
    build_book()


if __name__ == "__main__":
    main()
