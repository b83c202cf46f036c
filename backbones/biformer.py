"""BiFormer: vision transformers with bi-level routing attention, with the official checkpoints.

Paper: Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention" (CVPR 2023).
Reference code: rayleizhu/BiFormer (``models/biformer.py``; the released checkpoints were
trained with ``ops/bra_legacy.py``).

A :class:`~visionzoo.backbones.mixvit.MixVit` with BiFormer's options: BatchNorm stem
(conv, BN, GELU, conv, BN), downsamplings (conv with bias, BN) and final norm, a 3x3
depthwise position encoding before every block, LayerNorm eps 1e-6, MLP ratio 3, the
``routing`` mixer (7x7 regions, top-k 1/4/16, head dim 32, 5x5 LePE on V) in stages 1-3 and
the ``global_lepe`` mixer (8 heads, LePE on the input) in stage 4 (the official ``topk=-2``).
The official layout keeps the downsamplings in ``downsample_layers``; ours starts each stage
with one: :func:`checkpoint_filter_fn` renames the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from .helpers import convert_official_state_dict, generate_backbone_cfgs, register_models, rename_key
from .mixvit import MixVit, MixVitCfg, build_mixvit, mixvit_cfg
from .mixvit_config import DownsampleCfg, OuterNormCfg, StemCfg

__all__ = ["checkpoint_filter_fn"]


def _biformer(depths: tuple[int, ...], embed_dim: tuple[int, ...]) -> MixVitCfg:
    routing = [{"n_win": 7, "topk": topk} for topk in (1, 4, 16)]
    return MixVitCfg(
        embed_dim=embed_dim,
        depths=depths,
        num_heads=(*(dim // 32 for dim in embed_dim[:3]), 8),
        mixers=("routing", "routing", "routing", "global_lepe"),
        mixer_kwargs=(*routing, {}),
        block_mixer_kwargs={"side_dwconv": 5},
        mlp_ratio=3.0,
        pos_embed_kernel=3,
        norm_eps=1e-6,
        stem=StemCfg(act="gelu"),
        downsample=DownsampleCfg(bias=True),
        outer_norm=OuterNormCfg(layer="batchnorm"),
    )


model_cfgs = {
    "biformer_tiny": _biformer((2, 2, 8, 2), (64, 128, 256, 512)),
    "biformer_small": _biformer((4, 4, 18, 4), (64, 128, 256, 512)),
    "biformer_base": _biformer((4, 4, 18, 4), (96, 192, 384, 768)),
}

# Official key -> ours; applied in order, first match wins.
_KEY_RULES = [
    (r"^downsample_layers\.0\.0\.", "stem.conv1."),
    (r"^downsample_layers\.0\.1\.", "stem.norm1."),
    (r"^downsample_layers\.0\.3\.", "stem.conv2."),
    (r"^downsample_layers\.0\.4\.", "stem.norm."),
    (r"^downsample_layers\.(\d)\.0\.", r"stages.\1.downsample.conv."),
    (r"^downsample_layers\.(\d)\.1\.", r"stages.\1.downsample.norm."),
    (r"^stages\.(\d+)\.(\d+)\.attn\.qkv\.qkv\.", r"stages.\1.blocks.\2.mixer.qkv."),  # routing stages
    (r"^stages\.(\d+)\.(\d+)\.attn\.wo\.", r"stages.\1.blocks.\2.mixer.proj."),
    (r"^stages\.(\d+)\.(\d+)\.attn\.", r"stages.\1.blocks.\2.mixer."),
    (r"^stages\.(\d+)\.(\d+)\.mlp\.0\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.mlp\.3\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^head\.", "head.fc."),
]


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MixVit) -> dict[str, torch.Tensor]:
    """Map an official BiFormer state dict (``downsample_layers.*``, ``stages.i.j.*``) onto ours.

    A state dict already in our layout passes through; ``{"model": ...}`` and
    ``{"state_dict": ...}`` containers are unwrapped.
    """
    return convert_official_state_dict(state_dict, ("downsample_layers.",), partial(rename_key, rules=_KEY_RULES))


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> MixVit:
    return build_mixvit(variant, model_cfgs[variant], pretrained, filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(url: str, **kwargs) -> dict[str, Any]:
    # DeiT's evaluation transform, which the official code uses: resize 256, centre crop 224
    return mixvit_cfg(url=url, crop_pct=0.875, license="mit", family="biformer", **kwargs)


# The official README's release links (models/biformer.py ``model_urls``)
default_cfgs = generate_backbone_cfgs(
    {
        "biformer_tiny.in1k": _cfg("https://matix.li/e36fe9fb086c"),
        "biformer_small.in1k": _cfg("https://matix.li/5bb436318902"),
        "biformer_base.in1k": _cfg("https://matix.li/995db75f585d"),
    }
)


register_models(__name__, model_cfgs, _create_biformer)
