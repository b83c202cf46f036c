"""Aggregated attention (TransNeXt): a sliding window and pooled tokens under one softmax.

Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers" (CVPR 2024);
reference code DaiShiResearch/TransNeXt (``classification/attention_native.py``).

Each query ``i`` attends, under a single softmax, to

- its ``window x window`` neighbours (zero-padded at the border, padded keys masked out)
  with a learnable relative position bias ``rpb``, and
- ``P = ph x pw`` pooled tokens with a position bias given factored, as TransNeXt's continuous
  position bias is (see :func:`pooled_position_coords`): a table ``cpb`` ``(heads, U_h, U_w)`` and
  per-axis indices ``cpb_rows`` ``(H, ph)`` and ``cpb_cols`` ``(W, pw)``, the bias of the pair
  (query ``(y, x)``, pooled token ``(i, j)``) being ``cpb[:, cpb_rows[y, i], cpb_cols[x, j]]``
  (:func:`gather_pool_bias`). So the ``(heads, H*W, P)`` biases, the largest tensor of a
  detection-sized forward, need not exist at once: the ``tiled`` backend gathers them a few tiles at
  a time (any bias is one table of ``H*ph x W*pw``). A pooled token whose bias is ``-inf`` for every
  query is masked out: the ``reference``, ``flex`` and ``tiled`` backends leave it out of ``P`` in the
  length scale too (an exported graph pads the pooled grid so; ``triton`` counts every token).

Logits are length-scaled cosine similarities: ``q_hat = (normalize(q) + query_embedding) *
logit_scale * log(n_i + P)`` against normalised keys, where ``n_i`` is the number of
in-image window positions of query ``i``. After the softmax, the learnable tokens'
affinities ``normalize(q) @ learnable_tokens + learnable_bias`` are added to the window
weights (the paper's "dynamic local bias"), exactly in the order of the official code.

Tensors are ``(B, heads, H, W, head_dim)``; pooled keys/values ``(B, heads, P, head_dim)``, row-major.
Backends:

- ``reference``: windows stacked from ``window**2`` shifted views of the padded keys and
  values (gathered by an index table when sizes are symbolic), so memory is
  O(H*W*(window**2 + P)) per head: no (HW x HW) matrix.
- ``flex``: ``flex_attention`` over the concatenated window and pooled keys with a block
  mask of the windows and both biases as a score modification; the learnable-token term
  is added outside. Only when forced (not yet measured on a GPU). On CPU it runs forward
  only and unfused (the full score matrix), so it declines there above 1 GiB of scores.
- ``triton``: one fused kernel (``triton_aggregated.py``): window and pooled logits, both
  biases, one online softmax, the learnable-token term and both value sums, with a fused
  backward; no (queries x keys) matrix in memory, but the gathered ``(heads, H*W, P)`` biases.
  Head dims 16..128, float32/16, bfloat16.

- ``tiled``: dense batched matrix multiplies over query tiles (``tiles.py``): each tile's queries
  against the ``(T + window - 1)^2`` keys around them and the pooled keys under one softmax, the
  RPB and ``-inf`` off the windows as one bias per tile pattern, the learnable-token weights added
  at their key slots; fp32/fp64, autograd backward; inference a few tiles at a time, pooled biases
  gathered per chunk of tiles.

``auto`` picks ``triton`` on CUDA where it runs, else ``tiled`` on CPU for fp32/fp64, else
``reference``; ``flex`` only when forced.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import dispatch
from .dispatch import Capability, Support
from .geometry import cached_geometry as _cached_geometry
from .geometry import check_window_size as _check_window
from .geometry import length_scale
from .geometry import scaled_queries as _scaled_queries
from .geometry import window_mask as _window_geometry
from .tiles import (
    add_pattern_bias,
    can_lay_out,
    centred_window_padding,
    centred_window_tiles,
    tile_bias,
    tile_chunks,
    tile_slots,
)
from .windows import all_int, pool_cells

__all__ = [
    "aggregated_attention",
    "aggregated_attention_reference",
    "aggregated_attention_unfold",
    "empty_pool_cells",
    "gather_pool_bias",
    "length_scale",
    "pooled_position_coords",
]


def empty_pool_cells(height, width) -> int:
    """Empty cells to append to each pooled axis (:func:`adaptive_avg_pool`): one when exporting with symbolic
    sizes, where a pooled side of 1 would make ``torch.export`` specialise the graph (it assumes no size is 1)."""
    return int(dispatch.is_exporting() and not all_int(height, width))


@_cached_geometry
def _unique_axis_coords(length: int, pooled: int, pretrain: int, device: torch.device):
    """:func:`_axis_coords` for int sizes: exactly the offsets that occur, found in Python."""
    # adaptive pooling's cell j spans [floor(j L / p), ceil((j + 1) L / p)): its mean position
    centres = [((j * length) // pooled + -(-(j + 1) * length // pooled) - 1) / 2 for j in range(pooled)]
    offsets = [[i - c for c in centres] for i in range(length)]
    unique = sorted({d for row in offsets for d in row})
    position = {d: n for n, d in enumerate(unique)}
    index = torch.tensor([[position[d] for d in row] for row in offsets], device=device)
    return torch.tensor(unique, dtype=torch.float32, device=device) / (pretrain - 1) * 8, index


def _axis_coords(length, pooled, pretrain, empty: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled offsets along one axis between queries and pooled-cell centres ``(U,)``, and the index
    ``(length, pooled + empty)`` of each pair's offset in them (``U`` for an empty cell: one past the end).

    Offsets are half-integers; the scaling runs in float32 as in the official code
    (``adaptive_avg_pool1d`` of the positions). Int sizes list only the offsets that occur; symbolic
    ones every half-integer in ``[1 - L, L - 1]`` (about twice as many, the same values), so that the
    table's length is a plain function of the size.
    """
    if all_int(length, pooled, pretrain) and not empty:
        return _unique_axis_coords(length, pooled, pretrain, device)
    start, end = pool_cells(length, pooled, device, empty)
    # twice the offset of query i from cell j's centre (start + end - 1) / 2: an integer in [2 - 2L, 2L - 2]
    doubled = 2 * torch.arange(length, device=device)[:, None] - (start + end - 1)
    offsets = torch.arange(4 * length - 3, device=device).float() / 2 + (1 - length)
    is_empty = torch.arange(pooled + empty, device=device) >= pooled
    index = (doubled + (2 * length - 2)).clamp(min=0).masked_fill(is_empty, 4 * length - 3)
    return offsets / (pretrain - 1) * 8, index


def pooled_position_coords(
    size: tuple[int, int], pool_size: tuple[int, int], pretrain_size: tuple[int, int], device=None, empty: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-spaced relative coordinates of every (query, pooled key) pair, for the CPB MLP.

    Offsets between a query position and a pooled cell's centre (the mean of the positions it
    pools) are divided by ``pretrain_size - 1``, times 8, and mapped to
    ``sign(d) * log2(1 + |d|) / log2(8)``, as the official ``get_relative_position_cpb``.
    Rows and columns are separable, so the table is the product of the unique offsets per axis.
    Sizes may be symbolic: the table and indices are then built in the traced graph. ``empty`` cells
    per axis follow the pooled ones (:func:`adaptive_avg_pool`); they index one past the table's end
    (``U_h``, ``U_w``), where the caller pads the biases with ``-inf``.

    Returns:
        ``table`` ``(U_h, U_w, 2)`` float32 and the indices ``rows`` ``(H, ph + empty)`` and ``cols``
        ``(W, pw + empty)``: the bias of pair ``((y, x), (i, j))`` is ``mlp(table)[rows[y, i], cols[x, j]]``,
        the factored form :func:`aggregated_attention` takes.
    """
    if all_int(*pretrain_size) and min(pretrain_size) < 2:
        raise ValueError(f"pretrain_size must be at least 2x2, got {pretrain_size}")
    return _pooled_coords(*size, *pool_size, *pretrain_size, empty, torch.device(device or "cpu"))


@_cached_geometry
def _pooled_coords(height, width, pool_h, pool_w, pre_h, pre_w, empty, device):
    rows, row_index = _axis_coords(height, pool_h, pre_h, empty, device)
    cols, col_index = _axis_coords(width, pool_w, pre_w, empty, device)
    table = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table, row_index, col_index


def gather_pool_bias(cpb: torch.Tensor, cpb_rows: torch.Tensor, cpb_cols: torch.Tensor, positions=None) -> torch.Tensor:
    """The bias of each (query, pooled token) pair from its factored form (see :func:`aggregated_attention`):
    ``(heads, H*W, ph*pw)``, or ``(heads, n, ph*pw)`` for the queries at flat ``positions`` ``(n,)``. One
    ``index_select`` of the flattened table by each pair's flat index (faster on CPU than indexing by rows and
    columns at once)."""
    if positions is None:
        rows, cols = cpb_rows[:, None, :, None], cpb_cols[None, :, None, :]
    else:
        width = cpb_cols.shape[0]
        rows, cols = cpb_rows[positions // width][:, :, None], cpb_cols[positions % width][:, None, :]
    index = (rows * cpb.shape[2] + cols).flatten()
    return cpb.flatten(1).index_select(1, index).view(cpb.shape[0], -1, cpb_rows.shape[1] * cpb_cols.shape[1])


def _check_inputs(q: torch.Tensor, k_pool: torch.Tensor, cpb_rows: torch.Tensor, cpb_cols: torch.Tensor, window_size):
    """An odd window, and pooled-bias indices for the map's rows and columns and the pooled grid."""
    _check_window(window_size)
    if cpb_rows.dim() != 2 or cpb_cols.dim() != 2:
        raise ValueError(
            f"cpb_rows and cpb_cols are (H, ph) and (W, pw) indices, got {cpb_rows.dim()}-d and {cpb_cols.dim()}-d"
        )
    if cpb_rows.dtype.is_floating_point or cpb_cols.dtype.is_floating_point:
        raise TypeError(f"cpb_rows and cpb_cols are integer indices, got {cpb_rows.dtype} and {cpb_cols.dtype}")
    sizes = (*q.shape[2:4], k_pool.shape[2], *cpb_rows.shape, *cpb_cols.shape)
    if not all_int(*sizes):
        return
    height, width, pool_len = sizes[:3]
    if cpb_rows.shape[0] != height or cpb_cols.shape[0] != width or cpb_rows.shape[1] * cpb_cols.shape[1] != pool_len:
        raise ValueError(
            f"cpb_rows {tuple(cpb_rows.shape)} and cpb_cols {tuple(cpb_cols.shape)} must be (H, ph) and (W, pw) with "
            f"ph * pw pooled tokens: the map is {height}x{width} with {pool_len} pooled tokens"
        )


def _windows(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Every token's zero-padded window of ``x``, row-major offsets: ``(B, h, H, W, window**2, D)``.

    Stacked from shifted views of the padded map (``window**2`` times the map, linear in
    tokens); the products with it are einsums, so FLOP counters see the window MACs.
    """
    height, width = x.shape[2], x.shape[3]
    radius = window_size // 2
    padded = F.pad(x, (0, 0, radius, radius, radius, radius))
    if not all_int(height, width):
        return _gathered_windows(padded, height, width, window_size)
    shifted = [padded[:, :, a : a + height, b : b + width] for a in range(window_size) for b in range(window_size)]
    return torch.stack(shifted, dim=-2)


def _gathered_windows(padded: torch.Tensor, height, width, window_size: int) -> torch.Tensor:
    """:func:`_windows` for symbolic sizes: one gather by an index table of the padded map, where the
    shifted views would be ``window**2`` slices per map (which ONNX's optimiser pairs up, in quadratic time)."""
    steps = torch.arange(window_size, device=padded.device)
    rows = torch.arange(height, device=padded.device)[:, None] + steps  # (H, window) rows of the padded map
    cols = torch.arange(width, device=padded.device)[:, None] + steps
    index = rows[:, None, :, None] * (width + window_size - 1) + cols[None, :, None, :]  # (H, W, window, window)
    return padded.flatten(2, 3)[:, :, index.flatten(2)]


def _window_sum(weights: torch.Tensor, values: torch.Tensor, window_size: int) -> torch.Tensor:
    """``sum_o weights[..., o] * values at window offset o``: ``(B, h, H, W, D)``."""
    return torch.einsum("bhijo,bhijod->bhijd", weights, _windows(values, window_size))


def _unmasked_pool_len(cpb: torch.Tensor, cpb_rows: torch.Tensor, cpb_cols: torch.Tensor) -> torch.Tensor:
    """``P`` of the length scale: the pooled keys not masked out (bias ``-inf``, e.g. the empty cells of
    :func:`adaptive_avg_pool`), counted on the first head's first query."""
    return (cpb[0][cpb_rows[0][:, None], cpb_cols[0][None, :]] != float("-inf")).sum()


def _learnable_affinity(q_norm, learnable_tokens, learnable_bias):
    """The learnable tokens' weights on the window ``(B, h, H, W, window**2)``, added after the softmax."""
    heads = q_norm.shape[1]
    return torch.einsum("bhijd,hdo->bhijo", q_norm, learnable_tokens) + learnable_bias.reshape(heads, 1, 1, -1)


def aggregated_attention_reference(
    q,
    k,
    v,
    k_pool,
    v_pool,
    query_embedding,
    logit_scale,
    rpb,
    cpb,
    cpb_rows,
    cpb_cols,
    learnable_tokens,
    learnable_bias,
    window_size,
):
    """Plain-PyTorch aggregated attention; see :func:`aggregated_attention`."""
    _check_inputs(q, k_pool, cpb_rows, cpb_cols, window_size)
    batch, heads, height, width, _ = q.shape
    pool_len = k_pool.shape[2]
    pool_count = _unmasked_pool_len(cpb, cpb_rows, cpb_cols)
    q_norm, q_hat = _scaled_queries(q, query_embedding, logit_scale, window_size, pool_count)
    keys = F.normalize(k, dim=-1)
    local = torch.einsum("bhijd,bhijod->bhijo", q_hat, _windows(keys, window_size))
    valid, _ = _window_geometry(height, width, window_size, q.device)
    local = (local + rpb.reshape(heads, 1, 1, -1).to(q.dtype)).masked_fill(~valid, float("-inf"))
    pool_bias = gather_pool_bias(cpb.to(q.dtype), cpb_rows, cpb_cols)
    pooled = q_hat.flatten(2, 3) @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + pool_bias
    logits = torch.cat([local.flatten(2, 3), pooled], dim=-1)
    weights = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1).to(v.dtype)
    local_weights, pool_weights = weights.split([window_size**2, pool_len], dim=-1)
    local_weights = local_weights.reshape(batch, heads, height, width, -1)
    local_weights = local_weights + _learnable_affinity(q_norm, learnable_tokens, learnable_bias)
    out = _window_sum(local_weights, v, window_size)
    return out + (pool_weights @ v_pool).reshape(out.shape)


def aggregated_attention_unfold(
    q,
    k,
    v,
    k_pool,
    v_pool,
    query_embedding,
    logit_scale,
    rpb,
    cpb,
    cpb_rows,
    cpb_cols,
    learnable_tokens,
    learnable_bias,
    window_size,
):
    """The official unfused formulation (``attention_native.py``), for benchmarks: ``F.unfold`` of
    the channel-first keys and values into ``(B, heads, N, head_dim, window**2)`` windows, the
    padding mask from an unfold of ones, and (1 x head_dim) @ (head_dim x window**2) matmuls."""
    _check_inputs(q, k_pool, cpb_rows, cpb_cols, window_size)
    batch, heads, height, width, dim = q.shape
    tokens, pool_len, local_len = height * width, k_pool.shape[2], window_size**2
    q_norm = F.normalize(q.flatten(2, 3), dim=-1)
    ones = F.unfold(q.new_ones(1, 1, height, width), window_size, padding=window_size // 2)[0]
    scale = torch.log(ones.sum(0).double() + pool_len).float().to(q.dtype)[:, None]
    q_hat = (q_norm + query_embedding[:, None]) * logit_scale[:, None, None] * scale

    def unfold(x):  # (B, heads, H, W, D) -> (B, heads, N, D, window**2)
        x = x.permute(0, 1, 4, 2, 3).reshape(batch, heads * dim, height, width)
        x = F.unfold(x, window_size, padding=window_size // 2)
        return x.reshape(batch, heads, dim, local_len, tokens).permute(0, 1, 4, 2, 3)

    k_local, v_local = unfold(F.normalize(k, dim=-1)), unfold(v)
    attn_local = (q_hat.unsqueeze(-2) @ k_local).squeeze(-2) + rpb[:, None]
    attn_local = attn_local.masked_fill(ones.t() == 0, float("-inf"))
    attn_pool = q_hat @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + gather_pool_bias(cpb, cpb_rows, cpb_cols)
    attn = torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1)
    attn_local, attn_pool = attn.split([local_len, pool_len], dim=-1)
    attn_local = q_norm @ learnable_tokens + learnable_bias[:, None] + attn_local
    out = (attn_local.unsqueeze(-2) @ v_local.transpose(-2, -1)).squeeze(-2) + attn_pool @ v_pool
    return out.reshape(batch, heads, height, width, dim)


_op = dispatch.KernelOp(
    "aggregated_attention",
    aggregated_attention_reference,
    priority=("flex", "triton", "tiled"),
    schema="(Tensor q, Tensor k, Tensor v, Tensor k_pool, Tensor v_pool, Tensor query_embedding, Tensor logit_scale, "
    "Tensor rpb, Tensor cpb, Tensor cpb_rows, Tensor cpb_cols, Tensor learnable_tokens, Tensor learnable_bias, "
    "int window_size) -> Tensor",
)


_MAX_UNFUSED_SCORE_BYTES = 2**30


def can_run_flex(q, k, v, k_pool, v_pool, *args) -> Capability:
    tensors = (q, k, v, k_pool, v_pool, *(a for a in args if isinstance(a, torch.Tensor)))
    if q.device.type != "cuda" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return Capability.no(f"flex_attention on {q.device.type} is forward-only")
    if not q.dtype == k.dtype == v.dtype == k_pool.dtype == v_pool.dtype:
        return Capability.no("mixed dtypes")
    batch, heads, height, width, _ = q.shape
    tokens = height * width
    score_bytes = batch * heads * tokens * (tokens + k_pool.shape[2]) * q.element_size()
    if q.device.type != "cuda" and score_bytes > _MAX_UNFUSED_SCORE_BYTES:
        gib = score_bytes / 2**30
        return Capability.no(f"flex_attention on {q.device.type} runs unfused and would hold {gib:.1f} GiB of scores")
    return Capability.yes()


@functools.lru_cache(maxsize=32)
def _flex_block_mask(height: int, width: int, pool_len: int, window_size: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    tokens, radius = height * width, window_size // 2

    def mask_mod(b, h, q_idx, kv_idx):
        near = ((kv_idx // width - q_idx // width).abs() <= radius) & ((kv_idx % width - q_idx % width).abs() <= radius)
        return (kv_idx >= tokens) | near

    return create_block_mask(mask_mod, None, None, tokens, tokens + pool_len, device=device)


@_op.register(
    "flex", can_run_flex, declares=Support(("cpu", "cuda"), dispatch.SINGLE_AND_HALF, ("cuda",)), auto_devices=()
)
def aggregated_attention_flex(
    q,
    k,
    v,
    k_pool,
    v_pool,
    query_embedding,
    logit_scale,
    rpb,
    cpb,
    cpb_rows,
    cpb_cols,
    learnable_tokens,
    learnable_bias,
    window_size,
):
    from torch.nn.attention.flex_attention import flex_attention

    _check_inputs(q, k_pool, cpb_rows, cpb_cols, window_size)
    batch, heads, height, width, dim = q.shape
    tokens, pool_len, radius = height * width, k_pool.shape[2], window_size // 2
    pool_count = _unmasked_pool_len(cpb, cpb_rows, cpb_cols)
    q_norm, q_hat = _scaled_queries(q, query_embedding, logit_scale, window_size, pool_count)
    keys = torch.cat([F.normalize(k, dim=-1).flatten(2, 3), F.normalize(k_pool, dim=-1)], dim=2)
    values = torch.cat([v.flatten(2, 3), v_pool], dim=2)
    rpb, cpb, pool_width = rpb.to(q.dtype), cpb.to(q.dtype), cpb_cols.shape[1]

    def score_mod(score, b, h, q_idx, kv_idx):
        # also evaluated on masked-out pairs: clamp every index into its table
        is_local = kv_idx < tokens
        dy = (kv_idx // width - q_idx // width).clamp(-radius, radius) + radius
        dx = (kv_idx % width - q_idx % width).clamp(-radius, radius) + radius
        local = rpb[h, dy * window_size + dx]
        pooled_idx = (kv_idx - tokens).clamp(0, pool_len - 1)
        row, col = cpb_rows[q_idx // width, pooled_idx // pool_width], cpb_cols[q_idx % width, pooled_idx % pool_width]
        pooled = cpb[h, row, col]
        return score + torch.where(is_local, local, pooled)

    mask = _flex_block_mask(height, width, pool_len, window_size, q.device)
    out = flex_attention(q_hat.flatten(2, 3), keys, values, score_mod=score_mod, block_mask=mask, scale=1.0)
    extra = _window_sum(_learnable_affinity(q_norm, learnable_tokens, learnable_bias), v, window_size)
    return out.reshape(batch, heads, height, width, dim) + extra


def can_run_tiled(q, k, v, k_pool, v_pool, *args) -> Capability:
    verdict = can_lay_out(*q.shape, k_pool.shape[2])
    return dispatch.one_wide_dtype(q, k, v, k_pool, v_pool) if verdict else verdict


@functools.cache
def aggregated_tile_size(height: int, width: int, window_size: int, pool_len: int) -> int:
    """The query tile side with the least estimated work: pairs scored (window rectangle and pooled keys),
    plus a fixed cost per tile."""

    def cost(tile):
        tiles = math.ceil(height / tile) * math.ceil(width / tile)
        return tiles * (tile * tile * ((tile + window_size - 1) ** 2 + pool_len) + _TILE_OVERHEAD)

    return min(range(1, max(height, width) + 1), key=cost)


_TILE_OVERHEAD = 1024


@_cached_geometry
def _window_slots(tile: int, window_size: int, device: torch.device) -> torch.Tensor:
    """``(tile**2, window**2)``: the key slot of each query slot's window position in a tile's rectangle."""
    side = tile + window_size - 1
    rows = torch.arange(tile, device=device)[:, None] + torch.arange(window_size, device=device)  # (tile, window)
    slots = rows[:, None, :, None] * side + rows[None, :, None, :]
    return slots.reshape(tile * tile, window_size * window_size)


# Chosen on CPU: see docs/benchmarks.md (aggregated attention, tiled).
@_op.register(
    "tiled",
    can_run_tiled,
    declares=Support(("cpu", "cuda"), dispatch.SINGLE_AND_DOUBLE, ("cpu", "cuda")),
    auto_devices=("cpu",),
)
def aggregated_attention_tiled(
    q,
    k,
    v,
    k_pool,
    v_pool,
    query_embedding,
    logit_scale,
    rpb,
    cpb,
    cpb_rows,
    cpb_cols,
    learnable_tokens,
    learnable_bias,
    window_size,
):
    """Dense batched matrix multiplies over query tiles (``tiles.py``): each tile's queries against the keys of
    the rectangle around them and the pooled keys under one softmax, the window RPB and ``-inf`` off the
    windows as the bias of each tile pattern; inference a few tiles at a time."""
    _check_inputs(q, k_pool, cpb_rows, cpb_cols, window_size)
    batch, heads, height, width, dim = q.shape
    pool_len = k_pool.shape[2]
    tile = aggregated_tile_size(height, width, window_size, pool_len)
    tiles = centred_window_tiles(height, width, window_size, tile, q.device)
    pool_count = _unmasked_pool_len(cpb, cpb_rows, cpb_cols)
    q_norm, q_hat = _scaled_queries(q, query_embedding, logit_scale, window_size, pool_count)
    padding = (0, 0, *centred_window_padding(height, width, window_size, tile))
    keys = F.pad(F.normalize(k, dim=-1), padding).flatten(2, 3)
    values = F.pad(v, padding).flatten(2, 3)
    q_norm, q_hat = q_norm.flatten(2, 3), q_hat.flatten(2, 3)
    k_pool = F.normalize(k_pool, dim=-1)
    bias = tile_bias(rpb.reshape(heads, window_size, window_size).to(q.dtype), tiles)
    token_bias = learnable_bias.reshape(heads, 1, 1, -1)
    query_slots, key_slots = tile * tile, tiles.keys.numel() // tiles.count
    cpb = cpb.to(q.dtype)
    window_slots = _window_slots(tile, window_size, q.device)

    def attend(first, end, count):
        queries = tile_slots(q_hat, tiles.queries, first, end, count)
        local = queries @ tile_slots(keys, tiles.keys, first, end, count).mT
        local = add_pattern_bias(local, bias, tiles.blocks, first)
        pair_bias = gather_pool_bias(cpb, cpb_rows, cpb_cols, tiles.queries[first * query_slots : end * query_slots])
        pooled = queries.flatten(2, 3) @ k_pool.mT + pair_bias
        logits = torch.cat([local, pooled.view(*local.shape[:-1], pool_len)], -1)
        weights = logits.softmax(-1) if torch.is_grad_enabled() else torch.softmax(logits, -1, out=logits)
        local, pooled = weights.split([key_slots, pool_len], dim=-1)
        affinity = tile_slots(q_norm, tiles.queries, first, end, count) @ learnable_tokens[:, None] + token_bias
        local = local.scatter_add(-1, window_slots.expand(*affinity.shape), affinity)
        out = local @ tile_slots(values, tiles.keys, first, end, count)
        return out.flatten(2, 3) + pooled.flatten(2, 3) @ v_pool

    tables = (query_embedding, logit_scale, rpb, cpb, learnable_tokens, learnable_bias)
    if dispatch.needs_grad(q, k, v, k_pool, v_pool, *tables):
        out = attend(0, tiles.count, tiles.count)
    else:
        logit_bytes = batch * heads * query_slots * (key_slots + pool_len) * q.element_size()
        parts = [attend(*part) for part in tile_chunks(tiles.count, logit_bytes)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
    return out.index_select(2, tiles.outputs).view(batch, heads, height, width, dim)


def can_run_triton(
    q,
    k,
    v,
    k_pool,
    v_pool,
    query_embedding,
    logit_scale,
    rpb,
    cpb,
    cpb_rows,
    cpb_cols,
    learnable_tokens,
    learnable_bias,
    *args,
) -> Capability:
    verdict = dispatch.can_run_triton_on(q, k, v, k_pool, v_pool)
    if not verdict:
        return verdict
    tables = (query_embedding, logit_scale, rpb, cpb, learnable_tokens, learnable_bias)
    if not all(t.is_floating_point() for t in tables):
        return Capability.no("non-floating-point tables")
    if any(t.device != q.device for t in (*tables, cpb_rows, cpb_cols)):
        return Capability.no("tensors on different devices")
    if not 16 <= q.shape[-1] <= 128:
        return Capability.no(f"head dim {q.shape[-1]} outside 16..128")
    if q.shape[0] * q.shape[1] > 65535:
        return Capability.no(f"batch x heads = {q.shape[0] * q.shape[1]} exceeds the launch grid's 65535")
    return Capability.yes()


@_op.register("triton", can_run_triton, declares=dispatch.triton_support(), auto_devices=("cuda",))
def aggregated_attention_triton(*args):
    from .triton_aggregated import aggregated_attention_triton as fused  # imports triton: only when called

    *head, cpb, cpb_rows, cpb_cols, learnable_tokens, learnable_bias, window_size = args
    _check_inputs(head[0], head[3], cpb_rows, cpb_cols, window_size)
    pool_bias = gather_pool_bias(cpb, cpb_rows, cpb_cols)
    return fused(*head, pool_bias, learnable_tokens, learnable_bias, window_size)


def aggregated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    query_embedding: torch.Tensor,
    logit_scale: torch.Tensor,
    rpb: torch.Tensor,
    cpb: torch.Tensor,
    cpb_rows: torch.Tensor,
    cpb_cols: torch.Tensor,
    learnable_tokens: torch.Tensor,
    learnable_bias: torch.Tensor,
    window_size: int = 3,
    backend: str = dispatch.AUTO,
) -> torch.Tensor:
    """Length-scaled cosine attention to a sliding window and pooled tokens under one softmax.

    Args:
        q: queries ``(B, heads, H, W, head_dim)``, before normalisation.
        k: window keys, same shape, before normalisation.
        v: window values, same shape.
        k_pool: pooled keys ``(B, heads, P, head_dim)``, before normalisation.
        v_pool: pooled values ``(B, heads, P, head_dim)``.
        query_embedding: added to the normalised queries, ``(heads, head_dim)``.
        logit_scale: per-head temperature (TransNeXt: ``softplus(tau)``), ``(heads,)``.
        rpb: window relative position bias ``(heads, window_size**2)``, row-major offsets.
        cpb: pooled tokens' position bias table ``(heads, U_h, U_w)``; ``-inf`` masks a token out.
        cpb_rows: ``(H, ph)`` integer row in ``cpb`` of each (query row, pooled row) pair.
        cpb_cols: ``(W, pw)`` integer column in ``cpb`` of each (query column, pooled column) pair: the bias of
            query ``(y, x)`` and pooled token ``(i, j)`` (flat ``i * pw + j``) is
            ``cpb[:, cpb_rows[y, i], cpb_cols[x, j]]``.
        learnable_tokens: ``(heads, head_dim, window_size**2)``.
        learnable_bias: ``(heads, window_size**2)``.
        window_size: odd window side.
        backend: ``auto`` (``triton`` on CUDA, else ``reference``), ``reference``, ``flex`` or
            ``triton`` (on CPU only under ``TRITON_INTERPRET=1``).
    """
    return _op(
        q,
        k,
        v,
        k_pool,
        v_pool,
        query_embedding,
        logit_scale,
        rpb,
        cpb,
        cpb_rows,
        cpb_cols,
        learnable_tokens,
        learnable_bias,
        window_size,
        backend=backend,
    )
