"""ONNX export of any timm classifier, checked in onnxruntime against PyTorch.

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

import timm
import torch
from timm.layers import set_layer_config
from torch import nn

from visionzoo.kernels import use_backend

__all__ = ["OnnxCheck", "check_onnx", "export_onnx", "fixed_size_reasons", "load_checkpoint", "load_model"]

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


def _read(path: str | Path) -> Mapping:
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
    return _unwrap(_read(path))


def load_model(name: str | None, checkpoint: str | Path | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name)`` in eval mode, with the weights of ``checkpoint`` when given.

    A ``visionzoo fit`` checkpoint rebuilds its own model: ``name`` may be None, and the task's
    ``model_kwargs`` and ``num_classes`` apply (the data's ``image_size`` becomes the model's
    ``pretrained_cfg["input_size"]``). Otherwise the classifier is resized to the checkpoint's number
    of classes; any other mismatch (a checkpoint of another model) is an error that lists the keys.
    """
    if checkpoint is None:
        if name is None:
            raise ValueError("give a model name or a checkpoint written by visionzoo fit")
        return timm.create_model(name, **kwargs).eval()
    raw = _read(checkpoint)
    hparams = raw.get("hyper_parameters") if isinstance(raw.get("hyper_parameters"), Mapping) else {}
    trained_name = hparams.get("model_name")
    if name is None and trained_name is None:
        raise ValueError(f"{checkpoint} names no model (not written by visionzoo fit): give the model name")
    name = name or trained_name
    if name == trained_name:
        kwargs = {**(hparams.get("model_kwargs") or {}), "num_classes": hparams["num_classes"], **kwargs}
    state = _unwrap(raw)
    model = timm.create_model(name, **kwargs)
    classifier = model.pretrained_cfg.get("classifier")
    weight = state.get(f"{classifier}.weight") if classifier else None
    if weight is not None and weight.ndim == 2 and weight.shape[0] != model.num_classes:
        model.reset_classifier(weight.shape[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit {name}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    image_size = (raw.get("datamodule_hyper_parameters") or {}).get("image_size")
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        model.pretrained_cfg = {
            **model.pretrained_cfg,
            "input_size": (model.pretrained_cfg["input_size"][0], height, width),
        }
    return model.eval()


def fixed_size_reasons(model: nn.Module) -> list[str]:
    """Mixers that fix H and W in an ONNX graph (``onnx_dynamic_size = False``), by class name."""
    return sorted({type(m).__name__ for m in model.modules() if getattr(m, "onnx_dynamic_size", True) is False})


def export_onnx(
    model: nn.Module, path: str | Path, input_size: tuple[int, int] = (224, 224), dynamic: bool = True
) -> Path:
    """Write ``model`` (images ``(B, C, H, W)`` to outputs) as ONNX.

    ``dynamic`` frees the batch, and height and width unless a mixer fixes them
    (:func:`fixed_size_reasons`: TransNeXt's aggregated attention computes its pooled size and
    position tables in Python from the input size).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    in_chans = getattr(model, "in_chans", 3)
    images = torch.randn(2, in_chans, *input_size)  # batch 1 would let the tracer bake in broadcasts
    axes = None
    if dynamic:
        axes = {"images": {0: "batch"}, "outputs": {0: "batch"}}
        if not fixed_size_reasons(model):
            axes["images"].update({2: "height", 3: "width"})
    model = model.eval()
    with torch.no_grad(), use_backend("reference"), set_layer_config(exportable=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model,
            (images,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["outputs"],
            dynamic_axes=axes,
        )
    return path


@dataclass(frozen=True)
class OnnxCheck:
    input_shape: tuple[int, ...]
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def check_onnx(
    model: nn.Module,
    path: str | Path,
    input_sizes: Sequence[tuple[int, int]],
    batch: int = 2,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> list[OnnxCheck]:
    """``onnx.checker`` on the file, then onnxruntime (CPU) against PyTorch (reference kernels) at each size."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    in_chans = getattr(model, "in_chans", 3)
    results = []
    for height, width in input_sizes:
        images = torch.randn(batch, in_chans, height, width, generator=generator)
        with torch.no_grad(), use_backend("reference"):
            expected = model.eval()(images)
        (got,) = session.run(None, {"images": images.numpy()})
        diff = (torch.from_numpy(got) - expected).abs().max().item() if got.shape == expected.shape else float("inf")
        results.append(OnnxCheck(tuple(images.shape), diff, tolerance))
    return results
