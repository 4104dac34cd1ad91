"""Classification training (``elsa train``) on ``elsa.engine``: timm data/optim/scheduler/EMA pieces, checked
data, the loss and the per-epoch evaluation and metrics files; the loop, resume, AMP and DDP are the engine's.

Public API: ``TrainConfig``, ``build_config`` (defaults < recipe < config file < flags), ``train(cfg)``,
``list_recipes``, ``load_recipe``, ``METRIC_COLUMNS``.
"""
from .config import TrainConfig, build_config, list_recipes, load_config_file, load_recipe, validate_config
from .engine import TrainResult, train
from .metrics import METRIC_COLUMNS

__all__ = ["TrainConfig", "build_config", "list_recipes", "load_config_file", "load_recipe", "validate_config",
           "TrainResult", "train", "METRIC_COLUMNS"]
