"""Pre-norm blocks and stages around any registered token mixer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath, LayerScale
from timm.models import checkpoint_seq
from torch import nn

from .layers import Downsample, create_channel_mixer
from .mixers import create_mixer

__all__ = ["MixBlock", "MixStage"]


class MixBlock(nn.Module):
    """``x + DropPath(LayerScale(mixer(norm(x))))``, then the same with the channel mixer.

    Args:
        dim: channels.
        num_heads: heads passed to the token mixer.
        mixer: registered token-mixer name.
        mixer_kwargs: the mixer's own keyword arguments.
        mlp_ratio: hidden width of the channel mixer over ``dim``.
        mlp_layer: channel mixer, ``mlp`` or ``conv_glu``.
        layer_scale_init: initial LayerScale value; None disables LayerScale.
        drop_path: stochastic-depth rate of this block.
        norm_layer: norm constructor taking the channel count.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mixer: str,
        mixer_kwargs: Mapping[str, Any],
        mlp_ratio: float,
        mlp_layer: str,
        layer_scale_init: float | None,
        drop_path: float,
        norm_layer: Callable[[int], nn.Module],
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.mixer = create_mixer(mixer, dim, num_heads=num_heads, **mixer_kwargs)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = create_channel_mixer(mlp_layer, dim, mlp_ratio)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.mixer(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MixStage(nn.Module):
    """An optional stride-2 downsample, then ``len(mixers)`` blocks.

    Args:
        in_dim: channels coming in.
        dim: channels of the stage.
        mixers: token-mixer name of each block.
        mixer_kwargs: mixer keyword arguments of each block.
        drop_path: stochastic-depth rate of each block.
        downsample: start with a :class:`Downsample` from ``in_dim`` to ``dim``.
        **block_kwargs: the remaining :class:`MixBlock` arguments, shared by all blocks.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        mixers: Sequence[str],
        mixer_kwargs: Sequence[Mapping[str, Any]],
        drop_path: Sequence[float],
        downsample: bool,
        norm_layer: Callable[[int], nn.Module],
        **block_kwargs,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_dim, dim, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *(
                MixBlock(dim, mixer=name, mixer_kwargs=kwargs, drop_path=rate, norm_layer=norm_layer, **block_kwargs)
                for name, kwargs, rate in zip(mixers, mixer_kwargs, drop_path, strict=True)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)
