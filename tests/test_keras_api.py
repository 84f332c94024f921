"""Keras-style API: keras.losses function and loss-object semantics, against the naive
float64 formulas of tests/naive.py (parity with Keras itself is in test_peers.py)."""

from __future__ import annotations

import numpy as np
import pytest

import naive
import xentfast as xf
from helpers import DTYPES, assert_close, make_probabilities, rtol_for

FLOAT_DTYPES = [d for d in DTYPES if d.name in ("float16", "float32", "float64")]
KERAS_REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None]


def _probabilities(rng, shape, dtype, axis=-1):
    """Unnormalised predictions with a 0 and a 1 (both get clipped) per batch."""
    p = rng.random(shape) + 0.05
    flat = np.moveaxis(p, axis, -1).reshape(-1, shape[axis])
    flat[0, 0] = 0.0
    if flat.shape[0] > 1:
        flat[1, :] = 0.0
        flat[1, -1] = 1.0
    return np.moveaxis(flat.reshape(np.moveaxis(p, axis, -1).shape), -1, axis).astype(dtype)


def _loose(dtype):
    # The probability path clips at 1e-7 and takes logs: float16 cannot hold 1e-7, so
    # compare 16-bit results at their own precision; log(1e-7) ~ -16 sets the scale.
    return dict(rtol=rtol_for(dtype), atol=rtol_for(dtype) * 20)


# ----------------------------------------------------------------------- functions


@pytest.mark.sim_sample(0.5)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2], ids=["no_smoothing", "smoothing"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
def test_categorical_crossentropy(backend, dtype, from_logits, label_smoothing, rng):
    shape = (6, 5)
    y_pred = (rng.standard_normal(shape) * 3).astype(dtype) if from_logits else _probabilities(rng, shape, dtype)
    y_true = make_probabilities(rng, shape, -1, np.float64, one_hot=True).astype(np.int64)
    got = xf.categorical_crossentropy(y_true, y_pred, from_logits=from_logits,
                                      label_smoothing=label_smoothing, backend=backend)
    expected = naive.keras_categorical(y_true, y_pred, from_logits=from_logits,
                                       label_smoothing=label_smoothing)
    assert got.dtype == dtype and got.shape == (6,)
    assert_close(got, expected, what="loss", **_loose(dtype))


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_categorical_smoothing_spreads_over_the_class_axis(backend, from_logits, rng):
    """label_smoothing mixes in 1/C with C the class axis' size, not the last axis'
    (Keras 3.15 used the last axis; fixed upstream since)."""
    shape = (2, 4, 3)  # classes on axis 1 (4 of them); the last axis has 3
    y_pred = rng.standard_normal(shape) if from_logits else _probabilities(rng, shape, np.float64, axis=1)
    y_true = make_probabilities(rng, shape, 1, np.float64)
    got = xf.categorical_crossentropy(y_true, y_pred, from_logits=from_logits,
                                      label_smoothing=0.3, axis=1, backend=backend)
    smoothed = 0.7 * y_true + 0.3 / 4
    expected = naive.keras_categorical(smoothed, y_pred, from_logits=from_logits, axis=1)
    last_axis = naive.keras_categorical(0.7 * y_true + 0.3 / 3, y_pred, from_logits=from_logits,
                                        axis=1)
    assert got.shape == (2, 3)
    assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not np.allclose(expected, last_axis)  # the case really tells the two apart


@pytest.mark.sim_sample(0.3)
@pytest.mark.parametrize("ignore_class", [None, -1, 0], ids=["no_ignore", "ignore_-1", "ignore_0"])
@pytest.mark.parametrize("label_form", ["int", "float", "trailing_1"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
def test_sparse_categorical_crossentropy(backend, dtype, from_logits, label_form, ignore_class, rng):
    shape = (8, 5)
    y_pred = (rng.standard_normal(shape) * 3).astype(dtype) if from_logits else _probabilities(rng, shape, dtype)
    y_true = rng.integers(0, 5, size=8)
    if ignore_class is not None:
        y_true[::3] = ignore_class
    if label_form == "float":
        y_true = y_true.astype(np.float32)  # Keras accepts float ids and casts to int
    elif label_form == "trailing_1":
        y_true = y_true[:, None]
    got = xf.sparse_categorical_crossentropy(y_true, y_pred, from_logits=from_logits,
                                             ignore_class=ignore_class, backend=backend)
    expected = naive.keras_sparse(y_true, y_pred, from_logits=from_logits, ignore_class=ignore_class)
    assert got.dtype == dtype and got.shape == (8,)
    assert_close(got, expected, what="loss", **_loose(dtype))
    if ignore_class is not None:
        assert np.all(got[::3] == 0)


def test_sparse_axis(backend, rng):
    x = rng.standard_normal((2, 4, 3))
    y = rng.integers(0, 4, size=(2, 3))
    got = xf.sparse_categorical_crossentropy(y, x, from_logits=True, axis=1, backend=backend)
    expected, _, _ = naive.cross_entropy(x, y, axis=1, reduction="none")
    assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_sparse_out_of_range_label_raises(backend):
    with pytest.raises(ValueError, match=r"label value of 5 at labels\[1\]"):
        xf.sparse_categorical_crossentropy(np.array([0, 5]), np.zeros((2, 5)), from_logits=True,
                                           backend=backend)
    with pytest.raises(ValueError, match=r"label value of -1 at labels\[0\]"):
        xf.sparse_categorical_crossentropy(np.array([-1, 0]), np.full((2, 5), 0.2), backend=backend)


# ----------------------------------------------------------------------- loss objects

SAMPLE_WEIGHTS = {
    "none": None,
    "per_sample": "per_sample",
    "per_sample_trailing_1": "per_sample_trailing_1",
    "scalar": 0.5,
}


def _sample_weight(kind, rng, n):
    if kind == "per_sample":
        return rng.uniform(0.0, 2.0, n)
    if kind == "per_sample_trailing_1":
        return rng.uniform(0.0, 2.0, (n, 1))
    return SAMPLE_WEIGHTS[kind]


@pytest.mark.sim_sample(0.25)
@pytest.mark.parametrize("sample_weight", list(SAMPLE_WEIGHTS))
@pytest.mark.parametrize("reduction", KERAS_REDUCTIONS, ids=str)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_categorical_object(backend, from_logits, reduction, sample_weight, rng):
    n, c = 7, 4
    y_pred = rng.standard_normal((n, c)).astype(np.float32) if from_logits else _probabilities(rng, (n, c), np.float32)
    y_true = make_probabilities(rng, (n, c), -1, np.float32)
    sw = _sample_weight(sample_weight, rng, n)
    loss = xf.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=0.1,
                                      reduction=reduction, backend=backend)
    got = loss(y_true, y_pred, sample_weight=sw)
    per_sample = naive.keras_categorical(y_true, y_pred, from_logits=from_logits, label_smoothing=0.1)
    expected = naive.keras_reduce(per_sample, sw, None, reduction)
    assert np.asarray(got).dtype == np.float32
    assert np.shape(got) == np.shape(expected)
    assert_close(got, expected, rtol=2e-5, atol=2e-6, what="reduced loss")


@pytest.mark.sim_sample(0.25)
@pytest.mark.parametrize("sample_weight", list(SAMPLE_WEIGHTS))
@pytest.mark.parametrize("reduction", KERAS_REDUCTIONS, ids=str)
@pytest.mark.parametrize("ignore_class", [None, -1, 2], ids=["no_ignore", "ignore_-1", "ignore_2"])
def test_sparse_object(backend, ignore_class, reduction, sample_weight, rng):
    """ignore_class masks samples; mean-like reductions then average over kept ones."""
    n, c = 9, 4
    y_pred = rng.standard_normal((n, c)).astype(np.float32)
    y_true = rng.integers(0, c, size=(n, 1))
    if ignore_class is not None:
        y_true[[0, 4, 5]] = ignore_class
    sw = _sample_weight(sample_weight, rng, n)
    loss = xf.SparseCategoricalCrossentropy(from_logits=True, ignore_class=ignore_class,
                                            reduction=reduction, backend=backend)
    got = loss(y_true, y_pred, sample_weight=sw)
    per_sample = naive.keras_sparse(y_true, y_pred, from_logits=True, ignore_class=ignore_class)
    mask = None if ignore_class is None else (y_true.reshape(-1) != ignore_class)
    expected = naive.keras_reduce(per_sample, sw, mask, reduction)
    assert np.shape(got) == np.shape(expected)
    assert_close(got, expected, rtol=2e-5, atol=2e-6, what="reduced loss")


def test_sum_over_batch_size_with_mask_averages_kept_samples(backend):
    """Keras' mask rescaling: the mean runs over the kept samples only (up to eps)."""
    x = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], np.float64))
    y = np.array([0, 2, 1])
    per = naive.cross_entropy(x, y, reduction="none")[0]
    got = xf.SparseCategoricalCrossentropy(from_logits=True, ignore_class=2, backend=backend)(y, x)
    np.testing.assert_allclose(got, (per[0] + per[2]) / 2, rtol=1e-6)


def test_empty_batch_objects(backend):
    x = np.zeros((0, 3), np.float32)
    for reduction in ("sum_over_batch_size", "sum", "none"):
        got = xf.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction,
                                               backend=backend)(np.zeros(0, np.int64), x)
        assert np.shape(got) in ((), (0,))
        assert np.sum(got) == 0


@pytest.mark.parametrize("cls,kwargs", [
    (xf.CategoricalCrossentropy, dict(from_logits=True, label_smoothing=0.25, axis=1,
                                      reduction="sum", name="cce")),
    (xf.SparseCategoricalCrossentropy, dict(from_logits=True, ignore_class=-1, axis=-1,
                                            reduction=None, name="scce")),
], ids=["categorical", "sparse"])
def test_config_round_trip(cls, kwargs, rng):
    loss = cls(**kwargs)
    config = loss.get_config()
    for key, value in kwargs.items():
        assert config[key] == value, key
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert type(clone) is cls
    assert repr(clone).startswith(cls.__name__ + "(")
    x = rng.standard_normal((3, 4, 2)).astype(np.float32)
    y = (make_probabilities(rng, x.shape, kwargs["axis"], np.float32) if cls is xf.CategoricalCrossentropy
         else rng.integers(0, 2, size=(3, 4)))
    np.testing.assert_array_equal(loss(y, x), clone(y, x))


def test_defaults_are_keras_defaults():
    for cls, name in [(xf.CategoricalCrossentropy, "categorical_crossentropy"),
                      (xf.SparseCategoricalCrossentropy, "sparse_categorical_crossentropy")]:
        config = cls().get_config()
        assert config["reduction"] == "sum_over_batch_size"
        assert config["from_logits"] is False
        assert config["name"] == name


def test_from_config_accepts_a_keras_config():
    """A config written by Keras itself (no axis or dtype keys) builds our object."""
    keras_config = {"name": "sparse_categorical_crossentropy", "reduction": "sum",
                    "from_logits": True, "ignore_class": None}
    loss = xf.SparseCategoricalCrossentropy.from_config(keras_config)
    assert loss.reduction == "sum" and loss.from_logits is True


def test_unknown_reduction_is_rejected():
    with pytest.raises(ValueError, match=r"reduction must be one of .*'sum_over_batch_size'.*got 'avg'"):
        xf.CategoricalCrossentropy(reduction="avg")


# ----------------------------------------------------------------- Keras' own conventions


@pytest.mark.parametrize("dtype_arg,expected", [
    (None, np.float32), ("float32", np.float32), ("float64", np.float64),
    ("float16", np.float16), ("bfloat16", "bfloat16"), ("mixed_bfloat16", "bfloat16"),
    (np.float64, np.float64),
], ids=str)
@pytest.mark.parametrize("cls", [xf.CategoricalCrossentropy, xf.SparseCategoricalCrossentropy],
                         ids=["categorical", "sparse"])
def test_loss_object_computes_and_returns_its_dtype(backend, cls, dtype_arg, expected, rng):
    """Keras' Loss.__call__ casts y_pred to the loss' dtype (default floatx, float32) and
    returns the loss in it; the value is the one of the cast inputs."""
    if expected == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        expected = ml_dtypes.bfloat16
    expected = np.dtype(expected)
    x = rng.standard_normal((6, 5))  # float64 in: the loss' dtype decides
    y = (make_probabilities(rng, x.shape, -1, np.float64) if cls is xf.CategoricalCrossentropy
         else rng.integers(0, 5, size=6))
    got = cls(from_logits=True, dtype=dtype_arg, backend=backend)(y, x)
    assert np.asarray(got).dtype == expected
    x_cast = x.astype(expected).astype(np.float64)
    per = (naive.keras_categorical(y.astype(expected).astype(np.float64), x_cast, from_logits=True)
           if cls is xf.CategoricalCrossentropy else naive.keras_sparse(y, x_cast, from_logits=True))
    tolerance = float(np.finfo(np.float32 if expected.itemsize < 8 else np.float64).eps) * 8
    if expected.itemsize == 2:  # per-sample losses rounded to 16 bits, then their mean:
        # two roundings of half a unit each (8 significant bits in bfloat16, 11 in float16)
        tolerance = 2.0 ** -7 if expected.name == "bfloat16" else 2.0 ** -10
    assert_close(np.float64(np.asarray(got).astype(np.float64)), float(np.mean(per)),
                 rtol=tolerance, atol=0, what="loss in the loss' dtype")


def test_loss_object_rejects_a_non_float_dtype():
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        xf.SparseCategoricalCrossentropy(dtype="int32")


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_categorical_single_class_warns(backend, from_logits, axis):
    """One class: softmax is 1, the loss always 0 -- Keras warns (SyntaxWarning)."""
    shape = (3, 1) if axis == -1 else (3, 1, 2)
    y_pred = np.ones(shape, np.float64)
    with pytest.warns(SyntaxWarning, match="loss is always 0"):
        got = xf.categorical_crossentropy(np.ones(shape, np.float64), y_pred,
                                          from_logits=from_logits, axis=axis, backend=backend)
    # Logits: exactly 0.  Probabilities: Keras clips p = 1 to 1 - 1e-7 first.
    expected = naive.keras_categorical(np.ones(shape), np.ones(shape), from_logits=from_logits,
                                       axis=axis)
    assert_close(got, expected, rtol=1e-6, atol=0)


def test_categorical_two_classes_do_not_warn(backend):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xf.categorical_crossentropy(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32),
                                    from_logits=True, backend=backend)


@pytest.mark.parametrize("axis,true_shape", [(1, (4, 1, 5)), (-1, (4, 5, 1)), (1, (4, 5, 1))],
                         ids=["class_axis_1", "last_axis", "last_axis_with_axis_1"])
def test_sparse_singleton_label_axis_is_squeezed(backend, axis, true_shape, rng):
    """Class ids of y_pred's rank: a size-1 class axis is dropped (Keras' losses), else a
    size-1 last axis (its TensorFlow backend)."""
    pred_shape = (4, 3, 5) if axis == 1 else (4, 5, 3)
    if true_shape == (4, 5, 1) and axis == 1:
        pred_shape = (4, 3, 5)
    x = rng.standard_normal(pred_shape)
    y = rng.integers(0, 3, size=true_shape)
    got = xf.sparse_categorical_crossentropy(y, x, from_logits=True, axis=axis, backend=backend)
    squeezed = y.reshape(4, 5)
    expected, _, _ = naive.cross_entropy(x, squeezed, axis=axis, reduction="none")
    assert got.shape == (4, 5)
    assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["SparseCategoricalCrossentropy", "CategoricalCrossentropy"])
def test_loss_classes_take_keras_positional_order(name):
    """xf.SparseCategoricalCrossentropy(True, None, "sum") must mean what Keras' does:
    the same parameters in the same order (xentfast's backend= is keyword-only)."""
    keras = pytest.importorskip("keras")
    import inspect
    ours = [p.name for p in inspect.signature(getattr(xf, name)).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD]
    theirs = [p.name for p in inspect.signature(getattr(keras.losses, name)).parameters.values()
              if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]
    assert ours == theirs


def test_sparse_bool_labels_are_class_ids_0_and_1():
    """Keras reads bool y_true as the class ids 0 and 1 (the core API refuses bool)."""
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    flags = np.array([True, False, True, False])
    got = xf.sparse_categorical_crossentropy(flags, x, from_logits=True)
    np.testing.assert_array_equal(got, xf.sparse_categorical_crossentropy(
        flags.astype(np.int64), x, from_logits=True))
