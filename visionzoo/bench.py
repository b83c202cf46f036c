"""Benchmarks and model statistics.

Kernel ops: every backend side by side, in one process; mixers: ours against timm's layer on
the same inputs and weights. Each figure is the median of ``torch.utils.benchmark`` blocked
runs (CUDA-synchronised), with the interquartile range as spread and the speed-up over the
baseline (the ``reference`` backend, or timm).

Models: parameters and multiply-accumulates counted by ``torch.utils.flop_counter`` with the
reference kernels (whose matmuls it sees), attention included.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import timm
import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.kernels import aggregated_attention_unfold, bilevel_routing_attention_gather, get_op, use_backend
from visionzoo.kernels.dispatch import REFERENCE, KernelOp
from visionzoo.mixers import EcaGate, ElaGate, create_mixer, get_mixer_class, list_mixers

__all__ = [
    "MARKDOWN_HEADER",
    "MIXER_CASES",
    "OP_ALTERNATIVES",
    "OP_CASES",
    "PAPER_TOP1",
    "ModelStats",
    "ModelTiming",
    "OpTiming",
    "bench_mixer",
    "bench_model",
    "bench_op",
    "format_markdown",
    "format_model_markdown",
    "format_model_timings",
    "markdown_row",
    "model_peak_memory_mib",
    "model_stats",
    "peak_memory_mib",
    "plot_model_timings",
    "write_csv",
    "write_model_csv",
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


def _dense_case(batch: int, heads: int, tokens: int, head_dim: int) -> OpCase:
    def make(device, dtype, batch):
        return tuple(torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))

    return OpCase(f"heads={heads} N={tokens} d={head_dim}", batch, make)


def _neighborhood_case(
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


def _routing_case(batch: int, size: int, dim: int, heads: int, n_win: int, topk: int) -> OpCase:
    padded = -(-size // n_win) * n_win

    def make(device, dtype, batch):
        shape = (batch, heads, padded, padded, dim // heads)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        return q, k, v, n_win, topk, dim**-0.5

    def flops(batch):
        return 4 * batch * heads * padded**2 * min(topk, n_win**2) * (padded // n_win) ** 2 * (dim // heads)

    label = f"{size}x{size} (padded {padded}) C={dim} heads={heads} n_win={n_win} topk={topk}"
    return OpCase(label, batch, make, flops)


def _aggregated_case(batch: int, heads: int, size: int, head_dim: int, sr_ratio: int, window: int = 3) -> OpCase:
    pool_len, local_len = (size // sr_ratio) ** 2, window**2

    def make(device, dtype, batch):
        def rand(*shape):
            return torch.randn(*shape, device=device, dtype=dtype)

        q, k, v = (rand(batch, heads, size, size, head_dim) for _ in range(3))
        k_pool, v_pool = rand(batch, heads, pool_len, head_dim), rand(batch, heads, pool_len, head_dim)
        embedding, scale, rpb = rand(heads, head_dim), rand(heads).abs() + 1, rand(heads, local_len)
        pool_bias, tokens = rand(heads, size * size, pool_len), rand(heads, head_dim, local_len)
        return q, k, v, k_pool, v_pool, embedding, scale, rpb, pool_bias, tokens, rand(heads, local_len), window

    def flops(batch):
        return 4 * batch * heads * size**2 * (local_len + pool_len) * head_dim

    label = f"{size}x{size} heads={heads} d={head_dim} window={window} pool={size // sr_ratio}"
    return OpCase(label, batch, make, flops)


OP_CASES: dict[str, list[OpCase]] = {
    # mixvit_tiny at 224x224 with the global mixer: stage 1 and stage 3
    "dense_attention": [_dense_case(8, 2, 3136, 32), _dense_case(8, 8, 196, 32)],
    # NAT at 224x224 (stage 1) and at 448x448; with RPB only reference and flex run
    "neighborhood_attention": [
        _neighborhood_case(8, 2, 56, 32, 7, rpb=False),
        _neighborhood_case(8, 2, 56, 32, 7, rpb=True),
        _neighborhood_case(8, 4, 112, 32, 7, rpb=False),
        _neighborhood_case(8, 4, 112, 32, 7, rpb=True),
        # issue #7: batch 64 at 224 (NAT, and DiNAT's dilation 8), and 128x128 maps at batch 8
        _neighborhood_case(64, 2, 56, 32, 7, rpb=False),
        _neighborhood_case(64, 2, 56, 32, 7, rpb=True),
        _neighborhood_case(64, 2, 56, 32, 7, rpb=True, dilation=8),
        _neighborhood_case(8, 4, 128, 32, 7, rpb=False),
        _neighborhood_case(8, 4, 128, 32, 7, rpb=True),
    ],
    # transnext_micro's first stage (sr 8) at 224x224 and 640x640 input
    # issue #7: head dim 32, 56x56 maps at batch 64 and 128x128 maps at batch 8 (pool = size / 8)
    "aggregated_attention": [
        _aggregated_case(4, 2, 56, 24, 8),
        _aggregated_case(1, 2, 160, 24, 8),
        _aggregated_case(64, 2, 56, 32, 8),
        _aggregated_case(8, 2, 128, 32, 8),
    ],
    # biformer_tiny's first stage (64 channels, 7x7 regions, top-1) at 224, 512 and 1024 input;
    # issue #7: its stages 1-3 at 224 at batch 64, stage 1 at 512 at batch 8
    "bilevel_routing_attention": [
        _routing_case(8, 56, 64, 2, 7, 1),
        _routing_case(2, 128, 64, 2, 7, 1),
        _routing_case(1, 256, 64, 2, 7, 1),
        _routing_case(64, 56, 64, 2, 7, 1),
        _routing_case(64, 28, 128, 4, 7, 4),
        _routing_case(64, 14, 256, 8, 7, 16),
        _routing_case(8, 128, 64, 2, 7, 1),
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Memory one call of ``fn`` needs above what is already allocated.

    CUDA: ``max_memory_allocated``. CPU (Linux): the rise of the resident-set high-water mark,
    reset through ``/proc/self/clear_refs`` after returning freed memory to the system.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if device.type != "cpu" or not os.path.exists("/proc/self/clear_refs"):
        return None
    gc.collect()
    try:  # hand freed heap pages back, so that they count again when reused
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def _time(fn: Callable[[], None], device: torch.device, min_run_time: float) -> tuple[float, float, float | None]:
    """Median and IQR in ms, and peak MiB, of ``fn`` after one warm-up call (which also compiles)."""
    fn()
    peak = peak_memory_mib(fn, device)
    timing = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return timing.median * 1e3, timing.iqr * 1e3, peak


def bench_op(
    name: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backward: bool = True,
    min_run_time: float = 1.0,
    batch: int | None = None,
    cases: list[str] | None = None,
    on_row: Callable[[OpTiming], None] | None = None,
    backends: list[str] | None = None,
) -> list[OpTiming]:
    """Time every backend of op ``name`` that accepts its cases on ``device`` and ``dtype``.

    Args:
        batch: overrides each case's batch size.
        cases: only the cases whose label contains one of these strings.
        backends: only these backends and alternative formulations (``reference``, the baseline, always runs).
        on_row: called with each row as soon as it is measured.
    """
    op, dev = get_op(name), torch.device(device)
    if name not in OP_CASES:
        raise ValueError(f"no benchmark cases for op {name!r}; ops with cases: {', '.join(OP_CASES)}")
    rows = []
    for case in OP_CASES[name]:
        if cases and not any(c in case.label for c in cases):
            continue
        case_batch = batch or case.batch
        args = case.make_args(dev, dtype, case_batch)
        chosen = [REFERENCE, *(b for b in op.backends if b != REFERENCE and op.supports(b, *args))]
        if dev.type != "cuda":  # Triton off CUDA is its interpreter (TRITON_INTERPRET=1): a test tool, not timed
            chosen = [b for b in chosen if b != "triton"]
        alternatives = OP_ALTERNATIVES.get(name, {})
        chosen += list(alternatives)
        if backends:
            chosen = [b for b in chosen if b == REFERENCE or any(b.startswith(want) for want in backends)]
        for mode in ("forward", "forward+backward") if backward else ("forward",):
            reference = float("nan")
            for backend in chosen:
                if backend in alternatives:
                    fn = _runner(alternatives[backend], args, None, backward=mode != "forward")
                else:
                    fn = _runner(op, args, backend, backward=mode != "forward")
                    if mode != "forward" and not op.supports(backend, *_grad_args(args)):
                        continue  # forward-only backend on this device
                try:
                    median, iqr, peak = _time(fn, dev, min_run_time)
                except torch.OutOfMemoryError:  # a row, not a crash: who runs out at large maps is a result
                    gc.collect()
                    torch.cuda.empty_cache()
                    median, iqr, peak = float("nan"), float("nan"), None
                reference = median if backend == REFERENCE else reference
                flops = case.flops(case_batch) * (1.0 if mode == "forward" else 2.5) if case.flops else None
                row = OpTiming(name, case.label, case_batch, str(dev), str(dtype).removeprefix("torch."), mode,
                               backend, median, iqr, reference / median, peak,
                               flops / median / 1e9 if flops else None)  # fmt: skip
                rows.append(row)
                if on_row:
                    on_row(row)
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


@dataclass(frozen=True)
class MixerCase:
    """Our mixer against timm's layer on the same weights: ``build(device, dtype, batch)`` returns
    ``(ours, our_input, timm_module, timm_input)``."""

    label: str
    batch: int
    build: Callable[[torch.device, torch.dtype, int], tuple[nn.Module, torch.Tensor, nn.Module, torch.Tensor]]


def _halo_case(batch: int, size: int, dim: int, heads: int, block: int, halo: int) -> MixerCase:
    from timm.layers.halo_attn import HaloAttn

    def build(device, dtype, batch):
        theirs = HaloAttn(dim, num_heads=heads, block_size=block, halo_size=halo).to(device, dtype)
        ours = create_mixer("halo", dim, num_heads=heads, block_size=block, halo_size=halo, proj=False)
        ours = ours.to(device, dtype)
        ours.load_timm_weights(theirs)
        x = torch.randn(batch, size, size, dim, device=device, dtype=dtype)
        return ours, x, theirs, x.permute(0, 3, 1, 2).contiguous()

    return MixerCase(f"{size}x{size} C={dim} heads={heads} b={block} h={halo}", batch, build)


class _TimmPartitionAttention(nn.Module):
    """timm's maxxvit partition + attention + reverse, without the block's norm and MLP."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer._partition_attn(x)


def _partition_case(batch: int, size: int, dim: int, window: int, partition: str) -> MixerCase:
    from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl

    def build(device, dtype, batch):
        cfg = MaxxVitTransformerCfg(dim_head=32, head_first=False, window_size=window, rel_pos_type="bias")
        theirs = PartitionAttentionCl(dim, partition, cfg).to(device, dtype)
        ours = create_mixer("multi_axis", dim, head_dim=32, window_size=window, partition=partition)
        ours = ours.to(device, dtype)
        getattr(ours, partition).load_timm_weights(theirs.attn)
        x = torch.randn(batch, size, size, dim, device=device, dtype=dtype)
        return ours, x, _TimmPartitionAttention(theirs), x

    return MixerCase(f"{partition} {size}x{size} C={dim} P={window}", batch, build)


# HaloNet-style stage (block 8, halo 3) and MaxViT-T's first stage (64 channels, 56x56, P=G=7)
MIXER_CASES: dict[str, list[MixerCase]] = {
    "halo": [_halo_case(8, 56, 128, 4, 8, 3)],
    "multi_axis": [_partition_case(8, 56, 64, 7, "block"), _partition_case(8, 56, 64, 7, "grid")],
}


def bench_mixer(
    name: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backward: bool = True,
    min_run_time: float = 1.0,
    batch: int | None = None,
    on_row: Callable[[OpTiming], None] | None = None,
) -> list[OpTiming]:
    """Time our mixer ``name`` against timm's layer on the same inputs and weights (baseline: timm)."""
    if name not in MIXER_CASES:
        raise ValueError(f"no timm comparison for mixer {name!r}; mixers with one: {', '.join(MIXER_CASES)}")
    dev, rows = torch.device(device), []
    for case in MIXER_CASES[name]:
        case_batch = batch or case.batch
        ours, our_input, theirs, timm_input = case.build(dev, dtype, case_batch)
        for mode in ("forward", "forward+backward") if backward else ("forward",):
            baseline = float("nan")
            for impl, module, x in (("timm", theirs, timm_input), ("visionzoo", ours, our_input)):
                fn = _module_runner(module, x, backward=mode != "forward")
                median, iqr, peak = _time(fn, dev, min_run_time)
                baseline = median if impl == "timm" else baseline
                row = OpTiming(name, case.label, case_batch, str(dev), str(dtype).removeprefix("torch."), mode,
                               impl, median, iqr, baseline / median, peak)  # fmt: skip
                rows.append(row)
                if on_row:
                    on_row(row)
    return rows


def _module_runner(
    module: nn.Module, x: torch.Tensor, backward: bool, autocast: torch.dtype | None = None
) -> Callable[[], None]:
    """One inference, or one training forward+backward, of ``module`` on ``x``; the forward under
    mixed precision when ``autocast`` is given (the backward outside it, as in AMP training)."""

    def context():
        return torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext()

    if backward:
        module.train()

        def step():
            with context():
                loss = module(x).float().sum()
            loss.backward()

        return step
    module.eval()

    def forward():
        with torch.no_grad(), context():
            module(x)

    return forward


def format_markdown(rows: list[OpTiming]) -> str:
    return "\n".join([MARKDOWN_HEADER, *map(markdown_row, rows)])


def write_csv(rows: list[OpTiming], stream: TextIO) -> None:
    writer = csv.DictWriter(stream, fieldnames=[f.name for f in dataclasses.fields(OpTiming)])
    writer.writeheader()
    writer.writerows(dataclasses.asdict(r) for r in rows)


# ImageNet-1K top-1 (%) at 224x224 as each paper reports it (NAT, DiNAT, BiFormer and TransNeXt tables;
# ConvNeXt, Swin, MaxViT and DaViT for the timm models we compare with); our models are untrained or
# converted from these checkpoints.
PAPER_TOP1: dict[str, float] = {
    "nat_mini": 81.8, "nat_tiny": 83.2, "nat_small": 83.7, "nat_base": 84.3,
    "dinat_mini": 81.8, "dinat_tiny": 82.7, "dinat_small": 83.8, "dinat_base": 84.4,
    "biformer_tiny": 81.4, "biformer_small": 83.8, "biformer_base": 84.3,
    "transnext_micro": 82.5, "transnext_tiny": 84.0, "transnext_small": 84.7, "transnext_base": 84.8,
    "convnext_tiny": 82.1, "swin_tiny_patch4_window7_224": 81.3, "maxvit_tiny_tf_224": 83.6, "davit_tiny": 82.8,
}  # fmt: skip


@dataclass(frozen=True)
class ModelStats:
    model: str
    params: int
    gmacs: float
    input_size: tuple[int, int]
    min_input_size: tuple[int, int]
    mixers: str = "-"
    paper_top1: float | None = None


def stage_mixers(model: nn.Module) -> str:
    """Registered names of the token mixers of each stage (``a / b / c / d``; one name when all agree)."""
    names = {get_mixer_class(n): n for n in list_mixers()}
    stages = [
        ",".join(dict.fromkeys(names.get(type(b.mixer), type(b.mixer).__name__) for b in stage.blocks))
        for stage in getattr(model, "stages", ())
        if hasattr(stage, "blocks") and all(hasattr(b, "mixer") for b in stage.blocks)
    ]
    if not stages:  # a CNN: name the gates its blocks carry (ELA-ResNet)
        gates = sorted({type(m).__name__ for m in model.modules() if isinstance(m, EcaGate | ElaGate)})
        return f"{', '.join(gates)} in every block" if gates else "-"
    return stages[0] if len(set(stages)) == 1 else " / ".join(stages)


def _gmacs(model: nn.Module, size: tuple[int, int]) -> float:
    """Multiply-accumulates (what papers call FLOPs) of one eval forward at batch 1, reference kernels."""
    device = next(model.parameters()).device
    with torch.no_grad(), use_backend(REFERENCE), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, *size, device=device))
    return counter.get_total_flops() / 2e9


def model_stats(name: str, input_size: tuple[int, int] | None = None) -> ModelStats:
    """Parameters and GMACs (what papers call FLOPs) of one forward pass at batch 1."""
    model = timm.create_model(name).eval()
    size = tuple(input_size or model.pretrained_cfg["input_size"][1:])
    params = sum(p.numel() for p in model.parameters())
    return ModelStats(
        name, params, _gmacs(model, size), size, tuple(model.min_input_size), stage_mixers(model), PAPER_TOP1.get(name)
    )


def model_peak_memory_mib(
    name: str, input_size: tuple[int, int], batch: int = 1, backward: bool = False, device: str = "cpu"
) -> float | None:
    """Peak memory (see :func:`peak_memory_mib`) of one inference, or one training forward+backward,
    of model ``name`` on ``batch`` images of ``input_size``, after a warm-up call."""
    dev = torch.device(device)
    model = timm.create_model(name).to(dev)
    run = _module_runner(model, torch.randn(batch, 3, *input_size, device=dev), backward)
    run()
    return peak_memory_mib(run, dev)


def format_model_markdown(rows: list[ModelStats]) -> str:
    lines = [
        "| model | params | GMACs | at | min input | mixers by stage | paper top-1 |",
        "| --- | ---: | ---: | --- | --- | --- | ---: |",
    ]
    lines += [
        f"| {r.model} | {r.params:,} | {r.gmacs:.2f} | {r.input_size[0]}x{r.input_size[1]} "
        f"| {r.min_input_size[0]}x{r.min_input_size[1]} | {r.mixers} | {r.paper_top1 or '-'} |"
        for r in rows
    ]
    return "\n".join(lines)


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
    gmacs = _gmacs(model, size)
    one, many = (torch.randn(n, 3, *size, device=dev) for n in (1, batch))

    def timed(x: torch.Tensor, backward: bool) -> tuple[float, float, float | None]:
        return _time(_module_runner(model, x, backward, autocast), dev, min_run_time)

    latency, latency_iqr, _ = timed(one, backward=False)
    infer_ms, _, infer_peak = timed(many, backward=False)
    train_img_s = train_peak = None
    if train:
        train_ms, _, train_peak = timed(many, backward=True)
        train_img_s = batch / train_ms * 1e3
    device_name = str(dev) if autocast is None else f"{dev}, {str(autocast).removeprefix('torch.')} autocast"
    return ModelTiming(
        name, device_name, size, batch, sum(p.numel() for p in model.parameters()), gmacs,
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
    models without a published top-1 in :data:`PAPER_TOP1` are left out), one labelled point per model.
    Returns the models left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if against not in ("gmacs", "top1"):
        raise ValueError(f"chart against 'gmacs' or 'top1', not {against!r}")
    first = rows[0]
    points = {r.model: (r.gmacs if against == "gmacs" else PAPER_TOP1.get(r.model), r.infer_img_s) for r in rows}
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
    writer = csv.DictWriter(stream, fieldnames=[f.name for f in dataclasses.fields(ModelTiming)])
    writer.writeheader()
    writer.writerows(dataclasses.asdict(r) for r in rows)
