/*
 * _xfrows.h -- row passes of the Cython backend (see _xfrows_tmpl.h for the scheme and
 * _fastexp.h for exp/log/log1p), instantiated for float (16 lanes) and double (8 lanes),
 * and rowmath.py's per-row maths in C (xf_rest_mass_f/_d, xf_sparse_loss_f/_d, ...:
 * the "rowmath in C" section of _xfrows_tmpl.h); and the 16-bit loads and stores
 * (float16 / bfloat16 bits <-> float32, xf_load_h16 / xf_store_h16).
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
/* gcc's -O3 unroll-and-jam (-floop-unroll-and-jam) of a tile's class loop j pairs j
 * and j + 1 around a 16-lane loop over rows, which it then leaves scalar: the dense
 * label sums of short rows ran scalar (xf_tile_dense_sums). */
#if defined(__GNUC__) && !defined(__clang__)
#define XF_NO_UNROLL_AND_JAM __attribute__((optimize("no-loop-unroll-and-jam")))
#else
#define XF_NO_UNROLL_AND_JAM
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

/* ==== 16-bit storage: float16 / bfloat16 bits <-> float32 ===========================
 * 16-bit logits are read as their bits (uint16_t), widened to float32 in the load, and
 * every computation runs in float32; a 16-bit gradient is computed in float32 and
 * rounded ONCE on its way out.  So the results are bitwise those of "upcast to float32,
 * run the float32 kernel, cast the gradient back" -- the conversions below are
 * bit-exact copies of NumPy's (float16) and ml_dtypes' (bfloat16) casts:
 *   load  float16 -> float32: exact, subnormals included; inf stays inf; a NaN keeps
 *         its payload (shifted; a signalling NaN stays signalling, as NumPy's cast);
 *         bfloat16 -> float32: the bits << 16 (exact, everything kept).
 *   store float32 -> float16: round to nearest even, overflow (|f| >= 65520) to inf,
 *         subnormals rounded exactly (the add of 0.5f aligns the 10 kept bits at the
 *         bottom of the float's mantissa and rounds them by the FPU's own RNE; needs
 *         the default rounding mode and no flush-to-zero/denormals-are-zero, which
 *         Python leaves alone); NaN -> 0x7c00 | (top 10 payload bits, at least 1)
 *         with its sign (NumPy's rule: a NaN never becomes inf);
 *         float32 -> bfloat16: round to nearest even on the bits ((x + 0x7fff + lsb)
 *         >> 16, overflow carries into inf), NaN -> 0x7fc0 with its sign (ml_dtypes).
 * Integer bit arithmetic and mask selects only (no libgcc _Float16 helpers, no F16C
 * requirement): every clone, baseline SSE2 included, vectorises the loops. */
#define XF_HALF_F16 1
#define XF_HALF_BF16 2

XF_INLINE uint32_t xf_selu(int c, uint32_t a, uint32_t b)
{ uint32_t m = 0u - (uint32_t)(c != 0); return (a & m) | (b & ~m); }

XF_INLINE float xf_f16_to_f32(uint32_t h)
{
    uint32_t em = h & 0x7fffu, sign = (h & 0x8000u) << 16;
    uint32_t e = em & 0x7c00u, o = em << 13;
    uint32_t norm = o + (112u << 23);                    /* exponent bias 15 -> 127 */
    uint32_t special = o | 0x7f800000u;                  /* inf, NaN (payload kept) */
    uint32_t sub = xf_f2u((float)(int32_t)em * 0x1p-24f);   /* 0, subnormals: exact */
    uint32_t r = xf_selu(e == 0x7c00u, special, norm);
    r = xf_selu(e == 0, sub, r);
    return xf_u2f(r | sign);
}

XF_INLINE uint32_t xf_f32_to_f16(float f)
{
    uint32_t x = xf_f2u(f), a = x & 0x7fffffffu, sign = (x >> 16) & 0x8000u;
    uint32_t sub = xf_f2u(xf_u2f(a) + 0.5f) - 0x3f000000u;  /* |f| < 2^-14 */
    uint32_t norm = (a + ((a >> 13) & 1u) + 0xfffu - (112u << 23)) >> 13; /* may carry to inf */
    uint32_t pay = (a >> 13) & 0x3ffu;
    uint32_t nan = 0x7c00u | xf_selu(pay == 0, 1u, pay);
    uint32_t r = xf_selu((int32_t)a < 0x38800000, sub, norm);
    r = xf_selu((int32_t)a >= 0x47800000, 0x7c00u, r);
    r = xf_selu((int32_t)a > 0x7f800000, nan, r);
    return r | sign;
}

XF_INLINE float xf_bf16_to_f32(uint32_t h) { return xf_u2f(h << 16); }

XF_INLINE uint32_t xf_f32_to_bf16(float f)
{
    uint32_t x = xf_f2u(f);
    uint32_t r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    uint32_t nan = ((x >> 16) & 0x8000u) | 0x7fc0u;
    return xf_selu((int32_t)(x & 0x7fffffffu) > 0x7f800000, nan, r);
}

/* float16 by the F16C instructions (every AVX2 CPU has them; 3-5x faster than the bit
 * arithmetic above: one thread, L2-resident rows, ~0.20 -> ~0.07 ns/element load,
 * ~0.38 -> ~0.07 store, 2026-12-02 on the project VM): picked
 * at run time, x86-64 with gcc/clang only.  Same values as the bit arithmetic -- exact
 * widening, round to nearest even (from imm8 = 0, not from MXCSR) with overflow to inf
 * and exact subnormals -- except that a SIGNALLING NaN comes out quiet (payload kept).
 * The kernels' gradients are arithmetic results, never signalling NaNs, and a NaN logit
 * makes its row NaN either way, so the kernels' outputs do not change (tests). */
#if !defined(XENTFAST_NO_F16C) && (defined(__GNUC__) || defined(__clang__)) \
    && defined(__x86_64__)
#include <immintrin.h>
#define XF_HAVE_F16C 1
__attribute__((target("avx,f16c"))) static void
xf_load_f16_f16c(const uint16_t *XF_RESTRICT h, float *XF_RESTRICT x, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    if (i < n) {                                /* the tail through a buffer */
        uint16_t hb[8] = {0};
        float xb[8];
        for (ptrdiff_t k = 0; k < n - i; k++) hb[k] = h[i + k];
        _mm256_storeu_ps(xb, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)hb)));
        for (ptrdiff_t k = 0; k < n - i; k++) x[i + k] = xb[k];
    }
}

__attribute__((target("avx,f16c"))) static void
xf_store_f16_f16c(const float *XF_RESTRICT x, uint16_t *XF_RESTRICT h, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    if (i < n) {
        float xb[8] = {0};
        uint16_t hb[8];
        for (ptrdiff_t k = 0; k < n - i; k++) xb[k] = x[i + k];
        _mm_storeu_si128((__m128i *)hb, _mm256_cvtps_ph(_mm256_loadu_ps(xb),
                                                        _MM_FROUND_TO_NEAREST_INT));
        for (ptrdiff_t k = 0; k < n - i; k++) h[i + k] = hb[k];
    }
}

static int xf_f16c_state = -1;               /* -1 unknown; a benign race: idempotent */
static int xf_use_f16c(void)
{
    if (xf_f16c_state < 0) {
        __builtin_cpu_init();
        xf_f16c_state = __builtin_cpu_supports("avx2") ? 1 : 0;   /* AVX2 => F16C */
    }
    return xf_f16c_state;
}
#else
#define XF_HAVE_F16C 0
static inline int xf_use_f16c(void) { return 0; }
#endif

/* x[i] = float32 of the 16-bit h[i] (kind: XF_HALF_F16 | XF_HALF_BF16) */
XF_MV void xf_load_h16_bits(const uint16_t *XF_RESTRICT h, float *XF_RESTRICT x, ptrdiff_t n,
                            int kind)
{
    if (kind == XF_HALF_BF16)
        for (ptrdiff_t i = 0; i < n; i++) x[i] = xf_bf16_to_f32(h[i]);
    else
        for (ptrdiff_t i = 0; i < n; i++) x[i] = xf_f16_to_f32(h[i]);
}

/* h[i] = x[i] rounded once to the 16-bit format */
XF_MV void xf_store_h16_bits(const float *XF_RESTRICT x, uint16_t *XF_RESTRICT h, ptrdiff_t n,
                             int kind)
{
    if (kind == XF_HALF_BF16)
        for (ptrdiff_t i = 0; i < n; i++) h[i] = (uint16_t)xf_f32_to_bf16(x[i]);
    else
        for (ptrdiff_t i = 0; i < n; i++) h[i] = (uint16_t)xf_f32_to_f16(x[i]);
}

/* The loads and stores the kernels use: F16C for float16 where the CPU has it, the bit
 * arithmetic otherwise (the tests call both, through _cython.half_to_float / ...). */
static void xf_load_h16(const uint16_t *h, float *x, ptrdiff_t n, int kind)
{
#if XF_HAVE_F16C
    if (kind == XF_HALF_F16 && xf_use_f16c()) { xf_load_f16_f16c(h, x, n); return; }
#endif
    xf_load_h16_bits(h, x, n, kind);
}

static void xf_store_h16(const float *x, uint16_t *h, ptrdiff_t n, int kind)
{
#if XF_HAVE_F16C
    if (kind == XF_HALF_F16 && xf_use_f16c()) { xf_store_f16_f16c(x, h, n); return; }
#endif
    xf_store_h16_bits(x, h, n, kind);
}

/* ==== pass 3 with non-temporal stores: g[i] = e[i] * a =============================
 * A long row's gradient written the plain way costs three trips over the memory bus:
 * the write-allocate read of each line of g (its old contents), then the write back --
 * plus the logits' read.  When pass 2 leaves e_j in a per-thread buffer instead (in
 * cache), pass 3 can write g with streaming stores that skip the read: two trips
 * instead of three, for calls far bigger than the caches (the kernels choose; see
 * _STREAM_MIN_BYTES).  Same products, bitwise (one multiply each, as xf_scale).
 * x86-64 with gcc/clang: AVX-512F (64-byte stores) or AVX (32-byte) picked at run time;
 * the unaligned head and tail of a row by plain stores.  The caller ends its stores
 * with xf_stream_fence (an sfence: later reads by any thread see them). */
#if !defined(XENTFAST_NO_STREAM) && (defined(__GNUC__) || defined(__clang__)) \
    && defined(__x86_64__)
#include <immintrin.h>
#define XF_HAVE_STREAM 1
#define XF_STREAM_FN(SUF, T, TGT, VT, W, SET1, MUL, LOADU, STREAM)                      \
__attribute__((target(TGT))) static void                                              \
xf_scale_stream_##SUF(const T *XF_RESTRICT e, T *XF_RESTRICT g, ptrdiff_t n, T a)      \
{                                                                                     \
    ptrdiff_t i = 0, lanes = W / (ptrdiff_t)sizeof(T);                                \
    const VT va = SET1(a);                                                            \
    while (i < n && ((uintptr_t)(g + i) & (uintptr_t)(W - 1)) != 0) {                 \
        g[i] = e[i] * a;                                                              \
        i++;                                                                          \
    }                                                                                 \
    for (; i + lanes <= n; i += lanes)                                                \
        STREAM(g + i, MUL(LOADU(e + i), va));                                         \
    for (; i < n; i++) g[i] = e[i] * a;                                               \
}
XF_STREAM_FN(f512, float, "avx512f", __m512, 64, _mm512_set1_ps, _mm512_mul_ps,
             _mm512_loadu_ps, _mm512_stream_ps)
XF_STREAM_FN(d512, double, "avx512f", __m512d, 64, _mm512_set1_pd, _mm512_mul_pd,
             _mm512_loadu_pd, _mm512_stream_pd)
XF_STREAM_FN(f256, float, "avx", __m256, 32, _mm256_set1_ps, _mm256_mul_ps,
             _mm256_loadu_ps, _mm256_stream_ps)
XF_STREAM_FN(d256, double, "avx", __m256d, 32, _mm256_set1_pd, _mm256_mul_pd,
             _mm256_loadu_pd, _mm256_stream_pd)
#undef XF_STREAM_FN

static int xf_stream_isa = -1;             /* -1 unknown, 0 none, 1 AVX, 2 AVX-512F */
static int xf_stream_level(void)
{
    if (xf_stream_isa < 0) {               /* a benign race: idempotent */
        __builtin_cpu_init();
        xf_stream_isa = __builtin_cpu_supports("avx512f") ? 2
                        : __builtin_cpu_supports("avx") ? 1 : 0;
    }
    return xf_stream_isa;
}
static void xf_stream_fence(void) { _mm_sfence(); }
#else
#define XF_HAVE_STREAM 0
static int xf_stream_level(void) { return 0; }
static void xf_stream_fence(void) { }
#endif

/* 1 where the kernels may stream gradients (above), 0 where xf_scale_stream_f / _d
 * would be plain stores */
static int xf_can_stream(void) { return xf_stream_level() > 0; }

static void xf_scale_stream_f(const float *e, float *g, ptrdiff_t n, float a)
{
#if XF_HAVE_STREAM
    int level = xf_stream_level();
    if (level == 2) { xf_scale_stream_f512(e, g, n, a); return; }
    if (level == 1) { xf_scale_stream_f256(e, g, n, a); return; }
#endif
    for (ptrdiff_t i = 0; i < n; i++) g[i] = e[i] * a;
}

static void xf_scale_stream_d(const double *e, double *g, ptrdiff_t n, double a)
{
#if XF_HAVE_STREAM
    int level = xf_stream_level();
    if (level == 2) { xf_scale_stream_d512(e, g, n, a); return; }
    if (level == 1) { xf_scale_stream_d256(e, g, n, a); return; }
#endif
    for (ptrdiff_t i = 0; i < n; i++) g[i] = e[i] * a;
}

/* The most threads a parallel region started by the calling thread may get (1 without
 * OpenMP): the size of the per-thread scratch of the 16-bit path.  xf_set_max_threads
 * changes it for the calling thread only (OpenMP's nthreads-var is per thread). */
#if defined(_OPENMP)
#include <omp.h>
static int xf_max_threads(void) { return omp_get_max_threads(); }
static void xf_set_max_threads(int k) { omp_set_num_threads(k); }
#else
static int xf_max_threads(void) { return 1; }
static void xf_set_max_threads(int k) { (void)k; }
#endif

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

/* Pass 1 of a long 16-bit row fused with its widening: x = float32 of h, and the row
 * max of x returned -- the very value xf_rowmax_f(x, n) gives (a max over the same
 * order-preserving keys; max is exact in any order).  F16C + AVX2 for float16 where
 * the CPU has them, the bit arithmetic (multiversioned) otherwise. */
XF_MV float xf_load_h16_max_bits(const uint16_t *XF_RESTRICT h, float *XF_RESTRICT x,
                                 ptrdiff_t n, int kind)
{
    int32_t m = xf_key_f(-INFINITY);
    if (kind == XF_HALF_BF16)
        for (ptrdiff_t i = 0; i < n; i++) {
            float v = xf_bf16_to_f32(h[i]);
            int32_t k = xf_key_f(v);
            x[i] = v;
            m = k > m ? k : m;
        }
    else
        for (ptrdiff_t i = 0; i < n; i++) {
            float v = xf_f16_to_f32(h[i]);
            int32_t k = xf_key_f(v);
            x[i] = v;
            m = k > m ? k : m;
        }
    return xf_unkey_f(m);
}

#if XF_HAVE_F16C
__attribute__((target("avx2,f16c"))) static float
xf_load_f16_max_f16c(const uint16_t *XF_RESTRICT h, float *XF_RESTRICT x, ptrdiff_t n)
{
    const __m256i mag = _mm256_set1_epi32(0x7fffffff);
    __m256i km = _mm256_set1_epi32(xf_key_f(-INFINITY));
    __m128i k4;
    int32_t m;
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i)));
        __m256i s = _mm256_castps_si256(v);
        _mm256_storeu_ps(x + i, v);
        km = _mm256_max_epi32(km, _mm256_xor_si256(s, _mm256_and_si256(
                                                      _mm256_srai_epi32(s, 31), mag)));
    }
    k4 = _mm_max_epi32(_mm256_castsi256_si128(km), _mm256_extracti128_si256(km, 1));
    k4 = _mm_max_epi32(k4, _mm_shuffle_epi32(k4, 0x4e));      /* in registers: a lanes */
    k4 = _mm_max_epi32(k4, _mm_shuffle_epi32(k4, 0xb1));      /* array kept km in memory */
    m = _mm_cvtsi128_si32(k4);
    if (i < n) {                                /* the tail through the buffered load */
        xf_load_f16_f16c(h + i, x + i, n - i);
        for (; i < n; i++) { int32_t k = xf_key_f(x[i]); m = k > m ? k : m; }
    }
    return xf_unkey_f(m);
}
#endif

/* Pass 3 of an index-label row without smoothing fused with the 16-bit store:
 * h[i] = 16-bit of (e[i] * a) -- the product xf_scale_f forms, rounded once. */
XF_MV void xf_scale_store_h16_bits(const float *XF_RESTRICT e, uint16_t *XF_RESTRICT h,
                                   ptrdiff_t n, float a, int kind)
{
    if (kind == XF_HALF_BF16)
        for (ptrdiff_t i = 0; i < n; i++) h[i] = (uint16_t)xf_f32_to_bf16(e[i] * a);
    else
        for (ptrdiff_t i = 0; i < n; i++) h[i] = (uint16_t)xf_f32_to_f16(e[i] * a);
}

#if XF_HAVE_F16C
__attribute__((target("avx,f16c"))) static void
xf_scale_store_f16_f16c(const float *XF_RESTRICT e, uint16_t *XF_RESTRICT h, ptrdiff_t n,
                        float a)
{
    const __m256 va = _mm256_set1_ps(a);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i),
                         _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(e + i), va),
                                         _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) h[i] = (uint16_t)xf_f32_to_f16(e[i] * a);  /* no sNaN: same */
}
#endif

static void xf_scale_store_h16(const float *e, uint16_t *h, ptrdiff_t n, float a, int kind)
{
#if XF_HAVE_F16C
    if (kind == XF_HALF_F16 && xf_use_f16c()) { xf_scale_store_f16_f16c(e, h, n, a); return; }
#endif
    xf_scale_store_h16_bits(e, h, n, a, kind);
}

/* One value rounded to the 16-bit format (a gradient value: never a signalling NaN, so
 * the F16C and the bit-arithmetic stores agree on it). */
static inline uint16_t xf_store1_h16(float f, int kind)
{ return (uint16_t)(kind == XF_HALF_BF16 ? xf_f32_to_bf16(f) : xf_f32_to_f16(f)); }

static float xf_load_h16_max(const uint16_t *h, float *x, ptrdiff_t n, int kind)
{
#if XF_HAVE_F16C
    if (kind == XF_HALF_F16 && xf_use_f16c()) return xf_load_f16_max_f16c(h, x, n);
#endif
    return xf_load_h16_max_bits(h, x, n, kind);
}

#define XF_T float
#define XF_L 16
#define XF_SUF _f
#define XF_EXP_XM xf_expf_xm64
#define XF_EXP_UNSCALE XF_EXPF_UNSCALE
#define XF_EXP_DIFF_S xf_expf_diff64
#define XF_EXP_DIFF xf_expf_diff
#define XF_LOG1P xf_log1pf_v
#define XF_INV1P xf_inv1p_f_
#define XF_SEL xf_self
#define XF_KEY int32_t
#define XF_KEY_OF xf_key_f
#define XF_FROM_KEY xf_unkey_f
#include "_xfrows_tmpl.h"          /* which #undefs these parameters */

#define XF_T double
#define XF_L 8
#define XF_SUF _d
#define XF_EXP_XM xf_exp_xm512
#define XF_EXP_UNSCALE XF_EXP_UNSCALE_D
#define XF_EXP_DIFF_S xf_exp_diff512
#define XF_EXP_DIFF xf_exp_diff
#define XF_LOG1P xf_log1p_d_
#define XF_INV1P xf_inv1p_d_
#define XF_SEL xf_seld
#define XF_KEY int64_t
#define XF_KEY_OF xf_key_d
#define XF_FROM_KEY xf_unkey_d
#include "_xfrows_tmpl.h"          /* which #undefs these parameters */

#endif /* XENTFAST_XFROWS_H */
