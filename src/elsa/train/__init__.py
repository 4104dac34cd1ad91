"""The classification training engine (``elsa train``): timm data/optim/scheduler/EMA pieces, checked data,
crash-safe checkpoints with full resume, DDP under torchrun, per-epoch metrics files.

Public API: ``TrainConfig``, ``build_config`` (defaults < recipe < config file < flags), ``train(cfg)``,
``list_recipes``, ``load_recipe``, ``METRIC_COLUMNS``.
"""
from .config import TrainConfig, build_config, list_recipes, load_config_file, load_recipe, validate_config
from .engine import TrainResult, train
from .metrics import METRIC_COLUMNS

__all__ = ["TrainConfig", "build_config", "list_recipes", "load_config_file", "load_recipe", "validate_config",
           "TrainResult", "train", "METRIC_COLUMNS"]
