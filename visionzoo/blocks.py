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
        pos_embed_kernel: when positive, the block starts with a conditional position encoding
            ``x + dwconv(x)`` (depthwise convolution of this size, ``pos_embed``), as in BiFormer.
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
        pos_embed_kernel: int = 0,
    ):
        super().__init__()
        if pos_embed_kernel:
            self.pos_embed = nn.Conv2d(dim, dim, pos_embed_kernel, padding=pos_embed_kernel // 2, groups=dim)
        self.norm1 = norm_layer(dim)
        self.mixer = create_mixer(mixer, dim, num_heads=num_heads, **mixer_kwargs)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = create_channel_mixer(mlp_layer, dim, mlp_ratio)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pos_embed"):
            x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
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
        downsample_norm_layer: the downsample's norm; ``norm_layer`` when None.
        downsample_bias: bias on the downsample's convolution.
        out_norm: end with a norm (``norm``), as TransNeXt's stages do.
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
        downsample_norm_layer: Callable[[int], nn.Module] | None = None,
        downsample_bias: bool = False,
        out_norm: bool = False,
        **block_kwargs,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = (
            Downsample(in_dim, dim, downsample_norm_layer or norm_layer, bias=downsample_bias)
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *(
                MixBlock(dim, mixer=name, mixer_kwargs=kwargs, drop_path=rate, norm_layer=norm_layer, **block_kwargs)
                for name, kwargs, rate in zip(mixers, mixer_kwargs, drop_path, strict=True)
            )
        )
        self.norm = norm_layer(dim) if out_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self.norm(checkpoint_seq(self.blocks, x))
        return self.norm(self.blocks(x))
