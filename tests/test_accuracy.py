"""Accuracy: every backend against the exact oracle, with the bounds of DESIGN.md §1.

The contract ("Accuracy"): per-row loss within 32 ulps (float32; 1e-12 relative for
float64) of the exact value, lse within 4 ulps, log_softmax within 32 ulps, softmax
within 4 ulps, every gradient element -- the true-class p_y - 1 included -- within 64
ulps; 16-bit results are the float32 result rounded once.  "Exact" is tests/naive.py's
``exact_cross_entropy`` / ``exact_primitive`` (within about one float64 ulp of the
truth; ``test_oracle_agrees_with_mpmath`` checks that claim).

How an error is measured
------------------------
err = |got - exact| (exact = value + low, the oracle's double-double), in ulps of the
output dtype at the reference magnitude ``ref``: ulp = np.spacing(ref).  ``ref`` is
|exact| -- relative accuracy -- except at a *genuine near-zero crossing*, where the
oracle's ``scale`` (the sum of the magnitudes of the terms of the non-cancelling form)
exceeds |exact|; then ref = scale.  Those crossings are:

* the smoothed or z-loss gradient g_j = p_j A - (eps/C) w_j when p_j A ~ (eps/C) w_j,
  and a probability-label gradient p_j T - wt_j when p_j ~ wt_j / T: the exact result
  is a difference of two terms each known only to its own rounding (p_j through exp
  and 1/s, the coefficients through their products), so any evaluation in the working
  precision is off by a few ulps of the *terms*, and relative accuracy would need more
  than the working precision;
* lse = m + log s with m < 0 (e.g. rows at -1e4): log s is rounded to an ulp of
  itself, and the sum cannot be more accurate than that, however it is added;
* with signed class weights, sums sum_c w_c (m - x_c) and W = sum_c w_c.
Everywhere else scale == |exact| and the bound is relative to the exact value, with no
other allowance: a confident row's loss of 1e-17 must be right to 32 ulps of 1e-17.

Grid: backend x dtype x data kind (helpers.ACCURACY_KINDS, each with its reason) x
option; reductions, axis, out= and inplace=True on the "mixed" kind; pinned regression
cases from the issue last.  Inputs and oracle results are seeded by the case, not the
backend, and computed once per case.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import naive
import xentfast as xf
from helpers import (
    ACCURACY_KINDS,
    BACKENDS,
    BFLOAT16,
    LOSS_RTOL_FLOAT64,
    REDUCED_LOSS_ULPS,
    ULPS,
    assert_accurate,
    LABEL_OPTIONS,
    accuracy_case,
    accuracy_inputs,
    accuracy_probabilities,
    is_simulated_cuda,
    oracle_inputs,
)

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------- bounds

DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
          "float16": np.dtype(np.float16)}
if BFLOAT16 is not None:
    DTYPES[BFLOAT16.name] = BFLOAT16


# ----------------------------------------------------------------------- the grid

#: (rows, classes) per kind on host backends.  Reasons: "normal" at 40 x 1000 is >= 2**15
#: elements (the cpu backend's parallel row chunks) with C >= 320 (its wide passes);
#: "mixed" at C = 64 takes the small-C path; "long" is two rows of 100k classes (rows
#: split across threads) -- the oracle is a Python loop, so it gets few options, and
#: for float64 (whose oracle takes mpmath's exp, ~7 us an element) 30k classes.
LONG_FLOAT64 = (2, 30_000)
HOST_SHAPES = {
    "normal": (40, 1000), "confident": (16, 1000), "ties": (12, 8), "offset": (12, 100),
    "huge": (12, 16), "masked": (12, 300), "mixed": (24, 64), "long": (2, 100_000),
}
#: The CUDA simulator runs each GPU thread as a Python thread: a few rows each, one row
#: past a warp, and one 300-class row for the streaming (online max/sum) path.
SIM_SHAPES = {
    "normal": (3, 70), "confident": (4, 40), "ties": (6, 8), "offset": (3, 16),
    "huge": (3, 16), "masked": (3, 40), "mixed": (6, 16), "long": (1, 300),
}

LONG_OPTIONS = {"sparse": ["plain", "smooth"], "dense": ["onehot", "onehot_smooth"]}


def _shape(kind: str, backend: str, dtype_name: str = "float32") -> tuple[int, int]:
    if is_simulated_cuda(backend):
        return SIM_SHAPES[kind]
    if kind == "long" and dtype_name == "float64":
        return LONG_FLOAT64
    return HOST_SHAPES[kind]


def _dtype_names(kind: str) -> list[str]:
    return ["float32", "float64"] if kind == "long" else list(DTYPES)


def _seed(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("-".join(map(str, parts)).encode()))


@functools.lru_cache(maxsize=None)
def _data(kind: str, shape: tuple[int, int], dtype_name: str, label: str, option: str):
    """(logits, labels, kwargs, row kinds) for one case; read-only, shared by backends."""
    dtype = DTYPES[dtype_name]
    rng = _seed(kind, shape, dtype_name, label, option)
    return accuracy_inputs(rng, kind, shape, dtype, label, option)


@functools.lru_cache(maxsize=None)
def _exact(kind: str, shape, dtype_name: str, label: str, option: str, reduction: str = "none"):
    x, labels, kwargs, _ = _data(kind, shape, dtype_name, label, option)
    o_x, o_labels, o_kwargs = oracle_inputs(x, labels, kwargs, x.dtype)
    return naive.exact_cross_entropy(o_x, o_labels, reduction=reduction, **o_kwargs)


@functools.lru_cache(maxsize=None)
def _exact_primitives(kind: str, shape, dtype_name: str):
    x, _, _, _ = _data(kind, shape, dtype_name, "sparse", "plain")
    return naive.exact_primitives(x)


def _grid():
    for backend in BACKENDS:
        for kind in ACCURACY_KINDS:
            for dtype_name in _dtype_names(kind):
                for label, option in LABEL_OPTIONS:
                    if kind == "long" and option not in LONG_OPTIONS[label]:
                        continue
                    yield pytest.param(backend, kind, dtype_name, label, option,
                                       id=f"{backend}-{kind}-{dtype_name}-{label}-{option}")


@pytest.mark.sim_sample(0.1)
@pytest.mark.parametrize("backend_name,kind,dtype_name,label,option", list(_grid()))
def test_cross_entropy_rows(backend_name, kind, dtype_name, label, option):
    """Per-row loss, lse and every gradient element (reduction="none"), loss+grad and
    loss-only calls (different kernels)."""
    shape = _shape(kind, backend_name, dtype_name)
    x, labels, kwargs, row_kinds = _data(kind, shape, dtype_name, label, option)
    exact = _exact(kind, shape, dtype_name, label, option)
    dtype = x.dtype
    loss, grad, lse = xf.cross_entropy_with_grad(x, labels, reduction="none", return_lse=True,
                                                 backend=backend_name, **kwargs)
    assert loss.dtype == dtype and grad.dtype == dtype and lse.dtype == dtype
    assert_accurate(loss, exact["loss"], dtype, "loss (with grad)", ULPS["loss"],
                    LOSS_RTOL_FLOAT64, row_kinds)
    assert_accurate(lse, exact["lse"], dtype, "lse", ULPS["lse"], row_kinds=row_kinds)
    assert_accurate(grad, exact["grad"], dtype, "grad", ULPS["grad"], row_kinds=row_kinds)
    loss_only, lse_only = xf.cross_entropy(x, labels, reduction="none", return_lse=True,
                                           backend=backend_name, **kwargs)
    assert_accurate(loss_only, exact["loss"], dtype, "loss (loss only)", ULPS["loss"],
                    LOSS_RTOL_FLOAT64, row_kinds)
    assert_accurate(lse_only, exact["lse"], dtype, "lse (loss only)", ULPS["lse"],
                    row_kinds=row_kinds)


def _primitive_grid():
    for backend in BACKENDS:
        for kind in ACCURACY_KINDS:
            for dtype_name in _dtype_names(kind):
                for op in ("logsumexp", "log_softmax", "softmax"):
                    yield pytest.param(backend, kind, dtype_name, op,
                                       id=f"{backend}-{kind}-{dtype_name}-{op}")


@pytest.mark.sim_sample(0.2)
@pytest.mark.parametrize("backend_name,kind,dtype_name,op", list(_primitive_grid()))
def test_primitives(backend_name, kind, dtype_name, op):
    shape = _shape(kind, backend_name, dtype_name)
    x, _, _, row_kinds = _data(kind, shape, dtype_name, "sparse", "plain")
    got = getattr(xf, op)(x, backend=backend_name)
    assert got.dtype == x.dtype
    assert_accurate(got, _exact_primitives(kind, shape, dtype_name)[op], x.dtype, op,
                    ULPS["lse" if op == "logsumexp" else op], row_kinds=row_kinds)


# ----------------------------------------------------------------------- reductions, layouts

REDUCED = [("sparse", "plain"), ("sparse", "all"), ("dense", "soft_all")]


def _reduction_grid():
    for backend in BACKENDS:
        for dtype_name in DTYPES:
            for label, option in REDUCED:
                for reduction in ("mean", "sum"):
                    yield pytest.param(backend, dtype_name, label, option, reduction,
                                       id=f"{backend}-{dtype_name}-{label}-{option}-{reduction}")


@pytest.mark.sim_sample(0.2)
@pytest.mark.parametrize("backend_name,dtype_name,label,option,reduction", list(_reduction_grid()))
def test_reductions(backend_name, dtype_name, label, option, reduction):
    """The reduced loss (bound derived from the per-row one) and the gradient of the
    returned loss (each element within 64 ulps: the 1/denominator is part of it)."""
    shape = _shape("mixed", backend_name)
    x, labels, kwargs, row_kinds = _data("mixed", shape, dtype_name, label, option)
    exact = _exact("mixed", shape, dtype_name, label, option, reduction)
    loss, grad = xf.cross_entropy_with_grad(x, labels, reduction=reduction,
                                            backend=backend_name, **kwargs)
    assert np.ndim(loss) == 0 and np.asarray(loss).dtype == x.dtype
    assert_accurate(loss, exact["loss"], x.dtype, f"{reduction} loss", REDUCED_LOSS_ULPS,
                    LOSS_RTOL_FLOAT64)
    assert_accurate(grad, exact["grad"], x.dtype, f"grad of the {reduction}", ULPS["grad"],
                    row_kinds=row_kinds)
    loss_only = xf.cross_entropy(x, labels, reduction=reduction, backend=backend_name, **kwargs)
    assert_accurate(loss_only, exact["loss"], x.dtype, f"{reduction} loss (loss only)",
                    REDUCED_LOSS_ULPS, LOSS_RTOL_FLOAT64)


LAYOUT_VARIANTS = {
    "axis0": "classes on axis 0 of a C-contiguous (C, N) array",
    "axis1_3d": "(2, C, N/2) with axis=1, PyTorch's layout",
    "out": "out= a preallocated gradient",
    "inplace": "inplace=True: the logits' memory holds the gradient",
}


def _layout_grid():
    for backend in BACKENDS:
        for dtype_name in ("float32", "float64"):
            for label, option in (("sparse", "all"), ("dense", "soft_all")):
                for variant in LAYOUT_VARIANTS:
                    yield pytest.param(backend, dtype_name, label, option, variant,
                                       id=f"{backend}-{dtype_name}-{label}-{option}-{variant}")


@pytest.mark.sim_sample(0.2)
@pytest.mark.parametrize("backend_name,dtype_name,label,option,variant", list(_layout_grid()))
def test_axis_out_inplace(backend_name, dtype_name, label, option, variant):
    """The same rows through other layouts and gradient destinations keep the bounds."""
    shape = _shape("mixed", backend_name)
    x, labels, kwargs, row_kinds = _data("mixed", shape, dtype_name, label, option)
    exact = _exact("mixed", shape, dtype_name, label, option)
    n, c = x.shape
    dense = label == "dense"
    call: dict[str, Any] = dict(kwargs, reduction="none", backend=backend_name)
    if variant == "axis0":
        xs, ls = np.ascontiguousarray(x.T), (np.ascontiguousarray(labels.T) if dense else labels)
        loss, grad = xf.cross_entropy_with_grad(xs, ls, axis=0, **call)
        grad = grad.T
    elif variant == "axis1_3d":
        assert n % 2 == 0

        def to3(a):
            return np.ascontiguousarray(np.moveaxis(a.reshape(2, n // 2, c), -1, 1))

        ls = to3(labels) if dense else labels.reshape(2, n // 2)
        loss, grad = xf.cross_entropy_with_grad(to3(x), ls, axis=1, **call)
        loss = loss.reshape(n)
        grad = np.moveaxis(grad, 1, -1).reshape(n, c)
    elif variant == "out":
        out = np.full(x.shape, np.nan, x.dtype)
        loss, grad = xf.cross_entropy_with_grad(x, labels, out=out, **call)
        assert grad is out
    else:
        x_in = x.copy()
        loss, grad = xf.cross_entropy_with_grad(x_in, labels, inplace=True, **call)
        assert grad is x_in
    assert_accurate(loss, exact["loss"], x.dtype, f"loss ({variant})", ULPS["loss"],
                    LOSS_RTOL_FLOAT64, row_kinds)
    assert_accurate(grad, exact["grad"], x.dtype, f"grad ({variant})", ULPS["grad"],
                    row_kinds=row_kinds)


# ----------------------------------------------------------------------- pinned cases


@dataclass(frozen=True)
class Pin:
    id: str
    reason: str
    logits: Any
    labels: Any
    dtype: str
    kwargs: tuple = ()
    expect_loss: float | None = None  # the exact per-row loss of row 0, when it is known


def _issue_c1000():
    x = _seed("pin-c1000").standard_normal((1, 1000))
    x[0, 7] = 18.0  # the label's logit 18 above the (standard normal) others
    return x


PINS = [
    Pin("f32_C1000_ahead_by_18",
        "log s of a rounded s: 1 + 2.6e-5 keeps 2 digits in float32 (loss ~2.6e-5, "
        "once returned as exactly 0)", _issue_c1000(), [7], "float32"),
    Pin("f32_minus_1e4_x3", "lse - x_y at -1e4 cancels: must be log 3",
        [[-1e4, -1e4, -1e4]], [1], "float32", expect_loss=math.log(3)),
    Pin("f32_ties_1e30_x4", "ties at 1e30: r = 3 exactly, loss log 4",
        [[1e30] * 4], [0], "float32", expect_loss=math.log(4)),
    Pin("f32_1000_1000_990", "a tie at the max plus e^-10: log(2 + e^-10)",
        [[1000.0, 1000.0, 990.0]], [0], "float32",
        expect_loss=math.log(2 + math.exp(-10))),
    Pin("f32_1000_1000_990_label2", "the same row, label on the low logit",
        [[1000.0, 1000.0, 990.0]], [2], "float32",
        expect_loss=10 + math.log(2 + math.exp(-10))),
    Pin("f32_512x1e30_smooth", "W lse - sum w x with 512 logits of 1e30 gave -1.4e11: "
        "smoothing's sum must be W log s + sum w (m - x)", [[1e30] * 512], [0], "float32",
        (("label_smoothing", 0.001),), expect_loss=math.log(512)),
    Pin("fastmath_1e30_1e30_0", "(1 - e_y) + r and (m - x_y) + log s must not be "
        "reassociated into s - e_y or lse - x_y: log 2 on every backend",
        [[1e30, 1e30, 0.0]], [0], "float32", expect_loss=math.log(2)),
    Pin("fastmath_1e30_1e30_0_f64", "the fastmath pin in float64",
        [[1e30, 1e30, 0.0]], [0], "float64", expect_loss=math.log(2)),
    Pin("f64_37.43_sparse", "float64 margin 37.43 > 37: 1 + r == 1; true-class gradient "
        "-e^-37.43/(1 + e^-37.43) ~ -5.55e-17, not 0", [[37.43, 0.0]], [0], "float64"),
    Pin("f64_37.43_onehot", "the same through probability labels (dense p_y - 1)",
        [[37.43, 0.0]], [[1.0, 0.0]], "float64"),
    Pin("f32_margin_30_onehot", "float32 dense one-hot at a confident max: -wt r / s",
        [[30.0, 0.0, -1.0]], [[1.0, 0.0, 0.0]], "float32"),
    Pin("f32_72.16_4.78", "x_j - m = -67.38 rounds by 3.8e-6: exp of the rounded "
        "difference made the loss e^-67.38 41 ulps off (5.456585e-30, exact "
        "5.45660049e-30)", [[72.164894, 4.7841673]], [0], "float32"),
    Pin("f64_745.3_40.7_onehot", "the same in float64 at a spread of 704.6 (500 ulps "
        "of e_1 from the rounding of x_1 - m), through probability labels",
        [[745.3, 40.7]], [[1.0, 0.0]], "float64"),
]


def _pin_grid():
    return [pytest.param(b, p, id=f"{b}-{p.id}") for b in BACKENDS for p in PINS]


@pytest.mark.parametrize("backend_name,pin", _pin_grid())
def test_pinned_regressions(backend_name, pin: Pin):
    dtype = DTYPES[pin.dtype]
    x = np.asarray(pin.logits, dtype=np.float64).astype(dtype)
    labels = np.asarray(pin.labels)
    labels = labels.astype(np.int64) if labels.dtype.kind in "iu" else labels.astype(dtype)
    kwargs = dict(pin.kwargs)
    exact = naive.exact_cross_entropy(x, labels, **kwargs)
    if pin.expect_loss is not None:  # the oracle itself, on the value stated in the issue
        assert exact["loss"].value[0] == pytest.approx(pin.expect_loss, rel=1e-15, abs=0)
    loss, grad, lse = xf.cross_entropy_with_grad(x, labels, reduction="none", return_lse=True,
                                                 backend=backend_name, **kwargs)
    assert_accurate(loss, exact["loss"], dtype, f"{pin.id}: loss", ULPS["loss"],
                    LOSS_RTOL_FLOAT64)
    assert_accurate(lse, exact["lse"], dtype, f"{pin.id}: lse", ULPS["lse"])
    assert_accurate(grad, exact["grad"], dtype, f"{pin.id}: grad", ULPS["grad"])
    loss_only = xf.cross_entropy(x, labels, reduction="none", backend=backend_name, **kwargs)
    assert_accurate(loss_only, exact["loss"], dtype, f"{pin.id}: loss (loss only)",
                    ULPS["loss"], LOSS_RTOL_FLOAT64)


def test_pinned_float64_true_class_gradient_value():
    """The oracle's value for the issue's float64 case, independently of the library."""
    grad = naive.exact_cross_entropy(np.array([[37.43, 0.0]]), np.array([0]))["grad"].value
    e = math.exp(-37.43)
    assert grad[0, 0] == pytest.approx(-e / (1 + e), rel=1e-15)
    assert grad[0, 0] == pytest.approx(-5.55e-17, rel=1e-3)
    assert grad[0, 1] == pytest.approx(e / (1 + e), rel=1e-15)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_log_softmax_of_logits_offset_by_1e7(backend_name):
    """float32 logits near 1e7 (ulp 1): x_j - m is exact, so log_softmax must be too
    (x - lse would round lse to a whole number)."""
    x = (_seed("pin-1e7").standard_normal((3, 50)) * 3 + 1e7).astype(np.float32)
    got = xf.log_softmax(x, backend=backend_name)
    assert_accurate(got, naive.exact_primitive(x, "log_softmax"), np.float32,
                    "log_softmax at 1e7", ULPS["log_softmax"])
    lse = xf.logsumexp(x, backend=backend_name)
    assert_accurate(lse, naive.exact_primitive(x, "logsumexp"), np.float32, "lse at 1e7",
                    ULPS["lse"])


# ----------------------------------------------------------------------- the oracle itself


def _mp_reference(x, y, t, w, eps, z):
    """Textbook formulas at 1200 bits: cancellation is harmless at that precision (lse - x_y
    of a confident float64 row loses up to ~1000 bits: e^-700 next to 700)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workprec(1200):
        c = len(x)
        X = [mpmath.mpf(v) for v in x]
        W = [mpmath.mpf(1)] * c if w is None else [mpmath.mpf(v) for v in w]
        e = [mpmath.mpf(0) if v == -math.inf else mpmath.exp(v) for v in x]
        s = mpmath.fsum(e)
        lse = mpmath.log(s)
        p = [v / s for v in e]
        E = mpmath.mpf(eps)
        if t is None:
            loss = (1 - E) * W[y] * (lse - X[y]) + z * lse * lse
            if eps:
                loss += E / c * mpmath.fsum(W[k] * (lse - X[k]) for k in range(c) if W[k])
            a = (1 - E) * W[y] + E * mpmath.fsum(W) / c + 2 * z * lse
            grad = [p[j] * a - E / c * W[j] - ((1 - E) * W[y] if j == y else 0)
                    for j in range(c)]
        else:
            wt = [W[k] * ((1 - E) * mpmath.mpf(t[k]) + E / c) for k in range(c)]
            loss = mpmath.fsum(wt[k] * (lse - X[k]) for k in range(c) if wt[k]) + z * lse * lse
            a = mpmath.fsum(wt) + 2 * z * lse
            grad = [p[j] * a - wt[j] for j in range(c)]
        return loss, lse, grad, p, [v - lse for v in X]


@pytest.mark.parametrize("precise", [True, False], ids=["mpmath_exp", "libm_exp"])
def test_oracle_agrees_with_mpmath(precise):
    """tests/naive.py's claims, on a sample of every adversarial kind against textbook
    formulas at 300 bits, in ulps of float64 at |truth| (at a near-zero crossing: at
    the terms' scale).  With mpmath's exp (the default for float64 logits) the value is
    the truth rounded to nearest and value + low is exact to a small fraction of an
    ulp; with libm's exp (< 0.502 ulp per e_j, so up to ~1 ulp of relative error in e_j
    / s) within 2.5 ulps -- 2**-26 float32 ulps, ample for float32 and 16-bit data."""
    mpmath = pytest.importorskip("mpmath")
    value_bound, pair_bound = (0.5 + 1e-6, 1e-4) if precise else (2.5, 2.0)
    for kind in ACCURACY_KINDS:
        rng = _seed("oracle", kind)
        case = accuracy_case(rng, kind, 6, 500 if kind == "long" else 9, np.float64)
        x = case.x
        t = accuracy_probabilities(rng, case, "soft")
        w = rng.uniform(0.5, 2.0, x.shape[1])
        sm = naive.exact_primitive(x, "softmax", precise=precise)
        lsm = naive.exact_primitive(x, "log_softmax", precise=precise)
        for label, (wv, eps, z) in (("sparse", (None, 0.0, 0.0)), ("sparse", (w, 0.1, 0.01)),
                                    ("dense", (None, 0.0, 0.0)), ("dense", (w, 0.1, 0.01))):
            labels = case.y if label == "sparse" else t
            got = naive.exact_cross_entropy(x, labels, weight=wv, label_smoothing=eps,
                                            z_loss=z, precise=precise)
            for i in range(x.shape[0]):
                ref = _mp_reference(x[i].tolist(), int(case.y[i]),
                                    None if label == "sparse" else t[i].tolist(),
                                    None if wv is None else wv.tolist(), eps, z)
                checks = [("loss", got["loss"], (i,), ref[0]), ("lse", got["lse"], (i,), ref[1])]
                checks += [("grad", got["grad"], (i, j), ref[2][j]) for j in range(x.shape[1])]
                if label == "sparse" and wv is None:
                    checks += [("softmax", sm, (i, j), ref[3][j]) for j in range(x.shape[1])]
                    checks += [("log_softmax", lsm, (i, j), ref[4][j])
                               for j in range(x.shape[1]) if x[i, j] != -math.inf]
                for what, ex, idx, truth in checks:
                    v, lo, sc = ex.value[idx], ex.low[idx], ex.scale[idx]
                    if not math.isfinite(v):
                        continue
                    crossing = sc > abs(v) * (1 + 2.0 ** -20)
                    ref_mag = max(abs(float(truth)), sc if crossing else 0.0)
                    ulp = math.ulp(ref_mag)
                    with mpmath.workprec(300):
                        e_value = float(abs(mpmath.mpf(v) - truth)) / ulp
                        e_pair = float(abs(mpmath.mpf(v) + mpmath.mpf(lo) - truth)) / ulp
                    assert e_value <= value_bound and e_pair <= pair_bound, (
                        f"oracle {what} of {kind} {label} (eps, z) = {(eps, z)} at {idx}: "
                        f"{v!r} + {lo!r} vs {mpmath.nstr(truth, 20)}: {e_value:.3f} / "
                        f"{e_pair:.3f} ulps (value / value + low)")


# ----------------------------------------------------------------------- the report script


@pytest.mark.skipif(not any(b != "cuda" for b in BACKENDS), reason="host backends only")
def test_accuracy_report_runs():
    """benchmarks/accuracy_report.py --quick prints its Markdown table (CI keeps it from
    rotting, as benchmarks/test_harness.py does for compare.py)."""
    host = [b for b in BACKENDS if b != "cuda"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy_report.py"),
                           "--quick", "--no-peers", "--backends", ",".join(host),
                           "--kinds", "confident,ties", "--dtypes", "float32"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| contender | data | loss | lse |" in proc.stdout
    for b in host:
        assert f"| xentfast-{b} |" in proc.stdout
