"""ELA-ResNet: timm's ResNet with Efficient Local Attention in every residual block.

Paper: Xu and Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural
Networks" (2024). ELA sits where timm puts a block's ``attn_layer`` (SE's place: on the
residual branch, before the addition). The paper released no code or weights, so there
is no official key layout to convert; ``checkpoint_filter_fn`` only unwraps containers.

``ela_variant`` (``T``, ``B``, ``S``, ``L``) picks the paper's variant; the default is ELA-B,
the depthwise variant with the 7-wide kernel.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from visionzoo.mixers import ElaGate

from .mixvit import check_images
from .mixvit import checkpoint_filter_fn as unwrap_state_dict

__all__ = ["ElaResNet"]


class ElaResNet(ResNet):
    """timm's :class:`~timm.models.resnet.ResNet` that checks its input like every visionzoo model.

    ResNets are fully convolutional: any map of at least 1x1 works.
    """

    min_input_size = (1, 1)

    def __init__(self, *args, in_chans: int = 3, **kwargs):
        super().__init__(*args, in_chans=in_chans, **kwargs)
        self.in_chans = in_chans

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # norms and biases are 1-D: timm's optimizer factory already spares them

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_images(self, x)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        check_images(self, x)
        return super().forward_intermediates(x, *args, **kwargs)


def _create_ela_resnet(variant: str, pretrained: bool, block, layers, ela_variant: str = "B", **kwargs) -> ElaResNet:
    block_args = {**kwargs.pop("block_args", {}), "attn_layer": partial(ElaGate, variant=ela_variant)}
    return build_model_with_cfg(
        ElaResNet,
        variant,
        pretrained,
        block=block,
        layers=layers,
        block_args=block_args,
        pretrained_filter_fn=unwrap_state_dict,
        feature_cfg=dict(out_indices=(1, 2, 3, 4)),  # strides 4-32, like every visionzoo backbone
        **kwargs,
    )


def _cfg(**kwargs) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "min_input_size": (3, *ElaResNet.min_input_size),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"ela_resnet18": _cfg(), "ela_resnet50": _cfg()})


@register_model
def ela_resnet18(pretrained: bool = False, **kwargs) -> ElaResNet:
    return _create_ela_resnet("ela_resnet18", pretrained, BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def ela_resnet50(pretrained: bool = False, **kwargs) -> ElaResNet:
    return _create_ela_resnet("ela_resnet50", pretrained, Bottleneck, (3, 4, 6, 3), **kwargs)
