"""Hypothesis: random shapes, axes, values (incl. -inf masks and large magnitudes) and
options, checked against the naive oracle on every backend under test."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import naive
import xentfast as xf
from helpers import (LOSS_RTOL_FLOAT64, ULPS, BACKENDS, assert_accurate, assert_close, grad_atol,
                     is_simulated_cuda, loss_atol, rtol_for)

# The CUDA simulator is ~1e4x slower: fewer examples there.
MAX_EXAMPLES = 10 if any(is_simulated_cuda(b) for b in BACKENDS) else 60
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw, dense: bool):
    dtype = np.dtype(draw(st.sampled_from(["float32", "float64"])))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    c = draw(st.integers(1, 9))
    shape = shape[: axis % ndim] + (c,) + shape[axis % ndim + 1 :]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1.0, 10.0, 1e4]))  # 1e4: exp underflows for most terms
    offset = draw(st.sampled_from([0.0, 50.0, -1e3]))  # lse far from 0: shift invariance
    x = rng.standard_normal(shape) * scale + offset
    moved = np.moveaxis(x, axis, -1)
    batch = moved.shape[:-1]
    n = int(np.prod(batch))
    kw = {"axis": axis}
    if draw(st.booleans()):
        w = rng.uniform(0.0, 3.0, c)
        w[rng.random(c) < 0.2] = 0.0
        kw["weight"] = w
    if draw(st.booleans()):
        kw["label_smoothing"] = draw(st.floats(0.0, 1.0))
    if draw(st.booleans()):
        kw["z_loss"] = draw(st.floats(0.0, 0.1))
    kw["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    if dense:
        t = rng.random(moved.shape) * (rng.random(moved.shape) < 0.7)
        labels_moved = t
        mask_ok = t == 0  # -inf only where the label gives it no weight
    else:
        y = rng.integers(0, c, size=batch)
        ignore = draw(st.sampled_from([-100, 0, c - 1]))
        if n and draw(st.booleans()):
            flat = y.reshape(-1)
            flat[rng.random(n) < 0.3] = ignore
        kw["ignore_index"] = ignore
        labels = y
        onehot = np.zeros(moved.shape, bool)
        if n:
            np.put_along_axis(onehot, np.clip(y, 0, c - 1)[..., None], True, axis=-1)
        mask_ok = ~onehot
    if draw(st.booleans()) and c > 1:
        # -inf masks, never on the true class (nor on a class with label mass), and
        # never the whole row; with smoothing they make the loss +inf, as in PyTorch
        mask = (rng.random(moved.shape) < 0.3) & mask_ok
        mask[..., 0] &= ~mask.all(axis=-1) if c else True
        mask_full = mask.all(axis=-1, keepdims=True)
        mask &= ~mask_full
        np.moveaxis(x, axis, -1)[mask] = -np.inf
    x = x.astype(dtype)
    if dense:
        labels = np.moveaxis(labels_moved, -1, axis).astype(dtype)
    return x, labels, kw


def _check(backend, x, labels, kw):
    reduction = kw["reduction"]
    dtype = x.dtype
    loss, grad = xf.cross_entropy_with_grad(x, labels, backend=backend, **kw)
    loss_only = xf.cross_entropy(x, labels, backend=backend, **kw)
    okw = dict(kw)
    if okw.get("weight") is not None:
        okw["weight"] = okw["weight"].astype(dtype).astype(np.float64)
    exp_loss, exp_grad, _ = naive.cross_entropy(x, labels, **okw)
    tol_kw = {k: v for k, v in kw.items() if k != "reduction"}
    atol = loss_atol(x, labels, tol_kw, reduction, dtype)
    assert_close(loss, exp_loss, rtol=rtol_for(dtype), atol=atol, what="loss")
    assert_close(loss_only, exp_loss, rtol=rtol_for(dtype), atol=atol, what="loss only")
    assert_close(grad, exp_grad, rtol=rtol_for(dtype),
                 atol=grad_atol(x, labels, tol_kw, reduction, dtype), what="grad")


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(problem=problems(dense=False))
def test_index_labels_match_oracle(backend_name, problem):
    _check(backend_name, *problem)


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(problem=problems(dense=True))
def test_probability_labels_match_oracle(backend_name, problem):
    _check(backend_name, *problem)


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(data=st.data())
def test_primitives_match_oracle(backend_name, data):
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1)))
    dtype = np.dtype(data.draw(st.sampled_from(["float32", "float64"])))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal(shape) * data.draw(st.sampled_from([1.0, 30.0, 1e3]))).astype(dtype)
    mag = float(np.max(np.abs(x), initial=0.0)) + 3
    for op in ("softmax", "log_softmax", "logsumexp"):
        got = getattr(xf, op)(x, axis=axis, backend=backend_name)
        expected = getattr(naive, op)(x, axis=axis)
        assert np.shape(got) == np.shape(expected), op
        atol = rtol_for(dtype) * (1.0 if op == "softmax" else mag)
        assert_close(got, expected, rtol=rtol_for(dtype), atol=atol, what=op)


# ---------------------------------------------------------------------------------------
# Every host backend at once, against the exact oracle's ulp bounds and against each
# other: shapes across the cpu backend's path thresholds, both dtypes, memory layouts,
# special values (ties at the max, confident rows, +-1e30, large offsets, -inf masks,
# NaN) and options drawn together.  XENTFAST_HYPOTHESIS_EXAMPLES sets the number of
# examples (a bounded profile by default; the long search was run once, see
# BENCHMARKS.md "Accuracy").

HOST = [b for b in BACKENDS if not is_simulated_cuda(b) and b != "cuda"]
ALL_HOST_EXAMPLES = int(os.environ.get("XENTFAST_HYPOTHESIS_EXAMPLES", "40"))


@st.composite
def hostile_problems(draw):
    dtype = np.dtype(draw(st.sampled_from(["float32", "float64"])))
    n = draw(st.integers(1, 70))
    c = draw(st.sampled_from([1, 2, 3, 10, 48, 49, 64, 65, 100, 320, 333, 1000]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, c)) * draw(st.sampled_from([1.0, 3.0, 30.0]))
    y = rng.integers(0, c, n)
    rows = np.arange(n)
    special = draw(st.sets(st.sampled_from(
        ["confident", "ties", "huge", "offset", "mask", "nan"]), max_size=4))
    if "confident" in special:
        sel = rng.random(n) < 0.5
        x[sel, y[sel]] = x[sel].max(axis=1) + rng.uniform(8, 36 if dtype == np.float32 else 60,
                                                         sel.sum())
    if "ties" in special and c > 1:
        i = rng.integers(0, n)
        x[i, :] = rng.standard_normal(c)
        x[i, [0, c - 1]] = x[i].max() + 1
        y[i] = c - 1
    if "huge" in special and c > 1:
        i = rng.integers(0, n)
        x[i, :] = -1e30
        x[i, rng.integers(0, c)] = 1e30
    if "offset" in special:
        x += draw(st.sampled_from([1e4, -1e4, 1e7 if dtype == np.float64 else 1e4]))
    if "mask" in special and c > 2:
        j = (y + 1) % c
        x[rows, j] = -np.inf
    if "nan" in special:
        x[rng.integers(0, n), rng.integers(0, c)] = np.nan
    kw = {}
    if draw(st.booleans()):
        kw["weight"] = rng.uniform(0.25, 4.0, c)
    if draw(st.booleans()) and "mask" not in special:
        kw["label_smoothing"] = draw(st.sampled_from([0.05, 0.3, 1.0]))
    if draw(st.booleans()):
        kw["z_loss"] = draw(st.sampled_from([1e-4, 1e-2]))
    if draw(st.booleans()):
        y[rng.random(n) < 0.2] = -100
    x = x.astype(dtype)
    layout = draw(st.sampled_from(["C", "F", "strided", "axis0", "readonly"]))
    return x, y, kw, layout


def _laid_out(x, layout):
    """(array, axis) holding x's rows in the given memory layout."""
    if layout == "F":
        return np.asfortranarray(x), -1
    if layout == "strided":
        wide = np.zeros((x.shape[0], 2 * x.shape[1]), x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2], -1
    if layout == "axis0":
        return np.ascontiguousarray(x.T), 0
    if layout == "readonly":
        r = x.copy()
        r.setflags(write=False)
        return r, -1
    return x.copy(), -1


@pytest.mark.skipif(not HOST, reason="no host backend under test")
@settings(max_examples=ALL_HOST_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problem=hostile_problems())
def test_host_backends_exact_and_agreeing(problem):
    x, y, kw, layout = problem
    exact = naive.exact_cross_entropy(x, y, **kw)
    results = {}
    for backend in HOST:
        arr, axis = _laid_out(x, layout)
        before = arr.copy()
        loss, grad, lse = xf.cross_entropy_with_grad(arr, y, axis=axis, reduction="none",
                                                     return_lse=True, backend=backend, **kw)
        np.testing.assert_array_equal(arr, before)          # never modified
        if axis == 0:
            grad = grad.T
        # a float32 row more confident than e^-28 loses up to (gap + 4) ulps of its
        # loss to the rounding of x_j - m (README, "accuracy"; gap: max - second max)
        loss_ulps = ULPS["loss"]
        if x.dtype == np.float32 and x.shape[1] > 1:
            with np.errstate(invalid="ignore"):
                top2 = np.sort(np.nan_to_num(x, nan=-np.inf), axis=1)[:, -2:]
                gap = np.nan_to_num(top2[:, 1] - top2[:, 0], nan=0.0, posinf=0.0)
            loss_ulps = np.where(gap > 28, gap + 4, loss_ulps)
        assert_accurate(loss, exact["loss"], x.dtype, f"{backend} loss", loss_ulps,
                        rtol64=LOSS_RTOL_FLOAT64)
        assert_accurate(lse, exact["lse"], x.dtype, f"{backend} lse", ULPS["lse"])
        # a subnormal e_j's rounding carries the row's gradient coefficient (at most
        # max w (1 + eps) + 2 z |lse|)
        w_max = float(np.max(kw["weight"])) if "weight" in kw else 1.0
        coef = w_max * (1 + kw.get("label_smoothing", 0.0)) + 2 * kw.get("z_loss", 0.0) \
            * np.abs(np.nan_to_num(exact["lse"].value, posinf=0.0, neginf=0.0))
        # float32 gradients take e_j = exp(x_j - m) with x_j - m rounded (compensating
        # it would cost a quarter of the pass): up to |x_j - m| ulps of e_j, which
        # passes the 64-ulp bound only for x_j - m > -60 (README, "accuracy")
        ulps = ULPS["grad"]
        if x.dtype == np.float32:
            with np.errstate(invalid="ignore"):
                top = np.max(np.nan_to_num(x, nan=-np.inf), axis=1, keepdims=True)
                spread = np.nan_to_num(top - x, nan=0.0, posinf=0.0, neginf=0.0)
            ulps = np.maximum(ulps, spread + 4)
        assert_accurate(grad, exact["grad"], x.dtype, f"{backend} grad", ulps,
                        flush=np.maximum(coef, 1.0)[:, None])
        results[backend] = (loss, grad)
    # every backend within the bound of the exact value, hence of each other: the NaN
    # and inf positions are the same everywhere
    first = next(iter(results.values()))
    for loss, grad in results.values():
        np.testing.assert_array_equal(np.isnan(loss), np.isnan(first[0]))
        np.testing.assert_array_equal(np.isnan(grad), np.isnan(first[1]))
