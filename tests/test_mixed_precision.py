"""Every kernel op and every registered mixer under float16 and bfloat16, at activations whose ``q . k`` exceeds
float16's range (65504): outputs and gradients finite and close to float32/float64 on the same values.

Both autocast dtypes run on CPU in torch 2.14 (``torch.autocast("cpu", dtype=torch.float16)`` included), so the
CPU tests use autocast, plus half-precision tensors handed straight to each kernel backend. Triton runs under its
interpreter in float16 only: the interpreter's bfloat16 ``tl.dot`` is wrong (a known interpreter fault).
"""

from __future__ import annotations

import os

import pytest
import torch

from visionzoo.kernels import (
    aggregated_attention,
    bilevel_routing_attention,
    dense_attention,
    get_op,
    halo_attention,
    neighborhood_attention,
)
from visionzoo.mixers import MultiHeadMixer, create_mixer, list_mixers

LOW = (torch.float16, torch.bfloat16)
TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
FLOAT16_MAX = torch.finfo(torch.float16).max
FORWARD_ONLY_ON_CPU = ("flex", "natten")
SHAPE = (1, 2, 8, 8, 16)  # (B, heads, H, W, head_dim): head dim 16, the smallest every Triton kernel takes


def _low_precision_qkv(dtype: torch.dtype, regime: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values holding values exact in ``dtype``, as float32.

    ``beyond_fp16``: keys share a large common part, so every ``q . k`` is about 1.6e5 (beyond float16's 65504)
    while the logits of one query differ by a few units: a soft softmax that only float32 logits resolve (bfloat16
    cannot hold such keys: 8 bits of mantissa; it has float32's range). ``moderate``: soft logits of a few units.
    Values are large in both, so that the backward's ``dp - sum(p dp)`` cancels to a much smaller gradient.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(mean, std):
        return (mean + std * torch.randn(SHAPE, generator=g)).to(dtype).float()

    if regime == "beyond_fp16":
        q, k = rand(10.0, 3.0), rand(1000.0, 0.5)
        assert (q.double() * k.double()).sum(-1).abs().min() > FLOAT16_MAX
    else:
        q, k = rand(0.0, 3.0), rand(0.0, 3.0)
    return q, k, rand(0.0, 100.0)


def _seeded(*shape, std=0.5):
    return std * torch.randn(*shape, generator=torch.Generator().manual_seed(2))


def _aggregated(q, k, v, backend):
    """Aggregated attention over the window and 4 pooled tokens; tables exact in every dtype (multiples of 1/64)."""
    heads, dim, tokens = q.shape[1], q.shape[-1], q.shape[2] * q.shape[3]

    def table(*shape, std):
        return (_seeded(*shape, std=64 * std).round() / 64).to(q.dtype)

    return aggregated_attention(
        q,
        k,
        v,
        k[:, :, :2, :2].flatten(2, 3),
        v[:, :, :2, :2].flatten(2, 3),
        query_embedding=table(heads, dim, std=0.05),
        logit_scale=torch.full((heads,), 4.0, dtype=q.dtype),
        rpb=table(heads, 9, std=0.1),
        pool_bias=table(heads, tokens, 4, std=0.1),
        learnable_tokens=table(heads, dim, 9, std=0.05),
        learnable_bias=table(heads, 9, std=0.05),
        window_size=3,
        backend=backend,
    )


# op -> a call on (q, k, v, backend) at SHAPE; routing attends to every region, so that no near-tie of the
# region ranking (means rounded to the low dtype) changes which keys a query sees
KERNEL_CALLS = {
    "dense_attention": lambda q, k, v, b: dense_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), backend=b),
    "dense_attention_bias": lambda q, k, v, b: dense_attention(
        q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), _seeded(64, 64).to(q.dtype), backend=b
    ),
    "neighborhood_attention": lambda q, k, v, b: neighborhood_attention(q, k, v, 3, 1, _seeded(2, 5, 5), backend=b),
    "neighborhood_attention_dilated": lambda q, k, v, b: neighborhood_attention(q, k, v, 3, 2, backend=b),
    "bilevel_routing_attention": lambda q, k, v, b: bilevel_routing_attention(q, k, v, 2, 4, backend=b),
    "halo_attention": lambda q, k, v, b: halo_attention(q, k, v, 4, 1, backend=b),
    "aggregated_attention": _aggregated,
}
OP_OF_CALL = {name: name.removesuffix("_bias").removesuffix("_dilated") for name in KERNEL_CALLS}


def _backend_cases():
    """(call, backend) for every backend of every op that runs here; flex and natten on CPU are forward-only."""
    cases = []
    for call, op in OP_OF_CALL.items():
        for backend in get_op(op).backends:
            marks = []
            if backend == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
                marks.append(pytest.mark.skip(reason="triton needs CUDA or TRITON_INTERPRET=1"))
            if backend == "natten" and call == "neighborhood_attention":
                marks.append(pytest.mark.skip(reason="natten >= 0.20 has no relative position bias"))
            cases.append(pytest.param(call, backend, id=f"{call}-{backend}", marks=marks))
    return cases


def _assert_close(got, want, tol, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    atol = tol * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _run(call, backend, inputs, grad_out=None):
    leaves = [t.detach().requires_grad_(grad_out is not None) for t in inputs]
    out = KERNEL_CALLS[call](*leaves, backend)
    if grad_out is None:
        return out, None
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out, grads


def _check(call, backend, dtype, regime, *, autocast: bool):
    q, k, v = _low_precision_qkv(dtype, regime)
    backward = backend not in FORWARD_ONLY_ON_CPU or torch.cuda.is_available()
    grad_out = None
    if backward:
        grad_out = torch.randn(*SHAPE[:2], 64, SHAPE[-1]).to(dtype).double()
        grad_out = grad_out if "dense" in call else grad_out.reshape(SHAPE)
    want, want_grads = _run(call, "reference", [t.double() for t in (q, k, v)], grad_out)
    if autocast:  # float32 tensors in, as a model under autocast hands its float32 activations to an op
        with torch.autocast("cpu", dtype=dtype):
            got, grads = _run(call, backend, [q, k, v], grad_out)
    else:
        got, grads = _run(call, backend, [t.to(dtype) for t in (q, k, v)], grad_out)
    _assert_close(got, want, TOL[dtype], f"{call} [{backend}] output")
    if grads is None:
        return
    for name, grad, want_grad in zip("qkv", grads, want_grads, strict=True):
        if name == "q" and regime == "beyond_fp16":
            # dq = sum_j ds_j k_j * scale: the keys' common part (1000, against a spread of 0.5) cancels, so
            # float16's rounding of ds (every backend rounds it, as fused kernels do) is amplified 2000x. Finite is
            # what holds here; the moderate regime checks dq's value.
            assert torch.isfinite(grad).all(), f"{call} [{backend}] dq: non-finite"
        else:
            _assert_close(grad, want_grad, TOL[dtype], f"{call} [{backend}] d{name}")


def _regimes(dtype):
    return ["beyond_fp16", "moderate"] if dtype == torch.float16 else ["moderate"]


LOW_REGIMES = [pytest.param(d, r, id=f"{str(d)[6:]}-{r}") for d in LOW for r in _regimes(d)]


@pytest.mark.parametrize(("dtype", "regime"), LOW_REGIMES)
@pytest.mark.parametrize(("call", "backend"), _backend_cases())
def test_kernel_backends_on_low_precision_tensors(call, backend, dtype, regime):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter's bfloat16 tl.dot is wrong")
    if backend in ("triton", *FORWARD_ONLY_ON_CPU) and regime == "moderate" and not torch.cuda.is_available():
        pytest.skip("interpreted Triton, unfused flex and natten take seconds a call on CPU: the float16 range only")
    _check(call, backend, dtype, regime, autocast=False)


@pytest.mark.parametrize(("dtype", "regime"), LOW_REGIMES)
@pytest.mark.parametrize("call", list(KERNEL_CALLS))
def test_kernels_under_cpu_autocast(call, dtype, regime):
    """The automatic backend (reference or SDPA on CPU) given float32 tensors inside autocast."""
    _check(call, "auto", dtype, regime, autocast=True)


def _token_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Relative error of every token's channel vector."""
    return (got.float() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)


def _max_raw_logit(mixer: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        q, k, _ = (t.flatten(2, 3) for t in mixer.qkv_heads(x))
        return (q @ k.transpose(-1, -2)).abs().max().item()


def _assert_tokens_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """The typical token within ``tol`` and at most 5% of tokens beyond it.

    Rounding q and k to the low dtype moves logits of size L by L * eps: where two keys' logits are that close (a
    near-tie of a softmax that is an argmax at large L), the low-precision run may pick the other key, so a few
    tokens may differ entirely.
    """
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    errors = _token_errors(got, want)
    assert errors.median() < tol, f"{what}: median token error {errors.median():.3g}"
    assert (errors < tol).float().mean() > 0.95, f"{what}: {(errors >= tol).float().mean():.1%} of tokens off"


def _forward_backward(mixer, x, grad_out, dtype=None):
    leaf = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = mixer(leaf)
    out.float().backward(grad_out)  # outside autocast, as a training step runs it
    return out.detach(), leaf.grad


def _check_mixer(name, dtype, magnitude, device, size, dim=64, heads=2):
    torch.manual_seed(0)
    mixer = create_mixer(name, dim, num_heads=heads).to(device)
    x = torch.randn(2, *size, dim, device=device) * magnitude
    if magnitude > 1 and isinstance(mixer, MultiHeadMixer):
        assert _max_raw_logit(mixer, x) > FLOAT16_MAX  # the regime where float16 logits overflow
    grad_out = torch.randn(x.shape, device=device) / x[..., 0].numel()  # a mean-reduced loss
    want, want_grad = _forward_backward(mixer, x, grad_out)
    mixer.zero_grad(set_to_none=True)
    got, grad = _forward_backward(mixer, x, grad_out, dtype)
    assert got.shape == x.shape
    for param_name, param in mixer.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), f"{name}: non-finite grad of {param_name}"
    what = f"{name} under {dtype} autocast"
    _assert_tokens_close(got, want, TOL[dtype], f"{what}: output")
    if magnitude == 1:
        _assert_tokens_close(grad, want_grad, TOL[dtype], f"{what}: input gradient")
        return
    # At logits ~1e6 the input gradient is ill-conditioned in float32 too: inputs moved by the dtype's rounding
    # move it by up to 20% (global attention). The low-precision gradient must be as close as that float32 one.
    assert torch.isfinite(grad).all(), f"{what}: non-finite input gradient"
    rounding = torch.finfo(dtype).eps / 2
    _, moved_grad = _forward_backward(mixer, x * (1 + rounding * torch.randn_like(x)), grad_out)
    error, float32_error = _token_errors(grad, want_grad).median(), _token_errors(moved_grad, want_grad).median()
    message = f"{what}: input gradient off by {error:.3g}, float32 by {float32_error:.3g}"
    assert error <= max(TOL[dtype], 2 * float32_error), message


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("magnitude", [1.0, 1e3], ids=["unit", "x1e3"])
@pytest.mark.parametrize("name", list_mixers())
def test_every_mixer_under_cpu_autocast(name, magnitude, dtype):
    """Default hyper-parameters on a 15x13 map (no window or region size divides it); x1e3 gives raw q.k ~1e7."""
    _check_mixer(name, dtype, magnitude, torch.device("cpu"), (15, 13))


def _check_at_real_shape(name, dtype, device, size, dim=64, heads=2):
    """At unit scale the output is close to float32's; at x100 (raw q.k beyond float16's range) the output,
    input and parameter gradients are finite (no overflow)."""
    torch.manual_seed(0)
    mixer = create_mixer(name, dim, num_heads=heads).to(device)
    x = torch.randn(2, *size, dim, device=device)
    with torch.no_grad():
        want = mixer(x)
        with torch.autocast(device.type, dtype=dtype):
            got = mixer(x)
    _assert_tokens_close(got, want, TOL[dtype], f"{name} under {dtype} autocast: output")
    x = x * 100
    if isinstance(mixer, MultiHeadMixer):
        assert _max_raw_logit(mixer, x) > FLOAT16_MAX
    out, grad = _forward_backward(mixer, x, torch.randn(x.shape, device=device) / x[..., 0].numel(), dtype)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all(), f"{name} under {dtype}: overflow"
    for param_name, param in mixer.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), f"{name}: non-finite grad of {param_name}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", list_mixers())
def test_every_mixer_under_cuda_autocast_at_real_shapes(name, dtype):
    """A first-stage map (56x56, 64 channels) through the automatic (fast) backends. Gradient accuracy is
    the kernel tests' (against float64); here, over 3136 keys, x1e3 would make the softmax an argmax whose
    near-ties the dtype's rounding flips, and float16 weight gradients of the qkv projection (sums over 6272
    tokens of activations ~1e3) overflow, which is AMP's GradScaler's to handle."""
    _check_at_real_shape(name, dtype, torch.device("cuda"), (56, 56))
