"""Naive float64 oracle: one plain Python loop per row, one per class.

Independent of ``xentfast`` (it imports nothing from it) and of vectorised NumPy for
the arithmetic: every number is a Python float (IEEE float64) and every sum is
``math.fsum`` (correctly rounded), so the oracle is as exact as float64 allows and
shares no code path -- and so no bug -- with the library.  NumPy is used only to move
the class axis last, flatten the leading dimensions and hand back arrays.

Mathematics (one row x of C logits; see ``xentfast/backends/__init__.py``)
---------------------------------------------------------------------------
1. m = max x;  lse = m + log(sum_j exp(x_j - m));  p_j = exp(x_j - lse).
   A NaN anywhere, +inf (inf - inf) or an all -inf row (-inf - -inf) gives NaN.
2. Index label y (weights w, 1 when absent; smoothing eps; z-loss z), kept rows:
     loss = (1 - eps) w_y (lse - x_y) + (eps / C) sum_c w_c (lse - x_c) + z lse^2
     dloss/dx_j = p_j [(1 - eps) w_y + eps W / C + 2 z lse]
                  - (1 - eps) w_y [j == y] - (eps / C) w_j,         W = sum_c w_c.
   A term whose coefficient is 0 (w_c = 0) contributes nothing, also at x_c = -inf.
   Rows whose label is ``ignore_index``: loss 0, gradient 0.
3. Probability labels t, t'_c = (1 - eps) t_c + eps / C:
     loss = sum_c w_c t'_c (lse - x_c) + z lse^2
     dloss/dx_j = p_j [sum_c w_c t'_c + 2 z lse] - w_j t'_j
   (a class with w_c t'_c = 0 contributes nothing, also at x_c = -inf).
4. Reductions (PyTorch): "none" per row; "sum"; "mean" divides by sum of w_y over kept
   rows (index labels; their count without weights) or by the number of rows
   (probability labels).  xentfast's documented difference: a mean over no kept row is
   0 with a zero gradient (PyTorch gives NaN).  The gradient is that of the returned
   loss; for "none" that of the sum of the per-row losses.

Keras (``keras.losses``, TensorFlow backend) probability paths
--------------------------------------------------------------
categorical, from_logits=False: p <- p / sum(p); p <- clip(p, 1e-7, 1 - 1e-7);
    loss = -sum_c t_c log p_c; label smoothing t <- (1 - eps) t + eps / shape[-1].
sparse, from_logits=False: l_c = log(clip(p_c, 1e-7, 1 - 1e-7)), then the softmax
    cross-entropy of the logits l: loss = logsumexp(l) - l_y.
"""

from __future__ import annotations

import math

import numpy as np

NAN = float("nan")
INF = float("inf")
KERAS_EPSILON = 1e-7


# ----------------------------------------------------------------------- per row


def row_logsumexp(row: list[float]) -> float:
    """Step 1: lse of a list of Python floats; -inf for an empty row."""
    if not row:
        return -INF
    for v in row:
        if math.isnan(v):
            return NAN
    m = row[0]
    for v in row[1:]:
        if v > m:
            m = v
    if math.isinf(m):
        # +inf: inf - inf = NaN; all -inf: -inf - (-inf) = NaN (by design).
        return NAN
    s = math.fsum(math.exp(v - m) for v in row)  # exp(-inf) == 0.0; s >= 1
    return m + math.log(s)


def row_probabilities(row: list[float], lse: float) -> list[float]:
    if math.isnan(lse):
        return [NAN] * len(row)
    return [math.exp(v - lse) for v in row]


def _term(coefficient: float, difference: float) -> float:
    """coefficient * difference, where a zero coefficient contributes exactly 0."""
    return 0.0 if coefficient == 0.0 else coefficient * difference


def sparse_row(x, y, w, ignore_index, eps, z):
    """Step 2 for one row: (loss, lse, gradient of the row's loss)."""
    c = len(x)
    lse = row_logsumexp(x)
    if y == ignore_index:
        return 0.0, lse, [0.0] * c
    if not 0 <= y < c:
        raise ValueError(f"oracle: label {y} outside [0, {c})")
    wv = [1.0] * c if w is None else w
    w_y = wv[y]
    loss = _term((1.0 - eps) * w_y, lse - x[y])
    if eps:
        loss += (eps / c) * math.fsum(_term(wv[k], lse - x[k]) for k in range(c))
    if z:
        loss += z * lse * lse
    p = row_probabilities(x, lse)
    coefficient = (1.0 - eps) * w_y + eps * math.fsum(wv) / c + 2.0 * z * lse
    grad = []
    for j in range(c):
        g = p[j] * coefficient
        if j == y:
            g -= (1.0 - eps) * w_y
        if eps:
            g -= (eps / c) * wv[j]
        grad.append(g)
    return loss, lse, grad


def dense_row(x, t, w, eps, z):
    """Step 3 for one row: (loss, lse, gradient of the row's loss)."""
    c = len(x)
    lse = row_logsumexp(x)
    wv = [1.0] * c if w is None else w
    ts = [(1.0 - eps) * t[k] + eps / c for k in range(c)] if eps else list(t)
    wt = [wv[k] * ts[k] for k in range(c)]
    loss = math.fsum(_term(wt[k], lse - x[k]) for k in range(c))
    if z:
        loss += z * lse * lse
    p = row_probabilities(x, lse)
    coefficient = math.fsum(wt) + 2.0 * z * lse
    grad = [p[j] * coefficient - wt[j] for j in range(c)]
    return loss, lse, grad


# ----------------------------------------------------------------------- arrays


def _rows(a: np.ndarray, axis: int):
    """(list of rows as lists of Python floats, batch shape) with ``axis`` last."""
    moved = np.moveaxis(np.asarray(a), axis, -1)
    batch_shape = moved.shape[:-1]
    flat = moved.astype(np.float64).reshape(int(np.prod(batch_shape)), moved.shape[-1])
    return flat.tolist(), batch_shape


def _from_rows(rows: list[list[float]], batch_shape, axis: int, c: int) -> np.ndarray:
    arr = np.array(rows, dtype=np.float64).reshape(tuple(batch_shape) + (c,))
    return np.moveaxis(arr, -1, axis)


def cross_entropy(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                  label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """Loss and gradient (float64) with xentfast's / PyTorch's semantics.

    Returns ``(loss, grad, lse)``: loss a float ("mean"/"sum") or an array of the batch
    shape ("none"); grad of the logits' shape; lse of the batch shape.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    axis = axis % logits.ndim
    c = logits.shape[axis]
    x_rows, batch_shape = _rows(logits, axis)
    w = None if weight is None else [float(v) for v in np.asarray(weight).ravel()]
    eps = float(label_smoothing)
    z = float(z_loss)
    losses, lses, grads = [], [], []
    sparse = labels.dtype.kind in "iu"
    if sparse:
        y_rows = [int(v) for v in labels.reshape(-1).tolist()]
        for x, y in zip(x_rows, y_rows):
            loss, lse, grad = sparse_row(x, y, w, ignore_index, eps, z)
            losses.append(loss); lses.append(lse); grads.append(grad)
        if w is None:
            denominator = float(sum(1 for y in y_rows if y != ignore_index))
        else:
            denominator = math.fsum(w[y] for y in y_rows if y != ignore_index)
    else:
        t_rows, _ = _rows(labels, axis)
        for x, t in zip(x_rows, t_rows):
            loss, lse, grad = dense_row(x, t, w, eps, z)
            losses.append(loss); lses.append(lse); grads.append(grad)
        denominator = float(len(x_rows))
    if reduction == "none":
        scale = 1.0
        loss = np.array(losses, dtype=np.float64).reshape(batch_shape)
    elif reduction == "sum":
        scale = 1.0
        loss = _sum(losses)
    elif reduction == "mean":
        # xentfast: nothing kept -> 0 and a zero gradient (PyTorch: NaN).
        scale = 1.0 / denominator if denominator != 0 else 0.0
        loss = _sum(losses) * scale
    else:
        raise ValueError(reduction)
    grads = [[g * scale for g in row] for row in grads]
    grad = _from_rows(grads, batch_shape, axis, c)
    lse = np.array(lses, dtype=np.float64).reshape(batch_shape)
    return loss, grad, lse


def _sum(values: list[float]) -> float:
    """Correctly rounded sum; NaN or inf inputs follow IEEE (fsum raises on inf - inf)."""
    if any(math.isnan(v) for v in values):
        return NAN
    infinities = {v for v in values if math.isinf(v)}
    if infinities:
        return infinities.pop() if len(infinities) == 1 else NAN  # inf + -inf = NaN
    return math.fsum(values)


def denominator(labels, *, weight=None, ignore_index=-100) -> float:
    """The "mean" denominator for index labels: sum of w_y (count) over kept rows."""
    ys = [int(v) for v in np.asarray(labels).reshape(-1).tolist()]
    if weight is None:
        return float(sum(1 for y in ys if y != ignore_index))
    w = [float(v) for v in np.asarray(weight).ravel()]
    return math.fsum(w[y] for y in ys if y != ignore_index)


# ----------------------------------------------------------------------- primitives


def _primitive(x, axis, op):
    x = np.asarray(x)
    if axis is None:
        x = x.reshape(-1)
        axis = 0
    axis = axis % x.ndim
    c = x.shape[axis]
    rows, batch_shape = _rows(x, axis)
    if op == "logsumexp":
        return np.array([row_logsumexp(r) for r in rows], dtype=np.float64).reshape(batch_shape)
    out = []
    for r in rows:
        lse = row_logsumexp(r)
        if op == "softmax":
            out.append(row_probabilities(r, lse))
        else:
            out.append([v - lse for v in r])
    return _from_rows(out, batch_shape, axis, c)


def logsumexp(x, axis=-1, keepdims=False):
    result = _primitive(x, axis, "logsumexp")
    if keepdims:
        shape = list(np.shape(x))
        if axis is None:
            shape = [1] * len(shape)
        else:
            shape[axis % len(shape)] = 1
        result = result.reshape(shape)
    return result


def softmax(x, axis=-1):
    return _primitive(x, axis, "softmax").reshape(np.shape(x))


def log_softmax(x, axis=-1):
    return _primitive(x, axis, "log_softmax").reshape(np.shape(x))


# ----------------------------------------------------------------------- Keras


def _clip(v: float) -> float:
    return min(max(v, KERAS_EPSILON), 1.0 - KERAS_EPSILON)


def keras_categorical(y_true, y_pred, *, from_logits=False, label_smoothing=0.0, axis=-1):
    """Per-sample ``keras.losses.categorical_crossentropy`` in float64."""
    y_pred = np.asarray(y_pred)
    y_true = np.asarray(y_true)
    eps = float(label_smoothing)
    last = y_pred.shape[-1]  # Keras smooths with the last axis' size, whatever axis is
    axis = axis % y_pred.ndim
    p_rows, batch_shape = _rows(y_pred, axis)
    t_rows, _ = _rows(y_true, axis)
    out = []
    for p, t in zip(p_rows, t_rows):
        if eps:
            t = [(1.0 - eps) * v + eps / last for v in t]
        if from_logits:
            out.append(dense_row(p, t, None, 0.0, 0.0)[0])
            continue
        total = math.fsum(p)
        q = [_clip(v / total) for v in p]
        out.append(-math.fsum(_term(t[k], math.log(q[k])) for k in range(len(q))))
    return np.array(out, dtype=np.float64).reshape(batch_shape)


def keras_sparse(y_true, y_pred, *, from_logits=False, ignore_class=None, axis=-1):
    """Per-sample ``keras.losses.sparse_categorical_crossentropy`` in float64."""
    y_pred = np.asarray(y_pred)
    y_true = np.asarray(y_true)
    if y_true.ndim == y_pred.ndim and y_true.shape[-1] == 1:
        y_true = y_true.reshape(y_true.shape[:-1])
    axis = axis % y_pred.ndim
    p_rows, batch_shape = _rows(y_pred, axis)
    ys = [int(v) for v in y_true.reshape(-1).tolist()]  # Keras truncates float labels
    out = []
    for p, y in zip(p_rows, ys):
        if ignore_class is not None and y == ignore_class:
            out.append(0.0)
            continue
        logits = p if from_logits else [math.log(_clip(v)) for v in p]
        out.append(sparse_row(logits, y, None, None, 0.0, 0.0)[0])
    return np.array(out, dtype=np.float64).reshape(batch_shape)


def keras_reduce(values, sample_weight=None, mask=None, reduction="sum_over_batch_size"):
    """Keras ``Loss.__call__``: weight by sample_weight and the mask, then reduce.

    As Keras does: an (N, 1) sample_weight turns rank-1 losses into (N, 1); the
    "mean_with_sample_weight" divisor is the sum of the weights as given (a scalar
    weight counts once), or of mask * weight when there is a mask.  With a mask and a mean-like reduction Keras scales kept entries by
    ``size / (kept + epsilon)`` so that the mean runs over the kept entries.
    """
    values = np.asarray(values, dtype=np.float64)
    sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if sw is not None and sw.ndim == values.ndim + 1 and sw.shape[-1] == 1:
        if values.ndim == 1:
            values = values[:, None]  # Keras expands rank-1 losses to (N, 1)
        else:
            sw = sw.reshape(sw.shape[:-1])
    flat = values.reshape(-1).tolist()
    n = len(flat)
    weights = [1.0] * n
    have_weight = False
    divisor_weights: list[float] = []
    if sw is not None:
        weights = np.broadcast_to(sw, values.shape).reshape(-1).tolist()
        divisor_weights = sw.reshape(-1).tolist()  # Keras: sum of the weights as given
        have_weight = True
    if mask is not None:
        m = [1.0 if bool(v) else 0.0 for v in np.asarray(mask).reshape(-1).tolist()]
        if reduction in ("mean", "sum_over_batch_size"):
            factor = n / (math.fsum(m) + KERAS_EPSILON)
            m = [v * factor for v in m]
        weights = [a * b for a, b in zip(weights, m)]
        divisor_weights = weights
        have_weight = True
    weighted = [v * w for v, w in zip(flat, weights)]
    if reduction in (None, "none") or values.ndim == 0 or values.shape == (0,):
        return np.array(weighted, dtype=np.float64).reshape(values.shape)
    total = math.fsum(weighted)
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and have_weight:
        divisor = math.fsum(divisor_weights)
    else:
        divisor = float(n)
    return total / divisor if divisor else 0.0
