"""xentfast on Dask arrays: exact cross-entropy over logits chunked along rows AND classes.

``cross_entropy``, ``cross_entropy_with_grad``, ``perplexity``, ``logsumexp``,
``log_softmax`` and ``softmax`` take ``dask.array`` logits of any chunking (NumPy arrays
are taken as one chunk), with xentfast's options (``weight``, ``ignore_index``,
``label_smoothing``, ``z_loss``, ``reduction``), and return Dask arrays: nothing runs
until ``.compute()`` / ``dask.compute`` / ``persist``, on whatever scheduler is active
(threads, processes, ``dask.distributed``).  The results equal ``xentfast``'s on the
materialised array within its accuracy bounds (README, "Semantics"), for any chunking.

How the graph is built
----------------------
* Class axis in one chunk (row-chunked logits, the common layout): every block is a
  whole set of rows, and one fused kernel call per block computes its per-row losses
  (and gradient) -- ``xentfast.cross_entropy(_with_grad)`` on the block, through
  ``da.apply_gufunc`` with the class axis as the core dimension.
* Class axis in several chunks: every block computes the row statistics of its classes
  (``xentfast._shards``: chunk max, the mass below it, the ties at it, the target logit
  if the block owns the label, the smoothing sums -- a few float64 numbers per row, by
  the backend's ``row_stats`` kernel); ``da.reduction`` merges them across the class
  chunks of each row block in a tree (``split_every``), exactly and associatively;
  a per-row epilogue gives the losses.  With the gradient, every block then computes its
  own columns from the merged row statistics -- the loss and the gradient share them
  when computed together: ``dask.compute(loss, grad)``.
* Reductions: per-row losses are summed in float64 (``da.sum``, ``split_every``);
  ``"mean"`` divides by the sum of ``weight[label]`` over kept rows (a small graph over
  the labels alone); the gradient of a ``"mean"`` takes that factor inside its blocks.

A graph has a few tasks per block (no per-element or per-row tasks); the weight vector
enters it once.  Labels may be chunked differently from the logits' rows: they are
rechunked to match.  A label outside ``[0, C)`` raises ``ValueError`` from the task
that reads it, naming the value and its position in the whole label array.

Memory per worker: one block of logits, plus (class-chunked, loss only) a few
float64 numbers per row, or (with the gradient) the gradient block and float64
temporaries of about 8 MB.  See the README's "Dask" section for the set-up.

CuPy-backed blocks: row-chunked ones are handed to ``xentfast.cross_entropy`` as they
are (its ``cuda`` backend); the class-chunked statistics have host kernels only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

try:
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised only without dask
    raise ImportError(
        "xentfast.dask needs Dask, which is not installed: pip install 'dask[array]' "
        "(add 'distributed' for a cluster; xentfast itself works without them)"
    ) from exc

import numpy as np

import xentfast as _xf

from . import _shards, _validate
from ._arrays import HOST, accumulation_dtype, is_device_array

__all__ = [
    "cross_entropy",
    "cross_entropy_with_grad",
    "log_softmax",
    "logsumexp",
    "perplexity",
    "softmax",
]

Reduction = Literal["mean", "sum", "none"]
_F = _shards.NUM_FIELDS


# ----------------------------------------------------------------------- the problem


@dataclass(frozen=True)
class _Problem:
    """One call, normalised: the logits with the class axis last, labels aligned to
    its rows (and classes, for probabilities), the options validated."""

    x: Any                      # dask array (..., C), class axis last
    y: Any                      # dask array: (...) ids, (..., C) probabilities, or None
    kind: str                   # "index", "probabilities" or "none"
    axis: int                   # the caller's class axis (normalised)
    dtype: np.dtype             # the logits' dtype: results take it
    compute: np.dtype           # what the kernels read (float32 for 16-bit)
    acc: np.dtype               # per-row losses of the fused kernels
    weight: np.ndarray | None   # (C,) validated, accumulation dtype
    w_arr: Any                  # dask (C,) chunked like the classes, or None
    ignore_index: int
    label_smoothing: float
    z_loss: float
    backend: str | None

    @property
    def nb(self) -> int:
        return self.x.ndim - 1

    @property
    def num_classes(self) -> int:
        return int(self.x.shape[-1])

    @property
    def batch(self) -> tuple[str, ...]:
        return tuple(f"b{i}" for i in range(self.nb))

    @property
    def class_chunked(self) -> bool:
        return len(self.x.chunks[-1]) > 1


def _as_dask(a, name: str):
    if isinstance(a, da.Array):
        arr = a
    else:
        arr = da.asarray(a)
    if any(math.isnan(c) for cs in arr.chunks for c in cs):
        raise ValueError(
            f"{name} has unknown chunk sizes (NaN); call {name}.compute_chunk_sizes() "
            "first (or pass lengths= to to_dask_array)")
    return arr


def _prepare(logits, labels, *, axis, weight, ignore_index, label_smoothing, z_loss,
             backend, need_labels: bool = True) -> _Problem:
    x = _as_dask(logits, "logits")
    dtype = _validate.check_float_dtype(np.dtype(x.dtype), "logits")
    shape = tuple(int(s) for s in x.shape)
    _validate.check_ndim(shape, "logits")
    if isinstance(axis, (tuple, list)) or axis is None:
        raise TypeError(
            f"axis must be one integer for Dask arrays; got {axis!r}. Reshape the array so "
            "that the classes lie along one axis")
    axis = _validate.normalize_axis(axis, len(shape))
    if need_labels:
        _validate.check_classes(shape[axis], shape, axis)
    ignore_index = _validate.check_ignore_index(ignore_index)
    label_smoothing = _validate.check_fraction(label_smoothing, "label_smoothing")
    z_loss = _validate.check_nonnegative(z_loss, "z_loss")
    compute = _shards.compute_dtype(dtype)
    acc = accumulation_dtype(compute)
    xm = x if axis == len(shape) - 1 else da.moveaxis(x, axis, -1)
    y, kind = None, "none"
    if need_labels:
        y = _as_dask(labels, "labels")
        kind = _validate.label_kind(np.dtype(y.dtype), tuple(int(s) for s in y.shape),
                                    shape, axis)
        if kind == "sparse":
            kind = "index"
            y = y.rechunk(xm.chunks[:-1])
            y = da.map_blocks(_checked_labels, y, dtype=y.dtype, num_classes=shape[axis],
                              ignore_index=ignore_index)
        else:
            kind = "probabilities"
            _validate.check_float_dtype(np.dtype(y.dtype), "labels")
            _validate.check_no_ignore_index_for_probabilities(ignore_index)
            if axis != len(shape) - 1:
                y = da.moveaxis(y, axis, -1)
            y = y.rechunk(xm.chunks)
    w = None
    w_arr = None
    if weight is not None:
        if isinstance(weight, da.Array):
            weight = weight.compute()
        w = HOST.weight_vector(weight, shape[axis], acc)
        w_arr = da.from_array(w, chunks=(xm.chunks[-1],))
    return _Problem(xm, y, kind, axis, dtype, compute, acc, w, w_arr, ignore_index,
                    label_smoothing, z_loss, backend)


# ----------------------------------------------------------------------- block tasks
#
# Module-level functions: a distributed worker imports them by name.


def _host(a) -> np.ndarray:
    """A host copy of a (small) device array -- labels -- or the host array itself."""
    return np.asarray(a.get() if is_device_array(a) and hasattr(a, "get") else a)


def _checked_labels(yb, *, num_classes: int, ignore_index: int, block_info=None):
    """The label block, after the range check: a bad label raises ValueError naming
    its position in the whole label array."""
    ids = _host(yb)
    if ids.size == 0:
        return yb
    if ids.dtype.kind == "u" and ids.dtype.itemsize == 8:
        HOST.label_rows(ids)  # ids beyond int64 raise with their true value
    ids = ids.astype(np.int64, copy=False)
    if ids.min() >= 0 and ids.max() < num_classes:
        return yb
    bad = ((ids < 0) | (ids >= num_classes)) & (ids != ignore_index)
    if bad.any():
        first = np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), ids.shape)
        start = [loc[0] for loc in block_info[0]["array-location"]] if block_info else \
            [0] * ids.ndim
        position = tuple(int(i) + int(s) for i, s in zip(first, start))
        raise ValueError(_validate.out_of_range_message(int(ids[first]), position,
                                                        num_classes, ignore_index))
    return yb


def _one_block(b):
    """A contracted index without concatenation hands a task a list of the blocks
    along it (here always one: the class axis is one chunk), or the block itself."""
    while isinstance(b, list):
        (b,) = b
    return b


def _pick(results, i: int):
    """Output ``i`` of a task that returned several."""
    return _one_block(results)[i]


def _fused_block(xb, yb, wb, scale, *, kind: str, with_grad: bool, ignore_index: int,
                 label_smoothing: float, z_loss: float, compute, backend):
    """One block of whole rows through the fused kernel: per-row losses (the
    accumulation dtype) and, with the gradient, the gradient of their sum times the
    reduction's factor ``scale``."""
    xb = _one_block(xb)
    yb = _one_block(yb)
    if not is_device_array(xb):  # CuPy blocks go to the cuda backend as they are
        xb = np.asarray(xb).astype(compute, copy=False)  # 16-bit: the float32 rows
        if kind == "probabilities":
            yb = np.asarray(yb).astype(compute, copy=False)
    weight = None if wb is None else _one_block(wb)
    kw = dict(reduction="none", weight=weight, ignore_index=ignore_index,
              label_smoothing=label_smoothing, z_loss=z_loss, backend=backend)
    if not with_grad:
        return _xf.cross_entropy(xb, yb, **kw)[..., None]
    factor = float(np.asarray(scale))
    loss, grad = _xf.cross_entropy_with_grad(xb, yb, **kw)
    if factor != 1.0:
        # in the gradient's dtype, in place: the factor and the product each rounded
        # once (1.5 ulps at most, against the 64 of the accuracy bound)
        np.multiply(grad, grad.dtype.type(factor), out=grad)
    return loss, grad


def _stats_block(xb, ids, yb, wb, *, kind: str, num_classes: int, ignore_index: int,
                 label_smoothing: float, compute, backend):
    """Packed row statistics (..., 1, F) of one block of classes (``ids``: their global
    ids, from which the block knows its offset)."""
    xb = np.asarray(xb)
    batch_shape = xb.shape[:-1]
    c = xb.shape[-1]
    offset = int(ids[0]) if len(ids) else 0
    x_rows = np.ascontiguousarray(xb, dtype=compute).reshape(-1, c)
    if kind == "index":
        y_rows = HOST.label_rows(np.asarray(yb))
    elif kind == "probabilities":
        y_rows = np.ascontiguousarray(yb, dtype=compute).reshape(-1, c)
    else:
        y_rows = None
    packed = _shards.chunk_rows(x_rows, y_rows, kind, offset, num_classes,
                                None if wb is None else np.asarray(wb), ignore_index,
                                label_smoothing, _shards.stats_kernels(backend))
    return packed.reshape(batch_shape + (1, _F))


def _identity(block, axis=None, keepdims=None):
    return block


def _combine(block, axis, keepdims):
    """Merge the class chunks concatenated along ``axis`` (statistics of their union)."""
    (ax,) = axis
    merged = _shards.combine_packed(block, axis=ax)
    return np.expand_dims(merged, ax) if keepdims else merged


def _finish_block(merged, *, what: str, kind: str, num_classes: int,
                  label_smoothing: float, z_loss: float):
    """Per-row float64 loss or lse (``what``) from merged statistics (..., F)."""
    if kind == "index":  # every kept row's label must have been found in one chunk
        owns = merged[..., _shards.FIELDS.index("owns")]
        kept = merged[..., _shards.FIELDS.index("kept")]
        if np.any(owns != kept):
            raise ValueError("a kept row's label lies in no class chunk")
    loss, lse, _, _ = _shards.finish_packed(merged, kind, num_classes, label_smoothing,
                                            z_loss)
    return loss if what == "loss" else lse


def _grad_block(xb, ids, yb, merged, wb, scale, *, kind: str, num_classes: int,
                ignore_index: int, label_smoothing: float, z_loss: float, compute,
                out_dtype, backend):
    """One block's gradient columns from the merged row statistics (the kernels of
    ``backend``, as the statistics: ``_shards.stats_kernels``)."""
    xb = np.asarray(xb)
    c = xb.shape[-1]
    offset = int(ids[0]) if len(ids) else 0
    x_rows = xb.astype(compute, copy=False).reshape(-1, c)  # read in blocks of rows
    n = x_rows.shape[0]
    p = np.asarray(merged, dtype=np.float64).reshape(n, _F)
    _, lse, big, rest = _shards.finish_packed(p, "none", num_classes, label_smoothing,
                                              z_loss)
    if kind == "index":
        y_rows = HOST.label_rows(np.asarray(yb))
    else:
        y_rows = np.ascontiguousarray(yb, dtype=compute).reshape(-1, c)
    out = np.empty((n, c), compute)
    _shards.grad_rows(x_rows, y_rows, kind, offset, num_classes,
                      None if wb is None else np.asarray(wb), ignore_index,
                      label_smoothing, z_loss, big, rest, lse,
                      p[:, _shards.FIELDS.index("coef_sum")],
                      p[:, _shards.FIELDS.index("label_weight")],
                      float(np.asarray(scale)), out,
                      kernels=_shards.stats_kernels(backend))
    return out.reshape(xb.shape).astype(out_dtype, copy=False)


def _label_weights(yb, wb, *, ignore_index: int):
    """Per-row weight[label] of kept rows (1 without weights), 0 for ignored rows."""
    y = _host(yb)
    kept = y != ignore_index
    out = np.zeros(y.shape, np.float64)
    out[kept] = 1.0 if wb is None else np.asarray(wb, dtype=np.float64)[y[kept]]
    return out


def _primitive_block(xb, merged, *, op: str, compute, out_dtype):
    """log_softmax or softmax of one block from the merged row statistics (float64 in
    blocks of rows, rounded once): (x - M) - log1p(r), or exp(x - M) / (1 + r)."""
    xb = np.asarray(xb)
    c = xb.shape[-1]
    x_rows = xb.astype(compute, copy=False).reshape(-1, c)
    p = np.asarray(merged, dtype=np.float64).reshape(-1, _F)
    _, _, big, rest = _shards.finish_packed(p, "none", 1, 0.0, 0.0)
    out = np.empty(x_rows.shape, compute)
    _shards.primitive_rows(x_rows, big, rest, op, out)
    return out.reshape(xb.shape).astype(out_dtype, copy=False)


# ----------------------------------------------------------------------- graph pieces


def _merged_stats(p: _Problem, split_every):
    """Merged packed statistics (..., F) of every row, through a tree over the class
    chunks.  Returns (merged, ids)."""
    x = p.x
    batch = p.batch
    ids = da.arange(p.num_classes, chunks=(x.chunks[-1],))
    y_ind = None if p.y is None else (batch if p.kind == "index" else batch + ("c",))
    w_args = (p.w_arr, ("c",)) if p.w_arr is not None else (None, None)
    stats = da.blockwise(
        _stats_block, batch + ("c", "f"), x, batch + ("c",), ids, ("c",), p.y, y_ind,
        *w_args, new_axes={"f": _F}, adjust_chunks={"c": 1}, dtype=np.float64,
        meta=np.empty((0,) * (p.nb + 2), np.float64), kind=p.kind,
        num_classes=p.num_classes, ignore_index=p.ignore_index,
        label_smoothing=p.label_smoothing, compute=p.compute, backend=p.backend)
    merged = da.reduction(
        stats, chunk=_identity, combine=_combine, aggregate=_combine, axis=p.nb,
        keepdims=False, dtype=np.float64, split_every=split_every, concatenate=True,
        meta=np.empty((0,) * (p.nb + 1), np.float64), name="xentfast-merge")
    return merged, ids


def _finish(p: _Problem, merged, what: str):
    return da.map_blocks(
        _finish_block, merged, drop_axis=p.nb, dtype=np.float64,
        meta=np.empty((0,) * p.nb, np.float64), what=what, kind=p.kind,
        num_classes=p.num_classes, label_smoothing=p.label_smoothing, z_loss=p.z_loss)


def _fused(p: _Problem, with_grad: bool, scale=None):
    """Row-chunked: (per-row losses[, gradient]) from one fused kernel call per block.

    Blockwise over the row blocks, the class axis (one chunk) contracted without
    concatenation (a block reaches the kernel as it is, uncopied).  With the gradient
    each task returns both, and two getitem layers split them (the way
    ``da.apply_gufunc`` splits several outputs)."""
    batch = p.batch
    y_ind = batch if p.kind == "index" else batch + ("c",)
    w_args = (p.w_arr, ("c",)) if p.w_arr is not None else (None, None)
    kw = dict(kind=p.kind, with_grad=with_grad, ignore_index=p.ignore_index,
              label_smoothing=p.label_smoothing, z_loss=p.z_loss, compute=p.compute,
              backend=p.backend)
    meta_rows = np.empty((0,) * p.nb, p.compute)
    if not with_grad:
        # the class index kept in the output (one entry per block), so that Dask fuses
        # the task that reads the block (e.g. from Zarr) with this one: the block is
        # never moved between workers
        kept = da.blockwise(_fused_block, batch + ("c",), p.x, batch + ("c",), p.y, y_ind,
                            *w_args, None, None, concatenate=False, dtype=p.compute,
                            adjust_chunks={"c": 1},
                            meta=np.empty((0,) * (p.nb + 1), p.compute), **kw)
        return kept[..., 0]
    both = da.blockwise(_fused_block, batch + ("c",), p.x, batch + ("c",), p.y, y_ind,
                        *w_args, scale, (), concatenate=False, dtype=p.compute,
                        meta=np.empty((0,) * (p.nb + 1), p.compute), **kw)
    rows = da.blockwise(_pick, batch, both, batch + ("c",), 0, None, concatenate=False,
                        dtype=p.compute, meta=meta_rows)
    grad = da.blockwise(_pick, batch + ("c",), both, batch + ("c",), 1, None,
                        concatenate=False, dtype=p.compute,
                        meta=np.empty((0,) * (p.nb + 1), p.compute))
    return rows, grad


def _denominator(p: _Problem, split_every):
    """The "mean" denominator: sum of weight[label] over kept rows (index labels), or
    the row count (probabilities), as a 0-d float64 Dask array."""
    if p.kind != "index":
        return da.asarray(np.float64(math.prod(int(s) for s in p.x.shape[:-1])))
    w_args = (p.w_arr, ("c",)) if p.w_arr is not None else (None, None)
    per_row = da.blockwise(_label_weights, p.batch, p.y, p.batch, *w_args,
                           concatenate=True, dtype=np.float64,
                           meta=np.empty((0,) * p.nb, np.float64),
                           ignore_index=p.ignore_index)
    return per_row.sum(dtype=np.float64, split_every=split_every)


def _rounded(block, *, to):
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, as one array gives
        return np.asarray(block).astype(to, copy=False)


def _cast(a, dtype):
    """``a`` rounded once to ``dtype`` (lazily, block by block)."""
    if a.dtype == dtype:
        return a
    index = tuple(range(a.ndim))
    return da.blockwise(_rounded, index, a, index, dtype=dtype,
                        meta=np.empty((0,) * a.ndim, dtype), to=dtype)


def _exp(block):
    with np.errstate(over="ignore"):  # a mean loss above ~709: perplexity inf
        return np.exp(block)


def _safe_reciprocal(den):
    """1 / den, or 0 for den == 0 (a mean over nothing kept is 0 with a zero gradient)."""
    nonzero = den != 0
    return da.where(nonzero, 1.0 / da.where(nonzero, den, 1.0), 0.0)


def _reduce(p: _Problem, rows, reduction: str, split_every, den=None):
    """The returned loss from per-row losses (float64 or the accumulation dtype)."""
    if reduction == "none":
        return _cast(rows, p.dtype)
    total = rows.sum(dtype=np.float64, split_every=split_every)
    if reduction == "mean":
        den = _denominator(p, split_every) if den is None else den
        total = total * _safe_reciprocal(den)
    return _cast(total, p.dtype)


def _mean_float64(p: _Problem, rows, split_every):
    total = rows.sum(dtype=np.float64, split_every=split_every)
    return total * _safe_reciprocal(_denominator(p, split_every))


def _back(p: _Problem, a):
    """The class axis back where the caller had it."""
    return a if p.axis == a.ndim - 1 else da.moveaxis(a, -1, p.axis)


# ----------------------------------------------------------------------- public


def _loss_rows(p: _Problem, split_every):
    if p.class_chunked:
        merged, _ = _merged_stats(p, split_every)
        return _finish(p, merged, "loss")
    return _fused(p, with_grad=False)


def cross_entropy(logits, labels, *, axis: int = -1, weight=None, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  reduction: Reduction = "mean", split_every: int | None = None,
                  backend: str | None = None):
    """:func:`xentfast.cross_entropy` of Dask-array logits of any chunking, lazily.

    Parameters
    ----------
    logits : dask.array.Array (or array_like: one chunk)
        Chunked along any axes, the class axis included.
    labels : dask.array.Array or array_like
        Class ids (the logits' shape without ``axis``) or probabilities (the logits'
        shape); rechunked to the logits' chunks.
    axis, weight, ignore_index, label_smoothing, z_loss, reduction
        As :func:`xentfast.cross_entropy` (``weight`` a NumPy vector of C entries).
    split_every : int, optional
        Fan-in of the tree reductions (over class chunks, and over rows for a sum or
        mean); Dask's default when None.
    backend : str, optional
        The xentfast backend inside the tasks.

    Returns
    -------
    dask.array.Array
        0-d for "mean"/"sum", the batch shape for "none"; the logits' dtype.
    """
    reduction = _validate.check_reduction(reduction)
    p = _prepare(logits, labels, axis=axis, weight=weight, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, z_loss=z_loss, backend=backend)
    return _reduce(p, _loss_rows(p, split_every), reduction, split_every)


def cross_entropy_with_grad(logits, labels, *, axis: int = -1, weight=None,
                            ignore_index: int = -100, label_smoothing: float = 0.0,
                            z_loss: float = 0.0, reduction: Reduction = "mean",
                            split_every: int | None = None, backend: str | None = None):
    """Loss and gradient of Dask-array logits, lazily; compute them together,
    ``loss, grad = dask.compute(loss, grad)``, so that they share the row statistics
    (row-chunked: one fused kernel call per block gives both).

    Same parameters as :func:`cross_entropy`.  ``grad`` has the logits' shape, chunks
    and dtype: the gradient of the returned loss (for "none", of the sum of the
    per-row losses).
    """
    reduction = _validate.check_reduction(reduction)
    p = _prepare(logits, labels, axis=axis, weight=weight, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, z_loss=z_loss, backend=backend)
    den = _denominator(p, split_every) if reduction == "mean" else None
    scale = _safe_reciprocal(den) if den is not None else da.asarray(np.float64(1.0))
    if not p.class_chunked:
        rows, grad = _fused(p, with_grad=True, scale=scale)
        grad = _cast(grad, p.dtype)
    else:
        merged, ids = _merged_stats(p, split_every)
        rows = _finish(p, merged, "loss")
        y_ind = p.batch if p.kind == "index" else p.batch + ("c",)
        w_args = (p.w_arr, ("c",)) if p.w_arr is not None else (None, None)
        grad = da.blockwise(
            _grad_block, p.batch + ("c",), p.x, p.batch + ("c",), ids, ("c",), p.y, y_ind,
            merged, p.batch + ("f",), *w_args, scale, (), concatenate=True,
            dtype=p.dtype, meta=np.empty((0,) * (p.nb + 1), p.dtype), kind=p.kind,
            num_classes=p.num_classes, ignore_index=p.ignore_index,
            label_smoothing=p.label_smoothing, z_loss=p.z_loss, compute=p.compute,
            out_dtype=p.dtype, backend=p.backend)
    return _reduce(p, rows, reduction, split_every, den), _back(p, grad)


def perplexity(logits, labels, *, axis: int = -1, weight=None, ignore_index: int = -100,
               label_smoothing: float = 0.0, z_loss: float = 0.0,
               split_every: int | None = None, backend: str | None = None):
    """exp of the mean cross-entropy over the kept tokens (weighted as ``"mean"``):
    a 0-d float64 Dask array (the exponential of the float64 mean, rounded once)."""
    p = _prepare(logits, labels, axis=axis, weight=weight, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, z_loss=z_loss, backend=backend)
    mean = _mean_float64(p, _loss_rows(p, split_every), split_every)
    return da.blockwise(_exp, (), mean, (), dtype=np.float64, meta=np.empty((), np.float64))


def _lse_rows(p: _Problem, split_every):
    merged, _ = _merged_stats(p, split_every)
    return merged, _finish(p, merged, "lse")


def logsumexp(x, axis: int = -1, *, keepdims: bool = False, split_every: int | None = None,
              backend: str | None = None):
    """``log(sum(exp(x)))`` along ``axis`` (one integer) of a Dask array, lazily."""
    p = _prepare(x, None, axis=axis, weight=None, ignore_index=-100, label_smoothing=0.0,
                 z_loss=0.0, backend=backend, need_labels=False)
    if p.num_classes == 0:
        out = da.full(p.x.shape[:-1], -np.inf, dtype=p.dtype, chunks=p.x.chunks[:-1])
    elif p.class_chunked:
        out = _cast(_lse_rows(p, split_every)[1], p.dtype)
    else:
        out = da.map_blocks(_xf.logsumexp, p.x, axis=-1, backend=backend, drop_axis=p.nb,
                            dtype=p.dtype, meta=np.empty((0,) * p.nb, p.dtype))
    return da.expand_dims(out, p.axis) if keepdims else out


def _primitive(x, axis, split_every, backend, op: str):
    p = _prepare(x, None, axis=axis, weight=None, ignore_index=-100, label_smoothing=0.0,
                 z_loss=0.0, backend=backend, need_labels=False)
    meta = np.empty((0,) * (p.nb + 1), p.dtype)
    if p.num_classes == 0 or not p.class_chunked:
        out = da.map_blocks(getattr(_xf, op), p.x, axis=-1, backend=backend, dtype=p.dtype,
                            meta=meta)
    else:
        merged, _ = _merged_stats(p, split_every)
        out = da.blockwise(_primitive_block, p.batch + ("c",), p.x, p.batch + ("c",),
                           merged, p.batch + ("f",), concatenate=True, dtype=p.dtype,
                           meta=meta, op=op, compute=p.compute, out_dtype=p.dtype)
    return _back(p, out)


def log_softmax(x, axis: int = -1, *, split_every: int | None = None,
                backend: str | None = None):
    """``x - logsumexp(x)`` along ``axis`` of a Dask array, lazily (same chunks)."""
    return _primitive(x, axis, split_every, backend, "log_softmax")


def softmax(x, axis: int = -1, *, split_every: int | None = None, backend: str | None = None):
    """``exp(x - logsumexp(x))`` along ``axis`` of a Dask array, lazily (same chunks)."""
    return _primitive(x, axis, split_every, backend, "softmax")
