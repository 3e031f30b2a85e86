"""Datasets: folder trees through fastai, splits, fractions, determinism, digits, downloads, bad input."""
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from fastai.vision.all import Learner, URLs, accuracy, imagenet_stats, untar_data
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

import kd_lib.data.folders as kd_folders
from kd_lib.data.loaders import CIFAR_STATS, DATASETS, DatasetError, DatasetNotFoundError, DownloadError, data_dir, get_data, split_items

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"a": 13, "b": 7, "c": 9}  # odd class sizes
TEST = {"a": 3, "b": 4, "c": 2}
DIGITS = np.round(load_digits().images * 255 / 16).astype(np.uint8)
IMAGES = np.concatenate([DIGITS, DIGITS[:, :, :4]], axis=2)  # 8x12: not square, so a random crop shows


def make_tree(root: Path, train=TRAIN, test=TEST, test_name="val") -> Path:
    "An ImageNet-style tree of 8x12 PNGs: `root/train/<class>/*.png`, `root/<test_name>/<class>/*.png`."
    k = 0
    for split, counts in (("train", train), (test_name, test)):
        for c, n in counts.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(IMAGES[k]).save(root / split / c / f"{i:03d}.png")
                k += 1
    return root


def names(ds) -> set:
    "Relative `(path, class)` of the items of a fastai dataset."
    root = Path(ds.items[0][0]).parents[2]
    return {(Path(p).relative_to(root).as_posix(), c) for p, c in ds.items}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    "Every test: data dir in tmp, and any download attempt fails as offline."
    monkeypatch.setenv("KD_DATA", str(tmp_path / "kd_data"))
    def offline(url, **kwargs): raise URLError("offline (test)")
    monkeypatch.setattr(kd_folders, "untar_data", offline)


def load(path, size=16, bs=4, **kwargs):
    return get_data("folder", path=path, size=size, bs=bs, **kwargs)


def test_folder_end_to_end(tree):
    dls = load(tree)
    assert len(dls.loaders) == 3 and dls.test is dls[2] and dls.c == 3 and dls.vocab == ["a", "b", "c"]
    for dl in (dls.train, dls.valid, dls.test):
        x, y = dl.one_batch()
        assert x.shape == (4, 3, 16, 16) and y.shape == (4,) and 0 <= y.min() and y.max() < 3
    info = json.loads(json.dumps(dls.split_info))
    assert info["sizes"] == dict(train=23, valid=6, test=9, unused=0)
    assert info["counts"]["test"] == TEST and info["test_folder"] == "val"
    assert info["stats"] == dict(mean=imagenet_stats[0], std=imagenet_stats[1]) and info["size"] == 16
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3)), metrics=accuracy)
    assert len(learn.validate(ds_idx=2)) == 2


def test_normalised_with_imagenet_stats(tree):
    x, _ = load(tree, augment=False).valid.one_batch()
    mean, std = (torch.tensor(s) for s in imagenet_stats)
    black = -mean / std  # the digits' background is 0
    assert torch.allclose(x.amin(dim=(0, 2, 3)), black, atol=1e-4)


@pytest.mark.parametrize("fraction,expected", [
    (0.25, dict(a=3, b=2, c=2)),   # 3.25, 1.75, 2.25
    (0.5, dict(a=7, b=4, c=5)),    # 6.5, 3.5, 4.5: half rounds up
    (0.33, dict(a=4, b=2, c=3)),   # 4.29, 2.31, 2.97
    (1.0, TRAIN)])
def test_fraction_counts(tree, fraction, expected):
    info = load(tree, fraction=fraction, selection="test").split_info
    assert info["counts"]["train"] == expected
    assert info["sizes"]["unused"] == sum(TRAIN.values()) - sum(expected.values())


def test_fraction_after_valid_split(tree):
    info = load(tree, fraction=0.5, valid_pct=0.2).split_info
    assert info["counts"]["valid"] == dict(a=3, b=1, c=2)  # 2.6, 1.4, 1.8
    assert info["counts"]["train"] == dict(a=5, b=3, c=4)  # half of 10, 6, 7
    assert info["counts"]["test"] == TEST


def test_fractions_are_nested_and_seeded(tree):
    quarter, half = (names(load(tree, fraction=f, selection="test").train_ds) for f in (0.25, 0.5))
    assert quarter < half
    other = names(load(tree, fraction=0.5, selection="test", seed=1).train_ds)
    assert other != half and len(other) == len(half)


def test_per_class_subset_is_shared_by_every_seed(tree):
    "per_class keeps that many images of each class (all of a smaller one), the same ones whatever the seed."
    kept = []
    for seed in (0, 1):
        dls = load(tree, per_class=8, seed=seed)
        kept.append(names(dls.train_ds) | names(dls.valid_ds))
        assert dls.split_info["per_class"] == 8 and dls.split_info["counts"]["test"] == TEST
    assert kept[0] == kept[1] and sorted(Counter(c for _, c in kept[0]).values()) == [7, 8, 8]
    with pytest.raises(DatasetError, match="per_class"): load(tree, per_class=0)


def test_splits_disjoint_and_complete(tree):
    dls = load(tree, fraction=0.5)
    train, valid, test = names(dls.train_ds), names(dls.valid_ds), names(dls.test.dataset)
    every_train = {(f"train/{c}/{i:03d}.png", c) for c, n in TRAIN.items() for i in range(n)}
    every_test = {(f"val/{c}/{i:03d}.png", c) for c, n in TEST.items() for i in range(n)}
    assert not train & valid and train | valid < every_train and test == every_test
    assert len(every_train - train - valid) == dls.split_info["sizes"]["unused"] > 0


def test_selection_test_is_the_papers_protocol(tree):
    dls = load(tree, selection="test")
    assert names(dls.valid_ds) == names(dls.test.dataset)
    assert len(dls.train_ds) == sum(TRAIN.values())
    info = dls.split_info
    assert info["hashes"]["valid"] == info["hashes"]["test"] and info["valid_pct"] is None


def test_a_records_splits_are_drawn_again_in_their_loaders_order(tree, tmp_path):
    "split_items gives each split's items in its loader's order from a record's split info, or names other data."
    dls = load(tree, fraction=0.5, seed=3, selection="valid", split_seed=1)
    info = dls.split_info
    for split in ("train", "valid", "test", "unused"): assert split_items(info, tree, split) == dls.items[split]
    assert [dls.vocab[int(y)] for _, y in dls.loaders[2].dataset] == [c for _, c in dls.items["test"]]
    other = make_tree(tmp_path / "other", test={"a": 3, "b": 5, "c": 2})  # one test image more
    with pytest.raises(DatasetError, match="test hash"): split_items(info, other, "test")


def test_deterministic_across_calls_and_processes(tree):
    a, b = load(tree, fraction=0.5).split_info, load(tree, fraction=0.5).split_info
    assert a == b
    assert load(tree, fraction=0.5, seed=1).split_info["hashes"]["train"] != a["hashes"]["train"]
    code = ("import json; from kd_lib.data.loaders import get_data; print(json.dumps(get_data("
            f"'folder', path={str(tree)!r}, size=16, bs=4, fraction=0.5).split_info['hashes']))")
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == a["hashes"]
    # pinned: a change to listing or sampling would silently change every split of past runs (the fraction's sample
    # changed once, on purpose, when it came to be drawn by `seed` apart from the valid split's `split_seed`)
    assert a["hashes"] == dict(train="3eeaaa84a468", valid="d4253d37933e", test="90522ae224c5", unused="3bc7c7396cc1")


@pytest.mark.parametrize("fraction,train,unused", [(1.0, "7c2098d04585", "e3b0c44298fc"),
                                                   (0.25, "cc831a15914b", "dc93de9b30b0")])
def test_the_digits_splits_are_pinned(fraction, train, unused):
    "The default book's splits: a change to the digits tree, its listing or its sampling changes every result."
    hashes = get_data("digits", size=16, bs=32, fraction=fraction).split_info["hashes"]
    assert hashes == dict(train=train, valid="5ad30f0a9678", test="4365e05050df", unused=unused)


def first_batch(dls):
    return dls.train.new(shuffle=False, drop_last=False).one_batch()[0]


def test_augment_off_gives_the_same_tensors_every_epoch(tree):
    plain = load(tree, augment=False)
    assert torch.equal(first_batch(plain), first_batch(plain))
    augmented = load(tree)
    assert not torch.equal(first_batch(augmented), first_batch(augmented))


def test_digits_offline(tmp_path):
    dls = get_data(bs=16)
    info = dls.split_info
    assert dls.c == 10 and info["vocab"] == [str(i) for i in range(10)] and info["size"] == 32
    assert sum(info["sizes"].values()) == 1797 and info["sizes"]["test"] == 359 and info["sizes"]["unused"] == 0
    assert dls.one_batch()[0].shape == (16, 3, 32, 32)
    tree = tmp_path / "kd_data" / "digits"
    assert info["path"] == "digits" and sorted(os.listdir(tree)) == ["test", "train"]  # relative to the data root
    assert {"digits"} <= set(os.listdir(tree.parent)) <= {"checks", "decoded", "digits"}  # no temp dir left
    assert len(list(tree.glob("*/*/*.png"))) == 1797
    mean = info["stats"]["mean"]
    assert mean[0] == mean[2] and 0.2 < mean[0] < 0.4  # the digits' own statistics
    mtime = (tree / "train").stat().st_mtime_ns
    assert get_data(bs=16, selection="test").split_info["hashes"]["test"] == info["hashes"]["test"]
    assert (tree / "train").stat().st_mtime_ns == mtime  # written once


def test_digits_tree_is_written_atomically(monkeypatch, tmp_path):
    saved = []
    def save(self, f, *args, **kwargs):
        if len(saved) == 100: raise KeyboardInterrupt  # killed half way
        saved.append(f)
    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(KeyboardInterrupt): get_data()
    assert not (tmp_path / "kd_data" / "digits").exists() and os.listdir(tmp_path / "kd_data") == []


def test_data_dir_follows_kd_data(monkeypatch, tmp_path):
    assert data_dir() == tmp_path / "kd_data"
    monkeypatch.delenv("KD_DATA")
    assert data_dir() == REPO / "data"


@pytest.mark.parametrize("name,url", [("imagenette", URLs.IMAGENETTE), ("imagewoof-320", URLs.IMAGEWOOF_320),
                                      ("cifar10", URLs.CIFAR)])
def test_offline_download_names_url_and_place(name, url, tmp_path):
    with pytest.raises(DownloadError, match=url) as e: get_data(name)
    assert str(tmp_path / "kd_data" / Path(url).stem) in str(e.value) and isinstance(e.value, FileNotFoundError)


def test_download_lands_in_data_dir(monkeypatch, tmp_path):
    "A real `untar_data` run on a local file:// archive: data and archive under KD_DATA, nothing in HOME."
    make_tree(tmp_path / "src" / "mini", test_name="test")
    with tarfile.open(tmp_path / "mini.tgz", "w:gz") as t: t.add(tmp_path / "src" / "mini", arcname="mini")
    monkeypatch.setitem(kd_folders.URLS, "cifar10", (tmp_path / "mini.tgz").as_uri())
    monkeypatch.setattr(kd_folders, "untar_data", untar_data)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    info = get_data("cifar10", size=16, bs=4).split_info
    assert info["path"] == "mini" and info["sizes"]["test"] == sum(TEST.values())  # under KD_DATA, named relative to it
    assert (tmp_path / "kd_data" / "archive" / "mini.tgz").exists() and not (tmp_path / "home").exists()


def test_extracted_dataset_is_used_without_download(tmp_path):
    make_tree(tmp_path / "kd_data" / "cifar10", test_name="test")
    info = get_data("cifar10", size=16, bs=4).split_info
    assert info["stats"] == dict(mean=CIFAR_STATS[0], std=CIFAR_STATS[1]) and info["test_folder"] == "test"
    info = get_data("imagenette", path=tmp_path / "kd_data" / "cifar10", bs=4).split_info  # path: used as is
    assert info["size"] == 224 and info["stats"]["mean"] == imagenet_stats[0]


def test_a_tree_linked_into_the_data_folder_is_named_by_its_link(tmp_path):
    """A record names its data relative to the data folder, also when the tree there is a link to another disk
    (a worktree's data/ linked to a checkout's once wrote the worktree's absolute path into a kept record)."""
    make_tree(tmp_path / "elsewhere" / "mini", test_name="test")
    (tmp_path / "kd_data").mkdir(exist_ok=True)
    (tmp_path / "kd_data" / "mini").symlink_to(tmp_path / "elsewhere" / "mini")
    info = get_data("folder", path=tmp_path / "kd_data" / "mini", size=16, bs=4).split_info
    assert info["path"] == "mini"
    assert get_data("folder", path=tmp_path / "elsewhere" / "mini", size=16, bs=4).split_info["path"] == \
        str(tmp_path / "elsewhere" / "mini")  # outside it: as given


def test_bad_arguments(tree):
    with pytest.raises(DatasetError, match="choose one of digits, imagenette") as e: get_data("mnist")
    assert all(n in str(e.value) for n in DATASETS)
    for fraction in (0, -0.1, 1.5):
        with pytest.raises(DatasetError, match=r"fraction.*\(0, 1\]"): load(tree, fraction=fraction)
    with pytest.raises(DatasetError, match="Unknown selection 'best'"): load(tree, selection="best")
    with pytest.raises(DatasetError, match="valid_pct"): load(tree, valid_pct=1.0)
    with pytest.raises(DatasetError, match="needs path"): get_data("folder")
    with pytest.raises(DatasetError, match="fewer than bs=64"): load(tree, bs=64)


def test_fraction_leaving_a_class_empty(tmp_path):
    root = make_tree(tmp_path / "t", train=dict(a=20, b=1), test=dict(a=2, b=2))
    with pytest.raises(DatasetError, match=r"class\(es\) \['b'\]"): load(root, fraction=0.3, selection="test")


@pytest.mark.parametrize("layout,error,match", [
    ("missing", DatasetNotFoundError, "does not exist"),
    ("no_train", DatasetNotFoundError, "No train folder"),
    ("no_test", DatasetNotFoundError, r"No test folder \(val/, valid/, test/\)"),
    ("both", DatasetError, "has val/ and test/"),
    ("no_classes", DatasetError, "no class folders"),
    ("empty_class", DatasetError, r"\['d'\] of .*train have no readable images"),
    ("only_train", DatasetError, r"only in train: \['d'\], only in val: \[\]"),
    ("only_test", DatasetError, r"only in train: \[\], only in val: \['d'\]"),
])
def test_bad_trees(tmp_path, layout, error, match):
    root = tmp_path / "t"
    if layout != "missing": make_tree(root)
    if layout == "no_train": (root / "train").rename(root / "training")
    if layout == "no_test": (root / "val").rename(root / "validation")
    if layout == "both": (root / "test").mkdir()
    if layout == "no_classes":
        for d in (root / "train").iterdir(): d.rename(tmp_path / d.name)
    if layout == "empty_class": (root / "train" / "d").mkdir()
    if layout == "only_train": make_tree(root, train=dict(d=2), test={})
    if layout == "only_test": make_tree(root, train={}, test=dict(d=2))
    with pytest.raises(error, match=match): load(root)


def test_corrupt_images_named_or_skipped(tmp_path):
    root = make_tree(tmp_path / "t")
    (root / "train/a/000.png").write_bytes(b"not an image")
    (root / "val/b/001.png").write_bytes((root / "val/b/000.png").read_bytes()[:40])  # truncated
    (root / "train/c/empty.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"^3 unreadable.*train/a/000.png.*skip_bad=True") as e: load(root)
    assert "val/b/001.png" in str(e.value) and "train/c/empty.jpg" in str(e.value)
    info = load(root, skip_bad=True).split_info
    assert info["skipped_bad"] == 3 and info["counts"]["test"]["b"] == TEST["b"] - 1
    assert info["sizes"]["train"] + info["sizes"]["valid"] == sum(TRAIN.values()) - 1


WOOF = dict(zip(sorted(kd_folders.BREEDS), (3, 4, 3, 3, 4, 3, 3, 4, 3, 3)))  # Imagewoof's ten WordNet ids


def test_imagewoof_offline_is_the_160px_tree_under_the_data_folder_with_breed_names(tmp_path):
    "Offline, the tree untar_data(URLs.IMAGEWOOF_160) extracts, found under KD_DATA without configuration."
    make_tree(tmp_path / "kd_data" / "imagewoof2-160", train=WOOF, test={c: 1 for c in WOOF})
    info = get_data("imagewoof", size=16, bs=4).split_info
    assert info["path"] == "imagewoof2-160" and info["test_folder"] == "val"
    assert info["vocab"] == sorted(kd_folders.BREEDS.values()) and "Rhodesian ridgeback" in info["counts"]["train"]
    assert info["stats"]["mean"] == imagenet_stats[0] and info["size"] == 16


def test_imagewoof_online_downloads_the_160px_release(monkeypatch, tmp_path):
    "With a network (a file:// archive standing in), untar_data of the 160 px release lands under KD_DATA."
    assert kd_folders.URLS["imagewoof"] == URLs.IMAGEWOOF_160
    make_tree(tmp_path / "src" / "imagewoof2-160", train=WOOF, test={c: 1 for c in WOOF})
    with tarfile.open(tmp_path / "imagewoof2-160.tgz", "w:gz") as t:
        t.add(tmp_path / "src" / "imagewoof2-160", arcname="imagewoof2-160")
    monkeypatch.setitem(kd_folders.URLS, "imagewoof", (tmp_path / "imagewoof2-160.tgz").as_uri())
    monkeypatch.setattr(kd_folders, "untar_data", untar_data)
    info = get_data("imagewoof", size=16, bs=4).split_info
    assert info["path"] == "imagewoof2-160" and info["vocab"][0] == "Australian terrier"
    assert (tmp_path / "kd_data" / "archive" / "imagewoof2-160.tgz").exists()


def test_a_planted_copy_is_named_left_out_of_training_and_counted(tmp_path):
    "A test image copied into train, and a training image copied within train: both copies left out, by name."
    root = make_tree(tmp_path / "copied")
    (root / "train" / "a" / "zz-test-copy.png").write_bytes((root / "val" / "b" / "000.png").read_bytes())
    (root / "train" / "c" / "zz-train-copy.png").write_bytes((root / "train" / "a" / "003.png").read_bytes())
    dls = get_data("folder", path=root, size=16, bs=4, selection="valid", augment=False)
    info = dls.split_info
    assert info["copies_left_out"] == ["train/a/zz-test-copy.png", "train/c/zz-train-copy.png"]
    assert info["sizes"]["train"] + info["sizes"]["valid"] == sum(TRAIN.values())  # the originals stay, once
    digests = lambda split: {(root / p).read_bytes() for p, _ in dls.items[split]}  # noqa: E731
    assert not digests("train") & digests("valid") and not digests("train") & digests("test")
    assert get_data("folder", path=make_tree(tmp_path / "clean"), size=16, bs=4).split_info["copies_left_out"] == []
    only = make_tree(tmp_path / "only-copies", train=dict(a=3, b=3), test=dict(a=1, b=1))
    for i in range(3): (only / "train" / "b" / f"{i:03d}.png").write_bytes((only / "train" / "a" / "000.png").read_bytes())
    with pytest.raises(DatasetError, match=r"Every training image of class\(es\) \['b'\] .* byte-identical copy"):
        get_data("folder", path=only, size=16, bs=2)


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "imagewoof2-160.tgz").exists(),
                    reason="the offline Imagewoof archive (../shared/data) is not beside this checkout")
def test_the_real_imagewoof_tree(tmp_path):
    "The offline copy of the release, extracted as data/README.md says: fastai's split, its two cross-split copies."
    with tarfile.open(REPO.parent / "shared" / "data" / "imagewoof2-160.tgz") as t: t.extractall(tmp_path / "kd_data")
    info = get_data("imagewoof", size=64, bs=64, resident=False).split_info
    assert info["sizes"]["test"] == 3929 and info["sizes"]["train"] + info["sizes"]["valid"] == 9025 - 2
    assert info["copies_left_out"] == ["train/n02087394/n02087394_12539.JPEG", "train/n02093754/n02093754_5915.JPEG"]
    assert set(info["vocab"]) == set(kd_folders.BREEDS.values())


def test_a_dry_run_of_the_paper_profile_says_where_each_dataset_is(tmp_path, capsys):
    "The paper profile's Imagewoof entry finds the extracted tree as it is; the others say what they would download."
    from kd_lib.runner.cli import main
    make_tree(tmp_path / "kd_data" / "imagewoof2-160", train=WOOF, test={c: 1 for c in WOOF})
    main(["--profile", "paper", "--dry-run"])
    out = capsys.readouterr().out
    assert f"data     imagewoof: {tmp_path / 'kd_data' / 'imagewoof2-160'} (found)" in out
    assert f"data     imagenette: not in {tmp_path / 'kd_data' / 'imagenette2'}: downloaded from {URLs.IMAGENETTE}" in out
