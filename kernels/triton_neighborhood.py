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

import math
import os

import torch
import triton
import triton.language as tl

from .neighborhood import neighborhood_windows

__all__ = ["neighborhood_attention_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = math.log2(math.e)
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _window_start(position, length, KS: tl.constexpr):
    """First key of the window of ``position`` on an axis of ``length`` (NATTEN's shifted border rule)."""
    return tl.minimum(tl.maximum(position - KS // 2, 0), length - KS)


@triton.jit
def _group_geometry(H, W, DIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Dilation group of this program, its sub-grid size, and the first row and column of the program's tile."""
    group = tl.program_id(2)
    group_row, group_col = group // DIL, group % DIL
    rows, cols = tl.cdiv(H - group_row, DIL), tl.cdiv(W - group_col, DIL)
    tiles_per_row = tl.cdiv(tl.cdiv(W, DIL), BLOCK_W)
    tile = tl.program_id(0)
    return group_row, group_col, rows, cols, (tile // tiles_per_row) * BLOCK_H, (tile % tiles_per_row) * BLOCK_W


@triton.jit
def _tile_coords(row0, col0, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    offsets = tl.arange(0, BLOCK_H * BLOCK_W)
    return row0 + offsets // BLOCK_W, col0 + offsets % BLOCK_W


@triton.jit
def _token(row, col, group_row, group_col, W, DIL: tl.constexpr):
    """Flat position in the full ``H x W`` map of sub-grid coordinate ``(row, col)``."""
    return (group_row + row * DIL) * W + group_col + col * DIL


@triton.jit
def _load_rows(base, token, valid, dims, D):
    """``(tokens, BLOCK_D)`` rows of a ``(..., D)`` tensor; zeros where ``valid`` is false."""
    return tl.load(base + token[:, None] * D + dims[None, :], mask=valid[:, None] & (dims[None, :] < D), other=0.0)


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
        logits += tl.load(rpb + index, mask=in_window, other=0.0).to(tl.float32) * _LOG2E
    return tl.where(in_window, logits, float("-inf")), in_window


def _configs() -> list[triton.Config]:
    """Tiles as (rows x cols) of queries (BQ_*) and of keys (BK_*) on the sub-grid."""
    if _INTERPRET:  # the interpreter runs every config: one, with dot sizes the GPU also accepts
        return [triton.Config(dict(BQ_H=4, BQ_W=4, BK_H=4, BK_W=8), num_warps=4, num_stages=1)]
    # Few configs: each is compiled for every (dtype, kernel size, dilation, RPB, head dim) met. Compiled for
    # sm_90 (head dim 32, RPB, fp16 and bf16): 8x8 queries x 8x8 keys at 8 warps spills in no kernel; 8x8 x 8x16
    # spills a little in the dQ kernel (gathered RPB and dS atomics); 8x16 x 8x16 spilled 0.7-1.2 KB.
    tiles = [  # (BQ_H, BQ_W, BK_H, BK_W); k = 7 windows of an 8x8 query tile cover 14x14 keys
        (8, 8, 8, 8),
        (8, 8, 8, 16),
    ]
    return [
        triton.Config(dict(BQ_H=qh, BQ_W=qw, BK_H=kh, BK_W=kw), num_warps=8, num_stages=1) for qh, qw, kh, kw in tiles
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the sub-grid, and all but 8x8 x 8x8 tiles for head dims above 64."""
    dilation, block_d = kwargs["DIL"], kwargs["BLOCK_D"]
    rows = triton.next_power_of_2(-(-named_args["H"] // dilation))
    cols = triton.next_power_of_2(-(-named_args["W"] // dilation))
    kept = [
        c
        for c in configs
        if c.kwargs["BQ_H"] <= max(rows, 8)
        and c.kwargs["BQ_W"] <= max(cols, 8)
        and (block_d <= 64 or c.kwargs["BQ_H"] * c.kwargs["BQ_W"] * c.kwargs["BK_H"] * c.kwargs["BK_W"] <= 64 * 64)
    ]
    return kept or configs[:1]


_KEY = ["H", "W", "D", "KS", "DIL", "HAS_RPB"]


@triton.autotune(_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["HEADS", "H", "W"])
def _forward_kernel(
    Q, K, V, RPB, Out, LSE, qk_scale, HEADS, H, W, D,
    KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BQ_H: tl.constexpr, BQ_W: tl.constexpr, BK_H: tl.constexpr, BK_W: tl.constexpr,
):  # fmt: skip
    group_row, group_col, rows, cols, row0, col0 = _group_geometry(H, W, DIL, BQ_H, BQ_W)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * H * W * D
    rpb = RPB + (bh % HEADS) * (2 * KS - 1) * (2 * KS - 1)
    dims = tl.arange(0, BLOCK_D)

    q_row, q_col = _tile_coords(row0, col0, BQ_H, BQ_W)
    q_valid = (q_row < rows) & (q_col < cols)
    q_token = _token(q_row, q_col, group_row, group_col, W, DIL)
    start_row, start_col = _window_start(q_row, rows, KS), _window_start(q_col, cols, KS)
    q = _load_rows(Q + base, q_token, q_valid, dims, D)

    # keys covered by the tile's windows (an empty range for tiles past this group's sub-grid)
    row_lo, col_lo = _window_start(row0, rows, KS), _window_start(col0, cols, KS)
    row_hi = tl.where(row0 < rows, _window_start(tl.minimum(row0 + BQ_H, rows) - 1, rows, KS) + KS, row_lo)
    col_hi = tl.where(col0 < cols, _window_start(tl.minimum(col0 + BQ_W, cols) - 1, cols, KS) + KS, col_lo)

    m = tl.full([BQ_H * BQ_W], float("-inf"), tl.float32)  # running max and sum of the softmax, base 2
    total = tl.zeros([BQ_H * BQ_W], tl.float32)
    acc = tl.zeros([BQ_H * BQ_W, BLOCK_D], tl.float32)
    for key_row0 in range(row_lo, row_hi, BK_H):
        for key_col0 in range(col_lo, col_hi, BK_W):
            k_row, k_col = _tile_coords(key_row0, key_col0, BK_H, BK_W)
            k_valid = (k_row < row_hi) & (k_col < col_hi)
            k_token = _token(k_row, k_col, group_row, group_col, W, DIL)
            k = _load_rows(K + base, k_token, k_valid, dims, D)
            dots = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            logits, _ = _masked_logits(
                dots, q_row[:, None], q_col[:, None], start_row[:, None], start_col[:, None], k_row[None, :],
                k_col[None, :], q_valid[:, None], rpb, qk_scale, KS, HAS_RPB,
            )  # fmt: skip
            m_new = tl.maximum(m, tl.max(logits, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without a key in this tile yet
            p = tl.exp2(logits - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            total = total * alpha + tl.sum(p, 1)
            v = _load_rows(V + base, k_token, k_valid, dims, D)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new

    total = tl.where(q_valid, total, 1.0)
    out = acc / total[:, None]
    io_mask = q_valid[:, None] & (dims[None, :] < D)
    tl.store(Out + base + q_token[:, None] * D + dims[None, :], out.to(Out.dtype.element_ty), mask=io_mask)
    tl.store(LSE + bh.to(tl.int64) * H * W + q_token, m + tl.log2(total), mask=q_valid)


@triton.autotune(_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["DBias"])
@triton.jit(do_not_specialize=["HEADS", "H", "W"])
def _backward_query_kernel(
    Q, K, V, RPB, Out, DOut, LSE, Delta, DQ, DBias, qk_scale, scale, HEADS, H, W, D,
    KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr, RPB_GRAD: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, BQ_H: tl.constexpr, BQ_W: tl.constexpr, BK_H: tl.constexpr, BK_W: tl.constexpr,
):  # fmt: skip
    """dQ per query tile, the softmax's ``delta = rowsum(dO * O)`` for the dK/dV pass, and dS per window
    position for the RPB gradient."""
    group_row, group_col, rows, cols, row0, col0 = _group_geometry(H, W, DIL, BQ_H, BQ_W)
    bh = tl.program_id(1)
    head = bh % HEADS
    base = bh.to(tl.int64) * H * W * D
    rpb = RPB + head * (2 * KS - 1) * (2 * KS - 1)
    dims = tl.arange(0, BLOCK_D)

    q_row, q_col = _tile_coords(row0, col0, BQ_H, BQ_W)
    q_valid = (q_row < rows) & (q_col < cols)
    q_token = _token(q_row, q_col, group_row, group_col, W, DIL)
    start_row, start_col = _window_start(q_row, rows, KS), _window_start(q_col, cols, KS)
    q = _load_rows(Q + base, q_token, q_valid, dims, D)
    do = _load_rows(DOut + base, q_token, q_valid, dims, D)
    out = _load_rows(Out + base, q_token, q_valid, dims, D)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * H * W + q_token, delta, mask=q_valid)
    lse = tl.load(LSE + bh.to(tl.int64) * H * W + q_token, mask=q_valid, other=0.0)
    # dS of (query, window position) for the RPB gradient, summed over the batch: (heads, H * W, KS * KS)
    window_grad = DBias + (head.to(tl.int64) * H * W + q_token) * (KS * KS)

    row_lo, col_lo = _window_start(row0, rows, KS), _window_start(col0, cols, KS)
    row_hi = tl.where(row0 < rows, _window_start(tl.minimum(row0 + BQ_H, rows) - 1, rows, KS) + KS, row_lo)
    col_hi = tl.where(col0 < cols, _window_start(tl.minimum(col0 + BQ_W, cols) - 1, cols, KS) + KS, col_lo)

    dq = tl.zeros([BQ_H * BQ_W, BLOCK_D], tl.float32)
    for key_row0 in range(row_lo, row_hi, BK_H):
        for key_col0 in range(col_lo, col_hi, BK_W):
            k_row, k_col = _tile_coords(key_row0, key_col0, BK_H, BK_W)
            k_valid = (k_row < row_hi) & (k_col < col_hi)
            k_token = _token(k_row, k_col, group_row, group_col, W, DIL)
            k = _load_rows(K + base, k_token, k_valid, dims, D)
            v = _load_rows(V + base, k_token, k_valid, dims, D)
            dots = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            logits, in_window = _masked_logits(
                dots, q_row[:, None], q_col[:, None], start_row[:, None], start_col[:, None], k_row[None, :],
                k_col[None, :], q_valid[:, None], rpb, qk_scale, KS, HAS_RPB,
            )  # fmt: skip
            p = tl.exp2(logits - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            if RPB_GRAD:
                position = (k_row * KS + k_col)[None, :] - (start_row * KS + start_col)[:, None]
                tl.atomic_add(window_grad[:, None] + position, ds, mask=in_window, sem="relaxed")

    io_mask = q_valid[:, None] & (dims[None, :] < D)
    tl.store(DQ + base + q_token[:, None] * D + dims[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=io_mask)


@triton.autotune(_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["HEADS", "H", "W"])
def _backward_key_kernel(
    Q, K, V, RPB, DOut, LSE, Delta, DK, DV, qk_scale, scale, HEADS, H, W, D,
    KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BQ_H: tl.constexpr, BQ_W: tl.constexpr, BK_H: tl.constexpr, BK_W: tl.constexpr,
):  # fmt: skip
    """dK and dV per key tile, over the rectangle of queries whose windows reach the tile."""
    group_row, group_col, rows, cols, row0, col0 = _group_geometry(H, W, DIL, BK_H, BK_W)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * H * W * D
    stats = bh.to(tl.int64) * H * W
    rpb = RPB + (bh % HEADS) * (2 * KS - 1) * (2 * KS - 1)
    dims = tl.arange(0, BLOCK_D)

    k_row, k_col = _tile_coords(row0, col0, BK_H, BK_W)
    k_valid = (k_row < rows) & (k_col < cols)
    k_token = _token(k_row, k_col, group_row, group_col, W, DIL)
    k = _load_rows(K + base, k_token, k_valid, dims, D)
    v = _load_rows(V + base, k_token, k_valid, dims, D)

    # query i reaches keys [s(i), s(i) + KS); s is non-decreasing, so the queries form a rectangle
    row_lo = tl.where(row0 < KS, 0, row0 - KS // 2)
    col_lo = tl.where(col0 < KS, 0, col0 - KS // 2)
    last_row, last_col = tl.minimum(row0 + BK_H, rows) - 1, tl.minimum(col0 + BK_W, cols) - 1
    row_hi = tl.where(last_row >= rows - KS, rows, last_row + KS // 2 + 1)
    col_hi = tl.where(last_col >= cols - KS, cols, last_col + KS // 2 + 1)
    row_hi = tl.where(row0 < rows, row_hi, row_lo)  # tiles past this group's sub-grid
    col_hi = tl.where(col0 < cols, col_hi, col_lo)

    dk = tl.zeros([BK_H * BK_W, BLOCK_D], tl.float32)
    dv = tl.zeros([BK_H * BK_W, BLOCK_D], tl.float32)
    for query_row0 in range(row_lo, row_hi, BQ_H):
        for query_col0 in range(col_lo, col_hi, BQ_W):
            q_row, q_col = _tile_coords(query_row0, query_col0, BQ_H, BQ_W)
            q_valid = (q_row < row_hi) & (q_col < col_hi)
            q_token = _token(q_row, q_col, group_row, group_col, W, DIL)
            start_row, start_col = _window_start(q_row, rows, KS), _window_start(q_col, cols, KS)
            q = _load_rows(Q + base, q_token, q_valid, dims, D)
            do = _load_rows(DOut + base, q_token, q_valid, dims, D)
            lse = tl.load(LSE + stats + q_token, mask=q_valid, other=0.0)
            delta = tl.load(Delta + stats + q_token, mask=q_valid, other=0.0)
            dots = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (keys, queries)
            logits, _ = _masked_logits(
                dots, q_row[None, :], q_col[None, :], start_row[None, :], start_col[None, :], k_row[:, None],
                k_col[:, None], q_valid[None, :], rpb, qk_scale, KS, HAS_RPB,
            )  # fmt: skip
            p = tl.exp2(logits - lse[None, :])
            dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds = p * (dp - delta[None, :])
            dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)

    io_mask = k_valid[:, None] & (dims[None, :] < D)
    offsets = base + k_token[:, None] * D + dims[None, :]
    tl.store(DK + offsets, (dk * scale).to(DK.dtype.element_ty), mask=io_mask)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=io_mask)


def _grid(batch_heads: int, height: int, width: int, dilation: int, rows_key: str, cols_key: str):
    def grid(meta):
        tiles = triton.cdiv(triton.cdiv(height, dilation), meta[rows_key])
        tiles *= triton.cdiv(triton.cdiv(width, dilation), meta[cols_key])
        return tiles, batch_heads, dilation * dilation

    return grid


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
            BLOCK_D=max(16, triton.next_power_of_2(dim)),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )
        grid = _grid(batch * heads, height, width, dilation, "BQ_H", "BQ_W")
        _forward_kernel[grid](q, k, v, table, out, lse, scale * LOG2E, heads, height, width, dim, **meta)
        ctx.save_for_backward(q, k, v, table, out, lse)
        ctx.meta, ctx.scale, ctx.has_rpb = meta, scale, has_rpb
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, table, out, lse = ctx.saved_tensors
        batch, heads, height, width, dim = q.shape
        meta, kernel_size, dilation = ctx.meta, ctx.meta["KS"], ctx.meta["DIL"]
        rpb_grad = ctx.has_rpb and ctx.needs_input_grad[3]
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(lse)
        window_grad = torch.zeros(
            (heads, height * width, kernel_size**2) if rpb_grad else (1,), device=q.device, dtype=torch.float32
        )
        qk_scale = ctx.scale * LOG2E
        query_grid = _grid(batch * heads, height, width, dilation, "BQ_H", "BQ_W")
        _backward_query_kernel[query_grid](
            q, k, v, table, out, grad_out, lse, delta, grad_q, window_grad, qk_scale, ctx.scale, heads, height,
            width, dim, RPB_GRAD=rpb_grad, **meta,
        )  # fmt: skip
        key_grid = _grid(batch * heads, height, width, dilation, "BK_H", "BK_W")
        _backward_key_kernel[key_grid](
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
