"""Row passes of the Numba CPU kernels (``numba_cpu``), written once as templates.

Pass A (``_row_max``), pass B (``_pass_b``, and the 512-bit ``_wide_ab`` for long rows;
``_pass_ab`` picks), pass C (``_pass_c``), softmax's compensated pass B and
log_softmax's pass; the op codes and gradient modes they are specialised on.  The
derivations are in ``xentfast/backends/__init__.py`` and ``rowmath``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from ._numba_math import (_JIT, _STRICT_JIT, _acc, _dense_grad, _exp_diff, _ld,
                          _log_softmax, _log_sum_exp, _maxnum, _prefer_wide_vectors,
                          _prefetch, _rest_mass, _smoothed_weight, _softmax, _st, _stub,
                          _two_sum_add)

# ---------------------------------------------------------------------------------------
# Templates.  A template is an overload of a stub whose trailing parameters (lower case:
# ``lab``, ``store`` ...) must be constants at the call site; the overload reads their
# values and returns a body whose closure holds them in upper case (``LAB``, ``STORE``),
# so that Numba prunes the branches on them before typing and each combination
# compiles to its own straight-line loops.  (Numba does not prune branches on literal
# *arguments* of an ``njit`` function; it does on closure constants.)
#
# Op codes (``OP``) and gradient modes (``GRAD``) of the bodies and drivers:
LSE, LOGSM, SOFTMAX, SPARSE, SMOOTH, DENSE, STATS0, STATS1, STATS2 = range(9)
G_NONE, G_STORE, G_INPLACE, G_HALF, G_HALF_INPLACE = range(5)
E_SCRATCH = 5   # pass C's source of e_j for 16-bit rows: a float32 scratch row (xr)
# Pass B's label sums per op: 0 none, 1 sum_{w_j != 0} w_j (m - x_j) (smoothing, with the
# weights), 2 probability labels' sum_j wt_j and sum_{wt_j != 0} wt_j (m - x_j).
_LAB = {LSE: 0, LOGSM: 0, SOFTMAX: 0, SPARSE: 0, SMOOTH: 1, DENSE: 2, STATS0: 0,
        STATS1: 1, STATS2: 2}
# Pass B's store of e_j (per gradient mode): 0 none, 1 into grad (16-bit: into a float32
# scratch row, which pass C reads -- a 16-bit gradient cannot hold e_j without a second
# rounding), 2 in place (grad is x: one array, so that LLVM sees one pointer; two
# arguments that happen to be one array fail the vectoriser's run-time overlap check
# and run the scalar loop, 3-4x slower).
_STORE = {G_NONE: 0, G_STORE: 1, G_INPLACE: 2, G_HALF: 1, G_HALF_INPLACE: 1}
# Pass C's form per op: 0 g = e a, 1 g = e a - b_j, 2 probability labels, 3 softmax.
_KIND = {SPARSE: 0, SMOOTH: 1, DENSE: 2, SOFTMAX: 3}


def _literals(*flags):
    """The values of a template's constant parameters (None unless all are literals)."""
    if all(isinstance(f, types.Literal) for f in flags):
        return tuple(f.literal_value for f in flags)
    return None


def _template(stub):
    return overload(stub, prefer_literal=True, jit_options=_JIT)


# ---------------------------------------------------------------------------------------
# Row passes.  ``xr``, ``gr`` ... are 1-D contiguous views of one row (or segment).
#    Pass B returns rowmath's (u, t): u = sum_{x_j < m} e_j, t = the sum of the other
#    e_j (the ties at the max, 1 each; NaN for a NaN or +inf in the row), in two lane
#    accumulators, so that r = u + (t - 1) keeps the mass of a confident row's other
#    classes instead of rounding it into s = 1 + r.
#    Sums run over blocks of 256 elements (``xr[j0:j0 + 256]``: a view with a plain
#    0-based index, which LLVM vectorises; an index like range(j0, j1) it could not prove
#    non-negative and turned into gathers).  Inside a block the SIMD lanes add in the
#    row's dtype (LLVM keeps 16-64 partial sums, so 4-16 terms each); the block totals
#    are added in float64 with their rounding errors carried (TwoSum), so a row of any
#    length drifts no more than one block does.  With blocks of 1024 and plain totals,
#    the lse of a float64 row of 40,000 equal terms (m = 0) was 7.5 ulps off; now within
#    the contract's 4 (tests/test_adversarial.py).  The block size is a literal, not a
#    tunable: it is part of the fixed summation order.
# ---------------------------------------------------------------------------------------


@njit(**_JIT)
def _row_max(xr):
    """Pass A: m = max_j x_j (NaN ignored; -inf for an all-(-inf)/NaN row)."""
    m = _acc(xr)(-np.inf)
    for j in range(xr.shape[0]):
        m = _maxnum(m, _ld(xr, j))
    return m


@njit(**_JIT)
def _row_scalars(x, m, u, t):
    """(r, log s, lse) of a row in the accumulation dtype of x, from pass A's m and pass
    B's float64 (u, t): r = u + (t - 1), log s = log1p(r), lse = m + log s."""
    T = _acc(x)
    r = T(_rest_mass(u, t, 1.0))
    log_s = T(np.log1p(r))
    return r, log_s, _log_sum_exp(m, log_s)


_pass_b = _stub("_pass_b", "Pass B of a row: (u, t, coef_off, coef_tie, dist); see the "
                           "template.")


@_template(_pass_b)
def _pass_b_t(xr, m, tr, w, one_m_eps, eps_c, gr, lab, store):
    """e_j = exp(x_j - m) summed into (u, t); with LAB 1 also dist = sum_{w_j != 0}
    w_j (m - x_j) (m - x_j >= 0: a zero weight skips even x_j = -inf); with LAB 2, wt_j =
    w_j ((1 - eps) t_j + eps/C), dist = sum_{wt_j != 0} wt_j (m - x_j) and T = sum_j wt_j
    in two parts (rowmath.py): coef_tie over the ties at the max, coef_off over the rest
    (lanes in the row's dtype, block totals in float64; float64 rows take
    ``_label_mass``'s compensated sums instead).  STORE 1 writes e_j (as the gradient
    passes use it) into gr, 2 in place (gr is the row: x_j read before written)."""
    if (k := _literals(lab, store)) is None:
        return None
    LAB, STORE = k

    def impl(xr, m, tr, w, one_m_eps, eps_c, gr, lab, store):
        T = _acc(xr)
        zero = T(0)
        one = T(1)
        u = 0.0
        u_lo = 0.0
        t = 0.0
        dist = 0.0
        coef_off = 0.0
        coef_tie = 0.0
        for j0 in range(0, xr.shape[0], 256):
            if STORE != 0:
                gb = gr[j0:j0 + 256]
            if STORE == 2:
                xb = gb
            else:
                xb = xr[j0:j0 + 256]
            if LAB != 0:
                wb = w[j0:j0 + 256]
            if LAB == 2:
                tb = tr[j0:j0 + 256]
            bu = zero
            bt = zero
            bd = zero
            bc = zero
            bct = zero
            for j in range(xb.shape[0]):
                xj = _ld(xb, j)
                e = _exp_diff(xj, m)
                if STORE != 0:
                    gb[j] = e
                d = xj - m
                eu = zero if d == zero else e
                tie = one if d == zero else zero
                bu += eu
                bt += tie
                if LAB == 1:
                    wj = wb[j]
                    bd += wj * (m - xj) if wj != zero else zero
                if LAB == 2:
                    wt = _smoothed_weight(wb[j], _ld(tb, j), one_m_eps, eps_c)
                    bd += wt * (m - xj) if wt != zero else zero
                    wtie = wt if d == zero else zero
                    bc += wt - wtie
                    bct += wtie
            u, u_lo = _two_sum_add(u, u_lo, bu)
            coef_off += bc
            coef_tie += bct
            t += bt
            dist += bd
        return u + u_lo, t, coef_off, coef_tie, dist

    return impl


_wide_ab = _stub("_wide_ab", "Passes A and B of a long row on 512-bit vectors.")


@_template(_wide_ab)
def _wide_ab_t(xr, xnext, prefetch, gr, store):
    """Passes A and B of a row of at least 64 classes, on 512-bit vectors (see
    ``_prefer_wide_vectors``); returns (m, u, t), and with STORE 1 writes e_j into ``gr``
    (which must not be ``xr``: in place has its own pass).  With ``prefetch``, the next
    row ``xnext`` is requested into L2 during pass B, so that its pass A, which would
    otherwise wait on memory with the core idle, reads from cache.

    Tails: LLVM runs 4 x 16 lanes per iteration, and a remainder of up to 63 scalar exps
    costs as much as a thousand vector ones.  So the loops run over the first
    ``body = c - c % 64`` elements, and the rest is one more full 64-element window
    ``x[c-64:c)``: for the max, overlapping is harmless; for the sums, the lanes already
    counted contribute 0 (a select on the index, so the window vectorises); the stores
    of the overlap write again the values already there (same x, same m, same exp)."""
    if (k := _literals(store)) is None:
        return None
    STORE, = k

    def impl(xr, xnext, prefetch, gr, store):
        _prefer_wide_vectors()
        T = _acc(xr)
        zero = T(0)
        one = T(1)
        n = xr.shape[0]
        body = n - n % 64
        window = xr[n - 64:]
        m = T(-np.inf)
        xb = xr[:body]
        for j in range(xb.shape[0]):
            m = _maxnum(m, _ld(xb, j))
        for j in range(64):
            m = _maxnum(m, _ld(window, j))
        line = 64 // xr.itemsize  # elements per cache line
        u = 0.0
        u_lo = 0.0
        t = 0.0
        for j0 in range(0, body, 256):
            if prefetch:
                for k in range(j0, min(j0 + 256, n), line):
                    _prefetch(xnext, k)
            xb = xr[j0:min(j0 + 256, body)]
            if STORE == 1:
                gb = gr[j0:min(j0 + 256, body)]
            bu = zero
            bt = zero
            for j in range(xb.shape[0]):
                xj = _ld(xb, j)
                e = _exp_diff(xj, m)
                if STORE == 1:
                    gb[j] = e
                d = xj - m
                eu = zero if d == zero else e
                tie = one if d == zero else zero
                bu += eu
                bt += tie
            u, u_lo = _two_sum_add(u, u_lo, bu)
            t += bt
        if body < n:
            if prefetch:
                _prefetch(xnext, n - 1)
            counted = body - (n - 64)  # window lanes [0, counted) are in the blocks above
            if STORE == 1:
                gw = gr[n - 64:]
            bu = zero
            bt = zero
            for j in range(64):
                xj = _ld(window, j)
                e = _exp_diff(xj, m)
                if STORE == 1:
                    gw[j] = e
                fresh = j >= counted               # lanes [0, counted) were summed above:
                d = xj - m if fresh else one       # such a lane is no tie ...
                eu = zero if (d == zero or not fresh) else e   # ... and adds no term
                tie = one if d == zero else zero
                bu += eu
                bt += tie
            u, u_lo = _two_sum_add(u, u_lo, bu)
            t += bt
        return m, u + u_lo, t

    return impl


@njit(**_JIT)
def _row_max_sumexp_wide(xr, xnext, prefetch, gr, store):
    """``_wide_ab`` with a run-time ``store`` flag (a test hook)."""
    if store:
        return _wide_ab(xr, xnext, prefetch, gr, 1)
    return _wide_ab(xr, xnext, prefetch, gr, 0)


@njit(**_STRICT_JIT)
def _label_mass(xr, m, tr, w, one_m_eps, eps_c):
    """(T_off, T_tie) of a row of probability labels (rowmath.py): the sums of wt_j =
    w_j ((1 - eps) t_j + eps/C) off and on the ties at the max m, in float64 with the
    rounding errors kept (TwoSum, two chains for T_off; strict flags): the gradient at
    the max is T_off itself, and smoothing adds C equal terms eps/C, whose plain sum
    errs the same way at every step (72 ulps of a float64 T_off ~ 1 at C = 1000).  A
    scalar pass over a float64 row before pass B (which may overwrite x in place);
    float32 rows keep pass B's sums (float32 lanes over blocks of 256, float64 block
    totals: a few float32 ulps)."""
    n = xr.shape[0]
    a0 = a1 = lo0 = lo1 = 0.0      # T_off: two chains and their rounding errors
    tie = tie_lo = 0.0
    j = 0
    while j + 1 < n:
        w0 = np.float64(_smoothed_weight(w[j], _ld(tr, j), one_m_eps, eps_c))
        w1 = np.float64(_smoothed_weight(w[j + 1], _ld(tr, j + 1), one_m_eps, eps_c))
        t0 = _ld(xr, j) - m == 0
        t1 = _ld(xr, j + 1) - m == 0
        a0, lo0 = _two_sum_add(a0, lo0, 0.0 if t0 else w0)
        a1, lo1 = _two_sum_add(a1, lo1, 0.0 if t1 else w1)
        if t0 or t1:               # ties at the max: one per row, as a rule
            tie, tie_lo = _two_sum_add(tie, tie_lo, (w0 if t0 else 0.0) + (w1 if t1 else 0.0))
        j += 2
    if j < n:
        w0 = np.float64(_smoothed_weight(w[j], _ld(tr, j), one_m_eps, eps_c))
        if _ld(xr, j) - m == 0:
            tie, tie_lo = _two_sum_add(tie, tie_lo, w0)
        else:
            a0, lo0 = _two_sum_add(a0, lo0, w0)
    hi, lo = _two_sum_add(a0, lo0 + lo1, a1)
    return hi + lo, tie + tie_lo


_pass_ab = _stub("_pass_ab", "Passes A and B of row i: (m, u, t, coef_off, coef_tie, "
                             "dist).")


@_template(_pass_ab)
def _pass_ab_t(x, i, r1, wide, prefetch, tr, w, one_m_eps, eps_c, gr, lab, store):
    """(m, u, t, coef_off, coef_tie, dist) of row i of x (pass B's sums and stores as
    ``_pass_b``):
    the wide passes for long rows (``wide``; plain sums or a store into gr, never in
    place), prefetching row i + 1 when it is in [r0, r1) of this thread; else A, B."""
    if (k := _literals(lab, store)) is None:
        return None
    LAB, STORE = k
    WIDE_OK = int(LAB == 0 and STORE != 2)
    COMPENSATED = int(LAB == 2 and x.dtype == types.float64)

    def impl(x, i, r1, wide, prefetch, tr, w, one_m_eps, eps_c, gr, lab, store):
        if WIDE_OK == 1:
            if wide:
                following = i + 1 < r1
                m, u, t = _wide_ab(x[i], x[i + 1] if following else x[i],
                                   prefetch and following, gr, STORE)
                return m, u, t, 0.0, 0.0, 0.0
        m = _row_max(x[i])
        if COMPENSATED == 1:
            off, tie = _label_mass(x[i], m, tr, w, one_m_eps, eps_c)
        u, t, coef_off, coef_tie, dist = _pass_b(x[i], m, tr, w, one_m_eps, eps_c, gr, LAB,
                                                 STORE)
        if COMPENSATED == 1:
            coef_off, coef_tie = off, tie
        return m, u, t, coef_off, coef_tie, dist

    return impl


@njit(**_JIT)
def _row_softmax_exp(xr, m, out):
    """Pass B of softmax: out_j = e_j = exp(x_j - m) compensated for the rounding of
    x_j - m (_exp_diff); returns (u, t).  The sum is kept tighter than the loss passes'
    (softmax's bound is 4 ulps): the lanes add in float64 (float32 terms exactly) over
    blocks of 256, and the block totals are added with their rounding errors kept."""
    T = xr.dtype.type
    zero = T(0)
    one = T(1)
    hi = 0.0
    lo = 0.0
    t = 0.0
    for j0 in range(0, xr.shape[0], 256):
        xb = xr[j0:j0 + 256]
        ob = out[j0:j0 + 256]
        bu = 0.0
        bt = zero
        for j in range(xb.shape[0]):
            xj = xb[j]
            e = _exp_diff(xj, m)
            ob[j] = e
            d = xj - m
            eu = zero if d == zero else e
            tie = one if d == zero else zero
            bu += eu
            bt += tie
        hi, lo = _two_sum_add(hi, lo, bu)
        t += bt
    return hi + lo, t


_pass_c = _stub("_pass_c", "Pass C of a row: the gradient (or softmax) from e_j.")


@_template(_pass_c)
def _pass_c_t(xr, gr, m, a, bvec, tr, w, one_m_eps, eps_c, r, coef, gos, kind, grad, wide):
    """gr_j <- g(e_j), written in gr's format: KIND 0 e_j a, 1 e_j a - bvec_j, 2
    rowmath.dense_grad(e_j, wt_j, r, coef, a, gos) (probability labels: a is T_tie),
    3 softmax e_j / s.
    e_j is gr_j as pass B stored it (float gradients), xr_j (GRAD E_SCRATCH: 16-bit rows,
    xr the float32 scratch row pass B stored e_j in), or for 16-bit split rows (GRAD 3,
    4) computed again from x_j (4: in place, x is gr).  WIDE: on 512-bit vectors."""
    if (k := _literals(kind, grad, wide)) is None:
        return None
    KIND, GRAD, WIDE = k[0], k[1], int(k[2])

    def impl(xr, gr, m, a, bvec, tr, w, one_m_eps, eps_c, r, coef, gos, kind, grad, wide):
        if WIDE == 1:
            _prefer_wide_vectors()
        one = _acc(gr)(1)
        for j in range(gr.shape[0]):
            if GRAD == G_HALF:
                e = _exp_diff(_ld(xr, j), m)
            elif GRAD == G_HALF_INPLACE:
                e = _exp_diff(_ld(gr, j), m)
            elif GRAD == E_SCRATCH:
                e = xr[j]
            else:
                e = gr[j]
            if KIND == 0:
                v = e * a
            elif KIND == 1:
                v = e * a - bvec[j]
            elif KIND == 2:
                v = _dense_grad(e, _smoothed_weight(w[j], _ld(tr, j), one_m_eps, eps_c),
                                r, coef, a, gos)
            else:
                v = _softmax(e, one, r)
            _st(gr, j, v)

    return impl


@njit(**_JIT)
def _row_fill(gr, v):
    for j in range(gr.shape[0]):
        _st(gr, j, v)


@njit(**_JIT)
def _row_logsm(xr, m, log_s, out):
    """out_j = (x_j - m) - log s  (rowmath.log_softmax)."""
    for j in range(xr.shape[0]):
        out[j] = _log_softmax(xr[j], m, log_s)
