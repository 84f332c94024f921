"""Public functions: validate -> normalise -> allocate -> kernel -> reduce.

Everything that is not per-row arithmetic happens here once, for all backends: input
checks, moving the class axis last and flattening leading dimensions into rows,
choosing and allocating outputs (``out=``, ``inplace=``), the reduction's denominator,
and the final float64 sum of the per-row losses.  The kernels (``xentfast.backends``)
only fill the arrays they are handed; their contract and the mathematics are in
``xentfast/backends/__init__.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from . import _dispatch, _validate
from ._arrays import HOST, accumulation_dtype, is_device_array

Reduction = Literal["mean", "sum", "none"]

__all__ = [
    "cross_entropy",
    "cross_entropy_with_grad",
    "log_softmax",
    "logsumexp",
    "softmax",
    "softmax_cross_entropy_with_logits",
    "sparse_softmax_cross_entropy_with_logits",
]


@dataclass(frozen=True)
class _Call:
    """One call's resolved backend: its kernels, its array operations, its dtypes."""

    kernels: Any
    arrays: Any
    dtype: np.dtype  # the caller's (native) dtype: outputs take it
    compute_dtype: np.dtype  # what the kernels read and write
    acc_dtype: np.dtype  # per-row losses and lse
    half: str | None = None  # raw 16-bit bits (uint16 arrays): "float16" or "bfloat16"

    @property
    def grad_dtype(self) -> np.dtype:
        """The gradient's dtype: the caller's, or the raw bits' uint16."""
        return self.compute_dtype if self.half else self.dtype

    def half_kwargs(self) -> dict:
        """The kernels' ``half=`` argument, for raw bits only (other calls pass none, so
        backends without 16-bit kernels keep their signature)."""
        return {"half": self.half} if self.half else {}


def _resolve(logits, *others, backend: str | None, name: str = "logits",
             half_ok: bool = False, half_bits: str | None = None):
    """Pick the backend, convert ``logits`` to an array and fix the dtypes.

    16-bit logits are computed in float32 (the precision rule); ``half_ok`` lets a
    backend that reads them natively (``NATIVE_HALF``: the bits widened in registers,
    the gradient rounded once into the 16-bit dtype) take them without a float32 copy.
    ``half_bits`` ("float16"/"bfloat16"): ``logits`` is uint16 memory holding the bits
    (PyTorch's bfloat16 with no NumPy bfloat16 type installed); losses come back
    float32, the gradient as bits."""
    on_device = is_device_array(logits) or any(is_device_array(o) for o in others)
    backend_name = _dispatch.resolve(backend, on_device)
    kernels = _dispatch.load(backend_name)
    arrays = getattr(kernels, "DEVICE", HOST) if backend_name == "cuda" else HOST
    arrays.start_call(logits, *others)
    x = arrays.asarray(logits)
    if half_bits is not None:
        if (np.dtype(x.dtype) != np.uint16
                or half_bits not in getattr(kernels, "NATIVE_HALF", ())):
            raise TypeError(
                f"raw {half_bits} bits need uint16 logits and a backend that reads them "
                f"natively; got dtype {x.dtype} and backend {backend_name!r}")
        f32 = np.dtype(np.float32)
        return x, _Call(kernels, arrays, f32, np.dtype(np.uint16), f32, half=half_bits)
    dtype = _validate.check_float_dtype(x.dtype, name)
    native = tuple(np.dtype(d) for d in kernels.NATIVE_DTYPES)
    native_half = getattr(kernels, "NATIVE_HALF", ()) if half_ok else ()
    compute = dtype if dtype in native or dtype.name in native_half else np.dtype(np.float32)
    return x, _Call(kernels, arrays, dtype, compute, accumulation_dtype(compute))


def _native_half_labels(y, call: _Call) -> bool:
    """Natively read 16-bit logits take index labels, or probabilities of their own
    dtype (read natively too); probabilities of another dtype are not rounded to 16
    bits: that call runs on float32 copies."""
    kind = np.dtype(y.dtype).kind
    return kind in "iu" or np.dtype(y.dtype) == call.compute_dtype


def _shape_axis(x, axis: int):
    shape = tuple(x.shape)
    _validate.check_ndim(shape, "logits")
    axis = _validate.normalize_axis(axis, len(shape))
    batch_shape = shape[:axis] + shape[axis + 1 :]
    return shape, axis, batch_shape, shape[axis]


def _cross_entropy(
    logits,
    labels,
    *,
    axis: int,
    weight,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
    backend: str | None,
    want_grad: bool,
    out=None,
    inplace: bool = False,
    return_lse: bool = False,
    check_labels: bool = True,
    labels_as_probabilities: bool = False,
    labels_as_indices: bool = False,
    broadcast_labels: bool = False,
    softcap: float | None = None,
    half_bits: str | None = None,
):
    reduction = _validate.check_reduction(reduction)
    softcap = _validate.check_softcap(softcap)
    ignore_index = _validate.check_ignore_index(ignore_index)
    label_smoothing = _validate.check_fraction(label_smoothing, "label_smoothing")
    z_loss = _validate.check_nonnegative(z_loss, "z_loss")
    inplace = _validate.check_flag(inplace, "inplace")
    return_lse = _validate.check_flag(return_lse, "return_lse")
    check_labels = _validate.check_flag(check_labels, "check_labels")
    x, call = _resolve(logits, labels, out, backend=backend, half_ok=softcap is None,
                       half_bits=half_bits)
    _validate.check_representable(z_loss, "z_loss", call.acc_dtype)
    arrays = call.arrays
    y = arrays.asarray(labels)
    if labels_as_indices and tuple(y.shape) == tuple(x.shape) and len(x.shape) > 1:
        raise ValueError(
            f"labels of shape {tuple(y.shape)} have the logits' shape, but this function "
            "takes class indices, one per row (shape of the logits without the class "
            "axis). For one-hot rows pass labels.argmax(axis=-1); for probabilities use "
            "softmax_cross_entropy_with_logits / categorical_crossentropy"
        )
    if half_bits is not None and (softcap is not None or np.dtype(y.dtype).kind not in "iu"):
        raise TypeError("raw 16-bit logits take index labels and no softcap; convert "
                        "probability labels and the logits to float32 first")
    if call.compute_dtype.itemsize == 2 and not _native_half_labels(y, call):
        call = replace(call, compute_dtype=np.dtype(np.float32))
    if broadcast_labels:
        x, y = _broadcast_pair(x, y, arrays)
    shape, axis, batch_shape, num_classes = _shape_axis(x, axis)
    _validate.check_classes(num_classes, shape, axis)

    if not arrays.on_device and np.dtype(y.dtype).kind == "O":
        _validate.check_object_labels(y, num_classes, ignore_index)
    if labels_as_probabilities and tuple(y.shape) == shape and y.dtype.kind in "iub":
        # TF casts one-hot labels to the logits' dtype; to_rows casts any array kind
        # (Numba device arrays have no .astype), the reshape restores the layout.
        y = arrays.to_rows(y, len(shape) - 1, call.compute_dtype).reshape(shape)
    if labels_as_indices and np.dtype(y.dtype).kind not in "iu":
        raise TypeError(
            f"labels must be integer class indices (int32 or int64); got dtype {y.dtype}. "
            "For probabilities use softmax_cross_entropy_with_logits"
        )
    kind = _validate.label_kind(np.dtype(y.dtype), tuple(y.shape), shape, axis)
    if labels_as_probabilities and kind != "dense":
        raise ValueError(
            f"labels must have the logits' shape {shape} (probabilities); got shape "
            f"{tuple(y.shape)}. For class indices use sparse_softmax_cross_entropy_with_logits"
        )
    if kind == "sparse" and reduction == "mean" and weight is not None \
            and not is_device_array(weight):
        weight, z_loss = _weights_for_mean(weight, z_loss, call.acc_dtype)
    w = arrays.weight_vector(weight, num_classes, call.acc_dtype)
    target = _grad_target(logits, x, out, inplace, shape, call) if want_grad else None

    n = math.prod(batch_shape)
    x_rows = arrays.to_rows(x, axis, call.compute_dtype)
    if kind == "sparse":
        y_rows = arrays.label_rows(y, num_classes, ignore_index)
        kept_rows = arrays.check_labels(y_rows, batch_shape, num_classes, ignore_index,
                                        check_labels)
        denominator = (
            arrays.kept_weight_total(y_rows, w, ignore_index, kept_rows)
            if reduction == "mean" else 1.0
        )
    else:
        _validate.check_float_dtype(y.dtype, "labels")
        _validate.check_no_ignore_index_for_probabilities(ignore_index)
        y_rows = arrays.to_rows(y, axis, call.compute_dtype)
        denominator = float(n) if reduction == "mean" else 1.0
    # "mean" with nothing kept is 0 with a zero gradient (not PyTorch's 0/0 = NaN).
    grad_scale = 1.0 / denominator if denominator != 0 else 0.0

    loss_rows = arrays.empty(n, call.acc_dtype)
    lse_rows = arrays.empty(n, call.acc_dtype)
    grad_rows, grad_in_target = None, False
    if want_grad:
        grad_rows, grad_in_target = _grad_rows(target, axis, n, num_classes, call)
        if grad_in_target and not arrays.on_device:
            grad_rows, grad_in_target, y_rows = _without_overlap(
                grad_rows, x_rows, y_rows if kind == "dense" else None, y_rows, n,
                num_classes, call)
    slope_rows = None
    if n and softcap is not None and call.acc_dtype == np.float32 and not arrays.on_device:
        _softcapped_in_float64(call.kernels, kind, x_rows, y_rows, w, ignore_index,
                               label_smoothing, z_loss, grad_scale, softcap, loss_rows,
                               lse_rows, grad_rows)
        x_capped = None
    elif n and softcap is not None:
        # Gemma 2's soft-capping: the kernels see cap * tanh(x / cap); the gradient
        # takes the chain factor 1 / cosh^2(x / cap) -- read from x before the kernel
        # when the gradient overwrites x's rows (inplace).
        if want_grad and grad_in_target and _may_alias(grad_rows, x_rows, inplace, arrays):
            slope_rows = arrays.softcap_slope(x_rows, softcap)
        x_capped = arrays.softcap(x_rows, softcap)
    else:
        x_capped = x_rows if softcap is None else None  # None: computed above
    if n and x_capped is not None:
        if kind == "sparse":
            call.kernels.sparse(x_capped, y_rows, w, ignore_index, label_smoothing, z_loss,
                                grad_scale, loss_rows, lse_rows, grad_rows,
                                **call.half_kwargs())
        else:
            call.kernels.dense(x_capped, y_rows, w, label_smoothing, z_loss, grad_scale,
                               loss_rows, lse_rows, grad_rows, **call.half_kwargs())
        if want_grad and softcap is not None:
            if slope_rows is None:
                slope_rows = arrays.softcap_slope(x_rows, softcap, out=x_capped)
            arrays.multiply_into(grad_rows, slope_rows)

    if reduction == "none":
        loss = arrays.from_rows(loss_rows, batch_shape, axis, call.dtype, like=x)
    else:
        total = arrays.total(loss_rows) if n else 0.0
        value = total * grad_scale if reduction == "mean" else total
        loss = arrays.scalar(value, call.dtype, like=x)
    results = [loss]
    if want_grad:
        results.append(_finish_grad(grad_rows, grad_in_target, target, batch_shape, axis,
                                    call, x))
    if return_lse:
        results.append(arrays.from_rows(lse_rows, batch_shape, axis, call.dtype, like=x))
    return results[0] if len(results) == 1 else tuple(results)


#: Bytes of float64 rows per block of the float64 soft-capping path (2 MiB: its NumPy
#: passes stay in cache; 32 MiB blocks made them 1.7-2.6x slower).
SOFTCAP_BLOCK_BYTES = 1 << 21


def _softcapped_in_float64(kernels, kind, x_rows, y_rows, w, ignore_index, label_smoothing,
                           z_loss, grad_scale, cap, loss_rows, lse_rows, grad_rows):
    """Soft-capped cross-entropy of float32 rows (16-bit ones arrive widened), computed
    in float64 a block of rows at a time and rounded once into the float32 outputs.

    Why not the float32 kernels on cap * tanh(x / cap) rounded to float32: each capped
    logit then carries up to half an ulp of cap (2**-19 for cap = 30), an absolute error
    that exp turns into a relative one of every e_j -- 64 ulps of a confident row's loss
    and 75 of its gradient at cap = 50, above the accuracy rule.  In float64 the capped
    logits are within 2**-53 cap of exact, and the results, rounded once, keep the
    float32 bounds.  The cost: float64 kernels and NumPy passes over five float64 blocks
    of at most SOFTCAP_BLOCK_BYTES (1.7-2.1x the float32 path's time, BENCHMARKS.md);
    rows are read before their gradient is written, so in place (grad_rows is x_rows)
    is safe."""
    n, c = x_rows.shape
    step = min(n, max(1, SOFTCAP_BLOCK_BYTES // (8 * max(c, 1))))
    w64 = w.astype(np.float64)
    # One set of block buffers, reused: fresh 2 MiB arrays per block would be mapped and
    # page-faulted every time.
    z_buf, e_buf, d_buf, c_buf = (np.empty((step, c)) for _ in range(4))
    g_buf = None if grad_rows is None else np.empty((step, c))
    loss64, lse64 = np.empty(step), np.empty(step)
    for r0 in range(0, n, step):
        k = min(n, r0 + step) - r0
        z, e, one_plus, capped = z_buf[:k], e_buf[:k], d_buf[:k], c_buf[:k]
        # With e = exp(-2 |z| / cap) (one float64 exp, no overflow for any z):
        #   cap tanh(z / cap) = sign(z) cap (1 - e) / (1 + e)   (1 - e loses bits only
        #   absolutely, ~cap 2**-53: nothing next to float32's needs), and the chain
        #   factor 1 / cosh^2(z / cap) = 4 e / (1 + e)^2, relative-exact at any z.
        np.copyto(z, x_rows[r0:r0 + k])
        np.abs(z, out=e)
        e *= -2.0 / cap
        with np.errstate(invalid="ignore"):  # NaN logits stay NaN
            np.exp(e, out=e)
        np.add(e, 1.0, out=one_plus)
        np.subtract(1.0, e, out=capped)
        capped /= one_plus
        capped *= cap
        np.copysign(capped, z, out=capped)
        y = y_rows[r0:r0 + k] if kind == "sparse" else y_rows[r0:r0 + k].astype(np.float64)
        g64 = None if g_buf is None else g_buf[:k]
        if kind == "sparse":
            kernels.sparse(capped, y, w64, ignore_index, label_smoothing, z_loss, grad_scale,
                           loss64[:k], lse64[:k], g64)
        else:
            kernels.dense(capped, y, w64, label_smoothing, z_loss, grad_scale, loss64[:k],
                          lse64[:k], g64)
        loss_rows[r0:r0 + k] = loss64[:k]
        lse_rows[r0:r0 + k] = lse64[:k]
        if g64 is not None:
            e *= 4.0
            one_plus *= one_plus
            e /= one_plus                     # 4 e / (1 + e)^2
            g64 *= e
            grad_rows[r0:r0 + k] = g64


def _weights_for_mean(weight, z_loss: float, acc_dtype: np.dtype):
    """(weight, z_loss) for a weighted "mean", scaled by a power of two 2**k when the
    weights are far from 1 (max |w| outside [2**-40, 2**40]) so that max |w| is in
    [0.5, 1).  The mean is the same for w and 2**k w: the weighted losses, z_loss (not
    weighted, but divided by the same sum of w[label]) and that sum all scale by 2**k,
    exactly.  Without it, weights of 1e-40 made 1 / sum w[label] overflow float32 (an
    infinite gradient) and left each w_y loss_y subnormal, and float64 weights of 1e-50
    became 0 in float32 (a mean of 0)."""
    w = np.asarray(weight)
    if w.dtype.kind != "f" or w.size == 0:
        return weight, z_loss
    with np.errstate(invalid="ignore"):
        big = float(np.max(np.abs(w)))
    if not (math.isfinite(big) and big > 0.0) or 2.0 ** -40 <= big <= 2.0 ** 40:
        return weight, z_loss  # NaN/inf/all-zero weights: the checks that follow say so
    k = -math.frexp(big)[1]
    z_scaled = math.ldexp(z_loss, k)
    with np.errstate(over="ignore"):
        if not np.isfinite(acc_dtype.type(z_scaled)):
            return weight, z_loss
    return np.ldexp(w.astype(np.float64), k), z_scaled


def _broadcast_pair(x, y, arrays):
    """Logits and probability labels broadcast against each other, as TensorFlow's
    ``softmax_cross_entropy_with_logits`` does (labels of shape (1, C) for every row;
    one row of logits for many label rows): NumPy's broadcasting rules, as zero-stride
    views.  Shapes that do not broadcast are left for the shape check's message."""
    x_shape, y_shape = tuple(x.shape), tuple(y.shape)
    if x_shape == y_shape or len(x_shape) == 0 or len(y_shape) == 0:
        return x, y
    try:
        shape = np.broadcast_shapes(x_shape, y_shape)
    except ValueError:
        return x, y
    return arrays.broadcast_to(x, shape), arrays.broadcast_to(y, shape)


def _may_alias(grad_rows, x_rows, inplace: bool, arrays) -> bool:
    """Whether writing the gradient may overwrite the logit rows (then anything still
    to be read from them must be read first)."""
    if arrays.on_device:
        return inplace
    return bool(np.may_share_memory(grad_rows, x_rows))


def _grad_target(given, x, out, inplace: bool, shape, call: _Call):
    """The caller's array the gradient must land in (``out`` or the logits), or None.

    ``given`` is the logits object as passed: ``inplace`` needs it to be the array
    itself (a list converted here has no memory the caller could see), or a device
    array that ``x`` views in place (a PyTorch CUDA tensor seen through Numba).
    """
    arrays = call.arrays
    if inplace and out is not None:
        raise ValueError("pass either out= or inplace=True, not both")
    if inplace:
        same_memory = (x is given or (arrays.on_device and is_device_array(given))
                       or _views_all_of(x, given))
        if not same_memory:
            raise ValueError(
                "inplace=True overwrites the logits with the gradient, so logits must be an "
                f"array; got {type(given).__name__}. Pass a NumPy (or CUDA) array, or use "
                "inplace=False"
            )
        if not arrays.is_writeable(x):
            raise ValueError(
                "inplace=True overwrites the logits with the gradient, but the logits are "
                "read-only. Pass a writeable array, or use inplace=False"
            )
        return x
    if out is not None:
        if not (is_device_array(out) or isinstance(out, np.ndarray)):
            raise TypeError(
                f"out must be an array of the logits' shape and dtype; got "
                f"{type(out).__name__}. Pass np.empty_like(logits), or out=None"
            )
        out = arrays.asarray(out)
        _validate.check_out(out.shape, out.dtype, arrays.is_writeable(out), shape, call.dtype)
        return out
    return None


def _views_all_of(x, given) -> bool:
    """True when x is the whole of the ndarray (subclass) ``given`` -- e.g. np.memmap,
    which np.asarray turns into a base-class view of the same memory."""
    if not isinstance(given, np.ndarray) or not isinstance(x, np.ndarray):
        return False
    return (x.__array_interface__["data"][0] == given.__array_interface__["data"][0]
            and x.shape == given.shape and x.strides == given.strides
            and x.dtype == given.dtype)


def _grad_rows(target, axis: int, n: int, c: int, call: _Call):
    """Where the kernel writes the gradient: straight into the target when its layout
    allows (for ``inplace`` that is the logits' own memory), else a fresh buffer.

    Returns (rows, True if the rows are a view of the target)."""
    arrays = call.arrays
    if target is not None:
        view = arrays.rows_view(target, axis, call.compute_dtype)
        if view is not None:
            return view, True
    return arrays.empty((n, c), call.compute_dtype), False


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)


def _without_overlap(grad_rows, x_rows, dense_rows, y_rows, n: int, c: int, call: _Call):
    """Host kernels read a row's logits (and probability labels) while they write its
    gradient; only the exact in-place identity (grad rows ARE the logit rows) is a
    layout they are written for.  Any other overlap -- out= shifted by a row against the
    logits, or the gradient landing on the labels -- would read values already
    overwritten.  So: a gradient that overlaps the logits otherwise is computed into a
    fresh buffer and copied into the target afterwards; labels that overlap the
    gradient are copied first.  Returns (grad_rows, grad_in_target, y_rows)."""
    if np.may_share_memory(grad_rows, x_rows) and not _same_view(grad_rows, x_rows) \
            and np.shares_memory(grad_rows, x_rows):
        return call.arrays.empty((n, c), call.compute_dtype), False, y_rows
    if dense_rows is not None and np.may_share_memory(grad_rows, dense_rows) \
            and np.shares_memory(grad_rows, dense_rows):
        y_rows = dense_rows.copy()
    return grad_rows, True, y_rows


def _finish_grad(grad_rows, grad_in_target: bool, target, batch_shape, axis: int,
                 call: _Call, x):
    arrays = call.arrays
    if target is None:
        return arrays.from_rows(grad_rows, batch_shape, axis, call.grad_dtype, like=x)
    if not grad_in_target:
        arrays.write_back(target, grad_rows, axis)
    return target


# --------------------------------------------------------------------------- public


def cross_entropy(
    logits,
    labels,
    *,
    axis: int = -1,
    weight=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Reduction = "mean",
    softcap: float | None = None,
    return_lse: bool = False,
    check_labels: bool = True,
    backend: str | None = None,
):
    """Softmax cross-entropy between logits and labels, as ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    logits : array_like
        Unnormalised scores, float16/bfloat16/float32/float64, any rank; the classes lie
        along ``axis``.  NumPy arrays, or CUDA arrays (``__cuda_array_interface__``).
    labels : array_like
        Either class indices (integers, the logits' shape without ``axis``) or class
        probabilities (floats, the logits' shape).
    axis : int, default -1
        The class axis (PyTorch's class dimension is 1; pass ``axis=1`` for its layout).
    weight : array_like of shape (C,), optional
        Per-class rescaling weights, exactly as PyTorch's ``weight``.
    ignore_index : int, default -100
        Class-index labels equal to it contribute neither loss nor gradient.
    label_smoothing : float in [0, 1], default 0
        Mixes the target with the uniform distribution: ``(1 - eps) t + eps / C``.
    z_loss : float >= 0, default 0
        Adds ``z_loss * lse**2`` per kept row (PaLM's auxiliary loss).
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the sum of ``weight[label]`` over kept rows (their count
        without weights; the number of rows for probability labels).  With no kept row
        the mean is 0.0, not NaN.
    softcap : float > 0, optional
        Soft-cap the logits first, ``softcap * tanh(logits / softcap)`` (Gemma 2); the
        gradient includes the chain factor ``1 - tanh^2``.  Costs one temporary of the
        logits' size (the capped rows).
    return_lse : bool, default False
        Also return the per-row log-sum-exp (the logits' shape without ``axis``).
    check_labels : bool, default True
        A class index outside ``[0, C)`` that is not ``ignore_index`` raises
        ``ValueError``.  On the ``cuda`` backend ``False`` skips the read-back of the
        kernel's error flag so the call stays asynchronous (such rows then give NaN);
        host backends always check, since the check is cheap there.
    backend : str, optional
        Run on this backend (see :func:`available_backends`) instead of the current one.

    Returns
    -------
    loss : scalar of the logits' dtype, or array for ``reduction="none"``
    lse : array, only with ``return_lse=True``
    """
    return _cross_entropy(
        logits, labels, axis=axis, weight=weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction,
        backend=backend, want_grad=False, return_lse=return_lse, check_labels=check_labels,
        softcap=softcap,
    )


def cross_entropy_with_grad(
    logits,
    labels,
    *,
    axis: int = -1,
    weight=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Reduction = "mean",
    softcap: float | None = None,
    return_lse: bool = False,
    check_labels: bool = True,
    out=None,
    inplace: bool = False,
    backend: str | None = None,
):
    """Loss and its gradient with respect to the logits, in one fused pass.

    Same parameters as :func:`cross_entropy`, plus:

    out : array, optional
        Preallocated gradient array (the logits' shape and dtype) to write into.
    inplace : bool, default False
        Overwrite the logits with the gradient (no extra memory): the caller gives up
        the logits.  The logits must be a writeable array.

    Returns
    -------
    loss : scalar or array (see :func:`cross_entropy`)
    grad : array of the logits' shape and dtype
        ``d loss / d logits``; for ``reduction="none"`` the gradient of the sum of the
        per-row losses (TensorFlow's ``backprop``).
    lse : array, only with ``return_lse=True``
    """
    return _cross_entropy(
        logits, labels, axis=axis, weight=weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction,
        backend=backend, want_grad=True, out=out, inplace=inplace, return_lse=return_lse,
        check_labels=check_labels, softcap=softcap,
    )


def softmax_cross_entropy_with_logits(labels, logits, axis: int = -1, *, backend: str | None = None):
    """Per-example loss for probability labels, as ``tf.nn.softmax_cross_entropy_with_logits``.

    ``labels`` have the logits' shape, or one that broadcasts against it (NumPy's rules,
    which include TensorFlow's: labels of shape (1, C) for every row, or one row of
    logits for many rows of labels); integer one-hot labels are cast to the logits'
    dtype, as TensorFlow does.  Returns an array of the broadcast shape without ``axis``.
    """
    return _cross_entropy(
        logits, labels, axis=axis, weight=None, ignore_index=-100, label_smoothing=0.0,
        z_loss=0.0, reduction="none", backend=backend, want_grad=False,
        labels_as_probabilities=True, broadcast_labels=True,
    )


def sparse_softmax_cross_entropy_with_logits(labels, logits, *, backend: str | None = None):
    """Per-example loss for class-index labels, as
    ``tf.nn.sparse_softmax_cross_entropy_with_logits`` (classes on the last axis).

    A label outside ``[0, num_classes)`` raises ``ValueError`` naming it and its place.
    """
    # TensorFlow has no ignore_index: every label must be a class.
    return _cross_entropy(
        logits, labels, axis=-1, weight=None, ignore_index=_validate.NO_IGNORE,
        label_smoothing=0.0, z_loss=0.0, reduction="none", backend=backend,
        want_grad=False, labels_as_indices=True,
    )


def _primitive(x, axis, backend, op: str):
    """Run row kernel ``op`` along ``axis``; ``axis=None`` treats all of ``x`` as one row.

    Returns the result in the caller's layout (the flattened one for ``axis=None``).
    """
    x, call = _resolve(x, backend=backend, name="x")
    arrays = call.arrays
    if len(x.shape) == 0:
        # A scalar is one row of one class (PyTorch: dim 0 or -1; NumPy/SciPy: None).
        if axis is not None:
            _validate.normalize_axis(axis, 1, "x")
        axis = None
    if axis is None:
        x = x.reshape(-1)
        axis = -1
    shape = tuple(x.shape)
    _validate.check_ndim(shape, "x")
    axis_ = _validate.normalize_axis(axis, len(shape), "x")
    batch_shape = shape[:axis_] + shape[axis_ + 1 :]
    num_classes = shape[axis_]
    n = math.prod(batch_shape)
    if op == "logsumexp":
        if num_classes == 0:  # the sum of no exponentials is 0: lse = -inf
            return arrays.from_rows(arrays.full(n, -np.inf, call.acc_dtype), batch_shape,
                                    axis_, call.dtype, like=x)
        rows_out = arrays.empty(n, call.acc_dtype)
    else:
        rows_out = arrays.empty((n, num_classes), call.compute_dtype)
    if n and num_classes:
        x_rows = arrays.to_rows(x, axis_, call.compute_dtype)
        getattr(call.kernels, op)(x_rows, rows_out)
    return arrays.from_rows(rows_out, batch_shape, axis_, call.dtype, like=x)


def _over_axes(x, axes, backend, op: str):
    """Row kernel ``op`` over several axes at once (NumPy's, SciPy's and Keras' tuple
    ``axis``): those axes moved last and merged into one row axis, the kernel, and the
    layout back.  Host arrays (a device array's merged axes would need a copy kernel
    per layout; pass one axis, or reshape it first)."""
    if is_device_array(x):
        raise TypeError(
            f"axis={axes!r}: several axes at once are supported for host arrays; got a CUDA "
            "array. Reshape it so the axes are one (e.g. x.reshape(n, -1)) and pass that axis"
        )
    x = np.asarray(x)
    _validate.check_ndim(tuple(x.shape), "x")
    axes = _validate.normalize_axes(axes, x.ndim, "x")
    last = tuple(range(x.ndim - len(axes), x.ndim))
    moved = np.moveaxis(x, axes, last)
    kept_shape = moved.shape[: x.ndim - len(axes)]
    rows = _primitive(moved.reshape(kept_shape + (-1,)), -1, backend, op)
    if op == "logsumexp":
        return rows
    return np.moveaxis(rows.reshape(moved.shape), last, axes)


def _is_axes(axis) -> bool:
    return isinstance(axis, (tuple, list))


def softmax(x, axis: int | tuple[int, ...] | None = -1, *, backend: str | None = None):
    """``exp(x - logsumexp(x))`` along ``axis`` (a tuple: over those axes together; None:
    over all elements), fused and stable."""
    if _is_axes(axis):
        return _over_axes(x, axis, backend, "softmax")
    return _primitive(x, axis, backend, "softmax").reshape(tuple(_shape_of(x)))


def log_softmax(x, axis: int | tuple[int, ...] | None = -1, *, backend: str | None = None):
    """``x - logsumexp(x)`` along ``axis`` (a tuple: over those axes together; None: over
    all elements), fused and stable."""
    if _is_axes(axis):
        return _over_axes(x, axis, backend, "log_softmax")
    return _primitive(x, axis, backend, "log_softmax").reshape(tuple(_shape_of(x)))


def logsumexp(x, axis: int | tuple[int, ...] | None = -1, *, keepdims: bool = False,
              backend: str | None = None):
    """``log(sum(exp(x)))`` along ``axis`` (a tuple: over those axes together; None: over
    all elements), without overflow.

    An empty axis gives ``-inf`` (the log of an empty sum), as in SciPy and PyTorch; a
    row holding ``+inf`` (and no NaN) gives ``+inf``, as there; a row of only ``-inf``
    gives NaN (README, "Semantics").
    """
    if _is_axes(axis):
        result = _over_axes(x, axis, backend, "logsumexp")
        reduced = _validate.normalize_axes(axis, len(_shape_of(x)), "x")
    else:
        result = _primitive(x, axis, backend, "logsumexp")
        ndim = len(_shape_of(x))
        reduced = (range(ndim) if axis is None or ndim == 0
                   else (_validate.normalize_axis(axis, ndim, "x"),))
    result = _infinite_rows(x, tuple(reduced), result)
    if not keepdims:
        return result
    shape = list(_shape_of(x))
    for d in reduced:
        shape[d] = 1
    return result.reshape(tuple(shape))


def _infinite_rows(x, reduced: tuple[int, ...], lse):
    """lse = +inf where the reduced slice holds +inf and no NaN.  The kernels' m + log s
    is +inf + log(NaN) there (+inf - +inf is NaN): log sum exp of a sum containing
    exp(+inf) = +inf is +inf (SciPy, PyTorch).  Host results only, and only a NaN result
    is looked at again: a call without NaN results pays one scan of its outputs."""
    if not isinstance(lse, (np.ndarray, np.generic)):
        return lse
    if not np.isnan(lse).any():
        return lse
    xa = np.asarray(x)
    if xa.dtype.kind not in "fc" and getattr(xa.dtype, "name", "") != "bfloat16":
        return lse
    xa = xa.astype(np.float32) if xa.dtype.itemsize == 2 else xa
    fix = np.isposinf(xa).any(axis=reduced) & ~np.isnan(xa).any(axis=reduced)
    if not fix.any():
        return lse
    lse = np.array(lse, copy=True)
    lse[np.asarray(fix)] = np.inf
    return lse[()] if lse.ndim == 0 else lse


def _shape_of(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
