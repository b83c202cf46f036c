"""What the backbone families share: input checks, checkpoint conversion, pretrained cfgs, entry points."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function
from timm.models import PretrainedCfg, generate_default_cfgs, get_pretrained_cfg, register_model
from torch import nn

from .papers import FAMILY_FIGURES

__all__ = [
    "BackboneCfg",
    "PretrainedWeightsError",
    "check_images",
    "convert_official_state_dict",
    "generate_backbone_cfgs",
    "model_name",
    "register_models",
    "rename_key",
    "unwrap_state_dict",
]


@register_notrace_function  # one FX node: its checks branch on the input's shape
def check_images(x: torch.Tensor, in_chans: int, min_size: tuple[int, int], name: str) -> torch.Tensor:
    """``x``, after raising a ValueError naming the model ``name`` unless it is floating-point
    ``(B, in_chans, H, W)`` of at least ``min_size``."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{name} expects images (B, {in_chans}, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} expects floating-point images normalised with its pretrained_cfg mean and std, got {x.dtype}"
        )
    min_h, min_w = min_size
    if x.shape[2] < min_h or x.shape[3] < min_w:
        raise ValueError(f"{name} needs inputs of at least {min_h}x{min_w}, got {x.shape[2]}x{x.shape[3]}")
    return x


def model_name(model: nn.Module) -> str:
    """The architecture name of a timm-built model (its class name otherwise), for error messages."""
    return getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)


def unwrap_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, unwrapped from ``{"state_dict": ...}`` / ``{"model": ...}`` containers."""
    for container in ("state_dict", "model"):
        if container in state_dict and isinstance(state_dict[container], Mapping):
            state_dict = state_dict[container]
    return dict(state_dict)


def rename_key(key: str, rules: Sequence[tuple[str, str | Callable[[re.Match], str]]]) -> str:
    """``key`` renamed by the first of ``rules`` (regex, replacement) that matches it; unchanged if none does."""
    for pattern, replacement in rules:
        key, count = re.subn(pattern, replacement, key)
        if count:
            break
    return key


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    official_prefixes: tuple[str, ...],
    rename: Callable[[str], str | None],
) -> dict[str, torch.Tensor]:
    """Unwrap a checkpoint and, if it is in the official layout, rename its keys to ours.

    Args:
        state_dict: a checkpoint in the official layout or ours, possibly in a container.
        official_prefixes: key prefixes that only the official layout has.
        rename: an official key to ours, or None to drop the tensor.
    """
    state_dict = unwrap_state_dict(state_dict)
    if not any(key.startswith(official_prefixes) for key in state_dict):
        return state_dict
    return {ours: value for key, value in state_dict.items() if (ours := rename(key)) is not None}


@dataclass
class BackboneCfg(PretrainedCfg):
    """timm's pretrained cfg, plus the model's family and its paper's figures (:mod:`.papers`).

    ``family`` groups the sizes of one design (the thorough tests run on its first, smallest size).
    """

    family: str | None = None
    paper: str | None = None
    paper_params: int | None = None
    paper_gmacs: float | None = None
    paper_top1: float | None = None


_DEFAULTS = {
    "url": "",
    "num_classes": 1000,
    "input_size": (3, 224, 224),
    "pool_size": (7, 7),
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "license": "apache-2.0",
}


def generate_backbone_cfgs(cfgs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """timm's ``generate_default_cfgs`` over ``{"arch.tag": cfg}``, each a :class:`BackboneCfg` with the shared
    defaults and the architecture's paper figures.

    A family lists its sizes smallest first: the tests take the first of each ``family``.
    """
    return generate_default_cfgs(
        {
            key: BackboneCfg(**{**_DEFAULTS, **FAMILY_FIGURES.get(key.split(".")[0], {}), **cfg})
            for key, cfg in cfgs.items()
        }
    )


class PretrainedWeightsError(OSError):
    """Pretrained weights that cannot be downloaded or read: names the source and how to pass a local file."""


def _weights_source(name: str, kwargs: Mapping[str, Any]) -> str:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    for key in ("file", "url", "hf_hub_id"):
        if overlay.get(key) or cfg.get(key):
            return str(overlay.get(key) or cfg.get(key))
    return "its pretrained cfg"


def _entrypoint(module_name: str, name: str, create: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        try:
            return create(name, pretrained, **kwargs)
        except OSError as error:  # urllib's and the hub's network errors, a missing file
            if not pretrained or isinstance(error, PretrainedWeightsError):
                raise
            source = _weights_source(name, kwargs)
            if isinstance(error, FileNotFoundError):
                raise PretrainedWeightsError(f"{name}: no pretrained weights file at {source}") from error
            raise PretrainedWeightsError(
                f"{name}: cannot download the pretrained weights from {source} "
                f"({type(error).__name__}: {' '.join(str(error).split())}); without network, download the file "
                f"elsewhere and pass it: timm.create_model({name!r}, pretrained=True, "
                "pretrained_cfg_overlay=dict(file='PATH')) "
                "(a recipe: model_kwargs: {pretrained_cfg_overlay: {file: PATH}})"
            ) from error

    entrypoint.__module__ = module_name
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"``timm.create_model({name!r}, pretrained, **kwargs)``: see :mod:`{module_name}`."
    return entrypoint


def register_models(module_name: str, names: Iterable[str], create: Callable[..., nn.Module]) -> None:
    """Register with timm an entry point ``name(pretrained=False, **kwargs)`` per name, calling
    ``create(name, pretrained, **kwargs)``.

    Each entry point becomes an attribute of ``module_name``, as if defined there: timm reads that
    module's ``default_cfgs`` (so call this after them), ``visionzoo.checkpoints`` its ``checkpoint_filter_fn``.
    """
    module = sys.modules[module_name]
    for name in names:
        setattr(module, name, register_model(_entrypoint(module_name, name, create)))
