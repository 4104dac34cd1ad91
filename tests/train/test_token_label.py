"""Token labeling (``elsa train --token-label-dir``): label maps follow the image's crop and flip, the loss is
the official TokenLabelCrossEntropy, and a short run with a tiny ELSA-VOLO trains."""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from timm.models import register_model

from elsa.data import ImageFolderDataset
from elsa.data.folder import DatasetError
from elsa.data.token_label import TokenLabelDataset, TokenLabelTransform, crop_label_map
from elsa.models.elsa_volo import _create_elsa_volo
from elsa.train.token_label import TokenLabelLoss, check_token_label_model

from train_helpers import make_image_folder, read_jsonl, run_train


@register_model
def _test_tiny_elsa_volo(pretrained: bool = False, **kwargs):
    """A ~50k-parameter ELSA-VOLO for 32x32 inputs (2x2 tokens), so the test trains in seconds on CPU."""
    args = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(2, 2, 2, 2), stem_hidden_dim=8,
                img_size=32, elsa_kernel=3, elsa_group_width=4)
    return _create_elsa_volo("elsa_volo_d1_224", pretrained=False, **dict(args, **kwargs))


def _half_map(size: int = 4, score: float = 10.0) -> torch.Tensor:
    """(2, 1, S, S): left half class 0, right half class 1, top-1 score ``score``."""
    idx = torch.zeros(size, size)
    idx[:, size // 2:] = 1
    return torch.stack([torch.full((1, size, size), score), idx[None]])


def test_crop_label_map_hand_made_crops_and_flip():
    lm = _half_map()
    full = crop_label_map(lm, 2, (0.0, 0.0, 1.0, 1.0), 2)
    assert full.shape == (2, 2, 2)
    assert full.argmax(0).tolist() == [[0, 1], [0, 1]]
    assert torch.allclose(full.sum(0), torch.ones(2, 2))
    flipped = crop_label_map(lm, 2, (0.0, 0.0, 1.0, 1.0), 2, hflip=True)
    assert flipped.argmax(0).tolist() == [[1, 0], [1, 0]]
    right = crop_label_map(lm, 2, (0.0, 0.5, 1.0, 0.5), 3)  # the right half of the image: all class 1
    assert (right[1] > 0.99).all()
    centre = crop_label_map(lm, 2, (0.25, 0.25, 0.5, 0.5), 2, hflip=True)  # centre crop, flipped
    assert centre.argmax(0).tolist() == [[1, 0], [1, 0]]


def test_transform_keeps_image_and_label_map_aligned():
    """Image: left half black, right half white; label map: left class 0, right class 1. After random crops
    and flips, every token cell that is clearly white must be class 1, clearly black class 0."""
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, 32:] = 255
    img = Image.fromarray(arr)
    parts = create_transform(64, is_training=True, scale=(0.2, 1.0), hflip=0.5, color_jitter=0.0,
                             interpolation="bilinear", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), separate=True)
    tf = TokenLabelTransform(parts, num_classes=2, token_size=4)
    random.seed(0)
    torch.manual_seed(0)
    checked = 0
    for _ in range(30):
        x, dense = tf(img, _half_map(size=8))
        assert x.shape == (3, 64, 64) and dense.shape == (2, 4, 4)
        cells = x.mean(0).reshape(4, 16, 4, 16).mean((1, 3))
        white, black = cells > 0.95, cells < 0.05
        assert (dense[1][white] > 0.9).all() and (dense[0][black] > 0.9).all()
        checked += int(white.sum() + black.sum())
    assert checked > 200


def test_token_label_loss_matches_hand_computation():
    torch.manual_seed(0)
    b, c, t = 2, 3, 2
    logits, tokens = torch.randn(b, c), torch.randn(b, t * t, c)
    classes = torch.tensor([0, 2])
    dense = torch.rand(b, c, t, t).softmax(1)
    smoothing, weight = 0.1, 0.5
    bbox = (0, 0, 1, 1)  # one of four tokens mixed: lam = 0.75
    loss = TokenLabelLoss(c, dense_weight=weight, smoothing=smoothing)((logits, tokens, bbox), (classes, dense))

    one_hot = torch.full((b, c), smoothing / c)
    one_hot[0, 0] = one_hot[1, 2] = 1 - smoothing + smoothing / c
    cls_target = 0.75 * one_hot + 0.25 * one_hot.flip(0)
    expected_cls = sum(-(cls_target[i] * F.log_softmax(logits[i], 0)).sum() for i in range(b)) / b
    expected_dense = 0.0
    for i in range(b):
        for n in range(t * t):
            y, x = divmod(n, t)
            expected_dense += -(dense[i, :, y, x] * F.log_softmax(tokens[i, n], 0)).sum()
    expected = expected_cls + weight * expected_dense / (b * t * t)
    assert torch.allclose(loss, expected, atol=1e-6)
    no_mix = TokenLabelLoss(c, dense_weight=weight, smoothing=smoothing)((logits, tokens, (0, 0, 0, 0)),
                                                                         (classes, dense))
    assert not torch.allclose(no_mix, loss)
    with pytest.raises(ValueError, match="token-label-size"):
        TokenLabelLoss(c)((logits, tokens, bbox), (classes, torch.rand(b, c, 3, 3)))


def _write_label_maps(data: Path, label_dir: Path, num_classes: int = 2, size: int = 5) -> None:
    label_dir.mkdir()
    for path in sorted((data / "train").rglob("*.png")):
        cls = 0 if path.parent.name == "cat" else 1
        lm = torch.stack([torch.rand(num_classes, size, size) * 5,
                          torch.stack([torch.full((size, size), float(cls)),
                                       torch.full((size, size), float(1 - cls))])])
        torch.save(lm, label_dir / f"{path.stem}.pt")


def test_missing_label_map_and_model_without_token_head_are_clear_errors(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    _write_label_maps(data, tmp_path / "labels")
    (tmp_path / "labels" / "dog_001.pt").unlink()
    with pytest.raises(DatasetError, match="no label map for 1 of 4.*dog_001"):
        TokenLabelDataset(ImageFolderDataset(data / "train"), tmp_path / "labels")
    with pytest.raises(ValueError, match="token head \\(ELSA-VOLO\\), got elsa_swin_pico"):
        check_token_label_model(torch.nn.Linear(2, 2), "elsa_swin_pico")


def test_elsa_train_with_token_labels_tiny_elsa_volo(tmp_path, caplog, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4, size=40)
    _write_label_maps(data, tmp_path / "labels")
    args = [str(data), "--model", "_test_tiny_elsa_volo", "--img-size", "32", "--token-label-dir",
            str(tmp_path / "labels"), "-b", "4", "--epochs", "1", "--max-steps-per-epoch", "2", "-j", "0",
            "--lr", "1e-3", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8",
            "--no-progress", "--output", str(tmp_path / "out"), "--experiment", "tl"]
    with caplog.at_level(logging.INFO, logger="elsa.train"):
        assert run_train(args) == 0
    assert "2x2 token targets" in caplog.text and "mix-token on" in caplog.text
    assert "--mixup/--cutmix are off" in caplog.text
    rows = read_jsonl(tmp_path / "out" / "tl" / "metrics.jsonl")
    assert math.isfinite(rows[-1]["train_loss"]) and rows[-1]["train_loss"] > 0
    # a model without a token head fails before training with the model's name
    caplog.clear()
    assert run_train([str(data), "--model", "elsa_swin_pico", "--token-label-dir", str(tmp_path / "labels"),
                      "--epochs", "1", "-j", "0", "--no-progress", "--output", str(tmp_path / "out2")]) == 2
    assert "token labeling needs a model with a token head (ELSA-VOLO), got elsa_swin_pico" in capsys.readouterr().err
