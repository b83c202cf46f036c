"""Aggregated attention (TransNeXt): the op against a dense oracle, backends, mixers and dynamic sizes."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from visionzoo.kernels import (
    adaptive_avg_pool,
    aggregated,
    aggregated_attention,
    aggregated_attention_unfold,
    get_op,
    length_scale,
    pooled_position_coords,
    tiles,
)
from visionzoo.mixers import create_mixer

from oracles import make_aggregated_inputs


def dense_oracle(q, k, v, k_pool, v_pool, embedding, logit_scale, rpb, cpb, rows, cols, tokens, token_bias, window):
    """Dense attention over the explicit union of every query's window keys and the pooled keys."""
    batch, heads, height, width, dim = q.shape
    n, radius = height * width, window // 2
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pool_ys, pool_xs = torch.meshgrid(torch.arange(rows.shape[1]), torch.arange(cols.shape[1]), indexing="ij")
    pair_rows = rows[ys.reshape(-1, 1), pool_ys.reshape(1, -1)]  # (N, P): the table row of each pair
    pair_cols = cols[xs.reshape(-1, 1), pool_xs.reshape(1, -1)]
    pool_bias = torch.stack([table[pair_rows, pair_cols] for table in cpb])
    dy = ys.reshape(1, -1) - ys.reshape(-1, 1)  # key row - query row, (N, N)
    dx = xs.reshape(1, -1) - xs.reshape(-1, 1)
    in_window = (dy.abs() <= radius) & (dx.abs() <= radius)
    offset = ((dy + radius) * window + dx + radius).clamp(0, window * window - 1)  # row-major window position
    count = in_window.sum(-1).double()

    q_norm = F.normalize(q.reshape(batch, heads, n, dim), dim=-1)
    q_hat = (q_norm + embedding[:, None]) * logit_scale[:, None, None]
    q_hat = q_hat * torch.log(count + k_pool.shape[2]).float().to(q.dtype)[:, None]
    keys = F.normalize(k.reshape(batch, heads, n, dim), dim=-1)
    local = q_hat @ keys.transpose(-2, -1) + rpb[:, offset]
    local = local.masked_fill(~in_window, float("-inf"))
    pooled = q_hat @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + pool_bias
    weights = torch.cat([local, pooled], -1).softmax(-1)
    # learnable tokens: (q_norm @ tokens + token_bias) at window offset, zero outside the window
    token_weights = q_norm @ tokens + token_bias[:, None]  # (B, heads, N, window^2)
    token_weights = torch.gather(token_weights, -1, offset.expand(batch, heads, n, n)) * in_window
    out = (weights[..., :n] + token_weights) @ v.reshape(batch, heads, n, dim) + weights[..., n:] @ v_pool
    return out.reshape(batch, heads, height, width, dim)


def _grads(fn, inputs):
    """Output and the gradient of every floating-point input (not of the integer pooled-bias indices)."""
    inputs = {name: t.detach().clone().requires_grad_(t.is_floating_point()) for name, t in inputs.items()}
    out = fn(**inputs)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    return out.detach(), {name: t.grad for name, t in inputs.items() if t.is_floating_point()}


@pytest.mark.parametrize("window,size", [(3, (5, 7)), (5, (4, 6)), (3, (1, 3))])
def test_reference_equals_dense_oracle(window, size):
    inputs = make_aggregated_inputs(height=size[0], width=size[1], window=window)
    out, grads = _grads(lambda **t: aggregated_attention(**t, window_size=window, backend="reference"), inputs)
    expected, expected_grads = _grads(lambda **t: dense_oracle(*t.values(), window), inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_official_unfold_formulation_matches_reference():
    inputs = make_aggregated_inputs(height=6, width=5, pool=4)
    out, grads = _grads(lambda **t: aggregated_attention_unfold(**t, window_size=3), inputs)
    expected, expected_grads = _grads(lambda **t: aggregated_attention(**t, window_size=3, backend="reference"), inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_flex_is_forward_only_on_cpu_and_not_automatic():
    inputs = make_aggregated_inputs()
    inputs["q"].requires_grad_()
    op = get_op("aggregated_attention")
    assert not op.supports("flex", *inputs.values(), 3)
    assert op.choose(*inputs.values(), 3) == "tiled"
    half = {name: t.half() for name, t in inputs.items()}
    assert op.choose(*half.values(), 3) == "reference", "tiled takes float32/float64 only"


@pytest.mark.parametrize("window,size,pool", [(3, (5, 7), 4), (5, (9, 11), 6), (3, (1, 3), 1), (3, (13, 13), 9)])
@pytest.mark.parametrize("tile", [1, 2, 4, 16])
def test_tiled_matches_reference_at_every_tile_size(window, size, pool, tile, monkeypatch):
    """Tiles of one query, of a few (the last cut by the map's edge) and larger than the map, in float64:
    forward, gradients of every input, and inference in chunks of one tile."""
    monkeypatch.setattr(aggregated, "aggregated_tile_size", lambda *sizes: tile)
    inputs = make_aggregated_inputs(height=size[0], width=size[1], window=window, pool=pool, dtype=torch.float64)
    out, grads = _grads(lambda **t: aggregated_attention(**t, window_size=window, backend="tiled"), inputs)
    reference = functools.partial(aggregated_attention, window_size=window, backend="reference")
    expected, expected_grads = _grads(reference, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-10, atol=1e-10, msg=name)
    monkeypatch.setattr(tiles, "_CHUNK_BYTES", 1)
    with torch.no_grad():
        chunked = aggregated_attention(**inputs, window_size=window, backend="tiled")
    torch.testing.assert_close(chunked, expected, rtol=1e-10, atol=1e-10)


def test_centred_window_tiles_cover_each_query_once_with_its_window():
    """Every position is computed by exactly one real query slot, whose unmasked key slots are exactly its
    in-map window positions, at the offsets the RPB table is read at."""
    height, width, window, tile = 7, 5, 3, 3
    layout = tiles.centred_window_tiles(height, width, window, tile, torch.device("cpu"))
    left, right, top, _ = tiles.centred_window_padding(height, width, window, tile)
    key_width = left + width + right
    rpb = torch.arange(window * window, dtype=torch.float64).reshape(1, window, window)
    bias = tiles.tile_bias(rpb, layout)[0]  # (patterns, query slots, key slots)
    pattern_of = torch.empty(layout.count, dtype=torch.long)
    for pattern, first, end in layout.blocks:
        pattern_of[first:end] = pattern
    query_slots, key_slots = tile * tile, layout.keys.numel() // layout.count
    assert sorted(layout.outputs.tolist()) == sorted(set(layout.outputs.tolist()))
    for position, slot in enumerate(layout.outputs.tolist()):
        assert layout.queries[slot] == position
        row, col = divmod(position, width)
        tile_index, query_slot = divmod(slot, query_slots)
        keys = layout.keys[tile_index * key_slots : (tile_index + 1) * key_slots]
        seen = {}
        for key, value in zip(keys.tolist(), bias[pattern_of[tile_index], query_slot].tolist()):
            if value != float("-inf"):
                seen[(key // key_width - top, key % key_width - left)] = value
        expected = {
            (row + dy, col + dx): (dy + 1) * window + dx + 1
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if 0 <= row + dy < height and 0 <= col + dx < width
        }
        assert seen == expected, position


def test_reference_memory_is_linear_in_tokens():
    # 64x64 tokens: no tensor saved for the backward comes near an (HW x HW) matrix
    inputs = make_aggregated_inputs(batch=1, heads=1, height=64, width=64, dim=8, pool=16)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    inputs = {name: t.requires_grad_(t.is_floating_point()) for name, t in inputs.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        aggregated_attention(**inputs, window_size=3, backend="reference").sum()
    assert max(saved) < (64 * 64) ** 2 * 4 / 8


def test_length_scale_is_rounded_float32_log():
    # The official buffer is numpy's float32 log, which is within one float32 ulp of the rounded
    # exact log (which one depends on numpy's SIMD path); ours is the rounded exact log.
    np = pytest.importorskip("numpy")
    counts = np.array([4, 6, 9], dtype=np.float32)
    for pool in (1, 49, 196, 3136):
        ours = length_scale(3, 3, 3, pool)[[0, 0, 1], [0, 1, 1]]
        exact = torch.from_numpy(np.log(counts.astype(np.float64) + pool).astype(np.float32))
        torch.testing.assert_close(ours, exact, rtol=0, atol=0)
        torch.testing.assert_close(ours, torch.from_numpy(np.log(counts + pool)), rtol=1.2e-7, atol=0)


def test_pooled_coords_match_pairwise_definition():
    size, pool, pretrain = (9, 6), (3, 2), (14, 14)
    table, rows, cols = pooled_position_coords(size, pool, pretrain)
    qy, qx = torch.meshgrid(torch.arange(9.0), torch.arange(6.0), indexing="ij")
    ky = F.adaptive_avg_pool1d(torch.arange(9.0)[None], 3)[0]
    kx = F.adaptive_avg_pool1d(torch.arange(6.0)[None], 2)[0]
    ky, kx = torch.meshgrid(ky, kx, indexing="ij")
    rel = torch.stack(
        [
            (qy.reshape(-1, 1) - ky.reshape(1, -1)) / 13 * 8,
            (qx.reshape(-1, 1) - kx.reshape(1, -1)) / 13 * 8,
        ],
        -1,
    )
    expected = torch.sign(rel) * torch.log2(rel.abs() + 1) / 3
    assert rows.shape == (9, 3) and cols.shape == (6, 2)
    got = table[rows[:, None, :, None], cols[None, :, None, :]].reshape(54, 6, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(cpb_rows=lambda t: t[:-1]), ValueError, "must be"),
        (dict(cpb_cols=lambda t: t[:, :1]), ValueError, "pooled tokens"),
        (dict(cpb_rows=lambda t: t.flatten()), ValueError, "1-d"),
        (dict(cpb_cols=lambda t: t.float()), TypeError, "integer indices"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "tiled", "flex"])
def test_malformed_pooled_bias_indices_are_refused(change, error, match, backend):
    inputs = make_aggregated_inputs()
    inputs.update({name: edit(inputs[name]) for name, edit in change.items()})
    with pytest.raises(error, match=match):
        aggregated_attention(**inputs, backend=backend)


def test_masked_pooled_tokens_change_nothing():
    """Pooled tokens with bias -inf for every query (a column of the pooled grid whose indices point at a -inf
    column of the table, as the exported mixers' empty cells) get no weight and do not count in the length scale."""
    inputs = make_aggregated_inputs(pool=4)  # a 2x2 pooled grid
    extra = make_aggregated_inputs(pool=2, seed=1)
    padded = dict(inputs)
    for name in ("k_pool", "v_pool"):  # a third column of pooled tokens
        grid = torch.cat([inputs[name].unflatten(2, (2, 2)), extra[name].unflatten(2, (2, 1))], dim=3)
        padded[name] = grid.flatten(2, 3)
    padded["cpb"] = F.pad(inputs["cpb"], (0, 1), value=float("-inf"))
    masked_column = torch.full_like(inputs["cpb_cols"][:, :1], inputs["cpb"].shape[2])
    padded["cpb_cols"] = torch.cat([inputs["cpb_cols"], masked_column], dim=1)
    for backend in ("reference", "flex", "tiled"):
        got = aggregated_attention(**padded, backend=backend)
        torch.testing.assert_close(got, aggregated_attention(**inputs, backend=backend), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (5, 7)])
def test_pooling_matrices_equal_adaptive_pooling_and_empty_cells_pool_nothing(size):
    x = torch.randn(2, 3, 11, 7, dtype=torch.float64)
    pooled = adaptive_avg_pool(x, size, empty=1)
    assert pooled.shape == (2, 3, size[0] + 1, size[1] + 1)
    torch.testing.assert_close(pooled[..., :-1, :-1], F.adaptive_avg_pool2d(x, size), rtol=1e-12, atol=1e-12)
    assert not pooled[..., -1, :].any() and not pooled[..., -1].any()


@pytest.mark.parametrize("size, pool", [((9, 6), (3, 2)), ((5, 4), (1, 1)), ((7, 7), (7, 7))])
def test_padded_pooled_coords_hold_the_same_pairs(size, pool):
    """The tables built for symbolic sizes (every half-integer offset, an empty cell per axis) give every
    (query, pooled cell) pair the same coordinates as the tables of int sizes."""
    table, rows, cols = pooled_position_coords(size, pool, (14, 14))
    padded, padded_rows, padded_cols = pooled_position_coords(size, pool, (14, 14), empty=1)
    assert padded_rows.shape == (size[0], pool[0] + 1) and padded_cols.shape == (size[1], pool[1] + 1)
    got = padded[padded_rows[:, None, :-1, None], padded_cols[None, :, None, :-1]]
    torch.testing.assert_close(got, table[rows[:, None, :, None], cols[None, :, None, :]], rtol=0, atol=0)
    # the empty cells index one past the table's end, where the mixers pad their biases with -inf
    assert (padded_rows[:, -1] == padded.shape[0]).all() and (padded_cols[:, -1] == padded.shape[1]).all()
    assert (padded_rows[:, :-1] < padded.shape[0]).all() and (padded_cols[:, :-1] < padded.shape[1]).all()


@pytest.mark.parametrize("name, kwargs", [("aggregated", {"sr_ratio": 4, "pretrain_size": 8}), ("cosine_global", {})])
def test_mixer_exports_with_dynamic_batch_and_size(name, kwargs):
    """One exported graph for every size, down to maps whose pooled grid is a single token (CPB coordinates
    scaled to a fixed pretrain size, or to the map's own)."""
    mixer = create_mixer(name, 16, num_heads=2, **kwargs).eval()
    dims = {0: Dim("batch", min=1, max=64), 1: Dim("height", min=4, max=256), 2: Dim("width", min=4, max=256)}
    program = torch.export.export(mixer, (torch.randn(2, 16, 16, 16),), dynamic_shapes=(dims,)).module()
    for batch, size in [(1, (4, 5)), (3, (9, 13)), (2, (23, 30))]:
        x = torch.randn(batch, *size, 16)
        with torch.no_grad():
            torch.testing.assert_close(program(x), mixer(x), rtol=1e-5, atol=1e-5)


def test_aggregated_mixer_any_size_and_minimum():
    mixer = create_mixer("aggregated", 16, num_heads=2, sr_ratio=4, pretrain_size=8)
    for size in [(4, 4), (9, 13), (16, 5)]:
        out = mixer(torch.randn(2, *size, 16))
        assert out.shape == (2, *size, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="at least 4x4"):
        mixer(torch.randn(1, 3, 8, 16))


def test_aggregated_mixer_backward_and_export_shapes():
    mixer = create_mixer("aggregated", 16, num_heads=2, sr_ratio=2, window_size=5)
    x = torch.randn(1, 6, 7, 16, requires_grad=True)
    mixer(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())


def test_position_bias_in_row_chunks_equals_one_pass(monkeypatch):
    from visionzoo.mixers import aggregated as mixers

    mixer = create_mixer("aggregated", 16, num_heads=2, sr_ratio=2, pretrain_size=8)
    with torch.no_grad():
        whole = mixer.position_bias((12, 10), (6, 5))
        monkeypatch.setattr(mixers, "_CPB_CHUNK_ELEMENTS", 3 * 512)  # three table rows per chunk
        for got, expected in zip(mixer.position_bias((12, 10), (6, 5)), whole, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cosine_global_mixer_equals_explicit_formula():
    mixer = create_mixer("cosine_global", 16, num_heads=2, pretrain_size=7).double()
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    q, k, v = mixer.qkv(x).reshape(2, 15, 3, 2, 8).permute(2, 0, 3, 1, 4)
    table, rows, cols = mixer.position_bias((3, 5), (3, 5))
    bias = table[:, rows[:, None, :, None], cols[None, :, None, :]].reshape(2, 15, 15)
    logits = (F.normalize(q, dim=-1) + mixer.query_embedding) * F.softplus(mixer.temperature) * math.log(15)
    logits = logits @ F.normalize(k, dim=-1).transpose(-2, -1) + bias
    expected = mixer.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 3, 5, 16))
    torch.testing.assert_close(mixer(x), expected, rtol=1e-12, atol=1e-12)


def _largest_tensor(fn):
    """``fn()`` and the most elements of any tensor an aten op produced while it ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with Largest():
        out = fn()
    return out, Largest.numel


def test_tiled_inference_never_holds_every_pooled_bias(monkeypatch):
    """The factored pooled bias is gathered a chunk of tiles at a time: at inference no tensor comes near the
    ``(heads, H*W, P)`` biases (or the logits), and the result is the one-pass reference's."""
    inputs = make_aggregated_inputs(batch=1, heads=2, height=48, width=40, dim=4, pool=30)
    every_bias = 2 * 48 * 40 * 30
    monkeypatch.setattr(aggregated, "aggregated_tile_size", lambda *sizes: 4)  # a pattern bias of 2 * 9 * 16 * 36
    monkeypatch.setattr(tiles, "_CHUNK_BYTES", 4 * every_bias // 8)
    with torch.no_grad():
        out, largest = _largest_tensor(lambda: aggregated_attention(**inputs, backend="tiled"))
        expected = aggregated_attention(**inputs, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert largest < every_bias / 4, (largest, every_bias)


def test_cosine_global_inference_in_query_chunks_equals_one_pass(monkeypatch):
    """At inference the full-attention mixer gathers its biases and logits a few query rows at a time (one row
    per chunk here): the same output as the one pass training takes, and no (heads, N, N) tensor."""
    from visionzoo.mixers import aggregated as mixers

    mixer = create_mixer("cosine_global", 16, num_heads=2, pretrain_size=7).double()
    x = torch.randn(2, 12, 10, 16, dtype=torch.float64)
    expected = mixer(x).detach()
    monkeypatch.setattr(tiles, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(mixers, "_CPB_CHUNK_ELEMENTS", 512)  # the CPB MLP's hidden layer a row at a time
    with torch.no_grad():
        out, largest = _largest_tensor(lambda: mixer(x))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert largest < 2 * 120 * 120 / 2, largest  # the MLP's hidden row (19 x 512) and qkv (2 x 120 x 48) below


def test_aggregated_mixer_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    mixer = create_mixer("aggregated", 16, num_heads=2, sr_ratio=2, pretrain_size=8).eval()
    x = torch.randn(1, 8, 10, 16)
    path = tmp_path / "aggregated.onnx"
    torch.onnx.export(mixer, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    out = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), mixer(x).detach(), rtol=1e-5, atol=1e-5)


def test_bench_times_backends_beside_the_official_formulation(monkeypatch):
    from visionzoo import bench

    monkeypatch.setitem(bench.OP_CASES, "aggregated_attention", [bench.aggregated_case(1, 1, 8, 4, 4)])
    rows = bench.bench_op("aggregated_attention", bench.RunSettings(min_run_time=0.01))
    timed = {(r.mode, r.backend) for r in rows}
    assert timed == {
        ("forward", "reference"),
        ("forward", "flex"),
        ("forward", "tiled"),
        ("forward", "unfold (official)"),
        ("forward+backward", "reference"),
        ("forward+backward", "tiled"),
        ("forward+backward", "unfold (official)"),
    }


def test_tiled_trains_after_inference_mode():
    """Index tables first built under ``torch.inference_mode`` still serve a backward afterwards."""
    inputs = make_aggregated_inputs(height=6, width=9, pool=4)
    with torch.inference_mode():
        aggregated_attention(**inputs, window_size=3, backend="tiled")
    out, grads = _grads(lambda **t: aggregated_attention(**t, window_size=3, backend="tiled"), inputs)
    expected, expected_grads = _grads(lambda **t: aggregated_attention(**t, window_size=3, backend="reference"), inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5, msg=name)
