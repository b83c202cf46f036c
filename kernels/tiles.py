"""Local attention as dense attention over query tiles, for CPUs (matrix-multiply speed).

A tile is a block of queries and the keys all of them may attend to; batched matrix multiplies run
every tile at once, with an additive bias per (query, key) slot that holds the position bias where
the key is in the query's window and ``-inf`` where it is not. (They beat
``scaled_dot_product_attention`` here: its CPU kernel was 1.1-1.9x slower at NAT's shapes, and its
math path spends a fifth of a training step guarding against fully masked rows, which tiles never have.)
Work and memory grow with the number of tiles, so linearly in tokens. The index tables depend only
on the sizes and are cached per size (eager and compiled calls; exports run the references).

:func:`neighborhood_tiles` builds NATTEN's neighbourhoods this way: within each dilation group
(positions congruent modulo the dilation) a ``T x T`` tile of queries and the
``(T + k - 1) x (T + k - 1)`` rectangle of keys around it, shifted inside the group at its borders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .geometry import cached_geometry
from .precision import float32_logits

__all__ = ["Tiles", "neighborhood_bias", "neighborhood_tile_size", "neighborhood_tiles", "tiled_attention"]


@dataclass(frozen=True)
class Tiles:
    """Where each tile's query and key slots are in the flattened map, and how to put the outputs back.

    Tiles are ``row_tiles x col_tiles``, row-major; each has ``rows x cols`` query slots and the key slots of
    a rectangle, both row-major.

    Attributes:
        queries: ``(tiles * query_slots,)`` flat position of each query slot (a slot past a group's edge
            repeats a query; its output is dropped).
        keys: ``(tiles * key_slots,)`` flat position of each key slot.
        outputs: ``(H * W,)`` the query slot that computes each position.
        row_offsets: ``(row_tiles, rows, key_rows)`` the row of each (query, key) pair in the bias table,
            -1 where the key is outside the query's window; ``col_offsets`` likewise for columns.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    outputs: torch.Tensor
    row_offsets: torch.Tensor
    col_offsets: torch.Tensor

    @property
    def count(self) -> int:
        return self.row_offsets.shape[0] * self.col_offsets.shape[0]


def _axis_tiles(length: int, kernel_size: int, dilation: int, tile: int, device: torch.device):
    """One axis: query positions ``(n, tile)``, key positions ``(n, halo)``, RPB offsets ``(n, tile, halo)``
    (-1 outside the window) and each position's query slot ``(length,)``."""
    group_lengths = [(length - group + dilation - 1) // dilation for group in range(dilation)]
    halo = min(tile + kernel_size - 1, max(group_lengths))
    slots, halo_slots = torch.arange(tile, device=device), torch.arange(halo, device=device)
    queries, keys, offsets, outputs = [], [], [], torch.empty(length, dtype=torch.long, device=device)
    for group, group_length in enumerate(group_lengths):
        starts = torch.arange(group_length, device=device) - kernel_size // 2
        starts = starts.clamp(min=0).clamp(max=group_length - kernel_size)
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
    row_queries, row_keys, row_offsets, row_outputs = _axis_tiles(height, kernel_size, dilation, tile, device)
    col_queries, col_keys, col_offsets, col_outputs = _axis_tiles(width, kernel_size, dilation, tile, device)

    def flat(rows, cols):  # (row_tiles, a) x (col_tiles, b) -> (row_tiles * col_tiles * a * b,)
        return (rows[:, None, :, None] * width + cols[None, :, None, :]).flatten()

    def slot(outputs):
        return outputs // tile, outputs % tile

    (row_tile, row_slot), (col_tile, col_slot) = slot(row_outputs), slot(col_outputs)
    tile_index = row_tile[:, None] * col_queries.shape[0] + col_tile[None, :]
    outputs = tile_index * tile * tile + row_slot[:, None] * tile + col_slot[None, :]
    return Tiles(flat(row_queries, col_queries), flat(row_keys, col_keys), outputs.flatten(), row_offsets, col_offsets)


def neighborhood_bias(rpb: torch.Tensor | None, tiles: Tiles, kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """The additive bias of every tile, ``(heads or 1, tiles, query_slots, key_slots)``: the RPB ``(heads,
    2k - 1, 2k - 1)`` (zeros when None) inside the windows, ``-inf`` outside."""
    side = 2 * kernel_size - 1
    table = like.new_zeros(1, side, side) if rpb is None else rpb.to(like.dtype)
    table = F.pad(table, (0, 1, 0, 1), value=float("-inf"))  # offset -1 reads the padding
    rows, cols = tiles.row_offsets, tiles.col_offsets
    bias = table[:, rows[:, None, :, None, :, None], cols[None, :, None, :, None, :]]
    return bias.reshape(table.shape[0], tiles.count, rows.shape[1] * cols.shape[1], -1)


class _TiledAttention(torch.autograd.Function):
    """Softmax attention of gathered tiles ``(B, heads, tiles, slots, D)`` with a bias that broadcasts over
    the batch; saves the weights and the tiles, and needs no masked-row handling (every query has keys)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        logits = torch.matmul(q * scale, k.transpose(-1, -2)).add_(bias)
        weights = torch.softmax(logits, -1, out=logits)  # in place: a fresh buffer costs more than the softmax
        ctx.save_for_backward(q, k, v, weights)
        ctx.scale, ctx.bias_shape = scale, bias.shape if bias.requires_grad else None
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
            grad_bias = None if ctx.bias_shape is None else grad_logits.sum(0).sum_to_size(ctx.bias_shape)
        return grad_q, grad_k, grad_v, grad_bias, None


def tiled_attention(q, k, v, tiles: Tiles, bias: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention of ``(B, heads, H, W, D)`` maps over ``tiles`` with the tiles' ``bias``; same shape out."""
    batch, heads, height, width, dim = q.shape
    scale = dim**-0.5 if scale is None else scale

    def gather(x, index):
        x = x.reshape(batch, heads, height * width, dim).index_select(2, index)
        return x.view(batch, heads, tiles.count, -1, dim)

    with float32_logits(q, k, v, bias) as (q, k, v, bias):  # under autocast too
        out = _TiledAttention.apply(gather(q, tiles.queries), gather(k, tiles.keys), gather(v, tiles.keys), bias, scale)
    return out.flatten(2, 3).index_select(2, tiles.outputs).view(batch, heads, height, width, dim)
