"""Every registered mixer under float16 and bfloat16 autocast, at activations whose ``q . k`` exceeds float16's
range (65504): outputs and gradients finite and close to float32 on the same values.

Both autocast dtypes run on CPU in torch 2.14 (``torch.autocast("cpu", dtype=torch.float16)`` included). The kernel
ops in that regime, every backend on half-precision tensors and ``auto`` under autocast: test_backend_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from visionzoo.mixers import MultiHeadMixer, create_mixer, list_mixers

LOW = (torch.float16, torch.bfloat16)
TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
FLOAT16_MAX = torch.finfo(torch.float16).max


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
