"""Kernel dispatch: declared priority, override precedence, export forcing reference (backend parity:
test_backend_parity.py)."""

import logging

import pytest
import torch

from visionzoo.kernels import (
    ENV_VAR,
    Capability,
    KernelOp,
    dense_attention,
    dense_attention_reference,
    dispatch,
    get_op,
    list_ops,
    use_backend,
)
from visionzoo.kernels.dispatch import Support

from oracles import make_aggregated_inputs

DENSE = get_op("dense_attention")


def _qkv(dtype=torch.float32, batch=2, heads=3, n=17, m=23, dim=8, requires_grad=True):
    shapes = [(batch, heads, n, dim), (batch, heads, m, dim), (batch, heads, m, dim)]
    return [torch.randn(s, dtype=dtype, requires_grad=requires_grad) for s in shapes]


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


def _fp32_only(x):
    return Capability.yes() if x.dtype == torch.float32 else Capability.no("not fp32")


@pytest.fixture
def spy_op():
    """An op whose fast backend records its calls: it exercises the dispatcher itself."""
    calls = []

    def reference(x):
        calls.append("reference")
        return x * 2

    op = KernelOp("test_spy_op", reference, priority=("sdpa", "triton"))

    # registered against the priority's order: the priority, not the source order, decides
    @op.register("triton", lambda x: Capability.no("no GPU here"), declares=Support())
    def never(x):  # pragma: no cover - declined
        calls.append("triton")
        return x * 2

    @op.register("sdpa", _fp32_only, declares=Support(("cpu",), (torch.float32,), ("cpu",)))
    def fast(x):
        calls.append("sdpa")
        return x + x

    yield op, calls
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
        op.register("sdpa", _fp32_only, declares=Support())
    with pytest.raises(ValueError, match="'cuda_magic' is not in the op's priority"):
        op.register("cuda_magic", _fp32_only, declares=Support())
    with pytest.raises(ValueError, match="'natten' is not in the op's priority"):
        op.register("natten", _fp32_only, declares=Support())
    with pytest.raises(ValueError, match="declares features beyond"):
        KernelOp("test_other_op", lambda x: x, priority=("sdpa",)).register(
            "sdpa", _fp32_only, Support(features=("rpb",))
        )
    with pytest.raises(ValueError, match="already registered"):
        KernelOp("test_spy_op", lambda x: x)
    with pytest.raises(ValueError, match="priority must list distinct fast backends"):
        KernelOp("test_bad_op", lambda x: x, priority=("sdpa", "reference"))
    assert "test_spy_op" in list_ops()
    del dispatch._OPS["test_other_op"]


def test_declarations():
    assert DENSE.declared("reference").features == DENSE.features, "the reference takes every feature"
    assert DENSE.declared("triton") == Support(), "a backend the op lacks declares nothing"
    assert dispatch.if_installed("no_such_module_here", Support(("cpu",)))() == Support()
    assert get_op("neighborhood_attention").priority == ("natten", "flex", "triton", "tiled")


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_auto_picks_sdpa_on_cuda(dtype):
    q, k, v = (torch.randn(2, 4, 196, 32, device="cuda", dtype=dtype) for _ in range(3))
    bias = torch.randn(1, 4, 196, 196, device="cuda", dtype=dtype)
    assert DENSE.choose(q, k, v, bias, None) == "sdpa"


def _custom_op_cases():
    """Tiny inputs of every op that runs as a custom operator under torch.compile, with its backend argument."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    qkv = [rand(1, 2, 7, 6, 8) for _ in range(3)]
    aggregated = make_aggregated_inputs(batch=1, heads=2, height=5, width=4, dim=4, pool=3)
    return {
        "neighborhood_attention": (*qkv, 3, 2, rand(2, 5, 5), 0.35, "reference"),
        "bilevel_routing_attention": (*[rand(1, 2, 8, 6, 8) for _ in range(3)], 2, 3, 0.3, [7, 5], "reference"),
        "aggregated_attention": (
            *(t.requires_grad_(t.is_floating_point()) for t in aggregated.values()),
            3,
            "reference",
        ),
    }


@pytest.mark.parametrize("name", sorted(_custom_op_cases()))
def test_custom_ops_pass_opcheck(name):
    """The schema, fake kernel, registered autograd and AOT dispatch of the op's custom operator, by PyTorch's own
    checker (the backward recomputes the forward, so gradients equal the reference's own)."""
    op = get_op(name)
    assert op.custom_op is getattr(torch.ops.visionzoo, name).default
    torch.library.opcheck(op.custom_op, _custom_op_cases()[name])


@pytest.mark.parametrize("name", sorted(_custom_op_cases()))
def test_custom_op_gradients_are_the_reference_gradients(name):
    args = _custom_op_cases()[name]
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    op = get_op(name)
    want = torch.autograd.grad(op.run("reference", *args[:-1]).square().sum(), tensors)
    got = torch.autograd.grad(op.custom_op(*args).square().sum(), tensors)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_compiled_model_runs_each_op_as_one_custom_op_of_the_chosen_backend():
    """The backend is chosen while dynamo traces and recorded in the graph; the op is one node, not its kernels."""
    from visionzoo import create_mixer

    mixer = create_mixer("neighborhood", 16, num_heads=2, kernel_size=3).eval()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    x = torch.randn(1, 6, 5, 16)
    with torch.no_grad():
        torch._dynamo.reset()
        out = torch.compile(mixer, backend=capture, fullgraph=True)(x)
        torch.testing.assert_close(out, mixer(x), rtol=0, atol=0)
    (graph,) = graphs
    calls = [n for n in graph.graph.nodes if n.target is torch.ops.visionzoo.neighborhood_attention.default]
    assert len(calls) == 1 and calls[0].args[-1] == "tiled"
    assert not any("gather" in str(n.target) or "index_select" in str(n.target) for n in graph.graph.nodes)
