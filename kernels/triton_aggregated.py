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

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import triton_toolkit as toolkit
from .geometry import check_window_size, scaled_queries
from .triton_toolkit import LOG2E_JIT, load_rows, online_softmax, store_rows

__all__ = ["aggregated_attention_triton"]


@triton.jit
def _lanes(BLOCK: tl.constexpr, count):
    """Lanes ``0 .. BLOCK - 1`` and which of them are below ``count``."""
    lanes = tl.arange(0, BLOCK)
    return lanes, lanes < count


@triton.jit
def _query_tile(heads, height, width, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch, head) and head; its tile of query rows (flat tokens), which are real, and their
    row and column in the map; the channel lanes, and which are real."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d, d_ok = _lanes(BLOCK_D, head_dim)
    return bh, bh % heads, rows, rows < height * width, rows // width, rows % width, d, d_ok


@triton.jit
def _window_offset(o, WINDOW: tl.constexpr):
    """Row and column offsets of row-major window position ``o``."""
    return o // WINDOW - WINDOW // 2, o % WINDOW - WINDOW // 2


@triton.jit
def _shifted(y, x, dy, dx, row_ok, height, width):
    """Flat position of ``(y + dy, x + dx)``, and whether it lies in the map (for a real row)."""
    sy, sx = y + dy, x + dx
    return sy * width + sx, row_ok & (sy >= 0) & (sy < height) & (sx >= 0) & (sx < width)


@triton.jit
def _window_rows(ptr, y, x, o, row_ok, height, width, d, head_dim, WINDOW: tl.constexpr):
    """Rows of ``ptr`` at window position ``o`` of the queries at ``(y, x)`` as float32 ``(BLOCK_M, BLOCK_D)``,
    zeros outside the map; and where they lie in it."""
    dy, dx = _window_offset(o, WINDOW)
    rows, ok = _shifted(y, x, dy, dx, row_ok, height, width)
    return load_rows(ptr, rows, ok, d, head_dim).to(tl.float32), ok


@triton.jit
def _window_logit(q, key, RPB, head, o, local_len):
    """Base-2 logit of the window key at position ``o``: ``q . key`` plus the relative position bias."""
    return (tl.sum(q * key, 1) + tl.load(RPB + head * local_len + o).to(tl.float32)) * LOG2E_JIT


@triton.jit
def _learned(q_norm, TOK, TOKB, head, o, d, d_ok, head_dim, local_len):
    """The learnable-token weight of window position ``o``: ``q_norm . token_o + bias_o``."""
    token = tl.load(TOK + head * head_dim * local_len + d * local_len + o, mask=d_ok, other=0.0).to(tl.float32)
    return tl.sum(q_norm * token[None, :], 1) + tl.load(TOKB + head * local_len + o).to(tl.float32)


@triton.jit
def _column(x, cols, o):
    """Column ``o`` of ``x`` ``(BLOCK_M, BLOCK_W)``."""
    return tl.sum(tl.where(cols[None, :] == o, x, 0.0), 1)


def _configs(names: tuple[str, ...], tiles: list[tuple[int, ...]]) -> list[triton.Config]:
    """``tiles``: (block sizes..., num_warps) per config; a few, since every one compiles per dtype and geometry."""
    return toolkit.autotune_configs(names, tiles, num_stages=2, interpreted=(16,) * len(names) + (1,))


def _fits(tile: dict, args: dict) -> bool:
    """Pooled tiles no wider than the pooled keys need and query tiles of at most 4096 elements;
    head dims above 64 take 16-query tiles on 8 warps only (ptxas for sm_90 spills larger ones)."""
    pool_block = max(32, triton.next_power_of_2(args["pool_len"]))
    block_d = toolkit.block(args["head_dim"])
    small_tile = (tile["BLOCK_M"] == 16) == (block_d > 64)
    return tile.get("BLOCK_P", 0) <= pool_block and tile["BLOCK_M"] * block_d <= 4096 and small_tile


_FWD_CONFIGS = _configs(("BLOCK_M", "BLOCK_P"), [(16, 32, 8), (32, 32, 4), (64, 32, 8), (64, 64, 8)])
_BWD_QUERY_CONFIGS = _configs(("BLOCK_M", "BLOCK_P"), [(16, 32, 8), (32, 32, 4), (64, 32, 8)])
_BWD_KEY_CONFIGS = _configs(("BLOCK_M",), [(16, 8), (32, 4), (64, 8), (128, 8)])
_PRUNE = {"early_config_prune": toolkit.prune_configs(_fits)}
_KEY = ["head_dim", "pool_len"]


@triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _aggregated_fwd(
    QH, QN, K, V, KP, VP, RPB, PB, TOK, TOKB, OUT, LSE, heads, height, width, pool_len, head_dim,
    WINDOW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    bh, head, rows, row_ok, y, x, d, d_ok = _query_tile(heads, height, width, head_dim, BLOCK_M, BLOCK_D)
    tokens, local_len = height * width, WINDOW * WINDOW
    row_base = bh * tokens * head_dim
    K, V, QH, QN = K + row_base, V + row_base, QH + row_base, QN + row_base
    KP, VP = KP + bh * pool_len * head_dim, VP + bh * pool_len * head_dim
    PB = PB + head * tokens * pool_len

    q_dot = load_rows(QH, rows, row_ok, d, head_dim)
    q = q_dot.to(tl.float32)

    # window logits (base 2), out-of-image keys at -inf
    cols = tl.arange(0, BLOCK_W)
    s_win = tl.full((BLOCK_M, BLOCK_W), float("-inf"), tl.float32)
    for o in range(WINDOW * WINDOW):
        key, ok = _window_rows(K, y, x, o, row_ok, height, width, d, head_dim, WINDOW)
        logit = _window_logit(q, key, RPB, head, o, local_len)
        s_win = tl.where((cols[None, :] == o) & ok[:, None], logit[:, None], s_win)
    m_win = tl.where(row_ok, tl.max(s_win, 1), 0.0)
    p_win = tl.exp2(s_win - m_win[:, None])
    m, denom = m_win, tl.sum(p_win, 1)

    # pooled keys: online softmax over tiles (m is finite from the window, which holds the query itself)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, pool_len, BLOCK_P):
        j = start + tl.arange(0, BLOCK_P)
        j_ok = j < pool_len
        kv_mask = d_ok[:, None] & j_ok[None, :]
        kp = tl.load(KP + j[None, :] * head_dim + d[:, None], mask=kv_mask, other=0.0)  # (BLOCK_D, BLOCK_P)
        bias = tl.load(PB + rows[:, None] * pool_len + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        scores = (tl.dot(q_dot, kp, input_precision=PRECISION) + bias.to(tl.float32)) * LOG2E_JIT
        vp = load_rows(VP, j, j_ok, d, head_dim)
        m, denom, acc = online_softmax(m, denom, acc, tl.where(j_ok[None, :], scores, float("-inf")), vp, PRECISION)

    # window values, weighted by the softmax plus the learnable-token affinity
    acc = acc / denom[:, None]
    a_win = p_win * (tl.exp2(m_win - m) / denom)[:, None]
    q_norm = load_rows(QN, rows, row_ok, d, head_dim).to(tl.float32)
    for o in range(WINDOW * WINDOW):
        value, _ = _window_rows(V, y, x, o, row_ok, height, width, d, head_dim, WINDOW)
        learned = _learned(q_norm, TOK, TOKB, head, o, d, d_ok, head_dim, local_len)
        acc += (_column(a_win, cols, o) + learned)[:, None] * value

    store_rows(OUT + row_base, rows, row_ok, d, head_dim, acc)
    tl.store(LSE + bh * tokens + rows, m + tl.log2(denom), mask=row_ok)


@triton.autotune(
    _BWD_QUERY_CONFIGS, key=_KEY, prune_configs_by=_PRUNE, reset_to_zero=["DKP", "DVP", "DRPB", "DPB", "DTOK", "DTOKB"]
)
@triton.jit
def _aggregated_bwd_query(
    QH, QN, K, V, KP, VP, RPB, PB, TOK, TOKB, OUT, DOUT, LSE,
    DELTA, DQH, DQN, DKP, DVP, DRPB, DPB, DTOK, DTOKB, heads, height, width, pool_len, head_dim,
    WINDOW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    bh, head, rows, row_ok, y, x, d, d_ok = _query_tile(heads, height, width, head_dim, BLOCK_M, BLOCK_D)
    tokens, local_len = height * width, WINDOW * WINDOW
    cols, cols_ok = _lanes(BLOCK_W, local_len)
    row_base = bh * tokens * head_dim
    K, V, KP, VP = K + row_base, V + row_base, KP + bh * pool_len * head_dim, VP + bh * pool_len * head_dim
    PB, DPB = PB + head * tokens * pool_len, DPB + head * tokens * pool_len
    DKP, DVP = DKP + bh * pool_len * head_dim, DVP + bh * pool_len * head_dim
    tok_offsets = head * head_dim * local_len + d[None, :] * local_len + cols[:, None]  # (BLOCK_W, BLOCK_D)
    tok_mask = cols_ok[:, None] & d_ok[None, :]

    q_dot = load_rows(QH + row_base, rows, row_ok, d, head_dim)
    q = q_dot.to(tl.float32)
    q_norm = load_rows(QN + row_base, rows, row_ok, d, head_dim).to(tl.float32)
    dout_dot = load_rows(DOUT + row_base, rows, row_ok, d, head_dim)
    dout = dout_dot.to(tl.float32)
    out = load_rows(OUT + row_base, rows, row_ok, d, head_dim).to(tl.float32)
    lse = tl.load(LSE + bh * tokens + rows, mask=row_ok, other=0.0)
    tokens_t = tl.load(TOK + tok_offsets, mask=tok_mask, other=0.0).to(tl.float32)  # (BLOCK_W, BLOCK_D)
    token_bias = tl.load(TOKB + head * local_len + cols, mask=cols_ok, other=0.0).to(tl.float32)
    learned = tl.dot(q_norm, tl.trans(tokens_t), input_precision="ieee") + token_bias[None, :]

    # dout . v per window position, then delta (the softmax-weighted sum of dout . values)
    dw_win = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
    for o in range(WINDOW * WINDOW):
        value, _ = _window_rows(V, y, x, o, row_ok, height, width, d, head_dim, WINDOW)
        dw_win = tl.where(cols[None, :] == o, tl.sum(dout * value, 1)[:, None], dw_win)
    delta = tl.sum(dout * out, 1) - tl.sum(learned * dw_win, 1)
    tl.store(DELTA + bh * tokens + rows, delta, mask=row_ok)

    # window logits again, their gradients and the query gradient through the window keys
    ds_win = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for o in range(WINDOW * WINDOW):
        key, ok = _window_rows(K, y, x, o, row_ok, height, width, d, head_dim, WINDOW)
        logit = _window_logit(q, key, RPB, head, o, local_len)
        ds_o = tl.where(ok, tl.exp2(logit - lse), 0.0) * (_column(dw_win, cols, o) - delta)
        ds_win = tl.where(cols[None, :] == o, ds_o[:, None], ds_win)
        dq += ds_o[:, None] * key
    tl.atomic_add(DRPB + head * local_len + cols, tl.sum(ds_win, 0), mask=cols_ok, sem="relaxed")
    tl.atomic_add(DTOKB + head * local_len + cols, tl.sum(dw_win, 0), mask=cols_ok, sem="relaxed")
    d_tokens = tl.dot(tl.trans(dw_win), q_norm, input_precision="ieee")
    tl.atomic_add(DTOK + tok_offsets, d_tokens, mask=tok_mask, sem="relaxed")
    store_rows(DQN + row_base, rows, row_ok, d, head_dim, tl.dot(dw_win, tokens_t, input_precision="ieee"))

    # pooled keys
    for start in range(0, pool_len, BLOCK_P):
        j = start + tl.arange(0, BLOCK_P)
        j_ok = j < pool_len
        kp = load_rows(KP, j, j_ok, d, head_dim)
        vp = load_rows(VP, j, j_ok, d, head_dim)
        pair_mask = row_ok[:, None] & j_ok[None, :]
        pair_offsets = rows[:, None] * pool_len + j[None, :]
        bias = tl.load(PB + pair_offsets, mask=pair_mask, other=0.0).to(tl.float32)
        scores = (tl.dot(q_dot, tl.trans(kp), input_precision=PRECISION) + bias) * LOG2E_JIT
        p = tl.where(pair_mask, tl.exp2(scores - lse[:, None]), 0.0)
        ds = p * (tl.dot(dout_dot, tl.trans(vp), input_precision=PRECISION) - delta[:, None])
        tl.atomic_add(DPB + pair_offsets, ds, mask=pair_mask, sem="relaxed")
        dq += tl.dot(ds.to(kp.dtype), kp, input_precision=PRECISION)
        kv_mask = j_ok[:, None] & d_ok[None, :]
        kv_offsets = j[:, None] * head_dim + d[None, :]
        d_kp = tl.dot(tl.trans(ds.to(q_dot.dtype)), q_dot, input_precision=PRECISION)
        d_vp = tl.dot(tl.trans(p.to(dout_dot.dtype)), dout_dot, input_precision=PRECISION)
        tl.atomic_add(DKP + kv_offsets, d_kp, mask=kv_mask, sem="relaxed")
        tl.atomic_add(DVP + kv_offsets, d_vp, mask=kv_mask, sem="relaxed")
    store_rows(DQH + row_base, rows, row_ok, d, head_dim, dq)


@triton.autotune(_BWD_KEY_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _aggregated_bwd_key(
    QH, QN, K, V, RPB, TOK, TOKB, DOUT, LSE, DELTA, DK, DV, heads, height, width, pool_len, head_dim,
    WINDOW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # here the rows are keys
    bh, head, rows, row_ok, y, x, d, d_ok = _query_tile(heads, height, width, head_dim, BLOCK_M, BLOCK_D)
    tokens, local_len = height * width, WINDOW * WINDOW
    row_base = bh * tokens * head_dim
    QH, QN, DOUT = QH + row_base, QN + row_base, DOUT + row_base
    LSE, DELTA = LSE + bh * tokens, DELTA + bh * tokens
    key = load_rows(K + row_base, rows, row_ok, d, head_dim).to(tl.float32)
    value = load_rows(V + row_base, rows, row_ok, d, head_dim).to(tl.float32)

    dk = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for o in range(WINDOW * WINDOW):
        dy, dx = _window_offset(o, WINDOW)
        query_rows, ok = _shifted(y, x, -dy, -dx, row_ok, height, width)  # the queries that see this key at o
        q = load_rows(QH, query_rows, ok, d, head_dim).to(tl.float32)
        q_norm = load_rows(QN, query_rows, ok, d, head_dim).to(tl.float32)
        dout = load_rows(DOUT, query_rows, ok, d, head_dim).to(tl.float32)
        lse = tl.load(LSE + query_rows, mask=ok, other=0.0)
        delta = tl.load(DELTA + query_rows, mask=ok, other=0.0)
        a = tl.where(ok, tl.exp2(_window_logit(q, key, RPB, head, o, local_len) - lse), 0.0)
        ds = a * (tl.sum(dout * value, 1) - delta)
        dk += ds[:, None] * q
        learned = _learned(q_norm, TOK, TOKB, head, o, d, d_ok, head_dim, local_len)
        dv += tl.where(ok, a + learned, 0.0)[:, None] * dout
    store_rows(DK + row_base, rows, row_ok, d, head_dim, dk)
    store_rows(DV + row_base, rows, row_ok, d, head_dim, dv)


def _launch_args(q_hat: torch.Tensor, pool_len: int, window_size: int) -> tuple[tuple, dict]:
    """Sizes and compile-time constants shared by the three kernels (blocks padded to powers of two >= 16)."""
    heads, height, width, head_dim = q_hat.shape[1:]
    meta = dict(
        WINDOW=window_size,
        BLOCK_D=toolkit.block(head_dim),
        BLOCK_W=toolkit.block(window_size**2),
        PRECISION=toolkit.dot_precision(q_hat.dtype),  # float32 stays exact: no TF32
    )
    return (heads, height, width, pool_len, head_dim), meta


def _grid(q_hat: torch.Tensor):
    batch, heads, height, width = q_hat.shape[:4]
    return toolkit.tile_grid(batch * heads, (height * width, "BLOCK_M"))


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
    """Fused aggregated attention; arguments as :func:`visionzoo.kernels.aggregated_attention`, but the pooled
    tokens' bias gathered: ``pool_bias`` ``(heads, H*W, P)`` (:func:`visionzoo.kernels.aggregated.gather_pool_bias`)."""
    check_window_size(window_size)
    heads, pool_len = q.shape[1], k_pool.shape[2]
    q_norm, q_hat = scaled_queries(q, query_embedding, logit_scale, window_size, pool_len)
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
