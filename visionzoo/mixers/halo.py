"""Halo attention (HaloNet) as a token mixer."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from visionzoo.kernels import halo_attention

from .registry import HeadedMixer, check_sizes, register_mixer

__all__ = ["HaloAttention"]


@register_mixer("halo")
class HaloAttention(HeadedMixer):
    """Blocked local self-attention with a halo, parameterised like timm's ``HaloAttn``.

    ``q`` and ``kv`` are timm's 1x1 convolutions as linear layers (``kv`` holds each head's
    key then value channels, as timm lays them out) and ``rel_height``/``rel_width`` its
    ``pos_embed.height_rel``/``width_rel``. Unlike timm's layer, which is used inside a
    bottleneck, the mixer ends with an output projection (``proj=False`` drops it). Any map
    size: ``halo_attention`` zero-pads the keys and values to a multiple of the block size.

    Args:
        dim: channels.
        num_heads: attention heads; ``dim // head_dim`` when None.
        block_size: query block b.
        halo_size: halo h around each block.
        head_dim: channels per head when ``num_heads`` is None.
        qkv_bias: bias on the query and key/value projections (timm: False).
        proj: end with a linear output projection.
        backend: kernel backend.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        block_size: int = 8,
        halo_size: int = 3,
        head_dim: int = 32,
        qkv_bias: bool = False,
        proj: bool = True,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, head_dim, backend)
        check_sizes(positive={"block_size": block_size}, non_negative={"halo_size": halo_size})
        self.block_size, self.halo_size = block_size, halo_size
        window = block_size + 2 * halo_size
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.rel_height = nn.Parameter(torch.zeros(2 * window - 1, self.head_dim))
        self.rel_width = nn.Parameter(torch.zeros(2 * window - 1, self.head_dim))
        for table in (self.rel_height, self.rel_width):
            trunc_normal_(table, std=self.head_dim**-0.5)
        self.proj = nn.Linear(dim, dim) if proj else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return {"rel_height", "rel_width"}

    @torch.no_grad()
    def load_timm_weights(self, layer: nn.Module) -> None:
        """Copy the weights of a ``timm.layers.halo_attn.HaloAttn`` of the same sizes (stride 1)."""
        self.q.weight.copy_(layer.q.weight[:, :, 0, 0])
        self.kv.weight.copy_(layer.kv.weight[:, :, 0, 0])
        for ours, theirs in ((self.q, layer.q), (self.kv, layer.kv)):
            if ours.bias is not None:
                ours.bias.copy_(theirs.bias)
        self.rel_height.copy_(layer.pos_embed.height_rel)
        self.rel_width.copy_(layer.pos_embed.width_rel)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        (q,) = self.split_heads(self.q(x))
        k, v = self.split_heads(self.kv(x), 2, heads_first=True)
        out = halo_attention(
            q, k, v, self.block_size, self.halo_size, self.rel_height, self.rel_width, backend=self.kernel_backend
        )
        return self.proj(self.merge_heads(out))
