"""Global multi-head self-attention over every token of the map (ViT-style)."""

from __future__ import annotations

import torch
from torch import nn

from visionzoo.kernels import dense_attention

from .registry import TokenMixer, register_mixer

__all__ = ["GlobalAttention"]


@register_mixer("global")
class GlobalAttention(TokenMixer):
    """Every token attends to every token: memory quadratic in tokens.

    Args:
        dim: channels.
        num_heads: attention heads; ``dim // head_dim`` when None.
        head_dim: channels per head when ``num_heads`` is None.
        qkv_bias: bias on the query/key/value projection.
        backend: kernel backend for the attention (``"auto"``, ``"reference"``, ``"sdpa"``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        head_dim: int = 32,
        qkv_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__(dim, backend)
        self.num_heads = num_heads or max(dim // head_dim, 1)
        if dim % self.num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {self.num_heads}")
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = dense_attention(q, k, v, backend=self.kernel_backend)
        x = x.transpose(1, 2).reshape(batch, height, width, channels)
        return self.proj(x)
