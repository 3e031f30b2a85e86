"""Image folders: the datasets' trees on disk, and what is checked of them.

Every dataset is a tree ``<root>/train/<class>/*`` plus one test folder, ``<root>/val/<class>/*``,
``<root>/valid/<class>/*`` or ``<root>/test/<class>/*`` (`TEST_FOLDERS`: the test set). The digits are written
once as such a tree under ``data_dir()/"digits"`` from scikit-learn's bundled images; the paper's datasets are
downloaded with fastai's `untar_data` into `data_dir()` unless already extracted there (`URLS`); a folder of one's
own is used as it is. `read_tree` lists a tree, checks its layout and classes, finds the images PIL cannot decode
and the training images that are byte-identical copies of a test image or of another training image (the answers
kept for the next run). `kd_lib.data.loaders` makes the splits and loaders of what it lists.
"""
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from urllib.error import URLError

import numpy as np
from fastai.vision.all import URLs, image_extensions, untar_data
from PIL import Image
from sklearn.datasets import load_digits

from ..infra.files import DiskFull, disk_full_said
from .resident import file_key

__all__ = ["URLS", "BREEDS", "CLASS_NAMES", "TEST_FOLDERS", "DatasetError", "DatasetNotFoundError", "DownloadError", "data_dir",
           "sample_per_class", "digits_images", "digits_stats", "digits_tree", "where_data_is", "dataset_root",
           "copies", "read_tree"]

URLS = {
    "imagenette": URLs.IMAGENETTE, "imagenette-160": URLs.IMAGENETTE_160, "imagenette-320": URLs.IMAGENETTE_320,
    "imagewoof": URLs.IMAGEWOOF_160, "imagewoof-320": URLs.IMAGEWOOF_320, "imagewoof-full": URLs.IMAGEWOOF,
    "cifar10": URLs.CIFAR,
}  # imagewoof: the 160 px release (shortest side 160), the one the paper's 224 px crops and ours come from
BREEDS = {  # Imagewoof's class folders are WordNet ids: every table and figure names the breed
    "n02086240": "Shih-Tzu", "n02087394": "Rhodesian ridgeback", "n02088364": "beagle",
    "n02089973": "English foxhound", "n02093754": "Border terrier", "n02096294": "Australian terrier",
    "n02099601": "golden retriever", "n02105641": "Old English sheepdog", "n02111889": "Samoyed",
    "n02115641": "dingo"}
CLASS_NAMES = {"imagewoof": BREEDS, "imagewoof-320": BREEDS, "imagewoof-full": BREEDS}  # dataset -> folder -> name

class DatasetError(ValueError):
    """A dataset or an argument of `get_data` is unusable; the message says what to change."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder, or a required part of it, is missing."""


class DownloadError(DatasetNotFoundError):
    """A dataset is not on disk and could not be downloaded (for example, offline)."""


TEST_FOLDERS = ("val", "valid", "test")  # the names a dataset's test folder may have, beside its train/
_ROOM = "Free some space there, or set KD_DATA to a folder on a disk with room (data_dir())."


def data_dir() -> Path:
    """The project's data folder: `$KD_DATA` if set; else the repository's `data/` when kd_lib runs from a checkout
    (an editable install); else, for a copy installed in site-packages, the user's cache folder
    (`$XDG_CACHE_HOME/kd_lib`, by default `~/.cache/kd_lib`)."""
    if env := os.environ.get("KD_DATA"): return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists(): return repo / "data"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "kd_lib"


def _round(x: float) -> int:
    "Round half up (the small epsilon absorbs float error such as 0.35*10 = 3.4999...)."
    return math.floor(x + 0.5 + 1e-9)


def sample_per_class(items: list, frac: float, rng: np.random.Generator, n: int = None) -> tuple[list, list]:
    """Per class, a random `_round(frac*n)` of `(name, class)` `items` (or `n` of them, all when fewer), and the
    rest; both in `items` order."""
    groups = defaultdict(list)
    for o in items: groups[o[1]].append(o)
    picked = set()
    for c in sorted(groups):
        g = groups[c]
        picked.update(g[i] for i in rng.permutation(len(g))[:_round(frac * len(g)) if n is None else n])
    return [o for o in items if o in picked], [o for o in items if o not in picked]


def digits_images() -> tuple[np.ndarray, list, list]:
    "The digits as uint8 images, and their fixed stratified 80/20 train/test `(index, class)` split."
    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)
    test, train = sample_per_class([(i, str(y)) for i, y in enumerate(d.target)], 0.2, np.random.default_rng(0))
    return images, train, test


def digits_stats() -> tuple[list, list]:
    "Mean and std (per channel, grey so all equal) of the digits' train part, in [0, 1]."
    images, train, _ = digits_images()
    px = images[[i for i, _ in train]] / 255
    return [float(px.mean())] * 3, [float(px.std())] * 3


def digits_tree(dest: Path) -> Path:
    """Write the digits once as `dest/{train,test}/<class>/<index>.png`; atomic: built in a temp dir, then renamed
    (a full disk is a `DiskFull` naming `dest`)."""
    if dest.exists(): return dest
    with disk_full_said(dest, _ROOM): return _write_digits(dest)


def _write_digits(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    images, train, test = digits_images()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-digits-", dir=dest.parent))
    try:
        for split, items in (("train", train), ("test", test)):
            for i, c in items:
                f = tmp / split / c / f"{i:04d}.png"
                f.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(f)
        try: tmp.rename(dest)
        except OSError:
            if not dest.exists(): raise  # else another process finished it first
    finally: shutil.rmtree(tmp, ignore_errors=True)
    return dest


def download(url: str, root: Path) -> Path:
    "The extracted `url` under `root`, downloaded with fastai's `untar_data` unless already there."
    dest = root / Path(url).stem.removesuffix(".tar")  # where untar_data extracts it
    if dest.exists(): return dest
    try:
        with disk_full_said(dest, _ROOM): return untar_data(url, data=root, archive=root / "archive", base=str(root))
    except DiskFull: raise
    except (URLError, OSError) as e:
        raise DownloadError(f"Could not download {url} ({e}). Download and extract it by hand so that "
                            f"{dest}/train exists (or pass path=<extracted folder>).") from e


def where_data_is(name: str, path=None) -> str:
    """Where dataset `name` is read from, said without reading or downloading it: `path`, the digits (written on
    first use), the extracted tree under `data_dir()`, or the URL `untar_data` would download."""
    if path is not None: return f"{path}" + ("" if Path(path).is_dir() else " (missing)")
    if name == "digits": return f"{data_dir() / 'digits'} (scikit-learn's digits, written on first use)"
    if name not in URLS: return "a folder given as data_path"
    dest = data_dir() / Path(URLS[name]).stem.removesuffix(".tar")
    return f"{dest} (found)" if dest.is_dir() else f"not in {dest}: downloaded from {URLS[name]} on first use"


def dataset_root(name: str, path) -> Path:
    "The dataset's root folder: `path` as is, else the digits tree or the (downloaded) dataset in `data_dir()`."
    if path is not None:
        path = Path(path)
        if not path.is_dir(): raise DatasetNotFoundError(f"Dataset path {path} does not exist or is not a folder.")
        return path
    if name == "folder": raise DatasetError("name='folder' needs path=<folder with train/ and val/, valid/ or test/>.")
    if name == "digits": return digits_tree(data_dir() / "digits")
    return download(URLS[name], data_dir())


def _test_folder(root: Path) -> str:
    "Name of the test folder of `root` (one of `TEST_FOLDERS`), checking `train` is there too."
    if not (root / "train").is_dir():
        raise DatasetNotFoundError(f"No train folder in {root}: expected {root}/train/<class>/<images>.")
    found = [s for s in TEST_FOLDERS if (root / s).is_dir()]
    if not found:
        raise DatasetNotFoundError(f"No test folder ({', '.join(f + '/' for f in TEST_FOLDERS)}) in {root}: expected "
                                   f"{root}/<{'|'.join(TEST_FOLDERS)}>/<class>/<images> (the test set).")
    if len(found) > 1: raise DatasetError(f"{root} has {' and '.join(f + '/' for f in found)}: keep only the test "
                                          "set's folder.")
    return found[0]


def _images(folder: Path, skipped: list) -> list:
    """The image files under `folder` (by extension, hidden ones left out, as fastai's `get_image_files`), regular
    files only and through no symbolic link to a folder (which may loop back, listing images twice, in both splits);
    what it passes over (such links, FIFOs, broken links) goes to `skipped`."""
    images = []
    for top, dirs, files in os.walk(folder):  # into no linked folder
        skipped += [Path(top, d) for d in dirs if os.path.islink(os.path.join(top, d))]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in (Path(top, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in image_extensions):
            (images if f.is_file() else skipped).append(f)
    return images


def _listing(root: Path, split: str) -> tuple[list, list]:
    """Class folders of `root/split` and its sorted `(relative path, class)` images (`_images`), with a warning
    naming what was passed over: a linked class folder, a linked folder inside one, an entry that is no file."""
    folder = root / split
    dirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    skipped = [d for d in dirs if d.is_symlink()]
    classes = sorted(d.name for d in dirs if not d.is_symlink())
    if not classes: raise DatasetError(f"{folder} has no class folders: expected {folder}/<class>/<images>.")
    items = [(f.relative_to(root).as_posix(), c) for c in classes for f in _images(folder / c, skipped)]
    if skipped:
        warnings.warn(f"{folder}: {len(skipped)} entries passed over, symbolic links to folders (not followed) or no "
                      f"regular files, e.g. {', '.join(p.relative_to(root).as_posix() for p in sorted(skipped)[:5])}: "
                      "copy their images in to use them.")
    return classes, sorted(items)


def _kept_answer(root: Path, items: list, kind: str, compute) -> list:
    """`compute()`, a JSON-able list about the files of `items`, kept in ``data_dir()/"checks"`` for the next run,
    keyed by `kind` and the files' paths, sizes, times and inodes (`kd_lib.data.resident.file_key`: a file replaced by
    another of the same size and modification time is checked again; nothing is kept while a file changed too
    recently to tell)."""
    key, trusted = file_key(root, items, kind)
    memo = data_dir() / "checks" / f"{key}.json"
    try:
        if memo.exists(): return list(json.loads(memo.read_text()))
    except (ValueError, TypeError): pass  # a corrupt memo is only a cache: compute again
    answer = compute()
    if not trusted: return answer
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(answer))
        os.replace(tmp, memo)
    except OSError: tmp.unlink(missing_ok=True)  # only a cache (a full disk?): computed again next time
    return answer


def _unreadable(root: Path, items: list) -> list:
    """Relative paths of the `items` PIL cannot decode whole (a truncated JPEG opens and verifies, and fails
    only when its pixels are read); decoding every image takes a while, so the answer is kept (`_kept_answer`)."""
    def find():
        bad = []
        for rel, _ in items:
            try:
                with Image.open(root / rel) as im: im.load()
            except Exception: bad.append(rel)  # PIL raises many types (OSError, SyntaxError, ...) on corrupt files
        return bad
    return _kept_answer(root, items, "unreadable", find)


def copies(root: Path, train: list, test: list) -> list:
    """Relative paths of the training `(path, class)` items whose file is byte-identical (sha256) to a test image's
    or to an earlier training image's (sorted by path): left out of training, so that no valid or test image is a
    copy of one trained on (Imagewoof's release has three such pairs). The answer is kept (`_kept_answer`)."""
    def find():
        seen = {hashlib.sha256((root / rel).read_bytes()).digest() for rel, _ in test}
        out = []
        for rel, _ in sorted(train):
            digest = hashlib.sha256((root / rel).read_bytes()).digest()
            if digest in seen: out.append(rel)
            seen.add(digest)
        return out
    return _kept_answer(root, sorted(train) + sorted(test), f"copies of {len(test)} test", find)


def _check_classes(root: Path, listings: dict):
    "Every class folder has images, and train and test have the same classes."
    for split, (classes, items) in listings.items():
        n = Counter(c for _, c in items)
        if empty := [c for c in classes if not n[c]]:
            raise DatasetError(f"Class folder(s) {empty} of {root / split} have no readable images: "
                               f"add images or remove the folder(s).")
    (_, (cls_a, _)), (test, (cls_b, _)) = listings.items()
    if cls_a != cls_b:
        raise DatasetError(f"{root}: train and {test} have different classes; only in train: "
                           f"{sorted(set(cls_a) - set(cls_b))}, only in {test}: {sorted(set(cls_b) - set(cls_a))}.")


def read_tree(root: Path, skip_bad: bool, names: dict = None) -> tuple[list, list, list, str, int, list]:
    """Classes, train and test `(relative path, class)` items, the test folder's name, the number of unreadable images
    left out, and the training images left out as copies of a test image or of another training image (`copies`).
    `names`: class folder -> the class's name (`CLASS_NAMES`), used when it names every folder of the tree."""
    test_name = _test_folder(root)
    listings = {s: _listing(root, s) for s in ("train", test_name)}
    bad = _unreadable(root, [o for _, items in listings.values() for o in items])
    if bad and not skip_bad:
        raise DatasetError(f"{len(bad)} unreadable or corrupt image file(s) in {root}, e.g. {', '.join(bad[:5])}: "
                           f"remove or replace them, or pass skip_bad=True.")
    skip = set(bad)
    listings = {s: (classes, [o for o in items if o[0] not in skip]) for s, (classes, items) in listings.items()}
    _check_classes(root, listings)
    copied = copies(root, listings["train"][1], listings[test_name][1])
    if copied:
        listings["train"] = (listings["train"][0], [o for o in listings["train"][1] if o[0] not in set(copied)])
        left = Counter(c for _, c in listings["train"][1])
        if gone := [c for c in listings["train"][0] if not left[c]]:
            raise DatasetError(f"Every training image of class(es) {gone} of {root / 'train'} is a byte-identical copy "
                               f"of a test image or of another training image (e.g. {copied[0]}): a model would be "
                               "judged on what it trained on. Add images of their own, or remove the folder(s).")
    if names and set(listings["train"][0]) <= set(names):
        listings = {s: (sorted(names[c] for c in classes), [(rel, names[c]) for rel, c in items])
                    for s, (classes, items) in listings.items()}
    return listings["train"][0], listings["train"][1], listings[test_name][1], test_name, len(bad), copied
