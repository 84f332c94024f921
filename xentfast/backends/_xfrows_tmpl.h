/*
 * _xfrows_tmpl.h -- the vectorised row passes of xentfast's Cython backend, written
 * once for a generic element type, and the per-row scalar maths of rowmath.py in C.
 * Do not include directly: _xfrows.h includes it twice, with
 *     XF_T    element type (float | double), also the accumulation type
 *     XF_L    number of accumulator lanes (16 for float, 8 for double)
 *     XF_SUF  name suffix (_f | _d)
 *     XF_EXP_XM, XF_EXP_DIFF_S  the exp of _fastexp.h for XF_T of x - m (the rounding
 *             of d = x - m compensated: XF_EXP_XM in the reduced argument, with a zero
 *             select; XF_EXP_DIFF_S fully) as e 2^S before its last, exact multiply:
 *             the terms pass 2 sums; XF_EXP_UNSCALE = 2^-S (S = 64 | 512; see
 *             xf_expf_red64_)
 *     XF_LOG1P  an accurate log1p for XF_T usable in a vector loop (xf_log1pf_v | log1p)
 *     XF_KEY, XF_KEY_OF, XF_FROM_KEY  the ordered-integer view used by xfi_rowmax
 *
 * Vocabulary (rowmath.py's docstring has the derivations): for a row x_0 .. x_{C-1}
 *     m = max_j x_j,   e_j = exp(x_j - m)                  (e_j = 1 where x_j = m)
 *     u = sum_{x_j - m != 0} e_j   the terms off the max (NaN for a NaN, a +inf or an
 *                                  all -inf row: x_j - m is NaN there)
 *     t = #{j: x_j - m == 0}       the ties at the max (1 for a unique maximum)
 *     r = u + (t - 1)              the mass of every class but one maximum, s = 1 + r
 *     log s = log1p(r),  lse = m + log s.
 * Pass 2 returns u and t from separate lane accumulators, so that a confident row's
 * tiny r is not rounded into s = 1 + r before the log.
 *
 * Lanes, and why every sum has a fixed order.
 *   Each reduction keeps XF_L independent partial results acc[0..L-1]: element i of a
 *   row goes to lane i mod L, and the lanes are folded by a fixed halving tree
 *   (acc[j] += acc[j + h], h = L/2, L/4, ..., 1).  The inner "for j < L" loops are
 *   element-wise, which the compiler vectorises at any width (4 floats with SSE2, 8 with
 *   AVX2, 16 with AVX-512) WITHOUT reassociating anything -- so every code path and every
 *   thread count produces the same bits.  (A plain "s += v" loop is not vectorised at all
 *   without -ffast-math, because reordering a float sum changes its value.)
 *   The last n mod L elements are done by one more full vector step over the window
 *   x[n-L .. n) with the lanes already counted masked out of the sum (see "Tails"
 *   below), so there is no scalar exp loop of up to L-1 iterations.  Maxima need no
 *   lanes: max is exact in any order (xfi_rowmax).
 *
 * Blocks: no drift on long rows.  A lane that adds C/L terms one after the other
 *   accumulates O(C/L) rounding errors: in float32 at 64M classes lse was 126 ulps off,
 *   at 550M classes s was 7.6% off (the lane sums stop growing once a term is below
 *   half an ulp of them).  So every long-row sum (pass 2, the option sums) runs in
 *   blocks of XF_BLK elements (64 steps of L lanes: 1024 floats, 512
 *   doubles): each block sums into fresh XF_T lanes, which are then added into
 *   double-precision lane totals (one convert-and-add per lane per block; float64
 *   totals carry their rounding errors, see xfi_dfold_).  Pass 2, whose sum is the lse,
 *   keeps four such sets of lanes, step k of a block into set k mod 4, so a lane rounds
 *   over at most 16 terms: with one set of 64 a lane of equal terms drifted by up to 13
 *   ulps of a row's lse (float32, m = 0, 1000 classes at -86; 86 ulps in float64 at
 *   300,000 classes with plain totals), now within 1.8 (float32) and 3.1 (float64), at
 *   the same speed (four independent add chains).  The option sums (loss only, 32 ulps)
 *   keep one set.
 *   Block boundaries are fixed offsets from the row start and the tail step lands in
 *   the last block: still one fixed order.  The totals are folded by the same tree and
 *   rounded once to XF_T.  Short rows (tiles, <= XF_SMALL_C terms) need no blocks.
 *
 * Naming: xfi_* are the static inline bodies; xf_* are the out-of-line functions the
 * Cython code calls, multiversioned with target_clones (XF_MV, see _xfrows.h) where
 * the platform supports it, and the always-inline per-row maths (xf_rest_mass, ...,
 * "rowmath in C" below).  Long rows (c > XF_SMALL_C) use the row passes; short rows the
 * tile functions further down.
 */

#define XF_CAT_(a, b) a##b
#define XF_CAT(a, b) XF_CAT_(a, b)
#define XF_FN(name) XF_CAT(name, XF_SUF)

/* ==== rowmath in C ====================================================================
 * These mirror xentfast/backends/rowmath.py function for function, formula for formula
 * (same names with the xf_ prefix and the type suffix; rowmath's `one` argument is the
 * literal (XF_T)1 here).  Both the long-row path and the tiles of _cython.pyx call
 * them, and the tile epilogues below run them on 16 rows at a time.  The build never
 * uses -ffast-math or -fassociative-math, so the compiler keeps every parenthesis:
 * (1 - e_y) + r is not turned back into s - e_y, nor (m - x_y) + log s into lse - x_y.
 * (-ffp-contract=fast may fuse a*b+c into one FMA in the AVX2/AVX-512 clones: a single
 * rounding less, never a reassociation.)  Change a formula here only together with
 * rowmath.py. */

/* r = sum of e_j over every class but one maximum = u + (t - 1)  (t - 1 exact). */
XF_INLINE XF_T XF_FN(xf_rest_mass)(XF_T u, XF_T t)
{ return u + (t - (XF_T)1); }

/* lse = m + log s,  log s = log1p(r). */
XF_INLINE XF_T XF_FN(xf_log_sum_exp)(XF_T m, XF_T log_s)
{ return m + log_s; }

/* Loss of a kept row with index label y:
 * (1-eps) w_y ((m - x_y) + log s) + (eps/C) (W log s + wd) + z lse^2, lse = m + log s.
 * Without smoothing pass eps_c = w_sum = wd = 0. */
XF_INLINE XF_T XF_FN(xf_sparse_loss)(XF_T m, XF_T log_s, XF_T x_y, XF_T w_y,
                                     XF_T one_m_eps, XF_T eps_c, XF_T w_sum, XF_T wd,
                                     XF_T z)
{
    return (one_m_eps * w_y * ((m - x_y) + log_s)
            + eps_c * (w_sum * log_s + wd))
           + (z * (m + log_s)) * (m + log_s);
}

/* Loss of a row with probability labels: T log s + wd + z lse^2. */
XF_INLINE XF_T XF_FN(xf_dense_loss)(XF_T m, XF_T log_s, XF_T t_sum, XF_T wd, XF_T z)
{ return (t_sum * log_s + wd) + (z * (m + log_s)) * (m + log_s); }

/* a of g_j = e_j a - b_j (j != y): a = A gs / s, s = 1 + r,
 * A = (1-eps) w_y + eps W/C + 2 z lse. */
XF_INLINE XF_T XF_FN(xf_sparse_scale)(XF_T r, XF_T lse, XF_T w_y, XF_T one_m_eps,
                                      XF_T eps_c, XF_T w_sum, XF_T z, XF_T gs)
{ return ((one_m_eps * w_y + (eps_c * w_sum + (z + z) * lse)) * gs) / ((XF_T)1 + r); }

/* g_y = gs (p_y (eps W/C + 2 z lse) - ((1-eps) w_y ((1 - e_y) + r)/s + (eps/C) w_y)),
 * the true-class gradient without the cancelling p_y - 1. */
XF_INLINE XF_T XF_FN(xf_sparse_true_grad)(XF_T e_y, XF_T r, XF_T lse, XF_T w_y,
                                          XF_T one_m_eps, XF_T eps_c, XF_T w_sum, XF_T z,
                                          XF_T gs)
{
    return gs * ((e_y / ((XF_T)1 + r)) * (eps_c * w_sum + (z + z) * lse)
                 - ((one_m_eps * w_y) * ((((XF_T)1 - e_y) + r) / ((XF_T)1 + r))
                    + eps_c * w_y));
}

/* wt_c = w_c ((1 - eps) t_c + eps/C): a probability label smoothed and weighted
 * (without class weights the callers use (1 - eps) t_c + eps/C, i.e. w_c = 1 exactly). */
XF_INLINE XF_T XF_FN(xf_smoothed_weight)(XF_T w, XF_T t, XF_T one_m_eps, XF_T eps_c)
{ return w * (one_m_eps * t + eps_c); }

/* T_off + 2 z lse: the probability-label gradient's coefficient of e_j without the label
 * mass on the ties at the max (xf_dense_grad adds e_j T_tie apart; rowmath.py). */
XF_INLINE XF_T XF_FN(xf_dense_coef)(XF_T lse, XF_T t_off, XF_T z)
{ return t_off + (z + z) * lse; }

/* gs / s, s = 1 + r: the factor of dense_grad. */
XF_INLINE XF_T XF_FN(xf_grad_over_sum)(XF_T r, XF_T gs)
{ return gs / ((XF_T)1 + r); }

/* g_j = ((e_j coef + (e_j T_tie - wt_j)) - wt_j r) gs / s = gs (p_j A - wt_j),
 * coef = xf_dense_coef(lse, T_off, z), gs_over_s = gs / (1 + r): at a unique maximum
 * e_j T_tie - wt_j is exactly 0 (rowmath.py). */
XF_INLINE XF_T XF_FN(xf_dense_grad)(XF_T e, XF_T wt, XF_T r, XF_T coef, XF_T t_tie,
                                    XF_T gs_over_s)
{ return ((e * coef + (e * t_tie - wt)) - wt * r) * gs_over_s; }

/* log p_j = (x_j - m) - log s. */
XF_INLINE XF_T XF_FN(xf_log_softmax)(XF_T x, XF_T m, XF_T log_s)
{ return (x - m) - log_s; }

/* 1 / s, s = 1 + r: softmax_j = e_j (1 / s).  rowmath's one / (one + r), evaluated
 * with the rounding of 1 + r and of the division corrected (XF_INV1P, _xfrows.h):
 * within 0.5 ulp of 1 / (1 + r), one rounding instead of two.  The softmax passes
 * carry r as r_hi + r_lo (a compensated sum) and call XF_INV1P(r_hi, r_lo) directly. */
XF_INLINE XF_T XF_FN(xf_inverse_sum)(XF_T r)
{ return XF_INV1P(r, (XF_T)0); }

/* ==== lane folds ==================================================================== */

/* Fold the L lanes in a fixed order: acc[j] += acc[j + h] for h = L/2, ..., 1
 * (written out: a loop over h made gcc keep acc in memory, with a store-forwarding
 * stall at every level). */
XF_INLINE XF_T XF_FN(xfi_fold_)(const XF_T *acc)
{
    XF_T a[XF_L / 2];
#if XF_L == 16
    XF_T b[4];
    for (int j = 0; j < 8; j++) a[j] = acc[j] + acc[j + 8];
    for (int j = 0; j < 4; j++) b[j] = a[j] + a[j + 4];
#elif XF_L == 8
    XF_T b[4];
    for (int j = 0; j < 4; j++) b[j] = acc[j] + acc[j + 4];
    (void)a;
#else
#error "XF_L must be 8 or 16"
#endif
    XF_T c0 = b[0] + b[2], c1 = b[1] + b[3];
    return c0 + c1;
}

/* TwoSum: *a += v with the rounding error of the addition added into *c
 * (s = a + v, bb = s - a, c += (a - (s - bb)) + (v - bb)).  An infinite sum has no
 * rounding error (the formula gives inf - inf = NaN there): none is carried, so +inf
 * stays +inf; a NaN stays in *a. */
XF_INLINE void XF_FN(xfi_twosum_acc_)(XF_T *a, XF_T *c, XF_T v)
{
    XF_T s = *a + v;
    XF_T bb = s - *a;
    XF_T err = (*a - (s - bb)) + (v - bb);
    *c += XF_SEL(err == err, err, (XF_T)0);
    *a = s;
}

/* The block totals, tot[j] for lane j, in double.  float32 lanes: plain double adds
 * (each adds a relative 2**-53, nothing next to float32's 2**-24, even over a million
 * blocks), folded by the fixed tree of xfi_fold_.  float64 lanes: the rounding error of
 * every addition is carried in tot[XF_L + j] (TwoSum), and the fold adds the lanes in a
 * fixed order (lane 0 up) with TwoSum again -- so the only errors left are those of the
 * blocks' own lanes (16 terms each in pass 2) and the last rounding (without it the lse
 * of 300,000 equal float64 terms drifted 86 ulps).  An infinite sum carries no error
 * (TwoSum's would be inf - inf = NaN): a +inf total stays +inf (a masked true class with
 * smoothing), and a NaN stays NaN.  Arrays of totals have 2 * XF_L doubles. */
XF_INLINE XF_T XF_FN(xfi_dfold_)(const double *tot, double scale)
{
#if XF_L == 16
    double a[8], b[4];
    for (int j = 0; j < 8; j++) a[j] = tot[j] + tot[j + 8];
    for (int j = 0; j < 4; j++) b[j] = a[j] + a[j + 4];
    double c0 = b[0] + b[2], c1 = b[1] + b[3];
    return (XF_T)((c0 + c1) * scale);
#else
    double s = tot[0], c = tot[XF_L];
    for (int j = 1; j < XF_L; j++) {
        XF_FN(xfi_twosum_acc_)(&s, &c, tot[j]);
        c += tot[XF_L + j];
    }
    return (XF_T)((s + c) * scale);
#endif
}

/* End of a block: tot[j] += acc[j] in double (float64: its rounding error carried into
 * tot[XF_L + j]); acc[j] = 0.  (Without the simd pragma gcc 12 splits the totals into
 * scalars and converts lane by lane; with it, a few vector instructions per block.) */
XF_INLINE void XF_FN(xfi_flush_)(XF_T *XF_RESTRICT acc, double *XF_RESTRICT tot)
{
    XF_SIMD
    for (int j = 0; j < XF_L; j++) {
#if XF_L == 16
        tot[j] += (double)acc[j];
#else
        XF_FN(xfi_twosum_acc_)(&tot[j], &tot[XF_L + j], acc[j]);
#endif
        acc[j] = 0;
    }
}

/* The first block end: tot[j] = acc[j], no error yet, acc[j] = 0 (the totals need no
 * zeroing first). */
XF_INLINE void XF_FN(xfi_flush_first_)(XF_T *XF_RESTRICT acc, double *XF_RESTRICT tot)
{
    XF_SIMD
    for (int j = 0; j < XF_L; j++) {
        tot[j] = (double)acc[j];
        tot[XF_L + j] = 0;
        acc[j] = 0;
    }
}

/* The total of L integer lane counts (the ties at the max), as XF_T. */
XF_INLINE XF_T XF_FN(xfi_count_)(const XF_KEY *cnt)
{
    int64_t t = 0;
    for (int j = 0; j < XF_L; j++) t += (int64_t)cnt[j];
    return (XF_T)t;
}

#define XF_BLK (64 * XF_L)     /* elements per block of a long-row sum (see above) */

/* ---- pass 1: m = max_j x_j ----
 * As an integer max over order-preserving keys: key(f) = bits(f) for f >= +0 and
 * bits(f) with the 31 (63) magnitude bits flipped for negative f, so that
 * key(a) < key(b) <=> a < b for all non-NaN a, b (and -0 < +0).  An integer max is a
 * reduction the vectoriser always recognises (a float "v > m ? v : m" is not, without
 * -ffinite-math-only, and gcc leaves it scalar); max is exact, so its order is free.
 * NaN: a positive NaN has a key above +inf and becomes m, a negative one sorts below
 * -inf and is skipped; either way x_j - m is NaN, e_j = NaN goes into u and makes r,
 * lse and the row NaN.
 * An all -inf row gives m = -inf, x - m = NaN: the row is NaN, by design. */
XF_INLINE XF_T XF_FN(xfi_rowmax)(const XF_T *x, ptrdiff_t n)
{
    XF_KEY m = XF_KEY_OF(-INFINITY);
    for (ptrdiff_t i = 0; i < n; i++) {
        XF_KEY k = XF_KEY_OF(x[i]);
        m = k > m ? k : m;
    }
    return XF_FROM_KEY(m);
}

/* ---- pass 2: u and t (see the top), optionally storing e_j = exp(x_j - m) ----
 * With d = x_j - m: u collects e_j where d != 0 (NaN != 0: a NaN, a +inf (inf - inf) or
 * an all -inf row (-inf - -inf) makes u NaN), t counts d == 0 (the ties at the max,
 * e_j = 1 each).  The sums add e_j 2^S (XF_EXP_XM: the exp without its last multiply,
 * exact) and xfi_dfold_ scales the total by 2^-S once: bitwise the sum of the e_j
 * wherever they and the partial sums are normal, more exact where they are not.
 * Without a store the tie is zeroed inside the exp's own final select (on AVX-512 the
 * zero-masking of its last multiply); with a store e_j = (e_j 2^S) 2^-S is stored whole
 * and the scaled term zeroed for u by a select.  t counts in integer lanes (XF_KEY:
 * "t += tie", a subtraction of the compare mask; no blocks needed).  Everything stays
 * branch-free selects: a conditional FP add ("t = tie ? t + 1 : t") is one masked add
 * on AVX-512, but gcc leaves it a scalar branch in the AVX2 and SSE2 clones (the add
 * might trap).  A plain sum of e_j costs one compare and one add per element less:
 * ~5-7% of this exp-bound pass (v4 clone, L1-resident rows; NOTES_cython_kernels.md). */
XF_INLINE void XF_FN(xfi_exp_step_)(const XF_T *x, XF_T m, XF_T *XF_RESTRICT au,
                                    XF_KEY *XF_RESTRICT at)
{
    for (int j = 0; j < XF_L; j++) {
        XF_T d = x[j] - m;
        int tie = d == 0;
        au[j] += XF_EXP_XM(x[j], m, tie);
        at[j] += tie;
    }
}

/* e_j = exp(x - m) (comp: fully compensated, XF_EXP_DIFF; else XF_EXP_XM's reduction),
 * and *scaled = e_j 2^S before its last rounding, the term the sums add (see above). */
XF_INLINE XF_T XF_FN(xfi_exp_term_)(XF_T x, XF_T m, int comp, XF_T *scaled)
{
    *scaled = comp ? XF_EXP_DIFF_S(x, m) : XF_EXP_XM(x, m, 0);
    return *scaled * XF_EXP_UNSCALE;
}

XF_INLINE void XF_FN(xfi_exp_store_step_)(const XF_T *XF_RESTRICT x, XF_T *XF_RESTRICT e,
                                          XF_T m, XF_T *XF_RESTRICT au,
                                          XF_KEY *XF_RESTRICT at, int comp)
{
    for (int j = 0; j < XF_L; j++) {
        XF_T d = x[j] - m, vs;
        XF_T v = XF_FN(xfi_exp_term_)(x[j], m, comp, &vs);
        int tie = d == 0;
        e[j] = v;
        au[j] += XF_SEL(tie, (XF_T)0, vs);
        at[j] += tie;
    }
}

XF_INLINE void XF_FN(xfi_exp_inplace_step_)(XF_T *x, XF_T m, XF_T *XF_RESTRICT au,
                                            XF_KEY *XF_RESTRICT at, int comp)
{
    for (int j = 0; j < XF_L; j++) {
        XF_T xj = x[j];
        XF_T d = xj - m, vs;
        XF_T v = XF_FN(xfi_exp_term_)(xj, m, comp, &vs);
        int tie = d == 0;
        x[j] = v;
        au[j] += XF_SEL(tie, (XF_T)0, vs);
        at[j] += tie;
    }
}

/* Tails.  With r = n mod L > 0 and n >= L, the last step runs on the full window
 * x[n-L .. n): lanes j < L - r hold elements the main loop already did and add 0, lanes
 * j >= L - r add the r new ones.  A full (unmasked) vector step, and with a store the
 * window is written whole: the overlapped elements get the very same values again.
 * (Masked or buffered tail stores cost 3x on a 65-class row: a load that 4K-aliases a
 * masked store cannot be forwarded and waits for it, i.e. for the whole exp chain, so
 * consecutive rows stopped overlapping; and gcc makes a memcpy call of a copy loop.)
 * Inplace, the window's first L - r elements are overwritten by the main loop, so the
 * window is read into a buffer before it.  Rows shorter than L (not used by the
 * kernels: short rows go to the tiles) pad a buffer with -inf instead (d = -inf for a
 * finite m: e = +0 into u, adds nothing).  All three variants put every element in the
 * same lane and block, so u and t are bitwise the same whether or not e is stored. */
XF_INLINE void XF_FN(xfi_exp_tail_)(const XF_T *x, XF_T m, XF_T *XF_RESTRICT au,
                                    XF_KEY *XF_RESTRICT at, int first)
{
    for (int j = 0; j < XF_L; j++) {
        XF_T d = x[j] - m;
        int tie = d == 0, in = j >= first;
        au[j] += XF_EXP_XM(x[j], m, tie | !in);
        at[j] += in & tie;
    }
}

XF_INLINE void XF_FN(xfi_exp_store_tail_)(const XF_T *XF_RESTRICT x, XF_T *XF_RESTRICT e,
                                          XF_T m, XF_T *XF_RESTRICT au,
                                          XF_KEY *XF_RESTRICT at, int first, int comp)
{
    for (int j = 0; j < XF_L; j++) {
        XF_T d = x[j] - m, vs;
        XF_T v = XF_FN(xfi_exp_term_)(x[j], m, comp, &vs);
        int tie = d == 0, in = j >= first;
        e[j] = v;
        au[j] += XF_SEL(in & !tie, vs, (XF_T)0);
        at[j] += in & tie;
    }
}

/* Pass 1 of the next row, fused into this row's pass 2: km[j] = the largest key of
 * lane j (XF_KEY_OF, as xfi_rowmax: the max is exact in any order, so the fused max is
 * bitwise the max pass 1 would take).  Pass 2 is exp-bound with its load ports and
 * integer lanes mostly idle, pass 1 load-bound with its FMA units idle; run apart, a
 * long row pays for both (pass 1 was 20% of a 1000-class loss call's CPU time). */
XF_INLINE void XF_FN(xfi_max_step_)(const XF_T *x, XF_KEY *XF_RESTRICT km)
{
    XF_SIMD
    for (int j = 0; j < XF_L; j++) {
        XF_KEY k = XF_KEY_OF(x[j]);
        km[j] = k > km[j] ? k : km[j];
    }
}

/* The driver of the pass-2 variants (mode: 0 sum only, 1 store e_j into e, 2 in
 * place, e == x, 3 in place prefetching two rows of 16-bit data, pf and pw, instead of
 * one of XF_T (the 16-bit path: the next row of logits and this row's gradient); comp: the stored e_j by xf_exp*_diff, compensated for the rounding of
 * x_j - m; fuse: also take the max of nx, n elements, into *nx_max (xfi_max_step_);
 * always inlined with constant mode, comp and fuse, so each variant is its own loop):
 * blocks of XF_BLK elements, the tail step into the last block; u returned (the four
 * sets' lanes added into the double block totals, folded by xfi_dfold_), t stored (the
 * sum of the integer lane counts). */
XF_INLINE XF_T XF_FN(xfi_expsum_)(const XF_T *x, XF_T *e, ptrdiff_t n, XF_T m,
                                  const XF_T *pf, XF_T *t_out, int mode, int comp,
                                  const char *pw, int fuse, const XF_T *nx,
                                  XF_T *nx_max)
{
    /* four accumulator sets, step k of a block into set k mod 4: each lane of a set
     * adds 64 / 4 = 16 terms per full block (set 0 up to 4 more in the last, partial
     * block: its last steps that are not a multiple of 4 and the tail step), and the
     * four add chains overlap */
    XF_ALIGNED XF_T au[XF_L] = {0}, au1[XF_L] = {0}, au2[XF_L] = {0}, au3[XF_L] = {0};
    XF_ALIGNED XF_KEY at[XF_L] = {0};           /* tie counts: need no blocks */
    XF_ALIGNED XF_KEY km[XF_L];                 /* nx: the lanes' max keys (pass 1) */
    XF_ALIGNED double du[2 * XF_L];             /* set at the first block end */
    XF_ALIGNED XF_T buf[XF_L];
    XF_ALIGNED XF_T ebuf[XF_L];
    ptrdiff_t i, nv = n - n % XF_L;
    if (mode >= 2 && nv < n)                    /* the tail window, before it changes */
        for (int j = 0; j < XF_L; j++) buf[j] = (n >= XF_L) ? x[n - XF_L + j]
                                                           : ((j < n) ? x[j] : -INFINITY);
    if (fuse)
        for (int j = 0; j < XF_L; j++) km[j] = XF_KEY_OF(-INFINITY);
    pf = pf ? pf : x;
    pw = pw ? pw : (const char *)pf;
#define XF_STEP_(k, acc)                                                              \
    do {                                                                              \
        ptrdiff_t i_ = i + (k) * XF_L;                                                \
        if (mode == 3) {            /* 2 bytes an element: each line asked twice */   \
            XF_PREFETCH((const char *)pf + 2 * i_);                                   \
            XF_PREFETCH(pw + 2 * i_);                                                 \
        } else {                                                                      \
            XF_PREFETCH(pf + i_);                                                     \
        }                                                                             \
        if (fuse) XF_FN(xfi_max_step_)(nx + i_, km);                                  \
        if (mode == 0) XF_FN(xfi_exp_step_)(x + i_, m, acc, at);                      \
        else if (mode == 1) XF_FN(xfi_exp_store_step_)(x + i_, e + i_, m, acc, at, comp); \
        else XF_FN(xfi_exp_inplace_step_)(e + i_, m, acc, at, comp);                  \
    } while (0)
    for (ptrdiff_t b = 0; b < nv; b += XF_BLK) {
        ptrdiff_t end = nv - b > XF_BLK ? b + XF_BLK : nv;
        for (i = b; i + 4 * XF_L <= end; i += 4 * XF_L) {
            XF_STEP_(0, au);
            XF_STEP_(1, au1);
            XF_STEP_(2, au2);
            XF_STEP_(3, au3);
        }
        for (; i < end; i += XF_L)
            XF_STEP_(0, au);
        if (end < nv) {                         /* a block ends and another follows */
            if (b == 0) XF_FN(xfi_flush_first_)(au, du);
            else XF_FN(xfi_flush_)(au, du);
            XF_FN(xfi_flush_)(au1, du);
            XF_FN(xfi_flush_)(au2, du);
            XF_FN(xfi_flush_)(au3, du);
        }
    }
#undef XF_STEP_
    i = nv;
    if (i < n && n >= XF_L) {
        int first = (int)(XF_L - (n - i));
        if (mode == 0) XF_FN(xfi_exp_tail_)(x + n - XF_L, m, au, at, first);
        else if (mode == 1)
            XF_FN(xfi_exp_store_tail_)(x + n - XF_L, e + n - XF_L, m, au, at, first, comp);
        else XF_FN(xfi_exp_store_tail_)(buf, e + n - XF_L, m, au, at, first, comp);
    } else if (i < n) {
        if (mode < 2)
            for (int j = 0; j < XF_L; j++) buf[j] = (j < n) ? x[j] : -INFINITY;
        XF_FN(xfi_exp_store_step_)(buf, ebuf, m, au, at, comp);
        if (mode != 0)
            for (int j = 0; j < XF_L; j++)
                if (j < n) e[j] = ebuf[j];
    }
    if (fuse) {                 /* the rest of nx: its last window (max: overlap is free) */
        XF_KEY mk = XF_KEY_OF(-INFINITY);
        if (i < n && n >= XF_L) XF_FN(xfi_max_step_)(nx + n - XF_L, km);
        else for (ptrdiff_t q = nv; q < n; q++) {
            XF_KEY k = XF_KEY_OF(nx[q]);
            mk = k > mk ? k : mk;
        }
        for (int j = 0; j < XF_L; j++) mk = km[j] > mk ? km[j] : mk;
        *nx_max = XF_FROM_KEY(mk);
    }
    *t_out = XF_FN(xfi_count_)(at);
    if (nv <= XF_BLK)         /* one block (n <= XF_BLK + L - 1): no totals were kept */
        XF_FN(xfi_flush_first_)(au, du);
    else
        XF_FN(xfi_flush_)(au, du);
    XF_FN(xfi_flush_)(au1, du);
    XF_FN(xfi_flush_)(au2, du);
    XF_FN(xfi_flush_)(au3, du);
    return XF_FN(xfi_dfold_)(du, XF_EXP_UNSCALE);     /* the terms were e_j 2^S */
}

/* ---- softmax: pass 2 with a compensated sum, returning 1 / s ----
 * softmax_j = e_j (1 / s) must be within 4 ulps, and the error budget is tight: e_j
 * (0.8 ulp of e_j, xf_exp*_diff), 1 / s (0.5 ulp with XF_INV1P), the product (0.5
 * ulp), each counted in ulps of the result, which can be twice as fine as those of e_j
 * and 1 / s.  A plain lane sum adds about an ulp of s more (measured: 4.02 ulps at
 * C = 1000, float64, with the plain sum; 2.0 with this one).  So here u is summed with
 * TwoSum compensation in every lane (s' = a + v, bb = s' - a,
 * c += (a - (s' - bb)) + (v - bb)), the lanes are folded the same way in a fixed order,
 * and r = u + (t - 1) goes to XF_INV1P as r_hi + r_lo.  Compensated sums do not drift,
 * so there are no blocks; t counts in integer lanes as in pass 2.  Five operations per
 * element more than pass 2 (and the compensated exp's ten), softmax only. */
/* (hi, lo) of sum_j a_j + c_j, lanes in a fixed order, compensated */
XF_INLINE XF_T XF_FN(xfi_fold2_)(const XF_T *a, const XF_T *c, XF_T *lo)
{
    XF_T hi = 0, l = 0;
    for (int j = 0; j < XF_L; j++) {
        XF_FN(xfi_twosum_acc_)(&hi, &l, a[j]);
        l += c[j];
    }
    *lo = l;
    return hi;
}

/* 1 / s from the compensated u = u_hi + u_lo and the tie count t */
XF_INLINE XF_T XF_FN(xfi_inv_sum2_)(XF_T u_hi, XF_T u_lo, double t)
{
    XF_T r_hi = u_hi, r_lo = u_lo;
    XF_FN(xfi_twosum_acc_)(&r_hi, &r_lo, (XF_T)(t - 1.0));     /* r = u + (t - 1) */
    return XF_INV1P(r_hi, r_lo);
}

XF_INLINE void XF_FN(xfi_softmax_step_)(const XF_T *x, XF_T *e, XF_T m, XF_T *XF_RESTRICT a,
                                        XF_T *XF_RESTRICT c, XF_KEY *XF_RESTRICT t,
                                        int first)
{
    for (int j = 0; j < XF_L; j++) {
        XF_T xj = x[j];
        XF_T d = xj - m;
        XF_T v = XF_EXP_DIFF(xj, m);
        int tie = d == 0, in = j >= first;
        e[j] = v;
        XF_FN(xfi_twosum_acc_)(&a[j], &c[j], XF_SEL(in & !tie, v, (XF_T)0));
        t[j] += in & tie;
    }
}

/* e_j = exp(x_j - m) (compensated) into e, which may be x itself; returns 1 / s. */
XF_INLINE XF_T XF_FN(xfi_softmax_sum_)(const XF_T *x, XF_T *e, ptrdiff_t n, XF_T m,
                                       const XF_T *pf)
{
    XF_ALIGNED XF_T a[XF_L] = {0};
    XF_ALIGNED XF_T c[XF_L] = {0};
    XF_ALIGNED XF_KEY t[XF_L] = {0};
    XF_ALIGNED XF_T buf[XF_L];
    XF_ALIGNED XF_T ebuf[XF_L];
    ptrdiff_t i, nv = n - n % XF_L;
    if (nv < n)                                 /* the tail window, before e may change it */
        for (int j = 0; j < XF_L; j++) buf[j] = (n >= XF_L) ? x[n - XF_L + j]
                                                           : ((j < n) ? x[j] : -INFINITY);
    pf = pf ? pf : x;
    for (i = 0; i < nv; i += XF_L) {
        XF_PREFETCH(pf + i);
        XF_FN(xfi_softmax_step_)(x + i, e + i, m, a, c, t, 0);
    }
    if (nv < n && n >= XF_L) {
        XF_FN(xfi_softmax_step_)(buf, ebuf, m, a, c, t, (int)(XF_L - (n - nv)));
        for (int j = 0; j < XF_L; j++) e[n - XF_L + j] = ebuf[j];
    } else if (nv < n) {
        XF_FN(xfi_softmax_step_)(buf, ebuf, m, a, c, t, 0);   /* -inf pads add +0 */
        for (int j = 0; j < XF_L; j++)
            if (j < n) e[j] = ebuf[j];
    }
    XF_T lo, hi = XF_FN(xfi_fold2_)(a, c, &lo);
    return XF_FN(xfi_inv_sum2_)(hi, lo, (double)XF_FN(xfi_count_)(t));
}

/* ---- option sums, taken before pass 2 may overwrite x (inplace) ----
 * wd = sum_{c: w_c != 0} w_c (m - x_c)   (w == NULL: all w_c = 1)
 * Every term is >= 0 for w >= 0 (m is the row max), so this sum has no cancellation,
 * unlike W*lse - sum_c w_c x_c.  w_c == 0 classes are skipped even at x_c = -inf.
 * In blocks with double totals, as pass 2. */
XF_INLINE XF_T XF_FN(xfi_wdist)(const XF_T *x, const XF_T *w, ptrdiff_t n, XF_T m)
{
    /* Tail as in the exp passes: the full window x[n-L .. n) with the lanes already
     * counted masked out -- no conditional loads (gcc 12.2 -O3 -march=x86-64-v3
     * -fno-trapping-math miscompiled the conditional-load form of this loop). */
    XF_T acc[XF_L] = {0};
    double tot[2 * XF_L] = {0};
    ptrdiff_t i = 0, nv = n - n % XF_L;
    int first = (int)(XF_L - (n - nv));
    if (w == NULL) {
        for (ptrdiff_t b = 0; b < nv; b += XF_BLK) {
            ptrdiff_t end = nv - b > XF_BLK ? b + XF_BLK : nv;
            for (i = b; i < end; i += XF_L)
                for (int j = 0; j < XF_L; j++) acc[j] += m - x[i + j];
            XF_FN(xfi_flush_)(acc, tot);
        }
        i = nv;
        if (i < n && n >= XF_L)
            for (int j = 0; j < XF_L; j++) {
                XF_T d = m - x[n - XF_L + j];
                acc[j] += XF_SEL(j >= first, d, (XF_T)0);
            }
        else
            for (; i < n; i++) acc[i] += m - x[i];                  /* n < L */
    } else {
        for (ptrdiff_t b = 0; b < nv; b += XF_BLK) {
            ptrdiff_t end = nv - b > XF_BLK ? b + XF_BLK : nv;
            for (i = b; i < end; i += XF_L)
                for (int j = 0; j < XF_L; j++) {
                    XF_T wj = w[i + j], d = wj * (m - x[i + j]);
                    acc[j] += XF_SEL(wj != 0, d, (XF_T)0);
                }
            XF_FN(xfi_flush_)(acc, tot);
        }
        i = nv;
        if (i < n && n >= XF_L)
            for (int j = 0; j < XF_L; j++) {
                XF_T wj = w[n - XF_L + j], d = wj * (m - x[n - XF_L + j]);
                acc[j] += XF_SEL(j >= first && wj != 0, d, (XF_T)0);
            }
        else
            for (; i < n; i++) acc[i] += (w[i] != 0) ? w[i] * (m - x[i]) : (XF_T)0;
    }
    XF_FN(xfi_flush_)(acc, tot);
    return XF_FN(xfi_dfold_)(tot, 1.0);
}

/* Dense labels: wt_c = w_c (keep t_c + add), keep = 1 - eps, add = eps / C;
 * *wd = sum_{wt_c != 0} wt_c (m - x_c), and T = sum_c wt_c in two parts (rowmath.py):
 * *t_tie over the ties at the max (x_c = m), *t_off over the rest.
 * The lanes are flushed into the (compensated) double totals every XF_DENSE_STEPS
 * steps, not every block: an addition errs by half an ulp of the partial sum it adds
 * to, and smoothing adds C equal terms eps/C, whose errors all have one sign; partial
 * sums of 8 terms keep each error at the size of those terms.  (Flushed once per
 * block of 64 steps, a float64 T_off ~ 1 of C = 1000 -- a confident row whose label is
 * not its max, gradient ~ T_off -- was 23 ulps off; TwoSum in every lane cost the
 * dense pass 1.2-1.4x at C >= 1000.) */
#define XF_DENSE_STEPS 8
#define XF_DENSE_TERM_(wt, xc)                                                         \
    XF_T dm_ = m - (xc), d_ = (wt) * dm_;                                                \
    a[j] += XF_SEL((wt) != 0, d_, (XF_T)0);                                            \
    XF_T tie_ = XF_SEL(dm_ == 0, (wt), (XF_T)0);                                       \
    b[j] += (wt) - tie_;                                                               \
    bt[j] += tie_;
XF_INLINE void XF_FN(xfi_dense_sums)(const XF_T *x, const XF_T *t, const XF_T *w,
                                     ptrdiff_t n, XF_T m, XF_T keep, XF_T add,
                                     XF_T *wd, XF_T *t_off, XF_T *t_tie)
{
    XF_T a[XF_L] = {0}, b[XF_L] = {0}, bt[XF_L] = {0};
    double ta[2 * XF_L] = {0}, tb[2 * XF_L] = {0}, tt[2 * XF_L] = {0};
    ptrdiff_t i = 0, nv = n - n % XF_L;
    for (ptrdiff_t k = 0; k < nv; k += XF_DENSE_STEPS * XF_L) {
        ptrdiff_t end = nv - k > XF_DENSE_STEPS * XF_L ? k + XF_DENSE_STEPS * XF_L : nv;
        if (w == NULL)
            for (i = k; i < end; i += XF_L)
                for (int j = 0; j < XF_L; j++) {
                    XF_T wt = keep * t[i + j] + add;             /* w_c = 1 */
                    XF_DENSE_TERM_(wt, x[i + j])
                }
        else
            for (i = k; i < end; i += XF_L)
                for (int j = 0; j < XF_L; j++) {
                    XF_T wt = XF_FN(xf_smoothed_weight)(w[i + j], t[i + j], keep, add);
                    XF_DENSE_TERM_(wt, x[i + j])
                }
        XF_FN(xfi_flush_)(a, ta);
        XF_FN(xfi_flush_)(b, tb);
        XF_FN(xfi_flush_)(bt, tt);
    }
    for (i = nv; i < n; i++) {     /* < L scalar iterations, no exp: cheap */
        XF_T wt = (w == NULL) ? keep * t[i] + add
                              : XF_FN(xf_smoothed_weight)(w[i], t[i], keep, add);
        int j = (int)(i % XF_L);
        XF_DENSE_TERM_(wt, x[i])
    }
    XF_FN(xfi_flush_)(a, ta);
    XF_FN(xfi_flush_)(b, tb);
    XF_FN(xfi_flush_)(bt, tt);
    *wd = XF_FN(xfi_dfold_)(ta, 1.0);
    *t_off = XF_FN(xfi_dfold_)(tb, 1.0);
    *t_tie = XF_FN(xfi_dfold_)(tt, 1.0);
}
#undef XF_DENSE_TERM_
#undef XF_DENSE_STEPS

/* ---- pass 3: turn e (stored in g) into the gradient, in place ---- */
XF_INLINE void XF_FN(xfi_scale)(XF_T *g, ptrdiff_t n, XF_T a)
{
    for (ptrdiff_t i = 0; i < n; i++) g[i] = g[i] * a;
}

/* g_j = g_j a - b w_j   (w == NULL: g_j a - b) */
XF_INLINE void XF_FN(xfi_scale_sub)(XF_T *XF_RESTRICT g, const XF_T *XF_RESTRICT w,
                                    ptrdiff_t n, XF_T a, XF_T b)
{
    if (w == NULL)
        for (ptrdiff_t i = 0; i < n; i++) g[i] = g[i] * a - b;
    else
        for (ptrdiff_t i = 0; i < n; i++) g[i] = g[i] * a - b * w[i];
}

/* g_j = xf_dense_grad(e_j, wt_j, r, coef, T_tie, gs/s), wt_j = w_j (keep t_j + add)
 * exactly as in xfi_dense_sums. */
XF_INLINE void XF_FN(xfi_dense_grad)(XF_T *XF_RESTRICT g, const XF_T *XF_RESTRICT t,
                                     const XF_T *XF_RESTRICT w, ptrdiff_t n, XF_T r,
                                     XF_T coef, XF_T t_tie, XF_T gs_over_s, XF_T keep,
                                     XF_T add)
{
    if (w == NULL)
        for (ptrdiff_t i = 0; i < n; i++)
            g[i] = XF_FN(xf_dense_grad)(g[i], keep * t[i] + add, r, coef, t_tie, gs_over_s);
    else
        for (ptrdiff_t i = 0; i < n; i++)
            g[i] = XF_FN(xf_dense_grad)(g[i], XF_FN(xf_smoothed_weight)(w[i], t[i], keep, add),
                                        r, coef, t_tie, gs_over_s);
}

/* out_j = (x_j - m) - log s  (log_softmax); out must not overlap x unless it IS x. */
XF_INLINE void XF_FN(xfi_log_softmax)(const XF_T *XF_RESTRICT x, XF_T *XF_RESTRICT out,
                                      ptrdiff_t n, XF_T m, XF_T log_s)
{
    for (ptrdiff_t i = 0; i < n; i++) out[i] = XF_FN(xf_log_softmax)(x[i], m, log_s);
}

XF_INLINE void XF_FN(xfi_log_softmax_inplace)(XF_T *x, ptrdiff_t n, XF_T m, XF_T log_s)
{
    for (ptrdiff_t i = 0; i < n; i++) x[i] = XF_FN(xf_log_softmax)(x[i], m, log_s);
}

/* ---- short rows (c <= XF_SMALL_C): tiles of XF_TILE rows, transposed ----
 * A row of 10 classes is too short to vectorise along: every per-row loop would be all
 * prologue and epilogue.  So XF_TILE (16) consecutive rows are copied into a tile
 * stored class-major, tile[j * XF_TILE + r] = x[r, j], and every step then runs
 * "vertically", one SIMD lane per row, with no horizontal reductions at all:
 *     m[r] = max_j tile[j][r]          (integer keys, as xfi_rowmax)
 *     e    = exp(tile - m)             (in the tile)
 *     u[r], t[r] = sums of e[j][r]     (sequential over j: a fixed order)
 *     the rowmath epilogue             (xf_tile_sparse_epilogue & co., 16 lanes at once,
 *                                       log1p vectorised too)
 * and the gradient is written back row-major while being scaled.  The copies in and
 * out are the only scalar work (one load + one store per element).  Rows past `rows`
 * in the last tile are zero-filled and their results ignored. */
XF_MV void XF_FN(xf_tile_load)(const XF_T *XF_RESTRICT x, XF_T *XF_RESTRICT tile,
                               ptrdiff_t rows, ptrdiff_t c)
{
    if (rows == XF_TILE) {      /* class-outer: a fixed 16-lane inner loop (gathers) */
        for (ptrdiff_t j = 0; j < c; j++)
            for (int r = 0; r < XF_TILE; r++) tile[j * XF_TILE + r] = x[r * c + j];
        return;
    }
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t j = 0; j < c; j++) tile[j * XF_TILE + r] = x[r * c + j];
    for (ptrdiff_t r = rows; r < XF_TILE; r++)
        for (ptrdiff_t j = 0; j < c; j++) tile[j * XF_TILE + r] = 0;
}

XF_MV void XF_FN(xf_tile_max)(const XF_T *XF_RESTRICT tile, ptrdiff_t c, XF_T *XF_RESTRICT m)
{
    XF_KEY k[XF_TILE];
    for (int r = 0; r < XF_TILE; r++) k[r] = XF_KEY_OF(-INFINITY);
    for (ptrdiff_t j = 0; j < c; j++)
        for (int r = 0; r < XF_TILE; r++) {
            XF_KEY v = XF_KEY_OF(tile[j * XF_TILE + r]);
            k[r] = v > k[r] ? v : k[r];
        }
    for (int r = 0; r < XF_TILE; r++) m[r] = XF_FROM_KEY(k[r]);
}

/* u[r], t[r] as pass 2 (u over d != 0, t counts ties), and with store e = exp(tile - m)
 * into the tile; comp: e by xf_exp*_diff (compensated for the rounding of x - m), as
 * pass 2's comp.  u is the same with or without the store. */
XF_INLINE void XF_FN(xfi_tile_expsum_)(XF_T *XF_RESTRICT tile, ptrdiff_t c,
                                       const XF_T *XF_RESTRICT m, XF_T *XF_RESTRICT u,
                                       XF_T *XF_RESTRICT t, int store, int comp)
{
    XF_T au[XF_TILE] = {0};
    XF_KEY at[XF_TILE] = {0};
    for (ptrdiff_t j = 0; j < c; j++)
        for (int r = 0; r < XF_TILE; r++) {
            XF_T xv = tile[j * XF_TILE + r];
            XF_T d = xv - m[r], vs;
            int tie = d == 0;
            if (store) {
                tile[j * XF_TILE + r] = XF_FN(xfi_exp_term_)(xv, m[r], comp, &vs);
                au[r] += XF_SEL(tie, (XF_T)0, vs);
            } else {
                au[r] += XF_EXP_XM(xv, m[r], tie);
            }
            at[r] += tie;
        }
    for (int r = 0; r < XF_TILE; r++) {     /* the terms were e_j 2^S (see pass 2) */
        u[r] = au[r] * XF_EXP_UNSCALE;
        t[r] = (XF_T)at[r];
    }
}

XF_MV void XF_FN(xf_tile_expsum)(XF_T *XF_RESTRICT tile, ptrdiff_t c,
                                 const XF_T *XF_RESTRICT m, XF_T *XF_RESTRICT u,
                                 XF_T *XF_RESTRICT t, int store, int comp)
{
    if (!store) XF_FN(xfi_tile_expsum_)(tile, c, m, u, t, 0, 0);
    else if (comp) XF_FN(xfi_tile_expsum_)(tile, c, m, u, t, 1, 1);
    else XF_FN(xfi_tile_expsum_)(tile, c, m, u, t, 1, 0);
}

/* softmax of 16 rows: e = exp(tile - m) (compensated) into the tile, inv[r] = 1 / s
 * with u summed compensated (see "softmax" above). */
XF_MV void XF_FN(xf_tile_softmax)(XF_T *XF_RESTRICT tile, ptrdiff_t c,
                                  const XF_T *XF_RESTRICT m, XF_T *XF_RESTRICT inv)
{
    XF_T a[XF_TILE] = {0}, cc[XF_TILE] = {0};
    XF_KEY t[XF_TILE] = {0};
    for (ptrdiff_t j = 0; j < c; j++)
        for (int r = 0; r < XF_TILE; r++) {
            XF_T xv = tile[j * XF_TILE + r];
            XF_T d = xv - m[r];
            XF_T v = XF_EXP_DIFF(xv, m[r]);
            int tie = d == 0;
            tile[j * XF_TILE + r] = v;
            XF_FN(xfi_twosum_acc_)(&a[r], &cc[r], XF_SEL(tie, (XF_T)0, v));
            t[r] += tie;
        }
    for (int r = 0; r < XF_TILE; r++)
        inv[r] = XF_FN(xfi_inv_sum2_)(a[r], cc[r], (double)t[r]);
}

/* wd[r] = sum_{w_j != 0} w_j (m[r] - x[j][r])   (w == NULL: all w_j = 1) */
XF_MV void XF_FN(xf_tile_wdist)(const XF_T *XF_RESTRICT tile, const XF_T *XF_RESTRICT w,
                                ptrdiff_t c, const XF_T *XF_RESTRICT m, XF_T *XF_RESTRICT wd)
{
    XF_T acc[XF_TILE] = {0};
    if (w == NULL) {
        for (ptrdiff_t j = 0; j < c; j++)
            for (int r = 0; r < XF_TILE; r++) acc[r] += m[r] - tile[j * XF_TILE + r];
    } else {
        for (ptrdiff_t j = 0; j < c; j++) {
            XF_T wj = w[j];
            if (wj == 0) continue;                     /* adds nothing, even at x = -inf */
            XF_NO_UNROLL
            for (int r = 0; r < XF_TILE; r++) acc[r] += wj * (m[r] - tile[j * XF_TILE + r]);
        }
    }
    for (int r = 0; r < XF_TILE; r++) wd[r] = acc[r];
}

/* Dense: wt = w_j (keep t + add); wd[r] = sum_{wt != 0} wt (m[r] - x), and T[r] =
 * sum wt in two parts, t_tie[r] over the ties at the max and t_off[r] over the rest
 * (plain sums of at most XF_SMALL_C terms: within C/2 ulps of T). */
XF_MV XF_NO_UNROLL_AND_JAM void XF_FN(xf_tile_dense_sums)(const XF_T *XF_RESTRICT tx, const XF_T *XF_RESTRICT tt,
                                     const XF_T *XF_RESTRICT w, ptrdiff_t c,
                                     const XF_T *XF_RESTRICT m, XF_T keep, XF_T add,
                                     XF_T *XF_RESTRICT wd, XF_T *XF_RESTRICT t_off,
                                     XF_T *XF_RESTRICT t_tie)
{
    XF_T a[XF_TILE] = {0}, b[XF_TILE] = {0}, bt[XF_TILE] = {0};
    for (ptrdiff_t j = 0; j < c; j++) {
        XF_T wj = (w == NULL) ? (XF_T)1 : w[j];
        XF_NO_UNROLL
        for (int r = 0; r < XF_TILE; r++) {
            XF_T wt = XF_FN(xf_smoothed_weight)(wj, tt[j * XF_TILE + r], keep, add);
                                                         /* wj = 1: exact */
            XF_T dm = m[r] - tx[j * XF_TILE + r];
            a[r] += XF_SEL(wt != 0, wt * dm, (XF_T)0);
            XF_T tie = XF_SEL(dm == 0, wt, (XF_T)0);     /* wt - tie: wt or exactly 0 */
            b[r] += wt - tie;
            bt[r] += tie;
        }
    }
    for (int r = 0; r < XF_TILE; r++) { wd[r] = a[r]; t_off[r] = b[r]; t_tie[r] = bt[r]; }
}

/* r[i] = xf_rest_mass(u, t), log_s[i] = log1p(r), lse[i] = m + log s  for the 16 lanes
 * (the primitives' epilogue). */
XF_MV void XF_FN(xf_tile_lse)(const XF_T *XF_RESTRICT m, const XF_T *XF_RESTRICT u,
                              const XF_T *XF_RESTRICT t, XF_T *XF_RESTRICT r,
                              XF_T *XF_RESTRICT log_s, XF_T *XF_RESTRICT lse)
{
    for (int i = 0; i < XF_TILE; i++) {
        XF_T rr = XF_FN(xf_rest_mass)(u[i], t[i]);
        XF_T ls = XF_LOG1P(rr);
        r[i] = rr;
        log_s[i] = ls;
        lse[i] = XF_FN(xf_log_sum_exp)(m[i], ls);
    }
}

/* The index-label epilogue of 16 rows, rowmath's formulas lane by lane:
 * loss, lse and (a != NULL) the pass-3 scale a and the true-class gradient gy.
 * x_y, w_y, e_y per row (any finite value for rows that are ignored: the caller
 * overwrites their results); wd = NULL without smoothing. */
XF_MV void XF_FN(xf_tile_sparse_epilogue)(const XF_T *XF_RESTRICT m, const XF_T *XF_RESTRICT u,
                                          const XF_T *XF_RESTRICT t,
                                          const XF_T *XF_RESTRICT x_y,
                                          const XF_T *XF_RESTRICT w_y,
                                          const XF_T *XF_RESTRICT e_y,
                                          const XF_T *XF_RESTRICT wd, XF_T one_m_eps,
                                          XF_T eps_c, XF_T w_sum, XF_T z, XF_T gs,
                                          XF_T *XF_RESTRICT loss, XF_T *XF_RESTRICT lse,
                                          XF_T *XF_RESTRICT a, XF_T *XF_RESTRICT gy)
{
    XF_T r[XF_TILE], ls[XF_TILE], l_se[XF_TILE];
    for (int i = 0; i < XF_TILE; i++) {
        XF_T rr = XF_FN(xf_rest_mass)(u[i], t[i]);
        r[i] = rr;
        ls[i] = XF_LOG1P(rr);
        l_se[i] = XF_FN(xf_log_sum_exp)(m[i], ls[i]);
        lse[i] = l_se[i];
    }
    if (wd == NULL)
        for (int i = 0; i < XF_TILE; i++)
            loss[i] = XF_FN(xf_sparse_loss)(m[i], ls[i], x_y[i], w_y[i], one_m_eps,
                                            (XF_T)0, (XF_T)0, (XF_T)0, z);
    else
        for (int i = 0; i < XF_TILE; i++)
            loss[i] = XF_FN(xf_sparse_loss)(m[i], ls[i], x_y[i], w_y[i], one_m_eps,
                                            eps_c, w_sum, wd[i], z);
    if (a == NULL)
        return;
    for (int i = 0; i < XF_TILE; i++) {
        a[i] = XF_FN(xf_sparse_scale)(r[i], l_se[i], w_y[i], one_m_eps, eps_c, w_sum, z, gs);
        gy[i] = XF_FN(xf_sparse_true_grad)(e_y[i], r[i], l_se[i], w_y[i], one_m_eps, eps_c,
                                           w_sum, z, gs);
    }
}

/* The probability-label epilogue of 16 rows: loss, lse, and (coef != NULL) the
 * pass-3 inputs r, coef = xf_dense_coef(lse, T_off, z) and gs / s. */
XF_MV void XF_FN(xf_tile_dense_epilogue)(const XF_T *XF_RESTRICT m, const XF_T *XF_RESTRICT u,
                                         const XF_T *XF_RESTRICT t,
                                         const XF_T *XF_RESTRICT wd,
                                         const XF_T *XF_RESTRICT t_off,
                                         const XF_T *XF_RESTRICT t_tie, XF_T z, XF_T gs,
                                         XF_T *XF_RESTRICT loss, XF_T *XF_RESTRICT lse,
                                         XF_T *XF_RESTRICT r, XF_T *XF_RESTRICT coef,
                                         XF_T *XF_RESTRICT gs_over_s)
{
    for (int i = 0; i < XF_TILE; i++) {
        XF_T rr = XF_FN(xf_rest_mass)(u[i], t[i]);
        XF_T ls = XF_LOG1P(rr);
        XF_T l_se = XF_FN(xf_log_sum_exp)(m[i], ls);
        lse[i] = l_se;
        loss[i] = XF_FN(xf_dense_loss)(m[i], ls, t_off[i] + t_tie[i], wd[i], z);
        r[i] = rr;
        if (coef != NULL) {
            coef[i] = XF_FN(xf_dense_coef)(l_se, t_off[i], z);
            gs_over_s[i] = XF_FN(xf_grad_over_sum)(rr, gs);
        }
    }
}

/* Pass 3 and write-back: g[r, j] = e[j][r] a[r] - b w_j  (w == NULL: - b). */
XF_MV void XF_FN(xf_tile_store)(const XF_T *XF_RESTRICT tile, XF_T *XF_RESTRICT g,
                                ptrdiff_t rows, ptrdiff_t c, const XF_T *XF_RESTRICT a,
                                XF_T b, const XF_T *XF_RESTRICT w)
{
    if (w == NULL && b == 0 && rows == XF_TILE) {   /* the common case, class-outer */
        for (ptrdiff_t j = 0; j < c; j++)
            for (int r = 0; r < XF_TILE; r++) g[r * c + j] = tile[j * XF_TILE + r] * a[r];
    } else if (w == NULL && b == 0) {
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t j = 0; j < c; j++) g[r * c + j] = tile[j * XF_TILE + r] * a[r];
    } else if (w == NULL) {
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t j = 0; j < c; j++) g[r * c + j] = tile[j * XF_TILE + r] * a[r] - b;
    } else {
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t j = 0; j < c; j++)
                g[r * c + j] = tile[j * XF_TILE + r] * a[r] - b * w[j];
    }
}

/* Dense pass 3 and write-back: g[r, j] = xf_dense_grad(e[j][r], wt, r[r], coef[r],
 * t_tie[r], gs/s[r]), wt = w_j (keep t + add) exactly as in xf_tile_dense_sums. */
XF_MV void XF_FN(xf_tile_store_dense)(const XF_T *XF_RESTRICT te, const XF_T *XF_RESTRICT tt,
                                      XF_T *XF_RESTRICT g, ptrdiff_t rows, ptrdiff_t c,
                                      const XF_T *XF_RESTRICT r, const XF_T *XF_RESTRICT coef,
                                      const XF_T *XF_RESTRICT t_tie,
                                      const XF_T *XF_RESTRICT gs_over_s, XF_T keep,
                                      XF_T add, const XF_T *XF_RESTRICT w)
{
    for (ptrdiff_t i = 0; i < rows; i++)
        for (ptrdiff_t j = 0; j < c; j++) {
            XF_T wt = (w == NULL) ? keep * tt[j * XF_TILE + i] + add
                : XF_FN(xf_smoothed_weight)(w[j], tt[j * XF_TILE + i], keep, add);
            g[i * c + j] = XF_FN(xf_dense_grad)(te[j * XF_TILE + i], wt, r[i], coef[i],
                                                t_tie[i], gs_over_s[i]);
        }
}

/* log_softmax of short rows: out[r, j] = (x[r, j] - m[r]) - log_s[r]; out may be x. */
XF_MV void XF_FN(xf_rows_log_softmax)(const XF_T *x, XF_T *out, ptrdiff_t rows, ptrdiff_t c,
                                      const XF_T *XF_RESTRICT m,
                                      const XF_T *XF_RESTRICT log_s)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        if (out == x) XF_FN(xfi_log_softmax_inplace)(out + r * c, c, m[r], log_s[r]);
        else XF_FN(xfi_log_softmax)(x + r * c, out + r * c, c, m[r], log_s[r]);
    }
}

/* ---- out-of-line, multiversioned copies for long rows ---- */
XF_MV XF_T XF_FN(xf_rowmax)(const XF_T *x, ptrdiff_t n)
{ return XF_FN(xfi_rowmax)(x, n); }
/* Pass 2: returns u, stores t into *t.
 * pf: the next row (same length) to prefetch into L2 while this one is computed, or
 * NULL.  Pass 1 of a long row streams it from DRAM while the core idles; pass 2 is
 * exp-bound while the memory bus idles: prefetching the next row during pass 2
 * overlaps the two (one prefetch per 64-byte step = one cache line per line done). */
XF_MV XF_T XF_FN(xf_expsum)(const XF_T *x, ptrdiff_t n, XF_T m, const XF_T *pf, XF_T *t)
{ return XF_FN(xfi_expsum_)(x, NULL, n, m, pf, t, 0, 0, NULL, 0, NULL, NULL); }
/* e may be x itself (inplace=True) but must not overlap it otherwise; comp: store the
 * compensated exp(x_j - m) (xf_exp*_diff) */
XF_MV XF_T XF_FN(xf_expsum_store)(const XF_T *x, XF_T *e, ptrdiff_t n, XF_T m,
                                  const XF_T *pf, XF_T *t, int comp)
{
    if (comp) {
        if (e == x) return XF_FN(xfi_expsum_)(x, e, n, m, pf, t, 2, 1, NULL, 0, NULL, NULL);
        return XF_FN(xfi_expsum_)(x, e, n, m, pf, t, 1, 1, NULL, 0, NULL, NULL);
    }
    if (e == x) return XF_FN(xfi_expsum_)(x, e, n, m, pf, t, 2, 0, NULL, 0, NULL, NULL);
    return XF_FN(xfi_expsum_)(x, e, n, m, pf, t, 1, 0, NULL, 0, NULL, NULL);
}
/* The same two passes, each also taking the max of nx (n elements: the next row of a
 * run, see xfi_max_step_) into *nx_max: the values of xf_expsum / xf_expsum_store and of
 * xf_rowmax(nx, n), bitwise. */
XF_MV XF_T XF_FN(xf_expsum_max)(const XF_T *x, ptrdiff_t n, XF_T m, const XF_T *pf,
                                XF_T *t, const XF_T *nx, XF_T *nx_max)
{ return XF_FN(xfi_expsum_)(x, NULL, n, m, pf, t, 0, 0, NULL, 1, nx, nx_max); }
XF_MV XF_T XF_FN(xf_expsum_store_max)(const XF_T *x, XF_T *e, ptrdiff_t n, XF_T m,
                                      const XF_T *pf, XF_T *t, int comp, const XF_T *nx,
                                      XF_T *nx_max)
{
    if (comp) {
        if (e == x) return XF_FN(xfi_expsum_)(x, e, n, m, pf, t, 2, 1, NULL, 1, nx, nx_max);
        return XF_FN(xfi_expsum_)(x, e, n, m, pf, t, 1, 1, NULL, 1, nx, nx_max);
    }
    if (e == x) return XF_FN(xfi_expsum_)(x, e, n, m, pf, t, 2, 0, NULL, 1, nx, nx_max);
    return XF_FN(xfi_expsum_)(x, e, n, m, pf, t, 1, 0, NULL, 1, nx, nx_max);
}
/* Pass 2 in place (e_j into x) for the 16-bit path, prefetching the 16-bit rows pf (the
 * next row of logits) and pw (this row's gradient, written after pass 3), either NULL:
 * the values of xf_expsum_store(x, x, ...). */
XF_MV XF_T XF_FN(xf_expsum_inplace_h16)(XF_T *x, ptrdiff_t n, XF_T m, const uint16_t *pf,
                                        const uint16_t *pw, XF_T *t, int comp)
{
    if (comp)
        return XF_FN(xfi_expsum_)(x, x, n, m, (const XF_T *)pf, t, 3, 1, (const char *)pw,
                                  0, NULL, NULL);
    return XF_FN(xfi_expsum_)(x, x, n, m, (const XF_T *)pf, t, 3, 0, (const char *)pw,
                              0, NULL, NULL);
}
/* softmax pass 2: e (may be x itself) gets the compensated e_j; returns 1 / s */
XF_MV XF_T XF_FN(xf_softmax_sum)(const XF_T *x, XF_T *e, ptrdiff_t n, XF_T m,
                                 const XF_T *pf)
{ return XF_FN(xfi_softmax_sum_)(x, e, n, m, pf); }
XF_MV XF_T XF_FN(xf_wdist)(const XF_T *x, const XF_T *w, ptrdiff_t n, XF_T m)
{ return XF_FN(xfi_wdist)(x, w, n, m); }
XF_MV void XF_FN(xf_dense_sums)(const XF_T *x, const XF_T *t, const XF_T *w, ptrdiff_t n,
                                XF_T m, XF_T keep, XF_T add, XF_T *wd, XF_T *t_off,
                                XF_T *t_tie)
{ XF_FN(xfi_dense_sums)(x, t, w, n, m, keep, add, wd, t_off, t_tie); }
XF_MV void XF_FN(xf_scale)(XF_T *g, ptrdiff_t n, XF_T a)
{ XF_FN(xfi_scale)(g, n, a); }
XF_MV void XF_FN(xf_scale_sub)(XF_T *g, const XF_T *w, ptrdiff_t n, XF_T a, XF_T b)
{ XF_FN(xfi_scale_sub)(g, w, n, a, b); }
XF_MV void XF_FN(xf_dense_grad_row)(XF_T *g, const XF_T *t, const XF_T *w, ptrdiff_t n,
                                    XF_T r, XF_T coef, XF_T t_tie, XF_T gs_over_s,
                                    XF_T keep, XF_T add)
{ XF_FN(xfi_dense_grad)(g, t, w, n, r, coef, t_tie, gs_over_s, keep, add); }
XF_MV void XF_FN(xf_log_softmax_row)(const XF_T *x, XF_T *out, ptrdiff_t n, XF_T m,
                                     XF_T log_s)
{
    if (out == x) XF_FN(xfi_log_softmax_inplace)(out, n, m, log_s);
    else XF_FN(xfi_log_softmax)(x, out, n, m, log_s);
}
#undef XF_BLK
#undef XF_FN
#undef XF_CAT
#undef XF_CAT_
/* the parameters of this instantiation (set by _xfrows.h) */
#undef XF_T
#undef XF_L
#undef XF_SUF
#undef XF_EXP_XM
#undef XF_EXP_UNSCALE
#undef XF_EXP_DIFF_S
#undef XF_EXP_DIFF
#undef XF_LOG1P
#undef XF_INV1P
#undef XF_SEL
#undef XF_KEY
#undef XF_KEY_OF
#undef XF_FROM_KEY
