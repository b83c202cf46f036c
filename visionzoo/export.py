"""ONNX export of classifiers, segmenters and torchvision detectors, checked in onnxruntime against PyTorch.

The legacy TorchScript-based exporter (``dynamo=False``) is used: it records the shape
arithmetic of the padding and window partitions, so one graph serves every batch size and
H x W (DESIGN.md's platform facts: the dynamo exporter did not finish with dynamic H x W).
Models with TransNeXt's aggregated attention export with a dynamic batch and a fixed H x W.
Export runs every kernel op on its ``reference`` backend (tracing forces it too).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.layers import set_layer_config
from torch import nn

from visionzoo.checkpoints import find_backbone, is_detector, pretrained_cfg_of
from visionzoo.heads import Segmenter
from visionzoo.kernels import use_backend

__all__ = ["OnnxCheck", "check_onnx", "default_input_size", "export_onnx", "fixed_size_reasons"]

OPSET = 17


def default_input_size(model: nn.Module) -> tuple[int, int]:
    """H x W to export at: the model's ``pretrained_cfg`` (a fit checkpoint's data size), else its backbone's."""
    return tuple(pretrained_cfg_of(model)["input_size"][1:])


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
    in_chans = getattr(find_backbone(model), "in_chans", 3)
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
    in_chans = getattr(find_backbone(model), "in_chans", 3)
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
