"""Every kernel backend against the reference: one harness over op x case x backend x dtype.

Cases: each op has one table of small cases (``CASES``). A case names the op features it uses (``rpb``,
``valid_size``, ...: the op's ``features``), the dtypes it runs in and its device. A backend's declaration
(``KernelOp.declared``) decides which cases apply: its devices (CPU, CUDA, or CPU under Triton's interpreter,
which tests/conftest.py turns on without a GPU), dtypes and features. Every case that applies is generated; the
backend's capability check must accept it (a decline fails, with its reason); then its output, and its gradients
where it declares backward on that device (elsewhere it runs without grad), are compared with the oracle.

Oracle: the reference backend in float64 on the same values: inputs drawn in float64, rounded to the case's
dtype and upcast back (exactly), on the same device; the upstream gradient likewise. One exception, per case:
routing's top-k is a discrete choice, and at BiFormer's 49 regions bfloat16's rounding of the region means flips
it against float64 (checked on these inputs); there the oracle is the reference in bfloat16 (``own_dtype_oracle``),
which routes as the backends do.

Tolerance: ``max |got - want| <= TOL[device][dtype] * max(1, max |want|)`` for every gradient (gradients summed
over many queries, such as a position-bias table's, grow with the map) and for half-precision outputs;
``max |got - want| <= TOL[device][dtype]`` for float32 and float64 outputs.

Two skips, written once: the Triton interpreter's bfloat16 ``tl.dot`` is wrong (those cases skip), and
``quick`` cases (the moderate large-activation regime) skip, on CPU, the backends that are interpreted or
forward-only there, which take seconds a call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import visionzoo.kernels as kernels
from visionzoo.kernels import get_op, route_regions

from host_syncs import no_host_syncs
from oracles import pool_grid

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
LOW = (F16, BF16)
TOL = {
    "cpu": {F64: 1e-10, F32: 1e-5, F16: 1e-2, BF16: 5e-2},
    "cuda": {F32: 1e-4, F16: 1e-2, BF16: 5e-2},
}
FLOAT16_MAX = torch.finfo(torch.float16).max
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclass(frozen=True)
class Case:
    """Inputs for one op and how to call it.

    Args:
        name: unique within the op.
        make: the inputs from a seeded generator, float64 on CPU (boolean masks as they are).
        args: the op's positional arguments from the inputs (given as keywords).
        dtypes: dtypes the case runs in.
        features: op features the case uses.
        device: ``"cpu"`` or ``"cuda"``.
        grad: False runs every backend without grad (the no-grad paths).
        frozen: inputs that take no gradient.
        float32: inputs kept in float32 in every dtype (a float32 parameter beside half activations).
        finite_only: inputs whose gradient is only checked to be finite (ill-conditioned, see the case).
        quick: on CPU, only the backends that run natively with gradients there.
        autocast: also checked through ``auto`` on float32 inputs under CPU autocast.
        own_dtype_oracle: dtypes in which the oracle is the reference in that dtype, not float64.
    """

    name: str
    make: Callable[[torch.Generator], dict[str, torch.Tensor]]
    args: Callable[..., tuple]
    dtypes: tuple[torch.dtype, ...] = (F32,)
    features: tuple[str, ...] = ()
    device: str = "cpu"
    grad: bool = True
    frozen: tuple[str, ...] = ()
    float32: tuple[str, ...] = ()
    finite_only: tuple[str, ...] = ()
    quick: bool = False
    autocast: bool = False
    own_dtype_oracle: tuple[torch.dtype, ...] = ()


def _randn(g, *shape, mean=0.0, std=1.0):
    return mean + std * torch.randn(*shape, generator=g, dtype=F64)


# --- large activations: float16 and bfloat16 where q . k leaves float16's range --------------------------------

SHAPE = (1, 2, 8, 8, 16)  # (B, heads, H, W, head_dim): head dim 16, the smallest every Triton kernel takes


def _large_qkv(regime: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """``beyond_fp16``: keys share a large common part, so every ``q . k`` is about 1.6e5 (beyond float16's 65504)
    while the logits of one query differ by a few units: a soft softmax that only float32 logits resolve (bfloat16
    cannot hold such keys: 8 bits of mantissa; it has float32's range). ``moderate``: soft logits of a few units.
    Values are large in both, so that the backward's ``dp - sum(p dp)`` cancels to a much smaller gradient.
    """
    if regime == "beyond_fp16":
        q, k = _randn(g, *SHAPE, mean=10.0, std=3.0), _randn(g, *SHAPE, mean=1000.0, std=0.5)
        assert (q.flatten(2, 3) @ k.flatten(2, 3).transpose(-1, -2)).abs().min() > FLOAT16_MAX
    else:
        q, k = _randn(g, *SHAPE, std=3.0), _randn(g, *SHAPE, std=3.0)
    return dict(q=q, k=k, v=_randn(g, *SHAPE, std=100.0))


def _large(name, args, tables=None, features=()) -> list[Case]:
    """The op ``args`` on both regimes; ``tables(g)`` adds frozen inputs (position biases and the like)."""

    def case(regime, dtypes):
        def make(g):
            return _large_qkv(regime, g) | (tables(g) if tables else {})

        # dq = sum_j ds_j k_j * scale: the keys' common part (1000, against a spread of 0.5) cancels, so float16's
        # rounding of ds (every backend rounds it, as fused kernels do) is amplified 2000x. Finite is what holds
        # there; the moderate regime checks dq's value.
        finite_only = ("q",) if regime == "beyond_fp16" else ()
        frozen = tuple(tables(torch.Generator())) if tables else ()
        return Case(
            f"{name} {regime}", make, args, dtypes, features, frozen=frozen, finite_only=finite_only,
            quick=regime == "moderate", autocast=True,
        )  # fmt: skip

    return [case("beyond_fp16", (F16,)), case("moderate", LOW)]


# --- neighborhood attention ----------------------------------------------------------------------------------


def _na(batch, heads, size, dim, kernel_size, dilation=1, rpb=True, scale=None, device="cpu", tag="", **options):
    def make(g):
        inputs = {name: _randn(g, batch, heads, *size, dim) for name in "qkv"}
        if rpb:
            inputs["rpb"] = _randn(g, heads, 2 * kernel_size - 1, 2 * kernel_size - 1)
        return inputs

    def args(q, k, v, rpb=None):
        return q, k, v, kernel_size, dilation, rpb, scale

    features = (
        ("rpb",) * rpb + ("dilation",) * (dilation > 1) + ("float32_rpb",) * ("rpb" in options.get("float32", ()))
    )
    name = f"{batch}x{heads}x{size[0]}x{size[1]}x{dim} k{kernel_size} dil{dilation}{' rpb' * rpb}{tag}"
    return Case(name, make, args, features=features, device=device, **options)


def _na_large_tables(g):
    return dict(rpb=0.5 * torch.randn(2, 5, 5, generator=g, dtype=F64))


def _na_gpu(batch, heads, size, dim, kernel_size, dilation, rpb, dtypes=(F16,)):
    return _na(batch, heads, size, dim, kernel_size, dilation, rpb, device="cuda", dtypes=dtypes)


NA_CASES = [
    # the interpreter's tiles are 4x4 queries and 4x8 keys, so every case has ragged tiles and several key tiles
    _na(1, 1, (3, 3), 8, 3),  # map exactly the window; head dim below the dot's 16, padded
    _na(2, 2, (6, 7), 24, 3),  # batch and heads; head dim padded to 32
    _na(1, 1, (9, 11), 16, 3, 2),  # dilation with H, W not multiples of it
    _na(1, 1, (7, 9), 32, 5, rpb=False),
    _na(1, 1, (10, 7), 16, 7),  # k = 7: the key rectangle spans two key tiles per axis
    _na(1, 1, (9, 10), 16, 3, 3),  # H = k * d exactly
    _na(1, 1, (12, 13), 16, 3),  # interior query tiles
    _na(1, 1, (6, 7), 16, 3, dtypes=(F16,)),
    _na(1, 1, (9, 8), 16, 3, 2, dtypes=(F16,)),
    _na(1, 1, (6, 7), 16, 3, dtypes=(F16,), float32=("rpb",), tag=" fp32 table"),  # as under autocast
    _na(1, 1, (7, 6), 16, 3, 2, scale=0.3, frozen=("rpb",), tag=" frozen, scale 0.3"),  # a converted checkpoint
    _na(1, 1, (6, 7), 16, 3, 2, grad=False, tag=" no grad"),
    # multiples and non-multiples of k * d, forward only
    *(
        _na(2, 2, size, 8, kernel_size, dilation, rpb, grad=False, tag=" no grad")
        for kernel_size, dilation, size in [(3, 1, (7, 10)), (3, 2, (6, 11)), (5, 3, (16, 15))]
        for rpb in (True, False)
    ),
    *_large("rpb", lambda q, k, v, rpb: (q, k, v, 3, 1, rpb, None), _na_large_tables, ("rpb",)),
    *_large("dilated", lambda q, k, v: (q, k, v, 3, 2, None, None), features=("dilation",)),
    # NAT stage 1 at 224 (56x56), DiNAT's k 7 dilation 8 at 56x56, NAT at 512 (128x128); every dtype and case
    # compiles and autotunes anew, so fp32 and bf16 on the first only
    _na_gpu(8, 2, (56, 56), 32, 7, 1, True, dtypes=(F32, F16, BF16)),
    _na_gpu(8, 2, (56, 56), 32, 7, 8, True),
    _na_gpu(8, 4, (128, 128), 32, 7, 1, False),
    *(_na_gpu(2, 2, (29, 43), dim, 7, 2, True) for dim in (16, 24, 64, 128)),
    _na_gpu(64, 2, (56, 56), 32, 7, 1, True),
    *(
        _na_gpu(2, 4, size, 32, 7, dilation, rpb, dtypes=(F32, F16, BF16))
        for dilation, size in [(1, (56, 56)), (2, (29, 43))]
        for rpb in (True, False)
    ),
]


# --- bi-level routing attention ------------------------------------------------------------------------------


def _routing(batch, heads, size, dim, n_win, topk, scale=None, valid_size=None, dim_v=None, tag="", **options):
    dim_v = dim_v or dim

    def make(g):
        shapes = [(batch, heads, *size, dim)] * 2 + [(batch, heads, *size, dim_v)]
        return dict(zip("qkv", (_randn(g, *shape) for shape in shapes), strict=True))

    def args(q, k, v):
        return q, k, v, n_win, topk, scale, valid_size

    features = ("valid_size",) * (valid_size is not None) + ("value_dim",) * (dim_v != dim)
    name = f"{batch}x{heads}x{size[0]}x{size[1]}x{dim}/{dim_v} win{n_win} top{topk} valid{valid_size}{tag}"
    return Case(name, make, args, features=features, **options)


def _tied_keys(g):
    """Every key region has the same mean: all affinities tie, broken as ``torch.topk`` does."""
    inputs = dict(q=_randn(g, 2, 1, 4, 4, 16), k=torch.ones(2, 1, 4, 4, 16, dtype=F64), v=_randn(g, 2, 1, 4, 4, 16))
    index = route_regions(inputs["q"], inputs["k"], 2, 2)
    assert (index == index[:1, :1]).all()  # one tie-break, the same for every query region
    return inputs


def _one_projection(q, k, v):
    """The routing mixer's q, k, v: strided views of one (B, H, W, 3, heads, d) tensor, read in place."""
    projection = torch.stack([t.permute(0, 2, 3, 1, 4) for t in (q, k, v)], dim=3)
    q, k, v = projection.permute(3, 0, 4, 1, 2, 5).unbind(0)
    assert q.stride() == (4 * 8 * 96, 16, 8 * 96, 96, 1)
    return q, k, v, 2, 3, 0.25, (3, 7)


def _biformer_tiny(size, valid_size, heads, n_win, topk):
    """BiFormer-T's shapes: head dim 32, scale (heads * 32) ** -0.5."""
    return _routing(2, heads, (size, size), 32, n_win, topk, (heads * 32) ** -0.5, valid_size, device="cuda",
                    dtypes=(F32, F16, BF16), own_dtype_oracle=(BF16,))  # fmt: skip


ROUTING_CASES = [
    _routing(1, 1, (8, 6), 16, 2, 2, 0.3, tag=" (4x3 regions)"),
    _routing(1, 1, (8, 8), 32, 2, 1, 0.3),
    _routing(1, 1, (8, 8), 24, 2, 4, 0.3, tag=" (topk = regions: full attention)"),
    _routing(1, 1, (6, 8), 16, 2, 2, 0.3, (5, 7), tag=" (padded tokens in partly real regions)"),
    _routing(1, 1, (8, 8), 16, 2, 4, 0.3, (3, 3), tag=" (regions of padding only are routed)"),
    _routing(1, 1, (10, 10), 16, 2, 2, 0.3, (9, 10), tag=" (regions of 25 tokens over ragged tiles)"),
    _routing(1, 1, (8, 8), 24, 2, 2, 0.3, dim_v=16),
    _routing(1, 2, (8, 8), 32, 2, 2, 32**-0.5, (7, 5), dtypes=(F16,)),
    Case("ties in routing", _tied_keys, lambda q, k, v: (q, k, v, 2, 2, 0.3, None)),
    Case(
        "strided views of one projection",
        lambda g: {name: _randn(g, 1, 2, 4, 8, 16) for name in "qkv"},
        _one_projection,
        features=("valid_size",),
    ),
    *(_routing(2, 2, (12, 12), 16, 3, 2, 0.3, valid, grad=False, tag=" no grad") for valid in (None, (10, 7))),
    *_large("all regions", lambda q, k, v: (q, k, v, 2, 4, None, None)),  # no near-tie of the ranking matters
    _biformer_tiny(56, None, 2, 7, 1),  # stage 1 at 224
    _biformer_tiny(28, None, 4, 7, 4),  # stage 2 at 224
    _biformer_tiny(14, None, 8, 7, 16),  # stage 3 at 224
    _biformer_tiny(133, (128, 128), 2, 7, 1),  # stage 1 at 512 (padded)
    _biformer_tiny(259, (256, 256), 2, 7, 1),  # stage 1 at 1024 (padded)
    *(
        _routing(2, 2, (28, 21), dim, 7, 3, 0.2, (27, 20), dim_v, device="cuda")
        for dim, dim_v in [(16, 16), (24, 40), (64, 64), (128, 128)]
    ),
    _routing(2, 2, (56, 56), 32, 7, 2, device="cuda", dtypes=(F32, F16, BF16), own_dtype_oracle=(BF16,)),
]


# --- aggregated attention ------------------------------------------------------------------------------------

_TABLES = ("query_embedding", "logit_scale", "rpb", "cpb", "cpb_rows", "cpb_cols", "learnable_tokens", "learnable_bias")


def _pool_bias(g, heads, height, width, pool, std=1.0):
    """A factored pooled bias: a random table and random indices into it, entries shared between pairs."""
    pool_h, pool_w = pool_grid(pool)
    return dict(
        cpb=_randn(g, heads, height + pool_h, width + pool_w, std=std),
        cpb_rows=torch.randint(height + pool_h, (height, pool_h), generator=g),
        cpb_cols=torch.randint(width + pool_w, (width, pool_w), generator=g),
    )


def _aggregated_tables(g, heads, dim, height, width, pool, window):
    return dict(
        query_embedding=_randn(g, heads, dim, std=0.3),
        logit_scale=_randn(g, heads).abs() + 1.0,
        rpb=_randn(g, heads, window * window),
        **_pool_bias(g, heads, height, width, pool),
        learnable_tokens=_randn(g, heads, dim, window * window, std=0.3),
        learnable_bias=_randn(g, heads, window * window, std=0.3),
    )


def _aggregated(batch, heads, height, width, dim, pool, window, tag="", **options):
    def make(g):
        qkv = {name: _randn(g, batch, heads, height, width, dim) for name in "qkv"}
        pooled = {name: _randn(g, batch, heads, pool, dim) for name in ("k_pool", "v_pool")}
        return qkv | pooled | _aggregated_tables(g, heads, dim, height, width, pool, window)

    def args(q, k, v, k_pool, v_pool, **tables):
        return q, k, v, k_pool, v_pool, *(tables[name] for name in _TABLES), window

    return Case(f"{batch}x{heads}x{height}x{width}x{dim} pool{pool} win{window}{tag}", make, args, **options)


def _aggregated_large_tables(g, heads=2, dim=16, pool=4):
    return dict(
        query_embedding=_randn(g, heads, dim, std=0.05),
        logit_scale=torch.full((heads,), 4.0, dtype=F64),
        rpb=_randn(g, heads, 9, std=0.1),
        **_pool_bias(g, heads, *SHAPE[2:4], pool, std=0.1),
        learnable_tokens=_randn(g, heads, dim, 9, std=0.05),
        learnable_bias=_randn(g, heads, 9, std=0.05),
    )


def _aggregated_large(q, k, v, **tables):
    """The window and 4 pooled tokens taken from the keys and values."""
    pooled = (t[:, :, :2, :2].flatten(2, 3) for t in (k, v))
    return q, k, v, *pooled, *(tables[name] for name in _TABLES), 3


AGGREGATED_CASES = [
    # ragged maps (not multiples of the 16-query interpreter tile), H != W, pooled keys over several 16-key tiles,
    # maps smaller than the window, 1x1 and 2x2 maps (every border masked), P = 1, head dims 16, 24 and 32
    _aggregated(2, 2, 4, 5, 16, 6, 3),
    _aggregated(1, 1, 3, 9, 32, 20, 3),
    _aggregated(1, 1, 4, 6, 24, 3, 5),
    _aggregated(1, 1, 2, 3, 16, 2, 5),
    _aggregated(1, 1, 1, 1, 32, 1, 3),
    _aggregated(1, 2, 2, 2, 24, 1, 3),
    _aggregated(1, 2, 5, 4, 24, 18, 3, dtypes=(F16,)),
    _aggregated(2, 2, 6, 5, 16, 4, 3, grad=False, tag=" no grad"),
    *_large("pooled 2x2", _aggregated_large, _aggregated_large_tables),
    # transnext_micro's first stage at 224 (56x56, pool 7x7) and 640 (160x160, pool 20x20), head dim 24; 56x56 and
    # 128x128 maps with head dim 32 (pool = size / 8); window 5 and wide, ragged head dims
    *(
        _aggregated(*shape, device="cuda", dtypes=(F32, F16, BF16))
        for shape in [
            (2, 2, 56, 56, 24, 49, 3),
            (1, 2, 160, 160, 24, 400, 3),
            (4, 2, 56, 56, 32, 49, 3),
            (2, 2, 128, 128, 32, 256, 3),
            (2, 2, 45, 61, 128, 35, 5),
            (2, 3, 33, 20, 80, 12, 5),
            (2, 2, 19, 23, 16, 1, 3),
        ]
    ),
]


# --- dense and halo attention --------------------------------------------------------------------------------


def _dense(shape, bias=None, scale=None, device="cpu", **options):
    batch, heads, n, m, dim = shape

    def make(g):
        inputs = dict(
            q=_randn(g, batch, heads, n, dim), k=_randn(g, batch, heads, m, dim), v=_randn(g, batch, heads, m, dim)
        )
        if bias == "bias":
            inputs["bias"] = _randn(g, 1, heads, n, m)
        elif bias == "mask":
            inputs["bias"] = torch.rand(batch, 1, n, m, generator=g) > 0.3
            inputs["bias"][..., 0] = True  # no fully masked row
        return inputs

    def args(q, k, v, bias=None):
        return q, k, v, bias, scale

    features = (bias,) if bias else ()
    return Case(f"{batch}x{heads}x{n}x{m}x{dim} {bias}", make, args, features=features, device=device, **options)


def _flat(q, k, v, **tables):
    return q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), tables.get("bias"), None


DENSE_CASES = [
    *(_dense((2, 3, 17, 23, 8), bias, 0.37, dtypes=(F32, F64)) for bias in (None, "bias", "mask")),
    *_large("flattened", _flat),
    *_large(
        "flattened, bias", _flat, lambda g: dict(bias=0.5 * torch.randn(64, 64, generator=g, dtype=F64)), ("bias",)
    ),
    *(
        _dense(shape, "bias", device="cuda", dtypes=(F32, F16, BF16), frozen=("bias",))
        for shape in [(2, 4, 3136, 3136, 32), (8, 8, 196, 196, 64), (1, 2, 77, 77, 128)]
    ),
]

CASES = {
    "dense_attention": DENSE_CASES,
    "neighborhood_attention": NA_CASES,
    "bilevel_routing_attention": ROUTING_CASES,
    "aggregated_attention": AGGREGATED_CASES,
    "halo_attention": _large("block 4, halo 1", lambda q, k, v: (q, k, v, 4, 1, None, None, None)),
}


# --- which cases apply -----------------------------------------------------------------------------------------


def _where(support, case) -> str | None:
    """The declared device entry that runs ``case`` (``"cpu-interpreter"`` for Triton on CPU), or None."""
    if case.device == "cpu" and "cpu-interpreter" in support.devices:
        return "cpu-interpreter"
    return case.device if case.device in support.devices else None


def _params():
    params = []
    for op_name, cases in CASES.items():
        op = get_op(op_name)
        for backend in op.backends:
            support = op.declared(backend)
            for case in cases:
                where = _where(support, case)
                if where is None or not set(case.features) <= set(support.features):
                    continue
                if (
                    case.quick
                    and case.device == "cpu"
                    and (where == "cpu-interpreter" or where not in support.backward)
                ):
                    continue
                for dtype in case.dtypes:
                    if dtype not in support.dtypes or (backend == "reference" and _oracle_dtype(case, dtype) == dtype):
                        continue  # the reference is its own oracle
                    marks = [needs_cuda] if case.device == "cuda" else []
                    if where == "cpu-interpreter":
                        marks.append(pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1"))
                        if dtype == BF16:
                            marks.append(pytest.mark.skip(reason="the Triton interpreter's bfloat16 tl.dot is wrong"))
                    backward = case.grad and where in support.backward
                    param_id = f"{op_name}-{case.name}-{case.device}-{backend}-{str(dtype)[6:]}"
                    params.append(pytest.param(op_name, case, backend, dtype, backward, id=param_id, marks=marks))
    return params


# --- the check -------------------------------------------------------------------------------------------------


def _leaves(case, inputs, dtype, device):
    """The inputs rounded to ``dtype`` (or kept in float32) on ``device``; every float not frozen requires grad."""
    leaves = {}
    for name, t in inputs.items():
        if t.is_floating_point():
            t = t.to(F32 if name in case.float32 and dtype != F64 else dtype)
        grad = t.is_floating_point() and name not in case.frozen
        leaves[name] = t.to(device).requires_grad_(grad)
    return leaves


def _oracle_dtype(case, dtype):
    return dtype if dtype in case.own_dtype_oracle else F64


def _cast(leaves, dtype):
    return {
        n: t.detach().to(dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t
        for n, t in leaves.items()
    }


def _run(op_name, case, backend, leaves, grad_out):
    """Output and the gradient of every leaf that requires grad (none when ``grad_out`` is None)."""
    with torch.set_grad_enabled(grad_out is not None):
        args = case.args(**leaves)
        if backend != "auto":
            verdict = get_op(op_name).supports(backend, *args)
            assert verdict, f"{backend} declares this case but declines it: {verdict.reason}"
        out = getattr(kernels, op_name)(*args, backend=backend)
    if grad_out is None:
        return out, {}
    wrt = {name: t for name, t in leaves.items() if t.requires_grad}
    grads = torch.autograd.grad(out, list(wrt.values()), grad_out.to(out.dtype))
    return out, dict(zip(wrt, grads, strict=True))


def _assert_close(got, want, tol, what, scaled=True):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    error, scale = (got.double() - want.double()).abs().max().item(), want.abs().max().item()
    bound = tol * max(1.0, scale) if scaled else tol
    assert error <= bound, f"{what}: max error {error:.3g} for magnitude {scale:.3g}, tol {tol}"


def _check(op_name, case, backend, dtype, backward, autocast=None):
    device = torch.device(case.device)
    generator = torch.Generator().manual_seed(0)
    leaves = _leaves(case, case.make(generator), dtype, device)
    if autocast:  # float32 tensors in, as a model under autocast hands its float32 activations to an op
        leaves = _cast(leaves, F32)
    oracle_dtype = _oracle_dtype(case, dtype)
    with torch.no_grad():
        shape = _run(op_name, case, "reference", leaves, None)[0].shape
    grad_out = torch.randn(shape, generator=generator).to(dtype).to(device, oracle_dtype) if backward else None
    want, want_grads = _run(op_name, case, "reference", _cast(leaves, oracle_dtype), grad_out)
    with torch.autocast(device.type, dtype=dtype, enabled=autocast is not None):
        got, grads = _run(op_name, case, backend, leaves, grad_out)
    tol, what = TOL[device.type][dtype], f"{op_name} [{backend}] {case.name}"
    assert autocast or got.dtype == dtype, f"{what}: output in {got.dtype}"
    # single-precision outputs are held to an absolute bound, as the per-backend tests before this harness were
    _assert_close(got, want, tol, f"{what}: output", scaled=dtype not in (F32, F64))
    for name, grad in grads.items():
        assert grad.dtype == leaves[name].dtype, f"{what}: d{name} in {grad.dtype}"
        if name in case.finite_only:
            assert torch.isfinite(grad).all(), f"{what}: d{name} non-finite"
        else:
            _assert_close(grad, want_grads[name], tol, f"{what}: d{name}")


@pytest.mark.parametrize(("op_name", "case", "backend", "dtype", "backward"), _params())
def test_backend_matches_reference(op_name, case, backend, dtype, backward):
    _check(op_name, case, backend, dtype, backward)


AUTOCAST_PARAMS = [
    pytest.param(op_name, case, dtype, id=f"{op_name}-{case.name}-{str(dtype)[6:]}")
    for op_name, cases in CASES.items()
    for case in cases
    if case.autocast
    for dtype in case.dtypes
]


@pytest.mark.parametrize(("op_name", "case", "dtype"), AUTOCAST_PARAMS)
def test_auto_backend_under_cpu_autocast(op_name, case, dtype):
    """The automatic backend (reference or SDPA on CPU) given float32 tensors inside autocast."""
    _check(op_name, case, "auto", dtype, backward=True, autocast=dtype)


def _sync_params():
    """Per op, backend and device, the float32 case that uses the most features: ``flex`` and ``natten`` (flex
    on CPU) left out, as ``no_host_syncs`` cannot run flex."""
    chosen = {}
    for p in _params():
        op_name, case, backend, dtype, _ = p.values
        key = (op_name, backend, case.device)
        if dtype == F32 and backend not in ("flex", "natten"):
            if key not in chosen or len(case.features) > len(chosen[key].values[1].features):
                chosen[key] = p
    return list(chosen.values())


@pytest.mark.parametrize(("op_name", "case", "backend", "dtype", "backward"), _sync_params())
def test_warm_calls_never_wait_on_the_device(op_name, case, backend, dtype, backward):
    """Once a size's tables are built (the first call), forward and backward dispatch no op that would make a
    GPU wait (``host_syncs.py``), so CUDA graphs and compiled models can capture them."""
    generator = torch.Generator().manual_seed(0)
    leaves = _leaves(case, case.make(generator), dtype, torch.device(case.device))
    with torch.no_grad():
        shape = _run(op_name, case, "reference", leaves, None)[0].shape
    grad_out = torch.randn(shape, generator=generator).to(case.device) if backward else None
    for warm in (False, True):
        with no_host_syncs() if warm else contextlib.nullcontext():
            _run(op_name, case, backend, leaves, grad_out)
            with torch.no_grad():
                _run(op_name, case, backend, leaves, None)


def test_every_declared_backend_has_cases():
    """A backend's declaration that no case covers would go untested."""
    covered = {(p.values[0], p.values[2]) for p in _params()}
    for op_name in CASES:
        for backend in get_op(op_name).backends:
            if get_op(op_name).declared(backend).devices:
                assert (op_name, backend) in covered, f"{op_name}: no parity case for {backend}"
