"""Keras' own tests of ``keras.ops`` softmax, log_softmax, categorical_crossentropy and
sparse_categorical_crossentropy, run against xentfast's functions of those names.

Upstream: https://github.com/keras-team/keras, keras/src/ops/nn_test.py at tag v3.15.1
(commit 250b42181ce9f37df68319d8f4753ec89a349a43, the installed keras 3.15.1); every
test of those four ops in ``NNOpsDynamicShapeTest``, ``NNOpsStaticShapeTest``,
``NNOpsCorrectnessTest``, ``NNOpsDtypeTest`` and ``NNOpsBehaviorTest``, under
upstream's class and method names.

Mapping: ``knn.softmax`` / ``knn.log_softmax`` -> ``xentfast.softmax`` /
``xentfast.log_softmax``; ``knn.categorical_crossentropy`` /
``knn.sparse_categorical_crossentropy`` -> ``xentfast.categorical_crossentropy`` /
``xentfast.sparse_categorical_crossentropy`` (the ``keras.losses`` signatures: the ops'
``from_logits`` and ``axis``, which these tests pass by keyword, have the same names and
meaning; the ops have no ``label_smoothing``/``ignore_class``, left at their defaults);
NumPy inputs.  Keras'
TestCase assertions are in ``_keras_mapping.py`` (``assertAllClose``: atol=rtol=1e-6).
Upstream's inputs, expected values and tolerances are unchanged.

The shape tests call upstream's ops on symbolic ``KerasTensor``s, which have a shape
and a dtype but no values.  They are ported onto concrete arrays of those shapes and
dtypes (values seeded; class ids within range), the shape assertions unchanged; a
``None`` (unknown) batch dimension is tried at sizes 1 and 5.

Left out, and why:

* ``NNOpsDynamicShapeTest.test_softmax_in_graph``: builds and runs a Keras ``Model``
  around ``ops.softmax`` (Keras' graph tracing, nothing of xentfast).
* ``NNOpsDtypeTest``'s second assertion, on ``knn.Softmax().symbolic_call(x)`` /
  ``knn.LogSoftmax().symbolic_call(x)``: symbolic KerasTensor dtype inference.  The
  first assertion (the result dtype equals ``jax.nn``'s, as upstream computes it) is
  ported.
* ``NNOpsBehaviorTest.test_softmax_and_normalize_reject_out_of_range_axis``: the
  ``knn.normalize`` half (xentfast has no normalize); the softmax half is ported.
* Every other op of nn_test.py (not part of xentfast's API).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

import helpers
import xentfast as xf
from _keras_mapping import assert_all_close, numpy_dtype

# KerasTensor's default dtype.
KERAS_TENSOR_DTYPE = "float32"
# Sizes standing in for a KerasTensor's unknown (None) batch dimension.
DYNAMIC_BATCH_SIZES = (1, 5)

# keras/src/backend/common/dtypes.py FLOAT_TYPES without float64, as NNOpsDtypeTest.
FLOAT_DTYPES = [x for x in ("bfloat16", "float16", "float32", "float64") if x not in ("float64",)]


def _values(shape, dtype=KERAS_TENSOR_DTYPE, seed=0):
    """Concrete values standing in for a KerasTensor of this shape and dtype."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _probabilities(shape, axis=-1, seed=0):
    """Concrete, positive values whose slices along ``axis`` sum to 1."""
    p = np.random.default_rng(seed).random(shape) + 0.1
    return (p / p.sum(axis=axis, keepdims=True)).astype(KERAS_TENSOR_DTYPE)


def _class_ids(shape, num_classes, dtype="int32", seed=1):
    """Concrete class ids in [0, num_classes) standing in for an integer KerasTensor."""
    return np.random.default_rng(seed).integers(0, num_classes, size=shape).astype(dtype)


class NNOpsDynamicShapeTest:
    __test__ = True  # upstream's class name; collected although it does not start with Test

    @pytest.mark.parametrize("batch", DYNAMIC_BATCH_SIZES)
    def test_softmax(self, batch):
        x = _values([batch, 2, 3])  # KerasTensor([None, 2, 3])
        assert xf.softmax(x).shape == (batch, 2, 3)
        assert xf.softmax(x, axis=1).shape == (batch, 2, 3)
        assert xf.softmax(x, axis=-1).shape == (batch, 2, 3)

    @pytest.mark.parametrize("batch", DYNAMIC_BATCH_SIZES)
    def test_log_softmax(self, batch):
        x = _values([batch, 2, 3])  # KerasTensor([None, 2, 3])
        assert xf.log_softmax(x).shape == (batch, 2, 3)
        assert xf.log_softmax(x, axis=1).shape == (batch, 2, 3)
        assert xf.log_softmax(x, axis=-1).shape == (batch, 2, 3)
        with pytest.raises(ValueError):
            xf.log_softmax(x, axis=3)


class NNOpsStaticShapeTest:
    __test__ = True  # upstream's class name; collected although it does not start with Test

    def test_softmax(self):
        x = _values([1, 2, 3])  # KerasTensor([1, 2, 3])
        assert xf.softmax(x).shape == (1, 2, 3)
        assert xf.softmax(x, axis=1).shape == (1, 2, 3)
        assert xf.softmax(x, axis=-1).shape == (1, 2, 3)

    def test_log_softmax(self):
        x = _values([1, 2, 3])  # KerasTensor([1, 2, 3])
        assert xf.log_softmax(x).shape == (1, 2, 3)
        assert xf.log_softmax(x, axis=1).shape == (1, 2, 3)
        assert xf.log_softmax(x, axis=-1).shape == (1, 2, 3)

    def test_categorical_crossentropy(self):
        x1 = _probabilities([2, 3, 4], seed=1)  # KerasTensor([2, 3, 4])
        x2 = _probabilities([2, 3, 4], seed=2)  # KerasTensor([2, 3, 4])
        assert xf.categorical_crossentropy(x1, x2).shape == (2, 3)

    def test_sparse_categorical_crossentropy(self):
        x1 = _class_ids([2, 3], 4)  # KerasTensor([2, 3], dtype="int32")
        x2 = _probabilities([2, 3, 4])  # KerasTensor([2, 3, 4])
        assert xf.sparse_categorical_crossentropy(x1, x2).shape == (2, 3)
        x1 = _class_ids([2, 4], 3)  # KerasTensor([2, 4], dtype="int32")
        x2 = _probabilities([2, 3, 4], axis=1)  # KerasTensor([2, 3, 4])
        assert xf.sparse_categorical_crossentropy(x1, x2, axis=1).shape == (2, 4)
        with pytest.raises(ValueError):
            xf.sparse_categorical_crossentropy(x1, x2, axis=3)


class NNOpsCorrectnessTest:
    __test__ = True  # upstream's class name; collected although it does not start with Test

    def test_softmax(self):
        x = np.array([[1, 2, 3], [1, 2, 3]], dtype=np.float32)
        assert_all_close(
            xf.softmax(x, axis=None),  # Reduce on all axes.
            [[0.045015, 0.122364, 0.33262], [0.045015, 0.122364, 0.33262]],
        )
        assert_all_close(
            xf.softmax(x, axis=0),
            [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]],
        )
        assert_all_close(
            xf.softmax(x, axis=-1),
            [
                [0.09003057, 0.24472848, 0.66524094],
                [0.09003057, 0.24472848, 0.66524094],
            ],
        )
        assert_all_close(
            xf.softmax(x),  # Default axis should be -1.
            [
                [0.09003057, 0.24472848, 0.66524094],
                [0.09003057, 0.24472848, 0.66524094],
            ],
        )

    def test_softmax_correctness_with_axis_tuple(self):
        input = np.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
        combination = combinations(range(3), 2)
        for axis in list(combination):
            result = xf.softmax(input, axis=axis)
            normalized_sum_by_axis = np.sum(np.asarray(result), axis=axis)
            assert_all_close(normalized_sum_by_axis, 1.0)

    def test_log_softmax(self):
        x = np.array([[1, 2, 3], [1, 2, 3]], dtype=np.float32)
        assert_all_close(
            xf.log_softmax(x, axis=None),  # Reduce on all axes.
            [
                [-3.100753, -2.100753, -1.100753],
                [-3.100753, -2.100753, -1.100753],
            ],
        )
        assert_all_close(
            xf.log_softmax(x, axis=0),
            [
                [-0.693147, -0.693147, -0.693147],
                [-0.693147, -0.693147, -0.693147],
            ],
        )
        assert_all_close(
            xf.log_softmax(x, axis=-1),
            [
                [-2.407606, -1.407606, -0.407606],
                [-2.407606, -1.407606, -0.407606],
            ],
        )
        assert_all_close(
            xf.log_softmax(x),  # Default axis should be -1.
            [
                [-2.407606, -1.407606, -0.407606],
                [-2.407606, -1.407606, -0.407606],
            ],
        )

    def test_log_softmax_correctness_with_axis_tuple(self):
        input = np.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
        combination = combinations(range(3), 2)
        for axis in list(combination):
            result = xf.log_softmax(input, axis=axis)
            normalized_sum_by_axis = np.sum(np.exp(np.asarray(result)), axis=axis)
            assert_all_close(normalized_sum_by_axis, 1.0)

    def test_categorical_crossentropy(self):
        target = np.array(
            [
                [0.33008796, 0.0391289, 0.9503603],
                [0.80376694, 0.92363342, 0.19147756],
            ]
        )
        output = np.array(
            [
                [0.23446431, 0.35822914, 0.06683268],
                [0.3413979, 0.05420256, 0.81619654],
            ]
        )

        # Test from_logits=False
        result = xf.categorical_crossentropy(target, output, from_logits=False, axis=-1)
        assert_all_close(result, np.array([2.54095299, 3.96374412]))

        # Test axis
        result = xf.categorical_crossentropy(target, output, from_logits=False, axis=0)
        assert_all_close(result, np.array([0.71683073, 1.87988172, 2.46810762]))

        # Test from_logits=True
        result = xf.categorical_crossentropy(target, output, from_logits=True, axis=-1)
        assert_all_close(result, np.array([1.59419954, 2.49880593]))

        # Test with output clipping
        output = np.array(
            [
                [1.23446431, -0.35822914, 1.06683268],
                [0.3413979, -0.05420256, 0.81619654],
            ]
        )
        result = xf.categorical_crossentropy(target, output, from_logits=True, axis=-1)
        assert_all_close(result, np.array([1.16825923, 2.55436813]))

    def test_sparse_categorical_crossentropy(self):
        target = np.array([0, 1, 2])
        output = np.array([[0.9, 0.05, 0.05], [0.05, 0.89, 0.06], [0.05, 0.01, 0.94]])
        result = xf.sparse_categorical_crossentropy(target, output)
        assert_all_close(result, [0.105361, 0.116534, 0.061875])

        output = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
        result = xf.sparse_categorical_crossentropy(target, output, from_logits=True)
        assert_all_close(result, [0.001822, 0.000459, 0.169846])


class NNOpsDtypeTest:
    """Test the floating dtype to verify that the behavior matches JAX."""

    __test__ = True  # upstream's class name; collected although it does not start with Test

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_log_softmax(self, dtype):
        jax = helpers.import_peer("jax")  # upstream's oracle for the dtype
        jnn, jnp = jax.nn, jax.numpy

        x = np.ones((10,), dtype=numpy_dtype(dtype))
        x_jax = jnp.ones((10,), dtype=dtype)
        expected_dtype = np.dtype(jnn.log_softmax(x_jax).dtype)

        assert np.dtype(xf.log_softmax(x).dtype) == expected_dtype

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_softmax(self, dtype):
        jax = helpers.import_peer("jax")  # upstream's oracle for the dtype
        jnn, jnp = jax.nn, jax.numpy

        x = np.ones((10,), dtype=numpy_dtype(dtype))
        x_jax = jnp.ones((10,), dtype=dtype)
        expected_dtype = np.dtype(jnn.softmax(x_jax).dtype)

        assert np.dtype(xf.softmax(x).dtype) == expected_dtype


class NNOpsBehaviorTest:
    __test__ = True  # upstream's class name; collected although it does not start with Test

    @pytest.mark.xfail(strict=True, raises=pytest.fail.Exception, reason=(
        "deliberate difference (README, Semantics): xentfast.softmax is a general "
        "primitive, like NumPy's, SciPy's and PyTorch's softmax, and returns 1 over a "
        "size-1 axis without Keras' ops-level warning; the Keras losses do warn"))
    def test_softmax_on_axis_with_size_one_warns(self):
        x = np.array([[1.0]])
        # Applying softmax on the second axis, which has size 1
        axis = 1

        # Expected warning message
        expected_warning_regex = (
            r"You are using a softmax over axis 1 "
            r"of a tensor of shape \(1, 1\)\. This axis "
            r"has size 1\. The softmax operation will always return "
            r"the value 1, which is likely not what you intended\. "
            r"Did you mean to use a sigmoid instead\?"
        )

        with pytest.warns(UserWarning, match=expected_warning_regex):
            xf.softmax(x, axis)

    def test_softmax_and_normalize_reject_out_of_range_axis(self):
        a = _values((3, 4))  # KerasTensor((3, 4))
        with pytest.raises(ValueError, match="axis 10 is out of bounds"):
            xf.softmax(a, axis=10)
