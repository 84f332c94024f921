"""Shared test machinery: which backends run, the parameter grids (each value with the
reason it is there), seeded data makers, dtype-aware tolerances, the adversarial-input
generator, and a warning-safe importer for the peer libraries.

The fixtures that use these live in ``conftest.py``; test modules import this module
for ``@pytest.mark.parametrize`` lists, which must exist at collection time.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

import xentfast
from xentfast import _dispatch

try:  # bfloat16 is supported "through ml_dtypes where installed"
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    ml_dtypes = None
    BFLOAT16 = None

# ----------------------------------------------------------------------- backends


def backends_under_test() -> list[str]:
    """``available_backends()``, narrowed by XENTFAST_TEST_BACKENDS and XENTFAST_BACKEND.

    A backend named in XENTFAST_TEST_BACKENDS that is not available is a usage error
    (raised at collection), never a silent skip.
    """
    available = xentfast.available_backends()
    chosen = list(available)
    requested = os.environ.get("XENTFAST_TEST_BACKENDS", "").strip()
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        missing = [n for n in names if n not in available]
        if missing:
            reasons = "; ".join(
                f"{n}: {_dispatch.unavailable_reason(n) if n in _dispatch.KNOWN_BACKENDS else 'unknown name'}"
                for n in missing
            )
            raise pytest.UsageError(
                f"XENTFAST_TEST_BACKENDS names backends that are not available: {reasons}. "
                f"Available: {available}"
            )
        chosen = [b for b in available if b in names]
    env_backend = os.environ.get("XENTFAST_BACKEND", "").strip()
    if env_backend:
        chosen = [b for b in chosen if b == env_backend]
        if not chosen:
            raise pytest.UsageError(
                f"XENTFAST_BACKEND={env_backend!r} is not among the backends under test "
                f"(XENTFAST_TEST_BACKENDS={requested!r})"
            )
    return chosen


BACKENDS = backends_under_test()
HOST_BACKENDS = [b for b in BACKENDS if b != "cuda"]


def is_simulated_cuda(backend: str) -> bool:
    """The CUDA simulator runs each GPU thread as a Python thread (~1e4x slower)."""
    return backend == "cuda" and os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


# ----------------------------------------------------------------------- dtypes

# Reason for each dtype: the contract lists them; 16-bit ones compute in float32 and
# round once (checked with a looser tolerance against the oracle on the rounded input).
DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
if BFLOAT16 is not None:
    DTYPES.append(BFLOAT16)
DTYPE_IDS = [d.name for d in DTYPES]

# Relative tolerances: float64 ~1e-10 (the maths is exact to a few ulps of the
# magnitudes involved); float32 ~2e-5 (~170 ulps of headroom for sums over 33k
# classes); float16 2e-3 (half an ulp is 4.9e-4); bfloat16 1e-2 (half an ulp 3.9e-3).
RTOL = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1e-2}


def rtol_for(dtype) -> float:
    return RTOL[np.dtype(dtype).name]


def acc_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# ----------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ShapeCase:
    id: str
    shape: tuple[int, ...]
    axis: int
    reason: str
    big: bool = False  # the oracle is a Python loop: big cases get a thinner grid
    dtypes: tuple[str, ...] | None = None  # None: every dtype

    @property
    def classes(self) -> int:
        return self.shape[self.axis]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        a = self.axis % len(self.shape)
        return self.shape[:a] + self.shape[a + 1 :]


HOST_SHAPES = [
    ShapeCase("C1", (5, 1), -1, "one class: lse == x, loss 0, degenerate reductions"),
    ShapeCase("C7", (6, 7), -1, "7 classes: not a multiple of any SIMD width (tail loops)"),
    ShapeCase("C8", (4, 8), -1, "8 classes: exactly one AVX2 float32 vector"),
    ShapeCase("C16", (3, 16), -1, "16 classes: one AVX-512 float32 vector / two AVX2"),
    ShapeCase("C1000", (9, 1000), -1, "1000 classes: many vectors/blocks per row", big=True),
    ShapeCase("C33000", (2, 33_000), -1,
              "33k classes: past 2**15, beyond one GPU block's shared memory", big=True),
    ShapeCase("3D_axis1", (2, 5, 3), 1, "PyTorch layout (N, C, d) with the class axis 1"),
    ShapeCase("1D", (7,), -1, "a single row: batch shape (), 0-d labels and losses"),
    # Sizes that switch host kernels to other code paths (e.g. numba_cpu goes parallel
    # at >= 2**15 elements, transposes blocks of rows for C <= 64, and splits rows of
    # C >= 2**16 when there are few of them):
    ShapeCase("N600xC60", (600, 60), -1, "many short rows, >= 2**15 elements: parallel "
              "small-C path", big=True),
    ShapeCase("N40xC1000", (40, 1000), -1, ">= 2**15 elements: parallel row chunks", big=True),
    ShapeCase("N2xC66000", (2, 66_000), -1, "few rows of C >= 2**16: rows split across "
              "threads", big=True, dtypes=("float32", "float64")),
]

# The simulator is ~1e4x slower: small shapes only, keeping one of each reason that
# still applies (C=1, odd C, a power of two, 3-D, 1-D, and one row wider than a warp).
CUDA_SIM_SHAPES = [
    ShapeCase("C1", (3, 1), -1, "one class"),
    ShapeCase("C7", (3, 7), -1, "odd class count"),
    ShapeCase("C16", (2, 16), -1, "a power of two"),
    ShapeCase("C70", (2, 70), -1, "wider than one 32-lane warp"),
    ShapeCase("3D_axis1", (2, 5, 2), 1, "class axis 1"),
    ShapeCase("1D", (5,), -1, "a single row"),
    # With the simulator's small tuning (blocks of 64 threads, 4 cached values a lane)
    # these reach numba_cuda's block path and its streaming path:
    ShapeCase("C200", (2, 200), -1, "one block per row", big=True),
    ShapeCase("C300", (1, 300), -1, "streaming row (online max/sum)", big=True),
]

# On a real GPU the host shapes are fine except 33k (kept: it is the reason to test).
CUDA_SHAPES = HOST_SHAPES


def shapes_for(backend: str) -> list[ShapeCase]:
    """The shapes a backend is tested on (small ones under the CUDA simulator)."""
    if is_simulated_cuda(backend):
        return CUDA_SIM_SHAPES
    if backend == "cuda":
        return CUDA_SHAPES
    return HOST_SHAPES


def backend_shape_dtype_params() -> list:
    """``pytest.param(backend, shape_case, dtype_name)``, honouring ShapeCase.dtypes."""
    return [
        pytest.param(b, s, d, id=f"{b}-{s.id}-{d}")
        for b in BACKENDS for s in shapes_for(b) for d in DTYPE_IDS
        if s.dtypes is None or d in s.dtypes
    ]


def backend_shape_params() -> list:
    """``pytest.param(backend, shape_case)`` for every backend under test."""
    return [
        pytest.param(b, s, id=f"{b}-{s.id}") for b in BACKENDS for s in shapes_for(b)
    ]


# ----------------------------------------------------------------------- options

# Index-label options: id -> reason.  Every one is also run with the others in "all".
SPARSE_OPTIONS = {
    "plain": "PyTorch defaults",
    "weight": "class weights incl. a zero one: weighted mean divides by sum of w[y]",
    "signed_weight": "a negative class weight (PyTorch accepts any real weights), with "
                     "smoothing, whose term sums w_c (lse - x_c) over every class",
    "ignore": "ignore_index=-100 on a third of the rows (padding convention)",
    "ignore_in_range": "ignore_index inside [0, C) (for C=1 every row is ignored)",
    "smooth": "label_smoothing=0.1",
    "smooth_full": "label_smoothing=1.0: target is uniform, the true-class term vanishes",
    "z_loss": "z_loss=0.01 (PaLM's auxiliary loss, in loss and gradient)",
    "all": "weight + ignore_index + label_smoothing + z_loss together",
    "all_ignored": "every row ignored: mean is 0 with zero gradient (documented)",
}

# Probability-label options.
DENSE_OPTIONS = {
    "plain": "soft labels, TensorFlow's softmax_cross_entropy_with_logits",
    "one_hot": "one-hot float labels (zeros everywhere else)",
    "unnormalised": "labels summing to 2 (PyTorch does not require a distribution)",
    "weight": "class weights (mean still divides by the row count)",
    "smooth": "label_smoothing=0.1",
    "z_loss": "z_loss=0.01",
    "all": "weight + label_smoothing + z_loss together",
}

REDUCTIONS = ["mean", "sum", "none"]


def make_logits(rng: np.random.Generator, shape, dtype, scale: float = 3.0) -> np.ndarray:
    """Normal logits with std ``scale``: softmax neither uniform nor one-hot."""
    return (rng.standard_normal(shape) * scale).astype(dtype)


def make_weight(rng, c: int, signed: bool = False) -> np.ndarray:
    w = rng.uniform(1.0, 2.0, c)
    if signed:
        w[-1] = -0.25  # kept small: a weighted mean's denominator never nears 0
    elif c > 1:
        w[0] = 0.0
    return w


def sparse_case(rng, shape_case: ShapeCase, dtype, option: str):
    """(logits, labels, kwargs) for index labels and one option id."""
    c = shape_case.classes
    batch = shape_case.batch_shape
    logits = make_logits(rng, shape_case.shape, dtype)
    labels = rng.integers(0, c, size=batch).astype(np.int64)
    kwargs: dict[str, Any] = {"axis": shape_case.axis}
    n = int(np.prod(batch))
    if option in ("weight", "all"):
        kwargs["weight"] = make_weight(rng, c)
    if option == "signed_weight":
        kwargs["weight"] = make_weight(rng, c, signed=True)
    if option in ("ignore", "all") and n:
        flat = labels.reshape(-1)
        flat[rng.permutation(n)[: max(1, n // 3)]] = -100
        labels = flat.reshape(batch)
    if option == "ignore_in_range":
        kwargs["ignore_index"] = min(2, c - 1)
    if option in ("smooth", "all", "signed_weight"):
        kwargs["label_smoothing"] = 0.1
    if option == "smooth_full":
        kwargs["label_smoothing"] = 1.0
    if option in ("z_loss", "all"):
        kwargs["z_loss"] = 0.01
    if option == "all_ignored":
        labels = np.full(batch, -100, np.int64)
    return logits, labels, kwargs


def make_probabilities(rng, shape, axis, dtype, one_hot=False, total=1.0) -> np.ndarray:
    axis = axis % len(shape)
    if one_hot:
        idx = rng.integers(0, shape[axis], size=shape[:axis] + shape[axis + 1 :])
        t = np.zeros(shape)
        np.put_along_axis(t, np.expand_dims(idx, axis), 1.0, axis=axis)
    else:
        t = rng.random(shape) ** 2
        t = t / t.sum(axis=axis, keepdims=True) * total
    return np.ascontiguousarray(t).astype(dtype)


def dense_case(rng, shape_case: ShapeCase, dtype, option: str):
    """(logits, probability labels, kwargs) for one option id."""
    c = shape_case.classes
    logits = make_logits(rng, shape_case.shape, dtype)
    labels = make_probabilities(
        rng, shape_case.shape, shape_case.axis, dtype,
        one_hot=option == "one_hot", total=2.0 if option == "unnormalised" else 1.0,
    )
    kwargs: dict[str, Any] = {"axis": shape_case.axis}
    if option in ("weight", "all"):
        kwargs["weight"] = make_weight(rng, c)
    if option in ("smooth", "all"):
        kwargs["label_smoothing"] = 0.1
    if option in ("z_loss", "all"):
        kwargs["z_loss"] = 0.01
    return logits, labels, kwargs


def oracle_inputs(logits, labels, kwargs, dtype):
    """What the library really computes with: 16-bit data as given (the oracle reads
    the rounded values), weights rounded to the accumulation dtype."""
    kw = dict(kwargs)
    if kw.get("weight") is not None:
        kw["weight"] = np.asarray(kw["weight"]).astype(acc_dtype(dtype)).astype(np.float64)
    return logits, labels, kw


# ----------------------------------------------------------------------- comparing


def row_magnitudes(logits, axis, weight=None, z_loss=0.0) -> np.ndarray:
    """Per row, the size of the numbers a loss is computed from (for atol):
    max|w| (|lse| + max|x|) + z lse^2 + 1, over finite entries."""
    x = np.moveaxis(np.asarray(logits, dtype=np.float64), axis, -1)
    x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    finite = np.where(np.isfinite(x), np.abs(x), 0.0)
    big = finite.max(axis=1) if x.shape[1] else np.zeros(x.shape[0])
    lse_bound = big + math.log(max(x.shape[1], 1))
    wmax = 1.0 if weight is None else max(1.0, float(np.max(np.abs(weight))))
    return wmax * (lse_bound + big) + z_loss * lse_bound**2 + 1.0


def loss_atol(logits, labels, kwargs, reduction, dtype) -> Any:
    """Absolute tolerance of a (reduced) loss: rtol times the magnitudes involved."""
    axis = kwargs.get("axis", -1)
    mags = row_magnitudes(logits, axis, kwargs.get("weight"), kwargs.get("z_loss", 0.0))
    rtol = rtol_for(dtype)
    if reduction == "none":
        batch = np.moveaxis(np.asarray(logits), axis, -1).shape[:-1]
        return rtol * mags.reshape(batch)
    total = float(np.sum(mags))
    if reduction == "sum":
        return rtol * total
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu":
        from naive import denominator

        d = abs(denominator(labels, weight=kwargs.get("weight"),
                            ignore_index=kwargs.get("ignore_index", -100)))
    else:
        d = float(mags.size)
    return rtol * total / d if d else 0.0


def grad_atol(logits, labels, kwargs, reduction, dtype) -> float:
    """Gradient entries are p_j [sum w t' + 2 z lse] - w_j t'_j, times the reduction's
    scale: rtol times max|w| * max(1, sum|t|) + 2 z |lse|, times that scale."""
    axis = kwargs.get("axis", -1)
    x = np.moveaxis(np.asarray(logits, dtype=np.float64), axis, -1)
    x = x.reshape(-1, x.shape[-1])
    finite = np.where(np.isfinite(x), np.abs(x), 0.0)
    lse_bound = (finite.max(axis=1) if x.size else np.zeros(1)) + math.log(x.shape[-1])
    wmax = 1.0 if kwargs.get("weight") is None else max(1.0, float(np.max(np.abs(kwargs["weight"]))))
    labels = np.asarray(labels)
    mass = 1.0
    if labels.dtype.kind not in "iu" and labels.size:
        mass = max(1.0, float(np.max(np.sum(np.abs(np.moveaxis(labels.astype(np.float64), axis, -1)), axis=-1))))
    mag = wmax * mass + 2.0 * kwargs.get("z_loss", 0.0) * float(np.max(lse_bound, initial=0.0))
    scale = 1.0
    if reduction == "mean":
        if labels.dtype.kind in "iu":
            from naive import denominator

            d = abs(denominator(labels, weight=kwargs.get("weight"),
                                ignore_index=kwargs.get("ignore_index", -100)))
        else:
            d = float(x.shape[0])
        scale = 1.0 / d if d else 0.0
    return rtol_for(dtype) * mag * scale


def assert_close(actual, expected, *, rtol: float, atol=0.0, what: str = "value"):
    """|actual - expected| <= atol + rtol |expected|, with NaN and +-inf required at
    exactly the same positions (and signs) as in ``expected``."""
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape}, expected {e.shape}"
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    assert np.array_equal(nan_a, nan_e), (
        f"{what}: NaN at {np.argwhere(nan_a).tolist()[:8]}, expected NaN at "
        f"{np.argwhere(nan_e).tolist()[:8]}"
    )
    inf_e = np.isinf(e)
    assert np.array_equal(np.isinf(a), inf_e) and np.array_equal(a[inf_e], e[inf_e]), (
        f"{what}: infinities differ: got {a[np.isinf(a) | inf_e]}, expected {e[np.isinf(a) | inf_e]}"
    )
    ok = nan_e | inf_e
    atol_arr = np.broadcast_to(np.asarray(atol, dtype=np.float64), e.shape)
    with np.errstate(invalid="ignore"):  # inf - inf at the positions checked above
        err = np.where(ok, 0.0, np.abs(a - e))
    limit = atol_arr + rtol * np.abs(np.where(ok, 0.0, e))
    bad = err > limit
    if bad.any():
        idx = np.unravel_index(int(np.argmax(np.where(bad, err - limit, -np.inf))), e.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.size} entries differ; worst at {tuple(map(int, idx))}: "
            f"got {a[idx]!r}, expected {e[idx]!r}, |diff| {err[idx]:.3e} > "
            f"atol {atol_arr[idx]:.3e} + rtol {rtol:g} * |expected|"
        )


def assert_bitwise_equal(a, b, what: str = "result"):
    """Same dtype, shape and bits (NaN payloads included)."""
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), (
        f"{what}: not bitwise identical (max |diff| "
        f"{np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64))) if a.size else 0})"
    )


# ----------------------------------------------------------------------- adversarial


@dataclass(frozen=True)
class Layout:
    """A memory layout of the same logical (N, C) data.

    ``make(x)`` takes a C-contiguous (N, C) array (N even) and returns ``(array, axis, owner)``:
    the array to pass, its class axis, and the buffer that owns its memory (so a test
    can check that gaps between strided elements are left alone).  Every layout holds
    the rows in x's order, so per-row results compare directly.
    """

    id: str
    reason: str
    make: Callable[[np.ndarray], tuple[np.ndarray, int, np.ndarray]]
    writeable: bool = True
    bfloat16_ok: bool = True


# Fills the gaps of strided layouts; exact in every dtype and far from any logit or
# gradient value, so a write into a gap is always seen.
MARKER = 1000.0


def _strided_rows(x):
    big = np.full((2 * x.shape[0], x.shape[1]), MARKER, x.dtype)
    big[::2] = x
    return big[::2], -1, big


def _strided_cols(x):
    big = np.full((x.shape[0], 2 * x.shape[1]), MARKER, x.dtype)
    big[:, ::2] = x
    return big[:, ::2], -1, big


def _reversed(x):
    base = np.ascontiguousarray(x[::-1])
    return base[::-1], -1, base


def _transposed_view(x):
    base = np.ascontiguousarray(x.T)  # (C, N) in memory
    return base.T, -1, base


def _class_axis0(x):
    base = np.ascontiguousarray(x.T)
    return base, 0, base


def _fortran(x):
    f = np.asfortranarray(x)
    return f, -1, f


def _byteswapped(x):
    s = x.astype(x.dtype.newbyteorder())
    return s, -1, s


def _readonly(x):
    r = x.copy()
    r.setflags(write=False)
    return r, -1, r


def _contiguous(x):
    c = x.copy()
    return c, -1, c


def _three_d_axis1(x):
    n, c = x.shape
    base = np.ascontiguousarray(np.moveaxis(x.reshape(2, n // 2, c), -1, 1))  # (2, C, n/2)
    return base, 1, base


LAYOUTS = [
    Layout("contiguous", "the baseline every other layout must reproduce", _contiguous),
    Layout("strided_rows", "every other row of a bigger buffer (row stride 2C)", _strided_rows),
    Layout("strided_cols", "every other column (class stride 2): not SIMD-loadable", _strided_cols),
    Layout("reversed", "negative row stride", _reversed),
    Layout("transposed_view", "x.T of a (C, N) array: class stride 1 along N", _transposed_view),
    Layout("class_axis0", "C-contiguous (C, N) with axis=0: classes are the slow axis", _class_axis0),
    Layout("fortran", "Fortran order (column-major)", _fortran),
    Layout("byteswapped", "non-native byte order (big-endian on x86)", _byteswapped,
           bfloat16_ok=False),
    Layout("readonly", "a read-only array: inputs must never be written", _readonly,
           writeable=False),
    Layout("3d_axis1", "(2, C, N/2) with axis=1: the class axis in the middle", _three_d_axis1),
]


def unmap_rows(result, axis: int, classes: int | None = None) -> np.ndarray:
    """A result of a layout back in (N,) (per-row) or (N, C) (gradient) order."""
    result = np.asarray(result)
    if classes is None:
        return result.reshape(-1)
    return np.moveaxis(result, axis, -1).reshape(-1, classes)


def adversarial_values(rng, n: int, c: int, dtype, case: str):
    """(logits (n, c) float64 before the dtype cast, labels (n,)) for one value case.

    Cases (reason):
      nan        -- a NaN in row 1 must poison that row's loss and gradient only.
      neg_inf    -- -inf logits are masks: probability 0, gradient exactly 0.
      inf_label  -- -inf at the true class: loss +inf, gradient finite (p - 1).
      all_neg_inf-- a row of only -inf has no distribution: NaN, by design.
      pos_inf    -- +inf: inf - inf = NaN in that row only.
      huge       -- +-H (1e30; 3e4 for float16): exact losses and gradients.
    """
    x = rng.standard_normal((n, c)) * 3
    y = rng.integers(0, c, size=n)
    if case == "nan":
        x[1, rng.integers(c)] = np.nan
    elif case == "neg_inf":
        for i in range(n):
            mask = rng.random(c) < 0.5
            mask[y[i]] = False
            x[i, mask] = -np.inf
    elif case == "inf_label":
        x[0, y[0]] = -np.inf
    elif case == "all_neg_inf":
        x[1] = -np.inf
    elif case == "pos_inf":
        x[1, (y[1] + 1) % c] = np.inf
    elif case == "huge":
        h = 3e4 if np.dtype(dtype) == np.float16 else 1e30
        x = rng.choice([-h, 0.0, h], size=(n, c))
        x[:, 0] = h  # a unique maximum per row keeps everything exact
        x[:, 1:] = np.where(x[:, 1:] == h, 0.0, x[:, 1:])
    else:
        raise ValueError(case)
    return x, y


VALUE_CASES = ["nan", "neg_inf", "inf_label", "all_neg_inf", "pos_inf", "huge"]


# ----------------------------------------------------------------------- peers


def import_peer(name: str):
    """``pytest.importorskip`` that tolerates the peer's own import-time warnings
    (the suite turns warnings into errors) and TensorFlow's log spam."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(name)


def to_numpy(t) -> np.ndarray:
    """A peer's tensor (TF, torch, JAX) as a float64 NumPy array."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
    return np.asarray(t, dtype=np.float64)


# ----------------------------------------------------------------------- accuracy data
#
# Data for tests/test_accuracy.py and benchmarks/accuracy_report.py: rows on which a
# cancelling formula (log(s) of a rounded s, lse - x_y, p_y - 1, W lse - sum w x) or a
# reassociating compiler loses digits.  Unlike the grids above, ties at the maximum are
# wanted here: they make the rest mass r = u + (t - 1) include whole ones.

ACCURACY_KINDS = {
    "normal": "standard normal x 3: neither uniform nor one-hot (the everyday row)",
    "confident": "the label's logit ahead of all others by a margin of 8..40 (the loss "
                 "~ e^-margin is far below ulp(1); float32 margins to 85, float64 to 700, "
                 "beyond the 37 where 1 + r == 1; every other row with a runner-up that "
                 "dominates r): log s must be log1p(r), p_y - 1 = -(sum_{j!=y} e_j)/s, "
                 "e_j = exp(x_j - m) without the rounding of x_j - m",
    "ties": "two or more equal maxima, all-equal rows, ties at +-H (H = 1e30): r holds "
            "whole ones",
    "offset": "a common offset 1e4, 1e7 or -1e4: lse ~ offset, x_j - m exact, "
              "lse - x_y would cancel",
    "huge": "+-H mixed with ordinary values (exp underflows to exactly 0)",
    "masked": "-inf masks on about half the classes (never the label)",
    "mixed": "one batch holding rows of every kind above",
    "long": "rows of up to 100k classes: the rest mass is a long sum of small terms",
}


def huge_value(dtype) -> float:
    """H of the "huge" and "ties" kinds: 1e30, or 1e4 for float16 (max 65504; a loss
    of 2H stays finite)."""
    return 1e4 if np.dtype(dtype) == np.float16 else 1e30


def common_offsets(dtype) -> list[float]:
    """The offsets of the "offset" kind: for float16 (max 65504) ones whose losses,
    z-loss included, stay finite."""
    return [1e3, 1e4, -1e4] if np.dtype(dtype) == np.float16 else [1e4, 1e7, -1e4]


def confident_margins(rng, n: int, dtype) -> np.ndarray:
    """Margins 8..40; for float64 half of them 37..100 (1 + e^-37 rounds to 1) and a
    quarter 100..700; for float32 a third 40..85 (the loss down to e^-85, still a
    normal float32).  A far margin puts the other logits far below the maximum, where
    x_j - m rounds by up to |x_j - m| / 2 ulps of exp: a kernel that exponentiates the
    rounded difference has a confident row's loss (log1p of the sum of those terms)
    that far off -- 41 ulps for the float32 row [72.164894, 4.7841673]."""
    margins = rng.uniform(8.0, 40.0, n)
    pick = rng.random(n)
    if np.dtype(dtype) == np.float64:
        far = pick < 0.5
        margins[far] = rng.uniform(37.0, 100.0, int(far.sum()))
        farther = pick >= 0.75
        margins[farther] = rng.uniform(100.0, 700.0, int(farther.sum()))
    elif np.dtype(dtype) == np.float32:
        far = pick < 1 / 3
        margins[far] = rng.uniform(40.0, 85.0, int(far.sum()))
    return margins


@dataclass(frozen=True)
class AccuracyCase:
    """Logits (already of the dtype), index labels (n,) and the kind of every row."""

    kind: str
    x: np.ndarray
    y: np.ndarray
    row_kinds: tuple[str, ...]


def _rows_of_kind(rng, kind: str, n: int, c: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(x float64, y) for n rows of one kind (not "mixed"); x is rounded to the dtype
    by the caller, so margins and offsets hold only approximately."""
    x = rng.standard_normal((n, c)) * 3.0
    y = rng.integers(0, c, size=n)
    h = huge_value(dtype)
    if kind in ("normal", "long"):
        if kind == "long" and n > 1:  # one confident long row: r = many tiny terms
            x[1, y[1]] = np.max(x[1]) + 12.0
        return x, y
    if kind == "confident":
        x *= 2.0 / 3.0
        margins = confident_margins(rng, n, dtype)
        for i in range(n):
            top = int(rng.integers(0, c))
            if i % 2 == 0 and c > 2:  # a runner-up 4 above the rest: one term dominates
                second = (top + 1 + int(rng.integers(0, c - 1))) % c  # r, its rounding
                x[i, second] = np.max(np.delete(x[i], top)) + 4.0  # is not averaged away
            x[i, top] = np.max(np.delete(x[i], top)) + margins[i] if c > 1 else x[i, top]
            # three rows in four are labelled with the confident class (tiny loss,
            # true-class gradient ~ -e^-margin); the others far from it (loss ~ margin)
            if i % 4 != 3 or c == 1:
                y[i] = top
        return x, y
    if kind == "ties":
        for i in range(n):
            style = i % 6
            if style == 5 or c < 3:  # all equal: loss log C
                x[i] = x[i, 0]
            else:
                k = 2 if style in (0, 3) else min(c, 3 + int(rng.integers(0, 3)))
                at = rng.choice(c, size=k, replace=False)
                top = {0: np.max(x[i]) + 1.0, 1: np.max(x[i]), 2: h, 3: h, 4: -h}[style]
                if style == 4:  # every logit -H or -inf-like far below: ties at -H
                    x[i] = -h
                    x[i, rng.choice(c, size=c - k, replace=False)] = -2 * h
                x[i, at] = top
                if style == 3:  # with -H elsewhere
                    x[i, rng.random(c) < 0.3] = -h
                    x[i, at] = top
                y[i] = at[0] if i % 2 == 0 else y[i]
        return x, y
    if kind == "offset":
        offsets = common_offsets(dtype)
        for i in range(n):
            x[i] += offsets[i % len(offsets)]
        return x, y
    if kind == "huge":
        for i in range(n):
            x[i, rng.random(c) < 0.3] = -h
            if i % 3 == 0:
                x[i, int(rng.integers(0, c))] = h  # a unique +H maximum
            elif i % 3 == 1:
                x[i, rng.choice(c, size=min(c, 2), replace=False)] = h  # a tie at +H
        return x, y
    if kind == "masked":
        for i in range(n):
            mask = rng.random(c) < 0.5
            mask[y[i]] = False
            x[i, mask] = -np.inf
        return x, y
    raise ValueError(f"unknown accuracy kind {kind!r}; known: {list(ACCURACY_KINDS)}")


MIXED_KINDS = ("normal", "confident", "ties", "offset", "huge", "masked")


def accuracy_case(rng, kind: str, n: int, c: int, dtype) -> AccuracyCase:
    """Seeded adversarial rows of one kind (ACCURACY_KINDS), cast to ``dtype``."""
    dtype = np.dtype(dtype)
    if kind == "mixed":
        per = max(1, n // len(MIXED_KINDS))
        parts = [_rows_of_kind(rng, k, per, c, dtype) for k in MIXED_KINDS]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        row_kinds = tuple(k for k in MIXED_KINDS for _ in range(per))
    else:
        x, y = _rows_of_kind(rng, kind, n, c, dtype)
        row_kinds = (kind,) * n
    with np.errstate(over="ignore"):
        xd = x.astype(dtype)
    assert np.all(np.isfinite(xd) | np.isneginf(x)), "accuracy data must fit the dtype"
    return AccuracyCase(kind, xd, y.astype(np.int64), row_kinds)


def accuracy_probabilities(rng, case: AccuracyCase, style: str) -> np.ndarray:
    """Probability labels (float64, rows sum to 1) for a case: "onehot" at the index
    label, or "soft": 0.7 at the index label plus 0.3 spread at random; zero wherever
    the logit is -inf (a label on a mask would make the loss infinite)."""
    n, c = case.x.shape
    t = np.zeros((n, c))
    t[np.arange(n), case.y] = 1.0
    if style == "soft":
        spread = rng.random((n, c)) ** 2
        spread[np.isneginf(case.x.astype(np.float64))] = 0.0
        spread /= np.maximum(spread.sum(axis=1, keepdims=True), 1e-300)
        t = 0.7 * t + 0.3 * spread
    elif style != "onehot":
        raise ValueError(style)
    return t


# ------------------------------------------------------------------ accuracy bounds
# The accuracy rule (DESIGN.md §1) and its measurement against tests/naive.py's exact
# results (``naive.Exact``: value, low, scale), shared by test_accuracy, test_cpu_plans
# and test_property.

#: DESIGN.md §1 "Accuracy", in ulps of the output dtype (of float32 for 16-bit dtypes,
#: whose results must be the float32 result rounded once).
ULPS = {"loss": 32, "lse": 4, "log_softmax": 32, "softmax": 4, "grad": 64}
#: float64 losses: relative, not in ulps (1e-12 ~ 4500 ulps: the rest mass of a long
#: row is a float64 sum whose error grows with C; the contract allows for that).
LOSS_RTOL_FLOAT64 = 1e-12
#: A reduced loss sums per-row losses each within 32 ulps of itself, i.e. within
#: 32 * 2u |loss_i| (an ulp is at most 2u |v|, u = 2**-p): the sum is within
#: 64 u sum|loss_i| <= 64 ulps of sum|loss_i|, plus the final rounding to the dtype.
REDUCED_LOSS_ULPS = 2 * ULPS["loss"] + 1

SIXTEEN_BIT = {"float16"} | ({BFLOAT16.name} if BFLOAT16 is not None else set())
def work_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float32) if dtype.name in SIXTEEN_BIT else dtype


def measure(got, exact, dtype, ulps: float, rtol64: float | None = None, flush=1.0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(error, tolerance, ok) per element, float64 arrays of exact's shape.

    err = |got - (value + low)|; tolerance = ulps * spacing(ref) in the working dtype
    (float32 for 16-bit outputs), ref = |exact|, or the oracle's scale at a genuine
    near-zero crossing (module docstring), plus the dtype's smallest normal number
    divided by 256 (the rounding of results that are subnormal: each subnormal term of
    a sum carries up to half a step of 2**-149 / 2**-1074 absolutely); rtol64 * ref
    instead for float64 when given.
    16-bit outputs pass when they lie between the roundings of exact -/+ tolerance:
    the float32 result, within the float32 bound, rounded once (rounding is monotone).
    NaN must match NaN; +-inf must match exactly (also where the exact value overflows
    the output dtype)."""
    dtype = np.dtype(dtype)
    work = work_dtype(dtype)
    g = np.asarray(got).astype(np.float64)
    value, low, scale = exact.value, exact.low, exact.scale
    assert g.shape == value.shape, f"shape {g.shape}, expected {value.shape}"
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = value.astype(dtype).astype(np.float64)
        special = ~np.isfinite(rounded)
        ref = np.where(np.nan_to_num(scale, nan=0.0, posinf=0.0) > np.abs(value) * (1 + 2.0 ** -20),
                       scale, np.abs(value))
        ref = np.where(special, 0.0, ref)
        if rtol64 is not None and work == np.float64:
            tol = rtol64 * ref
        else:
            # no result is flushed to 0 (every backend's exp rounds into the
            # subnormals), but a subnormal result, or a sum of subnormal terms, has
            # lost relative precision: an absolute floor of tiny / 256 (2**15
            # subnormal steps in float32), on top of the ulps (``flush``: the factor
            # an element carries after its exp, e.g. the gradient's coefficient,
            # broadcastable to the result).  A normal result flushed to 0 fails.
            tol = ulps * np.spacing(ref.astype(work)).astype(np.float64) \
                + np.finfo(work).tiny / 256 * np.asarray(flush, dtype=np.float64)
        err = np.abs((g - value) - low)
        if dtype != work:  # 16-bit: between round(exact - tol) and round(exact + tol)
            lo_b = ((value + low) - tol).astype(work).astype(dtype).astype(np.float64)
            hi_b = ((value + low) + tol).astype(work).astype(dtype).astype(np.float64)
            ok = (g >= lo_b) & (g <= hi_b)
        else:
            ok = err <= tol
        same_special = np.where(np.isnan(rounded), np.isnan(g), g == rounded)
    ok = np.where(special, same_special, ok & np.isfinite(g))
    return np.where(special, 0.0, err), tol, ok


def assert_accurate(got, exact, dtype, what: str, ulps: float,
                    rtol64: float | None = None, row_kinds=None, flush=1.0) -> None:
    err, tol, ok = measure(got, exact, dtype, ulps, rtol64, flush)
    if ok.all():
        return
    bad = np.argwhere(~ok)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ok, -np.inf, np.where(tol > 0, err / tol, np.inf))
        ratio = np.where(np.isnan(ratio), np.inf, ratio)
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    kind = ""
    if row_kinds is not None and len(worst) >= 1 and err.ndim >= 1:
        kind = f" (row kind {row_kinds[worst[0]]!r})"
    g = np.asarray(got).astype(np.float64)[worst]
    v = exact.value[worst]
    cancel = exact.scale[worst] > abs(v) * (1 + 2.0 ** -20)
    if rtol64 is not None and np.dtype(dtype) == np.float64:
        bound = f"{rtol64:g} relative"
    elif np.dtype(dtype).name in SIXTEEN_BIT:
        bound = f"{ulps:g} float32 ulps, rounded once to {np.dtype(dtype).name}"
    else:
        bound = (f"{ulps:g} ulps" if np.ndim(ulps) == 0
                 else f"per-element bounds of {np.min(ulps):g}..{np.max(ulps):g} ulps")
    raise AssertionError(
        f"{what}: {len(bad)} of {ok.size} elements outside {bound}"
        f"; worst at {tuple(int(i) for i in worst)}{kind}: got {g!r}, exact {v!r}"
        f"{' (a near-zero crossing: terms of magnitude %r)' % float(exact.scale[worst]) if cancel else ''}"
        f", error {err[worst]:.3g} = {ratio[worst]:.3g} x the bound; first bad "
        f"{[tuple(int(i) for i in b) for b in bad[:6]]}")


#: Index-label options (reason: each term of the loss and gradient forms).
SPARSE_OPTIONS = {
    "plain": {},
    "weight": {"weight": "w"},                     # k = w_y, mean divides by sum w_y
    "ignore": {"ignore": True},                    # exact zeros in loss and gradient
    "smooth": {"label_smoothing": 0.1},            # W log s + wd, the eps/C crossing
    "z_loss": {"z_loss": 1e-4},                    # z lse^2, A = 1 + 2 z lse (-1 at -1e4)
    "all": {"weight": "w", "ignore": True, "label_smoothing": 0.05, "z_loss": 1e-4},
}
#: Probability-label options.
DENSE_OPTIONS = {
    "onehot": {},                                  # dense p_y - 1 = -q_y / s
    "onehot_smooth": {"label_smoothing": 0.01},    # Keras' smoothed categorical: at a
                                                   # confident max, p_y T - wt_y ~ eps
                                                   # from terms ~ 1 (T's rounding)
    "soft": {},                                    # p_j T - wt_j crossings
    "soft_all": {"weight": "w", "label_smoothing": 0.1, "z_loss": 1e-4},
}
LABEL_OPTIONS = [("sparse", o) for o in SPARSE_OPTIONS] + [("dense", o) for o in DENSE_OPTIONS]


def accuracy_inputs(rng, kind: str, shape, dtype, label: str, option: str):
    """(logits, labels, kwargs, row kinds) of one accuracy case: ``accuracy_case``'s
    rows with the labels and options of ``SPARSE_OPTIONS``/``DENSE_OPTIONS[option]``
    (a weight vector with one zero, ignored rows); the arrays read-only."""
    case = accuracy_case(rng, kind, *shape, dtype)
    opts = dict((SPARSE_OPTIONS if label == "sparse" else DENSE_OPTIONS)[option])
    kwargs: dict[str, Any] = {}
    c = shape[1]
    if opts.pop("weight", None):
        w = rng.uniform(0.5, 2.0, c)
        if c > 2:
            w[(int(case.y[0]) + 1) % c] = 0.0  # a zero weight (not the first label)
        kwargs["weight"] = w
    if label == "sparse":
        labels = case.y.copy()
        if opts.pop("ignore", None) and len(labels) > 1:
            labels[1::4] = -100
    else:
        labels = accuracy_probabilities(rng, case, "onehot" if option.startswith("onehot")
                                        else "soft")
        labels = labels.astype(dtype)
    kwargs.update(opts)
    for a in (case.x, labels):
        a.setflags(write=False)
    return case.x, labels, kwargs, case.row_kinds
