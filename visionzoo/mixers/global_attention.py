"""Global multi-head self-attention over every token of the map (ViT-style)."""

from __future__ import annotations

import torch

from visionzoo.kernels import dense_attention

from .registry import MultiHeadMixer, register_mixer

__all__ = ["GlobalAttention"]


@register_mixer("global")
class GlobalAttention(MultiHeadMixer):
    """Every token attends to every token: memory quadratic in tokens.

    Takes :class:`MultiHeadMixer`'s arguments; ``backend`` is ``auto``, ``reference`` or ``sdpa``.
    """

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.flatten(2, 3) for t in self.qkv_heads(x))
        out = dense_attention(q, k, v, backend=self.kernel_backend)
        return self.proj(self.merge_heads(out.unflatten(2, x.shape[1:3])))
