"""Semantic segmentation with UPerNet or Semantic FPN over a timm backbone; mIoU."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from visionzoo.data.segmentation import to_label_size
from visionzoo.heads import create_segmenter
from visionzoo.metrics import segmentation_metrics

from .base import VisionTask

__all__ = ["SegmentationTask"]


class SegmentationTask(VisionTask):
    """Train and evaluate ``create_segmenter(decoder, model_name, num_classes, ...)``.

    Batches are ``(images (B, 3, H, W) normalised, masks (B, H, W) int64)`` with ``ignore_index`` on
    unlabelled pixels; evaluation batches may instead hold each mask at its stored size with the box of its
    image's content, ``(images, [masks (H_i, W_i)], boxes (B, 4))``: the prediction is then cropped to the
    content and resized (bilinear logits) to the label before it is scored.

    Args:
        model_name: the backbone, a timm model name with maps at strides 4 to 32.
        num_classes: classes to predict (linked from the data module by ``visionzoo fit``).
        decoder: ``upernet`` or ``semantic_fpn``.
        aux_weight: weight of the auxiliary FCN head's loss (0: no auxiliary head).
        ignore_index: label of the pixels that count nowhere.
        segmenter_kwargs: more arguments for :func:`~visionzoo.heads.create_segmenter` (``channels``,
            ``frozen_stages``, ``out_norm``, ``backbone_kwargs``, ...).
        **training: optimizer, schedule and EMA settings, see :class:`~visionzoo.tasks.base.VisionTask`.
    """

    monitor = "val/miou"

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        decoder: str = "upernet",
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        segmenter_kwargs: dict[str, Any] | None = None,
        **training: Any,
    ):
        super().__init__(**training)
        model = create_segmenter(decoder, model_name, num_classes, aux_head=aux_weight > 0, **(segmenter_kwargs or {}))
        self.attach(model)
        self.val_metrics = segmentation_metrics(num_classes, ignore_index).clone(prefix="val/")
        self.test_metrics = segmentation_metrics(num_classes, ignore_index).clone(prefix="test/")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.eval_model(images)["out"]

    def training_loss(self, batch) -> torch.Tensor:
        images, masks = batch
        outputs = self.train_forward(images)
        loss = F.cross_entropy(outputs["out"], masks, ignore_index=self.hparams.ignore_index)
        if "aux" in outputs:
            aux = F.cross_entropy(outputs["aux"], masks, ignore_index=self.hparams.ignore_index)
            self.log("train/aux_loss", aux)
            loss = loss + self.hparams.aux_weight * aux
        return loss

    def _evaluate(self, batch, metrics, stage: str) -> None:
        images, masks, *boxes = batch
        logits = self.eval_model(images)["out"]
        ignore = self.hparams.ignore_index
        if boxes:  # labels at their stored size: each image's logits cropped to its content, resized to its label
            losses = []
            for image_logits, mask, box in zip(logits, masks, boxes[0], strict=True):
                resized = to_label_size(image_logits, box, mask.shape)[None]
                losses.append(F.cross_entropy(resized, mask[None], ignore_index=ignore))
                metrics.update(resized.argmax(1), mask[None])
            self.log(f"{stage}/loss", torch.stack(losses).mean(), batch_size=len(masks))
        else:
            self.log(f"{stage}/loss", F.cross_entropy(logits, masks, ignore_index=ignore))
            metrics.update(logits.argmax(1), masks)
        self.log_dict(metrics, prog_bar=True, batch_size=len(masks))

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.forward(images).argmax(1)
