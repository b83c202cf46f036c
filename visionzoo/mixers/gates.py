"""Gates (ECA, ELA) and the gated depthwise-convolution mixers built from them.

A gate rescales channels (ELA: channels at each row and column) but mixes no tokens, so as
a token mixer it follows a depthwise 7x7 convolution (the spatial mixing of ConvNeXt-style
blocks). Gates take NCHW maps, so they also serve as timm ``attn_layer`` classes:
``timm.create_model("resnet50", block_args=dict(attn_layer=EcaGate))``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import TokenMixer, register_mixer

__all__ = ["ELA_VARIANTS", "EcaGate", "EcaMixer", "ElaGate", "ElaMixer", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2.0, beta: float = 1.0) -> int:
    """ECA's adaptive kernel size: ``|log2(C) / gamma + beta / gamma|`` rounded down to the nearest odd."""
    size = int(abs((math.log2(channels) + beta) / gamma))
    return size if size % 2 else size + 1


class EcaGate(nn.Module):
    """Efficient Channel Attention (Wang et al., CVPR 2020) on NCHW maps.

    Global average pool, a 1D convolution across channels (no bias), sigmoid, rescale.

    Args:
        channels: channels of the map.
        kernel_size: the 1D kernel; the paper's adaptive size (:func:`eca_kernel_size`) when None.
        device: parameter device (timm passes it to attention layers).
        dtype: parameter dtype.
    """

    def __init__(self, channels: int, kernel_size: int | None = None, device=None, dtype=None):
        super().__init__()
        kernel_size = kernel_size or eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.conv(x.mean((2, 3)).unsqueeze(1)).sigmoid()
        return x * weights.view(x.shape[0], -1, 1, 1)


# ELA-T/B/S/L (Xu and Wan, 2024, Sec. 3.3): 1D kernel, channels per conv group, GroupNorm groups.
ELA_VARIANTS: dict[str, tuple[int, int, int]] = {"T": (5, 1, 32), "B": (7, 1, 16), "S": (5, 8, 16), "L": (7, 8, 16)}


class ElaGate(nn.Module):
    """Efficient Local Attention (Xu and Wan, 2024) on NCHW maps, as the paper defines it.

    Average-pool along W (one vector per row) and along H (one per column); the same 1D
    convolution over positions (no bias) and the same GroupNorm serve both directions,
    then a sigmoid: ``x * a_h * a_w``, with no channel reduction.

    Args:
        channels: channels of the map.
        variant: ``T``, ``B``, ``S`` or ``L`` (:data:`ELA_VARIANTS`): kernel 5/7/5/7, depthwise
            convolution for T and B and 8 channels per group for S and L, 32/16/16/16 norm groups.
        device: parameter device (timm passes it to attention layers).
        dtype: parameter dtype.
    """

    def __init__(self, channels: int, variant: str = "B", device=None, dtype=None):
        super().__init__()
        if variant not in ELA_VARIANTS:
            raise ValueError(f"unknown ELA variant {variant!r}; valid: {', '.join(ELA_VARIANTS)}")
        kernel_size, group_width, norm_groups = ELA_VARIANTS[variant]
        if channels % group_width or channels % norm_groups:
            raise ValueError(
                f"ELA-{variant} needs channels divisible by {group_width} and {norm_groups}, got {channels}"
            )
        self.variant = variant
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2,
                              groups=channels // group_width, bias=False, device=device, dtype=dtype)  # fmt: skip
        self.norm = nn.GroupNorm(norm_groups, channels, device=device, dtype=dtype)

    def _attend(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(pooled)).sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._attend(x.mean(3))  # (B, C, H)
        cols = self._attend(x.mean(2))  # (B, C, W)
        return x * rows.unsqueeze(3) * cols.unsqueeze(2)


class _GatedConvMixer(TokenMixer):
    """Depthwise ``kernel_size`` convolution, then a channel gate, on channels-last maps."""

    def __init__(self, dim: int, gate: nn.Module, kernel_size: int = 7, num_heads: int | None = None):
        super().__init__(dim)  # num_heads: accepted for the mixer contract; gates have no heads
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.gate = gate

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.dwconv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


@register_mixer("eca")
class EcaMixer(_GatedConvMixer):
    """Depthwise 7x7 convolution gated by ECA.

    Args:
        dim: channels.
        kernel_size: depthwise convolution size.
        eca_kernel_size: ECA's 1D kernel; adaptive when None.
        num_heads: ignored (no heads).
    """

    def __init__(
        self, dim: int, kernel_size: int = 7, eca_kernel_size: int | None = None, num_heads: int | None = None
    ):
        super().__init__(dim, EcaGate(dim, eca_kernel_size), kernel_size, num_heads)


@register_mixer("ela")
class ElaMixer(_GatedConvMixer):
    """Depthwise 7x7 convolution gated by ELA.

    Args:
        dim: channels.
        kernel_size: depthwise convolution size.
        ela_variant: ``T``, ``B``, ``S`` or ``L``.
        num_heads: ignored (no heads).
    """

    def __init__(self, dim: int, kernel_size: int = 7, ela_variant: str = "B", num_heads: int | None = None):
        super().__init__(dim, ElaGate(dim, ela_variant), kernel_size, num_heads)
        if self.gate.norm.num_groups == dim:  # one channel per norm group: GroupNorm needs 2 positions a row/column
            self.min_size = (2, 2)
