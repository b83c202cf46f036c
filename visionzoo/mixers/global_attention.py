"""Global multi-head self-attention over every token of the map (ViT-style)."""

from __future__ import annotations

import torch

from visionzoo.kernels import dense_attention, dense_attention_weights

from .registry import MultiHeadMixer, register_mixer

__all__ = ["DenseAttentionMixer", "GlobalAttention"]


class DenseAttentionMixer(MultiHeadMixer):
    """Every token attends to every token (``dense_attention``, scale ``head_dim ** -0.5``): what the
    global mixers share; each adds its output projection."""

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output ``(B, heads, H, W, head_dim)`` of a channels-last map ``(B, H, W, C)``."""
        q, k, v = (t.flatten(2, 3) for t in self.qkv_heads(x))
        return dense_attention(q, k, v, backend=self.kernel_backend).unflatten(2, x.shape[1:3])

    def query_attention(self, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        """Attention weights ``(heads, H, W)`` of the token ``query`` (row, col) of ``x`` ``(1, H, W, C)``."""
        q, k, _ = (t.flatten(2, 3) for t in self.qkv_heads(x))
        token = query[0] * x.shape[2] + query[1]
        return dense_attention_weights(q[:, :, token : token + 1], k)[0, :, 0].unflatten(-1, x.shape[1:3])


@register_mixer("global")
class GlobalAttention(DenseAttentionMixer):
    """Every token attends to every token: memory quadratic in tokens.

    Takes :class:`MultiHeadMixer`'s arguments; ``backend`` is ``auto``, ``reference`` or ``sdpa``.
    """

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.merge_heads(self.attend(x)))
