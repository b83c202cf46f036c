"""Attention logits in float32 when the inputs are float16 or bfloat16 (also under autocast).

``q . k`` of large activations exceeds float16's range (65504) long before the softmax sees
it, and float16/bfloat16 logits of magnitude 1e4 are only resolved to 8 and 64: the
references compute their logits from float32 copies of ``q`` and ``k`` with autocast off,
as fused kernels do with float32 accumulators. Float32 and float64 inputs are untouched.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["float32_logits"]


@contextlib.contextmanager
def float32_logits(*tensors: torch.Tensor):
    """Yield ``tensors`` in at least float32, with autocast off on their device inside the block.

    Outside autocast and for float32 or float64 tensors this is a no-op (the same tensors).
    """
    device_type = tensors[0].device.type
    upcast = tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield upcast
    else:
        yield upcast
