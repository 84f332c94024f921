"""Input checks and their messages.

Every check works on metadata (dtype, shape) or on host label arrays, so the same
messages serve NumPy and CUDA-device inputs.  A message says what was expected, what
was given and how to fix it.  Errors are exceptions, never ``assert``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

REDUCTIONS = ("mean", "sum", "none")
# ignore_index for APIs without one (TensorFlow, Keras without ignore_class): no label
# can equal it once the range check has passed, and messages leave it out.
NO_IGNORE = int(np.iinfo(np.int64).min)
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def is_bfloat16(dtype: np.dtype) -> bool:
    return dtype.name == "bfloat16"


def check_weight_dtype(dtype: np.dtype) -> None:
    """Class weights: any real numbers (integers, float16, bfloat16, float32/64)."""
    if np.dtype(dtype).kind not in "iuf" and not is_bfloat16(np.dtype(dtype)):
        raise TypeError(
            f"weight must be a real numeric array (integer or floating); got dtype {dtype}. "
            "Pass e.g. np.asarray(weight, dtype=np.float32)"
        )


def check_no_ignore_index_for_probabilities(ignore_index: int) -> None:
    """Probability labels have no class id to ignore: a non-negative ``ignore_index``
    (one that could name a class) with them is an error, as in PyTorch; negative ones,
    the default -100 included, are accepted and change nothing."""
    if ignore_index >= 0:
        raise ValueError(
            f"ignore_index is not supported for probability (floating point) labels; got "
            f"ignore_index={ignore_index}. It masks rows by class id: pass class indices as "
            "labels, or leave ignore_index at its default (-100) and give ignored rows a "
            "zero label row"
        )


def check_float_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """``dtype`` in native byte order; TypeError unless float16/bfloat16/32/64."""
    dtype = np.dtype(dtype)
    native = dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype
    if native.kind == "f" and native.itemsize in (2, 4, 8) or is_bfloat16(native):
        return native
    hint = ""
    if native.kind in "iub":
        hint = f"; cast it first, e.g. {name}.astype(np.float32)"
    elif native.kind == "c":
        hint = "; cross-entropy is defined for real logits only (take .real if intended)"
    raise TypeError(
        f"{name} must be a floating-point array ({', '.join(_FLOAT_NAMES)}); "
        f"got dtype {dtype}{hint}"
    )


def normalize_axis(axis: Any, ndim: int, name: str = "logits") -> int:
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer; got {axis!r} of type {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of bounds for {name} with {ndim} dimension(s); "
            f"expected an axis in [{-ndim}, {ndim})"
        )
    return int(axis) % ndim


def normalize_axes(axes: Any, ndim: int, name: str = "x") -> tuple[int, ...]:
    """A tuple of distinct axes, each in [0, ndim) (NumPy's ``normalize_axis_tuple``)."""
    normalized = tuple(normalize_axis(a, ndim, name) for a in axes)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"axis {tuple(axes)!r} repeats an axis; give each axis of {name} once")
    return normalized


def check_ndim(shape: tuple[int, ...], name: str) -> None:
    if len(shape) == 0:
        raise ValueError(
            f"{name} must have at least one dimension (the class axis); got a 0-d array. "
            f"Wrap a single row as {name}[None] or pass a 1-D array of class scores"
        )


def check_classes(num_classes: int, shape: tuple[int, ...], axis: int) -> None:
    if num_classes == 0:
        raise ValueError(
            f"logits of shape {shape} have zero classes along axis {axis}; "
            "cross-entropy needs at least one class"
        )


def check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}"
        )
    return reduction


def check_ignore_index(ignore_index: Any) -> int:
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(
        ignore_index, numbers.Integral
    ):
        raise TypeError(
            f"ignore_index must be an integer class id; got {ignore_index!r} "
            f"of type {type(ignore_index).__name__}"
        )
    value = int(ignore_index)
    info = np.iinfo(np.int64)
    if not info.min <= value <= info.max:
        raise ValueError(
            f"ignore_index must fit in a 64-bit signed integer [{info.min}, {info.max}] "
            f"like the labels; got {value}. Use a negative id such as -100 to mark "
            "entries to skip"
        )
    return value


def _real_scalar(value: Any, name: str, expected: str) -> float:
    """A Python or NumPy real number, or a 0-d real array, as a float."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {expected}; got the bool {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        return float(value)
    raise TypeError(
        f"{name} must be {expected}; got {value!r} of type {type(value).__name__}"
    )


def check_flag(value: Any, name: str) -> bool:
    """A switch: True or False (a Python or NumPy bool), nothing merely truthy --
    ``inplace="False"`` must not overwrite the caller's logits."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r} of type "
                        f"{type(value).__name__}")
    return bool(value)


def check_fraction(value: Any, name: str) -> float:
    """A real number in [0, 1] (label smoothing)."""
    value = _real_scalar(value, name, "a real number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {value}")
    return value


def check_nonnegative(value: Any, name: str) -> float:
    """A finite real number >= 0 (the z-loss scale)."""
    value = _real_scalar(value, name, "a finite real number >= 0")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite real number >= 0; got {value}")
    return value


def check_representable(value: float, name: str, dtype: np.dtype) -> None:
    """A finite option that overflows the accumulation dtype (z_loss=1e39 in float32)
    would make every loss inf without a word."""
    limit = float(np.finfo(dtype).max)
    if abs(value) > limit:
        raise ValueError(f"{name} = {value} overflows {np.dtype(dtype).name}, the dtype the "
                         f"losses are computed in (largest {limit:.4g}); scale it down")


def check_softcap(value: Any) -> float | None:
    """None (no capping) or a finite real number > 0 (Gemma 2's logit soft-cap)."""
    if value is None:
        return None
    value = _real_scalar(value, "softcap", "None or a finite real number > 0")
    if not (np.isfinite(value) and value > 0.0):
        raise ValueError(
            f"softcap must be None (no capping) or a finite real number > 0; got {value}. "
            "Gemma 2 uses softcap=30.0 for its final logits"
        )
    return value


def label_kind(
    labels_dtype: np.dtype,
    labels_shape: tuple[int, ...],
    logits_shape: tuple[int, ...],
    axis: int,
) -> str:
    """``"sparse"`` (class ids) or ``"dense"`` (probabilities), or a clear error."""
    batch_shape = logits_shape[:axis] + logits_shape[axis + 1 :]
    kind = labels_dtype.kind
    if kind in "iu" and labels_shape == batch_shape:
        return "sparse"
    if (kind == "f" or is_bfloat16(labels_dtype)) and labels_shape == logits_shape:
        return "dense"
    expected = (
        f"class indices (an integer array of shape {batch_shape}) or probabilities "
        f"(a floating array of shape {logits_shape})"
    )
    if kind in "iu" and labels_shape == logits_shape:
        raise TypeError(
            f"labels of shape {labels_shape} match the logits, so they are read as "
            f"probabilities, but their dtype is {labels_dtype}; expected {expected}. "
            "Cast one-hot labels to float, e.g. labels.astype(np.float32), or pass their "
            f"class ids, labels.argmax(axis={axis})"
        )
    if kind == "f" and labels_shape == batch_shape:
        raise TypeError(
            f"labels of shape {labels_shape} are read as class indices, but their dtype "
            f"is {labels_dtype}; expected {expected}. Cast them, e.g. labels.astype(np.int64)"
        )
    if kind == "b":
        raise TypeError(
            "labels must be integer class ids or float probabilities; got dtype bool. "
            "For class ids cast them, e.g. labels.astype(np.int64); for one-hot rows, "
            "labels.astype(np.float32)"
        )
    if kind == "O":
        raise TypeError(
            "labels must be integer class ids or float probabilities; got values that do "
            "not fit one numeric dtype (dtype object), e.g. integers outside the 64-bit "
            "range. Class ids must lie in [0, num_classes)"
        )
    if kind not in "iuf" and not is_bfloat16(labels_dtype):
        raise TypeError(f"labels must be integer class ids or float probabilities; got dtype {labels_dtype}")
    raise ValueError(
        f"labels of shape {labels_shape} do not fit logits of shape {logits_shape} with "
        f"class axis {axis}; expected {expected}{_axis_hint(labels_shape, logits_shape, axis)}"
    )


def _axis_hint(labels_shape, logits_shape, axis: int) -> str:
    """'. They fit class axis k: pass axis=k' when the labels are the logits' shape
    without another axis (PyTorch's class axis is 1; xentfast's, TensorFlow's and
    Keras' default is -1)."""
    fits = [k for k in range(len(logits_shape))
            if k != axis and logits_shape[:k] + logits_shape[k + 1:] == labels_shape]
    if not fits:
        return ""
    return (f". They fit class axis {fits[0]}: pass axis={fits[0]} (PyTorch puts the "
            "classes on axis 1; the default here is -1, as in TensorFlow and Keras)")


def check_weight_shape(shape: tuple[int, ...], num_classes: int) -> None:
    if shape != (num_classes,):
        raise ValueError(
            f"weight must be a 1-D array with one entry per class, shape ({num_classes},); "
            f"got shape {shape}"
        )


def check_weight_values(w: np.ndarray) -> None:
    """Class weights must be finite in the accumulation dtype: an infinite (or, cast to
    float32, overflowing) weight makes every smoothed row inf - inf = NaN."""
    finite = np.isfinite(w)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"weight[{first}] = {w[first]} is not finite in {w.dtype}; class weights must "
            f"be finite numbers (scale them down if they overflow {w.dtype})"
        )


def out_of_range_message(
    value: int, position: tuple[int, ...], num_classes: int | None, ignore_index: int | None
) -> str:
    """The one wording for a bad class id (``num_classes=None``: not known yet)."""
    where = "labels" + ("[" + ", ".join(map(str, position)) + "]" if position else "")
    upper = "num_classes" if num_classes is None else num_classes
    skip, how = "", ""
    if ignore_index == NO_IGNORE:  # a call with no option to skip rows (TensorFlow, optax)
        how = ("; to skip rows instead, use a loss that can: cross_entropy(..., "
               "ignore_index=) of xentfast, xentfast.torch or xentfast.jax, or a Keras "
               "loss with ignore_class=")
    elif ignore_index is not None:  # None: the check does not know the call's option
        skip = f" and is not ignore_index={ignore_index}"
        how = "; mark entries to skip with that ignore_index"
    return (
        f"Received a label value of {value} at {where} which is outside the valid range "
        f"of [0, {upper}){skip}. Class indices must lie in [0, num_classes){how}"
    )


def check_label_range(
    labels: np.ndarray, num_classes: int, ignore_index: int | None
) -> bool:
    """ValueError naming the first label outside [0, C) that is not ignore_index.

    Returns True when every label lies in [0, C) (then none equals an ignore_index
    outside that range, and every row is kept)."""
    if labels.size == 0:
        return True
    # Fast path: one vectorised reduction, no temporary of the labels' size.  Read as
    # unsigned integers of the same width, negative labels become values >= 2**(bits-1)
    # > C, so 0 <= y < C for every label exactly when the unsigned maximum is below C.
    if labels.dtype.kind in "iu":
        unsigned = labels.view(np.dtype(f"u{labels.dtype.itemsize}"))
        if int(unsigned.max()) < num_classes:
            return True
    ids = labels.astype(np.int64, copy=False)
    bad = (ids < 0) | (ids >= num_classes)
    if ignore_index is not None and ignore_index != NO_IGNORE:
        bad &= ids != ignore_index
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(-1))[0])
        position = tuple(int(i) for i in np.unravel_index(first, labels.shape))
        value = labels.reshape(-1)[first]
        raise ValueError(out_of_range_message(int(value), position, num_classes, ignore_index))
    return False


def check_object_labels(labels: np.ndarray, num_classes: int, ignore_index) -> None:
    """Labels that NumPy could only hold as objects (a list with an integer beyond
    64 bits, say): ValueError naming the first integer outside [0, C), else nothing
    (label_kind then says what kind of array is expected)."""
    for position, value in np.ndenumerate(labels):
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) \
                and not 0 <= int(value) < num_classes and int(value) != ignore_index:
            raise ValueError(out_of_range_message(int(value), position, num_classes,
                                                  ignore_index))


def check_out(out_shape, out_dtype, writeable: bool, shape, dtype) -> None:
    """``out=``: the logits' shape (ValueError) and dtype in native byte order
    (TypeError), writeable (ValueError)."""
    if tuple(out_shape) != tuple(shape):
        raise ValueError(
            f"out must have the logits' shape {tuple(shape)}; got shape {tuple(out_shape)}"
        )
    out_dtype = np.dtype(out_dtype)
    if out_dtype != np.dtype(dtype):
        if out_dtype.newbyteorder("=") == np.dtype(dtype).newbyteorder("="):
            raise TypeError(
                f"out must be {np.dtype(dtype)} in native byte order; got byte-swapped "
                f"{out_dtype}. Pass np.empty_like(logits), or out=None"
            )
        raise TypeError(
            f"out must have the logits' dtype {np.dtype(dtype)}; got {out_dtype}. "
            "Pass np.empty_like(logits), or out=None"
        )
    if not writeable:
        raise ValueError("out is read-only; pass a writeable array (or out=None)")
