"""Parity with the libraries whose semantics xentfast promises: PyTorch's
F.cross_entropy (loss and autograd gradient), TensorFlow's tf.nn ops and the fused raw
ops, Keras' losses, and JAX/optax.  Each peer is skipped cleanly when not installed."""

from __future__ import annotations

import numpy as np
import pytest

import xentfast as xf
from helpers import assert_close, import_peer, make_probabilities, to_numpy

pytestmark = pytest.mark.peers

REDUCTIONS = ["mean", "sum", "none"]

# ======================================================================= PyTorch

TORCH_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": -100, "ignored": True},
    "ignore_in_range": {"ignore_index": 1, "ignored": True},
    "smooth": {"label_smoothing": 0.2},
    "all": {"weight": True, "ignore_index": -100, "ignored": True, "label_smoothing": 0.15},
}
# (N, C) and PyTorch's (N, C, d) layout with the class axis 1 (more trailing dims add nothing)
TORCH_LAYOUTS = {"NC": ((6, 5), -1, 1), "NCd": ((3, 5, 4), 1, 1)}


def _torch_case(rng, layout, option):
    shape, axis, _ = TORCH_LAYOUTS[layout]
    c = shape[axis]
    x = rng.standard_normal(shape) * 3
    batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    y = rng.integers(0, c, size=batch)
    spec = TORCH_OPTIONS[option]
    kw = {}
    if spec.get("weight"):
        kw["weight"] = rng.uniform(0.2, 2.0, c)
    if "ignore_index" in spec:
        kw["ignore_index"] = spec["ignore_index"]
        flat = y.reshape(-1)
        flat[::3] = spec["ignore_index"]
    if "label_smoothing" in spec:
        kw["label_smoothing"] = spec["label_smoothing"]
    return x, y, kw, axis


def _torch_loss_and_grad(torch, x, target, kw, reduction, dtype):
    F = torch.nn.functional
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    tkw = dict(kw)
    if "weight" in tkw:
        tkw["weight"] = torch.tensor(tkw["weight"], dtype=dtype)
    tt = torch.tensor(target) if target.dtype.kind in "iu" else torch.tensor(target, dtype=dtype)
    loss = F.cross_entropy(xt, tt, reduction=reduction, **tkw)
    (loss.sum() if reduction == "none" else loss).backward()
    return to_numpy(loss), to_numpy(xt.grad)


@pytest.mark.sim_sample(0.3)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(TORCH_OPTIONS))
@pytest.mark.parametrize("layout", list(TORCH_LAYOUTS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_index_targets(backend, dtype, layout, option, reduction, rng):
    torch = import_peer("torch")
    x, y, kw, axis = _torch_case(rng, layout, option)
    x = x.astype(dtype)
    t_loss, t_grad = _torch_loss_and_grad(torch, x, y, kw, reduction, getattr(torch, dtype))
    loss, grad = xf.cross_entropy_with_grad(x, y, axis=axis, reduction=reduction,
                                            backend=backend, **kw)
    rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (2e-5, 2e-6)
    assert_close(loss, t_loss, rtol=rtol, atol=atol * 10, what="loss vs torch")
    assert_close(grad, t_grad, rtol=rtol, atol=atol, what="grad vs torch autograd")


@pytest.mark.sim_sample(0.3)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight", "smooth", "weight_smooth"])
@pytest.mark.parametrize("layout", ["NC", "NCd"])
def test_torch_probability_targets(backend, layout, option, reduction, rng):
    torch = import_peer("torch")
    shape, axis, _ = TORCH_LAYOUTS[layout]
    x = rng.standard_normal(shape) * 3
    t = make_probabilities(rng, shape, axis, np.float64)
    kw = {}
    if "weight" in option:
        kw["weight"] = rng.uniform(0.2, 2.0, shape[axis])
    if "smooth" in option:
        kw["label_smoothing"] = 0.2
    t_loss, t_grad = _torch_loss_and_grad(torch, x, t, kw, reduction, torch.float64)
    loss, grad = xf.cross_entropy_with_grad(x, t, axis=axis, reduction=reduction,
                                            backend=backend, **kw)
    assert_close(loss, t_loss, rtol=1e-10, atol=1e-11, what="loss vs torch")
    assert_close(grad, t_grad, rtol=1e-10, atol=1e-12, what="grad vs torch autograd")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_z_loss_by_autograd(backend, reduction, rng):
    """z_loss has no torch argument: build CE + z * lse^2 (kept rows) and differentiate."""
    torch = import_peer("torch")
    F = torch.nn.functional
    x = rng.standard_normal((6, 7)) * 3
    y = rng.integers(0, 7, size=6)
    y[2] = -100
    w = rng.uniform(0.5, 2.0, 7)
    z = 0.05
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.tensor(y)
    kept = (yt != -100).double()
    per = F.cross_entropy(xt, yt, weight=torch.tensor(w), reduction="none", label_smoothing=0.1)
    per = per + z * torch.logsumexp(xt, dim=1) ** 2 * kept
    if reduction == "none":
        loss = per
        loss.sum().backward()
    elif reduction == "sum":
        loss = per.sum()
        loss.backward()
    else:
        denom = (torch.tensor(w)[yt.clamp(min=0)] * kept).sum()
        loss = per.sum() / denom
        loss.backward()
    got, grad = xf.cross_entropy_with_grad(x, y, weight=w, label_smoothing=0.1, z_loss=z,
                                           reduction=reduction, backend=backend)
    assert_close(got, to_numpy(loss), rtol=1e-10, atol=1e-11, what="loss")
    assert_close(grad, to_numpy(xt.grad), rtol=1e-10, atol=1e-12, what="grad")


def test_torch_all_ignored_mean_is_our_documented_difference(backend):
    """PyTorch: 0/0 = NaN.  xentfast: 0.0 and a zero gradient (Keras/optax/Liger)."""
    torch = import_peer("torch")
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    y = np.array([-100, -100])
    t_loss, _ = _torch_loss_and_grad(torch, x, y, {}, "mean", torch.float64)
    assert np.isnan(t_loss)
    loss, grad = xf.cross_entropy_with_grad(x, y, backend=backend)
    assert loss == 0.0 and np.all(grad == 0)


def test_torch_primitives(backend, rng):
    torch = import_peer("torch")
    x = rng.standard_normal((3, 4, 5)) * 5
    xt = torch.tensor(x)
    for dim in (0, 1, 2, -1):
        np.testing.assert_allclose(xf.logsumexp(x, axis=dim, backend=backend),
                                   to_numpy(torch.logsumexp(xt, dim=dim)), rtol=1e-12)
        np.testing.assert_allclose(xf.softmax(x, axis=dim, backend=backend),
                                   to_numpy(torch.softmax(xt, dim=dim)), rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(xf.log_softmax(x, axis=dim, backend=backend),
                                   to_numpy(torch.log_softmax(xt, dim=dim)), rtol=1e-12, atol=1e-13)


def test_torch_cross_entropy_module_with_class_axis_1(backend, rng):
    """nn.CrossEntropyLoss on (N, C, H, W) images: segmentation layout."""
    torch = import_peer("torch")
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=(2, 3, 3))
    y[0, 0, 0] = 255
    module = torch.nn.CrossEntropyLoss(ignore_index=255)
    expected = to_numpy(module(torch.tensor(x), torch.tensor(y)))
    got = xf.cross_entropy(x, y, axis=1, ignore_index=255, backend=backend)
    np.testing.assert_allclose(got, expected, rtol=2e-6)


# ======================================================================= TensorFlow


def _tf():
    return import_peer("tensorflow")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_tf_softmax_cross_entropy_with_logits_and_tape_gradient(backend, dtype, rng):
    tf = _tf()
    x = (rng.standard_normal((5, 7)) * 3).astype(dtype)
    t = make_probabilities(rng, (5, 7), -1, dtype)
    xv = tf.Variable(x)
    with tf.GradientTape() as tape:
        per = tf.nn.softmax_cross_entropy_with_logits(labels=tf.constant(t), logits=xv)
        total = tf.reduce_mean(per)
    tf_grad = to_numpy(tape.gradient(total, xv))
    got = xf.softmax_cross_entropy_with_logits(t, x, backend=backend)
    loss, grad = xf.cross_entropy_with_grad(x, t, reduction="mean", backend=backend)
    rtol = {"float16": 3e-3, "float32": 2e-5, "float64": 1e-10}[dtype]
    assert got.dtype == np.dtype(dtype)
    assert_close(got, to_numpy(per), rtol=rtol, atol=rtol, what="per-example loss")
    assert_close(loss, to_numpy(total), rtol=rtol, atol=rtol, what="mean loss")
    assert_close(grad, tf_grad, rtol=rtol, atol=rtol * 0.2, what="gradient vs GradientTape")


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_tf_softmax_cross_entropy_axis(backend, axis, rng):
    tf = _tf()
    x = rng.standard_normal((3, 4, 5))
    t = make_probabilities(rng, x.shape, axis, np.float64)
    expected = to_numpy(tf.nn.softmax_cross_entropy_with_logits(labels=t, logits=x, axis=axis))
    got = xf.softmax_cross_entropy_with_logits(t, x, axis=axis, backend=backend)
    assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("label_dtype", ["int32", "int64"])
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 9), (4,)], ids=["2D", "3D", "1D"])
def test_tf_sparse_softmax_cross_entropy_with_logits(backend, shape, label_dtype, rng):
    tf = _tf()
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    y = rng.integers(0, shape[-1], size=shape[:-1]).astype(label_dtype)
    expected = to_numpy(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=x))
    got = xf.sparse_softmax_cross_entropy_with_logits(y, x, backend=backend)
    assert got.shape == expected.shape
    assert_close(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_tf_raw_fused_ops_loss_and_backprop(backend, dtype, rng):
    """tf.raw_ops.(Sparse)SoftmaxCrossEntropyWithLogits return (loss, backprop): ours is
    cross_entropy_with_grad(reduction="none")."""
    tf = _tf()
    x = (rng.standard_normal((6, 9)) * 3).astype(dtype)
    t = make_probabilities(rng, (6, 9), -1, dtype)
    y = rng.integers(0, 9, size=6)
    rtol = {"float16": 3e-3, "float32": 2e-5, "float64": 1e-10}[dtype]
    tf_loss, tf_backprop = tf.raw_ops.SoftmaxCrossEntropyWithLogits(features=x, labels=t)
    loss, grad = xf.cross_entropy_with_grad(x, t, reduction="none", backend=backend)
    assert_close(loss, to_numpy(tf_loss), rtol=rtol, atol=rtol, what="dense loss")
    assert_close(grad, to_numpy(tf_backprop), rtol=rtol, atol=rtol * 0.2, what="dense backprop")
    tf_loss, tf_backprop = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=x, labels=y)
    loss, grad = xf.cross_entropy_with_grad(x, y, reduction="none", backend=backend)
    assert_close(loss, to_numpy(tf_loss), rtol=rtol, atol=rtol, what="sparse loss")
    assert_close(grad, to_numpy(tf_backprop), rtol=rtol, atol=rtol * 0.2, what="sparse backprop")


def test_tf_primitives(backend, rng):
    tf = _tf()
    x = rng.standard_normal((3, 4, 5)) * 5
    for axis in (0, 1, -1):
        np.testing.assert_allclose(xf.logsumexp(x, axis=axis, backend=backend),
                                   to_numpy(tf.math.reduce_logsumexp(x, axis=axis)), rtol=1e-12)
        np.testing.assert_allclose(xf.softmax(x, axis=axis, backend=backend),
                                   to_numpy(tf.nn.softmax(x, axis=axis)), rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(xf.log_softmax(x, axis=axis, backend=backend),
                                   to_numpy(tf.nn.log_softmax(x, axis=axis)), rtol=1e-12, atol=1e-13)


# ======================================================================= Keras


def _keras():
    _tf()  # Keras 3 runs on the TensorFlow backend here
    return import_peer("keras")


@pytest.mark.sim_sample(0.4)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_keras_categorical_crossentropy(backend, axis, from_logits, label_smoothing, rng):
    keras = _keras()
    shape = (3, 4, 6) if axis == 1 else (5, 6)
    if from_logits:
        y_pred = (rng.standard_normal(shape) * 3).astype(np.float32)
    else:
        y_pred = (rng.random(shape) + 0.01).astype(np.float32)
        y_pred.reshape(-1)[3] = 0.0  # clipped to 1e-7
    y_true = make_probabilities(rng, shape, axis, np.float32)
    if axis == -1:
        expected = to_numpy(keras.losses.categorical_crossentropy(
            y_true, y_pred, from_logits=from_logits, label_smoothing=label_smoothing, axis=axis))
    else:
        # Keras <= 3.15 smooths by the last axis's size whatever axis is (fixed upstream
        # since); xentfast by the class axis's (README): give Keras the smoothed targets.
        smoothed = y_true * (1 - label_smoothing) + label_smoothing / shape[axis]
        expected = to_numpy(keras.losses.categorical_crossentropy(
            smoothed.astype(np.float32), y_pred, from_logits=from_logits, axis=axis))
    got = xf.categorical_crossentropy(y_true, y_pred, from_logits=from_logits,
                                      label_smoothing=label_smoothing, axis=axis, backend=backend)
    assert got.shape == expected.shape
    assert_close(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.sim_sample(0.3)
@pytest.mark.parametrize("label_form", ["int", "trailing_1", "float"])
@pytest.mark.parametrize("ignore_class", [None, -1, 0])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_keras_sparse_categorical_crossentropy(backend, from_logits, ignore_class, label_form, rng):
    keras = _keras()
    n, c = 8, 5
    y_pred = ((rng.standard_normal((n, c)) * 3) if from_logits
              else rng.dirichlet(np.ones(c), size=n)).astype(np.float32)
    y = rng.integers(0, c, size=n)
    if ignore_class is not None:
        y[::3] = ignore_class
    if label_form == "trailing_1":
        y = y[:, None]
    elif label_form == "float":
        y = y.astype(np.float32)
    expected = to_numpy(keras.losses.sparse_categorical_crossentropy(
        y, y_pred, from_logits=from_logits, ignore_class=ignore_class))
    got = xf.sparse_categorical_crossentropy(y, y_pred, from_logits=from_logits,
                                             ignore_class=ignore_class, backend=backend)
    assert got.shape == expected.shape
    assert_close(got, expected, rtol=2e-5, atol=2e-6)


KERAS_REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None]


@pytest.mark.sim_sample(0.3)
@pytest.mark.parametrize("sample_weight", ["none", "per_sample", "scalar"])
@pytest.mark.parametrize("reduction", KERAS_REDUCTIONS, ids=str)
def test_keras_categorical_object(backend, reduction, sample_weight, rng):
    keras = _keras()
    n, c = 6, 4
    y_pred = rng.standard_normal((n, c)).astype(np.float32)
    y_true = make_probabilities(rng, (n, c), -1, np.float32)
    sw = {"none": None, "per_sample": rng.uniform(0, 2, n).astype(np.float32), "scalar": 0.5}[sample_weight]
    kwargs = dict(from_logits=True, label_smoothing=0.1, reduction=reduction)
    expected = to_numpy(keras.losses.CategoricalCrossentropy(**kwargs)(y_true, y_pred, sample_weight=sw))
    got = xf.CategoricalCrossentropy(**kwargs, backend=backend)(y_true, y_pred, sample_weight=sw)
    assert np.shape(got) == expected.shape
    assert_close(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.sim_sample(0.3)
@pytest.mark.parametrize("sample_weight", ["none", "per_sample", "per_sample_trailing_1"])
@pytest.mark.parametrize("reduction", KERAS_REDUCTIONS, ids=str)
@pytest.mark.parametrize("ignore_class", [None, 2])
def test_keras_sparse_object(backend, ignore_class, reduction, sample_weight, rng):
    keras = _keras()
    n, c = 9, 4
    y_pred = rng.standard_normal((n, c)).astype(np.float32)
    y_true = rng.integers(0, c, size=(n, 1))
    if ignore_class is not None:
        y_true[[0, 4, 5]] = ignore_class
    sw = {"none": None, "per_sample": rng.uniform(0, 2, n).astype(np.float32),
          "per_sample_trailing_1": rng.uniform(0, 2, (n, 1)).astype(np.float32)}[sample_weight]
    kwargs = dict(from_logits=True, ignore_class=ignore_class, reduction=reduction)
    expected = to_numpy(keras.losses.SparseCategoricalCrossentropy(**kwargs)(y_true, y_pred, sample_weight=sw))
    got = xf.SparseCategoricalCrossentropy(**kwargs, backend=backend)(y_true, y_pred, sample_weight=sw)
    assert_close(np.reshape(got, -1), expected.reshape(-1), rtol=2e-5, atol=2e-6)
    if np.shape(got) != expected.shape:
        pytest.fail(f"result shape {np.shape(got)} differs from Keras' {expected.shape}")


def test_keras_config_keys_are_accepted(backend):
    """Keras' own get_config() output builds our objects."""
    keras = _keras()
    for ours, theirs in [(xf.CategoricalCrossentropy, keras.losses.CategoricalCrossentropy),
                         (xf.SparseCategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy)]:
        config = theirs(from_logits=True, reduction="sum").get_config()
        loss = ours.from_config(config)
        assert loss.reduction == "sum" and loss.from_logits is True


# ======================================================================= JAX / optax


def test_optax_softmax_cross_entropy(backend, rng):
    optax = import_peer("optax")
    x = rng.standard_normal((5, 6)).astype(np.float32)
    t = make_probabilities(rng, (5, 6), -1, np.float32)
    y = rng.integers(0, 6, size=5)
    np.testing.assert_allclose(xf.softmax_cross_entropy_with_logits(t, x, backend=backend),
                               np.asarray(optax.softmax_cross_entropy(x, t)), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(
        xf.sparse_softmax_cross_entropy_with_logits(y, x, backend=backend),
        np.asarray(optax.softmax_cross_entropy_with_integer_labels(x, y)), rtol=2e-5, atol=2e-6)


def test_jax_primitives(backend, rng):
    jax = import_peer("jax")
    x = rng.standard_normal((3, 7)).astype(np.float32)
    np.testing.assert_allclose(xf.logsumexp(x, backend=backend),
                               np.asarray(jax.nn.logsumexp(x, axis=-1)), rtol=2e-6)
    np.testing.assert_allclose(xf.softmax(x, backend=backend),
                               np.asarray(jax.nn.softmax(x, axis=-1)), rtol=2e-6, atol=1e-8)
    np.testing.assert_allclose(xf.log_softmax(x, backend=backend),
                               np.asarray(jax.nn.log_softmax(x, axis=-1)), rtol=2e-6, atol=2e-6)


def test_jax_grad_matches(backend, rng):
    jax = import_peer("jax")
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y = rng.integers(0, 6, size=4)

    def loss_fn(z):
        return -jax.numpy.mean(jax.nn.log_softmax(z)[jax.numpy.arange(4), y])

    expected = np.asarray(jax.grad(loss_fn)(x))
    _, grad = xf.cross_entropy_with_grad(x, y, backend=backend)
    np.testing.assert_allclose(grad, expected, rtol=2e-5, atol=2e-7)
