"""Every bad input raises the right exception type, with a message that names what was
expected and what was given -- on every backend."""

from __future__ import annotations

import re

import numpy as np
import pytest

import xentfast as xf
from xentfast import _dispatch

X = np.zeros((4, 5), np.float32)
Y = np.array([0, 1, 2, 3])


def ce(backend, logits=X, labels=Y, **kw):
    return xf.cross_entropy(logits, labels, backend=backend, **kw)


def ceg(backend, logits=X, labels=Y, **kw):
    return xf.cross_entropy_with_grad(logits, labels, backend=backend, **kw)


# ----------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool"])
def test_integer_logits(backend, dtype):
    with pytest.raises(TypeError, match=rf"logits must be a floating-point array .*got dtype {dtype}.*astype"):
        ce(backend, X.astype(dtype))


def test_complex_logits(backend):
    with pytest.raises(TypeError, match=r"floating-point .*got dtype complex128.*real"):
        ce(backend, X.astype(np.complex128))


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp"])
def test_integer_input_to_primitives(backend, op):
    with pytest.raises(TypeError, match=r"x must be a floating-point array.*got dtype int64"):
        getattr(xf, op)(np.arange(6).reshape(2, 3), backend=backend)


# ----------------------------------------------------------------------- labels


def test_label_shape_mismatch_names_both_shapes(backend):
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) do not fit logits of shape \(4, 5\)"
                                         r".*integer array of shape \(4,\).*\(4, 5\)"):
        ce(backend, labels=np.array([0, 1, 2]))


def test_dense_label_shape_mismatch(backend):
    with pytest.raises(ValueError, match=r"labels of shape \(4, 4\) do not fit logits of shape \(4, 5\)"):
        ce(backend, labels=np.zeros((4, 4)))


@pytest.mark.parametrize("ignore_index", [0, 3, 10])
def test_probability_labels_reject_a_class_ignore_index(backend, ignore_index):
    """PyTorch: "ignore_index is not supported for floating point target" -- there is no
    class id to compare with; negative values (the default -100 included) are accepted."""
    with pytest.raises(ValueError, match=rf"ignore_index is not supported for probability .*"
                                         rf"got ignore_index={ignore_index}"):
        ce(backend, labels=np.full((4, 5), 0.2), ignore_index=ignore_index)


def test_probability_labels_accept_a_negative_ignore_index(backend):
    labels = np.full((4, 5), 0.2)
    expected = ce(backend, labels=labels)
    np.testing.assert_array_equal(ce(backend, labels=labels, ignore_index=-1), expected)


def test_float_labels_with_batch_shape(backend):
    with pytest.raises(TypeError, match=r"read as class indices.*dtype is float64.*astype\(np.int64\)"):
        ce(backend, labels=Y.astype(np.float64))


def test_int_labels_with_logits_shape(backend):
    with pytest.raises(TypeError, match=r"read as\s+probabilities.*dtype is int64.*astype\(np.float32\)"):
        ce(backend, labels=np.eye(5, dtype=np.int64)[Y])


@pytest.mark.parametrize("onehot", [np.eye(5, dtype=np.int64)[Y], np.eye(5, dtype=np.float32)[Y]],
                         ids=["int", "float"])
def test_one_hot_labels_to_a_sparse_function_say_argmax(backend, onehot):
    """One-hot rows handed to a function that takes class ids: one message that says
    what to do (argmax, or the probability function) -- not advice to cast them to
    float, which the sparse function then rejects in turn."""
    with pytest.raises(ValueError, match=r"logits' shape, but this function takes class "
                                         r"indices.*argmax.*softmax_cross_entropy_with_logits"):
        xf.sparse_softmax_cross_entropy_with_logits(onehot, X, backend=backend)
    with pytest.raises(ValueError, match=r"takes class ids.*argmax.*categorical_crossentropy"):
        xf.SparseCategoricalCrossentropy(from_logits=True, backend=backend)(onehot, X)
    with pytest.raises(ValueError, match=r"takes class ids.*argmax"):
        xf.sparse_categorical_crossentropy(onehot, X, from_logits=True, backend=backend)


def test_labels_that_fit_another_class_axis_name_it(backend):
    """(N, C, d) logits with (N, d) labels: PyTorch's layout, the class axis is 1."""
    x = np.zeros((4, 5, 7), np.float32)
    with pytest.raises(ValueError, match=r"class axis 2.*They fit class axis 1: pass axis=1"):
        ce(backend, x, np.zeros((4, 7), np.int64))
    assert ce(backend, x, np.zeros((4, 7), np.int64), axis=1) == pytest.approx(np.log(5))


@pytest.mark.parametrize("name", ["inplace", "return_lse", "check_labels"])
@pytest.mark.parametrize("value", ["False", 1, None, np.float32(0)])
def test_switches_must_be_bools(backend, name, value):
    """inplace="False" is truthy: it must raise, not overwrite the caller's logits."""
    x = np.ones((4, 5), np.float32)
    with pytest.raises(TypeError, match=rf"{name} must be True or False; got {re.escape(repr(value))}"):
        ceg(backend, x, **{name: value})
    assert np.all(x == 1)


def test_z_loss_that_overflows_the_dtype(backend):
    with pytest.raises(ValueError, match=r"z_loss = 1e\+39 overflows float32.*scale it down"):
        ce(backend, z_loss=1e39)
    assert np.isfinite(ce(backend, X.astype(np.float64), z_loss=1e39))  # fits float64


def test_masked_arrays_are_refused(backend):
    """A mask would be silently ignored: refuse, and say how to apply it."""
    masked = np.ma.masked_array(X, mask=np.eye(4, 5, dtype=bool))
    with pytest.raises(TypeError, match=r"masked arrays are not supported.*filled\(-np.inf\)"):
        ce(backend, masked)
    with pytest.raises(TypeError, match=r"masked arrays are not supported"):
        ce(backend, X, np.ma.masked_array(Y, mask=[0, 1, 0, 0]))


def test_bool_labels(backend):
    with pytest.raises(TypeError, match=r"integer class ids or float probabilities; got dtype bool"):
        ce(backend, labels=np.ones(4, bool))


@pytest.mark.parametrize("bad,where", [(5, "labels[2]"), (-1, "labels[2]"), (-7, "labels[2]"),
                                       (2**40, "labels[2]")])
def test_out_of_range_label_names_value_and_position(backend, bad, where):
    labels = Y.copy()
    labels[2] = bad
    pattern = rf"label value of {bad} at {re.escape(where)} .*\[0, 5\)"
    with pytest.raises(ValueError, match=pattern):
        ce(backend, labels=labels)
    with pytest.raises(ValueError, match=pattern):
        ceg(backend, labels=labels)


def test_out_of_range_label_in_higher_rank(backend):
    x = np.zeros((2, 3, 4), np.float32)
    y = np.zeros((2, 3), np.int64)
    y[1, 2] = 4
    with pytest.raises(ValueError, match=r"label value of 4 at labels\[1, 2\]"):
        ce(backend, x, y)
    x1 = np.zeros((2, 4, 3), np.float32)  # class axis 1: labels (2, 3)
    with pytest.raises(ValueError, match=r"label value of 4 at labels\[1, 2\]"):
        ce(backend, x1, y, axis=1)


def test_out_of_range_single_row(backend):
    with pytest.raises(ValueError, match=r"label value of 9 at labels which is outside"):
        ce(backend, np.zeros(5), np.array(9))


def test_out_of_range_message_mentions_ignore_index(backend):
    with pytest.raises(ValueError, match=r"is not ignore_index=-1"):
        ce(backend, labels=np.array([0, 1, 2, -2]), ignore_index=-1)


def test_huge_unsigned_label_is_not_wrapped(backend):
    """2**64 - 1 must not become -1 (and match ignore_index=-1 silently)."""
    labels = np.array([0, 1, 2, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(ValueError, match=r"label value of 18446744073709551615 at labels\[3\] "
                                         r"which is outside the valid range of \[0, 5\) and "
                                         r"is not ignore_index=-1"):
        ce(backend, labels=labels, ignore_index=-1)


def test_out_of_range_tf_sparse(backend):
    with pytest.raises(ValueError, match=r"label value of 5 at labels\[3\].*\[0, 5\)"):
        xf.sparse_softmax_cross_entropy_with_logits(np.array([0, 1, 2, 5]), X, backend=backend)


def test_out_of_range_keras_sparse(backend):
    with pytest.raises(ValueError, match=r"label value of 7 at labels\[1\].*\[0, 5\)"):
        xf.sparse_categorical_crossentropy(np.array([[0], [7], [1], [1]]), X, from_logits=True,
                                           backend=backend)
    with pytest.raises(ValueError, match=r"label value of 7 at labels\[1\]"):
        xf.SparseCategoricalCrossentropy(from_logits=True, backend=backend)(np.array([0, 7, 1, 1]), X)


# ----------------------------------------------------------------------- options


@pytest.mark.parametrize("weight,shape", [(np.ones(4), r"\(4,\)"), (np.ones((5, 1)), r"\(5, 1\)"),
                                          (np.ones(6), r"\(6,\)")])
def test_wrong_weight_shape(backend, weight, shape):
    with pytest.raises(ValueError, match=rf"weight must be a 1-D array .*shape \(5,\); got shape {shape}"):
        ce(backend, weight=weight)


def test_complex_weight(backend):
    with pytest.raises(TypeError, match=r"weight must be a real numeric array \(integer or floating\); got dtype complex128"):
        ce(backend, weight=np.ones(5, complex))


@pytest.mark.parametrize("reduction", ["avg", "Mean", None, "sum_over_batch_size"])
def test_unknown_reduction(backend, reduction):
    with pytest.raises(ValueError, match=rf"reduction must be one of 'mean', 'sum', 'none'; got {reduction!r}"):
        ce(backend, reduction=reduction)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_label_smoothing_out_of_range(backend, value):
    with pytest.raises(ValueError, match=rf"label_smoothing must lie in \[0, 1\]; got {value}"):
        ce(backend, label_smoothing=value)


@pytest.mark.parametrize("value", ["0.1", True, None])
def test_label_smoothing_wrong_type(backend, value):
    with pytest.raises(TypeError, match=r"label_smoothing must be a real number in \[0, 1\]"):
        ce(backend, label_smoothing=value)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_z_loss(backend, value):
    with pytest.raises(ValueError, match=rf"z_loss must be a finite real number >= 0; got {value}"):
        ce(backend, z_loss=value)
    with pytest.raises(TypeError, match=r"z_loss must be a finite real number"):
        ce(backend, z_loss="0.1")


@pytest.mark.parametrize("value", [1.5, "x", True])
def test_bad_ignore_index(backend, value):
    with pytest.raises(TypeError, match=r"ignore_index must be an integer class id; got"):
        ce(backend, ignore_index=value)


# ----------------------------------------------------------------------- shapes and axes


def test_zero_classes(backend):
    with pytest.raises(ValueError, match=r"logits of shape \(4, 0\) have zero classes along axis 1"):
        ce(backend, np.zeros((4, 0), np.float32), Y)


def test_zero_dimensional_logits(backend):
    with pytest.raises(ValueError, match=r"at least one dimension.*0-d"):
        ce(backend, np.float32(1.0), np.array(0))


@pytest.mark.parametrize("value", [1.5, -np.inf, np.inf, np.nan])
def test_primitives_of_a_scalar(backend, value):
    """A 0-d array is one row of one class (PyTorch, SciPy): softmax 1, log_softmax 0,
    logsumexp the value itself; NaN and +-inf rows give what such a row gives."""
    x = np.float64(value)
    row = np.array([value])
    for op in ("softmax", "log_softmax", "logsumexp"):
        for axis in (None, 0, -1):
            got = getattr(xf, op)(x, axis=axis, backend=backend)
            expected = getattr(xf, op)(row, backend="numpy")
            assert np.shape(got) == ()
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected).reshape(()))
    with pytest.raises(ValueError, match=r"axis 1 is out of bounds for x"):
        xf.softmax(x, axis=1, backend=backend)


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_axis_out_of_bounds(backend, axis):
    with pytest.raises(ValueError, match=rf"axis {axis} is out of bounds for logits with 2 dimension\(s\); "
                                         r"expected an axis in \[-2, 2\)"):
        ce(backend, axis=axis)
    with pytest.raises(ValueError, match=rf"axis {axis} is out of bounds for x"):
        xf.logsumexp(X, axis=axis, backend=backend)


@pytest.mark.parametrize("axis", [1.0, "1", True, (0, 1)])
def test_axis_wrong_type(backend, axis):
    with pytest.raises(TypeError, match=r"axis must be an integer; got"):
        ce(backend, axis=axis)


def test_keras_positional_from_logits_in_axis(backend):
    """(y_true, y_pred, from_logits, label_smoothing, axis): a bool for axis is caught."""
    with pytest.raises(ValueError, match=r"axis must be an integer; got the boolean True"):
        xf.categorical_crossentropy(np.eye(5)[Y], X, True, 0.0, True, backend=backend)


@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("true_shape", [(4,), (4, 1), (1, 5)], ids=str)
def test_keras_categorical_shape_mismatch(backend, from_logits, true_shape):
    """Keras' categorical loss does not broadcast y_true (TensorFlow's function does)."""
    expected = (r"y_true and y_pred must have the same shape .*"
                rf"y_true.shape={re.escape(str(true_shape))}, y_pred.shape=\(4, 5\)")
    with pytest.raises(ValueError, match=expected):
        xf.categorical_crossentropy(np.full(true_shape, 0.2), np.full((4, 5), 0.2),
                                    from_logits=from_logits, backend=backend)


# ----------------------------------------------------------------------- out= and inplace


@pytest.mark.parametrize("out,error,message", [
    (np.empty((4, 4), np.float32), ValueError,
     r"out must have the logits' shape \(4, 5\); got shape \(4, 4\)"),
    (np.empty((5, 4), np.float32), ValueError,
     r"out must have the logits' shape \(4, 5\); got shape \(5, 4\)"),
    (np.empty((4, 5), np.float64), TypeError,
     r"out must have the logits' dtype float32; got float64. Pass np.empty_like"),
    (np.empty((4, 5), ">f4"), TypeError,
     r"out must be float32 in native byte order; got byte-swapped >f4"),
    ([[0.0] * 5] * 4, TypeError, r"out must be an array .*; got list"),
], ids=["shape", "transposed_shape", "dtype", "byteswapped", "list"])
def test_out_wrong_shape_dtype_or_kind(backend, out, error, message):
    """Shapes are ValueError, dtypes TypeError (README), each saying how to fix it."""
    with pytest.raises(error, match=message):
        ceg(backend, out=out)


def test_out_read_only(backend):
    out = np.empty((4, 5), np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match=r"out is read-only"):
        ceg(backend, out=out)


def test_out_and_inplace_together(backend):
    with pytest.raises(ValueError, match=r"either out= or inplace=True, not both"):
        ceg(backend, X.copy(), out=np.empty((4, 5), np.float32), inplace=True)


def test_inplace_read_only(backend):
    x = X.copy()
    x.setflags(write=False)
    with pytest.raises(ValueError, match=r"inplace=True .*the logits are read-only. Pass a writeable"):
        ceg(backend, x, inplace=True)
    assert np.all(x == 0)


def test_inplace_list(backend):
    with pytest.raises(ValueError, match=r"inplace=True .*logits must be an array; got list"):
        ceg(backend, X.tolist(), inplace=True)


def test_inplace_on_a_writeable_ndarray_subclass(backend, tmp_path, rng):
    """np.memmap (an ndarray subclass) is overwritten in place like any array."""
    x = rng.standard_normal((4, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    expected = xf.cross_entropy_with_grad(x, labels, backend=backend)
    m = np.memmap(tmp_path / "logits.bin", np.float32, "w+", shape=(4, 5))
    m[:] = x
    loss, grad = xf.cross_entropy_with_grad(m, labels, backend=backend, inplace=True)
    assert np.shares_memory(grad, m)
    np.testing.assert_array_equal(np.asarray(m), expected[1])
    assert loss == expected[0]


def test_failed_call_leaves_out_and_logits_untouched(backend):
    """A validation error is raised before anything is written."""
    x = np.ones((4, 5), np.float32)
    out = np.full((4, 5), 3.0, np.float32)
    with pytest.raises(ValueError):
        ceg(backend, x, np.array([0, 1, 2, 9]), out=out)
    with pytest.raises(ValueError):
        ceg(backend, x, np.array([0, 1, 2, 9]), inplace=True)
    assert np.all(out == 3.0) and np.all(x == 1.0)


# ----------------------------------------------------------------------- backends


@pytest.mark.parametrize("call", [
    lambda: xf.cross_entropy(X, Y, backend="gpu"),
    lambda: xf.softmax(X, backend="gpu"),
    lambda: xf.set_backend("gpu"),
    lambda: xf.use_backend("gpu").__enter__(),
], ids=["cross_entropy", "softmax", "set_backend", "use_backend"])
def test_unknown_backend_lists_known_names(call):
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'; expected one of 'cuda', 'cython', 'cpu', 'numpy'"):
        call()


def test_unavailable_backend_raises_with_reason(monkeypatch):
    """Made unavailable on purpose, so this runs wherever the suite runs."""
    monkeypatch.setitem(_dispatch._reasons, "cython", "the test said so")
    monkeypatch.delitem(_dispatch._modules, "cython", raising=False)
    for call in (lambda: xf.cross_entropy(X, Y, backend="cython"),
                 lambda: xf.set_backend("cython"),
                 lambda: xf.use_backend("cython").__enter__()):
        with pytest.raises(xf.BackendUnavailableError, match=r"backend 'cython' is unavailable: the test said so") as info:
            call()
        assert isinstance(info.value, RuntimeError)
        assert "Available here:" in str(info.value)
    assert "cython" not in xf.available_backends()


def test_really_unavailable_backends_raise():
    """Whatever is unavailable on this machine says why (nothing to check if all are)."""
    unavailable = [b for b in _dispatch.KNOWN_BACKENDS if b not in xf.available_backends()]
    for name in unavailable:
        with pytest.raises(xf.BackendUnavailableError, match=rf"backend '{name}' is unavailable: \S"):
            xf.cross_entropy(X, Y, backend=name)


class FakeDeviceArray:
    """Just enough of a CUDA array to be recognised as one (never touched)."""

    shape = (4, 5)
    dtype = np.dtype(np.float32)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<f4", "data": (0, False), "version": 3}


@pytest.mark.parametrize("host", ["cpu", "numpy", "cython"])
def test_device_array_on_a_host_backend(host):
    with pytest.raises(ValueError, match=rf"backend='{host}' runs on the host, but the input is a CUDA "
                                         r"device array; use backend='cuda'"):
        xf.cross_entropy(FakeDeviceArray(), Y, backend=host)
    with pytest.raises(ValueError, match=r"runs on the host, but the input is a CUDA device array"):
        xf.softmax(FakeDeviceArray(), backend=host)


def test_check_labels_false_still_checks_on_the_host(backend):
    """check_labels=False only skips the GPU read-back; host backends always check
    (their kernels index memory with the labels).  On CUDA the bad row is NaN."""
    labels = np.array([0, 1, 7, 3])
    if backend == "cuda":
        loss = ce(backend, labels=labels, reduction="none", check_labels=False)
        assert np.isnan(loss[2]) and np.all(np.isfinite(loss[[0, 1, 3]]))
    else:
        with pytest.raises(ValueError, match=r"label value of 7 at labels\[2\]"):
            ce(backend, labels=labels, check_labels=False)


@pytest.mark.parametrize("make", ["requires_grad", "bfloat16"])
def test_torch_tensors_numpy_cannot_read_point_to_the_torch_adapter(backend, make):
    torch = pytest.importorskip("torch")
    t = torch.zeros(4, 5, requires_grad=True) if make == "requires_grad" else \
        torch.zeros(4, 5, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"cannot read the torch tensor.*xentfast.torch.cross_entropy"):
        ce(backend, t)
