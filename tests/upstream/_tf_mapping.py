"""TensorFlow's test-case assertions, its gradient checkers, and the map from the
TensorFlow ops its tests call to xentfast, as the ported TensorFlow tests use them.

Assertions, from tensorflow/python/framework/test_util.py of TensorFlow 2.21.0 (the
installed wheel):

* ``assertAllClose(a, b, rtol=1e-6, atol=1e-6)``: the shapes must be equal (no
  broadcasting); bfloat16 is compared as float32; element-wise
  ``|a - b| <= atol + rtol * |b|``, a NaN matching a NaN.
* ``assertAllCloseAccordingToType``: the same, the tolerances raised to at least
  ``float_rtol``/``float_atol`` (1e-6) when either side is float32, ``half_*`` (1e-3)
  when float16, ``bfloat16_*`` (1e-2) when bfloat16.
* ``assertAllEqual`` (equal shapes, equal values, NaN equal to NaN) and
  ``assertShapeEqual``.

Gradient checkers, from tensorflow/python/ops/gradient_checker.py (v1) and
gradient_checker_v2.py: the theoretical Jacobian is assembled from vector-Jacobian
products with one-hot cotangents, the numeric one from central differences
``(f(x + delta e_i) - f(x - delta e_i)) / (2 delta)``; v1's ``compute_gradient_error``
is the largest absolute difference of the two (x's rows, y's columns), v2's
``compute_gradient`` returns both (y's rows, x's columns).  v1 starts from
``np.random.random_sample(x_shape)`` when no initial value is given (a fed constant is
replaced); the ports pass a seeded draw from the same distribution.

The op map:

* ``gen_nn_ops.softmax_cross_entropy_with_logits(features, labels)`` (the raw op,
  ``(loss, backprop)``) -> ``xentfast.cross_entropy_with_grad(features, labels,
  reduction="none")``.  xentfast's gradient is that of the sum of the per-row losses:
  ``(sum_j t_j) p - t`` for probability labels, where TensorFlow's backprop is ``p - t``;
  the two agree when each label row sums to 1 (README, Semantics).  The raw op
  broadcasts features and labels against each other and returns backprop in the
  broadcast shape; ``cross_entropy_with_grad`` (PyTorch's convention) takes arrays of
  one shape, so the mapping broadcasts them first, as the raw op does.
* ``nn_ops.softmax_cross_entropy_with_logits(labels=, logits=, dim=)`` ->
  ``xentfast.softmax_cross_entropy_with_logits(labels, logits, axis=)``;
  ``nn_ops.sparse_softmax_cross_entropy_with_logits_v2`` ->
  ``xentfast.sparse_softmax_cross_entropy_with_logits``.
* The gradient a ``GradientTape``/``tf.gradients`` takes of those losses ->
  ``cross_entropy_with_grad(logits, labels, reduction="none")``'s gradient.  Row ``r``'s
  loss depends on row ``r``'s logits only, so the vector-Jacobian product with a
  cotangent ``g`` (one entry per row) is ``g`` broadcast along the class axis times that
  gradient: exactly TensorFlow's registered gradient, ``_BroadcastMul(grad_loss,
  backprop)`` (tensorflow/python/ops/nn_grad.py).  The derivative with respect to the
  labels, which xentfast does not return, is TensorFlow's ``-log_softmax(logits)``
  (same file), here ``-xentfast.log_softmax(logits)``.
* ``nn_ops.softmax``/``log_softmax`` (and their ``_v2``) -> ``xentfast.softmax``/
  ``log_softmax``.
* Python values given to an op become arrays as TensorFlow converts them: Python floats
  float32, Python ints int32; NumPy arrays keep their dtype (``convert_to_tensor``).

TensorFlow's ``InvalidArgumentError`` for a bad shape, axis or label value maps to
``ValueError``, its dtype errors to ``TypeError``.  Nothing here computes an expected
value: the expected values are upstream's (its NumPy references and literals).
"""

from __future__ import annotations

import contextlib

import ml_dtypes
import numpy as np
import pytest

import xentfast

# dtypes.bfloat16.as_numpy_dtype
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# TensorFlow has no ignored label: every label must be a class.  The most negative
# int64 is never a class id, so no label equals it once the range check has passed.
_NO_IGNORED_LABEL = int(np.iinfo(np.int64).min)


# --------------------------------------------------------------------------- values


def convert_to_tensor(value, dtype=None) -> np.ndarray:
    """``ops.convert_to_tensor``/``constant_op.constant`` on host values: NumPy arrays
    keep their dtype; Python floats become float32 and Python ints int32."""
    if dtype is not None:
        return np.asarray(value).astype(dtype)
    if isinstance(value, np.ndarray):
        return value
    array = np.asarray(value)
    if array.dtype == np.float64:
        return array.astype(np.float32)
    if array.dtype == np.int64:
        return array.astype(np.int32)
    return array


def _ndarray(value) -> np.ndarray:
    """``TestCase._GetNdArray``: an ndarray as is, anything else through ``np.array``."""
    return value if isinstance(value, np.ndarray) else np.array(value)


def _as_comparable(array: np.ndarray) -> np.ndarray:
    """bfloat16 (a custom NumPy type) is compared as float32, as TensorFlow does."""
    return array.astype(np.float32) if array.dtype == BFLOAT16 else array


# ----------------------------------------------------------------------- assertions


def assert_all_close(a, b, rtol=1e-6, atol=1e-6, msg=None):
    """``TestCase.assertAllClose``: equal shapes, then |a - b| <= atol + rtol * |b|
    element-wise, NaN matching NaN.  A list or tuple of arrays is compared as the
    array they stack into."""
    a = _ndarray(a)
    b = _ndarray(b)
    assert a.shape == b.shape, f"Shape mismatch: expected {a.shape}, got {b.shape} with contents {b}"
    a_dtype = a.dtype
    a = _as_comparable(a)
    b = _as_comparable(b)
    np.testing.assert_allclose(
        a, b, rtol=rtol, atol=atol, equal_nan=True,
        # assert_allclose's ACTUAL is TensorFlow's a (the expected value), DESIRED its b:
        # the order keeps the tolerance relative to |b|, as in TensorFlow.
        err_msg=f"{msg or ''} (ACTUAL is a, DESIRED is b) dtype = {a_dtype}, shape = {a.shape}",
    )


def assert_all_close_according_to_type(
    a, b, rtol=1e-6, atol=1e-6, float_rtol=1e-6, float_atol=1e-6, half_rtol=1e-3,
    half_atol=1e-3, bfloat16_rtol=1e-2, bfloat16_atol=1e-2, msg=None,
):
    """``TestCase.assertAllCloseAccordingToType``: the tolerances of the least precise
    dtype on either side."""
    a = _ndarray(a)
    b = _ndarray(b)
    if a.dtype == np.float32 or b.dtype == np.float32:
        rtol = max(rtol, float_rtol)
        atol = max(atol, float_atol)
    if a.dtype == np.float16 or b.dtype == np.float16:
        rtol = max(rtol, half_rtol)
        atol = max(atol, half_atol)
    if a.dtype == BFLOAT16 or b.dtype == BFLOAT16:
        rtol = max(rtol, bfloat16_rtol)
        atol = max(atol, bfloat16_atol)
    assert_all_close(a, b, rtol=rtol, atol=atol, msg=msg)


def assert_all_equal(a, b, msg=None):
    """``TestCase.assertAllEqual``: equal shapes and values, NaN equal to NaN for
    floating arrays."""
    a = _ndarray(a)
    b = _ndarray(b)
    assert a.shape == b.shape, f"Shape mismatch: expected {a.shape}, got {b.shape}. Contents: {b!r}. {msg or ''}"
    a = _as_comparable(a)
    b = _as_comparable(b)
    same = a == b
    if a.dtype.kind == "f":
        same = np.logical_or(same, np.logical_and(np.isnan(a), np.isnan(b)))
    if not np.all(same):
        np.testing.assert_array_equal(a, b, err_msg=msg or "")


def assert_shape_equal(np_array, result):
    """``TestCase.assertShapeEqual``: the result has the NumPy array's shape."""
    assert tuple(np.shape(np_array)) == tuple(np.shape(result)), (
        f"Shape mismatch: expected {np.shape(np_array)}, got {np.shape(result)}"
    )


@contextlib.contextmanager
def raises_saying(exception_type, *fragments: str):
    """``pytest.raises(exception_type)`` whose message contains every fragment: the
    ported error tests check that the message says what is wrong."""
    with pytest.raises(exception_type) as info:
        yield info
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"the message {message!r} does not mention {missing}"


# ------------------------------------------------------------------------------ ops


def softmax_cross_entropy_with_logits_raw(features, labels):
    """``gen_nn_ops.softmax_cross_entropy_with_logits(features, labels)`` ->
    ``(loss, backprop)``: xentfast's per-row loss and the gradient of their sum."""
    features = convert_to_tensor(features)
    labels = convert_to_tensor(labels)
    shape = np.broadcast_shapes(features.shape, labels.shape)
    return xentfast.cross_entropy_with_grad(np.broadcast_to(features, shape),
                                            np.broadcast_to(labels, shape), reduction="none")


def sparse_softmax_cross_entropy_with_logits_raw(features, labels):
    """``gen_nn_ops.sparse_softmax_cross_entropy_with_logits(features, labels)``."""
    features = convert_to_tensor(features)
    labels = convert_to_tensor(labels)
    return xentfast.cross_entropy_with_grad(
        features, labels, ignore_index=_NO_IGNORED_LABEL, reduction="none"
    )


def xent_fwd_bwd(labels, logits, axis=-1):
    """``XentOpTestBase._opFwdBwd``: ``nn_ops.softmax_cross_entropy_with_logits`` and
    the gradient of (the sum of) its result with respect to the logits."""
    logits = convert_to_tensor(logits)
    labels = convert_to_tensor(labels)
    loss = xentfast.softmax_cross_entropy_with_logits(labels=labels, logits=logits, axis=axis)
    labels = np.broadcast_to(labels, logits.shape)  # the loss broadcast them (TensorFlow)
    _, gradient = xentfast.cross_entropy_with_grad(logits, labels, axis=axis, reduction="none")
    return loss, gradient


def sparse_xent_fwd_bwd(labels, logits):
    """``SparseXentOpTestBase._opFwdBwd``: ``sparse_softmax_cross_entropy_with_logits_v2``
    and the gradient of (the sum of) its result with respect to the logits."""
    logits = convert_to_tensor(logits)
    labels = convert_to_tensor(labels)
    loss = xentfast.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    _, gradient = sparse_softmax_cross_entropy_with_logits_raw(logits, labels)
    return loss, gradient


def broadcast_mul(grad_loss, backprop, axis=-1):
    """``nn_grad._BroadcastMul``: the per-row cotangent times the row's gradient."""
    return np.expand_dims(grad_loss, axis) * backprop


# ------------------------------------------------------------------ gradient checks


def _theoretical_jacobian(vjp, x_data, y_shape, y_dtype) -> np.ndarray:
    """J[i, r] = d y_r / d x_i from ``vjp(x, dy)`` with one-hot cotangents dy."""
    x_size = x_data.size
    y_size = int(np.prod(y_shape))
    jacobian = np.zeros((x_size, y_size), dtype=x_data.dtype)
    dy = np.zeros(y_shape, dtype=y_dtype)
    dy_flat = dy.reshape(-1)
    for column in range(y_size):
        dy_flat[column] = 1
        jacobian[:, column] = np.asarray(vjp(x_data, dy)).reshape(-1)
        dy_flat[column] = 0
    if y_size == 0:
        backprop = np.asarray(vjp(x_data, dy))
        if backprop.shape != x_data.shape or np.any(backprop):
            raise ValueError("Empty tensor with nonzero gradients")
    return jacobian


def _numeric_jacobian(forward, x_data, y_size, y_dtype, delta) -> np.ndarray:
    """J[i, r] = (y_r(x + delta e_i) - y_r(x - delta e_i)) / (2 delta)."""
    x_size = x_data.size
    scale = np.asarray(2 * delta, dtype=y_dtype)[()]
    jacobian = np.zeros((x_size, y_size), dtype=x_data.dtype)
    for row in range(x_size):
        x_pos = x_data.copy()
        x_neg = x_data.copy()
        x_pos.reshape(-1)[row] += delta
        x_neg.reshape(-1)[row] -= delta
        y_pos = np.asarray(forward(x_pos))
        y_neg = np.asarray(forward(x_neg))
        jacobian[row, :] = ((y_pos - y_neg) / scale).reshape(-1)
    return jacobian


def compute_gradient_error(forward, vjp, x_data, delta=1e-3) -> float:
    """``gradient_checker.compute_gradient_error`` (v1) at ``x_data``: the largest
    absolute difference between the theoretical and the numeric Jacobian."""
    x_data = np.array(x_data)
    y = np.asarray(forward(x_data))
    theoretical = _theoretical_jacobian(vjp, x_data, y.shape, y.dtype)
    numeric = _numeric_jacobian(forward, x_data, y.size, y.dtype, delta)
    if theoretical.size or numeric.size:
        return float(np.fabs(theoretical - numeric).max())
    return 0.0


def compute_gradient(forward, vjp, x, delta=None):
    """``gradient_checker_v2.compute_gradient(f, [x])`` -> ``((theoretical,),
    (numeric,))``, each of y's size rows by x's size columns; ``delta`` defaults to
    1/1024."""
    if delta is None:
        delta = 1.0 / 1024
    x_data = np.array(x)
    y = np.asarray(forward(x_data))
    theoretical = _theoretical_jacobian(vjp, x_data, y.shape, y.dtype).T
    numeric = _numeric_jacobian(forward, x_data, y.size, y.dtype, delta).T
    return (theoretical,), (numeric,)
