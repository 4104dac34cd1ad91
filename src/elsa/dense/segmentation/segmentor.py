"""Encoder-decoder segmentor (backbone -> UPerNet, FCN auxiliary head) with mmseg's losses and inference modes."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..backbone import ELSASwinBackbone
from .heads import FCNHead, UPerHead

if TYPE_CHECKING:
    from .recipes import SegRecipe

IGNORE_INDEX = 255


def seg_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixel cross-entropy. logits: (B, K, h, w) upsampled bilinearly to target (B, H, W) first.

    Averaged over all pixels, ignored ones counting as zero, as the official mmseg (0.x) ``CrossEntropyLoss`` with
    ``reduction='mean'`` does (not over the valid pixels only); this fixes the loss scale the official lr was tuned for.
    """
    if logits.shape[2:] != target.shape[1:]:
        logits = F.interpolate(logits, size=target.shape[1:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    return loss.mean()


class EncoderDecoder(nn.Module):
    """Backbone + decode head (+ auxiliary head).

    forward(img: (B, 3, H, W), target: (B, H, W) long or None):
      training with a target -> dict with ``loss`` (total), ``loss_decode``, ``loss_aux``;
      otherwise -> logits (B, K, H, W) at the input size.
    """

    def __init__(self, backbone: nn.Module, decode_head: UPerHead, auxiliary_head: Optional[FCNHead] = None,
                 aux_weight: float = 0.4, align_corners: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_weight = aux_weight
        self.align_corners = align_corners
        self.num_classes = decode_head.num_classes

    def encode_decode(self, img: Tensor) -> Tensor:
        """img: (B, 3, H, W) -> logits (B, K, H, W) (decoded at stride 4, upsampled bilinearly)."""
        logits = self.decode_head(self.backbone(img))
        return F.interpolate(logits, size=img.shape[2:], mode="bilinear", align_corners=self.align_corners)

    def forward(self, img: Tensor, target: Optional[Tensor] = None):
        if target is None:
            return self.encode_decode(img)
        feats = self.backbone(img)
        losses = {"loss_decode": seg_cross_entropy(self.decode_head(feats), target)}
        if self.auxiliary_head is not None:
            losses["loss_aux"] = self.aux_weight * seg_cross_entropy(self.auxiliary_head(feats), target)
        losses["loss"] = sum(losses.values())
        return losses


# ----------------------------------------------------------------------------------------------------------- inference
def _logits_fn(model: nn.Module):
    return model.encode_decode if hasattr(model, "encode_decode") else model


@torch.no_grad()
def whole_inference(model: nn.Module, img: Tensor) -> Tensor:
    """img: (B, 3, H, W) -> logits (B, K, H, W) from one pass over the whole image."""
    return _logits_fn(model)(img)


@torch.no_grad()
def slide_inference(model: nn.Module, img: Tensor, crop_size: Tuple[int, int] = (512, 512),
                    stride: Tuple[int, int] = (341, 341)) -> Tensor:
    """img: (B, 3, H, W) -> logits (B, K, H, W) averaged over overlapping crops, as mmseg's slide mode.

    Windows start every ``stride`` pixels; the last one is shifted back to end at the border; a crop larger than the
    image is clipped to the image (decoded unpadded), so crop >= image size means exactly one whole-image pass.
    """
    fn = _logits_fn(model)
    (h_crop, w_crop), (h_stride, w_stride) = crop_size, stride
    if min(h_crop, w_crop, h_stride, w_stride) < 1:
        raise ValueError(f"crop_size and stride must be positive, got {crop_size} and {stride}")
    b, _, h, w = img.shape
    h_grids = max(h - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w - w_crop + w_stride - 1, 0) // w_stride + 1
    preds: Optional[Tensor] = None
    count = img.new_zeros((1, 1, h, w))
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2, x2 = min(hi * h_stride + h_crop, h), min(wi * w_stride + w_crop, w)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            out = fn(img[:, :, y1:y2, x1:x2])
            if preds is None:
                preds = out.new_zeros((b, out.shape[1], h, w))
            preds[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    assert preds is not None and bool((count > 0).all())
    return preds / count


def rescale_size(size_hw: Tuple[int, int], scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv.imrescale's output (h, w): scale so the long side fits max(scale) and the short side min(scale)."""
    h, w = size_hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)  # >= 1: a 4000x3 image keeps a row


@torch.no_grad()
def predict_probs(model: nn.Module, img: Tensor, img_scale: Tuple[int, int] = (2048, 512), mode: str = "whole",
                  ratios: Sequence[float] = (1.0,), flip: bool = False, crop_size: Tuple[int, int] = (512, 512),
                  stride: Tuple[int, int] = (341, 341)) -> Tensor:
    """Class probabilities at the original size for one normalised image, as mmseg's test pipeline.

    img: (1, 3, H, W) normalised, at the original size. For each ratio r the image is resized (bilinear, keep ratio)
    to fit ``img_scale * r``, decoded (``mode`` 'whole' or 'slide'), the logits resized back to (H, W), softmaxed; with
    ``flip`` the horizontally flipped image is decoded too; probabilities are averaged. Returns (1, K, H, W).
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if img.dim() != 4 or img.shape[0] != 1:
        raise ValueError(f"img must be (1, 3, H, W), got {tuple(img.shape)}")
    h, w = img.shape[2:]
    total: Optional[Tensor] = None
    n = 0
    for r in ratios:
        scale = (int(img_scale[0] * r), int(img_scale[1] * r))
        size = rescale_size((h, w), scale)
        x = img if size == (h, w) else F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(3) if flipped else x
            logits = slide_inference(model, xi, crop_size, stride) if mode == "slide" else whole_inference(model, xi)
            if logits.shape[2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs = logits.float().softmax(dim=1)
            if flipped:
                probs = probs.flip(3)
            total = probs if total is None else total + probs
            n += 1
    assert total is not None
    return total / n


def inference_settings(mode: str, recipe_ms_ratios: Sequence[float]) -> Dict[str, object]:
    """predict_probs keyword arguments for a CLI mode: whole, slide, or ms-flip (whole passes, as the official
    test_cfg, at each ratio, with flip)."""
    if mode == "whole":
        return dict(mode="whole", ratios=(1.0,), flip=False)
    if mode == "slide":
        return dict(mode="slide", ratios=(1.0,), flip=False)
    if mode == "ms-flip":
        return dict(mode="whole", ratios=tuple(recipe_ms_ratios), flip=True)
    raise ValueError(f"mode must be one of whole, slide, ms-flip; got {mode!r}")


def head_state_names(model: EncoderDecoder) -> List[str]:
    """Names of the head tensors (for checking against official checkpoints)."""
    return [k for k in model.state_dict() if not k.startswith("backbone.")]


# ------------------------------------------------------------------------------------------------------ model factory
def build_backbone(recipe: SegRecipe) -> ELSASwinBackbone:
    """The ELSA-Swin backbone: a registered architecture, or (``backbone == "custom"``) kwargs only (tests)."""
    kwargs = dict(recipe.backbone_kwargs)
    kwargs.setdefault("out_indices", (0, 1, 2, 3))
    if recipe.backbone == "custom":
        return ELSASwinBackbone(**kwargs)
    return ELSASwinBackbone.from_name(recipe.backbone, **kwargs)


def build_segmentor(recipe: SegRecipe) -> EncoderDecoder:
    """Backbone + UPerHead (+ FCN auxiliary head on stage ``aux_in_index``), BatchNorm in the heads."""
    backbone = build_backbone(recipe)
    chans = list(backbone.out_channels)
    decode = UPerHead(chans, recipe.num_classes, channels=recipe.channels, pool_scales=recipe.pool_scales,
                      dropout_ratio=recipe.dropout_ratio)
    aux = None
    if recipe.aux_weight > 0:
        aux = FCNHead(chans[recipe.aux_in_index], recipe.num_classes, channels=recipe.aux_channels, num_convs=1,
                      in_index=recipe.aux_in_index, concat_input=False, dropout_ratio=recipe.dropout_ratio)
    return EncoderDecoder(backbone, decode, aux, aux_weight=recipe.aux_weight)
