"""Padding, window partitions, relative positions and adaptive pooling shared by every windowed op, mixer
and head; each traces with symbolic sizes (one exported graph for every input size).

The window helpers work on the spatial dims ``(-3, -2)`` of a tensor whose last dim is channels, so the
same helper serves channels-last maps ``(B, H, W, C)`` and per-head maps
``(B, heads, H, W, head_dim)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "adaptive_avg_pool",
    "all_int",
    "crop_map",
    "is_static",
    "pad_to_multiple",
    "partition_windows",
    "pool_cells",
    "regroup",
    "relative_position_index",
    "sym_max",
    "sym_mod",
    "unpartition_windows",
    "window_counts",
    "window_gather_index",
    "window_scatter_index",
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
    if all_int(height, width):
        return x[..., :height, :width, :].contiguous()
    # gathered, not sliced: whether a slice is contiguous depends on the padding, a guard that would pin the sizes
    rows, cols = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
    return x.index_select(-3, rows).index_select(-2, cols)


def sym_max(a, b):
    """``max`` that keeps a symbolic size symbolic (no guard on which is larger)."""
    return torch.sym_max(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else max(a, b)


def is_static(value, expected) -> bool:
    """Whether ``value`` is a plain int (not a symbolic size) equal to ``expected``: shape branches that hold
    only then keep one traced graph valid at every size."""
    return isinstance(value, int) and isinstance(expected, int) and value == expected


def window_counts(height, width, size: int | tuple[int, int]):
    """Windows of ``size`` along H and W, the last ones partly beyond the map: ``ceil(H / sh), ceil(W / sw)``."""
    sh, sw = _pair(size)
    return (height + sh - 1) // sh, (width + sw - 1) // sw


# With symbolic sizes, windows are gathered through flat indices rather than reshaped out of H and W: a reshape
# splitting H into (rows, sh) guards on divisibility the tracer cannot prove (rows = h // 28 + 1, say), and a
# tensor with a dim of rows, cols or rows * cols alone guards on it being 1 (its contiguity, broadcasts), as it
# is at small traced sizes. Window counts only appear multiplied by a window's tokens or a batch, whose
# guards do not pin H or W.


def regroup(x: torch.Tensor, dims: int, sizes: tuple) -> torch.Tensor:
    """The first ``dims`` dims of ``x`` merged, then split into ``(-1, *sizes)``: a reshape between groupings
    that keeps traced window counts free (a direct reshape compares ``N`` with ``N * windows`` and guards
    on the count being 1 when it is at the traced size)."""
    return x.flatten(0, dims - 1).unflatten(0, (-1, *sizes))


def sym_mod(index: torch.Tensor, divisor) -> torch.Tensor:
    """``index % divisor``, spelled without remainder, which the ONNX exporter lacks for a symbolic divisor."""
    return index - index // divisor * divisor


def window_gather_index(
    counts: tuple, size: int | tuple[int, int], map_width, grid: bool = False, stride: int | None = None, device=None
) -> torch.Tensor:
    """``(rows * cols * sh * sw,)``: the flat positions ``row * map_width + col`` of the tokens of ``rows x cols``
    windows of ``size`` tokens, window by window (row-major), each window's tokens row-major.

    Window ``(i, j)`` starts at ``(i, j) * stride`` (``size`` when None; windows overlap when it is smaller), its
    tokens adjacent; with ``grid`` it starts at ``(i, j)``, its tokens ``(rows, cols)`` apart.
    """
    rows, cols = counts
    (sh, sw), (step_h, step_w) = _pair(size), (1, 1) if grid else _pair(stride or size)
    space_h, space_w = (rows, cols) if grid else (1, 1)
    flat = torch.arange(rows * cols * sh * sw, device=device)
    window, token = flat // (sh * sw), sym_mod(flat, sh * sw)
    row = window // cols * step_h + token // sw * space_h
    col = sym_mod(window, cols) * step_w + sym_mod(token, sw) * space_w
    return row * map_width + col


def window_scatter_index(
    map_size: tuple, counts: tuple, size: int | tuple[int, int], grid: bool = False, device=None
) -> torch.Tensor:
    """``(H, W)``: where each token of a map of ``map_size`` lies in its disjoint windows laid out as
    :func:`window_gather_index` lays them out (``window * sh * sw + token``): the inverse gather."""
    (height, width), (rows, cols), (sh, sw) = map_size, counts, _pair(size)
    at_row, at_col = torch.arange(height, device=device)[:, None], torch.arange(width, device=device)
    if grid:
        window, token = sym_mod(at_row, rows) * cols + sym_mod(at_col, cols), at_row // rows * sw + at_col // cols
    else:
        window, token = at_row // sh * cols + at_col // sw, at_row % sh * sw + at_col % sw
    return window * (sh * sw) + token


def partition_windows(x: torch.Tensor, size: int | tuple[int, int], grid: bool = False) -> torch.Tensor:
    """Split channels-last maps ``(..., H, W, C)`` into groups of ``size`` tokens: ``(N * n, sh, sw, C)``,
    ``N`` the product of the leading dims and ``n`` the windows of a map (:func:`window_counts`).

    ``grid=False``: contiguous ``sh x sw`` windows (block attention). ``grid=True``: an
    ``sh x sw`` grid of tokens spaced ``ceil(H / sh)`` and ``ceil(W / sw)`` apart (MaxViT's grid
    attention). A map of any size is zero-padded at the bottom and right to multiples of ``size`` first.
    """
    sh, sw = _pair(size)
    height, width, channels = x.shape[-3:]
    counts = window_counts(height, width, size)
    pad_h, pad_w = counts[0] * sh - height, counts[1] * sw - width
    if not (is_static(pad_h, 0) and is_static(pad_w, 0)):
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    if not all_int(height, width):
        index = window_gather_index(counts, size, counts[1] * sw, grid, device=x.device)
        x = x.flatten(-3, -2).index_select(-2, index)
        return regroup(x, x.dim() - 1, (sh, sw))
    rows, cols = counts
    if grid:
        x = x.reshape(-1, sh, rows, sw, cols, channels).permute(0, 2, 4, 1, 3, 5)
    else:
        x = x.reshape(-1, rows, sh, cols, sw, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, sh, sw, channels)


def unpartition_windows(
    windows: torch.Tensor, size: int | tuple[int, int], map_size: tuple[int, int], grid: bool = False
) -> torch.Tensor:
    """Inverse of :func:`partition_windows` back to ``(N, H, W, C)`` with ``(H, W) = map_size``, the padding
    cropped off."""
    sh, sw = _pair(size)
    height, width = map_size
    (rows, cols), channels = window_counts(height, width, size), windows.shape[-1]
    if not all_int(height, width):
        index = window_scatter_index(map_size, (rows, cols), size, grid, device=windows.device)
        return regroup(windows, 3, (rows * cols * sh * sw,))[:, index]
    x = windows.reshape(-1, rows, cols, sh, sw, channels)
    x = x.permute(0, 3, 1, 4, 2, 5) if grid else x.permute(0, 1, 3, 2, 4, 5)
    return crop_map(x.reshape(-1, rows * sh, cols * sw, channels), map_size)


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


def pool_cells(length, pooled, device=None, empty: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive pooling's cells along one axis: cell ``j`` spans ``[start[j], end[j])``, ``start[j] =
    floor(j L / p)`` and ``end[j] = ceil((j + 1) L / p)``; from ``torch.arange``, so sizes may be symbolic.
    ``empty`` more cells follow past the end: they pool nothing (see :func:`adaptive_avg_pool`)."""
    cell = torch.arange(pooled + empty, device=device)
    return cell * length // pooled, ((cell + 1) * length + pooled - 1) // pooled


def adaptive_avg_pool(x: torch.Tensor, size: tuple[int, int], empty: int = 0) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` of an NCHW map to ``size``, then ``empty`` rows and columns of zeros.

    With symbolic sizes (``torch.export``, ONNX, dynamic ``torch.compile``), which ONNX's pooling cannot
    take as an output size, or empty cells, it is a product with each axis's pooling matrix (the mean
    over each cell of :func:`pool_cells`): equal up to rounding. Empty cells let an exported graph keep
    every pooled dim above 1, which ``torch.export`` would otherwise specialise.
    """
    height, width = x.shape[-2], x.shape[-1]
    if all_int(height, width, *size) and not empty:
        return F.adaptive_avg_pool2d(x, size)
    # a global mean: the pooling matrices of a 1x1 pool guard on the map's size
    if is_static(size[0], 1) and is_static(size[1], 1) and not empty:
        return x.mean((-2, -1), keepdim=True)
    rows, cols = (_pool_matrix(n, p, empty, x) for n, p in zip((height, width), size, strict=True))
    # (B, C, H, W) @ (W, pw), then the same along H: matrix products that fold B, C and the other axis
    return ((x @ cols.transpose(0, 1)).transpose(-2, -1) @ rows.transpose(0, 1)).transpose(-2, -1)


def _pool_matrix(length, pooled, empty: int, like: torch.Tensor) -> torch.Tensor:
    """``(pooled + empty, length)``: row ``j`` averages cell ``j`` of :func:`pool_cells` (zeros when empty)."""
    start, end = pool_cells(length, pooled, like.device, empty)
    position = torch.arange(length, device=like.device)
    inside = (position >= start[:, None]) & (position < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None]


def all_int(*sizes) -> bool:
    """Whether every size is a plain int (eager), not a symbolic size or a traced tensor."""
    return all(isinstance(n, int) for n in sizes)
