"""Object detection and instance segmentation with torchvision's detectors over a timm backbone; COCO mAP."""

from __future__ import annotations

from typing import Any

import torch

from visionzoo.heads import create_detector
from visionzoo.metrics import detection_map, detections_for_map

from .base import VisionTask

__all__ = ["DetectionTask"]


class DetectionTask(VisionTask):
    """Train and evaluate ``create_detector(detector, model_name, num_classes, ...)``.

    Batches are ``(images, targets)``: lists of ``(3, H, W)`` images in [0, 1] (the detector resizes
    and normalises them) and of torchvision target dicts (``boxes`` xyxy, ``labels``, ``masks``).

    Args:
        model_name: the backbone, a timm model name with ``features_only`` maps.
        num_classes: as torchvision counts them (linked from the data module by ``visionzoo fit``).
        detector: ``retinanet``, ``fcos``, ``faster_rcnn`` or ``mask_rcnn``.
        detector_kwargs: more arguments for :func:`~visionzoo.heads.create_detector` (``min_size``,
            ``frozen_stages``, ``out_norm``, ``backbone_kwargs``, torchvision options).
        **training: optimizer, schedule and EMA settings, see :class:`~visionzoo.tasks.base.VisionTask`.
    """

    monitor = "val/map"

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        detector: str = "retinanet",
        detector_kwargs: dict[str, Any] | None = None,
        **training: Any,
    ):
        super().__init__(**training)
        self.attach(create_detector(detector, model_name, num_classes, **(detector_kwargs or {})))
        iou_types = ("bbox", "segm") if detector == "mask_rcnn" else ("bbox",)
        self.val_map, self.test_map = detection_map(iou_types), detection_map(iou_types)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.eval_model(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def _evaluate(self, batch, metric) -> None:
        images, targets = batch
        outputs = detections_for_map(self.eval_model(images))
        truths = [{**t, "masks": t["masks"].bool()} if "masks" in t else t for t in targets]
        metric.update(outputs, truths)

    def _log_map(self, metric, stage: str) -> None:
        results = metric.compute()
        prefix = "segm_" if "segm_map" in results and "bbox_map" not in results else ""
        names = {"map": "map", "map_50": "map_50", "map_75": "map_75"}
        for key, name in names.items():
            value = results.get(f"{prefix}{key}", results.get(f"bbox_{key}"))
            if value is not None:
                self.log(f"{stage}/{name}", value, prog_bar=name == "map")
        if "segm_map" in results:
            self.log(f"{stage}/mask_map", results["segm_map"])
        metric.reset()

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_map)

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_map)

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    def predict_step(self, batch, batch_idx):
        images = batch[0] if isinstance(batch, (list, tuple)) and isinstance(batch[0], list) else batch
        return self.eval_model(images)
