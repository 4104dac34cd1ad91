"""ADE20K layout, the training pipeline, and skipping of bad files."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from elsa.dense.segmentation.data import (ADE20KDataset, TrainTransform, collate_skip, hsv_cv_to_rgb,
                                          photometric_distortion, random_crop_box, resolve_ade_root, rgb_to_hsv_cv)
from elsa.data import SkipUnreadable
from elsa.dense.segmentation.engine import evaluate
from elsa.dense.segmentation.recipes import get_recipe
from synthetic_ade import make_synthetic_ade


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    make_synthetic_ade(root, num_train=6, num_val=3, size=(40, 56), seed=1)
    return root


def test_layout_and_root_resolution(ade, tmp_path):
    ade_dir = resolve_ade_root(ade)
    assert ade_dir.name == "ADEChallengeData2016"
    assert resolve_ade_root(ade_dir) == ade_dir           # ROOT may be the ADEChallengeData2016 folder itself
    with pytest.raises(FileNotFoundError, match="--data"):
        resolve_ade_root(tmp_path)
    ds = ADE20KDataset(ade, "validation")
    assert len(ds) == 3 and not ds.skipped
    item = ds[0]
    raw = np.asarray(Image.open(ds.pairs[0][1]))
    assert item["img"].shape[1:] == raw.shape and item["img"].dtype == torch.float32
    lab = item["label"].numpy()
    assert (lab[raw == 0] == 255).all() and (lab[raw > 0] == raw[raw > 0] - 1).all()   # reduce_zero_label
    assert (raw == 0).any()  # the generator does use the ignored "other" label


def test_train_transform_crop_flip_pad():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (30, 40)).astype(np.uint8)
    # img_scale (40, 30) x ratio 1 keeps the size; crop 32x48 is larger in width -> padded with 0 / 255
    t = TrainTransform(img_scale=(40, 30), ratio_range=(1.0, 1.0), crop_size=(32, 48), cat_max_ratio=1.0,
                       flip_prob=0.0, photometric=False, seed=0)
    x, y = t(img, label)
    assert x.shape == (3, 32, 48) and y.shape == (32, 48) and y.dtype == torch.long
    assert (y[30:] == 255).all() and (y[:, 40:] == 255).all() and (x[:, 30:] == 0).all()
    assert (y[:30, :40].numpy() == label).all()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    torch.testing.assert_close(x[:, :30, :40], (torch.from_numpy(img).permute(2, 0, 1).float() - mean) / std)
    tf = TrainTransform(img_scale=(40, 30), ratio_range=(1.0, 1.0), crop_size=(30, 40), cat_max_ratio=1.0,
                        flip_prob=1.0, photometric=False, seed=0)
    _, yf = tf(img, label)
    assert (yf.numpy() == label[:, ::-1]).all()
    # random scale: ratio 2 doubles the image before a 16x16 crop
    x2, y2 = TrainTransform(img_scale=(40, 30), ratio_range=(2.0, 2.0), crop_size=(16, 16), seed=0)(img, label)
    assert x2.shape == (3, 16, 16) and set(y2.unique().tolist()) <= {0, 1, 2, 3}


def test_cat_max_ratio_prefers_mixed_crops():
    label = np.zeros((100, 100), np.uint8)
    label[:, 80:] = 1  # class 0 covers 80%: only ~11% of 20x20 crops have no class above 75%

    def balanced_share(ratio):
        rng = random.Random(0)
        ok = 0
        for _ in range(200):
            y1, y2, x1, x2 = random_crop_box(label, (20, 20), ratio, rng)
            _, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
            ok += len(counts) > 1 and counts.max() / counts.sum() < 0.75
        return ok / 200

    # up to 10 redraws: 1 - 0.89**11 ~ 72% of crops balanced, against ~11% without the constraint
    assert balanced_share(1.0) < 0.25 and balanced_share(0.75) > 0.5


def test_photometric_distortion_hsv():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    back = hsv_cv_to_rgb(rgb_to_hsv_cv(img))
    assert np.abs(back.astype(int) - img.astype(int)).max() <= 5  # 8-bit HSV: hue steps of 2 degrees
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 200
    assert (rgb_to_hsv_cv(red)[..., 0] == 0).all() and (rgb_to_hsv_cv(red)[..., 1] == 255).all()
    grey = np.full((8, 8, 3), 120, np.uint8)
    outs = [photometric_distortion(grey, random.Random(s)) for s in range(20)]
    assert all(o.dtype == np.uint8 and o.shape == grey.shape for o in outs)
    assert all((o.max(-1).astype(int) - o.min(-1)).max() <= 1 for o in outs)  # grey stays grey (hue/saturation)
    assert len({int(o[0, 0, 0]) for o in outs}) > 3                          # brightness/contrast vary


def test_bad_files_are_skipped_and_counted(tmp_path):
    ade = make_synthetic_ade(tmp_path, num_train=4, num_val=0, size=(32, 40), seed=2)
    imgs = ade / "images" / "training"
    anns = ade / "annotations" / "training"
    (anns / "ADE_train_00000001.png").unlink()                         # image without annotation
    (imgs / "ADE_train_00000002.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # unreadable image
    ds = ADE20KDataset(tmp_path, "training",
                       TrainTransform(img_scale=(64, 32), crop_size=(24, 24), seed=0))
    assert len(ds) == 3 and len(ds.skipped) == 1 and "no annotation" in ds.skipped[0].reason
    with pytest.raises(OSError):
        ds[1]                                                          # the data set itself does not hide it
    loader = torch.utils.data.DataLoader(SkipUnreadable(ds), batch_size=3, collate_fn=collate_skip)
    batch = next(iter(loader))                                         # replaced by the next sample, and counted
    assert batch["skipped"] == 1 and batch["img"].shape == (3, 3, 24, 24) and batch["path"][1] == batch["path"][2]
    with pytest.raises(FileNotFoundError, match="validation"):
        ADE20KDataset(tmp_path, "validation")   # empty split: clear error
    # evaluation skips and counts both kinds too
    val = ADE20KDataset(tmp_path, "training")
    recipe = get_recipe("upernet_elsa_swin_tiny_160k").replace(num_classes=3, img_scale=(40, 32))
    net = torch.nn.Conv2d(3, 3, 1)
    net.encode_decode = net.forward
    result = evaluate(net, val, recipe, mode="whole")
    assert result["skipped"] == 2 and result["num_images"] == 2 and len(result["IoU"]) == 3
    with pytest.raises(ValueError, match="split"):
        ADE20KDataset(tmp_path, "test")
