"""Fused linear cross-entropy: the loss and gradients of ``hidden @ weight.T (+ bias)``
without ever holding the whole logits array.

The logits of a language model's head are the largest array of a training step
(8_192 tokens x 128_256 classes is 4 GB in float32, and as much again for their
gradient).  Here the rows are processed in chunks; per chunk of k rows:

    z   = h_c @ W.T (+ b)                       (k, V) logits, one BLAS call
    z  <- softcap * tanh(z / softcap)           optional (Gemma 2), in place; the
                                                chain factor 1/cosh^2 kept aside
    z  <- d(loss)/d(z)                          the fused kernel, in place: loss, lse
                                                and the gradient in one pass per row
    d_hidden[c]  = z @ W                        (k, d)
    d_weight    += z.T @ h_c                    in blocks of classes (no (V, d)
                                                temporary), accumulated in float32
                                                (float64 for float64 inputs)
    d_bias      += sum over the chunk's rows of z

so the extra memory is one (k, V) buffer (two with ``softcap``) plus small blocks, and
the result is exactly ``cross_entropy(hidden @ weight.T + bias, labels, ...)``: the same
kernels on the same logits (the chunking only changes which rows share a buffer).  The
"mean" denominator (sum of the kept rows' class weights) is known before the first
chunk, so every chunk's gradient is final when it is computed.  Rows whose label is
``ignore_index`` cost no matmul work unless their lse is asked for.

Threads: the BLAS calls (NumPy's BLAS, all cores) and the kernels (xentfast's threads)
run one after the other, never at once, so they do not oversubscribe the cores.
"""

from __future__ import annotations

import math

import numpy as np

from . import _dispatch, _validate
from ._arrays import HOST, accumulation_dtype, is_device_array

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad", "default_chunk_rows"]

#: Bytes of logits one chunk may hold by default (the (k, V) buffer; two of them with
#: softcap).  256 MiB is 523 float32 rows of a 128k vocabulary: measured on 2 cores
#: (4_096 x 512 x 128_256), 64 MiB chunks (130 rows) ran 1.34x the time of 256 MiB ones,
#: whose call took the time of the three unchunked matmuls; 512 MiB gained nothing.
CHUNK_BYTES = 256 * 2**20
#: The d_weight update runs in blocks of classes whose (block, d) temporary is at most
#: 1/BLOCK_FRACTION of the chunk buffer (and at least MIN_CLASS_BLOCK classes).
BLOCK_FRACTION = 32
MIN_CLASS_BLOCK = 256


def default_chunk_rows(n: int, num_classes: int, itemsize: int, buffers: int = 1) -> int:
    """Rows per chunk when ``chunk_size`` is not given: as many as fit CHUNK_BYTES of
    (k, V) buffers, at least 1, at most n."""
    per_row = max(1, num_classes * itemsize * buffers)
    return max(1, min(max(n, 1), CHUNK_BYTES // per_row))


def _check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be a positive integer (rows per chunk) or None; "
                        f"got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (rows per chunk) or None; "
                         f"got {chunk_size}")
    return int(chunk_size)


def _check_shapes(h: np.ndarray, w: np.ndarray, y: np.ndarray, bias) -> None:
    if h.ndim < 1:
        raise ValueError("hidden must have at least one dimension (..., d); got a 0-d array")
    if w.ndim != 2:
        raise ValueError(f"weight must be a 2-D array (num_classes, d), nn.Linear's layout; "
                         f"got shape {w.shape}")
    if w.shape[1] != h.shape[-1]:
        raise ValueError(
            f"hidden's last dimension ({h.shape[-1]}) must equal weight's second "
            f"({w.shape[1]}): logits = hidden @ weight.T with weight of shape "
            f"(num_classes, d); got hidden {h.shape}, weight {w.shape}"
        )
    if w.shape[0] == 0:
        raise ValueError(f"weight of shape {w.shape} has zero classes; cross-entropy needs "
                         "at least one class")
    if tuple(y.shape) != tuple(h.shape[:-1]):
        if y.dtype.kind == "f" and tuple(y.shape) == tuple(h.shape[:-1]) + (w.shape[0],):
            raise TypeError(
                "linear_cross_entropy takes class-index labels; probability labels are not "
                "supported (they would need the whole logits row set). Use cross_entropy "
                "on the materialised logits for them"
            )
        raise ValueError(f"labels must have hidden's shape without its last axis, "
                         f"{tuple(h.shape[:-1])}; got shape {tuple(y.shape)}")
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices; got dtype {y.dtype}. "
                        "Cast them, e.g. labels.astype(np.int64)")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"bias must have shape (num_classes,) = ({w.shape[0]},); got "
                         f"shape {tuple(bias.shape)}")


def _linear(hidden, weight, labels, *, bias, softcap, class_weight, ignore_index,
            label_smoothing, z_loss, reduction, chunk_size, return_lse, backend, want_grad,
            row_scale=None):
    """``row_scale`` (n,), for reduction="none" only: the gradients are those of
    sum_i row_scale[i] * loss_i (a per-row cotangent, as autograd's backward passes;
    the d_weight sum cannot be rescaled afterwards)."""
    reduction = _validate.check_reduction(reduction)
    ignore_index = _validate.check_ignore_index(ignore_index)
    return_lse = _validate.check_flag(return_lse, "return_lse")
    label_smoothing = _validate.check_fraction(label_smoothing, "label_smoothing")
    z_loss = _validate.check_nonnegative(z_loss, "z_loss")
    softcap = _validate.check_softcap(softcap)
    chunk_size = _check_chunk_size(chunk_size)
    if any(is_device_array(a) for a in (hidden, weight, labels, bias, class_weight)):
        raise TypeError(
            "linear_cross_entropy computes on the host: got a CUDA array. Pass NumPy "
            "arrays, or materialise the logits on the device and use cross_entropy"
        )

    h = np.asarray(hidden)
    w = np.asarray(weight)
    y = np.asarray(labels)
    b = None if bias is None else np.asarray(bias)
    dtype = _validate.check_float_dtype(h.dtype, "hidden")
    if _validate.check_float_dtype(w.dtype, "weight") != dtype or (
            b is not None and _validate.check_float_dtype(b.dtype, "bias") != dtype):
        raise TypeError(
            f"hidden, weight (and bias) must share one floating dtype; got hidden {h.dtype}, "
            f"weight {w.dtype}" + ("" if b is None else f", bias {b.dtype}")
            + ". Cast them, e.g. weight.astype(hidden.dtype)"
        )
    _check_shapes(h, w, y, b)
    batch_shape = tuple(h.shape[:-1])
    d = h.shape[-1]
    num_classes = w.shape[0]
    n = math.prod(batch_shape)

    name = _dispatch.resolve(backend, False)
    kernels = _dispatch.load(name)
    acc = accumulation_dtype(dtype)  # float32 arithmetic for 16-bit, float64 for float64
    h_rows = h.reshape(n, d)
    w_acc = np.ascontiguousarray(w, dtype=acc)  # no copy unless 16-bit or strided
    b_acc = None if b is None else np.ascontiguousarray(b, dtype=acc)

    y_rows = HOST.label_rows(y, num_classes, ignore_index) if n else np.zeros(0, np.int64)
    kept_count = HOST.check_labels(y_rows, batch_shape, num_classes, ignore_index) if n else 0
    class_w = HOST.weight_vector(class_weight, num_classes, acc)
    denominator = (HOST.kept_weight_total(y_rows, class_w, ignore_index, kept_count)
                   if reduction == "mean" else 1.0)
    grad_scale = 1.0 / denominator if denominator != 0 else 0.0
    if row_scale is not None:
        row_scale = np.ascontiguousarray(row_scale, dtype=acc).reshape(-1)
        if reduction != "none" or row_scale.shape[0] != n:
            raise ValueError("row_scale needs reduction='none' and one value per row")

    # Rows that need the matmul: all when lse is asked for (ignored rows have an lse
    # too), else only the kept ones.
    rows = None  # None: all rows, in order
    if not return_lse and kept_count != n:
        kept = np.flatnonzero(y_rows != ignore_index)
        rows = kept if kept.size != n else None
    work_rows = n if rows is None else rows.size

    buffers = 2 if (softcap is not None and want_grad) else 1
    k = chunk_size or default_chunk_rows(work_rows, num_classes, acc.itemsize, buffers)
    k = max(1, min(k, max(work_rows, 1)))
    logits_buf = np.empty((k, num_classes), acc) if work_rows else None
    slope_buf = np.empty((k, num_classes), acc) if (work_rows and buffers == 2) else None

    loss_rows = np.zeros(n, acc)
    lse_rows = np.zeros(n, acc)
    if want_grad:
        d_hidden = np.zeros((n, d), acc)
        d_weight = np.zeros((num_classes, d), acc)
        d_bias = np.zeros(num_classes, np.float64) if b is not None else None
        block = max(MIN_CLASS_BLOCK, (k * num_classes) // (BLOCK_FRACTION * max(d, 1)))
        block_tmp = np.empty((min(block, num_classes), d), acc)

    for start in range(0, work_rows, k):
        stop = min(start + k, work_rows)
        take = slice(start, stop) if rows is None else rows[start:stop]
        h_c = np.ascontiguousarray(h_rows[take], dtype=acc)
        y_c = np.ascontiguousarray(y_rows[take])
        z = logits_buf[: stop - start]
        np.matmul(h_c, w_acc.T, out=z)
        if b_acc is not None:
            z += b_acc
        slope = None
        if softcap is not None:
            if want_grad:
                slope = HOST.softcap_slope(z, softcap, out=slope_buf[: stop - start])
            HOST.softcap(z, softcap, out=z)
        loss_c = np.empty(stop - start, acc)
        lse_c = np.empty(stop - start, acc)
        kernels.sparse(z, y_c, class_w, ignore_index, label_smoothing, z_loss, grad_scale,
                       loss_c, lse_c, z if want_grad else None)
        loss_rows[take] = loss_c
        lse_rows[take] = lse_c
        if not want_grad:
            continue
        if slope is not None:
            z *= slope
        if row_scale is not None:
            z *= row_scale[take, None]
        if rows is None:
            np.matmul(z, w_acc, out=d_hidden[take])
        else:
            d_hidden[take] = z @ w_acc
        _accumulate_weight_grad(d_weight, z, h_c, block_tmp)
        if d_bias is not None:
            d_bias += np.sum(z, axis=0, dtype=np.float64)

    if reduction == "none":
        loss = loss_rows.reshape(batch_shape).astype(dtype)
    else:
        total = float(np.sum(loss_rows, dtype=np.float64))
        loss = dtype.type(total * grad_scale if reduction == "mean" else total)
    results = [loss]
    if want_grad:
        results.append(d_hidden.reshape(h.shape).astype(dtype, copy=False))
        results.append(d_weight.astype(dtype, copy=False))
        if d_bias is not None:
            results.append(d_bias.astype(dtype))
    if return_lse:
        results.append(lse_rows.reshape(batch_shape).astype(dtype))
    return results[0] if len(results) == 1 else tuple(results)


def _accumulate_weight_grad(d_weight: np.ndarray, g: np.ndarray, h: np.ndarray,
                            block_tmp: np.ndarray) -> None:
    """d_weight += g.T @ h in blocks of classes: a literal ``d_weight += g.T @ h`` would
    allocate a (V, d) temporary, as large as the output."""
    num_classes = d_weight.shape[0]
    step = block_tmp.shape[0]
    for v0 in range(0, num_classes, step):
        v1 = min(v0 + step, num_classes)
        tmp = block_tmp[: v1 - v0]
        np.matmul(g[:, v0:v1].T, h, out=tmp)
        d_weight[v0:v1] += tmp


def linear_cross_entropy(
    hidden, weight, labels, *, bias=None, softcap: float | None = None, class_weight=None,
    ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
    reduction: str = "mean", chunk_size: int | None = None, return_lse: bool = False,
    backend: str | None = None,
):
    """Cross-entropy of the logits ``hidden @ weight.T (+ bias)``, never materialised.

    Exactly ``cross_entropy(hidden @ weight.T + bias, labels, weight=class_weight,
    ignore_index=..., label_smoothing=..., z_loss=..., reduction=..., softcap=...)`` with
    the class axis last, computed ``chunk_size`` rows at a time.

    Parameters
    ----------
    hidden : array (..., d)
        The classifier's inputs (float16/bfloat16/float32/float64).
    weight : array (V, d)
        The classifier's weight in ``torch.nn.Linear``'s layout; hidden's dtype.
    labels : integer array of hidden's shape without its last axis
        Class indices (probability labels are not supported here).
    bias : array (V,), optional
    softcap : float > 0, optional
        Soft-cap the logits, ``softcap * tanh(z / softcap)`` (Gemma 2).
    class_weight, ignore_index, label_smoothing, z_loss, reduction
        As ``weight``, ``ignore_index``, ... of :func:`xentfast.cross_entropy`.
    chunk_size : int, optional
        Rows per chunk.  Default: as many as fit 256 MiB of (chunk, V) logits in the
        working dtype (float32 for 16-bit and float32 inputs, float64 for float64),
        at least one row.  The extra memory of the call is one such buffer (two with
        ``softcap``), plus 1/32 of it for the d_weight blocks (and, for 16-bit or
        strided inputs, a chunk of ``hidden`` and the weight in the working dtype).
    return_lse : bool
        Also return the per-row log-sum-exp (hidden's shape without its last axis).
    backend : str, optional
        The host backend whose kernels run between the matmuls.

    16-bit inputs are computed in float32 (the weight converted once, the gradients
    accumulated in float32 and rounded once at the end).
    """
    return _linear(hidden, weight, labels, bias=bias, softcap=softcap,
                   class_weight=class_weight, ignore_index=ignore_index,
                   label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction,
                   chunk_size=chunk_size, return_lse=return_lse, backend=backend,
                   want_grad=False)


def linear_cross_entropy_with_grad(
    hidden, weight, labels, *, bias=None, softcap: float | None = None, class_weight=None,
    ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
    reduction: str = "mean", chunk_size: int | None = None, return_lse: bool = False,
    backend: str | None = None,
):
    """Loss and gradients of :func:`linear_cross_entropy`, in one chunked pass.

    Returns ``(loss, d_hidden, d_weight)``, or ``(loss, d_hidden, d_weight, d_bias)``
    when ``bias`` is given, with ``lse`` appended when ``return_lse=True``: the gradients
    of the returned loss (for ``reduction="none"``: of the sum of the per-row losses),
    in the inputs' shapes and dtypes.
    """
    return _linear(hidden, weight, labels, bias=bias, softcap=softcap,
                   class_weight=class_weight, ignore_index=ignore_index,
                   label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction,
                   chunk_size=chunk_size, return_lse=return_lse, backend=backend,
                   want_grad=True)
