"""ONNX export of classifiers, segmenters and torchvision detectors, checked in onnxruntime against PyTorch.

Classifiers and segmenters go through the torch.export-based exporter (``dynamo=True``, the successor of
the deprecated TorchScript exporter): ``torch.export`` keeps batch, height and width symbolic, so the
padding, window and region arithmetic stays in the graph and one file serves every size in
:func:`dynamic_size_range`. torchvision's detectors branch on how many boxes they hold, which
``torch.export`` cannot trace; they keep the TorchScript exporter, which their code supports for ONNX.
Export runs every kernel op on its ``reference`` backend (exporting forces it too).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.layers import set_layer_config
from torch import nn
from torch.export import Dim

from visionzoo.checkpoints import find_backbone, is_detector, pretrained_cfg_of
from visionzoo.heads import Segmenter
from visionzoo.kernels import use_backend

__all__ = [
    "ExportError",
    "OnnxCheck",
    "check_onnx",
    "default_input_size",
    "dynamic_size_range",
    "export_onnx",
    "export_program",
    "min_input_size",
    "program_to_onnx",
]

OPSET = 18  # the torch.export-based exporter's lowest
DETECTOR_OPSET = 17  # TorchScript exporter
# torch.export specialises sizes 0 and 1: at 33 a stride-32 map is 2 wide
MIN_DYNAMIC_SIZE = 33
MAX_DYNAMIC_SIZE = 2048
MAX_BATCH = 1024
_DIM_NAMES = {0: "batch", 2: "height", 3: "width"}


class ExportError(RuntimeError):
    """An export that cannot be made, in one line naming the model and what failed."""


def default_input_size(model: nn.Module, dynamic: bool = False) -> tuple[int, int]:
    """H x W to export at: the model's ``pretrained_cfg`` (a fit checkpoint's data size), else its backbone's;
    a ``dynamic`` export traces at no less than :func:`dynamic_size_range`'s smallest size."""
    size = tuple(pretrained_cfg_of(model)["input_size"][1:])
    if not dynamic or is_detector(model):
        return size
    return tuple(max(side, low) for side, low in zip(size, dynamic_size_range(model)[0], strict=True))


def min_input_size(model: nn.Module) -> tuple[int, int]:
    """The smallest H x W the model accepts: its backbone's ``min_input_size``, else its ``pretrained_cfg``'s."""
    size = getattr(find_backbone(model), "min_input_size", None)
    return tuple(size or pretrained_cfg_of(model).get("min_input_size", (3, 1, 1))[1:])


def dynamic_size_range(model: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """Smallest and largest (H, W) of a dynamic export: at least ``MIN_DYNAMIC_SIZE`` and what the model needs."""
    low = tuple(max(MIN_DYNAMIC_SIZE, side) for side in min_input_size(model))
    return low, (MAX_DYNAMIC_SIZE, MAX_DYNAMIC_SIZE)


def model_label(model: nn.Module) -> str:
    """The architecture a model was built as (a head's class name over its backbone's), for messages."""
    name = pretrained_cfg_of(model).get("architecture", type(model).__name__)
    return name if hasattr(model, "num_classes") else f"{type(model).__name__} over {name}"


def _one_line(error: BaseException, lines: int = 2, limit: int = 400) -> str:
    """The first ``lines`` non-empty lines of an error, joined and cut to ``limit`` characters."""
    text = " ".join([line.strip() for line in str(error).splitlines() if line.strip()][:lines])
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    unrolls, so a detector graph reads one image), and height and width within
    :func:`dynamic_size_range`; otherwise the graph takes the traced shape only. Raises
    :class:`ExportError` (one line) when the model cannot be traced or translated.
    """
    if not is_detector(model):
        return program_to_onnx(export_program(model, input_size, dynamic), path, model_label(model))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), use_backend("reference"), set_layer_config(exportable=True):
        _export_detector(model.eval(), path, input_size, dynamic)
    return path


def export_program(
    model: nn.Module, input_size: tuple[int, int] = (224, 224), dynamic: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` of a classifier or a segmenter (its main logits) in eval mode, every kernel op on its
    ``reference`` backend, traced inline; ``dynamic`` frees batch, height and width within
    :func:`dynamic_size_range`. Raises :class:`ExportError` (one line) when it cannot be traced."""
    label = model_label(model)
    (min_h, min_w), (max_h, max_w) = dynamic_size_range(model)
    if dynamic and not (min_h <= input_size[0] <= max_h and min_w <= input_size[1] <= max_w):
        raise ExportError(
            f"cannot export {label} with dynamic height and width at {input_size[0]}x{input_size[1]}: "
            f"the export size must lie within {min_h}x{min_w} to {max_h}x{max_w}"
        )
    images = torch.randn(2, getattr(find_backbone(model), "in_chans", 3), *input_size)  # batch 1: specialised
    model = _MainOutput(model) if isinstance(model, Segmenter) else model
    dims = {
        0: Dim("batch", min=1, max=MAX_BATCH),
        2: Dim("height", min=min_h, max=max_h),
        3: Dim("width", min=min_w, max=max_w),
    }
    kind = "dynamic batch, height and width" if dynamic else f"the static shape {tuple(images.shape)}"
    with torch.no_grad(), use_backend("reference"), set_layer_config(exportable=True):
        try:
            return torch.export.export(model.eval(), (images,), dynamic_shapes=(dims,) if dynamic else None)
        except Exception as error:  # torch.export raises many kinds (guards, constraints, data-dependent sizes)
            raise ExportError(f"torch.export cannot trace {label} with {kind}: {_one_line(error)}") from error


def program_to_onnx(program: torch.export.ExportedProgram, path: str | Path, label: str = "the model") -> Path:
    """Write an :func:`export_program` as ONNX (``images`` to ``outputs``), its symbolic input dims named
    ``batch``, ``height`` and ``width``. Raises :class:`ExportError` (one line, naming ``label``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (images,) = (
        node
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    )
    free = {axis: name for axis, name in _DIM_NAMES.items() if isinstance(images.meta["val"].shape[axis], torch.SymInt)}
    try:
        torch.onnx.export(
            program,
            f=str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["outputs"],
            dynamic_shapes=(free,) if free else None,  # names the dims
            external_data=False,
            verbose=False,
        )
    except torch.onnx.errors.OnnxExporterError as error:
        raise ExportError(f"the ONNX exporter cannot translate {label}: {_one_line(error)}") from error
    return path


def _export_detector(model: nn.Module, path: Path, input_size: tuple[int, int], dynamic: bool) -> None:
    """A torchvision detector through the TorchScript exporter, which traces one ``(C, H, W)`` image."""
    image = torch.rand(getattr(find_backbone(model), "in_chans", 3), *input_size)
    output_names = list(_run(model, image))
    axes = {name: {0: "detections"} for name in output_names}
    if dynamic:
        axes["image"] = {1: "height", 2: "width"}
        if "masks" in axes:
            axes["masks"].update({2: "height", 3: "width"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\.detection")  # tracing
        torch.onnx.export(
            model,
            ([image],),
            str(path),
            dynamo=False,
            opset_version=DETECTOR_OPSET,
            input_names=["image"],
            output_names=output_names,
            dynamic_axes=axes,
        )


@dataclass(frozen=True)
class OnnxCheck:
    input_shape: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    detections: int | None = None  # detectors: how many PyTorch found (0 makes the check say little)
    error: str | None = None  # onnxruntime's one-line error when the graph failed at this shape

    @property
    def ok(self) -> bool:
        return self.error is None and self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        """``HxW`` (with the batch) and what the check found, in one line."""
        shape = "x".join(map(str, self.input_shape[-2:]))
        where = shape if len(self.input_shape) == 3 else f"{shape} (batch {self.input_shape[0]})"
        if self.error is not None:
            return f"{where}: onnxruntime failed: {self.error}"
        found = "" if self.detections is None else f", {self.detections} detections"
        return f"{where}: max abs diff {self.max_abs_diff:.3g}{found}"


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
    batch: int | Sequence[int] = 2,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> list[OnnxCheck]:
    """``onnx.checker`` on the file, then onnxruntime (CPU) against PyTorch (reference kernels) at each size,
    with ``batch`` images (one batch for every size, or one per size); detectors: one image of the size,
    box coordinates in units of the image's longer side. onnxruntime failing at a shape is a failed check."""
    import onnx
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort

    failed_run = (ort.Fail, ort.InvalidArgument, ort.RuntimeException)
    unloadable = (onnx.checker.ValidationError, OSError, ort.InvalidProtobuf, ort.InvalidGraph, ort.NotImplemented)
    try:
        onnx.checker.check_model(str(path))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except (*unloadable, *failed_run) as error:
        raise ExportError(f"{path} does not load as an ONNX model: {_one_line(error, lines=1)}") from error
    generator = torch.Generator().manual_seed(seed)
    in_chans = getattr(find_backbone(model), "in_chans", 3)
    names = [output.name for output in session.get_outputs()]
    batches = [batch] * len(input_sizes) if isinstance(batch, int) else batch
    results = []
    for (height, width), images_per_check in zip(input_sizes, batches, strict=True):
        detector = is_detector(model)
        shape = (in_chans, height, width) if detector else (images_per_check, in_chans, height, width)
        images = torch.rand(shape, generator=generator) if detector else torch.randn(shape, generator=generator)
        try:
            outputs = session.run(None, {session.get_inputs()[0].name: images.numpy()})
        except failed_run as error:
            results.append(OnnxCheck(shape, float("inf"), tolerance, error=_one_line(error, lines=1)))
            continue
        expected = _run(model, images)
        if detector:
            got = dict(zip(names, (torch.from_numpy(a) for a in outputs)))
            diff = _detections_diff(expected, got, max(height, width))
            results.append(OnnxCheck(shape, diff, tolerance, len(expected["boxes"])))
        else:
            got = torch.from_numpy(outputs[0])
            diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
            results.append(OnnxCheck(shape, diff, tolerance))
    return results
