"""Static int8 quantization of an exported ONNX model, calibrated on a recipe's validation data.

ONNX Runtime's QDQ quantization (``onnxruntime.quantization.quantize_static``) of the matrix products
(convolutions, matmuls): weights as signed int8 per output channel in 7 bits (``reduce_range``: AVX2's
u8 x s8 products saturate 16-bit sums with 8), activations as unsigned int8 (the pairing x86 CPUs run
fastest; measured in docs/benchmarks.md), their ranges measured on the validation images of the recipe the
model was trained with (its ``data:`` section, normalisation and eval transforms included), after ONNX
Runtime's pre-processing (shape inference and graph optimisation).
:func:`compare_onnx` then runs the int8 file against the float one in onnxruntime: agreement of their top-1
(per image, or per pixel for a segmenter), the largest difference of their outputs, and top-1 against the
labels when the data has them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from visionzoo.allowlist import check_imports, import_policy
from visionzoo.data.base import VisionDataModule

__all__ = ["CALIBRATION_METHODS", "OnnxComparison", "QuantizeError", "compare_onnx", "quantize_onnx", "recipe_data"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# the matrix products: quantizing the element-wise ops too only adds quantize/dequantize pairs on a CPU
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


class QuantizeError(RuntimeError):
    """A quantization that cannot be made (no calibration data, a file that is not ONNX), in one line."""


def recipe_data(recipe: str | Path, root: str | Path | None = None, batch_size: int | None = None) -> VisionDataModule:
    """The data module of a recipe's ``data:`` section (its class path checked against the allow-list),
    its ``root`` and ``batch_size`` replaced when given, the model's name linked as ``visionzoo fit`` links it."""
    from jsonargparse import ArgumentParser

    path = Path(recipe)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise QuantizeError(f"cannot read recipe {path}: {error}") from error
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        raise QuantizeError(f"recipe {path} has no data: section to calibrate on")
    check_imports(config, str(path))
    data = {**config["data"], "init_args": dict(config["data"].get("init_args") or {})}
    if root is not None:
        data["init_args"]["root"] = str(root)
    if batch_size is not None:
        data["init_args"]["batch_size"] = batch_size
    model_name = ((config.get("model") or {}).get("init_args") or {}).get("model_name")
    if model_name is not None:
        data["init_args"].setdefault("model_name", model_name)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(VisionDataModule, "data")
    try:
        with import_policy():
            return parser.instantiate_classes(parser.parse_object({"data": data})).data
    except Exception as error:  # jsonargparse wraps the data module's own errors (a missing root, ...)
        cause = error.__cause__ or error
        raise QuantizeError(f"recipe {path}: the data cannot be built: {str(cause).splitlines()[-1]}") from error


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _labels(batch) -> torch.Tensor | None:
    """A classification batch's labels (``(B,)`` integers), else None."""
    if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        labels = batch[1]
        return labels if labels.ndim == 1 and not labels.is_floating_point() else None
    return None


def quantize_onnx(
    float_path: str | Path,
    int8_path: str | Path,
    calibration: DataLoader,
    batches: int = 16,
    method: str = "minmax",
) -> Path:
    """Write ``float_path`` quantized to int8 (QDQ, per-channel 7-bit s8 weights, u8 activations) as ``int8_path``,
    its activation ranges calibrated with ``method`` on the first ``batches`` batches of ``calibration``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; valid: {', '.join(CALIBRATION_METHODS)}")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = (_images(batch).numpy() for batch in islice(calibration, batches))

        def get_next(self):
            images = next(self.batches, None)
            return None if images is None else {"images": images}

    if next(iter(calibration), None) is None:
        raise QuantizeError("the calibration split is empty")
    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        except Exception as error:  # onnx and onnxruntime raise many kinds on a file that is not a model
            raise QuantizeError(f"{float_path} cannot be prepared for quantization: {error}") from error
        quantize_static(
            str(prepared),
            str(int8_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
        )
    return int8_path


@dataclass(frozen=True)
class OnnxComparison:
    """An int8 model against its float model on the same images."""

    images: int
    agreement: float  # share of equal top-1 (per image, or per pixel for dense outputs)
    max_abs_diff: float
    float_top1: float | None = None  # against the labels, when the data has them
    int8_top1: float | None = None

    def describe(self) -> str:
        text = f"{self.images} images: top-1 agreement {self.agreement:.2%}, max abs diff {self.max_abs_diff:.3g}"
        if self.float_top1 is not None:
            text += f"; top-1 float {self.float_top1:.2%}, int8 {self.int8_top1:.2%}"
        return text


def compare_onnx(float_path: str | Path, int8_path: str | Path, loader: DataLoader, limit: int | None = None):
    """Run both files in onnxruntime (CPU) on the first ``limit`` batches of ``loader`` (all when None)."""
    import onnxruntime

    sessions = [
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (float_path, int8_path)
    ]
    images = agree = positions = 0
    correct = [0, 0]
    labelled = True
    worst = 0.0
    for batch in islice(loader, limit):
        inputs = _images(batch).numpy()
        outputs = [session.run(None, {session.get_inputs()[0].name: inputs})[0] for session in sessions]
        worst = max(worst, float(np.abs(outputs[0] - outputs[1]).max()))
        top1 = [output.argmax(1) for output in outputs]
        agree += int((top1[0] == top1[1]).sum())
        positions += top1[0].size
        images += len(inputs)
        labels = _labels(batch)
        labelled = labelled and labels is not None
        if labelled:
            for i in range(2):
                correct[i] += int((top1[i] == labels.numpy()).sum())
    if images == 0:
        raise QuantizeError("no images to compare the int8 model on")
    accuracy = [c / images for c in correct] if labelled else [None, None]
    return OnnxComparison(images, agree / positions, worst, *accuracy)
