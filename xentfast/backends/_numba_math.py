"""Scalar maths of the Numba CPU kernels (``numba_cpu``): Numba options, intrinsics,
16-bit element access, and the vectorisable exponential and logarithm.

* ``_JIT``, ``_PJIT``, ``_EXP_JIT``, ``_STRICT_JIT``: the Numba options, the only place
  they are set.
* LLVM intrinsics: bit-casts (``_bits_to_float``, ``_float_to_bits``), ``llvm.maxnum``,
  ``llvm.prefetch``, and the 512-bit vector preference of a function.
* 16-bit floats: float16 and bfloat16 arrays travel to the kernels as their bits --
  float16 as an int16 view, bfloat16 as a uint16 view (``bits_view``) -- so that the
  element type alone selects the conversion at compile time.  ``_ld(a, j)`` reads
  ``a[j]`` as the accumulation dtype (float32 for the 16-bit formats; a float array's
  element as it is), ``_st(a, j, v)`` writes ``v`` rounded once, to nearest even, into
  ``a``'s format, and ``_acc(a)`` is the accumulation dtype's scalar class.  On float
  arrays they are plain indexing, so kernels written with them compile to the same code
  for float32 and float64 as before.
* ``_exp``, ``_exp_diff``, ``_log``, ``_log1p``: one body each, the
  constants per dtype in a table (``_MATH``), with their error analysis.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import rowmath

# fastmath WITHOUT "nnan"/"ninf": NaN and -inf are data here (a NaN row must give NaN, a
# -inf logit is a mask), and with those flags LLVM may fold x != x or x == -inf away.
#   reassoc  lets LLVM vectorise the sum reductions (several partial sums, in an order
#            fixed at compile time, so still deterministic);
#   contract fuses a*b + c into FMA;  nsz, arcp, afn are harmless here.
_FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})
# The exponential and logarithm get no "reassoc": with it LLVM may rewrite the Cody-Waite
# reduction (x - k*LN2_HI) - k*LN2_LO as x - k*(LN2_HI + LN2_LO), losing the extra bits.
# (Numba applies fastmath flags per compiled function, and they stay on the instructions
# when LLVM inlines the function into a kernel.)
_EXP_FASTMATH = frozenset({"nsz", "arcp", "contract"})

_JIT = dict(
    fastmath=set(_FASTMATH),
    cache=True,           # compiled code is stored next to this file (or NUMBA_CACHE_DIR)
    nogil=True,           # several Python threads may run kernels at once
    error_model="numpy",  # no ZeroDivisionError checks inside the loops (they block SIMD)
    boundscheck=False,
)
_PJIT = dict(_JIT, parallel=True)
_EXP_JIT = dict(_JIT, fastmath=set(_EXP_FASTMATH))
# The per-row scalar maths (rowmath) and the 16-bit conversions get no fastmath flag at
# all: "reassoc" and "nsz" together let LLVM rewrite (m - x_y) + log s into lse - x_y,
# or (1 - e_y) + r into s - e_y, undoing the forms that keep confident rows exact.
# "Reassoc" is for the SIMD reductions over a row, nothing else.
_STRICT_JIT = dict(_JIT, fastmath=False)


def _bitcast(name, pairs):
    """An intrinsic reinterpreting the bits of a scalar: ``pairs`` maps argument type
    -> (result type, its LLVM type)."""
    def typer(typingctx, x):
        if x not in pairs:
            return None
        res, lltype = pairs[x]

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], lltype)

        return res(x), codegen

    typer.__name__ = name
    return intrinsic(typer)


# int32 bits -> float32 (int64 -> float64): 2**k from its exponent; and back.
_bits_to_float = _bitcast("_bits_to_float", {types.int32: (types.float32, ir.FloatType()),
                                             types.int64: (types.float64, ir.DoubleType())})
_float_to_bits = _bitcast("_float_to_bits", {types.float32: (types.int32, ir.IntType(32)),
                                             types.float64: (types.int64, ir.IntType(64))})



def _stub(name, doc):
    def f(*args):  # pragma: no cover - replaced by an overload inside jitted code
        raise NotImplementedError(name)

    f.__name__, f.__qualname__, f.__doc__ = name, name, doc
    return f


_ld = _stub("_ld", "a[j] as the accumulation dtype (16-bit bits converted).")
_st = _stub("_st", "a[j] = v, rounded once to a's format (16-bit: its bits).")
_acc = _stub("_acc", "The accumulation dtype's scalar class of array a.")

# 16-bit formats travel as their bits: float16 as int16, bfloat16 as uint16 (so that the
# element type alone selects the conversion).  All conversions are integer arithmetic,
# bit-casts and selects -- no branch -- so that LLVM vectorises them, and exact:
#   bfloat16 -> float32: the bits shifted up by 16.
#   float32 -> bfloat16: round to nearest even, (b + 0x7FFF + ((b >> 16) & 1)) >> 16 of
#     the float32 bits b (a carry into the exponent gives the next binade or inf); a NaN
#     becomes the quiet NaN 0x7FC0 with its sign (ml_dtypes' rule).
#   float16 -> float32 (Giesen's magic multiply): the 15 exponent+mantissa bits shifted
#     up by 13 are a float32 2**-112 times the value, subnormals included; times 2**112
#     it is exact; an exponent field of 31 (inf, NaN; it lands at >= 2**16) gets the
#     float32 exponent field 255, payload kept; then the sign.
#   float32 -> float16 (Giesen's float_to_half_fast3_rtne, NaN as NumPy converts it):
#     |f| >= 2**16 (after rounding every value >= 65520 is inf): inf; a NaN keeps its
#     top 10 payload bits (0x7C01 if they are 0); below 2**-14 (subnormal or 0): adding
#     0.5 (2**-1, the magic) rounds the value to a multiple of 2**-24 to nearest even in
#     the float adder, and the low bits of the sum are the result; else the exponent is
#     rebiased and the 13 dropped bits rounded to nearest even by adding 0xFFF plus the
#     kept mantissa's lowest bit (a carry into the exponent is right, up to inf).
_F16, _BF16 = types.int16, types.uint16
_F16_MAGIC = np.float32(2.0 ** 112)
_F16_INFNAN = np.float32(2.0 ** 16)
_F16_DENORM = np.float32(0.5)          # bits (127 - 15 + 23 - 10 + 1) << 23


@overload(_acc, inline="always")
def _acc_impl(a):
    if a.dtype in (_F16, _BF16):
        return lambda a: np.float32
    return lambda a: a.dtype.type


@overload(_ld, jit_options=_STRICT_JIT)
def _ld_impl(a, j):
    if a.dtype == _BF16:
        return lambda a, j: _bits_to_float(np.int32(np.int64(a[j]) << 16))

    if a.dtype == _F16:
        def impl(a, j):
            h = np.int64(a[j]) & 0xFFFF
            o = _bits_to_float(np.int32((h & 0x7FFF) << 13)) * _F16_MAGIC
            ob = np.int64(_float_to_bits(o))
            ob = ob | 0x7F800000 if o >= _F16_INFNAN else ob
            return _bits_to_float(np.int32(ob | ((h & 0x8000) << 16)))

        return impl
    return lambda a, j: a[j]


@overload(_st, jit_options=_STRICT_JIT)
def _st_impl(a, j, v):
    if a.dtype == _BF16:
        def impl(a, j, v):
            b = np.int64(_float_to_bits(v)) & 0xFFFFFFFF
            r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            nan = ((b >> 16) & 0x8000) | 0x7FC0
            a[j] = np.uint16(nan if (b & 0x7FFFFFFF) > 0x7F800000 else r)

        return impl
    if a.dtype == _F16:
        def impl(a, j, v):
            b = np.int64(_float_to_bits(v)) & 0xFFFFFFFF
            f = b & 0x7FFFFFFF
            sub = np.int64(_float_to_bits(_bits_to_float(np.int32(f)) + _F16_DENORM)) \
                - 0x3F000000
            nrm = (f - 0x37FFF001 + ((f >> 13) & 1)) >> 13   # (15 - 127) << 23 + 0xFFF
            r = nrm if f >= 0x38800000 else sub              # 2**-14: smallest normal
            r = 0x7C00 if f >= 0x47800000 else r             # 2**16
            pay = (f >> 13) & 0x3FF
            r = (0x7C00 | pay | (pay == 0)) if f > 0x7F800000 else r
            a[j] = np.int16(r | ((b >> 16) & 0x8000))

        return impl
    if isinstance(a.dtype, types.Float):
        def impl(a, j, v):
            a[j] = v

        return impl
    return None


@njit(**_JIT)
def half_load(bits, out):
    """Test hook: out[i] = the 16-bit ``bits[i]`` (int16: float16, uint16: bfloat16) as
    float32 (``_ld``)."""
    for i in range(bits.shape[0]):
        out[i] = _ld(bits, i)


@njit(**_JIT)
def half_store(x, out):
    """Test hook: out[i] = float32 x[i] rounded to out's 16-bit format (``_st``)."""
    for i in range(x.shape[0]):
        _st(out, i, x[i])


@intrinsic
def _maxnum(typingctx, a, b):
    """``llvm.maxnum``: max ignoring a NaN operand.  Unlike ``a if a > b else b`` it is
    exactly associative, so LLVM vectorises the row-max reduction without ``nnan``.
    (Ignoring NaN is fine: a NaN in the row still poisons the sum in pass B.)"""
    if isinstance(a, types.Float) and a == b:
        def codegen(context, builder, signature, args):
            lt = args[0].type
            fn = builder.module.declare_intrinsic(
                "llvm.maxnum", [lt], ir.FunctionType(lt, [lt, lt]))
            return builder.call(fn, args)

        return a(a, b), codegen
    return None


@intrinsic
def _prefetch(typingctx, arr, index):
    """``llvm.prefetch`` of the cache line holding ``arr[index]`` (read, into L2:
    locality 2).  A hint: it never faults, even past the end of the array."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1
            and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]],
                                       wraparound=False)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(2), i32(1)])  # read, locality 2, data
        return context.get_dummy_value()

    return types.void(arr, index), codegen


@intrinsic
def _prefer_wide_vectors(typingctx):
    """Compile the calling function for 512-bit vectors, as a function of its own.

    LLVM's x86 tuning for AVX-512 CPUs prefers 256-bit vectors (``prefer-vector-width``
    = 256: wide instructions can lower the clock on older parts), and Numba offers no
    option to change it.  For the exp pass that halves the work per instruction: on the
    project machine the loss-only row passes run 1.3-1.5x faster with 16 float lanes.
    The attribute is per function, and the instruction selector honours the function
    the code ends up in, so the caller must not inline it: ``noinline`` (one call per
    row, which is why only long rows take this path).  On a CPU without AVX-512 the
    attribute changes nothing."""
    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        # llvmlite only accepts the attribute names it knows; a string attribute is
        # printed as given ("name"="value" is valid LLVM IR in that position).
        set.add(attributes, '"prefer-vector-width"="512"')
        attributes.add("noinline")
        return context.get_dummy_value()

    return types.void(), codegen


_horner = _stub("_horner", "c[0] x^(n-1) + ... + c[n-1] by Horner's rule, unrolled.")


@overload(_horner, inline="always")
def _horner_impl(x, c):
    # p = c0; p = p*x + c1; ...: straight-line code for the tuple's length (inlined into
    # the caller, under its flags).
    body = "".join(f"    p = p * x + c[{k}]\n" for k in range(1, len(c)))
    ns = {}
    exec(f"def impl(x, c):\n    p = c[0]\n{body}    return p\n", ns)
    return ns["impl"]


# The exponential, for arguments x = x_j - m <= 0 (and NaN, -inf):
#
#   1. Clamp: x <- max(x, X_MIN) written as ``X_MIN if x < X_MIN else x`` so that a NaN
#      passes through (the comparison is false) and -inf becomes X_MIN (a number for
#      the steps below; the result there is replaced by +0 at the end, step 4).
#   2. Range reduction: k = rint(x * log2(e)),  r = x - k ln2 with |r| <= ln2/2 + tiny.
#      Cody-Waite: ln2 = LN2_HI + LN2_LO where LN2_HI has trailing zero bits, so k*LN2_HI
#      is exact for the |k| that occur and r = (x - k*LN2_HI) - k*LN2_LO loses nothing.
#   3. exp(r) ~ P(r) = 1 + c1 r + ... + cd r^d, Horner with FMA.  The coefficients are
#      the minimax (Remez, relative error, c0 fixed to 1 so exp(0) == 1 exactly) fit
#      on [-ln2/2, ln2/2] computed with mpmath at 50 digits:
#        float32, d = 6: max |P/exp - 1| = 1.98e-9 (0.017 ulp)
#        float64, d = 11: max |P/exp - 1| = 3.4e-18 (0.03 ulp)
#      Measured end to end (approximation + float rounding of the evaluation):
#        float32: exhaustively over every float32 x in [-87, 0]: max error 1.05 ulp
#                 (a degree-5 polynomial measures 2.01 ulp; see benchmarks/NOTES).
#        float64: max error 0.91 ulp over 2.5e7 samples in [-708, 0] (vs long double).
#   4. 2**k as two factors, 2**k1 and 2**k2 with k1 = floor(k / 2), k2 = k - k1, each
#      built from its biased exponent and bit-cast: both are normal numbers for every k
#      that step 1 leaves (k >= -151 / -1443), P(r) * 2**k1 is exact, and the second
#      product rounds once, where the result is subnormal.  So results down to the
#      smallest subnormal are produced, not flushed (a gradient element of 1.6e-38 or a
#      loss of 7e-44 is there), as _fastexp.h does.  Two data-dependent factors, not
#      2**(k + OFF) * 2**-OFF: kernels compiled with "reassoc" fold a constant factor into
#      the multiply that follows the exp (e * a -> (v * a) * 2**-OFF), which would skip
#      the rounding, could overflow v * a, and let the clamp of step 1 leak exp(X_MIN)
#      into a masked logit's gradient.  Below X_MIN (and at -inf) the result is +0 by a
#      select on the output.  k is clamped from below at K_MIN only so that a NaN k
#      becomes a number before the float -> int conversion; the NaN still propagates
#      through P(r).
#   Result: P(r) * 2**k, rounded once.   exp(-inf) = 0 exactly, exp(NaN) = NaN, exp(0) = 1 exactly.
#
# The logarithm, for s = sum_j exp(x_j - m) in [1, C] (or NaN) -- vectorisable, used by
# the small-C path for a whole block of rows at once (np.log is a scalar libm call):
#   1. x = 2**e * f with f in [sqrt(1/2), sqrt(2)): subtract the bits of sqrt(1/2) from the
#      bits of x, e = (difference >> mantissa bits), f = bits of (difference's mantissa +
#      bits of sqrt(1/2)).  Exact.
#   2. log f = 2 atanh(u),  u = (f - 1) / (f + 1),  |u| <= (sqrt2 - 1)/(sqrt2 + 1) = 0.1716;
#      2 atanh(u) = 2u + u^3 (2/3 + u^2 (2/5 + ...)), the Taylor series truncated after
#      u^9 (float32: next term / log f <= 2.0e-9) or u^19 (float64: <= 2.3e-17).
#      f - 1 is exact (Sterbenz); the division and f + 1 add ~1 ulp.
#   3. log x = e*LN2_HI + (e*LN2_LO + log f)  (Cody-Waite split again: e*LN2_HI exact).
#   4. NaN in -> NaN out (explicit select: the bit tricks would make a number of it).
#   Measured: float32 max error 1.91 ulp (every 37th float in [1, 2**20)); float64 max
#   1.91 ulp (2e6 samples in [1, 2**20]).  lse = m + log s, so this is an absolute
#   error of ~2 ulp(log c) in lse: far below the rounding of lse itself when |m| > c.
_F32_EXP = (  # C6 ... C1, c0 = 1 (Remez, see above)
    0.0013843644148874706763, 0.0083741633659085793689, 0.041668002573200951491,
    0.16666431170308225796, 0.49999994205572518698, 1.0000000321837212264, 1.0)
_F64_EXP = (  # C11 ... C2, then c1 and c0 (c1 = 1 + 2.4e-17 rounds to 1)
    2.499142007903852e-08, 2.763104871737513e-07, 2.755762682108275e-06,
    2.4801490598024487e-05, 0.00019841269436554447, 0.0013888888946386997,
    0.008333333333549863, 0.04166666666651771, 0.16666666666666216, 0.5000000000000012,
    1.0, 1.0)
_MATH = {  # per dtype: int type, mantissa bits, exponent bias, constants
    types.float32: dict(
        F=np.float32, I=np.int32, MBITS=23, BIAS=127, X_MIN=-104.0,
        LN2_HI=0.693359375,                   # 0x3f318000: 9 significant bits
        LN2_LO=-2.12194440e-4,                # ln2 - LN2_HI
        EXP=_F32_EXP, SQRTH=0x3F3504F3, LOG=tuple(2.0 / k for k in (9, 7, 5, 3))),
    types.float64: dict(
        F=np.float64, I=np.int64, MBITS=52, BIAS=1023, X_MIN=-1000.0,
        LN2_HI=6.93147180369123816490e-01,    # 0x3fe62e42fee00000: 32 low bits zero
        LN2_LO=1.90821492927058770002e-10,    # ln2 - LN2_HI
        EXP=_F64_EXP, SQRTH=0x3FE6A09E667F3BCD,
        LOG=tuple(2.0 / k for k in (19, 17, 15, 13, 11, 9, 7, 5, 3))),
}


def _consts(x):
    """The table row of float type x, with its numbers as scalars of that type."""
    k = _MATH[x]
    F, I = k["F"], k["I"]
    return (F, I, k["MBITS"], I(k["BIAS"]), F(k["X_MIN"]), F(k["LN2_HI"]),
            F(k["LN2_LO"]), tuple(F(c) for c in k["EXP"]), I(k["SQRTH"]),
            I((1 << k["MBITS"]) - 1), tuple(F(c) for c in k["LOG"]))


_exp = _stub("_exp", "exp(x) for x <= 0 (or NaN), vectorisable; see above.")
_log = _stub("_log", "log(x) for positive normal x (or NaN), vectorisable; see above.")


@overload(_exp, jit_options=_EXP_JIT)
def _exp_impl(x):
    if x not in _MATH:
        return None
    F, I, MBITS, BIAS, X_MIN, LN2_HI, LN2_LO, C, _, _, _ = _consts(x)
    LOG2E = F(1.4426950408889634)
    K_MIN = F(np.floor(float(X_MIN) * 1.4426950408889634) - 1)   # below any k of x >= X_MIN
    ONE, MB = I(1), I(MBITS)

    def impl(x):
        under = x < X_MIN                      # NaN compares false
        x = X_MIN if under else x
        k = np.rint(x * LOG2E)
        r = x - k * LN2_HI
        r = r - k * LN2_LO
        p = _horner(r, C)
        kk = I(k if k > K_MIN else K_MIN)      # NaN -> a number for the conversion
        k1 = I(kk >> ONE)                      # floor(k / 2)
        k2 = I(kk - k1)
        e = (p * _bits_to_float(I(I(k1 + BIAS) << MB))) * _bits_to_float(I(I(k2 + BIAS) << MB))
        return F(0) if under else e

    return impl


@overload(_log, jit_options=_EXP_JIT)
def _log_impl(x):
    if x not in _MATH:
        return None
    F, I, MBITS, _, _, LN2_HI, LN2_LO, _, SQRTH, MANT, A = _consts(x)
    ONE, TWO = F(1), F(2)

    def impl(x):
        ix = _float_to_bits(x) - SQRTH
        e = F(I(ix >> MBITS))
        fm = _bits_to_float(I((ix & MANT) + SQRTH))
        u = (fm - ONE) / (fm + ONE)
        u2 = u * u
        logf = TWO * u + (u * u2) * _horner(u2, A)
        r = e * LN2_HI + (e * LN2_LO + logf)
        return x if x != x else r

    return impl


_exp_diff = _stub("_exp_diff", "exp(x - m) without the rounding of x - m; see below.")


# exp(x - m) for x <= m, compensated for the rounding of the difference:
#   d = x - m rounds; its error err = (x - m) - d is exact in floating point (TwoSum:
#   bb = d - x, err = (x - (d - bb)) + (-m - bb)), and exp(x - m) = exp(d) exp(err)
#   = exp(d) (1 + err) to within err^2 < 2**-48.  Without it the relative error of e_j
#   is up to |x - m| / 2 ulps (the rounding of d, amplified by exp): 4 ulps at a spread
#   of 8, 44 at float32's 87, 350 at float64's 700.
#   A masked x = -inf gives d = -inf and err = NaN: then e = exp(d) = 0 as it is.
#   Compiled without reassoc (which would fold err to 0).
# Used for every e_j = exp(x_j - m) of every dtype: the sums (a confident row's loss is
# log1p of the sum of such terms, r ~ 1e-30 for [72.164894, 4.7841673], and kept their
# error: 41 ulps of the float32 loss with exp(d)), the gradients (64 ulps) and softmax
# (4 ulps, DESIGN.md).


@overload(_exp_diff, jit_options=_EXP_JIT)
def _exp_diff_impl(x, m):
    if isinstance(x, types.Float) and x == m:
        def impl(x, m):
            d = x - m
            bb = d - x
            err = (x - (d - bb)) + (-m - bb)
            e = _exp(d)
            return e + e * err if err == err else e

        return impl
    return None


_log1p = _stub("_log1p", "log1p(r) for r >= 0 (or NaN), vectorisable; see below.")


# log1p(r) = log s for s = 1 + r, r >= 0 the rest mass of rowmath (the small-C path does
# a block of rows at once; the row paths call libm's log1p once per row):
#   u = 1 + r rounds r; log1p(r) = log(u) + (r - (u - 1)) / u  recovers the lost part to
#   first order (u - 1 is exact by Sterbenz, r - (u - 1) is exactly the rounding error of
#   u, and d log u = du / u).  Error: _log's 1.91 ulp of log u plus ~1 ulp, relative to
#   log1p(r) also for r far below the unit roundoff (then log u = 0 and the correction
#   is r itself).  Compiled without reassoc: with it LLVM would fold (u - 1) - r to 0.


@overload(_log1p, jit_options=_EXP_JIT)
def _log1p_impl(x):
    if x in _MATH:
        ONE = _MATH[x]["F"](1.0)

        def impl(x):
            u = ONE + x
            return _log(u) + (x - (u - ONE)) / u

        return impl
    return None


def _array_hook(name, fn):
    """A test hook out[i] = fn(x[i]) over a 1-D array."""
    def hook(x, out):
        for i in range(x.shape[0]):
            out[i] = fn(x[i])

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"out[i] = {fn.__name__}(x[i]) for a 1-D array (a test hook)."
    return njit(**_JIT)(hook)


exp_array = _array_hook("exp_array", _exp)
log_array = _array_hook("log_array", _log)
log1p_array = _array_hook("log1p_array", _log1p)


# The per-row maths of rowmath, compiled with strict IEEE semantics (no fastmath at all:
# see rowmath's docstring) and inlined by LLVM into the kernels that call them; the
# flags stay on the inlined instructions, so the kernels' "reassoc" cannot reach them.
_rest_mass = njit(**_STRICT_JIT)(rowmath.rest_mass)
_log_sum_exp = njit(**_STRICT_JIT)(rowmath.log_sum_exp)
_sparse_loss = njit(**_STRICT_JIT)(rowmath.sparse_loss)
_dense_loss = njit(**_STRICT_JIT)(rowmath.dense_loss)
_sparse_scale = njit(**_STRICT_JIT)(rowmath.sparse_scale)
_sparse_true_grad = njit(**_STRICT_JIT)(rowmath.sparse_true_grad)
_smoothed_weight = njit(**_STRICT_JIT)(rowmath.smoothed_weight)
_dense_coef = njit(**_STRICT_JIT)(rowmath.dense_coef)
_grad_over_sum = njit(**_STRICT_JIT)(rowmath.grad_over_sum)
_dense_grad = njit(**_STRICT_JIT)(rowmath.dense_grad)
_log_softmax = njit(**_STRICT_JIT)(rowmath.log_softmax)
_softmax = njit(**_STRICT_JIT)(rowmath.softmax)


@njit(**_STRICT_JIT)
def _two_sum_add(hi, lo, v):
    """(hi, lo) + v with the rounding error of hi + v kept in lo (TwoSum; strict flags,
    so reassociation cannot fold the error term away).  An infinite sum has no rounding
    error (the formula would give inf - inf = NaN): none is carried, so +inf stays +inf;
    a NaN stays in hi."""
    s = hi + v
    bb = s - hi
    err = (hi - (s - bb)) + (v - bb)
    return s, lo + (err if err == err else 0.0)


def bits_view(a: np.ndarray, half: str | None = None) -> np.ndarray:
    """The bits of a 16-bit array as the kernels take them: float16 as int16, bfloat16
    (an ml_dtypes dtype, recognised by name, or uint16 bits with ``half="bfloat16"``) as
    uint16.  ``half`` names the format of raw uint16 bits ("float16" / "bfloat16")."""
    name = a.dtype.name
    if name == "float16" or (half == "float16" and a.dtype == np.uint16):
        return a.view(np.int16)
    if name == "bfloat16" or (half == "bfloat16" and a.dtype == np.uint16):
        return a.view(np.uint16)
    raise TypeError(f"expected float16 or bfloat16 (or uint16 bits with half=...), "
                    f"got {a.dtype} with half={half!r}")
