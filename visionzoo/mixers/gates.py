"""Channel gates (ECA) and the gated depthwise-convolution mixers built from them.

A gate rescales channels but mixes no tokens, so as a token mixer it follows a depthwise
7x7 convolution (the spatial mixing of ConvNeXt-style blocks). Gates take NCHW maps, so
they also serve as timm ``attn_layer`` classes:
``timm.create_model("resnet50", block_args=dict(attn_layer=EcaGate))``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import TokenMixer, register_mixer

__all__ = ["EcaGate", "EcaMixer", "eca_kernel_size"]


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
