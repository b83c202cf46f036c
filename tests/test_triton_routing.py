"""The Triton backend of bi-level routing attention against the reference: outputs and gradients.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so the CPU cases keep a handful of programs each; the CUDA cases run the real BiFormer shapes.
"""

import importlib.util
import os

import pytest
import torch

from visionzoo.kernels import bilevel_routing_attention, get_op, route_regions
from visionzoo.mixers import create_mixer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter cases (no CUDA)"
)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def qkv(batch, heads, size, dim, dim_v=None, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, *size, dim)] * 2 + [(batch, heads, *size, dim_v or dim)]
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]


def outputs_and_grads(backend, q, k, v, n_win, topk, scale, valid_size=None, seed=1):
    out = bilevel_routing_attention(q, k, v, n_win, topk, scale, valid_size, backend=backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def assert_matches_reference(q, k, v, n_win, topk, scale, valid_size=None, tol=1e-4):
    """Triton against the reference, at the same dtype (so both see the same routing).

    fp16/bf16 tolerances are relative to each tensor's largest magnitude."""
    expected = outputs_and_grads("reference", q, k, v, n_win, topk, scale, valid_size)
    ours = outputs_and_grads("triton", q, k, v, n_win, topk, scale, valid_size)
    for name, a, b in zip(("out", "grad q", "grad k", "grad v"), ours, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        atol = tol if b.dtype == torch.float32 else tol * b.abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


# --- interpreter ----------------------------------------------------------------------------

INTERPRETER_CASES = {  # size, n_win, topk, valid_size, (dim, dim_v)
    "non-square grid, 4x3 regions": ((8, 6), 2, 2, None, (16, 16)),
    "topk 1": ((8, 8), 2, 1, None, (32, 32)),
    "topk = regions: full attention": ((8, 8), 2, 4, None, (24, 24)),
    "padded tokens in partly real regions": ((6, 8), 2, 2, (5, 7), (16, 16)),
    "regions of padding only are routed": ((8, 8), 2, 4, (3, 3), (16, 16)),
    "regions of 25 tokens over ragged tiles": ((10, 10), 2, 2, (9, 10), (16, 16)),
    "value head dim differs": ((8, 8), 2, 2, None, (24, 16)),
}


@interpreted
@pytest.mark.parametrize("case", INTERPRETER_CASES)
def test_interpreted_fp32_equals_reference_with_gradients(case):
    size, n_win, topk, valid_size, (dim, dim_v) = INTERPRETER_CASES[case]
    q, k, v = qkv(1, 1, size, dim, dim_v)
    assert_matches_reference(q, k, v, n_win, topk, 0.3, valid_size)


@interpreted
def test_interpreted_fp16_equals_reference():
    q, k, v = qkv(1, 2, (8, 8), 32, dtype=torch.float16)
    assert_matches_reference(q, k, v, 2, 2, 32**-0.5, (7, 5), tol=1e-2)


@interpreted
def test_interpreted_ties_in_routing_follow_route_regions():
    q, k, v = qkv(2, 1, (4, 4), 16)
    k = torch.ones_like(k).requires_grad_()  # every key region has the same mean: all affinities tie
    index = route_regions(q, k, 2, 2)
    assert (index == index[:1, :1]).all()  # one tie-break, the same for every query region
    assert_matches_reference(q, k, v, 2, 2, 0.3)


@interpreted
def test_interpreted_strided_views_of_one_projection():
    """The routing mixer's q, k, v: strided views of one (B, H, W, 3, heads, d) tensor, read in place."""
    projection = torch.randn(1, 4, 8, 3, 2, 16, requires_grad=True)
    q, k, v = projection.permute(3, 0, 4, 1, 2, 5).unbind(0)
    assert q.stride() == (4 * 8 * 96, 16, 8 * 96, 96, 1)
    assert_matches_reference(q, k, v, 2, 3, 0.25, (3, 7))


@interpreted
def test_interpreted_routing_mixer_with_gradients():
    mixer = create_mixer("routing", 32, num_heads=2, n_win=2, topk=2, backend="triton")
    x = torch.randn(1, 5, 7, 32, requires_grad=True)  # padded to 6x8 inside
    out = mixer(x)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x)
    mixer.backend = "reference"
    expected = mixer(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_x, torch.autograd.grad(expected.square().sum(), x)[0], atol=1e-4, rtol=1e-4)


def test_inverted_routing_lists_each_key_regions_queries_in_order():
    from visionzoo.kernels.triton_routing import _invert_routing

    index = torch.stack([torch.randperm(6)[:3] for _ in range(12)]).view(2, 6, 3)
    queries, starts = _invert_routing(index, 6)
    assert queries.dtype == starts.dtype == torch.int32 and starts.shape == (2, 7)
    for b in range(2):
        for region in range(6):
            listed = queries[b, starts[b, region] : starts[b, region + 1]].tolist()
            assert listed == [r for r in range(6) if region in index[b, r].tolist()]


def test_dispatch_declines_with_reasons_and_auto_never_picks_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors: the interpreter, also on a GPU machine
    op = get_op("bilevel_routing_attention")
    q, k, v = (t.detach() for t in qkv(1, 1, (8, 8), 16))
    assert op.choose(q, k, v, 2, 2) == "reference"
    narrow = op.supports("triton", q[..., :8], k[..., :8], v, 2, 2)
    assert "head dims must lie in 16..128, got 8 and 16" in narrow.reason
    assert "mixed dtypes" in op.supports("triton", q.half(), k, v, 2, 2).reason
    assert op.supports("triton", q, k, v, 2, 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run these inputs: triton runs on cuda"):
        bilevel_routing_attention(q, k, v, 2, 2, backend="triton")


# --- CUDA -----------------------------------------------------------------------------------

TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
BIFORMER_TINY = {  # map, valid size, heads, n_win, topk; head dim 32, scale (heads * 32) ** -0.5
    "stage 1 at 224": (56, None, 2, 7, 1),
    "stage 2 at 224": (28, None, 4, 7, 4),
    "stage 3 at 224": (14, None, 8, 7, 16),
    "stage 1 at 512 (padded)": (133, (128, 128), 2, 7, 1),
    "stage 1 at 1024 (padded)": (259, (256, 256), 2, 7, 1),
}


@cuda
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", BIFORMER_TINY)
def test_cuda_equals_reference_at_biformer_shapes(case, dtype):
    size, valid_size, heads, n_win, topk = BIFORMER_TINY[case]
    q, k, v = qkv(2, heads, (size, size), 32, dtype=dtype, device="cuda")
    assert_matches_reference(q, k, v, n_win, topk, (heads * 32) ** -0.5, valid_size, tol=TOLERANCES[dtype])


@cuda
@pytest.mark.parametrize("dims", [(16, 16), (24, 40), (64, 64), (128, 128)])
def test_cuda_head_dims(dims):
    q, k, v = qkv(2, 2, (28, 21), *dims, device="cuda")
    assert_matches_reference(q, k, v, 7, 3, 0.2, (27, 20))


@cuda
def test_cuda_auto_picks_triton_and_routing_mixer_matches_reference():
    q, k, v = qkv(1, 2, (14, 14), 32, device="cuda")
    assert get_op("bilevel_routing_attention").choose(q, k, v, 7, 4) == "triton"
    mixer = create_mixer("routing", 64, num_heads=2, n_win=7, topk=4).cuda()
    x = torch.randn(2, 30, 27, 64, device="cuda", requires_grad=True)
    out = mixer(x)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x)
    mixer.backend = "reference"
    expected = mixer(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_x, torch.autograd.grad(expected.square().sum(), x)[0], atol=1e-3, rtol=1e-4)
