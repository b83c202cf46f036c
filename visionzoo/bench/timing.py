"""What every benchmark shares: run settings, one timed figure, peak-memory probes, CSV rows.

Each figure is the median of ``torch.utils.benchmark`` blocked runs (CUDA-synchronised), with the
interquartile range as spread, taken after one warm-up call (which also compiles).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import gc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch import nn
from torch.utils import benchmark

__all__ = ["RunSettings", "module_runner", "peak_memory_mib", "time_call", "write_dataclass_csv"]


@dataclass(frozen=True)
class RunSettings:
    """How the op and mixer benchmarks run their cases.

    Args:
        device: where the inputs live.
        dtype: the inputs' dtype.
        backward: also time one forward+backward (a training step) besides the forward.
        min_run_time: seconds of timed runs per figure.
        batch: overrides each case's batch size.
        on_row: called with each row as soon as it is measured.
    """

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    backward: bool = True
    min_run_time: float = 1.0
    batch: int | None = None
    on_row: Callable[[Any], None] | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        return ("forward", "forward+backward") if self.backward else ("forward",)


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


def time_call(fn: Callable[[], None], device: torch.device, min_run_time: float) -> tuple[float, float, float | None]:
    """Median and IQR in ms, and peak MiB, of ``fn`` after one warm-up call (which also compiles)."""
    fn()
    peak = peak_memory_mib(fn, device)
    # the process's threads: the Timer's default of one thread timed every table before issue #18
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    timing = timer.blocked_autorange(min_run_time=min_run_time)
    return timing.median * 1e3, timing.iqr * 1e3, peak


def module_runner(
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


def write_dataclass_csv(rows: Sequence[Any], row_type: type, stream: TextIO) -> None:
    """``rows`` (instances of the dataclass ``row_type``) as CSV, one column per field."""
    writer = csv.DictWriter(stream, fieldnames=[f.name for f in dataclasses.fields(row_type)])
    writer.writeheader()
    writer.writerows(dataclasses.asdict(r) for r in rows)
