"""Progress lines a newcomer sees while the runner trains: the runs' own bars and tables are off there (a worker's
output would interleave), so each fit says, at most every `KD_LINES` seconds of its process, where it is."""
import os
import sys
import time

from fastai.callback.core import Callback
from fastai.learner import Recorder
from fastcore.basics import store_attr

__all__ = ["LINES_ENV", "EVERY_S", "every_s", "ProgressLines"]

LINES_ENV = "KD_LINES"  # seconds between progress lines; unset or 0: none (the runner sets it, papermill unsets it)
EVERY_S = 30.0  # the runner's default


def _fmt(s: float) -> str: return f"{int(s) // 60}m{int(s) % 60:02d}s"


def every_s() -> float:
    "Seconds between progress lines as `KD_LINES` asks (the runner's command line sets 30), or None: no lines."
    v = float(os.environ.get(LINES_ENV) or 0)
    return v if v > 0 else None


class ProgressLines(Callback):
    """A line on stderr after a training batch or an epoch once `every` seconds have passed since this process's
    last one: the `run`, its `step`, the epoch (and batch), the last epoch's `monitor` value and the step's
    elapsed time. The clock is the process's (`said`), so short fits one after the other still say something
    every `every` seconds."""
    order = Recorder.order + 1  # after the Recorder has the epoch's values
    said = None  # when a line was last written in this process

    def __init__(self, run: str, step: str, monitor: str, every: float = EVERY_S): store_attr()

    def before_fit(self):
        self.t0 = time.perf_counter()
        if ProgressLines.said is None: ProgressLines.said = self.t0

    def after_batch(self):
        if self.training: self._say(f", batch {self.iter + 1}/{self.n_iter}")

    def after_epoch(self): self._say("")

    def _say(self, batch: str) -> None:
        now = time.perf_counter()
        if now - ProgressLines.said < self.every: return
        ProgressLines.said = now
        names, values = self.recorder.metric_names[1:-1], self.recorder.values
        value = dict(zip(names, values[-1])).get(self.monitor) if values else None
        shown = f"{value:.4g}" if value is not None else "not yet measured"
        print(f"  {self.run} {self.step}: epoch {self.epoch + 1}/{self.n_epoch}{batch}, {self.monitor} {shown}, "
              f"elapsed {_fmt(now - self.t0)}", file=sys.stderr, flush=True)
