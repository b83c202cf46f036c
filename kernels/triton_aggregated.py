"""Fused Triton aggregated attention (TransNeXt), forward and backward.

One program owns a tile of queries of one (batch, head). Forward: the ``window**2`` window
logits (gathered keys, elementwise dot products) form the first block of an online softmax
in base 2; the pooled keys follow in tiles of ``BLOCK_P`` through ``tl.dot``; the window
values (with the learnable-token weights added after the softmax) are summed last, once the
final max and normaliser are known. Besides the kernel's inputs, only the output and the
log-sum-exp per query are saved for the backward.

Backward, two kernels:

- per query tile: ``delta = dout . out - sum_o learnable_o * dw_o`` (the softmax-weighted
  sum of ``dw``), the query gradients, the pooled-key gradients and every table's gradient
  (atomically accumulated in float32: pooled keys/values over query tiles, ``pool_bias``
  over the batch, ``rpb``/learnable tokens over everything);
- per key tile: the window keys' and values' gradients, gathered from the queries that see
  each key (``query = key - offset``), so they need no atomics.

The elementwise pre-processing (normalising q, k and the pooled keys; the length-scaled
queries) stays in PyTorch autograd.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .aggregated import _check_window, _scaled_queries

__all__ = ["aggregated_attention_triton"]

LOG2E = tl.constexpr(1.4426950408889634)  # softmax in base 2: exp(x) = exp2(x * LOG2E)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _window_offset(o, WINDOW: tl.constexpr):
    """Row and column offsets of row-major window position ``o``."""
    return o // WINDOW - WINDOW // 2, o % WINDOW - WINDOW // 2


@triton.jit
def _gather_rows(ptr, rows, ok, d, d_ok, head_dim):
    """``ptr[rows, :]`` as float32 ``(BLOCK_M, BLOCK_D)``, zeros where ``ok`` is false."""
    return tl.load(ptr + rows[:, None] * head_dim + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0).to(
        tl.float32
    )


@triton.jit
def _column(x, cols, o):
    """Column ``o`` of ``x`` ``(BLOCK_M, BLOCK_W)``."""
    return tl.sum(tl.where(cols[None, :] == o, x, 0.0), 1)


def _configs(blocks: list[tuple[int, ...]], names: tuple[str, ...]) -> list[triton.Config]:
    """``blocks``: (block sizes..., num_warps) per config; a few, since every one compiles per dtype and geometry."""
    if _INTERPRETED:  # the interpreter runs every config: one, with dot sizes the GPU also accepts
        return [triton.Config(dict.fromkeys(names, 16), num_warps=1)]
    return [triton.Config(dict(zip(names, b[:-1])), num_warps=b[-1], num_stages=2) for b in blocks]


def _prune(configs, named_args, **kwargs):
    """Keep pooled tiles no wider than the pooled keys need and query tiles of at most 4096 elements;
    head dims above 64 take 16-query tiles on 8 warps only (ptxas for sm_90 spills larger ones)."""
    pool_block = max(32, triton.next_power_of_2(named_args["pool_len"]))
    block_d = max(16, triton.next_power_of_2(named_args["head_dim"]))

    def fits(config):
        block_m = config.kwargs["BLOCK_M"]
        small_tile = (block_m == 16) == (block_d > 64)
        return config.kwargs.get("BLOCK_P", 0) <= pool_block and block_m * block_d <= 4096 and small_tile

    return [c for c in configs if fits(c)] or configs[:1]


_FWD_CONFIGS = _configs([(16, 32, 8), (32, 32, 4), (64, 32, 8), (64, 64, 8)], ("BLOCK_M", "BLOCK_P"))
_BWD_QUERY_CONFIGS = _configs([(16, 32, 8), (32, 32, 4), (64, 32, 8)], ("BLOCK_M", "BLOCK_P"))
_BWD_KEY_CONFIGS = _configs([(16, 8), (32, 4), (64, 8), (128, 8)], ("BLOCK_M",))
_PRUNE = {"early_config_prune": _prune}
_KEY = ["head_dim", "pool_len"]


@triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _aggregated_fwd(
    QH, QN, K, V, KP, VP, RPB, PB, TOK, TOKB, OUT, LSE,
    heads, height, width, pool_len, head_dim,
    WINDOW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    tile, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    head = bh % heads
    tokens, local_len = height * width, WINDOW * WINDOW
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    y, x = rows // width, rows % width
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    cols = tl.arange(0, BLOCK_W)
    row_base = bh * tokens * head_dim
    K, V, QH, QN = K + row_base, V + row_base, QH + row_base, QN + row_base
    KP, VP = KP + bh * pool_len * head_dim, VP + bh * pool_len * head_dim
    PB = PB + head * tokens * pool_len

    q_dot = tl.load(QH + rows[:, None] * head_dim + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q_dot.to(tl.float32)

    # window logits (base 2), out-of-image keys at -inf
    s_win = tl.full((BLOCK_M, BLOCK_W), float("-inf"), tl.float32)
    for o in range(WINDOW * WINDOW):
        dy, dx = _window_offset(o, WINDOW)
        ky, kx = y + dy, x + dx
        ok = row_ok & (ky >= 0) & (ky < height) & (kx >= 0) & (kx < width)
        key = _gather_rows(K, ky * width + kx, ok, d, d_ok, head_dim)
        logit = (tl.sum(q * key, 1) + tl.load(RPB + head * local_len + o).to(tl.float32)) * LOG2E
        s_win = tl.where((cols[None, :] == o) & ok[:, None], logit[:, None], s_win)
    m_win = tl.where(row_ok, tl.max(s_win, 1), 0.0)
    p_win = tl.exp2(s_win - m_win[:, None])
    m, denom = m_win, tl.sum(p_win, 1)

    # pooled keys: online softmax over tiles
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, pool_len, BLOCK_P):
        j = start + tl.arange(0, BLOCK_P)
        j_ok = j < pool_len
        kv_mask = d_ok[:, None] & j_ok[None, :]
        kp = tl.load(KP + j[None, :] * head_dim + d[:, None], mask=kv_mask, other=0.0)  # (BLOCK_D, BLOCK_P)
        bias = tl.load(PB + rows[:, None] * pool_len + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        scores = (tl.dot(q_dot, kp, input_precision=PRECISION) + bias.to(tl.float32)) * LOG2E
        scores = tl.where(j_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        vp = tl.load(VP + j[:, None] * head_dim + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vp.dtype), vp, input_precision=PRECISION)
        m = m_new

    # window values, weighted by the softmax plus the learnable-token affinity
    acc = acc / denom[:, None]
    a_win = p_win * (tl.exp2(m_win - m) / denom)[:, None]
    q_norm = _gather_rows(QN, rows, row_ok, d, d_ok, head_dim)
    for o in range(WINDOW * WINDOW):
        dy, dx = _window_offset(o, WINDOW)
        ky, kx = y + dy, x + dx
        ok = row_ok & (ky >= 0) & (ky < height) & (kx >= 0) & (kx < width)
        value = _gather_rows(V, ky * width + kx, ok, d, d_ok, head_dim)
        token = tl.load(TOK + head * head_dim * local_len + d * local_len + o, mask=d_ok, other=0.0).to(tl.float32)
        learned = tl.sum(q_norm * token[None, :], 1) + tl.load(TOKB + head * local_len + o).to(tl.float32)
        acc += (_column(a_win, cols, o) + learned)[:, None] * value

    mask = row_ok[:, None] & d_ok[None, :]
    tl.store(OUT + row_base + rows[:, None] * head_dim + d[None, :], acc, mask=mask)
    tl.store(LSE + bh * tokens + rows, m + tl.log2(denom), mask=row_ok)


@triton.autotune(
    _BWD_QUERY_CONFIGS, key=_KEY, prune_configs_by=_PRUNE, reset_to_zero=["DKP", "DVP", "DRPB", "DPB", "DTOK", "DTOKB"]
)
@triton.jit
def _aggregated_bwd_query(
    QH, QN, K, V, KP, VP, RPB, PB, TOK, TOKB, OUT, DOUT, LSE,
    DELTA, DQH, DQN, DKP, DVP, DRPB, DPB, DTOK, DTOKB,
    heads, height, width, pool_len, head_dim,
    WINDOW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    tile, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    head = bh % heads
    tokens, local_len = height * width, WINDOW * WINDOW
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    y, x = rows // width, rows % width
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    cols = tl.arange(0, BLOCK_W)
    cols_ok = cols < local_len
    row_base = bh * tokens * head_dim
    K, V, KP, VP = K + row_base, V + row_base, KP + bh * pool_len * head_dim, VP + bh * pool_len * head_dim
    PB, DPB = PB + head * tokens * pool_len, DPB + head * tokens * pool_len
    DKP, DVP = DKP + bh * pool_len * head_dim, DVP + bh * pool_len * head_dim
    tok_offsets = head * head_dim * local_len + d[None, :] * local_len + cols[:, None]  # (BLOCK_W, BLOCK_D)
    tok_mask = cols_ok[:, None] & d_ok[None, :]

    mask = row_ok[:, None] & d_ok[None, :]
    offsets = row_base + rows[:, None] * head_dim + d[None, :]
    q_dot = tl.load(QH + offsets, mask=mask, other=0.0)
    q = q_dot.to(tl.float32)
    q_norm = tl.load(QN + offsets, mask=mask, other=0.0).to(tl.float32)
    dout_dot = tl.load(DOUT + offsets, mask=mask, other=0.0)
    dout = dout_dot.to(tl.float32)
    out = tl.load(OUT + offsets, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + bh * tokens + rows, mask=row_ok, other=0.0)
    tokens_t = tl.load(TOK + tok_offsets, mask=tok_mask, other=0.0).to(tl.float32)  # (BLOCK_W, BLOCK_D)
    token_bias = tl.load(TOKB + head * local_len + cols, mask=cols_ok, other=0.0).to(tl.float32)
    learned = tl.dot(q_norm, tl.trans(tokens_t), input_precision="ieee") + token_bias[None, :]

    # dout . v per window position, then delta (the softmax-weighted sum of dout . values)
    dw_win = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
    for o in range(WINDOW * WINDOW):
        dy, dx = _window_offset(o, WINDOW)
        ky, kx = y + dy, x + dx
        ok = row_ok & (ky >= 0) & (ky < height) & (kx >= 0) & (kx < width)
        value = _gather_rows(V, ky * width + kx, ok, d, d_ok, head_dim)
        dw_win = tl.where(cols[None, :] == o, tl.sum(dout * value, 1)[:, None], dw_win)
    delta = tl.sum(dout * out, 1) - tl.sum(learned * dw_win, 1)
    tl.store(DELTA + bh * tokens + rows, delta, mask=row_ok)

    # window logits again, their gradients and the query gradient through the window keys
    ds_win = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for o in range(WINDOW * WINDOW):
        dy, dx = _window_offset(o, WINDOW)
        ky, kx = y + dy, x + dx
        ok = row_ok & (ky >= 0) & (ky < height) & (kx >= 0) & (kx < width)
        key = _gather_rows(K, ky * width + kx, ok, d, d_ok, head_dim)
        logit = (tl.sum(q * key, 1) + tl.load(RPB + head * local_len + o).to(tl.float32)) * LOG2E
        ds_o = tl.where(ok, tl.exp2(logit - lse), 0.0) * (_column(dw_win, cols, o) - delta)
        ds_win = tl.where(cols[None, :] == o, ds_o[:, None], ds_win)
        dq += ds_o[:, None] * key
    tl.atomic_add(DRPB + head * local_len + cols, tl.sum(ds_win, 0), mask=cols_ok, sem="relaxed")
    tl.atomic_add(DTOKB + head * local_len + cols, tl.sum(dw_win, 0), mask=cols_ok, sem="relaxed")
    d_tokens = tl.dot(tl.trans(dw_win), q_norm, input_precision="ieee")
    tl.atomic_add(DTOK + tok_offsets, d_tokens, mask=tok_mask, sem="relaxed")
    dq_norm = tl.dot(dw_win, tokens_t, input_precision="ieee")
    tl.store(DQN + offsets, dq_norm, mask=mask)

    # pooled keys
    for start in range(0, pool_len, BLOCK_P):
        j = start + tl.arange(0, BLOCK_P)
        j_ok = j < pool_len
        kp = tl.load(KP + j[:, None] * head_dim + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        vp = tl.load(VP + j[:, None] * head_dim + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        pair_mask = row_ok[:, None] & j_ok[None, :]
        pair_offsets = rows[:, None] * pool_len + j[None, :]
        bias = tl.load(PB + pair_offsets, mask=pair_mask, other=0.0).to(tl.float32)
        scores = (tl.dot(q_dot, tl.trans(kp), input_precision=PRECISION) + bias) * LOG2E
        p = tl.where(pair_mask, tl.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(dout_dot, tl.trans(vp), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        tl.atomic_add(DPB + pair_offsets, ds, mask=pair_mask, sem="relaxed")
        dq += tl.dot(ds.to(kp.dtype), kp, input_precision=PRECISION)
        kv_mask = j_ok[:, None] & d_ok[None, :]
        kv_offsets = j[:, None] * head_dim + d[None, :]
        d_kp = tl.dot(tl.trans(ds.to(q_dot.dtype)), q_dot, input_precision=PRECISION)
        d_vp = tl.dot(tl.trans(p.to(dout_dot.dtype)), dout_dot, input_precision=PRECISION)
        tl.atomic_add(DKP + kv_offsets, d_kp, mask=kv_mask, sem="relaxed")
        tl.atomic_add(DVP + kv_offsets, d_vp, mask=kv_mask, sem="relaxed")
    tl.store(DQH + offsets, dq, mask=mask)


@triton.autotune(_BWD_KEY_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _aggregated_bwd_key(
    QH, QN, K, V, RPB, TOK, TOKB, DOUT, LSE, DELTA, DK, DV,
    heads, height, width, pool_len, head_dim,
    WINDOW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    tile, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    head = bh % heads
    tokens, local_len = height * width, WINDOW * WINDOW
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    y, x = rows // width, rows % width
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    row_base = bh * tokens * head_dim
    QH, QN, DOUT = QH + row_base, QN + row_base, DOUT + row_base
    LSE, DELTA = LSE + bh * tokens, DELTA + bh * tokens
    mask = row_ok[:, None] & d_ok[None, :]
    offsets = row_base + rows[:, None] * head_dim + d[None, :]
    key = tl.load(K + offsets, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(V + offsets, mask=mask, other=0.0).to(tl.float32)

    dk = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for o in range(WINDOW * WINDOW):
        # the queries that see this key at window position o
        dy, dx = _window_offset(o, WINDOW)
        qy, qx = y - dy, x - dx
        ok = row_ok & (qy >= 0) & (qy < height) & (qx >= 0) & (qx < width)
        query_rows = qy * width + qx
        q = _gather_rows(QH, query_rows, ok, d, d_ok, head_dim)
        q_norm = _gather_rows(QN, query_rows, ok, d, d_ok, head_dim)
        dout = _gather_rows(DOUT, query_rows, ok, d, d_ok, head_dim)
        lse = tl.load(LSE + query_rows, mask=ok, other=0.0)
        delta = tl.load(DELTA + query_rows, mask=ok, other=0.0)
        logit = (tl.sum(q * key, 1) + tl.load(RPB + head * local_len + o).to(tl.float32)) * LOG2E
        a = tl.where(ok, tl.exp2(logit - lse), 0.0)
        ds = a * (tl.sum(dout * value, 1) - delta)
        dk += ds[:, None] * q
        token = tl.load(TOK + head * head_dim * local_len + d * local_len + o, mask=d_ok, other=0.0).to(tl.float32)
        learned = tl.sum(q_norm * token[None, :], 1) + tl.load(TOKB + head * local_len + o).to(tl.float32)
        dv += tl.where(ok, a + learned, 0.0)[:, None] * dout
    tl.store(DK + offsets, dk, mask=mask)
    tl.store(DV + offsets, dv, mask=mask)


def _launch_args(q_hat: torch.Tensor, pool_len: int, window_size: int) -> tuple[tuple, dict]:
    """Sizes and compile-time constants shared by the three kernels (blocks padded to powers of two >= 16)."""
    heads, height, width, head_dim = q_hat.shape[1:]
    meta = dict(
        WINDOW=window_size,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_W=max(16, triton.next_power_of_2(window_size**2)),
        PRECISION="ieee" if q_hat.dtype == torch.float32 else "tf32",  # float32 stays exact: no TF32
    )
    return (heads, height, width, pool_len, head_dim), meta


def _grid(q_hat: torch.Tensor):
    batch, heads, height, width = q_hat.shape[:4]
    return lambda meta: (triton.cdiv(height * width, meta["BLOCK_M"]), batch * heads)


class _AggregatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_hat, q_norm, keys, v, pool_keys, v_pool, rpb, pool_bias, tokens, token_bias, window_size):
        sizes, meta = _launch_args(q_hat, pool_keys.shape[2], window_size)
        out = torch.empty_like(v)
        lse = torch.empty(q_hat.shape[:4], device=q_hat.device, dtype=torch.float32)
        _aggregated_fwd[_grid(q_hat)](
            q_hat, q_norm, keys, v, pool_keys, v_pool, rpb, pool_bias, tokens, token_bias, out, lse, *sizes, **meta
        )
        ctx.save_for_backward(q_hat, q_norm, keys, v, pool_keys, v_pool, rpb, pool_bias, tokens, token_bias, out, lse)
        ctx.window_size = window_size
        return out

    @staticmethod
    def backward(ctx, dout):
        q_hat, q_norm, keys, v, pool_keys, v_pool, rpb, pool_bias, tokens, token_bias, out, lse = ctx.saved_tensors
        sizes, meta = _launch_args(q_hat, pool_keys.shape[2], ctx.window_size)
        dout = dout.contiguous()

        def f32_zeros(t):
            return torch.zeros(t.shape, device=t.device, dtype=torch.float32)

        delta = torch.empty_like(lse)
        dq_hat, dq_norm, dk, dv = (torch.empty_like(t) for t in (q_hat, q_norm, keys, v))
        d_pool_keys, d_v_pool, d_rpb, d_pool_bias, d_tokens, d_token_bias = (
            f32_zeros(t) for t in (pool_keys, v_pool, rpb, pool_bias, tokens, token_bias)
        )
        _aggregated_bwd_query[_grid(q_hat)](
            q_hat, q_norm, keys, v, pool_keys, v_pool, rpb, pool_bias, tokens, token_bias, out, dout, lse,
            delta, dq_hat, dq_norm, d_pool_keys, d_v_pool, d_rpb, d_pool_bias, d_tokens, d_token_bias,
            *sizes, **meta,
        )  # fmt: skip
        _aggregated_bwd_key[_grid(q_hat)](
            q_hat, q_norm, keys, v, rpb, tokens, token_bias, dout, lse, delta, dk, dv,
            *sizes, WINDOW=meta["WINDOW"], BLOCK_D=meta["BLOCK_D"],
        )  # fmt: skip
        grads = (d_pool_keys, d_v_pool, d_rpb, d_pool_bias, d_tokens, d_token_bias)
        inputs = (pool_keys, v_pool, rpb, pool_bias, tokens, token_bias)
        return dq_hat, dq_norm, dk, dv, *(g.to(t.dtype) for g, t in zip(grads, inputs)), None


def aggregated_attention_triton(
    q, k, v, k_pool, v_pool, query_embedding, logit_scale, rpb, pool_bias, learnable_tokens, learnable_bias, window_size
):
    """Fused aggregated attention; arguments as :func:`visionzoo.kernels.aggregated_attention`."""
    _check_window(window_size)
    heads, pool_len = q.shape[1], k_pool.shape[2]
    q_norm, q_hat = _scaled_queries(q, query_embedding, logit_scale, window_size, pool_len)
    dtype = q.dtype  # under autocast the normalisations and the fp32 tables give float32: one dtype for the dots
    return _AggregatedAttention.apply(
        q_hat.to(dtype).contiguous(),
        q_norm.to(dtype).contiguous(),
        F.normalize(k, dim=-1).to(dtype).contiguous(),
        v.contiguous(),
        F.normalize(k_pool, dim=-1).to(dtype).contiguous(),
        v_pool.contiguous(),
        rpb.reshape(heads, -1).contiguous(),
        pool_bias.contiguous(),
        learnable_tokens.contiguous(),
        learnable_bias.reshape(heads, -1).contiguous(),
        window_size,
    )
