"""softmax / log_softmax / logsumexp against the naive oracle (and SciPy where present)."""

from __future__ import annotations

import numpy as np
import pytest

import naive
import xentfast as xf
from helpers import (
    DTYPE_IDS,
    DTYPES,
    assert_bitwise_equal,
    assert_close,
    backend_shape_dtype_params,
    make_logits,
    rtol_for,
)

OPS = ["softmax", "log_softmax", "logsumexp"]


def _dtype(name):
    return next(d for d in DTYPES if d.name == name)


def _atol(op, x, dtype):
    """softmax entries are <= 1; log_softmax and lse scale with |x| + log C."""
    if op == "softmax":
        return rtol_for(dtype)
    finite = np.abs(np.where(np.isfinite(x.astype(np.float64)), x.astype(np.float64), 0))
    return rtol_for(dtype) * (float(np.max(finite, initial=0)) + np.log(max(x.size, 2)) + 1)


@pytest.mark.sim_sample(0.4)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend_name,shape_case,dtype_name", backend_shape_dtype_params())
def test_matches_oracle(backend_name, shape_case, dtype_name, op, rng):
    dtype = _dtype(dtype_name)
    x = make_logits(rng, shape_case.shape, dtype)
    x.setflags(write=False)
    got = getattr(xf, op)(x, axis=shape_case.axis, backend=backend_name)
    expected = getattr(naive, op)(x, axis=shape_case.axis)
    assert isinstance(got, np.ndarray) and got.dtype == dtype
    assert got.shape == expected.shape
    assert_close(got, expected, rtol=rtol_for(dtype), atol=_atol(op, x, dtype), what=op)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4), (6,)], ids=["2D", "3D", "1D"])
def test_axis_none_is_over_all_elements(backend, op, shape, rng):
    x = rng.standard_normal(shape)
    got = getattr(xf, op)(x, axis=None, backend=backend)
    expected = getattr(naive, op)(x, axis=None)
    assert np.shape(got) == np.shape(expected)
    assert_close(got, expected, rtol=1e-10, atol=1e-12, what=op)
    if op == "softmax":
        np.testing.assert_allclose(np.sum(got), 1.0, rtol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, -1, None])
def test_logsumexp_keepdims(backend, axis, rng):
    x = rng.standard_normal((3, 4, 5))
    got = xf.logsumexp(x, axis=axis, keepdims=True, backend=backend)
    expected = naive.logsumexp(x, axis=axis, keepdims=True)
    assert got.shape == expected.shape
    assert_close(got, expected, rtol=1e-10, atol=1e-12, what="logsumexp")
    # keepdims broadcasts back: x - lse is log_softmax along that axis
    if axis is not None:
        assert_close(x - got, naive.log_softmax(x, axis=axis), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp_of_an_empty_axis_is_minus_inf(backend, keepdims):
    """The log of an empty sum: -inf (SciPy, PyTorch)."""
    x = np.zeros((3, 0), np.float32)
    got = xf.logsumexp(x, axis=-1, keepdims=keepdims, backend=backend)
    assert got.shape == ((3, 1) if keepdims else (3,))
    assert got.dtype == np.float32
    assert np.all(got == -np.inf)
    assert xf.logsumexp(np.zeros(0), axis=None, backend=backend) == -np.inf


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_empty_axis_and_empty_batch_keep_their_shape(backend, op):
    for shape in [(3, 0), (0, 4), (2, 0, 3)]:
        x = np.zeros(shape, np.float64)
        got = getattr(xf, op)(x, axis=1 if len(shape) == 3 else -1, backend=backend)
        assert got.shape == shape and got.dtype == np.float64
    assert xf.logsumexp(np.zeros((0, 4)), backend=backend).shape == (0,)


@pytest.mark.parametrize("dtype_name", DTYPE_IDS)
def test_special_values(backend, dtype_name):
    """-inf is a mask (probability exactly 0); NaN poisons its row only; an all -inf
    row is NaN; huge values are exact."""
    dtype = _dtype(dtype_name)
    h = 3e4 if dtype == np.float16 else 1e30
    x = np.array([[0.0, -np.inf, 1.0, -np.inf],
                  [np.nan, 0.0, 1.0, 2.0],
                  [-np.inf] * 4,
                  [h, 0.0, -h, h / 2],
                  [1.0, 2.0, 3.0, 4.0]]).astype(dtype)
    sm = xf.softmax(x, backend=backend)
    lsm = xf.log_softmax(x, backend=backend)
    lse = xf.logsumexp(x, backend=backend)
    # row 0: masks
    assert sm[0, 1] == 0 and sm[0, 3] == 0
    assert lsm[0, 1] == -np.inf and lsm[0, 3] == -np.inf
    # rows 1 and 2: NaN rows
    assert np.all(np.isnan(sm[1:3])) and np.all(np.isnan(lsm[1:3])) and np.all(np.isnan(lse[1:3]))
    # row 3: exact
    assert lse[3] == dtype.type(h)
    assert_bitwise_equal(sm[3], np.array([1, 0, 0, 0], dtype), "softmax of huge logits")
    assert_bitwise_equal(lsm[3], np.array([0, -h, -2 * h, -h / 2]).astype(dtype), "log_softmax")
    # untouched rows agree with the oracle
    for got, exp in [(sm, naive.softmax(x)), (lsm, naive.log_softmax(x)), (lse, naive.logsumexp(x))]:
        assert_close(got[[0, 4]], exp[[0, 4]], rtol=rtol_for(dtype), atol=rtol_for(dtype) * 10)


def test_matches_scipy(backend, rng):
    special = pytest.importorskip("scipy.special")
    x = rng.standard_normal((5, 6, 7)) * 10
    for axis in (0, 1, 2, None):
        np.testing.assert_allclose(xf.logsumexp(x, axis=axis, backend=backend),
                                   special.logsumexp(x, axis=axis), rtol=1e-12)
        np.testing.assert_allclose(xf.softmax(x, axis=axis, backend=backend),
                                   special.softmax(x, axis=axis), rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(xf.log_softmax(x, axis=axis, backend=backend),
                                   special.log_softmax(x, axis=axis), rtol=1e-12,
                                   atol=1e-13)  # x - lse: absolute error ~ eps |lse|


def test_lists_and_inputs_untouched(backend):
    x = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    got = xf.softmax(x, backend=backend)
    assert_close(got, naive.softmax(np.array(x)), rtol=1e-12, atol=1e-15)
    arr = np.array(x)
    copy = arr.copy()
    for op in OPS:
        getattr(xf, op)(arr, backend=backend)
    assert_bitwise_equal(arr, copy, "input")


@pytest.mark.parametrize("axes", [(0, 1), (2, 0), (1,), (), [0, 1, 2], (-1, -3)], ids=str)
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp"])
def test_several_axes_at_once(host_backend, op, axes, rng):
    """A tuple axis normalises over those axes together (NumPy, SciPy, Keras): the same
    as merging them into one row axis, element for element; keepdims as NumPy's."""
    x = (rng.standard_normal((3, 4, 5)) * 4).astype(np.float32)
    ndim = x.ndim
    axes_ = tuple(a % ndim for a in axes)
    last = tuple(range(ndim - len(axes_), ndim))
    moved = np.moveaxis(x, axes_, last)
    merged = moved.reshape(moved.shape[: ndim - len(axes_)] + (-1,)).astype(np.float64)
    exact = getattr(naive, op)(merged, axis=-1)
    got = getattr(xf, op)(x, axis=axes, backend=host_backend)
    if op == "logsumexp":
        expected = exact
        kept = xf.logsumexp(x, axis=axes, keepdims=True, backend=host_backend)
        keep_shape = tuple(1 if d in axes_ else s for d, s in enumerate(x.shape))
        assert kept.shape == keep_shape
        np.testing.assert_array_equal(kept.reshape(got.shape), got)
    else:
        expected = np.moveaxis(exact.reshape(moved.shape), last, axes_)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert_close(got, expected, rtol=64 * 2.0 ** -24, atol=1e-30, what=f"{op} over {axes}")


def test_several_axes_reject_repeats_and_bounds(host_backend):
    with pytest.raises(ValueError, match=r"axis \(0, 0\) repeats an axis"):
        xf.softmax(np.ones((2, 3)), axis=(0, 0), backend=host_backend)
    with pytest.raises(ValueError, match="out of bounds"):
        xf.log_softmax(np.ones((2, 3)), axis=(0, 2), backend=host_backend)


@pytest.mark.parametrize("dtype_name", DTYPE_IDS)
def test_logsumexp_of_a_row_holding_inf_is_inf(backend, dtype_name):
    """log sum exp of a sum containing exp(+inf) is +inf, as SciPy and PyTorch give;
    NaN still wins, and an all -inf row stays NaN (README, Semantics)."""
    dtype = _dtype(dtype_name)
    x = np.array([[np.inf, 0.0, 1.0], [1.0, 2.0, 3.0], [np.inf, np.nan, 0.0],
                  [-np.inf, -np.inf, -np.inf], [np.inf, np.inf, -np.inf]]).astype(dtype)
    lse = xf.logsumexp(x, backend=backend)
    assert lse[0] == np.inf and lse[4] == np.inf
    assert np.isnan(lse[2]) and np.isnan(lse[3])
    assert np.isfinite(lse[1])
    assert xf.logsumexp(x[[0, 1]], axis=None, backend=backend) == np.inf
    assert_bitwise_equal(xf.logsumexp(x[[0, 1]], axis=0, backend=backend)[:1],
                         np.array([np.inf], dtype), "logsumexp over rows")
