"""Semantic segmentation decoders over any ``features_only`` timm backbone.

- :class:`UPerNetDecoder`: UPerNet (Xiao et al., "Unified Perceptual Parsing for Scene
  Understanding", ECCV 2018) as mmsegmentation's ``UPerHead`` builds it, the decoder that
  backbone papers report on ADE20K: a pyramid pooling module on the stride-32 map, a top-down
  FPN over all four maps, every level resized to stride 4 and fused by a 3x3 convolution.
- :class:`SemanticFPNDecoder`: Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid
  Networks", CVPR 2019) as mmsegmentation's FPN neck + ``FPNHead``: each pyramid level is
  brought to stride 4 by 3x3 conv-norm-ReLU steps with 2x upsampling, and the levels are summed.
- :class:`FCNAuxHead`: the optional auxiliary head on the stride-16 map (mmsegmentation's
  ``FCNHead`` with one convolution, weighted 0.4 in the loss by the usual recipes).

:class:`Segmenter` returns ``{"out": logits}`` (and ``"aux"`` with an auxiliary head), both
upsampled to the input size, as torchvision's segmentation models do. Losses belong to the
training task. Norm layers default to BatchNorm; convert with ``nn.SyncBatchNorm.convert_sync_batchnorm``
for multi-GPU training. In training the pyramid pooling's 1x1 level needs a batch of at least 2.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from visionzoo.backbones.helpers import unwrap_state_dict
from visionzoo.kernels import adaptive_avg_pool

from .features import STAGE_STRIDES, FeatureBackbone

__all__ = [
    "DECODERS",
    "DecodeHead",
    "FCNAuxHead",
    "PyramidPooling",
    "Segmenter",
    "SemanticFPNDecoder",
    "UPerNetDecoder",
    "convert_mmseg_heads",
    "create_segmenter",
    "list_segmenters",
]

NormLayer = Callable[[int], nn.Module]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, norm_layer: NormLayer) -> nn.Module:
    """Convolution (no bias), norm, ReLU: mmcv's ``ConvModule``."""
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, norm_layer=norm_layer, activation_layer=nn.ReLU)


class DecodeHead(nn.Module):
    """Base decoder: takes the maps at ``in_index``, ``decode`` fuses them, then dropout and a 1x1 classifier.

    Args:
        channels: channels that ``decode`` returns.
        num_classes: output channels of the classifier.
        in_index: which of the backbone's maps (finest first) ``decode`` receives.
        dropout: channel dropout before the classifier.
    """

    def __init__(self, channels: int, num_classes: int, in_index: Sequence[int], dropout: float = 0.1):
        super().__init__()
        self.in_index = tuple(in_index)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits at the resolution of the finest selected map."""
        return self.classifier(self.dropout(self.decode([features[i] for i in self.in_index])))


class AdaptivePool(nn.Module):
    """Adaptive average pooling to ``bins x bins`` that traces with symbolic sizes (``kernels.adaptive_avg_pool``:
    the ONNX exporter would fix ``F.adaptive_avg_pool2d``'s kernel at the export size)."""

    def __init__(self, bins: int):
        super().__init__()
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool(x, (self.bins, self.bins))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: pool to each scale, 1x1 conv, upsample back, concat with the input, 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int], norm_layer: NormLayer):
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(AdaptivePool(scale), conv_norm_act(in_channels, channels, 1, norm_layer))
            for scale in pool_scales
        )
        self.bottleneck = conv_norm_act(in_channels + len(pool_scales) * channels, channels, 3, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize(level(x), x.shape[-2:]) for level in self.levels]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerNetDecoder(DecodeHead):
    """UPerNet: pyramid pooling on the coarsest map, top-down FPN, fusion of all levels at the finest.

    Args:
        in_channels: channels of the backbone's maps, finest first.
        num_classes: classes to predict.
        channels: width of every lateral, FPN and fusion convolution (512 in the papers' recipes).
        pool_scales: output sizes of the pyramid pooling.
        norm_layer: norm after each convolution.
        dropout: channel dropout before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm_layer: NormLayer = nn.BatchNorm2d,
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, range(len(in_channels)), dropout)
        *fine, coarsest = in_channels
        self.ppm = PyramidPooling(coarsest, channels, pool_scales, norm_layer)
        self.lateral_convs = nn.ModuleList(conv_norm_act(c, channels, 1, norm_layer) for c in fine)
        self.fpn_convs = nn.ModuleList(conv_norm_act(channels, channels, 3, norm_layer) for _ in fine)
        self.fuse = conv_norm_act(len(in_channels) * channels, channels, 3, norm_layer)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)] + [self.ppm(features[-1])]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.fuse(torch.cat([outs[0]] + [resize(x, size) for x in outs[1:]], dim=1))


class SemanticFPNDecoder(DecodeHead):
    """Semantic FPN: an FPN neck, then per level log2(stride / finest stride) conv + 2x upsampling steps, summed.

    As in mmsegmentation, each level is upsampled by exactly 2x per step and resized to the
    finest map's size only when summed (a no-op when the input divides by 32), so official
    checkpoints give mmsegmentation's outputs at any input size.

    Args:
        in_channels: channels of the backbone's maps, finest first.
        num_classes: classes to predict.
        strides: output strides of those maps.
        fpn_channels: channels of the FPN neck.
        channels: width of the per-level convolutions (128 in mmsegmentation's recipe).
        norm_layer: norm after each per-level convolution (the neck has none, as in mmsegmentation).
        dropout: channel dropout before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        strides: Sequence[int] = STAGE_STRIDES,
        fpn_channels: int = 256,
        channels: int = 128,
        norm_layer: NormLayer = nn.BatchNorm2d,
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, range(len(in_channels)), dropout)
        if len(strides) != len(in_channels):
            raise ValueError(f"{len(in_channels)} in_channels for {len(strides)} strides")
        self.neck = FeaturePyramidNetwork(list(in_channels), fpn_channels)
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            steps = max(1, round(math.log2(stride / strides[0])))
            self.scale_heads.append(
                nn.ModuleList(
                    conv_norm_act(fpn_channels if step == 0 else channels, channels, 3, norm_layer)
                    for step in range(steps)
                )
            )

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        pyramid = list(self.neck(OrderedDict((str(i), x) for i, x in enumerate(features))).values())
        out = None
        for level, (x, convs) in enumerate(zip(pyramid, self.scale_heads)):
            for conv in convs:
                x = conv(x)
                if level > 0:
                    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            out = x if out is None else out + resize(x, out.shape[-2:])
        return out


class FCNAuxHead(DecodeHead):
    """Auxiliary head: one 3x3 conv-norm-ReLU on a single map, then the classifier."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        in_index: int,
        channels: int = 256,
        norm_layer: NormLayer = nn.BatchNorm2d,
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, (in_index,), dropout)
        self.conv = conv_norm_act(in_channels, channels, 3, norm_layer)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(features[0])


class Segmenter(nn.Module):
    """Backbone, decoder and optional auxiliary head; logits come back at the input's size."""

    def __init__(self, backbone: FeatureBackbone, decoder: DecodeHead, aux_head: DecodeHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.aux_head = aux_head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images ``(B, 3, H, W)`` to ``{"out": (B, num_classes, H, W)}`` (plus ``"aux"``, same shape)."""
        features = self.backbone(x)
        outputs = {"out": resize(self.decoder(features), x.shape[-2:])}
        if self.aux_head is not None:
            outputs["aux"] = resize(self.aux_head(features), x.shape[-2:])
        return outputs


DECODERS: dict[str, type[DecodeHead]] = {"upernet": UPerNetDecoder, "semantic_fpn": SemanticFPNDecoder}

# mmsegmentation's module names (after a ConvModule's ``conv``/``bn`` became our 0/1) -> ours
_MMSEG_PREFIXES = (
    (r"decode_head\.conv_seg\.", "decoder.classifier."),
    (r"auxiliary_head\.conv_seg\.", "aux_head.classifier."),
    (r"auxiliary_head\.convs\.0\.", "aux_head.conv."),
    (r"decode_head\.psp_modules\.", "decoder.ppm.levels."),
    (r"decode_head\.bottleneck\.", "decoder.ppm.bottleneck."),
    (r"decode_head\.fpn_bottleneck\.", "decoder.fuse."),
    (r"decode_head\.(lateral_convs|fpn_convs)\.", r"decoder.\1."),
    (r"neck\.lateral_convs\.", "decoder.neck.inner_blocks."),
    (r"neck\.fpn_convs\.", "decoder.neck.layer_blocks."),
    # FPNHead interleaves conv modules and upsampling layers: conv k sits at index 2k
    (r"decode_head\.scale_heads\.(\d+)\.(\d+)\.", lambda m: f"decoder.scale_heads.{m[1]}.{int(m[2]) // 2}."),
)


def convert_mmseg_heads(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder, neck and auxiliary-head entries of an mmsegmentation UPerNet or Semantic FPN checkpoint,
    renamed for :class:`Segmenter` (load with ``strict=False``: backbone entries are left out, since each
    backbone family maps its own keys through timm)."""
    converted = {}
    for key, value in unwrap_state_dict(state_dict).items():
        key = re.sub(r"\.conv\.(?=[a-z_]+$)", ".0.", key)
        key = re.sub(r"\.bn\.(?=[a-z_]+$)", ".1.", key)
        for pattern, replacement in _MMSEG_PREFIXES:
            new_key, found = re.subn(f"^{pattern}", replacement, key)
            if found:
                converted[new_key] = value
                break
    return converted


def list_segmenters() -> list[str]:
    return sorted(DECODERS)


def create_segmenter(
    name: str,
    backbone: str,
    num_classes: int,
    *,
    aux_head: bool = False,
    aux_channels: int = 256,
    frozen_stages: int = -1,
    norm_eval: bool = False,
    out_norm: bool = False,
    norm_layer: NormLayer = nn.BatchNorm2d,
    backbone_kwargs: dict[str, Any] | None = None,
    **decoder_kwargs: Any,
) -> Segmenter:
    """Build the segmenter ``name`` (``upernet`` or ``semantic_fpn``) over the timm backbone ``backbone``.

    Args:
        name: the decoder.
        backbone: a timm model name with maps at strides 4, 8, 16 and 32.
        num_classes: classes to predict.
        aux_head: add :class:`FCNAuxHead` on the stride-16 map.
        aux_channels: width of the auxiliary head.
        frozen_stages: see :class:`~visionzoo.heads.features.FeatureBackbone`.
        norm_eval: keep the backbone's BatchNorm statistics fixed in training.
        out_norm: a LayerNorm on each backbone output (the det/seg backbones of Swin and NAT have one).
        norm_layer: norm of the decoder and auxiliary head.
        backbone_kwargs: for ``timm.create_model`` (``pretrained``, ``out_indices``, model options).
        **decoder_kwargs: for the decoder class (``channels``, ``pool_scales``, ``dropout``, ...).
    """
    key = name.strip().lower().replace("-", "_")
    if key not in DECODERS:
        raise ValueError(f"unknown segmenter {name!r}; valid: {', '.join(list_segmenters())}")
    body = FeatureBackbone(
        backbone,
        STAGE_STRIDES,
        frozen_stages=frozen_stages,
        norm_eval=norm_eval,
        out_norm=out_norm,
        head_name=key,
        **(backbone_kwargs or {}),
    )
    if key == "semantic_fpn":
        decoder_kwargs.setdefault("strides", body.strides)
    decoder = DECODERS[key](body.channels, num_classes, norm_layer=norm_layer, **decoder_kwargs)
    aux = None
    if aux_head:
        aux = FCNAuxHead(body.channels[2], num_classes, in_index=2, channels=aux_channels, norm_layer=norm_layer)
    return Segmenter(body, decoder, aux)
