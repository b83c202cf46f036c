"""A check that code never waits on the device: the ops that would make a GPU forward synchronise with the host
(not a test module).

``no_host_syncs()`` fails a block that dispatches any of them: reading a value on the host (``.item()``, ``int``
or ``bool`` of a tensor, a Python decision on a value), ops whose output size depends on values (``nonzero``,
boolean-mask indexing, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``), tensors made from
host data (``torch.tensor(...)``: a host-to-device copy on a GPU) and copies between devices. It works on CPU
tensors too, so CI checks the code a GPU runs; what it cannot see on CPU are host reads that are no-ops there
(``.tolist()``, ``.cpu()``, ``.numpy()``), which ``torch.cuda.set_sync_debug_mode("error")``, also set on CUDA,
catches on a GPU. ``flex_attention`` cannot run under it (it compiles itself, which a dispatch mode stops).
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "bincount",
    "lift_fresh",
    "repeat_interleave",
}


def _syncs(name: str, args, kwargs) -> bool:
    if name in SYNCING_OPS:
        return name != "repeat_interleave" or kwargs.get("output_size") is None
    if name == "_to_copy":
        return kwargs.get("device") is not None and torch.device(kwargs["device"]) != args[0].device
    if name == "copy_":
        return args[0].device != args[1].device
    if name in ("index", "index_put", "index_put_"):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return False


class HostSyncs(TorchDispatchMode):
    """Records each syncing op with the project line that called it."""

    def __init__(self):
        super().__init__()
        self.found: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if _syncs(name, args, kwargs):
            ours = [f for f in traceback.extract_stack()[:-1] if "site-packages" not in f.filename]
            self.found[f"{name} at {ours[-1].filename}:{ours[-1].lineno}" if ours else name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_syncs():
    """Fail the block if it dispatches a syncing op (and, where CUDA runs, if it synchronises the device)."""
    mode = HostSyncs()
    debug = torch.cuda.is_available()
    if debug:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with mode:
            yield mode
    finally:
        if debug:
            torch.cuda.set_sync_debug_mode(0)
    assert not mode.found, f"the block waits on the device: {dict(mode.found)}"
