"""Datasets of the paper as fastai `DataLoaders` (train, valid, test), from ImageNet-style folders
(`kd_lib.data.folders`: the digits written once, downloads, checks), split and loaded the same way (`get_data`):

* ``digits`` (default): scikit-learn's bundled 8x8 digits, a fixed stratified 80/20 train/test split; no download.
* ``imagenette`` (full size; ``-160`` / ``-320`` suffixes for fastai's smaller releases), ``imagewoof`` (fastai's
  160 px release, its classes named by breed; ``-320`` and ``-full`` for the others) and ``cifar10``: fastai
  ``URLs``, downloaded with ``untar_data`` into ``data_dir()`` unless already extracted there (offline: the same
  tree under ``data/`` or ``KD_DATA``, e.g. ``data/imagewoof2-160``).
* ``folder``: any such tree given as ``path``.

The splits: a valid part of the training folder drawn by `split_seed` (a teacher's and its students', so no
student is judged on an image its teacher trained on: `check_no_leak`), a `fraction` of the rest drawn by `seed`,
the test folder whole. The loaders: images decoded once and held as one tensor where they fit (`kd_lib.data.resident`,
the paper's augmentation on batches, `kd_lib.data.augment`), else opened per item by fastai's DataBlock.

Random crop: ``Resize(size)`` (fastai's ``ResizeMethod.Crop``) resizes the short side to ``size`` and
crops a ``size`` square at a random place on the training set and at the centre on valid/test, which
is what fastai v1's ``rand_crop`` did in the paper; there is no scale augmentation
(``RandomResizedCrop``), as in the paper.
"""
import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from fastai.torch_core import default_device
from fastai.vision.all import (CategoryBlock, DataBlock, DataLoaders, ImageBlock, IndexSplitter, IntToFloatTensor,
                               ItemGetter, Normalize, Resize, aug_transforms, imagenet_stats)
from PIL import Image

from .augment import PAPER_AUG, PaperAugment
from .folders import (CLASS_NAMES, URLS, DatasetError, DatasetNotFoundError, DownloadError, data_dir, dataset_root,
                      digits_stats, read_tree, sample_per_class)
from .resident import TensorLoader, decode, decoded_bytes, resident_loader

__all__ = ["DATASETS", "SELECTIONS", "URLS", "CIFAR_STATS", "PAPER_AUG", "RESIDENT_BYTES", "DatasetError",
           "DatasetNotFoundError", "DownloadError", "LeakageError", "KDDataLoaders", "data_dir", "get_data",
           "split_items", "trained_on", "check_no_leak"]

DATASETS = ("digits", *URLS, "folder")
SELECTIONS = ("valid", "test")
CIFAR_STATS = ([0.491, 0.482, 0.447], [0.247, 0.243, 0.261])
_SMALL = ("digits", "cifar10")  # default size 32; every other dataset 224
RESIDENT_BYTES = 2 * 2**30  # decoded images held in CPU memory at the most (resident=None)


class LeakageError(DatasetError):
    """A student would be judged (valid or test split) on images its teacher trained on."""


class KDDataLoaders(DataLoaders):
    """fastai `DataLoaders` of (train, valid, test); `get_data` attaches `split_info`, the `items` of every split and
    `loader`, which makes a loader of any items the way the valid split's is made (in order, no augmentation)."""
    test = property(lambda self: self[2])
    items = {}  # per split (train, valid, test, unused): its (relative path, class) items
    loader = None  # (relative path, class) items -> a loader of them, as the valid split's

    def unused_dl(self):
        "A loader of the items `fraction` left out (valid transforms, in order), or None when it left none out."
        return self.loader(self.items["unused"]) if self.items.get("unused") else None


class _CenterResize(Resize):
    "`Resize` cropping the centre on every split, so an item gives the same tensor every epoch"
    def before_call(self, b, split_idx): super().before_call(b, split_idx=1)


def _portable(root: Path) -> str:
    """`root` relative to `data_dir()` when inside it (as a record names it: no machine's folders), else as given;
    a tree linked into the data folder is inside it, by its link's name."""
    for here, data in ((os.path.abspath(root), os.path.abspath(data_dir())),
                       (Path(root).resolve(), data_dir().resolve())):
        try: return Path(here).relative_to(data).as_posix()
        except ValueError: pass
    return str(root)


def _splits(train: list, test: list, selection: str, valid_pct: float, fraction: float, seed: int,
            per_class: int = None, split_seed: int = 0) -> dict:
    """train/valid/test/unused `(name, class)` lists: `per_class` images of each class of train (the same for
    every seed; all when None), a stratified valid part of them drawn by `split_seed` (shared by a teacher and
    its students, so no student is judged on images its teacher trained on), then a `fraction` of the rest
    drawn by `seed`."""
    if per_class: train = sample_per_class(train, 1.0, np.random.default_rng(0), n=per_class)[0]
    valid, train = sample_per_class(train, valid_pct, np.random.default_rng(split_seed)) if selection == "valid" \
        else (test, train)
    train, unused = sample_per_class(train, fraction, np.random.default_rng(seed))
    return dict(train=train, valid=valid, test=test, unused=unused)


def _hash(items: list) -> str:
    "Short content hash of `(relative path, class)` items."
    return hashlib.sha256("".join(f"{p}\t{c}\n" for p, c in sorted(items)).encode()).hexdigest()[:12]


def _batch_tfms(augment: bool, stats: tuple, own: bool = False) -> list:
    """The batch transforms: bytes to floats, the paper's augmentation (if `augment`: fastai's transforms, or with
    `own` `kd_lib.data.augment.PaperAugment`, the same in a few batched operations), normalisation by `stats`."""
    aug = ([PaperAugment(**PAPER_AUG)] if own else aug_transforms(**PAPER_AUG)) if augment else []
    return [IntToFloatTensor(), *aug, Normalize.from_stats(*stats)]


def _per_item(root: Path, splits: dict, vocab: list, size: int, bs: int, augment: bool, stats: tuple,
              num_workers: int) -> KDDataLoaders:
    "fastai loaders of `splits`, an image opened per item: Resize item transform, then the batch transforms."
    train, valid = splits["train"], splits["valid"]
    items = [(root / p, c) for p, c in train + valid]
    block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=vocab)), get_x=ItemGetter(0), get_y=ItemGetter(1),
                      splitter=IndexSplitter(range(len(train), len(items))),
                      item_tfms=Resize(size) if augment else _CenterResize(size),
                      batch_tfms=_batch_tfms(augment, stats)[1:])  # ImageBlock brings IntToFloatTensor itself
    dls = block.dataloaders(items, path=root, bs=bs, num_workers=num_workers)
    def loader(its): return dls.test_dl([(root / p, c) for p, c in its], with_labels=True)
    out = KDDataLoaders(dls.train, dls.valid, loader(splits["test"]), path=root)
    out.loader = loader
    return out


def _resident(root: Path, splits: dict, vocab: list, size: int, bs: int, augment: bool, stats: tuple,
              device) -> KDDataLoaders:
    """Loaders of `splits` over their images decoded once (`kd_lib.data.resident`), on `device`: the batches of the
    per-item path (bit for bit without augmentation), the batch transforms run on the device."""
    device = device or default_device()  # where fastai's DataBlock puts its batches
    decoded = decode(root, [o for v in splits.values() for o in v], _CenterResize(size), data_dir() / "decoded")
    def loader(its, train=False):
        return resident_loader(decoded, its, vocab, _batch_tfms(augment and train, stats, own=True),
                               split_idx=0 if train else 1,
                               device=device, bs=bs, shuffle=train, drop_last=train)
    dls = KDDataLoaders(loader(splits["train"], train=True), loader(splits["valid"]), loader(splits["test"]),
                        path=root, device=device)
    dls.loader = loader
    return dls


def _fits(root: Path, splits: dict, size: int, augment: bool, device) -> str:
    """Why the images of `splits` cannot be held decoded (`resident`), or '' when they can: the training images must
    be square where the paper's random crop would move (with `augment`), and all of them fit the memory bound."""
    n = sum(map(len, splits.values()))
    bound = RESIDENT_BYTES if torch.device(device or "cpu").type != "cuda" else \
        torch.cuda.mem_get_info(torch.device(device))[0] // 4
    if decoded_bytes(n, size) > bound:
        return f"{n} images of {size} px take {decoded_bytes(n, size) / 2**30:.1f} GiB, more than {bound / 2**30:.1f}"
    if augment:
        for rel, _ in splits["train"]:
            with Image.open(root / rel) as im:
                if im.size[0] != im.size[1]:
                    return (f"{rel} is not square ({im.size[0]}x{im.size[1]}): the paper's random crop of it moves "
                            "every epoch")
    return ""


def _dataloaders(root: Path, splits: dict, vocab: list, size: int, bs: int, augment: bool, stats: tuple,
                 num_workers: int, resident, device) -> KDDataLoaders:
    "The loaders of `splits`: resident where it fits and `resident` is not False (True: an error where it cannot)."
    why = "" if resident is False else _fits(root, splits, size, augment, device)
    if resident is True and why:
        raise DatasetError(f"resident=True cannot hold this data decoded: {why}. Pass resident=None (where it fits) or "
                           "False (an image opened per item).")
    if resident is not False and not why and num_workers == 0:
        return _resident(root, splits, vocab, size, bs, augment, stats, device)
    return _per_item(root, splits, vocab, size, bs, augment, stats, num_workers)


def _check_args(name, fraction, selection, valid_pct, per_class=None):
    "Reject an unknown `name` or `selection`, and a `fraction` or `valid_pct` out of range."
    if name not in DATASETS: raise DatasetError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if selection not in SELECTIONS:
        raise DatasetError(f"Unknown selection {selection!r}: 'valid' (a valid part of train picks the best "
                           f"epoch) or 'test' (the paper's protocol: the test set does).")
    if not 0 < fraction <= 1: raise DatasetError(f"fraction={fraction} must be in (0, 1].")
    if per_class is not None and per_class < 1:
        raise DatasetError(f"per_class={per_class} must be at least 1 (or None).")
    if selection == "valid" and not 0 < valid_pct < 1: raise DatasetError(f"valid_pct={valid_pct} must be in (0, 1).")


def get_data(name: str = "digits", path=None, size: int = None, bs: int = 64, fraction: float = 1.0, seed: int = 0,
             selection: str = "valid", augment: bool = True, valid_pct: float = 0.2, skip_bad: bool = False,
             num_workers: int = 0, per_class: int = None, split_seed: int = 0, resident: bool = None,
             device=None) -> KDDataLoaders:
    """`KDDataLoaders` (train, valid, test) of dataset `name` (one of `DATASETS`), with `dls.split_info`.

    `path`: dataset root used as is (nothing downloaded; required for "folder"). `size`: image side
    (32 for digits/cifar10, else 224). `selection="valid"`: per class a seeded floor(valid_pct*n + 0.5) of the
    training folder, drawn by `split_seed`, is the valid set; `"test"`: the test set is (the paper's protocol)
    and all of the training folder is train. `fraction`: per class, a random floor(fraction*n + 0.5) of the
    train part drawn by `seed` is used, the rest unused; with one seed, smaller fractions are subsets of larger
    ones. A teacher and its students share `split_seed`, so the student's valid split is the teacher's.
    `per_class`: only that many images of each class of the training folder take part (drawn with a fixed
    seed, the same for every run), for a smaller version of a large dataset; the test set stays whole.
    `augment=False`: Resize (centre crop) and Normalize only. `skip_bad`: leave out unreadable images.
    `resident`: the images decoded once into one uint8 tensor on `device` (default: fastai's, the GPU where there is
    one) and the batch transforms run there (`kd_lib.data.resident`); None: where it fits (`_fits`: square training
    images or no augmentation, under `RESIDENT_BYTES` on the CPU, a quarter of a GPU's free memory), True: always
    (an error where it cannot), False: an image opened, resized and converted per item per epoch (fastai's
    DataBlock). `dls.split_info["resident"]` says which path it took.

    `dls.split_info` (JSON-able): the arguments (`valid_pct` None when unused), `path` (relative to `data_dir()`
    when inside it, so a record names no machine's folders), `test_folder`,
    `vocab`, and per split (train/valid/test/unused) `sizes`, per-class `counts` and `hashes` (12 hex
    of sha256 over the sorted relative paths and classes); `stats` (Normalize mean/std), `skipped_bad`, and
    `copies_left_out`: the training images left out as byte-identical copies of a test or another training image.
    """
    _check_args(name, fraction, selection, valid_pct, per_class)
    root = dataset_root(name, path)
    vocab, train, test, test_name, n_bad, copied = read_tree(root, skip_bad, CLASS_NAMES.get(name))
    splits = _splits(train, test, selection, valid_pct, fraction, seed, per_class, split_seed)
    counts = {k: Counter(c for _, c in v) for k, v in splits.items()}
    if empty := [c for c in vocab if not counts["train"][c]]:
        raise DatasetError(f"No training images left for class(es) {empty} with fraction={fraction} "
                           f"(selection={selection!r}, valid_pct={valid_pct}): raise fraction or lower valid_pct.")
    if len(splits["train"]) < bs:
        raise DatasetError(f"Only {len(splits['train'])} training images, fewer than bs={bs}: the training loader "
                           f"drops its last partial batch and would be empty; lower bs.")
    size = size or (32 if name in _SMALL else 224)
    stats = digits_stats() if name == "digits" else CIFAR_STATS if name == "cifar10" else imagenet_stats
    dls = _dataloaders(root, splits, vocab, size, bs, augment, stats, num_workers, resident, device)
    dls.items = splits
    dls.split_info = dict(
        name=name, path=_portable(root), size=size, bs=bs, fraction=fraction, seed=seed, split_seed=split_seed,
        selection=selection, per_class=per_class,
        valid_pct=valid_pct if selection == "valid" else None, augment=augment, test_folder=test_name,
        vocab=vocab, sizes={k: len(v) for k, v in splits.items()},
        counts={k: {c: counts[k][c] for c in vocab} for k in splits},
        hashes={k: _hash(v) for k, v in splits.items()},
        stats=dict(mean=list(stats[0]), std=list(stats[1])), skipped_bad=n_bad, copies_left_out=copied,
        resident=isinstance(dls.train, TensorLoader))
    return dls


def split_items(info: dict, root, split: str = "train") -> list:
    """The `(relative path, class)` items of a run's `split` (train/valid/test/unused), in its loader's order, drawn
    again from its record's `split_info` (`info`) in the tree at `root` and checked against the record's hash of that
    split (a `DatasetError` when they differ: other data, or a record of other code)."""
    _, train, test, _, _, _ = read_tree(Path(root), bool(info.get("skipped_bad")), CLASS_NAMES.get(info.get("name")))
    seed = info["seed"]
    items = _splits(train, test, info["selection"], info.get("valid_pct") or 0.2, info["fraction"], seed,
                    info.get("per_class"), info.get("split_seed", seed))[split]  # no split_seed: `seed` drew it
    if _hash(items) != info["hashes"][split]:
        raise DatasetError(f"Cannot tell which images of {root} the run recorded with {split} hash "
                           f"{info['hashes'][split]} used: drawn again here they hash to {_hash(items)} "
                           "(other images in the folder, or a run of other code).")
    return items


def trained_on(info: dict, root) -> set:
    "The `(relative path, class)` items a run trained on (`split_items` of its train split)."
    return set(split_items(info, root, "train"))


def check_no_leak(teacher_info: dict, dls: KDDataLoaders, where: str = "the teacher") -> None:
    """Raise `LeakageError` when any valid or test image of a student's `dls` is one its teacher trained on, as the
    teacher's record's `split_info` (`teacher_info`) says; a `DatasetError` when that cannot be told."""
    mine = dls.split_info
    if teacher_info.get("name") != mine["name"]:
        raise DatasetError(f"{where} was trained on dataset {teacher_info.get('name')!r} and this run is on "
                           f"{mine['name']!r}: which of this run's images it trained on cannot be checked.")
    trained = trained_on(teacher_info, dls.path)
    leaked = {k: [o for o in dls.items[k] if o in trained] for k in ("valid", "test")}
    if any(leaked.values()):
        example = next(o[0] for v in leaked.values() for o in v)
        raise LeakageError(f"{where} trained on {len(leaked['valid'])} of this run's valid and {len(leaked['test'])} "
                           f"of its test images (e.g. {example}): a student must not be picked or judged on images "
                           f"its teacher learned. Give this run the teacher's split_seed "
                           f"({teacher_info.get('split_seed', teacher_info['seed'])}) and selection "
                           f"({teacher_info['selection']!r}), or train a teacher with this run's.")
