"""Padding, window partitions and relative positions shared by every windowed op and mixer.

Works on the spatial dims ``(-3, -2)`` of a tensor whose last dim is channels, so the
same helper serves channels-last maps ``(B, H, W, C)`` and per-head maps
``(B, heads, H, W, head_dim)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "crop_map",
    "is_static",
    "pad_to_multiple",
    "partition_windows",
    "relative_position_index",
    "sym_max",
    "unpartition_windows",
]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def pad_to_multiple(
    x: torch.Tensor, multiple: int | tuple[int, int] = 1, value: float = 0.0, min_size: int | tuple[int, int] = 0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad H and W at the bottom and right up to multiples of ``multiple``, and at least ``min_size``.

    With symbolic sizes (``torch.export``, ONNX, dynamic ``torch.compile``) it always pads, by
    amounts that may be zero, so one graph serves every size.

    Returns:
        The padded tensor and the original ``(H, W)``, for :func:`crop_map`.
    """
    (mh, mw), (min_h, min_w) = _pair(multiple), _pair(min_size)
    if mh < 1 or mw < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    height, width = x.shape[-3], x.shape[-2]
    pad_h = sym_max(min_h - height, 0) + -sym_max(height, min_h) % mh
    pad_w = sym_max(min_w - width, 0) + -sym_max(width, min_w) % mw
    if not (is_static(pad_h, 0) and is_static(pad_w, 0)):
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h), value=value)
    return x, (height, width)


def crop_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the top-left ``size`` of dims ``(-3, -2)`` (always, with symbolic sizes)."""
    height, width = size
    if is_static(x.shape[-3], height) and is_static(x.shape[-2], width):
        return x
    return x[..., :height, :width, :].contiguous()


def sym_max(a, b):
    """``max`` that keeps a symbolic size symbolic (no guard on which is larger)."""
    return torch.sym_max(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else max(a, b)


def is_static(value, expected) -> bool:
    """Whether ``value`` is a plain int (not a symbolic size) equal to ``expected``: shape branches that hold
    only then keep one traced graph valid at every size."""
    return isinstance(value, int) and isinstance(expected, int) and value == expected


def partition_windows(x: torch.Tensor, size: int | tuple[int, int], grid: bool = False) -> torch.Tensor:
    """Split a channels-last map ``(B, H, W, C)`` into groups of ``size`` tokens: ``(B * n, sh, sw, C)``.

    ``grid=False``: contiguous ``sh x sw`` windows (block attention). ``grid=True``: an
    ``sh x sw`` grid of tokens spaced ``H / sh`` and ``W / sw`` apart (MaxViT's grid
    attention). H and W must be multiples of ``size`` (see :func:`pad_to_multiple`).
    """
    sh, sw = _pair(size)
    batch, height, width, channels = x.shape
    if height % sh or width % sw:
        raise ValueError(f"map {height}x{width} is not a multiple of the partition {sh}x{sw}; pad it first")
    if grid:
        x = x.reshape(batch, sh, height // sh, sw, width // sw, channels).permute(0, 2, 4, 1, 3, 5)
    else:
        x = x.reshape(batch, height // sh, sh, width // sw, sw, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, sh, sw, channels)


def unpartition_windows(
    windows: torch.Tensor, size: int | tuple[int, int], map_size: tuple[int, int], grid: bool = False
) -> torch.Tensor:
    """Inverse of :func:`partition_windows` back to ``(B, H, W, C)`` with ``(H, W) = map_size``."""
    sh, sw = _pair(size)
    height, width = map_size
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // sh, width // sw, sh, sw, channels)
    x = x.permute(0, 3, 1, 4, 2, 5) if grid else x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, channels)


def relative_position_index(size: int | tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Index into a ``(2sh-1) * (2sw-1)`` bias table for every (query, key) pair of a window.

    The Swin / timm ``RelPosBias`` layout: ``(sh*sw, sh*sw)``, row-major offsets.
    """
    sh, sw = _pair(size)
    coords = torch.stack(
        torch.meshgrid(torch.arange(sh, device=device), torch.arange(sw, device=device), indexing="ij")
    ).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (relative[..., 0] + sh - 1) * (2 * sw - 1) + relative[..., 1] + sw - 1
