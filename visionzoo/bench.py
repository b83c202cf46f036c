"""Benchmarks and model statistics.

Kernel ops: every backend side by side, in one process. Each figure is the median of
``torch.utils.benchmark`` blocked runs (CUDA-synchronised), with the interquartile range as
spread and the speed-up over the ``reference`` backend.

Models: parameters and multiply-accumulates counted by ``torch.utils.flop_counter`` with the
reference kernels (whose matmuls it sees), attention included.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import timm
import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.kernels import get_op, use_backend
from visionzoo.kernels.dispatch import REFERENCE, KernelOp

__all__ = [
    "OP_CASES",
    "ModelStats",
    "OpTiming",
    "bench_op",
    "format_markdown",
    "format_model_markdown",
    "model_stats",
    "write_csv",
]


@dataclass(frozen=True)
class OpCase:
    """One input configuration of an op: a label and a factory of its positional arguments."""

    label: str
    make_args: Callable[[torch.device, torch.dtype], tuple[torch.Tensor, ...]]


def _dense_case(batch: int, heads: int, tokens: int, head_dim: int) -> OpCase:
    def make(device, dtype):
        return tuple(torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))

    return OpCase(f"B={batch} heads={heads} N={tokens} d={head_dim}", make)


# mixvit_tiny at 224x224 with the global mixer, batch 8: stage 1 and stage 3.
OP_CASES: dict[str, list[OpCase]] = {
    "dense_attention": [_dense_case(8, 2, 3136, 32), _dense_case(8, 8, 196, 32)],
}


@dataclass(frozen=True)
class OpTiming:
    op: str
    case: str
    device: str
    dtype: str
    mode: str
    backend: str
    median_ms: float
    iqr_ms: float
    speedup: float
    peak_mib: float | None


def _runner(op: KernelOp, args: tuple[torch.Tensor, ...], backend: str, backward: bool) -> Callable[[], None]:
    if backward:
        grad_args = tuple(a.detach().requires_grad_() for a in args)
        return lambda: op(*grad_args, backend=backend).sum().backward()

    def forward():
        with torch.no_grad():
            op(*args, backend=backend)

    return forward


def bench_op(
    name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, backward: bool = True, min_run_time: float = 1.0
) -> list[OpTiming]:
    """Time every backend of op ``name`` that accepts its cases on ``device`` and ``dtype``."""
    op, dev = get_op(name), torch.device(device)
    if name not in OP_CASES:
        raise ValueError(f"no benchmark cases for op {name!r}; ops with cases: {', '.join(OP_CASES)}")
    rows = []
    for case in OP_CASES[name]:
        args = case.make_args(dev, dtype)
        backends = [REFERENCE, *(b for b in op.backends if b != REFERENCE and op.supports(b, *args))]
        for mode in ("forward", "forward+backward") if backward else ("forward",):
            reference = float("nan")
            for backend in backends:
                fn = _runner(op, args, backend, backward=mode != "forward")
                fn()  # warm-up, and compilation for backends that compile
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                timing = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
                peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
                median = timing.median * 1e3
                reference = median if backend == REFERENCE else reference
                row = OpTiming(name, case.label, str(dev), str(dtype).removeprefix("torch."), mode, backend,
                               median, timing.iqr * 1e3, reference / median, peak)  # fmt: skip
                rows.append(row)
    return rows


def format_markdown(rows: list[OpTiming]) -> str:
    lines = [
        "| op | case | device | dtype | mode | backend | median ms | IQR ms | speed-up vs reference | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(
            f"| {r.op} | {r.case} | {r.device} | {r.dtype} | {r.mode} | {r.backend} | {r.median_ms:.3f} "
            f"| {r.iqr_ms:.3f} | {r.speedup:.2f}x | {peak} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[OpTiming], stream: TextIO) -> None:
    writer = csv.DictWriter(stream, fieldnames=[f.name for f in dataclasses.fields(OpTiming)])
    writer.writeheader()
    writer.writerows(dataclasses.asdict(r) for r in rows)


@dataclass(frozen=True)
class ModelStats:
    model: str
    params: int
    gmacs: float
    input_size: tuple[int, int]
    min_input_size: tuple[int, int]


def model_stats(name: str, input_size: tuple[int, int] | None = None) -> ModelStats:
    """Parameters and GMACs (what papers call FLOPs) of one forward pass at batch 1."""
    model = timm.create_model(name).eval()
    size = input_size or model.pretrained_cfg["input_size"][1:]
    with torch.no_grad(), use_backend(REFERENCE), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *size))
    params = sum(p.numel() for p in model.parameters())
    return ModelStats(name, params, counter.get_total_flops() / 2e9, tuple(size), tuple(model.min_input_size))


def format_model_markdown(rows: list[ModelStats]) -> str:
    lines = ["| model | params | GMACs | at | min input |", "| --- | ---: | ---: | --- | --- |"]
    lines += [
        f"| {r.model} | {r.params:,} | {r.gmacs:.2f} | {r.input_size[0]}x{r.input_size[1]} "
        f"| {r.min_input_size[0]}x{r.min_input_size[1]} |"
        for r in rows
    ]
    return "\n".join(lines)
