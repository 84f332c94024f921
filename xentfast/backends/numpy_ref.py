"""Backend ``numpy``: the vectorised NumPy reference kernels.

Always available; the fallback of last resort and, with the naive per-row loop in
``tests/naive.py``, the oracle the fast backends are tested against.  It follows the
kernel contract in ``xentfast/backends/__init__.py`` and calls the per-row maths of
``rowmath`` on whole columns of row scalars, trading memory (it builds (n, c)
temporaries) for obviousness.
"""

from __future__ import annotations

import numpy as np

from . import rowmath

NAME = "numpy"
NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _accumulation_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _exp_of_difference(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """e = exp(x - m) without the rounding of x - m (which costs up to |x - m| / 2 ulps
    of e): float32 differences are exact in float64; a float64 difference carries its
    exact error err (TwoSum) into exp(d) (1 + err).  A masked -inf gives e = 0."""
    if x.dtype == np.float32:
        return np.exp(x.astype(np.float64) - m.astype(np.float64)).astype(np.float32)
    d = x - m
    bb = d - x
    err = (x - (d - bb)) + (-m - bb)
    e = np.exp(d)
    return np.where(np.isnan(err), e, e + e * err)


def _row_passes(x: np.ndarray):
    """The row passes of rowmath's docstring, vectorised over rows:
    (x, e, m, r, log s, lse, one) in the accumulation dtype; e_j = exp(x_j - m),
    r = u + (t - 1) the mass of every class but one maximum (u: the terms off the
    max, t: the number of ties at it), log s = log1p(r)."""
    acc = _accumulation_dtype(x.dtype)
    one = acc.type(1)
    x = x.astype(acc, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(x, axis=1)  # NaN propagates: a NaN row is NaN throughout
        e = _exp_of_difference(x, m[:, None])
        tie = (x - m[:, None]) == 0
        u = np.sum(np.where(tie, 0, e), axis=1, dtype=acc)
        t = np.sum(tie, axis=1, dtype=acc)
        r = rowmath.rest_mass(u, t, one)
        log_s = np.log1p(r)
        lse = rowmath.log_sum_exp(m, log_s)
    return x, e, m, r, log_s, lse, one


def _compensated_row_sum(a: np.ndarray) -> np.ndarray:
    """sum_j a[:, j] with the rounding errors of its pairwise additions added back
    (TwoSum at every level): within about an ulp of the exact sum, also for C equal
    terms (label smoothing's eps/C), whose plain sum errs the same way at every step."""
    hi = a
    lo = np.zeros(a.shape[0], a.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        while hi.shape[1] > 1:
            k = hi.shape[1] // 2
            x, y = hi[:, :k], hi[:, k:2 * k]
            s = x + y
            bb = s - x
            err = (x - (s - bb)) + (y - bb)
            lo = lo + np.sum(np.where(np.isfinite(err), err, 0), axis=1, dtype=a.dtype)
            hi = np.concatenate([s, hi[:, 2 * k:]], axis=1)
        total = hi[:, 0] if hi.shape[1] else np.zeros(a.shape[0], a.dtype)
    return total + lo


def _weighted_distance(coefficient: np.ndarray, m: np.ndarray, x: np.ndarray, acc):
    """wd = sum_{c_j != 0} c_j (m - x_j): a zero coefficient adds nothing, even where
    x_j = -inf (negative coefficients are real weights, as in PyTorch)."""
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(coefficient != 0, coefficient * (m[:, None] - x), 0)
    return np.sum(terms, axis=1, dtype=acc)


def logsumexp(x, out):
    out[...] = _row_passes(x)[5]


def log_softmax(x, out):
    xa, _, m, _, log_s, _, _ = _row_passes(x)
    with np.errstate(invalid="ignore"):
        out[...] = rowmath.log_softmax(xa, m[:, None], log_s[:, None])


def softmax(x, out):
    _, e, _, r, _, _, one = _row_passes(x)
    with np.errstate(invalid="ignore"):
        out[...] = rowmath.softmax(e, one, r[:, None])


def sparse(logits, labels, weight, ignore_index, label_smoothing, z_loss, grad_scale,
           loss, lse, grad):
    n, c = logits.shape
    x, e, m, r, log_s, row_lse, one = _row_passes(logits)
    acc = x.dtype
    zero = acc.type(0)
    w = weight.astype(acc, copy=False) if weight.shape[0] else np.ones(c, acc)
    one_m_eps = acc.type(1 - label_smoothing)
    z = acc.type(z_loss)
    gs = acc.type(grad_scale)
    kept = labels != ignore_index
    y = np.where(kept, labels, 0)
    rows = np.arange(n)
    w_y = np.where(kept, w[y], zero).astype(acc, copy=False)
    x_y = x[rows, y]
    e_y = e[rows, y]
    if label_smoothing:
        eps_c = acc.type(label_smoothing / c)
        w_sum = w.sum(dtype=acc)
        wd = _weighted_distance(w[None, :], m, x, acc)
    else:
        eps_c = w_sum = zero
        wd = np.zeros(n, acc)
    with np.errstate(invalid="ignore", over="ignore"):
        row_loss = rowmath.sparse_loss(m, log_s, x_y, w_y, one_m_eps, eps_c, w_sum, wd, z)
    loss[...] = np.where(kept, row_loss, zero)
    lse[...] = row_lse
    if grad is None:
        return
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        a = rowmath.sparse_scale(one, r, row_lse, w_y, one_m_eps, eps_c, w_sum, z, gs)
        g = e * a[:, None]
        if label_smoothing:
            g -= (eps_c * w * gs)[None, :]
        g[rows, y] = rowmath.sparse_true_grad(one, e_y, r, row_lse, w_y, one_m_eps,
                                              eps_c, w_sum, z, gs)
    g[~kept] = 0
    grad[...] = g


def dense(logits, labels, weight, label_smoothing, z_loss, grad_scale, loss, lse, grad):
    n, c = logits.shape
    x, e, m, r, log_s, row_lse, one = _row_passes(logits)
    acc = x.dtype
    w = weight.astype(acc, copy=False) if weight.shape[0] else np.ones(c, acc)
    z = acc.type(z_loss)
    t = labels.astype(acc, copy=False)
    wt = rowmath.smoothed_weight(w, t, acc.type(1 - label_smoothing),
                                 acc.type(label_smoothing / c))
    with np.errstate(invalid="ignore"):
        tie = (x - m[:, None]) == 0
    t_off = _compensated_row_sum(np.where(tie, 0, wt).astype(acc))   # T = T_off + T_tie
    t_tie = _compensated_row_sum(np.where(tie, wt, 0).astype(acc))
    wd = _weighted_distance(wt, m, x, acc)
    with np.errstate(invalid="ignore", over="ignore"):
        loss[...] = rowmath.dense_loss(m, log_s, t_off + t_tie, wd, z)
    lse[...] = row_lse
    if grad is None:
        return
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        coef = rowmath.dense_coef(row_lse, t_off, z)
        gs_over_s = rowmath.grad_over_sum(one, r, acc.type(grad_scale))
        grad[...] = rowmath.dense_grad(e, wt, r[:, None], coef[:, None], t_tie[:, None],
                                       gs_over_s[:, None])


def row_stats(x, coef, probs, one_m_eps, eps_c, m, u, t, coef_sum, dist):
    """Row statistics of a block of classes (the class-chunked statistics of
    ``xentfast._shards``): the row passes without the per-row epilogue.

    m = max_j x_j (x's dtype); u = sum of e_j off the max, t = ties at it (float64);
    with ``coef`` (c,) non-empty, also coef_sum = sum_j a_j and
    dist = sum_{a_j != 0} a_j (m - x_j) (float64), where a_j = coef_j, or -- with
    probability rows ``probs`` (n, c) non-empty -- a_j = coef_j ((1 - eps) t_j + eps_c)
    (rowmath.smoothed_weight).  A row without a finite maximum (all -inf, NaN) gives
    NaN sums; the caller gives such rows their meaning."""
    acc = _accumulation_dtype(x.dtype)
    xa = x.astype(acc, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        row_max = np.max(xa, axis=1)
        e = _exp_of_difference(xa, row_max[:, None])
        tie = (xa - row_max[:, None]) == 0
        u[...] = np.sum(np.where(tie, 0, e), axis=1, dtype=acc)
        t[...] = np.sum(tie, axis=1, dtype=acc)
    m[...] = row_max
    if coef.shape[0] == 0:
        return
    a = coef.astype(acc, copy=False)[None, :]
    if probs.shape[0]:
        a = rowmath.smoothed_weight(a, probs.astype(acc, copy=False), acc.type(one_m_eps),
                                    acc.type(eps_c))
    coef_sum[...] = _compensated_row_sum(np.broadcast_to(a, x.shape).astype(np.float64))
    dist[...] = _weighted_distance(a, row_max, xa, acc)
