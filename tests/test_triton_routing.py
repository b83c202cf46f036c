"""The Triton backend of bi-level routing attention: the routing mixer on it, the inverted routing lists and
dispatch (the op against the reference: test_backend_parity.py).

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import importlib.util
import os

import pytest
import torch

from visionzoo.kernels import bilevel_routing_attention, get_op
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


def _check_mixer_against_reference(mixer, x, atol_out, atol_grad):
    """The mixer's output and input gradient on its current backend against the reference backend."""
    out = mixer(x)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x)
    mixer.backend = "reference"
    expected = mixer(x)
    torch.testing.assert_close(out, expected, atol=atol_out, rtol=1e-4)
    torch.testing.assert_close(grad_x, torch.autograd.grad(expected.square().sum(), x)[0], atol=atol_grad, rtol=1e-4)


@interpreted
def test_interpreted_routing_mixer_with_gradients():
    mixer = create_mixer("routing", 32, num_heads=2, n_win=2, topk=2, backend="triton")
    x = torch.randn(1, 5, 7, 32, requires_grad=True)  # padded to 6x8 inside
    _check_mixer_against_reference(mixer, x, atol_out=1e-5, atol_grad=1e-4)


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
    assert op.choose(q, k, v, 2, 2) == "sdpa"  # on CPU never triton: half the regions are routed here
    narrow = op.supports("triton", q[..., :8], k[..., :8], v, 2, 2)
    assert "head dims must lie in 16..128, got 8 and 16" in narrow.reason
    assert "mixed dtypes" in op.supports("triton", q.half(), k, v, 2, 2).reason
    assert op.supports("triton", q, k, v, 2, 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run these inputs: triton runs on cuda"):
        bilevel_routing_attention(q, k, v, 2, 2, backend="triton")


# --- CUDA -----------------------------------------------------------------------------------


@cuda
def test_cuda_auto_picks_triton_and_routing_mixer_matches_reference():
    q, k, v = qkv(1, 2, (14, 14), 32, device="cuda")
    assert get_op("bilevel_routing_attention").choose(q, k, v, 7, 4) == "triton"
    mixer = create_mixer("routing", 64, num_heads=2, n_win=7, topk=4).cuda()
    x = torch.randn(2, 30, 27, 64, device="cuda", requires_grad=True)
    _check_mixer_against_reference(mixer, x, atol_out=1e-4, atol_grad=1e-3)
