"""The token-mixer contract: a name registry and the base class every mixer extends."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import is_exportable
from torch import nn

__all__ = [
    "MultiHeadMixer",
    "TokenMixer",
    "create_mixer",
    "get_mixer_class",
    "list_mixers",
    "register_mixer",
    "resolve_num_heads",
]

_MIXERS: dict[str, type[TokenMixer]] = {}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


class TokenMixer(nn.Module):
    """Mixes tokens of a channels-last map ``(B, H, W, C)`` into the same shape.

    Subclasses implement :meth:`mix`; :meth:`forward` checks the input first. A mixer
    whose windows need a minimum map size sets ``min_size`` (per instance when it
    depends on the hyper-parameters) and pads internally above it.

    Args:
        dim: channels.
        backend: kernel backend for the mixer's ops; ``"auto"`` lets the kernel dispatch choose.
    """

    min_size: tuple[int, int] = (1, 1)
    # False where the mixer derives sizes or tables from H and W in Python: ONNX then fixes H and W
    onnx_dynamic_size: bool = True

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


def resolve_num_heads(dim: int, num_heads: int | None, head_dim: int) -> int:
    """``num_heads``, or ``dim // head_dim`` when None; ``dim`` must split evenly into the heads."""
    heads = num_heads or max(dim // head_dim, 1)
    if dim % heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {heads}")
    return heads


class MultiHeadMixer(TokenMixer):
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
        super().__init__(dim, backend)
        self.num_heads = resolve_num_heads(dim, num_heads, head_dim)
        self.head_dim = dim // self.num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Channels-last ``(B, H, W, C)`` to queries, keys and values ``(B, heads, H, W, head_dim)``."""
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height, width, 3, self.num_heads, self.head_dim)
        return qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, heads, H, W, head_dim)`` back to channels-last ``(B, H, W, C)`` (before ``proj``)."""
        return x.permute(0, 2, 3, 1, 4).flatten(3)  # no sizes from x.shape: ONNX keeps H and W dynamic


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
