"""Kernel op benchmarks: every backend of an op side by side, in one process, on the same cases.

The baseline of the speed-ups is the ``reference`` backend; the official formulations of some ops
(:data:`OP_ALTERNATIVES`) are timed beside the backends. Rows are :class:`OpTiming`, shared with the
mixer benchmarks, and print as markdown or CSV.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TextIO

import torch

from visionzoo.kernels import (
    aggregated_attention_unfold,
    bilevel_routing_attention_gather,
    get_op,
    pooled_position_coords,
)
from visionzoo.kernels.dispatch import REFERENCE, KernelOp

from .timing import RunSettings, time_call, write_dataclass_csv

__all__ = [
    "MARKDOWN_HEADER",
    "OP_ALTERNATIVES",
    "OP_CASES",
    "OpCase",
    "OpTiming",
    "aggregated_case",
    "bench_op",
    "dense_case",
    "format_markdown",
    "markdown_row",
    "neighborhood_case",
    "routing_case",
    "time_implementations",
    "write_csv",
]


@dataclass(frozen=True)
class OpCase:
    """One input configuration of an op: a label, its default batch size, and
    ``make_args(device, dtype, batch)`` building the op's positional arguments; ``flops(batch)``,
    when given, counts the forward FLOPs (4 * B * heads * queries * keys per query * head dim;
    x2.5 for forward+backward) behind the effective TFLOP/s column."""

    label: str
    batch: int
    make_args: Callable[[torch.device, torch.dtype, int], tuple]
    flops: Callable[[int], float] | None = None


def dense_case(batch: int, heads: int, tokens: int, head_dim: int) -> OpCase:
    def make(device, dtype, batch):
        return tuple(torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))

    return OpCase(f"heads={heads} N={tokens} d={head_dim}", batch, make)


def neighborhood_case(
    batch: int, heads: int, size: int, head_dim: int, kernel_size: int, rpb: bool, dilation: int = 1
) -> OpCase:
    def make(device, dtype, batch):
        q, k, v = (torch.randn(batch, heads, size, size, head_dim, device=device, dtype=dtype) for _ in range(3))
        table = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, device=device, dtype=dtype)
        return q, k, v, kernel_size, dilation, table if rpb else None

    def flops(batch):
        return 4 * batch * heads * size**2 * kernel_size**2 * head_dim

    dilated = f" dilation={dilation}" if dilation > 1 else ""
    label = f"{size}x{size} heads={heads} d={head_dim} k={kernel_size}{dilated}{' rpb' if rpb else ''}"
    return OpCase(label, batch, make, flops)


def routing_case(batch: int, size: int, dim: int, heads: int, n_win: int, topk: int) -> OpCase:
    padded = -(-size // n_win) * n_win

    def make(device, dtype, batch):
        shape = (batch, heads, padded, padded, dim // heads)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        return q, k, v, n_win, topk, dim**-0.5

    def flops(batch):
        return 4 * batch * heads * padded**2 * min(topk, n_win**2) * (padded // n_win) ** 2 * (dim // heads)

    label = f"{size}x{size} (padded {padded}) C={dim} heads={heads} n_win={n_win} topk={topk}"
    return OpCase(label, batch, make, flops)


def aggregated_case(batch: int, heads: int, size: int, head_dim: int, sr_ratio: int, window: int = 3) -> OpCase:
    pool_side, local_len = size // sr_ratio, window**2
    pool_len = pool_side**2

    def make(device, dtype, batch):
        def rand(*shape):
            return torch.randn(*shape, device=device, dtype=dtype)

        q, k, v = (rand(batch, heads, size, size, head_dim) for _ in range(3))
        k_pool, v_pool = rand(batch, heads, pool_len, head_dim), rand(batch, heads, pool_len, head_dim)
        embedding, scale, rpb = rand(heads, head_dim), rand(heads).abs() + 1, rand(heads, local_len)
        # the CPB's table layout: its rows and columns of offsets, indexed per axis
        coords, rows, cols = pooled_position_coords((size, size), (pool_side, pool_side), (size, size), device)
        cpb, tokens = rand(heads, *coords.shape[:2]), rand(heads, head_dim, local_len)
        return q, k, v, k_pool, v_pool, embedding, scale, rpb, cpb, rows, cols, tokens, rand(heads, local_len), window

    def flops(batch):
        return 4 * batch * heads * size**2 * (local_len + pool_len) * head_dim

    label = f"{size}x{size} heads={heads} d={head_dim} window={window} pool={size // sr_ratio}"
    return OpCase(label, batch, make, flops)


OP_CASES: dict[str, list[OpCase]] = {
    # mixvit_tiny at 224x224 with the global mixer: stage 1 and stage 3
    "dense_attention": [dense_case(8, 2, 3136, 32), dense_case(8, 8, 196, 32)],
    # NAT at 224x224 (stage 1) and at 448x448; with RPB only reference and flex run
    "neighborhood_attention": [
        neighborhood_case(8, 2, 56, 32, 7, rpb=False),
        neighborhood_case(8, 2, 56, 32, 7, rpb=True),
        neighborhood_case(8, 4, 112, 32, 7, rpb=False),
        neighborhood_case(8, 4, 112, 32, 7, rpb=True),
        # issue #7: batch 64 at 224 (NAT, and DiNAT's dilation 8), and 128x128 maps at batch 8
        neighborhood_case(64, 2, 56, 32, 7, rpb=False),
        neighborhood_case(64, 2, 56, 32, 7, rpb=True),
        neighborhood_case(64, 2, 56, 32, 7, rpb=True, dilation=8),
        neighborhood_case(8, 4, 128, 32, 7, rpb=False),
        neighborhood_case(8, 4, 128, 32, 7, rpb=True),
        # issue #18: NAT-Tiny's stages 2-4 and DiNAT-Tiny's dilated layers at 224x224, batch 8
        *(neighborhood_case(8, 2 << i, 56 >> i, 32, 7, rpb=True) for i in range(1, 4)),
        *(neighborhood_case(8, 2 << i, 56 >> i, 32, 7, rpb=True, dilation=8 >> i) for i in range(3)),
    ],
    # transnext_micro's first stage (sr 8) at 224x224 and 640x640 input
    # issue #7: head dim 32, 56x56 maps at batch 64 and 128x128 maps at batch 8 (pool = size / 8)
    "aggregated_attention": [
        aggregated_case(4, 2, 56, 24, 8),
        aggregated_case(1, 2, 160, 24, 8),
        aggregated_case(64, 2, 56, 32, 8),
        aggregated_case(8, 2, 128, 32, 8),
        # issue #18: transnext_micro's stages 1-3 at 224x224 (sr 8, 4, 2: 7x7 pooled tokens each), batch 8
        *(aggregated_case(8, 2 << i, 56 >> i, 24, 8 >> i) for i in range(3)),
    ],
    # biformer_tiny's first stage (64 channels, 7x7 regions, top-1) at 224, 512 and 1024 input;
    # issue #7: its stages 1-3 at 224 at batch 64, stage 1 at 512 at batch 8
    "bilevel_routing_attention": [
        routing_case(8, 56, 64, 2, 7, 1),
        routing_case(2, 128, 64, 2, 7, 1),
        routing_case(1, 256, 64, 2, 7, 1),
        routing_case(64, 56, 64, 2, 7, 1),
        routing_case(64, 28, 128, 4, 7, 4),
        routing_case(64, 14, 256, 8, 7, 16),
        routing_case(8, 128, 64, 2, 7, 1),
    ],
}

# Formulations timed beside an op's backends on the same cases, but never dispatched to:
# the official gather-based routing attention and unfold-based aggregated attention, for comparison.
OP_ALTERNATIVES: dict[str, dict[str, Callable]] = {
    "bilevel_routing_attention": {"gather (official)": bilevel_routing_attention_gather},
    "aggregated_attention": {"unfold (official)": aggregated_attention_unfold},
}


@dataclass(frozen=True)
class OpTiming:
    op: str
    case: str
    batch: int
    device: str
    dtype: str
    mode: str
    backend: str
    median_ms: float
    iqr_ms: float
    speedup: float
    peak_mib: float | None
    tflops: float | None = None  # effective: the case's FLOPs over the median time


def _time_or_nan(
    fn: Callable[[], None], device: torch.device, min_run_time: float
) -> tuple[float, float, float | None]:
    """:func:`time_call`, with NaN figures when the device runs out of memory: who does at large maps is a result."""
    try:
        return time_call(fn, device, min_run_time)
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return float("nan"), float("nan"), None


def time_implementations(
    name: str,
    label: str,
    batch: int,
    settings: RunSettings,
    runners: Callable[[bool], dict[str, Callable[[], None]]],
    flops: float | None = None,
) -> list[OpTiming]:
    """Rows of one case: each of ``runners(backward)`` timed in each of the settings' modes, the first of a
    mode being the baseline of its speed-ups; ``flops`` (of one forward) gives the TFLOP/s column."""
    device, rows = torch.device(settings.device), []
    for mode in settings.modes:
        baseline = None
        for implementation, fn in runners(mode != "forward").items():
            median, iqr, peak = _time_or_nan(fn, device, settings.min_run_time)
            baseline = median if baseline is None else baseline
            mode_flops = flops * (1.0 if mode == "forward" else 2.5) if flops else None
            row = OpTiming(name, label, batch, str(device), str(settings.dtype).removeprefix("torch."), mode,
                           implementation, median, iqr, baseline / median, peak,
                           mode_flops / median / 1e9 if mode_flops else None)  # fmt: skip
            rows.append(row)
            if settings.on_row:
                settings.on_row(row)
    return rows


def _grad_args(args: tuple) -> tuple:
    return tuple(
        a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )


def _runner(op: KernelOp | Callable, args: tuple, backend: str | None, backward: bool) -> Callable[[], None]:
    """``op(*args, backend=backend)``, or ``op(*args)`` for an alternative formulation (``backend`` None)."""
    kwargs = {} if backend is None else {"backend": backend}
    if backward:
        grad_args = _grad_args(args)
        return lambda: op(*grad_args, **kwargs).sum().backward()

    def forward():
        with torch.no_grad():
            op(*args, **kwargs)

    return forward


def _chosen_backends(
    name: str, op: KernelOp, args: tuple, device: torch.device, backends: list[str] | None
) -> list[str]:
    """The backends that accept ``args`` (``reference`` first), then the alternative formulations."""
    chosen = [REFERENCE, *(b for b in op.backends if b != REFERENCE and op.supports(b, *args))]
    if device.type != "cuda":  # Triton off CUDA is its interpreter (TRITON_INTERPRET=1): a test tool, not timed
        chosen = [b for b in chosen if b != "triton"]
    chosen += list(OP_ALTERNATIVES.get(name, {}))
    if backends:
        chosen = [b for b in chosen if b == REFERENCE or any(b.startswith(want) for want in backends)]
    return chosen


def _op_runners(
    op: KernelOp, alternatives: dict[str, Callable], args: tuple, chosen: list[str], backward: bool
) -> dict[str, Callable[[], None]]:
    """A runner per chosen backend or alternative formulation; no training runner for a forward-only backend."""
    timed = {}
    for backend in chosen:
        if backend in alternatives:
            timed[backend] = _runner(alternatives[backend], args, None, backward)
        elif not backward or op.supports(backend, *_grad_args(args)):
            timed[backend] = _runner(op, args, backend, backward)
    return timed


def bench_op(
    name: str,
    settings: RunSettings | None = None,
    cases: list[str] | None = None,
    backends: list[str] | None = None,
) -> list[OpTiming]:
    """Time every backend of op ``name`` that accepts its cases on the settings' device and dtype.

    Args:
        cases: only the cases whose label contains one of these strings.
        backends: only these backends and alternative formulations (``reference``, the baseline, always runs).
    """
    settings = settings or RunSettings()
    op, device = get_op(name), torch.device(settings.device)
    if name not in OP_CASES:
        raise ValueError(f"no benchmark cases for op {name!r}; ops with cases: {', '.join(OP_CASES)}")
    alternatives = OP_ALTERNATIVES.get(name, {})
    rows = []
    for case in OP_CASES[name]:
        if cases and not any(c in case.label for c in cases):
            continue
        batch = settings.batch or case.batch
        args = case.make_args(device, settings.dtype, batch)
        chosen = _chosen_backends(name, op, args, device, backends)
        runners = partial(_op_runners, op, alternatives, args, chosen)
        flops = case.flops(batch) if case.flops else None
        rows += time_implementations(name, case.label, batch, settings, runners, flops)
    return rows


MARKDOWN_HEADER = (
    "| op | case | batch | device | dtype | mode | backend | median ms | IQR ms | speed-up vs baseline | peak MiB "
    "| TFLOP/s |\n"
    "| --- | --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"
)


def markdown_row(r: OpTiming) -> str:
    if r.median_ms != r.median_ms:  # NaN: ran out of memory
        return (
            f"| {r.op} | {r.case} | {r.batch} | {r.device} | {r.dtype} | {r.mode} | {r.backend} | out of memory |||||"
        )
    peak = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
    tflops = "-" if r.tflops is None else f"{r.tflops:.3g}"
    return (
        f"| {r.op} | {r.case} | {r.batch} | {r.device} | {r.dtype} | {r.mode} | {r.backend} "
        f"| {r.median_ms:.3f} | {r.iqr_ms:.3f} | {r.speedup:.2f}x | {peak} | {tflops} |"
    )


def format_markdown(rows: list[OpTiming]) -> str:
    return "\n".join([MARKDOWN_HEADER, *map(markdown_row, rows)])


def write_csv(rows: list[OpTiming], stream: TextIO) -> None:
    write_dataclass_csv(rows, OpTiming, stream)
