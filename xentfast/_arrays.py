"""The array operations the public layer needs, for host (NumPy) arrays.

The public layer never touches array memory itself: it asks an *arrays* object to
bring an input into the kernels' (rows, classes) C-contiguous form, to allocate
outputs, to reduce the per-row losses and to put results back into the caller's
layout.  ``HOST`` below does it with NumPy; the CUDA backend provides the same methods
for device arrays (``xentfast.backends.numba_cuda.DEVICE``).
"""

from __future__ import annotations

import numpy as np

from . import _buffers, _validate


def _class_axis_last(x: np.ndarray, axis: int) -> np.ndarray:
    """``np.moveaxis(x, axis, -1)``, skipped when it is already last (the common case:
    moveaxis costs more than the whole call on small inputs)."""
    return x if axis == x.ndim - 1 else np.moveaxis(x, axis, -1)


def accumulation_dtype(dtype: np.dtype) -> np.dtype:
    """float64 arithmetic for float64 data, float32 for everything narrower."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


class HostArrays:
    """NumPy implementation of the public layer's array operations."""

    on_device = False

    @staticmethod
    def start_call(*inputs) -> None:
        """Called once per public call with its array arguments, before anything else
        (the device layer picks the caller's memory pool there); nothing to do here."""

    @staticmethod
    def asarray(obj) -> np.ndarray:
        if isinstance(obj, np.ma.MaskedArray):
            raise TypeError(
                "masked arrays are not supported: their mask would be silently ignored. "
                "Pass the values with the mask applied -- logits.filled(-np.inf) masks "
                "classes out, and rows to skip take the label ignore_index")
        try:
            return np.asarray(obj)
        except (RuntimeError, TypeError) as exc:
            if type(obj).__module__.partition(".")[0] != "torch":
                raise
            raise TypeError(
                f"this NumPy function cannot read the torch tensor ({exc}). For autograd "
                "and every torch dtype use xentfast.torch.cross_entropy (F.cross_entropy's "
                "signature), or pass tensor.detach().float().numpy()") from exc

    @staticmethod
    def to_rows(x: np.ndarray, axis: int, dtype: np.dtype) -> np.ndarray:
        """(n, c) C-contiguous view of ``x`` with ``axis`` last, in ``dtype``.

        No copy when ``x`` already has that layout and dtype; otherwise exactly one.
        Byte-swapped input comes out in native order.
        """
        moved = _class_axis_last(x, axis)
        rows = np.ascontiguousarray(moved, dtype=dtype)
        return rows.reshape(-1, moved.shape[-1])

    @staticmethod
    def broadcast_to(x: np.ndarray, shape) -> np.ndarray:
        """Read-only view of ``x`` broadcast to ``shape`` (no copy)."""
        return np.broadcast_to(x, shape)

    @staticmethod
    def softcap(rows: np.ndarray, cap: float, out: np.ndarray | None = None) -> np.ndarray:
        """``cap * tanh(rows / cap)`` (Gemma 2's soft-capping), into ``out`` (may be
        ``rows`` itself) or a new array of ``rows``' dtype."""
        scale = rows.dtype.type(cap)
        out = np.divide(rows, scale, out=out)
        np.tanh(out, out=out)
        return np.multiply(out, scale, out=out)

    @staticmethod
    def softcap_slope(rows: np.ndarray, cap: float, out: np.ndarray | None = None) -> np.ndarray:
        """d/dz of ``cap * tanh(z / cap)`` at ``rows``: ``1 - tanh^2(z / cap)``, written
        ``1 / cosh^2(z / cap)`` (no cancellation where tanh is near +-1; 0 at +-inf)."""
        scale = rows.dtype.type(cap)
        out = np.divide(rows, scale, out=out)
        with np.errstate(over="ignore"):  # cosh(+-inf) = inf: a slope of 0
            np.cosh(out, out=out)
            np.square(out, out=out)
        return np.reciprocal(out, out=out)

    @staticmethod
    def multiply_into(target: np.ndarray, factor: np.ndarray) -> None:
        """target *= factor, elementwise, in place."""
        np.multiply(target, factor, out=target)

    @staticmethod
    def label_rows(labels: np.ndarray, num_classes: int | None = None,
                   ignore_index: int | None = None) -> np.ndarray:
        """Class ids as a C-contiguous int64 vector.

        Unsigned ids above 2**63 - 1 cannot be class ids and do not fit in int64: they
        raise here, with their true value (wrapping them to negative numbers would
        report a wrong value, or match a negative ignore_index and be skipped silently),
        naming the call's class count and ignore_index where the caller gives them.
        """
        if labels.dtype.kind == "u" and labels.dtype.itemsize == 8 and labels.size:
            too_big = labels > np.iinfo(np.int64).max
            if too_big.any():
                first = int(np.flatnonzero(too_big.reshape(-1))[0])
                position = tuple(int(i) for i in np.unravel_index(first, labels.shape))
                value = int(labels.reshape(-1)[first])
                raise ValueError(_validate.out_of_range_message(value, position, num_classes,
                                                                ignore_index))
        return np.ascontiguousarray(labels, dtype=np.int64).reshape(-1)

    @staticmethod
    def check_labels(labels: np.ndarray, batch_shape, num_classes: int, ignore_index,
                     enabled: bool = True) -> int | None:
        """Raise for a class id outside [0, C) that is not ignore_index.

        Always runs on the host (``enabled`` only matters on the GPU): host kernels
        index with the labels and rely on this check for memory safety.
        """
        in_range = _validate.check_label_range(labels.reshape(batch_shape), num_classes,
                                               ignore_index)
        # Every label a class id and ignore_index none of them: every row is kept, and
        # the caller's "mean" denominator needs no counting pass.
        return labels.size if in_range and not 0 <= ignore_index < num_classes else None

    @staticmethod
    def weight_vector(weight, num_classes: int, dtype: np.dtype) -> np.ndarray:
        if weight is None:
            return np.empty(0, dtype)
        w = np.asarray(weight)
        _validate.check_weight_dtype(w.dtype)
        _validate.check_weight_shape(w.shape, num_classes)
        with np.errstate(over="ignore"):  # an overflow is reported just below
            w = np.ascontiguousarray(w, dtype=dtype)
        _validate.check_weight_values(w)
        return w

    @staticmethod
    def kept_weight_total(labels: np.ndarray, weight: np.ndarray, ignore_index: int,
                          kept_rows: int | None = None) -> float:
        """Denominator of a "mean": sum of w[y] over kept rows (their count without w;
        ``kept_rows``, what check_labels returned, when it knew the count)."""
        if weight.shape[0] == 0:
            if kept_rows is not None:
                return float(kept_rows)
            return float(np.count_nonzero(labels != ignore_index))
        kept = labels != ignore_index
        return float(np.sum(weight[labels[kept]], dtype=np.float64))

    @staticmethod
    def empty(shape, dtype) -> np.ndarray:
        """Uninitialised output rows; large ones reuse dropped buffers of the same size
        (no page faults or zeroing of fresh memory; see ``_buffers``)."""
        return _buffers.HOST_CACHE.empty(shape, dtype)

    @staticmethod
    def full(shape, value, dtype) -> np.ndarray:
        return np.full(shape, value, dtype)

    @staticmethod
    def total(values: np.ndarray) -> float:
        """Sum in float64 (pairwise, deterministic)."""
        return float(np.sum(values, dtype=np.float64))

    @staticmethod
    def scalar(value: float, dtype: np.dtype, like):
        return np.dtype(dtype).type(value)

    @staticmethod
    def from_rows(rows: np.ndarray, batch_shape, axis: int, dtype: np.dtype, like):
        """Inverse of ``to_rows``: shape back, class axis back to ``axis``, in ``dtype``."""
        shaped = rows.reshape(tuple(batch_shape) + rows.shape[1:])
        if rows.ndim == 2 and axis != shaped.ndim - 1:
            shaped = np.moveaxis(shaped, -1, axis)
        return shaped.astype(dtype, copy=False)

    @staticmethod
    def rows_view(target: np.ndarray, axis: int, dtype: np.dtype):
        """A writeable (n, c) view of ``target`` the kernel can fill, or None."""
        moved = _class_axis_last(target, axis)
        if target.dtype != dtype or not moved.flags.c_contiguous or not target.flags.writeable:
            return None
        return moved.reshape(-1, moved.shape[-1])

    @staticmethod
    def write_back(target: np.ndarray, rows: np.ndarray, axis: int) -> None:
        moved = _class_axis_last(target, axis)
        np.copyto(moved, rows.reshape(moved.shape), casting="same_kind")

    @staticmethod
    def is_writeable(x) -> bool:
        return bool(getattr(getattr(x, "flags", None), "writeable", False))


HOST = HostArrays()


def is_device_array(obj) -> bool:
    """True for CUDA arrays (CuPy, Numba device arrays, PyTorch CUDA tensors).

    ``__cuda_ndarray__`` marks Numba's device arrays, including the CUDA simulator's,
    which have no ``__cuda_array_interface__``.
    """
    if isinstance(obj, np.ndarray):
        return False
    return hasattr(without_autograd(obj), "__cuda_array_interface__") or bool(
        getattr(type(obj), "__cuda_ndarray__", False)
    )


def without_autograd(obj):
    """``obj``, or for a PyTorch tensor that requires grad its ``detach()`` (a view of the
    same memory): PyTorch refuses to export such a tensor and raises RuntimeError, not
    AttributeError, when ``__cuda_array_interface__`` is read, which defeats ``hasattr``."""
    if getattr(obj, "requires_grad", False) and callable(getattr(obj, "detach", None)):
        return obj.detach()
    return obj
