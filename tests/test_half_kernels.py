"""The 16-bit conversions of the Numba kernels (``xentfast.backends._numba_math``).

Loads are checked exhaustively (all 65,536 patterns of each format against NumPy's
float16 -> float32 and ml_dtypes' bfloat16 -> float32); stores against NumPy's float32
-> float16 and ml_dtypes' float32 -> bfloat16 casts over a strided sample of all 2**32
float32 patterns (stride 257, an odd prime: every exponent, both signs, mantissas of
every residue) plus every boundary of the formats -- the halfway cases around every
16-bit value, the largest finite value and the overflow threshold, the smallest
subnormals, the normal/subnormal border, NaNs (quiet and signalling, both signs,
payloads that vanish when shifted), +-0 and +-inf.  Bitwise.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers import BACKENDS

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not under test")

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    ml_dtypes = None

needs_ml_dtypes = pytest.mark.skipif(ml_dtypes is None,
                                     reason="bfloat16 reference casts need ml_dtypes")


@pytest.fixture(scope="module")
def nh():
    from xentfast.backends import _numba_math

    return _numba_math


def _ref_store(f32: np.ndarray, fmt: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow / invalid casts are the point here
        if fmt == "float16":
            return f32.astype(np.float16).view(np.uint16)
        return f32.astype(ml_dtypes.bfloat16).view(np.uint16)


def _boundaries() -> np.ndarray:
    """float32 bit patterns at every edge of both 16-bit formats."""
    h = np.arange(1 << 16, dtype=np.uint32)
    pats = [
        # bfloat16: every value, its halfway points to both neighbours and +-1 around them
        h << 16, (h << 16) + 0x8000, (h << 16) + 0x7FFF, (h << 16) + 0x8001,
        (h << 16) - 1, (h << 16) + 1,
    ]
    # float16: every finite value's float32 image and the halfway points around it
    f16 = h.astype(np.uint16).view(np.float16)
    fin = f16[np.isfinite(f16)].astype(np.float32).view(np.uint32)
    with np.errstate(over="ignore"):  # 65504's neighbour is inf: its midpoint is 65520
        nxt = np.nextafter(f16[np.isfinite(f16)], np.float16(np.inf)).astype(np.float32)
    mid = (fin.view(np.float32).astype(np.float64) + np.minimum(nxt, 65536.0)) / 2
    mid = mid.astype(np.float32).view(np.uint32)  # exact: float16 halfway points fit
    for d in (-2, -1, 0, 1, 2):
        pats += [(fin.astype(np.int64) + d).astype(np.uint32), (mid.astype(np.int64) + d).astype(np.uint32)]
    special = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000,             # +-0, +-inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF,  # NaNs
        0x7F801FFF, 0x7F802000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000,
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,  # 65504, 65520, 2**16
        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,                          # float32 max, bf16 edge
        0x33000000, 0x33000001, 0x32FFFFFF, 0x33800000, 0x33C00000,  # 2**-25, 2**-24 ...
        0x387FC000, 0x387FE000, 0x387FF000, 0x38800000,              # subnormal/normal edge
        0x00000001, 0x00800000, 0x007FFFFF,                          # float32 denormals
    ]
    pats.append(np.array(special, np.uint32))
    pats.append(np.array(special, np.uint32) ^ 0x80000000)
    return np.unique(np.concatenate(pats))


@pytest.mark.parametrize("fmt", ["float16", pytest.param("bfloat16", marks=needs_ml_dtypes)])
def test_load_exhaustive(nh, fmt):
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(bits.shape, np.float32)
    nh.half_load(nh.bits_view(bits, fmt), out)
    ref = (bits.view(np.float16) if fmt == "float16" else bits.view(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(out.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("fmt", ["float16", pytest.param("bfloat16", marks=needs_ml_dtypes)])
@pytest.mark.parametrize("sample", ["boundaries", "strided"])
def test_store_bitwise(nh, fmt, sample):
    if sample == "boundaries":
        pats = _boundaries()
    else:
        pats = np.arange(0, 1 << 32, 257, dtype=np.uint64).astype(np.uint32)
    f32 = pats.view(np.float32)
    out = np.empty(f32.shape, np.uint16)
    nh.half_store(f32, nh.bits_view(out, fmt))
    ref = _ref_store(f32, fmt)
    bad = np.nonzero(out != ref)[0]
    assert bad.size == 0, (f"{bad.size} mismatches, e.g. "
                           + ", ".join(f"{pats[i]:#010x}->{out[i]:#06x} (want {ref[i]:#06x})"
                                       for i in bad[:5]))


def test_bits_view_formats(nh):
    a = np.zeros(3, np.float16)
    assert nh.bits_view(a).dtype == np.int16
    assert nh.bits_view(a.view(np.uint16), "float16").dtype == np.int16
    assert nh.bits_view(a.view(np.uint16), "bfloat16").dtype == np.uint16
    with pytest.raises(TypeError):
        nh.bits_view(np.zeros(3, np.float32))
    if ml_dtypes is not None:
        assert nh.bits_view(np.zeros(3, ml_dtypes.bfloat16)).dtype == np.uint16


# --- the kernels on 16-bit logits: bitwise the float32 kernels on the upcast logits,
# the gradient rounded once (NumPy's cast for float16, ml_dtypes' for bfloat16) --------

SHAPES = {  # (n, c): reason
    "small-serial": (3, 5), "small": (50, 10), "small-par": (1000, 10),
    "small-max": (257, 48), "rows-narrow": (64, 49), "rows-wide": (300, 320),
    "rows-1000": (100, 1000), "rows-long": (16, 4096), "split": (2, 40000),
}
SPARSE_OPTS = {"plain": (False, 0.0, 0.0), "weight-z": (True, 0.0, 1e-3),
               "smooth": (False, 0.1, 0.0), "smooth-weight-z": (True, 0.05, 1e-3)}
DENSE_OPTS = {"plain": (False, 0.0, 0.0), "smooth-weight-z": (True, 0.05, 1e-3)}
FORMATS = ["float16", pytest.param("bfloat16", marks=needs_ml_dtypes),
           pytest.param("bfloat16-bits", marks=needs_ml_dtypes)]


def _to16(a32: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "float16":
        with np.errstate(over="ignore"):  # +-1e30 -> +-inf: that row is NaN, as it should
            return a32.astype(np.float16)
    b = a32.astype(ml_dtypes.bfloat16)
    return b.view(np.uint16) if fmt == "bfloat16-bits" else b


def _half_arg(fmt):
    return {"half": "bfloat16"} if fmt == "bfloat16-bits" else {}


def _rows(n, c, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    if n >= 6:
        x[0, :] = 0
        x[0, 1:3] = 5              # ties at the max
        x[1, ::2] = 1e30           # +-1e30 (inf in float16: a NaN row there)
        x[1, 1::2] = -1e30
        x[2, ::3] = -np.inf        # masks
        x[3, 0] = 40               # a confident row
    y = rng.integers(0, c, n)
    y[0] = 1
    if n >= 6:
        y[5] = -100                # an ignored row
    return x, y, rng


def _compare(nc, op, fmt, shape, opts, grad_mode, forced):
    n, c = shape
    x32, y, rng = _rows(n, c, n * 131 + c)
    x16 = _to16(x32, fmt)
    xup = (x16.view(ml_dtypes.bfloat16) if fmt == "bfloat16-bits" else x16).astype(np.float32)
    weighted, eps, z = opts
    w = (rng.random(c) + 0.5).astype(np.float32) if weighted else np.empty(0, np.float32)
    if op == "dense":
        t32 = rng.random((n, c)).astype(np.float32)
        t16 = _to16(t32 / t32.sum(1, keepdims=True), fmt)
        tup = (t16.view(ml_dtypes.bfloat16) if fmt == "bfloat16-bits" else t16).astype(np.float32)
    results = []
    for native in (False, True):
        loss, lse = np.empty(n, np.float32), np.empty(n, np.float32)
        x = x16.copy() if native else xup.copy()
        if grad_mode == "loss":
            g = None
        elif grad_mode == "inplace":
            g = x
        else:
            g = np.empty_like(x)
        kw = _half_arg(fmt) if native else {}
        with nc.tuning(**forced):
            if op == "sparse":
                nc.sparse(x, y, w, -100, eps, z, 0.37, loss, lse, g, **kw)
            else:
                nc.dense(x, t16 if native else tup, w, eps, z, 0.37, loss, lse, g, **kw)
        if g is not None and not native:
            g = _ref_store(g, "float16" if fmt == "float16" else "bfloat16")
        results.append((loss, lse) + (() if g is None else (g.view(np.uint16),)))
    for name, a, b in zip(("loss", "lse", "grad"), *results):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=name)


CASES = {f"{op}-{name}": (op, opts) for op, table in (("sparse", SPARSE_OPTS),
                                                      ("dense", DENSE_OPTS))
         for name, opts in table.items()}


@pytest.mark.parametrize("grad_mode", ["loss", "out", "inplace"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_native_half_is_rounded_float32(nc, fmt, shape, case, grad_mode):
    op, opts = CASES[case]
    _compare(nc, op, fmt, SHAPES[shape], opts, grad_mode, {})


@pytest.mark.parametrize("forced", [
    {"force_path": "rows", "force_parallel": True},          # the row path at any c
    {"force_path": "rows", "force_wide": False},             # plain passes of long rows
    {"force_path": "split", "force_parallel": False},        # split, serial
], ids=["rows-parallel", "rows-plain", "split-serial"])
@pytest.mark.parametrize("grad_mode", ["loss", "out", "inplace"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_forced_paths_native_half(nc, fmt, grad_mode, forced):
    _compare(nc, "sparse", fmt, (37, 700), SPARSE_OPTS["weight-z"], grad_mode, forced)


@pytest.fixture(scope="module")
def nc():
    from xentfast.backends import numba_cpu

    return numba_cpu


def test_native_half_contract(nc):
    assert nc.NATIVE_HALF == ("float16", "bfloat16")
    assert all(np.dtype(d).itemsize >= 4 for d in nc.NATIVE_DTYPES)
