"""Benchmarks, split by what they measure.

- :mod:`~visionzoo.bench.ops`: every backend of a kernel op side by side (baseline: ``reference``), with the
  official formulations beside them;
- :mod:`~visionzoo.bench.mixers`: our mixers against timm's layers on the same inputs and weights (baseline: timm);
- :mod:`~visionzoo.bench.models`: latency, throughput, training step and peak memory of any timm model;
- :mod:`~visionzoo.bench.timing`: what they share (run settings, timed figures, peak-memory probes, CSV).

Model statistics (parameters, GMACs, paper figures) live in :mod:`visionzoo.stats`.
"""

from .mixers import MIXER_CASES, MixerCase, bench_mixer, channel_case, halo_case, partition_case
from .models import (
    ModelTiming,
    bench_model,
    format_model_timings,
    model_peak_memory_mib,
    plot_model_timings,
    write_model_csv,
)
from .ops import (
    MARKDOWN_HEADER,
    OP_ALTERNATIVES,
    OP_CASES,
    OpCase,
    OpTiming,
    aggregated_case,
    bench_op,
    dense_case,
    format_markdown,
    markdown_row,
    neighborhood_case,
    routing_case,
    write_csv,
)
from .timing import RunSettings, peak_memory_mib

__all__ = [
    "MARKDOWN_HEADER",
    "MIXER_CASES",
    "OP_ALTERNATIVES",
    "OP_CASES",
    "MixerCase",
    "ModelTiming",
    "OpCase",
    "OpTiming",
    "RunSettings",
    "aggregated_case",
    "bench_mixer",
    "bench_model",
    "bench_op",
    "channel_case",
    "dense_case",
    "format_markdown",
    "format_model_timings",
    "halo_case",
    "markdown_row",
    "model_peak_memory_mib",
    "neighborhood_case",
    "partition_case",
    "peak_memory_mib",
    "plot_model_timings",
    "routing_case",
    "write_csv",
    "write_model_csv",
]
