"""LightningModules that take a model name and plain arguments, so a checkpoint rebuilds itself."""

from .base import VisionTask
from .classification import ClassificationTask
from .detection import DetectionTask
from .distillation import DistillationTask, SegmentationDistillationTask
from .segmentation import SegmentationTask

__all__ = [
    "ClassificationTask",
    "DetectionTask",
    "DistillationTask",
    "SegmentationDistillationTask",
    "SegmentationTask",
    "VisionTask",
]
