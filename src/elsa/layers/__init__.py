"""ELSA layers: drop-in attention and transformer block for channels-last (B, H, W, C) maps."""
from .elsa import ELSA, ELSABlock

__all__ = ["ELSA", "ELSABlock"]
