"""Model benchmarks: latency, throughput, training step and peak memory of any timm model, tables and charts.

Ours run their default kernel backends; GMACs count the reference ones (:func:`visionzoo.stats.count_gmacs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

import timm
import torch

from visionzoo.backbones.papers import paper_figures
from visionzoo.stats import count_aten_ops, count_gmacs, count_params

from .timing import module_runner, peak_memory_mib, time_call, write_dataclass_csv

__all__ = [
    "ModelTiming",
    "bench_model",
    "format_model_timings",
    "model_peak_memory_mib",
    "plot_model_timings",
    "write_model_csv",
]


@dataclass(frozen=True)
class ModelTiming:
    """Inference and training figures of one model; ``ratios`` are against the baseline model of the run."""

    model: str
    device: str
    mode: str  # "eager", or how it was compiled: "compiled", "compiled max-autotune"
    channels_last: bool
    input_size: tuple[int, int]
    batch: int
    params: int
    gmacs: float
    latency_ms: float  # batch 1, median
    latency_iqr_ms: float
    infer_img_s: float  # at ``batch``
    train_img_s: float | None  # one forward+backward at ``batch``
    infer_peak_mib: float | None
    train_peak_mib: float | None
    aten_ops: int | None = None  # dispatched by one forward at batch 1


def model_peak_memory_mib(
    name: str, input_size: tuple[int, int], batch: int = 1, backward: bool = False, device: str = "cpu"
) -> float | None:
    """Peak memory (see :func:`visionzoo.bench.timing.peak_memory_mib`) of one inference, or one training
    forward+backward, of model ``name`` on ``batch`` images of ``input_size``, after a warm-up call."""
    dev = torch.device(device)
    model = timm.create_model(name).to(dev)
    run = module_runner(model, torch.randn(batch, 3, *input_size, device=dev), backward)
    run()
    return peak_memory_mib(run, dev)


def bench_model(
    name: str,
    device: str = "cpu",
    input_size: tuple[int, int] | None = None,
    batch: int = 32,
    train: bool = True,
    min_run_time: float = 1.0,
    autocast: torch.dtype | None = None,
    compile_mode: str | None = None,
    channels_last: bool = False,
) -> ModelTiming:
    """Latency at batch 1, inference and training throughput at ``batch``, peak memory, params and GMACs.

    Any timm model works (ours run their default kernel backends; GMACs use the reference ones).
    ``autocast`` (``torch.float16``/``bfloat16``) runs the timed calls under mixed precision.
    ``compile_mode`` (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``) times the model under
    ``torch.compile(fullgraph=True)`` with that mode (the warm-up call compiles, outside the timing);
    ``channels_last`` converts the model and inputs to channels-last memory format.
    """
    dev = torch.device(device)
    model = timm.create_model(name).to(dev).eval()
    size = tuple(input_size or model.pretrained_cfg["input_size"][1:])
    gmacs, ops = count_gmacs(model, size), count_aten_ops(model, size)
    params = count_params(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    one, many = (torch.randn(n, 3, *size, device=dev).to(memory_format=memory_format) for n in (1, batch))
    model = model.to(memory_format=memory_format)
    if compile_mode is not None:
        torch._dynamo.reset()  # models share code objects (blocks, stages): each compiles afresh, within dynamo's limit
    run = model if compile_mode is None else torch.compile(model, mode=compile_mode, fullgraph=True, dynamic=False)

    def timed(x: torch.Tensor, backward: bool) -> tuple[float, float, float | None]:
        return time_call(module_runner(run, x, backward, autocast), dev, min_run_time)

    latency, latency_iqr, _ = timed(one, backward=False)
    infer_ms, _, infer_peak = timed(many, backward=False)
    train_img_s = train_peak = None
    if train:
        train_ms, _, train_peak = timed(many, backward=True)
        train_img_s = batch / train_ms * 1e3
    device_name = str(dev) if autocast is None else f"{dev}, {str(autocast).removeprefix('torch.')} autocast"
    mode = "eager" if compile_mode is None else "compiled" + ("" if compile_mode == "default" else f" {compile_mode}")
    return ModelTiming(
        name, device_name, mode, channels_last, size, batch, params, gmacs,
        latency, latency_iqr, batch / infer_ms * 1e3, train_img_s, infer_peak, train_peak, ops,
    )  # fmt: skip


def _baseline_row(row: ModelTiming, rows: list[ModelTiming], baseline: str | None) -> ModelTiming | None:
    """``baseline``'s row in ``row``'s mode; without a baseline, a compiled row's own model run eagerly."""
    if baseline is not None:
        return next(
            (r for r in rows if (r.model, r.mode, r.channels_last) == (baseline, row.mode, row.channels_last)), None
        )
    if row.mode == "eager":
        return None
    return next(
        (r for r in rows if (r.model, r.mode, r.channels_last) == (row.model, "eager", row.channels_last)), None
    )


def _cell(row: ModelTiming, base: ModelTiming | None, field: str, fmt: str, faster_when_lower: bool = False) -> str:
    """``row``'s figure, with its ratio to ``base``'s when there is one."""
    value, reference = getattr(row, field), None if base is None else getattr(base, field)
    if value is None:
        return "-"
    text = format(value, fmt)
    if reference in (None, 0) or value == 0:
        return text
    ratio = reference / value if faster_when_lower else value / reference
    return f"{text} ({ratio:.2f}x)"


def format_model_timings(rows: list[ModelTiming], baseline: str | None = None) -> str:
    """Markdown table; each figure carries its ratio to the row's baseline: ``baseline``'s row in the same
    mode (a model in ``rows``), or else, for a compiled row, the same model run eagerly. Speed ratios above 1
    are faster than the baseline, memory and op-count ratios are this model's over the baseline's."""
    lines = [
        "| model | device | mode | input | batch | params | GMACs | latency bs1 ms | infer img/s | train img/s "
        "| infer peak MiB | train peak MiB | aten ops |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        b = _baseline_row(r, rows, baseline)
        lines.append(
            f"| {r.model} | {r.device} | {r.mode}{', channels-last' if r.channels_last else ''} "
            f"| {r.input_size[0]}x{r.input_size[1]} | {r.batch} | {r.params / 1e6:.2f}M | {r.gmacs:.2f} "
            f"| {_cell(r, b, 'latency_ms', '.1f', faster_when_lower=True)} | {_cell(r, b, 'infer_img_s', '.1f')} "
            f"| {_cell(r, b, 'train_img_s', '.1f')} | {_cell(r, b, 'infer_peak_mib', '.0f')} "
            f"| {_cell(r, b, 'train_peak_mib', '.0f')} | {_cell(r, b, 'aten_ops', 'd')} |"
        )
    return "\n".join(lines)


def plot_model_timings(rows: list[ModelTiming], path: str, against: str = "gmacs") -> list[str]:
    """PNG chart of inference throughput against GMACs or the paper's ImageNet top-1 (``against="top1"``:
    models without a published top-1 in :func:`visionzoo.backbones.papers.paper_figures` are left out), one
    labelled point per model. Returns the models left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if against not in ("gmacs", "top1"):
        raise ValueError(f"chart against 'gmacs' or 'top1', not {against!r}")
    first = rows[0]
    points = {
        r.model if r.mode == "eager" else f"{r.model} ({r.mode})": (
            r.gmacs if against == "gmacs" else paper_figures(r.model).get("paper_top1"),
            r.infer_img_s,
        )
        for r in rows
    }
    left_out = [model for model, (x, _) in points.items() if x is None]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for model, (x, y) in points.items():
        if x is not None:
            axis.scatter(x, y)
            axis.annotate(model, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if against == "gmacs":
        axis.set_xlabel(f"GMACs at {first.input_size[0]}x{first.input_size[1]}")
    else:
        axis.set_xlabel("ImageNet-1K top-1 (%) reported by the paper")
    axis.set_ylabel(f"inference img/s (batch {first.batch}, {first.device})")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return left_out


def write_model_csv(rows: list[ModelTiming], stream: TextIO) -> None:
    write_dataclass_csv(rows, ModelTiming, stream)
