"""Detection and instance segmentation with ELSA-Swin: Mask R-CNN and Cascade Mask R-CNN on torchvision's parts,
COCO-format data, COCO evaluation and the training engine behind ``elsa det``."""
from .models import BackboneWithFPN, DetTransform, build_detector

__all__ = ["BackboneWithFPN", "DetTransform", "build_detector"]
