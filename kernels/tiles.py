"""Local attention as dense attention over query tiles, for CPUs (matrix-multiply speed).

A tile is a block of queries and the keys all of them may attend to; batched matrix multiplies run
every tile at once, with an additive bias per (query, key) slot that holds the position bias where
the key is in the query's window and ``-inf`` where it is not. (They beat
``scaled_dot_product_attention`` here: its CPU kernel was 1.1-1.9x slower at NAT's shapes, and its
math path spends a fifth of a training step guarding against fully masked rows, which tiles never have.)
Work and memory grow with the number of tiles, so linearly in tokens. Tiles whose windows lie alike
(all but those at the borders) share one bias, so the bias is a few tiles' worth whatever the map size;
inference runs a few tiles at a time, in buffers small enough for the allocator to reuse. The index
tables depend only on the sizes and are cached per size (eager and compiled calls; exports run the
references).

:func:`neighborhood_tiles` builds NATTEN's neighbourhoods this way: within each dilation group
(positions congruent modulo the dilation) a ``T x T`` tile of queries and the
``(T + k - 1) x (T + k - 1)`` rectangle of keys around it, shifted inside the group at its borders;
:func:`centred_window_tiles` TransNeXt's centred windows over a zero-padded map the same way.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatch import Capability
from .geometry import cached_geometry, windows_1d
from .precision import float32_logits
from .windows import all_int

__all__ = [
    "Tiles",
    "add_pattern_bias",
    "can_lay_out",
    "centred_window_padding",
    "centred_window_tiles",
    "neighborhood_bias",
    "neighborhood_tile_size",
    "neighborhood_tiles",
    "tile_bias",
    "tile_chunks",
    "tile_slots",
    "tiled_attention",
]


@dataclass(frozen=True)
class Tiles:
    """Where each tile's query and key slots are in the flattened map, and how to put the outputs back.

    Each tile has ``rows x cols`` query slots and the key slots of a rectangle, both row-major. Tiles whose
    windows lie alike (most of them: all but those at the borders) share one bias: tiles are ordered by
    their (row, column) pattern, and ``blocks`` says which run of tiles takes which pattern.

    Attributes:
        queries: ``(tiles * query_slots,)`` flat position of each query slot (a slot past a group's edge
            repeats a query; its output is dropped).
        keys: ``(tiles * key_slots,)`` flat position of each key slot.
        outputs: ``(H * W,)`` the query slot that computes each position.
        row_offsets: ``(row_patterns, rows, key_rows)`` the row of each (query, key) pair in the bias table,
            -1 where the key is outside the query's window; ``col_offsets`` likewise for columns.
        blocks: ``(pattern, first tile, end tile)`` runs, ``pattern = row_pattern * col_patterns + col_pattern``.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    outputs: torch.Tensor
    row_offsets: torch.Tensor
    col_offsets: torch.Tensor
    blocks: tuple[tuple[int, int, int], ...]

    @property
    def count(self) -> int:
        return self.blocks[-1][2]


def can_lay_out(*sizes) -> Capability:
    """Whether tiles can be laid out for these sizes: concrete ones (a compiled call runs on concrete tensors),
    not the symbolic sizes of an export trace."""
    if not all_int(*sizes) and not torch.compiler.is_compiling():
        return Capability.no("traced with symbolic sizes: the tiles are laid out for concrete ones")
    return Capability.yes()


def _axis_tiles(length: int, kernel_size: int, dilation: int, tile: int, device: torch.device):
    """One axis: query positions ``(n, tile)``, key positions ``(n, halo)``, RPB offsets ``(n, tile, halo)``
    (-1 outside the window) and each position's query slot ``(length,)``."""
    group_lengths = [(length - group + dilation - 1) // dilation for group in range(dilation)]
    halo = min(tile + kernel_size - 1, max(group_lengths))
    slots, halo_slots = torch.arange(tile, device=device), torch.arange(halo, device=device)
    window_starts = windows_1d(length, kernel_size, dilation, device)[0][:, 0] // dilation  # NATTEN's rule
    queries, keys, offsets, outputs = [], [], [], torch.empty(length, dtype=torch.long, device=device)
    for group, group_length in enumerate(group_lengths):
        starts = window_starts[group::dilation]  # in the group's own positions
        for first in range(0, group_length, tile):
            query = (first + slots).clamp(max=group_length - 1)
            key = min(int(starts[first]), max(group_length - halo, 0)) + halo_slots
            start = starts[query, None]
            inside = (key >= start) & (key < start + kernel_size)  # keys past the group's edge are never inside
            offsets.append(torch.where(inside, key - query[:, None] + kernel_size - 1, -1))
            own = torch.arange(first, min(first + tile, group_length), device=device)
            outputs[own * dilation + group] = len(queries) * tile + own - first
            queries.append(query * dilation + group)
            keys.append(key.clamp(max=group_length - 1) * dilation + group)
    return torch.stack(queries), torch.stack(keys), torch.stack(offsets), outputs


# One tile's fixed cost, in scored pairs: with it the estimate below picks the tile sizes measured fastest
# on 2 CPU cores at NAT's and DiNAT's stage shapes (7 at 56x56 and 28x28, the whole map at 14x14 and 7x7).
_TILE_OVERHEAD = 4096


@functools.cache
def neighborhood_tile_size(height: int, width: int, kernel_size: int, dilation: int) -> int:
    """The query tile side with the least estimated work: pairs scored, plus a fixed cost per tile."""

    def cost(tile):
        tiles, keys = 1, 1
        for length in (height, width):
            group = math.ceil(length / dilation)
            tiles *= dilation * math.ceil(group / tile)
            keys *= min(tile + kernel_size - 1, group)
        return tiles * (tile * tile * keys + _TILE_OVERHEAD)

    largest = math.ceil(max(height, width) / dilation)
    return min(range(max(kernel_size // 2, 1), largest + 1), key=cost)


@cached_geometry
def neighborhood_tiles(height: int, width: int, kernel_size: int, dilation: int, tile: int, device) -> Tiles:
    """The tiles of NATTEN's 2D neighbourhoods, ``tile x tile`` queries each."""
    rows = _axis_tiles(height, kernel_size, dilation, tile, device)
    cols = _axis_tiles(width, kernel_size, dilation, tile, device)
    return _tiles(rows, cols, width, width, tile, device)


def _centred_axis_tiles(length: int, window_size: int, tile: int, device: torch.device):
    """One axis of centred, zero-padded windows: as :func:`_axis_tiles`, with keys on the padded axis of
    ``ceil(length / tile) * tile + window - 1`` positions. A key in the padding is outside every window, but for
    the slots past the edge (whose outputs are dropped), so that every query slot has a key."""
    count, halo = -(-length // tile), tile + window_size - 1
    query = torch.arange(count * tile, device=device).view(count, tile)
    key = torch.arange(count, device=device)[:, None] * tile + torch.arange(halo, device=device)
    offset = key[:, None, :] - query[:, :, None]  # the window position of each pair, inside in [0, window)
    real = ((key >= window_size // 2) & (key < length + window_size // 2))[:, None, :] | (query >= length)[..., None]
    offsets = torch.where((offset >= 0) & (offset < window_size) & real, offset, -1)
    return query.clamp(max=length - 1), key, offsets, torch.arange(length, device=device)


@cached_geometry
def centred_window_tiles(height: int, width: int, window_size: int, tile: int, device) -> Tiles:
    """Tiles of centred ``window x window`` windows over a map zero-padded by ``window // 2`` (TransNeXt's):
    ``tile x tile`` queries and the ``(tile + window - 1)^2`` keys around them, key positions in the padded map
    of :func:`centred_window_padding`."""
    rows = _centred_axis_tiles(height, window_size, tile, device)
    cols = _centred_axis_tiles(width, window_size, tile, device)
    return _tiles(rows, cols, width, -(-width // tile) * tile + window_size - 1, tile, device)


def centred_window_padding(height: int, width: int, window_size: int, tile: int) -> tuple[int, int, int, int]:
    """``F.pad`` widths (left, right, top, bottom) of the key map of :func:`centred_window_tiles`."""
    radius = window_size // 2
    return radius, -(-width // tile) * tile + radius - width, radius, -(-height // tile) * tile + radius - height


def _tiles(rows, cols, query_width: int, key_width: int, tile: int, device) -> Tiles:
    """Tiles from each axis's (queries, keys, offsets, outputs), ordered by pattern; positions are flat in maps of
    ``query_width`` and ``key_width`` columns."""
    row_queries, row_keys, row_offsets, row_outputs = rows
    col_queries, col_keys, col_offsets, col_outputs = cols
    row_patterns, row_pattern = torch.unique(row_offsets, dim=0, return_inverse=True)
    col_patterns, col_pattern = torch.unique(col_offsets, dim=0, return_inverse=True)
    pattern = (row_pattern[:, None] * col_patterns.shape[0] + col_pattern[None, :]).flatten()
    order = torch.sort(pattern, stable=True).indices  # tiles (row-major) in pattern order
    counts = torch.bincount(pattern).tolist()
    blocks = tuple((p, end - n, end) for p, (n, end) in enumerate(zip(counts, itertools.accumulate(counts))) if n)

    def flat(rows, cols, width):  # (row_tiles, a) x (col_tiles, b) -> (tiles * a * b,), in pattern order
        positions = rows[:, None, :, None] * width + cols[None, :, None, :]
        return positions.flatten(0, 1)[order].flatten()

    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    tile_index = rank[row_outputs[:, None] // tile * col_queries.shape[0] + col_outputs[None, :] // tile]
    outputs = (tile_index * tile + row_outputs[:, None] % tile) * tile + col_outputs[None, :] % tile
    queries, keys = flat(row_queries, col_queries, query_width), flat(row_keys, col_keys, key_width)
    return Tiles(queries, keys, outputs.flatten(), row_patterns, col_patterns, blocks)


def neighborhood_bias(rpb: torch.Tensor | None, tiles: Tiles, kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """The additive bias of every tile pattern of :func:`neighborhood_tiles`: the RPB ``(heads, 2k - 1, 2k - 1)``
    (zeros when None) inside the windows, ``-inf`` outside; see :func:`tile_bias`."""
    side = 2 * kernel_size - 1
    return tile_bias(like.new_zeros(1, side, side) if rpb is None else rpb.to(like.dtype), tiles)


def tile_bias(table: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """The additive bias of every tile pattern, ``(heads or 1, patterns, query_slots, key_slots)``: ``table``
    ``(heads or 1, rows, cols)`` at each pair's (row, column) offsets, ``-inf`` where either is -1."""
    table = F.pad(table, (0, 1, 0, 1), value=float("-inf"))  # offset -1 reads the padding
    rows, cols = tiles.row_offsets, tiles.col_offsets
    bias = table[:, rows[:, None, :, None, :, None], cols[None, :, None, :, None, :]]
    return bias.reshape(table.shape[0], rows.shape[0] * cols.shape[0], rows.shape[1] * cols.shape[1], -1)


class _TiledAttention(torch.autograd.Function):
    """Softmax attention of gathered tiles ``(B, heads, tiles, slots, D)`` with the bias of each block of tiles
    ``(heads or 1, patterns, query_slots, key_slots)``; saves the weights and the tiles, and needs no
    masked-row handling (every query has keys)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, blocks, scale):
        logits = add_pattern_bias(torch.matmul(q * scale, k.transpose(-1, -2)), bias, blocks, 0)
        weights = torch.softmax(logits, -1, out=logits)  # in place: a fresh buffer costs more than the softmax
        ctx.save_for_backward(q, k, v, weights)
        ctx.scale, ctx.blocks, ctx.bias_shape = scale, blocks, bias.shape if bias.requires_grad else None
        return torch.matmul(weights, v)

    @staticmethod
    def backward(ctx, grad_out):
        with float32_logits(grad_out, *ctx.saved_tensors) as (grad_out, q, k, v, weights):  # backward under autocast
            grad_weights = torch.matmul(grad_out, v.transpose(-1, -2))
            grad_v = torch.matmul(weights.transpose(-1, -2), grad_out)
            grad_logits = torch.ops.aten._softmax_backward_data.out(
                grad_weights, weights, -1, weights.dtype, grad_input=grad_weights
            )
            grad_q = torch.matmul(grad_logits, k).mul_(ctx.scale)
            grad_k = torch.matmul(grad_logits.transpose(-1, -2), q).mul_(ctx.scale)
            grad_bias = None
            if ctx.bias_shape is not None:
                grad_bias = grad_logits.new_zeros(ctx.bias_shape)
                for pattern, first, end in ctx.blocks:
                    block = grad_logits[:, :, first:end].sum((0, 2))
                    grad_bias[:, pattern] = block.sum_to_size(grad_bias[:, pattern].shape)
        return grad_q, grad_k, grad_v, grad_bias, None, None


def add_pattern_bias(logits: torch.Tensor, bias: torch.Tensor, blocks, first: int) -> torch.Tensor:
    """Add to the logits of tiles ``first:`` (``(B, heads, tiles, ...)``) the bias of each one's pattern."""
    end = first + logits.shape[2]
    for pattern, lo, hi in blocks:
        lo, hi = max(lo, first), min(hi, end)
        if lo < hi:
            logits[:, :, lo - first : hi - first].add_(bias[:, pattern, None])
    return logits


def tile_slots(x: torch.Tensor, index: torch.Tensor, first: int, end: int, count: int) -> torch.Tensor:
    """The slots of tiles ``first:end`` (of ``count``), ``(B, heads, end - first, slots, D)`` from ``(B, heads,
    H * W, D)``, through their flat positions ``index``."""
    slots = index.numel() // count
    x = x.index_select(2, index[first * slots : end * slots])
    return x.view(*x.shape[:2], end - first, slots, x.shape[-1])


def tiled_attention(q, k, v, tiles: Tiles, bias: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention of ``(B, heads, H, W, D)`` maps over ``tiles`` with the bias of their patterns; same shape out."""
    batch, heads, height, width, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    with float32_logits(q, k, v, bias) as (q, k, v, bias):  # under autocast too
        q, k, v = (x.reshape(batch, heads, height * width, dim) for x in (q, k, v))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)):
            every = (0, tiles.count, tiles.count)
            queries, keys, values = (
                tile_slots(q, tiles.queries, *every),
                tile_slots(k, tiles.keys, *every),
                tile_slots(v, tiles.keys, *every),
            )
            out = _TiledAttention.apply(queries, keys, values, bias, tiles.blocks, scale).flatten(2, 3)
        else:
            out = _attend_in_chunks(q, k, v, tiles, bias, scale)
    return out.index_select(2, tiles.outputs).view(batch, heads, height, width, dim)


_CHUNK_BYTES = 16 << 20  # logits of a chunk: below 32 MiB the allocator reuses buffers (it maps larger ones afresh)


def tile_chunks(count: int, bytes_per_tile: int) -> list[tuple[int, int, int]]:
    """``(first, end, count)`` runs of tiles whose logits (``bytes_per_tile`` each) fill about one chunk."""
    chunk = max(1, _CHUNK_BYTES // bytes_per_tile)
    return [(first, min(first + chunk, count), count) for first in range(0, count, chunk)]


def _attend_in_chunks(q, k, v, tiles: Tiles, bias, scale) -> torch.Tensor:
    """Inference: the tiles a few at a time, so that every buffer stays small and in cache; ``(B, heads,
    tiles * query_slots, D)`` from ``(B, heads, H * W, D)`` maps."""
    query_slots, key_slots = tiles.queries.numel() // tiles.count, tiles.keys.numel() // tiles.count
    outs = []
    for part in tile_chunks(tiles.count, q.shape[0] * q.shape[1] * query_slots * key_slots * q.element_size()):
        keys, values = tile_slots(k, tiles.keys, *part), tile_slots(v, tiles.keys, *part)
        logits = torch.matmul(tile_slots(q, tiles.queries, *part) * scale, keys.mT)
        logits = add_pattern_bias(logits, bias, tiles.blocks, part[0])
        outs.append(torch.matmul(torch.softmax(logits, -1, out=logits), values).flatten(2, 3))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)
