"""Data for ELSA models: the built-in digits set, checked image folders, and timm-based transform factories.

Public API (used by ``elsa train``, ``elsa validate``, ``elsa predict``):
``create_dataset(name_or_root, split, ...)``, ``build_eval_transform(model_or_cfg, img_size, crop_pct,
interpolation)``, ``build_train_transform``, ``resolve_model_data_config``, ``DigitsDataset``,
``load_digits_split(split)``, ``ImageFolderDataset``, ``SkipUnreadable`` + ``collate_skipped``, ``DatasetError``.
"""
from .digits import DIGITS_CLASSES, DIGITS_NAME, DigitsDataset, digits_train_transform, load_digits_split
from .factory import (build_eval_transform, build_train_transform, create_dataset, is_digits, is_timm_spec,
                      resolve_model_data_config, split_folder)
from .folder import (DatasetError, ImageFolderDataset, SkipUnreadable, TransformError, collate_skipped, find_classes,
                     scan_image_folder)

__all__ = [
    "DIGITS_CLASSES", "DIGITS_NAME", "DigitsDataset", "digits_train_transform", "load_digits_split",
    "build_eval_transform", "build_train_transform", "create_dataset", "is_digits", "is_timm_spec",
    "resolve_model_data_config", "split_folder",
    "DatasetError", "ImageFolderDataset", "SkipUnreadable", "TransformError", "collate_skipped", "find_classes",
    "scan_image_folder",
]
