"""Token-labeling training pieces for ``elsa train --token-label-dir``: the loss and the forward wrapper.

Why: VOLO's published results train with token labeling (class loss + ``dense_weight`` x a soft cross-entropy
on every output token against the cropped teacher label map) and mix-token (a box of the stem output swapped
with the flipped batch). ``ELSAVOLO.forward_train`` already un-swaps the token logits, so each token keeps its
own image's target and only the class target is mixed, by the box's area, as in the official
``TokenLabelCrossEntropy``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ForwardTrain", "TokenLabelLoss", "check_token_label_model"]


def check_token_label_model(model: nn.Module, name: str) -> None:
    """A ``ValueError`` unless the model has ``forward_train`` and a token (aux) head, like ELSA-VOLO."""
    if not callable(getattr(model, "forward_train", None)) or getattr(model, "aux_head", None) is None:
        raise ValueError(f"token labeling needs a model with a token head (ELSA-VOLO), got {name}")


class ForwardTrain(nn.Module):
    """Calls ``module.forward_train`` as ``forward`` (so DDP's hooks see it); ``module`` is the real model."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor):
        return self.module.forward_train(x)


class TokenLabelLoss(nn.Module):
    """Soft cross-entropy on the class logits + ``dense_weight`` x soft cross-entropy over all tokens.

    Input: ``output`` = (class logits (B, C), token logits (B, N, C), bbox (y1, x1, y2, x2) in token units, all
    zero when nothing was mixed), ``target`` = (class indices (B,), dense targets (B, C, T, T), T * T = N). The
    class target is one-hot with ``smoothing``; with a mixed box of area A it becomes
    ``lam * t + (1 - lam) * t.flip(0)``, ``lam = 1 - A / N``.
    """

    def __init__(self, num_classes: int, dense_weight: float = 0.5, smoothing: float = 0.1,
                 cls_weight: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dense_weight = dense_weight
        self.smoothing = smoothing
        self.cls_weight = cls_weight

    @staticmethod
    def soft_ce(logits: Tensor, target: Tensor) -> Tensor:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    def forward(self, output: Tuple[Tensor, Tensor, Tuple[int, int, int, int]],
                target: Tuple[Tensor, Tensor]) -> Tensor:
        if not isinstance(output, (tuple, list)) or len(output) != 3:
            raise ValueError("token labeling expects the model's forward_train output (logits, token logits, bbox)")
        logits, tokens, bbox = output
        classes, dense = target
        b, n, c = tokens.shape
        if dense.shape[0] != b or dense.shape[1] != c or dense.shape[2] * dense.shape[3] != n:
            raise ValueError(f"dense targets {tuple(dense.shape)} do not match the {n} token logits of {c} classes "
                             f"(set --token-label-size to the model's token grid, {int(n ** 0.5)} here)")
        off = self.smoothing / self.num_classes
        cls_target = torch.full((b, self.num_classes), off, device=logits.device)
        cls_target.scatter_(1, classes.view(-1, 1), 1.0 - self.smoothing + off)
        y1, x1, y2, x2 = (int(v) for v in bbox)
        lam = 1.0 - (y2 - y1) * (x2 - x1) / n
        if lam < 1.0:
            cls_target = lam * cls_target + (1.0 - lam) * cls_target.flip(0)
        dense_target = dense.flatten(2).transpose(1, 2).reshape(b * n, c)
        loss_cls = self.soft_ce(logits, cls_target)
        loss_dense = self.soft_ce(tokens.reshape(b * n, c), dense_target)
        return self.cls_weight * loss_cls + self.dense_weight * loss_dense
