"""Bi-level routing attention (BiFormer, Zhu et al., CVPR 2023).

The map is split into an ``S x S`` grid of regions (``n_win = S``). Level one routes regions:
region queries and keys are the means of the (detached) queries and keys of each region,
all heads together; their scaled affinity picks, for every query region, the ``topk`` key
regions with the highest scores (``torch.topk``, ties as it resolves them). Level two is
token-to-token attention of each query region over the tokens of its routed regions, per
head. As in the official code (``ops/bra_legacy.py``) the same ``scale`` serves both levels
and no gradient flows through the routing.

Tensors are ``(B, heads, H, W, head_dim)`` with H and W multiples of ``n_win``; values may
have their own head dim. ``valid_size`` marks the top-left ``(h, w)`` tokens as real and the
rest as padding: padded tokens are left out of the region means, never chosen before a
region with real tokens, and masked out of the attention.

Backends:

- ``reference``: gathers the routed keys and values of a chunk of query regions at a time
  (``index_select``, so the backward is an ``index_add`` into the un-expanded keys), with a
  hand-written backward that recomputes each chunk from the saved log-sum-exp: memory stays
  linear in tokens times ``topk`` for one chunk, whatever the map size.
- ``flex``: ``flex_attention`` over region-major tokens with a ``BlockMask`` of the routed
  region pairs (CUDA; forward only on CPU). Only when forced, for now.
- ``sdpa``: ``scaled_dot_product_attention`` over the whole map with the routed region pairs as
  its mask (fp32/fp64, with gradients): more pairs in one large product instead of many small
  ones over gathered copies. ``auto`` takes it on CPU where the routed regions are at least a
  quarter of all and the map is small (BiFormer's stage 3 at 224x224).
- ``triton`` (``triton_routing.py``): one fused kernel per query tile that reads the routed keys
  and values in place through the top-k index (online softmax, saves output and log-sum-exp),
  and a deterministic backward (dQ per query tile; dK/dV per key tile over the inverted index).
  fp32/fp16/bf16, head dims 16..128 (values may differ). ``auto`` picks it on CUDA; on CPU it
  runs only when forced, under ``TRITON_INTERPRET=1``.

:func:`bilevel_routing_attention_gather` is the official formulation (expand + ``torch.gather``
of every routed region for every query region, autograd backward) for benchmarks; it is not
a backend, since its backward materialises a ``regions x regions`` copy of keys and values.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import dispatch
from .dispatch import Capability, Support
from .geometry import check_grid as _check_grid
from .geometry import regions as _regions
from .geometry import route_regions
from .geometry import unregions as _unregions
from .geometry import valid_or_none as _valid_or_none
from .precision import float32_logits

__all__ = [
    "bilevel_routing_attention",
    "bilevel_routing_attention_gather",
    "bilevel_routing_attention_reference",
    "bilevel_routing_attention_weights",
    "route_regions",
]

# Logits of one chunk of query regions stay below this many elements (128 MiB in fp32).
_CHUNK_ELEMENTS = 2**22


def _routed(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens of the routed regions: ``x`` ``(B, h, R, T, d)``, ``index`` ``(B, c, k)`` -> ``(B, h, c, k*T, d)``."""
    batch, heads, regions, tokens, dim = x.shape
    flat = x.reshape(batch * heads * regions, tokens, dim)
    offsets = torch.arange(batch * heads, device=x.device).view(batch, heads, 1, 1) * regions
    rows = (index[:, None] + offsets).flatten()
    return flat.index_select(0, rows).reshape(batch, heads, index.shape[1], index.shape[2] * tokens, dim)


def _add_routed(out: torch.Tensor, grad: torch.Tensor, index: torch.Tensor) -> None:
    """Adjoint of :func:`_routed`: adds ``grad`` ``(B, h, c, k*T, d)`` onto a contiguous ``(B, h, R, T, d)``."""
    batch, heads, regions, tokens, dim = out.shape
    offsets = torch.arange(batch * heads, device=grad.device).view(batch, heads, 1, 1) * regions
    rows = (index[:, None] + offsets).flatten()
    # a backward run under autocast makes its products in the low dtype: add them in out's dtype
    out.view(-1, tokens, dim).index_add_(0, rows, grad.reshape(-1, tokens, dim).to(out.dtype))


def _key_bias(valid: torch.Tensor | None, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``-inf`` on padded keys of the routed regions: ``(B, 1, c, 1, k*T)``, or None without padding."""
    if valid is None:
        return None
    keep = valid[index].flatten(-2)  # (B, c, k*T)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))[:, None, :, None]


def _logits(q, k, bias, scale):
    with float32_logits(q, k) as (q32, k32):  # float16 q . k overflows at large activations
        logits = (q32 * scale) @ k32.transpose(-1, -2)
    return logits if bias is None else logits.add_(bias)


def _routed_logits(q, k, index, valid, scale):
    """Logits of region queries ``(B, h, c, T, d)`` over the tokens of their routed regions: ``(B, h, c, T, k*T)``."""
    return _logits(q, _routed(k, index), _key_bias(valid, index, q.dtype), scale)


def _chunks(q: torch.Tensor, index: torch.Tensor):
    """Slices over query regions so that one chunk's logits stay below ``_CHUNK_ELEMENTS``; one chunk for
    symbolic sizes (one graph serves every size; its logits take the memory of the official formulation's)."""
    batch, heads, regions, tokens, _ = q.shape
    per_region = batch * heads * tokens * tokens * index.shape[-1]
    if isinstance(per_region, torch.SymInt):
        return [slice(0, regions)]
    step = max(1, _CHUNK_ELEMENTS // per_region)
    return [slice(start, min(start + step, regions)) for start in range(0, regions, step)]


def _attend(q, k, v, index, valid, scale, with_lse=False):
    """Forward over region chunks: output ``(B, h, R, T, dv)`` and, if asked, log-sum-exp ``(B, h, R, T, 1)``."""
    outs, lses = [], []
    in_graph = torch.is_grad_enabled() or dispatch.is_exporting()
    for part in _chunks(q, index):
        idx = index[:, part]
        logits = _routed_logits(q[:, :, part], k, idx, valid, scale)
        if with_lse:
            lses.append(logits.logsumexp(-1, keepdim=True))
        weights = logits.softmax(-1) if in_graph else torch.softmax(logits, -1, out=logits)  # a fresh buffer costs more
        outs.append(weights.to(v.dtype) @ _routed(v, idx))
    return torch.cat(outs, 2), torch.cat(lses, 2) if with_lse else None


class _RoutingAttention(torch.autograd.Function):
    """Saves the output and log-sum-exp only; the backward regathers each chunk's keys and values."""

    @staticmethod
    def forward(ctx, q, k, v, index, valid, scale):
        out, lse = _attend(q, k, v, index, valid, scale, with_lse=True)
        ctx.save_for_backward(q, k, v, index, out, lse)
        ctx.valid, ctx.scale = valid, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, index, out, lse = ctx.saved_tensors
        valid, scale = ctx.valid, ctx.scale
        grad_q = torch.empty_like(q)
        grad_k, grad_v = (torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (k, v))
        grad_out = grad_out.contiguous()
        # dp - row_dot cancels to the size of the gradient: in float16 it would keep the rounding of dp (~|v|)
        with float32_logits(grad_out, out) as (grad_out32, out32):
            row_dot = (grad_out32 * out32).sum(-1, keepdim=True)  # sum_j p_ij dp_ij per query
        for part in _chunks(q, index):
            idx, q_part, g_part = index[:, part], q[:, :, part], grad_out[:, :, part]
            k_routed, v_routed = _routed(k, idx), _routed(v, idx)
            logits = _logits(q_part, k_routed, _key_bias(valid, idx, q.dtype), scale)
            probs = logits.sub_(lse[:, :, part]).exp_()
            weights = probs.to(q.dtype)
            _add_routed(grad_v, weights.transpose(-1, -2) @ g_part, idx)
            with float32_logits(g_part, v_routed) as (g32, v32):
                grad_logits = (g32 @ v32.transpose(-1, -2)).sub_(row_dot[:, :, part]).mul_(probs).to(q.dtype)
            grad_q[:, :, part] = (grad_logits @ k_routed).mul_(scale)
            _add_routed(grad_k, grad_logits.transpose(-1, -2) @ (q_part * scale), idx)
        return grad_q, grad_k, grad_v, None, None, None


def _route(q, k, n_win, topk, scale, valid_size):
    """The scale (``head_dim ** -0.5`` when None), the routed regions and the real tokens (or None)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return scale, route_regions(q, k, n_win, topk, scale, valid_size), _valid_or_none(q, n_win, valid_size)


def bilevel_routing_attention_reference(q, k, v, n_win, topk, scale=None, valid_size=None):
    """Plain-PyTorch bi-level routing attention; see :func:`bilevel_routing_attention`."""
    height, width = q.shape[2], q.shape[3]
    scale, index, valid = _route(q, k, n_win, topk, scale, valid_size)
    q_r, k_r, v_r = _regions(q, n_win), _regions(k, n_win), _regions(v, n_win)
    if dispatch.needs_grad(q, k, v) and not dispatch.is_exporting():
        out = _RoutingAttention.apply(q_r, k_r, v_r, index, valid, scale)
    else:
        out = _attend(q_r, k_r, v_r, index, valid, scale)[0]
    return _unregions(out, n_win, height, width)


def bilevel_routing_attention_weights(q, k, n_win, topk, scale=None, valid_size=None):
    """The attention weights of :func:`bilevel_routing_attention_reference`, and where their keys are.

    All queries at once (no chunks): memory ``heads * H * W * topk * region_tokens``.

    Args:
        q: queries ``(B, heads, H, W, head_dim)``, H and W multiples of ``n_win``.
        k: keys, same shape.
        n_win: regions per side.
        topk: routed regions per query region.
        scale: logit scale of both levels; ``head_dim ** -0.5`` when None.
        valid_size: ``(h, w)`` of the real tokens at the top left; padded keys get weight 0.

    Returns:
        ``weights`` ``(B, heads, H, W, topk * region_tokens)``, each query's softmax over the tokens of its
        region's routed regions (in routing order, each region row-major), in at least float32; and ``keys``
        ``(B, H, W, topk * region_tokens)``: the flat position ``row * W + col`` of each of those keys.
    """
    height, width = q.shape[2], q.shape[3]
    scale, index, valid = _route(q, k, n_win, topk, scale, valid_size)
    weights = _routed_logits(_regions(q, n_win), _regions(k, n_win), index, valid, scale).softmax(-1)
    positions = torch.arange(height * width, device=q.device).view(1, 1, height, width, 1)
    keys = _routed(_regions(positions, n_win).expand(q.shape[0], -1, -1, -1, -1), index)  # (B, 1, R, k*T, 1)
    region_tokens = (height // n_win) * (width // n_win)
    keys = keys.transpose(-1, -2).expand(-1, -1, -1, region_tokens, -1)  # the same keys for every query of a region
    return _unregions(weights, n_win, height, width), _unregions(keys, n_win, height, width)[:, 0]


_op = dispatch.KernelOp(
    "bilevel_routing_attention",
    bilevel_routing_attention_reference,
    priority=("flex", "triton", "sdpa"),
    features=("valid_size", "value_dim"),  # value_dim: values with their own head dim
    schema="(Tensor q, Tensor k, Tensor v, int n_win, int topk, float? scale, SymInt[]? valid_size) -> Tensor",
)


def can_run_flex(q, k, v, n_win, topk, scale=None, valid_size=None) -> Capability:
    if q.device.type != "cuda" and dispatch.needs_grad(q, k, v):
        return Capability.no(f"flex_attention on {q.device.type} is forward-only")
    if not q.dtype == k.dtype == v.dtype:
        return Capability.no("mixed dtypes")
    if q.shape[-1] != v.shape[-1]:
        return Capability.no("flex_attention needs equal query and value head dims")
    tokens = q.shape[2] * q.shape[3]
    if q.device.type != "cuda" and q.shape[0] * q.shape[1] * tokens * tokens > _CHUNK_ELEMENTS:
        return Capability.no(f"unfused flex_attention on {q.device.type} would build all {tokens}x{tokens} scores")
    return Capability.yes()


def _routed_pairs(index: torch.Tensor, regions: int) -> torch.Tensor:
    """``(B, R, R)``: whether query region ``i`` routes to key region ``j``, from the top-k ``index`` ``(B, R, k)``."""
    routed = torch.zeros(index.shape[0], regions, regions, dtype=torch.bool, device=index.device)
    return routed.scatter_(2, index, True)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@_op.register(
    "flex",
    can_run_flex,
    declares=Support(("cpu", "cuda"), dispatch.SINGLE_AND_HALF, ("cuda",), ("valid_size",)),
    auto_devices=(),
)
def bilevel_routing_attention_flex(q, k, v, n_win, topk, scale=None, valid_size=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if q.device.type != "cuda" and not torch.is_grad_enabled():
        q, k, v = q.detach(), k.detach(), v.detach()
    batch, _, height, width, _ = q.shape
    scale, index, valid = _route(q, k, n_win, topk, scale, valid_size)
    regions = n_win * n_win
    tokens = (height // n_win) * (width // n_win)
    routed = _routed_pairs(index, regions)
    valid_flat = None if valid is None else valid.flatten()

    def mask_mod(b, h, q_idx, kv_idx):
        keep = routed[b, q_idx // tokens, kv_idx // tokens]
        return keep if valid_flat is None else keep & valid_flat[kv_idx]

    length = regions * tokens
    block_mask = create_block_mask(mask_mod, batch, None, length, length, device=q.device)
    q_r, k_r, v_r = (_regions(t, n_win).flatten(2, 3) for t in (q, k, v))
    attend = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
    out = attend(q_r, k_r, v_r, block_mask=block_mask, scale=scale)
    return _unregions(out.unflatten(2, (regions, tokens)), n_win, height, width)


def can_run_sdpa(q, k, v, n_win, topk, scale=None, valid_size=None) -> Capability:
    return dispatch.one_wide_dtype(q, k, v)


_DENSE_MAX_TOKENS = 1024


def _dense_pays(q, k, v, n_win, topk, scale=None, valid_size=None) -> bool:
    """Where ``sdpa`` beat the reference on CPU: the routed regions are at least a quarter of all (BiFormer's
    stage 3 at 224x224, 16 of 49 regions of 4 tokens: 1.8-2x) on a small map (its mask is ``tokens^2``)."""
    regions = n_win * n_win
    return 4 * min(topk, regions) >= regions and q.shape[2] * q.shape[3] <= _DENSE_MAX_TOKENS


# Chosen on CPU where _dense_pays: see docs/benchmarks.md (bi-level routing, dense masked attention).
@_op.register(
    "sdpa",
    can_run_sdpa,
    declares=Support(("cpu", "cuda"), dispatch.SINGLE_AND_DOUBLE, ("cpu", "cuda"), ("valid_size", "value_dim")),
    auto_devices=("cpu",),
    auto_when=_dense_pays,
)
def bilevel_routing_attention_sdpa(q, k, v, n_win, topk, scale=None, valid_size=None):
    """Dense attention over the whole map with the routed region pairs (and the real keys) as its mask: more
    pairs than the routed ones, in one large matrix product instead of many small ones over gathered copies."""
    height, width = q.shape[2], q.shape[3]
    scale, index, valid = _route(q, k, n_win, topk, scale, valid_size)
    regions, tokens = n_win * n_win, (height // n_win) * (width // n_win)
    mask = _routed_pairs(index, regions)[:, None, :, None, :, None].expand(-1, -1, -1, tokens, -1, tokens)
    mask = mask.reshape(index.shape[0], 1, regions * tokens, regions * tokens)
    if valid is not None:
        mask = mask & valid.reshape(1, 1, 1, -1)
    q_r, k_r, v_r = (_regions(t, n_win).flatten(2, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q_r, k_r, v_r, attn_mask=mask, scale=scale)
    return _unregions(out.unflatten(2, (regions, tokens)), n_win, height, width)


def bilevel_routing_attention_gather(q, k, v, n_win, topk, scale=None):
    """The official formulation (``ops/bra_legacy.py``), for benchmarks: every query region
    gathers its routed keys and values from a ``regions x regions`` expanded view, whose
    autograd backward materialises that whole view. No padding support."""
    batch, heads, height, width, dim = q.shape
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    index = route_regions(q, k, n_win, topk, scale)

    def channels_last_regions(x):  # (B, R, T, heads * d), heads-major channels as in the official qkv
        return _regions(x, n_win).permute(0, 2, 3, 1, 4).flatten(3)

    kv = torch.cat([channels_last_regions(k), channels_last_regions(v)], -1)
    _, regions, tokens, channels = kv.shape
    topk = index.shape[-1]
    kv = torch.gather(
        kv[:, None].expand(-1, regions, -1, -1, -1),
        2,
        index.view(batch, regions, topk, 1, 1).expand(-1, -1, -1, tokens, channels),
    )  # (B, R, topk, T, C_k + C_v)
    k_sel, v_sel = kv.split([heads * dim, kv.shape[-1] - heads * dim], -1)

    def per_head(x):  # (B, R, topk, T, heads * d) -> (B, heads, R, topk * T, d)
        return x.flatten(2, 3).unflatten(-1, (heads, -1)).permute(0, 3, 1, 2, 4)

    weights = ((_regions(q, n_win) * scale) @ per_head(k_sel).transpose(-1, -2)).softmax(-1)
    return _unregions(weights @ per_head(v_sel), n_win, height, width)


def bilevel_routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_win: int,
    topk: int,
    scale: float | None = None,
    valid_size: tuple[int, int] | None = None,
    backend: str = dispatch.AUTO,
) -> torch.Tensor:
    """Each query region attends to the tokens of its ``topk`` most related regions.

    Args:
        q: queries ``(B, heads, H, W, head_dim)``, H and W multiples of ``n_win``.
        k: keys, same shape.
        v: values ``(B, heads, H, W, head_dim_v)``.
        n_win: regions per side (``n_win x n_win`` regions).
        topk: routed regions per query region; at least ``n_win**2`` gives full attention.
        scale: logit scale of both levels; ``head_dim ** -0.5`` when None (BiFormer uses
            ``(heads * head_dim) ** -0.5``).
        valid_size: ``(h, w)`` of the real tokens at the top left; the rest is padding.
        backend: ``auto`` (``triton`` on CUDA when it can run; on CPU ``sdpa`` at small maps with many
            routed regions; else ``reference``), ``reference``, ``sdpa``, ``flex`` or ``triton``.
    """
    _check_grid(q.shape[2], q.shape[3], n_win)
    return _op(q, k, v, n_win, topk, scale, valid_size, backend=backend)


def can_run_triton(q, k, v, n_win, topk, scale=None, valid_size=None) -> Capability:
    verdict = dispatch.can_run_triton_on(q, k, v)
    if not verdict:
        return verdict
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        return Capability.no(f"k must match q {tuple(q.shape)} and v all but its head dim, got {tuple(k.shape)}")
    if not (16 <= q.shape[-1] <= 128 and 16 <= v.shape[-1] <= 128):
        return Capability.no(f"head dims must lie in 16..128, got {q.shape[-1]} and {v.shape[-1]}")
    return Capability.yes()


@_op.register(
    "triton", can_run_triton, declares=dispatch.triton_support(("valid_size", "value_dim")), auto_devices=("cuda",)
)
def bilevel_routing_attention_triton(q, k, v, n_win, topk, scale=None, valid_size=None):
    from .triton_routing import bilevel_routing_attention_triton as fused

    return fused(q, k, v, n_win, topk, scale, valid_size)
