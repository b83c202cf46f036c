"""Bi-level routing attention (BiFormer) and BiFormer's last-stage global attention as token mixers."""

from __future__ import annotations

import torch
from torch import nn

from visionzoo.kernels import bilevel_routing_attention, bilevel_routing_attention_weights, crop_map

from .global_attention import DenseAttentionMixer
from .registry import MultiHeadMixer, check_sizes, query_map, register_mixer

__all__ = ["GlobalLePEAttention", "RoutingAttention"]


def _lepe_conv(dim: int, kernel_size: int) -> nn.Conv2d | None:
    """Local context enhancement: a depthwise ``kernel_size`` convolution, None when 0."""
    if kernel_size < 0 or (kernel_size and kernel_size % 2 == 0):
        raise ValueError(f"side_dwconv must be 0 or an odd size, got {kernel_size}")
    return nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim) if kernel_size else None


def _apply_lepe(conv: nn.Conv2d | None, x: torch.Tensor) -> torch.Tensor | int:
    """The conv on a channels-last map, or 0 without one."""
    return 0 if conv is None else conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


@register_mixer("routing")
class RoutingAttention(MultiHeadMixer):
    """Bi-level routing attention: each region of an ``n_win x n_win`` grid attends to its ``topk`` regions.

    As the official ``ops/bra_legacy.py`` (the released checkpoints): one joint ``qkv``
    projection, logits scaled by ``dim ** -0.5`` (all heads' channels, not one head's), and
    a depthwise ``side_dwconv`` convolution of V (``lepe``) added to the attention output
    before ``proj`` (the official ``wo``). Any map size: the map is zero-padded to a multiple
    of ``n_win`` after the norm; padded tokens are left out of the routing means and the
    attention, and the convolution sees only the real map.

    Args:
        dim: channels.
        num_heads: attention heads; ``dim // head_dim`` when None.
        n_win: regions per side.
        topk: routed regions per query region.
        side_dwconv: LePE kernel size; 0 disables it.
        head_dim: channels per head when ``num_heads`` is None.
        qkv_bias: bias on the query/key/value projection.
        backend: kernel backend (``auto``, ``reference``, ``flex``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        n_win: int = 7,
        topk: int = 4,
        side_dwconv: int = 5,
        head_dim: int = 32,
        qkv_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, head_dim, qkv_bias, backend)
        check_sizes(positive={"n_win": n_win, "topk": topk})
        self.n_win, self.topk = n_win, topk
        self.scale = dim**-0.5
        self.lepe = _lepe_conv(dim, side_dwconv)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        (q, k, v), size = self.padded_qkv_heads(x, self.n_win)
        out = bilevel_routing_attention(
            q, k, v, self.n_win, self.topk, self.scale, valid_size=size, backend=self.kernel_backend
        )
        out = crop_map(self.merge_heads(out), size)
        return self.proj(out + _apply_lepe(self.lepe, crop_map(self.merge_heads(v), size)))

    def query_attention(self, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        """Attention weights ``(heads, H, W)`` of the token ``query`` (row, col) of ``x`` ``(1, H, W, C)``:
        over the real tokens of its region's routed regions, zero elsewhere."""
        (q, k, _), size = self.padded_qkv_heads(x, self.n_win)
        weights, keys = bilevel_routing_attention_weights(q, k, self.n_win, self.topk, self.scale, valid_size=size)
        return query_map(weights, keys, query, size)


@register_mixer("global_lepe")
class GlobalLePEAttention(DenseAttentionMixer):
    """Global attention plus a depthwise convolution of the mixer's input (BiFormer's last stage).

    The official ``AttentionLePE`` (``models/_common.py``, used where ``topk == -2``): no
    ``qkv`` bias, logits scaled by ``head_dim ** -0.5``, and the ``side_dwconv`` convolution
    applied to the input map (not to V), added before ``proj``.

    Args:
        dim: channels.
        num_heads: attention heads; ``dim // head_dim`` when None (BiFormer: 8).
        side_dwconv: LePE kernel size; 0 disables it.
        head_dim: channels per head when ``num_heads`` is None.
        qkv_bias: bias on the query/key/value projection.
        backend: kernel backend for the dense attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        side_dwconv: int = 5,
        head_dim: int = 32,
        qkv_bias: bool = False,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, head_dim, qkv_bias, backend)
        self.lepe = _lepe_conv(dim, side_dwconv)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.merge_heads(self.attend(x)) + _apply_lepe(self.lepe, x))
