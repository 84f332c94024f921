"""Backend ``cpu``: fused softmax cross-entropy kernels compiled by Numba (``parallel=True``).

Same destination-passing kernel set, signatures and semantics as ``numpy_ref`` (see the
contract and the derivations in ``xentfast/backends/__init__.py``), but each row is done
in a few passes over memory and with no (n, c) temporary:

    pass A   m = max_j x_j                                         (read x)
    pass B   e_j = exp(x_j - m);  u = sum of e_j off the max, t = ties at the max
             (+ weighted sums)                                     (read x; with a
             float gradient, write e_j into grad: exp is computed once per element)
             r = u + (t - 1), log s = log1p(r), lse = m + log s; the loss (rowmath)
    pass C   grad_j = e_j * a - b_j                                (read/write grad while
                                                                    the row is in cache)

Paths (``plan()``: from the shape and the options only, never from the thread count;
``tuning()`` forces any part of the choice):

* serial   -- n*c <= SERIAL_MAX_ELEMS: the driver runs as one chunk on the calling
              thread (its twin compiled without ``parallel``; no launch).
* rows     -- c > SMALL_C_MAX: ``prange`` over chunks of rows, one row per pass A/B/C
              sequence, SIMD along the row.  Loss-only, logsumexp and sparse
              loss+grad rows (not in place, no label smoothing) of at least WIDE_MIN_C
              classes run passes A, B (and C) on 512-bit vectors and prefetch the
              next row (``_row_max_sumexp_wide``).
* small C  -- c <= SMALL_C_MAX: blocks of SMALL_C_BLOCK rows are transposed into a
              class-major scratch buffer so the SIMD lanes run across rows.
* split    -- n <= SPLIT_MAX_ROWS and c >= SPLIT_MIN_C (few, very long rows: fewer rows
              than cores): every row is cut into SPLIT_SEGMENTS segments (a constant),
              the segments run in parallel and are combined in segment order.
              Used for logsumexp, log_softmax, softmax and sparse without smoothing;
              the rarer dense / label-smoothing cases use the row path there.

One template, many kernels
--------------------------
Every family is written once and specialised at compile time.  The variant flags (``OP``,
the label kind ``LAB``, the gradient mode ``GRAD``, the pass-B store mode ``STORE``, the
pass-C kind) are passed between jitted functions as constants, which Numba types as
literals: each combination is compiled as a function of its own with the dead branches
pruned, so the inner loops are exactly the hand-written variants' (same instructions,
same bits).  The chunk drivers -- the only functions called from Python -- are made by
``_driver(path, op, grad, parallel)``, a factory whose closure holds only those plain
constants (Numba's cache keys a closure by its constants, so drivers load from the
cache like any function; a driver never closes over a jitted function, which would
not).  The element type is a template parameter too: ``_ld``/``_st`` read and write an
element of a float array as it is, and of a 16-bit array as its bits (below).

Native 16-bit (``NATIVE_HALF``)
-------------------------------
``sparse`` and ``dense`` read float16 and bfloat16 logits (and probability labels) as
their bits -- float16 travels as an int16 view, bfloat16 as a uint16 view, so that the
element type selects the conversion -- converted to float32 in registers as they are
loaded (``_ld``); the arithmetic is float32 (loss, lse and weights are float32), and the
gradient is written in the input's format, rounded once, to nearest even (``_st``).  A
16-bit gradient cannot hold e_j between passes B and C without a second rounding, so
pass B stores e_j into a float32 scratch row (c floats per thread, allocated once per
chunk) and pass C reads it there and writes the 16-bit gradient; the split path (at most
SPLIT_MAX_ROWS very long rows, where the scratch would be (n, c)) computes e_j again
from x in its pass C.  Either way the same float32 values in the same order: bitwise
the float32 kernel's results on the upcast logits, rounded once.  No (n, c) float32
temporary is made.

Threading layer
---------------
This module leaves ``numba.config.THREADING_LAYER`` alone (the process's choice).  Numba's
default layer, "workqueue", is not thread-safe: two Python threads launching parallel
kernels at once abort the process ("Concurrent access has been detected").  So every
parallel launch of this module checks the layer Numba resolved (``numba.threading_layer()``
after the first launch, before it the configured one, where "default" may resolve to
workqueue): under workqueue the launches are serialised by a module lock; under "omp"
or "tbb" they run concurrently.  Set ``NUMBA_THREADING_LAYER=omp`` (or ``tbb``, or
``threadsafe``) before the first parallel Numba call to let threads run kernels
concurrently.

Layout
------
``_numba_math``: the Numba options (the one place they are set), the intrinsics, 16-bit
element access, the vectorisable exp and log; ``_numba_plan``: the tunables, ``plan`` and
``tuning`` (re-exported here).  ``_numba_passes``: the row passes A, B, C and the template
machinery.  This module: 1. parallel launches; 2. the row body ``_rows``; 3. the small-C
body ``_small`` and the driver factory ``_driver``; 4. split rows; 5. the public
kernels; 6. row statistics.

Precision rule
--------------
Arithmetic happens in the accumulation dtype: float32 for float32 and 16-bit logits,
float64 for float64 logits.  Outputs have the logits' dtype, so each per-element value
is rounded once.  The per-row scalars come from ``rowmath`` in its non-cancelling forms
-- (m - x_y) + log1p(r), the true-class gradient -((1 - e_y) + r)/s instead of p_y - 1,
W log s + wd instead of W lse - sum w x -- compiled with no fastmath flag at all, so
that LLVM cannot reassociate them back (``_STRICT_JIT``).  Row sums are accumulated in
blocks of 1024 terms (SIMD partial sums inside a block in the row's dtype, block totals
in float64), so the rounding error of a float32 row does not grow with its length.
softmax's e_j (and float64 gradients' e_j) are compensated for the rounding of x_j - m.

Determinism
-----------
A row is reduced by one thread, in an order fixed by the compiled loop (vector width and
unrolling are compile-time constants), so results do not depend on the thread count or
on which thread takes the row.  The split path cuts a row into SPLIT_SEGMENTS segments --
a constant, not the thread count -- and combines them in segment order.  Which path runs
depends only on the shape and the options.
"""

from __future__ import annotations

import dataclasses
import threading

import numba
import numpy as np
from numba import njit, prange, types

from .. import _forkguard
from ._numba_plan import (CHUNK_ELEMS, OPS, PATHS, PREFETCH_MAX_GRAD_ROW_BYTES,  # noqa: F401
                          PREFETCH_MAX_ROW_BYTES, SERIAL_MAX_ELEMS, SMALL_C_BLOCK,
                          SMALL_C_CHUNK_ELEMS, SMALL_C_MAX, SPLIT_MAX_ROWS, SPLIT_MIN_C,
                          SPLIT_SEGMENTS, WIDE_MIN_C, Path, Plan, Tuning, _chunking,
                          _split_geometry, _tuning, can_split, has_wide_passes, plan,
                          tuning)
from ._numba_passes import (DENSE, E_SCRATCH, G_HALF, G_HALF_INPLACE, G_INPLACE, G_NONE, G_STORE,  # noqa: F401
                            LOGSM, LSE, SMOOTH, SOFTMAX, SPARSE, STATS0, _KIND, _LAB,
                            _STORE, _literals, _pass_ab, _pass_b, _pass_c, _row_fill,
                            _row_logsm, _row_max, _row_max_sumexp_wide, _row_scalars,
                            _row_softmax_exp, _template)
from ._numba_math import (_JIT, _PJIT, _acc, _dense_coef, _dense_grad, _dense_loss, _exp,  # noqa: F401
                          _exp_diff, _grad_over_sum, _ld, _log1p, _log_sum_exp,
                          _maxnum, _rest_mass, _smoothed_weight, _softmax, _sparse_loss,
                          _sparse_scale, _sparse_true_grad, _st, _stub, _two_sum_add,
                          bits_view, exp_array, log1p_array, log_array)
from ._numba_shards import shard_grad_rows  # noqa: F401  (section 6: _shards' gradient)

NAME = "cpu"
NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
NATIVE_HALF = ("float16", "bfloat16")

# ---------------------------------------------------------------------------------------
# 1. Parallel launches (see "Threading layer" above)
# ---------------------------------------------------------------------------------------
_launch_lock = threading.Lock()


def _launch(fn, *args):
    """Run a parallel kernel.  Under Numba's "workqueue" layer (not thread-safe: two
    threads in it at once abort the process) launches are serialised by a lock; the
    layer is the one Numba resolved, or before the first launch the configured one
    ("default" may resolve to workqueue, so it locks too)."""
    _forkguard.note_parallel()
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet in this process
        layer = str(numba.config.THREADING_LAYER)
        layer = "workqueue" if layer in ("default", "workqueue") else layer
    if layer == "workqueue":
        with _launch_lock:
            return fn(*args)
    return fn(*args)





# ---------------------------------------------------------------------------------------
# 2. The row body: rows [r0, r1) of one op, SIMD along each row.  The formulas are
#    rowmath's (see its docstring).  Every body and driver takes the same arguments,
#    the "frame" (``_frame`` fills the ones an op does not use with placeholders):
#      x (n, c) logits (16-bit: bits); t (n, c) probability labels; labels (n,) int64;
#      w (c,) class weights (empty: none); bvec (c,) = (eps/C) w_j gs; ii ignore_index;
#      one_m_eps, eps_c = 1 - eps, eps/C; w_sum = sum_j w_j; z z-loss; gs grad_scale;
#      loss, lse (n,); g (n, c) the gradient, or log_softmax's / softmax's output;
#      aux (4, n) float64, row_stats' u, t, coef_sum, dist (loss holds its m);
#      wide, prefetch (plan); blk (small-C block rows).
# ---------------------------------------------------------------------------------------

_rows = _stub("_rows", "Rows [r0, r1) of one op; see the template.")


@_template(_rows)
def _rows_t(r0, r1, op, grad, x, t, labels, w, bvec, ii, one_m_eps, eps_c, w_sum, z, gs,
            loss, lse, g, aux, wide, prefetch, blk):
    """Index labels (SPARSE, SMOOTH: rowmath's loss with or without smoothing; with a
    gradient, pass B stores e_j, pass C scales them by a = A gs / s (minus b_j =
    (eps/C) w_j gs), then the true class gets rowmath.sparse_true_grad from e_y, read
    before pass C; ignored rows: loss 0, grad 0, lse still computed); probability labels
    (DENSE: loss = T log s + wd + z lse^2, g_j = ((e_j A - wt_j) - wt_j r) gs / s,
    A = T + 2 z lse); LSE, LOGSM, SOFTMAX (e_j stored in pass B, scaled by 1/s in pass C
    while in cache); STATS0-2 (row_stats: passes A and B only)."""
    if (k := _literals(op, grad)) is None:
        return None
    OP, GRAD = k
    LAB, STORE, KIND = _LAB[OP], _STORE[GRAD], _KIND.get(OP, 0)
    SCRATCH = int(GRAD in (G_HALF, G_HALF_INPLACE))  # 16-bit gradient: e_j in a float32 row
    GRAD_C = E_SCRATCH if SCRATCH else GRAD
    ROW_OUT = int(GRAD != G_NONE or OP in (LOGSM, SOFTMAX))  # g[i] is an output row
    IDX = int(OP in (SPARSE, SMOOTH))                         # index labels

    def impl(r0, r1, op, grad, x, t, labels, w, bvec, ii, one_m_eps, eps_c, w_sum, z, gs,
             loss, lse, g, aux, wide, prefetch, blk):
        T = _acc(x)
        zero = T(0)
        one = T(1)
        has_w = w.shape[0] != 0
        eb = np.empty(x.shape[1] * SCRATCH, T)
        for i in range(r0, r1):
            xr = x[i]
            gr = g[i] if ROW_OUT == 1 else g[0]
            if SCRATCH == 1:
                er = eb                        # pass B's e_j (gr itself for floats)
            else:
                er = gr
            tr = t[i] if LAB == 2 else t[0]
            if OP == SOFTMAX:
                m = _row_max(xr)
                u, tt = _row_softmax_exp(xr, m, gr)
                _pass_c(xr, gr, m, one, bvec, tr, w, one_m_eps, eps_c,
                        _row_scalars(x, m, u, tt)[0], one, one, KIND, G_STORE, False)
                continue
            if OP == LOGSM:
                m = _row_max(xr)
                u, tt, _, _, _ = _pass_b(xr, m, tr, w, one_m_eps, eps_c, gr, 0, 0)
                _row_logsm(xr, m, _row_scalars(x, m, u, tt)[1], gr)
                continue
            if IDX == 1:
                y = labels[i]
                if y == ii:
                    m, u, tt, _, _, _ = _pass_ab(x, i, r1, wide, prefetch, tr, w, one_m_eps,
                                              eps_c, er, LAB, 0)
                    lse[i] = _row_scalars(x, m, u, tt)[2]
                    loss[i] = zero
                    if GRAD != G_NONE:
                        _row_fill(gr, zero)
                    continue
                xy = _ld(xr, y)               # read before pass B overwrites it (in place)
            m, u, tt, coef_off, coef_tie, dist = _pass_ab(x, i, r1, wide, prefetch, tr, w,
                                                          one_m_eps, eps_c, er, LAB, STORE)
            if OP >= STATS0:
                loss[i] = m
                aux[0, i] = u
                aux[1, i] = tt
                aux[2, i] = coef_off + coef_tie
                aux[3, i] = dist
                continue
            r, log_s, ls = _row_scalars(x, m, u, tt)
            lse[i] = ls
            if OP == DENSE:
                loss[i] = _dense_loss(m, log_s, T(coef_off + coef_tie), T(dist), z)
                if GRAD != G_NONE:
                    _pass_c(er, gr, m, T(coef_tie), bvec, tr, w, one_m_eps, eps_c, r,
                            _dense_coef(ls, T(coef_off), z), _grad_over_sum(one, r, gs),
                            KIND, GRAD_C, False)
            if IDX == 1:
                wy = w[y] if has_w else one
                loss[i] = _sparse_loss(m, log_s, xy, wy, one_m_eps, eps_c, w_sum, T(dist), z)
                if GRAD != G_NONE:
                    ey = er[y]
                    a = _sparse_scale(one, r, ls, wy, one_m_eps, eps_c, w_sum, z, gs)
                    if wide:
                        _pass_c(er, gr, m, a, bvec, tr, w, one_m_eps, eps_c, r, one, one,
                                KIND, GRAD_C, True)
                    else:
                        _pass_c(er, gr, m, a, bvec, tr, w, one_m_eps, eps_c, r, one, one,
                                KIND, GRAD_C, False)
                    _st(gr, y, _sparse_true_grad(one, ey, r, ls, wy, one_m_eps, eps_c,
                                                 w_sum, z, gs))

    return impl


# ---------------------------------------------------------------------------------------
# 3. Small C (c <= SMALL_C_MAX): a row is shorter than a few SIMD registers, so vectorising
#    along it wastes lanes on remainders, and the per-row overhead (loop set-up, a libm
#    log call) dominates.  Instead a block of `blk` rows is transposed into a class-major
#    scratch buffer buf[j, b] = x[b0 + b, j], and every pass runs over b (rows) in SIMD:
#      max:  m_b = max_j buf[j, b]  (fused with the transpose)
#      exp:  buf[j, b] = e_jb,  u_b, t_b += e_jb;  r_b and log1p r_b with the vectorised
#            _log1p
#      scale (gradient): g[b0 + b, j] = buf[j, b] * a_b, one grad row at a time while
#            it is in L1
#    The whole block is read into buf before any of its grad rows is written, so grad may
#    be logits.  Same rowmath formulas as the row body; a row's sum runs over j in
#    order.  Scratch (c*blk + a few blk-vectors) is allocated once per chunk.
# ---------------------------------------------------------------------------------------


@njit(**_JIT)
def _blk_load_max(x, b0, nb, buf, mv, with_max):
    """buf[j, b] = x[b0 + b, j];  with_max: mv[b] = max_j x[b0 + b, j].  Loop order
    b-outer, j-inner (unit-stride reads of a row, strided writes into the L1-resident
    buf): the kernel at 1M x 10 float32 took 0.86x the time of the j-outer order
    (paired, 40 alternations in one process; benchmarks/NOTES_cpu_kernels.md)."""
    xs = x[b0:b0 + nb]
    mb = mv[:nb]
    for b in range(nb):
        xr = xs[b]
        m = mv.dtype.type(-np.inf)
        for j in range(x.shape[1]):
            v = _ld(xr, j)
            buf[j, b] = v
            m = v if v > m else m           # a NaN never wins; it still poisons the sum
        if with_max:
            mb[b] = m


_blk_sumexp = _stub("_blk_sumexp", "Pass B of a small-C block; see the template.")


@_template(_blk_sumexp)
def _blk_sumexp_t(buf, nb, mv, rv, tv, lv, uh, ul, store):
    """Pass B of a block: rv[b] = r = u + (t - 1) of row b, lv[b] = log1p r (tv is
    scratch for the tie counts).  STORE: 0 sums only; 1 buf[j, b] <- e_jb (_exp_diff,
    as every pass); 2 as softmax stores it (see _row_softmax_exp), rv[b] = u in float64,
    and lv[b] = r, no log.
    u is summed in float64 lanes uh (float32 terms exactly: a row of <= 64 equal terms
    summed in float32 drifted 5.8 ulps of its lse), float64 terms with their rounding
    errors carried in ul (TwoSum), then rounded once."""
    if (k := _literals(store)) is None:
        return None
    STORE, = k
    COMP = int(buf.dtype == types.float64)

    def impl(buf, nb, mv, rv, tv, lv, uh, ul, store):
        T = buf.dtype.type
        zero = T(0)
        one = T(1)
        mb = mv[:nb]
        ub = rv[:nb]
        u_hi = uh[:nb]
        u_lo = ul[:nb]
        tb = tv[:nb]
        for b in range(nb):
            u_hi[b] = 0.0
            u_lo[b] = 0.0
            tb[b] = zero
        for j in range(buf.shape[0]):
            bj = buf[j, :nb]
            for b in range(nb):
                d = bj[b] - mb[b]
                e = _exp_diff(bj[b], mb[b])
                if STORE != 0:
                    bj[b] = e
                eu = zero if d == zero else e
                tie = one if d == zero else zero
                if COMP == 1:
                    u_hi[b], u_lo[b] = _two_sum_add(u_hi[b], u_lo[b], eu)
                else:
                    u_hi[b] += eu
                tb[b] += tie
        lb = lv[:nb]
        for b in range(nb):
            u = u_hi[b] + u_lo[b]
            if STORE == 2:
                ub[b] = u
                lb[b] = T(_rest_mass(u, tb[b], 1.0))
            else:
                r = _rest_mass(T(u), tb[b], one)
                ub[b] = r
                lb[b] = _log1p(r)

    return impl


@njit(**_JIT)
def _blk_wsum(buf, nb, mv, w, smv):
    """smv[b] = sum_{w_j != 0} w_j (m_b - x_jb)   (before buf is overwritten)."""
    T = buf.dtype.type
    zero = T(0)
    mb = mv[:nb]
    smb = smv[:nb]
    for b in range(nb):
        smb[b] = zero
    for j in range(buf.shape[0]):
        wj = w[j]
        if wj != zero:
            bj = buf[j, :nb]
            for b in range(nb):
                smb[b] += wj * (mb[b] - bj[b])
_small = _stub("_small", "Small-C rows [r0, r1) of one op; see the template.")


@_template(_small)
def _small_t(r0, r1, op, grad, x, t, labels, w, bvec, ii, one_m_eps, eps_c, w_sum, z, gs,
             loss, lse, g, aux, wide, prefetch, blk):
    """The small-C path of LSE, LOGSM, SOFTMAX, SPARSE, SMOOTH and DENSE (the row body's
    formulas, a block of rows at a time).  SMOOTH: w is a full weight vector and bvec_j
    = (eps/C) w_j gs; otherwise w may be empty (no weights) and eps_c = w_sum = 0."""
    if (k := _literals(op, grad)) is None:
        return None
    OP, GRAD = k
    NT = int(OP == DENSE)            # probability rows are transposed too
    STORE = 2 if OP == SOFTMAX else int(GRAD != G_NONE)
    IDX = int(OP in (SPARSE, SMOOTH))
    GRAD_OUT = int(GRAD != G_NONE and OP in (SPARSE, SMOOTH, DENSE))

    def impl(r0, r1, op, grad, x, t, labels, w, bvec, ii, one_m_eps, eps_c, w_sum, z, gs,
             loss, lse, g, aux, wide, prefetch, blk):
        c = x.shape[1]
        T = _acc(x)
        zero = T(0)
        one = T(1)
        has_w = w.shape[0] != 0
        buf = np.empty((c, blk), T)
        tbuf = np.empty((c * NT, blk), T)
        mv = np.empty(blk, T)
        rv = np.empty(blk, np.float64 if OP == SOFTMAX else T)
        uh = np.empty(blk, np.float64)   # pass B's sums: float64 lanes and their errors
        ul = np.empty(blk, np.float64)
        tv = np.empty(blk, T)
        lv = np.empty(blk, T)
        sv = np.empty(blk, T)   # SMOOTH, DENSE: sum_j a_j (m - x_j)
        cv = np.empty(blk, T)   # DENSE: T_off = sum of wt_j off the max, then the coef
        ctv = np.empty(blk, T)  # DENSE: T_tie = sum of wt_j on the ties at the max
        av = np.empty(blk, T)   # gradient: a (SPARSE, SMOOTH), gs / s (DENSE)
        fix = np.empty(blk, T)  # SPARSE, SMOOTH: the true class's gradient
        for b0 in range(r0, r1, blk):
            nb = min(blk, r1 - b0)
            _blk_load_max(x, b0, nb, buf, mv, True)
            if OP == DENSE:
                _blk_load_max(t, b0, nb, tbuf, lv, False)
                mb, cb, ctb, sb = mv[:nb], cv[:nb], ctv[:nb], sv[:nb]
                cb[:] = zero
                ctb[:] = zero
                sb[:] = zero
                for j in range(c):
                    wj = w[j]
                    bj = buf[j, :nb]
                    tj = tbuf[j, :nb]
                    for b in range(nb):
                        wt = _smoothed_weight(wj, tj[b], one_m_eps, eps_c)
                        tj[b] = wt
                        dm = mb[b] - bj[b]
                        wtie = wt if dm == zero else zero      # wt - wtie: wt or 0
                        cb[b] += wt - wtie
                        ctb[b] += wtie
                        sb[b] += wt * dm if wt != zero else zero
            if OP == SMOOTH:
                _blk_wsum(buf, nb, mv, w, sv)
            _blk_sumexp(buf, nb, mv, rv, tv, lv, uh, ul, STORE)
            for b in range(nb):
                i = b0 + b
                m = mv[b]
                log_s = lv[b]
                if OP == LOGSM:
                    _row_logsm(x[i], m, log_s, g[i])
                    continue
                if OP == SOFTMAX:
                    orow = g[i]
                    for j in range(c):
                        orow[j] = _softmax(buf[j, b], one, log_s)   # lv holds r here
                    continue
                ls = _log_sum_exp(m, log_s)
                lse[i] = ls
                if OP == DENSE:
                    loss[i] = _dense_loss(m, log_s, cv[b] + ctv[b], sv[b], z)
                    cv[b] = _dense_coef(ls, cv[b], z)
                    av[b] = _grad_over_sum(one, rv[b], gs)
                if IDX == 1:
                    y = labels[i]
                    if y == ii:
                        loss[i] = zero
                        av[b] = zero
                        continue
                    xy = _ld(x[i], y)       # this block's grad rows are not written yet
                    wy = w[y] if has_w else one
                    wd = sv[b] if OP == SMOOTH else zero
                    loss[i] = _sparse_loss(m, log_s, xy, wy, one_m_eps, eps_c, w_sum, wd, z)
                    if GRAD != G_NONE:
                        r = rv[b]
                        av[b] = _sparse_scale(one, r, ls, wy, one_m_eps, eps_c, w_sum, z, gs)
                        fix[b] = _sparse_true_grad(one, buf[y, b], r, ls, wy, one_m_eps,
                                                   eps_c, w_sum, z, gs)
            if GRAD_OUT == 0:
                continue
            gsl = g[b0:b0 + nb]
            if OP == DENSE:
                rb = rv[:nb]
                cb = cv[:nb]
                ctb = ctv[:nb]
                ab = av[:nb]
                for j in range(c):
                    bj = buf[j, :nb]
                    tj = tbuf[j, :nb]
                    for b in range(nb):
                        _st(gsl, (b, j), _dense_grad(bj[b], tj[b], rb[b], cb[b], ctb[b],
                                                     ab[b]))
                continue
            # g[i, j] = e_jb * a_b (- b_j), then the label column, one grad row at a time
            # while it is in L1 (b-outer: unit-stride writes of a grad row, 0.95x the
            # time of the j-outer order at 1M x 10, paired).
            for b in range(nb):
                y = labels[b0 + b]
                gr = gsl[b]
                if y == ii:
                    _row_fill(gr, zero)          # also for a NaN row (0 * NaN is NaN)
                    continue
                a = av[b]
                for j in range(c):
                    if OP == SMOOTH:
                        _st(gr, j, buf[j, b] * a - bvec[j])
                    else:
                        _st(gr, j, buf[j, b] * a)
                _st(gr, y, fix[b])

    return impl


def _driver(path, op, grad, parallel):
    """The chunk driver of ``path`` (0 rows, 1 small C) for ``op`` and gradient mode
    ``grad``: ``prange`` over `nchunks` chunks of `chunk` consecutive rows (Numba splits
    the chunk range statically among its threads; a row is always done whole by one
    thread, so the result does not depend on the thread count), or without ``parallel``
    the same loop on the calling thread (called with one chunk: the serial path, and
    the plans of a forked child).  The closure holds constants only, so the drivers load
    from Numba's cache; the serial and parallel twins have their own names (the cache
    key does not include the parallel flag)."""
    key = (path, op, grad, parallel)
    if key not in _DRIVERS:
        PATH, OP, GRAD = path, op, grad

        def driver(nchunks, chunk, x, t, labels, w, bvec, ii, one_m_eps, eps_c, w_sum,
                   z, gs, loss, lse, g, aux, wide, prefetch, blk):
            n = x.shape[0]
            for k in prange(nchunks):
                r0 = k * chunk
                r1 = min(n, r0 + chunk)
                if PATH == 0:
                    _rows(r0, r1, OP, GRAD, x, t, labels, w, bvec, ii, one_m_eps, eps_c,
                          w_sum, z, gs, loss, lse, g, aux, wide, prefetch, blk)
                else:
                    _small(r0, r1, OP, GRAD, x, t, labels, w, bvec, ii, one_m_eps, eps_c,
                           w_sum, z, gs, loss, lse, g, aux, wide, prefetch, blk)

        driver.__name__ = driver.__qualname__ = "_driver_" + ("par" if parallel else "serial")
        _DRIVERS[key] = njit(**(_PJIT if parallel else _JIT))(driver)
    return _DRIVERS[key]


_DRIVERS: dict = {}


# ---------------------------------------------------------------------------------------
# 4. Split rows (n <= SPLIT_MAX_ROWS, c >= SPLIT_MIN_C): fewer rows than cores, so every
#    row is cut into `nseg` segments of `seglen` (nseg = SPLIT_SEGMENTS: a constant) and
#    the (row, segment) tasks run in parallel:
#      phase 1  m_ip = max over segment p;   m_i = max_p m_ip  (max is exact: any order)
#      phase 2  (u_ip, t_ip) = pass B over segment p against m_i (e stored when needed);
#               u_i, t_i = sums over p ascending in float64 (fixed order);
#               r_i = u_i + (t_i - 1), log s_i = log1p r_i, lse_i = m_i + log s_i
#      phase 3  per-row scalars (serial, n values), then pass C (or log_softmax's pass)
#               per segment.
# ---------------------------------------------------------------------------------------


def _seg_driver(phase, op, grad, parallel):
    """The split path's phase 1, 2 or 3 of ``op`` (LSE, LOGSM, SOFTMAX, SPARSE) over all
    (row, segment) tasks; serial and parallel twins as ``_driver``'s."""
    key = ("seg", phase, op, grad, parallel)
    if key not in _DRIVERS:
        PHASE, OP = phase, op
        # phase 2 stores e_j: softmax's (3), a float gradient's (1, 2); 16-bit gradients
        # compute it again in phase 3 (a scratch copy of few long rows would be (n, c)).
        STORE = 3 if op == SOFTMAX else (0 if op == LOGSM or grad >= G_HALF else _STORE[grad])
        KIND, GRAD_C = (3, G_STORE) if op == SOFTMAX else (0, grad)

        def seg_driver(x, g, m, a, r, log_s, mseg, useg, tseg, seglen, nseg):
            n, c = x.shape
            one = _acc(x)(1)
            for task in prange(n * nseg):
                i = task // nseg
                p = task - i * nseg
                lo = p * seglen
                hi = min(c, lo + seglen)
                xs = x[i, lo:hi]
                if PHASE == 1:
                    mseg[i, p] = _row_max(xs)
                elif PHASE == 2:
                    if STORE == 3:
                        u, t = _row_softmax_exp(xs, m[i], g[i, lo:hi])
                    elif STORE == 0:
                        u, t, _, _, _ = _pass_b(xs, m[i], m, m, one, one, xs, 0, 0)
                    else:
                        u, t, _, _, _ = _pass_b(xs, m[i], m, m, one, one, g[i, lo:hi], 0,
                                                STORE)
                    useg[i, p] = u
                    tseg[i, p] = t
                elif OP == LOGSM:
                    _row_logsm(xs, m[i], log_s[i], g[i, lo:hi])
                else:
                    _pass_c(xs, g[i, lo:hi], m[i], a[i], m, m, m, one, one, r[i], one, one,
                            KIND, GRAD_C, False)

        seg_driver.__name__ = seg_driver.__qualname__ = (
            "_seg_driver_" + ("par" if parallel else "serial"))
        _DRIVERS[key] = njit(**(_PJIT if parallel else _JIT))(seg_driver)
    return _DRIVERS[key]


@njit(**_JIT)
def _seg_combine(useg, tseg, m, r, log_s, lse):
    """u_i, t_i = sums of the segments' in segment order; fills r, log_s and lse."""
    n, nseg = useg.shape
    for i in range(n):
        u = 0.0
        t = 0.0
        for p in range(nseg):
            u += useg[i, p]
            t += tseg[i, p]
        ri, log_si, lsei = _row_scalars(m, m[i], u, t)
        r[i] = ri
        log_s[i] = log_si
        lse[i] = lsei


@njit(**_JIT)
def _seg_rowmax(mseg, m):
    n, nseg = mseg.shape
    for i in range(n):
        acc = mseg.dtype.type(-np.inf)
        for p in range(nseg):
            acc = _maxnum(acc, mseg[i, p])
        m[i] = acc


@njit(**_JIT)
def _gather(a, labels, ignore_index, out):
    """out[i] = a[i, y_i] (as the accumulation dtype), 0 for ignored rows."""
    for i in range(a.shape[0]):
        y = labels[i]
        out[i] = out.dtype.type(0) if y == ignore_index else _ld(a[i], y)


@njit(**_JIT)
def _split_sparse(labels, w, ignore_index, z, gs, m, r, log_s, xy, loss, a, g, ey, fix):
    """The per-row scalars of the row body's index labels without smoothing, for the
    split path.  fix 0: loss and the scale factor a_i (xy[i] = x[i, y_i], read before
    phase 2); else the true class after the scaling pass, rowmath.sparse_true_grad from
    e_y saved before scaling (fix 1), or (16-bit, fix 2) from x_y in ey; ignored rows
    are zeroed."""
    T = m.dtype.type
    zero = T(0)
    one = T(1)
    has_w = w.shape[0] != 0
    for i in range(m.shape[0]):
        y = labels[i]
        if y == ignore_index:
            if fix:
                _row_fill(g[i], zero)
            else:
                loss[i] = zero
                a[i] = zero
            continue
        ls = _log_sum_exp(m[i], log_s[i])
        wy = w[y] if has_w else one
        if fix == 0:
            loss[i] = _sparse_loss(m[i], log_s[i], xy[i], wy, one, zero, zero, zero, z)
            a[i] = _sparse_scale(one, r[i], ls, wy, one, zero, zero, z, gs)
        else:
            e = _exp_diff(ey[i], m[i]) if fix == 2 else ey[i]
            _st(g[i], y, _sparse_true_grad(one, e, r[i], ls, wy, one, zero, zero, z, gs))


# ---------------------------------------------------------------------------------------
# 5. Public kernels (plain Python): ``plan`` names the path from the shape and the
#    options alone, ``tuning`` forces one (so that tests reach every path by
#    construction), and each kernel converts scalars to the accumulation dtype (so no
#    float64 constant sneaks into float32 arithmetic) and calls the path's driver.
# ---------------------------------------------------------------------------------------

def _acc_dtype(x):
    return np.dtype(np.float32) if x.dtype.itemsize == 2 else x.dtype


def _frame(x, *, t=None, labels=None, w=None, bvec=None, ii=-100, one_m_eps=1.0,
           eps_c=0.0, w_sum=0.0, z=0.0, gs=1.0, loss=None, lse=None, g=None, aux=None,
           wide=False, prefetch=False):
    """The arguments of every body and driver (see section 2), placeholders for the
    ones the op does not use, scalars in the accumulation dtype."""
    T = _acc_dtype(x).type
    empty = np.empty(0, T)
    return (x, np.empty((1, 1), x.dtype) if t is None else t,
            np.empty(0, np.int64) if labels is None else labels,
            empty if w is None else w, empty if bvec is None else bvec, np.int64(ii),
            T(one_m_eps), T(eps_c), T(w_sum), T(z), T(gs),
            empty if loss is None else loss, empty if lse is None else lse,
            np.empty((1, 1), x.dtype) if g is None else g,
            np.empty((4, 0)) if aux is None else aux, bool(wide), bool(prefetch),
            SMALL_C_BLOCK)


def _run(p: Plan, op: int, grad: int, frame):
    """The plan's driver over all rows of the frame's x."""
    n, c = frame[0].shape
    if p.parallel:
        _launch(_driver(p.path == "small", op, grad, True), *_chunking(p, n, c), *frame)
    else:
        _driver(p.path == "small", op, grad, False)(1, n, *frame)


def _split_run(p: Plan, phase: int, op: int, grad: int, args):
    f = _seg_driver(phase, op, grad, p.parallel)
    if p.parallel:
        _launch(f, *args)
    else:
        f(*args)


def _split_lse(p, x, op, grad=G_NONE, g=None):
    """Phases 1-2 of the split path: the driver arguments (x, g, m, a, r, log_s, ...)
    and lse; e stored into g as the op and gradient mode say."""
    n, c = x.shape
    seglen, nseg = _split_geometry(c)
    T = _acc_dtype(x)
    m, a, r, log_s, lse = (np.empty(n, T) for _ in range(5))
    args = (x, np.empty((1, 1), x.dtype) if g is None else g, m, a, r, log_s,
            np.empty((n, nseg), T), np.empty((n, nseg)), np.empty((n, nseg)), seglen, nseg)
    _split_run(p, 1, op, grad, args)
    _seg_rowmax(args[6], m)
    _split_run(p, 2, op, grad, args)
    _seg_combine(args[7], args[8], m, r, log_s, lse)
    return args, lse


def _is_inplace(x: np.ndarray, g) -> bool:
    """True when g is x (in place).  Any other overlap is outside the contract."""
    if g is None:
        return False
    if g is x or (g.__array_interface__["data"][0] == x.__array_interface__["data"][0]
                  and g.shape == x.shape and g.strides == x.strides):
        return True
    if np.shares_memory(x, g):
        raise ValueError("grad/out overlaps the logits without being the same array; "
                         "pass the logits array itself for an in-place call, or a "
                         "separate array")
    return False


def _operands(logits, grad, half):
    """(x, grad, gradient mode, in place): 16-bit logits (and grad) as their bits."""
    inplace = _is_inplace(logits, grad)
    is_half = half is not None or logits.dtype.name in NATIVE_HALF
    if is_half:
        logits = bits_view(logits, half)
        grad = None if grad is None else (logits if inplace else bits_view(grad, half))
    if grad is None:
        return logits, None, G_NONE, False
    if is_half:
        return logits, grad, (G_HALF_INPLACE if inplace else G_HALF), inplace
    return logits, grad, (G_INPLACE if inplace else G_STORE), inplace


def logsumexp(x, out):
    n, c = x.shape
    p = plan("logsumexp", n, c, x.itemsize)
    if p.path == "split":
        out[...] = _split_lse(p, x, LSE)[1]
    else:
        _run(p, LSE, G_NONE, _frame(x, lse=out, wide=p.wide, prefetch=p.prefetch))


def _normalise(op: int, x, out):
    """log_softmax and softmax: out_j from the row's passes."""
    n, c = x.shape
    if _is_inplace(x, out):
        x = x.copy()
    p = plan("log_softmax" if op == LOGSM else "softmax", n, c, x.itemsize)
    if p.path == "split":
        args, _ = _split_lse(p, x, op, G_STORE, out)
        _split_run(p, 3, op, G_STORE, args)
    else:
        _run(p, op, G_NONE, _frame(x, g=out))


def log_softmax(x, out):
    _normalise(LOGSM, x, out)


def softmax(x, out):
    _normalise(SOFTMAX, x, out)


def _sparse_split(p, x, labels, w, ii, z, gs, loss, lse, g, grad):
    n, c = x.shape
    T = _acc_dtype(x)
    xy = np.empty(n, T)
    _gather(x, labels, ii, xy)                          # before phase 2 (in place)
    args, lse[...] = _split_lse(p, x, SPARSE, grad, g)
    m, a, r, log_s = args[2:6]
    _split_sparse(labels, w, ii, z, gs, m, r, log_s, xy, loss, a, args[1], xy, 0)
    if grad == G_NONE:
        return
    fix = 2 if grad in (G_HALF, G_HALF_INPLACE) else 1
    ey = xy if fix == 2 else np.empty(n, T)
    if fix == 1:
        _gather(g, labels, ii, ey)                      # e_y, before scaling
    _split_run(p, 3, SPARSE, grad, args)
    _split_sparse(labels, w, ii, z, gs, m, r, log_s, xy, loss, a, g, ey, fix)


def sparse(logits, labels, weight, ignore_index, label_smoothing, z_loss, grad_scale,
           loss, lse, grad, *, half=None):
    n, c = logits.shape
    x, g, mode, inplace = _operands(logits, grad, half)
    T = _acc_dtype(x).type
    ii = np.int64(ignore_index)
    eps = T(label_smoothing)
    z = T(z_loss)
    gs = T(grad_scale)
    w = np.ascontiguousarray(weight, dtype=T)
    smooth = bool(eps != 0)
    p = plan("sparse", n, c, x.itemsize, with_grad=g is not None, smoothing=smooth,
             inplace=inplace)
    if p.path == "split":
        _sparse_split(p, x, labels, w, ii, z, gs, loss, lse, g, mode)
        return
    if not smooth:
        _run(p, SPARSE, mode, _frame(x, labels=labels, w=w, ii=ii, z=z, gs=gs, loss=loss,
                                     lse=lse, g=g, wide=p.wide, prefetch=p.prefetch))
        return
    if w.shape[0] == 0:
        w = np.ones(c, dtype=T)     # smoothing sums over every class weight
    eps_c = eps / T(c)
    _run(p, SMOOTH, mode, _frame(x, labels=labels, w=w, bvec=(w * (eps_c * gs)).astype(T),
                                 ii=ii, one_m_eps=T(1) - eps, eps_c=eps_c,
                                 w_sum=w.sum(dtype=T), z=z, gs=gs, loss=loss, lse=lse, g=g))


def dense(logits, labels, weight, label_smoothing, z_loss, grad_scale, loss, lse, grad, *,
          half=None):
    n, c = logits.shape
    x, g, mode, inplace = _operands(logits, grad, half)
    T = _acc_dtype(x).type
    if labels.dtype == logits.dtype:
        t = bits_view(labels, half) if x is not logits else labels
    else:
        t = labels.astype(T)
    if g is not None and np.shares_memory(t, g):
        t = t.copy()                     # grad must not overwrite the labels we read
    w = np.ascontiguousarray(weight, dtype=T)
    if w.shape[0] == 0:
        w = np.ones(c, dtype=T)
    eps = T(label_smoothing)
    p = plan("dense", n, c, x.itemsize, with_grad=g is not None, smoothing=bool(eps != 0),
             inplace=inplace)
    _run(p, DENSE, mode, _frame(x, t=t, w=w, one_m_eps=T(1) - eps, eps_c=eps / T(c),
                                z=z_loss, gs=grad_scale, loss=loss, lse=lse, g=g))


# ---------------------------------------------------------------------------------------
# 6. Row statistics of a block of classes (``xentfast._shards``: class-chunked and
#    vocabulary-parallel cross-entropy).  Passes A and B of the kernels above, the
#    per-row epilogue left to the caller, who merges the statistics of several blocks.
#    STATS0: (m, u, t) -- the wide passes for long rows, as logsumexp;
#    STATS1: also dist = sum_{w_j != 0} w_j (m - x_j), the class coefficients w;
#    STATS2: also coef_sum = sum_j wt_j and dist with wt_j = smoothed_weight(w_j, t_j)
#            of probability rows t.
#    ``shard_grad_rows`` (from ``_numba_shards``): the chunk's gradient columns from the
#    merged row totals, the op of ``_shards.grad_rows``.
# ---------------------------------------------------------------------------------------


def row_stats(x, coef, probs, one_m_eps, eps_c, m, u, t, coef_sum, dist):
    """Row statistics of a block of classes: m = max_j x_j (x's dtype), u = sum of e_j
    off the max, t = ties at it (float64); with ``coef`` non-empty also coef_sum and
    dist = sum_{a_j != 0} a_j (m - x_j), a_j = coef_j or, with probability rows
    ``probs`` non-empty, coef_j ((1 - eps) t_j + eps_c).  Same contract as
    ``numpy_ref.row_stats``.  Always the rows path (the small-C and split paths have no
    statistics-only variant); parallel and wide as ``plan`` chooses for logsumexp
    (mode 0) or probability labels (modes 1, 2)."""
    n, c = x.shape
    T = np.dtype(x.dtype).type
    mode = 2 if probs.shape[0] else (1 if coef.shape[0] else 0)
    w = np.ascontiguousarray(coef, dtype=T) if mode else None
    pr = (probs if probs.dtype == x.dtype else probs.astype(T)) if mode == 2 else None
    forced = dataclasses.replace(_tuning.get(), force_path="rows")
    p = plan("logsumexp" if mode == 0 else "dense", n, c, x.itemsize, t=forced)
    aux = np.empty((4, n))
    _run(p, STATS0 + mode, G_NONE, _frame(x, t=pr, w=w, one_m_eps=one_m_eps, eps_c=eps_c,
                                          loss=m, aux=aux, wide=p.wide,
                                          prefetch=p.prefetch))
    u[...] = aux[0]
    t[...] = aux[1]
    if mode == 1:
        coef_sum[...] = np.sum(w, dtype=np.float64)
        dist[...] = aux[3]
    elif mode == 2:
        coef_sum[...] = aux[2]
        dist[...] = aux[3]


def _sparse_loss_rows(r0, r1, x, labels, w, ignore_index, z, loss, lse, wide, prefetch):
    """Test hook: rows [r0, r1) of a loss-only sparse call through the serial driver."""
    _driver(0, SPARSE, G_NONE, False)(1, r1 - r0, *_frame(
        x[r0:r1], labels=labels[r0:r1], w=w, ii=ignore_index, z=z, loss=loss[r0:r1],
        lse=lse[r0:r1], wide=wide, prefetch=prefetch))


def _sparse_grad_rows(r0, r1, x, labels, w, ignore_index, z, gs, loss, lse, g, inplace,
                      wide, prefetch):
    """Test hook: rows [r0, r1) of a sparse call with gradient through the serial driver."""
    _driver(0, SPARSE, G_INPLACE if inplace else G_STORE, False)(1, r1 - r0, *_frame(
        x[r0:r1], labels=labels[r0:r1], w=w, ii=ignore_index, z=z, gs=gs, loss=loss[r0:r1],
        lse=lse[r0:r1], g=g[r0:r1], wide=wide, prefetch=prefetch))
