/*
 * _xfrows_tmpl.h -- the vectorised row passes of xentfast's Cython backend, written
 * once for a generic element type.  Do not include directly: _xfrows.h includes it
 * twice, with
 *     XF_T    element type (float | double), also the accumulation type
 *     XF_L    number of accumulator lanes (16 for float, 8 for double)
 *     XF_SUF  name suffix (_f | _d)
 *     XF_EXP  the exp of _fastexp.h for XF_T;  XF_LOG  a log for XF_T
 *     XF_KEY, XF_KEY_OF, XF_FROM_KEY  the ordered-integer view used by xfi_rowmax
 *
 * Lanes, and why every sum has a fixed order.
 *   Each reduction keeps XF_L independent partial results acc[0..L-1]: element i of a
 *   row goes to lane i mod L, and the lanes are folded by a fixed halving tree
 *   (acc[j] += acc[j + h], h = L/2, L/4, ..., 1).  The inner "for j < L" loops are
 *   element-wise, which the compiler vectorises at any width (4 floats with SSE2, 8 with
 *   AVX2, 16 with AVX-512) WITHOUT reassociating anything -- so every code path and every
 *   thread count produces the same bits.  (A plain "s += v" loop is not vectorised at all
 *   without -ffast-math, because reordering a float sum changes its value.)
 *   The last n mod L elements are copied into an L-wide buffer padded with a neutral
 *   value (-inf for max and exp, 0 for weights), so the tail also runs as one vector
 *   step and lands in the same lanes -- no scalar exp loop of up to L-1 iterations.
 *
 * Naming: xfi_* are static inline (used inside the Cython block code, compiled for the
 * baseline ISA); xf_* (in _xfrows.h) are out-of-line copies, multiversioned with
 * target_clones where the platform supports it, used for long rows.
 */

#define XF_CAT_(a, b) a##b
#define XF_CAT(a, b) XF_CAT_(a, b)
#define XF_FN(name) XF_CAT(name, XF_SUF)

/* Fold the L lanes in a fixed order. */
XF_INLINE XF_T XF_FN(xfi_fold_)(XF_T *acc)
{
    for (int h = XF_L / 2; h >= 1; h /= 2)
        for (int j = 0; j < h; j++)
            acc[j] += acc[j + h];
    return acc[0];
}

/* ---- pass 1: m = max_j x_j ----
 * As an integer max over order-preserving keys: key(f) = bits(f) for f >= +0 and
 * bits(f) with the 31 (63) magnitude bits flipped for negative f, so that
 * key(a) < key(b) <=> a < b for all non-NaN a, b (and -0 < +0).  An integer max is a
 * reduction the vectoriser always recognises (a float "v > m ? v : m" is not, without
 * -ffinite-math-only, and gcc leaves it scalar); max is exact, so its order is free.
 * NaN: a positive NaN has a key above +inf and becomes m, a negative one sorts below
 * -inf and is skipped; either way exp(x_j - m) makes s, lse and the row NaN.
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

/* ---- pass 2: s = sum_j exp(x_j - m), optionally storing e_j = exp(x_j - m) ---- */
XF_INLINE void XF_FN(xfi_exp_step_)(const XF_T *x, XF_T m, XF_T *acc)
{
    for (int j = 0; j < XF_L; j++) acc[j] += XF_EXP(x[j] - m);
}

XF_INLINE void XF_FN(xfi_exp_store_step_)(const XF_T *XF_RESTRICT x, XF_T *XF_RESTRICT e,
                                          XF_T m, XF_T *XF_RESTRICT acc)
{
    for (int j = 0; j < XF_L; j++) {
        XF_T v = XF_EXP(x[j] - m);
        e[j] = v;
        acc[j] += v;
    }
}

XF_INLINE void XF_FN(xfi_exp_inplace_step_)(XF_T *x, XF_T m, XF_T *XF_RESTRICT acc)
{
    for (int j = 0; j < XF_L; j++) {
        XF_T v = XF_EXP(x[j] - m);
        x[j] = v;
        acc[j] += v;
    }
}

XF_INLINE XF_T XF_FN(xfi_expsum)(const XF_T *x, ptrdiff_t n, XF_T m)
{
    XF_T acc[XF_L] = {0}, buf[XF_L];
    ptrdiff_t i = 0, nv = n - n % XF_L;
    for (; i < nv; i += XF_L) XF_FN(xfi_exp_step_)(x + i, m, acc);
    if (i < n) {
        for (int j = 0; j < XF_L; j++) buf[j] = (i + j < n) ? x[i + j] : -INFINITY;
        XF_FN(xfi_exp_step_)(buf, m, acc);   /* exp(-inf - m) = +0: adds nothing */
    }
    return XF_FN(xfi_fold_)(acc);
}

/* e must not overlap x (use xfi_expsum_inplace for e == x). */
XF_INLINE XF_T XF_FN(xfi_expsum_store)(const XF_T *XF_RESTRICT x, XF_T *XF_RESTRICT e,
                                       ptrdiff_t n, XF_T m)
{
    XF_T acc[XF_L] = {0}, buf[XF_L], ebuf[XF_L];
    ptrdiff_t i = 0, nv = n - n % XF_L;
    for (; i < nv; i += XF_L) XF_FN(xfi_exp_store_step_)(x + i, e + i, m, acc);
    if (i < n) {
        for (int j = 0; j < XF_L; j++) buf[j] = (i + j < n) ? x[i + j] : -INFINITY;
        XF_FN(xfi_exp_store_step_)(buf, ebuf, m, acc);
        for (ptrdiff_t j = 0; j < n - i; j++) e[i + j] = ebuf[j];
    }
    return XF_FN(xfi_fold_)(acc);
}

XF_INLINE XF_T XF_FN(xfi_expsum_inplace)(XF_T *x, ptrdiff_t n, XF_T m)
{
    XF_T acc[XF_L] = {0}, buf[XF_L];
    ptrdiff_t i = 0, nv = n - n % XF_L;
    for (; i < nv; i += XF_L) XF_FN(xfi_exp_inplace_step_)(x + i, m, acc);
    if (i < n) {
        for (int j = 0; j < XF_L; j++) buf[j] = (i + j < n) ? x[i + j] : -INFINITY;
        XF_FN(xfi_exp_inplace_step_)(buf, m, acc);
        for (ptrdiff_t j = 0; j < n - i; j++) x[i + j] = buf[j];
    }
    return XF_FN(xfi_fold_)(acc);
}

/* s = sum_j e_j with the same lanes as xfi_expsum_*: bitwise the same s as the fused
 * pass would give for the same e (used after the flat block exp of short rows). */
XF_INLINE XF_T XF_FN(xfi_rowsum)(const XF_T *e, ptrdiff_t n)
{
    XF_T acc[XF_L] = {0}, buf[XF_L];
    ptrdiff_t i = 0, nv = n - n % XF_L;
    for (; i < nv; i += XF_L)
        for (int j = 0; j < XF_L; j++) acc[j] += e[i + j];
    if (i < n) {
        for (int j = 0; j < XF_L; j++) buf[j] = (i + j < n) ? e[i + j] : (XF_T)0;
        for (int j = 0; j < XF_L; j++) acc[j] += buf[j];
    }
    return XF_FN(xfi_fold_)(acc);
}

/* ---- option sums, taken before pass 2 may overwrite x (inplace) ----
 * A = sum_{c: w_c != 0} w_c (m - x_c)   (w == NULL: all w_c = 1)
 * Every term is >= 0 for w >= 0 (m is the row max), so this sum has no cancellation,
 * unlike W*lse - sum_c w_c x_c.  w_c == 0 classes are skipped even at x_c = -inf. */
XF_INLINE XF_T XF_FN(xfi_wdist)(const XF_T *x, const XF_T *w, ptrdiff_t n, XF_T m)
{
    XF_T acc[XF_L] = {0};
    ptrdiff_t i = 0, nv = n - n % XF_L;
    if (w == NULL) {
        for (; i < nv; i += XF_L)
            for (int j = 0; j < XF_L; j++) acc[j] += m - x[i + j];
        for (int j = 0; j < XF_L; j++) acc[j] += (i + j < n) ? m - x[i + j] : (XF_T)0;
    } else {
        for (; i < nv; i += XF_L)
            for (int j = 0; j < XF_L; j++) {
                XF_T wj = w[i + j], d = wj * (m - x[i + j]);
                acc[j] += (wj != 0) ? d : (XF_T)0;
            }
        for (int j = 0; j < XF_L; j++) {
            XF_T wj = (i + j < n) ? w[i + j] : (XF_T)0;
            XF_T d = (i + j < n) ? wj * (m - x[i + j]) : (XF_T)0;
            acc[j] += (wj != 0) ? d : (XF_T)0;
        }
    }
    return XF_FN(xfi_fold_)(acc);
}

/* Dense labels: wt_c = w_c (keep t_c + add), keep = 1 - eps, add = eps / C;
 * *A = sum_{wt_c != 0} wt_c (m - x_c),  *B = sum_c wt_c. */
XF_INLINE void XF_FN(xfi_dense_sums)(const XF_T *x, const XF_T *t, const XF_T *w,
                                     ptrdiff_t n, XF_T m, XF_T keep, XF_T add,
                                     XF_T *A, XF_T *B)
{
    XF_T a[XF_L] = {0}, b[XF_L] = {0};
    ptrdiff_t i = 0, nv = n - n % XF_L;
    for (; i < nv; i += XF_L)
        for (int j = 0; j < XF_L; j++) {
            XF_T wt = keep * t[i + j] + add;
            if (w != NULL) wt = w[i + j] * wt;
            XF_T d = wt * (m - x[i + j]);
            a[j] += (wt != 0) ? d : (XF_T)0;
            b[j] += wt;
        }
    for (; i < n; i++) {           /* < L scalar iterations, no exp: cheap */
        XF_T wt = keep * t[i] + add;
        if (w != NULL) wt = w[i] * wt;
        XF_T d = wt * (m - x[i]);
        a[i % XF_L] += (wt != 0) ? d : (XF_T)0;
        b[i % XF_L] += wt;
    }
    *A = XF_FN(xfi_fold_)(a);
    *B = XF_FN(xfi_fold_)(b);
}

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

/* g_j = g_j a - sc wt_j,  wt_j = w_j (keep t_j + add) exactly as in xfi_dense_sums */
XF_INLINE void XF_FN(xfi_dense_grad)(XF_T *XF_RESTRICT g, const XF_T *XF_RESTRICT t,
                                     const XF_T *XF_RESTRICT w, ptrdiff_t n, XF_T a,
                                     XF_T sc, XF_T keep, XF_T add)
{
    if (w == NULL)
        for (ptrdiff_t i = 0; i < n; i++) g[i] = g[i] * a - sc * (keep * t[i] + add);
    else
        for (ptrdiff_t i = 0; i < n; i++) g[i] = g[i] * a - sc * (w[i] * (keep * t[i] + add));
}

/* out_j = x_j - v  (log_softmax); out must not overlap x unless it IS x. */
XF_INLINE void XF_FN(xfi_sub)(const XF_T *XF_RESTRICT x, XF_T *XF_RESTRICT out,
                              ptrdiff_t n, XF_T v)
{
    for (ptrdiff_t i = 0; i < n; i++) out[i] = x[i] - v;
}

XF_INLINE void XF_FN(xfi_sub_inplace)(XF_T *x, ptrdiff_t n, XF_T v)
{
    for (ptrdiff_t i = 0; i < n; i++) x[i] = x[i] - v;
}

/* ---- short rows: one flat exp over a block of `rows` rows of length c ----
 * e[r c + j] = exp(x[r c + j] - m[r]).  A row of 10 classes is too short to vectorise
 * along, but the block (rows * c elements, contiguous) is not: the row max is
 * broadcast into mb (scratch, rows * c) and the exp runs as one flat loop. */
XF_INLINE void XF_FN(xfi_block_exp)(const XF_T *XF_RESTRICT x, XF_T *XF_RESTRICT e,
                                    ptrdiff_t rows, ptrdiff_t c, const XF_T *XF_RESTRICT m,
                                    XF_T *XF_RESTRICT mb)
{
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t j = 0; j < c; j++) mb[r * c + j] = m[r];
    ptrdiff_t n = rows * c;
    for (ptrdiff_t i = 0; i < n; i++) e[i] = XF_EXP(x[i] - mb[i]);
}

XF_INLINE void XF_FN(xfi_block_exp_inplace)(XF_T *XF_RESTRICT x, ptrdiff_t rows, ptrdiff_t c,
                                            const XF_T *XF_RESTRICT m, XF_T *XF_RESTRICT mb)
{
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t j = 0; j < c; j++) mb[r * c + j] = m[r];
    ptrdiff_t n = rows * c;
    for (ptrdiff_t i = 0; i < n; i++) x[i] = XF_EXP(x[i] - mb[i]);
}

/* out[r] = log(s[r]) for a block of rows (vectorised for float). */
XF_INLINE void XF_FN(xfi_block_log)(const XF_T *XF_RESTRICT s, XF_T *XF_RESTRICT out,
                                    ptrdiff_t rows)
{
    for (ptrdiff_t r = 0; r < rows; r++) out[r] = XF_LOG(s[r]);
}

/* ---- out-of-line, multiversioned copies for long rows ---- */
XF_MV XF_T XF_FN(xf_rowmax)(const XF_T *x, ptrdiff_t n)
{ return XF_FN(xfi_rowmax)(x, n); }
XF_MV XF_T XF_FN(xf_expsum)(const XF_T *x, ptrdiff_t n, XF_T m)
{ return XF_FN(xfi_expsum)(x, n, m); }
/* e may be x itself (inplace=True) but must not overlap it otherwise */
XF_MV XF_T XF_FN(xf_expsum_store)(const XF_T *x, XF_T *e, ptrdiff_t n, XF_T m)
{
    if (e == x) return XF_FN(xfi_expsum_inplace)(e, n, m);
    return XF_FN(xfi_expsum_store)(x, e, n, m);
}
XF_MV XF_T XF_FN(xf_wdist)(const XF_T *x, const XF_T *w, ptrdiff_t n, XF_T m)
{ return XF_FN(xfi_wdist)(x, w, n, m); }
XF_MV void XF_FN(xf_dense_sums)(const XF_T *x, const XF_T *t, const XF_T *w, ptrdiff_t n,
                                XF_T m, XF_T keep, XF_T add, XF_T *A, XF_T *B)
{ XF_FN(xfi_dense_sums)(x, t, w, n, m, keep, add, A, B); }
XF_MV void XF_FN(xf_scale)(XF_T *g, ptrdiff_t n, XF_T a)
{ XF_FN(xfi_scale)(g, n, a); }
XF_MV void XF_FN(xf_scale_sub)(XF_T *g, const XF_T *w, ptrdiff_t n, XF_T a, XF_T b)
{ XF_FN(xfi_scale_sub)(g, w, n, a, b); }
XF_MV void XF_FN(xf_dense_grad)(XF_T *g, const XF_T *t, const XF_T *w, ptrdiff_t n,
                                XF_T a, XF_T sc, XF_T keep, XF_T add)
{ XF_FN(xfi_dense_grad)(g, t, w, n, a, sc, keep, add); }
XF_MV void XF_FN(xf_sub)(const XF_T *x, XF_T *out, ptrdiff_t n, XF_T v)
{ if (out == x) XF_FN(xfi_sub_inplace)(out, n, v); else XF_FN(xfi_sub)(x, out, n, v); }
XF_MV void XF_FN(xf_block_exp)(const XF_T *x, XF_T *e, ptrdiff_t rows, ptrdiff_t c,
                               const XF_T *m, XF_T *mb)
{
    if (e == x) XF_FN(xfi_block_exp_inplace)(e, rows, c, m, mb);
    else XF_FN(xfi_block_exp)(x, e, rows, c, m, mb);
}
XF_MV void XF_FN(xf_block_log)(const XF_T *s, XF_T *out, ptrdiff_t rows)
{ XF_FN(xfi_block_log)(s, out, rows); }

#undef XF_FN
#undef XF_CAT
#undef XF_CAT_
