"""MixViT: one hierarchical vision transformer whose token mixer is an argument.

The macro-architecture follows NAT (Hassani et al., "Neighborhood Attention Transformer",
CVPR 2023): a stride-4 convolutional tokenizer, four stages joined by stride-2
convolutions, pre-norm blocks with optional LayerScale and stochastic depth. Each stage
(or each block) names its token mixer from ``visionzoo.mixers``, so mixers can be
compared inside the same network::

    timm.create_model("mixvit_tiny", mixers=("neighborhood", "neighborhood", "routing", "global"))

Sizes mirror NAT: ``mini``, ``tiny``, ``small`` and ``base`` have NAT's widths, depths,
heads and MLP ratios.

Keyword arguments of ``timm.create_model`` that name a :class:`MixVitCfg` field replace
it; ``mixer_<name>=value`` sets the mixer argument ``name`` in every block. The cfg
(``backbones/mixvit_config.py``) reads as the macro-architecture; the paper families' own
choices for the stem, the downsamplings and the outer norms sit in its nested groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from timm.layers import ClassifierHead, get_act_layer, get_norm_layer, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from torch import nn

from visionzoo.blocks import MixStage
from visionzoo.layers import BatchNormCl, ConvStem, PatchEmbedStem

from .helpers import check_images, generate_backbone_cfgs, model_name, register_models, unwrap_state_dict
from .mixvit_config import DownsampleCfg, MixVitCfg, OuterNormCfg, StemCfg

__all__ = ["DownsampleCfg", "MixVit", "MixVitCfg", "OuterNormCfg", "StemCfg", "build_mixvit", "mixvit_cfg"]


def _with_eps(norm_layer: Callable[..., nn.Module], eps: float | None) -> Callable[..., nn.Module]:
    return norm_layer if eps is None else partial(norm_layer, eps=eps)


def _outer_norm_layer(cfg: MixVitCfg, norm_layer: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """The norm of the stem, the downsamplings and the final norm: ``norm_layer`` unless the cfg names one."""
    layer = cfg.outer_norm.layer
    if layer is None:
        return norm_layer
    return BatchNormCl if layer == "batchnorm" else get_norm_layer(layer)


def _stem(cfg: MixVitCfg, in_chans: int, norm_layer: Callable[..., nn.Module]) -> nn.Module:
    if cfg.stem.kind == "patch":
        return PatchEmbedStem(in_chans, cfg.embed_dim[0], norm_layer)
    act_layer = get_act_layer(cfg.stem.act) if cfg.stem.act else None
    return ConvStem(in_chans, cfg.embed_dim[0], norm_layer, act_layer=act_layer)


class MixVit(nn.Module):
    """Hierarchical vision transformer with a configurable token mixer per stage.

    Args:
        cfg: the architecture.
        num_classes: classifier outputs; 0 for no classifier.
        in_chans: input image channels.
        global_pool: pooling before the classifier (``avg``, ``max``, ``avgmax``, ``''``).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly to this rate over all blocks.
    """

    output_fmt = "NHWC"  # of forward_features, as timm's channels-last models declare it

    def __init__(
        self,
        cfg: MixVitCfg,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.grad_checkpointing = False
        norm_layer = partial(get_norm_layer(cfg.norm_layer), eps=cfg.norm_eps)
        outer_norm_layer = _outer_norm_layer(cfg, norm_layer)
        self.stem = _stem(cfg, in_chans, _with_eps(outer_norm_layer, cfg.stem.norm_eps))
        rates = torch.linspace(0, drop_path_rate, sum(cfg.depths)).split(cfg.depths)
        stages, self.feature_info = [], []
        in_dim, reduction = cfg.embed_dim[0], 4
        for i, (dim, heads) in enumerate(zip(cfg.embed_dim, cfg.num_heads, strict=True)):
            mixers, mixer_kwargs = cfg.stage_blocks(i)
            reduction = reduction * 2 if i else reduction
            stages.append(
                MixStage(
                    in_dim,
                    dim,
                    mixers=mixers,
                    mixer_kwargs=mixer_kwargs,
                    drop_path=rates[i].tolist(),
                    downsample=i > 0,
                    norm_layer=norm_layer,
                    downsample_norm_layer=_with_eps(outer_norm_layer, cfg.downsample.norm_eps),
                    downsample_bias=cfg.downsample.bias,
                    out_norm=cfg.outer_norm.stage_end and i < len(cfg.depths) - 1,
                    pos_embed_kernel=cfg.pos_embed_kernel,
                    num_heads=heads,
                    mlp_ratio=cfg.mlp_ratio[i] if isinstance(cfg.mlp_ratio, tuple) else cfg.mlp_ratio,
                    mlp_layer=cfg.mlp_layer,
                    layer_scale_init=cfg.layer_scale_init,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_dim
        self.norm = outer_norm_layer(in_dim)
        self.head = ClassifierHead(in_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC")
        self.min_input_size = self._min_input_size()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _min_input_size(self) -> tuple[int, int]:
        """Smallest (H, W) for which every mixer gets its minimum map; never below the total stride.

        A stage of reduction r sees ceil(H / r) rows, so a mixer needing m rows needs H > r * (m - 1).
        """
        min_h = min_w = self.feature_info[-1]["reduction"]
        for info, stage in zip(self.feature_info, self.stages, strict=True):
            r = info["reduction"]
            for block in stage.blocks:
                need_h, need_w = block.mixer.min_size
                min_h, min_w = max(min_h, r * (need_h - 1) + 1), max(min_w, r * (need_w - 1) + 1)
        return min_h, min_w

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        return check_images(x, self.in_chans, self.min_input_size, model_name(self))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters that mixers exclude from weight decay (e.g. position-bias tables)."""
        skip = set()
        for name, module in self.named_modules():
            if module is not self and hasattr(module, "no_weight_decay"):
                skip.update(f"{name}.{param}" for param in module.no_weight_decay())
        return skip

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (and the final features unless ``intermediates_only``).

        Args:
            x: images ``(B, C, H, W)``.
            indices: the last n stages if an int, all if None, else these stage indices.
            norm: apply the final norm to the last stage's output.
            stop_early: skip stages after the last one asked for.
            output_fmt: ``NCHW`` or ``NHWC`` for the intermediates.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        x = self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                out = self.norm(x) if norm and i == last else x
                intermediates.append(out.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else out)
        if intermediates_only:
            return intermediates
        return self.norm(x) if i == last else x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop stages after the last one in ``indices`` (and the norm and head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` to normed channels-last features ``(B, H/32, W/32, C)``."""
        x = self._check_input(x)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _wide(width: int, num_heads: tuple[int, ...]) -> MixVitCfg:
    """NAT-Small's and NAT-Base's layout: depths 3/4/18/5, MLP ratio 2, LayerScale."""
    embed_dim = tuple(width * 2**i for i in range(4))
    return MixVitCfg(embed_dim, (3, 4, 18, 5), num_heads, mlp_ratio=2.0, layer_scale_init=1e-5)


model_cfgs = {
    "mixvit_mini": MixVitCfg(depths=(3, 4, 6, 5)),
    "mixvit_tiny": MixVitCfg(depths=(3, 4, 18, 5)),
    "mixvit_small": _wide(96, (3, 6, 12, 24)),
    "mixvit_tiny_neighborhood": MixVitCfg(
        depths=(3, 4, 18, 5), mixers="neighborhood", block_mixer_kwargs={"kernel_size": 7}
    ),
    # MaxViT's alternation: block attention (7x7 windows), then grid attention (7x7 grid)
    "mixvit_tiny_multi_axis": MixVitCfg(
        depths=(3, 4, 18, 5),
        mixers="multi_axis",
        mixer_kwargs=(({"partition": "block"}, {"partition": "grid"}),) * 4,
        block_mixer_kwargs={"window_size": 7},
    ),
    # DaViT's dual attention: spatial window attention (7x7 windows, the multi-axis block attention) and
    # channel group attention alternating block by block
    "mixvit_tiny_dual": MixVitCfg(
        depths=(3, 4, 18, 5),
        mixers=(("multi_axis", "channel"),) * 4,
        mixer_kwargs=(({"partition": "block", "window_size": 7}, {}),) * 4,
    ),
    # 7x7 query blocks over 9x9 keys: HaloNet's block 8 / halo 3 (14x14 keys) costs 28% more MACs
    "mixvit_tiny_halo": MixVitCfg(
        depths=(3, 4, 18, 5), mixers="halo", block_mixer_kwargs={"block_size": 7, "halo_size": 1}
    ),
    # the attention's 4*C^2 parameters per block move into the MLP: ratio 3 + 2 = 5
    "mixvit_tiny_eca": MixVitCfg(depths=(3, 4, 18, 5), mixers="eca", mlp_ratio=5.0),
    "mixvit_tiny_ela": MixVitCfg(depths=(3, 4, 18, 5), mixers="ela", mlp_ratio=5.0),
    # TransNeXt's mixers (aggregated in stages 1-3, full cosine attention in stage 4). Their CPB MLP,
    # pooled branch and sr conv cost ~0.35 GMACs more than NA: paid for with narrower MLPs where the
    # tokens are many (ratios 1 and 2 in stages 1-2; 2.5 in stage 3 pays for the sr conv's params)
    "mixvit_tiny_aggregated": MixVitCfg(
        depths=(3, 4, 18, 5),
        mixers=("aggregated", "aggregated", "aggregated", "cosine_global"),
        mixer_kwargs=(
            {"sr_ratio": 8, "pretrain_size": 56},
            {"sr_ratio": 4, "pretrain_size": 28},
            {"sr_ratio": 2, "pretrain_size": 14},
            {"pretrain_size": 7},
        ),
        mlp_ratio=(1.0, 2.0, 2.5, 3.0),
    ),
    # BiFormer's 7x7 regions and top-k 1/4/16, all 49 regions (global) in the last stage; with
    # the 5x5 LePE: +0.6% parameters and +3.0% MACs over mixvit_tiny_neighborhood at 224x224
    "mixvit_tiny_routing": MixVitCfg(
        depths=(3, 4, 18, 5),
        mixers="routing",
        mixer_kwargs=tuple({"topk": topk} for topk in (1, 4, 16, 49)),
        block_mixer_kwargs={"n_win": 7},
    ),
    "mixvit_base": _wide(128, (4, 8, 16, 32)),
}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MixVit) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` containers; keys are already ours."""
    return unwrap_state_dict(state_dict)


def _split_cfg_kwargs(cfg: MixVitCfg, kwargs: dict[str, Any]) -> MixVitCfg:
    """Move MixVitCfg fields and ``mixer_<arg>`` entries out of ``kwargs`` into a new cfg."""
    fields = {f.name for f in dataclasses.fields(MixVitCfg)}
    overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in fields}
    block_mixer_kwargs = {
        name.removeprefix("mixer_"): kwargs.pop(name) for name in list(kwargs) if name.startswith("mixer_")
    }
    if block_mixer_kwargs:
        overrides["block_mixer_kwargs"] = {**cfg.block_mixer_kwargs, **block_mixer_kwargs}
    return dataclasses.replace(cfg, **overrides)


def build_mixvit(variant: str, cfg: MixVitCfg, pretrained: bool = False, filter_fn=None, **kwargs) -> MixVit:
    """Build a :class:`MixVit` through timm: ``kwargs`` naming cfg fields override ``cfg``."""
    return build_model_with_cfg(
        MixVit,
        variant,
        pretrained,
        cfg=_split_cfg_kwargs(cfg, kwargs),
        pretrained_filter_fn=filter_fn or checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


def _create_mixvit(variant: str, pretrained: bool = False, **kwargs) -> MixVit:
    return build_mixvit(variant, model_cfgs[variant], pretrained, **kwargs)


def mixvit_cfg(**kwargs) -> dict[str, Any]:
    """Pretrained cfg entries of a MixViT-layout model (module names of the stem and head), for
    :func:`~visionzoo.backbones.helpers.generate_backbone_cfgs`."""
    return {
        "min_input_size": (3, 32, 32),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        **kwargs,
    }


_SIZES = ("mixvit_mini", "mixvit_tiny", "mixvit_small", "mixvit_base")

# The sizes (smallest first in model_cfgs) are one family; a preset's mixers make it a family of its own.
default_cfgs = generate_backbone_cfgs(
    {name: mixvit_cfg(family="mixvit" if name in _SIZES else name) for name in model_cfgs}
)

register_models(__name__, model_cfgs, _create_mixvit)
