"""Lightning data modules for classification, detection and segmentation, with albumentations pipelines
declared in YAML."""

from .base import VisionDataModule
from .classification import FASHION_MNIST_CLASSES, ClassificationData, read_idx
from .detection import DetectionData, collate_detection
from .scenes import SCENE_CLASSES, scene_baselines, write_fashion_scenes
from .segmentation import ADE20K_CLASSES, VOC_CLASSES, SegmentationData
from .transforms import DataConfig, build_pipeline, make_transform, resolve_data_config

__all__ = [
    "ADE20K_CLASSES",
    "FASHION_MNIST_CLASSES",
    "SCENE_CLASSES",
    "VOC_CLASSES",
    "ClassificationData",
    "DataConfig",
    "DetectionData",
    "SegmentationData",
    "VisionDataModule",
    "build_pipeline",
    "collate_detection",
    "make_transform",
    "read_idx",
    "resolve_data_config",
    "scene_baselines",
    "write_fashion_scenes",
]
