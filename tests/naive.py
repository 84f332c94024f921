"""Naive exact oracle: one plain Python loop per row, one per class.

Independent of ``xentfast`` (it imports nothing from it) and of vectorised NumPy for
the arithmetic: every number is a Python float (IEEE float64), sums are ``math.fsum``
(the correctly rounded sum of its inputs, whatever their signs), products that must be
exact are split into exactly representable pieces, and every quantity is written in a
form without cancellation.  NumPy is used only to move the class axis last, flatten
the leading dimensions and hand back arrays.

Accuracy (the contract in DESIGN.md "Accuracy" is checked against this file, so it
must be well inside the library's bounds for float64 results too):

* ``x_j - m`` is carried exactly, as a pair ``d + d_lo`` (TwoSum).  Rounding it alone
  would cost up to ``|x_j - m| / 2`` ulps of ``e_j`` (18 ulps at a margin of 37).
* ``e_j = exp(x_j - m)`` is a double-double.  For float64 logits (when mpmath is
  installed) it is mpmath's exp of the exact ``d + d_lo`` at 120 bits, so every result
  is the truth to a small fraction of a float64 ulp.  Otherwise -- and always in the
  plain-float API used by the older tests -- it is ``exp(d) (1 + d_lo)`` with libm's
  exp (glibc: < 0.502 ulp), so e_j and s carry up to ~2**-53 relative error each and
  results are within ~2.5 float64 ulps: 2**-26 float32 ulps, ample for float32 and
  16-bit data.  tests/test_accuracy.py checks both claims against mpmath.
* The rest mass ``r = sum_{j != one max} e_j`` is one fsum of those pairs,
  ``log s = log1p(r)`` is taken by mpmath when it is installed (else libm's log1p,
  < 0.75 ulp, plus the first-order term of r's residual), a double-double.
* Every other result is one fsum of exact products of these double-doubles (Dekker's
  TwoProduct), divided by ``s`` (times a reduction's denominator) in double-double.
  ``exact_cross_entropy`` / ``exact_primitive(s)`` return it as ``value + low``
  (value: rounded to nearest; low: the residual) with the conditioning ``scale``.

Mathematics (one row x of C logits, m = max x, jmax its first index)
------------------------------------------------------------------------
1. e_j = exp(x_j - m) (e_jmax = 1),  r = sum_{j != jmax} e_j,  s = 1 + r,
   log s = log1p(r),  lse = m + log s,  p_j = e_j / s,
   log p_j = (x_j - m) - log s  (two terms <= 0: no cancellation).
   A NaN anywhere, +inf (inf - inf) or an all -inf row (-inf - -inf) gives NaN.
2. Index label y (weights w, 1 when absent; smoothing eps; z-loss z), kept rows,
   k = (1 - eps) w_y,  eps_c = eps / C,  W = sum_c w_c:
     loss = k ((m - x_y) + log s) + eps_c (W log s + sum_{w_c != 0} w_c (m - x_c))
            + z lse^2                               (never W lse - sum w x)
     g_j  = p_j A - eps_c w_j,  A = k + eps_c W + 2 z lse          (j != y)
     g_y  = p_y (eps_c W + 2 z lse) - k q_y / s - eps_c w_y,
            q_y = sum_{j != y} e_j = s - e_y       (p_y - 1 = -q_y / s, no cancellation)
   A term whose coefficient is 0 (w_c = 0) contributes nothing, also at x_c = -inf.
   Rows whose label is ``ignore_index``: loss 0, gradient 0.
3. Probability labels t, wt_c = w_c ((1 - eps) t_c + eps / C),  T = sum_c wt_c:
     loss = T log s + sum_{wt_c != 0} wt_c (m - x_c) + z lse^2
     g_j  = p_j (T + 2 z lse) - wt_j = (e_j (T + 2 z lse) - wt_j s) / s
          = (e_j (T'_j + 2 z lse) - wt_j q_j) / s,  T'_j = T - wt_j,  q_j = s - e_j
   (the numerator is one fsum of exact products, so the one-hot row at its maximum,
   -wt_j r / s, comes out to the last bit).
4. Reductions (PyTorch): "none" per row; "sum"; "mean" divides by sum of w_y over kept
   rows (index labels; their count without weights) or by the number of rows
   (probability labels).  xentfast's documented difference: a mean over no kept row is
   0 with a zero gradient (PyTorch gives NaN).  The gradient is that of the returned
   loss; for "none" that of the sum of the per-row losses.

Conditioning ("scale")
----------------------
Next to each exact value the oracle returns the sum of the magnitudes of the terms of
the form above (p_j |A| + eps_c |w_j| for g_j, with |A| counted as |k| + eps_c
sum|w_c| + 2 z (|m| + log s); |m| + log s for lse; p_j (sum_{c != j} |wt_c| +
2 z (|m| + log s)) + |wt_j| q_j / s for a dense g_j; sum |w_c| (m - x_c) for the
smoothing sum; z (|m| + log s)^2 for z lse^2).  It equals |value| when all terms have
one sign (the usual case: then accuracy is relative to the value itself) and exceeds
it only at a genuine near-zero crossing of terms of opposite sign.

Keras (``keras.losses``, TensorFlow backend) probability paths
--------------------------------------------------------------
categorical, from_logits=False: p <- p / sum(p); p <- clip(p, 1e-7, 1 - 1e-7);
    loss = -sum_c t_c log p_c; label smoothing t <- (1 - eps) t + eps / shape[-1].
sparse, from_logits=False: l_c = log(clip(p_c, 1e-7, 1 - 1e-7)), then the softmax
    cross-entropy of the logits l: loss = logsumexp(l) - l_y.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

try:  # optional: log1p of a double-double (one call per row), and exp for float64 data
    import mpmath
    import mpmath.libmp as _mp
except ImportError:  # pragma: no cover - depends on the environment
    mpmath = None

NAN = float("nan")
INF = float("inf")
KERAS_EPSILON = 1e-7

fsum = math.fsum

# ----------------------------------------------------------------------- exact pieces
#
# A "double-double" is a pair (hi, lo) of floats standing for hi + lo.  "Pieces" are
# lists of floats whose exact sum is the quantity; fsum rounds that sum correctly, so
# a difference of pieces cancels nothing that the pieces did not already hold.

_SPLITTER = 134217729.0  # 2**27 + 1 (Veltkamp)
_SPLIT_LIMIT = 2.0 ** 995  # above this the split overflows


def _split(a: float) -> tuple[float, float]:
    """a = hi + lo with 26-bit halves, so that products of halves are exact."""
    if not abs(a) < _SPLIT_LIMIT:  # huge, inf or NaN: no split (never needed exactly)
        return a, 0.0
    t = _SPLITTER * a
    hi = t - (t - a)
    return hi, a - hi


def _two_prod(a: float, b: float) -> tuple[float, float]:
    """a * b = p + err exactly (Dekker)."""
    p = a * b
    if p - p != 0.0:
        return p, 0.0
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _two_sum(a: float, b: float) -> tuple[float, float]:
    """a + b = s + err exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _mul(a: tuple[float, float], b: tuple[float, float]) -> list[float]:
    """Pieces of a * b for double-doubles a, b (exact but for a_lo b_lo, ~2**-106)."""
    p, err = _two_prod(a[0], b[0])
    return [p, err, a[0] * b[1], a[1] * b[0]]


def _neg(pieces: list[float]) -> list[float]:
    return [-v for v in pieces]


def _dd(pieces: list[float]) -> tuple[float, float]:
    """The exact sum of ``pieces`` as (nearest float, residual)."""
    hi = fsum(pieces)
    if hi - hi != 0.0:  # inf / NaN: the callers deal with infinities before
        return hi, 0.0
    return hi, fsum(pieces + [-hi])


def _quotient(pieces: list[float], den: tuple[float, float], want_low: bool = True,
              den_split: tuple[float, float] | None = None):
    """(exact sum of pieces) / den, den a nonzero double-double, as (value, residual):
    q = n / den_hi, then the remainder n - q den is one exact fsum."""
    n = fsum(pieces)
    den_hi = den[0]
    q = n / den_hi
    if n == 0.0 or not abs(q) < _SPLIT_LIMIT:
        return q, 0.0
    if not want_low:  # plain-float API: n rounded once, then ~1 ulp more
        return q - q * (den[1] / den_hi), 0.0
    dh, dl = den_split or _split(den_hi)
    t = _SPLITTER * q
    qh = t - (t - q)
    ql = q - qh
    p = q * den_hi
    err = ((qh * dh - p) + qh * dl + ql * dh) + ql * dl
    pieces.extend((-p, -err, -q * den[1]))
    q_lo = fsum(pieces) / den_hi
    hi = q + q_lo
    return hi, ((q_lo - (hi - q)) if want_low else 0.0)


def _log1p(r: tuple[float, float]) -> tuple[float, float]:
    """log1p of the double-double r >= 0, as a double-double (mpmath when installed;
    else libm's log1p, < 0.75 ulp, plus the first-order term of r's residual)."""
    if mpmath is not None:
        with mpmath.workprec(160):
            v = mpmath.log1p(mpmath.mpf(r[0]) + mpmath.mpf(r[1]))
            hi = float(v)
            return hi, float(v - hi)
    hi = math.log1p(r[0])
    return hi, r[1] / (1.0 + r[0])


def _exp_pair(d: float, lo: float) -> tuple[float, float]:
    """exp(d + lo) as a double-double correct to ~2**-110 (mpmath, 120 bits)."""
    if d < -746.0:  # below half the smallest subnormal: 0 is the rounded truth
        return 0.0, 0.0
    a = _mp.mpf_add(_mp.from_float(d), _mp.from_float(lo), 120, _mp.round_nearest)
    v = _mp.mpf_exp(a, 120, _mp.round_nearest)
    hi = _mp.to_float(v, rnd=_mp.round_nearest)
    if hi == 0.0 or hi - hi != 0.0:
        return hi, 0.0
    return hi, _mp.to_float(_mp.mpf_sub(v, _mp.from_float(hi), 120, _mp.round_nearest),
                            rnd=_mp.round_nearest)


# ----------------------------------------------------------------------- one row


class _Row:
    """One row's softmax statistics (module docstring, step 1).

    ok: False for a row without a distribution (NaN, +inf, all -inf, or empty).
    d_hi[j] + d_lo[j] = x_j - m exactly;  e_hi[j] + e_lo[j] = exp(x_j - m);
    r, s, log_s, lse: double-doubles."""

    __slots__ = ("x", "ok", "m", "d_hi", "d_lo", "e_hi", "e_lo", "r", "s", "log_s", "lse")

    def __init__(self, x: list[float], precise: bool = False):
        self.x = x
        self.ok = False
        m = -INF
        for v in x:
            if v != v:
                return
            if v > m:
                m = v
        if m == INF or m == -INF:  # +inf, all -inf, or empty
            return
        self.ok = True
        self.m = m
        nm = -m
        e_hi, e_lo, d_hi, d_lo = [], [], [], []
        eh_add, el_add, dh_add, dl_add = e_hi.append, e_lo.append, d_hi.append, d_lo.append
        exp = math.exp
        for v in x:
            if v == -INF:
                eh_add(0.0); el_add(0.0); dh_add(-INF); dl_add(0.0)
                continue
            d = v + nm  # TwoSum: d + lo == v - m exactly
            bb = d - v
            lo = (v - (d - bb)) + (nm - bb)
            dh_add(d); dl_add(lo)
            if precise:
                e, e_l = _exp_pair(d, lo)
                eh_add(e); el_add(e_l)
            else:  # libm: < 0.502 ulp; exp(d + lo) = exp(d) (1 + lo)
                e = exp(d)
                eh_add(e); el_add(e * lo)
        self.e_hi, self.e_lo, self.d_hi, self.d_lo = e_hi, e_lo, d_hi, d_lo
        # r: every e_j but one maximum's 1 (the fsum is exact: "- 1" cancels nothing)
        self.r = _dd(e_hi + e_lo + [-1.0])
        self.s = _dd([1.0, self.r[0], self.r[1]])
        self.log_s = _log1p(self.r)
        self.lse = _dd([m, self.log_s[0], self.log_s[1]])

    def lse_scale(self) -> float:
        """|m| + log s: the terms of lse (a near-zero crossing only for m < 0)."""
        return abs(self.m) + self.log_s[0]

    def divisor(self, d: float) -> tuple[float, float]:
        """s d as a double-double (d: a reduction's denominator, 1 for none)."""
        return self.s if d == 1.0 else _dd(_mul(self.s, (d, 0.0)))

    def probabilities(self, den: tuple[float, float]) -> list[tuple[float, float]]:
        """e_j / den as unnormalised double-doubles (q, q_lo); den = s d.  No fsum
        needed: the remainder e_j - q den_hi is exact (Sterbenz)."""
        den_hi, den_lo = den
        dh, dl = _split(den_hi)
        out = []
        append = out.append
        for eh, el in zip(self.e_hi, self.e_lo):
            if eh == 0.0:
                append((0.0, 0.0))
                continue
            q = eh / den_hi
            t = _SPLITTER * q
            qh = t - (t - q)
            ql = q - qh
            p = q * den_hi
            err = ((qh * dh - p) + qh * dl + ql * dh) + ql * dl
            append((q, (((eh - p) - err) + el - q * den_lo) / den_hi))
        return out

    def distance(self, j: int) -> tuple[float, float]:
        """m - x_j >= 0 exactly, as a pair; (inf, 0) for a -inf logit."""
        if self.d_hi[j] == -INF:
            return INF, 0.0
        return -self.d_hi[j], -self.d_lo[j]

    def weighted_distance(self, coefficients, exact: bool = True):
        """sum_{a_c != 0} a_c (m - x_c) for double-double coefficients a_c:
        (double-double, sum |a_c| (m - x_c), the signs of infinite terms).  Not
        ``exact``: each product rounded once (for the plain-float API)."""
        pieces: list[float] = []
        add = pieces.extend
        scale = 0.0
        infinite = set()
        for (a, a_lo), dh, dl in zip(coefficients, self.d_hi, self.d_lo):
            if a == 0.0 and a_lo == 0.0:
                continue  # a zero coefficient contributes nothing, also at -inf
            if dh == -INF:
                infinite.add(1.0 if a > 0 else -1.0)
                continue
            p, err = _two_prod(a, dh) if exact else (a * dh, 0.0)
            add((-p, -err, -a * dl, -a_lo * dh))  # a (m - x_j) = -a (x_j - m)
            scale -= abs(a) * dh
        return _dd(pieces), scale, infinite


@dataclass
class RowResult:
    """One row's exact results, each a (value, residual) pair, with its scale."""

    loss: tuple[float, float]
    loss_scale: float
    lse: tuple[float, float]
    lse_scale: float
    grad: list[tuple[float, float]]
    grad_scale: list[float]


def _nan_row(c: int) -> RowResult:
    return RowResult((NAN, 0.0), NAN, (NAN, 0.0), NAN, [(NAN, 0.0)] * c, [NAN] * c)


def _eps_terms(eps: float, c: int):
    """(1 - eps) and eps / C as double-doubles."""
    p, err = _two_prod(eps / c, float(c))
    return _two_sum(1.0, -eps), (eps / c, ((eps - p) - err) / c)


def _finish_loss(pieces: list[float], infinite: set, want_low: bool):
    if infinite:
        return (NAN if len(infinite) > 1 else INF * infinite.pop()), 0.0
    return _dd(pieces) if want_low else (fsum(pieces), 0.0)


def _z_pieces(row: _Row, z: float) -> list[float]:
    """z lse^2 as pieces."""
    return _mul((z, 0.0), _dd(_mul(row.lse, row.lse)))


def sparse_exact(x: list[float], y: int, w, ignore_index, eps: float, z: float,
                 want_low: bool = True, denominator: float = 1.0,
                 precise: bool = False) -> RowResult:
    """Step 2 for one row (``w`` a list of floats or None): the row's loss and lse, and
    the gradient of loss / denominator."""
    c = len(x)
    row = _Row(x, precise)
    if y == ignore_index:
        return RowResult((0.0, 0.0), 0.0, row.lse if row.ok else (NAN, 0.0),
                         row.lse_scale() if row.ok else NAN, [(0.0, 0.0)] * c, [0.0] * c)
    if not 0 <= y < c:
        raise ValueError(f"oracle: label {y} outside [0, {c})")
    if not row.ok:
        return _nan_row(c)
    wv = [1.0] * c if w is None else [float(v) for v in w]
    one_m_eps, eps_c = _eps_terms(eps, c) if eps else ((1.0, 0.0), (0.0, 0.0))
    k = _dd(_mul(one_m_eps, (wv[y], 0.0)))  # (1 - eps) w_y
    log_s = row.log_s
    lse_scale = row.lse_scale()

    # ---- loss = k ((m - x_y) + log s) + eps_c (W log s + wd) + z lse^2
    pieces: list[float] = []
    infinite: set = set()
    scale = 0.0
    if k != (0.0, 0.0):
        dist = row.distance(y)
        if dist[0] == INF:
            infinite.add(1.0 if k[0] > 0 else -1.0)
        else:
            pieces += _mul(k, _dd([dist[0], dist[1], log_s[0], log_s[1]]))
            scale += abs(k[0]) * (dist[0] + log_s[0])
    w_sum = _dd(list(wv)) if eps else (0.0, 0.0)
    w_abs = fsum(abs(v) for v in wv) if eps else 0.0
    if eps:
        wd, wd_scale, inf_wd = row.weighted_distance([(v, 0.0) for v in wv], want_low)
        infinite |= inf_wd  # times eps_c > 0
        pieces += _mul(eps_c, _dd(_mul(w_sum, log_s) + list(wd)))
        scale += eps_c[0] * (w_abs * log_s[0] + wd_scale)
    if z:
        pieces += _z_pieces(row, z)
        scale += z * lse_scale * lse_scale
    loss = _finish_loss(pieces, infinite, want_low)

    # ---- gradient / d:  g_j = p_j A - eps_c w_j  (j != y)
    d = float(denominator)
    den = row.divisor(d)
    two_z_lse = _dd(_mul((z + z, 0.0), row.lse)) if z else (0.0, 0.0)
    a_extra = _dd(_mul(eps_c, w_sum) + list(two_z_lse))  # eps_c W + 2 z lse
    a_hi, a_lo = _dd(list(k) + list(a_extra))  # A
    a_extra_scale = eps_c[0] * w_abs + 2.0 * z * lse_scale
    a_scale = abs(k[0]) + a_extra_scale
    ah, al = _split(a_hi)
    b_hi, b_lo = eps_c if d == 1.0 else _quotient(list(eps_c), (d, 0.0))  # eps_c / d
    bh, bl = _split(b_hi)
    plain = a_hi == 1.0 and a_lo == 0.0 and not eps
    grad: list = []
    gscale: list = []
    for j, (q, q_lo) in enumerate(row.probabilities(den)):  # (q, q_lo) = e_j / (s d)
        if plain or j == y:  # g_j = p_j / d (the true class is replaced below)
            hi = q + q_lo
            grad.append((hi, (q_lo - (hi - q)) if want_low else 0.0))
            gscale.append(abs(hi))
            continue
        wj = wv[j]
        parts = []
        if q != 0.0:
            t = _SPLITTER * q
            qh = t - (t - q)
            ql = q - qh
            p = q * a_hi
            parts += (p, ((qh * ah - p) + qh * al + ql * ah) + ql * al, q * a_lo, q_lo * a_hi)
        if eps and wj != 0.0:
            wh, wl = _split(wj)
            p = b_hi * wj
            parts += (-p, -(((bh * wh - p) + bh * wl + bl * wh) + bl * wl), -b_lo * wj)
        hi = fsum(parts)
        grad.append((hi, fsum(parts + [-hi])) if want_low and hi - hi == 0.0 else (hi, 0.0))
        gscale.append(abs(q) * a_scale + abs(b_hi * wj))
    if not plain:
        # the true class, without p_y - 1:  (e_y (eps_c W + 2 z lse) - k q_y) / (s d)
        # - eps_c w_y / d,  q_y = sum_{i != y} e_i
        e_y = (row.e_hi[y], row.e_lo[y])
        q_y = _dd(row.e_hi + row.e_lo + [-e_y[0], -e_y[1]])
        g_y = _quotient(_mul(e_y, a_extra) + _neg(_mul(k, q_y)), den)
        if eps:
            g_y = _dd(list(g_y) + _neg(_mul((b_hi, b_lo), (wv[y], 0.0))))
        grad[y] = g_y if want_low else (g_y[0], 0.0)
        gscale[y] = ((e_y[0] * a_extra_scale + abs(k[0]) * q_y[0]) / abs(den[0])
                     + abs(b_hi * wv[y]))
    else:
        # plain: g_y = -q_y / (s d) exactly (p_y - 1 = -q_y / s)
        e_y = (row.e_hi[y], row.e_lo[y])
        q_y = _dd(row.e_hi + row.e_lo + [-e_y[0], -e_y[1]])
        g_y = _quotient(_neg(list(q_y)), den, want_low)
        grad[y] = g_y
        gscale[y] = abs(g_y[0])
    return RowResult(loss, INF if infinite else scale, row.lse, lse_scale, grad, gscale)


def dense_exact(x: list[float], t: list[float], w, eps: float, z: float,
                want_low: bool = True, denominator: float = 1.0,
                precise: bool = False) -> RowResult:
    """Step 3 for one row (``w`` a list of floats or None): the row's loss and lse, and
    the gradient of loss / denominator."""
    c = len(x)
    row = _Row(x, precise)
    if not row.ok:
        return _nan_row(c)
    if eps and not want_low:  # plain-float API: wt_c rounded (~1.5 ulps)
        one_m_eps, eps_c = 1.0 - eps, eps / c
        wt = [(one_m_eps * tj + eps_c, 0.0) for tj in t]
        if w is not None:
            wt = [(a * float(wj), 0.0) for (a, _), wj in zip(wt, w)]
    elif eps:
        one_m_eps, eps_c = _eps_terms(eps, c)
        wt = [_dd(_mul(one_m_eps, (tj, 0.0)) + list(eps_c)) for tj in t]
        if w is not None:
            wt = [_dd(_mul(a, (float(wj), 0.0))) for a, wj in zip(wt, w)]
    elif w is None:
        wt = [(tj, 0.0) for tj in t]
    else:
        wt = [_two_prod(float(wj), tj) for wj, tj in zip(w, t)]
    t_sum = _dd([v for pair in wt for v in pair])
    t_abs = fsum(abs(a) for a, _ in wt)
    log_s = row.log_s
    lse_scale = row.lse_scale()

    # ---- loss = T log s + sum wt_c (m - x_c) + z lse^2
    wd, wd_scale, infinite = row.weighted_distance(wt, want_low)
    pieces = _mul(t_sum, log_s) + list(wd)
    scale = t_abs * log_s[0] + wd_scale
    if z:
        pieces += _z_pieces(row, z)
        scale += z * lse_scale * lse_scale
    loss = _finish_loss(pieces, infinite, want_low)

    # ---- gradient / d:  (e_j (T + 2 z lse) - wt_j s) / (s d),  s = 1 + r_hi + r_lo
    d = float(denominator)
    den = row.divisor(d)
    two_z_lse = _dd(_mul((z + z, 0.0), row.lse)) if z else (0.0, 0.0)
    c_hi, c_lo = _dd(list(t_sum) + list(two_z_lse))
    ch, cl = _split(c_hi)
    r_hi, r_lo = row.r
    rh, rl = _split(r_hi)
    s_hi, s_lo = row.s
    zl = 2.0 * z * lse_scale
    den_abs = abs(den[0])
    den_split = _split(den[0])
    grad, gscale = [], []
    for eh, el, (a, a_lo) in zip(row.e_hi, row.e_lo, wt):
        parts = []
        if eh != 0.0:
            t_ = _SPLITTER * eh
            xh = t_ - (t_ - eh)
            xl = eh - xh
            p = eh * c_hi
            parts += (p, ((xh * ch - p) + xh * cl + xl * ch) + xl * cl, eh * c_lo, el * c_hi)
        if a != 0.0 or a_lo != 0.0:
            if abs(a) < _SPLIT_LIMIT:
                t_ = _SPLITTER * a
                wh = t_ - (t_ - a)
                wl = a - wh
            else:
                wh, wl = a, 0.0
            p = a * r_hi
            parts += (-a, -a_lo, -p, -(((wh * rh - p) + wh * rl + wl * rh) + wl * rl),
                      -a * r_lo, -a_lo * r_hi)
        grad.append(_quotient(parts, den, want_low, den_split) if parts else (0.0, 0.0))
        aa = a if a >= 0.0 else -a
        # s - e_j = (s_hi - e_j) + (s_lo - e_lo), for the scale
        gscale.append((eh * (t_abs - aa + zl) + aa * ((s_hi - eh) + (s_lo - el))) / den_abs)
    return RowResult(loss, INF if infinite else scale, row.lse, lse_scale, grad, gscale)


# ----------------------------------------------------------------------- one row, floats


def row_logsumexp(row: list[float]) -> float:
    """Step 1: lse of a list of Python floats; -inf for an empty row."""
    if not row:
        return -INF
    r = _Row(list(row))
    return r.lse[0] if r.ok else NAN


def row_probabilities(row: list[float], lse: float | None = None) -> list[float]:
    """softmax of the row, exactly (``lse`` is accepted for compatibility: only a NaN
    there is used, to give a NaN row)."""
    r = _Row(list(row))
    if not r.ok or (lse is not None and math.isnan(lse)):
        return [NAN] * len(row)
    return [q + q_lo for q, q_lo in r.probabilities(r.s)]


def sparse_row(x, y, w, ignore_index, eps, z):
    """Step 2 for one row: (loss, lse, gradient of the row's loss), floats."""
    res = sparse_exact(list(x), y, w, ignore_index, eps, z, want_low=False)
    return res.loss[0], res.lse[0], [g for g, _ in res.grad]


def dense_row(x, t, w, eps, z):
    """Step 3 for one row: (loss, lse, gradient of the row's loss), floats."""
    res = dense_exact(list(x), list(t), w, eps, z, want_low=False)
    return res.loss[0], res.lse[0], [g for g, _ in res.grad]


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


@dataclass
class Exact:
    """An exact result.  ``value``: float64, the truth rounded to nearest (to within
    libm's exp: at most one ulp off); ``low``: the residual, value + low being the
    oracle's double-double result (within about half an ulp); ``scale``: the sum of
    the magnitudes of the terms of the non-cancelling form, == |value| unless the
    result is a genuine near-zero crossing.  All three have the result's shape."""

    value: np.ndarray
    low: np.ndarray
    scale: np.ndarray


def _exact_rows(logits, labels, axis, weight, ignore_index, eps, z, reduction, want_low,
                precise=False):
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    axis = axis % logits.ndim
    c = logits.shape[axis]
    x_rows, batch_shape = _rows(logits, axis)
    w = None if weight is None else [float(v) for v in np.asarray(weight).ravel()]
    sparse = labels.dtype.kind in "iu"
    if sparse:
        y_rows = [int(v) for v in labels.reshape(-1).tolist()]
        denom = denominator(labels, weight=weight, ignore_index=ignore_index)
    else:
        t_rows, _ = _rows(labels, axis)
        denom = float(len(x_rows))
    if reduction == "mean":
        grad_denominator = denom
    elif reduction in ("sum", "none"):
        grad_denominator = 1.0
    else:
        raise ValueError(reduction)
    # xentfast: a mean over nothing kept is 0 with a zero gradient (PyTorch: NaN)
    nothing = reduction == "mean" and denom == 0
    results: list[RowResult] = []
    for i, x in enumerate(x_rows):
        if sparse:
            res = sparse_exact(x, y_rows[i], w, ignore_index, eps, z, want_low,
                               1.0 if nothing else grad_denominator, precise)
        else:
            res = dense_exact(x, t_rows[i], w, eps, z, want_low,
                              1.0 if nothing else grad_denominator, precise)
        if nothing:
            res.grad, res.grad_scale = [(0.0, 0.0)] * c, [0.0] * c
        results.append(res)

    def per_row(get, scale_of):
        return Exact(np.array([get(r)[0] for r in results], dtype=np.float64).reshape(batch_shape),
                     np.array([get(r)[1] for r in results], dtype=np.float64).reshape(batch_shape),
                     np.array([scale_of(r) for r in results], dtype=np.float64).reshape(batch_shape))

    rows = per_row(lambda r: r.loss, lambda r: r.loss_scale)
    if reduction == "none":
        loss = rows
    else:
        values = [v for r in results for v in r.loss]
        total = _sum(values)
        scale = fsum(r.loss_scale for r in results) if total - total == 0.0 else abs(total)
        if total - total != 0.0 or (reduction == "sum" and not want_low):
            pair = (total, 0.0)
        elif reduction == "sum":
            pair = _dd(values)
        elif nothing:
            pair, scale = (0.0, 0.0), 0.0
        else:
            pair = _quotient(values, (denom, 0.0), want_low)
            scale /= abs(denom)
        loss = Exact(np.array(pair[0]), np.array(pair[1]), np.array(scale))
    return {
        "loss": loss,
        "rows": rows,
        "lse": per_row(lambda r: r.lse, lambda r: r.lse_scale),
        "grad": Exact(
            _from_rows([[g[0] for g in r.grad] for r in results], batch_shape, axis, c),
            _from_rows([[g[1] for g in r.grad] for r in results], batch_shape, axis, c),
            _from_rows([r.grad_scale for r in results], batch_shape, axis, c)),
        "denominator": denom,
    }


def exact_cross_entropy(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                        label_smoothing=0.0, z_loss=0.0, reduction="none",
                        precise: bool | None = None) -> dict:
    """Exact results with xentfast's / PyTorch's semantics, each an :class:`Exact`:
    "loss" (the returned loss: batch-shaped for "none", 0-d for "mean"/"sum"), "rows"
    (per-row losses), "lse" (batch shape), "grad" (the logits' shape: the gradient of
    the returned loss; for "none" of the sum of per-row losses); and "denominator"
    (the "mean" reduction's, a float).

    ``precise`` (default: for float64 logits, when mpmath is installed): exp to ~2**-110
    by mpmath instead of libm's (< 0.502 ulp) -- what float64 results need to be
    measured to a fraction of an ulp; float32 and 16-bit results do not."""
    return _exact_rows(logits, labels, axis, weight, ignore_index, float(label_smoothing),
                       float(z_loss), reduction, want_low=True,
                       precise=_want_precise(logits, precise))


def _want_precise(x, precise: bool | None) -> bool:
    if precise is None:
        precise = np.asarray(x).dtype == np.float64
    return bool(precise) and mpmath is not None


def cross_entropy(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                  label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """Loss and gradient (float64) with xentfast's / PyTorch's semantics.

    Returns ``(loss, grad, lse)``: loss a float ("mean"/"sum") or an array of the batch
    shape ("none"); grad of the logits' shape; lse of the batch shape.
    """
    res = _exact_rows(logits, labels, axis, weight, ignore_index, float(label_smoothing),
                      float(z_loss), reduction, want_low=False)
    loss = res["loss"].value
    if reduction != "none":
        loss = float(loss)
    return loss, res["grad"].value, res["lse"].value


def _sum(values: list[float]) -> float:
    """Correctly rounded sum; NaN or inf inputs follow IEEE (fsum raises on inf - inf)."""
    if any(math.isnan(v) for v in values):
        return NAN
    infinities = {v for v in values if math.isinf(v)}
    if infinities:
        return infinities.pop() if len(infinities) == 1 else NAN  # inf + -inf = NaN
    return fsum(values)


def denominator(labels, *, weight=None, ignore_index=-100) -> float:
    """The "mean" denominator for index labels: sum of w_y (count) over kept rows."""
    ys = [int(v) for v in np.asarray(labels).reshape(-1).tolist()]
    if weight is None:
        return float(sum(1 for y in ys if y != ignore_index))
    w = [float(v) for v in np.asarray(weight).ravel()]
    return fsum(w[y] for y in ys if y != ignore_index)


# ----------------------------------------------------------------------- primitives


def exact_primitive(x, op: str, axis=-1, precise: bool | None = None) -> Exact:
    """``op`` in softmax / log_softmax / logsumexp, exactly (``axis=None``: over all
    elements, flattened).  Scales equal |value|: every form here is one-signed.
    ``precise``: as for :func:`exact_cross_entropy`."""
    return exact_primitives(x, axis, precise, ops=(op,))[op]


def exact_primitives(x, axis=-1, precise: bool | None = None,
                     ops=("logsumexp", "log_softmax", "softmax")) -> dict:
    """{op: Exact} for several primitives from one pass over the rows."""
    precise = _want_precise(x, precise)
    x = np.asarray(x)
    if axis is None:
        x = x.reshape(-1)
        axis = 0
    axis = axis % x.ndim
    c = x.shape[axis]
    rows, batch_shape = _rows(x, axis)
    stats = [_Row(r, precise) for r in rows]
    out = {}
    for op in ops:
        if op == "logsumexp":
            vals = [s.lse if s.ok else ((-INF if not s.x else NAN), 0.0) for s in stats]
            out[op] = Exact(
                np.array([v[0] for v in vals], dtype=np.float64).reshape(batch_shape),
                np.array([v[1] for v in vals], dtype=np.float64).reshape(batch_shape),
                np.array([s.lse_scale() if s.ok else NAN for s in stats],
                         dtype=np.float64).reshape(batch_shape))
            continue
        if op not in ("softmax", "log_softmax"):
            raise ValueError(op)
        out_v, out_l = [], []
        for s in stats:
            if not s.ok:
                out_v.append([NAN] * c); out_l.append([0.0] * c)
                continue
            vals, lows = [], []
            if op == "softmax":
                for q, q_lo in s.probabilities(s.s):
                    hi = q + q_lo
                    vals.append(hi)
                    lows.append(q_lo - (hi - q))
            else:  # (x_j - m) - log s: two terms <= 0, TwoSum of the leading parts
                lh, ll = s.log_s
                nl = -lh
                for dh, dl in zip(s.d_hi, s.d_lo):
                    if dh == -INF:
                        vals.append(-INF); lows.append(0.0)
                        continue
                    a = dh + nl
                    bb = a - dh
                    t = ((dh - (a - bb)) + (nl - bb)) + (dl - ll)
                    hi = a + t
                    vals.append(hi)
                    lows.append(t - (hi - a))
            out_v.append(vals)
            out_l.append(lows)
        value = _from_rows(out_v, batch_shape, axis, c)
        out[op] = Exact(value, _from_rows(out_l, batch_shape, axis, c), np.abs(value))
    return out


def logsumexp(x, axis=-1, keepdims=False):
    result = exact_primitive(x, "logsumexp", axis, precise=False).value
    if keepdims:
        shape = list(np.shape(x))
        if axis is None:
            shape = [1] * len(shape)
        else:
            shape[axis % len(shape)] = 1
        result = result.reshape(shape)
    return result


def softmax(x, axis=-1):
    return exact_primitive(x, "softmax", axis, precise=False).value.reshape(np.shape(x))


def log_softmax(x, axis=-1):
    return exact_primitive(x, "log_softmax", axis, precise=False).value.reshape(np.shape(x))


# ----------------------------------------------------------------------- Keras


def _clip(v: float) -> float:
    return min(max(v, KERAS_EPSILON), 1.0 - KERAS_EPSILON)


def _term(coefficient: float, difference: float) -> float:
    """coefficient * difference, where a zero coefficient contributes exactly 0."""
    return 0.0 if coefficient == 0.0 else coefficient * difference


def keras_categorical(y_true, y_pred, *, from_logits=False, label_smoothing=0.0, axis=-1):
    """Per-sample ``keras.losses.categorical_crossentropy`` in float64."""
    y_pred = np.asarray(y_pred)
    y_true = np.asarray(y_true)
    eps = float(label_smoothing)
    axis = axis % y_pred.ndim
    num_classes = y_pred.shape[axis]  # smoothing spreads eps over the class axis
    p_rows, batch_shape = _rows(y_pred, axis)
    t_rows, _ = _rows(y_true, axis)
    out = []
    for p, t in zip(p_rows, t_rows):
        if eps:
            t = [(1.0 - eps) * v + eps / num_classes for v in t]
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
    axis = axis % y_pred.ndim
    if y_true.ndim == y_pred.ndim:  # Keras drops a size-1 class axis, else a size-1 last
        size_one = [d for d in (axis, y_true.ndim - 1) if y_true.shape[d] == 1]
        if size_one:
            y_true = np.squeeze(y_true, axis=size_one[0])
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
