"""Image classification with any timm model: cross-entropy (label smoothing, mixup/cutmix/MaskMix), top-1/top-5."""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torchmetrics.classification import MulticlassAccuracy

from .base import VisionTask
from .mixing import BatchMixing

__all__ = ["ClassificationTask"]


class ClassificationTask(VisionTask):
    """Train and evaluate ``timm.create_model(model_name, num_classes=..., **model_kwargs)``.

    Args:
        model_name: a timm model name (visionzoo's or timm's own).
        num_classes: classes of the data (linked from the data module by ``visionzoo fit``).
        model_kwargs: more arguments for ``timm.create_model`` (``drop_path_rate``, architecture fields, ...).
        pretrained: start from the model's published weights.
        label_smoothing: label smoothing of the cross-entropy.
        mixup_alpha: mixup's Beta parameter (0: off).
        cutmix_alpha: cutmix's Beta parameter (0: off).
        maskmix_alpha: MaskMix's (MixPro) Beta parameter of the kept area (0: off).
        maskmix_cell: MaskMix's grid cell in pixels, a multiple of the model's patch size (None: the patch size).
        mix_prob: probability of mixing a batch when a mix is on; with several on, each batch picks one at random.
        **training: optimizer, schedule and EMA settings, see :class:`~visionzoo.tasks.base.VisionTask`.
    """

    monitor = "val/top1"

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        maskmix_alpha: float = 0.0,
        maskmix_cell: int | None = None,
        mix_prob: float = 1.0,
        **training: Any,
    ):
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got {num_classes} (the data's class count)")
        super().__init__(**training)
        self.attach(
            timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **(model_kwargs or {}))
        )
        self.mixing = BatchMixing(
            self.model, num_classes, mixup_alpha, cutmix_alpha, maskmix_alpha, maskmix_cell, mix_prob, label_smoothing
        )
        top_k = (1, 5) if num_classes > 5 else (1,)
        for stage in ("val", "test"):
            for k in top_k:
                setattr(self, f"{stage}_top{k}", MulticlassAccuracy(num_classes, top_k=k, average="micro"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.eval_model(images)

    def training_loss(self, batch) -> torch.Tensor:
        images, labels = batch
        mixed = self.mixing(images, labels)
        if mixed is not None:
            images, targets = mixed
            return SoftTargetCrossEntropy()(self.train_forward(images), targets)
        return F.cross_entropy(self.train_forward(images), labels, label_smoothing=self.hparams.label_smoothing)

    def _evaluate(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self.eval_model(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), prog_bar=True)
        for name in ("top1", "top5"):
            metric = getattr(self, f"{stage}_{name}", None)
            if metric is not None:
                metric(logits, labels)
                self.log(f"{stage}/{name}", metric, prog_bar=name == "top1")

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.eval_model(images).softmax(-1)
