"""Neighborhood attention (NAT) and dilated neighborhood attention (DiNAT) as a token mixer."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from visionzoo.kernels import crop_map, neighborhood_attention, neighborhood_attention_weights

from .registry import MultiHeadMixer, check_sizes, query_map, register_mixer

__all__ = ["NeighborhoodAttention"]


@register_mixer("neighborhood")
class NeighborhoodAttention(MultiHeadMixer):
    """Each token attends to its ``kernel_size x kernel_size`` neighbourhood (dilated by ``dilation``).

    Maps smaller than ``kernel_size * dilation`` are zero-padded at the bottom and right
    before the projections and cropped after, as the official NAT/DiNAT do, so any map of
    at least 1x1 works. Parameter names follow the official code (``qkv``, ``rpb``, ``proj``).

    Args:
        dim: channels.
        num_heads: attention heads; ``dim // head_dim`` when None.
        kernel_size: odd window size.
        dilation: spacing of the window's keys (DiNAT).
        rel_pos_bias: learn a relative position bias table per head.
        head_dim: channels per head when ``num_heads`` is None.
        qkv_bias: bias on the query/key/value projection.
        backend: kernel backend (``auto``, ``reference``, ``tiled``, ``natten``, ``flex``, ``triton``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        kernel_size: int = 7,
        dilation: int = 1,
        rel_pos_bias: bool = True,
        head_dim: int = 32,
        qkv_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, head_dim, qkv_bias, backend)
        check_sizes(odd={"kernel_size": kernel_size}, positive={"dilation": dilation})
        self.kernel_size, self.dilation = kernel_size, dilation
        self.scale = self.head_dim**-0.5
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(self.num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.rpb = None

    def no_weight_decay(self) -> set[str]:
        return {"rpb"} if self.rpb is not None else set()

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        (q, k, v), size = self.padded_qkv_heads(x, min_size=self.kernel_size * self.dilation)
        out = neighborhood_attention(
            q, k, v, self.kernel_size, self.dilation, self.rpb, scale=self.scale, backend=self.kernel_backend
        )
        return self.proj(crop_map(self.merge_heads(out), size))

    def query_attention(self, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        """Attention weights ``(heads, H, W)`` of the token ``query`` (row, col) of ``x`` ``(1, H, W, C)``:
        its window's, zero elsewhere."""
        (q, k, _), size = self.padded_qkv_heads(x, min_size=self.kernel_size * self.dilation)
        weights, keys = neighborhood_attention_weights(q, k, self.kernel_size, self.dilation, self.rpb, self.scale)
        return query_map(weights, keys, query, size)
