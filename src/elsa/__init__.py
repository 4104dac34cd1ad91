"""ELSA: Enhanced Local Self-Attention for vision transformers.

``import elsa`` registers the ELSA models with timm, so ``timm.create_model("elsa_swin_tiny")`` works.
"""
from .layers import ELSA, ELSABlock
from .models import load_checkpoint
from .ops import elsa_aggregate, elsa_softmax_aggregate

__version__ = "0.1.0"

__all__ = ["ELSA", "ELSABlock", "elsa_aggregate", "elsa_softmax_aggregate", "load_checkpoint", "__version__"]
