"""The token-mixer contract: a name registry and the base class every mixer extends."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import is_exportable, register_notrace_module
from torch import nn

from visionzoo.kernels import pad_to_multiple

__all__ = [
    "HeadedMixer",
    "MultiHeadMixer",
    "TokenMixer",
    "create_mixer",
    "get_mixer_class",
    "list_mixers",
    "query_map",
    "register_mixer",
    "resolve_num_heads",
]

_MIXERS: dict[str, type[TokenMixer]] = {}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


@register_notrace_module  # FX (timm's feature extractors) keeps every mixer as one leaf: mixers branch on sizes
class TokenMixer(nn.Module):
    """Mixes tokens of a channels-last map ``(B, H, W, C)`` into the same shape.

    Subclasses implement :meth:`mix`; :meth:`forward` checks the input first. A mixer
    whose windows need a minimum map size sets ``min_size`` (per instance when it
    depends on the hyper-parameters) and pads internally above it. An attention mixer
    can also explain itself: ``query_attention(x, query)`` returns the attention weights
    ``(heads, H, W)`` of the token ``query`` (row, col) of one map ``x`` ``(1, H, W, C)``,
    computed as :meth:`mix` computes them (``visionzoo explain`` draws them); a mixer
    without attention weights lacks the method.

    Args:
        dim: channels.
        backend: kernel backend for the mixer's ops; ``"auto"`` lets the kernel dispatch choose.
    """

    min_size: tuple[int, int] = (1, 1)

    def __init__(self, dim: int, backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.backend = backend

    @property
    def kernel_backend(self) -> str:
        """The backend to pass to kernel ops: ``reference`` under timm's exportable flag."""
        return "reference" if is_exportable() else self.backend

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects a channels-last map (B, H, W, {self.dim}), got {tuple(x.shape)}"
            )
        height, width = x.shape[1], x.shape[2]
        min_h, min_w = self.min_size
        if height < min_h or width < min_w:
            raise ValueError(
                f"{type(self).__name__} needs a map of at least {min_h}x{min_w} tokens, got {height}x{width}"
            )
        return self.mix(x)


def check_sizes(
    odd: dict[str, int] | None = None,
    positive: dict[str, int] | None = None,
    non_negative: dict[str, int] | None = None,
) -> None:
    """One ``ValueError`` naming every size argument out of its range: ``odd`` ones must be odd and positive
    (window sides with a centre), ``positive`` ones at least 1, ``non_negative`` ones at least 0."""
    rules = (
        ("odd and positive", odd, lambda size: size >= 1 and size % 2 == 1),
        ("positive", positive, lambda size: size >= 1),
        ("0 or more", non_negative, lambda size: size >= 0),
    )
    wrong = [
        f"{name} must be {rule}, got {size}"
        for rule, sizes, ok in rules
        for name, size in (sizes or {}).items()
        if not ok(size)
    ]
    if wrong:
        raise ValueError("; ".join(wrong))


def resolve_num_heads(dim: int, num_heads: int | None, head_dim: int) -> int:
    """``num_heads``, or ``dim // head_dim`` when None; ``dim`` must split evenly into the heads."""
    heads = num_heads or max(dim // head_dim, 1)
    if dim % heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {heads}")
    return heads


class HeadedMixer(TokenMixer):
    """A token mixer whose channels split into attention heads.

    Args:
        dim: channels.
        num_heads: attention heads; ``dim // head_dim`` when None.
        head_dim: channels per head when ``num_heads`` is None.
        backend: kernel backend for the mixer's ops.
    """

    def __init__(self, dim: int, num_heads: int | None, head_dim: int, backend: str):
        super().__init__(dim, backend)
        self.num_heads = resolve_num_heads(dim, num_heads, head_dim)
        self.head_dim = dim // self.num_heads

    def split_heads(self, x: torch.Tensor, parts: int = 1, heads_first: bool = False) -> tuple[torch.Tensor, ...]:
        """A channels-last projection ``(B, H, W, parts * C)`` to ``parts`` maps ``(B, heads, H, W, head_dim)``.

        Args:
            x: the projection.
            parts: how many maps its channels hold (e.g. 3 for queries, keys and values).
            heads_first: channels are head by head, each holding its ``parts`` (timm's halo ``kv``), rather
                than part by part, each holding every head.
        """
        layout = (self.num_heads, parts, self.head_dim) if heads_first else (parts, self.num_heads, self.head_dim)
        x = x.reshape(*x.shape[:3], *layout)
        return (x.permute(4, 0, 3, 1, 2, 5) if heads_first else x.permute(3, 0, 4, 1, 2, 5)).unbind(0)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, heads, H, W, head_dim)`` back to channels-last ``(B, H, W, C)`` (before ``proj``)."""
        return x.permute(0, 2, 3, 1, 4).flatten(3)  # no sizes from x.shape: ONNX keeps H and W dynamic


class MultiHeadMixer(HeadedMixer):
    """A token mixer with a joint query/key/value projection, heads, and an output projection.

    Args:
        dim: channels.
        num_heads: attention heads; ``dim // head_dim`` when None.
        head_dim: channels per head when ``num_heads`` is None.
        qkv_bias: bias on the query/key/value projection.
        backend: kernel backend for the mixer's ops.
    """

    def __init__(
        self, dim: int, num_heads: int | None = None, head_dim: int = 32, qkv_bias: bool = True, backend: str = "auto"
    ):
        super().__init__(dim, num_heads, head_dim, backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Channels-last ``(B, H, W, C)`` to queries, keys and values ``(B, heads, H, W, head_dim)``."""
        return self.split_heads(self.qkv(x), 3)

    def padded_qkv_heads(
        self, x: torch.Tensor, multiple: int = 1, min_size: int = 0
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[int, int]]:
        """:meth:`qkv_heads` of ``x`` zero-padded at the bottom and right (``pad_to_multiple``), and the
        ``(H, W)`` of ``x``, for ``crop_map``."""
        padded, size = pad_to_multiple(x, multiple, min_size=min_size)
        return self.qkv_heads(padded), size


def query_map(weights: torch.Tensor, keys: torch.Tensor, query: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """One query's attention weights over the map, from a kernel's ``*_attention_weights``.

    Args:
        weights: ``(1, heads, H, W, K)``, every query's weights over its ``K`` keys (on a padded map).
        keys: ``(1, H, W, K)``, the flat position ``row * W + col`` of each of those keys.
        query: the query's (row, col).
        size: ``(h, w)`` of the real map at the top left of the padded one.

    Returns:
        ``(heads, h, w)``: the weights at their keys' positions, zero elsewhere.
    """
    row, col = query
    height, width = weights.shape[2], weights.shape[3]
    flat = weights.new_zeros(weights.shape[1], height * width)
    flat[:, keys[0, row, col]] = weights[0, :, row, col]  # a query's keys are distinct positions
    return flat.unflatten(1, (height, width))[:, : size[0], : size[1]]


def register_mixer(name: str) -> Callable[[type[TokenMixer]], type[TokenMixer]]:
    """Class decorator registering a :class:`TokenMixer` under ``name``."""
    key = _normalise(name)

    def decorator(cls: type[TokenMixer]) -> type[TokenMixer]:
        if key in _MIXERS:
            raise ValueError(f"mixer {key!r} is already registered by {_MIXERS[key].__qualname__}")
        if not issubclass(cls, TokenMixer):
            raise TypeError(f"{cls.__qualname__} must subclass TokenMixer to be registered as a mixer")
        _MIXERS[key] = cls
        return cls

    return decorator


def get_mixer_class(name: str) -> type[TokenMixer]:
    try:
        return _MIXERS[_normalise(name)]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; valid mixers: {', '.join(list_mixers())}") from None


def create_mixer(name: str, dim: int, num_heads: int | None = None, **hparams) -> TokenMixer:
    """Build the mixer registered as ``name`` for ``dim`` channels.

    Args:
        name: a name from :func:`list_mixers` (case and ``-``/``_`` insensitive).
        dim: channels of the map.
        num_heads: attention heads, for mixers that have heads; None lets the mixer choose.
        **hparams: the mixer's own keyword arguments.
    """
    cls = get_mixer_class(name)
    if num_heads is not None:
        hparams["num_heads"] = num_heads
    return cls(dim, **hparams)


def list_mixers() -> list[str]:
    return sorted(_MIXERS)
