"""Fused Triton kernels of bi-level routing attention: the ``triton`` backend of
:func:`visionzoo.kernels.bilevel_routing_attention`.

The routing step (region means, affinity, top-k) stays in PyTorch (:func:`route_regions`). Every
kernel reads queries, keys and values in place in their ``(B, heads, H, W, d)`` tensors, any
strides with a unit last one (the routing mixer's views of one qkv projection), through the
top-k index: the ``j``-th key of a query region is token ``j % T`` of its routed region ``j // T``
(``T`` tokens a region, row-major), so no routed copy of keys or values ever exists.

- forward: one program per (query tile of a region, batch x head), one online softmax over the
  ``topk * T`` routed keys, padded keys (``valid_size``) masked; it stores the output and the
  log-sum-exp (base 2), the only things the backward keeps.
- backward, queries: one program per query tile recomputes the probabilities, accumulates dQ, and
  stores ``delta = rowsum(dO * O)``.
- backward, keys and values: the top-k index is inverted in PyTorch (for every key region, the
  query regions that routed to it, in order: a stable argsort and ``searchsorted`` offsets), and
  one program per key tile loops over those query regions' tokens. Every gradient element has one
  writer: deterministic, no atomics.

The region geometry (``n_win``, region height and width) and the head dims are compile-time
constants: token-to-address arithmetic then multiplies instead of dividing, which cost ~25% more
registers (ptxas, sm_90). One compilation (and autotuning) per map geometry.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import triton_toolkit as toolkit
from .geometry import route_regions
from .triton_toolkit import LOG2E_JIT, online_softmax

__all__ = ["bilevel_routing_attention_triton"]


@triton.jit
def _region_tokens(region, token, n_win, region_h, region_w):
    """Map row and column of ``token`` (row-major in its region) of ``region`` (row-major in the grid)."""
    row = (region // n_win) * region_h + token // region_w
    col = (region % n_win) * region_w + token % region_w
    return row, col


@triton.jit
def _region_tile(tokens, n_win, region_h, region_w, BLOCK: tl.constexpr):
    """This program's region and batch x head, and its tile of ``BLOCK`` of the region's tokens: map row and
    column, and whether the token exists."""
    tiles = tl.cdiv(tokens, BLOCK)
    region = tl.program_id(0) // tiles
    t = (tl.program_id(0) % tiles) * BLOCK + tl.arange(0, BLOCK)
    row, col = _region_tokens(region, t, n_win, region_h, region_w)
    return region, tl.program_id(1), row, col, t < tokens


@triton.jit
def _listed_tokens(regions, j, count, tokens, n_win, region_h, region_w):
    """Flat positions ``j`` over the tokens of ``count`` regions listed at ``regions``: row, col, in-range."""
    listed = j < count * tokens
    region = tl.load(regions + j // tokens, mask=listed, other=0)
    row, col = _region_tokens(region, j % tokens, n_win, region_h, region_w)
    return row, col, listed


@triton.jit
def _routed_keys(routed, start, topk, tokens, n_win, region_h, region_w, valid_h, valid_w, BLOCK_N: tl.constexpr):
    """Keys ``start .. start + BLOCK_N - 1`` of the ``topk`` regions routed at ``routed``: row, col, and whether
    the key exists and is real (not padding)."""
    k_row, k_col, listed = _listed_tokens(
        routed, start + tl.arange(0, BLOCK_N), topk, tokens, n_win, region_h, region_w
    )
    return k_row, k_col, listed & (k_row < valid_h) & (k_col < valid_w)


@triton.jit
def _head(ptr, strides, bh, heads):
    """Pointer to the ``(H, W, d)`` map of batch x head ``bh`` of a tensor with ``strides`` (batch, head, row,
    column)."""
    return ptr + (bh // heads).to(tl.int64) * strides[0] + (bh % heads).to(tl.int64) * strides[1]


@triton.jit
def _token_mask(keep, BLOCK: tl.constexpr, dim: tl.constexpr):
    """Tokens ``keep`` x channels below ``dim``; constant along channels when the head dim fills the block,
    so that loads and stores vectorise."""
    mask = keep[:, None]
    if dim != BLOCK:
        mask = mask & (tl.arange(0, BLOCK)[None, :] < dim)
    return mask


@triton.jit
def _token_ptrs(ptr, strides, bh, heads, row, col, BLOCK: tl.constexpr):
    """Pointers to channels ``0 .. BLOCK - 1`` of the tokens at ``(row, col)`` of batch x head ``bh``."""
    tokens = (row * strides[2] + col * strides[3])[:, None]
    return _head(ptr, strides, bh, heads) + tokens + tl.arange(0, BLOCK)[None, :]


@triton.jit
def _load_tokens(ptr, strides, bh, heads, row, col, keep, BLOCK: tl.constexpr, dim: tl.constexpr):
    ptrs = _token_ptrs(ptr, strides, bh, heads, row, col, BLOCK)
    return tl.load(ptrs, mask=_token_mask(keep, BLOCK, dim), other=0.0)


@triton.jit
def _store_tokens(ptr, strides, bh, heads, row, col, keep, BLOCK: tl.constexpr, dim: tl.constexpr, value):
    ptrs = _token_ptrs(ptr, strides, bh, heads, row, col, BLOCK)
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=_token_mask(keep, BLOCK, dim))


# BLOCK_M tiles queries and BLOCK_N keys in every kernel: (BLOCK_M, BLOCK_N, num_warps).
_TILES = [(16, 64, 4), (64, 16, 4), (32, 64, 4), (64, 32, 4), (64, 64, 4), (64, 64, 8), (128, 64, 8), (64, 128, 8)]
_CONFIGS = toolkit.autotune_configs(("BLOCK_M", "BLOCK_N"), _TILES, num_stages=2, interpreted=(16, 16, 4))


def _fits(tile: dict, args: dict, query_tile_in_region: bool) -> bool:
    """Tiles no larger than their side of the problem, and no large tiles with wide heads or fp32
    (3xTF32 dots), which spill registers (checked with ptxas for sm_90).

    A region tile holds at most ``T`` tokens; a tile over routed regions (or over the query
    regions routed to one key region, ``topk`` on average) at most ``topk * T``.
    """
    region, routed = toolkit.block(args["tokens"]), toolkit.block(args["topk"] * args["tokens"])
    max_m, max_n = (region, routed) if query_tile_in_region else (routed, region)
    wide = max(args["BLOCK_D"], args["BLOCK_DV"]) > 64 or args["PRECISION"] == "tf32x3"
    return (
        tile["BLOCK_M"] <= max_m
        and tile["BLOCK_N"] <= max_n
        and not (wide and tile["BLOCK_M"] * tile["BLOCK_N"] > 64 * 64)
    )


_PRUNE_QUERY_TILES = {"early_config_prune": toolkit.prune_configs(functools.partial(_fits, query_tile_in_region=True))}
_PRUNE_KEY_TILES = {"early_config_prune": toolkit.prune_configs(functools.partial(_fits, query_tile_in_region=False))}
_KEY = ["tokens", "topk", "BLOCK_D", "BLOCK_DV"]


@triton.autotune(_CONFIGS, key=_KEY, prune_configs_by=_PRUNE_QUERY_TILES)
@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse, Index, sq, sk, sv, so,
    heads, width, valid_h, valid_w, scale, topk, n_win: tl.constexpr, region_h: tl.constexpr, region_w: tl.constexpr,
    tokens: tl.constexpr, dim: tl.constexpr, dim_v: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    region, bh, q_row, q_col, q_in = _region_tile(tokens, n_win, region_h, region_w, BLOCK_M)
    scale_log2 = scale * LOG2E_JIT
    q = _load_tokens(Q, sq, bh, heads, q_row, q_col, q_in, BLOCK_D, dim)
    routed = Index + ((bh // heads) * n_win * n_win + region) * topk

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, topk * tokens, BLOCK_N):
        k_row, k_col, keep = _routed_keys(
            routed, start, topk, tokens, n_win, region_h, region_w, valid_h, valid_w, BLOCK_N
        )
        k = _load_tokens(K, sk, bh, heads, k_row, k_col, keep, BLOCK_D, dim)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        v = _load_tokens(V, sv, bh, heads, k_row, k_col, keep, BLOCK_DV, dim_v)
        m, total, acc = online_softmax(m, total, acc, tl.where(keep[None, :], s, float("-inf")), v, PRECISION)
    total = tl.where(total == 0.0, 1.0, total)
    _store_tokens(Out, so, bh, heads, q_row, q_col, q_in, BLOCK_DV, dim_v, acc / total[:, None])
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log2(total)
    tl.store(Lse + bh.to(tl.int64) * tokens * n_win * n_win + q_row * width + q_col, lse, mask=q_in)


@triton.autotune(_CONFIGS, key=_KEY, prune_configs_by=_PRUNE_QUERY_TILES)
@triton.jit
def _backward_query_kernel(
    Q, K, V, Out, GradOut, GradQ, Lse, Delta, Index, sq, sk, sv, so, sg, sdq,
    heads, width, valid_h, valid_w, scale, topk, n_win: tl.constexpr, region_h: tl.constexpr, region_w: tl.constexpr,
    tokens: tl.constexpr, dim: tl.constexpr, dim_v: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    region, bh, q_row, q_col, q_in = _region_tile(tokens, n_win, region_h, region_w, BLOCK_M)
    q = _load_tokens(Q, sq, bh, heads, q_row, q_col, q_in, BLOCK_D, dim)
    out = _load_tokens(Out, so, bh, heads, q_row, q_col, q_in, BLOCK_DV, dim_v)
    grad_out = _load_tokens(GradOut, sg, bh, heads, q_row, q_col, q_in, BLOCK_DV, dim_v)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    rows = bh.to(tl.int64) * tokens * n_win * n_win + q_row * width + q_col
    tl.store(Delta + rows, delta, mask=q_in)
    lse = tl.load(Lse + rows, mask=q_in, other=0.0)
    routed = Index + ((bh // heads) * n_win * n_win + region) * topk
    scale_log2 = scale * LOG2E_JIT

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, topk * tokens, BLOCK_N):
        k_row, k_col, keep = _routed_keys(
            routed, start, topk, tokens, n_win, region_h, region_w, valid_h, valid_w, BLOCK_N
        )
        k = _load_tokens(K, sk, bh, heads, k_row, k_col, keep, BLOCK_D, dim)
        v = _load_tokens(V, sv, bh, heads, k_row, k_col, keep, BLOCK_DV, dim_v)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p = tl.where(keep[None, :], tl.exp2(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(grad_out, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        grad_q = tl.dot(ds.to(k.dtype), k, grad_q, input_precision=PRECISION)
    _store_tokens(GradQ, sdq, bh, heads, q_row, q_col, q_in, BLOCK_D, dim, grad_q * scale)


@triton.autotune(_CONFIGS, key=_KEY, prune_configs_by=_PRUNE_KEY_TILES)
@triton.jit
def _backward_key_kernel(
    Q, K, V, GradOut, GradK, GradV, Lse, Delta, Queries, Starts, sq, sk, sv, sg, sdk, sdv,
    heads, width, valid_h, valid_w, scale, topk, n_win: tl.constexpr, region_h: tl.constexpr, region_w: tl.constexpr,
    tokens: tl.constexpr, dim: tl.constexpr, dim_v: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    region, bh, k_row, k_col, k_in = _region_tile(tokens, n_win, region_h, region_w, BLOCK_N)
    keep = k_in & (k_row < valid_h) & (k_col < valid_w)
    k = _load_tokens(K, sk, bh, heads, k_row, k_col, keep, BLOCK_D, dim)
    v = _load_tokens(V, sv, bh, heads, k_row, k_col, keep, BLOCK_DV, dim_v)
    stats = bh.to(tl.int64) * tokens * n_win * n_win
    batch_row = (bh // heads) * n_win * n_win
    first = tl.load(Starts + batch_row + (bh // heads) + region)
    count = tl.load(Starts + batch_row + (bh // heads) + region + 1) - first
    routing = Queries + batch_row * topk + first
    scale_log2 = scale * LOG2E_JIT

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, count * tokens, BLOCK_M):
        i = start + tl.arange(0, BLOCK_M)
        q_row, q_col, listed = _listed_tokens(routing, i, count, tokens, n_win, region_h, region_w)
        q = _load_tokens(Q, sq, bh, heads, q_row, q_col, listed, BLOCK_D, dim)
        grad_out = _load_tokens(GradOut, sg, bh, heads, q_row, q_col, listed, BLOCK_DV, dim_v)
        rows = stats + q_row * width + q_col
        lse = tl.load(Lse + rows, mask=listed, other=0.0)
        delta = tl.load(Delta + rows, mask=listed, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2  # keys x queries
        p_t = tl.where(keep[:, None] & listed[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        grad_v = tl.dot(p_t.to(grad_out.dtype), grad_out, grad_v, input_precision=PRECISION)
        ds_t = p_t * (tl.dot(v, tl.trans(grad_out), input_precision=PRECISION) - delta[None, :])
        grad_k = tl.dot(ds_t.to(q.dtype), q, grad_k, input_precision=PRECISION)
    _store_tokens(GradK, sdk, bh, heads, k_row, k_col, k_in, BLOCK_D, dim, grad_k * scale)
    _store_tokens(GradV, sdv, bh, heads, k_row, k_col, k_in, BLOCK_DV, dim_v, grad_v)


def _heads_last(like: torch.Tensor, dim: int) -> torch.Tensor:
    """Empty ``(B, heads, H, W, dim)`` laid out as ``(B, H, W, heads, dim)``, the mixers' channels-last order."""
    batch, heads, height, width, _ = like.shape
    return like.new_empty(batch, height, width, heads, dim).permute(0, 3, 1, 2, 4)


def _strides(*tensors: torch.Tensor) -> list[tuple[int, ...]]:
    """Each tensor's (batch, head, row, column) strides, one tuple argument of the kernels each."""
    return [t.stride()[:4] for t in tensors]


def _shared_args(q, v, index, n_win: int, valid_size: tuple[int, int], scale: float) -> dict:
    """Keyword arguments of all three kernels: geometry, scale, head dims and their blocks."""
    _, heads, height, width, dim = q.shape
    region_h, region_w = height // n_win, width // n_win
    return dict(
        heads=heads, width=width, n_win=n_win, region_h=region_h, region_w=region_w,
        valid_h=valid_size[0], valid_w=valid_size[1], scale=scale, tokens=region_h * region_w, topk=index.shape[-1],
        dim=dim, dim_v=v.shape[-1], BLOCK_D=toolkit.block(dim), BLOCK_DV=toolkit.block(v.shape[-1]),
        PRECISION=toolkit.dot_precision(q.dtype, float32="tf32x3"),  # fp32 to ~1e-6, not TF32's 1e-3
    )  # fmt: skip


def _grid(q: torch.Tensor, shared: dict, tile: str):
    """Programs: (tiles of ``tile`` tokens over every region, batch x heads)."""
    return toolkit.tile_grid(q.shape[0] * q.shape[1], (shared["tokens"], tile), repeat=shared["n_win"] ** 2)


def _invert_routing(index: torch.Tensor, regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every key region, the query regions that routed to it: ``queries`` ``(B, regions * topk)``
    grouped by key region in ascending query order, and ``starts`` ``(B, regions + 1)`` offsets."""
    batch, _, topk = index.shape
    flat = index.reshape(batch, -1)
    order = torch.argsort(flat, dim=1, stable=True)
    bounds = torch.arange(regions + 1, device=index.device, dtype=index.dtype).expand(batch, -1).contiguous()
    starts = torch.searchsorted(flat.gather(1, order), bounds)
    return (order // topk).to(torch.int32), starts.to(torch.int32)


class _RoutingAttention(torch.autograd.Function):
    """Saves the output and log-sum-exp; the backward recomputes probabilities tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, index, n_win, valid_size, scale):
        batch, heads, height, width, _ = q.shape
        out = _heads_last(q, v.shape[-1])
        lse = q.new_empty(batch * heads, height * width, dtype=torch.float32)
        shared = _shared_args(q, v, index, n_win, valid_size, scale)
        _forward_kernel[_grid(q, shared, "BLOCK_M")](q, k, v, out, lse, index, *_strides(q, k, v, out), **shared)
        ctx.save_for_backward(q, k, v, index, out, lse)
        ctx.shared = shared  # plain numbers: the backward kernels take the same
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, index, out, lse = ctx.saved_tensors
        shared = ctx.shared
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = _heads_last(q, q.shape[-1]), _heads_last(k, k.shape[-1]), _heads_last(v, v.shape[-1])
        delta = torch.empty_like(lse)
        _backward_query_kernel[_grid(q, shared, "BLOCK_M")](
            q, k, v, out, grad_out, grad_q, lse, delta, index,
            *_strides(q, k, v, out, grad_out, grad_q), **shared,
        )  # fmt: skip
        queries, starts = _invert_routing(index, shared["n_win"] ** 2)
        _backward_key_kernel[_grid(q, shared, "BLOCK_N")](
            q, k, v, grad_out, grad_k, grad_v, lse, delta, queries, starts,
            *_strides(q, k, v, grad_out, grad_k, grad_v), **shared,
        )  # fmt: skip
        return grad_q, grad_k, grad_v, None, None, None, None


def bilevel_routing_attention_triton(q, k, v, n_win, topk, scale=None, valid_size=None):
    """Fused bi-level routing attention; arguments as :func:`bilevel_routing_attention`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    index = route_regions(q, k, n_win, topk, scale, valid_size).to(torch.int32).contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    valid_size = tuple(valid_size) if valid_size is not None else (q.shape[2], q.shape[3])
    return _RoutingAttention.apply(q, k, v, index, n_win, valid_size, scale)
