"""TensorFlow-style API: tf.nn.(sparse_)softmax_cross_entropy_with_logits semantics,
checked against the naive oracle (parity with TensorFlow itself is in test_peers.py)."""

from __future__ import annotations

import numpy as np
import pytest

import naive
import xentfast as xf
from helpers import (
    DTYPES,
    assert_close,
    backend_shape_dtype_params,
    loss_atol,
    make_logits,
    make_probabilities,
    rtol_for,
)

def _dtype(name):
    return next(d for d in DTYPES if d.name == name)


@pytest.mark.sim_sample(0.35)
@pytest.mark.parametrize("labels_kind", ["soft", "one_hot_int", "one_hot_float"])
@pytest.mark.parametrize("backend_name,shape_case,dtype_name", backend_shape_dtype_params())
def test_softmax_cross_entropy_with_logits(backend_name, shape_case, dtype_name, labels_kind, rng):
    """Per-example loss, the logits' dtype, the batch shape; integer one-hot labels
    are cast to the logits' dtype as TensorFlow does."""
    dtype = _dtype(dtype_name)
    logits = make_logits(rng, shape_case.shape, dtype)
    soft = labels_kind == "soft"
    labels = make_probabilities(rng, shape_case.shape, shape_case.axis, np.float64, one_hot=not soft)
    labels = labels.astype(np.int32 if labels_kind == "one_hot_int" else dtype)
    got = xf.softmax_cross_entropy_with_logits(labels, logits, axis=shape_case.axis,
                                               backend=backend_name)
    expected, _, _ = naive.cross_entropy(logits, labels.astype(np.float64), axis=shape_case.axis,
                                         reduction="none")
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == shape_case.batch_shape
    assert_close(got, expected, rtol=rtol_for(dtype),
                 atol=loss_atol(logits, labels, {"axis": shape_case.axis}, "none", dtype),
                 what="loss")


def test_keywords_and_axis(backend, rng):
    """labels=/logits= keywords; any class axis, incl. negative and 0."""
    x = rng.standard_normal((3, 4, 5))
    for axis in (0, 1, 2, -2):
        t = make_probabilities(rng, x.shape, axis, np.float64)
        got = xf.softmax_cross_entropy_with_logits(labels=t, logits=x, axis=axis, backend=backend)
        expected, _, _ = naive.cross_entropy(x, t, axis=axis, reduction="none")
        assert_close(got, expected, rtol=1e-10, atol=1e-12, what=f"axis={axis}")


@pytest.mark.parametrize("labels_shape,logits_shape,result_shape", [
    ((1, 5), (4, 5), (4,)),            # one label row for every row (TensorFlow's case)
    ((4, 5), (1, 5), (4,)),            # one row of logits for many label rows
    ((4, 5), (4, 1), (4,)),            # TensorFlow's feature-broadcast case (one class)
    ((4, 1), (4, 5), (4,)),            # one probability per row, spread over the classes
    ((5,), (2, 3, 5), (2, 3)),         # NumPy's rules, any rank
    ((2, 1, 5), (1, 3, 5), (2, 3)),
], ids=str)
def test_labels_and_logits_broadcast(backend, labels_shape, logits_shape, result_shape, rng):
    """softmax_cross_entropy_with_logits broadcasts labels and logits against each other
    (TensorFlow's op does): the loss is that of the explicitly broadcast arrays."""
    labels = rng.uniform(0, 1, labels_shape)
    logits = rng.standard_normal(logits_shape) * 3
    got = xf.softmax_cross_entropy_with_logits(labels, logits, backend=backend)
    shape = np.broadcast_shapes(labels_shape, logits_shape)
    expected, _, _ = naive.cross_entropy(np.broadcast_to(logits, shape).copy(),
                                         np.broadcast_to(labels, shape).copy(), reduction="none")
    assert got.shape == result_shape
    assert_close(got, expected, rtol=1e-12, atol=1e-14, what="broadcast loss")


def test_labels_that_do_not_broadcast_still_name_both_shapes(backend):
    with pytest.raises(ValueError, match=r"labels of shape \(4, 3\) do not fit logits of shape \(4, 5\)"):
        xf.softmax_cross_entropy_with_logits(np.zeros((4, 3)), np.zeros((4, 5)), backend=backend)


@pytest.mark.sim_sample(0.5)
@pytest.mark.parametrize("label_dtype", ["int32", "int64"])
@pytest.mark.parametrize("backend_name,shape_case,dtype_name",
                         [p for p in backend_shape_dtype_params() if p.values[1].axis == -1])
def test_sparse_softmax_cross_entropy_with_logits(backend_name, shape_case, dtype_name,
                                                  label_dtype, rng):
    """Classes on the last axis; labels of the batch shape, int32 or int64."""
    dtype = _dtype(dtype_name)
    logits = make_logits(rng, shape_case.shape, dtype)
    labels = rng.integers(0, shape_case.classes, size=shape_case.batch_shape).astype(label_dtype)
    got = xf.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits,
                                                      backend=backend_name)
    expected, _, _ = naive.cross_entropy(logits, labels, reduction="none")
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == shape_case.batch_shape
    assert_close(got, expected, rtol=rtol_for(dtype),
                 atol=loss_atol(logits, labels, {}, "none", dtype), what="loss")


def test_sparse_higher_rank(backend, rng):
    """(batch, time, classes) logits with (batch, time) labels."""
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    y = rng.integers(0, 6, size=(2, 3))
    got = xf.sparse_softmax_cross_entropy_with_logits(y, x, backend=backend)
    expected, _, _ = naive.cross_entropy(x, y, reduction="none")
    assert got.shape == (2, 3)
    assert_close(got, expected, rtol=2e-5, atol=1e-5)


def test_sparse_has_no_ignore_index(backend):
    """TensorFlow has no ignore_index: -100 is an out-of-range label like any other."""
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"-100 at labels\[1\]"):
        xf.sparse_softmax_cross_entropy_with_logits(np.array([0, -100]), x, backend=backend)
    with pytest.raises(ValueError, match=r"3 at labels\[0\]"):
        xf.sparse_softmax_cross_entropy_with_logits(np.array([3, 0]), x, backend=backend)


def test_sparse_rejects_float_labels(backend):
    with pytest.raises(TypeError, match="integer class indices"):
        xf.sparse_softmax_cross_entropy_with_logits(np.array([0.0, 1.0]), np.zeros((2, 3)),
                                                    backend=backend)


def test_dense_rejects_index_labels(backend):
    with pytest.raises(ValueError, match=r"logits' shape \(2, 3\).*got shape \(2,\)"):
        xf.softmax_cross_entropy_with_logits(np.array([0, 1]), np.zeros((2, 3)), backend=backend)
