"""2D neighborhood attention (NAT, DiNAT) with optional relative position bias.

Each query attends to a ``kernel_size x kernel_size`` window of keys spaced ``dilation``
apart. NATTEN's border rule: within each dilation group (positions congruent modulo the
dilation) the window is centred on the query and shifted, never shrunk, where it would
cross the border; so H and W must be at least ``kernel_size * dilation``. The relative
position bias table ``rpb`` of shape ``(heads, 2k-1, 2k-1)`` is indexed by the key's offset
from the query in dilated steps, as in NATTEN <= 0.17 (which NAT/DiNAT were trained with).

Tensors are ``(B, heads, H, W, head_dim)``. Backends:

- ``reference``: window gathers in PyTorch, one kernel row at a time, with a hand-written
  backward that recomputes the gathers, so memory stays O(H*W*k^2) per head.
- ``natten``: ``natten.na2d`` (no RPB; forward only on CPU, where natten runs flex).
- ``flex``: ``flex_attention`` with a block mask of the neighbourhoods and the RPB as a
  score modification (CUDA; forward only on CPU). Only when forced, for now.
- ``triton``: fused forward and backward kernels (``triton_neighborhood.py``) with RPB and
  dilation; fp32/fp16/bf16, head dims up to 128; CUDA, or CPU under ``TRITON_INTERPRET=1``.
- ``tiled``: dense batched matrix multiplies over query tiles and the key rectangles around
  them (``tiles.py``), RPB and ``-inf`` outside the windows as one additive bias; fp32/fp64,
  forward and backward through autograd, any device.

``auto`` takes ``natten`` on CUDA when natten has its fused kernels (libnatten) and there is
no RPB, else ``triton`` on CUDA where it runs; on CPU ``tiled`` for fp32/fp64, else
``reference``. On CPU the reference was 8x (56x56) to 50x (112x112) faster than natten's and
torch's flex paths, and ``tiled`` 5-36x faster than the reference for a training step
(docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import torch

from . import dispatch
from .dispatch import Capability, Support
from .geometry import check_neighborhood as _check_window
from .geometry import neighborhood_windows
from .geometry import windows_1d as _windows_1d
from .precision import float32_logits
from .tiles import can_lay_out, neighborhood_bias, neighborhood_tile_size, neighborhood_tiles, tiled_attention

__all__ = [
    "neighborhood_attention",
    "neighborhood_attention_reference",
    "neighborhood_attention_weights",
    "neighborhood_windows",
]


def _without_grad_on_cpu(*tensors):
    """flex_attention refuses CPU inputs that require grad even under no_grad; detach them there."""
    if torch.is_grad_enabled():
        return tensors
    return tuple(t if t is None or t.device.type == "cuda" else t.detach() for t in tensors)


def _gathered_bias(rpb: torch.Tensor, bias_rows: torch.Tensor, bias_cols: torch.Tensor) -> torch.Tensor:
    """RPB of every (query, key) pair: ``(heads, H, W, k, k)``."""
    return rpb[:, bias_rows[:, None, :, None], bias_cols[None, :, None, :]]


def _key_windows(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, row: int) -> torch.Tensor:
    """Keys (or values) of kernel row ``row`` for every query: ``(B, heads, H, W, k, D)``."""
    return x.index_select(2, rows[:, row])[:, :, :, cols]


def _window_dots(x: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x`` against every key of its window: ``(B, heads, H, W, k, k)``."""
    return torch.stack(
        [torch.einsum("bhijd,bhijkd->bhijk", x, _key_windows(keys, rows, cols, a)) for a in range(rows.shape[1])],
        dim=-2,
    )


def _window_sums(weights: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Weighted sum of every window's values: ``(B, heads, H, W, D)``."""
    out = None
    for a in range(rows.shape[1]):
        part = torch.einsum("bhijk,bhijkd->bhijd", weights[..., a, :], _key_windows(values, rows, cols, a))
        out = part if out is None else out + part
    return out


def _window_scatter(weights: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_window_sums` in ``values``: each window position gathers ``weights * x``."""
    batch, heads, height, width, kernel, _ = weights.shape
    out = torch.zeros_like(x)
    for a in range(kernel):
        grad = (weights[..., a, :, None] * x[..., None, :]).reshape(batch, heads, height, width * kernel, -1)
        by_row = x.new_zeros(batch, heads, height, width, x.shape[-1]).index_add_(3, cols.reshape(-1), grad)
        out.index_add_(2, rows[:, a], by_row)
    return out


def _attention_weights(q, k, rows, cols, bias, scale):
    with float32_logits(q, k) as (q32, k32):  # float16 q . k overflows at large activations
        logits = _window_dots(q32 * scale, k32, rows, cols)  # q scaled before the product, as NATTEN does
        if bias is not None:
            logits = logits + bias
        shape = logits.shape
        weights = logits.flatten(-2).softmax(-1)
    return weights.to(q.dtype).reshape(shape)


class _NeighborhoodAttention(torch.autograd.Function):
    """Saves only the attention weights ``(B, heads, H, W, k, k)``; the backward regathers K and V."""

    @staticmethod
    def forward(ctx, q, k, v, bias, rows, cols, scale):
        weights = _attention_weights(q, k, rows, cols, bias, scale)
        ctx.save_for_backward(q, k, v, weights, rows, cols)
        ctx.scale = scale
        ctx.has_bias = bias is not None
        return _window_sums(weights, v, rows, cols)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, weights, rows, cols = ctx.saved_tensors
        dtype = q.dtype
        grad_out = grad_out.to(dtype).contiguous()  # under autocast it may arrive in another precision
        # float32 for float16/bfloat16: grad_q sums ds * k over the window, terms of the size of k that cancel
        # to a small gradient and overflow float16 on the way
        with float32_logits(q, k, v, weights, grad_out) as (q, k, v, weights, grad_out):
            grad_weights = _window_dots(grad_out, v, rows, cols)
            grad_v = _window_scatter(weights, grad_out, rows, cols)
            grad_logits = weights * (grad_weights - (weights * grad_weights).sum((-2, -1), keepdim=True))
            grad_q = _window_sums(grad_logits, k, rows, cols) * ctx.scale
            grad_k = _window_scatter(grad_logits, q * ctx.scale, rows, cols)
            grad_bias = grad_logits.sum(0).to(dtype) if ctx.has_bias else None
        return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), grad_bias, None, None, None


def _windows_and_bias(q, kernel_size, dilation, rpb):
    """Every query's key rows ``(H, k)`` and columns ``(W, k)``, and its window's RPB in ``q``'s dtype (or None)."""
    rows, bias_rows = neighborhood_windows(q.shape[2], kernel_size, dilation, q.device)
    cols, bias_cols = neighborhood_windows(q.shape[3], kernel_size, dilation, q.device)
    bias = None if rpb is None else _gathered_bias(rpb, bias_rows, bias_cols).to(q.dtype)
    return rows, cols, bias


def neighborhood_attention_reference(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    """Plain-PyTorch neighborhood attention; see :func:`neighborhood_attention`."""
    rows, cols, bias = _windows_and_bias(q, kernel_size, dilation, rpb)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = k.to(q.dtype), v.to(q.dtype)  # one precision throughout (autocast may mix them)
    if dispatch.needs_grad(q, k, v, bias) and not dispatch.is_exporting():
        return _NeighborhoodAttention.apply(q, k, v, bias, rows, cols, scale)
    return _window_sums(_attention_weights(q, k, rows, cols, bias, scale), v, rows, cols)


def neighborhood_attention_weights(q, k, kernel_size, dilation=1, rpb=None, scale=None):
    """The attention weights of :func:`neighborhood_attention_reference`, and where their keys are.

    Args:
        q: queries ``(B, heads, H, W, head_dim)``; H and W at least ``kernel_size * dilation``.
        k: keys, same shape.
        kernel_size: odd window size.
        dilation: spacing between the window's keys.
        rpb: relative position bias ``(heads, 2 * kernel_size - 1, 2 * kernel_size - 1)``.
        scale: logit scale; ``head_dim ** -0.5`` when None.

    Returns:
        ``weights`` ``(B, heads, H, W, kernel_size**2)``, each query's softmax over its window (row-major),
        and ``keys`` ``(B, H, W, kernel_size**2)``: the flat position ``row * W + col`` of each of those keys.
    """
    rows, cols, bias = _windows_and_bias(q, kernel_size, dilation, rpb)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    weights = _attention_weights(q, k.to(q.dtype), rows, cols, bias, scale)
    keys = (rows[:, None, :, None] * q.shape[3] + cols[None, :, None, :]).flatten(-2)
    return weights.flatten(-2), keys.expand(q.shape[0], -1, -1, -1)


# natten first: its fused kernels keep priority where they run (no RPB); flex is never automatic.
_op = dispatch.KernelOp(
    "neighborhood_attention",
    neighborhood_attention_reference,
    priority=("natten", "flex", "triton", "tiled"),
    features=("rpb", "float32_rpb", "dilation"),  # float32_rpb: an fp32 table beside half activations (autocast)
    schema="(Tensor q, Tensor k, Tensor v, int kernel_size, int dilation, Tensor? rpb, float? scale) -> Tensor",
)


def can_run_natten(q, k, v, kernel_size, dilation=1, rpb=None, scale=None) -> Capability:
    try:
        import natten
    except ImportError:
        return Capability.no("natten is not installed")
    if rpb is not None:
        return Capability.no("natten >= 0.20 has no relative position bias")
    if q.device.type == "cuda" and not natten.HAS_LIBNATTEN:
        return Capability.no("natten was built without libnatten: on CUDA it would run unfused flex attention")
    if q.device.type != "cuda" and dispatch.needs_grad(q, k, v):
        return Capability.no(f"natten on {q.device.type} is forward-only")
    if not q.dtype == k.dtype == v.dtype:
        return Capability.no("mixed dtypes")
    return Capability.yes()


def _natten_support() -> Support:
    """Forward only on CPU; on CUDA, with gradients, only where natten was built with libnatten."""
    import importlib.util

    if importlib.util.find_spec("natten") is None:
        return Support()
    import natten

    devices = ("cpu", "cuda") if natten.HAS_LIBNATTEN else ("cpu",)
    return Support(devices, dispatch.SINGLE_AND_HALF, backward=("cuda",), features=("dilation",))


@_op.register("natten", can_run_natten, declares=_natten_support, auto_devices=("cuda",))
def neighborhood_attention_natten(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    import natten

    q, k, v = _without_grad_on_cpu(q, k, v)

    def heads_last(t):
        return t.permute(0, 2, 3, 1, 4)

    out = natten.na2d(heads_last(q), heads_last(k), heads_last(v), kernel_size, dilation=dilation, scale=scale)
    return out.permute(0, 3, 1, 2, 4)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(height: int, width: int, kernel_size: int, dilation: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    rows, bias_rows = _windows_1d(height, kernel_size, dilation, device)
    cols, bias_cols = _windows_1d(width, kernel_size, dilation, device)
    row_start, col_start = rows[:, 0], cols[:, 0]
    span = (kernel_size - 1) * dilation

    def in_window(offset):
        return (offset >= 0) & (offset <= span) & (offset % dilation == 0)

    def mask_mod(b, h, q_idx, kv_idx):
        row_offset = kv_idx // width - row_start[q_idx // width]
        col_offset = kv_idx % width - col_start[q_idx % width]
        return in_window(row_offset) & in_window(col_offset)

    tokens = height * width
    mask = create_block_mask(mask_mod, None, None, tokens, tokens, device=device)
    return mask, (row_start, col_start, bias_rows[:, 0], bias_cols[:, 0])


def can_run_flex(q, k, v, kernel_size, dilation=1, rpb=None, scale=None) -> Capability:
    if q.device.type != "cuda" and dispatch.needs_grad(q, k, v, rpb):
        return Capability.no(f"flex_attention on {q.device.type} is forward-only")
    if not q.dtype == k.dtype == v.dtype:
        return Capability.no("mixed dtypes")
    return Capability.yes()


# Never chosen automatically: compiled on CUDA it was 5-8x faster than the reference at 56x56
# without RPB, but each call builds a new score_mod, so torch.compile recompiles until its
# limit and then runs unfused (docs/benchmarks.md). Force it with backend="flex".
@_op.register(
    "flex",
    can_run_flex,
    declares=Support(("cpu", "cuda"), dispatch.SINGLE_AND_HALF, ("cuda",), ("rpb", "float32_rpb", "dilation")),
    auto_devices=(),
)
def neighborhood_attention_flex(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, rpb = _without_grad_on_cpu(q, k, v, rpb)
    batch, heads, height, width, dim = q.shape
    _check_window(height, kernel_size, dilation)
    _check_window(width, kernel_size, dilation)
    mask, (row_start, col_start, bias_row_start, bias_col_start) = _flex_block_mask(
        height, width, kernel_size, dilation, q.device
    )
    score_mod = None
    if rpb is not None:
        last = 2 * kernel_size - 2

        def score_mod(score, b, h, q_idx, kv_idx):
            # evaluated on masked-out pairs too (unfused path): clamp their indices into the table
            qi, qj = q_idx // width, q_idx % width
            bias_row = bias_row_start[qi] + (kv_idx // width - row_start[qi]) // dilation
            bias_col = bias_col_start[qj] + (kv_idx % width - col_start[qj]) // dilation
            return score + rpb[h, bias_row.clamp(0, last), bias_col.clamp(0, last)]

    def tokens(t):
        return t.reshape(batch, heads, height * width, dim)

    # compiled on CUDA (fused kernel); eager elsewhere, where only the forward runs
    attend = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
    out = attend(tokens(q), tokens(k), tokens(v), score_mod=score_mod, block_mask=mask, scale=scale)
    return out.reshape(batch, heads, height, width, dim)


def can_run_triton(q, k, v, kernel_size, dilation=1, rpb=None, scale=None) -> Capability:
    verdict = dispatch.can_run_triton_on(q, k, v)
    if not verdict:
        return verdict
    if rpb is not None and (rpb.device != q.device or not rpb.is_floating_point()):
        return Capability.no("rpb must be a floating-point table on the device of q")  # any precision: read as fp32
    if not q.shape == k.shape == v.shape:
        return Capability.no("q, k and v differ in shape")
    if q.shape[-1] > 128:
        return Capability.no(f"head dim {q.shape[-1]} above 128")
    if q.shape[0] * q.shape[1] > 65535:
        return Capability.no("batch * heads above 65535 (a CUDA grid axis)")
    return Capability.yes()


@_op.register(
    "triton",
    can_run_triton,
    declares=dispatch.triton_support(("rpb", "float32_rpb", "dilation")),
    auto_devices=("cuda",),
)
def neighborhood_attention_triton(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    from .triton_neighborhood import neighborhood_attention_triton as fused  # imports triton: only when called

    _check_window(q.shape[2], kernel_size, dilation)
    _check_window(q.shape[3], kernel_size, dilation)
    return fused(q, k, v, kernel_size, dilation, rpb, scale)


def can_run_tiled(q, k, v, kernel_size, dilation=1, rpb=None, scale=None) -> Capability:
    verdict = can_lay_out(*q.shape)
    if not verdict:
        return verdict
    if not q.shape == k.shape == v.shape:
        return Capability.no("q, k and v differ in shape")
    return dispatch.one_wide_dtype(q, k, v)


# Chosen on CPU: 5-36x the reference for a training step at NAT's and DiNAT's stage shapes (docs/benchmarks.md).
@_op.register(
    "tiled",
    can_run_tiled,
    declares=Support(("cpu", "cuda"), dispatch.SINGLE_AND_DOUBLE, ("cpu", "cuda"), ("rpb", "dilation")),
    auto_devices=("cpu",),
)
def neighborhood_attention_tiled(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    height, width = q.shape[2], q.shape[3]
    _check_window(height, kernel_size, dilation)
    _check_window(width, kernel_size, dilation)
    tile = neighborhood_tile_size(height, width, kernel_size, dilation)
    tiles = neighborhood_tiles(height, width, kernel_size, dilation, tile, q.device)
    return tiled_attention(q, k, v, tiles, neighborhood_bias(rpb, tiles, kernel_size, q), scale)


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = dispatch.AUTO,
) -> torch.Tensor:
    """Each query attends to its (dilated) ``kernel_size x kernel_size`` neighbourhood.

    Args:
        q: queries ``(B, heads, H, W, head_dim)``; H and W at least ``kernel_size * dilation``.
        k: keys, same shape.
        v: values, same shape.
        kernel_size: odd window size.
        dilation: spacing between the window's keys.
        rpb: relative position bias ``(heads, 2 * kernel_size - 1, 2 * kernel_size - 1)``.
        scale: logit scale; ``head_dim ** -0.5`` when None.
        backend: ``auto``, ``reference``, ``tiled``, ``natten``, ``flex`` or ``triton``.
    """
    return _op(q, k, v, kernel_size, dilation, rpb, scale, backend=backend)
