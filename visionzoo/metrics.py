"""Evaluation metrics of the dense tasks, through torchmetrics.

- detection: COCO box and mask mAP (``MeanAveragePrecision`` on the pycocotools backend, so the
  numbers are COCO's own evaluation: 101-point interpolated precision over IoU 0.50:0.95);
- segmentation: mIoU and pixel accuracy as mmsegmentation reports them (``mIoU`` and ``aAcc``):
  intersections and unions are accumulated over the whole dataset, classes absent from both
  predictions and labels are left out of the mean, and ``ignore_index`` pixels count nowhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.detection import MeanAveragePrecision

__all__ = ["detection_map", "detections_for_map", "segmentation_metrics"]


def detection_map(iou_types: str | Sequence[str] = "bbox", **kwargs) -> MeanAveragePrecision:
    """COCO mAP over ``bbox`` and/or ``segm``; ``kwargs`` go to ``MeanAveragePrecision``."""
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    return MeanAveragePrecision(iou_type=iou_types, backend="pycocotools", **kwargs)


def detections_for_map(outputs: Sequence[dict[str, torch.Tensor]], mask_threshold: float = 0.5) -> list[dict]:
    """torchvision detector outputs as ``MeanAveragePrecision`` wants them: Mask R-CNN's soft masks
    ``(N, 1, H, W)`` become boolean ``(N, H, W)`` at ``mask_threshold``."""
    converted = []
    for output in outputs:
        output = dict(output)
        if "masks" in output and output["masks"].ndim == 4:
            output["masks"] = output["masks"][:, 0] > mask_threshold
        converted.append(output)
    return converted


def segmentation_metrics(num_classes: int, ignore_index: int | None = 255) -> MetricCollection:
    """``miou`` and ``pixel_accuracy``; ``update`` takes logits ``(B, C, H, W)`` or labels, and labels ``(B, H, W)``."""
    return MetricCollection(
        {
            "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
            "pixel_accuracy": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        }
    )
