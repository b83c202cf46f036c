"""Fused neighborhood attention (NAT/DiNAT numerics: kernel size, dilation, relative position bias) in Triton.

Positions congruent modulo the dilation form independent groups; within a group the op is undilated
neighborhood attention on a strided sub-grid. Each program takes one group of one (batch, head): the
forward and the dQ pass walk a 2D tile of queries over the key rectangle their windows cover (a query's
window start ``clamp(i - k // 2, 0, L - k)`` is non-decreasing in ``i``, so the union is a rectangle of at
most ``tile + k - 1`` keys per axis); the dK/dV pass walks a 2D tile of keys over the rectangle of queries
that attend it. Softmax is online in base 2; the forward saves the output and the log-sum-exp, never the
attention weights. The RPB gradient is accumulated (fp32 atomics, contended only across the batch) per
query and window position, then summed into the ``(heads, 2k-1, 2k-1)`` table by its index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_toolkit as toolkit
from .geometry import neighborhood_windows
from .triton_toolkit import LOG2E_JIT, load_rows, online_softmax, store_rows

__all__ = ["neighborhood_attention_triton"]


@triton.jit
def _window_start(position, length, KS: tl.constexpr):
    """First key of the window of ``position`` on an axis of ``length`` (NATTEN's shifted border rule)."""
    return tl.minimum(tl.maximum(position - KS // 2, 0), length - KS)


@triton.jit
def _group_geometry(H, W, DIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Dilation group of this program (its first row and column in the map), its sub-grid size, and the first
    row and column of the program's tile."""
    group_row, group_col = tl.program_id(2) // DIL, tl.program_id(2) % DIL
    rows, cols = tl.cdiv(H - group_row, DIL), tl.cdiv(W - group_col, DIL)
    tiles_per_row = tl.cdiv(tl.cdiv(W, DIL), BLOCK_W)
    tile = tl.program_id(0)
    return (group_row, group_col), rows, cols, (tile // tiles_per_row) * BLOCK_H, (tile % tiles_per_row) * BLOCK_W


@triton.jit
def _head(RPB, HEADS, H, W, D, KS: tl.constexpr):
    """This program's head, the offsets of its ``(H * W)`` map of one value per token and of its ``(H * W, D)``
    map of vectors, and its RPB table."""
    bh = tl.program_id(1)
    head = bh % HEADS
    stats = bh.to(tl.int64) * H * W
    return head, stats, stats * D, RPB + head * (2 * KS - 1) * (2 * KS - 1)


@triton.jit
def _tile(row0, col0, row_end, col_end, group, W, DIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Sub-grid rows and columns of a ``BLOCK_H x BLOCK_W`` tile from ``(row0, col0)``, which of them lie
    before ``(row_end, col_end)``, and their flat positions in the full ``H x W`` map (``group``: the
    sub-grid's first row and column there)."""
    group_row, group_col = group
    offsets = tl.arange(0, BLOCK_H * BLOCK_W)
    row, col = row0 + offsets // BLOCK_W, col0 + offsets % BLOCK_W
    valid = (row < row_end) & (col < col_end)
    return row, col, valid, (group_row + row * DIL) * W + group_col + col * DIL


@triton.jit
def _key_range(first, length, BLOCK: tl.constexpr, KS: tl.constexpr):
    """Keys ``[lo, hi)`` along one axis that the windows of the queries ``first .. first + BLOCK - 1`` cover
    (an empty range for a tile past this group's sub-grid)."""
    lo = _window_start(first, length, KS)
    hi = tl.where(first < length, _window_start(tl.minimum(first + BLOCK, length) - 1, length, KS) + KS, lo)
    return lo, hi


@triton.jit
def _query_range(first, length, BLOCK: tl.constexpr, KS: tl.constexpr):
    """Queries ``[lo, hi)`` along one axis whose windows reach the keys ``first .. first + BLOCK - 1``: query
    ``i`` reaches keys ``[s(i), s(i) + KS)`` and ``s`` is non-decreasing, so they form a range."""
    lo = tl.where(first < KS, 0, first - KS // 2)
    last = tl.minimum(first + BLOCK, length) - 1
    hi = tl.where(last >= length - KS, length, last + KS // 2 + 1)
    return lo, tl.where(first < length, hi, lo)  # an empty range for a tile past this group's sub-grid


@triton.jit
def _masked_logits(
    dots, q_row, q_col, start_row, start_col, k_row, k_col, q_valid, rpb, qk_scale, KS: tl.constexpr,
    HAS_RPB: tl.constexpr,
):  # fmt: skip
    """Logits in base 2 of (query, key) pairs, ``-inf`` outside the query's window; the window mask.

    Coordinates arrive broadcastable to ``dots``' shape, so both (query, key) and (key, query) tiles work.
    """
    in_window = (
        q_valid & (k_row >= start_row) & (k_row < start_row + KS) & (k_col >= start_col) & (k_col < start_col + KS)
    )
    logits = dots * qk_scale
    if HAS_RPB:  # row-major table index of the offset (k_row - q_row + KS - 1, k_col - q_col + KS - 1)
        index = (k_row * (2 * KS - 1) + k_col) - (q_row * (2 * KS - 1) + q_col) + (KS - 1) * 2 * KS
        logits += tl.load(rpb + index, mask=in_window, other=0.0).to(tl.float32) * LOG2E_JIT
    return tl.where(in_window, logits, float("-inf")), in_window


@triton.jit
def _query_logits(
    q, k, q_row, q_col, start_row, start_col, q_valid, k_row, k_col, rpb, qk_scale, KS: tl.constexpr,
    HAS_RPB: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """:func:`_masked_logits` of a query tile against a key tile: ``(queries, keys)``."""
    dots = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    return _masked_logits(
        dots, q_row[:, None], q_col[:, None], start_row[:, None], start_col[:, None], k_row[None, :],
        k_col[None, :], q_valid[:, None], rpb, qk_scale, KS, HAS_RPB,
    )  # fmt: skip


# Tiles as (rows x cols) of queries (BQ_*) and of keys (BK_*) on the sub-grid. Few configs: each is compiled for
# every (dtype, kernel size, dilation, RPB, head dim) met. Compiled for sm_90 (head dim 32, RPB, fp16 and bf16):
# 8x8 queries x 8x8 keys at 8 warps spills in no kernel; 8x8 x 8x16 spills a little in the dQ kernel (gathered
# RPB and dS atomics); 8x16 x 8x16 spilled 0.7-1.2 KB. k = 7 windows of an 8x8 query tile cover 14x14 keys.
_CONFIGS = toolkit.autotune_configs(
    ("BQ_H", "BQ_W", "BK_H", "BK_W"), [(8, 8, 8, 8, 8), (8, 8, 8, 16, 8)], num_stages=1, interpreted=(4, 4, 4, 8, 4)
)


def _fits(tile: dict, args: dict) -> bool:
    """Query tiles no larger than the sub-grid (or 8), and only 8x8 x 8x8 tiles for head dims above 64."""
    rows = triton.next_power_of_2(-(-args["H"] // args["DIL"]))
    cols = triton.next_power_of_2(-(-args["W"] // args["DIL"]))
    area = tile["BQ_H"] * tile["BQ_W"] * tile["BK_H"] * tile["BK_W"]
    return tile["BQ_H"] <= max(rows, 8) and tile["BQ_W"] <= max(cols, 8) and (args["BLOCK_D"] <= 64 or area <= 64 * 64)


_prune = toolkit.prune_configs(_fits)
_KEY = ["H", "W", "D", "KS", "DIL", "HAS_RPB"]


@triton.autotune(_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["HEADS", "H", "W"])
def _forward_kernel(
    Q, K, V, RPB, Out, LSE, qk_scale, HEADS, H, W, D,
    KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BQ_H: tl.constexpr, BQ_W: tl.constexpr, BK_H: tl.constexpr, BK_W: tl.constexpr,
):  # fmt: skip
    """Output and base-2 log-sum-exp per query tile: one online softmax over the key tiles that the tile's
    windows cover, each masked to the windows and biased by the RPB."""
    group, rows, cols, row0, col0 = _group_geometry(H, W, DIL, BQ_H, BQ_W)
    _, stats, base, rpb = _head(RPB, HEADS, H, W, D, KS)
    dims = tl.arange(0, BLOCK_D)
    q_row, q_col, q_valid, q_token = _tile(row0, col0, rows, cols, group, W, DIL, BQ_H, BQ_W)
    row_lo, row_hi = _key_range(row0, rows, BQ_H, KS)  # the keys the tile's windows cover
    col_lo, col_hi = _key_range(col0, cols, BQ_W, KS)
    start_row, start_col = _window_start(q_row, rows, KS), _window_start(q_col, cols, KS)
    q = load_rows(Q + base, q_token, q_valid, dims, D)

    m = tl.full([BQ_H * BQ_W], float("-inf"), tl.float32)  # running max and sum of the softmax, base 2
    total = tl.zeros([BQ_H * BQ_W], tl.float32)
    acc = tl.zeros([BQ_H * BQ_W, BLOCK_D], tl.float32)
    for key_row0 in range(row_lo, row_hi, BK_H):
        for key_col0 in range(col_lo, col_hi, BK_W):
            k_row, k_col, k_valid, k_token = _tile(key_row0, key_col0, row_hi, col_hi, group, W, DIL, BK_H, BK_W)
            k = load_rows(K + base, k_token, k_valid, dims, D)
            logits, _ = _query_logits(
                q, k, q_row, q_col, start_row, start_col, q_valid, k_row, k_col, rpb, qk_scale, KS, HAS_RPB, PRECISION
            )
            v = load_rows(V + base, k_token, k_valid, dims, D)
            m, total, acc = online_softmax(m, total, acc, logits, v, PRECISION)

    total = tl.where(q_valid, total, 1.0)
    store_rows(Out + base, q_token, q_valid, dims, D, acc / total[:, None])
    tl.store(LSE + stats + q_token, m + tl.log2(total), mask=q_valid)


@triton.autotune(_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["DBias"])
@triton.jit(do_not_specialize=["HEADS", "H", "W"])
def _backward_query_kernel(
    Q, K, V, RPB, Out, DOut, LSE, Delta, DQ, DBias, qk_scale, scale, HEADS, H, W, D,
    KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr, RPB_GRAD: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, BQ_H: tl.constexpr, BQ_W: tl.constexpr, BK_H: tl.constexpr, BK_W: tl.constexpr,
):  # fmt: skip
    """dQ per query tile, the softmax's ``delta = rowsum(dO * O)`` for the dK/dV pass, and dS per window
    position for the RPB gradient."""
    group, rows, cols, row0, col0 = _group_geometry(H, W, DIL, BQ_H, BQ_W)
    head, stats, base, rpb = _head(RPB, HEADS, H, W, D, KS)
    dims = tl.arange(0, BLOCK_D)
    q_row, q_col, q_valid, q_token = _tile(row0, col0, rows, cols, group, W, DIL, BQ_H, BQ_W)
    start_row, start_col = _window_start(q_row, rows, KS), _window_start(q_col, cols, KS)
    q = load_rows(Q + base, q_token, q_valid, dims, D)
    do = load_rows(DOut + base, q_token, q_valid, dims, D)
    out = load_rows(Out + base, q_token, q_valid, dims, D)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(Delta + stats + q_token, delta, mask=q_valid)
    lse = tl.load(LSE + stats + q_token, mask=q_valid, other=0.0)
    # dS of (query, window position) for the RPB gradient, summed over the batch: (heads, H * W, KS * KS)
    window_grad = DBias + (head.to(tl.int64) * H * W + q_token) * (KS * KS)

    row_lo, row_hi = _key_range(row0, rows, BQ_H, KS)
    col_lo, col_hi = _key_range(col0, cols, BQ_W, KS)
    dq = tl.zeros([BQ_H * BQ_W, BLOCK_D], tl.float32)
    for key_row0 in range(row_lo, row_hi, BK_H):
        for key_col0 in range(col_lo, col_hi, BK_W):
            k_row, k_col, k_valid, k_token = _tile(key_row0, key_col0, row_hi, col_hi, group, W, DIL, BK_H, BK_W)
            k = load_rows(K + base, k_token, k_valid, dims, D)
            v = load_rows(V + base, k_token, k_valid, dims, D)
            logits, in_window = _query_logits(
                q, k, q_row, q_col, start_row, start_col, q_valid, k_row, k_col, rpb, qk_scale, KS, HAS_RPB, PRECISION
            )
            p = tl.exp2(logits - lse[:, None])
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            if RPB_GRAD:
                position = (k_row * KS + k_col)[None, :] - (start_row * KS + start_col)[:, None]
                tl.atomic_add(window_grad[:, None] + position, ds, mask=in_window, sem="relaxed")

    store_rows(DQ + base, q_token, q_valid, dims, D, dq * scale)


@triton.autotune(_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["HEADS", "H", "W"])
def _backward_key_kernel(
    Q, K, V, RPB, DOut, LSE, Delta, DK, DV, qk_scale, scale, HEADS, H, W, D,
    KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BQ_H: tl.constexpr, BQ_W: tl.constexpr, BK_H: tl.constexpr, BK_W: tl.constexpr,
):  # fmt: skip
    """dK and dV per key tile, over the rectangle of queries whose windows reach the tile."""
    group, rows, cols, row0, col0 = _group_geometry(H, W, DIL, BK_H, BK_W)
    _, stats, base, rpb = _head(RPB, HEADS, H, W, D, KS)
    dims = tl.arange(0, BLOCK_D)
    k_row, k_col, k_valid, k_token = _tile(row0, col0, rows, cols, group, W, DIL, BK_H, BK_W)
    k = load_rows(K + base, k_token, k_valid, dims, D)
    v = load_rows(V + base, k_token, k_valid, dims, D)
    row_lo, row_hi = _query_range(row0, rows, BK_H, KS)
    col_lo, col_hi = _query_range(col0, cols, BK_W, KS)

    dk = tl.zeros([BK_H * BK_W, BLOCK_D], tl.float32)
    dv = tl.zeros([BK_H * BK_W, BLOCK_D], tl.float32)
    for query_row0 in range(row_lo, row_hi, BQ_H):
        for query_col0 in range(col_lo, col_hi, BQ_W):
            q_row, q_col, q_valid, q_token = _tile(query_row0, query_col0, row_hi, col_hi, group, W, DIL, BQ_H, BQ_W)
            start_row, start_col = _window_start(q_row, rows, KS), _window_start(q_col, cols, KS)
            q = load_rows(Q + base, q_token, q_valid, dims, D)
            do = load_rows(DOut + base, q_token, q_valid, dims, D)
            lse = tl.load(LSE + stats + q_token, mask=q_valid, other=0.0)
            delta = tl.load(Delta + stats + q_token, mask=q_valid, other=0.0)
            dots = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (keys, queries)
            logits, _ = _masked_logits(
                dots, q_row[None, :], q_col[None, :], start_row[None, :], start_col[None, :], k_row[:, None],
                k_col[:, None], q_valid[None, :], rpb, qk_scale, KS, HAS_RPB,
            )  # fmt: skip
            p = tl.exp2(logits - lse[None, :])
            dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
            ds = p * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
            dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)

    store_rows(DK + base, k_token, k_valid, dims, D, dk * scale)
    store_rows(DV + base, k_token, k_valid, dims, D, dv)


def _grid(q: torch.Tensor, dilation: int, rows_key: str, cols_key: str):
    """Programs: (tiles of ``rows_key x cols_key`` over a dilation group's sub-grid, batch x heads, groups)."""
    batch, heads, height, width, _ = q.shape
    rows, cols = triton.cdiv(height, dilation), triton.cdiv(width, dilation)
    return toolkit.tile_grid(batch * heads, (rows, rows_key), (cols, cols_key), groups=dilation * dilation)


class _NeighborhoodAttention(torch.autograd.Function):
    """Saves the inputs, the output and the base-2 log-sum-exp per query ``(B * heads, H * W)``."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, kernel_size, dilation, scale):
        batch, heads, height, width, dim = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        has_rpb = rpb is not None
        table = rpb.contiguous() if has_rpb else q.new_empty(1)
        out = torch.empty_like(q)
        lse = torch.empty(batch * heads, height * width, device=q.device, dtype=torch.float32)
        meta = dict(
            KS=kernel_size,
            DIL=dilation,
            HAS_RPB=has_rpb,
            BLOCK_D=toolkit.block(dim),
            PRECISION=toolkit.dot_precision(q.dtype),
        )
        _forward_kernel[_grid(q, dilation, "BQ_H", "BQ_W")](
            q, k, v, table, out, lse, scale * toolkit.LOG2E, heads, height, width, dim, **meta
        )
        ctx.save_for_backward(q, k, v, table, out, lse)
        ctx.meta, ctx.scale, ctx.has_rpb = meta, scale, has_rpb
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, table, out, lse = ctx.saved_tensors
        _, heads, height, width, dim = q.shape
        meta, kernel_size, dilation = ctx.meta, ctx.meta["KS"], ctx.meta["DIL"]
        rpb_grad = ctx.has_rpb and ctx.needs_input_grad[3]
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(lse)
        window_grad = torch.zeros(
            (heads, height * width, kernel_size**2) if rpb_grad else (1,), device=q.device, dtype=torch.float32
        )
        qk_scale = ctx.scale * toolkit.LOG2E
        _backward_query_kernel[_grid(q, dilation, "BQ_H", "BQ_W")](
            q, k, v, table, out, grad_out, lse, delta, grad_q, window_grad, qk_scale, ctx.scale, heads, height,
            width, dim, RPB_GRAD=rpb_grad, **meta,
        )  # fmt: skip
        _backward_key_kernel[_grid(q, dilation, "BK_H", "BK_W")](
            q, k, v, table, grad_out, lse, delta, grad_k, grad_v, qk_scale, ctx.scale, heads, height, width, dim,
            **meta,
        )  # fmt: skip
        grad_rpb = _table_grad(window_grad, height, width, kernel_size, dilation).to(table.dtype) if rpb_grad else None
        return grad_q, grad_k, grad_v, grad_rpb, None, None, None


def _table_grad(window_grad: torch.Tensor, height: int, width: int, kernel_size: int, dilation: int) -> torch.Tensor:
    """Sum the per-(query, window position) gradient into the ``(heads, 2k-1, 2k-1)`` table."""
    _, bias_rows = neighborhood_windows(height, kernel_size, dilation, window_grad.device)
    _, bias_cols = neighborhood_windows(width, kernel_size, dilation, window_grad.device)
    side = 2 * kernel_size - 1
    index = bias_rows[:, None, :, None] * side + bias_cols[None, :, None, :]  # (H, W, k, k)
    heads = window_grad.shape[0]
    table = window_grad.new_zeros(heads, side * side).index_add_(1, index.flatten(), window_grad.view(heads, -1))
    return table.view(heads, side, side)


def neighborhood_attention_triton(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    """Fused neighborhood attention; same arguments and result as the reference."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _NeighborhoodAttention.apply(q, k, v, rpb, kernel_size, dilation, scale)
