"""TransNeXt's token mixers: aggregated attention and its full-attention counterpart.

Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers" (CVPR 2024);
reference code DaiShiResearch/TransNeXt (``classification/transnext.py``,
``attention_native.py``). Parameter names follow the official modules, so checkpoints map
by renaming the module prefix only.

Unlike the official classes, which fix the pool size, the padding mask, the length scale
and the CPB coordinates from the input size given at construction, these mixers derive all
of them from the actual map (cached per size): at the construction size the numbers are
the official ones, and any other size works too. With symbolic sizes (``torch.export``, ONNX,
dynamic ``torch.compile``) they are computed in the graph, so one graph serves every size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from visionzoo.kernels import (
    adaptive_avg_pool,
    aggregated_attention,
    dense_attention,
    dispatch,
    gather_pool_bias,
    pooled_position_coords,
)
from visionzoo.kernels.aggregated import empty_pool_cells
from visionzoo.kernels.tiles import tile_chunks
from visionzoo.kernels.windows import all_int, sym_max

from .registry import HeadedMixer, check_sizes, register_mixer

__all__ = ["AggregatedAttention", "CosineGlobalAttention"]

_CPB_HIDDEN = 512
_CPB_CHUNK_ELEMENTS = 1 << 21  # hidden values of the CPB MLP per chunk: 8 MiB in float32
_INITIAL_TEMPERATURE = 1 / 0.24


def _log_tokens(tokens, like: torch.Tensor):
    """``log(tokens)``: a Python float for an int, else computed in the graph (in float64, rounded as the float is)."""
    if isinstance(tokens, int):
        return math.log(tokens)
    return like.new_full((), tokens, dtype=torch.float64).log().to(like.dtype)


def _pair(value: int | tuple[int, int] | None) -> tuple[int, int] | None:
    return (value, value) if isinstance(value, int) else (tuple(value) if value is not None else None)


class _LengthScaledCosineAttention(HeadedMixer):
    """What both TransNeXt mixers share: temperature, query embedding, the CPB MLP and ``proj``.

    Args:
        dim: channels.
        num_heads: attention heads; ``dim // head_dim`` when None.
        pretrain_size: map size (H, W) at pre-training, which scales the CPB coordinates
            (TransNeXt at 224x224: 56, 28, 14, 7 by stage); None uses the actual map size.
        head_dim: channels per head when ``num_heads`` is None.
        backend: kernel backend.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None,
        pretrain_size: int | tuple[int, int] | None,
        head_dim: int,
        backend: str,
    ):
        super().__init__(dim, num_heads, head_dim, backend)
        self.pretrain_size = _pair(pretrain_size)
        if self.pretrain_size is not None and min(self.pretrain_size) < 2:
            raise ValueError(f"pretrain_size must be at least 2x2, got {pretrain_size}")
        # softplus(temperature) starts at 1 / 0.24
        self.temperature = nn.Parameter(torch.full((self.num_heads, 1, 1), math.log(math.expm1(_INITIAL_TEMPERATURE))))
        self.query_embedding = nn.Parameter(torch.zeros(self.num_heads, 1, self.head_dim))
        trunc_normal_(self.query_embedding, std=0.02)
        self.cpb_fc1 = nn.Linear(2, _CPB_HIDDEN)
        self.cpb_act = nn.ReLU()
        self.cpb_fc2 = nn.Linear(_CPB_HIDDEN, self.num_heads)
        self.proj = nn.Linear(dim, dim)

    def no_weight_decay(self) -> set[str]:
        skip = {"temperature", "query_embedding"}
        return skip | {f"{fc}.{p}" for fc in ("cpb_fc1", "cpb_fc2") for p in ("weight", "bias")}

    def position_bias(
        self, size: tuple[int, int], pool_size: tuple[int, int], empty: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Continuous position bias of the (query, pooled key) pairs, factored as :func:`aggregated_attention`
        takes it: the CPB MLP's table ``(heads, U_h, U_w)`` and the indices ``(H, ph)`` and ``(W, pw)`` into it.
        With ``empty`` cells after each axis's pooled ones (``adaptive_avg_pool``), ``-inf`` on those (masked
        out): the table's row and column past its end, where their indices point."""
        pretrain = self.pretrain_size or (sym_max(size[0], 2), sym_max(size[1], 2))
        device = self.cpb_fc1.weight.device
        coords, rows, cols = pooled_position_coords(size, pool_size, pretrain, device, empty)
        table = self._cpb_mlp(coords.to(self.cpb_fc1.weight.dtype)).permute(2, 0, 1)
        if empty:
            table = F.pad(table, (0, empty, 0, empty), value=float("-inf"))
        return table.contiguous(), rows, cols

    def _cpb_mlp(self, coords: torch.Tensor) -> torch.Tensor:
        """The CPB MLP on ``(U_h, U_w, 2)`` coordinates, a few rows at a time where its hidden layer would be large
        (800x1333 images: 2^28 hidden values at stage 1, whose fresh buffers cost more than the arithmetic)."""
        chunked = all_int(*coords.shape) and coords.shape[0] * coords.shape[1] * _CPB_HIDDEN > _CPB_CHUNK_ELEMENTS
        parts = coords.split(max(1, _CPB_CHUNK_ELEMENTS // (coords.shape[1] * _CPB_HIDDEN))) if chunked else (coords,)
        outs = [self.cpb_fc2(self.cpb_act(self.cpb_fc1(part))) for part in parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def logit_scale(self) -> torch.Tensor:
        return F.softplus(self.temperature).reshape(self.num_heads)

    def merge_and_project(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B, heads, H, W, head_dim)`` or ``(B, heads, H*W, head_dim)`` to ``(B, H, W, C)``, then ``proj``."""
        batch = x.shape[0]
        x = x.reshape(batch, self.num_heads, *size, self.head_dim).permute(0, 2, 3, 1, 4)
        return self.proj(x.reshape(batch, *size, self.dim))


@register_mixer("aggregated")
class AggregatedAttention(_LengthScaledCosineAttention):
    """Aggregated attention: a ``window_size`` sliding window plus ``(H // sr) x (W // sr)`` pooled tokens.

    The pooled tokens are ``LayerNorm(AdaptiveAvgPool(GELU(sr(x))))`` with ``sr`` a 1x1
    convolution, projected by the same ``kv`` as the window keys. Maps need at least
    ``sr_ratio`` rows and columns (one pooled token).

    Args:
        dim: channels.
        num_heads: attention heads; ``dim // head_dim`` when None.
        window_size: odd side of the sliding window.
        sr_ratio: pooling ratio: the pooled map is ``(H // sr_ratio, W // sr_ratio)``.
        pretrain_size: map size at pre-training for the CPB coordinates; None: the actual size.
        head_dim: channels per head when ``num_heads`` is None.
        qkv_bias: bias on the ``q`` and ``kv`` projections.
        backend: kernel backend (``auto``, ``reference``, ``tiled``, ``flex``, ``triton``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        window_size: int = 3,
        sr_ratio: int = 8,
        pretrain_size: int | tuple[int, int] | None = None,
        head_dim: int = 32,
        qkv_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, pretrain_size, head_dim, backend)
        check_sizes(odd={"window_size": window_size}, positive={"sr_ratio": sr_ratio})
        self.window_size, self.sr_ratio = window_size, sr_ratio
        self.min_size = (sr_ratio, sr_ratio)
        local_len = window_size**2
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()
        self.relative_pos_bias_local = nn.Parameter(torch.zeros(self.num_heads, local_len))
        trunc_normal_(self.relative_pos_bias_local, std=0.0004)
        self.learnable_tokens = nn.Parameter(torch.zeros(self.num_heads, self.head_dim, local_len))
        trunc_normal_(self.learnable_tokens, std=0.02)
        self.learnable_bias = nn.Parameter(torch.zeros(self.num_heads, 1, local_len))

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"relative_pos_bias_local"}

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        pool_size = (height // self.sr_ratio, width // self.sr_ratio)
        empty = empty_pool_cells(height, width)  # exported: an empty, masked pooled row and column
        (q,) = self.split_heads(self.q(x))
        k, v = self.split_heads(self.kv(x), 2)
        pooled = adaptive_avg_pool(self.act(self.sr(x.permute(0, 3, 1, 2))), pool_size, empty)
        pooled = self.kv(self.norm(pooled.permute(0, 2, 3, 1)))  # channels-last (B, ph, pw, 2C)
        k_pool, v_pool = (t.flatten(2, 3) for t in self.split_heads(pooled, 2))
        out = aggregated_attention(
            q,
            k,
            v,
            k_pool,
            v_pool,
            self.query_embedding.reshape(self.num_heads, self.head_dim),
            self.logit_scale(),
            self.relative_pos_bias_local,
            *self.position_bias((height, width), pool_size, empty),
            self.learnable_tokens,
            self.learnable_bias.reshape(self.num_heads, -1),
            self.window_size,
            backend=self.kernel_backend,
        )
        return self.merge_and_project(out, (height, width))


@register_mixer("cosine_global")
class CosineGlobalAttention(_LengthScaledCosineAttention):
    """TransNeXt's full attention (its last stage): length-scaled cosine attention over all tokens.

    Logits ``(normalize(q) + query_embedding) * softplus(temperature) * log(H*W)`` against
    normalised keys, plus the continuous position bias of every token pair.

    Args:
        dim: channels.
        num_heads: attention heads; ``dim // head_dim`` when None.
        pretrain_size: map size at pre-training for the CPB coordinates; None: the actual size.
        head_dim: channels per head when ``num_heads`` is None.
        qkv_bias: bias on the ``qkv`` projection.
        backend: kernel backend of the dense attention (``auto``, ``reference``, ``sdpa``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        pretrain_size: int | tuple[int, int] | None = None,
        head_dim: int = 32,
        qkv_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, pretrain_size, head_dim, backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        tokens = height * width
        q, k, v = (t.flatten(2, 3) for t in self.split_heads(self.qkv(x), 3))
        q = (F.normalize(q, dim=-1) + self.query_embedding) * self.logit_scale().reshape(-1, 1, 1)
        q, k = q * _log_tokens(tokens, q), F.normalize(k, dim=-1)
        table, rows, cols = self.position_bias((height, width), (height, width))

        def attend(first=None, end=None):  # the queries in [first, end), or all of them
            positions = None if first is None else torch.arange(first, end, device=q.device)
            bias = gather_pool_bias(table, rows, cols, positions).to(q.dtype)
            queries = q if first is None else q[:, :, first:end]
            return dense_attention(queries, k, v, bias, scale=1.0, backend=self.kernel_backend)

        if dispatch.needs_grad(q, k, v, table) or not all_int(tokens) or dispatch.is_exporting():
            out = attend()
        else:  # inference: the logits and biases of a few query rows at a time, memory linear in tokens
            row_bytes = 2 * q.shape[0] * self.num_heads * tokens * q.element_size()
            parts = [attend(first, end) for first, end, _ in tile_chunks(tokens, row_bytes)]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
        return self.merge_and_project(out, (height, width))
