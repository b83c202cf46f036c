"""Stem, downsampling and channel mixers shared by every family.

All of them take and return channels-last maps ``(B, H, W, C)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import Mlp, register_notrace_module
from torch import nn

__all__ = [
    "CHANNEL_MIXERS",
    "BatchNormCl",
    "ConvGLU",
    "ConvStem",
    "Downsample",
    "PatchEmbedStem",
    "create_channel_mixer",
]


@register_notrace_module  # FX: BatchNorm2d's forward checks the input's dims
class BatchNormCl(nn.BatchNorm2d):
    """``BatchNorm2d`` over a channels-last map ``(B, H, W, C)``, with BatchNorm2d's parameter names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvStem(nn.Module):
    """Overlapping patch embedding, stride 4: two 3x3 stride-2 convolutions, then a norm (NAT's tokenizer).

    With ``act_layer`` the first convolution is followed by a norm and the activation
    (``norm1``, ``act``), as in UniFormer's and BiFormer's stems.
    """

    def __init__(
        self,
        in_chans: int,
        dim: int,
        norm_layer: Callable[[int], nn.Module],
        act_layer: Callable[[], nn.Module] | None = None,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1)
        if act_layer is not None:
            self.norm1 = norm_layer(dim // 2)
            self.act = act_layer()
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW image in, channels-last map out."""
        x = self.conv1(x)
        if hasattr(self, "act"):
            x = self.act(self.norm1(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = self.conv2(x)
        return self.norm(x.permute(0, 2, 3, 1))


class PatchEmbedStem(nn.Module):
    """Overlapping patch embedding, stride 4, in one ``kernel_size`` convolution, then a norm (TransNeXt, PVTv2)."""

    def __init__(self, in_chans: int, dim: int, norm_layer: Callable[[int], nn.Module], kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=kernel_size, stride=4, padding=kernel_size // 2)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW image in, channels-last map out."""
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """Halves H and W with a 3x3 stride-2 convolution, then a norm (NAT's downsampler)."""

    def __init__(self, in_dim: int, out_dim: int, norm_layer: Callable[[int], nn.Module], bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1, bias=bias)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.permute(0, 3, 1, 2))
        return self.norm(x.permute(0, 2, 3, 1))


class ConvGLU(nn.Module):
    """Convolutional GLU (TransNeXt): the gate branch passes a depthwise 3x3 conv and the activation.

    ``hidden_features`` is shrunk to two thirds, as in the paper, so that the two input
    projections cost what one MLP projection of the nominal width costs.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        hidden = int(2 * (hidden_features or in_features) / 3)
        self.fc1 = nn.Linear(in_features, hidden * 2)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        gate = self.dwconv(gate.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(self.act(gate) * value)


CHANNEL_MIXERS: dict[str, Callable[..., nn.Module]] = {"mlp": Mlp, "conv_glu": ConvGLU}


def create_channel_mixer(name: str, dim: int, mlp_ratio: float) -> nn.Module:
    """Build the channel mixer ``name`` (``mlp`` or ``conv_glu``) with hidden width ``dim * mlp_ratio``."""
    try:
        cls = CHANNEL_MIXERS[name.strip().lower().replace("-", "_")]
    except KeyError:
        raise ValueError(f"unknown channel mixer {name!r}; valid: {', '.join(sorted(CHANNEL_MIXERS))}") from None
    return cls(dim, hidden_features=int(dim * mlp_ratio))
