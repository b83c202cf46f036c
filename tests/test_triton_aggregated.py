"""The fused Triton aggregated attention against the reference: interpreter on CPU, real shapes on CUDA."""

import os

import pytest
import torch
from test_aggregated import make_inputs

from visionzoo.kernels import aggregated_attention, get_op
from visionzoo.mixers import create_mixer

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_triton_here = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _run(inputs, window, backend, grad=True):
    """Output and the gradients of every input under a fixed, non-uniform upstream gradient."""
    inputs = {name: t.detach().clone().requires_grad_(grad) for name, t in inputs.items()}
    out = aggregated_attention(**inputs, window_size=window, backend=backend)
    if not grad:
        return out.detach(), {}
    upstream = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=torch.float64).reshape(out.shape)
    out.backward(upstream.to(out.dtype))
    return out.detach(), {name: t.grad for name, t in inputs.items()}


def _assert_close(got, expected, tol, name):
    """Max error relative to the largest magnitude (gradients summed over many queries grow with them)."""
    scale = expected.abs().max().item() + 1e-6
    error = (got.double() - expected.double()).abs().max().item()
    assert error <= tol * max(scale, 1.0), f"{name}: max error {error:.3g} for magnitude {scale:.3g}, tol {tol}"


def _check_against_reference(inputs, window, dtype):
    """Triton in ``dtype`` against the reference in float64 on the same (rounded) inputs."""
    inputs = {name: t.to(DEVICE, dtype) for name, t in inputs.items()}
    out, grads = _run(inputs, window, "triton")
    expected, expected_grads = _run({n: t.double() for n, t in inputs.items()}, window, "reference")
    assert out.dtype == dtype and all(grads[n].dtype == dtype for n in grads)
    tol = TOLERANCES[dtype]
    _assert_close(out, expected, tol, "out")
    for name, grad in grads.items():
        _assert_close(grad, expected_grads[name], tol, name)


# (batch, heads, height, width, head_dim, pool tokens, window): ragged maps (not multiples of the
# 16-query interpreter tile), H != W, pooled keys over several 16-key tiles, maps smaller than the
# window, 1x1 and 2x2 maps (every border masked), P = 1, head dims 16, 24 and 32.
INTERPRETER_CASES = [
    (2, 2, 4, 5, 16, 6, 3),
    (1, 1, 3, 9, 32, 20, 3),
    (1, 1, 4, 6, 24, 3, 5),
    (1, 1, 2, 3, 16, 2, 5),
    (1, 1, 1, 1, 32, 1, 3),
    (1, 2, 2, 2, 24, 1, 3),
]


@needs_triton_here
@pytest.mark.parametrize("batch,heads,height,width,dim,pool,window", INTERPRETER_CASES)
def test_triton_matches_reference_float32(batch, heads, height, width, dim, pool, window):
    inputs = make_inputs(batch, heads, height, width, dim, pool, window)
    _check_against_reference(inputs, window, torch.float32)


@needs_triton_here
def test_triton_matches_reference_float16():
    inputs = make_inputs(1, 2, 5, 4, 24, 18, 3)
    _check_against_reference(inputs, 3, torch.float16)


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
    args = (*make_inputs(1, 1, 4, 4, 16, 2, 3).values(), 3)
    assert op.choose(*args) == "reference"  # never automatic on CPU
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
    inputs = make_inputs(**{"batch": 1, "heads": 1, "height": 3, "width": 3, "dim": 16, "pool": 2} | change)
    verdict = get_op("aggregated_attention").supports("triton", *inputs.values(), 3)
    assert not verdict and reason in verdict.reason


def test_triton_declines_mixed_dtypes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = make_inputs(1, 1, 3, 3, 16, 2, 3)
    inputs["v"] = inputs["v"].half()
    verdict = get_op("aggregated_attention").supports("triton", *inputs.values(), 3)
    assert not verdict and "mixed dtypes" in verdict.reason


# Real shapes: transnext_micro's first stage at 224 (56x56, pool 7x7) and 640 (160x160, pool 20x20),
# head dim 24; the 56x56 and 128x128 maps with head dim 32 (pool = size / 8); window 5 and
# wide, ragged head dims.
GPU_CASES = [
    (2, 2, 56, 56, 24, 49, 3),
    (1, 2, 160, 160, 24, 400, 3),
    (4, 2, 56, 56, 32, 49, 3),
    (2, 2, 128, 128, 32, 256, 3),
    (2, 2, 45, 61, 128, 35, 5),
    (2, 3, 33, 20, 80, 12, 5),
    (2, 2, 19, 23, 16, 1, 3),
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,heads,height,width,dim,pool,window", GPU_CASES)
def test_triton_matches_reference_on_gpu(batch, heads, height, width, dim, pool, window, dtype):
    inputs = make_inputs(batch, heads, height, width, dim, pool, window)
    _check_against_reference(inputs, window, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_auto_picks_triton_on_gpu(dtype):
    inputs = {name: t.to("cuda", dtype) for name, t in make_inputs(2, 2, 8, 8, 32, 4, 3).items()}
    assert get_op("aggregated_attention").choose(*inputs.values(), 3) == "triton"


@needs_cuda
def test_triton_needs_less_memory_than_reference_on_gpu():
    inputs = {name: t.cuda() for name, t in make_inputs(8, 2, 56, 56, 32, 49, 3).items()}
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
