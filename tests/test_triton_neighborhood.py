"""Triton neighborhood attention against the reference: interpreter on CPU, real shapes on CUDA."""

import os

import pytest
import torch

from visionzoo.kernels import get_op, neighborhood_attention

pytest.importorskip("triton")

NA = get_op("neighborhood_attention")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# conftest sets TRITON_INTERPRET without CUDA; with CUDA the CPU tests have no Triton to run on
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def _inputs(batch, heads, size, dim, kernel_size, dtype, device="cpu", rpb=True, rpb_grad=True):
    q, k, v = (torch.randn(batch, heads, *size, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    table = None
    if rpb:
        table = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, device=device, dtype=dtype)
        table.requires_grad_(rpb_grad)
    return q, k, v, table


def _upcast(tensors, dtype):
    """Same values in ``dtype``, as new leaves with the same ``requires_grad``."""
    return [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]


def _assert_close(got, want, tol):
    """Tolerance relative to the tensor's scale: gradients of the RPB table sum over every query."""
    atol = tol * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.to(want.dtype), want, atol=atol, rtol=tol)


def _check_against_reference(inputs, kernel_size, dilation, oracle_dtype, tol, scale=None):
    """Triton output and gradients of every input that requires grad against the reference in ``oracle_dtype``."""
    oracle_inputs = _upcast(inputs, oracle_dtype)
    actual = neighborhood_attention(*inputs[:3], kernel_size, dilation, inputs[3], scale=scale, backend="triton")
    expected = neighborhood_attention(
        *oracle_inputs[:3], kernel_size, dilation, oracle_inputs[3], scale=scale, backend="reference"
    )
    assert actual.dtype == inputs[0].dtype and actual.shape == inputs[0].shape
    _assert_close(actual, expected, tol)
    grad_out = torch.randn(actual.shape, device=actual.device, dtype=oracle_dtype)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    oracle_leaves = [t for t in oracle_inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(actual, leaves, grad_out.to(actual.dtype))
    oracle_grads = torch.autograd.grad(expected, oracle_leaves, grad_out)
    for leaf, got, want in zip(leaves, grads, oracle_grads, strict=True):
        assert got.dtype == leaf.dtype
        _assert_close(got, want, tol)


# (batch, heads, (H, W), head_dim, kernel_size, dilation, rpb): the interpreter's tiles are 4x4 queries and
# 4x8 keys, so every case has ragged tiles and several key tiles per query tile
INTERPRETER_CASES = [
    (1, 1, (3, 3), 8, 3, 1, True),  # map exactly the window; head dim below the dot's 16, padded
    (2, 2, (6, 7), 24, 3, 1, True),  # batch and heads; head dim padded to 32
    (1, 1, (9, 11), 16, 3, 2, True),  # dilation with H, W not multiples of it
    (1, 1, (7, 9), 32, 5, 1, False),
    (1, 1, (10, 7), 16, 7, 1, True),  # k = 7: the key rectangle spans two key tiles per axis
    (1, 1, (9, 10), 16, 3, 3, True),  # H = k * d exactly
    (1, 1, (12, 13), 16, 3, 1, True),  # interior query tiles
]


@interpreter
@pytest.mark.parametrize("batch, heads, size, dim, kernel_size, dilation, rpb", INTERPRETER_CASES)
def test_interpreter_matches_reference_fp32(batch, heads, size, dim, kernel_size, dilation, rpb):
    inputs = _inputs(batch, heads, size, dim, kernel_size, torch.float32, rpb=rpb)
    _check_against_reference(inputs, kernel_size, dilation, torch.float64, TOL[torch.float32])


@interpreter
@pytest.mark.parametrize("size, kernel_size, dilation", [((6, 7), 3, 1), ((9, 8), 3, 2)])
def test_interpreter_matches_reference_fp16(size, kernel_size, dilation):
    inputs = _inputs(1, 1, size, 16, kernel_size, torch.float16)
    _check_against_reference(inputs, kernel_size, dilation, torch.float32, TOL[torch.float16])


@interpreter
def test_interpreter_fp16_attention_with_an_fp32_table_as_under_autocast():
    q, k, v, table = _inputs(1, 1, (6, 7), 16, 3, torch.float16)
    table = table.detach().float().requires_grad_()  # a float32 parameter beside fp16 activations
    _check_against_reference([q, k, v, table], 3, 1, torch.float32, TOL[torch.float16])


@interpreter
def test_interpreter_custom_scale_and_frozen_rpb():
    """A table that needs no gradient (frozen or converted checkpoint) and a non-default scale."""
    inputs = _inputs(1, 1, (7, 6), 16, 3, torch.float32, rpb_grad=False)
    _check_against_reference(inputs, 3, 2, torch.float64, TOL[torch.float32], scale=0.3)


@interpreter
def test_interpreter_without_grad_matches_reference():
    q, k, v, rpb = _inputs(1, 1, (6, 7), 16, 3, torch.float32)
    with torch.no_grad():
        actual = neighborhood_attention(q, k, v, 3, 2, rpb, backend="triton")
        expected = neighborhood_attention(q, k, v, 3, 2, rpb, backend="reference")
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@interpreter
def test_triton_refuses_maps_smaller_than_the_window():
    q, k, v, _ = _inputs(1, 1, (5, 9), 16, 3, torch.float32, rpb=False)
    with pytest.raises(ValueError, match="at least kernel_size \\* dilation = 6 along each axis"):
        neighborhood_attention(q, k, v, 3, 2, backend="triton")


@interpreter
def test_auto_never_picks_triton_on_cpu():
    q, k, v, rpb = _inputs(1, 1, (8, 8), 16, 3, torch.float32)
    assert NA.supports("triton", q, k, v, 3, 1, rpb), "forced, triton runs on CPU in the interpreter"
    assert NA.choose(q, k, v, 3, 1, rpb) == "reference"
    with torch.no_grad():
        assert NA.choose(q, k, v, 3, 1, None) == "reference"


def test_triton_declines_with_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors: the interpreter, also on a GPU machine
    q, k, v, rpb = _inputs(1, 1, (8, 8), 16, 3, torch.float32)
    assert "float64" in NA.supports("triton", q.double(), k.double(), v.double(), 3, 1, None).reason
    assert NA.supports("triton", q, k, v, 3, 1, rpb.half()), "the table is read as fp32 in any precision"
    assert "mixed dtypes" in NA.supports("triton", q, k.half(), v, 3, 1, None).reason
    big = torch.randn(1, 1, 8, 8, 160)
    assert "head dim 160 above 128" in NA.supports("triton", big, big, big, 3, 1, None).reason
    many = torch.randn(1, 1, 3, 3, 16).expand(4096, 17, 3, 3, 16)
    assert "batch * heads above 65535" in NA.supports("triton", many, many, many, 3, 1, None).reason
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in NA.supports("triton", q, k, v, 3, 1, rpb).reason


def test_autotune_prune_fits_tiles_to_the_sub_grid_and_head_dim():
    import triton

    from visionzoo.kernels import triton_neighborhood

    def config(*tile):
        return triton.Config(dict(zip(("BQ_H", "BQ_W", "BK_H", "BK_W"), tile, strict=True)))

    small, wide = config(8, 8, 8, 8), config(8, 16, 8, 16)  # the prune rule, not the shipped list
    prune = triton_neighborhood._prune
    assert prune([small, wide], {"H": 56, "W": 56}, DIL=1, BLOCK_D=32) == [small, wide]
    assert prune([small, wide], {"H": 56, "W": 56}, DIL=8, BLOCK_D=32) == [small], "7x7 sub-grids"
    assert prune([small, wide], {"H": 56, "W": 56}, DIL=1, BLOCK_D=128) == [small]
    assert prune([wide], {"H": 56, "W": 56}, DIL=8, BLOCK_D=32) == [wide], "never prunes every config"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (batch, heads, size, head_dim, kernel_size, dilation, rpb): NAT stage 1 at 224 (56x56), DiNAT's k 7 dilation 8
# at 56x56, NAT at 512 (128x128)
GPU_CASES = [
    (8, 2, (56, 56), 32, 7, 1, True),
    (8, 2, (56, 56), 32, 7, 8, True),
    (8, 4, (128, 128), 32, 7, 1, False),
]


@cuda
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("batch, heads, size, dim, kernel_size, dilation, rpb", GPU_CASES)
def test_cuda_matches_reference(dtype, batch, heads, size, dim, kernel_size, dilation, rpb):
    if dtype != torch.float16 and (size, dilation) != ((56, 56), 1):
        pytest.skip("fp32 and bf16 on the first case only: every dtype and case compiles and autotunes anew")
    inputs = _inputs(batch, heads, size, dim, kernel_size, dtype, device="cuda", rpb=rpb)
    _check_against_reference(inputs, kernel_size, dilation, torch.float32, TOL[dtype])


@cuda
@pytest.mark.parametrize("dim", [16, 24, 64, 128])
def test_cuda_head_dims(dim):
    inputs = _inputs(2, 2, (29, 43), dim, 7, torch.float16, device="cuda")
    _check_against_reference(inputs, 7, 2, torch.float32, TOL[torch.float16])


@cuda
def test_cuda_batch_64():
    inputs = _inputs(64, 2, (56, 56), 32, 7, torch.float16, device="cuda")
    _check_against_reference(inputs, 7, 1, torch.float32, TOL[torch.float16])


@cuda
def test_auto_picks_triton_on_cuda_with_rpb():
    q, k, v, rpb = _inputs(1, 2, (14, 14), 32, 7, torch.float16, device="cuda")
    assert NA.choose(q, k, v, 7, 1, rpb) == "triton"
    if not NA.supports("natten", q, k, v, 7, 1, None):
        assert NA.choose(q, k, v, 7, 1, None) == "triton"
