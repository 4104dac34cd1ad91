"""The learning rate of every optimizer update of ``elsa train`` against the official schedule: timm 0.4.9's
``CosineLRScheduler`` (created by its ``create_scheduler`` with ``t_in_epochs=True``) stepped once per epoch by the
official ``train.py`` (``lr_scheduler.step(epoch + 1, metric)``; its ``step_update`` does nothing in epoch mode).
``--sched-on-updates`` opts into timm's per-update stepping."""
from __future__ import annotations

import math
from typing import List

import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook

from train_helpers import make_image_folder, run_train

LR, WARMUP_LR, MIN_LR, EPOCHS, WARMUP = 1e-3, 1e-6, 1e-5, 4, 2


def timm049_cosine_lr(t: float, base_lr: float, t_initial: float, warmup_t: float, warmup_lr_init: float,
                      lr_min: float, decay_rate: float = 0.1, cycle_limit: int = 1) -> float:
    """timm 0.4.9 ``CosineLRScheduler._get_lr`` (t_mul = 1, no warm-up prefix, no noise), as written there."""
    if t < warmup_t:
        return warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup_t
    i = math.floor(t / t_initial)
    t_i = t_initial
    t_curr = t - t_initial * i
    gamma = decay_rate ** i
    lr_min_i = lr_min * gamma
    lr_max = base_lr * gamma
    if cycle_limit == 0 or (cycle_limit > 0 and i < cycle_limit):
        return lr_min_i + 0.5 * (lr_max - lr_min_i) * (1 + math.cos(math.pi * t_curr / t_i))
    return lr_min


def _lrs_of_updates(tmp_path, extra: List[str]) -> List[float]:
    data = make_image_folder(tmp_path / "data", per_class=8, size=16)
    seen: List[float] = []

    def hook(optimizer, args, kwargs):
        seen.append(optimizer.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        rc = run_train([str(data), "--model", "elsa_swin_pico", "--img-size", "32", "-b", "4", "-j", "0",
                        "--epochs", str(EPOCHS), "--warmup-epochs", str(WARMUP), "--lr", str(LR),
                        "--warmup-lr", str(WARMUP_LR), "--min-lr", str(MIN_LR), "--sched", "cosine",
                        "--no-aug", "--no-progress", "--output", str(tmp_path / "runs"), "--experiment", "s",
                        *extra])
    finally:
        handle.remove()
    assert rc == 0
    return seen


def test_lr_changes_once_per_epoch_as_the_official_run(tmp_path):
    lrs = _lrs_of_updates(tmp_path, [])
    steps = 16 // 4  # 16 training images, batch 4
    assert len(lrs) == EPOCHS * steps
    expected = [timm049_cosine_lr(u // steps, LR, EPOCHS, WARMUP, WARMUP_LR, MIN_LR) for u in range(len(lrs))]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert lrs[steps // 2] == pytest.approx(WARMUP_LR)  # half-way through the first warm-up epoch


def test_sched_on_updates_opts_into_per_update_steps(tmp_path):
    lrs = _lrs_of_updates(tmp_path, ["--sched-on-updates"])
    steps = 16 // 4
    # timm's per-update mode: the same curve with t counted in updates (t_initial, warmup in updates)
    expected = [timm049_cosine_lr(u, LR, EPOCHS * steps, WARMUP * steps, WARMUP_LR, MIN_LR) for u in range(len(lrs))]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=0)
    assert lrs[1] > lrs[0]  # changes inside the first epoch
