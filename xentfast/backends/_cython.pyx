# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
# distutils: language = c
"""Backend ``cython``: the kernel set as a Cython + OpenMP extension.

Import it through :mod:`xentfast.backends.cython_shim`, which adds the contract's exact
Python signatures and turns a bad class id into ``ValueError``; this module is the
compiled half.  The kernel contract and its derivations are in
``xentfast/backends/__init__.py``; ``numpy_ref.py`` is the reference these kernels match.

Structure
---------
Every kernel is a ``prange`` (OpenMP, ``schedule(static)``) over blocks of rows; each
row is processed start to finish by one thread, in at most three passes over its
memory, with no (n, c) temporaries:

  pass 1   m = max_j x_j                                          (reads x)
  pass 1b  option sums that need x before it may be overwritten  (reads x, t; only
           with label smoothing / dense labels)
  pass 2   s = sum_j exp(x_j - m); with a gradient, e_j = exp(x_j - m) is stored into
           grad during this pass, so each exp is computed exactly once   (reads x,
           writes grad -- grad may BE x, inplace=True: element j is read, then
           written; x_y and every sum over x were taken before)
  pass 3   grad_j <- e_j * a - b_j, in place in grad, then grad_y fixed  (reads and
           writes grad, still in L1/L2 for rows up to ~100k classes)

The vector passes live in C (``_xfrows.h``, ``_fastexp.h``): a vectorisable exp/log
(no libm calls in loops), lane-wise sums whose order is fixed (so results are bitwise
identical at any thread count), and on x86-64 Linux ``target_clones`` copies for
AVX2+FMA and AVX-512.

Short rows (c <= _SMALL_C, e.g. 10 classes) are too short to vectorise along, so a
block of up to _BLOCK_ELEMS elements (_BLOCK_ROWS rows at most) is handled together:
per-row maxima, then ONE flat exp over the whole contiguous block (the row max
broadcast per element), then per-row sums, then one vectorised log over the block's
sums.  The per-row arithmetic is identical to the long-row path (same exp, same lanes
for the sum), so the block size never changes a result.

Inputs with fewer than _PAR_MIN_ELEMS elements run on the calling thread only (an
OpenMP fork/join costs more than such a call).  Thread-safety: kernels hold no state
and release the GIL; concurrent calls from several Python threads each get their own
OpenMP team.  Row blocks are contiguous per thread (static schedule), so threads never
write to the same cache line except at the one boundary between their ranges.

Precision rule: arithmetic is in the input dtype (float32 -> float32 accumulation,
float64 -> float64), which the contract names the accumulation dtype; float16 is upcast
by the public layer.  e, p_y - 1 and every product are formed in it and rounded once to
the output (same dtype).  Differences from numpy_ref are a few ulps: exp/log are
faithfully rounded (< 1 ulp, see _fastexp.h), sums are lane-wise instead of pairwise,
p = e * (1/s) instead of e / s, and on AVX2/AVX-512 machines a*b+c is fused.

Memory safety: shapes are checked here; a class id outside [0, c) that is not
ignore_index is never used as an index -- the row gets loss NaN, lse NaN, grad 0 and is
counted, and the shim raises ValueError naming the first such label.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.stddef cimport ptrdiff_t
from libc.string cimport memset
from libc.math cimport NAN

import numpy as np

ctypedef fused floating:
    float
    double


cdef extern from "_xfrows.h" nogil:
    int XF_MULTIVERSIONED
    # inline (baseline ISA) helpers, for the short-row block path
    float xfi_rowmax_f(const float *x, ptrdiff_t n)
    double xfi_rowmax_d(const double *x, ptrdiff_t n)
    float xfi_rowsum_f(const float *e, ptrdiff_t n)
    double xfi_rowsum_d(const double *e, ptrdiff_t n)
    float xfi_wdist_f(const float *x, const float *w, ptrdiff_t n, float m)
    double xfi_wdist_d(const double *x, const double *w, ptrdiff_t n, double m)
    void xfi_dense_sums_f(const float *x, const float *t, const float *w, ptrdiff_t n,
                          float m, float keep, float add, float *A, float *B)
    void xfi_dense_sums_d(const double *x, const double *t, const double *w, ptrdiff_t n,
                          double m, double keep, double add, double *A, double *B)
    void xfi_scale_f(float *g, ptrdiff_t n, float a)
    void xfi_scale_d(double *g, ptrdiff_t n, double a)
    void xfi_scale_sub_f(float *g, const float *w, ptrdiff_t n, float a, float b)
    void xfi_scale_sub_d(double *g, const double *w, ptrdiff_t n, double a, double b)
    void xfi_dense_grad_f(float *g, const float *t, const float *w, ptrdiff_t n,
                          float a, float sc, float keep, float add)
    void xfi_dense_grad_d(double *g, const double *t, const double *w, ptrdiff_t n,
                          double a, double sc, double keep, double add)
    # out-of-line, multiversioned: long rows and whole blocks
    float xf_rowmax_f(const float *x, ptrdiff_t n)
    double xf_rowmax_d(const double *x, ptrdiff_t n)
    float xf_expsum_f(const float *x, ptrdiff_t n, float m)
    double xf_expsum_d(const double *x, ptrdiff_t n, double m)
    float xf_expsum_store_f(const float *x, float *e, ptrdiff_t n, float m)
    double xf_expsum_store_d(const double *x, double *e, ptrdiff_t n, double m)
    float xf_wdist_f(const float *x, const float *w, ptrdiff_t n, float m)
    double xf_wdist_d(const double *x, const double *w, ptrdiff_t n, double m)
    void xf_dense_sums_f(const float *x, const float *t, const float *w, ptrdiff_t n,
                         float m, float keep, float add, float *A, float *B)
    void xf_dense_sums_d(const double *x, const double *t, const double *w, ptrdiff_t n,
                         double m, double keep, double add, double *A, double *B)
    void xf_scale_f(float *g, ptrdiff_t n, float a)
    void xf_scale_d(double *g, ptrdiff_t n, double a)
    void xf_scale_sub_f(float *g, const float *w, ptrdiff_t n, float a, float b)
    void xf_scale_sub_d(double *g, const double *w, ptrdiff_t n, double a, double b)
    void xf_dense_grad_f(float *g, const float *t, const float *w, ptrdiff_t n,
                         float a, float sc, float keep, float add)
    void xf_dense_grad_d(double *g, const double *t, const double *w, ptrdiff_t n,
                         double a, double sc, double keep, double add)
    void xf_sub_f(const float *x, float *out, ptrdiff_t n, float v)
    void xf_sub_d(const double *x, double *out, ptrdiff_t n, double v)
    void xf_block_exp_f(const float *x, float *e, ptrdiff_t rows, ptrdiff_t c,
                        const float *m, float *mb)
    void xf_block_exp_d(const double *x, double *e, ptrdiff_t rows, ptrdiff_t c,
                        const double *m, double *mb)
    void xf_block_log_f(const float *s, float *out, ptrdiff_t rows)
    void xf_block_log_d(const double *s, double *out, ptrdiff_t rows)
    float xf_logf(float s)
    double xf_log_d_(double s)


# Tunables (compile-time constants, not module globals; see NOTES_cython_kernels.md).
cdef enum:
    _SMALL_C = 64            # rows of at most this many classes take the block path
    _BLOCK_ELEMS = 2048      # elements per block of short rows (fits L1 with scratch)
    _BLOCK_ROWS = 256        # rows per block at most (sizes the per-row scratch)
    _PAR_MIN_ELEMS = 32768   # below this many elements one thread does the whole call

MULTIVERSIONED = bool(XF_MULTIVERSIONED)
SMALL_C = _SMALL_C
BLOCK_ELEMS = _BLOCK_ELEMS
PAR_MIN_ELEMS = _PAR_MIN_ELEMS


# ---- typed dispatch onto the C helpers (resolved at compile time per specialisation) ----

cdef inline floating _log(floating s) noexcept nogil:
    if floating is float:
        return xf_logf(s)
    else:
        return xf_log_d_(s)

cdef inline floating _rowmax(const floating *x, Py_ssize_t n, bint small) noexcept nogil:
    if floating is float:
        return xfi_rowmax_f(x, n) if small else xf_rowmax_f(x, n)
    else:
        return xfi_rowmax_d(x, n) if small else xf_rowmax_d(x, n)

cdef inline floating _expsum(const floating *x, Py_ssize_t n, floating m) noexcept nogil:
    if floating is float:
        return xf_expsum_f(x, n, m)
    else:
        return xf_expsum_d(x, n, m)

cdef inline floating _expsum_store(const floating *x, floating *e, Py_ssize_t n,
                                   floating m) noexcept nogil:
    if floating is float:
        return xf_expsum_store_f(x, e, n, m)
    else:
        return xf_expsum_store_d(x, e, n, m)

cdef inline floating _rowsum(const floating *e, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return xfi_rowsum_f(e, n)
    else:
        return xfi_rowsum_d(e, n)

cdef inline floating _wdist(const floating *x, const floating *w, Py_ssize_t n,
                            floating m, bint small) noexcept nogil:
    if floating is float:
        return xfi_wdist_f(x, w, n, m) if small else xf_wdist_f(x, w, n, m)
    else:
        return xfi_wdist_d(x, w, n, m) if small else xf_wdist_d(x, w, n, m)

cdef inline void _dense_sums(const floating *x, const floating *t, const floating *w,
                             Py_ssize_t n, floating m, floating keep, floating add,
                             floating *A, floating *B, bint small) noexcept nogil:
    if floating is float:
        if small:
            xfi_dense_sums_f(x, t, w, n, m, keep, add, A, B)
        else:
            xf_dense_sums_f(x, t, w, n, m, keep, add, A, B)
    else:
        if small:
            xfi_dense_sums_d(x, t, w, n, m, keep, add, A, B)
        else:
            xf_dense_sums_d(x, t, w, n, m, keep, add, A, B)

cdef inline void _scale(floating *g, Py_ssize_t n, floating a, bint small) noexcept nogil:
    if floating is float:
        if small:
            xfi_scale_f(g, n, a)
        else:
            xf_scale_f(g, n, a)
    else:
        if small:
            xfi_scale_d(g, n, a)
        else:
            xf_scale_d(g, n, a)

cdef inline void _scale_sub(floating *g, const floating *w, Py_ssize_t n, floating a,
                            floating b, bint small) noexcept nogil:
    if floating is float:
        if small:
            xfi_scale_sub_f(g, w, n, a, b)
        else:
            xf_scale_sub_f(g, w, n, a, b)
    else:
        if small:
            xfi_scale_sub_d(g, w, n, a, b)
        else:
            xf_scale_sub_d(g, w, n, a, b)

cdef inline void _dense_grad(floating *g, const floating *t, const floating *w, Py_ssize_t n,
                             floating a, floating sc, floating keep, floating add,
                             bint small) noexcept nogil:
    if floating is float:
        if small:
            xfi_dense_grad_f(g, t, w, n, a, sc, keep, add)
        else:
            xf_dense_grad_f(g, t, w, n, a, sc, keep, add)
    else:
        if small:
            xfi_dense_grad_d(g, t, w, n, a, sc, keep, add)
        else:
            xf_dense_grad_d(g, t, w, n, a, sc, keep, add)

cdef inline void _sub(const floating *x, floating *out, Py_ssize_t n, floating v) noexcept nogil:
    if floating is float:
        xf_sub_f(x, out, n, v)
    else:
        xf_sub_d(x, out, n, v)

cdef inline void _block_exp(const floating *x, floating *e, Py_ssize_t rows, Py_ssize_t c,
                            const floating *m, floating *mb) noexcept nogil:
    if floating is float:
        xf_block_exp_f(x, e, rows, c, m, mb)
    else:
        xf_block_exp_d(x, e, rows, c, m, mb)

cdef inline void _block_log(const floating *s, floating *out, Py_ssize_t rows) noexcept nogil:
    if floating is float:
        xf_block_log_f(s, out, rows)
    else:
        xf_block_log_d(s, out, rows)


cdef inline Py_ssize_t _rows_per_block(Py_ssize_t c) noexcept nogil:
    """1 for long rows; for short rows as many as fit _BLOCK_ELEMS (<= _BLOCK_ROWS)."""
    cdef Py_ssize_t r
    if c > _SMALL_C:
        return 1
    if c <= 0:
        return _BLOCK_ROWS
    r = _BLOCK_ELEMS // c
    return _BLOCK_ROWS if r > _BLOCK_ROWS else (r if r > 0 else 1)


cdef inline void _zero_row(floating *g, Py_ssize_t c) noexcept nogil:
    memset(g, 0, <size_t>c * sizeof(floating))


# =====================================================================================
# Index labels
# =====================================================================================
#
# The mathematics (contract, step 2), for one kept row with label y, class weights w
# (w = 1 without weights), smoothing eps, z-loss z, gradient scale sc:
#
#   1. m = max_j x_j;  s = sum_j exp(x_j - m);  lse = m + log(s).
#      Every exponent is <= 0 (no overflow) and the largest term is exactly 1, so
#      s >= 1 and log(s) >= 0: lse is exact to rounding for any finite x, even +-1e30.
#   2. loss = (1 - eps) w_y (lse - x_y) + z lse^2 + (eps / C) sum_c w_c (lse - x_c).
#      Every lse - x_c is evaluated as (m - x_c) + log(s), a sum of two terms >= 0
#      (as torch's log_softmax does: x - m - log s), never as (m + log s) - x_c: no
#      cancellation, so a small loss keeps its relative precision in float32 and rows
#      such as [1e30, 1e30] give exactly log 2 (m + log s would absorb log s).  The
#      smoothing sum becomes  A + W log(s)  with
#          A = sum_{w_c != 0} w_c (m - x_c) >= 0,   W = sum_c w_c,
#      and a class with w_c = 0 adds nothing even at x_c = -inf.  (numpy_ref computes
#      W lse - sum_c w_c x_c, which cancels catastrophically for |x| ~ 1e30: the two
#      differ there, this one being the exact value.)
#   3. d lse / d x_j = exp(x_j - lse) = p_j = e_j / s, hence
#          d loss / d x_j = p_j coef - (1 - eps) w_y [j == y] - (eps / C) w_j,
#          coef = (1 - eps) w_y + eps W / C + 2 z lse,
#      and the gradient is that times sc.  In pass 3 every element becomes
#          g_j = e_j a - b w_j,   a = coef sc / s,   b = sc eps / C,
#      then g_y is recomputed from e_y (read before pass 3) in the accumulation dtype,
#          g_y = ((e_y / s) coef - (1 - eps) w_y - (eps / C) w_y) sc,
#      so the true-class term p_y - 1 is formed in full precision, rounded once.
#   4. Ignored rows (y == ignore_index): loss 0, grad 0, lse still computed.

cdef Py_ssize_t _sparse_rows(const floating *X, floating *G, Py_ssize_t c,
                             const char *lab, Py_ssize_t lab_stride, int64_t ignore,
                             const floating *W, floating Wsum, floating eps, floating z,
                             floating sc, floating *loss, floating *lse,
                             Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """Long rows: each row start to finish, calling the multiversioned row passes."""
    cdef Py_ssize_t r, bad = 0
    cdef int64_t y
    cdef const floating *x
    cdef floating *g
    cdef floating m, s, ls, l_se, xy, wy, A, l, coef, a, ey, gy
    cdef floating keep = 1 - eps
    cdef floating eps_c = eps / c
    for r in range(r0, r1):
        x = X + r * c
        y = (<const int64_t *>(lab + r * lab_stride))[0]
        if y != ignore and (y < 0 or y >= c):          # never index with it
            bad += 1
            loss[r] = NAN
            lse[r] = NAN
            if G != NULL:
                _zero_row(G + r * c, c)
            continue
        m = _rowmax(x, c, False)                       # pass 1
        if y == ignore:
            lse[r] = m + _log(_expsum(x, c, m))        # pass 2, loss-only
            loss[r] = 0
            if G != NULL:
                _zero_row(G + r * c, c)
            continue
        xy = x[y]                                      # read before x may be overwritten
        A = 0
        if eps != 0:
            A = _wdist(x, W, c, m, False)              # pass 1b
        if G != NULL:
            g = G + r * c
            s = _expsum_store(x, g, c, m)              # pass 2: g_j = e_j (g may be x)
        else:
            s = _expsum(x, c, m)                       # pass 2
        ls = _log(s)
        l_se = m + ls
        lse[r] = l_se
        wy = W[y] if W != NULL else 1
        l = keep * wy * ((m - xy) + ls) + z * l_se * l_se
        if eps != 0:
            l = l + eps_c * (A + Wsum * ls)
        loss[r] = l
        if G != NULL:                                  # pass 3
            coef = keep * wy + z * 2 * l_se
            if eps != 0:
                coef = coef + eps * Wsum / c
            ey = g[y]
            a = coef * sc / s
            if eps != 0:
                _scale_sub(g, W, c, a, sc * eps_c, False)
            else:
                _scale(g, c, a, False)
            gy = ey / s * coef - keep * wy
            if eps != 0:
                gy = gy - eps_c * wy
            g[y] = gy * sc
    return bad


cdef Py_ssize_t _sparse_block(const floating *X, floating *G, Py_ssize_t c,
                              const char *lab, Py_ssize_t lab_stride, int64_t ignore,
                              const floating *W, floating Wsum, floating eps, floating z,
                              floating sc, floating *loss, floating *lse,
                              Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """Short rows r0..r1 (at most _BLOCK_ROWS rows, _BLOCK_ELEMS elements): same
    arithmetic as _sparse_rows, with pass 2's exp done flat over the block."""
    cdef floating mv[_BLOCK_ROWS]
    cdef floating sv[_BLOCK_ROWS]
    cdef floating lsv[_BLOCK_ROWS]
    cdef floating xyv[_BLOCK_ROWS]
    cdef floating Av[_BLOCK_ROWS]
    cdef int64_t yv[_BLOCK_ROWS]          # label, or -1 ignored, -2 bad
    cdef floating ebuf[_BLOCK_ELEMS]
    cdef floating mb[_BLOCK_ELEMS]
    cdef Py_ssize_t i, nr = r1 - r0, bad = 0
    cdef int64_t y
    cdef const floating *x
    cdef floating *e
    cdef floating *g
    cdef floating s, ls, l_se, wy, l, coef, a, ey, gy
    cdef floating keep = 1 - eps
    cdef floating eps_c = eps / c
    mv[0] = 0                                          # (nr >= 1; quiets -Wmaybe-uninitialized)
    for i in range(nr):                                # pass 1 (+1b), row by row
        x = X + (r0 + i) * c
        y = (<const int64_t *>(lab + (r0 + i) * lab_stride))[0]
        mv[i] = _rowmax(x, c, True)
        if y == ignore:
            yv[i] = -1
        elif y < 0 or y >= c:
            yv[i] = -2
            bad += 1
        else:
            yv[i] = y
            xyv[i] = x[y]
            if eps != 0:
                Av[i] = _wdist(x, W, c, mv[i], True)
    e = G + r0 * c if G != NULL else ebuf
    _block_exp(X + r0 * c, e, nr, c, mv, mb)           # pass 2: the exps, flat
    for i in range(nr):
        sv[i] = _rowsum(e + i * c, c)                  # pass 2: the sums, same lanes
    _block_log(sv, lsv, nr)
    for i in range(nr):
        y = yv[i]
        if y == -2:
            loss[r0 + i] = NAN
            lse[r0 + i] = NAN
            if G != NULL:
                _zero_row(e + i * c, c)
            continue
        s = sv[i]
        ls = lsv[i]
        l_se = mv[i] + ls
        lse[r0 + i] = l_se
        if y == -1:
            loss[r0 + i] = 0
            if G != NULL:
                _zero_row(e + i * c, c)
            continue
        wy = W[y] if W != NULL else 1
        l = keep * wy * ((mv[i] - xyv[i]) + ls) + z * l_se * l_se
        if eps != 0:
            l = l + eps_c * (Av[i] + Wsum * ls)
        loss[r0 + i] = l
        if G != NULL:                                  # pass 3
            g = e + i * c
            coef = keep * wy + z * 2 * l_se
            if eps != 0:
                coef = coef + eps * Wsum / c
            ey = g[y]
            a = coef * sc / s
            if eps != 0:
                _scale_sub(g, W, c, a, sc * eps_c, True)
            else:
                _scale(g, c, a, True)
            gy = ey / s * coef - keep * wy
            if eps != 0:
                gy = gy - eps_c * wy
            g[y] = gy * sc
    return bad


def sparse(const floating[:, ::1] logits, const int64_t[:] labels,
           const floating[::1] weight, int64_t ignore_index, double label_smoothing,
           double z_loss, double grad_scale, floating[::1] loss, floating[::1] lse,
           grad=None):
    """Index-label kernel; returns the number of labels outside [0, c) that are not
    ignore_index (their rows: loss NaN, lse NaN, grad 0).  See the module docstring."""
    cdef Py_ssize_t n = logits.shape[0], c = logits.shape[1]
    cdef floating[:, ::1] g
    cdef floating *gp = NULL
    cdef const floating *wp = NULL
    cdef floating Wsum = c
    cdef floating eps = <floating>label_smoothing
    cdef floating z = <floating>z_loss
    cdef floating sc = <floating>grad_scale
    cdef Py_ssize_t R, nblk, b, r0, r1, bad = 0
    if labels.shape[0] != n or loss.shape[0] != n or lse.shape[0] != n:
        raise ValueError(
            f"sparse kernel: labels, loss and lse must have {n} rows; got "
            f"{labels.shape[0]}, {loss.shape[0]}, {lse.shape[0]}")
    if weight.shape[0] not in (0, c):
        raise ValueError(f"sparse kernel: weight must have shape (0,) or ({c},); "
                         f"got ({weight.shape[0]},)")
    if grad is not None:
        g = grad
        if g.shape[0] != n or g.shape[1] != c:
            raise ValueError(f"sparse kernel: grad must have shape ({n}, {c}); got "
                             f"({g.shape[0]}, {g.shape[1]})")
        if n * c > 0:
            gp = &g[0, 0]
    if n == 0:
        return 0
    if weight.shape[0]:
        wp = &weight[0]
        Wsum = np.asarray(weight).sum()                # pairwise, as numpy_ref
    R = _rows_per_block(c)
    nblk = (n + R - 1) // R
    cdef const floating *xp = &logits[0, 0]
    cdef const char *lp = <const char *>&labels[0]
    cdef Py_ssize_t ls = labels.strides[0]
    cdef floating *lossp = &loss[0]
    cdef floating *lsep = &lse[0]
    with nogil:
        for b in prange(nblk, schedule="static", use_threads_if=n * c >= _PAR_MIN_ELEMS):
            r0 = b * R
            r1 = r0 + R
            if r1 > n:
                r1 = n
            if R > 1:
                bad += _sparse_block(xp, gp, c, lp, ls, ignore_index, wp, Wsum, eps, z,
                                     sc, lossp, lsep, r0, r1)
            else:
                bad += _sparse_rows(xp, gp, c, lp, ls, ignore_index, wp, Wsum, eps, z,
                                    sc, lossp, lsep, r0, r1)
    return bad


# =====================================================================================
# Probability labels
# =====================================================================================
#
# Contract step 3, with t'_c = (1 - eps) t_c + eps / C and wt_c = w_c t'_c:
#   loss = sum_c wt_c (lse - x_c) + z lse^2 = A + B log(s) + z lse^2,
#          A = sum_{wt_c != 0} wt_c (m - x_c),  B = sum_c wt_c
#   (lse - x_c = (m - x_c) + log(s) as for index labels: no cancellation)
#   (a class with wt_c = 0 adds nothing, even at x_c = -inf: a masked logit is not
#   0 * inf = NaN);
#   d loss / d x_j = p_j (B + 2 z lse) - wt_j,  so  g_j = e_j a - sc wt_j  with
#   a = (B + 2 z lse) sc / s.  With sum_c t_c = 1 and no weights this is TF's p - t.
# A and B are taken in pass 1b (before x may be overwritten); pass 3 re-reads t.

cdef void _dense_block(const floating *X, const floating *T, floating *G, Py_ssize_t c,
                       const floating *W, floating eps, floating z, floating sc,
                       floating *loss, floating *lse, Py_ssize_t r0,
                       Py_ssize_t r1) noexcept nogil:
    """Short rows r0..r1 of the dense kernel, with a flat exp over the block."""
    cdef floating mv[_BLOCK_ROWS]
    cdef floating sv[_BLOCK_ROWS]
    cdef floating lsv[_BLOCK_ROWS]
    cdef floating Av[_BLOCK_ROWS]
    cdef floating Bv[_BLOCK_ROWS]
    cdef floating ebuf[_BLOCK_ELEMS]
    cdef floating mb[_BLOCK_ELEMS]
    cdef Py_ssize_t i, nr = r1 - r0
    cdef const floating *x
    cdef floating *e
    cdef floating l_se, a
    cdef floating keep = 1 - eps
    cdef floating add = eps / c
    mv[0] = 0                                          # (nr >= 1; quiets -Wmaybe-uninitialized)
    for i in range(nr):
        x = X + (r0 + i) * c
        mv[i] = _rowmax(x, c, True)
        _dense_sums(x, T + (r0 + i) * c, W, c, mv[i], keep, add, &Av[i], &Bv[i], True)
    e = G + r0 * c if G != NULL else ebuf
    _block_exp(X + r0 * c, e, nr, c, mv, mb)
    for i in range(nr):
        sv[i] = _rowsum(e + i * c, c)
    _block_log(sv, lsv, nr)
    for i in range(nr):
        l_se = mv[i] + lsv[i]
        lse[r0 + i] = l_se
        loss[r0 + i] = Av[i] + Bv[i] * lsv[i] + z * l_se * l_se
        if G != NULL:
            a = (Bv[i] + z * 2 * l_se) * sc / sv[i]
            _dense_grad(e + i * c, T + (r0 + i) * c, W, c, a, sc, keep, add, True)


cdef void _dense_rows(const floating *X, const floating *T, floating *G, Py_ssize_t c,
                      const floating *W, floating eps, floating z, floating sc,
                      floating *loss, floating *lse, Py_ssize_t r0,
                      Py_ssize_t r1) noexcept nogil:
    """Long rows r0..r1 of the dense kernel."""
    cdef Py_ssize_t r
    cdef const floating *x
    cdef floating *g
    cdef floating m, s, ls, l_se, A, B, a
    cdef floating keep = 1 - eps
    cdef floating add = eps / c
    for r in range(r0, r1):
        x = X + r * c
        m = _rowmax(x, c, False)                               # pass 1
        _dense_sums(x, T + r * c, W, c, m, keep, add, &A, &B, False)   # pass 1b
        if G != NULL:
            g = G + r * c
            s = _expsum_store(x, g, c, m)                      # pass 2 (g may be x)
        else:
            s = _expsum(x, c, m)
        ls = _log(s)
        l_se = m + ls
        lse[r] = l_se
        loss[r] = A + B * ls + z * l_se * l_se
        if G != NULL:                                          # pass 3
            a = (B + z * 2 * l_se) * sc / s
            _dense_grad(g, T + r * c, W, c, a, sc, keep, add, False)


def dense(const floating[:, ::1] logits, const floating[:, ::1] labels,
          const floating[::1] weight, double label_smoothing, double z_loss,
          double grad_scale, floating[::1] loss, floating[::1] lse, grad=None):
    """Probability-label kernel.  See the module docstring."""
    cdef Py_ssize_t n = logits.shape[0], c = logits.shape[1]
    cdef floating[:, ::1] g
    cdef floating *gp = NULL
    cdef const floating *wp = NULL
    cdef floating eps = <floating>label_smoothing
    cdef floating z = <floating>z_loss
    cdef floating sc = <floating>grad_scale
    cdef Py_ssize_t R, nblk, b, r0, r1
    if labels.shape[0] != n or labels.shape[1] != c:
        raise ValueError(f"dense kernel: labels must have shape ({n}, {c}); got "
                         f"({labels.shape[0]}, {labels.shape[1]})")
    if loss.shape[0] != n or lse.shape[0] != n:
        raise ValueError(f"dense kernel: loss and lse must have {n} rows; got "
                         f"{loss.shape[0]}, {lse.shape[0]}")
    if weight.shape[0] not in (0, c):
        raise ValueError(f"dense kernel: weight must have shape (0,) or ({c},); "
                         f"got ({weight.shape[0]},)")
    if grad is not None:
        g = grad
        if g.shape[0] != n or g.shape[1] != c:
            raise ValueError(f"dense kernel: grad must have shape ({n}, {c}); got "
                             f"({g.shape[0]}, {g.shape[1]})")
        if n * c > 0:
            gp = &g[0, 0]
    if n == 0:
        return 0
    if weight.shape[0]:
        wp = &weight[0]
    R = _rows_per_block(c)
    nblk = (n + R - 1) // R
    cdef const floating *xp = &logits[0, 0]
    cdef const floating *tp = &labels[0, 0]
    cdef floating *lossp = &loss[0]
    cdef floating *lsep = &lse[0]
    with nogil:
        for b in prange(nblk, schedule="static", use_threads_if=n * c >= _PAR_MIN_ELEMS):
            r0 = b * R
            r1 = r0 + R
            if r1 > n:
                r1 = n
            if R > 1:
                _dense_block(xp, tp, gp, c, wp, eps, z, sc, lossp, lsep, r0, r1)
            else:
                _dense_rows(xp, tp, gp, c, wp, eps, z, sc, lossp, lsep, r0, r1)
    return 0


# =====================================================================================
# Primitives: logsumexp (n,), log_softmax and softmax (n, c); steps 1 of the contract.
# log_softmax_j = x_j - lse;  softmax_j = e_j / s, as e_j * (1/s) (<= 1 ulp apart).
# out may be x itself for log_softmax and softmax (element j is read, then written).
# =====================================================================================

cdef enum:
    _K_LSE = 0
    _K_LOG_SOFTMAX = 1
    _K_SOFTMAX = 2

cdef void _prim_block(int kind, const floating *X, floating *O, Py_ssize_t c,
                      Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef floating mv[_BLOCK_ROWS]
    cdef floating sv[_BLOCK_ROWS]
    cdef floating lsv[_BLOCK_ROWS]
    cdef floating ebuf[_BLOCK_ELEMS]
    cdef floating mb[_BLOCK_ELEMS]
    cdef Py_ssize_t i, j, nr = r1 - r0
    cdef const floating *x
    cdef floating *o
    cdef floating *e
    cdef floating v
    mv[0] = 0                                          # (nr >= 1; quiets -Wmaybe-uninitialized)
    for i in range(nr):
        mv[i] = _rowmax(X + (r0 + i) * c, c, True)
    e = O + r0 * c if kind == _K_SOFTMAX else ebuf
    _block_exp(X + r0 * c, e, nr, c, mv, mb)
    for i in range(nr):
        sv[i] = _rowsum(e + i * c, c)
    _block_log(sv, lsv, nr)
    for i in range(nr):
        if kind == _K_LSE:
            O[r0 + i] = mv[i] + lsv[i]
        elif kind == _K_LOG_SOFTMAX:
            x = X + (r0 + i) * c
            o = O + (r0 + i) * c
            v = mv[i] + lsv[i]
            for j in range(c):
                o[j] = x[j] - v
        else:
            _scale(e + i * c, c, 1 / sv[i], True)


cdef void _prim_rows(int kind, const floating *X, floating *O, Py_ssize_t c,
                     Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef Py_ssize_t r
    cdef const floating *x
    cdef floating m, s
    for r in range(r0, r1):
        x = X + r * c
        m = _rowmax(x, c, False)
        if kind == _K_SOFTMAX:
            s = _expsum_store(x, O + r * c, c, m)
            _scale(O + r * c, c, 1 / s, False)
        else:
            s = _expsum(x, c, m)
            if kind == _K_LSE:
                O[r] = m + _log(s)
            else:
                _sub(x, O + r * c, c, m + _log(s))


cdef _prim(int kind, const floating[:, ::1] x, floating *op, Py_ssize_t out_rows):
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1]
    cdef Py_ssize_t R, nblk, b, r0, r1
    if out_rows != n:
        raise ValueError(f"out must have {n} rows; got {out_rows}")
    if n == 0 or c == 0 and kind != _K_LSE:
        return
    R = _rows_per_block(c)
    nblk = (n + R - 1) // R
    cdef const floating *xp = &x[0, 0]
    with nogil:
        for b in prange(nblk, schedule="static", use_threads_if=n * c >= _PAR_MIN_ELEMS):
            r0 = b * R
            r1 = r0 + R
            if r1 > n:
                r1 = n
            if R > 1:
                _prim_block(kind, xp, op, c, r0, r1)
            else:
                _prim_rows(kind, xp, op, c, r0, r1)


def logsumexp(const floating[:, ::1] x, floating[::1] out):
    """out[i] = log(sum_j exp(x[i, j]))."""
    _prim(_K_LSE, x, &out[0] if out.shape[0] else NULL, out.shape[0])


def log_softmax(const floating[:, ::1] x, floating[:, ::1] out):
    """out[i, j] = x[i, j] - logsumexp(x[i])."""
    if out.shape[1] != x.shape[1]:
        raise ValueError(f"out must have {x.shape[1]} columns; got {out.shape[1]}")
    _prim(_K_LOG_SOFTMAX, x, &out[0, 0] if out.shape[0] * out.shape[1] else NULL,
          out.shape[0])


def softmax(const floating[:, ::1] x, floating[:, ::1] out):
    """out[i, j] = exp(x[i, j] - logsumexp(x[i]))."""
    if out.shape[1] != x.shape[1]:
        raise ValueError(f"out must have {x.shape[1]} columns; got {out.shape[1]}")
    _prim(_K_SOFTMAX, x, &out[0, 0] if out.shape[0] * out.shape[1] else NULL,
          out.shape[0])
