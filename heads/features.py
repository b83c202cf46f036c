"""A ``features_only`` timm backbone as the trunk of a dense-prediction head.

:class:`FeatureBackbone` builds any timm model (ours or timm's) with ``features_only=True``,
keeps the maps at the strides a head asks for, and reads their channels from
``feature_info``. It also freezes the first stages (``frozen_stages``, mmdet's meaning), can
keep BatchNorm statistics fixed while training (``norm_eval``) and can normalise each output
(``out_norm``, as the detection and segmentation versions of Swin and NAT do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["STAGE_STRIDES", "FeatureBackbone"]

# the four stages of a hierarchical backbone, by output stride; ``frozen_stages`` counts these
STAGE_STRIDES = (4, 8, 16, 32)


def _find_module(model: nn.Module, name: str) -> nn.Module | None:
    """The module that ``feature_info`` calls ``name`` inside a timm feature wrapper.

    timm's wrappers keep the original names (``FeatureHooks``, EfficientNet), flatten dots to
    underscores (``FeatureListNet``) or hold the model as ``model`` (``FeatureGetterNet``).
    """
    modules = dict(model.named_modules())
    for candidate in (name, name.replace(".", "_"), f"model.{name}"):
        if candidate in modules:
            return modules[candidate]
    return None


class FeatureBackbone(nn.Module):
    """Feature maps of a timm backbone at ``strides``, NCHW, finest first.

    Args:
        name: a timm model name (``import visionzoo`` registers ours).
        strides: output strides the head consumes, e.g. ``(8, 16, 32)``.
        frozen_stages: -1 trains everything; 0 freezes the stem (everything before the stride-4
            stage); n > 0 also freezes the first n of the stride 4, 8, 16 and 32 stages. Frozen
            parts stay in eval mode (norm statistics, dropout, stochastic depth) in training.
        norm_eval: keep every BatchNorm of the backbone in eval mode in training.
        out_norm: a LayerNorm over the channels of each output map (trainable, never frozen).
        head_name: named in errors (e.g. ``retinanet``).
        **kwargs: passed to ``timm.create_model`` (``pretrained``, ``out_indices``, model options).
    """

    def __init__(
        self,
        name: str,
        strides: Sequence[int],
        frozen_stages: int = -1,
        norm_eval: bool = False,
        out_norm: bool = False,
        head_name: str = "the head",
        **kwargs: Any,
    ):
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(f"unknown backbone {name!r}: not a timm model (did you `import visionzoo`?)")
        if not -1 <= frozen_stages <= len(STAGE_STRIDES):
            raise ValueError(f"frozen_stages must be in [-1, {len(STAGE_STRIDES)}], got {frozen_stages}")
        kwargs.pop("features_only", None)
        try:
            self.body = timm.create_model(name, features_only=True, **kwargs)
        except (RuntimeError, IndexError, AssertionError, TypeError, ValueError) as err:
            raise ValueError(f"backbone {name!r} cannot serve as features_only with {kwargs}: {err}") from err
        self.name = name
        self.strides = tuple(strides)
        info = self.body.feature_info
        reductions = info.reduction()
        missing = [s for s in self.strides if s not in reductions]
        if missing:
            raise ValueError(
                f"{head_name} needs feature maps at strides {', '.join(map(str, self.strides))}; backbone {name!r} "
                f"with out_indices {tuple(info.out_indices)} gives strides {', '.join(map(str, reductions))}"
            )
        self.positions = [reductions.index(s) for s in self.strides]
        self.channels = [info.channels()[p] for p in self.positions]
        self.pretrained_cfg = dict(getattr(self.body, "pretrained_cfg", {}) or {})
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.out_norms = nn.ModuleList(LayerNorm2d(c, eps=1e-5) for c in self.channels) if out_norm else None
        self._freeze()
        self.train()

    def _stage_modules(self) -> list[nn.Module]:
        """The module ending each of the four stages (from the full ``feature_info``, not only ``out_indices``)."""
        by_stride = {entry["reduction"]: entry["module"] for entry in self.body.feature_info.info}
        modules = []
        for stride in STAGE_STRIDES[: max(self.frozen_stages, 1)]:
            if stride not in by_stride:
                raise ValueError(f"frozen_stages needs a stride-{stride} stage; backbone {self.name!r} has none")
            module = _find_module(self.body, by_stride[stride])
            if module is None:
                raise ValueError(f"frozen_stages cannot find module {by_stride[stride]!r} in backbone {self.name!r}")
            modules.append(module)
        return modules

    def _freeze(self) -> None:
        """Freeze parameters in registration order (timm registers modules in execution order)."""
        if self.frozen_stages < 0:
            return
        params = list(self.body.parameters())
        index = {id(p): i for i, p in enumerate(params)}
        stages = self._stage_modules()
        if self.frozen_stages == 0:
            end = min(index[id(p)] for p in stages[0].parameters())
        else:
            end = max(index[id(p)] for p in stages[self.frozen_stages - 1].parameters()) + 1
        for p in params[:end]:
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureBackbone:
        super().train(mode)
        if mode:
            for module in self.body.modules():
                params = list(module.parameters())
                frozen = params and not any(p.requires_grad for p in params)
                if frozen or (self.norm_eval and isinstance(module, nn.modules.batchnorm._BatchNorm)):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.body(x)
        features = [features[p] for p in self.positions]
        if self.out_norms is None:
            return features
        return [norm(f) for norm, f in zip(self.out_norms, features)]
