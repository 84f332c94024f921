# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
# distutils: language = c
"""Backend ``cython``: the kernel set as a Cython + OpenMP extension.

Import it through :mod:`xentfast.backends.cython_shim`, which adds the contract's exact
Python signatures and turns a bad class id into ``ValueError``; this module is the
compiled half.  The kernel contract and its derivations are in
``xentfast/backends/__init__.py``; ``numpy_ref.py`` is the reference these kernels
match; measurements and what did / did not pay are in
``benchmarks/NOTES_cython_kernels.md``.

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

The vector passes live in C (``_xfrows.h``, ``_xfrows_tmpl.h``, ``_fastexp.h``): a
vectorisable exp/log (no libm calls in loops), lane-wise sums whose order is fixed (so
results are bitwise identical at any thread count), and on x86-64 Linux with gcc
``target_clones`` copies for AVX2+FMA and AVX-512 chosen at load time.  During pass 2
of a long row the next row is prefetched, overlapping its DRAM read with this row's exp.

Short rows (c <= XF_SMALL_C = 32, e.g. 10 classes) are too short to vectorise along,
so XF_TILE = 16 consecutive rows are copied into a class-major tile and every pass runs
"vertically", one SIMD lane per row: max, exp, sum and log for 16 rows at once, no
horizontal reductions; the gradient is scaled while being copied back row-major.  The
same numbered steps, on a different layout.  Per-row arithmetic never depends on which
tile or thread a row is in, so results do not depend on the thread count.

Inputs with fewer than _PAR_MIN_ELEMS elements run on the calling thread only (an
OpenMP fork/join costs more than such a call).  Thread-safety: kernels hold no state
and release the GIL; concurrent calls from several Python threads each get their own
OpenMP team.  Row blocks are contiguous per thread (static schedule), so threads never
write to the same cache line except at the one boundary between their ranges.  A
process forked after a parallel kernel ran computes single-threaded (libgomp is not
fork-safe; see _after_fork_in_child).

Precision rule: arithmetic is in the input dtype (float32 -> float32 accumulation,
float64 -> float64), which the contract names the accumulation dtype; float16 is upcast
by the public layer.  e, p_y - 1 and every product are formed in it and rounded once to
the output (same dtype).  Differences from numpy_ref are a few ulps: exp/log are
faithfully rounded (~1 ulp, see _fastexp.h), sums are lane-wise instead of pairwise,
p = e * (1/s) instead of e / s, lse - x_c is formed as (m - x_c) + log s (more
accurate, see below), and on AVX2/AVX-512 machines a*b+c is fused.

Memory safety: shapes are checked here; a class id outside [0, c) that is not
ignore_index is never used as an index -- the row gets loss NaN, lse NaN, grad 0 and is
counted, and the shim raises ValueError naming the first such label.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.stddef cimport ptrdiff_t
from libc.string cimport memset
from libc.math cimport NAN, log, logf

import numpy as np

ctypedef fused floating:
    float
    double


cdef extern from "_xfrows.h" nogil:
    int XF_MULTIVERSIONED
    enum:
        XF_TILE            # rows per tile of short rows (16)
        XF_SMALL_C         # rows of at most this many classes use tiles (32)
    float xf_logf(float s)
    double xf_log_d_(double s)
    # long rows: one pass over one row per call
    float xf_rowmax_f(const float *x, ptrdiff_t n)
    double xf_rowmax_d(const double *x, ptrdiff_t n)
    float xf_expsum_f(const float *x, ptrdiff_t n, float m, const float *pf)
    double xf_expsum_d(const double *x, ptrdiff_t n, double m, const double *pf)
    float xf_expsum_store_f(const float *x, float *e, ptrdiff_t n, float m, const float *pf)
    double xf_expsum_store_d(const double *x, double *e, ptrdiff_t n, double m,
                             const double *pf)
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
    # short rows: XF_TILE rows at a time, class-major tiles
    void xf_tile_load_f(const float *x, float *tile, ptrdiff_t rows, ptrdiff_t c)
    void xf_tile_load_d(const double *x, double *tile, ptrdiff_t rows, ptrdiff_t c)
    void xf_tile_max_f(const float *tile, ptrdiff_t c, float *m)
    void xf_tile_max_d(const double *tile, ptrdiff_t c, double *m)
    void xf_tile_expsum_f(float *tile, ptrdiff_t c, const float *m, float *s)
    void xf_tile_expsum_d(double *tile, ptrdiff_t c, const double *m, double *s)
    void xf_tile_wdist_f(const float *tile, const float *w, ptrdiff_t c, const float *m,
                         float *A)
    void xf_tile_wdist_d(const double *tile, const double *w, ptrdiff_t c, const double *m,
                         double *A)
    void xf_tile_dense_sums_f(const float *tx, const float *tt, const float *w, ptrdiff_t c,
                              const float *m, float keep, float add, float *A, float *B)
    void xf_tile_dense_sums_d(const double *tx, const double *tt, const double *w,
                              ptrdiff_t c, const double *m, double keep, double add,
                              double *A, double *B)
    void xf_tile_log_f(const float *s, float *out)
    void xf_tile_log_d(const double *s, double *out)
    void xf_tile_store_f(const float *tile, float *g, ptrdiff_t rows, ptrdiff_t c,
                         const float *a, float b, const float *w)
    void xf_tile_store_d(const double *tile, double *g, ptrdiff_t rows, ptrdiff_t c,
                         const double *a, double b, const double *w)
    void xf_tile_store_dense_f(const float *te, const float *tt, float *g, ptrdiff_t rows,
                               ptrdiff_t c, const float *a, float sc, float keep, float add,
                               const float *w)
    void xf_tile_store_dense_d(const double *te, const double *tt, double *g,
                               ptrdiff_t rows, ptrdiff_t c, const double *a, double sc,
                               double keep, double add, const double *w)
    void xf_rows_sub_f(const float *x, float *out, ptrdiff_t rows, ptrdiff_t c,
                       const float *v)
    void xf_rows_sub_d(const double *x, double *out, ptrdiff_t rows, ptrdiff_t c,
                       const double *v)


# Tunables: compile-time constants, not module globals (see NOTES_cython_kernels.md).
cdef enum:
    _PAR_MIN_ELEMS = 32768   # below this many elements one thread does the whole call
    # Prefetch the next long row during pass 2 only while this row, its gradient and the
    # next row fit a server-class L2 (1-2 MiB): measured at 128000 float32 classes
    # (512 KiB rows), prefetching gained 1.3x without a gradient and lost 1.1x with one.
    _PF_MAX_BYTES_LOSS = 1048576
    _PF_MAX_BYTES_GRAD = 262144

# Fork safety.  GNU OpenMP (libgomp) is not fork-safe: a child forked after the parent
# ran a parallel region deadlocks in its first parallel region (the team's threads do
# not exist in the child).  The shim registers _after_fork_in_child with
# os.register_at_fork, so such a child runs every kernel on its one thread instead.
cdef bint _threads_ok = True
cdef bint _ran_parallel = False


def _after_fork_in_child():
    """os.register_at_fork(after_in_child=...) hook: no OpenMP teams after a fork."""
    global _threads_ok
    if _ran_parallel:
        _threads_ok = False


cdef inline bint _use_threads(Py_ssize_t elems) noexcept:
    global _ran_parallel
    if elems >= _PAR_MIN_ELEMS and _threads_ok:
        _ran_parallel = True
        return True
    return False


def threads_enabled():
    """False in a process forked after this one ran a parallel kernel (see above)."""
    return bool(_threads_ok)


MULTIVERSIONED = bool(XF_MULTIVERSIONED)
SMALL_C = XF_SMALL_C
TILE_ROWS = XF_TILE
PAR_MIN_ELEMS = _PAR_MIN_ELEMS


# ---- typed dispatch onto the C functions (resolved at compile time per specialisation) ----

cdef inline floating _log(floating s) noexcept nogil:
    # One log per long row: libm's (< 1 ulp, and a much shorter dependency chain than
    # the polynomial of xf_logf compiled for baseline SSE2 without FMA, which made the
    # per-row tail latency-bound).  Tiles use the vectorised xf_logf on 16 rows at once.
    if floating is float:
        return logf(s)
    else:
        return log(s)

cdef inline floating _rowmax(const floating *x, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return xf_rowmax_f(x, n)
    else:
        return xf_rowmax_d(x, n)

cdef inline floating _expsum(const floating *x, Py_ssize_t n, floating m,
                             const floating *pf) noexcept nogil:
    if floating is float:
        return xf_expsum_f(x, n, m, pf)
    else:
        return xf_expsum_d(x, n, m, pf)

cdef inline floating _expsum_store(const floating *x, floating *e, Py_ssize_t n,
                                   floating m, const floating *pf) noexcept nogil:
    if floating is float:
        return xf_expsum_store_f(x, e, n, m, pf)
    else:
        return xf_expsum_store_d(x, e, n, m, pf)

cdef inline floating _wdist(const floating *x, const floating *w, Py_ssize_t n,
                            floating m) noexcept nogil:
    if floating is float:
        return xf_wdist_f(x, w, n, m)
    else:
        return xf_wdist_d(x, w, n, m)

cdef inline void _dense_sums(const floating *x, const floating *t, const floating *w,
                             Py_ssize_t n, floating m, floating keep, floating add,
                             floating *A, floating *B) noexcept nogil:
    if floating is float:
        xf_dense_sums_f(x, t, w, n, m, keep, add, A, B)
    else:
        xf_dense_sums_d(x, t, w, n, m, keep, add, A, B)

cdef inline void _scale(floating *g, Py_ssize_t n, floating a) noexcept nogil:
    if floating is float:
        xf_scale_f(g, n, a)
    else:
        xf_scale_d(g, n, a)

cdef inline void _scale_sub(floating *g, const floating *w, Py_ssize_t n, floating a,
                            floating b) noexcept nogil:
    if floating is float:
        xf_scale_sub_f(g, w, n, a, b)
    else:
        xf_scale_sub_d(g, w, n, a, b)

cdef inline void _dense_grad(floating *g, const floating *t, const floating *w, Py_ssize_t n,
                             floating a, floating sc, floating keep,
                             floating add) noexcept nogil:
    if floating is float:
        xf_dense_grad_f(g, t, w, n, a, sc, keep, add)
    else:
        xf_dense_grad_d(g, t, w, n, a, sc, keep, add)

cdef inline void _sub(const floating *x, floating *out, Py_ssize_t n, floating v) noexcept nogil:
    if floating is float:
        xf_sub_f(x, out, n, v)
    else:
        xf_sub_d(x, out, n, v)

cdef inline void _tile_load(const floating *x, floating *tile, Py_ssize_t rows,
                            Py_ssize_t c) noexcept nogil:
    if floating is float:
        xf_tile_load_f(x, tile, rows, c)
    else:
        xf_tile_load_d(x, tile, rows, c)

cdef inline void _tile_max(const floating *tile, Py_ssize_t c, floating *m) noexcept nogil:
    if floating is float:
        xf_tile_max_f(tile, c, m)
    else:
        xf_tile_max_d(tile, c, m)

cdef inline void _tile_expsum(floating *tile, Py_ssize_t c, const floating *m,
                              floating *s) noexcept nogil:
    if floating is float:
        xf_tile_expsum_f(tile, c, m, s)
    else:
        xf_tile_expsum_d(tile, c, m, s)

cdef inline void _tile_wdist(const floating *tile, const floating *w, Py_ssize_t c,
                             const floating *m, floating *A) noexcept nogil:
    if floating is float:
        xf_tile_wdist_f(tile, w, c, m, A)
    else:
        xf_tile_wdist_d(tile, w, c, m, A)

cdef inline void _tile_dense_sums(const floating *tx, const floating *tt, const floating *w,
                                  Py_ssize_t c, const floating *m, floating keep,
                                  floating add, floating *A, floating *B) noexcept nogil:
    if floating is float:
        xf_tile_dense_sums_f(tx, tt, w, c, m, keep, add, A, B)
    else:
        xf_tile_dense_sums_d(tx, tt, w, c, m, keep, add, A, B)

cdef inline void _tile_log(const floating *s, floating *out) noexcept nogil:
    if floating is float:
        xf_tile_log_f(s, out)
    else:
        xf_tile_log_d(s, out)

cdef inline void _tile_store(const floating *tile, floating *g, Py_ssize_t rows, Py_ssize_t c,
                             const floating *a, floating b, const floating *w) noexcept nogil:
    if floating is float:
        xf_tile_store_f(tile, g, rows, c, a, b, w)
    else:
        xf_tile_store_d(tile, g, rows, c, a, b, w)

cdef inline void _tile_store_dense(const floating *te, const floating *tt, floating *g,
                                   Py_ssize_t rows, Py_ssize_t c, const floating *a,
                                   floating sc, floating keep, floating add,
                                   const floating *w) noexcept nogil:
    if floating is float:
        xf_tile_store_dense_f(te, tt, g, rows, c, a, sc, keep, add, w)
    else:
        xf_tile_store_dense_d(te, tt, g, rows, c, a, sc, keep, add, w)

cdef inline void _rows_sub(const floating *x, floating *out, Py_ssize_t rows, Py_ssize_t c,
                           const floating *v) noexcept nogil:
    if floating is float:
        xf_rows_sub_f(x, out, rows, c, v)
    else:
        xf_rows_sub_d(x, out, rows, c, v)


cdef inline Py_ssize_t _rows_per_block(Py_ssize_t c) noexcept nogil:
    """1 for long rows (one row per prange iteration), a tile of XF_TILE for short."""
    return XF_TILE if c <= XF_SMALL_C else 1


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
                             Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n) noexcept nogil:
    """Long rows: each row start to finish, calling the multiversioned row passes."""
    cdef Py_ssize_t r, bad = 0
    cdef int64_t y
    cdef const floating *x
    cdef const floating *pf                            # next row, prefetched in pass 2
    cdef bint pf_on = <size_t>c * sizeof(floating) <= (
        <size_t>_PF_MAX_BYTES_GRAD if G != NULL else <size_t>_PF_MAX_BYTES_LOSS)
    cdef floating *g
    cdef floating m, s, ls, l_se, xy, wy, A, l, coef, a, ey, gy
    cdef floating keep = 1 - eps
    cdef floating eps_c = eps / c
    for r in range(r0, r1):
        x = X + r * c
        pf = x + c if (pf_on and r + 1 < n) else NULL
        y = (<const int64_t *>(lab + r * lab_stride))[0]
        if y != ignore and (y < 0 or y >= c):          # never index with it
            bad += 1
            loss[r] = NAN
            lse[r] = NAN
            if G != NULL:
                _zero_row(G + r * c, c)
            continue
        m = _rowmax(x, c)                       # pass 1
        if y == ignore:
            lse[r] = m + _log(_expsum(x, c, m, pf))    # pass 2, loss-only
            loss[r] = 0
            if G != NULL:
                _zero_row(G + r * c, c)
            continue
        xy = x[y]                                      # read before x may be overwritten
        A = 0
        if eps != 0:
            A = _wdist(x, W, c, m)              # pass 1b
        if G != NULL:
            g = G + r * c
            s = _expsum_store(x, g, c, m, pf)          # pass 2: g_j = e_j (g may be x)
        else:
            s = _expsum(x, c, m, pf)                   # pass 2
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
                _scale_sub(g, W, c, a, sc * eps_c)
            else:
                _scale(g, c, a)
            gy = ey / s * coef - keep * wy
            if eps != 0:
                gy = gy - eps_c * wy
            g[y] = gy * sc
    return bad


cdef Py_ssize_t _sparse_tile(const floating *X, floating *G, Py_ssize_t c,
                             const char *lab, Py_ssize_t lab_stride, int64_t ignore,
                             const floating *W, floating Wsum, floating eps, floating z,
                             floating sc, floating *loss, floating *lse,
                             Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """Short rows r0..r1 (at most XF_TILE of them): the same steps as _sparse_rows,
    run on a class-major tile, one SIMD lane per row (see _xfrows_tmpl.h)."""
    cdef floating tile[XF_SMALL_C * XF_TILE]
    cdef floating mv[XF_TILE]
    cdef floating sv[XF_TILE]
    cdef floating lsv[XF_TILE]
    cdef floating Av[XF_TILE]
    cdef floating av[XF_TILE]
    cdef floating gyv[XF_TILE]
    cdef int64_t yv[XF_TILE]              # the label, or -1 ignored, -2 out of range
    cdef Py_ssize_t i, nr = r1 - r0, bad = 0
    cdef int64_t y
    cdef floating s, ls, l_se, wy, l, coef, gy
    cdef floating keep = 1 - eps
    cdef floating eps_c = eps / c
    _tile_load(X + r0 * c, tile, nr, c)
    _tile_max(tile, c, mv)                             # pass 1
    if eps != 0:
        _tile_wdist(tile, W, c, mv, Av)                # pass 1b
    for i in range(nr):                                # labels and x_y, before pass 3
        y = (<const int64_t *>(lab + (r0 + i) * lab_stride))[0]
        if y == ignore:
            yv[i] = -1
        elif y < 0 or y >= c:                          # never index with it
            yv[i] = -2
            bad += 1
        else:
            yv[i] = y
            gyv[i] = X[(r0 + i) * c + y]               # x_y (X may become G in pass 3)
    _tile_expsum(tile, c, mv, sv)                      # pass 2: e in the tile, s
    _tile_log(sv, lsv)
    for i in range(nr):                                # losses, pass-3 coefficients
        y = yv[i]
        av[i] = 0
        if y < 0:
            loss[r0 + i] = NAN if y == -2 else 0
            lse[r0 + i] = NAN if y == -2 else mv[i] + lsv[i]
            continue
        s = sv[i]
        ls = lsv[i]
        l_se = mv[i] + ls
        lse[r0 + i] = l_se
        wy = W[y] if W != NULL else 1
        l = keep * wy * ((mv[i] - gyv[i]) + ls) + z * l_se * l_se
        if eps != 0:
            l = l + eps_c * (Av[i] + Wsum * ls)
        loss[r0 + i] = l
        if G != NULL:
            coef = keep * wy + z * 2 * l_se
            if eps != 0:
                coef = coef + eps * Wsum / c
            av[i] = coef * sc / s
            gy = tile[y * XF_TILE + i] / s * coef - keep * wy      # e_y / s = p_y
            if eps != 0:
                gy = gy - eps_c * wy
            gyv[i] = gy * sc
    if G == NULL:
        return bad
    if eps != 0:                                       # pass 3, written back row-major
        _tile_store(tile, G + r0 * c, nr, c, av, sc * eps_c, W)
    else:
        _tile_store(tile, G + r0 * c, nr, c, av, 0, <const floating *>NULL)
    for i in range(nr):                                # g_y in full precision; zero rows
        y = yv[i]
        if y >= 0:
            G[(r0 + i) * c + y] = gyv[i]
        else:
            _zero_row(G + (r0 + i) * c, c)
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
    cdef bint par = _use_threads(n * c)
    with nogil:
        for b in prange(nblk, schedule="static", use_threads_if=par):
            r0 = b * R
            r1 = r0 + R
            if r1 > n:
                r1 = n
            if R > 1:
                bad += _sparse_tile(xp, gp, c, lp, ls, ignore_index, wp, Wsum, eps, z,
                                    sc, lossp, lsep, r0, r1)
            else:
                bad += _sparse_rows(xp, gp, c, lp, ls, ignore_index, wp, Wsum, eps, z,
                                    sc, lossp, lsep, r0, r1, n)
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

cdef void _dense_tile(const floating *X, const floating *T, floating *G, Py_ssize_t c,
                      const floating *W, floating eps, floating z, floating sc,
                      floating *loss, floating *lse, Py_ssize_t r0,
                      Py_ssize_t r1) noexcept nogil:
    """Short rows r0..r1 (at most XF_TILE) of the dense kernel, on class-major tiles."""
    cdef floating tx[XF_SMALL_C * XF_TILE]
    cdef floating tt[XF_SMALL_C * XF_TILE]
    cdef floating mv[XF_TILE]
    cdef floating sv[XF_TILE]
    cdef floating lsv[XF_TILE]
    cdef floating Av[XF_TILE]
    cdef floating Bv[XF_TILE]
    cdef Py_ssize_t i, nr = r1 - r0
    cdef floating l_se
    cdef floating keep = 1 - eps
    cdef floating add = eps / c
    _tile_load(X + r0 * c, tx, nr, c)
    _tile_load(T + r0 * c, tt, nr, c)
    _tile_max(tx, c, mv)                                       # pass 1
    _tile_dense_sums(tx, tt, W, c, mv, keep, add, Av, Bv)      # pass 1b
    _tile_expsum(tx, c, mv, sv)                                # pass 2
    _tile_log(sv, lsv)
    for i in range(nr):
        l_se = mv[i] + lsv[i]
        lse[r0 + i] = l_se
        loss[r0 + i] = Av[i] + Bv[i] * lsv[i] + z * l_se * l_se
        Av[i] = (Bv[i] + z * 2 * l_se) * sc / sv[i]           # pass-3 coefficient a
    if G != NULL:                                              # pass 3, row-major
        _tile_store_dense(tx, tt, G + r0 * c, nr, c, Av, sc, keep, add, W)


cdef void _dense_rows(const floating *X, const floating *T, floating *G, Py_ssize_t c,
                      const floating *W, floating eps, floating z, floating sc,
                      floating *loss, floating *lse, Py_ssize_t r0,
                      Py_ssize_t r1, Py_ssize_t n) noexcept nogil:
    """Long rows r0..r1 of the dense kernel."""
    cdef Py_ssize_t r
    cdef const floating *x
    cdef const floating *pf
    cdef bint pf_on = <size_t>c * sizeof(floating) <= (
        <size_t>_PF_MAX_BYTES_GRAD if G != NULL else <size_t>_PF_MAX_BYTES_LOSS)
    cdef floating *g
    cdef floating m, s, ls, l_se, A, B, a
    cdef floating keep = 1 - eps
    cdef floating add = eps / c
    for r in range(r0, r1):
        x = X + r * c
        pf = x + c if (pf_on and r + 1 < n) else NULL
        m = _rowmax(x, c)                               # pass 1
        _dense_sums(x, T + r * c, W, c, m, keep, add, &A, &B)   # pass 1b
        if G != NULL:
            g = G + r * c
            s = _expsum_store(x, g, c, m, pf)                  # pass 2 (g may be x)
        else:
            s = _expsum(x, c, m, pf)
        ls = _log(s)
        l_se = m + ls
        lse[r] = l_se
        loss[r] = A + B * ls + z * l_se * l_se
        if G != NULL:                                          # pass 3
            a = (B + z * 2 * l_se) * sc / s
            _dense_grad(g, T + r * c, W, c, a, sc, keep, add)


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
    cdef bint par = _use_threads(n * c)
    with nogil:
        for b in prange(nblk, schedule="static", use_threads_if=par):
            r0 = b * R
            r1 = r0 + R
            if r1 > n:
                r1 = n
            if R > 1:
                _dense_tile(xp, tp, gp, c, wp, eps, z, sc, lossp, lsep, r0, r1)
            else:
                _dense_rows(xp, tp, gp, c, wp, eps, z, sc, lossp, lsep, r0, r1, n)
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

cdef void _prim_tile(int kind, const floating *X, floating *O, Py_ssize_t c,
                     Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef floating tile[XF_SMALL_C * XF_TILE]
    cdef floating mv[XF_TILE]
    cdef floating sv[XF_TILE]
    cdef floating lsv[XF_TILE]
    cdef Py_ssize_t i, nr = r1 - r0
    _tile_load(X + r0 * c, tile, nr, c)
    _tile_max(tile, c, mv)
    _tile_expsum(tile, c, mv, sv)
    if kind == _K_SOFTMAX:
        for i in range(XF_TILE):
            sv[i] = 1 / sv[i]
        _tile_store(tile, O + r0 * c, nr, c, sv, 0, <const floating *>NULL)
        return
    _tile_log(sv, lsv)
    for i in range(XF_TILE):
        lsv[i] = mv[i] + lsv[i]
    if kind == _K_LSE:
        for i in range(nr):
            O[r0 + i] = lsv[i]
    else:
        _rows_sub(X + r0 * c, O + r0 * c, nr, c, lsv)


cdef void _prim_rows(int kind, const floating *X, floating *O, Py_ssize_t c,
                     Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t r
    cdef const floating *x
    cdef const floating *pf
    cdef bint pf_on = <size_t>c * sizeof(floating) <= (
        <size_t>_PF_MAX_BYTES_GRAD if kind == _K_SOFTMAX else <size_t>_PF_MAX_BYTES_LOSS)
    cdef floating m, s
    for r in range(r0, r1):
        x = X + r * c
        pf = x + c if (pf_on and r + 1 < n) else NULL
        m = _rowmax(x, c)
        if kind == _K_SOFTMAX:
            s = _expsum_store(x, O + r * c, c, m, pf)
            _scale(O + r * c, c, 1 / s)
        else:
            s = _expsum(x, c, m, pf)
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
    cdef bint par = _use_threads(n * c)
    with nogil:
        for b in prange(nblk, schedule="static", use_threads_if=par):
            r0 = b * R
            r1 = r0 + R
            if r1 > n:
                r1 = n
            if R > 1:
                _prim_tile(kind, xp, op, c, r0, r1)
            else:
                _prim_rows(kind, xp, op, c, r0, r1, n)


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
