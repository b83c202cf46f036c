"""TransNeXt: aggregated attention and convolutional GLU, with the official checkpoints.

Paper: Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers" (CVPR 2024).
Reference code: DaiShiResearch/TransNeXt (``classification/transnext.py``).

A :class:`~visionzoo.backbones.mixvit.MixVit` with a 7x7 stride-4 patch-embedding stem,
3x3 stride-2 downsamplings with bias, the ``aggregated`` mixer (3x3 window, pooling ratios
8, 4, 2) in stages 1-3 and ``cosine_global`` (full attention) in stage 4, ConvGLU channel
mixers, a norm at the end of every stage and no LayerScale. The official model fixes its
pool sizes and position tables from ``img_size``; ours derives them from the input, so one
model runs at any size and matches the official numerics at the construction size (and one
``torch.export`` or ONNX graph, with symbolic sizes, serves every size).
``pretrain_size`` (224) only scales the continuous position bias coordinates, as in the
official ``--pretrain-size``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .helpers import convert_official_state_dict, generate_backbone_cfgs, register_models, rename_key
from .mixvit import MixVit, MixVitCfg, build_mixvit, mixvit_cfg
from .mixvit_config import DownsampleCfg, OuterNormCfg, StemCfg

__all__ = ["checkpoint_filter_fn", "transnext_cfg"]

_SR_RATIOS = (8, 4, 2, 1)


def transnext_cfg(embed_dim, depths, num_heads, window_size=3, pretrain_size=224) -> MixVitCfg:
    """TransNeXt's architecture; ``pretrain_size`` is the image side the CPB coordinates are scaled to."""
    mixer_kwargs = tuple(
        {"sr_ratio": sr, "window_size": window_size, "pretrain_size": pretrain_size // 2 ** (i + 2)}
        if sr > 1
        else {"pretrain_size": pretrain_size // 2 ** (i + 2)}
        for i, sr in enumerate(_SR_RATIOS)
    )
    return MixVitCfg(
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        mixers=("aggregated", "aggregated", "aggregated", "cosine_global"),
        mixer_kwargs=mixer_kwargs,
        mlp_ratio=(8.0, 8.0, 4.0, 4.0),
        mlp_layer="conv_glu",
        norm_eps=1e-6,
        stem=StemCfg(kind="patch", norm_eps=1e-5),
        downsample=DownsampleCfg(bias=True, norm_eps=1e-5),
        outer_norm=OuterNormCfg(stage_end=True),
    )


model_cfgs = {
    "transnext_micro": transnext_cfg((48, 96, 192, 384), (2, 2, 15, 2), (2, 4, 8, 16)),
    "transnext_tiny": transnext_cfg((72, 144, 288, 576), (2, 2, 15, 2), (3, 6, 12, 24)),
    "transnext_small": transnext_cfg((72, 144, 288, 576), (5, 5, 22, 5), (3, 6, 12, 24)),
    "transnext_base": transnext_cfg((96, 192, 384, 768), (5, 5, 23, 5), (4, 8, 16, 32)),
}

# Official key -> ours; applied in order, first match wins.
_KEY_RULES = [
    (r"^patch_embed1\.proj\.", "stem.conv."),
    (r"^patch_embed1\.norm\.", "stem.norm."),
    (r"^patch_embed(\d)\.proj\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.conv."),
    (r"^patch_embed(\d)\.norm\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.norm."),
    (r"^block(\d)\.(\d+)\.attn\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.mixer."),
    (r"^block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.mlp.dwconv."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"^norm4\.", "norm."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
    (r"^head\.", "head.fc."),
]
# Tables the official model builds from its construction size; ours are computed per input size.
_SIZE_BUFFERS = re.compile(r"(^relative_pos_index\d|^relative_coords_table\d|seq_length_scale$|padding_mask$)")


def _official_to_ours(key: str) -> str | None:
    return None if _SIZE_BUFFERS.search(key) else rename_key(key, _KEY_RULES)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MixVit) -> dict[str, torch.Tensor]:
    """Map an official TransNeXt state dict (``patch_embed1.*``, ``block1.0.*``, ``norm1.*``) onto ours.

    Size-derived buffers, if a checkpoint carries them, are dropped: the model recomputes
    them for each input size. A state dict already in our layout passes through;
    ``{"model": ...}`` and ``{"state_dict": ...}`` containers are unwrapped.
    """
    return convert_official_state_dict(state_dict, ("patch_embed1.", "block1."), _official_to_ours)


def _create_transnext(variant: str, pretrained: bool = False, **kwargs) -> MixVit:
    return build_mixvit(variant, model_cfgs[variant], pretrained, filter_fn=checkpoint_filter_fn, **kwargs)


# The official README's release locations (Hugging Face Hub files).
_URL = "https://huggingface.co/DaiShiResearch/{repo}/resolve/main/{file}.pth?download=true"


def _cfg(size: str, release: str, **kwargs) -> dict[str, Any]:
    name = f"transnext_{size}_{release}"
    url = _URL.format(repo=name.replace("_", "-"), file=name)
    return mixvit_cfg(**{"url": url, "crop_pct": 0.875, "first_conv": "stem.conv", "family": "transnext", **kwargs})


default_cfgs = generate_backbone_cfgs(
    {
        "transnext_micro.in1k": _cfg("micro", "224_1k"),
        "transnext_tiny.in1k": _cfg("tiny", "224_1k"),
        "transnext_small.in1k": _cfg("small", "224_1k"),
        "transnext_small.in1k_384": _cfg("small", "384_1k_ft_1k", input_size=(3, 384, 384), crop_pct=1.0),
        "transnext_base.in1k": _cfg("base", "224_1k"),
        "transnext_base.in1k_384": _cfg("base", "384_1k_ft_1k", input_size=(3, 384, 384), crop_pct=1.0),
    }
)


register_models(__name__, model_cfgs, _create_transnext)
