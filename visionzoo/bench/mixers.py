"""Mixer benchmarks: our mixers against timm's layers on the same inputs and weights (baseline: timm)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from visionzoo.mixers import create_mixer

from .ops import OpTiming, time_implementations
from .timing import RunSettings, module_runner

__all__ = ["MIXER_CASES", "MixerCase", "bench_mixer", "channel_case", "halo_case", "partition_case"]


@dataclass(frozen=True)
class MixerCase:
    """Our mixer against timm's layer on the same weights: ``build(device, dtype, batch)`` returns
    ``(ours, our_input, timm_module, timm_input)``."""

    label: str
    batch: int
    build: Callable[[torch.device, torch.dtype, int], tuple[nn.Module, torch.Tensor, nn.Module, torch.Tensor]]


def halo_case(batch: int, size: int, dim: int, heads: int, block: int, halo: int) -> MixerCase:
    from timm.layers.halo_attn import HaloAttn

    def build(device, dtype, batch):
        theirs = HaloAttn(dim, num_heads=heads, block_size=block, halo_size=halo).to(device, dtype)
        ours = create_mixer("halo", dim, num_heads=heads, block_size=block, halo_size=halo, proj=False)
        ours = ours.to(device, dtype)
        ours.load_timm_weights(theirs)
        x = torch.randn(batch, size, size, dim, device=device, dtype=dtype)
        return ours, x, theirs, x.permute(0, 3, 1, 2).contiguous()

    return MixerCase(f"{size}x{size} C={dim} heads={heads} b={block} h={halo}", batch, build)


class _TimmPartitionAttention(nn.Module):
    """timm's maxxvit partition + attention + reverse, without the block's norm and MLP."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer._partition_attn(x)


def partition_case(batch: int, size: int, dim: int, window: int, partition: str) -> MixerCase:
    from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl

    def build(device, dtype, batch):
        cfg = MaxxVitTransformerCfg(dim_head=32, head_first=False, window_size=window, rel_pos_type="bias")
        theirs = PartitionAttentionCl(dim, partition, cfg).to(device, dtype)
        ours = create_mixer("multi_axis", dim, head_dim=32, window_size=window, partition=partition)
        ours = ours.to(device, dtype)
        getattr(ours, partition).load_timm_weights(theirs.attn)
        x = torch.randn(batch, size, size, dim, device=device, dtype=dtype)
        return ours, x, _TimmPartitionAttention(theirs), x

    return MixerCase(f"{partition} {size}x{size} C={dim} P={window}", batch, build)


class _TimmTokens(nn.Module):
    """A timm layer over ``(B, N, C)`` tokens, fed our channels-last map."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.flatten(1, 2)).unflatten(1, x.shape[1:3])


def channel_case(batch: int, size: int, dim: int, groups: int) -> MixerCase:
    from timm.models.davit import ChannelAttention

    def build(device, dtype, batch):
        theirs = ChannelAttention(dim, num_heads=groups).to(device, dtype)
        ours = create_mixer("channel", dim, num_heads=groups).to(device, dtype)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(batch, size, size, dim, device=device, dtype=dtype)
        return ours, x, _TimmTokens(theirs), x

    return MixerCase(f"{size}x{size} C={dim} groups={groups}", batch, build)


# HaloNet-style stage (block 8, halo 3), MaxViT-T's first stage (64 channels, 56x56, P=G=7), DaViT-T's first
# and third stages (96 channels at 56x56 in 3 groups, 384 at 14x14 in 12)
MIXER_CASES: dict[str, list[MixerCase]] = {
    "halo": [halo_case(8, 56, 128, 4, 8, 3)],
    "multi_axis": [partition_case(8, 56, 64, 7, "block"), partition_case(8, 56, 64, 7, "grid")],
    "channel": [channel_case(8, 56, 96, 3), channel_case(8, 14, 384, 12)],
}


def _timm_and_ours(
    theirs: nn.Module, timm_input: torch.Tensor, ours: nn.Module, our_input: torch.Tensor, backward: bool
) -> dict[str, Callable[[], None]]:
    """timm's layer first: the baseline."""
    return {"timm": module_runner(theirs, timm_input, backward), "visionzoo": module_runner(ours, our_input, backward)}


def bench_mixer(name: str, settings: RunSettings | None = None) -> list[OpTiming]:
    """Time our mixer ``name`` against timm's layer on the same inputs and weights (baseline: timm)."""
    settings = settings or RunSettings()
    if name not in MIXER_CASES:
        raise ValueError(f"no timm comparison for mixer {name!r}; mixers with one: {', '.join(MIXER_CASES)}")
    rows = []
    for case in MIXER_CASES[name]:
        batch = settings.batch or case.batch
        ours, our_input, theirs, timm_input = case.build(torch.device(settings.device), settings.dtype, batch)
        runners = partial(_timm_and_ours, theirs, timm_input, ours, our_input)
        rows += time_implementations(name, case.label, batch, settings, runners)
    return rows
