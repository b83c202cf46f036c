"""Model benchmarks: latency, throughput, training step and peak memory of any timm model, tables and charts.

Ours run their default kernel backends; GMACs count the reference ones (:func:`visionzoo.stats.count_gmacs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

import timm
import torch

from visionzoo.backbones.papers import paper_figures
from visionzoo.stats import count_gmacs, count_params

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
) -> ModelTiming:
    """Latency at batch 1, inference and training throughput at ``batch``, peak memory, params and GMACs.

    Any timm model works (ours run their default kernel backends; GMACs use the reference ones).
    ``autocast`` (``torch.float16``/``bfloat16``) runs the timed calls under mixed precision.
    """
    dev = torch.device(device)
    model = timm.create_model(name).to(dev).eval()
    size = tuple(input_size or model.pretrained_cfg["input_size"][1:])
    gmacs = count_gmacs(model, size)
    one, many = (torch.randn(n, 3, *size, device=dev) for n in (1, batch))

    def timed(x: torch.Tensor, backward: bool) -> tuple[float, float, float | None]:
        return time_call(module_runner(model, x, backward, autocast), dev, min_run_time)

    latency, latency_iqr, _ = timed(one, backward=False)
    infer_ms, _, infer_peak = timed(many, backward=False)
    train_img_s = train_peak = None
    if train:
        train_ms, _, train_peak = timed(many, backward=True)
        train_img_s = batch / train_ms * 1e3
    device_name = str(dev) if autocast is None else f"{dev}, {str(autocast).removeprefix('torch.')} autocast"
    return ModelTiming(
        name, device_name, size, batch, count_params(model), gmacs,
        latency, latency_iqr, batch / infer_ms * 1e3, train_img_s, infer_peak, train_peak,
    )  # fmt: skip


def format_model_timings(rows: list[ModelTiming], baseline: str | None = None) -> str:
    """Markdown table; with ``baseline`` (a model in ``rows``) each figure carries its ratio to it: speed
    ratios above 1 are faster than the baseline, memory ratios are this model's memory over the baseline's."""
    base = next((r for r in rows if r.model == baseline), None)

    def cell(value: float | None, reference: float | None, fmt: str, faster_when_lower: bool = False) -> str:
        if value is None:
            return "-"
        text = format(value, fmt)
        if base is None or reference in (None, 0) or value == 0:
            return text
        ratio = reference / value if faster_when_lower else value / reference
        return f"{text} ({ratio:.2f}x)"

    lines = [
        "| model | device | input | batch | params | GMACs | latency bs1 ms | infer img/s | train img/s "
        "| infer peak MiB | train peak MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        b = base or r
        lines.append(
            f"| {r.model} | {r.device} | {r.input_size[0]}x{r.input_size[1]} | {r.batch} | {r.params / 1e6:.2f}M "
            f"| {r.gmacs:.2f} | {cell(r.latency_ms, b.latency_ms, '.1f', faster_when_lower=True)} "
            f"| {cell(r.infer_img_s, b.infer_img_s, '.1f')} | {cell(r.train_img_s, b.train_img_s, '.1f')} "
            f"| {cell(r.infer_peak_mib, b.infer_peak_mib, '.0f')} | {cell(r.train_peak_mib, b.train_peak_mib, '.0f')} |"
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
        r.model: (r.gmacs if against == "gmacs" else paper_figures(r.model).get("paper_top1"), r.infer_img_s)
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
