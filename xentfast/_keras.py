"""Keras-style losses: ``keras.losses`` function semantics on the fused kernels.

The functions return per-sample losses exactly as ``keras.losses.categorical_crossentropy``
and ``keras.losses.sparse_categorical_crossentropy`` (Keras 3, TensorFlow backend):

* ``from_logits=True`` runs the fused kernel.
* ``from_logits=False`` reads ``y_pred`` as probabilities.  Categorical: renormalise
  over ``axis``, clip to ``[1e-7, 1 - 1e-7]``, ``-sum(y_true * log(y_pred))``.  Sparse:
  clip, take the log, and run the fused sparse kernel on those log-probabilities (which
  is what TensorFlow's backend does, renormalisation by the log-sum-exp included).
* ``label_smoothing`` mixes ``y_true`` with ``1 / C``, C the size of the class axis
  ``axis``.  (Keras 3.15 and earlier take C from the last axis whatever ``axis`` is;
  Keras has since fixed that.  Both agree for ``axis=-1``.)
* A class axis of size 1 warns (``SyntaxWarning``, as Keras): the loss is always 0.
* ``sparse_categorical_crossentropy`` squeezes a size-1 class axis of ``y_true`` of
  ``y_pred``'s rank (as Keras does before its backends), else a size-1 last axis (its
  TensorFlow backend).
* ``ignore_class`` zeroes the loss of samples whose label equals it; the loss objects
  then average over the remaining samples only (Keras' mask).

The loss objects accept Keras' reductions: ``"sum_over_batch_size"`` (default; sum
divided by the number of loss entries), ``"sum"``, ``"mean"`` (same as
``"sum_over_batch_size"``), ``"mean_with_sample_weight"`` and ``"none"``/``None``.
Like Keras' ``Loss.__call__`` they first cast ``y_pred`` (and float ``y_true``) to their
``dtype`` -- by default Keras' ``floatx()``, float32 -- and return the loss in it
(``dtype="bfloat16"`` or ``"mixed_bfloat16"``: bfloat16, through ``ml_dtypes``).  Integer
class ids are not cast: they stay exact beyond float32's 2**24.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np

from . import _api, _validate
from ._arrays import is_device_array

__all__ = [
    "CategoricalCrossentropy",
    "SparseCategoricalCrossentropy",
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
]

EPSILON = 1e-7  # keras.backend.epsilon()
KERAS_REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None)


def _host(x, name: str) -> np.ndarray:
    if is_device_array(x):
        raise TypeError(
            f"{name} is a CUDA device array; the Keras-style losses with from_logits=False "
            "compute on the host. Pass NumPy arrays, or use from_logits=True with logits"
        )
    return np.asarray(x)


def _python_numbers(value) -> bool:
    """Whether ``value`` is a Python int/float or a (nested) list or tuple of only those
    (NumPy scalars, which subclass them, and arrays are not)."""
    if type(value) in (float, int):
        return True
    if type(value) in (list, tuple):
        return all(_python_numbers(v) for v in value)
    return False


def _pred_array(y_pred):
    """``y_pred`` for the functions: arrays and NumPy scalars (and lists of them) keep
    their dtype; Python floats, and (nested) lists or tuples of only Python numbers,
    become Keras' ``floatx()`` (float32) as Keras converts them -- so
    ``categorical_crossentropy([0, 1, 0], [.05, .9, .05])`` is float32, as in Keras, not
    NumPy's float64."""
    if is_device_array(y_pred):
        return y_pred
    pred = np.asarray(y_pred)
    if pred.dtype.kind == "f" and _python_numbers(y_pred):
        pred = pred.astype(_compute_dtype(None))
    return pred


def _check_axis_arg(axis: Any) -> None:
    if isinstance(axis, (bool, np.bool_)):
        raise ValueError(
            f"axis must be an integer; got the boolean {axis!r}. (Did you pass from_logits "
            "positionally? The signature is (y_true, y_pred, from_logits, ...))"
        )


def categorical_crossentropy(
    y_true, y_pred, from_logits: bool = False, label_smoothing: float = 0.0, axis: int = -1,
    *, backend: str | None = None,
):
    """Per-sample categorical cross-entropy, as ``keras.losses.categorical_crossentropy``.

    ``y_true`` are (one-hot or soft) targets of ``y_pred``'s shape, any numeric dtype
    (cast to ``y_pred``'s).  Returns ``y_pred``'s shape without ``axis``.
    """
    _check_axis_arg(axis)
    label_smoothing = _validate.check_fraction(label_smoothing, "label_smoothing")
    if from_logits:
        pred = _pred_array(y_pred)
        dtype = _validate.check_float_dtype(pred.dtype, "y_pred")
        true = y_true if is_device_array(y_true) else np.asarray(y_true).astype(dtype, copy=False)
        _check_same_shape(tuple(true.shape), tuple(pred.shape))
        _warn_single_class(tuple(pred.shape), axis)
        # The kernel smooths with C = the class axis' size: (1 - eps) t + eps / C.
        return _api._cross_entropy(
            pred, true, axis=axis, weight=None, ignore_index=-100,
            label_smoothing=label_smoothing, z_loss=0.0, reduction="none", backend=backend,
            want_grad=False, labels_as_probabilities=True,
        )
    pred = _host(_pred_array(y_pred), "y_pred")
    dtype = _validate.check_float_dtype(pred.dtype, "y_pred")
    true = _host(y_true, "y_true").astype(dtype, copy=False)
    _validate.check_ndim(pred.shape, "y_pred")
    axis_ = _validate.normalize_axis(axis, pred.ndim, "y_pred")
    _check_same_shape(true.shape, pred.shape)
    _warn_single_class(pred.shape, axis_)
    if label_smoothing:
        true = true * (1.0 - label_smoothing) + label_smoothing / pred.shape[axis_]
    acc = np.float64 if dtype == np.float64 else np.float32
    p = pred.astype(acc)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p / np.sum(p, axis=axis_, keepdims=True)
    p = np.clip(p, EPSILON, 1.0 - EPSILON)
    loss = -np.sum(true.astype(acc) * np.log(p), axis=axis_)
    return loss.astype(dtype)


def _check_same_shape(true_shape: tuple[int, ...], pred_shape: tuple[int, ...]) -> None:
    """Keras' categorical loss takes targets of exactly y_pred's shape (no broadcasting)."""
    if tuple(true_shape) != tuple(pred_shape):
        raise ValueError(
            f"y_true and y_pred must have the same shape (one-hot or soft targets); got "
            f"y_true.shape={tuple(true_shape)}, y_pred.shape={tuple(pred_shape)}. For class "
            "indices use sparse_categorical_crossentropy"
        )


def _warn_single_class(shape: tuple[int, ...], axis: int) -> None:
    """Keras' warning for one class: softmax over one class is 1, the loss always 0."""
    if shape and shape[_validate.normalize_axis(axis, len(shape), "y_pred")] == 1:
        warnings.warn(
            "In loss categorical_crossentropy, expected y_pred.shape to be (batch_size, "
            f"num_classes) with num_classes > 1 along axis {axis}. Received: "
            f"y_pred.shape={shape}: one class, so the loss is always 0. Consider "
            "'binary_crossentropy' if you only have 2 classes.",
            SyntaxWarning,
            stacklevel=3,
        )


def _check_float_class_ids(true: np.ndarray) -> None:
    """Float class ids are cast to int64 as Keras does; NaN, +-inf or a value beyond the
    int64 range has no class id to become (the cast would invent one): ValueError."""
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(true) < 2.0 ** 63)          # NaN compares False: bad too
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(-1))[0])
        position = tuple(int(i) for i in np.unravel_index(first, true.shape))
        raise ValueError(
            f"y_true[{', '.join(map(str, position))}] = {float(true.reshape(-1)[first])} is not "
            "a class id: float labels are cast to integers, so they must be finite whole "
            "numbers in [0, num_classes). Fix or drop that sample, or use ignore_class"
        )


def sparse_categorical_crossentropy(
    y_true, y_pred, from_logits: bool = False, ignore_class: int | None = None, axis: int = -1,
    *, backend: str | None = None,
):
    """Per-sample sparse categorical cross-entropy, as
    ``keras.losses.sparse_categorical_crossentropy``.

    ``y_true`` holds class ids (integers, or floats holding integers, as Keras allows),
    of ``y_pred``'s shape without ``axis``, or of ``y_pred``'s rank with a size-1 axis
    in place of the classes (or last).  Samples whose label is ``ignore_class`` get
    loss 0.
    """
    _check_axis_arg(axis)
    pred = _pred_array(y_pred)
    dtype = _validate.check_float_dtype(pred.dtype, "y_pred")
    true = y_true if is_device_array(y_true) else np.asarray(y_true)
    true = _squeeze_class_axis(true, tuple(pred.shape), axis)
    if tuple(true.shape) == tuple(pred.shape) and len(pred.shape) > 1 and pred.shape[axis] > 1:
        raise ValueError(
            f"y_true of shape {tuple(true.shape)} has y_pred's shape, but "
            "sparse_categorical_crossentropy takes class ids (one per sample). For one-hot "
            "rows pass y_true.argmax(axis=-1), or use categorical_crossentropy")
    if np.dtype(true.dtype).kind == "f":
        if not is_device_array(true):
            _check_float_class_ids(true)
        true = true.astype(np.int64)  # Keras casts float labels to int64 (truncation)
    elif np.dtype(true.dtype).kind == "b":
        true = true.astype(np.int64)  # as Keras: bool labels are the class ids 0 and 1
    if np.dtype(true.dtype).kind not in "iu":
        raise TypeError(f"y_true must hold integer class ids; got dtype {true.dtype}")
    ignore = _validate.NO_IGNORE if ignore_class is None else _validate.check_ignore_index(ignore_class)
    if not from_logits:
        host = _host(pred, "y_pred")
        acc = np.float64 if dtype == np.float64 else np.float32
        pred = np.log(np.clip(host.astype(acc), EPSILON, 1.0 - EPSILON)).astype(dtype)
    return _api._cross_entropy(
        pred, true, axis=axis, weight=None, ignore_index=ignore, label_smoothing=0.0,
        z_loss=0.0, reduction="none", backend=backend, want_grad=False,
    )


def _squeeze_class_axis(true, pred_shape: tuple[int, ...], axis: int):
    """Class ids given with ``y_pred``'s rank: drop their size-1 class axis (Keras'
    losses do, for every backend), or else a size-1 last axis (its TensorFlow backend)."""
    shape = tuple(true.shape)
    if len(shape) != len(pred_shape) or not shape:
        return true
    class_axis = _validate.normalize_axis(axis, len(pred_shape), "y_pred")
    for drop in (class_axis, len(shape) - 1):
        if shape[drop] == 1:
            return true.reshape(shape[:drop] + shape[drop + 1:])
    return true


def _compute_dtype(dtype) -> np.dtype:
    """The dtype a Keras loss object computes in: its ``dtype`` argument (a name, a
    NumPy dtype, a ``mixed_*`` policy name or a Keras ``DTypePolicy``), by default
    Keras' ``floatx()`` (float32, unless Keras is loaded and configured otherwise)."""
    if dtype is None:
        keras = sys.modules.get("keras")
        floatx = getattr(getattr(keras, "config", None), "floatx", None)
        dtype = floatx() if callable(floatx) else "float32"
    dtype = getattr(dtype, "compute_dtype", dtype)
    if isinstance(dtype, str) and dtype.startswith("mixed_"):
        dtype = dtype[len("mixed_"):]
    if isinstance(dtype, str) and dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(
                "dtype='bfloat16' needs the ml_dtypes package (pip install ml_dtypes)"
            ) from None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return _validate.check_float_dtype(np.dtype(dtype), "dtype")
    except TypeError as error:
        raise TypeError(f"the loss' dtype must be a floating dtype: {error}") from None


def _cast_input(x, dtype: np.dtype, keep_integers: bool = False):
    """Keras' ``convert_to_tensor(x, dtype=self.dtype)`` of the loss' inputs, on the
    host; device arrays are left as they are (their result is cast instead)."""
    if is_device_array(x):
        return x
    x = np.asarray(x)
    if keep_integers and x.dtype.kind in "iu":
        return x
    return x.astype(dtype, copy=False)


def _reduce(values: np.ndarray, sample_weight, mask, reduction):
    """Keras' ``Loss.__call__`` weighting and reduction (keras/src/losses/loss.py)."""
    values = np.asarray(values)
    dtype = values.dtype
    weight = None
    divisor_weight = None  # what "mean_with_sample_weight" divides by the sum of
    if sample_weight is not None:
        weight = np.asarray(sample_weight, dtype=dtype)
        if weight.ndim == values.ndim + 1 and weight.shape[-1] == 1:
            if values.ndim == 1:
                # Keras (squeeze_or_expand_to_same_rank) expands rank-1 losses to the
                # weight's (N, 1), which is the shape reduction="none" then returns.
                values = values[:, None]
                if mask is not None:
                    mask = np.asarray(mask).reshape(values.shape)
            else:
                weight = weight.reshape(weight.shape[:-1])
        # Keras sums sample_weight as given, before broadcasting: a scalar counts once.
        divisor_weight = weight
        try:
            weight = np.broadcast_to(weight, values.shape)
        except ValueError:
            raise ValueError(
                f"sample_weight of shape {np.shape(sample_weight)} cannot be broadcast to "
                f"the per-sample losses of shape {values.shape}"
            ) from None
    if mask is not None:
        mask = mask.astype(dtype)
        if reduction in ("mean", "sum_over_batch_size"):
            # Keras rescales kept samples by total / valid so that the average runs over
            # the kept samples only: sum(loss * mask) / valid.
            total = mask.size
            mask = mask * (total / (mask.sum() + EPSILON))
        weight = mask if weight is None else mask * weight
        divisor_weight = weight
    if weight is not None:
        values = values * weight
    if reduction in (None, "none") or values.ndim == 0 or values.shape == (0,):
        return values
    loss = np.sum(values, dtype=np.float64)
    if reduction == "sum":
        return dtype.type(loss)
    if reduction == "mean_with_sample_weight" and weight is not None:
        divisor = float(np.sum(divisor_weight, dtype=np.float64))
    else:
        divisor = float(values.size)
    return dtype.type(loss / divisor if divisor else 0.0)


class _KerasLoss:
    """Shared machinery of the callable loss objects (Keras' ``LossFunctionWrapper``)."""

    def __init__(self, reduction, name: str, dtype=None):
        if reduction not in KERAS_REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {', '.join(map(repr, KERAS_REDUCTIONS))}; "
                f"got {reduction!r}"
            )
        self.reduction = reduction
        self.name = name
        self.dtype = dtype
        _compute_dtype(dtype)  # an unusable dtype fails here, not at the first call

    def _config(self) -> dict:
        return {"name": self.name, "reduction": self.reduction, "dtype": self.dtype}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class CategoricalCrossentropy(_KerasLoss):
    """``keras.losses.CategoricalCrossentropy``: call as ``loss(y_true, y_pred, sample_weight=None)``."""

    def __init__(self, from_logits: bool = False, label_smoothing: float = 0.0, axis: int = -1,
                 reduction: str | None = "sum_over_batch_size",
                 name: str = "categorical_crossentropy", dtype=None, *, backend: str | None = None):
        super().__init__(reduction, name, dtype)
        self.from_logits = bool(from_logits)
        self.label_smoothing = _validate.check_fraction(label_smoothing, "label_smoothing")
        _check_axis_arg(axis)
        self.axis = axis
        self.backend = backend

    def __call__(self, y_true, y_pred, sample_weight=None):
        dtype = _compute_dtype(self.dtype)
        values = categorical_crossentropy(
            _cast_input(y_true, dtype), _cast_input(y_pred, dtype),
            from_logits=self.from_logits, label_smoothing=self.label_smoothing,
            axis=self.axis, backend=self.backend,
        )
        values = _host(values, "loss").astype(dtype, copy=False)
        return _reduce(values, sample_weight, None, self.reduction)

    def get_config(self) -> dict:
        return {**self._config(), "from_logits": self.from_logits,
                "label_smoothing": self.label_smoothing, "axis": self.axis}


class SparseCategoricalCrossentropy(_KerasLoss):
    """``keras.losses.SparseCategoricalCrossentropy``: call as
    ``loss(y_true, y_pred, sample_weight=None)``; e.g.
    ``SparseCategoricalCrossentropy(from_logits=True)(labels, logits)``."""

    def __init__(self, from_logits: bool = False, ignore_class: int | None = None,
                 reduction: str | None = "sum_over_batch_size", axis: int = -1,
                 name: str = "sparse_categorical_crossentropy", dtype=None, *,
                 backend: str | None = None):
        super().__init__(reduction, name, dtype)
        self.from_logits = bool(from_logits)
        if ignore_class is not None:
            ignore_class = _validate.check_ignore_index(ignore_class)
        self.ignore_class = ignore_class
        _check_axis_arg(axis)
        self.axis = axis
        self.backend = backend

    def __call__(self, y_true, y_pred, sample_weight=None):
        dtype = _compute_dtype(self.dtype)
        values = sparse_categorical_crossentropy(
            _cast_input(y_true, dtype, keep_integers=True), _cast_input(y_pred, dtype),
            from_logits=self.from_logits, ignore_class=self.ignore_class,
            axis=self.axis, backend=self.backend,
        )
        values = _host(values, "loss").astype(dtype, copy=False)
        mask = None
        if self.ignore_class is not None:
            labels = np.asarray(y_true)
            mask = labels.reshape(values.shape) != self.ignore_class
        return _reduce(values, sample_weight, mask, self.reduction)

    def get_config(self) -> dict:
        return {**self._config(), "from_logits": self.from_logits,
                "ignore_class": self.ignore_class, "axis": self.axis}
