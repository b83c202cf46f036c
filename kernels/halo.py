"""Halo attention (HaloNet, Vaswani et al., CVPR 2021).

Queries in non-overlapping ``b x b`` blocks attend to the ``(b + 2h) x (b + 2h)`` window
around their block (the block plus a halo of ``h``), zero-padded at the map border as in
timm's ``HaloAttn`` (padded keys are zero vectors, not masked). Relative position logits
``q . rel[offset]`` along height and width (tables ``(2 * window - 1, head_dim)`` shared by
the heads) are added unscaled to the scaled content logits.

Tensors are ``(B, heads, H, W, head_dim)`` with H and W multiples of the block size; values
may have their own head dim. Memory is linear in tokens: the key/value windows repeat each
token ``((b + 2h) / b)^2`` times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import AUTO, KernelOp
from .precision import float32_logits

__all__ = ["halo_attention", "halo_attention_reference"]


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, h, H, W, d)`` to ``(B, h, nH, nW, block * block, d)``."""
    batch, heads, height, width, dim = x.shape
    x = x.reshape(batch, heads, height // block, block, width // block, block, dim).transpose(3, 4)
    return x.reshape(batch, heads, height // block, width // block, block * block, dim)


def _window_index(blocks: int, block: int, window: int, device: torch.device) -> torch.Tensor:
    """Rows (or columns) of the padded map that each block's window covers, flattened: ``(blocks * window,)``."""
    starts = torch.arange(blocks, device=device) * block
    return (starts[:, None] + torch.arange(window, device=device)).flatten()


def _windows(x: torch.Tensor, block: int, halo: int) -> torch.Tensor:
    """Each block's haloed window: ``(B, h, nH, nW, window * window, d)``, zero beyond the map.

    Gathered with index_select (not ``Tensor.unfold``, which ONNX exports only for static sizes).
    """
    batch, heads, height, width, dim = x.shape
    window, rows, cols = block + 2 * halo, height // block, width // block
    x = F.pad(x, (0, 0, halo, halo, halo, halo))
    x = x.index_select(2, _window_index(rows, block, window, x.device))
    x = x.index_select(3, _window_index(cols, block, window, x.device))
    x = x.reshape(batch, heads, rows, window, cols, window, dim).transpose(3, 4)
    return x.reshape(batch, heads, rows, cols, window * window, dim)


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
    batch, heads, height, width, _ = q.shape
    if height % block_size or width % block_size:
        raise ValueError(
            f"halo attention needs maps that are multiples of block_size {block_size}, got {height}x{width}"
        )
    window = block_size + 2 * halo_size
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with float32_logits(q, k) as (q32, k32):  # float16 q . k overflows at large activations
        q_blocks = _blocks(q32, block_size)
        logits = (q_blocks @ _windows(k32, block_size, halo_size).transpose(-1, -2)) * scale
        if rel_height is not None:
            grid = q_blocks.unflatten(-2, (block_size, block_size))  # (..., row, col, d)
            along_h = _relative_logits(grid.transpose(-3, -2), rel_height, block_size, window).transpose(-3, -2)
            along_w = _relative_logits(grid, rel_width, block_size, window)
            rel = along_h[..., :, None] + along_w[..., None, :]  # (..., row, col, key_row, key_col)
            logits = logits + rel.flatten(-4, -3).flatten(-2, -1)
        weights = logits.softmax(-1).to(v.dtype)
    out = weights @ _windows(v, block_size, halo_size)  # (B, h, nH, nW, block * block, dv)
    out = out.unflatten(-2, (block_size, block_size)).transpose(3, 4)
    return out.reshape(batch, heads, height, width, -1)


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
        q: queries ``(B, heads, H, W, d)``, H and W multiples of ``block_size``.
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
