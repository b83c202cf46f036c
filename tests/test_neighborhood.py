"""Neighborhood attention: every backend against a brute-force per-query oracle."""

import itertools

import pytest
import torch

from visionzoo.kernels import get_op, neighborhood_attention, neighborhood_attention_reference, neighborhood_windows

NA = get_op("neighborhood_attention")


def _natten_window_start(index, length, kernel_size, dilation):
    """NATTEN's scalar ``get_window_start`` (natten_cpu_commons.h), the rule NAT/DiNAT trained with."""
    half = kernel_size // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    start = index - half * dilation
    if start < 0:
        return index % dilation
    if index + half * dilation >= length:
        remainder = index % dilation
        whole = (length // dilation) * dilation
        extra = length - whole
        if remainder < extra:
            return length - extra + remainder - 2 * half * dilation
        return whole + remainder - kernel_size * dilation
    return start


def _natten_pb_start(index, length, kernel_size, dilation):
    """NATTEN's scalar ``get_pb_start``."""
    half = kernel_size // 2
    if dilation <= 1:
        return half + (index < half) * (half - index) + (index + half >= length) * (length - index - 1 - half)
    if index - half * dilation < 0:
        return kernel_size - 1 - index // dilation
    if index + half * dilation >= length:
        return (length - index - 1) // dilation
    return half


def brute_force(q, k, v, kernel_size, dilation, rpb, scale):
    """One query at a time, straight from NATTEN's index rules."""
    batch, heads, height, width, dim = q.shape
    out = torch.zeros_like(q)
    for i, j in itertools.product(range(height), range(width)):
        si, sj = (_natten_window_start(p, n, kernel_size, dilation) for p, n in ((i, height), (j, width)))
        pi, pj = (_natten_pb_start(p, n, kernel_size, dilation) for p, n in ((i, height), (j, width)))
        rows = [si + a * dilation for a in range(kernel_size)]
        cols = [sj + b * dilation for b in range(kernel_size)]
        keys = k[:, :, rows][:, :, :, cols].reshape(batch, heads, -1, dim)
        values = v[:, :, rows][:, :, :, cols].reshape(batch, heads, -1, dim)
        logits = torch.einsum("bhd,bhnd->bhn", q[:, :, i, j] * scale, keys)
        if rpb is not None:
            logits = logits + rpb[:, pi : pi + kernel_size, pj : pj + kernel_size].reshape(1, heads, -1)
        out[:, :, i, j] = torch.einsum("bhn,bhnd->bhd", logits.softmax(-1), values)
    return out


def _inputs(height, width, kernel_size, with_rpb, heads=2, dim=4, dtype=torch.float64):
    q, k, v = (torch.randn(2, heads, height, width, dim, dtype=dtype, requires_grad=True) for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, dtype=dtype, requires_grad=True)
    return q, k, v, (rpb if with_rpb else None)


def _grads(out, tensors):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, grad_out)


# (kernel_size, dilation, height, width): multiples and non-multiples of k*d, and maps of exactly k*d
CASES = [
    (3, 1, 3, 3),
    (3, 1, 7, 10),
    (3, 2, 6, 11),
    (3, 3, 13, 9),
    (5, 1, 5, 12),
    (5, 2, 11, 10),
    (5, 3, 16, 15),
    (7, 1, 7, 9),
    (7, 2, 15, 14),
    (7, 3, 21, 23),
]


@pytest.mark.parametrize("kernel_size, dilation, height, width", CASES)
def test_windows_match_natten_scalar_rules(kernel_size, dilation, height, width):
    for length in (height, width):
        keys, bias_index = neighborhood_windows(length, kernel_size, dilation)
        for i in range(length):
            start = _natten_window_start(i, length, kernel_size, dilation)
            assert keys[i].tolist() == [start + a * dilation for a in range(kernel_size)]
            pb = _natten_pb_start(i, length, kernel_size, dilation)
            assert bias_index[i].tolist() == list(range(pb, pb + kernel_size))
            assert i in keys[i].tolist(), "a query always sees itself"


@pytest.mark.parametrize("with_rpb", [False, True])
@pytest.mark.parametrize("kernel_size, dilation, height, width", CASES)
def test_reference_matches_brute_force(kernel_size, dilation, height, width, with_rpb):
    q, k, v, rpb = _inputs(height, width, kernel_size, with_rpb)
    inputs = [t for t in (q, k, v, rpb) if t is not None]
    expected = brute_force(q, k, v, kernel_size, dilation, rpb, scale=0.5)
    actual = neighborhood_attention(q, k, v, kernel_size, dilation, rpb, scale=0.5, backend="reference")
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)
    for got, want in zip(_grads(actual, inputs), _grads(expected, inputs), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_reference_without_grad_matches_autograd_path():
    q, k, v, rpb = _inputs(9, 8, 3, True, dtype=torch.float32)
    with_grad = neighborhood_attention_reference(q, k, v, 3, 2, rpb)
    with torch.no_grad():
        without = neighborhood_attention_reference(q, k, v, 3, 2, rpb)
    torch.testing.assert_close(with_grad, without, atol=0, rtol=0)


def test_reference_gradcheck():
    q, k, v, rpb = _inputs(6, 7, 3, True, heads=1, dim=2)
    assert torch.autograd.gradcheck(
        lambda *t: neighborhood_attention_reference(*t[:3], 3, 2, t[3]), (q[:1], k[:1], v[:1], rpb)
    )


@pytest.mark.parametrize("size", [(2, 9), (5, 4)])
def test_maps_smaller_than_the_window_are_refused(size):
    q, k, v, _ = _inputs(*size, 3, False)
    with pytest.raises(ValueError, match="at least kernel_size \\* dilation = 6 along each axis"):
        neighborhood_attention(q, k, v, 3, 2)


def test_even_kernel_is_refused():
    q, k, v, _ = _inputs(8, 8, 3, False)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        neighborhood_attention(q, k, v, 4)


def _forward_only_backends():
    return [b for b in NA.backends if b != "reference"]


@pytest.mark.parametrize("backend", _forward_only_backends())
@pytest.mark.parametrize("kernel_size, dilation, height, width", [(3, 1, 7, 10), (3, 2, 6, 11), (5, 3, 16, 15)])
def test_fast_backends_forward_on_cpu(backend, kernel_size, dilation, height, width):
    """On CPU natten and flex run forward only; outputs must match the oracle."""
    q, k, v, _ = _inputs(height, width, kernel_size, False, dim=8, dtype=torch.float32)
    with_rpb = backend == "flex"
    rpb = torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1) if with_rpb else None
    with torch.no_grad():
        verdict = NA.supports(backend, q, k, v, kernel_size, dilation, rpb)
        if not verdict:  # e.g. a GPU machine without natten, or without Triton's interpreter for CPU tensors
            pytest.skip(verdict.reason)
        expected = brute_force(q, k, v, kernel_size, dilation, rpb, scale=8**-0.5)
        actual = neighborhood_attention(q, k, v, kernel_size, dilation, rpb, backend=backend)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_fast_backends_decline_cpu_training_with_reason():
    pytest.importorskip("natten")
    q, k, v, rpb = _inputs(8, 8, 3, True, dtype=torch.float32)
    assert not NA.supports("natten", q, k, v, 3, 1, None)
    assert "forward-only" in NA.supports("flex", q, k, v, 3, 1, rpb).reason
    assert "no relative position bias" in NA.supports("natten", q, k, v, 3, 1, rpb).reason
    assert NA.choose(q, k, v, 3, 1, rpb) == "reference"
    with torch.no_grad():
        assert NA.choose(q, k, v, 3, 1, None) == "reference", "natten/flex are slower than the reference on CPU"


GPU_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", list(GPU_TOL))
@pytest.mark.parametrize("backend", _forward_only_backends())
@pytest.mark.parametrize("kernel_size, dilation, size", [(7, 1, (56, 56)), (7, 2, (29, 43))])
def test_fast_backends_on_cuda(backend, dtype, kernel_size, dilation, size):
    heads, dim = 4, 32
    q, k, v = (torch.randn(2, heads, *size, dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    rpb = None
    if backend == "flex":
        rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, device="cuda", dtype=dtype)
        rpb.requires_grad_()
    inputs = [t for t in (q, k, v, rpb) if t is not None]
    verdict = NA.supports(backend, q, k, v, kernel_size, dilation, rpb)
    if not verdict:
        pytest.skip(verdict.reason)
    expected = neighborhood_attention(q, k, v, kernel_size, dilation, rpb, backend="reference")
    actual = neighborhood_attention(q, k, v, kernel_size, dilation, rpb, backend=backend)
    tol = GPU_TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)
    grad_out = torch.randn(actual.shape, device="cuda", dtype=dtype)
    for got, want in zip(
        torch.autograd.grad(actual, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out), strict=True
    ):
        torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol)


def test_mixer_exports_to_onnx_through_the_reference(tmp_path):
    import onnxruntime

    from visionzoo import create_mixer

    mixer = create_mixer("neighborhood", 32, num_heads=2, kernel_size=3, dilation=2).eval()
    x = torch.randn(1, 9, 11, 32)
    path = tmp_path / "na.onnx"
    torch.onnx.export(mixer, (x,), str(path), dynamo=False, opset_version=17)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), mixer(x), atol=1e-5, rtol=1e-5)


def test_reference_trains_with_mixed_precision_inputs():
    """Under autocast the activations are half precision and the table float32; the output and every
    gradient keep their input's dtype."""
    q, k, v, rpb = _inputs(9, 10, 3, True, dtype=torch.bfloat16)
    rpb = rpb.detach().float().requires_grad_()
    out = neighborhood_attention(q, k, v, 3, 1, rpb, backend="reference")
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and rpb.grad.dtype == torch.float32 and q.grad.dtype == torch.bfloat16
