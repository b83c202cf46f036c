"""Albumentations pipelines declared as plain data, and the model's input settings.

A recipe lists transforms as dicts, ``[{name: HorizontalFlip, p: 0.5}, {name: RandomResizedCrop, size: [224, 224]}]``;
compositions nest (``{name: OneOf, transforms: [...], p: 0.3}``). :func:`build_pipeline` turns such a list
(or a task's default when it is None) into one ``A.Compose``, appends normalisation and the tensor conversion,
and carries boxes (``A.BboxParams``) and masks along with the image.
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

__all__ = [
    "DataConfig",
    "Pipeline",
    "build_pipeline",
    "eval_resize",
    "make_transform",
    "resolve_data_config",
    "to_size",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


@dataclass(frozen=True)
class DataConfig:
    """What a pipeline needs to know about the model: input size (H, W), normalisation, eval resize."""

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    @property
    def cv2_interpolation(self) -> int:
        return INTERPOLATIONS.get(self.interpolation, cv2.INTER_LINEAR)


def to_size(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``224`` or ``(224, 320)`` as ``(H, W)``."""
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {size!r}")
    return (int(size[0]), int(size[1]))


def resolve_data_config(
    model_name: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
) -> DataConfig:
    """Input settings from ``timm.get_pretrained_cfg(model_name)``; explicit arguments win, ImageNet defaults
    without a model."""
    values: dict[str, Any] = {}
    if model_name is not None:
        import timm  # visionzoo's models are registered: importing this module imported the package first

        cfg = timm.get_pretrained_cfg(model_name)
        if cfg is None:
            close = difflib.get_close_matches(model_name, timm.list_models(), n=5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown model_name {model_name!r}: timm has no pretrained cfg for it{hint}")
        values = dict(
            input_size=tuple(cfg.input_size[-2:]),
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            crop_pct=cfg.crop_pct,
            interpolation=cfg.interpolation,
        )
    if image_size is not None:
        values["input_size"] = to_size(image_size)
    if mean is not None:
        values["mean"] = tuple(float(m) for m in mean)
    if std is not None:
        values["std"] = tuple(float(s) for s in std)
    return DataConfig(**values)


def _transform_classes() -> dict[str, type]:
    names = {}
    for name in dir(A):
        obj = getattr(A, name)
        if inspect.isclass(obj) and issubclass(obj, (A.BasicTransform, A.BaseCompose)) and not name.startswith("_"):
            names[name] = obj
    return names


def _check_arguments(name: str, cls: type, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"transform {name}: unknown argument {key!r}; {hint}valid: {', '.join(params)}")


def make_transform(spec: dict[str, Any]) -> A.BasicTransform | A.BaseCompose:
    """One transform from ``{name: <albumentations class>, **arguments}``; nested ``transforms`` lists for
    compositions such as ``OneOf``."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"a transform is a dict with a 'name' key (an albumentations class), got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("name")
    classes = _transform_classes()
    if name not in classes:
        close = difflib.get_close_matches(str(name), list(classes), n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown transform {name!r} (not an albumentations transform){hint}")
    cls = classes[name]
    if name in ("Normalize", "ToTensorV2"):
        raise ValueError(f"transform {name}: the data module appends normalisation and tensor conversion itself")
    _check_arguments(name, cls, kwargs)
    if issubclass(cls, A.BaseCompose):
        kwargs["transforms"] = [make_transform(t) for t in kwargs.get("transforms", [])]
    try:
        return cls(**kwargs)
    except Exception as err:  # albumentations validates with pydantic; say which transform failed
        raise ValueError(f"transform {name}: bad arguments {kwargs}: {err}") from err


class Pipeline:
    """The declared transforms as one ``A.Compose``, then the image as a CHW float32 tensor, normalised with
    mean/std (or only scaled to [0, 1]); a ``mask`` becomes a tensor, ``masks`` stay arrays.

    The tail is done in numpy rather than with ``A.Normalize`` + ``ToTensorV2``, which cost ~100 us per
    sample, more than the whole rest of a Fashion-MNIST pipeline.
    """

    def __init__(self, compose: A.Compose, mean: tuple[float, ...] | None, std: tuple[float, ...] | None):
        self.compose = compose
        self.mean = None if mean is None else np.asarray(mean, np.float32)
        self.std = None if std is None else np.asarray(std, np.float32)

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        # albumentations' convention: uint8 images in 0..255, float images in [0, 1]
        x = image.astype(np.float32) * np.float32(1 / 255) if image.dtype == np.uint8 else image.astype(np.float32)
        if x.ndim == 2:
            x = x[:, :, None]
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def __call__(self, **data: Any) -> dict[str, Any]:
        out = self.compose(**data)
        out["image"] = self.to_tensor(out["image"])
        if "mask" in out:
            out["mask"] = torch.from_numpy(np.ascontiguousarray(out["mask"]))
        return out

    def __repr__(self) -> str:
        tail = "scale to [0, 1]" if self.mean is None else f"normalize(mean={self.mean}, std={self.std})"
        return f"Pipeline({self.compose!r}, then {tail} as a CHW tensor)"


def build_pipeline(
    specs: list[dict[str, Any]] | None,
    default: list[A.BasicTransform],
    config: DataConfig,
    *,
    normalize: bool = True,
    bbox_params: A.BboxParams | None = None,
) -> Pipeline:
    """``specs`` (or ``default`` when None), then normalisation with the model's mean/std (or, with
    ``normalize=False``, scaling to [0, 1]) and conversion to a CHW float tensor."""
    transforms = default if specs is None else [make_transform(s) for s in specs]
    with warnings.catch_warnings():  # an eval pipeline without spatial transforms still carries the boxes
        warnings.filterwarnings("ignore", message="Got processor for bboxes")
        compose = A.Compose(transforms, bbox_params=bbox_params)
    return Pipeline(compose, config.mean if normalize else None, config.std if normalize else None)


def eval_resize(config: DataConfig) -> list[A.BasicTransform]:
    """timm's eval transform: resize to ``size / crop_pct`` (short side for square inputs), center crop."""
    height, width = config.input_size
    interpolation = config.cv2_interpolation
    if height == width:
        resize = A.SmallestMaxSize(max_size=math.floor(height / config.crop_pct), interpolation=interpolation)
    else:
        scaled = (math.floor(height / config.crop_pct), math.floor(width / config.crop_pct))
        resize = A.Resize(*scaled, interpolation=interpolation)
    return [resize, A.CenterCrop(height, width)]
