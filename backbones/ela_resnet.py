"""ELA-ResNet: timm's ResNet with Efficient Local Attention in every residual block.

Paper: Xu and Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural
Networks" (2024). ELA sits where timm puts a block's ``attn_layer`` (SE's place: on the
residual branch, before the addition). The paper released no code or weights, so there
is no official key layout to convert; ``checkpoint_filter_fn`` only unwraps containers.

``ela_variant`` (``T``, ``B``, ``S``, ``L``) picks the paper's variant; the default is ELA-B,
the depthwise variant with the 7-wide kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from timm.models import build_model_with_cfg
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from visionzoo.mixers import ElaGate

from .helpers import check_images, generate_backbone_cfgs, model_name, register_models, unwrap_state_dict

__all__ = ["ElaResNet", "checkpoint_filter_fn"]


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

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        return check_images(x, self.in_chans, self.min_input_size, model_name(self))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(self._check_input(x))

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        return super().forward_intermediates(self._check_input(x), *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ResNet's forward, defined in this module: FX wraps the check_images that the traced forward's module sees
        return self.forward_head(self.forward_features(x))


# timm's ResNet blocks and layers of each depth
model_cfgs = {"ela_resnet18": (BasicBlock, (2, 2, 2, 2)), "ela_resnet50": (Bottleneck, (3, 4, 6, 3))}


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: ElaResNet) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` containers; keys are already ours."""
    return unwrap_state_dict(state_dict)


def _create_ela_resnet(variant: str, pretrained: bool, ela_variant: str = "B", **kwargs) -> ElaResNet:
    block, layers = model_cfgs[variant]
    block_args = {**kwargs.pop("block_args", {}), "attn_layer": partial(ElaGate, variant=ela_variant)}
    return build_model_with_cfg(
        ElaResNet,
        variant,
        pretrained,
        block=block,
        layers=layers,
        block_args=block_args,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(1, 2, 3, 4)),  # strides 4-32, like every visionzoo backbone
        **kwargs,
    )


default_cfgs = generate_backbone_cfgs(
    {
        name: {
            "min_input_size": (3, *ElaResNet.min_input_size),
            "crop_pct": 0.875,
            "interpolation": "bilinear",
            "first_conv": "conv1",
            "classifier": "fc",
            "family": "ela_resnet",
        }
        for name in model_cfgs
    }
)

register_models(__name__, model_cfgs, _create_ela_resnet)
