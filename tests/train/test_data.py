"""Data: the digits split, checked image folders (clear errors before training), unreadable images skipped."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from elsa.data import (DatasetError, DigitsDataset, ImageFolderDataset, SkipUnreadable, build_eval_transform,
                       collate_skipped, create_dataset, load_digits_split)
from train_helpers import make_image_folder, read_jsonl, run_train


def test_digits_split_is_fixed_stratified_and_disjoint():
    xt, yt = load_digits_split("train")
    xv, yv = load_digits_split("val")
    assert xt.shape == (1497, 32, 32) and xv.shape == (300, 32, 32) and xt.dtype == np.uint8
    assert np.bincount(yv).tolist() == [30] * 10
    xt2, _ = load_digits_split("train")
    np.testing.assert_array_equal(xt, xt2)
    # no val image also in train (digits has a few exact duplicates, so compare the index split itself)
    from elsa.data.digits import digits_split_indices
    assert not set(digits_split_indices("train")) & set(digits_split_indices("val"))
    ds = DigitsDataset("val")
    img, label = ds[0]
    assert img.size == (32, 32) and img.mode == "RGB" and label == yv[0]


def test_eval_transform_for_pico_and_tiny():
    import timm

    import elsa  # noqa: F401

    t = build_eval_transform(timm.create_model("elsa_swin_pico"))
    x, _ = create_dataset("digits", "val", transform=t)[0]
    assert x.shape == (3, 32, 32) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    cfg = timm.models.get_pretrained_cfg("elsa_swin_tiny").to_dict()
    t = build_eval_transform(cfg)  # 224, crop 0.9, bicubic: resize 248 then centre crop 224
    names = [type(op).__name__ for op in t.transforms]
    assert names[:2] == ["Resize", "CenterCrop"] and t.transforms[0].size == 248 and t.transforms[1].size == (224, 224)


def test_folder_dataset_and_class_check(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b", "c"), per_class=2)
    train = create_dataset(str(tmp_path), "train")
    val = create_dataset(str(tmp_path), "val", classes=train.classes)
    assert train.classes == ["a", "b", "c"] and len(train) == 6 and len(val) == 6
    (tmp_path / "val" / "c").rename(tmp_path / "val" / "z")
    with pytest.raises(DatasetError, match=r"differ from the training classes.*\['c'\].*\['z'\]"):
        create_dataset(str(tmp_path), "val", classes=train.classes)


def test_unreadable_image_is_replaced_and_counted(tmp_path, caplog):
    make_image_folder(tmp_path, per_class=3, splits=("train",))
    bad = tmp_path / "train" / "cat" / "cat_001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = ImageFolderDataset(tmp_path / "train", transform=lambda im: torch.from_numpy(np.array(im)))
    with pytest.raises(OSError):
        ds[1]
    wrapped = SkipUnreadable(ds)
    with caplog.at_level(logging.WARNING):
        batch = collate_skipped([wrapped[i] for i in range(len(ds))])
    images, targets, skipped = batch
    assert skipped == 1 and images.shape[0] == 6 and "cat_001.png" in caplog.text
    # the replacement is the next sample (cat_002)
    torch.testing.assert_close(images[1], images[2])


def test_a_data_set_with_nothing_readable_is_a_user_error_not_a_loop():
    """Every sample unreadable (e.g. RGB segmentation masks): after max_retries in a row, one DatasetError (shown
    by the CLI as one line, exit code 2) instead of an endless stream of warnings."""

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            raise ValueError(f"mask {i} is RGB, expected a label map")

    with pytest.raises(DatasetError, match=r"5 unreadable samples in a row \(first error: mask 3 is RGB"):
        SkipUnreadable(Broken(), max_retries=5)[3]


@pytest.mark.parametrize("breakage,match", [
    ("missing", "does not exist"),
    ("no_val", "no 'val' or 'validation' sub-folder"),
    ("empty_class", "contain no images"),
    ("class_mismatch", "differ from the training classes"),
])
def test_bad_data_fails_before_training(tmp_path, capsys, breakage, match):
    root = tmp_path / "data"
    make_image_folder(root, per_class=2)
    if breakage == "missing":
        root = tmp_path / "nowhere"
    elif breakage == "no_val":
        import shutil
        shutil.rmtree(root / "val")
    elif breakage == "empty_class":
        (root / "train" / "empty").mkdir()
    elif breakage == "class_mismatch":
        (root / "val" / "dog").rename(root / "val" / "horse")
    out = tmp_path / "runs"
    rc = run_train([str(root), "--output", str(out), "--experiment", "x", "--epochs", "1", "-b", "2",
                    "--img-size", "32", "--num-classes", "2", "-j", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.startswith("elsa train: error: ") and "Traceback" not in err
    assert not (out / "x").exists()  # nothing was started


def test_training_counts_skipped_images(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=8, size=16)
    (root / "train" / "dog" / "dog_003.png").write_bytes(b"not an image at all")
    (root / "val" / "cat" / "cat_000.png").write_bytes(b"")
    out = tmp_path / "runs"
    rc = run_train([str(root), "--model", "elsa_swin_pico", "--img-size", "16", "--epochs", "2", "-b", "8",
                    "-j", "0", "--warmup-epochs", "0", "--output", str(out), "--experiment", "s", "--no-progress",
                    "--hflip", "0", "--scale", "0.5", "1"])
    assert rc == 0
    rows = read_jsonl(out / "s" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["skipped_images"] for r in rows] == [2, 2]  # one train and one val image, every epoch
