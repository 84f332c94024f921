"""Native 16-bit logits in the ``cython`` backend (``cython_shim.NATIVE_HALF``).

The contract: ``sparse`` / ``dense`` on float16 / bfloat16 logits (or uint16 bits with
``half=``) give BITWISE what the float32 kernels give on the upcast logits, with the
gradient cast back by NumPy's ``astype(float16)`` / ml_dtypes' ``astype(bfloat16)``.

* The conversions (``_xfrows.h``: xf_load_h16 / xf_store_h16, exposed as
  ``_cython.half_to_float`` / ``float_to_half``): loads over all 65,536 patterns of each
  format; stores over every boundary of both formats (each 16-bit value, the halfway
  points around it and +-1 and +-2 float32 ulps, overflow threshold, subnormal edges,
  NaNs with payloads, +-0, +-inf) and a strided sample of all 2**32 float32 patterns
  (stride 257, an odd prime: every exponent and sign).  Both the portable bit arithmetic
  and the F16C path the kernels use for float16 where the CPU has it; the only documented
  difference of F16C is that a signalling NaN comes out quiet.
* The kernels: every shape of the tile and the row paths, both formats, the options
  (weights, ignore_index, label smoothing, z-loss), loss-only / gradient / gradient in
  place, on rows built to break things (ties at the max, +-huge, -inf entries, confident
  rows, an all -inf row, NaN and signalling-NaN logits).
* No (n, c) float32 temporary: the peak traced allocation of a 16-bit loss+grad call is
  the per-thread scratch.

bfloat16 needs ml_dtypes for its reference casts (skipped without it; jax and
tensorflow install it).
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest

from helpers import BACKENDS

pytestmark = pytest.mark.skipif("cython" not in BACKENDS,
                                reason="the cython backend is not under test")

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    ml_dtypes = None

needs_ml_dtypes = pytest.mark.skipif(
    ml_dtypes is None, reason="bfloat16 reference casts need ml_dtypes (not installed)")
FORMATS = ["float16", pytest.param("bfloat16", marks=needs_ml_dtypes)]


@pytest.fixture(scope="module")
def shim():
    from xentfast.backends import cython_shim

    return cython_shim


@pytest.fixture(scope="module")
def ext(shim):
    return shim._ext


def _np16(fmt):
    return np.dtype(np.float16) if fmt == "float16" else np.dtype(ml_dtypes.bfloat16)


def _cast(a, dtype):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # overflow / invalid casts are the point here
        return a.astype(dtype)


def _snan16(bits: np.ndarray, fmt: str) -> np.ndarray:
    """Signalling NaNs among 16-bit patterns (exponent all ones, quiet bit clear)."""
    if fmt == "float16":
        return ((bits & 0x7C00) == 0x7C00) & ((bits & 0x3FF) != 0) & ((bits & 0x200) == 0)
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0) & ((bits & 0x40) == 0)


def _snan32(bits: np.ndarray) -> np.ndarray:
    return ((bits & 0x7F800000) == 0x7F800000) & ((bits & 0x7FFFFF) != 0) & \
        ((bits & 0x400000) == 0)


def test_native_half_attribute(shim):
    assert shim.NATIVE_HALF == ("float16", "bfloat16")
    assert np.dtype(np.float16) not in shim.NATIVE_DTYPES  # the float32/float64 set stays


# ---- the conversions --------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", ["bits", "kernel"])
def test_load_exhaustive(ext, fmt, path):
    """All 65,536 patterns, bitwise against NumPy / ml_dtypes."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(bits.shape, np.float32)
    ext.half_to_float(bits, out, ext.HALF_CODES[fmt], path == "bits")
    ref = _cast(bits.view(_np16(fmt)), np.float32).view(np.uint32)
    got = out.view(np.uint32)
    exact = np.ones(bits.shape, bool)
    if path == "kernel" and fmt == "float16" and ext.f16c_used():
        # F16C quiets a signalling NaN (payload kept); everything else is exact
        s = _snan16(bits, fmt)
        np.testing.assert_array_equal(got[s], ref[s] | 0x400000)
        exact = ~s
    np.testing.assert_array_equal(got[exact], ref[exact])


def _boundaries() -> np.ndarray:
    """float32 bit patterns at every edge of both 16-bit formats."""
    h = np.arange(1 << 16, dtype=np.uint32)
    pats = [h << 16, (h << 16) + 0x8000, (h << 16) + 0x7FFF, (h << 16) + 0x8001,
            (h << 16) - 1, (h << 16) + 1]                       # bfloat16 and its halves
    f16 = h.astype(np.uint16).view(np.float16)
    fin = f16[np.isfinite(f16)]
    with np.errstate(over="ignore"):
        nxt = np.nextafter(fin, np.float16(np.inf)).astype(np.float64)
    lo = fin.astype(np.float32).view(np.uint32).astype(np.int64)
    mid = ((fin.astype(np.float64) + np.minimum(nxt, 65536.0)) / 2).astype(np.float32)
    mid = mid.view(np.uint32).astype(np.int64)                 # exact: fits float32
    for d in (-2, -1, 0, 1, 2):
        pats += [(lo + d).astype(np.uint32), (mid + d).astype(np.uint32)]
    special = np.array([
        0x00000000, 0x7F800000, 0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7F801FFF,
        0x7F802000, 0x7FFFFFFF, 0x7FA00000, 0x7FC00001, 0x7FC12345,          # 0, inf, NaNs
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,          # 65504 .. 2^16
        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,                                  # bf16 overflow
        0x33000000, 0x33000001, 0x32FFFFFF, 0x33800000, 0x33C00000,          # 2^-25, 2^-24
        0x387FC000, 0x387FE000, 0x387FF000, 0x38800000,                      # f16 subnormal edge
        0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x00800000,          # f32 denormals
    ], np.uint32)
    pats += [special, special ^ 0x80000000]
    return np.unique(np.concatenate(pats))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", ["bits", "kernel"])
@pytest.mark.parametrize("sample", ["boundaries", "strided"])
def test_store_bitwise(ext, fmt, path, sample):
    """float32 -> 16-bit: round to nearest even once, overflow to inf, exact subnormals,
    NaN stays NaN -- bitwise NumPy's / ml_dtypes' cast."""
    pats = (_boundaries() if sample == "boundaries"
            else np.arange(0, 1 << 32, 257, dtype=np.uint64).astype(np.uint32))
    f32 = pats.view(np.float32)
    out = np.empty(f32.shape, np.uint16)
    ext.float_to_half(f32, out, ext.HALF_CODES[fmt], path == "bits")
    ref = _cast(f32, _np16(fmt)).view(np.uint16)
    exact = np.ones(pats.shape, bool)
    if path == "kernel" and fmt == "float16" and ext.f16c_used():
        s = _snan32(pats)         # F16C: a signalling NaN comes out as a quiet NaN
        assert np.all((out[s] & 0x7E00) == 0x7E00) and np.all((out[s] ^ ref[s]) < 0x8000)
        exact = ~s
    bad = np.nonzero(out[exact] != ref[exact])[0]
    assert bad.size == 0, (f"{bad.size} mismatches, e.g. " + ", ".join(
        f"{p:#010x}->{o:#06x} (want {r:#06x})"
        for p, o, r in zip(pats[exact][bad[:5]], out[exact][bad[:5]], ref[exact][bad[:5]])))


# ---- the kernels ---------------------------------------------------------------------

SHAPES = {  # (n, c): which path
    "tile-serial": (3, 5), "tile": (50, 10), "tile-parallel": (1000, 10),
    # 16-bit short rows are widened 32 tiles (512 rows) at a time: 8 full blocks, then
    # one of 37 rows ending in a partial tile, at the widest short row
    "tile-blocks": (4133, 32),
    "tile-max-c": (257, 48), "row-shortest": (64, 49), "row-parallel": (300, 320),
    "row-1000": (100, 1000), "row-long": (16, 4096), "row-prefetch-off": (2, 40000),
}
GRADS = ["none", "separate", "inplace"]


def _logits(n, c, fmt, seed):
    """float32 values exactly representable in fmt, with the adversarial rows."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    big = 65504.0 if fmt == "float16" else 1e30
    rows = iter(range(0, n, max(1, n // 9)))
    for r, fill in zip(rows, ("ties", "huge", "-inf", "confident", "all-inf", "nan",
                              "confident-tie", "snan")):
        if fill == "ties":
            x[r] = 1.0
            x[r, : c // 2] = 2.5
        elif fill == "huge":
            x[r, 0], x[r, -1] = big, -big
        elif fill == "-inf":
            x[r, ::3] = -np.inf
        elif fill == "confident":
            x[r, 1 % c] = 40.0
        elif fill == "all-inf":
            x[r] = -np.inf
        elif fill == "nan":
            x[r, c // 2] = np.nan
        elif fill == "confident-tie":
            x[r, 0] = x[r, 2 % c] = 60.0
    xh = _cast(x, _np16(fmt))
    if n >= 9 and c >= 4:      # a signalling NaN logit in the last adversarial row
        xh.view(np.uint16)[8 * max(1, n // 9) % n, 3] = 0x7C01 if fmt == "float16" else 0x7F81
    return xh


def _same(got, want, what):
    got, want = np.ascontiguousarray(got), np.ascontiguousarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if got.tobytes() != want.tobytes():
        g, w = got.view(f"u{got.itemsize}").ravel(), want.view(f"u{want.itemsize}").ravel()
        i = np.nonzero(g != w)[0]
        raise AssertionError(f"{what}: {i.size} elements differ, first at {i[0]}: "
                             f"{g[i[0]]:#x} != {w[i[0]]:#x}")


def _run(shim, kernel, x, lab, w, opts, grad_mode, half=None):
    n = x.shape[0]
    loss, lse = np.empty(n, np.float32), np.empty(n, np.float32)
    x = x.copy()
    g = None if grad_mode == "none" else (x if grad_mode == "inplace" else np.empty_like(x))
    kw = {} if half is None else {"half": half}
    if kernel == "sparse":
        shim.sparse(x, lab, w, opts["ignore"], opts["eps"], opts["z"], 1.0 / n, loss, lse,
                    g, **kw)
    else:
        shim.dense(x, lab, w, opts["eps"], opts["z"], 0.5, loss, lse, g, **kw)
    return loss, lse, g


def _grid(kernel):
    for weight in (False, True):
        for eps in (0.0, 0.1):
            for z in (0.0, 1e-3):
                for ignore in ((None, -100, 0) if kernel == "sparse" else (None,)):
                    yield dict(weight=weight, eps=eps, z=z, ignore=ignore)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_kernels_bitwise_vs_upcast(shim, kernel, shape, fmt):
    n, c = shape
    seed = n * 7919 + c
    xh = _logits(n, c, fmt, seed)
    x32 = _cast(xh, np.float32)
    rng = np.random.default_rng(seed + 1)
    wfull = (rng.random(c) * 2).astype(np.float32)
    wfull[::7] = 0
    if kernel == "dense":
        p = rng.random((n, c))
        p[:, ::4] = 0
        labh = _cast((p / p.sum(1, keepdims=True)).astype(np.float32), _np16(fmt))
        lab32 = _cast(labh, np.float32)
    checked = 0
    for opts in _grid(kernel):
        w = wfull if opts["weight"] else np.empty(0, np.float32)
        if kernel == "sparse":
            labh = rng.integers(0, c, n)
            if opts["ignore"] is not None:
                labh[::5] = opts["ignore"]
            opts["ignore"] = -100 if opts["ignore"] is None else opts["ignore"]
            lab32 = labh
        for grad_mode in GRADS:
            ref_loss, ref_lse, ref_g = _run(shim, kernel, x32, lab32, w, opts,
                                            "none" if grad_mode == "none" else "separate")
            variants = [(xh, labh, None)]
            if fmt == "bfloat16":   # PyTorch bfloat16 memory: uint16 bits + half=
                variants.append((xh.view(np.uint16),
                                 labh.view(np.uint16) if kernel == "dense" else labh,
                                 "bfloat16"))
            for xv, lv, half in variants:
                loss, lse, g = _run(shim, kernel, xv, lv, w, opts, grad_mode, half)
                what = f"{kernel} {fmt} {shape} {opts} grad={grad_mode} half={half}"
                _same(loss, ref_loss, what + " loss")
                _same(lse, ref_lse, what + " lse")
                if ref_g is not None:
                    _same(g.view(_np16(fmt)), _cast(ref_g, _np16(fmt)), what + " grad")
                checked += 1
    assert checked >= 24


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_full_float32_temporary(shim, fmt):
    """A 16-bit loss+grad call allocates only its per-thread scratch (a few rows), far
    below one (n, c) float32 array; the caller's gradient is the only (n, c) output."""
    n, c = 512, 2048
    x = _cast(np.random.default_rng(0).standard_normal((n, c)).astype(np.float32),
              _np16(fmt))
    y = np.random.default_rng(1).integers(0, c, n)
    loss, lse, g = np.empty(n, np.float32), np.empty(n, np.float32), np.empty_like(x)
    w = np.empty(0, np.float32)
    tracemalloc.start()
    try:
        shim.sparse(x, y, w, -100, 0.0, 0.0, 1.0 / n, loss, lse, g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * c * 4 // 16, peak


def test_half_argument_errors(shim):
    x = np.zeros((2, 3), np.float16)
    loss, lse = np.empty(2, np.float32), np.empty(2, np.float32)
    y = np.zeros(2, np.int64)
    w = np.empty(0, np.float32)
    with pytest.raises(ValueError, match="half must be one of"):
        shim.sparse(x.view(np.uint16), y, w, -100, 0.0, 0.0, 1.0, loss, lse, None,
                    half="float8")
    with pytest.raises(TypeError, match="grad must have the logits' 16-bit format"):
        shim.sparse(x, y, w, -100, 0.0, 0.0, 1.0, loss, lse, np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="dense labels must have"):
        shim.dense(x, np.zeros((2, 3), np.float32), w, 0.0, 0.0, 1.0, loss, lse, None)
