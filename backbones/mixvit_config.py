"""MixViT's architecture: :class:`MixVitCfg`, the macro-architecture, and the nested groups of the
papers' choices for the convolutional parts (stem, downsamplings, norms outside the blocks)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

__all__ = ["DownsampleCfg", "MixVitCfg", "OuterNormCfg", "StemCfg"]

MixerSpec = str | Sequence[str]
MixerKwargsSpec = Mapping[str, Any] | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class StemCfg:
    """The stride-4 tokenizer.

    Args:
        kind: ``conv``, two 3x3 stride-2 convolutions (:class:`ConvStem`, NAT's), or ``patch``, one 7x7
            stride-4 convolution (:class:`PatchEmbedStem`, TransNeXt's).
        act: a norm and this activation between the ``conv`` stem's convolutions (BiFormer's).
        norm_eps: eps of the stem's norm; the outer norm's when None.
    """

    kind: str = "conv"
    act: str | None = None
    norm_eps: float | None = None

    def __post_init__(self):
        if self.kind not in ("conv", "patch"):
            raise ValueError(f"stem must be 'conv' or 'patch', got {self.kind!r}")


@dataclass(frozen=True)
class DownsampleCfg:
    """The stride-2 convolutions that start stages 2-4.

    Args:
        bias: the convolutions have a bias (BiFormer's, TransNeXt's).
        norm_eps: eps of their norms; the outer norm's when None.
    """

    bias: bool = False
    norm_eps: float | None = None


@dataclass(frozen=True)
class OuterNormCfg:
    """The norms outside the blocks.

    Args:
        layer: norm of the stem, the downsamplings and the final norm; the blocks' ``norm_layer`` with
            ``norm_eps`` when None. ``batchnorm`` runs BatchNorm2d on the channels-last maps (BiFormer's),
            with that layer's default eps.
        stage_end: end every stage but the last with a norm (TransNeXt's; the last one has the final norm).
    """

    layer: str | None = None
    stage_end: bool = False


_NESTED = {"stem": StemCfg, "downsample": DownsampleCfg, "outer_norm": OuterNormCfg}


@dataclass(frozen=True)
class MixVitCfg:
    """Architecture of a MixViT.

    ``mixers`` and ``mixer_kwargs`` hold one entry per stage; a sequence in place of a
    single entry is cycled over the stage's blocks (e.g. DiNAT's alternating dilations:
    ``({"dilation": 1}, {"dilation": 8})``). A single mixer name applies to every stage;
    ``block_mixer_kwargs`` go to every block's mixer. ``mlp_ratio`` may hold one ratio per stage.
    ``pos_embed_kernel`` starts every block with a depthwise-convolution position encoding of
    that size (BiFormer's).

    The papers' own choices for the convolutional parts are grouped in ``stem``, ``downsample``
    and ``outer_norm`` (each a dataclass, or a mapping of its fields; ``stem`` also takes a
    kind's name); their defaults keep NAT's layout.
    """

    embed_dim: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (2, 4, 18, 5)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    mixers: MixerSpec | tuple[MixerSpec, ...] = "global"
    mixer_kwargs: tuple[MixerKwargsSpec, ...] = ()
    block_mixer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mlp_ratio: float | tuple[float, ...] = 3.0
    mlp_layer: str = "mlp"
    layer_scale_init: float | None = None
    pos_embed_kernel: int = 0
    norm_layer: str = "layernorm"
    norm_eps: float = 1e-5
    stem: StemCfg = StemCfg()
    downsample: DownsampleCfg = DownsampleCfg()
    outer_norm: OuterNormCfg = OuterNormCfg()

    def __post_init__(self):
        num_stages = len(self.depths)
        set_ = partial(object.__setattr__, self)
        for name in ("embed_dim", "depths", "num_heads"):
            value = tuple(getattr(self, name))
            if len(value) != num_stages:
                raise ValueError(f"{name} has {len(value)} entries for {num_stages} stages (depths={self.depths})")
            set_(name, value)
        mixers = (self.mixers,) * num_stages if isinstance(self.mixers, str) else tuple(self.mixers)
        mixer_kwargs = tuple(self.mixer_kwargs) or ({},) * num_stages
        for name, value in (("mixers", mixers), ("mixer_kwargs", mixer_kwargs)):
            if len(value) != num_stages:
                raise ValueError(f"{name} has {len(value)} entries for {num_stages} stages (depths={self.depths})")
        set_("mixers", mixers)
        set_("mixer_kwargs", mixer_kwargs)
        if not isinstance(self.mlp_ratio, int | float):
            set_("mlp_ratio", tuple(self.mlp_ratio))
            if len(self.mlp_ratio) != num_stages:
                raise ValueError(f"mlp_ratio has {len(self.mlp_ratio)} entries for {num_stages} stages")
        if isinstance(self.stem, str):
            set_("stem", StemCfg(kind=self.stem))
        for name, cls in _NESTED.items():
            if isinstance(getattr(self, name), Mapping):
                set_(name, cls(**getattr(self, name)))

    def stage_blocks(self, stage: int) -> tuple[list[str], list[dict[str, Any]]]:
        """Mixer name and keyword arguments of each block of ``stage``."""
        depth = self.depths[stage]
        names, kwargs = self.mixers[stage], self.mixer_kwargs[stage]
        names = [names] if isinstance(names, str) else list(names)
        kwargs = [kwargs] if isinstance(kwargs, Mapping) else list(kwargs)
        if not names or not kwargs:
            raise ValueError(f"stage {stage} has an empty mixer or mixer_kwargs sequence")
        names = list(itertools.islice(itertools.cycle(names), depth))
        kwargs = [{**self.block_mixer_kwargs, **kw} for kw in itertools.islice(itertools.cycle(kwargs), depth)]
        return names, kwargs
