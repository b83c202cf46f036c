"""Neighborhood attention: the reference against a brute-force per-query oracle (every other backend against the
reference: test_backend_parity.py)."""

import pytest
import torch
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx

from visionzoo.kernels import get_op, neighborhood_attention, neighborhood_attention_reference, neighborhood_windows
from visionzoo.kernels import tiles as tiles_module
from visionzoo.kernels.tiles import neighborhood_bias, neighborhood_tile_size, neighborhood_tiles, tiled_attention

from oracles import brute_force, natten_pb_start, natten_window_start

NA = get_op("neighborhood_attention")


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
            start = natten_window_start(i, length, kernel_size, dilation)
            assert keys[i].tolist() == [start + a * dilation for a in range(kernel_size)]
            pb = natten_pb_start(i, length, kernel_size, dilation)
            assert bias_index[i].tolist() == list(range(pb, pb + kernel_size))
            assert i in keys[i].tolist(), "a query always sees itself"


@pytest.mark.parametrize("kernel_size, dilation", [(3, 1), (3, 2), (7, 3)])
def test_windows_built_from_symbolic_sizes_equal_the_cached_ones(kernel_size, dilation):
    """Traced with a symbolic length (torch.export, ONNX), the windows come from ``torch.arange`` in the graph."""
    span = kernel_size * dilation
    traced = make_fx(lambda x: neighborhood_windows(x.shape[0], kernel_size, dilation), tracing_mode="symbolic")(
        torch.empty(2 * span + 1)
    )
    for length in (span, span + 1, 3 * span + 2):
        for got, want in zip(traced(torch.empty(length)), neighborhood_windows(length, kernel_size, dilation)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_reference_traced_with_symbolic_sizes_matches_eager_at_other_sizes():
    q, k, v, rpb = (t.detach() for t in _inputs(9, 8, 3, True, dtype=torch.float32))
    traced = make_fx(lambda q, k, v, rpb: neighborhood_attention(q, k, v, 3, 2, rpb), tracing_mode="symbolic")(
        q, k, v, rpb
    )
    for size in [(6, 11), (13, 6)]:
        q, k, v, _ = (t.detach() for t in _inputs(*size, 3, True, dtype=torch.float32))
        want = neighborhood_attention(q, k, v, 3, 2, rpb, backend="reference")
        torch.testing.assert_close(traced(q, k, v, rpb), want, atol=0, rtol=0)


class _Neighborhood(torch.nn.Module):
    def forward(self, q, k, v, rpb):
        return neighborhood_attention(q, k, v, 3, 2, rpb)


def test_reference_exports_with_dynamic_sizes():
    """torch.export with dynamic batch, H and W (from the window's span up) through the reference."""
    maps = {0: Dim("batch", min=1, max=8), 2: Dim("height", min=6, max=64), 3: Dim("width", min=6, max=64)}
    q, k, v, rpb = (t.detach() for t in _inputs(9, 8, 3, True, dtype=torch.float32))
    program = torch.export.export(_Neighborhood(), (q, k, v, rpb), dynamic_shapes=(maps, maps, maps, None)).module()
    for size in [(6, 6), (13, 7)]:
        q, k, v, _ = (t.detach() for t in _inputs(*size, 3, True, dtype=torch.float32))
        want = neighborhood_attention(q, k, v, 3, 2, rpb, backend="reference")
        torch.testing.assert_close(program(q, k, v, rpb), want, atol=0, rtol=0)


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


@pytest.mark.parametrize("kernel_size, dilation, height, width", CASES)
@pytest.mark.parametrize("with_rpb", [False, True])
def test_tiled_matches_reference_at_every_tile_size(kernel_size, dilation, height, width, with_rpb, monkeypatch):
    """Tiles of one query, of a few, of the window's size and larger than a dilation group, forward and gradients;
    inference one tile at a time (the smallest chunks)."""
    q, k, v, rpb = _inputs(height, width, kernel_size, with_rpb)
    tensors = [t for t in (q, k, v, rpb) if t is not None]
    want = neighborhood_attention_reference(q, k, v, kernel_size, dilation, rpb)
    want_grads = _grads(want, tensors)
    group = -(-max(height, width) // dilation)
    for tile in sorted({1, 2, kernel_size, group, group + 3}):
        tiles = neighborhood_tiles(height, width, kernel_size, dilation, tile, q.device)
        got = tiled_attention(q, k, v, tiles, neighborhood_bias(rpb, tiles, kernel_size, q))
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=f"tile {tile}")
        for g, w in zip(_grads(got, tensors), want_grads, strict=True):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=f"tile {tile}")
        with torch.no_grad(), monkeypatch.context() as patch:
            patch.setattr(tiles_module, "_CHUNK_BYTES", 1)
            got = tiled_attention(q, k, v, tiles, neighborhood_bias(rpb, tiles, kernel_size, q))
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=f"tile {tile}, no grad")


@pytest.mark.parametrize("kernel_size, dilation, height, width", [*CASES, (7, 1, 56, 56), (7, 8, 56, 56)])
def test_tiles_compute_every_query_once_and_grow_linearly(kernel_size, dilation, height, width):
    tile = neighborhood_tile_size(height, width, kernel_size, dilation)
    tiles = neighborhood_tiles(height, width, kernel_size, dilation, tile, torch.device("cpu"))
    positions = torch.arange(height * width)
    torch.testing.assert_close(tiles.queries[tiles.outputs], positions, atol=0, rtol=0)
    assert set(tiles.keys.tolist()) == set(positions.tolist())
    for offsets, length in ((tiles.row_offsets, height), (tiles.col_offsets, width)):
        assert ((offsets >= 0).sum(-1) == kernel_size).all(), "every query slot sees exactly its window"
        assert offsets.shape[1:] == (tile, min(tile + kernel_size - 1, -(-length // dilation)))

    def axis_tiles(length):  # ceil(group / tile) per dilation group: the work is linear in tokens
        return sum(-(-((length - group + dilation - 1) // dilation) // tile) for group in range(dilation))

    assert tiles.count == axis_tiles(height) * axis_tiles(width)


def test_tile_size_keeps_small_maps_whole_and_tiles_large_ones():
    assert neighborhood_tile_size(14, 14, 7, 1) == 14, "NAT stage 3: the map is one tile"
    assert neighborhood_tile_size(56, 56, 7, 8) == 7, "DiNAT's dilation 8 at 56x56: one tile per group"
    assert 4 <= neighborhood_tile_size(56, 56, 7, 1) <= 8
    assert 4 <= neighborhood_tile_size(200, 334, 7, 1) <= 8, "detection scale: small tiles"


def test_cpu_takes_the_tiled_path_and_natten_flex_decline_training_with_reason():
    pytest.importorskip("natten")
    q, k, v, rpb = _inputs(8, 8, 3, True, dtype=torch.float32)
    assert not NA.supports("natten", q, k, v, 3, 1, None)
    assert "forward-only" in NA.supports("flex", q, k, v, 3, 1, rpb).reason
    assert "no relative position bias" in NA.supports("natten", q, k, v, 3, 1, rpb).reason
    assert NA.choose(q, k, v, 3, 1, rpb) == "tiled"
    with torch.no_grad():
        assert NA.choose(q, k, v, 3, 1, None) == "tiled", "natten/flex are slower than the reference on CPU"
        assert NA.choose(q.half(), k.half(), v.half(), 3, 1, None) == "reference", "tiled takes fp32/fp64 only"


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
