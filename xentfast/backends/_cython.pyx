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
  pass 2   u = sum_{x_j < m} e_j and t = sum of the other e_j (the ties at the max,
           NaN for NaN/+inf), e_j = exp(x_j - m), in separate lanes; with a gradient,
           e_j is stored into grad during this pass, so each exp is computed exactly
           once   (reads x, writes grad -- grad may BE x, inplace=True: element j is
           read, then written; x_y and every sum over x were taken before)
  epilogue r = u + (t - 1), log s = log1p(r), lse = m + log s, the loss and the pass-3
           coefficients: rowmath.py's formulas, in C under the same names
           (xf_rest_mass, xf_sparse_loss, xf_sparse_true_grad, ... in _xfrows_tmpl.h)
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
the output (same dtype).  Two refinements: the long-row sums add blocks of 1024 floats
(512 doubles) into double-precision lane totals, so they do not drift with C; and the
row's scalars use the non-cancelling forms of rowmath.py -- r (not s) into log1p,
loss = (m - x_y) + log s, p_y - 1 = -((1 - e_y) + r) / s, the dense gradient
((e_j A - wt_j) - wt_j r) gs / s, log_softmax (x_j - m) - log s, softmax e_j (1 / s) --
so confident rows (loss ~ 1e-8 in float32, 1e-17 in float64), ties at the max and
+-1e30 logits keep their relative precision.  exp/log are faithfully rounded (~1 ulp,
see _fastexp.h); on AVX2/AVX-512 machines a*b+c is fused.

Memory safety: shapes are checked here; a class id outside [0, c) that is not
ignore_index is never used as an index -- the row gets loss NaN, lse NaN, grad 0 and is
counted, and the shim raises ValueError naming the first such label.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.stddef cimport ptrdiff_t
from libc.string cimport memset
from libc.math cimport NAN, log1p, log1pf

import numpy as np

ctypedef fused floating:
    float
    double


cdef extern from "_xfrows.h" nogil:
    int XF_MULTIVERSIONED
    enum:
        XF_TILE            # rows per tile of short rows (16)
        XF_SMALL_C         # rows of at most this many classes use tiles (32)
    float xf_log1pf_v(float r)
    # rowmath.py in C (the "rowmath in C" section of _xfrows_tmpl.h), same formulas
    float xf_rest_mass_f(float u, float t)
    double xf_rest_mass_d(double u, double t)
    float xf_log_sum_exp_f(float m, float log_s)
    double xf_log_sum_exp_d(double m, double log_s)
    float xf_sparse_loss_f(float m, float log_s, float x_y, float w_y, float one_m_eps,
                           float eps_c, float w_sum, float wd, float z)
    double xf_sparse_loss_d(double m, double log_s, double x_y, double w_y,
                            double one_m_eps, double eps_c, double w_sum, double wd,
                            double z)
    float xf_dense_loss_f(float m, float log_s, float t_sum, float wd, float z)
    double xf_dense_loss_d(double m, double log_s, double t_sum, double wd, double z)
    float xf_sparse_scale_f(float r, float lse, float w_y, float one_m_eps, float eps_c,
                            float w_sum, float z, float gs)
    double xf_sparse_scale_d(double r, double lse, double w_y, double one_m_eps,
                             double eps_c, double w_sum, double z, double gs)
    float xf_sparse_true_grad_f(float e_y, float r, float lse, float w_y, float one_m_eps,
                                float eps_c, float w_sum, float z, float gs)
    double xf_sparse_true_grad_d(double e_y, double r, double lse, double w_y,
                                 double one_m_eps, double eps_c, double w_sum, double z,
                                 double gs)
    float xf_dense_coef_f(float lse, float t_sum, float z)
    double xf_dense_coef_d(double lse, double t_sum, double z)
    float xf_grad_over_sum_f(float r, float gs)
    double xf_grad_over_sum_d(double r, double gs)
    # long rows: one pass over one row per call
    float xf_rowmax_f(const float *x, ptrdiff_t n)
    double xf_rowmax_d(const double *x, ptrdiff_t n)
    float xf_expsum_f(const float *x, ptrdiff_t n, float m, const float *pf, float *t)
    double xf_expsum_d(const double *x, ptrdiff_t n, double m, const double *pf, double *t)
    float xf_expsum_store_f(const float *x, float *e, ptrdiff_t n, float m, const float *pf,
                            float *t, int comp)
    double xf_expsum_store_d(const double *x, double *e, ptrdiff_t n, double m,
                             const double *pf, double *t, int comp)
    float xf_softmax_sum_f(const float *x, float *e, ptrdiff_t n, float m, const float *pf)
    double xf_softmax_sum_d(const double *x, double *e, ptrdiff_t n, double m,
                            const double *pf)
    float xf_wdist_f(const float *x, const float *w, ptrdiff_t n, float m)
    double xf_wdist_d(const double *x, const double *w, ptrdiff_t n, double m)
    void xf_dense_sums_f(const float *x, const float *t, const float *w, ptrdiff_t n,
                         float m, float keep, float add, float *wd, float *t_sum)
    void xf_dense_sums_d(const double *x, const double *t, const double *w, ptrdiff_t n,
                         double m, double keep, double add, double *wd, double *t_sum)
    void xf_scale_f(float *g, ptrdiff_t n, float a)
    void xf_scale_d(double *g, ptrdiff_t n, double a)
    void xf_scale_sub_f(float *g, const float *w, ptrdiff_t n, float a, float b)
    void xf_scale_sub_d(double *g, const double *w, ptrdiff_t n, double a, double b)
    void xf_dense_grad_row_f(float *g, const float *t, const float *w, ptrdiff_t n,
                             float r, float coef, float gs_over_s, float keep, float add)
    void xf_dense_grad_row_d(double *g, const double *t, const double *w, ptrdiff_t n,
                             double r, double coef, double gs_over_s, double keep,
                             double add)
    void xf_log_softmax_row_f(const float *x, float *out, ptrdiff_t n, float m, float log_s)
    void xf_log_softmax_row_d(const double *x, double *out, ptrdiff_t n, double m,
                              double log_s)
    # short rows: XF_TILE rows at a time, class-major tiles
    void xf_tile_load_f(const float *x, float *tile, ptrdiff_t rows, ptrdiff_t c)
    void xf_tile_load_d(const double *x, double *tile, ptrdiff_t rows, ptrdiff_t c)
    void xf_tile_max_f(const float *tile, ptrdiff_t c, float *m)
    void xf_tile_max_d(const double *tile, ptrdiff_t c, double *m)
    void xf_tile_expsum_f(float *tile, ptrdiff_t c, const float *m, float *u, float *t,
                          int comp)
    void xf_tile_expsum_d(double *tile, ptrdiff_t c, const double *m, double *u, double *t,
                          int comp)
    void xf_tile_softmax_f(float *tile, ptrdiff_t c, const float *m, float *inv)
    void xf_tile_softmax_d(double *tile, ptrdiff_t c, const double *m, double *inv)
    void xf_tile_wdist_f(const float *tile, const float *w, ptrdiff_t c, const float *m,
                         float *wd)
    void xf_tile_wdist_d(const double *tile, const double *w, ptrdiff_t c, const double *m,
                         double *wd)
    void xf_tile_dense_sums_f(const float *tx, const float *tt, const float *w, ptrdiff_t c,
                              const float *m, float keep, float add, float *wd, float *t_sum)
    void xf_tile_dense_sums_d(const double *tx, const double *tt, const double *w,
                              ptrdiff_t c, const double *m, double keep, double add,
                              double *wd, double *t_sum)
    void xf_tile_lse_f(const float *m, const float *u, const float *t, float *r,
                       float *log_s, float *lse)
    void xf_tile_lse_d(const double *m, const double *u, const double *t, double *r,
                       double *log_s, double *lse)
    void xf_tile_sparse_epilogue_f(const float *m, const float *u, const float *t,
                                   const float *x_y, const float *w_y, const float *e_y,
                                   const float *wd, float one_m_eps, float eps_c,
                                   float w_sum, float z, float gs, float *loss, float *lse,
                                   float *a, float *gy)
    void xf_tile_sparse_epilogue_d(const double *m, const double *u, const double *t,
                                   const double *x_y, const double *w_y, const double *e_y,
                                   const double *wd, double one_m_eps, double eps_c,
                                   double w_sum, double z, double gs, double *loss,
                                   double *lse, double *a, double *gy)
    void xf_tile_dense_epilogue_f(const float *m, const float *u, const float *t,
                                  const float *wd, const float *t_sum, float z, float gs,
                                  float *loss, float *lse, float *r, float *coef,
                                  float *gs_over_s)
    void xf_tile_dense_epilogue_d(const double *m, const double *u, const double *t,
                                  const double *wd, const double *t_sum, double z,
                                  double gs, double *loss, double *lse, double *r,
                                  double *coef, double *gs_over_s)
    void xf_tile_store_f(const float *tile, float *g, ptrdiff_t rows, ptrdiff_t c,
                         const float *a, float b, const float *w)
    void xf_tile_store_d(const double *tile, double *g, ptrdiff_t rows, ptrdiff_t c,
                         const double *a, double b, const double *w)
    void xf_tile_store_dense_f(const float *te, const float *tt, float *g, ptrdiff_t rows,
                               ptrdiff_t c, const float *r, const float *coef,
                               const float *gs_over_s, float keep, float add,
                               const float *w)
    void xf_tile_store_dense_d(const double *te, const double *tt, double *g,
                               ptrdiff_t rows, ptrdiff_t c, const double *r,
                               const double *coef, const double *gs_over_s, double keep,
                               double add, const double *w)
    void xf_rows_log_softmax_f(const float *x, float *out, ptrdiff_t rows, ptrdiff_t c,
                               const float *m, const float *log_s)
    void xf_rows_log_softmax_d(const double *x, double *out, ptrdiff_t rows, ptrdiff_t c,
                               const double *m, const double *log_s)


# Tunables: compile-time constants, not module globals (see NOTES_cython_kernels.md).
cdef enum:
    _PAR_MIN_ELEMS = 32768   # below this many elements one thread does the whole call
    # Prefetch the next long row during pass 2 only while this row, its gradient and the
    # next row fit a server-class L2 (1-2 MiB): measured at 128000 float32 classes
    # (512 KiB rows), prefetching gained 1.3x without a gradient and lost 1.1x with one.
    _PF_MAX_BYTES_LOSS = 1048576
    _PF_MAX_BYTES_GRAD = 262144

# Fork safety.  GNU OpenMP (libgomp) is not fork-safe: a child forked after the parent
# ran a parallel region -- here, or in the cpu backend, which uses the same runtime --
# deadlocks in its first parallel region (the team's threads do not exist in the
# child).  The shim registers ran_parallel / disable_threads with xentfast._forkguard,
# so such a child runs every kernel on its one thread instead.
cdef bint _threads_ok = True
cdef bint _ran_parallel = False


def ran_parallel():
    """True once this process ran a kernel on an OpenMP team."""
    return bool(_ran_parallel)


def disable_threads():
    """Run every later kernel on the calling thread (a forked child; _forkguard)."""
    global _threads_ok
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

cdef inline floating _log1p(floating r) noexcept nogil:
    # log s = log1p(r), one per long row: libm's (< 1 ulp).  Tiles use the vectorised
    # xf_log1pf_v on 16 rows at once (xf_tile_*_epilogue).
    if floating is float:
        return log1pf(r)
    else:
        return log1p(r)

# rowmath.py in C, per row of the long-row path (the tiles call them from C)
cdef inline floating _rest_mass(floating u, floating t) noexcept nogil:
    if floating is float:
        return xf_rest_mass_f(u, t)
    else:
        return xf_rest_mass_d(u, t)

cdef inline floating _log_sum_exp(floating m, floating log_s) noexcept nogil:
    if floating is float:
        return xf_log_sum_exp_f(m, log_s)
    else:
        return xf_log_sum_exp_d(m, log_s)

cdef inline floating _sparse_loss(floating m, floating log_s, floating x_y, floating w_y,
                                  floating one_m_eps, floating eps_c, floating w_sum,
                                  floating wd, floating z) noexcept nogil:
    if floating is float:
        return xf_sparse_loss_f(m, log_s, x_y, w_y, one_m_eps, eps_c, w_sum, wd, z)
    else:
        return xf_sparse_loss_d(m, log_s, x_y, w_y, one_m_eps, eps_c, w_sum, wd, z)

cdef inline floating _dense_loss(floating m, floating log_s, floating t_sum, floating wd,
                                 floating z) noexcept nogil:
    if floating is float:
        return xf_dense_loss_f(m, log_s, t_sum, wd, z)
    else:
        return xf_dense_loss_d(m, log_s, t_sum, wd, z)

cdef inline floating _sparse_scale(floating r, floating lse, floating w_y,
                                   floating one_m_eps, floating eps_c, floating w_sum,
                                   floating z, floating gs) noexcept nogil:
    if floating is float:
        return xf_sparse_scale_f(r, lse, w_y, one_m_eps, eps_c, w_sum, z, gs)
    else:
        return xf_sparse_scale_d(r, lse, w_y, one_m_eps, eps_c, w_sum, z, gs)

cdef inline floating _sparse_true_grad(floating e_y, floating r, floating lse, floating w_y,
                                       floating one_m_eps, floating eps_c, floating w_sum,
                                       floating z, floating gs) noexcept nogil:
    if floating is float:
        return xf_sparse_true_grad_f(e_y, r, lse, w_y, one_m_eps, eps_c, w_sum, z, gs)
    else:
        return xf_sparse_true_grad_d(e_y, r, lse, w_y, one_m_eps, eps_c, w_sum, z, gs)

cdef inline floating _dense_coef(floating lse, floating t_sum, floating z) noexcept nogil:
    if floating is float:
        return xf_dense_coef_f(lse, t_sum, z)
    else:
        return xf_dense_coef_d(lse, t_sum, z)

cdef inline floating _grad_over_sum(floating r, floating gs) noexcept nogil:
    if floating is float:
        return xf_grad_over_sum_f(r, gs)
    else:
        return xf_grad_over_sum_d(r, gs)

# the row passes
cdef inline floating _rowmax(const floating *x, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return xf_rowmax_f(x, n)
    else:
        return xf_rowmax_d(x, n)

cdef inline floating _expsum(const floating *x, Py_ssize_t n, floating m,
                             const floating *pf, floating *t) noexcept nogil:
    if floating is float:
        return xf_expsum_f(x, n, m, pf, t)
    else:
        return xf_expsum_d(x, n, m, pf, t)

cdef inline floating _expsum_store(const floating *x, floating *e, Py_ssize_t n,
                                   floating m, const floating *pf, floating *t,
                                   int comp) noexcept nogil:
    if floating is float:
        return xf_expsum_store_f(x, e, n, m, pf, t, comp)
    else:
        return xf_expsum_store_d(x, e, n, m, pf, t, comp)

cdef inline floating _softmax_sum(const floating *x, floating *e, Py_ssize_t n, floating m,
                                  const floating *pf) noexcept nogil:
    if floating is float:
        return xf_softmax_sum_f(x, e, n, m, pf)
    else:
        return xf_softmax_sum_d(x, e, n, m, pf)

cdef inline floating _wdist(const floating *x, const floating *w, Py_ssize_t n,
                            floating m) noexcept nogil:
    if floating is float:
        return xf_wdist_f(x, w, n, m)
    else:
        return xf_wdist_d(x, w, n, m)

cdef inline void _dense_sums(const floating *x, const floating *t, const floating *w,
                             Py_ssize_t n, floating m, floating keep, floating add,
                             floating *wd, floating *t_sum) noexcept nogil:
    if floating is float:
        xf_dense_sums_f(x, t, w, n, m, keep, add, wd, t_sum)
    else:
        xf_dense_sums_d(x, t, w, n, m, keep, add, wd, t_sum)

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

cdef inline void _dense_grad_row(floating *g, const floating *t, const floating *w,
                                 Py_ssize_t n, floating r, floating coef,
                                 floating gs_over_s, floating keep,
                                 floating add) noexcept nogil:
    if floating is float:
        xf_dense_grad_row_f(g, t, w, n, r, coef, gs_over_s, keep, add)
    else:
        xf_dense_grad_row_d(g, t, w, n, r, coef, gs_over_s, keep, add)

cdef inline void _log_softmax_row(const floating *x, floating *out, Py_ssize_t n,
                                  floating m, floating log_s) noexcept nogil:
    if floating is float:
        xf_log_softmax_row_f(x, out, n, m, log_s)
    else:
        xf_log_softmax_row_d(x, out, n, m, log_s)

# the tiles
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
                              floating *u, floating *t, int comp) noexcept nogil:
    if floating is float:
        xf_tile_expsum_f(tile, c, m, u, t, comp)
    else:
        xf_tile_expsum_d(tile, c, m, u, t, comp)

cdef inline void _tile_softmax(floating *tile, Py_ssize_t c, const floating *m,
                               floating *inv) noexcept nogil:
    if floating is float:
        xf_tile_softmax_f(tile, c, m, inv)
    else:
        xf_tile_softmax_d(tile, c, m, inv)

cdef inline void _tile_wdist(const floating *tile, const floating *w, Py_ssize_t c,
                             const floating *m, floating *wd) noexcept nogil:
    if floating is float:
        xf_tile_wdist_f(tile, w, c, m, wd)
    else:
        xf_tile_wdist_d(tile, w, c, m, wd)

cdef inline void _tile_dense_sums(const floating *tx, const floating *tt, const floating *w,
                                  Py_ssize_t c, const floating *m, floating keep,
                                  floating add, floating *wd,
                                  floating *t_sum) noexcept nogil:
    if floating is float:
        xf_tile_dense_sums_f(tx, tt, w, c, m, keep, add, wd, t_sum)
    else:
        xf_tile_dense_sums_d(tx, tt, w, c, m, keep, add, wd, t_sum)

cdef inline void _tile_lse(const floating *m, const floating *u, const floating *t,
                           floating *r, floating *log_s, floating *lse) noexcept nogil:
    if floating is float:
        xf_tile_lse_f(m, u, t, r, log_s, lse)
    else:
        xf_tile_lse_d(m, u, t, r, log_s, lse)

cdef inline void _tile_sparse_epilogue(const floating *m, const floating *u,
                                       const floating *t, const floating *x_y,
                                       const floating *w_y, const floating *e_y,
                                       const floating *wd, floating one_m_eps,
                                       floating eps_c, floating w_sum, floating z,
                                       floating gs, floating *loss, floating *lse,
                                       floating *a, floating *gy) noexcept nogil:
    if floating is float:
        xf_tile_sparse_epilogue_f(m, u, t, x_y, w_y, e_y, wd, one_m_eps, eps_c, w_sum, z,
                                  gs, loss, lse, a, gy)
    else:
        xf_tile_sparse_epilogue_d(m, u, t, x_y, w_y, e_y, wd, one_m_eps, eps_c, w_sum, z,
                                  gs, loss, lse, a, gy)

cdef inline void _tile_dense_epilogue(const floating *m, const floating *u,
                                      const floating *t, const floating *wd,
                                      const floating *t_sum, floating z, floating gs,
                                      floating *loss, floating *lse, floating *r,
                                      floating *coef, floating *gs_over_s) noexcept nogil:
    if floating is float:
        xf_tile_dense_epilogue_f(m, u, t, wd, t_sum, z, gs, loss, lse, r, coef, gs_over_s)
    else:
        xf_tile_dense_epilogue_d(m, u, t, wd, t_sum, z, gs, loss, lse, r, coef, gs_over_s)

cdef inline void _tile_store(const floating *tile, floating *g, Py_ssize_t rows, Py_ssize_t c,
                             const floating *a, floating b, const floating *w) noexcept nogil:
    if floating is float:
        xf_tile_store_f(tile, g, rows, c, a, b, w)
    else:
        xf_tile_store_d(tile, g, rows, c, a, b, w)

cdef inline void _tile_store_dense(const floating *te, const floating *tt, floating *g,
                                   Py_ssize_t rows, Py_ssize_t c, const floating *r,
                                   const floating *coef, const floating *gs_over_s,
                                   floating keep, floating add,
                                   const floating *w) noexcept nogil:
    if floating is float:
        xf_tile_store_dense_f(te, tt, g, rows, c, r, coef, gs_over_s, keep, add, w)
    else:
        xf_tile_store_dense_d(te, tt, g, rows, c, r, coef, gs_over_s, keep, add, w)

cdef inline void _rows_log_softmax(const floating *x, floating *out, Py_ssize_t rows,
                                   Py_ssize_t c, const floating *m,
                                   const floating *log_s) noexcept nogil:
    if floating is float:
        xf_rows_log_softmax_f(x, out, rows, c, m, log_s)
    else:
        xf_rows_log_softmax_d(x, out, rows, c, m, log_s)


cdef inline int _comp_grad(const floating *x) noexcept nogil:
    """Whether the gradient passes store the compensated e_j = exp(x_j - m) (xf_exp_diff,
    _fastexp.h): for float64, where the rounding of x_j - m alone would cost up to
    |x_j - m| / 2 ulps (350 at a spread of 700) against the 64 allowed; not for float32,
    whose spread ends at 87 (<= 44 + 2 ulps) and whose speed is the one benchmarked.
    softmax stores the compensated e_j at every precision (4 ulps allowed)."""
    if floating is double:
        return 1
    else:
        return 0


cdef inline Py_ssize_t _rows_per_block(Py_ssize_t c) noexcept nogil:
    """1 for long rows (one row per prange iteration), a tile of XF_TILE for short."""
    return XF_TILE if c <= XF_SMALL_C else 1


cdef inline void _zero_row(floating *g, Py_ssize_t c) noexcept nogil:
    memset(g, 0, <size_t>c * sizeof(floating))


# =====================================================================================
# Index labels
# =====================================================================================
#
# The mathematics (rowmath.py has the derivations; the C functions named below are its
# formulas), for one kept row with label y, class weights w (w = 1 without weights),
# smoothing eps (eps_c = eps / C), z-loss z, gradient scale gs:
#
#   1. m = max_j x_j;  u, t = the sums of e_j = exp(x_j - m) below the max and at it;
#      r = u + (t - 1) (xf_rest_mass: the mass of all classes but one maximum, s = 1 + r);
#      log s = log1p(r);  lse = m + log s (xf_log_sum_exp).
#      Every exponent is <= 0 (no overflow) and the largest term is exactly 1, so
#      r >= 0 and log s >= 0; r stays exact to a few ulps even when it is 1e-17, where
#      s = 1 + r would round it away (a confident row's loss is log1p(r)).
#   2. loss = (1 - eps) w_y ((m - x_y) + log s) + eps_c (W log s + wd) + z lse^2
#      (xf_sparse_loss), wd = sum_{w_c != 0} w_c (m - x_c) >= 0 (pass 1b), W = sum_c w_c.
#      Every lse - x_c is (m - x_c) + log s, a sum of two terms >= 0, never
#      (m + log s) - x_c: no cancellation, rows such as [1e30, 1e30, 0] give log 2, and
#      no W lse - sum_c w_c x_c (which cancels catastrophically for |x| ~ 1e30).
#   3. d loss / d x_j = p_j A - (1 - eps) w_y [j == y] - eps_c w_j,
#          A = (1 - eps) w_y + eps W / C + 2 z lse,  p_j = e_j / s.
#      Pass 3 turns every e_j into g_j = e_j a - b w_j, a = A gs / s (xf_sparse_scale),
#      b = gs eps_c; then g_y is recomputed from e_y (read before pass 3) by
#      xf_sparse_true_grad, which forms p_y - 1 as -((1 - e_y) + r) / s: exact when y
#      is the max (1 - e_y = 0), e.g. -5.55e-17 for float64 [37.43, 0], not 0.
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
    cdef floating m, u, t, rm, ls, l_se, xy, wy, wd, ey
    cdef floating keep = 1 - eps
    cdef floating eps_c = eps / c
    cdef floating w_sum = Wsum if eps != 0 else 0      # rowmath: 0 without smoothing
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
        m = _rowmax(x, c)                              # pass 1
        if y == ignore:
            u = _expsum(x, c, m, pf, &t)               # pass 2, loss-only
            lse[r] = _log_sum_exp(m, _log1p(_rest_mass(u, t)))
            loss[r] = 0
            if G != NULL:
                _zero_row(G + r * c, c)
            continue
        xy = x[y]                                      # read before x may be overwritten
        wd = 0
        if eps != 0:
            wd = _wdist(x, W, c, m)                    # pass 1b
        if G != NULL:
            g = G + r * c
            u = _expsum_store(x, g, c, m, pf, &t, _comp_grad(X))  # pass 2: g_j = e_j
        else:
            u = _expsum(x, c, m, pf, &t)               # pass 2
        rm = _rest_mass(u, t)
        ls = _log1p(rm)
        l_se = _log_sum_exp(m, ls)
        lse[r] = l_se
        wy = W[y] if W != NULL else 1
        loss[r] = _sparse_loss(m, ls, xy, wy, keep, eps_c, w_sum, wd, z)
        if G != NULL:                                  # pass 3
            ey = g[y]
            if eps != 0:
                _scale_sub(g, W, c, _sparse_scale(rm, l_se, wy, keep, eps_c, w_sum, z, sc),
                           sc * eps_c)
            else:
                _scale(g, c, _sparse_scale(rm, l_se, wy, keep, eps_c, w_sum, z, sc))
            g[y] = _sparse_true_grad(ey, rm, l_se, wy, keep, eps_c, w_sum, z, sc)
    return bad


cdef Py_ssize_t _sparse_tile(const floating *X, floating *G, Py_ssize_t c,
                             const char *lab, Py_ssize_t lab_stride, int64_t ignore,
                             const floating *W, floating Wsum, floating eps, floating z,
                             floating sc, floating *loss, floating *lse,
                             Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """Short rows r0..r1 (at most XF_TILE of them): the same steps as _sparse_rows,
    run on a class-major tile, one SIMD lane per row (see _xfrows_tmpl.h); the
    epilogue of all 16 rows is one vectorised call of the same rowmath formulas."""
    cdef floating tile[XF_SMALL_C * XF_TILE]
    cdef floating mv[XF_TILE]
    cdef floating uv[XF_TILE]
    cdef floating tv[XF_TILE]
    cdef floating wdv[XF_TILE]
    cdef floating xyv[XF_TILE]
    cdef floating wyv[XF_TILE]
    cdef floating eyv[XF_TILE]
    cdef floating lossv[XF_TILE]
    cdef floating lsev[XF_TILE]
    cdef floating av[XF_TILE]
    cdef floating gyv[XF_TILE]
    cdef int64_t yv[XF_TILE]              # the label, or -1 ignored, -2 out of range
    cdef const floating *wdp = NULL       # wd, with smoothing only
    cdef Py_ssize_t i, nr = r1 - r0, bad = 0
    cdef int64_t y
    cdef floating keep = 1 - eps
    cdef floating eps_c = eps / c
    _tile_load(X + r0 * c, tile, nr, c)
    _tile_max(tile, c, mv)                             # pass 1
    if eps != 0:
        _tile_wdist(tile, W, c, mv, wdv)               # pass 1b
    for i in range(XF_TILE):                           # labels and x_y, before pass 3
        xyv[i] = 0
        wyv[i] = 1
        yv[i] = -1
        if i >= nr:
            continue
        y = (<const int64_t *>(lab + (r0 + i) * lab_stride))[0]
        if y == ignore:
            continue
        elif y < 0 or y >= c:                          # never index with it
            yv[i] = -2
            bad += 1
        else:
            yv[i] = y
            xyv[i] = X[(r0 + i) * c + y]               # x_y (X may become G in pass 3)
            if W != NULL:
                wyv[i] = W[y]
    _tile_expsum(tile, c, mv, uv, tv, _comp_grad(X) if G != NULL else 0)
    if eps != 0:
        wdp = wdv
    if G != NULL:
        for i in range(XF_TILE):
            eyv[i] = tile[yv[i] * XF_TILE + i] if yv[i] >= 0 else 0
        _tile_sparse_epilogue(mv, uv, tv, xyv, wyv, eyv, wdp, keep, eps_c, Wsum, z, sc,
                              lossv, lsev, av, gyv)
    else:
        _tile_sparse_epilogue(mv, uv, tv, xyv, wyv, eyv, wdp, keep, eps_c, Wsum, z, sc,
                              lossv, lsev, <floating *>NULL, <floating *>NULL)
    for i in range(nr):                                # ignored / bad rows; a = 0 there
        y = yv[i]
        if y >= 0:
            loss[r0 + i] = lossv[i]
            lse[r0 + i] = lsev[i]
        else:
            loss[r0 + i] = NAN if y == -2 else 0
            lse[r0 + i] = NAN if y == -2 else lsev[i]
            av[i] = 0
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
# rowmath.py's dense forms, with t'_c = (1 - eps) t_c + eps / C and wt_c = w_c t'_c:
#   loss = sum_c wt_c (lse - x_c) + z lse^2 = T log s + wd + z lse^2  (xf_dense_loss),
#          wd = sum_{wt_c != 0} wt_c (m - x_c),  T = sum_c wt_c
#   (lse - x_c = (m - x_c) + log s as for index labels: no cancellation; a class with
#   wt_c = 0 adds nothing, even at x_c = -inf: a masked logit is not 0 * inf = NaN);
#   d loss / d x_j = p_j A - wt_j,  A = T + 2 z lse (xf_dense_coef), and
#   g_j = ((e_j A - wt_j) - wt_j r) gs / s  (xf_dense_grad): e_j A - wt_j s with
#   s = 1 + r split so that r is not rounded into s -- a one-hot row at its maximum
#   gives -wt_j r gs / s (-5.55e-17 for float64 [37.43, 0] on class 0), not 0.
# wd and T are taken in pass 1b (before x may be overwritten); pass 3 re-reads t.

cdef void _dense_tile(const floating *X, const floating *T, floating *G, Py_ssize_t c,
                      const floating *W, floating eps, floating z, floating sc,
                      floating *loss, floating *lse, Py_ssize_t r0,
                      Py_ssize_t r1) noexcept nogil:
    """Short rows r0..r1 (at most XF_TILE) of the dense kernel, on class-major tiles."""
    cdef floating tx[XF_SMALL_C * XF_TILE]
    cdef floating tt[XF_SMALL_C * XF_TILE]
    cdef floating mv[XF_TILE]
    cdef floating uv[XF_TILE]
    cdef floating tv[XF_TILE]
    cdef floating wdv[XF_TILE]
    cdef floating tsv[XF_TILE]
    cdef floating lossv[XF_TILE]
    cdef floating lsev[XF_TILE]
    cdef floating rv[XF_TILE]
    cdef floating coefv[XF_TILE]
    cdef floating qv[XF_TILE]
    cdef Py_ssize_t i, nr = r1 - r0
    cdef floating keep = 1 - eps
    cdef floating add = eps / c
    _tile_load(X + r0 * c, tx, nr, c)
    _tile_load(T + r0 * c, tt, nr, c)
    _tile_max(tx, c, mv)                                       # pass 1
    _tile_dense_sums(tx, tt, W, c, mv, keep, add, wdv, tsv)    # pass 1b
    _tile_expsum(tx, c, mv, uv, tv, _comp_grad(X) if G != NULL else 0)
    if G != NULL:
        _tile_dense_epilogue(mv, uv, tv, wdv, tsv, z, sc, lossv, lsev, rv, coefv, qv)
    else:
        _tile_dense_epilogue(mv, uv, tv, wdv, tsv, z, sc, lossv, lsev, rv,
                             <floating *>NULL, <floating *>NULL)
    for i in range(nr):
        loss[r0 + i] = lossv[i]
        lse[r0 + i] = lsev[i]
    if G != NULL:                                              # pass 3, row-major
        _tile_store_dense(tx, tt, G + r0 * c, nr, c, rv, coefv, qv, keep, add, W)


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
    cdef floating m, u, t, rm, ls, l_se, wd, t_sum
    cdef floating keep = 1 - eps
    cdef floating add = eps / c
    for r in range(r0, r1):
        x = X + r * c
        pf = x + c if (pf_on and r + 1 < n) else NULL
        m = _rowmax(x, c)                                      # pass 1
        _dense_sums(x, T + r * c, W, c, m, keep, add, &wd, &t_sum)   # pass 1b
        if G != NULL:
            g = G + r * c
            u = _expsum_store(x, g, c, m, pf, &t, _comp_grad(X))  # pass 2
        else:
            u = _expsum(x, c, m, pf, &t)
        rm = _rest_mass(u, t)
        ls = _log1p(rm)
        l_se = _log_sum_exp(m, ls)
        lse[r] = l_se
        loss[r] = _dense_loss(m, ls, t_sum, wd, z)
        if G != NULL:                                          # pass 3
            _dense_grad_row(g, T + r * c, W, c, rm, _dense_coef(l_se, t_sum, z),
                            _grad_over_sum(rm, sc), keep, add)


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
# Primitives: logsumexp (n,), log_softmax and softmax (n, c); step 1 of the contract.
# lse = m + log1p(r);  log_softmax_j = (x_j - m) - log s (xf_log_softmax: two terms
# <= 0, no cancellation against a large m);  softmax_j = e_j (1 / s) with the 4-ulp
# budget kept by three refinements of the same formula (xf_softmax_sum / xf_tile_softmax,
# _xfrows_tmpl.h): e_j compensated for the rounding of x_j - m, u summed with TwoSum
# compensation, and 1 / (1 + r) rounded once.  out may be x itself for log_softmax and
# softmax (element j is read, then written).
# =====================================================================================

cdef enum:
    _K_LSE = 0
    _K_LOG_SOFTMAX = 1
    _K_SOFTMAX = 2

cdef void _prim_tile(int kind, const floating *X, floating *O, Py_ssize_t c,
                     Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef floating tile[XF_SMALL_C * XF_TILE]
    cdef floating mv[XF_TILE]
    cdef floating uv[XF_TILE]
    cdef floating tv[XF_TILE]
    cdef floating rv[XF_TILE]
    cdef floating lsv[XF_TILE]
    cdef floating lsev[XF_TILE]
    cdef Py_ssize_t i, nr = r1 - r0
    _tile_load(X + r0 * c, tile, nr, c)
    _tile_max(tile, c, mv)
    if kind == _K_SOFTMAX:                     # e_j (1 / s), 1 / s from a compensated sum
        _tile_softmax(tile, c, mv, rv)
        _tile_store(tile, O + r0 * c, nr, c, rv, 0, <const floating *>NULL)
        return
    _tile_expsum(tile, c, mv, uv, tv, 0)
    _tile_lse(mv, uv, tv, rv, lsv, lsev)
    if kind == _K_LSE:
        for i in range(nr):
            O[r0 + i] = lsev[i]
    else:
        _rows_log_softmax(X + r0 * c, O + r0 * c, nr, c, mv, lsv)


cdef void _prim_rows(int kind, const floating *X, floating *O, Py_ssize_t c,
                     Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t r
    cdef const floating *x
    cdef const floating *pf
    cdef bint pf_on = <size_t>c * sizeof(floating) <= (
        <size_t>_PF_MAX_BYTES_GRAD if kind == _K_SOFTMAX else <size_t>_PF_MAX_BYTES_LOSS)
    cdef floating m, u, t, ls
    for r in range(r0, r1):
        x = X + r * c
        pf = x + c if (pf_on and r + 1 < n) else NULL
        m = _rowmax(x, c)
        if kind == _K_SOFTMAX:
            _scale(O + r * c, c, _softmax_sum(x, O + r * c, c, m, pf))
        else:
            u = _expsum(x, c, m, pf, &t)
            ls = _log1p(_rest_mass(u, t))
            if kind == _K_LSE:
                O[r] = _log_sum_exp(m, ls)
            else:
                _log_softmax_row(x, O + r * c, c, m, ls)


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
