"""Batch mixing for classification: MixPro's MaskMix beside timm's mixup and cutmix."""

from __future__ import annotations

import math

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch import nn

__all__ = ["BatchMixing", "MaskMix", "patch_size"]


def patch_size(model: nn.Module) -> int:
    """The stride of a model's first feature map (a ViT's patch, a MixViT's stem), 1 if it declares none."""
    info = getattr(model, "feature_info", None)
    return int(info[0]["reduction"]) if info else 1


class MaskMix:
    """MaskMix (MixPro): each image of the batch mixed with its partner in the reversed batch (timm's pairing)
    through a grid mask of ``cell x cell`` pixel cells, ``cell`` a multiple of the model's patch size so that
    every patch comes from one image; the label is mixed by the area each image keeps.

    One mask per batch: ``lambda ~ Beta(alpha, alpha)`` of the cells, drawn at random, keep the image, the rest
    show its partner; the label weight is the kept area (cells cut at the border count by their pixels).
    """

    def __init__(self, alpha: float, cell: int, num_classes: int, prob: float = 1.0, label_smoothing: float = 0.0):
        if alpha <= 0 or cell < 1 or not 0 <= prob <= 1:
            raise ValueError(f"MaskMix needs alpha > 0, cell >= 1 and prob in [0, 1], got {alpha}, {cell}, {prob}")
        self.alpha, self.cell, self.num_classes = alpha, cell, num_classes
        self.prob, self.label_smoothing = prob, label_smoothing

    def mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """``(H, W)`` bool: True where the image keeps its own pixels."""
        rows, cols = math.ceil(height / self.cell), math.ceil(width / self.cell)
        kept = round(torch.distributions.Beta(self.alpha, self.alpha).sample().item() * rows * cols)
        cells = torch.zeros(rows * cols, dtype=torch.bool, device=device)
        cells[torch.randperm(rows * cols, device=device)[:kept]] = True
        grid = cells.view(rows, cols).repeat_interleave(self.cell, 0).repeat_interleave(self.cell, 1)
        return grid[:height, :width]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.rand(()).item() >= self.prob:
            return images, mixup_target(labels, self.num_classes, 1.0, self.label_smoothing)
        mask = self.mask(images.shape[-2], images.shape[-1], images.device)
        mixed = torch.where(mask, images, images.flip(0))
        kept = mask.float().mean().item()
        return mixed, mixup_target(labels, self.num_classes, kept, self.label_smoothing)


class BatchMixing:
    """The batch mixes a recipe turns on (timm's mixup/cutmix, MaskMix): one of them, chosen at random per batch;
    soft targets for ``SoftTargetCrossEntropy``. Batches of odd size are left unmixed (the reversed-batch pairing
    would mix the middle image with itself)."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        maskmix_alpha: float = 0.0,
        maskmix_cell: int | None = None,
        prob: float = 1.0,
        label_smoothing: float = 0.0,
    ):
        self.mixers: list = []
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixers.append(
                Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                      label_smoothing=label_smoothing, num_classes=num_classes)
            )  # fmt: skip
        if maskmix_alpha > 0:
            patch = patch_size(model)
            cell = maskmix_cell or patch
            if cell % patch:
                raise ValueError(f"maskmix_cell {cell} is not a multiple of the model's patch size {patch}")
            self.mixers.append(MaskMix(maskmix_alpha, cell, num_classes, prob, label_smoothing))

    def __bool__(self) -> bool:
        return bool(self.mixers)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mixed images and soft targets, or None for a batch left as it is."""
        if not self.mixers or len(images) % 2:
            return None
        return self.mixers[int(torch.randint(len(self.mixers), ()))](images, labels)
