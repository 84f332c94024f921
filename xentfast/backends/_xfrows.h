/*
 * _xfrows.h -- row passes of the Cython backend (see _xfrows_tmpl.h for the scheme and
 * _fastexp.h for exp/log/log1p), instantiated for float (16 lanes) and double (8 lanes),
 * and rowmath.py's per-row maths in C (xf_rest_mass_f/_d, xf_sparse_loss_f/_d, ...:
 * the "rowmath in C" section of _xfrows_tmpl.h).
 *
 * Multiversioning: on x86-64 Linux/glibc with gcc >= 8, the out-of-line xf_* functions
 * are compiled three times -- baseline (SSE2), x86-64-v3 (AVX2 + FMA) and x86-64-v4
 * (AVX-512) -- with target_clones; the dynamic loader picks one for the CPU once (an
 * ifunc).  The build flags stay portable (no -march=native), so a wheel built here runs
 * on any x86-64.  Elsewhere (clang, MSVC, macOS, musl, non-x86 CPUs) XF_MV is plain
 * `static` and the compiler's baseline vectorisation (SSE2 / NEON) is used; define
 * XENTFAST_NO_MULTIVERSION to force that.
 * Results: the lanes fix the order of every sum, so the clones differ only by FMA
 * contraction (v3/v4 fuse a*b+c, the baseline cannot): bitwise reproducible on a given
 * machine at any thread count, within an ulp or two across machines.
 */
#ifndef XENTFAST_XFROWS_H
#define XENTFAST_XFROWS_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include "_fastexp.h"

#if defined(_MSC_VER)
#define XF_RESTRICT __restrict
#else
#define XF_RESTRICT __restrict__
#endif

#if defined(_MSC_VER)
#define XF_ALIGNED __declspec(align(64))
#elif defined(__GNUC__) || defined(__clang__)
#define XF_ALIGNED __attribute__((aligned(64)))
#else
#define XF_ALIGNED
#endif

/* Keep gcc from fully unrolling a 16-lane inner loop whose outer loop it then fails to
 * SLP-vectorise (it leaves 16 scalar FMAs instead of one to four vector ones). */
#if defined(__GNUC__) && !defined(__clang__)
#define XF_NO_UNROLL _Pragma("GCC unroll 1")
#else
#define XF_NO_UNROLL
#endif

/* Ask for a vectorised loop where the compiler's cost model would not (OpenMP 4.0
 * `omp simd`; the build passes -fopenmp).  No reduction is declared, so nothing is
 * reordered: the loop's results are those of the plain loop. */
#if defined(_OPENMP) && _OPENMP >= 201307
#define XF_SIMD _Pragma("omp simd")
#else
#define XF_SIMD
#endif

#if defined(XF_NO_PREFETCH)
#define XF_PREFETCH(p) ((void)0)
#elif defined(__GNUC__) || defined(__clang__)
#define XF_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 2)
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#include <xmmintrin.h>
#define XF_PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
#else
#define XF_PREFETCH(p) ((void)0)
#endif

#if defined(__has_attribute)
#if __has_attribute(target_clones)
#define XF_HAVE_TARGET_CLONES 1
#endif
#endif

#if !defined(XENTFAST_NO_MULTIVERSION) && defined(XF_HAVE_TARGET_CLONES) \
    && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) \
    && !defined(__clang__) && !defined(__INTEL_COMPILER) && defined(__GNUC__) && __GNUC__ >= 8
#define XF_MV static __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), unused, noinline))
#define XF_MULTIVERSIONED 1
#else
#define XF_MV static
#define XF_MULTIVERSIONED 0
#endif

/* 1 / (1 + r_hi + r_lo), r = r_hi + r_lo >= 0 (or NaN), within 0.5 ulp and a hair: the
 * rounding of s = 1 + r and of the division are both corrected (a plain
 * one / (one + r) rounds twice; softmax_j = e_j (1 / s) must stay within 4 ulps).
 * float: in double, rounded once.  double: s + s_lo = 1 + r_hi exactly (TwoSum), plus
 * r_lo; q = 1 / s, res = 1 - q s exactly (one FMA), 1 / (s + s_lo) = q (1 + res - q s_lo)
 * to second order. */
XF_INLINE float xf_inv1p_f_(float r_hi, float r_lo)
{ return (float)(1.0 / ((1.0 + (double)r_hi) + (double)r_lo)); }
XF_INLINE double xf_inv1p_d_(double r_hi, double r_lo)
{
    double s = 1.0 + r_hi;
    double bb = s - 1.0;
    double s_lo = ((1.0 - (s - bb)) + (r_hi - bb)) + r_lo;
    double q = 1.0 / s;
    double res = fma(-q, s, 1.0);
    return q + q * (res - q * s_lo);
}

/* log1p for the 16 lanes of a tile: vectorised for float (see _fastexp.h), libm's for
 * double (one call per row, as before with log). */
XF_INLINE double xf_log1p_d_(double r) { return log1p(r); }

/* Short rows: rows of at most XF_SMALL_C classes are processed XF_TILE at a time. */
#define XF_TILE 16
#ifndef XF_SMALL_C
#define XF_SMALL_C 32
#endif

/* Order-preserving integer keys of floats (an involution; see xfi_rowmax).  The right
 * shift of a negative signed integer is arithmetic on every compiler we build with. */
XF_INLINE int32_t xf_key_f(float f)
{ int32_t s = (int32_t)xf_f2u(f); return s ^ ((s >> 31) & 0x7fffffff); }
XF_INLINE float xf_unkey_f(int32_t k)
{ return xf_u2f((uint32_t)(k ^ ((k >> 31) & 0x7fffffff))); }
XF_INLINE int64_t xf_key_d(double f)
{ int64_t s = (int64_t)xf_d2u(f); return s ^ ((s >> 63) & INT64_C(0x7fffffffffffffff)); }
XF_INLINE double xf_unkey_d(int64_t k)
{ return xf_u2d((uint64_t)(k ^ ((k >> 63) & INT64_C(0x7fffffffffffffff)))); }

#define XF_T float
#define XF_L 16
#define XF_SUF _f
#define XF_EXP xf_expf
#define XF_EXP_Z xf_expf_z
#define XF_EXP_DIFF xf_expf_diff
#define XF_LOG1P xf_log1pf_v
#define XF_INV1P xf_inv1p_f_
#define XF_SEL xf_self
#define XF_KEY int32_t
#define XF_KEY_OF xf_key_f
#define XF_FROM_KEY xf_unkey_f
#include "_xfrows_tmpl.h"
#undef XF_T
#undef XF_L
#undef XF_SUF
#undef XF_EXP
#undef XF_EXP_Z
#undef XF_EXP_DIFF
#undef XF_LOG1P
#undef XF_INV1P
#undef XF_SEL
#undef XF_KEY
#undef XF_KEY_OF
#undef XF_FROM_KEY

#define XF_T double
#define XF_L 8
#define XF_SUF _d
#define XF_EXP xf_exp
#define XF_EXP_Z xf_exp_z
#define XF_EXP_DIFF xf_exp_diff
#define XF_LOG1P xf_log1p_d_
#define XF_INV1P xf_inv1p_d_
#define XF_SEL xf_seld
#define XF_KEY int64_t
#define XF_KEY_OF xf_key_d
#define XF_FROM_KEY xf_unkey_d
#include "_xfrows_tmpl.h"
#undef XF_T
#undef XF_L
#undef XF_SUF
#undef XF_EXP
#undef XF_EXP_Z
#undef XF_EXP_DIFF
#undef XF_LOG1P
#undef XF_INV1P
#undef XF_SEL
#undef XF_KEY
#undef XF_KEY_OF
#undef XF_FROM_KEY

#endif /* XENTFAST_XFROWS_H */
