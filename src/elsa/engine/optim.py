"""Optimizer and schedule pieces shared by the tasks whose recipes come from mmcv configs (detection, segmentation).

mmcv's rules, written once: ``paramwise_cfg.custom_keys={k: dict(decay_mult=0.)}`` matches keys as SUBSTRINGS of
parameter names (mmcv DefaultOptimizerConstructor), and its LrUpdaterHook's linear warm-up multiplies the regular
lr by ``1 - (1 - it / warmup_iters) * (1 - warmup_ratio)`` during the first ``warmup_iters`` iterations.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, no_decay_keys: Sequence[str]) -> List[Dict[str, Any]]:
    """Two AdamW groups: a parameter whose full name contains any of ``no_decay_keys`` gets no weight decay; all
    others (biases too, as mmcv) get ``weight_decay``. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(k in name for k in no_decay_keys) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_warmup(it: int, warmup_iters: int, warmup_ratio: float) -> float:
    """mmcv's linear warm-up multiplier of the regular lr at iteration ``it`` (1 after ``warmup_iters``)."""
    if it < warmup_iters:
        return 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return 1.0
