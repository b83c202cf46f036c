"""Model statistics: parameters, multiply-accumulates, smallest input, token mixers by stage, paper figures.

Multiply-accumulates (what papers call FLOPs) are counted by ``torch.utils.flop_counter`` with the
reference kernels, whose matmuls it sees, attention included. Paper figures come from
:func:`visionzoo.backbones.papers.paper_figures` (the model's ``pretrained_cfg`` for our families).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.backbones.papers import paper_figures
from visionzoo.kernels import use_backend
from visionzoo.kernels.dispatch import REFERENCE
from visionzoo.mixers import EcaGate, ElaGate, get_mixer_class, list_mixers

__all__ = ["ModelStats", "count_gmacs", "count_params", "format_model_markdown", "model_stats", "stage_mixers"]


@dataclass(frozen=True)
class ModelStats:
    model: str
    params: int
    gmacs: float
    input_size: tuple[int, int]
    min_input_size: tuple[int, int]
    mixers: str = "-"
    paper_top1: float | None = None
    paper_gmacs: float | None = None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward_once(model: nn.Module, size: tuple[int, int]) -> None:
    """One eval forward of a zero image at batch 1, on the model's device."""
    model.eval()(torch.zeros(1, 3, *size, device=next(model.parameters()).device))


def count_gmacs(model: nn.Module, size: tuple[int, int]) -> float:
    """Multiply-accumulates (what papers call FLOPs) of one eval forward at batch 1, reference kernels."""
    with torch.no_grad(), use_backend(REFERENCE), FlopCounterMode(display=False) as counter:
        _forward_once(model, size)
    return counter.get_total_flops() / 2e9


def count_aten_ops(model: nn.Module, size: tuple[int, int]) -> int:
    """Aten ops one eval forward at batch 1 dispatches with the default kernel backends (views included): the
    per-op overhead of a model on a CPU, beside its arithmetic."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        _forward_once(model, size)
    return Count.calls


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


def model_stats(name: str, input_size: tuple[int, int] | None = None) -> ModelStats:
    """Parameters and GMACs (what papers call FLOPs) of one forward pass at batch 1, with the paper's figures."""
    model = timm.create_model(name).eval()
    size = tuple(input_size or model.pretrained_cfg["input_size"][1:])
    paper = paper_figures(name)
    return ModelStats(
        name,
        count_params(model),
        count_gmacs(model, size),
        size,
        tuple(model.min_input_size),
        stage_mixers(model),
        paper.get("paper_top1"),
        paper.get("paper_gmacs"),
    )


def format_model_markdown(rows: list[ModelStats]) -> str:
    """Markdown table; the paper's GMACs are at 224x224, as the papers report them."""
    lines = [
        "| model | params | GMACs | paper GMACs | at | min input | mixers by stage | paper top-1 |",
        "| --- | ---: | ---: | ---: | --- | --- | --- | ---: |",
    ]
    lines += [
        f"| {r.model} | {r.params:,} | {r.gmacs:.2f} | {r.paper_gmacs or '-'} | {r.input_size[0]}x{r.input_size[1]} "
        f"| {r.min_input_size[0]}x{r.min_input_size[1]} | {r.mixers} | {r.paper_top1 or '-'} |"
        for r in rows
    ]
    return "\n".join(lines)
