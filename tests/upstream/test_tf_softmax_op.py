"""TensorFlow's own tests of softmax and log_softmax, run against xentfast.

Upstream: https://github.com/tensorflow/tensorflow

* tensorflow/python/kernel_tests/nn_ops/softmax_op_test.py at commit
  aef1f667689b4483611892df195b69d0d100668b: class ``SoftmaxTest`` (here
  ``SoftmaxOpTest``, to tell it from nn_test.py's class of the same name).  The store's
  later version (commit 0560bfc66c7a8a655253df4d2408ae4c9a15a3ff) adds
  ``testBfloat16GPU`` and ``testSoftmaxDoubleGradientPreservesSmallComponent``; the
  latter post-dates 2.21 (TensorFlow 2.21.0 fails it) and differentiates softmax, which
  xentfast does not; neither is ported.
* tensorflow/python/ops/nn_test.py at commit c8aa04ec02170ad637aa77a768d86b15b4808bc5
  (the classes are the same in the store's commit
  00205209cfc1e60c20bbbeee60a68d0672ac4213): classes ``SoftmaxTest`` and
  ``LogSoftmaxTest`` (here ``NnSoftmaxTest`` and ``NnLogSoftmaxTest``).  nn_test.py has
  no softmax cross-entropy class; its ``testSampledSoftmaxLoss`` tests candidate
  sampling (``sampled_softmax_loss``), which xentfast does not provide.

Mapping (``_tf_mapping.py``): ``nn_ops.softmax``/``softmax_v2`` -> ``xentfast.softmax``,
``log_softmax``/``log_softmax_v2`` -> ``xentfast.log_softmax``, ``math_ops.cast`` ->
``ndarray.astype``; ``InvalidArgumentError`` for a bad axis -> ``ValueError``; Python
values converted as TensorFlow converts them (floats to float32).  Upstream's inputs,
NumPy references (``_npSoftmax``, ``_softmax``, ``_log_softmax``), expected values and
tolerances are unchanged; its unseeded ``np.random`` draws are seeded here, same
distributions.

Left out, and why:

* ``SoftmaxTest.testGradient`` and ``LogSoftmaxTest.testGradient`` (nn_test.py): the
  gradient of softmax and log_softmax, which xentfast does not compute.
* ``use_gpu``: device placement; every case runs on each host
  backend.  ``testFloatGPU``, ``testHalfGPU`` and ``testDoubleGPU`` run upstream only on
  a CUDA build with a GPU; their random shapes are ported and run on each host backend,
  since xentfast's kernels are the same whatever the device.
* ``testLargeDims`` compares the same call twice upstream (``use_gpu`` True and False);
  here once per backend.
"""

from __future__ import annotations

import numpy as np

import xentfast as xf
from _tf_mapping import (
    BFLOAT16,
    assert_all_close,
    assert_all_close_according_to_type,
    assert_all_equal,
    assert_shape_equal,
    convert_to_tensor,
    raises_saying,
)

_THREE_D = [[[1., 1., 1., 1.], [1., 2., 3., 4.]],
            [[2., 3., 4., 5.], [6., 7., 8., 9.]],
            [[5., 4., 3., 2.], [1., 2., 3., 4.]]]


# ------------------------------------------------ softmax_op_test.SoftmaxTest machinery


def _npSoftmax(features, dim=-1, log=False):
    if dim == -1:
        dim = len(features.shape) - 1
    one_only_on_dim = list(features.shape)
    one_only_on_dim[dim] = 1
    is_fp16 = features.dtype == np.float16
    if is_fp16:
        # Do the compute in fp32 and cast the input back to fp32.
        features = features.astype(np.float32)
    e = np.exp(features - np.reshape(
        np.amax(
            features, axis=dim), one_only_on_dim))
    softmax = e / np.reshape(np.sum(e, axis=dim), one_only_on_dim)
    if log:
        res = np.log(softmax)
    else:
        res = softmax
    if is_fp16:
        res = res.astype(np.float16)
    return res


def _testSoftmax(np_features, dim=-1, log=False, dtype=None, use_gpu=False):
    # use_gpu: device placement upstream; the host backend under test runs it here.
    np_softmax = _npSoftmax(np_features, dim=dim, log=log)
    if dtype is not None:
        np_features = np_features.astype(dtype)

    if log:
        tf_softmax = xf.log_softmax(np_features, axis=dim)
    else:
        tf_softmax = xf.softmax(np_features, axis=dim)
    out = tf_softmax
    assert_all_close_according_to_type(np_softmax, out)
    assert_shape_equal(np_softmax, tf_softmax)
    if not log and dtype is None:
        # Bonus check: the softmaxes should add to one in dimension dim.
        sum_along_dim = np.sum(out, axis=dim)
        assert_all_close_according_to_type(
            np.ones(sum_along_dim.shape), sum_along_dim)


def _testAll(features, dtype=None):
    _testSoftmax(features, dtype=dtype, use_gpu=True)
    _testSoftmax(features, dtype=dtype, log=True, use_gpu=True)
    _testOverflow(use_gpu=True)


def _testOverflow(use_gpu=False):
    if use_gpu:
        type = np.float32  # noqa: A001 - upstream's name
    else:
        type = np.float64  # noqa: A001 - upstream's name
    max = np.finfo(type).max  # noqa: A001 - upstream's name
    features = np.array([[1., 1., 1., 1.], [max, 1., 2., 3.]]).astype(type)
    tf_log_softmax = xf.log_softmax(features)
    out = tf_log_softmax
    assert_all_close(
        np.array([[-1.386294, -1.386294, -1.386294, -1.386294],
                  [0, -max, -max, -max]]),
        out,
        rtol=1.e-5,
        atol=1.e-5)


def _gpu_shapes(rng):
    rows = [2**x + int(rng.integers(0, 16)) for x in range(1, 4)]
    cols = [2**x + int(rng.integers(0, 16)) for x in range(1, 4)]
    return zip(rows, cols)


class SoftmaxOpTest:
    """softmax_op_test.py's ``SoftmaxTest``."""

    __test__ = True  # upstream's class, renamed; collected although it does not start with Test

    def testNpSoftmax(self):
        # Checks upstream's NumPy reference, which the other tests compare against.
        features = [[1., 1., 1., 1.], [1., 2., 3., 4.]]
        # Batch 0: All exps are 1.  The expected result is
        # Softmaxes = [0.25, 0.25, 0.25, 0.25]
        # LogSoftmaxes = [-1.386294, -1.386294, -1.386294, -1.386294]
        #
        # Batch 1:
        # exps = [1., 2.718, 7.389, 20.085]
        # sum = 31.192
        # Softmaxes = exps / sum = [0.0320586, 0.08714432, 0.23688282, 0.64391426]
        # LogSoftmaxes = [-3.44019 , -2.44019 , -1.44019 , -0.44019]
        np_sm = _npSoftmax(np.array(features))
        assert_all_close(
            np.array([[0.25, 0.25, 0.25, 0.25],
                      [0.0320586, 0.08714432, 0.23688282, 0.64391426]]),
            np_sm,
            rtol=1.e-5,
            atol=1.e-5)
        np_lsm = _npSoftmax(np.array(features), log=True)
        assert_all_close(
            np.array([[-1.386294, -1.386294, -1.386294, -1.386294],
                      [-3.4401897, -2.4401897, -1.4401897, -0.4401897]]),
            np_lsm,
            rtol=1.e-5,
            atol=1.e-5)

    def testFloat(self):
        _testAll(
            np.array([[1., 1., 1., 1.], [1., 2., 3., 4.]]).astype(np.float32))

    def testFloatGPU(self):
        rng = np.random.default_rng(21)
        for row, col in _gpu_shapes(rng):
            data = rng.random((row, col))
            _testAll(data.astype(np.float32))

    def testHalf(self):
        _testAll(
            np.array([[1., 1., 1., 1.], [1., 2., 3., 4.]]).astype(np.float16))

    def testHalfGPU(self):
        rng = np.random.default_rng(22)
        for row, col in _gpu_shapes(rng):
            data = rng.random((row, col))
            _testAll(data.astype(np.float16))

    def testDouble(self):
        _testSoftmax(
            np.array([[1., 1., 1., 1.], [1., 2., 3., 4.]]).astype(np.float64))
        _testOverflow()

    def testDoubleGPU(self):
        rng = np.random.default_rng(23)
        for row, col in _gpu_shapes(rng):
            data = rng.random((row, col))
            _testAll(data.astype(np.float64))

    def testBfloat16(self):
        _testAll(
            np.array([[1., 1., 1., 1.], [1., 2., 3., 4.]]).astype(np.float32),
            dtype=BFLOAT16)

    def test1DTensorAsInput(self):
        _testSoftmax(
            np.array([3., 2., 3., 9.]).astype(np.float64), use_gpu=False)
        _testOverflow(use_gpu=False)

    def test1DTensorAsInputNoReshape(self):
        _testSoftmax(
            np.array([3., 2., 3., 9.]).astype(np.float64), use_gpu=False)
        _testOverflow(use_gpu=False)

    def test3DTensorAsInput(self):
        _testSoftmax(np.array(_THREE_D).astype(np.float32), use_gpu=False)
        _testOverflow(use_gpu=False)

    def test3DTensorAsInputNoReshape(self):
        _testSoftmax(np.array(_THREE_D).astype(np.float32), use_gpu=False)
        _testOverflow(use_gpu=False)

    def testAlongFirstDimension(self):
        _testSoftmax(np.array(_THREE_D).astype(np.float32), dim=0, use_gpu=False)
        _testOverflow(use_gpu=False)

    def testAlongSecondDimension(self):
        _testSoftmax(np.array(_THREE_D).astype(np.float32), dim=1, use_gpu=False)
        _testOverflow(use_gpu=False)

    def testAlongNegativeDimension(self):
        _testSoftmax(np.array(_THREE_D).astype(np.float32), dim=-2, use_gpu=False)
        _testOverflow(use_gpu=False)

    def testShapeInference(self):
        op = xf.softmax(convert_to_tensor(_THREE_D))
        assert [3, 2, 4] == list(op.shape)

    def testEmptyInput(self):
        x = np.ones(shape=[0, 3], dtype=np.float32)
        y = np.zeros(shape=[0, 3], dtype=np.float32)
        assert 0 == x.size
        assert_all_equal(y, xf.softmax(x, axis=0))

    def testDimTooLarge(self):
        # InvalidArgumentError -> ValueError naming the axis.
        with raises_saying(ValueError, "axis 100"):
            xf.softmax(convert_to_tensor([1., 2., 3., 4.]), axis=100)

    def testInvalidAxis(self):
        # Upstream's case for tensorflow/tensorflow#22793.
        ones = np.ones(shape=[2, 3], dtype=np.float32)
        with raises_saying(ValueError, "axis 2"):
            xf.softmax(ones, axis=2)

    def testLargeDims(self):
        # Make sure that we properly handle large inputs (tensorflow/tensorflow#4425).
        rng = np.random.default_rng(24)
        for dims in [129, 256]:
            ones = rng.random((dims, dims)).astype(np.float32)
            np_softmax = _npSoftmax(ones)

            tf_softmax = xf.softmax(ones)
            assert_all_close(tf_softmax, np_softmax)


# ----------------------------------------------------------------------- nn_test.py


class NnSoftmaxTest:
    """nn_test.py's ``SoftmaxTest``."""

    __test__ = True  # upstream's class, renamed; collected although it does not start with Test

    @staticmethod
    def _softmax(x):
        assert len(x.shape) == 2
        m = x.max(1)[:, np.newaxis]
        u = np.exp(x - m)
        z = u.sum(1)[:, np.newaxis]
        return u / z

    def testSoftmax(self):
        x_shape = [5, 10]
        x_np = np.random.default_rng(31).standard_normal(x_shape).astype(np.float32)
        y_np = self._softmax(x_np)
        y_tf = xf.softmax(x_np)
        y_tf_last_dim = xf.softmax(x_np, 1)
        eps = 1e-3
        assert_all_close(y_tf, y_np, eps)
        assert_all_close(y_tf_last_dim, y_np, eps)

    def testSoftmaxAxes(self):
        arr = np.linspace(0., 1, 12).reshape(3, 4)
        x_neg_axis = xf.softmax(arr, axis=-2)
        y_pos_axis = xf.softmax(arr, axis=0)
        z_gt_axis = xf.softmax(arr, axis=0)
        eps = 1e-3
        assert_all_close(x_neg_axis, y_pos_axis, eps)
        assert_all_close(y_pos_axis, z_gt_axis, eps)


class NnLogSoftmaxTest:
    """nn_test.py's ``LogSoftmaxTest``."""

    __test__ = True  # upstream's class, renamed; collected although it does not start with Test

    @staticmethod
    def _log_softmax(x):
        assert len(x.shape) == 2
        m = x.max(1)[:, np.newaxis]
        u = x - m
        return u - np.log(np.sum(np.exp(u), 1, keepdims=True))

    def testLogSoftmax(self):
        x_shape = [5, 10]
        x_np = np.random.default_rng(32).standard_normal(x_shape).astype(np.float32)
        y_np = self._log_softmax(x_np)
        y_tf = xf.log_softmax(x_np)
        eps = 1e-3
        assert_all_close(y_tf, y_np, eps)

    def testLogSoftmaxAxes(self):
        arr = np.linspace(0., 1, 12).reshape(3, 4)
        x_neg_axis = xf.log_softmax(arr, axis=-2)
        y_pos_axis = xf.log_softmax(arr, axis=0)
        z_gt_axis = xf.log_softmax(arr, axis=0)
        eps = 1e-3
        assert_all_close(x_neg_axis, y_pos_axis, eps)
        assert_all_close(y_pos_axis, z_gt_axis, eps)
