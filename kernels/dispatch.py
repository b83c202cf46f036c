"""Backend dispatch for kernel ops.

Every op owns a ``reference`` backend (plain PyTorch, the oracle) and optional fast
backends. A call picks one by precedence:

1. tracing, scripting or ONNX/torch.export export: always ``reference``;
2. an explicit ``backend=`` argument;
3. the innermost :func:`use_backend` context;
4. the ``VISIONZOO_BACKEND`` environment variable;
5. ``"auto"``: the first fast backend, in registration order, whose capability
   predicate accepts the inputs, else ``reference``.

A forced backend (2-4) that the op has but that cannot run these inputs raises with the
predicate's reason; a context or environment choice that the op does not have at all
falls through to ``auto`` (so ``VISIONZOO_BACKEND=natten`` still lets dense attention
run). Declines are logged at DEBUG level on the ``visionzoo.kernels`` logger.
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
    "REFERENCE",
    "TRITON_DTYPES",
    "Capability",
    "KernelOp",
    "can_run_triton_on",
    "get_op",
    "is_exporting",
    "list_ops",
    "use_backend",
]

AUTO = "auto"
REFERENCE = "reference"
ENV_VAR = "VISIONZOO_BACKEND"
BACKENDS = (REFERENCE, "sdpa", "flex", "natten", "triton")

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


def _always(*args, **kwargs) -> Capability:
    return Capability.yes()


@dataclass(frozen=True)
class _Backend:
    fn: Callable
    can_run: Callable[..., Capability]
    auto_devices: tuple[str, ...] | None = None


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
        reference: the plain-PyTorch implementation every backend is tested against.
    """

    def __init__(self, name: str, reference: Callable):
        if name in _OPS:
            raise ValueError(f"kernel op {name!r} is already registered")
        self.name = name
        self._backends: dict[str, _Backend] = {REFERENCE: _Backend(reference, _always)}
        _OPS[name] = self

    @property
    def backends(self) -> list[str]:
        """Backend names in auto order: fast backends by registration, ``reference`` last."""
        fast = [b for b in self._backends if b != REFERENCE]
        return [*fast, REFERENCE]

    def register(
        self, name: str, can_run: Callable[..., Capability], auto_devices: tuple[str, ...] | None = None
    ) -> Callable[[Callable], Callable]:
        """Decorator registering ``fn`` as backend ``name``, gated by ``can_run(*args, **kwargs)``.

        ``auto_devices`` limits automatic choice to these device types (where the backend was
        measured faster than ``reference``); it still runs anywhere when forced.
        """
        if name not in BACKENDS:
            raise ValueError(f"{self.name}: backend names are {BACKENDS}, got {name!r}")
        if name in self._backends:
            raise ValueError(f"{self.name}: backend {name!r} is already registered")

        def decorator(fn: Callable) -> Callable:
            self._backends[name] = _Backend(fn, can_run, auto_devices)
            return fn

        return decorator

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
                _log.debug("%s: no backend %r, choosing automatically", self.name, backend)
                backend = AUTO
        if backend != AUTO:
            verdict = self.supports(backend, *args, **kwargs)
            if not verdict:
                raise RuntimeError(f"{self.name}: backend {backend!r} cannot run these inputs: {verdict.reason}")
            return backend
        device = _device_type(args)
        for name in self.backends:
            auto_devices = self._backends[name].auto_devices
            if auto_devices is not None and device not in auto_devices:
                _log.debug("%s: %s is not chosen automatically on %s", self.name, name, device)
                continue
            verdict = self.supports(name, *args, **kwargs)
            if verdict:
                return name
            _log.debug("%s: %s declined: %s", self.name, name, verdict.reason)
        raise AssertionError("reference always runs")  # pragma: no cover

    def __call__(self, *args, backend: str = AUTO, **kwargs):
        name = self.choose(*args, backend=backend, **kwargs)
        return self._backends[name].fn(*args, **kwargs)


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
