"""ADE20K semantic segmentation with ELSA-Swin + UPerNet (the official seg/ setting, spec section 4)."""
from .ade20k_meta import ADE20K_CLASSES, ADE20K_PALETTE
from .data import ADE20KDataset, TrainTransform, collate_skip
from .heads import FCNHead, UPerHead
from .metrics import SegEvaluator, intersect_and_union
from .recipes import RECIPES, SegRecipe, get_recipe
from .segmentor import EncoderDecoder, build_segmentor, predict_probs, slide_inference, whole_inference

__all__ = [
    "ADE20K_CLASSES", "ADE20K_PALETTE", "ADE20KDataset", "TrainTransform", "collate_skip", "FCNHead", "UPerHead",
    "SegEvaluator", "intersect_and_union", "RECIPES", "SegRecipe", "build_segmentor", "get_recipe", "EncoderDecoder",
    "predict_probs", "slide_inference", "whole_inference",
]
