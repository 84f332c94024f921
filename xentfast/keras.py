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
  cotangent.  XLA cannot compile a host call: Keras' default ``jit_compile="auto"``
  keeps XLA off on CPU-only machines, where this trains; with ``jit_compile=True`` (or
  "auto" on a GPU machine, where Keras turns XLA on) the loss raises a ``RuntimeError``
  saying to pass ``jit_compile=False``.
* **JAX**: :mod:`xentfast.jax` (``jax.custom_vjp`` around a host callback).
* **torch**: :mod:`xentfast.torch` (a ``torch.library`` custom op with autograd).

``from_logits=False`` (probabilities): the sparse loss takes ``log(clip(y_pred))`` with
the backend's ops and runs the fused kernel on those log-probabilities (what Keras'
TensorFlow backend computes); the categorical loss is Keras' own elementwise formula in
backend ops (there is no softmax to fuse).  Label smoothing spreads over the class
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

import numpy as np

from . import _keras as _numpy_keras
from . import _validate

__all__ = [
    "CategoricalCrossentropy",
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
                              label_smoothing=label_smoothing)
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


def _tensorflow_op(logits, labels, *, axis, ignore_index, label_smoothing):
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    from . import _api

    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        raise RuntimeError(
            "xentfast.keras losses run a host kernel, which XLA cannot compile: pass "
            "jit_compile=False to model.compile (Keras turns XLA on with "
            "jit_compile=True, and with the default 'auto' when a GPU is visible)"
        )

    dtype = logits.dtype

    def host(x, y):
        loss, grad = _api.cross_entropy_with_grad(
            x, y, axis=axis, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction="none")
        return np.asarray(loss), grad

    @tf.custom_gradient
    def op(x):
        loss, grad = tf.numpy_function(host, [x, labels], [dtype, dtype], stateful=False)
        batch_shape = [d for i, d in enumerate(x.shape) if i != axis % len(x.shape)]
        loss.set_shape(batch_shape)
        grad.set_shape(x.shape)

        def backward(upstream):
            # Row r's loss depends on row r's logits only: the vector-Jacobian product
            # is the cotangent broadcast along the class axis times the saved gradient.
            return tf.expand_dims(tf.cast(upstream, dtype), axis) * grad

        return loss, backward

    return op(logits)


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
