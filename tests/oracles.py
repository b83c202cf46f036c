"""Test helpers shared by several test modules: independent oracles and input makers (not a test module)."""

import itertools

import torch


def natten_window_start(index, length, kernel_size, dilation):
    """NATTEN's scalar ``get_window_start`` (natten_cpu_commons.h), the rule NAT/DiNAT trained with."""
    half = kernel_size // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    start = index - half * dilation
    if start < 0:
        return index % dilation
    if index + half * dilation >= length:
        remainder = index % dilation
        whole = (length // dilation) * dilation
        extra = length - whole
        if remainder < extra:
            return length - extra + remainder - 2 * half * dilation
        return whole + remainder - kernel_size * dilation
    return start


def natten_pb_start(index, length, kernel_size, dilation):
    """NATTEN's scalar ``get_pb_start``."""
    half = kernel_size // 2
    if dilation <= 1:
        return half + (index < half) * (half - index) + (index + half >= length) * (length - index - 1 - half)
    if index - half * dilation < 0:
        return kernel_size - 1 - index // dilation
    if index + half * dilation >= length:
        return (length - index - 1) // dilation
    return half


def brute_force(q, k, v, kernel_size, dilation, rpb, scale):
    """One query at a time, straight from NATTEN's index rules."""
    batch, heads, height, width, dim = q.shape
    out = torch.zeros_like(q)
    for i, j in itertools.product(range(height), range(width)):
        si, sj = (natten_window_start(p, n, kernel_size, dilation) for p, n in ((i, height), (j, width)))
        pi, pj = (natten_pb_start(p, n, kernel_size, dilation) for p, n in ((i, height), (j, width)))
        rows = [si + a * dilation for a in range(kernel_size)]
        cols = [sj + b * dilation for b in range(kernel_size)]
        keys = k[:, :, rows][:, :, :, cols].reshape(batch, heads, -1, dim)
        values = v[:, :, rows][:, :, :, cols].reshape(batch, heads, -1, dim)
        logits = torch.einsum("bhd,bhnd->bhn", q[:, :, i, j] * scale, keys)
        if rpb is not None:
            logits = logits + rpb[:, pi : pi + kernel_size, pj : pj + kernel_size].reshape(1, heads, -1)
        out[:, :, i, j] = torch.einsum("bhn,bhnd->bhd", logits.softmax(-1), values)
    return out


def pool_grid(pool: int) -> tuple[int, int]:
    """A pooled grid ``(ph, pw)`` of ``pool`` tokens, as square as ``pool`` allows."""
    rows = max(d for d in range(1, int(pool**0.5) + 1) if pool % d == 0)
    return rows, pool // rows


def make_aggregated_inputs(batch=2, heads=2, height=5, width=7, dim=4, pool=6, window=3, dtype=torch.float32, seed=0):
    """Inputs of ``aggregated_attention`` in its argument order, but ``window_size``. The pooled bias is a random
    table with random indices (repeats included: several pairs share an entry, as the CPB's do)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    pool_h, pool_w = pool_grid(pool)
    return dict(
        q=rand(batch, heads, height, width, dim),
        k=rand(batch, heads, height, width, dim),
        v=rand(batch, heads, height, width, dim),
        k_pool=rand(batch, heads, pool, dim),
        v_pool=rand(batch, heads, pool, dim),
        query_embedding=rand(heads, dim, scale=0.3),
        logit_scale=rand(heads).abs() + 1.0,
        rpb=rand(heads, window * window),
        cpb=rand(heads, height + pool_h, width + pool_w),
        cpb_rows=torch.randint(height + pool_h, (height, pool_h), generator=g),
        cpb_cols=torch.randint(width + pool_w, (width, pool_w), generator=g),
        learnable_tokens=rand(heads, dim, window * window, scale=0.3),
        learnable_bias=rand(heads, window * window, scale=0.3),
    )
