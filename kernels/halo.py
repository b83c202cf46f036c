"""Halo attention (HaloNet, Vaswani et al., CVPR 2021).

Queries in non-overlapping ``b x b`` blocks attend to the ``(b + 2h) x (b + 2h)`` window
around their block (the block plus a halo of ``h``), zero-padded at the map border as in
timm's ``HaloAttn`` (padded keys are zero vectors, not masked). Relative position logits
``q . rel[offset]`` along height and width (tables ``(2 * window - 1, head_dim)`` shared by
the heads) are added unscaled to the scaled content logits.

Tensors are ``(B, heads, H, W, head_dim)`` of any H and W: maps are zero-padded at the bottom
and right to multiples of the block size (keys and values there are zero, as beyond the border)
and the output is cropped back; values may have their own head dim. Memory is linear in tokens:
the key/value windows repeat each token ``((b + 2h) / b)^2`` times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import AUTO, KernelOp
from .precision import float32_logits
from .windows import regroup, window_counts, window_gather_index, window_scatter_index

__all__ = ["halo_attention", "halo_attention_reference"]


def _windows(x: torch.Tensor, block: int, halo: int, counts: tuple) -> torch.Tensor:
    """Each block's haloed window, blocks row-major: ``(B * h * rows * cols, window * window, d)``, zero beyond
    the map (``halo=0``: the blocks themselves).

    One flat gather (not ``Tensor.unfold``, which ONNX exports only for static sizes; see
    :func:`~visionzoo.kernels.windows.window_gather_index` on symbolic sizes).
    """
    height, width = x.shape[2], x.shape[3]
    window, padded_width = block + 2 * halo, counts[1] * block + 2 * halo
    x = F.pad(x, (0, 0, halo, padded_width - halo - width, halo, counts[0] * block + halo - height))
    index = window_gather_index(counts, window, padded_width, stride=block, device=x.device)
    return regroup(x.flatten(2, 3).index_select(2, index), 3, (window * window,))


def _relative_logits(q_blocks: torch.Tensor, table: torch.Tensor, block: int, window: int) -> torch.Tensor:
    """``q . table[key - query + window - 1]`` along one axis: ``(..., block, block, window)``.

    ``q_blocks`` is ``(..., block, block, d)`` with the axis of interest second to last.
    """
    logits = q_blocks @ table.transpose(0, 1)  # (..., block, block, 2 * window - 1)
    keys, queries = torch.arange(window, device=table.device), torch.arange(block, device=table.device)
    offsets = keys[None, :] - queries[:, None] + window - 1  # [query, key]
    # advanced indexing, not gather with an expanded index: ONNX keeps the leading dims dynamic
    return logits[..., queries[:, None], offsets]


def halo_attention_reference(q, k, v, block_size, halo_size, rel_height=None, rel_width=None, scale=None):
    """Plain-PyTorch halo attention; see :func:`halo_attention`."""
    height, width = q.shape[2], q.shape[3]
    window = block_size + 2 * halo_size
    counts = window_counts(height, width, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with float32_logits(q, k) as (q32, k32):  # float16 q . k overflows at large activations
        q_blocks = _windows(q32, block_size, 0, counts)
        logits = (q_blocks @ _windows(k32, block_size, halo_size, counts).transpose(-1, -2)) * scale
        if rel_height is not None:
            grid = q_blocks.unflatten(-2, (block_size, block_size))  # (..., row, col, d)
            along_h = _relative_logits(grid.transpose(-3, -2), rel_height, block_size, window).transpose(-3, -2)
            along_w = _relative_logits(grid, rel_width, block_size, window)
            rel = along_h[..., :, None] + along_w[..., None, :]  # (..., row, col, key_row, key_col)
            logits = logits + rel.flatten(-4, -3).flatten(-2, -1)
        weights = logits.softmax(-1).to(v.dtype)
    out = weights @ _windows(v, block_size, halo_size, counts)  # (B * h * blocks, block * block, dv)
    out = regroup(out, 2, (counts[0] * counts[1] * block_size**2,))
    out = out[:, window_scatter_index((height, width), counts, block_size, device=q.device)]
    return out.reshape(*q.shape[:4], v.shape[-1])


_op = KernelOp("halo_attention", halo_attention_reference)


def halo_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    halo_size: int,
    rel_height: torch.Tensor | None = None,
    rel_width: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = AUTO,
) -> torch.Tensor:
    """Blocked local attention: each ``b x b`` block of queries attends to its window grown by a halo.

    Args:
        q: queries ``(B, heads, H, W, d)``.
        k: keys, shaped like ``q``.
        v: values ``(B, heads, H, W, dv)``.
        block_size: query block size b.
        halo_size: halo h around each block.
        rel_height: relative embeddings ``(2 * (b + 2h) - 1, d)`` along height, or None.
        rel_width: the same along width (given together with ``rel_height``).
        scale: content logit scale; ``d ** -0.5`` when None.
        backend: ``auto`` or ``reference``.
    """
    if (rel_height is None) != (rel_width is None):
        raise ValueError("give both rel_height and rel_width, or neither")
    return _op(q, k, v, block_size, halo_size, rel_height, rel_width, scale, backend=backend)
