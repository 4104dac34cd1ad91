"""ELSA model families, registered with timm on import."""
from . import elsa_swin, elsa_volo
from ._checkpoint import CheckpointError, LoadReport, load_checkpoint, read_state_dict, unwrap_state_dict
from .elsa_swin import ELSASwin

__all__ = ["ELSASwin", "CheckpointError", "LoadReport", "load_checkpoint", "read_state_dict", "unwrap_state_dict"]
