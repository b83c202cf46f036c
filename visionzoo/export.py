"""ONNX export of classifiers, segmenters and torchvision detectors, checked in onnxruntime against PyTorch.

The legacy TorchScript-based exporter (``dynamo=False``) is used: it records the shape
arithmetic of the padding and window partitions, so one graph serves every batch size and
H x W (DESIGN.md's platform facts: the dynamo exporter did not finish with dynamic H x W).
Models with TransNeXt's aggregated attention export with a dynamic batch and a fixed H x W.
Export runs every kernel op on its ``reference`` backend (tracing forces it too).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
from timm.layers import set_layer_config
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from visionzoo.heads import Segmenter
from visionzoo.kernels import use_backend

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

__all__ = [
    "OnnxCheck",
    "check_onnx",
    "default_input_size",
    "export_onnx",
    "fixed_size_reasons",
    "is_detector",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
]

OPSET = 17


def _unwrap(state: Mapping) -> dict[str, torch.Tensor]:
    """A state dict out of a Lightning checkpoint (``state_dict``; the task's ``ema.module.*`` weights when the
    run kept an EMA, else ``model.*``) or a ``model``/``state_dict`` container; plain state dicts pass through."""
    for container in ("state_dict", "model"):
        if container in state and isinstance(state[container], Mapping):
            state = state[container]
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("ema.module.", "model."):
        if any(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state


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


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (read with ``weights_only=True``: no pickled code)."""
    return _unwrap(read_checkpoint(path))


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
    class_name = str(hparams.get("_class_path", guess or "ClassificationTask")).rpartition(".")[2]
    if class_name not in tasks.__all__:
        raise ValueError(f"task {hparams['_class_path']!r} is not a visionzoo task")
    task = getattr(tasks, class_name)
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # Lightning's own entries
    hparams = {**hparams, **({"pretrained": False} if "pretrained" in hparams else {})}
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
        state = _unwrap(raw)
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
    missing, unexpected = task.load_state_dict(raw["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the {type(task).__name__} its hyper-parameters describe: "
            + _key_report(missing, unexpected)
        )
    model = task.eval_model
    cfg = getattr(model, "pretrained_cfg", None) or _backbone(model).pretrained_cfg
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


def _backbone(model: nn.Module) -> nn.Module:
    """The timm model inside a classifier (itself), a segmenter or a detector."""
    if is_detector(model):
        return model.backbone.body
    return getattr(model, "backbone", model)


def default_input_size(model: nn.Module) -> tuple[int, int]:
    """H x W to export at: the model's ``pretrained_cfg`` (a fit checkpoint's data size), else its backbone's."""
    cfg = getattr(model, "pretrained_cfg", None) or _backbone(model).pretrained_cfg
    return tuple(cfg["input_size"][1:])


def fixed_size_reasons(model: nn.Module) -> list[str]:
    """Mixers that fix H and W in an ONNX graph (``onnx_dynamic_size = False``), by class name."""
    return sorted({type(m).__name__ for m in model.modules() if getattr(m, "onnx_dynamic_size", True) is False})


class _MainOutput(nn.Module):
    """A segmenter's ``"out"`` logits alone (the auxiliary head only serves training)."""

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter(images)["out"]


def _run(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
    """PyTorch's answer as the ONNX graph gives it: logits, a segmenter's ``"out"``, or one image's detections."""
    with torch.no_grad(), use_backend("reference"):
        if is_detector(model):
            return model.eval()([images])[0]
        outputs = model.eval()(images)
    return outputs["out"] if isinstance(outputs, Mapping) else outputs


def export_onnx(
    model: nn.Module, path: str | Path, input_size: tuple[int, int] = (224, 224), dynamic: bool = True
) -> Path:
    """Write ``model`` as ONNX: a classifier (``images`` to ``outputs``), a segmenter (``images`` to the
    ``outputs`` logits at the input's size), or a torchvision detector (one ``image`` ``(3, H, W)`` in [0, 1]
    to its detections: ``boxes``, ``scores``, ``labels`` and, for Mask R-CNN, ``masks``; the number of
    detections is always free).

    ``dynamic`` frees the batch (not for detectors: torchvision's take a list of images, which the graph
    unrolls, so a detector graph reads one image), and height and width unless a mixer fixes them
    (:func:`fixed_size_reasons`: TransNeXt's aggregated attention computes its pooled size and
    position tables in Python from the input size).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    in_chans = getattr(_backbone(model), "in_chans", 3)
    free_size = dynamic and not fixed_size_reasons(model)
    if is_detector(model):
        image = torch.rand(in_chans, *input_size)
        args, input_names = ([image],), ["image"]
        output_names = list(_run(model, image))
        axes = {name: {0: "detections"} for name in output_names}
        if free_size:
            axes["image"] = {1: "height", 2: "width"}
            if "masks" in axes:
                axes["masks"].update({2: "height", 3: "width"})
    else:
        if isinstance(model, Segmenter):
            model = _MainOutput(model)
        images = torch.randn(2, in_chans, *input_size)  # batch 1 would let the tracer bake in broadcasts
        args, input_names, output_names = (images,), ["images"], ["outputs"]
        axes = {"images": {0: "batch"}, "outputs": {0: "batch"}} if dynamic else {}
        if free_size:
            axes["images"].update({2: "height", 3: "width"})
            if isinstance(model, _MainOutput):
                axes["outputs"].update({2: "height", 3: "width"})
    with torch.no_grad(), use_backend("reference"), set_layer_config(exportable=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\.detection")  # tracing
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes or None,
        )
    return path


@dataclass(frozen=True)
class OnnxCheck:
    input_shape: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    detections: int | None = None  # detectors: how many PyTorch found (0 makes the check say little)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def _detections_diff(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], extent: int) -> float:
    """Largest difference between two sets of detections, each paired with its closest match (detections
    of equal score may come out in either order); boxes count in units of the image's longer side ``extent``."""
    if any(got[k].shape != v.shape for k, v in expected.items()):
        return float("inf")
    if len(expected["boxes"]) == 0:
        return 0.0
    distance = torch.cdist(expected["boxes"].double(), got["boxes"].double(), p=float("inf")) / extent
    distance = distance.maximum((expected["scores"][:, None] - got["scores"][None]).abs().double())
    distance[expected["labels"][:, None] != got["labels"][None]] = float("inf")
    closest, match = distance.min(dim=1)
    worst = closest.max().item()
    if "masks" in expected:
        worst = max(worst, (expected["masks"] - got["masks"][match]).abs().max().item())
    return worst


def check_onnx(
    model: nn.Module,
    path: str | Path,
    input_sizes: Sequence[tuple[int, int]],
    batch: int = 2,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> list[OnnxCheck]:
    """``onnx.checker`` on the file, then onnxruntime (CPU) against PyTorch (reference kernels) at each size
    (detectors: one image of the size; box coordinates count in units of the image's longer side)."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    in_chans = getattr(_backbone(model), "in_chans", 3)
    names = [output.name for output in session.get_outputs()]
    results = []
    for height, width in input_sizes:
        if is_detector(model):
            images = torch.rand(in_chans, height, width, generator=generator)
            got = dict(zip(names, (torch.from_numpy(a) for a in session.run(None, {"image": images.numpy()}))))
            expected = _run(model, images)
            diff = _detections_diff(expected, got, max(height, width))
            results.append(OnnxCheck(tuple(images.shape), diff, tolerance, len(expected["boxes"])))
        else:
            images = torch.randn(batch, in_chans, height, width, generator=generator)
            expected = _run(model, images)
            got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
            diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
            results.append(OnnxCheck(tuple(images.shape), diff, tolerance))
    return results
