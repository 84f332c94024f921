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
 *   The last n mod L elements are done by one more full vector step over the window
 *   x[n-L .. n) with the lanes already counted masked out of the sum (see "Tails"
 *   below), so there is no scalar exp loop of up to L-1 iterations.  Maxima need no
 *   lanes: max is exact in any order (xfi_rowmax).
 *
 * Naming: xfi_* are the static inline bodies; xf_* are the out-of-line functions the
 * Cython code calls, multiversioned with target_clones (XF_MV, see _xfrows.h) where
 * the platform supports it.  Long rows (c > XF_SMALL_C) use the row passes; short
 * rows the tile functions further down.
 */

#define XF_CAT_(a, b) a##b
#define XF_CAT(a, b) XF_CAT_(a, b)
#define XF_FN(name) XF_CAT(name, XF_SUF)

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

/* Tails.  With r = n mod L > 0 and n >= L, the last step runs on the full window
 * x[n-L .. n): lanes j < L - r hold elements the main loop already did and add 0, lanes
 * j >= L - r add the r new ones.  A full (unmasked) vector step, and with a store the
 * window is written whole: the overlapped elements get the very same values again.
 * (Masked or buffered tail stores cost 3x on a 65-class row: a load that 4K-aliases a
 * masked store cannot be forwarded and waits for it, i.e. for the whole exp chain, so
 * consecutive rows stopped overlapping; and gcc makes a memcpy call of a copy loop.)
 * Inplace, the window's first L - r elements are overwritten by the main loop, so the
 * window is read into a buffer before it.  Rows shorter than L (not used by the
 * kernels: short rows go to the tiles) pad a buffer with -inf instead.  All three
 * variants put every element in the same lane, so s is bitwise the same whether or
 * not e is stored. */
XF_INLINE void XF_FN(xfi_exp_tail_)(const XF_T *x, XF_T m, XF_T *XF_RESTRICT acc, int first)
{
    for (int j = 0; j < XF_L; j++) {
        XF_T v = XF_EXP(x[j] - m);
        acc[j] += XF_SEL(j >= first, v, (XF_T)0);
    }
}

XF_INLINE void XF_FN(xfi_exp_store_tail_)(const XF_T *XF_RESTRICT x, XF_T *XF_RESTRICT e,
                                          XF_T m, XF_T *XF_RESTRICT acc, int first)
{
    for (int j = 0; j < XF_L; j++) {
        XF_T v = XF_EXP(x[j] - m);
        e[j] = v;
        acc[j] += XF_SEL(j >= first, v, (XF_T)0);
    }
}

XF_INLINE XF_T XF_FN(xfi_expsum)(const XF_T *x, ptrdiff_t n, XF_T m, const XF_T *pf)
{
    XF_ALIGNED XF_T acc[XF_L] = {0};
    XF_ALIGNED XF_T buf[XF_L];
    ptrdiff_t i = 0, nv = n - n % XF_L;
    pf = pf ? pf : x;
    for (; i < nv; i += XF_L) {
        XF_PREFETCH(pf + i);
        XF_FN(xfi_exp_step_)(x + i, m, acc);
    }
    if (i < n && n >= XF_L) {
        XF_FN(xfi_exp_tail_)(x + n - XF_L, m, acc, (int)(XF_L - (n - i)));
    } else if (i < n) {
        for (int j = 0; j < XF_L; j++) buf[j] = (j < n) ? x[j] : -INFINITY;
        XF_FN(xfi_exp_step_)(buf, m, acc);      /* exp(-inf - m) = +0: adds nothing */
    }
    return XF_FN(xfi_fold_)(acc);
}

/* e must not overlap x (use xfi_expsum_inplace for e == x). */
XF_INLINE XF_T XF_FN(xfi_expsum_store)(const XF_T *XF_RESTRICT x, XF_T *XF_RESTRICT e,
                                       ptrdiff_t n, XF_T m, const XF_T *pf)
{
    XF_ALIGNED XF_T acc[XF_L] = {0};
    XF_ALIGNED XF_T buf[XF_L];
    XF_ALIGNED XF_T ebuf[XF_L];
    ptrdiff_t i = 0, nv = n - n % XF_L;
    pf = pf ? pf : x;
    for (; i < nv; i += XF_L) {
        XF_PREFETCH(pf + i);
        XF_FN(xfi_exp_store_step_)(x + i, e + i, m, acc);
    }
    if (i < n && n >= XF_L) {
        XF_FN(xfi_exp_store_tail_)(x + n - XF_L, e + n - XF_L, m, acc, (int)(XF_L - (n - i)));
    } else if (i < n) {
        for (int j = 0; j < XF_L; j++) buf[j] = (j < n) ? x[j] : -INFINITY;
        XF_FN(xfi_exp_store_step_)(buf, ebuf, m, acc);
        for (int j = 0; j < XF_L; j++)
            if (j < n) e[j] = ebuf[j];
    }
    return XF_FN(xfi_fold_)(acc);
}

XF_INLINE XF_T XF_FN(xfi_expsum_inplace)(XF_T *x, ptrdiff_t n, XF_T m, const XF_T *pf)
{
    XF_ALIGNED XF_T acc[XF_L] = {0};
    XF_ALIGNED XF_T buf[XF_L];
    ptrdiff_t i = 0, nv = n - n % XF_L;
    if (nv < n)                                 /* the tail window, before it changes */
        for (int j = 0; j < XF_L; j++) buf[j] = (n >= XF_L) ? x[n - XF_L + j]
                                                           : ((j < n) ? x[j] : -INFINITY);
    pf = pf ? pf : x;
    for (; i < nv; i += XF_L) {
        XF_PREFETCH(pf + i);
        XF_FN(xfi_exp_inplace_step_)(x + i, m, acc);
    }
    if (i < n && n >= XF_L) {
        XF_FN(xfi_exp_store_tail_)(buf, x + n - XF_L, m, acc, (int)(XF_L - (n - i)));
    } else if (i < n) {
        XF_FN(xfi_exp_inplace_step_)(buf, m, acc);
        for (int j = 0; j < XF_L; j++)
            if (j < n) x[j] = buf[j];
    }
    return XF_FN(xfi_fold_)(acc);
}

/* ---- option sums, taken before pass 2 may overwrite x (inplace) ----
 * A = sum_{c: w_c != 0} w_c (m - x_c)   (w == NULL: all w_c = 1)
 * Every term is >= 0 for w >= 0 (m is the row max), so this sum has no cancellation,
 * unlike W*lse - sum_c w_c x_c.  w_c == 0 classes are skipped even at x_c = -inf. */
XF_INLINE XF_T XF_FN(xfi_wdist)(const XF_T *x, const XF_T *w, ptrdiff_t n, XF_T m)
{
    /* Tail as in the exp passes: the full window x[n-L .. n) with the lanes already
     * counted masked out -- no conditional loads (gcc 12.2 -O3 -march=x86-64-v3
     * -fno-trapping-math miscompiled the conditional-load form of this loop). */
    XF_T acc[XF_L] = {0};
    ptrdiff_t i = 0, nv = n - n % XF_L;
    int first = (int)(XF_L - (n - nv));
    if (w == NULL) {
        for (; i < nv; i += XF_L)
            for (int j = 0; j < XF_L; j++) acc[j] += m - x[i + j];
        if (i < n && n >= XF_L)
            for (int j = 0; j < XF_L; j++) {
                XF_T d = m - x[n - XF_L + j];
                acc[j] += XF_SEL(j >= first, d, (XF_T)0);
            }
        else
            for (; i < n; i++) acc[i] += m - x[i];                  /* n < L */
    } else {
        for (; i < nv; i += XF_L)
            for (int j = 0; j < XF_L; j++) {
                XF_T wj = w[i + j], d = wj * (m - x[i + j]);
                acc[j] += XF_SEL(wj != 0, d, (XF_T)0);
            }
        if (i < n && n >= XF_L)
            for (int j = 0; j < XF_L; j++) {
                XF_T wj = w[n - XF_L + j], d = wj * (m - x[n - XF_L + j]);
                acc[j] += XF_SEL(j >= first && wj != 0, d, (XF_T)0);
            }
        else
            for (; i < n; i++) acc[i] += (w[i] != 0) ? w[i] * (m - x[i]) : (XF_T)0;
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
    if (w == NULL)
        for (; i < nv; i += XF_L)
            for (int j = 0; j < XF_L; j++) {
                XF_T wt = keep * t[i + j] + add;
                XF_T d = wt * (m - x[i + j]);
                a[j] += XF_SEL(wt != 0, d, (XF_T)0);
                b[j] += wt;
            }
    else
        for (; i < nv; i += XF_L)
            for (int j = 0; j < XF_L; j++) {
                XF_T wt = w[i + j] * (keep * t[i + j] + add);
                XF_T d = wt * (m - x[i + j]);
                a[j] += XF_SEL(wt != 0, d, (XF_T)0);
                b[j] += wt;
            }
    for (; i < n; i++) {           /* < L scalar iterations, no exp: cheap */
        XF_T wt = keep * t[i] + add;
        if (w != NULL) wt = w[i] * wt;
        XF_T d = wt * (m - x[i]);
        a[i % XF_L] += XF_SEL(wt != 0, d, (XF_T)0);
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

/* ---- short rows (c <= XF_SMALL_C): tiles of XF_TILE rows, transposed ----
 * A row of 10 classes is too short to vectorise along: every per-row loop would be all
 * prologue and epilogue.  So XF_TILE (16) consecutive rows are copied into a tile
 * stored class-major, tile[j * XF_TILE + r] = x[r, j], and every step then runs
 * "vertically", one SIMD lane per row, with no horizontal reductions at all:
 *     m[r] = max_j tile[j][r]     (integer keys, as xfi_rowmax)
 *     e    = exp(tile - m)        (in the tile)
 *     s[r] = sum_j e[j][r]        (sequential over j: a fixed order)
 *     log(s[r])                   (xf_logf over the 16 lanes)
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

/* e = exp(tile - m) into the tile, s[r] = sum_j e[j][r] */
XF_MV void XF_FN(xf_tile_expsum)(XF_T *XF_RESTRICT tile, ptrdiff_t c,
                                 const XF_T *XF_RESTRICT m, XF_T *XF_RESTRICT s)
{
    XF_T acc[XF_TILE] = {0};
    for (ptrdiff_t j = 0; j < c; j++)
        for (int r = 0; r < XF_TILE; r++) {
            XF_T v = XF_EXP(tile[j * XF_TILE + r] - m[r]);
            tile[j * XF_TILE + r] = v;
            acc[r] += v;
        }
    for (int r = 0; r < XF_TILE; r++) s[r] = acc[r];
}

/* A[r] = sum_{w_j != 0} w_j (m[r] - x[j][r])   (w == NULL: all w_j = 1) */
XF_MV void XF_FN(xf_tile_wdist)(const XF_T *XF_RESTRICT tile, const XF_T *XF_RESTRICT w,
                                ptrdiff_t c, const XF_T *XF_RESTRICT m, XF_T *XF_RESTRICT A)
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
    for (int r = 0; r < XF_TILE; r++) A[r] = acc[r];
}

/* Dense: wt = w_j (keep t + add); A[r] = sum_{wt != 0} wt (m[r] - x), B[r] = sum wt */
XF_MV void XF_FN(xf_tile_dense_sums)(const XF_T *XF_RESTRICT tx, const XF_T *XF_RESTRICT tt,
                                     const XF_T *XF_RESTRICT w, ptrdiff_t c,
                                     const XF_T *XF_RESTRICT m, XF_T keep, XF_T add,
                                     XF_T *XF_RESTRICT A, XF_T *XF_RESTRICT B)
{
    XF_T a[XF_TILE] = {0}, b[XF_TILE] = {0};
    for (ptrdiff_t j = 0; j < c; j++) {
        XF_T wj = (w == NULL) ? (XF_T)1 : w[j];
        XF_NO_UNROLL
        for (int r = 0; r < XF_TILE; r++) {
            XF_T wt = wj * (keep * tt[j * XF_TILE + r] + add);   /* wj = 1: exact */
            XF_T d = wt * (m[r] - tx[j * XF_TILE + r]);
            a[r] += XF_SEL(wt != 0, d, (XF_T)0);
            b[r] += wt;
        }
    }
    for (int r = 0; r < XF_TILE; r++) { A[r] = a[r]; B[r] = b[r]; }
}

XF_MV void XF_FN(xf_tile_log)(const XF_T *XF_RESTRICT s, XF_T *XF_RESTRICT out)
{
    for (int r = 0; r < XF_TILE; r++) out[r] = XF_LOG(s[r]);
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

/* Dense pass 3 and write-back: g[r, j] = e[j][r] a[r] - sc wt,  wt = w_j (keep t + add). */
XF_MV void XF_FN(xf_tile_store_dense)(const XF_T *XF_RESTRICT te, const XF_T *XF_RESTRICT tt,
                                      XF_T *XF_RESTRICT g, ptrdiff_t rows, ptrdiff_t c,
                                      const XF_T *XF_RESTRICT a, XF_T sc, XF_T keep,
                                      XF_T add, const XF_T *XF_RESTRICT w)
{
    if (w == NULL) {
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t j = 0; j < c; j++)
                g[r * c + j] = te[j * XF_TILE + r] * a[r]
                               - sc * (keep * tt[j * XF_TILE + r] + add);
    } else {
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t j = 0; j < c; j++)
                g[r * c + j] = te[j * XF_TILE + r] * a[r]
                               - sc * (w[j] * (keep * tt[j * XF_TILE + r] + add));
    }
}

/* log_softmax of short rows: out[r, j] = x[r, j] - v[r]; out may be x itself. */
XF_MV void XF_FN(xf_rows_sub)(const XF_T *x, XF_T *out, ptrdiff_t rows, ptrdiff_t c,
                              const XF_T *XF_RESTRICT v)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        if (out == x) XF_FN(xfi_sub_inplace)(out + r * c, c, v[r]);
        else XF_FN(xfi_sub)(x + r * c, out + r * c, c, v[r]);
    }
}

/* ---- out-of-line, multiversioned copies for long rows ---- */
XF_MV XF_T XF_FN(xf_rowmax)(const XF_T *x, ptrdiff_t n)
{ return XF_FN(xfi_rowmax)(x, n); }
/* pf: the next row (same length) to prefetch into L2 while this one is computed, or
 * NULL.  Pass 1 of a long row streams it from DRAM while the core idles; pass 2 is
 * exp-bound while the memory bus idles: prefetching the next row during pass 2
 * overlaps the two (one prefetch per 64-byte step = one cache line per line done). */
XF_MV XF_T XF_FN(xf_expsum)(const XF_T *x, ptrdiff_t n, XF_T m, const XF_T *pf)
{ return XF_FN(xfi_expsum)(x, n, m, pf); }
/* e may be x itself (inplace=True) but must not overlap it otherwise */
XF_MV XF_T XF_FN(xf_expsum_store)(const XF_T *x, XF_T *e, ptrdiff_t n, XF_T m,
                                  const XF_T *pf)
{
    if (e == x) return XF_FN(xfi_expsum_inplace)(e, n, m, pf);
    return XF_FN(xfi_expsum_store)(x, e, n, m, pf);
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
#undef XF_FN
#undef XF_CAT
#undef XF_CAT_
