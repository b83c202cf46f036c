"""LightningModules that take a model name and plain arguments, so a checkpoint rebuilds itself."""

from .base import VisionTask
from .classification import ClassificationTask
from .detection import DetectionTask
from .segmentation import SegmentationTask

__all__ = ["ClassificationTask", "DetectionTask", "SegmentationTask", "VisionTask"]
