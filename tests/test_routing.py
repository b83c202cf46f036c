"""Bi-level routing attention: reference, flex and the official gather formulation against a
dense oracle; the routing mixer on any map size; BiFormer's global LePE mixer."""

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx

from visionzoo.kernels import (
    bilevel_routing_attention,
    bilevel_routing_attention_gather,
    dense_attention_reference,
    get_op,
    pad_to_multiple,
    route_regions,
)
from visionzoo.mixers import create_mixer


def oracle_routing(q, k, n_win, topk, scale, valid):
    """Region means over real tokens, all heads together, then torch.topk of the scaled affinity."""
    batch, heads, height, width, dim = q.shape
    rh, rw = height // n_win, width // n_win

    def means(x):
        x = (x * valid[..., None]).reshape(batch, heads, n_win, rh, n_win, rw, dim).sum((3, 5))
        count = valid.reshape(n_win, rh, n_win, rw).sum((1, 3)).clamp(min=1)
        return (x / count[..., None]).permute(0, 2, 3, 1, 4).reshape(batch, n_win * n_win, heads * dim)

    affinity = (means(q) * scale) @ means(k).transpose(1, 2)
    empty = valid.reshape(n_win, rh, n_win, rw).sum((1, 3)).flatten() == 0
    affinity = affinity.masked_fill(empty, float("-inf"))
    return torch.topk(affinity, min(topk, n_win * n_win), dim=-1).indices


def oracle(q, k, v, n_win, topk, scale, valid_size=None):
    """Dense attention whose boolean mask allows exactly the routed regions' real tokens."""
    batch, _, height, width, _ = q.shape
    valid_h, valid_w = valid_size or (height, width)
    valid = (torch.arange(height)[:, None] < valid_h) & (torch.arange(width)[None, :] < valid_w)
    index = oracle_routing(q.detach(), k.detach(), n_win, topk, scale, valid)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    region = ((rows // (height // n_win)) * n_win + cols // (width // n_win)).flatten()  # (HW,)
    routed = torch.zeros(batch, n_win * n_win, n_win * n_win, dtype=torch.bool)
    routed.scatter_(2, index, True)
    mask = routed[:, region][:, :, region] & valid.flatten()  # (B, HW, HW)
    out = dense_attention_reference(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), mask[:, None], scale)
    return out.unflatten(2, (height, width))


def qkv(batch=2, heads=2, size=(12, 9), dim=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, *size, dim, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


CASES = [  # size, n_win, topk, valid_size
    ((12, 9), 3, 2, None),
    ((12, 9), 3, 1, None),
    ((12, 12), 3, 4, (10, 7)),  # padded tokens in partly real regions
    ((14, 14), 7, 3, (5, 8)),  # whole regions of padding
    ((8, 8), 2, 4, None),  # topk = regions: full attention
]


@pytest.mark.parametrize("size, n_win, topk, valid_size", CASES)
def test_reference_equals_masked_dense_oracle_with_gradients(size, n_win, topk, valid_size):
    q, k, v = qkv(size=size)
    scale = 0.3
    out = bilevel_routing_attention(q, k, v, n_win, topk, scale, valid_size, backend="reference")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected = oracle(q, k, v, n_win, topk, scale, valid_size)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_padding_never_leaks_into_real_outputs():
    q, k, v = qkv(size=(12, 12))
    out = bilevel_routing_attention(q, k, v, 3, 2, valid_size=(10, 7))
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 10:], v2[:, :, :, 7:] = 1e3, -1e3
    q2 = q.detach().clone()
    q2[:, :, 10:] = 5.0
    again = bilevel_routing_attention(q2, k2, v2, 3, 2, valid_size=(10, 7))
    torch.testing.assert_close(again[:, :, :10, :7], out[:, :, :10, :7])


def test_topk_at_least_regions_is_full_attention():
    q, k, v = qkv(size=(6, 6))
    full = dense_attention_reference(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3)).unflatten(2, (6, 6))
    for topk in (9, 20):
        torch.testing.assert_close(bilevel_routing_attention(q, k, v, 3, topk), full, atol=1e-6, rtol=1e-5)


def test_ties_resolve_as_torch_topk():
    q, k, _ = qkv(size=(6, 6))
    k = torch.ones_like(k)  # every key region has the same mean: all affinities tie
    index = route_regions(q, k, 3, 4)
    valid = torch.ones(6, 6, dtype=torch.bool)
    torch.testing.assert_close(index, oracle_routing(q.detach(), k, 3, 4, q.shape[-1] ** -0.5, valid))


def test_regions_of_padding_are_routed_last():
    q, k, _ = qkv(size=(14, 14))
    index = route_regions(q, k, 7, 12, valid_size=(5, 8))  # 3 x 4 regions hold real tokens
    rows, cols = index // 7, index % 7
    assert bool(((rows < 3) & (cols < 4)).all())


def test_chunked_reference_equals_one_chunk(monkeypatch):
    from visionzoo.kernels import routing

    q, k, v = qkv(size=(12, 12))
    out = bilevel_routing_attention(q, k, v, 3, 2, valid_size=(11, 10))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    monkeypatch.setattr(routing, "_CHUNK_ELEMENTS", 1)  # one query region per chunk
    chunked = bilevel_routing_attention(q, k, v, 3, 2, valid_size=(11, 10))
    torch.testing.assert_close(chunked, out, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(torch.autograd.grad(chunked.square().sum(), (q, k, v)), grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # inference: the mask and the softmax in place, chunk by chunk
        torch.testing.assert_close(
            bilevel_routing_attention(q, k, v, 3, 2, valid_size=(11, 10)), out, atol=1e-6, rtol=1e-6
        )


def test_gather_formulation_equals_reference_with_gradients():
    q, k, v = qkv(size=(12, 9))
    out = bilevel_routing_attention(q, k, v, 3, 2, 0.25)
    gathered = bilevel_routing_attention_gather(q, k, v, 3, 2, 0.25)
    torch.testing.assert_close(gathered, out, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(out)
    for ours, theirs in zip(
        torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(gathered, (q, k, v), grad), strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_half_precision_reference_is_close():
    q, k, v = qkv(size=(12, 9))
    expected = bilevel_routing_attention(q, k, v, 3, 2)
    half = bilevel_routing_attention(*(t.detach().bfloat16() for t in (q, k, v)), 3, 2)
    torch.testing.assert_close(half.float(), expected, atol=5e-2, rtol=5e-2)


def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv(size=(12, 9))
    with pytest.raises(ValueError, match="multiples of n_win 4, got 12x9"):
        bilevel_routing_attention(q, k, v, 4, 2)
    with pytest.raises(ValueError, match="topk must be positive"):
        bilevel_routing_attention(q, k, v, 3, 0)
    with pytest.raises(ValueError, match="must lie within the 12x9 map"):
        bilevel_routing_attention(q, k, v, 3, 2, valid_size=(13, 9))


def test_reference_traced_with_symbolic_sizes_masks_padding_in_the_graph():
    """Traced once with symbolic sizes (torch.export, ONNX), the reference always masks by ``valid_size``: where
    every token is real it equals eager's unmasked path, elsewhere eager's masked one."""

    def routing(q, k, v, real):  # ``real``'s shape is valid_size
        return bilevel_routing_attention(q, k, v, 3, 2, 0.3, real.shape, backend="reference")

    traced = make_fx(routing, tracing_mode="symbolic")(*(t.detach() for t in qkv(size=(12, 9))), torch.empty(11, 8))
    cases = [((12, 9), (12, 9)), ((9, 12), (9, 12)), ((12, 12), (10, 7)), ((9, 9), (2, 8)), ((3, 6), (3, 5))]
    for size, valid_size in cases:  # the last with one token a region (a filler token in the graph's layout)
        q, k, v = (t.detach() for t in qkv(size=size, seed=1))
        want = bilevel_routing_attention(q, k, v, 3, 2, 0.3, valid_size)
        torch.testing.assert_close(traced(q, k, v, torch.empty(valid_size)), want, atol=1e-6, rtol=1e-6)


class _PaddedRouting(torch.nn.Module):
    """As the routing mixer: zero-pads to multiples of n_win and leaves the padding out."""

    def forward(self, q, k, v):
        (q, size), (k, _), (v, _) = (pad_to_multiple(t, 3) for t in (q, k, v))
        return bilevel_routing_attention(q, k, v, 3, 2, 0.3, size)


def test_reference_exports_with_dynamic_sizes_down_to_one_token_a_region(tmp_path):
    """torch.export, and the ONNX exporter built on it, with dynamic batch, H and W, traced where each
    region holds one token."""
    onnxruntime = pytest.importorskip("onnxruntime")
    maps = {0: Dim("batch", min=1, max=8), 2: Dim("height", min=2, max=48), 3: Dim("width", min=2, max=48)}
    example = tuple(t.detach() for t in qkv(size=(2, 3)))
    exported = torch.export.export(_PaddedRouting(), example, dynamic_shapes=(maps, maps, maps))
    path = tmp_path / "routing.onnx"
    torch.onnx.export(exported, dynamo=True).save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for batch, size in [(1, (3, 3)), (3, (12, 9)), (2, (10, 7)), (1, (5, 16))]:
        q, k, v = (t.detach() for t in qkv(batch, size=size, seed=2))
        want = _PaddedRouting()(q, k, v)
        torch.testing.assert_close(exported.module()(q, k, v), want, atol=1e-6, rtol=1e-6)
        (got,) = session.run(None, dict(zip(names, (q.numpy(), k.numpy(), v.numpy()), strict=True)))
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)


def test_onnx_trace_takes_the_reference():
    q, k, v = (t.detach() for t in qkv(size=(6, 6)))
    traced = torch.jit.trace(lambda a, b, c: bilevel_routing_attention(a, b, c, 3, 2), (q, k, v), check_trace=False)
    torch.testing.assert_close(traced(q, k, v), bilevel_routing_attention(q, k, v, 3, 2))


# --- mixers -------------------------------------------------------------------------------


def official_bra(x, mixer, n_win, topk):
    """The official legacy BRA on a map divisible by n_win (gather formulation, scale = dim**-0.5)."""
    batch, height, width, dim = x.shape
    heads = mixer.num_heads
    qkv_ = F.linear(x, mixer.qkv.weight, mixer.qkv.bias).reshape(batch, height, width, 3, heads, dim // heads)
    q, k, v = qkv_.permute(3, 0, 4, 1, 2, 5)
    out = bilevel_routing_attention_gather(q, k, v, n_win, topk, dim**-0.5)
    out = out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, dim)
    v_map = v.permute(0, 1, 4, 2, 3).reshape(batch, dim, height, width)
    lepe = F.conv2d(v_map, mixer.lepe.weight, mixer.lepe.bias, padding=mixer.lepe.padding, groups=dim)
    return F.linear(out + lepe.permute(0, 2, 3, 1), mixer.proj.weight, mixer.proj.bias)


def test_routing_mixer_equals_official_formulation_on_divisible_maps():
    mixer = create_mixer("routing", 64, num_heads=2, n_win=7, topk=4, side_dwconv=5).double()
    x = torch.randn(2, 14, 21, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), official_bra(x, mixer, 7, 4))


@pytest.mark.parametrize("size", [(1, 1), (5, 9), (15, 16)])
def test_routing_mixer_any_size_masks_padding(size):
    """Equal to the dense oracle on the real tokens, whatever the padded tokens hold."""
    mixer = create_mixer("routing", 32, n_win=7, topk=3).double()
    x = torch.randn(2, *size, 32, dtype=torch.float64, requires_grad=True)
    out = mixer(x)
    assert out.shape == x.shape and mixer.min_size == (1, 1)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    height, width = (-(-s // 7) * 7 for s in size)
    q, k, v = (
        F.pad(t, (0, 0, 0, width - size[1], 0, height - size[0]), value=7.0) for t in mixer.qkv_heads(x.detach())
    )
    attn = oracle(q, k, v, 7, 3, 32**-0.5, valid_size=size)[:, :, : size[0], : size[1]]
    v_map = mixer.merge_heads(v[:, :, : size[0], : size[1]]).permute(0, 3, 1, 2)
    lepe = F.conv2d(v_map, mixer.lepe.weight, mixer.lepe.bias, padding=2, groups=32).permute(0, 2, 3, 1)
    expected = F.linear(mixer.merge_heads(attn) + lepe, mixer.proj.weight, mixer.proj.bias)
    torch.testing.assert_close(out.detach(), expected)


def test_routing_mixer_rejects_bad_arguments():
    for kwargs in ({"topk": 0}, {"n_win": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be positive, got 0"):
            create_mixer("routing", 32, **kwargs)
    with pytest.raises(ValueError, match="side_dwconv must be 0 or an odd size"):
        create_mixer("routing", 32, side_dwconv=4)


def test_global_lepe_mixer_equals_official_attention_lepe():
    mixer = create_mixer("global_lepe", 64, num_heads=8, side_dwconv=5).double()
    assert mixer.qkv.bias is None
    x = torch.randn(2, 5, 6, 64, dtype=torch.float64)
    batch, height, width, dim = x.shape
    qkv_ = F.linear(x.reshape(batch, -1, dim), mixer.qkv.weight).reshape(batch, -1, 3, 8, 8).permute(2, 0, 3, 1, 4)
    attn = ((qkv_[0] @ qkv_[1].transpose(-2, -1)) * 8**-0.5).softmax(-1)
    out = (attn @ qkv_[2]).transpose(1, 2).reshape(batch, -1, dim)
    lepe = F.conv2d(x.permute(0, 3, 1, 2), mixer.lepe.weight, mixer.lepe.bias, padding=2, groups=dim)
    out = out + lepe.flatten(2).transpose(1, 2)
    expected = F.linear(out, mixer.proj.weight, mixer.proj.bias).reshape(batch, height, width, dim)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), expected)


def test_bench_times_backends_and_the_official_gather_side_by_side(monkeypatch):
    from visionzoo import bench

    monkeypatch.setitem(bench.OP_CASES, "bilevel_routing_attention", [bench.routing_case(1, 6, 8, 2, 3, 2)])
    rows = bench.bench_op("bilevel_routing_attention", bench.RunSettings(min_run_time=0.01))
    assert {(r.mode, r.backend) for r in rows} == {
        ("forward", "reference"),
        ("forward", "flex"),
        ("forward", "sdpa"),
        ("forward", "gather (official)"),
        ("forward+backward", "reference"),
        ("forward+backward", "sdpa"),
        ("forward+backward", "gather (official)"),
    }
    assert all(r.median_ms > 0 for r in rows)


def test_flex_declines_maps_whose_unfused_scores_are_too_large():
    from visionzoo.kernels import get_op

    q = torch.zeros(1, 2, 259, 259, 32)
    verdict = get_op("bilevel_routing_attention").supports("flex", q, q, q, 7, 1)
    assert not verdict and "67081x67081 scores" in verdict.reason


def test_routing_mixer_exports_to_onnx_at_a_fixed_size(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    mixer = create_mixer("routing", 32, n_win=7, topk=3).eval()
    x = torch.randn(1, 15, 16, 32)
    path = tmp_path / "routing.onnx"
    torch.onnx.export(mixer, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    out = onnxruntime.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), mixer(x), atol=1e-5, rtol=1e-5)


def test_cpu_takes_dense_masked_attention_where_most_regions_are_routed():
    """BiFormer-T at 224x224: stage 3 (16 of 49 regions of 4 tokens) runs ``sdpa``, stages 1-2 the gathers;
    a large map stays on the gathers (its mask would be tokens^2)."""
    op = get_op("bilevel_routing_attention")

    def choice(size, heads, topk, batch=1):
        q = torch.randn(batch, heads, size, size, 32, requires_grad=True)
        return op.choose(q, q, q, 7, topk, None, None)

    assert choice(14, 8, 16) == "sdpa"
    assert choice(28, 4, 4) == "reference"
    assert choice(56, 2, 1) == "reference"
    assert choice(49, 8, 16) == "reference"
