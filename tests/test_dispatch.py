"""Kernel dispatch: backends against the reference, override precedence, export forcing reference."""

import logging

import pytest
import torch

from visionzoo.kernels import (
    ENV_VAR,
    Capability,
    KernelOp,
    dense_attention,
    dense_attention_reference,
    get_op,
    list_ops,
    use_backend,
)

DENSE = get_op("dense_attention")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _qkv(dtype=torch.float32, batch=2, heads=3, n=17, m=23, dim=8, requires_grad=True):
    shapes = [(batch, heads, n, dim), (batch, heads, m, dim), (batch, heads, m, dim)]
    return [torch.randn(s, dtype=dtype, requires_grad=requires_grad) for s in shapes]


def _grads(out, tensors):
    # randn, not randn_like: outputs may be strided differently (SDPA on CUDA), and randn_like follows the strides
    generator = torch.Generator(out.device).manual_seed(1)
    grad_out = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
    return torch.autograd.grad(out, tensors, grad_out)


@pytest.mark.parametrize("backend", [b for b in DENSE.backends if b != "reference"])
@pytest.mark.parametrize("bias_kind", [None, "float", "bool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_attention_backend_matches_reference(backend, bias_kind, dtype):
    q, k, v = _qkv(dtype)
    inputs = [q, k, v]
    bias = None
    if bias_kind == "float":
        bias = torch.randn(1, 3, 17, 23, dtype=dtype, requires_grad=True)
        inputs.append(bias)
    elif bias_kind == "bool":
        bias = torch.rand(2, 1, 17, 23) > 0.3
        bias[..., 0] = True  # no fully masked row
    scale = 0.37
    expected = dense_attention_reference(q, k, v, bias, scale)
    actual = dense_attention(q, k, v, bias, scale, backend=backend)
    torch.testing.assert_close(actual, expected, atol=TOL[dtype], rtol=TOL[dtype])
    for got, want in zip(_grads(actual, inputs), _grads(expected, inputs), strict=True):
        torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


def test_reference_is_plain_softmax_attention():
    q, k, v = _qkv(requires_grad=False)
    weights = torch.einsum("bhnd,bhmd->bhnm", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
    expected = torch.einsum("bhnm,bhmd->bhnd", weights, v)
    torch.testing.assert_close(dense_attention_reference(q, k, v), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_is_finite_and_close_in_half_precision(dtype):
    q, k, v = (t.to(dtype) for t in _qkv(requires_grad=False))
    assert torch.isfinite(dense_attention_reference(q * 100, k * 100, v)).all()
    expected = dense_attention_reference(*(t.double() for t in (q, k, v)))
    torch.testing.assert_close(dense_attention_reference(q, k, v).double(), expected, atol=5e-2, rtol=5e-2)


def test_sdpa_declines_mixed_dtypes_with_reason(caplog):
    q, k, v = _qkv(requires_grad=False)
    bias = torch.zeros(17, 23, dtype=torch.float64)
    with caplog.at_level(logging.DEBUG, logger="visionzoo.kernels"):
        assert DENSE.choose(q, k, v, bias, None) == "reference"
    assert "sdpa declined: bias dtype torch.float64" in caplog.text
    with pytest.raises(RuntimeError, match="'sdpa' cannot run these inputs: bias dtype"):
        dense_attention(q, k, v, bias, backend="sdpa")


def test_unknown_backend_names_are_rejected(monkeypatch):
    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(ValueError, match="has no backend 'triton'; it has: sdpa, reference"):
        dense_attention(q, k, v, backend="triton")
    monkeypatch.setenv(ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="unknown kernel backend 'tpu'"):
        dense_attention(q, k, v)


@pytest.fixture
def spy_op():
    """An op whose fast backend records its calls: it exercises the dispatcher itself."""
    calls = []

    def reference(x):
        calls.append("reference")
        return x * 2

    op = KernelOp("test_spy_op", reference)

    @op.register("sdpa", lambda x: Capability.yes() if x.dtype == torch.float32 else Capability.no("not fp32"))
    def fast(x):
        calls.append("sdpa")
        return x + x

    @op.register("triton", lambda x: Capability.no("no GPU here"))
    def never(x):  # pragma: no cover - declined
        calls.append("triton")
        return x * 2

    yield op, calls
    from visionzoo.kernels import dispatch

    del dispatch._OPS["test_spy_op"]


def test_auto_walks_backends_in_order(spy_op, caplog):
    op, calls = spy_op
    assert op.backends == ["sdpa", "triton", "reference"]
    with caplog.at_level(logging.DEBUG, logger="visionzoo.kernels"):
        op(torch.ones(2))
        op(torch.ones(2, dtype=torch.float64))
    assert calls == ["sdpa", "reference"]
    assert "sdpa declined: not fp32" in caplog.text and "triton declined: no GPU here" in caplog.text


def test_override_precedence(spy_op, monkeypatch):
    op, _ = spy_op
    x = torch.ones(2)
    assert op.choose(x) == "sdpa"
    monkeypatch.setenv(ENV_VAR, "reference")
    assert op.choose(x) == "reference"  # environment beats auto
    with use_backend("sdpa"):
        assert op.choose(x) == "sdpa"  # context beats environment
        assert op.choose(x, backend="reference") == "reference"  # explicit beats context
        with use_backend("auto"):
            assert op.choose(x) == "sdpa"  # an inner auto lifts the outer force, and the environment
    monkeypatch.setenv(ENV_VAR, "natten")  # a backend other ops have but this one lacks: auto
    assert op.choose(x) == "sdpa"
    monkeypatch.setenv(ENV_VAR, "triton")  # forced but declined: an error, not a silent fallback
    with pytest.raises(RuntimeError, match="'triton' cannot run these inputs: no GPU here"):
        op(x)


def test_registration_checks_names(spy_op):
    op, _ = spy_op
    with pytest.raises(ValueError, match="already registered"):
        op.register("sdpa", lambda x: Capability.yes())
    with pytest.raises(ValueError, match="backend names are"):
        op.register("cuda_magic", lambda x: Capability.yes())
    with pytest.raises(ValueError, match="already registered"):
        KernelOp("test_spy_op", lambda x: x)
    assert "test_spy_op" in list_ops()


class _SpyModule(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x, backend="sdpa")


def test_tracing_and_export_force_reference(spy_op, tmp_path):
    op, calls = spy_op
    module, x = _SpyModule(op), torch.ones(1, 3)
    module(x)
    assert calls == ["sdpa"]
    calls.clear()
    torch.jit.trace(module, x, check_trace=False)
    assert calls == ["reference"]
    calls.clear()
    torch.onnx.export(module, (x,), str(tmp_path / "spy.onnx"), dynamo=False)
    assert set(calls) == {"reference"}
    calls.clear()
    torch.export.export(module, (x,))
    assert set(calls) == {"reference"}


def test_exportable_flag_makes_mixers_take_reference(monkeypatch):
    from timm.layers import set_layer_config

    from visionzoo import create_mixer

    mixer = create_mixer("global", 16, num_heads=2, backend="sdpa")
    assert mixer.kernel_backend == "sdpa"
    with set_layer_config(exportable=True):
        assert mixer.kernel_backend == "reference"


CUDA_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", list(CUDA_TOL))
@pytest.mark.parametrize("shape", [(2, 4, 3136, 32), (8, 8, 196, 64), (1, 2, 77, 128)])
def test_dense_attention_backends_on_cuda(dtype, shape):
    _, heads, tokens, _ = shape
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, heads, tokens, tokens, device="cuda", dtype=dtype)
    expected = dense_attention_reference(q, k, v, bias)
    assert DENSE.choose(q, k, v, bias, None) == "sdpa"
    actual = dense_attention(q, k, v, bias)
    tol = CUDA_TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)
    for got, want in zip(_grads(actual, [q, k, v]), _grads(expected, [q, k, v]), strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
