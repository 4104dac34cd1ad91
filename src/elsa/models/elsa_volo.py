"""ELSA-VOLO: VOLO with its stage-1 Outlookers replaced by ELSA blocks.

Papers: "ELSA: Enhanced Local Self-Attention for Vision Transformer", Zhou et al., arXiv:2112.12786 (reports
ELSA-VOLO-D1..D5; no code or weights were released), and "VOLO: Vision Outlooker for Visual Recognition",
Yuan et al., arXiv:2106.13112.

Everything except stage 1's attention is timm's VOLO (``timm.models.volo.VOLO``): the conv stem and patch embed
(stride 8), the Downsample, the positional embedding and the Transformer stages, the class-attention blocks,
the class token head and the token-labeling auxiliary head (``forward_train`` with mix-token, ``aux_head``).
``ELSAVOLO`` subclasses ``VOLO`` and swaps ``network[0]``: an ``nn.Sequential`` of ``ELSABlock`` on the same
(B, H/8, W/8, C) maps the Outlookers took. Like the Outlookers in timm (and in the official VOLO), the stage-1
blocks get no stochastic depth.

The ELSA block settings were never published. They are derived (``ELSA_VOLO_SETTINGS``) as follows:

- the official ELSA block mirrors the Outlooker's signature, so it takes the Outlooker's arguments: heads =
  VOLO's stage-1 heads, MLP ratio of the stage (3; 4 for D5), no qkv bias; and the official defaults qk scale 1,
  lam = gamma = 1 (both ghosts);
- kernel size K and group width are the free parameters the paper's FLOPs pin down. Counted with
  ``elsa.ops.flops`` (MACs, the papers' "FLOPs"), over K in {3, ..., 13} and group width in {4, 8, 16} (and
  heads x0.5/x1/x2, see the README), one setting for all variants that lands both ELSA-VOLO-D1 @ 224 (paper
  ~8 G) and ELSA-VOLO-D5 @ 512 (paper 437 G) within 5 % with VOLO's heads is K = 11, group width 4:
  7.62 G (-4.8 %) and 458.2 G (+4.8 %), the smallest largest error. D1 alone would want a larger kernel
  (K = 13: 7.87 G) and D5 alone a smaller one (K = 5: 435.2 G); no uniform setting fits both better.
  ``benchmarks/elsa_volo_flops.py`` recomputes the table.

``load_volo_weights`` initialises everything but the ELSA attention from a timm/official VOLO checkpoint.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.volo import VOLO, rand_bbox
from torch import Tensor

from ..layers import ELSABlock
from ._checkpoint import CheckpointError, read_state_dict, unwrap_state_dict
from ._features import FeatureGetterNet

__all__ = ["ELSAVOLO", "ELSA_VOLO_SETTINGS", "MODEL_ARGS", "PAPER", "VoloLoadReport", "load_volo_weights"]

_logger = logging.getLogger(__name__)

# The derived ELSA block settings (module docstring; README "ELSA-VOLO" for the FLOP table behind them).
ELSA_VOLO_SETTINGS: Dict[str, Any] = dict(elsa_kernel=11, elsa_group_width=4, elsa_lam=1.0, elsa_gamma=1.0,
                                          elsa_qk_scale=1.0)

# VOLO's variants as timm registers them (timm.models.volo); the ELSA models share them.
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "d1": dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12)),
    "d2": dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)),
    "d3": dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)),
    "d4": dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16)),
    "d5": dict(layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16),
               mlp_ratio=4, stem_hidden_dim=128),
}

# What the ELSA paper reports for ELSA-VOLO (GFLOPs as MACs; None where the paper gives no number).
PAPER: Dict[str, Dict[str, Optional[float]]] = {
    "elsa_volo_d1_224": dict(gflops=8.0),
    "elsa_volo_d5_512": dict(gflops=437.0, top1=87.2),
}


class ELSAVOLO(VOLO):
    """timm's VOLO with ELSA blocks as stage 1. Takes every ``VOLO`` argument, plus the ELSA block's:

    Args:
        elsa_kernel: neighbourhood K of the ELSA aggregation.
        elsa_heads: heads of the ELSA blocks (default: VOLO's stage-1 heads).
        elsa_group_width: channels per group of the K x K conv of the Hadamard attention.
        elsa_lam, elsa_gamma: ghost-head exponent and scale (0 disables that ghost).
        elsa_qk_scale: scale of the Hadamard product (None: head_dim ** -0.5).
        elsa_backend: force an ``elsa_aggregate`` backend (None: automatic).
    """

    def __init__(
        self,
        layers: Any,
        *,
        elsa_kernel: int = 11,
        elsa_heads: Optional[int] = None,
        elsa_group_width: int = 4,
        elsa_lam: float = 1.0,
        elsa_gamma: float = 1.0,
        elsa_qk_scale: Optional[float] = 1.0,
        elsa_backend: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(layers, **kwargs)
        # timm sets mix-token's Beta(beta, beta) only when built with use_mix_token; VOLO's value, so that switching
        # mix_token on later (token-labeling training) works
        self.beta = getattr(self, "beta", 1.0)
        outlook = kwargs.get("outlook_attention", (True, False, False, False))
        if not outlook[0] or sum(bool(o) for o in outlook) != 1:
            raise ValueError(f"outlook_attention must mark stage 1 only (the one ELSA replaces), got {outlook}")
        stage = self.network[0]
        first = stage[0]
        dim = first.norm1.normalized_shape[0]
        heads = elsa_heads or first.attn.num_heads
        mlp_hidden = first.mlp.fc1.out_features
        norm_layer = kwargs.get("norm_layer", nn.LayerNorm)
        attn_drop = kwargs.get("attn_drop_rate", 0.0)
        blocks = [ELSABlock(dim, num_heads=heads, kernel_size=elsa_kernel, mlp_ratio=mlp_hidden / dim,
                            qkv_bias=kwargs.get("qkv_bias", False), qk_scale=elsa_qk_scale, lam=elsa_lam,
                            gamma=elsa_gamma, group_width=elsa_group_width, attn_drop=attn_drop,
                            norm_layer=norm_layer, backend=elsa_backend,
                            device=kwargs.get("device"), dtype=kwargs.get("dtype"))
                  for _ in range(len(stage))]
        self.network[0] = nn.Sequential(*blocks)
        self.network[0].apply(self._init_weights)
        self.elsa_kernel = elsa_kernel

    def forward_train(self, x: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor, Tuple[int, int, int, int]]]:
        """Token-labeling training forward: (class logits (B, classes), token logits (B, N, classes), bbox).

        Why not timm's: timm 1.0's ``VOLO.forward_train`` returns the pooled *features* where the official VOLO
        returns ``head(features)`` (and its eval branch adds features to logits). This one follows the official
        semantics: with ``use_mix_token`` a random box of the stem output is swapped with the flipped batch and
        the token logits are un-swapped, so each token keeps its own label-map target; ``bbox`` (in token units,
        (0, 0, 0, 0) when nothing was mixed) tells the loss which region came from the flipped batch. Without an
        aux head it returns the class logits only; in eval mode, ``forward``'s logits.
        """
        if not self.training or self.aux_head is None:
            return self.forward(x)
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        grid_h, grid_w = x.shape[1] // self.pooling_scale, x.shape[2] // self.pooling_scale  # token grid
        bbox = (0, 0, 0, 0)
        if self.mix_token:
            lam = torch.distributions.Beta(self.beta, self.beta).sample()
            bbox = rand_bbox(x.size(), lam, scale=self.pooling_scale)
            s = self.pooling_scale
            y1, x1, y2, x2 = (c * s for c in bbox)
            mixed = x.clone()
            mixed[:, y1:y2, x1:x2] = x.flip(0)[:, y1:y2, x1:x2]
            x = mixed
        x = self.forward_tokens(x)
        if self.post_network is not None:
            x = self.forward_cls(x)
        x = self.norm(x)
        pooled = x[:, 0] if self.global_pool == "token" else x.mean(dim=1)
        logits = self.head(self.head_drop(pooled))
        tokens = x[:, 1:] if self.cls_token is not None and self.post_network is not None else x
        aux = self.aux_head(tokens)
        if self.mix_token and bbox != (0, 0, 0, 0):
            grid = aux.reshape(aux.shape[0], grid_h, grid_w, -1)
            y1, x1, y2, x2 = bbox
            unmixed = grid.clone()
            unmixed[:, y1:y2, x1:x2] = grid.flip(0)[:, y1:y2, x1:x2]
            aux = unmixed.reshape(aux.shape)
        return logits, aux, bbox

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """VOLO's (pos_embed, cls_token); the ghost heads decay like the official ELSA models' do."""
        return super().no_weight_decay()


def checkpoint_filter_fn(state_dict: dict, model: ELSAVOLO) -> dict:
    """Unwrap a training checkpoint and resample ``pos_embed`` to the model's grid (the one remapping place)."""
    state_dict = unwrap_state_dict(state_dict)
    pos = state_dict.get("pos_embed")
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.shape:
        state_dict["pos_embed"] = resample_abs_pos_embed_nhwc(pos, tuple(model.pos_embed.shape[1:3]))
    return state_dict


@dataclass
class VoloLoadReport:
    """What ``load_volo_weights`` did.

    loaded: model tensors taken from the VOLO file; new: model tensors left at their initialisation (the ELSA
    attention, and any head whose class count differs); unused: file tensors the model has no place for (the
    Outlookers' attention); resampled: tensors interpolated to a new size (``pos_embed`` at another resolution).
    """
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)


def load_volo_weights(model: ELSAVOLO, file: Union[str, os.PathLike, dict], use_ema: bool = False) -> VoloLoadReport:
    """Initialise every non-ELSA part of ``model`` from a timm or official VOLO checkpoint, to fine-tune from VOLO.

    The stage-1 norms and MLPs carry over too (same names and shapes as the Outlookers'); only the ELSA attention
    (``network.0.N.attn.*``) stays new. A head with another class count is left new rather than failing, and
    ``pos_embed`` is resampled when the checkpoint was trained at another resolution.

    Args:
        model: an ``ELSAVOLO`` of the same variant (D1..D5) as the checkpoint.
        file: ``.safetensors`` or ``.pth``/``.pth.tar`` (read with ``weights_only=True``), or a state dict.
        use_ema: take the EMA weights of a training checkpoint.

    Raises:
        CheckpointError: the file is unreadable, or it is not a VOLO of this width/depth (a tensor outside the
            heads and ``pos_embed`` has another shape, or no tensor matches at all).
    """
    if not isinstance(model, ELSAVOLO):
        raise TypeError(f"model must be an ELSAVOLO, got {type(model).__name__}")
    raw = file if isinstance(file, dict) else read_state_dict(file)
    state_dict = unwrap_state_dict(raw, use_ema=use_ema)
    own = model.state_dict()
    report = VoloLoadReport()
    pos = state_dict.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        if pos.shape[-1] != own["pos_embed"].shape[-1]:
            raise CheckpointError(f"pos_embed width {pos.shape[-1]} != model's {own['pos_embed'].shape[-1]}: "
                                  f"not a checkpoint of this VOLO variant")
        state_dict = dict(state_dict, pos_embed=resample_abs_pos_embed_nhwc(pos, tuple(own["pos_embed"].shape[1:3])))
        report.resampled.append("pos_embed")
    take = {}
    heads = ("head.", "aux_head.")
    for k, v in state_dict.items():
        if k not in own:
            report.unused.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            if not k.startswith(heads):
                raise CheckpointError(f"shape mismatch for {k}: checkpoint has {tuple(v.shape)}, model expects "
                                      f"{tuple(own[k].shape)}; is the checkpoint a VOLO of the same variant?")
            report.unused.append(k)  # another class count: the head starts fresh
        else:
            take[k] = v
    if not take:
        raise CheckpointError("no tensor of the checkpoint fits the model: not a VOLO checkpoint")
    model.load_state_dict(take, strict=False)
    report.loaded = sorted(take)
    report.new = [k for k in own if k not in take]
    _logger.info("VOLO weights: %d tensors loaded, %d new (ELSA attention and re-sized heads), %d unused",
                 len(report.loaded), len(report.new), len(report.unused))
    return report


def _create_elsa_volo(variant: str, pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    if kwargs.get("feature_cls") == "getter":
        kwargs["feature_cls"] = FeatureGetterNet  # timm's getter, with set_grad_checkpointing
    return build_model_with_cfg(
        ELSAVOLO, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls=FeatureGetterNet),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict:
    """timm's VOLO cfg (crop_pct, fixed input size, both heads as classifier); no weights exist."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.96, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv.0", "classifier": ("head", "aux_head"), "license": "apache-2.0",
        "paper_ids": "arXiv:2112.12786", "paper_name": "ELSA: Enhanced Local Self-Attention for Vision Transformer",
        "description": "untrained: no ELSA-VOLO weights were published; fine-tune from VOLO with load_volo_weights",
        **kwargs,
    }


# Resolutions and crop_pct as timm's VOLO cfgs.
_RESOLUTIONS = {
    "d1": {224: 0.96, 384: 1.0}, "d2": {224: 0.96, 384: 1.0}, "d3": {224: 0.96, 448: 1.0},
    "d4": {224: 0.96, 448: 1.15}, "d5": {224: 0.96, 448: 1.15, 512: 1.15},
}

default_cfgs = generate_default_cfgs({
    f"elsa_volo_{d}_{size}.untrained": _cfg(crop_pct=crop, input_size=(3, size, size))
    for d, sizes in _RESOLUTIONS.items() for size, crop in sizes.items()
})


def _entry(d: str, size: int, pretrained: bool, kwargs: Dict[str, Any]) -> ELSAVOLO:
    args = dict(MODEL_ARGS[d], img_size=size, **ELSA_VOLO_SETTINGS)
    return _create_elsa_volo(f"elsa_volo_{d}_{size}", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def elsa_volo_d1_224(pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    """ELSA-VOLO-D1 @ 224 (paper: ~8 GFLOPs)."""
    return _entry("d1", 224, pretrained, kwargs)


@register_model
def elsa_volo_d1_384(pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    """ELSA-VOLO-D1 @ 384."""
    return _entry("d1", 384, pretrained, kwargs)


@register_model
def elsa_volo_d2_224(pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    """ELSA-VOLO-D2 @ 224."""
    return _entry("d2", 224, pretrained, kwargs)


@register_model
def elsa_volo_d2_384(pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    """ELSA-VOLO-D2 @ 384."""
    return _entry("d2", 384, pretrained, kwargs)


@register_model
def elsa_volo_d3_224(pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    """ELSA-VOLO-D3 @ 224."""
    return _entry("d3", 224, pretrained, kwargs)


@register_model
def elsa_volo_d3_448(pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    """ELSA-VOLO-D3 @ 448."""
    return _entry("d3", 448, pretrained, kwargs)


@register_model
def elsa_volo_d4_224(pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    """ELSA-VOLO-D4 @ 224."""
    return _entry("d4", 224, pretrained, kwargs)


@register_model
def elsa_volo_d4_448(pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    """ELSA-VOLO-D4 @ 448."""
    return _entry("d4", 448, pretrained, kwargs)


@register_model
def elsa_volo_d5_224(pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    """ELSA-VOLO-D5 @ 224."""
    return _entry("d5", 224, pretrained, kwargs)


@register_model
def elsa_volo_d5_448(pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    """ELSA-VOLO-D5 @ 448."""
    return _entry("d5", 448, pretrained, kwargs)


@register_model
def elsa_volo_d5_512(pretrained: bool = False, **kwargs: Any) -> ELSAVOLO:
    """ELSA-VOLO-D5 @ 512 (paper: 437 GFLOPs, 87.2 top-1)."""
    return _entry("d5", 512, pretrained, kwargs)
