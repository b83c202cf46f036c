"""NAT and DiNAT: neighborhood attention transformers with the official checkpoints.

Papers: Hassani et al., "Neighborhood Attention Transformer" (CVPR 2023) and Hassani and
Shi, "Dilated Neighborhood Attention Transformer" (2022). Reference code:
SHI-Labs/Neighborhood-Attention-Transformer (``classification/nat.py``, ``dinat.py``).

Both are a :class:`~visionzoo.backbones.mixvit.MixVit` with the ``neighborhood`` mixer
(k=7, relative position bias); DiNAT alternates dilations inside each stage. The official
layout downsamples at the end of a level, ours at the start of the next stage: the
computation is the same, and :func:`checkpoint_filter_fn` renames the official keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .helpers import convert_official_state_dict, generate_backbone_cfgs, register_models, rename_key
from .mixvit import MixVit, MixVitCfg, build_mixvit, mixvit_cfg

__all__ = ["checkpoint_filter_fn"]

_NA = {"kernel_size": 7}


def _nat(depths, num_heads, embed_dim, mlp_ratio, layer_scale_init=None, dilations=None) -> MixVitCfg:
    return MixVitCfg(
        embed_dim=tuple(embed_dim * 2**i for i in range(4)),
        depths=depths,
        num_heads=num_heads,
        mixers="neighborhood",
        mixer_kwargs=tuple(tuple({"dilation": d} for d in stage) for stage in dilations) if dilations else (),
        block_mixer_kwargs=_NA,
        mlp_ratio=mlp_ratio,
        layer_scale_init=layer_scale_init,
    )


# DiNAT's per-stage dilation cycles at 224x224 (dinat.py): 1,8,1 / 1,4,1,4 / 1,2,... / 1,...
_DILATIONS = ((1, 8), (1, 4), (1, 2), (1,))

model_cfgs = {
    "nat_mini": _nat((3, 4, 6, 5), (2, 4, 8, 16), 64, 3.0),
    "nat_tiny": _nat((3, 4, 18, 5), (2, 4, 8, 16), 64, 3.0),
    "nat_small": _nat((3, 4, 18, 5), (3, 6, 12, 24), 96, 2.0, layer_scale_init=1e-5),
    "nat_base": _nat((3, 4, 18, 5), (4, 8, 16, 32), 128, 2.0, layer_scale_init=1e-5),
    "dinat_mini": _nat((3, 4, 6, 5), (2, 4, 8, 16), 64, 3.0, dilations=_DILATIONS),
    "dinat_tiny": _nat((3, 4, 18, 5), (2, 4, 8, 16), 64, 3.0, dilations=_DILATIONS),
    "dinat_small": _nat((3, 4, 18, 5), (3, 6, 12, 24), 96, 2.0, dilations=_DILATIONS),
    "dinat_base": _nat((3, 4, 18, 5), (4, 8, 16, 32), 128, 2.0, layer_scale_init=1e-5, dilations=_DILATIONS),
}

# Official key -> ours; applied in order, first match wins.
_KEY_RULES = [
    (r"^patch_embed\.proj\.0\.", "stem.conv1."),
    (r"^patch_embed\.proj\.1\.", "stem.conv2."),
    (r"^patch_embed\.norm\.", "stem.norm."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.attn\.", r"stages.\1.blocks.\2.mixer."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.gamma1$", r"stages.\1.blocks.\2.ls1.gamma"),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.gamma2$", r"stages.\1.blocks.\2.ls2.gamma"),
    (r"^levels\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"^head\.", "head.fc."),
]
_DOWNSAMPLE = re.compile(r"^levels\.(\d+)\.downsample\.(reduction|norm)\.")


def _official_to_ours(key: str) -> str:
    if match := _DOWNSAMPLE.match(key):  # levels.i.downsample is stages.(i+1).downsample
        part = "conv" if match[2] == "reduction" else "norm"
        return f"stages.{int(match[1]) + 1}.downsample.{part}.{key[match.end() :]}"
    return rename_key(key, _KEY_RULES)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MixVit) -> dict[str, torch.Tensor]:
    """Map an official NAT/DiNAT state dict (``levels.*``, ``patch_embed.*``) onto ours.

    A state dict already in our layout passes through; ``{"model": ...}`` and
    ``{"state_dict": ...}`` containers are unwrapped.
    """
    return convert_official_state_dict(state_dict, ("levels.", "patch_embed."), _official_to_ours)


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> MixVit:
    return build_mixvit(variant, model_cfgs[variant], pretrained, filter_fn=checkpoint_filter_fn, **kwargs)


_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/{}.pth"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/{}_in1k_224.pth"


def _cfg(url: str, family: str) -> dict[str, Any]:
    return mixvit_cfg(url=url, crop_pct=0.875, license="mit", family=family)


default_cfgs = generate_backbone_cfgs(
    {
        **{f"{name}.in1k": _cfg(_NAT_URL.format(name), "nat") for name in model_cfgs if name.startswith("nat_")},
        **{f"{name}.in1k": _cfg(_DINAT_URL.format(name), "dinat") for name in model_cfgs if name.startswith("dinat_")},
    }
)

register_models(__name__, model_cfgs, _create_nat)
