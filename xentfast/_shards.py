"""Class-chunked cross-entropy: per-chunk row statistics and their exact merge.

When the classes of a row are split into chunks -- a vocabulary sharded over devices
(Megatron, flash-attn's ``process_group``), a Dask array chunked along the class axis --
no single place holds a whole row.  Each chunk computes a few numbers per row
(:func:`shard_stats`), the numbers of all chunks are merged (:func:`merge_shard_stats`,
associative and order independent), and every chunk then computes its own columns of
the gradient from the merged row totals (:func:`shard_grad`).  The result is the
cross-entropy of the whole row, within the accuracy bounds of the single-array
functions (README, "Semantics").

The statistics of one chunk k (one row x, its classes c in the chunk)
---------------------------------------------------------------------
Computed by the backend's ``row_stats`` kernel (the row passes of the fused kernels,
without their per-row epilogue), in the accumulation dtype within the row and float64
across blocks of it:

    m_k  = max_{c in k} x_c                      the chunk's maximum
    u_k  = sum_{c in k, x_c != m_k} e^(x_c - m_k)   the mass off the chunk's maximum
    t_k  = #{c in k: x_c == m_k}                 the ties at it (an integer)
                                                 s_k = sum_{c in k} e^(x_c - m_k) = t_k + u_k
    x_y  the target logit, where the chunk owns the (kept) row's label y, with w_y
    A_k  = sum_{c in k} a_c                      the smoothing coefficients' sum:
                                                 a_c = w_c (index labels, with smoothing;
                                                 the ones without weights), or
                                                 a_c = w_c ((1 - eps) p_c + eps / C)
                                                 (probability labels p)
    D_k  = sum_{c in k, a_c != 0} a_c (m_k - x_c)   each term >= 0 for a_c >= 0

A chunk whose row is all -inf has no maximum to shift by: it is (m_k, s_k) = (-inf, 0),
i.e. t_k = u_k = 0 and D_k = sum_{a_c != 0} a_c * (+inf) (the distance of a masked
class is infinite whatever it is measured from) -- never -inf - (-inf).

The merge (any set of chunks, in any order; the statistics of the union)
------------------------------------------------------------------------
    M = max_k m_k
    t = sum_{k: m_k = M} t_k
    u = sum_{k: m_k = M} u_k + sum_{k: m_k < M} s_k e^(m_k - M)
    x_y, w_y: from the one chunk that owns y;   A = sum_k A_k
    D = sum_k [A_k (M - m_k) + D_k]              (the A_k term dropped where m_k = -inf)

This is the same statistic of the union as of each chunk -- t counts the ties at the
union's maximum, u the mass off it -- so merging is associative: a tree of merges
(Dask's ``split_every``, a hierarchical all-reduce) gives the same numbers as one merge
of everything, up to the order of float64 additions.  Every term of u is >= 0, and
e^(m_k - M) is the exponential of an exact difference (float32 maxima differ exactly
in float64; a float64 difference carries its TwoSum error into e^d (1 + err)).
D_k's terms were measured from m_k; A_k (M - m_k) moves them to M exactly in exact
arithmetic: sum a_c (M - x_c) = sum a_c [(M - m_k) + (m_k - x_c)].

The row's results (rowmath's forms, C the GLOBAL class count)
-------------------------------------------------------------
    r     = u + (t - 1)           the mass of every class but ONE maximum (s = 1 + r);
                                  t = 0 (every chunk -inf) has no distribution: NaN
    log s = log1p(r);  lse = M + log s
    index label y, weights w, smoothing eps, z-loss z, W = A = sum_c w_c:
      loss = (1 - eps) w_y ((M - x_y) + log s) + (eps / C) (W log s + D) + z lse^2
    probability labels (T = A):
      loss = T log s + D + z lse^2
Never lse - x_y and never W lse - sum w x: in a confident row r is tiny and exact here
(a sum of non-negative terms), where 1 + r or lse would have rounded it away.  Label
smoothing uses the global C and the global sums W and D -- a chunk's own size or sums
would be wrong (the vocabulary-parallel bug of taking the local shard size).  The
merge is carried out in float64, and each result is rounded once to the logits' dtype.

The gradient of chunk k's columns (index labels; the row totals M, r, lse, W)
-----------------------------------------------------------------------------
    e_j = e^(x_j - M)   (float64, from the exact difference, as above)
    g_j = e_j a - (eps / C) w_j gs,    a = ((1 - eps) w_y + eps W / C + 2 z lse) gs / s
    g_y = gs (p_y (eps W / C + 2 z lse) - ((1 - eps) w_y ((1 - e_y) + r) / s
              + (eps / C) w_y))          in the chunk that owns y: p_y - 1 without
                                         cancellation, -((1 - e_y) + r) / s
and for probability labels g_j = ((e_j A' - a_j) - a_j r) gs / s, A' = T + 2 z lse.
These need the row's (M, r) -- not lse alone, whose rounding would cost the true-class
gradient of a confident row all its digits -- so :func:`merge_shard_stats` returns
them (``return_totals=True``) for :func:`shard_grad`.  gs is the reduction's factor
(1 for "sum"/"none"; 1 / sum of w_y over kept rows for "mean").  The cpu backend
computes the columns in one compiled pass (``shard_grad_rows``,
``backends/_numba_shards.py``); :func:`grad_rows_numpy` is the same in NumPy.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np

from . import _dispatch, _validate
from ._arrays import HOST, accumulation_dtype, is_device_array
from .backends import rowmath

__all__ = [
    "RowTotals",
    "ShardStats",
    "combine_shard_stats",
    "merge_shard_stats",
    "shard_grad",
    "shard_stats",
]

Reduction = Literal["mean", "sum", "none"]

#: The per-row statistics, in the order of the packed (..., F) float64 form that the
#: Dask adapter moves between tasks.
FIELDS = ("m", "u", "t", "target", "owns", "label_weight", "kept", "coef_sum", "dist")
NUM_FIELDS = len(FIELDS)
_M, _U, _T, _TARGET, _OWNS, _LW, _KEPT, _CSUM, _DIST = range(NUM_FIELDS)

#: elements of a block of rows of the gradient (and softmax) pass: its float64
#: temporaries (1 MB each) stay in the core's cache
_ROW_BLOCK_ELEMS = 1 << 17


class ShardStats(NamedTuple):
    """The statistics of one chunk of classes (or of a merged set of chunks), per row.

    Every array has the batch shape (the logits' shape without the class axis) and
    dtype float64 (``owns`` and ``kept``: bool).  See the module docstring for the
    mathematics.

    Attributes
    ----------
    m : chunk maximum (-inf for a row that is all -inf in the chunk)
    u : sum of exp(x - m) over the entries below the maximum
    t : number of entries equal to the maximum
    target : the target logit x_y where this chunk owns the row's label, else 0
    owns : whether this chunk owns the row's label (kept rows only)
    label_weight : w_y where this chunk owns the label (1 without weights), else 0
    kept : the row's label is not ``ignore_index`` (probability labels: always)
    coef_sum : sum of the smoothing coefficients over the chunk (0 when unused)
    dist : sum of coefficient * (m - x) over the chunk (0 when unused)
    classes : the half-open class ranges covered, e.g. ((0, 4096),)
    num_classes : the global class count C
    kind : "index" or "probabilities"
    label_smoothing, z_loss : the options the statistics were taken with
    dtype : the logits' dtype (results are returned in it)
    inputs : a digest of what every chunk must be given alike -- index labels, class
        weights, ignore_index -- compared by the merge ("" : not known)
    """

    m: np.ndarray
    u: np.ndarray
    t: np.ndarray
    target: np.ndarray
    owns: np.ndarray
    label_weight: np.ndarray
    kept: np.ndarray
    coef_sum: np.ndarray
    dist: np.ndarray
    classes: tuple[tuple[int, int], ...]
    num_classes: int
    kind: str
    label_smoothing: float
    z_loss: float
    dtype: np.dtype
    inputs: str = ""


class RowTotals(NamedTuple):
    """The merged statistics :func:`shard_grad` needs, per row (float64, batch shape):
    ``m`` the row maximum M, ``rest`` r = s - 1 (the mass of every class but one
    maximum), ``lse`` = M + log1p(r), ``coef_sum`` the global coefficient sum (W or T)."""

    m: np.ndarray
    rest: np.ndarray
    lse: np.ndarray
    coef_sum: np.ndarray


# ----------------------------------------------------------------------- kernels


def stats_kernels(backend: str | None):
    """The kernel module computing the statistics: ``backend`` (or the current one)
    when it has the ``row_stats`` op, else the best host backend that has it ("cpu",
    else the NumPy reference)."""
    name = _dispatch.resolve(backend, on_device=False)
    kernels = _dispatch.load(name)
    if hasattr(kernels, "row_stats"):
        return kernels
    for fallback in ("cpu", "numpy"):
        if fallback in _dispatch.available_backends():
            return _dispatch.load(fallback)
    raise AssertionError("the numpy backend is always available")  # pragma: no cover


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 stays; float32 and the 16-bit dtypes are read as float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# ----------------------------------------------------------------------- row forms
#
# The functions below work on (n, c) rows and (n, F) packed statistics; the public
# functions and the Dask adapter bring their arrays to these forms.


def _no_maximum_distance(coef: np.ndarray) -> np.ndarray:
    """D of rows without a finite maximum: sum_{a != 0} a * inf, per row of ``coef``
    ((n, c)): +inf, -inf, NaN for both signs, 0 when every coefficient is 0."""
    pos = np.any(coef > 0, axis=1)
    neg = np.any(coef < 0, axis=1)
    return np.where(pos & neg, np.nan, np.where(pos, np.inf, np.where(neg, -np.inf, 0.0)))


def chunk_rows(x: np.ndarray, y: np.ndarray | None, kind: str, class_offset: int,
               num_classes: int, w_chunk: np.ndarray | None, ignore_index: int,
               label_smoothing: float, kernels) -> np.ndarray:
    """Packed statistics (n, F) of the (n, c) rows ``x`` (C-contiguous, float32 or
    float64) of the classes [class_offset, class_offset + c).

    ``y``: index labels (n,) int64 (global ids; a kept label outside [0, C) is owned by
    no chunk, and the merge reports it), probability rows (n, c) of x's dtype, or None
    (kind "none": logsumexp alone); ``w_chunk``: the chunk's (c,) class weights in the
    accumulation dtype, or None."""
    n, c = x.shape
    acc = accumulation_dtype(x.dtype)
    out = np.zeros((n, NUM_FIELDS), np.float64)
    if kind == "index":
        kept = y != ignore_index
        local = y - class_offset
        owns = kept & (local >= 0) & (local < c)
        rows = np.flatnonzero(owns)
        cols = local[rows]
        out[:, _KEPT] = kept
        out[:, _OWNS] = owns
        out[rows, _LW] = w_chunk[cols] if w_chunk is not None else 1.0
        out[rows, _TARGET] = x[rows, cols]
    else:
        out[:, _KEPT] = 1.0
    if c == 0:  # no classes: the empty chunk (m, s) = (-inf, 0)
        out[:, _M] = -np.inf
        return out
    if w_chunk is None:
        w_chunk = np.ones(c, acc)
    empty_probs = np.empty((0, 0), x.dtype)
    if kind == "probabilities":
        coef, probs = w_chunk, y
    elif kind == "index" and label_smoothing:
        coef, probs = w_chunk, empty_probs
    else:
        coef, probs = np.empty(0, acc), empty_probs
    m = np.empty(n, x.dtype)
    u = np.empty(n, np.float64)
    t = np.empty(n, np.float64)
    coef_sum = np.zeros(n, np.float64)
    dist = np.zeros(n, np.float64)
    eps = float(label_smoothing)
    kernels.row_stats(x, coef, probs, 1.0 - eps, eps / num_classes, m, u, t, coef_sum, dist)
    # A row with no finite maximum in this chunk: all -inf is the empty mass (-inf, 0);
    # a NaN keeps its NaN sums (the whole row's loss is NaN, as in one array).
    none = np.flatnonzero(m == -np.inf)
    if none.size:
        fix = none[~np.isnan(x[none]).any(axis=1)]
        u[fix] = 0.0
        t[fix] = 0.0
        if coef.shape[0]:
            a = np.broadcast_to(coef, (fix.size, c)) if probs.shape[0] == 0 else \
                rowmath.smoothed_weight(coef, probs[fix].astype(acc), acc.type(1.0 - eps),
                                        acc.type(eps / num_classes))
            dist[fix] = _no_maximum_distance(np.asarray(a))
    out[:, _M] = m
    out[:, _U] = u
    out[:, _T] = t
    out[:, _CSUM] = coef_sum
    out[:, _DIST] = dist
    return out


def _exp_of_exact_difference(a: np.ndarray, b: np.ndarray, xp=None) -> np.ndarray:
    """exp(a - b) in float64 for float64 a, b (broadcast), with the rounding error of
    a - b (TwoSum) carried into exp(d) (1 + err); exact differences (float32 data)
    have err = 0.  A -inf in a gives 0.  ``xp``: the array namespace (default this
    module's NumPy; ``tf.experimental.numpy`` for xentfast.keras's XLA path)."""
    xp = np if xp is None else xp
    d = a - b
    bb = d - a
    err = (a - (d - bb)) + (-b - bb)
    e = xp.exp(d)
    return xp.where(xp.isfinite(err), e + e * err, e)


def exp_rows(x: np.ndarray, big: np.ndarray) -> np.ndarray:
    """e = exp(x - M) in float64 for a block of rows x (float32 or float64) and their
    maxima M (float64, (n, 1)): float32 data differ exactly in float64 (one pass, in
    place); float64 data carry the rounding of x - M (``_exp_of_exact_difference``)."""
    if x.dtype == np.float64:
        return _exp_of_exact_difference(x, big)
    e = x.astype(np.float64)
    np.subtract(e, big, out=e)
    return np.exp(e, out=e)


def row_blocks(n: int, c: int):
    """(r0, r1) ranges of rows of about _ROW_BLOCK_ELEMS elements."""
    step = max(1, _ROW_BLOCK_ELEMS // max(c, 1))
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def combine_packed(p: np.ndarray, axis: int = -2) -> np.ndarray:
    """Merge packed statistics along ``axis`` (the parts; F is the last axis): the
    statistics of the union of the parts' classes (module docstring, "The merge").
    The parts are added in their order along ``axis``."""
    p = np.moveaxis(np.asarray(p, dtype=np.float64), axis, -2)
    m = p[..., _M]
    u = p[..., _U]
    t = p[..., _T]
    out = np.empty(p.shape[:-2] + (NUM_FIELDS,), np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        big = np.max(m, axis=-1)  # NaN propagates
        at_max = m == big[..., None]
        below = ~at_max
        finite_below = below & (m != -np.inf)
        # e^(m_k - M) only where m_k < M: never -inf - (-inf)
        factor = np.zeros_like(m)
        if below.any():
            bigb = np.broadcast_to(big[..., None], m.shape)
            factor[below] = _exp_of_exact_difference(m[below], bigb[below])
        out[..., _M] = big
        out[..., _T] = np.sum(np.where(at_max, t, 0.0), axis=-1)
        out[..., _U] = np.sum(np.where(at_max, u, (t + u) * factor), axis=-1)
        gap = np.zeros_like(m)
        if finite_below.any():
            gap[finite_below] = np.broadcast_to(big[..., None], m.shape)[finite_below] \
                - m[finite_below]
        csum = p[..., _CSUM]
        moved = np.where(gap != 0, csum * gap, 0.0)
        out[..., _DIST] = np.sum(moved + p[..., _DIST], axis=-1)
    for f in (_TARGET, _OWNS, _LW, _CSUM):
        out[..., f] = np.sum(p[..., f], axis=-1)
    out[..., _KEPT] = np.max(p[..., _KEPT], axis=-1) if p.shape[-2] else 0.0
    return out


def finish_packed(p: np.ndarray, kind: str, num_classes: int, label_smoothing: float,
                  z_loss: float):
    """(loss, lse, M, r) per row, float64, from merged packed statistics (..., F);
    loss is None for kind "none"."""
    p = np.asarray(p, dtype=np.float64)
    big = p[..., _M]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        rest = rowmath.rest_mass(p[..., _U], p[..., _T], 1.0)
        rest = np.where(p[..., _T] > 0, rest, np.nan)  # t = 0: no finite maximum
        log_s = np.log1p(rest)
        lse = rowmath.log_sum_exp(big, log_s)
        if kind == "none":
            return None, lse, big, rest
        eps = float(label_smoothing)
        z = float(z_loss)
        if kind == "index":
            # (eps / C) (W log s + D) as eps ((W / C) log s + D / C): the same in exact
            # arithmetic, and an infinite D stays infinite for an eps so small that
            # eps / C would underflow to 0 (0 * inf = NaN)
            if eps:
                w_sum, wd = p[..., _CSUM] / num_classes, p[..., _DIST] / num_classes
            else:
                w_sum, wd = 0.0, 0.0
            loss = rowmath.sparse_loss(big, log_s, p[..., _TARGET], p[..., _LW], 1.0 - eps,
                                       eps, w_sum, wd, z)
            loss = np.where(p[..., _KEPT] != 0, loss, 0.0)
        else:
            loss = rowmath.dense_loss(big, log_s, p[..., _CSUM], p[..., _DIST], z)
    return loss, lse, big, rest


def grad_rows(x: np.ndarray, y: np.ndarray, kind: str, class_offset: int,
              num_classes: int, w_chunk: np.ndarray | None, ignore_index: int,
              label_smoothing: float, z_loss: float, big: np.ndarray, rest: np.ndarray,
              lse: np.ndarray, coef_sum, label_weight, grad_scale,
              out: np.ndarray, kernels=None) -> None:
    """The chunk's gradient columns into ``out`` (n, c): module docstring, "The
    gradient".  Row totals ``big`` (M), ``rest`` (r), ``lse``: (n,) float64;
    ``coef_sum``: W (index labels with smoothing) or T (probabilities) per row, a
    scalar or (n,); ``label_weight``: w_y of kept rows (n,) (index labels);
    ``w_chunk``: the chunk's (c,) class weights or None; ``grad_scale``: a float or
    (n,).  Computed in float64, rounded once into ``out``.

    ``kernels`` (default: ``stats_kernels(None)``, chosen as the statistics are): where
    it has the ``shard_grad_rows`` op (the cpu backend) that compiled kernel runs, one
    pass over the elements; else :func:`grad_rows_numpy`, the same formulas in NumPy.
    The two differ only by their exponentials (the backend's is within 1 ulp of
    np.exp): float32 results agree to 1 ulp, nearly always bitwise; float64 ones to
    about an ulp of the terms (``_numba_shards``' docstring)."""
    kernels = stats_kernels(None) if kernels is None else kernels
    op = getattr(kernels, "shard_grad_rows", None)
    if op is None:
        op = grad_rows_numpy
    op(x, y, kind, class_offset, num_classes, w_chunk, ignore_index, label_smoothing,
       z_loss, big, rest, lse, coef_sum, label_weight, grad_scale, out)


def grad_rows_numpy(x: np.ndarray, y: np.ndarray, kind: str, class_offset: int,
                    num_classes: int, w_chunk: np.ndarray | None, ignore_index: int,
                    label_smoothing: float, z_loss: float, big: np.ndarray,
                    rest: np.ndarray, lse: np.ndarray, coef_sum, label_weight, grad_scale,
                    out: np.ndarray) -> None:
    """:func:`grad_rows` in NumPy (numpy-only installs, and its test oracle): float64
    blocks of rows, temporaries of a block's size, rounded once into ``out``."""
    n, c = x.shape
    if n == 0 or c == 0:
        return
    eps = float(label_smoothing)
    z = float(z_loss)
    eps_c = eps / num_classes
    w64 = np.ones(c) if w_chunk is None else np.asarray(w_chunk, dtype=np.float64)
    gs_all = np.broadcast_to(np.asarray(grad_scale, dtype=np.float64), (n,))
    sums = np.broadcast_to(np.asarray(coef_sum if coef_sum is not None else 0.0,
                                      dtype=np.float64), (n,))
    if kind == "index":
        kept = y != ignore_index
        local = y - class_offset
        owns = kept & (local >= 0) & (local < c)
        w_y = np.where(kept, np.broadcast_to(np.asarray(label_weight, np.float64), (n,)), 0.0)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for r0, r1 in row_blocks(n, c):
            rb, lb = rest[r0:r1], lse[r0:r1]
            gs = gs_all[r0:r1]
            g = exp_rows(x[r0:r1], big[r0:r1, None])  # e_j, float64, becomes g_j
            if kind == "index":
                wy = w_y[r0:r1]
                w_sum = sums[r0:r1] if eps else 0.0
                rows = np.flatnonzero(owns[r0:r1])
                cols = local[r0:r1][rows]
                e_y = g[rows, cols]
                a = rowmath.sparse_scale(1.0, rb, lb, wy, 1.0 - eps, eps_c, w_sum, z, gs)
                g *= a[:, None]
                if eps:
                    g -= np.multiply.outer(gs, eps_c * w64)
                g[rows, cols] = rowmath.sparse_true_grad(
                    1.0, e_y, rb[rows], lb[rows], wy[rows], 1.0 - eps, eps_c,
                    w_sum[rows] if eps else 0.0, z, gs[rows])
                g[~kept[r0:r1]] = 0.0
            else:
                wt = rowmath.smoothed_weight(w64[None, :], y[r0:r1].astype(np.float64),
                                             1.0 - eps, eps_c)
                coef = rowmath.dense_coef(lb, sums[r0:r1], z)
                gos = rowmath.grad_over_sum(1.0, rb, gs)
                g = rowmath.dense_grad(g, wt, rb[:, None], coef[:, None], 0.0, gos[:, None])
            out[r0:r1] = g


def primitive_rows(x: np.ndarray, big: np.ndarray, rest: np.ndarray, op: str,
                   out: np.ndarray) -> None:
    """log_softmax ((x - M) - log1p(r)) or softmax (e^(x - M) / (1 + r)) of (n, c)
    rows from their merged totals, in float64 blocks of rows, rounded once into
    ``out``."""
    n, c = x.shape
    with np.errstate(invalid="ignore", over="ignore"):
        for r0, r1 in row_blocks(n, c):
            mb = big[r0:r1, None]
            if op == "log_softmax":
                v = x[r0:r1].astype(np.float64)
                np.subtract(v, mb, out=v)
                np.subtract(v, np.log1p(rest[r0:r1])[:, None], out=v)
            else:
                v = exp_rows(x[r0:r1], mb)
                np.divide(v, (1.0 + rest[r0:r1])[:, None], out=v)
            out[r0:r1] = v


# ----------------------------------------------------------------------- validation


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r} of type "
                        f"{type(value).__name__}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be >= {low}; got {value}")
    return value


class _Chunk(NamedTuple):
    x_rows: np.ndarray
    y_rows: np.ndarray
    kind: str
    batch_shape: tuple[int, ...]
    axis: int
    dtype: np.dtype
    weight: np.ndarray
    class_offset: int
    num_classes: int
    ignore_index: int
    label_smoothing: float
    z_loss: float


def _to_rows(a: np.ndarray, axis: int, dtype: np.dtype, batch_shape) -> np.ndarray:
    """(n, c) C-contiguous rows, class axis last (a chunk may have no classes)."""
    moved = np.moveaxis(a, axis, -1) if axis != a.ndim - 1 else a
    n = int(np.prod(batch_shape, dtype=np.int64))
    return np.ascontiguousarray(moved, dtype=dtype).reshape(n, moved.shape[-1])


def _prepare(logits_chunk, labels, class_offset, num_classes, weight, ignore_index,
             label_smoothing, z_loss, axis) -> _Chunk:
    if is_device_array(logits_chunk) or is_device_array(labels):
        raise TypeError(
            "shard statistics run on host arrays; got a CUDA array. Copy the chunk to the "
            "host (e.g. cupy.asnumpy(x) or tensor.cpu().numpy()), or use "
            "xentfast.cross_entropy on whole rows on the GPU")
    x = np.asarray(logits_chunk)
    dtype = _validate.check_float_dtype(x.dtype, "logits_chunk")
    shape = tuple(x.shape)
    _validate.check_ndim(shape, "logits_chunk")
    axis = _validate.normalize_axis(axis, len(shape), "logits_chunk")
    c = shape[axis]
    num_classes = _check_int(num_classes, "num_classes", 1)
    class_offset = _check_int(class_offset, "class_offset", 0)
    if class_offset + c > num_classes:
        raise ValueError(
            f"the chunk's classes [{class_offset}, {class_offset + c}) do not lie in "
            f"[0, num_classes={num_classes}); class_offset is the global id of the "
            "chunk's first class, num_classes the size of the whole class axis")
    ignore_index = _validate.check_ignore_index(ignore_index)
    label_smoothing = _validate.check_fraction(label_smoothing, "label_smoothing")
    z_loss = _validate.check_nonnegative(z_loss, "z_loss")
    compute = compute_dtype(dtype)
    w = HOST.weight_vector(weight, num_classes, accumulation_dtype(compute))
    y = np.asarray(labels)
    kind = _validate.label_kind(np.dtype(y.dtype), tuple(y.shape), shape, axis)
    batch_shape = shape[:axis] + shape[axis + 1:]
    if kind == "sparse":
        y_rows = HOST.label_rows(y, num_classes, ignore_index)
        _validate.check_label_range(y_rows.reshape(batch_shape), num_classes, ignore_index)
        kind = "index"
    else:
        _validate.check_float_dtype(y.dtype, "labels")
        _validate.check_no_ignore_index_for_probabilities(ignore_index)
        y_rows = _to_rows(y, axis, compute, batch_shape)
        kind = "probabilities"
    x_rows = _to_rows(x, axis, compute, batch_shape)
    return _Chunk(x_rows, y_rows, kind, batch_shape, axis, dtype, w, class_offset,
                  num_classes, ignore_index, label_smoothing, z_loss)


# ----------------------------------------------------------------------- public


def shard_stats(logits_chunk, labels, *, class_offset: int, num_classes: int, weight=None,
                ignore_index: int = -100, label_smoothing: float = 0.0,
                z_loss: float = 0.0, axis: int = -1,
                backend: str | None = None) -> ShardStats:
    """Per-row statistics of one chunk of classes, for an exact merge across chunks.

    For a vocabulary split over devices or a class-chunked array: each holder of a
    chunk calls this on its columns, the (small) statistics of all chunks are gathered,
    and :func:`merge_shard_stats` finishes the loss and log-sum-exp exactly.

    Parameters
    ----------
    logits_chunk : array_like
        The chunk's columns of the logits: ``c_k`` classes along ``axis``.
    labels : array_like
        Class indices -- GLOBAL ids in ``[0, num_classes)`` or ``ignore_index``, of the
        batch shape -- or probabilities of the chunk's shape (this chunk's columns).
    class_offset : int
        Global id of the chunk's first class.
    num_classes : int
        The size C of the whole class axis (label smoothing mixes in ``1 / C``).
    weight : array_like of shape (num_classes,), optional
        The FULL class-weight vector (as for :func:`cross_entropy`).
    ignore_index, label_smoothing, z_loss, axis
        As for :func:`cross_entropy`; every chunk must be given the same ones.
    backend : str, optional
        The kernels (a backend without the statistics kernel -- cython, cuda -- uses
        "cpu", else "numpy").

    Returns
    -------
    ShardStats
        A named tuple of float64 arrays of the batch shape (a few numbers per row) and
        the options; picklable, so it can be gathered across processes.

    Raises
    ------
    ValueError
        A label outside ``[0, num_classes)`` that is not ``ignore_index`` (naming it
        and its position), a chunk outside ``[0, num_classes)``, bad options.
    """
    ch = _prepare(logits_chunk, labels, class_offset, num_classes, weight, ignore_index,
                  label_smoothing, z_loss, axis)
    c = ch.x_rows.shape[1]
    packed = chunk_rows(ch.x_rows, ch.y_rows, ch.kind, ch.class_offset, ch.num_classes,
                        _weight_chunk(ch.weight, ch.class_offset, c), ch.ignore_index,
                        ch.label_smoothing, stats_kernels(backend))
    return _unpack(packed.reshape(ch.batch_shape + (NUM_FIELDS,)),
                   ((ch.class_offset, ch.class_offset + c),) if c else (), ch.num_classes,
                   ch.kind, ch.label_smoothing, ch.z_loss, ch.dtype, _inputs_digest(ch))


def _inputs_digest(ch) -> str:
    """What every chunk must share, as a short digest: the index labels (probability
    labels are each chunk's own columns), the class weights, ignore_index."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((ch.kind, ch.ignore_index, ch.weight.dtype.str)).encode())
    h.update(np.ascontiguousarray(ch.weight).tobytes())
    if ch.kind == "index":
        h.update(np.ascontiguousarray(ch.y_rows, dtype=np.int64).tobytes())
    return h.hexdigest()


def _weight_chunk(weight: np.ndarray, class_offset: int, c: int) -> np.ndarray | None:
    return weight[class_offset:class_offset + c] if weight.shape[0] else None


def _unpack(packed: np.ndarray, classes, num_classes, kind, label_smoothing, z_loss,
            dtype, inputs: str = "") -> ShardStats:
    fields = {name: np.ascontiguousarray(packed[..., i]) for i, name in enumerate(FIELDS)}
    fields["owns"] = fields["owns"] != 0
    fields["kept"] = fields["kept"] != 0
    return ShardStats(**fields, classes=tuple(classes), num_classes=num_classes, kind=kind,
                      label_smoothing=label_smoothing, z_loss=z_loss, dtype=np.dtype(dtype),
                      inputs=inputs)


def _pack(stats: ShardStats) -> np.ndarray:
    return np.stack([np.asarray(getattr(stats, name), dtype=np.float64) for name in FIELDS],
                    axis=-1)


def _union_of_ranges(stats_list: Sequence[ShardStats]) -> tuple[tuple[int, int], ...]:
    """The sorted, coalesced class ranges of all parts; ValueError if two overlap."""
    ranges = sorted(r for s in stats_list for r in s.classes)
    merged: list[list[int]] = []
    for start, stop in ranges:
        if merged and start < merged[-1][1]:
            raise ValueError(
                f"the statistics overlap: classes [{start}, {stop}) and "
                f"[{merged[-1][0]}, {merged[-1][1]}) are both covered; each class must "
                "belong to exactly one chunk")
        if merged and start == merged[-1][1]:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    return tuple((a, b) for a, b in merged)


def _check_compatible(stats_list: Sequence[ShardStats]) -> ShardStats:
    if isinstance(stats_list, ShardStats) or not len(stats_list):
        raise ValueError("stats_list must be a non-empty sequence of ShardStats (one per "
                         "chunk of classes)")
    first = stats_list[0]
    for s in stats_list:
        if not isinstance(s, ShardStats):
            raise TypeError(f"stats_list must hold ShardStats (from shard_stats); got "
                            f"{type(s).__name__}")
        for name in ("num_classes", "kind", "label_smoothing", "z_loss", "dtype"):
            if getattr(s, name) != getattr(first, name):
                raise ValueError(
                    f"the statistics were taken with different options: {name} = "
                    f"{getattr(first, name)!r} and {getattr(s, name)!r}; every chunk "
                    "must be given the same num_classes, labels kind, label_smoothing, "
                    "z_loss and logits dtype")
        if s.m.shape != first.m.shape:
            raise ValueError(f"the statistics are of different rows: batch shapes "
                             f"{first.m.shape} and {s.m.shape}")
        if s.inputs and first.inputs and s.inputs != first.inputs:
            raise ValueError(
                "the statistics were taken with different labels, class weights or "
                "ignore_index: every chunk must be given the same (global) index labels, "
                "the same full weight vector and the same ignore_index")
    return first


def combine_shard_stats(stats_list: Sequence[ShardStats]) -> ShardStats:
    """The statistics of the union of the chunks' classes (associative: combine
    groups of chunks, then the groups, in any order -- a tree all-reduce).  The chunks
    need not be adjacent; none may overlap.  Order independent: the parts are combined
    in the order of their first class."""
    first = _check_compatible(stats_list)
    classes = _union_of_ranges(stats_list)
    ordered = sorted(stats_list, key=lambda s: s.classes[0][0] if s.classes else -1)
    packed = combine_packed(np.stack([_pack(s) for s in ordered], axis=-2))
    return _unpack(packed, classes, first.num_classes, first.kind, first.label_smoothing,
                   first.z_loss, first.dtype, first.inputs)


def merge_shard_stats(stats_list: Sequence[ShardStats], *, reduction: Reduction = "none",
                      return_totals: bool = False):
    """Finish the loss and log-sum-exp from the statistics of every chunk of classes.

    Parameters
    ----------
    stats_list : sequence of ShardStats
        From :func:`shard_stats` (or :func:`combine_shard_stats`) on chunks that
        partition the classes ``[0, num_classes)``, in any order.
    reduction : {"none", "mean", "sum"}, default "none"
        As for :func:`cross_entropy` (``"mean"`` divides by the sum of ``weight[y]``
        over kept rows, or the row count for probability labels; 0 with none kept).
    return_totals : bool, default False
        Also return the :class:`RowTotals` that :func:`shard_grad` needs.

    Returns
    -------
    loss : per-row array (``"none"``) or scalar, in the logits' dtype
    lse : per-row log-sum-exp, in the logits' dtype
    totals : RowTotals, only with ``return_totals=True``

    Equal to ``cross_entropy(logits, labels, reduction=..., <same options>)`` and
    ``logsumexp(logits)`` on the whole array within the accuracy bounds (README,
    "Semantics"); computed in float64 and rounded once.
    """
    reduction = _validate.check_reduction(reduction)
    return_totals = _validate.check_flag(return_totals, "return_totals")
    merged = combine_shard_stats(stats_list)
    if merged.classes != ((0, merged.num_classes),):
        raise ValueError(
            f"the statistics cover the classes {list(merged.classes)}, not all of "
            f"[0, {merged.num_classes}); pass the statistics of every chunk of the "
            "class axis")
    packed = _pack(merged)
    loss_rows, lse, big, rest = finish_packed(packed, merged.kind, merged.num_classes,
                                              merged.label_smoothing, merged.z_loss)
    if merged.kind == "index" and np.any(packed[..., _OWNS] != packed[..., _KEPT]):
        raise ValueError("a kept row's label is owned by no chunk (or by several): the "
                         "chunks were given different labels")
    loss = reduce_rows(loss_rows, reduction, merged.dtype,
                       merged.label_weight if merged.kind == "index" else None)
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, as one array gives
        result = (loss, lse.astype(merged.dtype))
    if return_totals:
        result += (RowTotals(big, rest, lse, np.asarray(merged.coef_sum)),)
    return result


def reduce_rows(loss_rows: np.ndarray, reduction: str, dtype: np.dtype,
                label_weight: np.ndarray | None):
    """The returned loss from float64 per-row losses: the rows in ``dtype`` ("none"),
    or their float64 sum ("sum"), divided by the sum of ``label_weight`` (index labels)
    or the row count ("mean"; 0 when that is 0), rounded once to ``dtype``."""
    with np.errstate(over="ignore"):
        if reduction == "none":
            return loss_rows.astype(dtype)
        total = float(np.sum(loss_rows, dtype=np.float64))
        if reduction == "mean":
            den = (float(np.sum(label_weight, dtype=np.float64)) if label_weight is not None
                   else float(loss_rows.size))
            total = total / den if den != 0 else 0.0
        return np.dtype(dtype).type(total)


def shard_grad(logits_chunk, labels, lse, *, class_offset: int, num_classes: int,
               weight=None, ignore_index: int = -100, label_smoothing: float = 0.0,
               z_loss: float = 0.0, axis: int = -1, grad_scale: float = 1.0):
    """The chunk's columns of the gradient of the SUM of the per-row losses.

    Parameters
    ----------
    logits_chunk, labels, class_offset, num_classes, weight, ignore_index,
    label_smoothing, z_loss, axis
        As given to :func:`shard_stats` for this chunk.
    lse : RowTotals or array_like
        The ``totals`` of ``merge_shard_stats(..., return_totals=True)`` -- the row
        maximum and rest mass, which keep the true-class gradient of confident rows
        exact.  A plain per-row log-sum-exp array is accepted for index labels; the
        gradient is then exact only to the rounding of lse (``p_y - 1`` of a row whose
        loss is below ulp(lse) comes out as 0).
    grad_scale : float, default 1.0
        Multiplies the gradient: the reduction's factor -- 1 for ``"sum"``/``"none"``,
        ``1 / sum of weight[y] over kept rows`` for ``"mean"`` (``1 / rows`` for
        probability labels).

    Returns
    -------
    array of the chunk's shape and the logits' dtype (computed in float64, rounded
    once).
    """
    ch = _prepare(logits_chunk, labels, class_offset, num_classes, weight, ignore_index,
                  label_smoothing, z_loss, axis)
    n = ch.x_rows.shape[0]
    if isinstance(lse, RowTotals):
        parts = [np.asarray(v, dtype=np.float64) for v in lse]
        for v in parts:
            if v.shape != ch.batch_shape:
                raise ValueError(f"the row totals have shape {v.shape}; the chunk's rows "
                                 f"have the batch shape {ch.batch_shape}")
        big, rest, row_lse, coef_sum = (v.reshape(n) for v in parts)
    else:
        if ch.kind != "index":
            raise ValueError(
                "the gradient for probability labels needs the merged row totals (the "
                "sum of the smoothed label weights over every class): pass the totals "
                "of merge_shard_stats(..., return_totals=True) as lse")
        row_lse = np.asarray(lse, dtype=np.float64)
        if row_lse.shape != ch.batch_shape:
            raise ValueError(f"lse must have the batch shape {ch.batch_shape}; got "
                             f"{row_lse.shape}")
        row_lse = row_lse.reshape(n)
        big, rest, coef_sum = row_lse, np.zeros(n), None
    scale = _validate.check_nonnegative(grad_scale, "grad_scale")
    label_weight = None
    if ch.kind == "index":
        has_w = ch.weight.shape[0] != 0
        kept = ch.y_rows != ch.ignore_index
        label_weight = np.zeros(n)
        label_weight[kept] = ch.weight[ch.y_rows[kept]] if has_w else 1.0
        # W: the global weight sum, as one array's kernels take it
        coef_sum = float(np.sum(ch.weight, dtype=np.float64)) if has_w else float(num_classes)
    c = ch.x_rows.shape[1]
    out = np.empty(ch.x_rows.shape, ch.x_rows.dtype)
    grad_rows(ch.x_rows, ch.y_rows, ch.kind, ch.class_offset, ch.num_classes,
              _weight_chunk(ch.weight, ch.class_offset, c), ch.ignore_index,
              ch.label_smoothing, ch.z_loss, big, rest, row_lse, coef_sum, label_weight,
              scale, out)
    return HOST.from_rows(out, ch.batch_shape, ch.axis, ch.dtype, like=None)
