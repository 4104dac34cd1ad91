"""The ``features_only`` wrapper of the ELSA models: timm's ``FeatureGetterNet`` plus gradient checkpointing."""
from __future__ import annotations

import torch
from timm.models._features import FeatureGetterNet as _TimmFeatureGetterNet

__all__ = ["FeatureGetterNet"]


class FeatureGetterNet(_TimmFeatureGetterNet):
    """timm's getter wrapper (features from ``forward_intermediates``) with ``set_grad_checkpointing``, which
    detection and segmentation pipelines call on ``features_only`` backbones and timm 1.0's getter lacks."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
