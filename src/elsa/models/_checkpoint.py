"""Kept for imports from before ``elsa.checkpoint``: the names now live there (one reader of checkpoint files)."""
from ..checkpoint import (CheckpointError, LoadReport, fit_state_dict, load_checkpoint, read_state_dict,  # noqa: F401
                          unwrap_state_dict)
