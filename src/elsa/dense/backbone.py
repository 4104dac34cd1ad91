"""ELSA-Swin as a dense-prediction backbone (the official det/ and seg/ backbone, spec section 4).

Same parameters as the classifier (so classification checkpoints load), without the head and final norm, plus a
LayerNorm ``norm{i}`` on each returned stage. Its window stage always shifts odd blocks after padding to whole
windows, as the official detection backbone does, so weights trained by the official detection code behave as trained.
"""
from __future__ import annotations

import logging
import math
import os
from typing import List, Sequence, Union

import torch.nn as nn
from torch import Tensor

from ..checkpoint import CheckpointError, LoadReport, fit_state_dict, read_checkpoint, unwrap_state_dict
from ..models.elsa_swin import MODEL_ARGS, ELSASwin

_logger = logging.getLogger(__name__)


class ELSASwinBackbone(ELSASwin):
    """Multi-scale features for detection/segmentation.

    forward(x: (B, 3, H, W)) -> list of (B, C_i, ceil(H / 2**(i+2)), ...) NCHW maps for i in ``out_indices``,
    with channels C, 2C, 4C, 8C at strides 4, 8, 16, 32 (any H, W).

    frozen_stages: as the official det/seg backbone's ``_freeze_stages``: -1 trains everything; 0 and 1 freeze the
    patch embedding (1 also the absolute position embedding, if any); k >= 2 also freezes stages 0..k-2 (each with
    its patch merging) and puts the position dropout in eval mode. So k = num_stages + 1 freezes every stage.
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1, **kwargs) -> None:
        kwargs.setdefault("drop_path_rate", 0.2)
        super().__init__(num_classes=0, always_shift=True, **kwargs)
        num_stages = len(self.layers)
        if any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices must lie in [0, {num_stages}), got {tuple(out_indices)}")
        if not -1 <= frozen_stages <= num_stages + 1:
            raise ValueError(f"frozen_stages must lie in [-1, {num_stages + 1}], got {frozen_stages}")
        del self.norm, self.head, self.head_drop
        if self.absolute_pos_embed is not None:  # the official detection backbone's layout: (1, C, grid_h, grid_w)
            self.absolute_pos_embed = nn.Parameter(self._pos_embed_map(self.absolute_pos_embed.detach()))
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.feature_info[i]["num_chs"]))
        self.out_channels = [self.feature_info[i]["num_chs"] for i in self.out_indices]
        self._freeze()

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "ELSASwinBackbone":
        """Backbone with the architecture of a registered ELSA-Swin variant, e.g. ``"elsa_swin_tiny"``."""
        if name not in MODEL_ARGS:
            raise ValueError(f"name must be one of {sorted(MODEL_ARGS)}, got {name!r}")
        args = {k: v for k, v in MODEL_ARGS[name].items() if k not in ("num_classes",)}
        return cls(**dict(args, **kwargs))

    def _pos_embed_map(self, pos: Tensor) -> Tensor:
        """(1, grid_h * grid_w, C) -> (1, C, grid_h, grid_w) (a square grid if the count does not fit ours)."""
        gh, gw = self.patch_embed.grid_size
        if pos.shape[1] != gh * gw:
            gh = gw = math.isqrt(pos.shape[1])
        return pos.transpose(1, 2).reshape(1, -1, gh, gw).contiguous()

    def _freeze(self) -> None:
        k = self.frozen_stages
        frozen: List[nn.Module] = []
        if k >= 0:
            frozen.append(self.patch_embed)
        ape = getattr(self, "absolute_pos_embed", None)
        if k >= 1 and isinstance(ape, nn.Parameter):
            ape.requires_grad = False
        if k >= 2:
            self.pos_drop.eval()
            frozen.extend(self.layers[:k - 1])
        for module in frozen:
            module.eval()
            for p in module.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> "ELSASwinBackbone":
        super().train(mode)
        self._freeze()
        return self

    def forward(self, x: Tensor) -> List[Tensor]:  # type: ignore[override]
        """x: (B, in_chans, H, W) -> [norm_i(stage_i output) as (B, C_i, H_i, W_i) for i in out_indices]."""
        outs = []
        x = self._embed(x)
        for i, stage in enumerate(self.layers):
            x = stage.forward_blocks(x)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None and i < max(self.out_indices):
                x = stage.downsample(x)
            if i >= max(self.out_indices):
                break
        return outs

    def load_pretrained(self, path: Union[str, os.PathLike], use_ema: bool = False,
                        what: str = "--pretrained file") -> LoadReport:
        """Initialise from a classification checkpoint (official or ours) or a detection/segmentation checkpoint
        (keys under ``backbone.``). Returns (and logs) which backbone tensors were not in the file and which file
        tensors were not used (the classifier's head and final norm, a detector's neck and heads). A file with
        none of the backbone's weights (another model's) or with other shapes (another size) raises, naming
        ``what`` and the file."""
        raw = read_checkpoint(path, what)
        try:
            state_dict = unwrap_state_dict(raw, use_ema=use_ema)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise CheckpointError(f"{what} {str(path)!r} holds no state dict ({err})") from None
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{what} {str(path)!r} holds no state dict")
        if any(k.startswith("backbone.") for k in state_dict):
            state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("attn_mask")}
        pos = state_dict.get("absolute_pos_embed")
        if pos is not None and pos.dim() == 3 and self.absolute_pos_embed is not None:
            state_dict["absolute_pos_embed"] = self._pos_embed_map(pos)  # a classifier's (1, patches, C)
        own = self.state_dict()
        if not any(k in own for k in state_dict):
            raise CheckpointError(f"{what} {str(path)!r} holds none of the {type(self).__name__} weights (e.g. "
                                  f"{next(iter(own))}); is it another model's checkpoint?")
        try:
            report = fit_state_dict(self, state_dict, strict=False)
        except CheckpointError as err:
            raise CheckpointError(f"{what} {str(path)!r} is for another backbone size: {err}") from None
        _logger.info("backbone loaded from %s; not in file: %s; unused: %s", path,
                     report.missing or "none", report.unexpected or "none")
        return report
