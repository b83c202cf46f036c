"""Triton neighborhood attention: refusals, dispatch and autotune pruning (parity: test_backend_parity.py)."""

import os

import pytest
import torch

from visionzoo.kernels import get_op, neighborhood_attention

pytest.importorskip("triton")

NA = get_op("neighborhood_attention")
# conftest sets TRITON_INTERPRET without CUDA; with CUDA the CPU tests have no Triton to run on
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def _inputs(batch, heads, size, dim, kernel_size, dtype, device="cpu", rpb=True):
    q, k, v = (torch.randn(batch, heads, *size, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    table = None
    if rpb:
        table = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, device=device, dtype=dtype)
        table.requires_grad_()
    return q, k, v, table


@interpreter
def test_triton_refuses_maps_smaller_than_the_window():
    q, k, v, _ = _inputs(1, 1, (5, 9), 16, 3, torch.float32, rpb=False)
    with pytest.raises(ValueError, match="at least kernel_size \\* dilation = 6 along each axis"):
        neighborhood_attention(q, k, v, 3, 2, backend="triton")


@interpreter
def test_auto_never_picks_triton_on_cpu():
    q, k, v, rpb = _inputs(1, 1, (8, 8), 16, 3, torch.float32)
    assert NA.supports("triton", q, k, v, 3, 1, rpb), "forced, triton runs on CPU in the interpreter"
    assert NA.choose(q, k, v, 3, 1, rpb) == "tiled"
    with torch.no_grad():
        assert NA.choose(q, k, v, 3, 1, None) == "tiled"


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


@cuda
def test_auto_picks_triton_on_cuda_with_rpb():
    q, k, v, rpb = _inputs(1, 2, (14, 14), 32, 7, torch.float16, device="cuda")
    assert NA.choose(q, k, v, 7, 1, rpb) == "triton"
    if not NA.supports("natten", q, k, v, 7, 1, None):
        assert NA.choose(q, k, v, 7, 1, None) == "triton"
