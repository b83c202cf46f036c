"""Checkpoints: read safely, unwrap containers, map an official release's keys, rebuild a fit checkpoint's model.

A checkpoint is read with safetensors or with ``torch.load(weights_only=True)``: pickled code is refused.
Its tensors come out of a Lightning checkpoint (the task's EMA weights when the run kept one) or a
``model``/``state_dict`` container; an official release goes through its family's ``checkpoint_filter_fn``;
a ``visionzoo fit`` checkpoint rebuilds the classifier, detector or segmenter its task built.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from visionzoo.backbones.helpers import unwrap_state_dict

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

__all__ = [
    "find_backbone",
    "is_detector",
    "load_checkpoint",
    "load_model",
    "pretrained_cfg_of",
    "read_checkpoint",
    "unwrap_checkpoint",
]

# where a visionzoo task keeps its model's weights in a Lightning state dict: the EMA's first, when it has one
_TASK_PREFIXES = ("ema.module.", "model.")
# a task's training-only weights (a distillation's projections), left out when its checkpoint rebuilds the model
TRAINING_ONLY_PREFIX = "distiller."


def read_checkpoint(path: str | Path) -> Mapping:
    """A checkpoint's contents: safetensors, or torch with ``weights_only=True`` (pickled code is refused);
    a missing file is a FileNotFoundError, a truncated, corrupt or unsafe one a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or unsafe files all end here
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error


def unwrap_checkpoint(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """A model's state dict out of a Lightning checkpoint (``state_dict``; the task's ``ema.module.*`` weights
    when the run kept an EMA, else ``model.*``) or a ``model``/``state_dict`` container; plain state dicts pass
    through."""
    state = {k: v for k, v in unwrap_state_dict(checkpoint).items() if isinstance(v, torch.Tensor)}
    for prefix in _TASK_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (read with ``weights_only=True``: no pickled code)."""
    return unwrap_checkpoint(read_checkpoint(path))


def _family_filter(name: str) -> Callable | None:
    """The ``checkpoint_filter_fn`` of the module that registers ``name`` (official key layouts to ours)."""
    module = sys.modules.get(timm.models.model_entrypoint(name).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _key_report(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    return f"{len(missing)} missing keys {list(missing[:5])}, {len(unexpected)} unexpected keys {list(unexpected[:5])}"


def _load_weights(model: nn.Module, name: str, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` as it is, or through the family's ``checkpoint_filter_fn`` (an official release's keys);
    a checkpoint that fits neither way is an error listing the missing and unexpected keys of the closer fit."""
    filter_fn = _family_filter(name)
    candidates = [lambda: state] + ([lambda: filter_fn(state, model)] if filter_fn is not None else [])
    problems = []  # (number of bad keys, description) per layout tried
    for candidate in candidates:
        try:
            missing, unexpected = model.load_state_dict(candidate(), strict=False)
        except (KeyError, ValueError, RuntimeError) as error:  # shapes that differ, or not the official layout
            problems.append((float("inf"), str(error).strip().splitlines()[-1]))
            continue
        if not (missing or unexpected):
            return
        problems.append((len(missing) + len(unexpected), _key_report(missing, unexpected)))
    raise ValueError(f"checkpoint {source} does not fit {name}: {min(problems, key=lambda p: p[0])[1]}")


def _task_from_hparams(hparams: Mapping) -> LightningModule:
    """The ``visionzoo fit`` task a checkpoint's hyper-parameters describe, built without downloading weights."""
    from visionzoo import tasks

    # LightningCLI records the task class (``_class_path``); older checkpoints tell it by their arguments
    guess = "DetectionTask" if "detector" in hparams else "SegmentationTask" if "decoder" in hparams else None
    if "teacher_checkpoint" in hparams:  # a distillation's
        guess = "SegmentationDistillationTask" if "decoder" in hparams else "DistillationTask"
    class_name = str(hparams.get("_class_path", guess or "ClassificationTask")).rpartition(".")[2]
    if class_name not in tasks.__all__:
        raise ValueError(f"task {hparams['_class_path']!r} is not a visionzoo task")
    task = getattr(tasks, class_name)
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # Lightning's own entries
    hparams = {**hparams, **({"pretrained": False} if "pretrained" in hparams else {})}
    if hasattr(task, "student_of"):  # a distillation's checkpoint rebuilds its student alone
        task, hparams = task.student_of(hparams)
    for nested in ("detector_kwargs", "segmenter_kwargs"):
        backbone_kwargs = (hparams.get(nested) or {}).get("backbone_kwargs") or {}
        if backbone_kwargs.get("pretrained"):
            hparams[nested] = {**hparams[nested], "backbone_kwargs": {**backbone_kwargs, "pretrained": False}}
    return task(**hparams)


def load_model(name: str | None, checkpoint: str | Path | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name)`` in eval mode, with the weights of ``checkpoint`` when given.

    A ``visionzoo fit`` checkpoint rebuilds its own model, whatever the task: ``name`` may be None,
    and the classifier, detector or segmenter comes back as the task built it (its EMA weights when the
    run kept an EMA); the data's ``image_size`` (and ``mean``/``std`` when the recipe set them) go into the
    model's ``pretrained_cfg``.
    Otherwise the classifier is resized to the checkpoint's number of classes, an official release
    goes through its family's ``checkpoint_filter_fn``, and any other mismatch (a checkpoint of another
    model) is an error that lists the keys.
    """
    if checkpoint is None:
        if name is None:
            raise ValueError("give a model name or a checkpoint written by visionzoo fit")
        return timm.create_model(name, **kwargs).eval()
    raw = read_checkpoint(checkpoint)
    hparams = raw.get("hyper_parameters") if isinstance(raw.get("hyper_parameters"), Mapping) else {}
    trained_name = hparams.get("model_name")
    if name is None and trained_name is None:
        raise ValueError(f"{checkpoint} names no model (not written by visionzoo fit): give the model name")
    if name in (None, trained_name) and isinstance(raw.get("state_dict"), Mapping):
        model = _rebuild_trained(raw, hparams, checkpoint, kwargs)
    else:
        model = timm.create_model(name, **kwargs)
        state = unwrap_checkpoint(raw)
        classifier = model.pretrained_cfg.get("classifier")
        weight = state.get(f"{classifier}.weight") if classifier else None
        if weight is not None and weight.ndim == 2 and weight.shape[0] != model.num_classes:
            model.reset_classifier(weight.shape[0])
        _load_weights(model, name, state, checkpoint)
    return model.eval()


def _rebuild_trained(raw: Mapping, hparams: Mapping, checkpoint: str | Path, kwargs: dict) -> nn.Module:
    if kwargs:
        raise ValueError(f"{checkpoint} rebuilds its own model; change {sorted(kwargs)} in the recipe instead")
    try:
        task = _task_from_hparams(hparams)
    except TypeError as error:
        raise ValueError(f"{checkpoint} was not written by a visionzoo task: {error}") from error
    state = {k: v for k, v in raw["state_dict"].items() if not k.startswith(TRAINING_ONLY_PREFIX)}
    missing, unexpected = task.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the {type(task).__name__} its hyper-parameters describe: "
            + _key_report(missing, unexpected)
        )
    model = task.eval_model
    cfg = pretrained_cfg_of(model)
    data = raw.get("datamodule_hyper_parameters") or {}
    if data.get("image_size") is not None:
        height, width = (data["image_size"],) * 2 if isinstance(data["image_size"], int) else data["image_size"]
        cfg = {**cfg, "input_size": (cfg["input_size"][0], height, width)}
    for stat in ("mean", "std"):  # the recipe's normalisation, when it set one
        if data.get(stat) is not None:
            cfg = {**cfg, stat: tuple(data[stat])}
    model.pretrained_cfg = cfg
    return model


def is_detector(model: nn.Module) -> bool:
    return isinstance(model, (GeneralizedRCNN, RetinaNet, FCOS))


def find_backbone(model: nn.Module) -> nn.Module:
    """The timm model inside a classifier (itself), a segmenter or a detector."""
    if is_detector(model):
        return model.backbone.body
    return getattr(model, "backbone", model)


def pretrained_cfg_of(model: nn.Module) -> dict:
    """A model's ``pretrained_cfg`` (a fit checkpoint's model carries its data's), else its backbone's."""
    return getattr(model, "pretrained_cfg", None) or find_backbone(model).pretrained_cfg
