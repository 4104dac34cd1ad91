"""ELSA model families, registered with timm on import (and their checkpoint filters with ``elsa.checkpoint``)."""
from ..checkpoint import CheckpointError, LoadReport, load_checkpoint, read_state_dict, register_filter, unwrap_state_dict
from . import elsa_swin, elsa_volo
from .elsa_swin import ELSASwin

register_filter(elsa_swin.ELSASwin, elsa_swin.checkpoint_filter_fn)
register_filter(elsa_volo.ELSAVOLO, elsa_volo.checkpoint_filter_fn)

__all__ = ["ELSASwin", "CheckpointError", "LoadReport", "load_checkpoint", "read_state_dict", "unwrap_state_dict"]
