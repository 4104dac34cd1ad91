"""Segmentation heads of the official ADE20K setting (spec section 4): UPerNet (PPM + FPN) and the FCN auxiliary head.

Behaviour follows mmseg's ``UPerHead`` / ``FCNHead`` as configured by the official
``seg/configs/_base_/models/upernet_elsa_swin.py``; module and parameter names are chosen so that the head tensors of an
official mmseg checkpoint (``decode_head.*``, ``auxiliary_head.*``) load without renaming.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class ConvModule(nn.Module):
    """conv (no bias, a norm follows) -> BatchNorm -> ReLU, mmcv's ConvModule with norm_cfg BN/SyncBN.

    The norm is called ``bn`` as in mmcv, which also keeps it out of the official ``'norm'`` no-decay key.
    (Converted to SyncBatchNorm by the engine when training is distributed.)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        # mmcv ConvModule.init_weights: kaiming normal, fan_out, relu gain; norm weight 1, bias 0.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in, H, W) -> (B, out, H', W')."""
        return self.activate(self.bn(self.conv(x)))


class _DecodeHead(nn.Module):
    """Shared classifier: Dropout2d then a 1x1 conv (``conv_seg``, normal std 0.01 init as mmseg)."""

    def __init__(self, channels: int, num_classes: int, dropout_ratio: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, feat: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(feat))


def _resize(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class UPerHead(_DecodeHead):
    """UPerNet decoder: a pyramid pooling module on the last map, an FPN over all maps, fused at stride 4.

    forward(feats: [(B, C_i, H_i, W_i)] for strides 4, 8, 16, 32) -> logits (B, num_classes, H_0, W_0).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout_ratio: float = 0.1,
                 align_corners: bool = False) -> None:
        super().__init__(channels, num_classes, dropout_ratio)
        self.in_channels = list(in_channels)
        self.channels = channels
        self.align_corners = align_corners
        self.pool_scales = tuple(pool_scales)
        # PPM: adaptive average pool to s x s, 1x1 ConvModule, upsample back; then a 3x3 bottleneck on the concat.
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(self.in_channels[-1], channels, 1))
            for s in self.pool_scales)
        self.bottleneck = ConvModule(self.in_channels[-1] + len(self.pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3, padding=1)

    def psp_forward(self, x: Tensor) -> Tensor:
        outs = [x] + [_resize(m(x), x.shape[2:], self.align_corners) for m in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: List[Tensor]) -> Tensor:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"feats must hold {len(self.in_channels)} maps, got {len(feats)}")
        laterals = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the upsampled coarser level
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(o, size, self.align_corners) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_DecodeHead):
    """FCN auxiliary head: ``num_convs`` 3x3 ConvModules on one backbone map, then the classifier.

    forward(feats: list of maps) -> logits (B, num_classes, H_k, W_k) from ``feats[in_index]``.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 in_index: int = 2, concat_input: bool = False, dropout_ratio: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout_ratio)
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        self.in_index = in_index
        self.concat_input = concat_input
        self.convs = nn.Sequential(*[ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(num_convs)])
        if concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, 3, padding=1)

    def forward(self, feats: List[Tensor]) -> Tensor:
        x = feats[self.in_index]
        out = self.convs(x)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)
