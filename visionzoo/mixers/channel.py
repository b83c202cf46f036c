"""Channel group attention (DaViT) as a token mixer."""

from __future__ import annotations

import torch

from visionzoo.kernels import dense_attention

from .registry import MultiHeadMixer, register_mixer

__all__ = ["ChannelAttention"]


@register_mixer("channel")
class ChannelAttention(MultiHeadMixer):
    """Attention among channels: each group of ``head_dim`` channels (DaViT's heads) is a set of channel
    tokens whose features are the map's ``H * W`` positions, so the cost is linear in tokens and every
    output channel sees the whole image.

    Numerically timm's ``davit.ChannelAttention`` (the official DaViT code) given the same ``qkv`` and
    ``proj`` weights: within a group, ``softmax(scale * k^T v)`` (``head_dim x head_dim``) weighs ``q``,
    with ``scale = head_dim ** -0.5``. One ``dense_attention`` call over the channel tokens (keys as the
    queries, values as the keys, queries as the values), so ``auto`` runs it as one
    ``scaled_dot_product_attention``.

    Args:
        dim: channels.
        num_heads: channel groups; ``dim // head_dim`` when None.
        head_dim: channels per group when ``num_heads`` is None.
        qkv_bias: bias on the query/key/value projection (timm and DaViT: False).
        backend: kernel backend (``auto``, ``reference``, ``sdpa``).
    """

    def __init__(
        self, dim: int, num_heads: int | None = None, head_dim: int = 32, qkv_bias: bool = False, backend: str = "auto"
    ):
        super().__init__(dim, num_heads, head_dim, qkv_bias, backend)
        self.scale = self.head_dim**-0.5

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.flatten(2, 3).transpose(-2, -1) for t in self.qkv_heads(x))  # (B, heads, head_dim, H * W)
        out = dense_attention(k, v, q, scale=self.scale, backend=self.kernel_backend)
        return self.proj(self.merge_heads(out.transpose(-2, -1).unflatten(2, x.shape[1:3])))
