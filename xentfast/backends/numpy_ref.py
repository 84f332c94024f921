"""Backend ``numpy``: the vectorised NumPy reference kernels.

Always available; the fallback of last resort and, with the naive per-row loop in
``tests/naive.py``, the oracle the fast backends are tested against.  It follows the
kernel contract and the derivations in ``xentfast/backends/__init__.py`` line by line,
trading memory (it builds (n, c) temporaries) for obviousness.
"""

from __future__ import annotations

import numpy as np

NAME = "numpy"
NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _accumulation_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _shifted_exp(x: np.ndarray):
    """Steps 1 of the derivation: (m, exp(x - m), lse), all in the accumulation dtype."""
    acc = _accumulation_dtype(x.dtype)
    x = x.astype(acc, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(x, axis=1)
        e = np.exp(x - m[:, None])
        s = np.sum(e, axis=1)
        lse = m + np.log(s)
    return x, e, s, lse


def _weight_or_ones(weight: np.ndarray, c: int, acc: np.dtype) -> np.ndarray:
    return weight.astype(acc, copy=False) if weight.shape[0] else np.ones(c, acc)


def logsumexp(x, out):
    _, _, _, lse = _shifted_exp(x)
    out[...] = lse


def log_softmax(x, out):
    xa, _, _, lse = _shifted_exp(x)
    with np.errstate(invalid="ignore"):
        out[...] = xa - lse[:, None]


def softmax(x, out):
    _, e, s, _ = _shifted_exp(x)
    with np.errstate(invalid="ignore"):
        out[...] = e / s[:, None]


def sparse(logits, labels, weight, ignore_index, label_smoothing, z_loss, grad_scale,
           loss, lse, grad):
    n, c = logits.shape
    x, e, s, row_lse = _shifted_exp(logits)
    acc = x.dtype
    w = _weight_or_ones(weight, c, acc)
    eps = acc.type(label_smoothing)
    z = acc.type(z_loss)
    kept = labels != ignore_index
    y = np.where(kept, labels, 0)
    rows = np.arange(n)
    w_y = np.where(kept, w[y], 0).astype(acc)
    x_y = x[rows, y]
    with np.errstate(invalid="ignore", over="ignore"):
        row_loss = (1 - eps) * w_y * (row_lse - x_y) + z * row_lse * row_lse
        if label_smoothing:
            w_total = w.sum(dtype=acc)
            # A zero weight contributes nothing (also at x = -inf); negative weights
            # are real weights (PyTorch accepts them) and must be summed.
            weighted_x = np.sum(np.where(w != 0, w * x, 0), axis=1, dtype=acc)
            row_loss = row_loss + eps / c * (w_total * row_lse - weighted_x)
    loss[...] = np.where(kept, row_loss, 0)
    lse[...] = row_lse
    if grad is None:
        return
    with np.errstate(invalid="ignore", over="ignore"):
        p = e / s[:, None]
        p_coeff = (1 - eps) * w_y + z * 2 * row_lse
        if label_smoothing:
            p_coeff = p_coeff + eps * w.sum(dtype=acc) / c
        g = p * p_coeff[:, None]
        g[rows, y] -= (1 - eps) * w_y
        if label_smoothing:
            g -= (eps / c) * w[None, :]
        g *= acc.type(grad_scale)
    g[~kept] = 0
    grad[...] = g


def dense(logits, labels, weight, label_smoothing, z_loss, grad_scale, loss, lse, grad):
    n, c = logits.shape
    x, e, s, row_lse = _shifted_exp(logits)
    acc = x.dtype
    w = _weight_or_ones(weight, c, acc)
    eps = acc.type(label_smoothing)
    z = acc.type(z_loss)
    t = labels.astype(acc, copy=False)
    t_smooth = (1 - eps) * t + eps / c if label_smoothing else t
    wt = w * t_smooth
    with np.errstate(invalid="ignore", over="ignore"):
        # Step 3: a class with w_c t'_c == 0 contributes nothing, even at x_c = -inf.
        terms = np.where(wt != 0, wt * (row_lse[:, None] - x), 0)
        loss[...] = np.sum(terms, axis=1, dtype=acc) + z * row_lse * row_lse
    lse[...] = row_lse
    if grad is None:
        return
    with np.errstate(invalid="ignore", over="ignore"):
        p = e / s[:, None]
        p_coeff = np.sum(wt, axis=1, dtype=acc) + z * 2 * row_lse
        g = (p * p_coeff[:, None] - wt) * acc.type(grad_scale)
    grad[...] = g
