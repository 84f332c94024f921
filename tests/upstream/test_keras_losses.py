"""Keras' own tests of CategoricalCrossentropy and SparseCategoricalCrossentropy, run
against xentfast's loss objects and functions.

Upstream: https://github.com/keras-team/keras, keras/src/losses/losses_test.py at tag
v3.15.1 (commit 250b42181ce9f37df68319d8f4753ec89a349a43, the installed keras 3.15.1):
the classes ``CategoricalCrossentropyTest`` and ``SparseCategoricalCrossentropyTest``
(the file has no other test of categorical_crossentropy / sparse_categorical_crossentropy).
Three cases were added or extended upstream after 3.15.1 and are ported from the commits
that did so (each test names its source):

* ``CategoricalCrossentropyTest.test_warning_for_invalid_shape`` and
  ``test_label_smoothing_with_axis``: commit f4d0e5d83bcd4282c0c7aeb0ba7cc15baea5a99f
  ("Fix categorical_crossentropy label smoothing for custom axis", #23437).  Note that
  keras 3.15.1 itself still smooths with ``y_true.shape[-1]`` and warns on
  ``y_pred.shape[-1] == 1``; these tests state the class-axis behaviour Keras has since.
* ``SparseCategoricalCrossentropyTest.test_config``: the 3.15.1 body plus the
  ``from_logits``/``ignore_class``/``axis`` config checks of commit
  c1a707e2707e134bb0c8b0740929e5a2a8a0e458 (#23286).

Mapping: ``keras.losses.X`` -> ``xentfast.X`` (same constructor arguments), inputs are
the same NumPy arrays; Keras' TestCase assertions are in ``_keras_mapping.py``
(``assertAllClose``: atol=rtol=1e-6; ``assertAlmostEqual``: decimal=3).  Upstream's
inputs, expected values and tolerances are unchanged.

Left out, and why:

* ``run_class_serialization_test``'s second half (``serialize_keras_object`` /
  ``deserialize_keras_object``): Keras' object registry, not loss semantics; the
  ``get_config``/``from_config`` round trip is ported.
* ``test_binary_segmentation_different_axis`` and
  ``test_multi_class_segmentation_different_axis`` branch on the Keras backend: the
  TensorFlow and JAX branches expect Keras' refusal of ``axis != -1`` (a limitation of
  those backends' ops), the torch branch computes the loss on the class axis.  xentfast
  takes any axis (README Semantics, "layout": any rank, any ``axis``), so the torch
  branch, which holds the value assertions, is ported.
* ``test_squeezes_singleton_class_dim_on_user_axis`` is torch-only upstream (the
  channels-first axis); it runs here unconditionally for the same reason.  Its upstream
  inputs are unseeded ``np.random`` draws; here the same distributions, seeded.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import xentfast as xf
from _keras_mapping import (
    assert_all_close,
    assert_almost_equal,
    assert_dtype,
    run_class_serialization_test,
)


class CategoricalCrossentropyTest:
    __test__ = True  # upstream's class name; collected although it does not start with Test

    def test_config(self):
        run_class_serialization_test(xf.CategoricalCrossentropy(name="cce", axis=-1))

    def test_all_correct_unweighted(self):
        y_true = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype="int64")
        y_pred = np.array(
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            dtype="float32",
        )
        cce_obj = xf.CategoricalCrossentropy()
        loss = cce_obj(y_true, y_pred)
        assert_almost_equal(loss, 0.0)

        # Test with logits.
        logits = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
        cce_obj = xf.CategoricalCrossentropy(from_logits=True)
        loss = cce_obj(y_true, logits)
        assert_almost_equal(loss, 0.0)

    def test_unweighted(self):
        cce_obj = xf.CategoricalCrossentropy()
        y_true = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
        y_pred = np.array(
            [[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]],
            dtype="float32",
        )
        loss = cce_obj(y_true, y_pred)
        assert_almost_equal(loss, 0.3239)

        # Test with logits.
        logits = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
        cce_obj = xf.CategoricalCrossentropy(from_logits=True)
        loss = cce_obj(y_true, logits)
        assert_almost_equal(loss, 0.0573)

    def test_scalar_weighted(self):
        cce_obj = xf.CategoricalCrossentropy()
        y_true = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
        y_pred = np.array(
            [[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]],
            dtype="float32",
        )
        loss = cce_obj(y_true, y_pred, sample_weight=2.3)
        assert_almost_equal(loss, 0.7449)

        # Test with logits.
        logits = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
        cce_obj = xf.CategoricalCrossentropy(from_logits=True)
        loss = cce_obj(y_true, logits, sample_weight=2.3)
        assert_almost_equal(loss, 0.1317)

    def test_warning_for_invalid_shape(self):
        # Upstream after 3.15.1: commit f4d0e5d83bcd4282c0c7aeb0ba7cc15baea5a99f.
        # 2D case: should warn
        y_true = np.array([[1], [1]], dtype="float32")
        y_pred = np.array([[0.5], [0.5]], dtype="float32")
        with pytest.warns(
            SyntaxWarning,
            match=r"expected y_pred.shape to be \(batch_size, num_classes\)",
        ):
            xf.categorical_crossentropy(y_true, y_pred)

        # 3D case: axis=1, classes=1, should warn
        y_true = np.ones((2, 1, 4), dtype="float32")
        y_pred = np.ones((2, 1, 4), dtype="float32")
        with pytest.warns(
            SyntaxWarning,
            match=r"expected y_pred.shape to be \(batch_size, num_classes\)",
        ):
            xf.categorical_crossentropy(y_true, y_pred, axis=1)

        # 3D case: axis=1, classes=4, should NOT warn
        y_true = np.ones((2, 4, 1), dtype="float32")
        y_pred = np.ones((2, 4, 1), dtype="float32")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            xf.categorical_crossentropy(y_true, y_pred, axis=1)
            # Check if any SyntaxWarning was issued
            syntax_warnings = [
                warn for warn in w if issubclass(warn.category, SyntaxWarning)
            ]
            assert len(syntax_warnings) == 0

    def test_sample_weighted(self):
        cce_obj = xf.CategoricalCrossentropy()
        y_true = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
        y_pred = np.array(
            [[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]],
            dtype="float32",
        )
        sample_weight = np.array([[1.2], [3.4], [5.6]]).reshape((3, 1))
        loss = cce_obj(y_true, y_pred, sample_weight=sample_weight)
        assert_almost_equal(loss, 1.0696)

        # Test with logits.
        logits = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
        cce_obj = xf.CategoricalCrossentropy(from_logits=True)
        loss = cce_obj(y_true, logits, sample_weight=sample_weight)
        assert_almost_equal(loss, 0.31829)

    def test_no_reduction(self):
        y_true = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
        logits = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
        cce_obj = xf.CategoricalCrossentropy(from_logits=True, reduction=None)
        loss = cce_obj(y_true, logits)
        assert_all_close(loss, (0.001822, 0.000459, 0.169846))

    def test_label_smoothing(self):
        logits = np.array([[100.0, -100.0, -100.0]])
        y_true = np.array([[1, 0, 0]])
        label_smoothing = 0.1
        cce_obj = xf.CategoricalCrossentropy(
            from_logits=True, label_smoothing=label_smoothing
        )
        loss = cce_obj(y_true, logits)
        expected_value = 400.0 * label_smoothing / 3.0
        assert_almost_equal(loss, expected_value)

    def test_label_smoothing_ndarray(self):
        logits = np.asarray([[100.0, -100.0, -100.0]])
        y_true = np.asarray([[1, 0, 0]])
        label_smoothing = 0.1
        cce_obj = xf.CategoricalCrossentropy(
            from_logits=True, label_smoothing=label_smoothing
        )
        loss = cce_obj(y_true, logits)
        expected_value = 400.0 * label_smoothing / 3.0
        assert_almost_equal(loss, expected_value)

    def test_label_smoothing_with_axis(self):
        # Upstream after 3.15.1: commit f4d0e5d83bcd4282c0c7aeb0ba7cc15baea5a99f.
        # (batch, classes, spatial)
        num_classes = 3
        y_true = np.array(
            [[[1, 0], [0, 1], [0, 0]], [[0, 1], [1, 0], [0, 0]]],
            dtype="float32",
        )
        y_pred = np.array(
            [
                [[0.8, 0.1], [0.1, 0.8], [0.1, 0.1]],
                [[0.1, 0.8], [0.8, 0.1], [0.1, 0.1]],
            ],
            dtype="float32",
        )
        label_smoothing = 0.1
        axis = 1
        cce_obj = xf.CategoricalCrossentropy(label_smoothing=label_smoothing, axis=axis)
        loss = cce_obj(y_true, y_pred)

        # Upstream's closed form: smoothed targets over the 3 classes of axis 1.
        y_true_smoothed = y_true * (1.0 - label_smoothing) + (label_smoothing / num_classes)
        expected_loss = -np.sum(y_true_smoothed * np.log(y_pred), axis=axis)
        expected_loss = np.mean(expected_loss)

        assert_almost_equal(loss, expected_loss, decimal=5)

    def test_shape_mismatch(self):
        y_true = np.array([[0], [1], [2]])
        y_pred = np.array([[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]])

        cce_obj = xf.CategoricalCrossentropy()
        with pytest.raises(ValueError, match="must have the same shape"):
            cce_obj(y_true, y_pred)

    def test_dtype_arg(self):
        y_true = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype="int64")
        y_pred = np.array(
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            dtype="float32",
        )
        cce_obj = xf.CategoricalCrossentropy(dtype="bfloat16")
        loss = cce_obj(y_true, y_pred)
        assert_dtype(loss, "bfloat16")


class SparseCategoricalCrossentropyTest:
    __test__ = True  # upstream's class name; collected although it does not start with Test

    def test_config(self):
        run_class_serialization_test(xf.SparseCategoricalCrossentropy(name="scce"))
        # Upstream after 3.15.1: commit c1a707e2707e134bb0c8b0740929e5a2a8a0e458.
        scce_obj = xf.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=3, axis=0, name="scce"
        )
        config = scce_obj.get_config()
        assert config["from_logits"] == True  # noqa: E712 (assertEqual(x, True))
        assert config["ignore_class"] == 3
        assert config["axis"] == 0
        run_class_serialization_test(scce_obj)

    def test_all_correct_unweighted(self):
        y_true = np.array([[0], [1], [2]], dtype="int64")
        y_pred = np.array(
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            dtype="float32",
        )
        cce_obj = xf.SparseCategoricalCrossentropy()
        loss = cce_obj(y_true, y_pred)
        assert_almost_equal(loss, 0.0, 3)

        # Test with logits.
        logits = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
        cce_obj = xf.SparseCategoricalCrossentropy(from_logits=True)
        loss = cce_obj(y_true, logits)
        assert_almost_equal(loss, 0.0, 3)

    def test_unweighted(self):
        cce_obj = xf.SparseCategoricalCrossentropy()
        y_true = np.array([0, 1, 2])
        y_pred = np.array(
            [[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]],
            dtype="float32",
        )
        loss = cce_obj(y_true, y_pred)
        assert_almost_equal(loss, 0.3239, 3)

        # Test with logits.
        logits = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
        cce_obj = xf.SparseCategoricalCrossentropy(from_logits=True)
        loss = cce_obj(y_true, logits)
        assert_almost_equal(loss, 0.0573, 3)

    def test_scalar_weighted(self):
        cce_obj = xf.SparseCategoricalCrossentropy()
        y_true = np.array([[0], [1], [2]])
        y_pred = np.array(
            [[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]],
            dtype="float32",
        )
        loss = cce_obj(y_true, y_pred, sample_weight=2.3)
        assert_almost_equal(loss, 0.7449, 3)

        # Test with logits.
        logits = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
        cce_obj = xf.SparseCategoricalCrossentropy(from_logits=True)
        loss = cce_obj(y_true, logits, sample_weight=2.3)
        assert_almost_equal(loss, 0.1317, 3)

    def test_sample_weighted(self):
        cce_obj = xf.SparseCategoricalCrossentropy()
        y_true = np.array([[0], [1], [2]])
        y_pred = np.array(
            [[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]],
            dtype="float32",
        )
        sample_weight = np.array([[1.2], [3.4], [5.6]]).reshape((3, 1))
        loss = cce_obj(y_true, y_pred, sample_weight=sample_weight)
        assert_almost_equal(loss, 1.0696, 3)

        # Test with logits.
        logits = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
        cce_obj = xf.SparseCategoricalCrossentropy(from_logits=True)
        loss = cce_obj(y_true, logits, sample_weight=sample_weight)
        assert_almost_equal(loss, 0.31829, 3)

    def test_no_reduction(self):
        y_true = np.array([[0], [1], [2]])
        logits = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
        cce_obj = xf.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        loss = cce_obj(y_true, logits)
        assert_all_close(loss, (0.001822, 0.000459, 0.169846))

    def test_ignore_class(self):
        y_true = np.array([[-1, 2]])
        logits = np.array([[[0.854, 0.698, 0.598], [0.088, 0.86, 0.018]]])
        cce_obj = xf.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=-1, reduction=None
        )
        loss = cce_obj(y_true, logits)
        assert_all_close(loss, [[0.0, 1.480129]])

        y_true = np.array([[[-1], [2]]])
        logits = np.array([[[0.854, 0.698, 0.598], [0.088, 0.86, 0.018]]])
        cce_obj = xf.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=-1, reduction=None
        )
        loss = cce_obj(y_true, logits)
        assert_all_close(loss, [[0.0, 1.480129]])

    def test_binary_segmentation(self):
        y_true = np.array([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
        y_pred = np.array(
            [
                [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
                [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
                [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
                [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]],
            ]
        )
        output = xf.SparseCategoricalCrossentropy()(y_true, y_pred)
        assert_all_close(output, 0.0)

        y_true = np.array([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
        y_pred = np.array(
            [
                [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.2, 0.8]],
                [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
                [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
                [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.4]],
            ]
        )
        expected = np.array([-np.log(0.2), -np.log(0.4)])
        output = xf.SparseCategoricalCrossentropy()(y_true, y_pred)
        assert_all_close(output, expected.sum() / 16.0)  # 16 pixels

    def test_binary_segmentation_different_axis(self):
        # Upstream's torch branch (see the module docstring).
        y_true = np.array([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
        y_pred = np.array(
            [
                [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
                [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
                [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
                [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]],
            ]
        )
        y_pred_reshaped = np.moveaxis(y_pred, source=2, destination=0)
        output = xf.SparseCategoricalCrossentropy(axis=0)(y_true, y_pred_reshaped)
        assert_all_close(output, 0.0)

        y_true = np.array([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
        y_pred = np.array(
            [
                [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.2, 0.8]],
                [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
                [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
                [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.4]],
            ]
        )
        y_pred_reshaped = np.moveaxis(y_pred, source=2, destination=0)
        expected = np.array([-np.log(0.2), -np.log(0.4)])
        output = xf.SparseCategoricalCrossentropy(axis=0)(y_true, y_pred_reshaped)
        assert_all_close(output, expected.sum() / 16.0)

        y_true = np.array([y_true, y_true, y_true])
        y_pred_reshaped = np.array([y_pred_reshaped, y_pred_reshaped, y_pred_reshaped])
        output = xf.SparseCategoricalCrossentropy(axis=1)(y_true, y_pred_reshaped)
        assert_all_close(output, expected.sum() / 16.0)

    def test_squeezes_singleton_class_dim_on_user_axis(self):
        # Upstream: np.random.randint / np.random.random, unseeded; the same draws seeded.
        rng = np.random.RandomState(0)
        y_true = rng.randint(0, 2, size=(2, 1, 4, 4)).astype("float32")
        y_pred = rng.random_sample((2, 2, 4, 4)).astype("float32")
        loss = xf.sparse_categorical_crossentropy(y_true, y_pred, axis=1)
        assert loss.shape == (2, 4, 4)

    def test_multi_class_segmentation(self):
        y_true = np.array([[0, 1, 2, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
        y_pred = np.array(
            [
                [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
                [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
                [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
                [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            ]
        )
        output = xf.SparseCategoricalCrossentropy()(y_true, y_pred)
        assert_all_close(output, 0.0)

        y_true = np.array([[0, 1, 2, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
        y_pred = np.array(
            [
                [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.0, 0.8]],
                [[0.7, 0.3, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
                [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
                [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]],
            ]
        )
        expected = np.array([-np.log(0.2), -np.log(0.3), -np.log(0.5)])
        output = xf.SparseCategoricalCrossentropy()(y_true, y_pred)
        assert_all_close(output, expected.sum() / 16.0)  # 16 pixels

    def test_multi_class_segmentation_different_axis(self):
        # Upstream's torch branch (see the module docstring).
        y_true = np.array([[0, 1, 2, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
        y_pred = np.array(
            [
                [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
                [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
                [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
                [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            ]
        )
        y_pred_reshaped = np.moveaxis(y_pred, source=2, destination=0)
        output = xf.SparseCategoricalCrossentropy(axis=0)(y_true, y_pred_reshaped)
        assert_all_close(output, 0.0)

        y_true = np.array([[0, 1, 2, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
        y_pred = np.array(
            [
                [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.0, 0.8]],
                [[0.7, 0.3, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
                [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
                [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]],
            ]
        )
        expected = np.array([-np.log(0.2), -np.log(0.3), -np.log(0.5)])
        y_pred_reshaped = np.moveaxis(y_pred, source=2, destination=0)
        output = xf.SparseCategoricalCrossentropy(axis=0)(y_true, y_pred_reshaped)
        assert_all_close(output, expected.sum() / 16.0)
        y_true = np.array([y_true, y_true, y_true])
        y_pred_reshaped = np.array([y_pred_reshaped, y_pred_reshaped, y_pred_reshaped])
        output = xf.SparseCategoricalCrossentropy(axis=1)(y_true, y_pred_reshaped)
        assert_all_close(output, expected.sum() / 16.0)

    def test_dtype_arg(self):
        y_true = np.array([[0], [1], [2]], dtype="int64")
        y_pred = np.array(
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            dtype="float32",
        )
        cce_obj = xf.SparseCategoricalCrossentropy(dtype="bfloat16")
        loss = cce_obj(y_true, y_pred)
        assert_dtype(loss, "bfloat16")
