"""The fused Triton aggregated attention: the mixer on it, dispatch, refusals and memory (the op against the
reference: test_backend_parity.py)."""

import os

import pytest
import torch

from visionzoo.kernels import aggregated_attention, get_op
from visionzoo.mixers import create_mixer

from oracles import make_aggregated_inputs

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_triton_here = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"


def _run(inputs, window, backend, grad=True):
    """Output and the gradients of every input under a fixed, non-uniform upstream gradient."""
    inputs = {name: t.detach().clone().requires_grad_(grad and t.is_floating_point()) for name, t in inputs.items()}
    out = aggregated_attention(**inputs, window_size=window, backend=backend)
    if not grad:
        return out.detach(), {}
    upstream = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=torch.float64).reshape(out.shape)
    out.backward(upstream.to(out.dtype))
    return out.detach(), {name: t.grad for name, t in inputs.items() if t.is_floating_point()}


@needs_triton_here
def test_mixer_with_triton_backend_matches_reference():
    # non-contiguous q/k/v from the mixer's permutes, a real CPB pool bias
    mixer = create_mixer("aggregated", 16, num_heads=1, sr_ratio=2, pretrain_size=8).to(DEVICE)
    x = torch.randn(1, 4, 5, 16, device=DEVICE, requires_grad=True)
    outs, grads = [], []
    for backend in ("triton", "reference"):
        mixer.backend = backend
        mixer.zero_grad()
        x.grad = None
        out = mixer(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([x.grad, *(p.grad for p in mixer.parameters())])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_dispatch_on_cpu(monkeypatch):
    op = get_op("aggregated_attention")
    args = (*make_aggregated_inputs(1, 1, 4, 4, 16, 2, 3).values(), 3)
    assert op.choose(*args) == "tiled"  # on CPU auto takes the tiles, never triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert op.supports("triton", *args)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in op.supports("triton", *args).reason


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(dim=8), "head dim 8"),
        (dict(dim=136), "head dim 136"),
        (dict(dtype=torch.float64), "float64"),
    ],
)
def test_triton_declines_with_a_reason(monkeypatch, change, reason):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = make_aggregated_inputs(**{"batch": 1, "heads": 1, "height": 3, "width": 3, "dim": 16, "pool": 2} | change)
    verdict = get_op("aggregated_attention").supports("triton", *inputs.values(), 3)
    assert not verdict and reason in verdict.reason


def test_triton_declines_mixed_dtypes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = make_aggregated_inputs(1, 1, 3, 3, 16, 2, 3)
    inputs["v"] = inputs["v"].half()
    verdict = get_op("aggregated_attention").supports("triton", *inputs.values(), 3)
    assert not verdict and "mixed dtypes" in verdict.reason


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_auto_picks_triton_on_gpu(dtype):
    inputs = make_aggregated_inputs(2, 2, 8, 8, 32, 4, 3)
    inputs = {name: t.to("cuda", dtype if t.is_floating_point() else t.dtype) for name, t in inputs.items()}
    assert get_op("aggregated_attention").choose(*inputs.values(), 3) == "triton"


@needs_cuda
def test_triton_needs_less_memory_than_reference_on_gpu():
    inputs = {name: t.cuda() for name, t in make_aggregated_inputs(8, 2, 56, 56, 32, 49, 3).items()}
    peaks = {}
    for backend in ("triton", "reference"):
        _run(inputs, 3, backend)  # warm-up (autotuning)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _run(inputs, 3, backend)
        torch.cuda.synchronize()
        peaks[backend] = torch.cuda.max_memory_allocated() - base
    assert peaks["triton"] <= peaks["reference"] / 2, peaks
