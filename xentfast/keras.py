"""Keras 3 losses on xentfast's fused kernels, for ``model.compile(loss=...)``.

    import xentfast.keras as xk
    model.compile(optimizer="adam",
                  loss=xk.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

``SparseCategoricalCrossentropy`` and ``CategoricalCrossentropy`` are Keras
``Loss`` objects (``keras.losses.LossFunctionWrapper`` subclasses, registered for
serialisation under the package name ``"xentfast"``): Keras' own ``Loss.__call__`` does
the dtype conversion, ``sample_weight``, the ``ignore_class`` mask and the reduction
with the backend's differentiable ops, exactly as for its own losses.  Only the
per-sample cross-entropy of logits runs on xentfast, as one operation whose gradient is
the one the fused kernel computed in the forward pass:

* **TensorFlow**: ``tf.numpy_function`` (a host call, inside ``tf.function`` too) under
  ``tf.custom_gradient``; the backward multiplies the saved gradient by the per-sample
  cotangent (and a tape around that backward differentiates it again: second
  derivatives, as in Keras' own loss).  XLA cannot compile a host call.  Keras' default ``jit_compile="auto"``
  keeps XLA off on CPU-only machines, where this trains, and there an XLA-compiled step
  (``jit_compile=True``) raises a ``RuntimeError`` saying to pass ``jit_compile=False``.
  Where TensorFlow sees a GPU, "auto" turns XLA on: the step then computes the loss and
  gradient with the same formulas in TensorFlow operations (``_tensorflow_xla_op``,
  float64, rounded once) and warns (``XLAFallbackWarning``); an explicit
  ``jit_compile=True`` there does the same, as Keras keeps no trace of which it was.
* **JAX**: :mod:`xentfast.jax` (``jax.custom_jvp`` around a host call).
* **torch**: :mod:`xentfast.torch` (a ``torch.library`` custom op with autograd).

``from_logits=False`` (probabilities): the sparse loss takes ``log(clip(y_pred))`` with
the backend's ops and runs the fused kernel on those log-probabilities (what Keras'
TensorFlow backend computes; on the JAX and torch backends, as Keras there, ``y_pred`` is
first scaled to sum 1 along the class axis, which changes rows that do not sum to 1);
the categorical loss is Keras' own elementwise formula in backend ops (there is no
softmax to fuse).  Label smoothing spreads over the class
axis's size (Keras <= 3.15 used the last axis's; identical for ``axis=-1``).

The NumPy-level ``xentfast.SparseCategoricalCrossentropy`` (``xentfast._keras``) is a
different object: it computes on NumPy arrays and returns NumPy values, without Keras.
"""

from __future__ import annotations

try:
    import keras
    from keras import ops
    from keras.src.losses.losses import LossFunctionWrapper  # Keras' own base of its losses
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "xentfast.keras needs Keras 3 (pip install keras, plus a backend: tensorflow, "
        "jax or torch)"
    ) from error

import warnings

import numpy as np

from . import _keras as _numpy_keras
from . import _second_order, _validate

__all__ = [
    "CategoricalCrossentropy",
    "XLAFallbackWarning",
    "SparseCategoricalCrossentropy",
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
]

EPSILON = _numpy_keras.EPSILON


# --------------------------------------------------------------------------- the fused op


def _fused(logits, labels, *, axis: int, ignore_index: int, label_smoothing: float,
           probabilities: bool):
    """Per-sample cross-entropy of ``logits`` along ``axis`` (class ids or
    probabilities), differentiable with respect to ``logits`` on the current backend."""
    name = keras.backend.backend()
    if name == "tensorflow":
        return _tensorflow_op(logits, labels, axis=axis, ignore_index=ignore_index,
                              label_smoothing=label_smoothing, probabilities=probabilities)
    if name == "jax":
        from . import jax as xjax

        return xjax.cross_entropy(logits, labels, axis=axis, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, reduction="none")
    if name == "torch":
        from . import torch as xtorch

        if len(logits.shape) > 1:
            axis_ = axis % len(logits.shape)
            logits = logits.movedim(axis_, 1)
            if probabilities:
                labels = labels.movedim(axis_, 1)
        return xtorch.cross_entropy(logits, labels, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, reduction="none")
    raise NotImplementedError(
        f"xentfast.keras supports the tensorflow, jax and torch backends of Keras; the "
        f"current backend is {name!r} (set KERAS_BACKEND before importing keras)"
    )


def _accelerator_visible() -> bool:
    """True where Keras' ``jit_compile="auto"`` turns XLA on for TensorFlow: TF sees a
    device other than a CPU (Keras' own test, ``Trainer._resolve_auto_jit_compile``)."""
    import tensorflow as tf

    return any(d.device_type != "CPU" for d in tf.config.list_physical_devices())


def _tensorflow_op(logits, labels, *, axis, ignore_index, label_smoothing, probabilities):
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    from . import _api

    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        if not _accelerator_visible():
            # No accelerator: Keras' "auto" keeps XLA off here, so this step was
            # compiled because somebody asked for it.
            raise RuntimeError(
                "xentfast.keras losses run a host kernel, which XLA cannot compile: pass "
                "jit_compile=False to model.compile (or drop jit_compile=True from your "
                "tf.function); Keras' default jit_compile='auto' keeps XLA off on "
                "CPU-only machines")
        warnings.warn(
            "xentfast.keras: this training step is compiled by XLA (Keras' default "
            "jit_compile='auto' turns XLA on when a GPU is visible), and XLA cannot call "
            "xentfast's host kernel; the loss and gradient are computed with the same "
            "formulas in TensorFlow operations instead (float64, rounded once). Pass "
            "jit_compile=False to model.compile to run the fused kernel.",
            XLAFallbackWarning, stacklevel=2)
        return _tensorflow_xla_op(logits, labels, axis=axis, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing,
                                  probabilities=probabilities)

    dtype = logits.dtype

    def host(x, y):
        loss, grad = _api.cross_entropy_with_grad(
            x, y, axis=axis, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction="none")
        return np.asarray(loss), grad

    @tf.custom_gradient
    def op(x, y):
        loss, grad = tf.numpy_function(host, [x, y], [dtype, dtype], stateful=False)
        batch_shape = [d for i, d in enumerate(x.shape) if i != axis % len(x.shape)]
        loss.set_shape(batch_shape)
        grad.set_shape(x.shape)
        return loss, _scaled_backward(x, grad, axis, dtype, y, ignore_index,
                                      label_smoothing, probabilities)

    return op(logits, labels)


def _scaled_backward(x, grad, axis, dtype, labels, ignore_index, label_smoothing,
                     probabilities):
    """The backward of a per-row loss whose gradient ``grad`` the forward computed.

    The saved gradient enters the backward as ``gradient_of(x)``, an op of ``x`` whose
    own gradient is the Hessian-vector product: so a tape around the first gradient
    (a gradient penalty, a Hessian) differentiates it again (see
    ``_hessian_product``)."""
    import tensorflow as tf

    @tf.custom_gradient
    def gradient_of(x_in, labels_in):
        def hessian_product(v):
            # from gradient_of itself, not the captured tensor: a tape around this
            # backward (a third derivative) differentiates it once more, as in torch
            return _hessian_product(gradient_of(x_in, labels_in), v, axis, labels,
                                    ignore_index, label_smoothing, probabilities)
        return tf.identity(grad), hessian_product

    def backward(upstream):
        # Row r's loss depends on row r's logits only: the vector-Jacobian product is
        # the cotangent broadcast along the class axis times the saved gradient.
        row_ct = tf.expand_dims(tf.cast(upstream, dtype), axis)
        d_labels = None
        if probabilities:
            # loss = -sum_c ((1 - eps) t_c + eps/C) log p_c: d/dt_c = -(1 - eps) log p_c
            log_p = tf.nn.log_softmax(tf.cast(x, tf.float64), axis=axis)
            d_labels = tf.cast(-(1.0 - label_smoothing) * log_p * tf.cast(row_ct, tf.float64),
                               labels.dtype)
        return row_ct * gradient_of(x, labels), d_labels

    return backward


def _hessian_product(grad, v, axis, labels, ignore_index, label_smoothing, probabilities):
    """(d/d logits, d/d labels) of <grad, v>, from the gradient alone
    (``xentfast._second_order``, as xentfast.torch): b the smoothed target weights,
    (1 - eps) onehot(y) + eps/C on kept rows, (1 - eps) t + eps/C for probabilities; no
    z-loss here.  For probabilities grad = (sum b) p - b, so d/dt_c <grad, v> =
    (1 - eps) (p . v - v_c); class ids get none.  In float64, cast back."""
    import tensorflow as tf

    acc = tf.float64
    rank = len(grad.shape)
    ax = axis % rank
    num_classes = tf.shape(grad)[ax]
    eps = float(label_smoothing)
    uniform = eps / tf.cast(num_classes, acc)
    if probabilities:
        b = (1 - eps) * tf.cast(labels, acc) + uniform
    else:
        y = tf.expand_dims(tf.cast(labels, tf.int64), ax)
        classes = tf.reshape(tf.range(tf.cast(num_classes, tf.int64)),
                             [-1 if i == ax else 1 for i in range(rank)])
        kept = tf.cast(tf.not_equal(y, ignore_index), acc)
        b = kept * ((1 - eps) * tf.cast(tf.equal(classes, y), acc) + uniform)

    def row_sum(a):
        return tf.reduce_sum(a, axis=ax, keepdims=True)

    def where(cond, a, b):
        return tf.where(cond, tf.cast(a, acc), tf.cast(b, acc))

    g, vv, z2 = tf.cast(grad, acc), tf.cast(v, acc), tf.zeros([], acc)
    hv = _second_order.hessian_vector_product(g, b, vv, z2, row_sum, where)
    d_labels = None
    if probabilities:
        p, _ = _second_order.softmax_from_grad(g, b, z2, row_sum, where)
        d_labels = tf.cast((1 - eps) * (row_sum(p * vv) - vv), labels.dtype)
    return tf.cast(hv, grad.dtype), d_labels


class XLAFallbackWarning(UserWarning):
    """An XLA-compiled TensorFlow step computed an xentfast.keras loss with TensorFlow
    operations instead of the host kernel."""


def _tensorflow_xla_op(logits, labels, *, axis, ignore_index, label_smoothing,
                       probabilities):
    """The per-row loss and its gradient in TensorFlow operations that XLA compiles: the
    kernel's row quantities (m, e_j, u, t, r = rest_mass, log s = log1p(r)) and
    ``rowmath``'s non-cancelling forms, in float64, rounded once into the logits' dtype.

    XLA cannot raise from inside a compiled step: a kept index label outside [0, C)
    gives a NaN loss and gradient row (TensorFlow's own GPU kernels do the same)."""
    import tensorflow as tf

    from . import _shards
    from .backends import rowmath

    dtype = logits.dtype
    acc = tf.float64
    rank = len(logits.shape)
    ax = axis % rank

    @tf.custom_gradient
    def op(x_in, labels):
        x = tf.cast(x_in, acc)
        m = tf.reduce_max(x, axis=ax, keepdims=True)
        d = x - m  # exact for data of fewer bits than float64
        if dtype == tf.float64:  # the rounding of x - m carried into exp(d) (1 + err)
            e = _shards._exp_of_exact_difference(x, m, xp=tf.experimental.numpy)
        else:
            e = tf.exp(d)
        at_max = tf.equal(d, 0.0)
        zero = tf.zeros([], acc)
        one = tf.ones([], acc)
        u = tf.reduce_sum(tf.where(at_max, zero, e), axis=ax, keepdims=True)
        t = tf.reduce_sum(tf.cast(at_max, acc), axis=ax, keepdims=True)
        r = rowmath.rest_mass(u, t, one)
        log_s = tf.math.log1p(r)
        lse = rowmath.log_sum_exp(m, log_s)
        if probabilities:
            num_classes = tf.cast(tf.shape(x)[ax], acc)
            eps = tf.constant(float(label_smoothing), acc)
            wt = rowmath.smoothed_weight(one, tf.cast(labels, acc), one - eps,
                                         eps / num_classes)
            # T = T_off + T_tie, the label mass off and on the ties at the max (rowmath)
            t_off = tf.reduce_sum(tf.where(at_max, zero, wt), axis=ax, keepdims=True)
            t_tie = tf.reduce_sum(tf.where(at_max, wt, zero), axis=ax, keepdims=True)
            # wd = sum over wt_c != 0 of wt_c (m - x_c): no 0 * inf for x_c = -inf
            wd = tf.reduce_sum(tf.where(tf.equal(wt, 0.0), zero, wt * (m - x)), axis=ax,
                               keepdims=True)
            loss = rowmath.dense_loss(m, log_s, t_off + t_tie, wd, zero)
            coef = rowmath.dense_coef(lse, t_off, zero)
            grad = rowmath.dense_grad(e, wt, r, coef, t_tie,
                                      rowmath.grad_over_sum(one, r, one))
            loss = tf.squeeze(loss, ax)
        else:
            y = tf.expand_dims(tf.cast(labels, tf.int64), ax)
            num_classes = tf.shape(x, out_type=tf.int64)[ax]
            kept = tf.not_equal(y, ignore_index)
            valid = (y >= 0) & (y < num_classes)
            classes = tf.reshape(tf.range(num_classes),
                                 [-1 if i == ax else 1 for i in range(rank)])
            is_y = tf.equal(classes, y)
            x_y = tf.reduce_sum(tf.where(is_y, x, zero), axis=ax, keepdims=True)
            e_y = tf.reduce_sum(tf.where(is_y, e, zero), axis=ax, keepdims=True)
            loss = rowmath.sparse_loss(m, log_s, x_y, one, one, zero, zero, zero, zero)
            a = rowmath.sparse_scale(one, r, lse, one, one, zero, zero, zero, one)
            g_y = rowmath.sparse_true_grad(one, e_y, r, lse, one, one, zero, zero, zero, one)
            grad = tf.where(is_y, g_y, e * a)
            nan = tf.constant(float("nan"), acc)
            loss = tf.where(kept, tf.where(valid, loss, nan), zero)
            grad = tf.where(kept, tf.where(valid, grad, nan), zero)
            loss = tf.squeeze(loss, ax)
        grad = tf.cast(grad, dtype)
        return tf.cast(loss, dtype), _scaled_backward(x_in, grad, ax, dtype, labels,
                                                      ignore_index, label_smoothing,
                                                      probabilities)

    return op(logits, labels)


# --------------------------------------------------------------------------- functions


def sparse_categorical_crossentropy(y_true, y_pred, from_logits: bool = False,
                                    ignore_class: int | None = None, axis: int = -1):
    """Per-sample sparse categorical cross-entropy of backend tensors, as
    ``keras.losses.sparse_categorical_crossentropy``, differentiable on the backend."""
    _numpy_keras._check_axis_arg(axis)
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[axis] == 1:
        y_true = ops.squeeze(y_true, axis=axis)
    elif len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)
    y_true = ops.cast(y_true, "int64")  # Keras casts (float) class ids to integers
    if not from_logits:
        if keras.backend.backend() != "tensorflow":
            # Keras' JAX and torch backends scale the probabilities to sum 1 before the
            # clip; its TensorFlow backend clips them as given (rows that do not sum to
            # 1 differ: the loss follows the backend in use, as Keras' own does).
            y_pred = y_pred / ops.sum(y_pred, axis=axis, keepdims=True)
        y_pred = ops.log(ops.clip(y_pred, EPSILON, 1.0 - EPSILON))
    ignore = _validate.NO_IGNORE if ignore_class is None else int(ignore_class)
    result = _fused(y_pred, y_true, axis=axis, ignore_index=ignore, label_smoothing=0.0,
                    probabilities=False)
    if ignore_class is not None:
        # The kernel gives ignored samples loss 0 and gradient 0; Keras' mask makes the
        # mean-like reductions average over the kept samples only.
        keras.src.backend.set_keras_mask(result, mask=ops.not_equal(y_true, ignore))
    return result


def categorical_crossentropy(y_true, y_pred, from_logits: bool = False,
                             label_smoothing: float = 0.0, axis: int = -1):
    """Per-sample categorical cross-entropy of backend tensors, as
    ``keras.losses.categorical_crossentropy`` (smoothing over the class axis)."""
    _numpy_keras._check_axis_arg(axis)
    label_smoothing = _validate.check_fraction(label_smoothing, "label_smoothing")
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    shape = tuple(y_pred.shape)
    _numpy_keras._check_same_shape(tuple(y_true.shape), shape)
    _numpy_keras._warn_single_class(shape, axis)
    if from_logits:
        return _fused(y_pred, y_true, axis=axis, ignore_index=-100,
                      label_smoothing=label_smoothing, probabilities=True)
    if label_smoothing:
        num_classes = ops.cast(ops.shape(y_pred)[axis], y_pred.dtype)
        y_true = y_true * (1.0 - label_smoothing) + label_smoothing / num_classes
    p = y_pred / ops.sum(y_pred, axis=axis, keepdims=True)
    p = ops.clip(p, EPSILON, 1.0 - EPSILON)
    return -ops.sum(y_true * ops.log(p), axis=axis)


# --------------------------------------------------------------------------- loss objects


@keras.saving.register_keras_serializable(package="xentfast")
class SparseCategoricalCrossentropy(LossFunctionWrapper):
    """``keras.losses.SparseCategoricalCrossentropy`` on xentfast's fused kernel."""

    def __init__(self, from_logits: bool = False, ignore_class: int | None = None,
                 reduction="sum_over_batch_size", axis: int = -1,
                 name: str = "sparse_categorical_crossentropy", dtype=None):
        super().__init__(sparse_categorical_crossentropy, name=name, reduction=reduction,
                         dtype=dtype, from_logits=from_logits, ignore_class=ignore_class,
                         axis=axis)
        self.from_logits = from_logits
        self.ignore_class = ignore_class
        self.axis = axis

    def get_config(self):
        config = keras.losses.Loss.get_config(self)
        config.update({"from_logits": self.from_logits, "ignore_class": self.ignore_class,
                       "axis": self.axis})
        return config


@keras.saving.register_keras_serializable(package="xentfast")
class CategoricalCrossentropy(LossFunctionWrapper):
    """``keras.losses.CategoricalCrossentropy`` on xentfast's fused kernel."""

    def __init__(self, from_logits: bool = False, label_smoothing: float = 0.0,
                 axis: int = -1, reduction="sum_over_batch_size",
                 name: str = "categorical_crossentropy", dtype=None):
        super().__init__(categorical_crossentropy, name=name, reduction=reduction,
                         dtype=dtype, from_logits=from_logits,
                         label_smoothing=label_smoothing, axis=axis)
        self.from_logits = from_logits
        self.label_smoothing = label_smoothing
        self.axis = axis

    def get_config(self):
        config = keras.losses.Loss.get_config(self)
        config.update({"from_logits": self.from_logits,
                       "label_smoothing": self.label_smoothing, "axis": self.axis})
        return config
