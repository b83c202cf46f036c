"""Explain a classifier's prediction on one image.

Two pictures, both drawn over the image at its own size:

- :func:`explain` draws Grad-CAM (the ``grad-cam`` package) of a class at the last
  feature map: the final norm of a MixViT (channels-last, turned to ``(B, C, H, W)`` for
  grad-cam), the last ``feature_info`` module of any other timm model (e.g. a ResNet's
  ``layer4``).
- :func:`explain_attention` draws which tokens one query attends to in one block, for the
  mixers that explain themselves (``query_attention``, see :class:`~visionzoo.mixers.TokenMixer`).
  The mixer recomputes the weights from the block's input with the kernels' reference math
  (scale, relative position bias, neighbourhood windows, routed regions), not read out of a
  fast kernel.

Images are preprocessed as the model's ``pretrained_cfg`` says (interpolation, mean, std),
squashed to the input size without a crop, so that the maps cover the whole image.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from visionzoo.mixers import TokenMixer, get_mixer_class, list_mixers

__all__ = [
    "AttentionExplanation",
    "CamExplanation",
    "attention_blocks",
    "block_mixers",
    "cam_target_layer",
    "explain",
    "explain_attention",
    "grad_cam",
    "load_image",
    "preprocess",
    "query_weights",
]


@dataclass(frozen=True)
class CamExplanation:
    """Grad-CAM of ``class_index``: ``cam`` in [0, 1] at the image's ``(H, W)``."""

    class_index: int
    predicted: int
    probability: float
    layer: str
    cam: np.ndarray
    path: Path


@dataclass(frozen=True)
class AttentionExplanation:
    """Attention of the query token ``query`` in ``block``: ``weights`` ``(heads, h, w)`` over the block's map
    (each head sums to 1 up to padding), ``image_map`` their head mean at the image's ``(H, W)``."""

    block: str
    query: tuple[int, int]
    predicted: int
    probability: float
    weights: torch.Tensor
    image_map: np.ndarray
    path: Path


def _model_name(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _check_classifier(model: nn.Module) -> None:
    """A timm classifier: ``get_classifier`` and ``num_classes > 0`` (not a detector, a segmenter, or a
    backbone built with ``num_classes=0``)."""
    num_classes = getattr(model, "num_classes", None)
    if not callable(getattr(model, "get_classifier", None)) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"{_model_name(model)} ({type(model).__name__}, num_classes={num_classes}) is not a classifier: "
            "explain draws the evidence for a class of a classification model"
        )


def load_image(path: str | Path, in_chans: int = 3) -> Image.Image:
    """The image at ``path`` in RGB (grayscale for one-channel models)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        with Image.open(path) as image:
            return image.convert("L" if in_chans == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from error


def preprocess(model: nn.Module, image: Image.Image, img_size: tuple[int, int] | None = None) -> torch.Tensor:
    """``(1, C, H, W)`` input: the image resized (not cropped) to the model's or the given input size and
    normalised with the model's ``pretrained_cfg`` mean and std."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(model=model)
    if img_size is not None:
        config["input_size"] = (config["input_size"][0], *img_size)
    config.update(crop_pct=1.0, crop_mode="squash")
    return create_transform(**config, is_training=False)(image)[None]


def _overlay(image: Image.Image, heat: np.ndarray) -> np.ndarray:
    """``heat`` ``(H, W)`` in [0, 1] as a colour map over the image: RGB uint8."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0, heat, use_rgb=True)


def _save_png(picture: np.ndarray, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(out, format="PNG")
    return out


def block_mixers(model: nn.Module) -> dict[str, TokenMixer]:
    """The token mixers of a MixViT-layout model (``stages.S.blocks.I.mixer``) by ``S.I``, in model order."""
    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, TokenMixer) and len(parts) == 5 and parts[::2] == ["stages", "blocks", "mixer"]:
            found[f"{parts[1]}.{parts[3]}"] = module
    return found


def cam_target_layer(model: nn.Module) -> tuple[str, nn.Module, bool]:
    """The layer Grad-CAM reads, its name, and whether its output is channels-last.

    A MixViT's final norm (the features the head pools, channels-last); else the last
    ``feature_info`` module, channels-last where the model says ``output_fmt="NHWC"``
    (a MixViT without a final norm: its last stage).
    """
    norm = getattr(model, "norm", None)
    if block_mixers(model) and isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
        return "norm", norm, True
    info = getattr(model, "feature_info", None)
    if not (isinstance(info, list) and info and "module" in info[-1]):
        raise ValueError(f"{_model_name(model)} declares no feature_info: cannot pick a layer for Grad-CAM")
    name = info[-1]["module"]
    return name, model.get_submodule(name), getattr(model, "output_fmt", "NCHW") == "NHWC"


def _to_nchw(name: str, channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def reshape(t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 4:
            raise ValueError(f"Grad-CAM needs a spatial map (B, C, H, W) at {name}, got {tuple(t.shape)}")
        return t.permute(0, 3, 1, 2) if channels_last else t

    return reshape


def grad_cam(
    model: nn.Module, images: torch.Tensor, class_index: int | None = None
) -> tuple[np.ndarray, torch.Tensor, str]:
    """Grad-CAM of one image ``(1, C, H, W)``.

    Args:
        model: a timm classifier.
        images: one preprocessed image.
        class_index: the class to explain; None: the predicted class.

    Returns:
        The CAM ``(H, W)`` in [0, 1] at the input's size, the logits ``(1, classes)``, and the layer's name.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    _check_classifier(model)
    if class_index is not None and not 0 <= class_index < model.num_classes:
        raise ValueError(f"class index {class_index} is outside the model's {model.num_classes} classes")
    name, layer, channels_last = cam_target_layer(model)
    cam = GradCAM(model=model, target_layers=[layer], reshape_transform=_to_nchw(name, channels_last))
    try:
        targets = None if class_index is None else [ClassifierOutputTarget(class_index)]
        # an input that needs grad: gradients reach the layer even in a model with frozen weights
        heat = cam(input_tensor=images.detach().requires_grad_(True), targets=targets)[0]
        logits = cam.outputs.detach()
        map_size = tuple(cam.activations_and_grads.activations[0].shape[-2:])
    finally:
        cam.activations_and_grads.release()
    if logits.ndim != 2:
        raise ValueError(f"{_model_name(model)} returns {tuple(logits.shape)}, not class logits (B, classes)")
    if min(map_size) < 2:
        warnings.warn(
            f"{name} is {map_size[0]}x{map_size[1]} at input {images.shape[2]}x{images.shape[3]}: Grad-CAM cannot "
            "localise anything on it; give a larger input size",
            stacklevel=2,
        )
    return heat, logits, name


def _prediction(logits: torch.Tensor) -> tuple[int, float]:
    probabilities = logits.float().softmax(-1)[0]
    predicted = int(probabilities.argmax())
    return predicted, float(probabilities[predicted])


def explain(
    model: nn.Module,
    image: str | Path,
    out: str | Path,
    class_index: int | None = None,
    img_size: tuple[int, int] | None = None,
) -> CamExplanation:
    """Draw Grad-CAM of ``class_index`` (default: the predicted class) over ``image`` into the PNG ``out``."""
    import cv2

    _check_classifier(model)
    picture = load_image(image, getattr(model, "in_chans", 3))
    heat, logits, layer = grad_cam(model.eval(), preprocess(model, picture, img_size), class_index)
    heat = cv2.resize(heat, picture.size, interpolation=cv2.INTER_LINEAR).clip(0, 1)
    predicted, probability = _prediction(logits)
    path = _save_png(_overlay(picture, heat), out)
    return CamExplanation(predicted if class_index is None else class_index, predicted, probability, layer, heat, path)


def _has_attention_map(mixer: nn.Module | type) -> bool:
    return callable(getattr(mixer, "query_attention", None))


def _mixers_with_maps() -> str:
    return ", ".join(name for name in list_mixers() if _has_attention_map(get_mixer_class(name)))


@torch.no_grad()
def query_weights(mixer: nn.Module, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
    """Attention weights ``(heads, H, W)`` of the token ``query`` (row, col) of the mixer's input ``x``
    ``(1, H, W, C)``, from the mixer's ``query_attention``; each head sums to 1 over the map (less what falls
    on padding, for NA on maps smaller than its window)."""
    if not _has_attention_map(mixer):
        raise ValueError(f"no attention map for {type(mixer).__name__}; mixers with one: {_mixers_with_maps()}")
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"query_weights takes one channels-last map (1, H, W, C), got {tuple(x.shape)}")
    row, col = query
    if not (0 <= row < x.shape[1] and 0 <= col < x.shape[2]):
        raise ValueError(f"query token {tuple(query)} lies outside the {x.shape[1]}x{x.shape[2]} map")
    return mixer.query_attention(x, (row, col))


def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Mixers with an attention map, by ``stage.block`` (``stages.S.blocks.I.mixer``), in model order."""
    return {key: mixer for key, mixer in block_mixers(model).items() if _has_attention_map(mixer)}


def _pick_block(model: nn.Module, block: str | None) -> tuple[str, nn.Module]:
    blocks = attention_blocks(model)
    if not blocks:
        raise ValueError(
            f"{_model_name(model)} has no block with an attention map (mixers with one: {_mixers_with_maps()})"
        )
    if block is None:  # the last block of the first stage that has one
        first_stage = next(iter(blocks)).split(".")[0]
        return [(key, mixer) for key, mixer in blocks.items() if key.split(".")[0] == first_stage][-1]
    if block not in blocks:
        raise ValueError(f"block {block!r} has no attention map; blocks with one: {', '.join(blocks)}")
    return block, blocks[block]


def _check_query(query: tuple[int, int], image_size: tuple[int, int]) -> None:
    if len(query) != 2 or not all(0 <= p < s for p, s in zip(query, image_size)):
        raise ValueError(
            f"query {tuple(query)} lies outside the {image_size[0]}x{image_size[1]} image (give Y X in its pixels)"
        )


def _query_token(query: tuple[int, int], image_size: tuple[int, int], map_size: tuple[int, int]) -> tuple[int, int]:
    """Pixel (y, x) of the image to the token (row, col) of a map that covers it."""
    return query[0] * map_size[0] // image_size[0], query[1] * map_size[1] // image_size[1]


def explain_attention(
    model: nn.Module,
    image: str | Path,
    out: str | Path,
    query: tuple[int, int] | None = None,
    block: str | None = None,
    img_size: tuple[int, int] | None = None,
) -> AttentionExplanation:
    """Draw which positions the query pixel ``query`` (y, x; default the centre) attends to in ``block``.

    Args:
        model: a MixViT-layout model (``stages.S.blocks.I.mixer``).
        image: the image file.
        out: the PNG to write, at the image's size.
        query: pixel of the image whose token is the query.
        block: ``"S.I"``, stage and block index; default the last block of the first stage with an
            attention map.
        img_size: model input ``(H, W)``; default the model's.
    """
    import cv2

    _check_classifier(model)
    name, mixer = _pick_block(model, block)
    picture = load_image(image, getattr(model, "in_chans", 3))
    height, width = picture.height, picture.width
    query = (height // 2, width // 2) if query is None else tuple(int(v) for v in query)
    _check_query(query, (height, width))
    captured = []
    handle = mixer.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            logits = model.eval()(preprocess(model, picture, img_size))
    finally:
        handle.remove()
    tokens = captured[0]
    token = _query_token(query, (height, width), tuple(tokens.shape[1:3]))
    weights = query_weights(mixer, tokens, token)
    mean = weights.mean(0)
    shown = cv2.resize((mean / mean.max()).numpy(), (width, height), interpolation=cv2.INTER_NEAREST)
    drawn = _overlay(picture, shown)
    marker = max(5, min(height, width) // 12)
    cv2.drawMarker(drawn, (query[1], query[0]), (255, 255, 255), cv2.MARKER_CROSS, marker, 2)  # the query
    path = _save_png(drawn, out)
    predicted, probability = _prediction(logits)
    return AttentionExplanation(name, token, predicted, probability, weights, shown, path)
