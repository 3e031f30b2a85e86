"""Feature caching: what a frozen network computes from an item that every epoch gives the same tensor
(any item without augmentation, the valid items always) is the same every epoch, so compute it once.

* `Store`: tensors of one dtype, in memory up to a bound in all, beyond it in memory-mapped files in a
  temporary folder under ``data_dir()/"cache"`` that `Store.close` deletes.
* `dataloaders`: fastai loaders over the cached tensors (`kd_lib.data.resident.TensorLoader`) that give the batches, in
  the order, of the loaders they mirror (same length, batch size, shuffle, drop_last and `rng`).
* `FeatureCache`: for each step of a method (see `kd_lib.core.steps`), the input of the first stage it
  trains (the frozen student prefix's output) and its target (teacher feature map, or the labels), for
  every train and valid item in dataset order; and the part of the student that maps one to the other.
  Stage by stage it chains: the next step's input is this step's trained part applied (eval) to this
  step's input, the next target the teacher's next stage applied to this target, one block each. It needs
  stages that compose the models (`kd_lib.core.stages.Stages`).
"""
import math
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from fastai.data.core import DataLoaders
from torch import nn

from ..core.distill import frozen
from ..core.forced import ForcedStages
from ..core.models import evaluating
from ..core.stages import Stages
from ..core.steps import as_float, listed
from ..data.folders import data_dir
from ..data.resident import TensorLoader

__all__ = ["CACHE_DTYPES", "AMP_DTYPES", "Store", "FeatureCache"]

CACHE_DTYPES = ("float16", "bfloat16", "float32")
AMP_DTYPES = dict(bf16=torch.bfloat16, fp16=torch.float16)


class Store:
    """Tensors of `dtype` kept in `device` memory up to `max_bytes` in all; beyond that each new one is
    a memory-mapped file in a temporary folder under `folder` (default ``data_dir()/"cache"``). With
    `channels_last`, a 4-d tensor is laid out as the models run (N, H, W, C in memory): no layout change a batch."""
    def __init__(self, dtype: torch.dtype, max_bytes: int, folder=None, device="cpu", channels_last: bool = False):
        self.dtype, self.max_bytes, self.device, self.channels_last = dtype, max_bytes, device, channels_last
        self.folder = Path(folder or data_dir() / "cache")
        self.held, self.dir, self.files, self.in_memory, self.spilled = [], None, 0, 0, 0

    def empty(self, shape) -> torch.Tensor:
        "A new uninitialised tensor of `shape`, in memory while the bound allows, else mapped to a file."
        n = math.prod(shape)
        nbytes = n * self.dtype.itemsize
        nhwc = self.channels_last and len(shape) == 4
        if self.in_memory + nbytes <= self.max_bytes:
            t, path = torch.empty(shape, dtype=self.dtype, device=self.device,
                                  memory_format=torch.channels_last if nhwc else torch.contiguous_format), None
            self.in_memory += nbytes
        else:
            if self.dir is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.dir = Path(tempfile.mkdtemp(prefix="features-", dir=self.folder))
            self.files += 1
            path = self.dir / f"{self.files}.bin"
            with open(path, "wb") as f: f.truncate(nbytes)
            t = torch.from_file(str(path), shared=True, size=n, dtype=self.dtype)
            t = t.view(shape[0], *shape[2:], shape[1]).permute(0, 3, 1, 2) if nhwc else t.view(shape)
            self.spilled += nbytes
        self.held.append((t, nbytes, path))
        return t

    def free(self, t: torch.Tensor) -> None:
        "Give back `t`'s memory (or delete its file); `t` must not be used after."
        i = next(i for i, (o, _, _) in enumerate(self.held) if o is t)
        _, nbytes, path = self.held.pop(i)
        if path is None: self.in_memory -= nbytes
        else: path.unlink()

    def close(self) -> None:
        "Free every tensor and delete the temporary folder."
        self.held, self.in_memory = [], 0
        if self.dir is not None: shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


def _as_floats(b: tuple) -> tuple: return tuple(map(as_float, b))


def _labelled(batches, y: torch.Tensor):
    "(range, images) of `batches` of (range, (images, labels)), the labels written into `y` on the way."
    for r, (xb, yb) in batches:
        y[r.start:r.stop] = yb.cpu()
        yield r, xb


class FeatureCache:
    """Inputs and targets of a method's steps, computed once (eval mode, no gradients) for the train and
    valid items of `dls`, which must give the same tensor for an item every epoch (without `train`: for the
    valid items only, which no augmentation touches). Held in `dtype` (one of `CACHE_DTYPES`) in a `Store`
    on the loaders' device (GPU memory on CUDA: batches need no transfer) bounded by `max_bytes` (laid out
    channels-last with `channels_last`). `amp` (a key of `AMP_DTYPES`) computes under autocast on CUDA. `stages` cut
    both models (default: the paper's). The student's parts it applies are moved to the loaders' device first
    (a resumed run loads its weights on the CPU). A context manager; `close` frees it all."""
    def __init__(self, dls, student: nn.Module, teacher: nn.Module = None, dtype: str = "float16",
                 max_bytes: int = 4 * 2**30, amp: str = None, train: bool = True, stages: Stages = None,
                 channels_last: bool = False):
        if dtype not in CACHE_DTYPES: raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(CACHE_DTYPES)}.")
        self.dls, self.student, self.teacher, self.amp, self.train = dls, student, teacher, amp, train
        self.stages = stages or Stages.paper()
        self.loaders = (dls.train, dls.valid) if train else (dls.valid,)
        self.store = Store(getattr(torch, dtype), max_bytes, device=dls.device, channels_last=channels_last)
        # per cached loader: the inputs of stage `at`, the teacher's features of stage `t_at`, the labels
        self.x = self.t = self.y = self.later = None
        self.at = self.t_at = None

    def __enter__(self): return self
    def __exit__(self, *exc): self.close()

    def close(self):
        self.store.close()
        self.x = self.t = self.y = self.later = None

    def labels(self, first: str) -> tuple:
        "(inputs, labels, part) of a step that trains from stage `first` (a name) to the head on the labels."
        return self._step(first, None)

    def features(self, first: str, target: str) -> tuple:
        "(inputs, teacher maps, part) of a step that trains stages `first` to `target` on the teacher's `target` map."
        return self._step(first, target)

    def _step(self, first: str, target) -> tuple:
        """Per cached loader its items' inputs and targets, in dataset order, and the part of the student that maps
        one to the other. Steps come in order; a step that cannot be reached from the cache of the one before (the
        first, or a resumed run) starts again from the images, then chains the same way, so a resumed run computes
        the same numbers."""
        for per_loader in self.later or []:  # the teacher's later maps serve the forced step only
            for t in per_loader: self.store.free(t)
        self.later = None
        first, last = self.stages.index(first), None if target is None else self.stages.index(target)
        reachable = self.x is not None and first >= self.at and (
            last is None or (self.t is not None and last >= self.t_at))
        if not reachable: self._fill(last is not None)
        self._advance(first, last)
        part = self.stages.span(self.student, self.stages.all[first], target or "head")
        return self.x, (self.y if last is None else self.t), part

    def dataloaders(self, inputs: list, targets: list) -> DataLoaders:
        """`DataLoaders` of cached `inputs` and `targets` (as `step` gives them: per loader a tensor or a list
        of them) whose batches are those of `dls`."""
        def mirror(dl, x, t):
            tensors = (*listed(x), *listed(t))
            pin = dl.device.type == "cuda" and all(o.device.type == "cpu" for o in tensors)
            return TensorLoader(tensors, bs=dl.bs, shuffle=dl.shuffle, drop_last=dl.drop_last, device=dl.device,
                                pin=pin, after_batch=_as_floats)
        dls = DataLoaders(*map(mirror, self.loaders, inputs, targets), path=self.dls.path, device=self.dls.device)
        dls.n_inp = len(listed(inputs[0]))  # fastai's Learner splits a batch into n_inp inputs and the targets
        return dls

    def forced(self) -> tuple:
        """Inputs and targets of teacher-forced stages (`kd_lib.core.forced`): per cached loader the images and the
        teacher's maps of the first to the last but one stage as the stages' inputs, all its maps as their targets;
        nothing chained through the student, so one cache serves the whole step."""
        self._fill(True)
        maps, teacher = [self.t], frozen(self.teacher, self.dls.device)
        for s in self.stages.names[1:]: maps.append(self._map(self.stages.part(teacher, s, "teacher"), maps[-1],
                                                              free=False))
        self.later = maps[1:]  # freed by the next step; the images and the first stage's maps are `x` and `t`
        inputs = [[x, *(m[i] for m in maps[:-1])] for i, x in enumerate(self.x)]
        return inputs, [[m[i] for m in maps] for i in range(len(self.x))], ForcedStages(self.student, self.stages)

    def _fill(self, teacher: bool) -> None:
        "The images (the input of the first stage) and, with `teacher`, the teacher's first stage features."
        self._free()
        first = self.stages.names[0]
        fns = [nn.Sequential()] + ([self.stages.part(frozen(self.teacher, self.dls.device), first, "teacher")]
                                   if teacher else [])
        outs, self.y = [], []
        for dl, chunks in zip(self.loaders, self._chunks()):
            y = torch.empty(dl.n, dtype=torch.long)
            images = dl.new(shuffle=False, drop_last=False, get_idxs=lambda: [i for r in chunks for i in r])
            outs.append(self._run(fns, _labelled(zip(chunks, images), y), len(y)))
            self.y.append(y)
        self.x, self.at = [o[0] for o in outs], 0
        if teacher: self.t, self.t_at = [o[1] for o in outs], 0

    def _advance(self, first: int, target) -> None:
        "Chain the inputs on to stage `first`, the teacher's features on to `target` (None: drop them), stage by stage."
        while self.at < first:
            self.x = self._map(self.stages.part(self.student, self.stages.all[self.at]), self.x)
            self.at += 1
        if target is None: return self._free_targets()
        while self.t_at < target:
            self.t_at += 1
            self.t = self._map(self.stages.part(frozen(self.teacher, self.dls.device), self.stages.all[self.t_at],
                                                "teacher"), self.t)

    def _chunks(self) -> list:
        """Per split, ranges of items to compute together: the shapes of the batches the plain path runs
        (full ones in training, the last one overlapping; in order in validation), so the float32 cache
        holds the very numbers the plain path computes (convolution kernels can depend on the batch size)."""
        res = []
        for dl in self.loaders:
            n, bs = dl.n, dl.bs
            chunks = [range(i, min(i + bs, n)) for i in range(0, n, bs)]
            if dl.drop_last and n >= bs: chunks[-1] = range(n - bs, n)
            res.append(chunks)
        return res

    def _map(self, f: nn.Module, xs: list, free: bool = True) -> list:
        "`f` applied (on the loaders' device) to each split's cached tensor, which is freed unless `free` is False."
        dev = self.dls.device
        f.to(dev)
        out = [self._run([f], ((r, as_float(x[r.start:r.stop].to(dev))) for r in chunks), len(x))[0]
               for x, chunks in zip(xs, self._chunks())]
        if free:
            for x in xs: self.store.free(x)
        return out

    def _run(self, fns, batches, n: int) -> list:
        "For each of `fns`, its outputs on `batches` of (range of items, input), `n` items in all, in one new tensor."
        amp = torch.autocast(self.dls.device.type, dtype=AMP_DTYPES[self.amp]) if self.amp else nullcontext()
        outs = [None] * len(fns)
        with torch.no_grad(), amp, evaluating(*fns):
            for r, b in batches:
                for j, f in enumerate(fns):
                    o = f(b)
                    if outs[j] is None: outs[j] = self.store.empty((n, *o.shape[1:]))
                    outs[j][r.start:r.stop] = o
                    if self.store.dtype is torch.float16 and torch.isinf(outs[j][r.start:r.stop]).any():
                        raise OverflowError("A cached feature overflows float16: use cache_dtype bfloat16 or float32.")
        return outs

    def _free_targets(self) -> None:
        for t in self.t or []: self.store.free(t)
        self.t = self.t_at = None

    def _free(self) -> None:
        self._free_targets()
        for x in self.x or []: self.store.free(x)
        self.x = self.at = None
