"""kd_lib: Stagewise Knowledge Distillation on fastai. One concept per module, in the order the data flows:

* `folders`: the datasets' image trees on disk: the digits written once, downloads, layout and image checks.
* `data`: the datasets as fastai DataLoaders (train, valid, test) with split metadata.
* `augment`: the paper's augmentation as one batched transform.
* `resident`: data held as tensors: images decoded once, batches indexed out of them.
* `models`: the paper's teacher and student ResNets.
* `stages`: where a teacher and a student are cut into stages (dotted module paths), presets, adapters.
* `distill`: the distillation as fastai callbacks (teacher targets, freezing, teacher losses).
* `forced`: teacher-forced stages (all feature stages at once, on the teacher's inputs).
* `steps`: the kinds of step (labels, features, forced), each building its fastai Learner.
* `methods`: the method registry (`METHODS`), each method defined once.
* `config`: every setting of a teacher or student run (`TeacherConfig`, `StudentConfig`).
* `cache`: what frozen parts compute, computed once (the fast path).
* `fitting`: one fit with best-epoch checkpoints and exact resume.
* `heartbeat`: the progress lines a fit writes under the runner.
* `memory`: freed memory kept for the next training step (no page faults a step).
* `locks`: one process trains a run folder at a time.
* `train`: the recipes, `train_teacher` and `train_student`, and loading their results.
* `records`: run folders and records, written atomically, read by one reader, collected into a DataFrame.
* `results`: analysis of records: summaries, gaps, convergence, what test-set selection adds.
* `saturation`: what doubling each arm's budget gave (the long twins), a diagnostic.
* `claims`: the paper's claims, each checked by a rule on paired runs, with its interval and budget column.
* `tables`: the book's tables as a reader sees them; `figures`: the book's figures, from records.
* `complexity`: parameters and FLOPs (Table 1's counting rule); `paper`: the paper's published numbers.
* `runner`: profiles, jobs and the book behind `make book` (`python -m kd_lib.runner`).
"""
import warnings

__version__ = "0.1.0"

# fastai's layers module compiles a helper with torch.jit.script on import, which torch now deprecates: a warning a
# user of kd_lib can do nothing about, printed on every import (and into every notebook of the book)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
