"""Index geometry that an op's PyTorch reference and its Triton kernels share.

- neighborhood attention: NATTEN's windows along one axis and their RPB indices;
- aggregated attention: the in-image positions of every sliding window, the length scale they give
  and the length-scaled queries;
- bi-level routing attention: the region partition, its padding mask and level one (which regions
  each query region attends to).

The op modules and the ``triton_*`` modules both import from here, so neither imports the other's
module at load time.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .precision import float32_logits
from .windows import all_int, is_static, sym_max, sym_mod

__all__ = [
    "cached_geometry",
    "check_grid",
    "check_neighborhood",
    "check_window_size",
    "length_scale",
    "neighborhood_windows",
    "regions",
    "route_regions",
    "scaled_queries",
    "unregions",
    "valid_or_none",
    "window_mask",
    "windows_1d",
]


def cached_geometry(fn):
    """``lru_cache`` for index tables, built outside inference mode so that training may reuse them.

    Symbolic sizes (``torch.export``, ONNX, dynamic ``torch.compile``) are not hashable: with any, the
    tables are built in the traced graph, from ``torch.arange`` of the sizes. Under dynamo (which traces
    through a cache anyway) they are built in the graph too, as constants of its sizes.
    """

    @functools.lru_cache(maxsize=64)
    def cached(*args):
        with torch.inference_mode(False):
            return fn(*args)

    @functools.wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling() or any(isinstance(a, torch.SymInt) for a in args):
            return fn(*args)
        return cached(*args)

    return call


# neighborhood attention


@cached_geometry
def windows_1d(length: int, kernel_size: int, dilation: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`neighborhood_windows` without the argument checks, cached per device (built in the graph
    for a symbolic ``length``)."""
    index = torch.arange(length, device=device)
    group, position = index % dilation, index // dilation
    group_length = (length - group + dilation - 1) // dilation
    start = torch.minimum((position - kernel_size // 2).clamp(min=0), group_length - kernel_size)
    steps = torch.arange(kernel_size, device=device)
    keys = (start * dilation + group)[:, None] + steps * dilation
    bias = (start - position + kernel_size - 1)[:, None] + steps
    return keys, bias


def neighborhood_windows(
    length: int, kernel_size: int, dilation: int = 1, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions and RPB-table indices of every query along one axis.

    Returns:
        ``keys`` and ``bias_index``, both ``(length, kernel_size)``: query ``i`` attends to
        positions ``keys[i]`` and adds ``rpb[..., bias_index[i]]`` along this axis.
    """
    check_neighborhood(length, kernel_size, dilation)
    return windows_1d(length, kernel_size, dilation, torch.device(device))


def _require(condition, message) -> None:
    """Raise ``ValueError(message())`` unless ``condition`` holds. A condition on symbolic sizes raises only
    where it fails at every size: a guard would pin the traced sizes, and the mixers pad maps so that it holds."""
    symbolic = isinstance(condition, torch.SymBool)
    if statically_known_true(torch.sym_not(condition)) if symbolic else not condition:
        raise ValueError(message())


def check_neighborhood(length: int, kernel_size: int, dilation: int) -> None:
    """Raise unless an axis of ``length`` holds a ``kernel_size`` window ``dilation`` apart."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be positive, got {dilation}")
    _require(
        length >= kernel_size * dilation,
        lambda: (
            f"neighborhood attention needs maps of at least kernel_size * dilation = {kernel_size * dilation} "
            f"along each axis, got {length} (pad the input, as NAT does)"
        ),
    )


# aggregated attention


def check_window_size(window_size: int) -> None:
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be odd and positive, got {window_size}")


@cached_geometry
def window_mask(height: int, width: int, window_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """In-image mask ``(H, W, window**2)`` of every window position and its count ``(H, W)``."""
    radius = window_size // 2
    offsets = torch.arange(-radius, radius + 1, device=device)
    rows = torch.arange(height, device=device)[:, None] + offsets  # (H, window)
    cols = torch.arange(width, device=device)[:, None] + offsets
    row_ok, col_ok = (rows >= 0) & (rows < height), (cols >= 0) & (cols < width)
    valid = (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(height, width, -1)
    return valid, valid.sum(-1)


def length_scale(
    height: int, width: int, window_size: int, pool_len: int | torch.Tensor, device: torch.device | str = "cpu"
):
    """``log(n_i + P)`` per query ``(H, W)``, rounded to float32 as the official buffer is; sizes may be
    symbolic, ``pool_len`` a 0-dim integer tensor."""
    _, count = window_mask(height, width, window_size, torch.device(device))
    return torch.log(count.double() + pool_len).float()


def scaled_queries(q, query_embedding, logit_scale, window_size, pool_len):
    """Normalised queries and the length-scaled cosine queries ``(q_hat)`` of the logits."""
    heads, height, width = q.shape[1], q.shape[2], q.shape[3]
    q_norm = F.normalize(q, dim=-1)
    scale = length_scale(height, width, window_size, pool_len, q.device).to(q.dtype)
    q_hat = (q_norm + query_embedding.reshape(heads, 1, 1, -1)) * logit_scale.reshape(heads, 1, 1, 1)
    return q_norm, q_hat * scale[..., None]


# bi-level routing attention


def check_grid(height: int, width: int, n_win: int) -> None:
    if n_win < 1:
        raise ValueError(f"n_win must be positive, got {n_win}")
    _require(
        (height % n_win == 0) & (width % n_win == 0),
        lambda: (
            f"bilevel routing attention needs maps that are multiples of n_win {n_win}, got {height}x{width}; "
            "pad them (the routing mixer does)"
        ),
    )


def _region_layout(height, width, n_win: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The region layout of a map of symbolic size, as index tables built in the traced graph.

    torch.export pins every size that a traced tensor dim may take as 1, so a region holds
    ``T = max(rh * rw, 2)`` tokens: the ``rh x rw`` tokens of its block, row-major, then filler
    tokens (copies of its first, never real).

    Returns:
        ``rows`` and ``cols`` ``(n_win**2, T)`` of every region token on the map, ``real`` ``(T,)``
        (not filler), and ``region`` and ``token`` ``(H, W)`` of every map token in the layout.
    """
    rh, rw = height // n_win, width // n_win
    token = torch.arange(sym_max(rh * rw, 2), device=device)
    real = token < rh * rw
    token_row, token_col = _divmod(token.where(real, 0), rw)
    region_row, region_col = _divmod(torch.arange(n_win * n_win, device=device)[:, None], n_win)
    block_row, row_in_block = _divmod(torch.arange(height, device=device)[:, None], rh)
    block_col, col_in_block = _divmod(torch.arange(width, device=device), rw)
    rows, cols = region_row * rh + token_row, region_col * rw + token_col
    return rows, cols, real, block_row * n_win + block_col, row_in_block * rw + col_in_block


def _divmod(index: torch.Tensor, divisor) -> tuple[torch.Tensor, torch.Tensor]:
    """``index // divisor`` and ``index % divisor`` (:func:`~visionzoo.kernels.windows.sym_mod`)."""
    return index // divisor, sym_mod(index, divisor)


def regions(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """``(B, h, H, W, d)`` to ``(B, h, n_win**2, region_tokens, d)``, regions and tokens row-major (with
    symbolic sizes the :func:`_region_layout`, filler tokens included)."""
    batch, heads, height, width, dim = x.shape
    if not all_int(height, width):
        rows, cols = _region_layout(height, width, n_win, x.device)[:2]
        return x[:, :, rows, cols]
    rh, rw = height // n_win, width // n_win
    x = x.reshape(batch, heads, n_win, rh, n_win, rw, dim).transpose(3, 4)
    return x.reshape(batch, heads, n_win * n_win, rh * rw, dim)


def unregions(x: torch.Tensor, n_win: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`regions` back to ``(B, h, H, W, d)`` (filler tokens left out)."""
    if not all_int(height, width):
        map_region, map_token = _region_layout(height, width, n_win, x.device)[3:]
        return x[:, :, map_region, map_token]
    batch, heads, _, _, dim = x.shape
    x = x.reshape(batch, heads, n_win, n_win, height // n_win, width // n_win, dim).transpose(3, 4)
    return x.reshape(batch, heads, height, width, dim)


@cached_geometry
def _valid_tokens(height: int, width: int, valid_h: int, valid_w: int, n_win: int, device: torch.device):
    """Real (not padded) tokens in region layout: ``(n_win**2, region_tokens)`` bool."""
    rows = torch.arange(height, device=device)[:, None] < valid_h
    cols = torch.arange(width, device=device)[None, :] < valid_w
    return regions((rows & cols)[None, None, :, :, None], n_win)[0, 0, :, :, 0]


def valid_or_none(q: torch.Tensor, n_win: int, valid_size: tuple[int, int] | None) -> torch.Tensor | None:
    """The real tokens of ``valid_size`` in region layout, or None when every token is real.

    With symbolic sizes the mask is always built (in the graph), so one graph serves padded and unpadded maps,
    and it leaves out the filler tokens of :func:`_region_layout`.
    """
    height, width = q.shape[2], q.shape[3]
    valid_h, valid_w = (height, width) if valid_size is None else valid_size
    if not all_int(height, width):
        rows, cols, real = _region_layout(height, width, n_win, q.device)[:3]
        return real & (rows < valid_h) & (cols < valid_w)
    if is_static(valid_h, height) and is_static(valid_w, width):
        return None
    if not (0 < valid_h <= height and 0 < valid_w <= width):
        raise ValueError(f"valid_size {tuple(valid_size)} must lie within the {height}x{width} map")
    return _valid_tokens(height, width, valid_h, valid_w, n_win, q.device)


def route_regions(q: torch.Tensor, k: torch.Tensor, n_win: int, topk: int, scale=None, valid_size=None) -> torch.Tensor:
    """Level one: the ``min(topk, n_win**2)`` key regions of every query region, ``(B, n_win**2, topk)``.

    Regions are numbered row-major over the ``n_win x n_win`` grid. No gradient flows here.

    Args:
        q: queries ``(B, heads, H, W, head_dim)``, H and W multiples of ``n_win``.
        k: keys, same shape.
        n_win: regions per side.
        topk: key regions per query region.
        scale: affinity scale (a float); ``head_dim ** -0.5`` when None.
        valid_size: ``(h, w)`` of the real tokens at the top left, or None when all are real.
    """
    check_grid(q.shape[2], q.shape[3], n_win)
    if topk < 1:
        raise ValueError(f"topk must be positive, got {topk}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    valid = valid_or_none(q, n_win, valid_size)
    q_regions, k_regions = regions(q.detach(), n_win), regions(k.detach(), n_win)
    if valid is None:
        q_mean, k_mean = q_regions.mean(-2), k_regions.mean(-2)
    else:
        weights = valid.to(q.dtype) / valid.sum(-1, keepdim=True).clamp(min=1)
        q_mean = torch.einsum("bhrtd,rt->bhrd", q_regions, weights)
        k_mean = torch.einsum("bhrtd,rt->bhrd", k_regions, weights)
    # all heads together: (B, regions, heads * d)
    q_mean, k_mean = q_mean.transpose(1, 2).flatten(2), k_mean.transpose(1, 2).flatten(2)
    with float32_logits(q_mean, k_mean) as (q_mean, k_mean):  # float16 would overflow at large activations
        affinity = (q_mean * scale) @ k_mean.transpose(-1, -2)
    if valid is not None:  # regions made only of padding come last
        affinity = affinity.masked_fill(~valid.any(-1), float("-inf"))
    return torch.topk(affinity, k=min(topk, affinity.shape[-1]), dim=-1).indices
