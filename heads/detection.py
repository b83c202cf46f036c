"""Object detectors from torchvision over any ``features_only`` timm backbone.

``create_detector(name, backbone, num_classes)`` builds torchvision's RetinaNet, FCOS,
Faster R-CNN or Mask R-CNN on a feature pyramid (``torchvision.ops.FeaturePyramidNetwork``)
over the backbone's maps, with torchvision's own wiring for each detector:

- RetinaNet, FCOS: strides 8, 16, 32, plus P6 and P7 computed from P5 (five levels);
- Faster R-CNN, Mask R-CNN: strides 4, 8, 16, 32, plus a max-pooled P6 for the RPN.

Channels come from the backbone's ``feature_info``. Images go through torchvision's
``GeneralizedRCNNTransform`` (resize so the short side is ``min_size`` without the long side
passing ``max_size``, normalize, pad the batch to a multiple of 32), so any image size works.
``num_classes`` means what it means in torchvision: labels are ``0 .. num_classes - 1`` and the
R-CNNs reserve 0 for the background.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from .features import FeatureBackbone

__all__ = ["DETECTORS", "DetectorSpec", "FeaturePyramidBackbone", "create_detector", "list_detectors"]


class FeaturePyramidBackbone(nn.Module):
    """A :class:`FeatureBackbone` followed by an FPN: the ``backbone`` torchvision's detectors expect.

    Returns an ordered dict of maps with ``out_channels`` channels: ``"0"``, ``"1"``, ... for the
    backbone's strides (the names ``MultiScaleRoIAlign`` pools from), then the extra levels.
    """

    def __init__(self, body: FeatureBackbone, out_channels: int, extra_blocks: ExtraFPNBlock | None = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


@dataclass(frozen=True)
class DetectorSpec:
    """A torchvision detector class, the backbone strides it reads and the FPN's extra levels."""

    detector: Callable[..., nn.Module]
    strides: tuple[int, ...]
    extra_blocks: Callable[[int], ExtraFPNBlock]


DETECTORS: dict[str, DetectorSpec] = {
    "retinanet": DetectorSpec(RetinaNet, (8, 16, 32), lambda ch: LastLevelP6P7(ch, ch)),
    "fcos": DetectorSpec(FCOS, (8, 16, 32), lambda ch: LastLevelP6P7(ch, ch)),
    "faster_rcnn": DetectorSpec(FasterRCNN, (4, 8, 16, 32), lambda ch: LastLevelMaxPool()),
    "mask_rcnn": DetectorSpec(MaskRCNN, (4, 8, 16, 32), lambda ch: LastLevelMaxPool()),
}


def list_detectors() -> list[str]:
    return sorted(DETECTORS)


def create_detector(
    name: str,
    backbone: str,
    num_classes: int,
    *,
    fpn_channels: int = 256,
    frozen_stages: int = -1,
    norm_eval: bool = False,
    out_norm: bool = False,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    backbone_kwargs: dict[str, Any] | None = None,
    **detector_kwargs: Any,
) -> nn.Module:
    """Build the torchvision detector ``name`` over the timm backbone ``backbone``.

    Args:
        name: ``retinanet``, ``fcos``, ``faster_rcnn`` or ``mask_rcnn``.
        backbone: a timm model name; it must give maps at the strides the detector reads.
        num_classes: as torchvision counts them (the R-CNNs include the background).
        fpn_channels: channels of every pyramid level.
        frozen_stages: see :class:`~visionzoo.heads.features.FeatureBackbone`.
        norm_eval: keep the backbone's BatchNorm statistics fixed in training.
        out_norm: a LayerNorm on each backbone output (the det/seg backbones of Swin and NAT have one).
        min_size: short side after resizing (a tuple picks one at random per training batch).
        max_size: cap on the long side after resizing.
        backbone_kwargs: for ``timm.create_model`` (``pretrained``, ``out_indices``, model options).
        **detector_kwargs: for the torchvision detector (``score_thresh``, ``anchor_generator``, ...);
            ``image_mean``/``image_std`` default to the backbone's pretrained cfg.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid: {', '.join(list_detectors())}")
    spec = DETECTORS[key]
    body = FeatureBackbone(
        backbone,
        spec.strides,
        frozen_stages=frozen_stages,
        norm_eval=norm_eval,
        out_norm=out_norm,
        head_name=key,
        **(backbone_kwargs or {}),
    )
    cfg = body.pretrained_cfg
    detector_kwargs.setdefault("image_mean", list(cfg.get("mean", (0.485, 0.456, 0.406))))
    detector_kwargs.setdefault("image_std", list(cfg.get("std", (0.229, 0.224, 0.225))))
    trunk = FeaturePyramidBackbone(body, fpn_channels, spec.extra_blocks(fpn_channels))
    return spec.detector(trunk, num_classes=num_classes, min_size=min_size, max_size=max_size, **detector_kwargs)
