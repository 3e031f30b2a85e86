"""Images decoded once: the resident loaders give the per-item path's batches (bit for bit without augmentation,
the same family of augmentations with it), with the same splits and hashes; where they cannot, the per-item path."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from kd_lib.data.loaders import DatasetError, get_data
from kd_lib.recipes.fitting import seed_everything
from kd_lib.data.resident import TensorLoader


def _batches(dl, n=None):
    return [tuple(t.clone().as_subclass(torch.Tensor) for t in b) for b in list(dl)[:n]]


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_resident_batches_are_the_per_item_batches_bit_for_bit(fraction):
    kw = dict(size=16, bs=32, fraction=fraction, augment=False)
    per_item, resident = get_data("digits", resident=False, **kw), get_data("digits", resident=True, **kw)
    assert isinstance(resident.train, TensorLoader) and not isinstance(per_item.train, TensorLoader)
    assert resident.split_info == dict(per_item.split_info, resident=True)
    for dls in (per_item, resident): seed_everything(3, dls)  # the same shuffles
    for k in range(3):  # train (shuffled, drop_last), valid, test
        a, b = _batches(per_item[k]), _batches(resident[k])
        assert len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q)), k
    if fraction < 1:
        a, b = _batches(per_item.unused_dl()), _batches(resident.unused_dl())
        assert all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_resident_augmentation_draws_the_same_family_of_transforms():
    "How far the paper's augmentation moves a batch from its plain version: alike on both paths, within 10%."
    def moved(resident):
        plain = get_data("digits", size=16, bs=64, augment=False, resident=resident)
        aug = get_data("digits", size=16, bs=64, augment=True, resident=resident)
        out = []
        for s in range(8):
            for dls in (plain, aug): seed_everything(s, dls)
            x, y = next(iter(plain.train))[0], next(iter(aug.train))[0]
            out.append(float((x - y).abs().mean()))
        return np.mean(out)
    a, b = moved(False), moved(True)
    assert a > 0.05 and b > 0.05 and abs(a - b) / a < 0.1


def _tree(root, size=(20, 12)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(8):
                pixels = rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_images_that_are_not_square_stay_per_item_under_augmentation(tmp_path):
    root = _tree(tmp_path / "t")
    assert not get_data("folder", root, size=8, bs=4, augment=True).split_info["resident"]  # a random crop moves
    plain = get_data("folder", root, size=8, bs=4, augment=False)
    assert plain.split_info["resident"]  # without augmentation every crop is the centre: decoded once
    with pytest.raises(DatasetError, match="resident=True cannot .*not square"):
        get_data("folder", root, size=8, bs=4, augment=True, resident=True)
    per_item = get_data("folder", root, size=8, bs=4, augment=False, resident=False)
    assert all(torch.equal(x, y) for p, q in zip(_batches(plain.valid), _batches(per_item.valid)) for x, y in zip(p, q))


def test_decoded_images_are_kept_for_the_next_run_and_made_again_when_a_file_changes(tmp_path, kd_data,
                                                                                     monkeypatch):
    from kd_lib.data import resident
    monkeypatch.setattr(resident, "RACY_S", 0.0)  # files just written are trusted here: their copy is kept at once
    root = _tree(tmp_path / "t", size=(12, 12))
    first = get_data("folder", root, size=8, bs=4, augment=False)
    kept = sorted((kd_data / "decoded").glob("*.pt"))
    assert kept and get_data("folder", root, size=8, bs=4, augment=False).split_info["resident"]
    assert sorted((kd_data / "decoded").glob("*.pt")) == kept  # the second run decoded nothing
    changed = root / "val" / "a" / "new.png"
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(changed)
    os.replace(changed, root / "val" / "a" / "0.png")
    again = get_data("folder", root, size=8, bs=4, augment=False)
    assert len(list((kd_data / "decoded").glob("*.pt"))) == len(kept) + 1
    assert not torch.equal(next(iter(first.test))[0], next(iter(again.test))[0])  # val/ is the test split
