"""Every registered model as one graph: torch.compile without graph breaks (eval and a training step) and
FX as timm's feature extractors trace it, checked against eager at sizes that pad differently.

torch.export and ONNX with dynamic sizes: ``test_export.py``; the kernel ops' custom operators are checked with
``torch.library.opcheck`` in ``test_dispatch.py``."""

import contextlib

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules

from host_syncs import no_host_syncs
from zoo_models import FAMILY_MODELS, MODELS

# Trace at one size, check at another that pads to other window, region and pool multiples.
TRACE_SIZE = (64, 64)
CHECK_SIZE = (97, 75)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Models share code objects (blocks, stages): without a reset, dynamo's recompile limit ends a fullgraph run."""
    torch._dynamo.reset()


def _model(name: str, train: bool = False) -> torch.nn.Module:
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.0)
    return model.train(train)


def _graph_breaks(fn, *args) -> int:
    return torch._dynamo.explain(fn)(*args).graph_break_count


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_compiles_in_eval_without_graph_breaks(name, one_thread):
    model = _model(name)
    with torch.no_grad():
        assert _graph_breaks(model, torch.randn(1, 3, *TRACE_SIZE)) == 0


# every model, eval and train mode: dynamo only (a few seconds each), in the slow suite
@pytest.mark.slow
@pytest.mark.parametrize("name, train", [(n, t) for n in MODELS for t in (False, True) if t or n not in FAMILY_MODELS])
def test_every_model_compiles_without_graph_breaks(name, train):
    model = _model(name, train)
    with torch.set_grad_enabled(train):
        assert _graph_breaks(model, torch.randn(2, 3, *TRACE_SIZE)) == 0


def _training_step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(x)
    grads = torch.autograd.grad(out.square().mean(), [p for p in model.parameters() if p.requires_grad])
    return out.detach(), grads


@pytest.mark.slow  # 10-60 s a model
@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_compiled_training_step_matches_eager(name, one_thread):
    """fullgraph through AOTAutograd (the custom ops' fake kernels and registered backwards), without
    inductor's code generation, which the CPU benchmark runs (docs/benchmarks.md)."""
    model = _model(name, train=True)
    x = torch.randn(2, 3, *TRACE_SIZE)
    want, want_grads = _training_step(model, x)
    compiled = torch.compile(model, backend="aot_eager_decomp_partition", fullgraph=True)
    got, got_grads = _training_step(compiled, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_warm_forward_and_training_step_never_wait_on_the_device(name, device, one_thread):
    """No host synchronisation inside a forward or a backward once a size has run (its tables built, Triton's
    autotuning done), in eval and training mode: what CUDA graphs (``mode="reduce-overhead"``) need."""
    model, x = _model(name).to(device), torch.randn(2, 3, *CHECK_SIZE, device=device)
    for warm in (False, True):
        with no_host_syncs() if warm else contextlib.nullcontext():
            with torch.no_grad():
                model.eval()(x)
            model.train()(x).square().mean().backward()


def _fx_model(model: torch.nn.Module) -> torch.fx.GraphModule:
    """The model traced as timm's ``test_model_forward_fx`` traces it: timm's leaf modules and functions."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs
    )


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_fx_traced_model_matches_eager_forward_and_backward(name, one_thread):
    model = _model(name)
    traced = _fx_model(model)
    for size in (TRACE_SIZE, CHECK_SIZE):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(next(iter(traced(x).values())), model(x), rtol=1e-5, atol=1e-5)
    traced.train()
    model.train()
    x = torch.randn(2, 3, *CHECK_SIZE)
    want = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], _training_step(model, x)[1]))
    used = {n: p for n, p in traced.named_parameters() if p.requires_grad}
    out = next(iter(traced(x).values()))
    got = dict(zip(used, torch.autograd.grad(out.square().mean(), list(used.values()), allow_unused=True)))
    assert set(got) <= set(want)
    for n, g in got.items():
        torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-5, msg=n)
