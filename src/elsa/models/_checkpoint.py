"""The model files' import of the checkpoint reader (``from ._checkpoint import ...``); the one implementation is
``elsa.checkpoint``."""
from ..checkpoint import (CheckpointError, LoadReport, fit_state_dict, load_checkpoint, read_state_dict,  # noqa: F401
                          unwrap_state_dict)
