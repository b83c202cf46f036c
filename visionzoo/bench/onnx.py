"""ONNX files timed in onnxruntime on the CPU: batch-1 latency and throughput, side by side in one process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .timing import time_call

__all__ = ["OnnxTiming", "bench_onnx", "format_onnx_timings"]


@dataclass(frozen=True)
class OnnxTiming:
    file: str
    size_mib: float
    input_size: tuple[int, int]
    batch: int
    latency_ms: float  # batch 1, median
    latency_iqr_ms: float
    throughput: float  # images per second at ``batch``


def bench_onnx(
    path: str | Path, input_size: tuple[int, int] | None = None, batch: int = 32, min_run_time: float = 1.0
) -> OnnxTiming:
    """Time ``path`` in onnxruntime (CPU, as many threads as torch uses) on random images of ``input_size``
    (the graph's own when its height and width are fixed)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph_input = session.get_inputs()[0]
    channels, *fixed = graph_input.shape[1:]
    if input_size is None:
        if not all(isinstance(side, int) for side in fixed):
            raise ValueError(f"{path} takes images of any size: give --img-size H W")
        input_size = tuple(fixed)
    rng = np.random.default_rng(0)

    def runner(images: int):
        inputs = {graph_input.name: rng.standard_normal((images, channels, *input_size), dtype=np.float32)}
        return lambda: session.run(None, inputs)

    cpu = torch.device("cpu")
    latency, iqr, _ = time_call(runner(1), cpu, min_run_time)
    per_batch, _, _ = time_call(runner(batch), cpu, min_run_time)
    return OnnxTiming(
        str(path), Path(path).stat().st_size / 2**20, input_size, batch, latency, iqr, batch / per_batch * 1e3
    )


def format_onnx_timings(rows: list[OnnxTiming]) -> str:
    """A markdown table, ratios against the first file."""
    base = rows[0]
    lines = [
        "| file | MiB | input | batch-1 latency ms | speed-up | img/s | speed-up |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        height, width = row.input_size
        lines.append(
            f"| {Path(row.file).name} | {row.size_mib:.2f} | {height}x{width}, batch {row.batch} | "
            f"{row.latency_ms:.3f} (IQR {row.latency_iqr_ms:.3f}) | {base.latency_ms / row.latency_ms:.2f}x | "
            f"{row.throughput:.1f} | {row.throughput / base.throughput:.2f}x |"
        )
    return "\n".join(lines)
