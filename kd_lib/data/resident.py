"""Data held as tensors: fastai loaders that index a batch out of tensors at once, and images decoded once.

* `TensorLoader`: a fastai `DataLoader` over equal-length tensors, a batch taken in one indexing; with the same
  `n`, `bs`, `shuffle`, `drop_last` and `rng` state as another fastai loader it yields the same items in each
  batch. The feature cache (`kd_lib.speed.cache`) serves its cached maps through it.
* `decode`: the images of a dataset's items decoded once, through the per-item pipeline's own resize, into one
  uint8 tensor (kept in ``data_dir()/"decoded"`` for the next run, keyed by the files), on the training device.
* `resident_loader`: a `TensorLoader` of such images whose batches go through the batch transforms (the paper's
  augmentation, normalisation) on that device: the per-item path's batches, bit for bit without augmentation,
  with no image opened, resized or converted per item per epoch.
"""
import hashlib
import json
import time
from pathlib import Path

import torch
from fastai.data.load import DataLoader
from fastai.data.transforms import ToTensor
from fastai.torch_core import TensorCategory, TensorImage
from fastai.vision.core import PILImage
from fastai.data.core import Pipeline  # fasttransform's, as fastai uses it

from ..infra.files import save_weights

__all__ = ["TensorLoader", "Decoded", "RACY_S", "file_key", "decoded_bytes", "decode", "resident_loader"]


class TensorLoader(DataLoader):
    """A fastai `DataLoader` over the equal-length tensors `dataset` (a tuple), a batch taken in one indexing and
    given the `types` (e.g. `TensorImage`: fastai's batch transforms dispatch on them), then `after_batch`, on
    `device`; with `pin`, a batch of tensors held on the CPU is pinned and moved to a CUDA `device` without
    blocking. With the same `n`, `bs`, `shuffle`, `drop_last` and `rng` state as another fastai loader it yields the
    same items in each batch."""
    def __init__(self, dataset=None, types=None, pin: bool = False, **kwargs):
        for k in ("n", "indexed"): kwargs.pop(k, None)  # what `new` passes again: set here
        super().__init__(tuple(dataset), n=len(dataset[0]), indexed=True, **kwargs)
        self.types, self.pin = types, pin

    def new(self, dataset=None, cls=None, **kwargs):
        res = super().new(dataset, cls, **{"types": self.types, "pin": self.pin, **kwargs})
        for k in ("vocab", "c", "split_idx"):
            if hasattr(self, k): setattr(res, k, getattr(self, k))
        return res

    def create_item(self, i): return i
    def retain(self, res, b): return res

    def create_batch(self, idxs):
        i = torch.tensor(idxs, device=self.dataset[0].device)
        b = tuple(t[i] for t in self.dataset)
        if self.pin: b = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in b)
        return tuple(typ(t) for typ, t in zip(self.types, b)) if self.types else b


class Decoded:
    "Decoded images (uint8, N x 3 x H x W) and the items (relative path, class) they are, in that order."
    def __init__(self, images: torch.Tensor, items: list):
        self.images, self.items = images, items
        self.row = {o: k for k, o in enumerate(items)}

    def take(self, items: list) -> torch.Tensor:
        "The images of `items`, in their order."
        return self.images[torch.tensor([self.row[o] for o in items], dtype=torch.long)]


def decoded_bytes(n: int, size: int) -> int: return n * 3 * size * size


RACY_S = 2.0  # a file changed this recently may change again within its timestamps' resolution


def file_key(root: Path, items: list, *extra) -> tuple:
    """A key for what is computed from the files of `items` ((relative path, class) under `root`) and `extra`: it
    changes when any file does (size, modification and change times, inode), and whether it can be trusted: not
    when a file changed less than `RACY_S` ago, as a change in the same tick of the file system's clock would not
    change its times (git's "racy" files). An untrusted key's result is not kept."""
    now, stats = time.time_ns(), []
    for rel, _ in items:
        st = (Path(root) / rel).stat()
        stats.append((rel, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    trusted = all(now - max(st[2], st[4]) > RACY_S * 1e9 for st in stats)
    return hashlib.sha256(json.dumps([str(Path(root).resolve()), *extra, stats]).encode()).hexdigest()[:16], trusted


def decode(root: Path, items: list, resize, folder: Path) -> Decoded:
    """The images of `items` ((relative path, class) under `root`) decoded as the per-item pipeline decodes them
    (`PILImage.create`, the item transform `resize` as for a valid item, `ToTensor`), as one uint8 tensor; kept in
    `folder` for the next run (a corrupt or stale copy is decoded again; none is kept while a file is racy,
    `file_key`)."""
    items = sorted(items)
    key, trusted = file_key(root, items, resize.size[0])
    path = Path(folder) / f"{key}.pt"
    try:
        if path.exists(): return Decoded(torch.load(path, map_location="cpu", weights_only=True), items)
    except Exception: path.unlink(missing_ok=True)  # only a cache: a file cut short is made again
    to_tensor = ToTensor()
    images = torch.stack([to_tensor(resize(PILImage.create(Path(root) / rel), split_idx=1))
                          for rel, _ in items]).as_subclass(torch.Tensor)
    if trusted: save_weights(path, images)
    return Decoded(images, items)


def resident_loader(decoded: Decoded, items: list, vocab: list, batch_tfms: list, split_idx: int, device=None,
                    **kwargs) -> TensorLoader:
    """A `TensorLoader` of the decoded images of `items` ((relative path, class)) on `device`, their labels (indices
    into `vocab`) and the batch transforms `batch_tfms` of split `split_idx` (0: train, random transforms applied;
    1: valid/test), with fastai's loader arguments `kwargs` (bs, shuffle, drop_last)."""
    images = decoded.take(items).to(device)
    labels = torch.tensor([vocab.index(c) for _, c in items], dtype=torch.long, device=device)
    dl = TensorLoader((images, labels), types=(TensorImage, TensorCategory), device=device,
                      after_batch=Pipeline(batch_tfms, split_idx=split_idx), **kwargs)
    dl.vocab, dl.c, dl.split_idx = vocab, len(vocab), split_idx
    return dl
