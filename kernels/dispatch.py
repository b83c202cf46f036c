"""Backend dispatch for kernel ops.

Every op owns a ``reference`` backend (plain PyTorch, the oracle) and optional fast
backends. A call picks one by precedence:

1. tracing, scripting or ONNX/torch.export export: always ``reference``, traced inline as plain
   aten ops (so the exported graph needs no custom operator and ONNX can translate it);
2. an explicit ``backend=`` argument;
3. the innermost :func:`use_backend` context;
4. the ``VISIONZOO_BACKEND`` environment variable;
5. ``"auto"``: the first fast backend, in the op's declared ``priority``, whose capability
   predicate accepts the inputs, else ``reference``.

A forced backend (2-4) that the op has but that cannot run these inputs raises with the
predicate's reason; a context or environment choice that the op does not have at all
falls through to ``auto`` (so ``VISIONZOO_BACKEND=natten`` still lets dense attention
run). Declines are logged at DEBUG level on the ``visionzoo.kernels`` logger (in eager mode).

Under ``torch.compile`` the choice is made while dynamo traces (it reads only what dynamo
guards on: devices, dtypes, shapes, ``requires_grad``). An op given a ``schema`` is then one
PyTorch custom operator per call, ``torch.ops.visionzoo.<name>`` (see :func:`_define_custom_op`),
with a fake implementation for the output shape and a registered backward, so dynamo and
AOTAutograd see one node whatever the backend runs inside (Triton launches, natten, Python
index tables). An op without a schema is plain aten code in every backend and is traced inline.

Every backend also declares what it supports (:class:`Support`: devices, dtypes, where it
computes gradients, which optional inputs it takes). Dispatch never reads a declaration; the
parity tests (``tests/test_backend_parity.py``) run every case a declaration covers and fail
when the capability predicate declines one.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "AUTO",
    "BACKENDS",
    "ENV_VAR",
    "FLOAT_DTYPES",
    "REFERENCE",
    "SINGLE_AND_DOUBLE",
    "SINGLE_AND_HALF",
    "TRITON_DTYPES",
    "Capability",
    "KernelOp",
    "Support",
    "can_run_triton_on",
    "get_op",
    "if_installed",
    "is_exporting",
    "list_ops",
    "needs_grad",
    "one_wide_dtype",
    "triton_support",
    "use_backend",
]

AUTO = "auto"
REFERENCE = "reference"
ENV_VAR = "VISIONZOO_BACKEND"
BACKENDS = (REFERENCE, "sdpa", "tiled", "flex", "natten", "triton")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
SINGLE_AND_HALF = (torch.float32, torch.float16, torch.bfloat16)
SINGLE_AND_DOUBLE = (torch.float32, torch.float64)

_log = logging.getLogger("visionzoo.kernels")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("visionzoo_backend", default=None)
_OPS: dict[str, KernelOp] = {}


@dataclass(frozen=True)
class Capability:
    """Answer of a ``can_run_<backend>`` predicate: truthy when it can run, else why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    @classmethod
    def yes(cls) -> Capability:
        return cls(True)

    @classmethod
    def no(cls, reason: str) -> Capability:
        return cls(False, reason)


@dataclass(frozen=True)
class Support:
    """What a backend declares it runs, read by the tests (and tools), never by dispatch.

    Args:
        devices: device types it runs on: ``"cuda"``, ``"cpu"``, or ``"cpu-interpreter"`` (CPU
            tensors under Triton's interpreter, ``TRITON_INTERPRET=1``).
        dtypes: dtypes it takes.
        backward: the device types (as in ``devices``) on which it also computes gradients.
        features: the optional inputs of the op it takes (names from the op's ``features``).
    """

    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()
    backward: tuple[str, ...] = ()
    features: tuple[str, ...] = ()


def if_installed(module: str, support: Support) -> Callable[[], Support]:
    """A declaration that holds where ``module`` is importable; elsewhere the backend declares nothing."""
    import importlib.util

    return lambda: support if importlib.util.find_spec(module) is not None else Support()


def _debug(message: str, *args) -> None:
    if not torch.compiler.is_compiling():  # dynamo cannot trace a logging call
        _log.debug(message, *args)


def _always(*args, **kwargs) -> Capability:
    return Capability.yes()


@dataclass(frozen=True)
class _Backend:
    fn: Callable
    can_run: Callable[..., Capability]
    declares: Support | Callable[[], Support]
    auto_devices: tuple[str, ...] | None = None
    auto_when: Callable[..., bool] | None = None


def _device_type(args: tuple) -> str | None:
    return next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)


def is_exporting() -> bool:
    """True while tracing, scripting or exporting, when only ``reference`` may run."""
    return (
        torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_exporting()
    )


def one_wide_dtype(*tensors: torch.Tensor) -> Capability:
    """Whether ``tensors`` share one dtype of :data:`SINGLE_AND_DOUBLE` (the CPU paths' matmuls), and why not."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1 or tensors[0].dtype not in SINGLE_AND_DOUBLE:
        return Capability.no(f"dtypes {sorted(map(str, dtypes))}: one of float32 and float64 only")
    return Capability.yes()


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether gradients are on and some of ``tensors`` (None ignored) require them."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every op called inside the block (``"auto"`` lifts an outer force)."""
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


class KernelOp:
    """A named op: a reference function plus fast backends chosen by capability.

    Args:
        name: op name, unique across the package.
        reference: the plain-PyTorch implementation every backend is tested against; it
            supports every device, dtype and feature, with gradients.
        priority: the fast backends in the order ``auto`` tries them; only these may register.
        features: names of the op's optional inputs or variants a backend may or may not take
            (e.g. ``"rpb"``), for the backends' :class:`Support` declarations.
        schema: the operator schema of the op's positional arguments (``"(Tensor q, ..., int k) ->
            Tensor"``, output shaped ``q.shape[:-1] + v.shape[-1:]`` in ``q``'s dtype): compiled
            calls then run as the custom operator ``torch.ops.visionzoo.<name>``. None for an op
            whose backends are all traceable aten code.
    """

    def __init__(
        self,
        name: str,
        reference: Callable,
        priority: tuple[str, ...] = (),
        features: tuple[str, ...] = (),
        schema: str | None = None,
    ):
        if name in _OPS:
            raise ValueError(f"kernel op {name!r} is already registered")
        unknown = [b for b in priority if b not in BACKENDS or b == REFERENCE]
        if unknown or len(set(priority)) != len(priority):
            raise ValueError(f"{name}: priority must list distinct fast backends of {BACKENDS[1:]}, got {priority}")
        self.name = name
        self.priority = priority
        self.features = features
        everything = Support(("cpu", "cuda"), FLOAT_DTYPES, ("cpu", "cuda"), features)
        self._backends: dict[str, _Backend] = {REFERENCE: _Backend(reference, _always, everything)}
        self.custom_op = None if schema is None else _define_custom_op(self, schema)
        _OPS[name] = self

    @property
    def backends(self) -> list[str]:
        """Backend names in auto order: the registered fast backends by ``priority``, ``reference`` last."""
        return [*(b for b in self.priority if b in self._backends), REFERENCE]

    def register(
        self,
        name: str,
        can_run: Callable[..., Capability],
        declares: Support | Callable[[], Support],
        auto_devices: tuple[str, ...] | None = None,
        auto_when: Callable[..., bool] | None = None,
    ) -> Callable[[Callable], Callable]:
        """Decorator registering ``fn`` as backend ``name``, gated by ``can_run(*args, **kwargs)``.

        ``declares`` says what it supports (or is a function that says so when asked, for a
        declaration that depends on what is installed); ``can_run`` must accept every input it
        covers. ``auto_devices`` limits automatic choice to these device types (where the backend
        was measured faster than ``reference``); ``auto_when(*args, **kwargs)``, if given, limits it
        further to the inputs where it was (a shape rule, not a capability); it still runs anywhere
        when forced.
        """
        if name not in self.priority:
            raise ValueError(f"{self.name}: backend {name!r} is not in the op's priority {self.priority}")
        if name in self._backends:
            raise ValueError(f"{self.name}: backend {name!r} is already registered")
        if isinstance(declares, Support) and not set(declares.features) <= set(self.features):
            raise ValueError(f"{self.name}: {name} declares features beyond the op's {self.features}")

        def decorator(fn: Callable) -> Callable:
            self._backends[name] = _Backend(fn, can_run, declares, auto_devices, auto_when)
            return fn

        return decorator

    def declared(self, backend: str) -> Support:
        """What ``backend`` declares it supports (nothing for a backend the op lacks)."""
        if backend not in self._backends:
            return Support()
        declares = self._backends[backend].declares
        return declares if isinstance(declares, Support) else declares()

    def supports(self, backend: str, *args, **kwargs) -> Capability:
        """Whether ``backend`` can run these arguments, and why not."""
        if backend not in self._backends:
            return Capability.no(f"{self.name} has no backend {backend!r}")
        return self._backends[backend].can_run(*args, **kwargs)

    def choose(self, *args, backend: str = AUTO, **kwargs) -> str:
        """Name of the backend a call with these arguments would run."""
        if is_exporting():
            return REFERENCE
        if backend != AUTO and backend not in self._backends:
            raise ValueError(f"{self.name} has no backend {backend!r}; it has: {', '.join(self.backends)}")
        if backend == AUTO:
            backend = _forced.get() or os.environ.get(ENV_VAR, "").strip().lower() or AUTO
            if backend not in self._backends and backend != AUTO:
                if backend not in BACKENDS:
                    raise ValueError(
                        f"unknown kernel backend {backend!r} (from use_backend or {ENV_VAR}); "
                        f"known: {AUTO}, {', '.join(BACKENDS)}"
                    )
                _debug("%s: no backend %r, choosing automatically", self.name, backend)
                backend = AUTO
        if backend != AUTO:
            verdict = self.supports(backend, *args, **kwargs)
            if not verdict:
                raise RuntimeError(f"{self.name}: backend {backend!r} cannot run these inputs: {verdict.reason}")
            return backend
        device = _device_type(args)
        for name in self.backends:
            entry = self._backends[name]
            if entry.auto_devices is not None and device not in entry.auto_devices:
                _debug("%s: %s is not chosen automatically on %s", self.name, name, device)
                continue
            if entry.auto_when is not None and not entry.auto_when(*args, **kwargs):
                _debug("%s: %s is not chosen automatically for these shapes", self.name, name)
                continue
            verdict = self.supports(name, *args, **kwargs)
            if verdict:
                return name
            _debug("%s: %s declined: %s", self.name, name, verdict.reason)
        raise AssertionError("reference always runs")  # pragma: no cover

    def run(self, backend: str, *args):
        """Run ``backend`` on these positional arguments, without choosing or checking."""
        return self._backends[backend].fn(*args)

    def __call__(self, *args, backend: str = AUTO):
        name = self.choose(*args, backend=backend)
        if self.custom_op is not None and torch.compiler.is_compiling() and not is_exporting():
            return self.custom_op(*args, name)
        return self.run(name, *args)


_LIBRARY = torch.library.Library("visionzoo", "FRAGMENT")


def _define_custom_op(op: KernelOp, schema: str):
    """``torch.ops.visionzoo.<name>(*args, backend)``: the op as one opaque node for dynamo and AOTAutograd.

    The forward runs the named backend eagerly. The backward is a second operator,
    ``<name>_backward``, that recomputes the forward with autograd on and takes its gradients, so
    each backend keeps its own backward (and saves nothing extra) and the pair needs no
    backend-specific residuals. Both have fake implementations, from the shapes of the inputs.
    """
    params, returns = schema.rsplit("->", 1)
    if returns.strip() != "Tensor":
        raise ValueError(f"{op.name}: a custom op returns one Tensor, got {returns.strip()!r}")
    params = params.strip()[1:-1]
    _LIBRARY.define(f"{op.name}({params}, str backend) -> Tensor")
    _LIBRARY.define(f"{op.name}_backward(Tensor grad_out, {params}, str backend, bool[] needs) -> Tensor[]")
    forward = getattr(torch.ops.visionzoo, op.name).default
    backward = getattr(torch.ops.visionzoo, f"{op.name}_backward").default

    def run(*args):
        *args, backend = args
        out = op.run(backend, *args)
        return out.to(args[0].dtype).contiguous()  # the fake's dtype; never a view of an input

    def fake(*args):
        q, v = args[0], args[2]
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    def recompute_grads(grad_out, *args):
        *args, backend, needs = args
        needs = iter(needs)
        args = [a.detach().requires_grad_(next(needs)) if isinstance(a, torch.Tensor) else a for a in args]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        with torch.enable_grad():
            out = op.run(backend, *args)
            wanted = [t for t in tensors if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out.contiguous(), allow_unused=True))
        return [_like(next(grads), t) if t.requires_grad else t.new_empty(0) for t in tensors]

    def fake_grads(grad_out, *args):
        *args, _, needs = args
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        return [torch.empty_like(t) if need else t.new_empty(0) for t, need in zip(tensors, needs, strict=True)]

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs
        tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*tensors)

    def backward_of(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if isinstance(a, torch.Tensor) else a for a in ctx.inputs]
        *args, backend = args
        positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        needs = [bool(ctx.needs_input_grad[i]) for i in positions]
        grads = backward(grad_out, *args, backend, needs) if any(needs) else []
        out = [None] * (len(args) + 1)
        for i, need, grad in zip(positions, needs, grads):
            out[i] = grad if need else None
        return tuple(out)

    _LIBRARY.impl(op.name, run, "CompositeExplicitAutograd")
    _LIBRARY.impl(f"{op.name}_backward", recompute_grads, "CompositeExplicitAutograd")
    torch.library.register_fake(f"visionzoo::{op.name}", fake, lib=_LIBRARY)
    torch.library.register_fake(f"visionzoo::{op.name}_backward", fake_grads, lib=_LIBRARY)
    torch.library.register_autograd(f"visionzoo::{op.name}", backward_of, setup_context=setup_context, lib=_LIBRARY)
    return forward


def _like(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``grad`` (zeros when None) laid out as ``like``, as the fake gradient is."""
    return torch.zeros_like(like) if grad is None else torch.empty_like(like).copy_(grad)


TRITON_DTYPES = SINGLE_AND_HALF
_TRITON_DEVICES = ("cuda", "cpu-interpreter")


def triton_support(features: tuple[str, ...] = ()) -> Callable[[], Support]:
    """The declaration of a Triton backend: CUDA or the interpreter, fp32/fp16/bf16, forward and
    backward, with these features, where triton is installed."""
    return if_installed("triton", Support(_TRITON_DEVICES, TRITON_DTYPES, _TRITON_DEVICES, features))


def can_run_triton_on(*tensors: torch.Tensor | None) -> Capability:
    """What every Triton backend needs of its tensors: triton installed, CUDA (or CPU under Triton's
    interpreter, ``TRITON_INTERPRET=1``), one device, and one dtype among fp32, fp16 and bf16."""
    import importlib.util

    tensors = tuple(t for t in tensors if t is not None)
    if importlib.util.find_spec("triton") is None:
        return Capability.no("triton is not installed")
    device = tensors[0].device
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return Capability.no(f"triton runs on cuda (or on cpu with TRITON_INTERPRET=1), got {device.type}")
    if any(t.device != device for t in tensors):
        return Capability.no("tensors on different devices")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        return Capability.no(f"mixed dtypes {sorted(map(str, dtypes))}")
    if tensors[0].dtype not in TRITON_DTYPES:
        return Capability.no(f"dtype {tensors[0].dtype} (float32, float16 or bfloat16 only)")
    return Capability.yes()


def get_op(name: str) -> KernelOp:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown kernel op {name!r}; known: {sorted(_OPS)}") from None


def list_ops() -> list[str]:
    return sorted(_OPS)
