"""The per-row scalar mathematics of every backend, written once.

These are plain functions of arithmetic only -- no branches, no literals, no library
calls -- so that the same source serves three compilers unchanged:

* the NumPy reference (``numpy_ref``) calls them on whole (n,) or (n, c) arrays;
* Numba compiles them for the CPU (``numba_cpu``: strict IEEE flags, inlined into the
  kernels) and for CUDA (``_cuda_kernels``: device functions);
* the C kernels of the Cython backend (``_xfrows_tmpl.h``, ``_cython.pyx``) follow the
  same formulas under the same names.

A branch would not vectorise over NumPy arrays, and a literal like ``1`` or ``2`` would
make Numba promote a float32 computation to float64; so the value one comes in as the
argument ``one`` (of the accumulation dtype) and ``2 z`` is written ``z + z``.  The
functions call no other function (Numba and CUDA compile each one on its own), so a
shared subexpression such as lse = m + log s is spelled out where it is used.

The row passes and the quantities they hand over
------------------------------------------------
For one row x_0 .. x_{C-1} (accumulation dtype: float32 for 16/32-bit logits, float64
for float64) the SIMD passes compute

    m  = max_j x_j                                  (NaN ignored by the max itself)
    e_j = exp(x_j - m)                              (e_j = 1 exactly where x_j = m;
                                                    softmax's and float64 gradients'
                                                    e_j are corrected for the rounding
                                                    of x_j - m: exp(d) (1 + err))
    u  = sum_{j: x_j - m != 0} e_j                  the terms off the max; a NaN, a
                                                    +inf (inf - inf) or an all -inf row
                                                    (-inf - -inf) makes u NaN
    t  = #{j: x_j - m == 0}                         the ties at the max (1 for a unique
                                                    maximum)

and the row's scalars follow from them:

    r     = rest_mass(u, t)  = u + (t - 1)      the mass of every class but ONE maximum:
                                                s = sum_j e_j = 1 + r.
    log s = log1p(r)                            (each backend's accurate log1p)
    lse   = m + log s.

Why r and not s.  In a confident row (the regime training spends its time in) the
maximum's term is exactly 1 and all others are tiny: s = 1 + r rounds r to a multiple
of the unit roundoff, and log(s) returns 0 for a loss of 1e-8 (float32) or 1e-17
(float64).  Summing the terms below the max apart from the ties keeps r exact to a few
ulps, and log1p(r) keeps it.  t is a small integer: t - 1 is exact, so r = u exactly
when the maximum is unique.  (A tie count costs one compare and one masked add per
element, the cheapest form LLVM still vectorises; summing e_j of the ties instead,
which would also carry NaN, measured the same.)

The non-cancelling forms (every subtraction below is of quantities of one sign, or a
genuine zero crossing of the exact result)
-------------------------------------------------------------------------------
* Sparse label y, class weights w (ones without), smoothing eps, z-loss z:
      loss = (1 - eps) w_y (lse - x_y) + (eps/C) sum_c w_c (lse - x_c) + z lse^2
  with lse - x_y   = (m - x_y) + log s                     (both terms >= 0), and
       sum_c w_c (lse - x_c) = W log s + wd,  W = sum_c w_c,  wd = sum_{w_c != 0}
       w_c (m - x_c)   (never W lse - sum w x, which cancels).
  Gradient (times grad_scale gs): g_j = p_j A - (1 - eps) w_y [j == y] - (eps/C) w_j,
  A = (1 - eps) w_y + eps W / C + 2 z lse, p_j = e_j / s.  For j != y: e_j a - b_j with
  a = A gs / s and b_j = (eps/C) w_j gs.  For j = y, p_y - 1 cancels; it is
      p_y - 1 = -(sum_{j != y} e_j) / s = -((1 - e_y) + r) / s
  exactly (s - e_y = 1 + r - e_y; when y is a maximum 1 - e_y = 0 exactly and the
  result is r / s to the last bits), so
      g_y = gs (p_y (eps W/C + 2 z lse) - ((1 - eps) w_y ((1 - e_y) + r) / s
                                           + (eps/C) w_y)).
* Probability labels t (smoothed and weighted wt_c = w_c ((1 - eps) t_c + eps/C)):
      loss = sum_c wt_c (lse - x_c) + z lse^2 = T log s + wd + z lse^2,
      T = sum_c wt_c,  wd = sum_{wt_c != 0} wt_c (m - x_c);
      g_j = gs (p_j A - wt_j),  A = T + 2 z lse.
  T is summed in two parts, as u and t: T_tie = sum_{x_c = m} wt_c (the label mass on
  the ties at the max) and T_off = T - T_tie (the rest), and with s = 1 + r
      g_j s / gs = e_j A - wt_j s
                 = (e_j (T_off + 2 z lse) + (e_j T_tie - wt_j)) - wt_j r.
  At a maximum e_j = 1 exactly, and for a unique one T_tie = wt_j: the middle term is
  exactly 0 and g_j = ((T_off + 2 z lse) - wt_j r) gs / s.  That is the gradient of a
  confident row's smoothed true class, p_y T - wt_y ~ eps (1 - 1/C), against terms
  near 1: formed from T_off, which is of its own size, it keeps its precision; from the
  rounded T (T - wt_y) it inherited T's rounding, an ulp of 1 (75 ulps of the element
  at eps = 0.1 and C = 32, thousands at eps = 0.001).  Off the maximum nothing cancels
  but at a genuine zero crossing p_j T = wt_j.  (r is not rounded into s: a one-hot row
  at its maximum gives -wt_j r gs / s, not the difference of two numbers near wt_j.)
* log_softmax_j = (x_j - m) - log s  (two terms <= 0), softmax_j = e_j / s.

These forms must not be rewritten by a compiler: with ``reassoc`` LLVM may turn
(1 - e_y) + r back into s - e_y, or (m - x_y) + log s into lse - x_y.  So the Numba
backends compile these functions with strict IEEE semantics (reassociation is allowed
only inside the SIMD reduction loops), and ``tests/test_accuracy.py`` pins the forms:
logits [1e30, 1e30, 0] with label 0 must give log 2 on every backend.
"""

from __future__ import annotations


def rest_mass(u, t, one):
    """r = sum of e_j over every class but one maximum = u + (t - 1) (t - 1 exact)."""
    return u + (t - one)


def log_sum_exp(m, log_s):
    """lse = m + log s, log s = log1p(r)."""
    return m + log_s


def sparse_loss(m, log_s, x_y, w_y, one_m_eps, eps_c, w_sum, wd, z):
    """Loss of a kept row with index label y:
    (1-eps) w_y ((m - x_y) + log s) + (eps/C) (W log s + wd) + z lse^2, lse = m + log s.
    Without smoothing pass eps_c = w_sum = wd = 0."""
    return (one_m_eps * w_y * ((m - x_y) + log_s)
            + eps_c * (w_sum * log_s + wd)
            + (z * (m + log_s)) * (m + log_s))


def dense_loss(m, log_s, t_sum, wd, z):
    """Loss of a row with probability labels: T log s + wd + z lse^2."""
    return (t_sum * log_s + wd) + (z * (m + log_s)) * (m + log_s)


def sparse_scale(one, r, lse, w_y, one_m_eps, eps_c, w_sum, z, gs):
    """a of g_j = e_j a - b_j (j != y): a = A gs / s, s = 1 + r,
    A = (1-eps) w_y + eps W/C + 2 z lse."""
    return ((one_m_eps * w_y + (eps_c * w_sum + (z + z) * lse)) * gs) / (one + r)


def sparse_true_grad(one, e_y, r, lse, w_y, one_m_eps, eps_c, w_sum, z, gs):
    """g_y = gs (p_y (eps W/C + 2 z lse) - ((1-eps) w_y ((1 - e_y) + r)/s + (eps/C) w_y)),
    the true-class gradient without the cancelling p_y - 1."""
    return gs * ((e_y / (one + r)) * (eps_c * w_sum + (z + z) * lse)
                 - ((one_m_eps * w_y) * (((one - e_y) + r) / (one + r)) + eps_c * w_y))


def smoothed_weight(w, t, one_m_eps, eps_c):
    """wt_c = w_c ((1 - eps) t_c + eps/C): a probability label smoothed and weighted."""
    return w * (one_m_eps * t + eps_c)


def dense_coef(lse, t_off, z):
    """T_off + 2 z lse: the probability-label gradient's coefficient of e_j, without the
    label mass on the ties at the max (dense_grad adds e_j T_tie apart)."""
    return t_off + (z + z) * lse


def grad_over_sum(one, r, gs):
    """gs / s, s = 1 + r: the factor of dense_grad."""
    return gs / (one + r)


def dense_grad(e, wt, r, coef, t_tie, gs_over_s):
    """g_j = ((e_j coef + (e_j T_tie - wt_j)) - wt_j r) gs / s = gs (p_j A - wt_j),
    coef = dense_coef(lse, T_off, z), gs_over_s = gs / (1 + r)."""
    return ((e * coef + (e * t_tie - wt)) - wt * r) * gs_over_s


def log_softmax(x, m, log_s):
    """log p_j = (x_j - m) - log s."""
    return (x - m) - log_s


def softmax(e, one, r):
    """p_j = e_j / s, s = 1 + r (a division, not e_j (1/s): one rounding fewer)."""
    return e / (one + r)
