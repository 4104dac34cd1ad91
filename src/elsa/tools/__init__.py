"""Inference-side tools behind the CLI: evaluation, prediction, attention visualisation, learning curves.

These are library functions (no printing, no progress bars); ``elsa.cli`` adds argument parsing and output.
"""
from .common import (CheckpointInfo, ToolError, checkpoint_classes, checkpoint_info, class_names,
                     create_model_from_checkpoint, eval_transform, load_image, parse_ints, resolve_classes,
                     resolve_device)
from .evaluate import EvalResult, evaluate, image_folder_dataset, make_loader, resolve_split
from .plot import plot_curves, read_metrics
from .predict import Prediction, predict
from .visualize import AttentionMaps, attention_maps, elsa_blocks, plot_attention_maps

__all__ = [
    "AttentionMaps", "CheckpointInfo", "EvalResult", "Prediction", "ToolError", "attention_maps", "checkpoint_classes",
    "checkpoint_info", "class_names", "resolve_classes",
    "create_model_from_checkpoint", "elsa_blocks", "eval_transform", "evaluate", "image_folder_dataset", "load_image",
    "make_loader", "parse_ints", "plot_attention_maps", "plot_curves", "predict", "read_metrics", "resolve_device",
    "resolve_split",
]
