"""Dense multi-head attention with an optional additive bias or boolean mask.

Tensors are ``(B, heads, N, head_dim)`` for queries and ``(B, heads, M, head_dim)`` for
keys and values; ``bias`` broadcasts to ``(B, heads, N, M)``: a float tensor is added to
the logits, a boolean tensor keeps the positions where it is True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import AUTO, FLOAT_DTYPES, Capability, KernelOp, Support
from .precision import float32_logits

__all__ = ["dense_attention", "dense_attention_reference", "dense_attention_weights"]


def dense_attention_reference(q, k, v, bias=None, scale=None) -> torch.Tensor:
    """Explicit softmax attention, arguments as :func:`dense_attention`; logits and softmax run in at least
    float32 precision."""
    return dense_attention_weights(q, k, bias, scale).to(v.dtype) @ v


def dense_attention_weights(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """The attention weights of :func:`dense_attention_reference`: ``softmax(q k^T * scale + bias)``.

    Args:
        q: queries ``(B, heads, N, head_dim)``: any subset of the queries (the weights of a row do not
            depend on the other queries).
        k: keys ``(B, heads, M, head_dim)``.
        bias: additive float bias or boolean keep-mask, broadcastable to ``(B, heads, N, M)``.
        scale: logit scale; ``head_dim ** -0.5`` when None.

    Returns:
        ``(B, heads, N, M)``, each row summing to 1, in at least float32.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with float32_logits(q, k) as (q32, k32):  # float16 q . k overflows at large activations
        logits = (q32 * scale) @ k32.transpose(-2, -1)
        if bias is not None:
            logits = logits.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else logits + bias
        return logits.softmax(dim=-1)


_op = KernelOp("dense_attention", dense_attention_reference, priority=("sdpa",), features=("bias", "mask"))


def can_run_sdpa(q, k, v, bias=None, scale=None) -> Capability:
    if not q.dtype == k.dtype == v.dtype:
        return Capability.no(f"mixed dtypes q={q.dtype} k={k.dtype} v={v.dtype}")
    if not q.dtype.is_floating_point:
        return Capability.no(f"dtype {q.dtype} is not floating point")
    if bias is not None and bias.dtype not in (torch.bool, q.dtype):
        return Capability.no(f"bias dtype {bias.dtype} is neither bool nor {q.dtype}")
    return Capability.yes()


_EVERYWHERE = ("cpu", "cuda")


@_op.register("sdpa", can_run_sdpa, declares=Support(_EVERYWHERE, FLOAT_DTYPES, _EVERYWHERE, ("bias", "mask")))
def dense_attention_sdpa(q, k, v, bias=None, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = AUTO,
) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T * scale + bias) v``.

    Args:
        q: queries ``(B, heads, N, head_dim)``.
        k: keys ``(B, heads, M, head_dim)``.
        v: values ``(B, heads, M, head_dim_v)``.
        bias: additive float bias or boolean keep-mask, broadcastable to ``(B, heads, N, M)``.
        scale: logit scale; ``head_dim ** -0.5`` when None.
        backend: ``"auto"``, ``"reference"`` or ``"sdpa"`` (see :mod:`visionzoo.kernels.dispatch`).
    """
    return _op(q, k, v, bias, scale, backend=backend)
