"""The gradient columns of a class chunk (``xentfast._shards``), compiled by Numba.

``shard_grad_rows`` is the ``cpu`` backend's op for ``_shards.grad_rows``: the same
destination-passing call and the same formulas (``_shards``' module docstring, "The
gradient"; rowmath's functions, compiled with strict IEEE flags), without the NumPy
path's float64 (rows, classes) temporaries.  Each element is read once, computed in
float64 and rounded once into the output (the logits' dtype):

    e_j = exp(x_j - M)        float32 logits: float64(x_j) - M is exact; float64 logits:
                              the rounding of x_j - M carried into exp(d) (1 + err)
                              (TwoSum: ``_exp_diff``, as ``_shards._exp_of_exact_difference``)
    index labels              g_j = e_j a  (a = rowmath.sparse_scale), minus
                              gs (eps_c w_j) with label smoothing; the chunk that owns
                              y writes rowmath.sparse_true_grad there; ignored rows 0
    probability labels        g_j = rowmath.dense_grad(e_j, rowmath.smoothed_weight(
                              w_j, p_j), r, rowmath.dense_coef(lse, T, z), 0,
                              rowmath.grad_over_sum(r, gs))  (T whole: the
                              statistics carry one compensated float64 T, no tie split)

The kernel is compiled with no fastmath flag (``_STRICT_JIT``): ``e_j a - gs b_j`` must
not become an FMA (the NumPy path rounds the product first, and in a cancelling element
the two differ by more than an ulp).  The maps still vectorise; only the exponential
(the backend's ``_exp``, compiled under its own flags) differs from NumPy's np.exp, by at
most 1 ulp of float64 (measured over 3e6 arguments in [-700, 0]).  So the results are
bitwise the NumPy path's wherever the two exponentials agree (tests/test_shards.py
checks exactly that, with the NumPy path given this exponential).  A differing float64
e_j reaches a float32 output only when g_j lies within about 2**-29 of a float32
rounding boundary (none in the tests' data); in a float64 output it moves g_j by about
an ulp of the terms e_j a, gs b_j -- more ulps of g_j itself where they cancel.  Near
underflow both round into the subnormals (float64 logits more than ~708 below the row
maximum), within a step of each other.

Tasks: one (row, block of ``blk`` columns) each, run under ``prange`` -- a row is never
reduced, so the split changes nothing but the load balance (few long rows get all
threads).  Inputs are passed as read-only views (one Numba signature whatever the
caller's arrays) and in fixed dtypes: one compiled kernel per logits dtype, float32 and
float64; the serial twin (a child forked after a parallel region, ``_forkguard``) is
compiled only if it is used.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import _forkguard
from ._numba_math import (_EXP_JIT, _STRICT_JIT, _dense_coef, _dense_grad, _exp, _exp_diff,
                          _grad_over_sum, _smoothed_weight, _sparse_scale,
                          _sparse_true_grad, _stub)

#: columns per parallel task (a row of up to this many classes is one task)
GRAD_BLOCK = 1 << 13

_shard_exp = _stub("_shard_exp", "e = exp(x - m) in float64; see the module docstring.")


@overload(_shard_exp, jit_options=_EXP_JIT)
def _shard_exp_impl(x, m):
    if x == types.float64 and m == types.float64:
        return lambda x, m: _exp_diff(x, m)
    if x == types.float32 and m == types.float64:
        return lambda x, m: _exp(np.float64(x) - m)      # exact in float64
    return None


@njit(**_STRICT_JIT)
def _grad_block(x, labels, probs, w, bvec, offset, ignore_index, dense, smooth, one_m_eps,
                eps_c, z, big, rest, lse, sums, w_y, gs, out, i, j0, j1):
    """out[i, j0:j1] from row i's totals (see the module docstring)."""
    xr = x[i, j0:j1]
    gr = out[i, j0:j1]
    m = big[i]
    r = rest[i]
    ls = lse[i]
    g_s = gs[i]
    one = 1.0
    if dense:
        pr = probs[i, j0:j1]
        wb = w[j0:j1]
        coef = _dense_coef(ls, sums[i], z)
        gos = _grad_over_sum(one, r, g_s)
        for j in range(xr.shape[0]):
            wt = _smoothed_weight(wb[j], np.float64(pr[j]), one_m_eps, eps_c)
            gr[j] = _dense_grad(_shard_exp(xr[j], m), wt, r, coef, 0.0, gos)
        return
    y = labels[i]
    if y == ignore_index:
        for j in range(gr.shape[0]):
            gr[j] = 0.0
        return
    wy = w_y[i]
    w_sum = sums[i] if smooth else 0.0
    a = _sparse_scale(one, r, ls, wy, one_m_eps, eps_c, w_sum, z, g_s)
    if smooth:
        bb = bvec[j0:j1]
        for j in range(xr.shape[0]):
            gr[j] = _shard_exp(xr[j], m) * a - g_s * bb[j]
    else:
        for j in range(xr.shape[0]):
            gr[j] = _shard_exp(xr[j], m) * a
    local = y - offset
    if j0 <= local < j1:                      # this chunk owns y, in this block
        e_y = _shard_exp(xr[local - j0], m)
        gr[local - j0] = _sparse_true_grad(one, e_y, r, ls, wy, one_m_eps, eps_c, w_sum,
                                           z, g_s)


def _make_driver(parallel: bool):
    """All (row, column block) tasks; the parallel and the serial twin have names of
    their own (Numba's cache tells functions apart by name)."""
    def driver(x, labels, probs, w, bvec, offset, ignore_index, dense, smooth, one_m_eps,
               eps_c, z, big, rest, lse, sums, w_y, gs, out, blk):
        n, c = x.shape
        nb = (c + blk - 1) // blk
        for task in prange(n * nb):
            i = task // nb
            j0 = (task - i * nb) * blk
            _grad_block(x, labels, probs, w, bvec, offset, ignore_index, dense, smooth,
                        one_m_eps, eps_c, z, big, rest, lse, sums, w_y, gs, out, i, j0,
                        min(c, j0 + blk))

    driver.__name__ = driver.__qualname__ = "_shard_grad_" + ("par" if parallel else "serial")
    return njit(**dict(_STRICT_JIT, parallel=parallel))(driver)


_DRIVER_PAR = _make_driver(True)
_DRIVER_SERIAL = _make_driver(False)


def _ro(a: np.ndarray, dtype) -> np.ndarray:
    """A C-contiguous read-only view (a copy only where dtype or layout differ)."""
    v = np.ascontiguousarray(a, dtype=dtype).view()
    v.flags.writeable = False
    return v


def _rows(v, n: int) -> np.ndarray:
    return _ro(np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)), np.float64)


def shard_grad_rows(x, y, kind, class_offset, num_classes, w_chunk, ignore_index,
                    label_smoothing, z_loss, big, rest, lse, coef_sum, label_weight,
                    grad_scale, out, *, parallel: bool | None = None,
                    blk: int = GRAD_BLOCK) -> None:
    """The chunk's gradient columns into ``out`` (n, c): the contract of
    ``xentfast._shards.grad_rows`` (same arguments).  ``parallel`` forces the driver
    (None: parallel unless this is a forked child that may not use threads); ``blk``:
    columns per task."""
    n, c = x.shape
    if n == 0 or c == 0:
        return
    dtype = np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)
    eps = float(label_smoothing)
    eps_c = eps / num_classes
    w64 = np.ones(c) if w_chunk is None else np.asarray(w_chunk, dtype=np.float64)
    dense = kind != "index"
    if dense:
        labels, probs = np.empty(0, np.int64), y
        w_y = np.zeros(1)
    else:
        labels, probs = y, np.empty((0, 0), dtype)
        w_y = label_weight
    target = out
    if out.dtype != dtype or not out.flags.c_contiguous or not out.flags.writeable:
        target = np.empty((n, c), dtype)
    args = (_ro(x, dtype), _ro(labels, np.int64), _ro(probs, dtype), _ro(w64, np.float64),
            _ro(eps_c * w64, np.float64), np.int64(class_offset), np.int64(ignore_index),
            bool(dense), bool(eps), np.float64(1.0 - eps), np.float64(eps_c),
            np.float64(z_loss), _rows(big, n), _rows(rest, n), _rows(lse, n),
            _rows(coef_sum if coef_sum is not None else 0.0, n),
            _rows(w_y, n) if not dense else _rows(0.0, n), _rows(grad_scale, n), target,
            np.int64(blk))
    if parallel is None:
        parallel = _forkguard.threads_ok()
    if parallel:
        from .numba_cpu import _launch  # lazily: numba_cpu imports this module
        _launch(_DRIVER_PAR, *args)
    else:
        _DRIVER_SERIAL(*args)
    if target is not out:
        out[...] = target
