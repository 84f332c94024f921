/*
 * _fastexp.h -- vectorisable exp (float32, float64) and log (float32) for xentfast.
 *
 * Why not libm: a call to expf() inside a loop stops gcc/clang from vectorising it
 * (glibc's libmvec is only used under -ffast-math, which xentfast must not use: it
 * would let the compiler assume there are no NaN/inf, and NaN/-inf are part of the
 * contract).  These functions are straight-line code on plain floats and integers --
 * no branches, no tables, no calls -- so the loops that inline them vectorise at -O3
 * with baseline SSE2 (and with AVX2/AVX-512 in the target_clones of _xfrows.h).
 *
 * ---------------------------------------------------------------------------------
 * exp(x), for the arguments xentfast feeds it: x = x_j - max_k x_k <= 0, or NaN.
 *
 *  1. Below LO = -110 (float) / -760 (double) the result is +0: exp(LO) is far below
 *     half the smallest subnormal.  Done at the end, as select(x < LO, +0, result) on the
 *     bits (NaN compares false and passes through; -inf and any x < LO give exactly +0
 *     whatever the steps below made of them).  Selecting the output rather than clamping
 *     the input saves a blend: on AVX-512 the select becomes the zero-masking of the
 *     last multiply.
 *  2. Range reduction (Cody & Waite): k = rint(x / ln2) and r = x - k ln2 with
 *     |r| <= ln2/2 (+ rounding).  rint is the "shifter" trick: t = x*log2(e) + 1.5*2^p
 *     (p = 23 / 52) rounds x/ln2 to an integer held in t's low mantissa bits, k = t - 1.5*2^p
 *     exactly.  ln2 = C1 + C2 with C1 short (few mantissa bits), so k*C1 is exact and
 *     x - k*C1 is exact (Sterbenz); the remaining error is |k C2| rounding, < 1/2 ulp(r).
 *  3. exp(r) by a polynomial on [-ln2/2, ln2/2]:
 *       float : 1 + r + r^2 P4(r), minimax (xf_expf_poly_); relative approximation
 *               error < 3.8e-9 = 2^-28 on the interval (computed), i.e. < 0.07 ulp;
 *               evaluated by Horner, the total error stays about 1 ulp (measured,
 *               below).
 *       double: Taylor series to degree 13 (1 + r + r^2 P11(r)).  Truncation error
 *               |r|^14 / 14! * e^|r| < 0.347^14 / 8.7e10 * 1.42 < 6e-18 < 0.06 ulp;
 *               Horner rounding and the final 1 + r + ... add < 1 ulp.
 *     Measured against double exp (gcc 12, x86-64): every float32 in [-110, 43]
 *     (2.2e9 values): max 0.982 ulp without FMA, 1.010 ulp with it (the AVX2/AVX-512
 *     clones), mean 0.064 ulp (subnormal results counted in subnormal ulps); double
 *     (against expl), 2e7 random points of [-760, 350]: max 0.96 ulp.  So the bound
 *     to rely on is 1.02 ulp (float) / 1 ulp (double).
 *  4. 2^k from bits: (bits(t) << 23) == k << 23 (mod 2^32) because bits(1.5*2^23) has
 *     its low 9 bits zero; adding (127 + 64) << 23 gives the IEEE bits of 2^(k+64).
 *     (Double: << 52 and (1023 + 512) << 52, 2^(k+512).)  Only unsigned shifts and
 *     adds: defined behaviour in C, and SSE2 has them (pslld/paddd, psllq/paddq).
 *     The offset keeps 2^(k+64) a normal number for every k in [-159, 63].
 *  5. result = P(r) * 2^(k+64) * 2^-64.  Multiplying by a power of two is exact
 *     unless the result is subnormal, where it rounds once: subnormal results are
 *     produced (to within 1 ulp of their reduced precision) rather than flushed, so
 *     exp(-95) matches libm; below about -103.98 (float) / -745.2 (double) it is +0
 *     (and below LO by step 1).
 *     NaN propagates through r (NaN) into the product; k from a NaN is garbage but
 *     only ever multiplies the NaN.
 *
 * Domain: the bounds above hold for x in [-inf, 43] (float) / [-inf, 350] (double)
 * and NaN; above that the bit trick overflows.  xentfast only calls it with x <= 0.
 *
 * log(s), float only (used for lse = m + log(s) across a block of rows, where
 * s = sum_j exp(x_j - m) is in [1, C] or NaN): Cephes logf.
 *  1. s = 2^e * f, f in [sqrt(1/2), sqrt(2)), from the exponent/mantissa bits.
 *  2. log(f) = u - u^2/2 + u^3 P8(u), u = f - 1 (minimax, rel. error < 3.6e-9, computed).
 *  3. log(s) = log(f) + e*C2 + e*C1 with ln2 = C1 + C2 as in exp.
 *  Special values by select: NaN and s < 0 -> NaN, 0 -> -inf, +inf -> +inf.
 *  Subnormal s is outside its domain (never happens: s >= 1).  Measured against
 *  logl over every positive normal float32: max 0.83 ulp.
 *  float64 uses libm log1p (one call per row; not worth a vector version).
 *
 * log1p(r), float, vectorisable (xf_log1pf_v): the rows' log s = log1p(r), r >= 0 the
 * rest mass (see rowmath.py), for the 16 rows of a tile at once (long rows call libm's
 * log1pf once per row).  w = 1 + r rounds r; then
 *      log1p(r) = log(w) - ((w - 1) - r) / w
 *  recovers the part of r that w lost, to first order: w - 1 is exact (Sterbenz, for
 *  w <= 2^24), (w - 1) - r is exactly the rounding error of w, and d log w = dw / w.
 *  For r below half an ulp of 1, w = 1, log w = 0 and the correction is r itself, so the
 *  result keeps full relative precision for a confident row's r ~ 1e-17 too.  Measured
 *  against log1pl over every float r in [2^-40, 64) (3.9e8 values, with and without
 *  FMA): max 1.26 ulp; below 2^-40 the result is r itself (exact to 0.5 ulp).
 *  NaN in, NaN out.  (r = +inf would give NaN; a rest mass is never infinite.)  This
 *  must be compiled without reassociation (the build never uses -ffast-math): with it
 *  (w - 1) - r folds to 0.
 * ---------------------------------------------------------------------------------
 *
 * Precision/reproducibility rule: these are pure functions of their argument, built
 * from +, -, *, comparisons and integer ops.  The build allows FMA contraction
 * (-ffp-contract=fast), which only the AVX2/AVX-512 clones can use, so results are
 * bitwise reproducible on one machine and may differ by an ulp between machines; the
 * error bounds above hold either way (measured both ways).
 */
#ifndef XENTFAST_FASTEXP_H
#define XENTFAST_FASTEXP_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define XF_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define XF_INLINE static __forceinline
#else
#define XF_INLINE static inline
#endif

XF_INLINE uint32_t xf_f2u(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
XF_INLINE float xf_u2f(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }
XF_INLINE uint64_t xf_d2u(double f) { uint64_t u; memcpy(&u, &f, sizeof u); return u; }
XF_INLINE double xf_u2d(uint64_t u) { double f; memcpy(&f, &u, sizeof f); return f; }

/* Selects, c ? a : b, through an all-ones/all-zeros integer mask, to keep the exp
 * loops straight-line.  With a plain ternary, gcc "threads" the branch (it
 * constant-folds exp(-110) on one side) and, since FP operations may trap under the
 * default -ftrapping-math, cannot if-convert it back: "control flow in loop", no
 * vectorisation.  (-fno-trapping-math would allow it, but gcc 12.2 miscompiles a
 * masked conditional reduction under -O3 -march=x86-64-v3 -fno-trapping-math, so the
 * build does not use that flag; see NOTES_cython_kernels.md.)
 * float: vectorises with baseline SSE2 and above.
 * double: the 64-bit mask needs AVX2 (SSE2 has no 64-bit compares to build it from),
 *   so the float64 exp loops are vectorised in the AVX2/AVX-512 clones and scalar in a
 *   baseline-only build. */
XF_INLINE float xf_self(int c, float a, float b)
{
    uint32_t m = 0u - (uint32_t)(c != 0);
    return xf_u2f((xf_f2u(a) & m) | (xf_f2u(b) & ~m));
}
XF_INLINE double xf_seld(_Bool c, double a, double b)
{
    uint64_t m = (uint64_t)0 - (uint64_t)c;
    return xf_u2d((xf_d2u(a) & m) | (xf_d2u(b) & ~m));
}

/* P(r) of step 3 for float: exp(r) = 1 + r + r^2 P(r) on [-ln2/2, ln2/2], degree 4
 * (exp to degree 6), minimax for the relative error of exp with float32 coefficients
 * (Lawson-weighted least squares on 4000 Chebyshev nodes, coefficients rounded):
 * approximation error < 3.8e-9 = 0.063 ulp.  It replaced Cephes' degree-5 P (exp to
 * degree 7, 1.1e-9): one FMA less in the exp-bound passes, and the same measured
 * accuracy -- every float32 x in [-110, 43] against double exp: max 0.982 ulp without
 * FMA, 1.010 with (Cephes: 0.982 / 1.010), mean 0.064 ulp either way. */
XF_INLINE float xf_expf_poly_(float r)
{
    float p = 1.3814570848e-3f;
    p = p * r + 8.3687305450e-3f;
    p = p * r + 4.1668388993e-2f;
    p = p * r + 1.6666521132e-1f;
    p = p * r + 4.9999994040e-1f;
    return p;
}

/* d = x - m, rounded, and *err = (x - m) - d exactly (Knuth's TwoSum: bb = d - x,
 * err = (x - (d - bb)) + (-m - bb); no ordering of |x|, |m| needed): the rounding of
 * the difference that xf_expf_xm64 / xf_expf_diff64 (and the double ones) put back. */
XF_INLINE float xf_diff_err_f(float x, float m, float *err)
{
    float d = x - m;
    float bb = d - x;
    *err = (x - (d - bb)) + (-m - bb);
    return d;
}
XF_INLINE double xf_diff_err_d(double x, double m, double *err)
{
    double d = x - m;
    double bb = d - x;
    *err = (x - (d - bb)) + (-m - bb);
    return d;
}

/* exp(x) 2^64 for float, x <= 43 or NaN, with `err` added to the reduced argument (the
 * rounding of x = fl(x_j - m), see xf_expf_xm64; err = -0 adds nothing: r + -0 = r for
 * every r, and the compiler drops it) -- step 5 without its last, exact multiply: the
 * product P(r) 2^(k+64) is exact, a normal number for every x >= LO -- and +0 where
 * `zero` is nonzero (a select that costs nothing more than step 1's: pass 2 uses it to
 * leave the ties at the row max out of a sum).  Sums of exp in pass 2 add these scaled
 * terms and scale the total once (XF_EXPF_UNSCALE): one multiply less per element, and
 * terms whose exp is subnormal keep their full precision; every sum of normal terms is
 * bitwise the sum of the exp's (a power-of-two factor commutes with each rounding). */
#define XF_EXPF_UNSCALE 5.42101086242752217e-20f   /* 2^-64 */
XF_INLINE float xf_expf_red64_(float x, float err, int zero)
{
    const float shifter = 12582912.0f;            /* 1.5 * 2^23 */
    int under = x < -110.0f;                      /* step 1; NaN compares false */
    float t = x * 1.44269504088896341f + shifter; /* step 2: t = rint(x/ln2) + shifter */
    float k = t - shifter;
    float r = x - k * 0.693359375f;               /* C1: 9 significant bits, exact */
    r = r - k * -2.12194440e-4f;                  /* C2 = ln2 - C1 */
    r = r + err;                                  /* xf_expf_xm64 (err = -0: r itself) */
    float z = r * r;                              /* step 3 */
    float p = xf_expf_poly_(r);
    p = p * z + r + 1.0f;
    /* step 4: 2^(k+64) */
    float scale = xf_u2f((xf_f2u(t) << 23) + ((uint32_t)(127 + 64) << 23));
    return xf_self(under | zero, 0.0f, p * scale);                  /* steps 5, 1 */
}

/* exp(x - m) 2^64 for float, x <= m or NaN, and +0 where `zero`: the terms of every sum
 * of exponentials (pass 2: the loss, lse, log_softmax) and float32 gradients' e_j.
 * d = x - m rounds, and exp turns an absolute error in d into a relative one in e:
 * exp(d) alone is up to |x - m| / 2 ulps from exp(x - m) (44 ulps at float32's spread
 * of 87), and a confident row's loss, log1p of the sum of such terms, inherited it
 * (41 ulps for the row [72.164894, 4.7841673]: d = -67.38 carries 3.8e-6).  So the
 * rounding error err = (x - m) - d, exact in floating point (xf_diff_err_f), is
 * added to the reduced argument: r = (d - k ln2) + err is the
 * reduced argument of x - m itself, with one rounding more (|r| < 0.35: at most
 * 2^-26 relative in the result).  Five additions more than exp(d), none on the FMA
 * pipes.  A tie (x = m) gives d = err = 0 and e = 1 exactly; a masked x = -inf gives
 * d = -inf and err = NaN: +0 by step 1.  Must be compiled without reassociation (it
 * would fold err to 0); the build never uses -ffast-math.  Measured against expq of the
 * exact x - m (gcc 12, 2e7 random pairs, |m| in [0.01, 1e4], x - m in [-103, 0]): max
 * 1.18 ulp with FMA, 1.14 without (exp of the rounded d: 64.5).  The price: about 30%
 * more time in an exp-bound pass (25 vector operations an element instead of 19). */
XF_INLINE float xf_expf_xm64(float x, float m, int zero)
{
    float err, d = xf_diff_err_f(x, m, &err);
    return xf_expf_red64_(d, err, zero);
}

/* exp(x) for float, x <= 43 or NaN; see the header comment (step 5: exp(x) 2^64 times
 * 2^-64, rounded once).  The values the accuracy figures above are about; the kernels
 * exponentiate x_j - m with xf_expf_xm64 (the rounding of the difference put back) and
 * scale where they need e_j itself. */
XF_INLINE float xf_expf(float x) { return xf_expf_red64_(x, -0.0f, 0) * XF_EXPF_UNSCALE; }

/* exp(x) 2^512 for double, x <= 350 or NaN, and +0 where `zero`, with `err` added to
 * the reduced argument; see xf_expf_red64_. */
#define XF_EXP_UNSCALE_D 7.4583407312002067432909653e-155    /* 2^-512 */
XF_INLINE double xf_exp_red512_(double x, double err, _Bool zero)
{
    const double shifter = 6755399441055744.0;    /* 1.5 * 2^52 */
    _Bool under = x < -760.0;
    double t = x * 1.4426950408889634074 + shifter;
    double k = t - shifter;
    double r = x - k * 6.93145751953125e-1;       /* C1 (Cephes): 14 significant bits, exact */
    r = r - k * 1.42860682030941723212e-6;        /* C2 */
    r = r + err;                                  /* xf_exp_xm512 (err = -0: r itself) */
    double z = r * r;
    double p = 1.0 / 6227020800.0;                /* 1/13! */
    p = p * r + 1.0 / 479001600.0;                /* 1/12! */
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * z + r + 1.0;
    double scale = xf_u2d((xf_d2u(t) << 52) + ((uint64_t)(1023 + 512) << 52));
    return xf_seld(under | zero, 0.0, p * scale);
}

/* exp(x - m) 2^512 for double, x <= m or NaN, and +0 where `zero`: xf_expf_xm64's
 * compensated reduction (exp(d) alone: up to 350 ulps at float64's spread of 700).
 * Measured as xf_expf_xm64 (x - m in [-740, 0], |m| up to 1e6): max 1.16 ulp with
 * FMA, 1.13 without (exp of the rounded d: 512). */
XF_INLINE double xf_exp_xm512(double x, double m, _Bool zero)
{
    double err, d = xf_diff_err_d(x, m, &err);
    return xf_exp_red512_(d, err, zero);
}

/* exp(x) for double, x <= 350 or NaN; see the header comment and xf_expf. */
XF_INLINE double xf_exp(double x) { return xf_exp_red512_(x, -0.0, 0) * XF_EXP_UNSCALE_D; }

/* exp(x - m) for x <= m, within 0.82 ulp, for the e_j that are results themselves
 * (softmax at any precision, float64 gradients); pass 2's sums and float32 gradients
 * use xf_expf_xm64 / xf_exp_xm512 (the first correction only, 1.2 ulps).
 * Two errors of exp(d), d = x - m, are removed:
 *  - the rounding of d (as numba_cpu's _exp_diff): its error err = (x - m) - d is exact
 *    in floating point (Knuth's TwoSum: bb = d - x, err = (x - (d - bb)) + (-m - bb)),
 *    and exp(x - m) = exp(d) (1 + err) to within err^2.  Without it the relative error
 *    of e is up to |x - m| / 2 ulps (the rounding of d, amplified by exp): 4 ulps at a
 *    spread of 8, 44 at float32's 87, 350 at float64's 700;
 *  - the rounding of r + r^2 P(r) before the final + 1 (up to 0.5 ulp of the result
 *    when it is below 1): 1 + r is split exactly into hi + lo (Fast2Sum, |r| < 1) and
 *    exp(r)(1 + err) = hi + (y + err (hi + y)),  y = lo + r^2 P(r),
 *    so the only rounding of size is the last addition (0.5 ulp; the polynomial and
 *    the small terms add the rest of the 0.8 measured below).
 * A masked x = -inf gives d = -inf: +0 by step 1 whatever err (NaN) is; a tie gives
 * d = err = r = 0 and e = 1 exactly; NaN propagates.  Must be compiled without
 * reassociation (which would fold err and lo to 0); the build never uses -ffast-math.
 * About 10 operations more than exp(d).  Measured against expl / expq (gcc 12, with
 * and without FMA; normal results): float, 5e7 random (x, m) with x - m in [-103, 0]:
 * max 0.81 ulp (exp(x - m): 64.5); double, 2e7 pairs with x - m in [-740, 0]: max
 * 0.79 ulp (exp(x - m): 512).
 * xf_expf_diff64 / xf_exp_diff512 return the value times 2^64 / 2^512 before its last,
 * exact multiply (as xf_expf_red64_): the terms pass 2 sums. */
XF_INLINE float xf_expf_diff64(float x, float m)
{
    const float shifter = 12582912.0f;
    float err, d = xf_diff_err_f(x, m, &err);
    int under = d < -110.0f;
    float t = d * 1.44269504088896341f + shifter;
    float k = t - shifter;
    float r = d - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float z = r * r;
    float p = xf_expf_poly_(r);
    float hi = 1.0f + r;
    float lo = (1.0f - hi) + r;                   /* exact: |r| < 1 */
    float y = p * z + lo;
    float c = err * (hi + y) + y;
    p = hi + c;
    float scale = xf_u2f((xf_f2u(t) << 23) + ((uint32_t)(127 + 64) << 23));
    return xf_self(under, 0.0f, p * scale);
}

/* exp(x - m), compensated: xf_expf_diff64's exp(x - m) 2^64 times 2^-64 (see
 * xf_expf_red64_: the same split, so that sums can add the exact scaled terms). */
XF_INLINE float xf_expf_diff(float x, float m) { return xf_expf_diff64(x, m) * XF_EXPF_UNSCALE; }

XF_INLINE double xf_exp_diff512(double x, double m)
{
    const double shifter = 6755399441055744.0;
    double err, d = xf_diff_err_d(x, m, &err);
    _Bool under = d < -760.0;
    double t = d * 1.4426950408889634074 + shifter;
    double k = t - shifter;
    double r = d - k * 6.93145751953125e-1;
    r = r - k * 1.42860682030941723212e-6;
    double z = r * r;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    double hi = 1.0 + r;
    double lo = (1.0 - hi) + r;
    double y = p * z + lo;
    double c = err * (hi + y) + y;
    p = hi + c;
    double scale = xf_u2d((xf_d2u(t) << 52) + ((uint64_t)(1023 + 512) << 52));
    return xf_seld(under, 0.0, p * scale);
}

XF_INLINE double xf_exp_diff(double x, double m) { return xf_exp_diff512(x, m) * XF_EXP_UNSCALE_D; }

/* log(s) for float, s normal positive, +inf, 0, negative or NaN; see above. */
XF_INLINE float xf_logf(float s)
{
    uint32_t u = xf_f2u(s);
    float e = (float)(int32_t)((u >> 23) & 0xffu) - 126.0f;   /* s = 2^e * f, f in [.5,1) */
    float f = xf_u2f((u & 0x007fffffu) | 0x3f000000u);
    int small = f < 0.707106781186547524f;                     /* f < sqrt(1/2) */
    e = xf_self(small, e - 1.0f, e);
    f = xf_self(small, f + f, f);
    float x = f - 1.0f;
    float z = x * x;
    float y = 7.0376836292e-2f;
    y = y * x - 1.1514610310e-1f;
    y = y * x + 1.1676998740e-1f;
    y = y * x - 1.2420140846e-1f;
    y = y * x + 1.4249322787e-1f;
    y = y * x - 1.6668057665e-1f;
    y = y * x + 2.0000714765e-1f;
    y = y * x - 2.4999993993e-1f;
    y = y * x + 3.3333331174e-1f;
    y = y * x * z;
    y = y + e * -2.12194440e-4f;
    y = y - 0.5f * z;
    float r = x + y;
    r = r + e * 0.693359375f;
    r = xf_self(s == INFINITY, s, r);
    r = xf_self(s == 0.0f, -INFINITY, r);
    r = xf_self(s < 0.0f, NAN, r);
    r = xf_self(s != s, s, r);          /* NaN in, the same NaN out */
    return r;
}

/* log1p(r) for float r >= 0 or NaN; see the header comment. */
XF_INLINE float xf_log1pf_v(float r)
{
    float w = 1.0f + r;
    return xf_logf(w) - ((w - 1.0f) - r) / w;
}

#endif /* XENTFAST_FASTEXP_H */
