"""Dense prediction with ELSA-Swin: backbone adapter, detection and segmentation pipelines."""
from .backbone import ELSASwinBackbone

__all__ = ["ELSASwinBackbone"]
