"""Padding shared by every windowed op and mixer.

Works on the spatial dims ``(-3, -2)`` of a tensor whose last dim is channels, so the
same helper serves channels-last maps ``(B, H, W, C)`` and per-head maps
``(B, heads, H, W, head_dim)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_map", "pad_to_multiple"]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def pad_to_multiple(
    x: torch.Tensor, multiple: int | tuple[int, int] = 1, value: float = 0.0, min_size: int | tuple[int, int] = 0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad H and W at the bottom and right up to multiples of ``multiple``, and at least ``min_size``.

    Returns:
        The padded tensor and the original ``(H, W)``, for :func:`crop_map`.
    """
    (mh, mw), (min_h, min_w) = _pair(multiple), _pair(min_size)
    if mh < 1 or mw < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    height, width = x.shape[-3], x.shape[-2]
    pad_h = max(min_h - height, 0) + -max(height, min_h) % mh
    pad_w = max(min_w - width, 0) + -max(width, min_w) % mw
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h), value=value)
    return x, (height, width)


def crop_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the top-left ``size`` of dims ``(-3, -2)``."""
    height, width = size
    if x.shape[-3] == height and x.shape[-2] == width:
        return x
    return x[..., :height, :width, :].contiguous()
