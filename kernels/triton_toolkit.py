"""What every Triton kernel file shares: the interpreter switch, base-2 softmax constants, autotune
configs and their pruning, launch grids, and jit helpers (row loads and stores, one online-softmax step).

The kernels compute their softmax in base 2 (``exp(x) = exp2(x * LOG2E)``), as Triton's fused-attention
tutorial does: ``exp2`` is one instruction on the GPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "LOG2E",
    "LOG2E_JIT",
    "autotune_configs",
    "block",
    "dot_precision",
    "load_rows",
    "online_softmax",
    "prune_configs",
    "store_rows",
    "tile_grid",
]

# Read once, when the kernels are defined: Triton decides then whether they run interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = math.log2(math.e)
LOG2E_JIT = tl.constexpr(LOG2E)  # the same constant inside kernels


@triton.jit
def load_rows(ptr, rows, valid, dims, dim):
    """``(rows, BLOCK_D)`` rows of a row-major ``(..., dim)`` tensor at ``ptr``; zeros where ``valid`` is false."""
    return tl.load(ptr + rows[:, None] * dim + dims[None, :], mask=valid[:, None] & (dims[None, :] < dim), other=0.0)


@triton.jit
def store_rows(ptr, rows, valid, dims, dim, value):
    """Store ``value`` as the rows ``rows`` of a row-major ``(..., dim)`` tensor, where ``valid``."""
    mask = valid[:, None] & (dims[None, :] < dim)
    tl.store(ptr + rows[:, None] * dim + dims[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def online_softmax(m, total, acc, logits, v, PRECISION: tl.constexpr):
    """Fold one tile of base-2 ``logits`` ``(queries, keys)`` and its values ``v`` into the running max
    ``m``, normaliser ``total`` and unnormalised output ``acc`` of every query."""
    m_new = tl.maximum(m, tl.max(logits, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without a key yet
    p = tl.exp2(logits - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    total = total * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, total, acc


def block(size: int) -> int:
    """Block covering ``size`` elements: a power of two, at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(size))


def dot_precision(dtype: torch.dtype, float32: str = "ieee") -> str:
    """``input_precision`` of the dots: ``float32`` for float32 inputs (``ieee``: no TF32 rounding), else ``tf32``."""
    return float32 if dtype == torch.float32 else "tf32"


def autotune_configs(
    names: Sequence[str], tiles: Sequence[tuple[int, ...]], num_stages: int, interpreted: tuple[int, ...]
) -> list[triton.Config]:
    """Autotune configs over the block sizes ``names``.

    Args:
        names: the meta-parameters the configs set, e.g. ``("BLOCK_M", "BLOCK_N")``.
        tiles: the GPU configs, one ``(block sizes..., num_warps)`` each; few, since every one compiles
            for each dtype and geometry met.
        num_stages: software-pipelining stages of the GPU configs.
        interpreted: the one ``(block sizes..., num_warps)`` the interpreter runs (it runs every config),
            with dot sizes the GPU also accepts.
    """
    if INTERPRET:
        return [_config(names, interpreted, num_stages=1)]
    return [_config(names, tile, num_stages) for tile in tiles]


def _config(names: Sequence[str], tile: tuple[int, ...], num_stages: int) -> triton.Config:
    return triton.Config(dict(zip(names, tile[:-1], strict=True)), num_warps=tile[-1], num_stages=num_stages)


def prune_configs(fits: Callable[[dict, dict], bool]) -> Callable:
    """An ``early_config_prune`` for ``triton.autotune``: the configs whose block sizes ``fits(blocks, args)``
    accepts for the launch's arguments (by name), else the smallest one, so that a launch always has one."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = [c for c in configs if fits(c.kwargs, args)]
        return kept or [min(configs, key=lambda c: math.prod(c.kwargs.values()))]  # the first among equals

    return prune


def tile_grid(batch_heads: int, *axes: tuple[int, str], repeat: int = 1, groups: int = 1) -> Callable:
    """Launch grid ``(repeat * tiles, batch_heads, groups)``, where ``tiles`` covers every ``(extent, block)``
    axis with the autotuned block size ``meta[block]``."""

    def grid(meta):
        tiles = math.prod(triton.cdiv(extent, meta[name]) for extent, name in axes)
        return repeat * tiles, batch_heads, groups

    return grid
