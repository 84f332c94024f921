"""Backend ``cpu``: fused softmax cross-entropy kernels compiled by Numba (``parallel=True``).

Same destination-passing kernel set, signatures and semantics as ``numpy_ref`` (see the
contract and the derivations in ``xentfast/backends/__init__.py``), but each row is done
in a few passes over memory and with no (n, c) temporary:

    pass A   m = max_j x_j                                         (read x)
    pass B   e_j = exp(x_j - m);  u = sum of e_j off the max, t = ties at the max
             (+ weighted sums)                                     (read x; with a
             gradient, write e_j into grad: exp is computed once per element)
             r = u + (t - 1), log s = log1p(r), lse = m + log s; the loss (rowmath)
    pass C   grad_j = e_j * a - b_j                                (read/write grad while
                                                                    the row is in cache)

Paths (``plan()``: from the shape and the options only, never from the thread count;
``tuning()`` forces any part of the choice):

* serial   -- n*c <= SERIAL_MAX_ELEMS: the row-range body is called directly (a parallel
              launch costs more than it saves on tiny inputs).
* rows     -- c > SMALL_C_MAX: ``prange`` over chunks of rows, one row per pass A/B/C
              sequence, SIMD along the row.  Loss-only, logsumexp and sparse
              loss+grad rows (not in place, no label smoothing) of at least WIDE_MIN_C
              classes run passes A, B (and C) on 512-bit vectors and prefetch the
              next row (``_row_max_sumexp_wide``).
* small C  -- c <= SMALL_C_MAX: blocks of SMALL_C_BLOCK rows are transposed into a
              class-major scratch buffer so the SIMD lanes run across rows.
* split    -- n <= SPLIT_MAX_ROWS and c >= SPLIT_MIN_C (few, very long rows: fewer rows
              than cores): every row is cut into SPLIT_SEGMENTS segments (a constant),
              the segments run in parallel and are combined in segment order.
              Used for logsumexp, log_softmax, softmax and sparse without smoothing;
              the rarer dense / label-smoothing cases use the row path there.

Layout of this module
---------------------
1. Numba options, all in one place (``_JIT``, ``_PJIT``, ``_EXP_JIT``), the choice of a
   thread-safe threading layer, and the dispatch tunables.
2. LLVM intrinsics (bit-casts, ``llvm.maxnum``, ``llvm.prefetch``, the 512-bit vector
   preference of a function), the vectorisable exponential ``_exp`` and logarithm
   ``_log`` with their error analysis.
3. Row passes (``_row_*``): the inner loops, written so that LLVM vectorises them.
4. Row-range bodies (``_*_rows(r0, r1, ...)``): everything one row needs, for rows
   [r0, r1); and 5. their parallel drivers (``_*_par``).
6. Small-C bodies and drivers.
7. Split-row kernels.
8. ``plan``, ``tuning`` and the public kernel functions (plain Python): plan the path
   and call it.

Precision rule
--------------
Arithmetic happens in the accumulation dtype: float32 for float32 logits, float64 for
float64 logits (this backend has no native float16; the public layer upcasts).  Outputs
have the same dtype, so each per-element value is rounded once.  The per-row scalars
come from ``rowmath`` in its non-cancelling forms -- (m - x_y) + log1p(r), the
true-class gradient -((1 - e_y) + r)/s instead of p_y - 1, W log s + wd instead of
W lse - sum w x -- compiled with no fastmath flag at all, so that LLVM cannot
reassociate them back (``_STRICT_JIT``).  Row sums are accumulated in blocks of 1024
terms (SIMD partial sums inside a block in the row's dtype, block totals in float64),
so the rounding error of a float32 row does not grow with its length.  softmax's e_j
(and float64 gradients' e_j) are compensated for the rounding of x_j - m.

Determinism
-----------
A row is reduced by one thread, in an order fixed by the compiled loop (vector width and
unrolling are compile-time constants), so results do not depend on the thread count or
on which thread takes the row.  The split path cuts a row into SPLIT_SEGMENTS segments --
a constant, not the thread count -- and combines them in segment order.  Which path runs
depends only on the shape and the options.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator
from typing import Literal

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .. import _forkguard
from . import rowmath

NAME = "cpu"
NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# ---------------------------------------------------------------------------------------
# 1. Numba options (the only place they are set), threading layer, tunables
# ---------------------------------------------------------------------------------------
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
# The per-row scalar maths (rowmath) gets no fastmath flag at all: "reassoc" and "nsz"
# together let LLVM rewrite (m - x_y) + log s into lse - x_y, or (1 - e_y) + r into
# s - e_y, undoing the forms that keep confident rows exact.  "Reassoc" is for the SIMD
# reductions over a row, nothing else.
_STRICT_JIT = dict(_JIT, fastmath=False)

# Numba's default threading layer, "workqueue", is not thread-safe: two Python threads
# launching parallel kernels at the same time abort the whole process ("Numba workqueue
# threading layer is terminating: Concurrent access has been detected." -- reproduced
# with 4 threads calling `sparse`).  The public API promises that calls are
# thread-safe, so unless the user chose a layer with NUMBA_THREADING_LAYER we ask Numba
# for a thread-safe one: "threadsafe" = OpenMP if available, else TBB.  Numba fixes the
# layer when the first parallel kernel of the process runs; nothing here runs at import,
# so this holds unless other code already ran a parallel Numba kernel (then that code
# chose the layer).
if not os.environ.get("NUMBA_THREADING_LAYER"):
    numba.config.THREADING_LAYER = "threadsafe"

# Tunables of the Python-level dispatch (kernels receive them as arguments; none of them
# changes results, only which rows run where -- except the path choice itself, which
# depends on the shape alone).  Measured on a 2-core AVX-512 VM: see
# benchmarks/NOTES_cpu_kernels.md.
SERIAL_MAX_ELEMS = 1 << 14      # n*c at most this: serial path (no parallel launch)
CHUNK_ELEMS = 1 << 14           # row path: rows per parallel chunk ~ CHUNK_ELEMS / c
SMALL_C_MAX = 48                # c at most this: small-C path
SMALL_C_BLOCK = 64              # small-C path: rows per transposed block
SMALL_C_CHUNK_ELEMS = 1 << 14   # small-C path: elements per parallel chunk (>= 1 block)
SPLIT_MIN_C = 1 << 15           # split path: c at least this ...
SPLIT_MAX_ROWS = 4              # ... and n at most this
SPLIT_SEGMENTS = 16             # split path: segments per row (a constant, NOT the
                                # thread count, so results do not depend on it)
WIDE_MIN_C = 320                # loss-only, logsumexp and sparse loss+grad rows of at
                                # least this many classes: the 512-bit passes A+B (+C)
PREFETCH_MAX_ROW_BYTES = 1 << 20  # ... prefetching the next row if a row is at most this
PREFETCH_MAX_GRAD_ROW_BYTES = 1 << 18  # (with a gradient: x, grad and the next row share L2)

# ---------------------------------------------------------------------------------------
# 2. Intrinsics, the exponential and the logarithm
# ---------------------------------------------------------------------------------------


@intrinsic
def _bits_to_float(typingctx, bits):
    """Reinterpret int32 bits as float32 (int64 as float64): 2**k from its exponent."""
    if bits == types.int32:
        sig, lltype = types.float32(bits), ir.FloatType()
    elif bits == types.int64:
        sig, lltype = types.float64(bits), ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], lltype)

    return sig, codegen


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


def _exp(x):  # pragma: no cover - replaced by the overload below inside jitted code
    """exp(x) for x <= 0 (or NaN), vectorisable; see the overload."""
    raise NotImplementedError


# The exponential, for arguments x = x_j - m <= 0 (and NaN, -inf):
#
#   1. Clamp: x <- max(x, X_MIN) written as ``X_MIN if x < X_MIN else x`` so that a NaN
#      passes through (the comparison is false) and -inf becomes X_MIN (whose exp is
#      flushed to 0 in step 4).
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
#   4. 2**k: build the float with biased exponent k + BIAS directly ((k + 127) << 23 for
#      float32, (k + 1023) << 52 for float64) and bit-cast.  k is first clamped to
#      K_MIN - 1 below K_MIN, giving exponent field 0, i.e. 2**k == +0.0: results that
#      would be below ~2**(K_MIN - 0.5) are flushed to exactly 0 (they are < 2e-38 for
#      float32, < 4e-308 for float64: invisible next to the sum s >= 1, and it keeps
#      subnormals, which are slow on x86, out of the loops).  The clamp
#      ``k if k > K_MIN - 1 else K_MIN - 1`` also maps NaN k to a number, so the float ->
#      int conversion never sees NaN; the NaN still propagates through r and P(r), and
#      NaN * 0 = NaN.
#   Result: P(r) * 2**k.   exp(-inf) = 0 exactly, exp(NaN) = NaN, exp(0) = 1 exactly.


@overload(_exp, jit_options=_EXP_JIT)
def _exp_impl(x):
    if x == types.float32:
        f = np.float32
        X_MIN = f(-104.0)
        LOG2E = f(1.4426950408889634)
        LN2_HI = f(0.693359375)             # 0x3f318000: 9 significant bits
        LN2_LO = f(-2.12194440e-4)          # ln2 - LN2_HI
        C1 = f(1.0000000321837212264)
        C2 = f(0.49999994205572518698)
        C3 = f(0.16666431170308225796)
        C4 = f(0.041668002573200951491)
        C5 = f(0.0083741633659085793689)
        C6 = f(0.0013843644148874706763)
        ONE = f(1.0)
        K_LOW = f(-126.0)                   # k must be > K_LOW, i.e. k >= -125
        K_ZERO = f(-127.0)                  # exponent field 0: 2**k -> +0.0

        def impl(x):
            x = X_MIN if x < X_MIN else x
            k = np.rint(x * LOG2E)
            r = x - k * LN2_HI
            r = r - k * LN2_LO
            p = C6 * r + C5
            p = p * r + C4
            p = p * r + C3
            p = p * r + C2
            p = p * r + C1
            p = p * r + ONE
            kk = k if k > K_LOW else K_ZERO
            scale = _bits_to_float(np.int32((np.int32(kk) + 127) << 23))
            return p * scale

        return impl
    if x == types.float64:
        f = np.float64
        X_MIN = f(-1000.0)
        LOG2E = f(1.4426950408889634)
        LN2_HI = f(6.93147180369123816490e-01)   # 0x3fe62e42fee00000: 32 low bits zero
        LN2_LO = f(1.90821492927058770002e-10)   # ln2 - LN2_HI
        C2 = f(0.5000000000000012)
        C3 = f(0.16666666666666216)
        C4 = f(0.04166666666651771)
        C5 = f(0.008333333333549863)
        C6 = f(0.0013888888946386997)
        C7 = f(0.00019841269436554447)
        C8 = f(2.4801490598024487e-05)
        C9 = f(2.755762682108275e-06)
        C10 = f(2.763104871737513e-07)
        C11 = f(2.499142007903852e-08)
        ONE = f(1.0)                             # c0 and c1 (c1 = 1 + 2.4e-17 rounds to 1)
        K_LOW = f(-1022.0)
        K_ZERO = f(-1023.0)

        def impl(x):
            x = X_MIN if x < X_MIN else x
            k = np.rint(x * LOG2E)
            r = x - k * LN2_HI
            r = r - k * LN2_LO
            p = C11 * r + C10
            p = p * r + C9
            p = p * r + C8
            p = p * r + C7
            p = p * r + C6
            p = p * r + C5
            p = p * r + C4
            p = p * r + C3
            p = p * r + C2
            p = p * r + ONE
            p = p * r + ONE
            kk = k if k > K_LOW else K_ZERO
            scale = _bits_to_float((np.int64(kk) + 1023) << 52)
            return p * scale

        return impl
    return None


def _exp_diff(x, m):  # pragma: no cover - replaced by the overload below
    """exp(x - m) without the rounding of x - m; see the overload."""
    raise NotImplementedError


def _exp_grad(x, m):  # pragma: no cover - replaced by the overload below
    """e_j = exp(x - m) as the gradient passes store it; see the overload."""
    raise NotImplementedError


# exp(x - m) for x <= m, compensated for the rounding of the difference:
#   d = x - m rounds; its error err = (x - m) - d is exact in floating point (TwoSum:
#   bb = d - x, err = (x - (d - bb)) + (-m - bb)), and exp(x - m) = exp(d) exp(err)
#   = exp(d) (1 + err) to within err^2 < 2**-48.  Without it the relative error of e_j
#   is up to |x - m| / 2 ulps (the rounding of d, amplified by exp): 4 ulps at a spread
#   of 8, 44 at float32's 87, 350 at float64's 700.
#   A masked x = -inf gives d = -inf and err = NaN: then e = exp(d) = 0 as it is.
#   Compiled without reassoc (which would fold err to 0).
# Used for softmax (4 ulps, DESIGN.md) on every dtype; and, through _exp_grad, for the
# stored e_j of float64 gradients (64 ulps at any spread).  float32 gradients keep the
# plain exp (<= 44 + 2 ulps within the 64), and loss-only passes too (the loss is a sum).


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


@overload(_exp_grad, jit_options=_EXP_JIT)
def _exp_grad_impl(x, m):
    if x == types.float64 and m == types.float64:
        return lambda x, m: _exp_diff(x, m)
    if isinstance(x, types.Float) and x == m:
        return lambda x, m: _exp(x - m)
    return None


@intrinsic
def _float_to_bits(typingctx, x):
    """Reinterpret float32 as int32 (float64 as int64)."""
    if x == types.float32:
        sig, lltype = types.int32(x), ir.IntType(32)
    elif x == types.float64:
        sig, lltype = types.int64(x), ir.IntType(64)
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], lltype)

    return sig, codegen


def _log(x):  # pragma: no cover - replaced by the overload below inside jitted code
    """log(x) for positive normal x (or NaN), vectorisable; see the overload."""
    raise NotImplementedError


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


@overload(_log, jit_options=_EXP_JIT)
def _log_impl(x):
    if x == types.float32:
        f = np.float32
        SQRTH = np.int32(0x3F3504F3)        # bits of sqrt(1/2)
        MANT = np.int32(0x007FFFFF)
        LN2_HI = f(0.693359375)
        LN2_LO = f(-2.12194440e-4)
        ONE = f(1.0)
        TWO = f(2.0)
        A1 = f(2.0 / 3.0)
        A2 = f(2.0 / 5.0)
        A3 = f(2.0 / 7.0)
        A4 = f(2.0 / 9.0)

        def impl(x):
            ix = _float_to_bits(x) - SQRTH
            e = f(np.int32(ix >> 23))
            fm = _bits_to_float(np.int32((ix & MANT) + SQRTH))
            u = (fm - ONE) / (fm + ONE)
            u2 = u * u
            q = A4 * u2 + A3
            q = q * u2 + A2
            q = q * u2 + A1
            logf = TWO * u + (u * u2) * q
            r = e * LN2_HI + (e * LN2_LO + logf)
            return x if x != x else r

        return impl
    if x == types.float64:
        f = np.float64
        SQRTH = np.int64(0x3FE6A09E667F3BCD)
        MANT = np.int64(0x000FFFFFFFFFFFFF)
        LN2_HI = f(6.93147180369123816490e-01)
        LN2_LO = f(1.90821492927058770002e-10)
        ONE = f(1.0)
        TWO = f(2.0)
        A1 = f(2.0 / 3.0)
        A2 = f(2.0 / 5.0)
        A3 = f(2.0 / 7.0)
        A4 = f(2.0 / 9.0)
        A5 = f(2.0 / 11.0)
        A6 = f(2.0 / 13.0)
        A7 = f(2.0 / 15.0)
        A8 = f(2.0 / 17.0)
        A9 = f(2.0 / 19.0)

        def impl(x):
            ix = _float_to_bits(x) - SQRTH
            e = f(ix >> 52)
            fm = _bits_to_float((ix & MANT) + SQRTH)
            u = (fm - ONE) / (fm + ONE)
            u2 = u * u
            q = A9 * u2 + A8
            q = q * u2 + A7
            q = q * u2 + A6
            q = q * u2 + A5
            q = q * u2 + A4
            q = q * u2 + A3
            q = q * u2 + A2
            q = q * u2 + A1
            logf = TWO * u + (u * u2) * q
            r = e * LN2_HI + (e * LN2_LO + logf)
            return x if x != x else r

        return impl
    return None


@njit(**_JIT)
def log_array(x, out):
    """out[i] = _log(x[i]) for a 1-D array (a test hook for the logarithm)."""
    for i in range(x.shape[0]):
        out[i] = _log(x[i])


@njit(**_JIT)
def exp_array(x, out):
    """out[i] = _exp(x[i]) for a 1-D array (a test hook for the exponential)."""
    for i in range(x.shape[0]):
        out[i] = _exp(x[i])


def _log1p(x):  # pragma: no cover - replaced by the overload below inside jitted code
    """log1p(r) for r >= 0 (or NaN), vectorisable; see the overload."""
    raise NotImplementedError


# log1p(r) = log s for s = 1 + r, r >= 0 the rest mass of rowmath (the small-C path does
# a block of rows at once; the row paths call libm's log1p once per row):
#   u = 1 + r rounds r; log1p(r) = log(u) + (r - (u - 1)) / u  recovers the lost part to
#   first order (u - 1 is exact by Sterbenz, r - (u - 1) is exactly the rounding error of
#   u, and d log u = du / u).  Error: _log's 1.91 ulp of log u plus ~1 ulp, relative to
#   log1p(r) also for r far below the unit roundoff (then log u = 0 and the correction
#   is r itself).  Compiled without reassoc: with it LLVM would fold (u - 1) - r to 0.


@overload(_log1p, jit_options=_EXP_JIT)
def _log1p_impl(x):
    if x in (types.float32, types.float64):
        ONE = np.float32(1.0) if x == types.float32 else np.float64(1.0)

        def impl(x):
            u = ONE + x
            return _log(u) + (x - (u - ONE)) / u

        return impl
    return None


@njit(**_JIT)
def log1p_array(x, out):
    """out[i] = _log1p(x[i]) for a 1-D array (a test hook)."""
    for i in range(x.shape[0]):
        out[i] = _log1p(x[i])


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
    so reassociation cannot fold the error term away)."""
    s = hi + v
    bb = s - hi
    return s, lo + ((hi - (s - bb)) + (v - bb))


# ---------------------------------------------------------------------------------------
# 3. Row passes.  ``xr``, ``gr`` ... are 1-D contiguous views of one row (or segment).
#    Pass B returns rowmath's (u, t): u = sum_{x_j < m} e_j, t = the sum of the other
#    e_j (the ties at the max, 1 each; NaN for a NaN or +inf in the row), in two lane
#    accumulators, so that r = u + (t - 1) keeps the mass of a confident row's other
#    classes instead of rounding it into s = 1 + r.
#    Sums run over blocks of 1024 elements (``xr[j0:j0 + 1024]``: a view with a plain
#    0-based index, which LLVM vectorises; an index like range(j0, j1) it could not prove
#    non-negative and turned into gathers).  Inside a block the SIMD lanes add in the
#    row's dtype; the block totals are added in float64, so a float32 row of any length
#    drifts no more than one block does (~1024/lanes ulp worst case, a few in practice).
#    The block size is a literal, not a tunable: it is part of the fixed summation order.
#    The *_ip variants are the in-place versions (grad is logits): they take the one
#    array, so LLVM sees a single pointer.  Given two arguments that happen to be the
#    same array, the vectoriser's run-time overlap check fails and the scalar loop runs
#    (measured 3-4x slower).
# ---------------------------------------------------------------------------------------


@njit(**_JIT)
def _row_max(xr):
    """Pass A: m = max_j x_j (NaN ignored; -inf for an all-(-inf)/NaN row)."""
    m = xr.dtype.type(-np.inf)
    for j in range(xr.shape[0]):
        m = _maxnum(m, xr[j])
    return m


@njit(**_JIT)
def _row_scalars(xr, m, u, t):
    """(r, log s, lse) of a row in its dtype, from pass A's m and pass B's float64 (u, t):
    r = u + (t - 1), log s = log1p(r), lse = m + log s."""
    T = xr.dtype.type
    r = T(_rest_mass(u, t, 1.0))
    log_s = T(np.log1p(r))
    return r, log_s, _log_sum_exp(m, log_s)


@njit(**_JIT)
def _row_sumexp(xr, m):
    """Pass B, loss only: (u, t)."""
    T = xr.dtype.type
    zero = T(0)
    one = T(1)
    u = 0.0
    t = 0.0
    for j0 in range(0, xr.shape[0], 1024):
        xb = xr[j0:j0 + 1024]
        bu = zero
        bt = zero
        for j in range(xb.shape[0]):
            xj = xb[j]
            e = _exp(xj - m)
            d = xj - m
            eu = zero if d == zero else e
            tie = one if d == zero else zero
            bu += eu
            bt += tie
        u += bu
        t += bt
    return u, t


@njit(**_JIT)
def _row_max_sumexp_wide(xr, xnext, prefetch, gr, store):
    """Passes A and B of a row of at least 64 classes, on 512-bit vectors (see
    ``_prefer_wide_vectors``); returns (m, u, t), and with ``store`` writes e_j into
    ``gr`` (which must not be ``xr``: in place has its own pass).  With ``prefetch``, the
    next row ``xnext`` is requested into L2 during pass B, so that its pass A, which would
    otherwise wait on memory with the core idle, reads from cache.

    Tails: LLVM runs 4 x 16 lanes per iteration, and a remainder of up to 63 scalar exps
    costs as much as a thousand vector ones.  So the loops run over the first
    ``body = c - c % 64`` elements, and the rest is one more full 64-element window
    ``x[c-64:c)``: for the max, overlapping is harmless; for the sums, the lanes already
    counted contribute 0 (a select on the index, so the window vectorises); the stores
    of the overlap write again the values already there (same x, same m, same exp)."""
    _prefer_wide_vectors()
    T = xr.dtype.type
    zero = T(0)
    one = T(1)
    n = xr.shape[0]
    body = n - n % 64
    window = xr[n - 64:]
    m = T(-np.inf)
    xb = xr[:body]
    for j in range(xb.shape[0]):
        m = _maxnum(m, xb[j])
    for j in range(64):
        m = _maxnum(m, window[j])
    line = 64 // xr.itemsize  # elements per cache line
    u = 0.0
    t = 0.0
    for j0 in range(0, body, 1024):
        if prefetch:
            for k in range(j0, min(j0 + 1024, n), line):
                _prefetch(xnext, k)
        xb = xr[j0:min(j0 + 1024, body)]
        bu = zero
        bt = zero
        if store:
            gb = gr[j0:min(j0 + 1024, body)]
            for j in range(xb.shape[0]):
                xj = xb[j]
                e = _exp_grad(xj, m)
                gb[j] = e
                d = xj - m
                eu = zero if d == zero else e
                tie = one if d == zero else zero
                bu += eu
                bt += tie
        else:
            for j in range(xb.shape[0]):
                xj = xb[j]
                e = _exp(xj - m)
                d = xj - m
                eu = zero if d == zero else e
                tie = one if d == zero else zero
                bu += eu
                bt += tie
        u += bu
        t += bt
    if body < n:
        if prefetch:
            _prefetch(xnext, n - 1)
        counted = body - (n - 64)  # window lanes [0, counted) are in the blocks above
        gw = gr[n - 64:]
        bu = zero
        bt = zero
        for j in range(64):
            xj = window[j]
            e = _exp_grad(xj, m)
            if store:
                gw[j] = e
            fresh = j >= counted               # lanes [0, counted) were summed above:
            d = xj - m if fresh else one       # such a lane is no tie ...
            eu = zero if (d == zero or not fresh) else e   # ... and adds no term
            tie = one if d == zero else zero
            bu += eu
            bt += tie
        u += bu
        t += bt
    return m, u, t


@njit(**_JIT)
def _row_scale_wide(gr, a):
    """Pass C (``_row_scale``) on 512-bit vectors, for the rows that took the wide
    pass B."""
    _prefer_wide_vectors()
    for j in range(gr.shape[0]):
        gr[j] = gr[j] * a


@njit(**_JIT)
def _row_max_sumexp(x, i, r1, wide, prefetch, gr, store):
    """(m, u, t) of row i of x, and with ``store`` e_j written into ``gr`` (not x: in
    place has its own pass): the wide passes for long rows (``wide``), prefetching row
    i + 1 when it is in [r0, r1) of this thread; else passes A, B.  Without ``store``,
    ``gr`` is any writeable 1-D array (never written; x itself may be read-only)."""
    if wide:
        following = i + 1 < r1
        return _row_max_sumexp_wide(x[i], x[i + 1] if following else x[i],
                                    prefetch and following, gr, store)
    m = _row_max(x[i])
    if store:
        u, t = _row_sumexp_store(x[i], m, gr)
    else:
        u, t = _row_sumexp(x[i], m)
    return m, u, t


@njit(**_JIT)
def _row_sumexp_store(xr, m, gr):
    """Pass B with gradient: gr_j = e_j = exp(x_j - m); returns (u, t)."""
    T = xr.dtype.type
    zero = T(0)
    one = T(1)
    u = 0.0
    t = 0.0
    for j0 in range(0, xr.shape[0], 1024):
        xb = xr[j0:j0 + 1024]
        gb = gr[j0:j0 + 1024]
        bu = zero
        bt = zero
        for j in range(xb.shape[0]):
            xj = xb[j]
            e = _exp_grad(xj, m)
            gb[j] = e
            d = xj - m
            eu = zero if d == zero else e
            tie = one if d == zero else zero
            bu += eu
            bt += tie
        u += bu
        t += bt
    return u, t


@njit(**_JIT)
def _row_softmax_exp(xr, m, out):
    """Pass B of softmax: out_j = e_j = exp(x_j - m) compensated for the rounding of
    x_j - m (_exp_diff); returns (u, t).  The sum is kept tighter than the loss passes'
    (softmax's bound is 4 ulps): the lanes add in float64 (float32 terms exactly) over
    blocks of 256, and the block totals are added with their rounding errors kept."""
    T = xr.dtype.type
    zero = T(0)
    one = T(1)
    hi = 0.0
    lo = 0.0
    t = 0.0
    for j0 in range(0, xr.shape[0], 256):
        xb = xr[j0:j0 + 256]
        ob = out[j0:j0 + 256]
        bu = 0.0
        bt = zero
        for j in range(xb.shape[0]):
            xj = xb[j]
            e = _exp_diff(xj, m)
            ob[j] = e
            d = xj - m
            eu = zero if d == zero else e
            tie = one if d == zero else zero
            bu += eu
            bt += tie
        hi, lo = _two_sum_add(hi, lo, bu)
        t += bt
    return hi + lo, t


@njit(**_JIT)
def _row_sumexp_store_ip(gr, m):
    """_row_sumexp_store in place: gr_j <- exp(gr_j - m) (x_j read before written)."""
    T = gr.dtype.type
    zero = T(0)
    one = T(1)
    u = 0.0
    t = 0.0
    for j0 in range(0, gr.shape[0], 1024):
        gb = gr[j0:j0 + 1024]
        bu = zero
        bt = zero
        for j in range(gb.shape[0]):
            xj = gb[j]
            e = _exp_grad(xj, m)
            gb[j] = e
            d = xj - m
            eu = zero if d == zero else e
            tie = one if d == zero else zero
            bu += eu
            bt += tie
        u += bu
        t += bt
    return u, t


@njit(**_JIT)
def _row_sumexp_wsum(xr, m, w):
    """Pass B, sparse + label smoothing, loss only: returns (u, t, wd) with
    wd = sum_{w_j != 0} w_j (m - x_j)  (m - x_j >= 0: a zero weight skips even x_j = -inf)."""
    T = xr.dtype.type
    zero = T(0)
    one = T(1)
    u = 0.0
    t = 0.0
    wd = 0.0
    for j0 in range(0, xr.shape[0], 1024):
        xb = xr[j0:j0 + 1024]
        wb = w[j0:j0 + 1024]
        bu = zero
        bt = zero
        bm = zero
        for j in range(xb.shape[0]):
            xj = xb[j]
            e = _exp(xj - m)
            d = xj - m
            eu = zero if d == zero else e
            tie = one if d == zero else zero
            bu += eu
            bt += tie
            wj = wb[j]
            bm += wj * (m - xj) if wj != zero else zero
        u += bu
        t += bt
        wd += bm
    return u, t, wd


@njit(**_JIT)
def _row_sumexp_wsum_store(xr, m, w, gr):
    """_row_sumexp_wsum, also storing e_j into gr."""
    T = xr.dtype.type
    zero = T(0)
    one = T(1)
    u = 0.0
    t = 0.0
    wd = 0.0
    for j0 in range(0, xr.shape[0], 1024):
        xb = xr[j0:j0 + 1024]
        wb = w[j0:j0 + 1024]
        gb = gr[j0:j0 + 1024]
        bu = zero
        bt = zero
        bm = zero
        for j in range(xb.shape[0]):
            xj = xb[j]
            e = _exp_grad(xj, m)
            gb[j] = e
            d = xj - m
            eu = zero if d == zero else e
            tie = one if d == zero else zero
            bu += eu
            bt += tie
            wj = wb[j]
            bm += wj * (m - xj) if wj != zero else zero
        u += bu
        t += bt
        wd += bm
    return u, t, wd


@njit(**_JIT)
def _row_sumexp_wsum_store_ip(gr, m, w):
    """_row_sumexp_wsum_store in place."""
    T = gr.dtype.type
    zero = T(0)
    one = T(1)
    u = 0.0
    t = 0.0
    wd = 0.0
    for j0 in range(0, gr.shape[0], 1024):
        gb = gr[j0:j0 + 1024]
        wb = w[j0:j0 + 1024]
        bu = zero
        bt = zero
        bm = zero
        for j in range(gb.shape[0]):
            xj = gb[j]
            e = _exp_grad(xj, m)
            gb[j] = e
            d = xj - m
            eu = zero if d == zero else e
            tie = one if d == zero else zero
            bu += eu
            bt += tie
            wj = wb[j]
            bm += wj * (m - xj) if wj != zero else zero
        u += bu
        t += bt
        wd += bm
    return u, t, wd


@njit(**_JIT)
def _row_sumexp_dense(xr, tr, w, one_m_eps, eps_c, m):
    """Pass B, probability labels, loss only: returns (u, t, t_sum, wd) with
    wt_j = w_j ((1 - eps) t_j + eps/C),  t_sum = sum_j wt_j,
    wd = sum_{wt_j != 0} wt_j (m - x_j)   (a class with wt_j == 0 adds nothing, even
    where x_j = -inf)."""
    T = xr.dtype.type
    zero = T(0)
    one = T(1)
    u = 0.0
    t = 0.0
    tw = 0.0
    wd = 0.0
    for j0 in range(0, xr.shape[0], 1024):
        xb = xr[j0:j0 + 1024]
        tb = tr[j0:j0 + 1024]
        wb = w[j0:j0 + 1024]
        bu = zero
        bt = zero
        btw = zero
        bm = zero
        for j in range(xb.shape[0]):
            xj = xb[j]
            e = _exp(xj - m)
            d = xj - m
            eu = zero if d == zero else e
            tie = one if d == zero else zero
            bu += eu
            bt += tie
            wt = _smoothed_weight(wb[j], tb[j], one_m_eps, eps_c)
            btw += wt
            bm += wt * (m - xj) if wt != zero else zero
        u += bu
        t += bt
        tw += btw
        wd += bm
    return u, t, tw, wd


@njit(**_JIT)
def _row_sumexp_dense_store(xr, tr, w, one_m_eps, eps_c, m, gr):
    """_row_sumexp_dense, also storing e_j into gr."""
    T = xr.dtype.type
    zero = T(0)
    one = T(1)
    u = 0.0
    t = 0.0
    tw = 0.0
    wd = 0.0
    for j0 in range(0, xr.shape[0], 1024):
        xb = xr[j0:j0 + 1024]
        tb = tr[j0:j0 + 1024]
        wb = w[j0:j0 + 1024]
        gb = gr[j0:j0 + 1024]
        bu = zero
        bt = zero
        btw = zero
        bm = zero
        for j in range(xb.shape[0]):
            xj = xb[j]
            e = _exp_grad(xj, m)
            gb[j] = e
            d = xj - m
            eu = zero if d == zero else e
            tie = one if d == zero else zero
            bu += eu
            bt += tie
            wt = _smoothed_weight(wb[j], tb[j], one_m_eps, eps_c)
            btw += wt
            bm += wt * (m - xj) if wt != zero else zero
        u += bu
        t += bt
        tw += btw
        wd += bm
    return u, t, tw, wd


@njit(**_JIT)
def _row_sumexp_dense_store_ip(gr, tr, w, one_m_eps, eps_c, m):
    """_row_sumexp_dense_store in place."""
    T = gr.dtype.type
    zero = T(0)
    one = T(1)
    u = 0.0
    t = 0.0
    tw = 0.0
    wd = 0.0
    for j0 in range(0, gr.shape[0], 1024):
        gb = gr[j0:j0 + 1024]
        tb = tr[j0:j0 + 1024]
        wb = w[j0:j0 + 1024]
        bu = zero
        bt = zero
        btw = zero
        bm = zero
        for j in range(gb.shape[0]):
            xj = gb[j]
            e = _exp_grad(xj, m)
            gb[j] = e
            d = xj - m
            eu = zero if d == zero else e
            tie = one if d == zero else zero
            bu += eu
            bt += tie
            wt = _smoothed_weight(wb[j], tb[j], one_m_eps, eps_c)
            btw += wt
            bm += wt * (m - xj) if wt != zero else zero
        u += bu
        t += bt
        tw += btw
        wd += bm
    return u, t, tw, wd


@njit(**_JIT)
def _row_scale(gr, a):
    """Pass C: gr_j <- gr_j * a."""
    for j in range(gr.shape[0]):
        gr[j] = gr[j] * a


@njit(**_JIT)
def _row_scale_sub(gr, a, bvec):
    """Pass C: gr_j <- gr_j * a - bvec_j."""
    for j in range(gr.shape[0]):
        gr[j] = gr[j] * a - bvec[j]


@njit(**_JIT)
def _row_dense_grad(gr, tr, w, one_m_eps, eps_c, r, coef, gs_over_s):
    """Pass C, probability labels: gr_j <- rowmath.dense_grad(e_j, wt_j, ...)."""
    for j in range(gr.shape[0]):
        wt = _smoothed_weight(w[j], tr[j], one_m_eps, eps_c)
        gr[j] = _dense_grad(gr[j], wt, r, coef, gs_over_s)


@njit(**_JIT)
def _row_softmax(orow, one, r):
    """Pass C of softmax: p_j = e_j / s (rowmath.softmax)."""
    for j in range(orow.shape[0]):
        orow[j] = _softmax(orow[j], one, r)


@njit(**_JIT)
def _row_fill(gr, v):
    for j in range(gr.shape[0]):
        gr[j] = v


@njit(**_JIT)
def _row_logsm(xr, m, log_s, out):
    """out_j = (x_j - m) - log s  (rowmath.log_softmax)."""
    for j in range(xr.shape[0]):
        out[j] = _log_softmax(xr[j], m, log_s)


# ---------------------------------------------------------------------------------------
# 4. Row-range bodies: rows [r0, r1).  The formulas are rowmath's (see its docstring).
# ---------------------------------------------------------------------------------------


@njit(**_JIT)
def _lse_rows(r0, r1, x, out, wide, prefetch):
    unused = np.empty(0, x.dtype)
    for i in range(r0, r1):
        m, u, t = _row_max_sumexp(x, i, r1, wide, prefetch, unused, False)
        out[i] = _row_scalars(x[i], m, u, t)[2]


@njit(**_JIT)
def _log_softmax_rows(r0, r1, x, out):
    for i in range(r0, r1):
        xr = x[i]
        m = _row_max(xr)
        u, t = _row_sumexp(xr, m)
        _row_logsm(xr, m, _row_scalars(xr, m, u, t)[1], out[i])


@njit(**_JIT)
def _softmax_rows(r0, r1, x, out):
    # p_j = e_j / s: e_j stored in pass B, scaled by 1/s in pass C while in cache.
    one = x.dtype.type(1)
    for i in range(r0, r1):
        orow = out[i]
        m = _row_max(x[i])
        u, t = _row_softmax_exp(x[i], m, orow)
        _row_softmax(orow, one, _row_scalars(x[i], m, u, t)[0])


@njit(**_JIT)
def _sparse_loss_rows(r0, r1, x, labels, w, ignore_index, z, loss, lse, wide, prefetch):
    # No smoothing: loss = w_y ((m - x_y) + log s) + z lse^2.  Ignored rows: loss 0, lse
    # still computed.
    T = x.dtype.type
    zero = T(0)
    one = T(1)
    has_w = w.shape[0] != 0
    unused = np.empty(0, x.dtype)
    for i in range(r0, r1):
        m, u, t = _row_max_sumexp(x, i, r1, wide, prefetch, unused, False)
        _, log_s, ls = _row_scalars(x[i], m, u, t)
        lse[i] = ls
        y = labels[i]
        if y == ignore_index:
            loss[i] = zero
        else:
            wy = w[y] if has_w else one
            loss[i] = _sparse_loss(m, log_s, x[i, y], wy, one, zero, zero, zero, z)


@njit(**_JIT)
def _sparse_grad_rows(r0, r1, x, labels, w, ignore_index, z, gs, loss, lse, g, inplace,
                      wide, prefetch):
    # No smoothing, with the gradient (x is g when inplace): pass B stores e_j in g;
    # pass C multiplies by a = (w_y + 2 z lse) gs / s; then the true class gets
    # rowmath.sparse_true_grad from e_y (read before pass C).
    # Rows of at least WIDE_MIN_C classes (``wide``, not in place) take the 512-bit
    # passes A+B and C, prefetching the next row during pass B (``prefetch``).
    T = x.dtype.type
    zero = T(0)
    one = T(1)
    has_w = w.shape[0] != 0
    wide_b = wide and not inplace
    for i in range(r0, r1):
        gr = g[i]
        y = labels[i]
        if y == ignore_index:
            m, u, t = _row_max_sumexp(x, i, r1, wide, prefetch, gr, False)
            lse[i] = _row_scalars(gr, m, u, t)[2]
            loss[i] = zero
            _row_fill(gr, zero)
            continue
        xy = x[i, y]                      # read before pass B overwrites it (in place)
        if inplace:
            m = _row_max(x[i])
            u, t = _row_sumexp_store_ip(gr, m)
        else:
            m, u, t = _row_max_sumexp(x, i, r1, wide, prefetch, gr, True)
        r, log_s, ls = _row_scalars(gr, m, u, t)
        lse[i] = ls
        wy = w[y] if has_w else one
        loss[i] = _sparse_loss(m, log_s, xy, wy, one, zero, zero, zero, z)
        ey = gr[y]
        a = _sparse_scale(one, r, ls, wy, one, zero, zero, z, gs)
        if wide_b:
            _row_scale_wide(gr, a)
        else:
            _row_scale(gr, a)
        gr[y] = _sparse_true_grad(one, ey, r, ls, wy, one, zero, zero, z, gs)


@njit(**_JIT)
def _sparse_smooth_loss_rows(r0, r1, x, labels, w, ignore_index, one_m_eps, eps_c,
                             w_sum, z, loss, lse):
    # With smoothing (w = class weights, ones when the user gave none):
    #   loss = (1 - eps) w_y ((m - x_y) + log s) + (eps/C) (W log s + wd) + z lse^2.
    T = x.dtype.type
    for i in range(r0, r1):
        xr = x[i]
        m = _row_max(xr)
        u, t, wd = _row_sumexp_wsum(xr, m, w)
        _, log_s, ls = _row_scalars(xr, m, u, t)
        lse[i] = ls
        y = labels[i]
        if y == ignore_index:
            loss[i] = T(0)
            continue
        loss[i] = _sparse_loss(m, log_s, xr[y], w[y], one_m_eps, eps_c, w_sum, T(wd), z)


@njit(**_JIT)
def _sparse_smooth_grad_rows(r0, r1, x, labels, w, bvec, ignore_index, one_m_eps, eps_c,
                             w_sum, z, gs, loss, lse, g, inplace):
    #   g_j = e_j a - b_j,  a = A gs / s,  bvec_j = (eps/C) w_j gs;  g_y from
    #   rowmath.sparse_true_grad (which includes its own b_y).
    T = x.dtype.type
    one = T(1)
    for i in range(r0, r1):
        gr = g[i]
        y = labels[i]
        m = _row_max(x[i])
        if y == ignore_index:
            u, t, wd = _row_sumexp_wsum(x[i], m, w)
            lse[i] = _row_scalars(gr, m, u, t)[2]
            loss[i] = T(0)
            _row_fill(gr, T(0))
            continue
        xy = x[i, y]
        if inplace:
            u, t, wd = _row_sumexp_wsum_store_ip(gr, m, w)
        else:
            u, t, wd = _row_sumexp_wsum_store(x[i], m, w, gr)
        r, log_s, ls = _row_scalars(gr, m, u, t)
        lse[i] = ls
        wy = w[y]
        loss[i] = _sparse_loss(m, log_s, xy, wy, one_m_eps, eps_c, w_sum, T(wd), z)
        ey = gr[y]
        _row_scale_sub(gr, _sparse_scale(one, r, ls, wy, one_m_eps, eps_c, w_sum, z, gs),
                       bvec)
        gr[y] = _sparse_true_grad(one, ey, r, ls, wy, one_m_eps, eps_c, w_sum, z, gs)


@njit(**_JIT)
def _dense_loss_rows(r0, r1, x, t, w, one_m_eps, eps_c, z, loss, lse):
    # loss = T log s + wd + z lse^2,  T = sum wt_c, wd = sum wt_c (m - x_c).
    T = x.dtype.type
    for i in range(r0, r1):
        xr = x[i]
        m = _row_max(xr)
        u, tt, tw, wd = _row_sumexp_dense(xr, t[i], w, one_m_eps, eps_c, m)
        _, log_s, ls = _row_scalars(xr, m, u, tt)
        lse[i] = ls
        loss[i] = _dense_loss(m, log_s, T(tw), T(wd), z)


@njit(**_JIT)
def _dense_grad_rows(r0, r1, x, t, w, one_m_eps, eps_c, z, gs, loss, lse, g, inplace):
    #   g_j = ((e_j A - wt_j) - wt_j r) gs / s,  A = T + 2 z lse.
    T = x.dtype.type
    one = T(1)
    for i in range(r0, r1):
        tr = t[i]
        gr = g[i]
        m = _row_max(x[i])
        if inplace:
            u, tt, tw, wd = _row_sumexp_dense_store_ip(gr, tr, w, one_m_eps, eps_c, m)
        else:
            u, tt, tw, wd = _row_sumexp_dense_store(x[i], tr, w, one_m_eps, eps_c, m, gr)
        r, log_s, ls = _row_scalars(gr, m, u, tt)
        lse[i] = ls
        loss[i] = _dense_loss(m, log_s, T(tw), T(wd), z)
        _row_dense_grad(gr, tr, w, one_m_eps, eps_c, r, _dense_coef(ls, T(tw), z),
                        _grad_over_sum(one, r, gs))


# ---------------------------------------------------------------------------------------
# 5. Parallel drivers: prange over `nchunks` chunks of `chunk` consecutive rows.  Numba
#    splits the chunk range statically among its threads; a row is always done whole by
#    one thread, so the result does not depend on the thread count.
# ---------------------------------------------------------------------------------------


@njit(**_PJIT)
def _lse_par(nchunks, chunk, x, out, wide, prefetch):
    n = x.shape[0]
    for k in prange(nchunks):
        _lse_rows(k * chunk, min(n, (k + 1) * chunk), x, out, wide, prefetch)


@njit(**_PJIT)
def _log_softmax_par(nchunks, chunk, x, out):
    n = x.shape[0]
    for k in prange(nchunks):
        _log_softmax_rows(k * chunk, min(n, (k + 1) * chunk), x, out)


@njit(**_PJIT)
def _softmax_par(nchunks, chunk, x, out):
    n = x.shape[0]
    for k in prange(nchunks):
        _softmax_rows(k * chunk, min(n, (k + 1) * chunk), x, out)


@njit(**_PJIT)
def _sparse_loss_par(nchunks, chunk, x, labels, w, ignore_index, z, loss, lse, wide,
                     prefetch):
    n = x.shape[0]
    for k in prange(nchunks):
        _sparse_loss_rows(k * chunk, min(n, (k + 1) * chunk), x, labels, w, ignore_index,
                          z, loss, lse, wide, prefetch)


@njit(**_PJIT)
def _sparse_grad_par(nchunks, chunk, x, labels, w, ignore_index, z, gs, loss, lse, g,
                     inplace, wide, prefetch):
    n = x.shape[0]
    for k in prange(nchunks):
        _sparse_grad_rows(k * chunk, min(n, (k + 1) * chunk), x, labels, w, ignore_index,
                          z, gs, loss, lse, g, inplace, wide, prefetch)


@njit(**_PJIT)
def _sparse_smooth_loss_par(nchunks, chunk, x, labels, w, ignore_index, one_m_eps, eps_c,
                            w_sum,  z, loss, lse):
    n = x.shape[0]
    for k in prange(nchunks):
        _sparse_smooth_loss_rows(k * chunk, min(n, (k + 1) * chunk), x, labels, w,
                                 ignore_index, one_m_eps, eps_c, w_sum,  z, loss, lse)


@njit(**_PJIT)
def _sparse_smooth_grad_par(nchunks, chunk, x, labels, w, bvec, ignore_index, one_m_eps,
                            eps_c, w_sum,  z, gs, loss, lse, g, inplace):
    n = x.shape[0]
    for k in prange(nchunks):
        _sparse_smooth_grad_rows(k * chunk, min(n, (k + 1) * chunk), x, labels, w, bvec,
                                 ignore_index, one_m_eps, eps_c, w_sum,  z, gs,
                                 loss, lse, g, inplace)


@njit(**_PJIT)
def _dense_loss_par(nchunks, chunk, x, t, w, one_m_eps, eps_c, z, loss, lse):
    n = x.shape[0]
    for k in prange(nchunks):
        _dense_loss_rows(k * chunk, min(n, (k + 1) * chunk), x, t, w, one_m_eps, eps_c, z,
                         loss, lse)


@njit(**_PJIT)
def _dense_grad_par(nchunks, chunk, x, t, w, one_m_eps, eps_c, z, gs, loss, lse, g,
                    inplace):
    n = x.shape[0]
    for k in prange(nchunks):
        _dense_grad_rows(k * chunk, min(n, (k + 1) * chunk), x, t, w, one_m_eps, eps_c, z,
                         gs, loss, lse, g, inplace)


# ---------------------------------------------------------------------------------------
# 6. Small C (c <= SMALL_C_MAX): a row is shorter than a few SIMD registers, so vectorising
#    along it wastes lanes on remainders, and the per-row overhead (loop set-up, a libm
#    log call) dominates.  Instead a block of `blk` rows is transposed into a class-major
#    scratch buffer buf[j, b] = x[b0 + b, j], and every pass runs over b (rows) in SIMD:
#      max:  m_b = max_j buf[j, b]  (fused with the transpose)
#      exp:  buf[j, b] = e_jb,  u_b, t_b += e_jb;  r_b and log1p r_b with the vectorised
#            _log1p
#      scale (gradient): g[b0 + b, j] = buf[j, b] * a_b  (fused with the transpose back)
#    The whole block is read into buf before any of its grad rows is written, so grad may
#    be logits.  Same rowmath formulas as the row bodies; a row's sum runs over j in
#    order.  Scratch (c*blk + a few blk-vectors) is allocated once per chunk.
# ---------------------------------------------------------------------------------------


@njit(**_JIT)
def _blk_load_max(x, b0, nb, buf, mv):
    """buf[j, b] = x[b0 + b, j];  mv[b] = max_j x[b0 + b, j].  Loop order b-outer,
    j-inner (unit-stride reads of a row, strided writes into the L1-resident buf): the
    kernel at 1M x 10 float32 took 0.86x the time of the j-outer order (paired, 40
    alternations in one process; benchmarks/NOTES_cpu_kernels.md)."""
    xs = x[b0:b0 + nb]
    mb = mv[:nb]
    for b in range(nb):
        xr = xs[b]
        m = mv.dtype.type(-np.inf)
        for j in range(x.shape[1]):
            v = xr[j]
            buf[j, b] = v
            m = v if v > m else m           # a NaN never wins; it still poisons the sum
        mb[b] = m


@njit(**_JIT)
def _blk_load(t, b0, nb, buf):
    """buf[j, b] = t[b0 + b, j]  (b-outer like _blk_load_max)."""
    ts = t[b0:b0 + nb]
    for b in range(nb):
        tr = ts[b]
        for j in range(t.shape[1]):
            buf[j, b] = tr[j]


@njit(**_JIT)
def _blk_sumexp(buf, nb, mv, rv, tv, lv, store):
    """Pass B of a block: rv[b] = r = u + (t - 1) of row b, lv[b] = log1p r (tv is
    scratch for the tie counts).  store: 0 sums only; 1 buf[j, b] <- e_jb as the
    gradient passes store it (_exp_grad).  (softmax has a pass of its own.)"""
    T = buf.dtype.type
    zero = T(0)
    one = T(1)
    mb = mv[:nb]
    ub = rv[:nb]
    tb = tv[:nb]
    for b in range(nb):
        ub[b] = zero
        tb[b] = zero
    for j in range(buf.shape[0]):
        bj = buf[j, :nb]
        if store == 0:
            for b in range(nb):
                d = bj[b] - mb[b]
                e = _exp(d)
                eu = zero if d == zero else e
                tie = one if d == zero else zero
                ub[b] += eu
                tb[b] += tie
        else:
            for b in range(nb):
                d = bj[b] - mb[b]
                e = _exp_grad(bj[b], mb[b])
                bj[b] = e
                eu = zero if d == zero else e
                tie = one if d == zero else zero
                ub[b] += eu
                tb[b] += tie
    lb = lv[:nb]
    for b in range(nb):
        r = _rest_mass(ub[b], tb[b], one)
        ub[b] = r
        lb[b] = _log1p(r)


@njit(**_JIT)
def _blk_wsum(buf, nb, mv, w, smv):
    """smv[b] = sum_{w_j != 0} w_j (m_b - x_jb)   (before buf is overwritten)."""
    T = buf.dtype.type
    zero = T(0)
    mb = mv[:nb]
    smb = smv[:nb]
    for b in range(nb):
        smb[b] = zero
    for j in range(buf.shape[0]):
        wj = w[j]
        if wj != zero:
            bj = buf[j, :nb]
            for b in range(nb):
                smb[b] += wj * (mb[b] - bj[b])


@njit(**_JIT)
def _blk_scale_store(buf, nb, av, g, b0):
    """g[b0 + b, j] = buf[j, b] * av[b]  (b-outer: unit-stride writes of a grad row;
    0.95x the time of the j-outer order at 1M x 10, paired)."""
    ab = av[:nb]
    gs = g[b0:b0 + nb]
    for b in range(nb):
        a = ab[b]
        gr = gs[b]
        for j in range(buf.shape[0]):
            gr[j] = buf[j, b] * a


@njit(**_JIT)
def _small_lse_rows(r0, r1, x, out, blk):
    c = x.shape[1]
    T = x.dtype.type
    buf = np.empty((c, blk), T)
    mv = np.empty(blk, T)
    rv = np.empty(blk, T)
    tv = np.empty(blk, T)
    lv = np.empty(blk, T)
    for b0 in range(r0, r1, blk):
        nb = min(blk, r1 - b0)
        _blk_load_max(x, b0, nb, buf, mv)
        _blk_sumexp(buf, nb, mv, rv, tv, lv, 0)
        ob = out[b0:b0 + nb]
        for b in range(nb):
            ob[b] = _log_sum_exp(mv[b], lv[b])


@njit(**_JIT)
def _small_log_softmax_rows(r0, r1, x, out, blk):
    c = x.shape[1]
    T = x.dtype.type
    buf = np.empty((c, blk), T)
    mv = np.empty(blk, T)
    rv = np.empty(blk, T)
    tv = np.empty(blk, T)
    lv = np.empty(blk, T)
    for b0 in range(r0, r1, blk):
        nb = min(blk, r1 - b0)
        _blk_load_max(x, b0, nb, buf, mv)
        _blk_sumexp(buf, nb, mv, rv, tv, lv, 0)
        for b in range(nb):
            _row_logsm(x[b0 + b], mv[b], lv[b], out[b0 + b])


@njit(**_JIT)
def _small_softmax_rows(r0, r1, x, out, blk):
    # Pass B as _blk_sumexp's, with softmax's compensated e_j (_exp_diff) and the sums
    # in float64 lanes (4 ulps: see _row_softmax_exp); then p_j = e_j / s.
    c = x.shape[1]
    T = x.dtype.type
    zero = T(0)
    one = T(1)
    buf = np.empty((c, blk), T)
    mv = np.empty(blk, T)
    uv = np.empty(blk, np.float64)
    tv = np.empty(blk, T)
    rv = np.empty(blk, T)
    for b0 in range(r0, r1, blk):
        nb = min(blk, r1 - b0)
        _blk_load_max(x, b0, nb, buf, mv)
        mb = mv[:nb]
        ub = uv[:nb]
        tb = tv[:nb]
        for b in range(nb):
            ub[b] = 0.0
            tb[b] = zero
        for j in range(c):
            bj = buf[j, :nb]
            for b in range(nb):
                d = bj[b] - mb[b]
                e = _exp_diff(bj[b], mb[b])
                bj[b] = e
                eu = zero if d == zero else e
                tie = one if d == zero else zero
                ub[b] += eu
                tb[b] += tie
        for b in range(nb):
            rv[b] = T(_rest_mass(ub[b], tb[b], 1.0))
        ob = out[b0:b0 + nb]
        for b in range(nb):
            r = rv[b]
            orow = ob[b]
            for j in range(c):
                orow[j] = _softmax(buf[j, b], one, r)


@njit(**_JIT)
def _small_sparse_rows(r0, r1, x, labels, w, bvec, ignore_index, one_m_eps, eps_c, w_sum,
                        smooth, z, gs, loss, lse, g, want_grad, blk):
    """Small-C index labels, every option (rowmath's formulas, as in _sparse_grad_rows and
    _sparse_smooth_grad_rows).  smooth: eps > 0, then w is a full weight vector and
    bvec_j = (eps/C) w_j gs; otherwise w may be empty (no weights) and eps_c = w_sum = 0."""
    c = x.shape[1]
    T = x.dtype.type
    zero = T(0)
    one = T(1)
    has_w = w.shape[0] != 0
    buf = np.empty((c, blk), T)
    mv = np.empty(blk, T)
    rv = np.empty(blk, T)
    tv = np.empty(blk, T)
    lv = np.empty(blk, T)
    smv = np.empty(blk, T)
    av = np.empty(blk, T)
    fix = np.empty(blk, T)
    for b0 in range(r0, r1, blk):
        nb = min(blk, r1 - b0)
        _blk_load_max(x, b0, nb, buf, mv)
        if smooth:
            _blk_wsum(buf, nb, mv, w, smv)
        _blk_sumexp(buf, nb, mv, rv, tv, lv, 1 if want_grad else 0)
        for b in range(nb):
            i = b0 + b
            y = labels[i]
            m = mv[b]
            r = rv[b]
            log_s = lv[b]
            ls = _log_sum_exp(m, log_s)
            lse[i] = ls
            if y == ignore_index:
                loss[i] = zero
                av[b] = zero
                continue
            xy = x[i, y]                    # this block's grad rows are not written yet
            wy = w[y] if has_w else one
            wd = smv[b] if smooth else zero
            loss[i] = _sparse_loss(m, log_s, xy, wy, one_m_eps, eps_c, w_sum, wd, z)
            if want_grad:
                av[b] = _sparse_scale(one, r, ls, wy, one_m_eps, eps_c, w_sum, z, gs)
                fix[b] = _sparse_true_grad(one, buf[y, b], r, ls, wy, one_m_eps, eps_c,
                                           w_sum, z, gs)
        if not want_grad:
            continue
        # g[i, j] = e_jb * a_b (- b_j), then the label column, one grad row at a time
        # while it is in L1 (b-outer, as in _blk_scale_store).
        gs_blk = g[b0:b0 + nb]
        for b in range(nb):
            y = labels[b0 + b]
            gr = gs_blk[b]
            if y == ignore_index:
                _row_fill(gr, zero)          # also for a NaN row (0 * NaN is NaN)
                continue
            a = av[b]
            if smooth:
                for j in range(c):
                    gr[j] = buf[j, b] * a - bvec[j]
            else:
                for j in range(c):
                    gr[j] = buf[j, b] * a
            gr[y] = fix[b]


@njit(**_JIT)
def _small_dense_rows(r0, r1, x, t, w, one_m_eps, eps_c, z, gs, loss, lse, g, want_grad,
                      blk):
    """Small-C probability labels (rowmath's formulas, as in _dense_grad_rows)."""
    c = x.shape[1]
    T = x.dtype.type
    zero = T(0)
    one = T(1)
    buf = np.empty((c, blk), T)
    tbuf = np.empty((c, blk), T)
    mv = np.empty(blk, T)
    rv = np.empty(blk, T)
    tv = np.empty(blk, T)
    lv = np.empty(blk, T)
    twv = np.empty(blk, T)
    wdv = np.empty(blk, T)
    cv = np.empty(blk, T)
    gv = np.empty(blk, T)
    for b0 in range(r0, r1, blk):
        nb = min(blk, r1 - b0)
        _blk_load_max(x, b0, nb, buf, mv)
        _blk_load(t, b0, nb, tbuf)
        mb = mv[:nb]
        twb = twv[:nb]
        wdb = wdv[:nb]
        for b in range(nb):
            twb[b] = zero
            wdb[b] = zero
        for j in range(c):
            wj = w[j]
            bj = buf[j, :nb]
            tj = tbuf[j, :nb]
            for b in range(nb):
                wt = _smoothed_weight(wj, tj[b], one_m_eps, eps_c)
                tj[b] = wt
                twb[b] += wt
                wdb[b] += wt * (mb[b] - bj[b]) if wt != zero else zero
        _blk_sumexp(buf, nb, mv, rv, tv, lv, 1 if want_grad else 0)
        for b in range(nb):
            i = b0 + b
            log_s = lv[b]
            ls = _log_sum_exp(mv[b], log_s)
            lse[i] = ls
            loss[i] = _dense_loss(mv[b], log_s, twb[b], wdb[b], z)
            cv[b] = _dense_coef(ls, twb[b], z)
            gv[b] = _grad_over_sum(one, rv[b], gs)
        if not want_grad:
            continue
        rb = rv[:nb]
        cb = cv[:nb]
        gb = gv[:nb]
        gsl = g[b0:b0 + nb]
        for j in range(c):
            bj = buf[j, :nb]
            tj = tbuf[j, :nb]
            for b in range(nb):
                gsl[b, j] = _dense_grad(bj[b], tj[b], rb[b], cb[b], gb[b])


@njit(**_PJIT)
def _small_lse_par(nchunks, chunk, x, out, blk):
    n = x.shape[0]
    for k in prange(nchunks):
        _small_lse_rows(k * chunk, min(n, (k + 1) * chunk), x, out, blk)


@njit(**_PJIT)
def _small_log_softmax_par(nchunks, chunk, x, out, blk):
    n = x.shape[0]
    for k in prange(nchunks):
        _small_log_softmax_rows(k * chunk, min(n, (k + 1) * chunk), x, out, blk)


@njit(**_PJIT)
def _small_softmax_par(nchunks, chunk, x, out, blk):
    n = x.shape[0]
    for k in prange(nchunks):
        _small_softmax_rows(k * chunk, min(n, (k + 1) * chunk), x, out, blk)


@njit(**_PJIT)
def _small_sparse_par(nchunks, chunk, x, labels, w, bvec, ignore_index, one_m_eps, eps_c,
                      w_sum,  smooth, z, gs, loss, lse, g, want_grad, blk):
    n = x.shape[0]
    for k in prange(nchunks):
        _small_sparse_rows(k * chunk, min(n, (k + 1) * chunk), x, labels, w, bvec,
                           ignore_index, one_m_eps, eps_c, w_sum,  smooth, z, gs,
                           loss, lse, g, want_grad, blk)


@njit(**_PJIT)
def _small_dense_par(nchunks, chunk, x, t, w, one_m_eps, eps_c, z, gs, loss, lse, g,
                     want_grad, blk):
    n = x.shape[0]
    for k in prange(nchunks):
        _small_dense_rows(k * chunk, min(n, (k + 1) * chunk), x, t, w, one_m_eps, eps_c, z,
                          gs, loss, lse, g, want_grad, blk)


# ---------------------------------------------------------------------------------------
# 7. Split rows (n <= SPLIT_MAX_ROWS, c >= SPLIT_MIN_C): fewer rows than cores, so every
#    row is cut into `nseg` segments of `seglen` (nseg = SPLIT_SEGMENTS: a constant) and
#    the (row, segment) tasks run in parallel:
#      phase 1  m_ip = max over segment p;   m_i = max_p m_ip  (max is exact: any order)
#      phase 2  (u_ip, t_ip) = pass B over segment p against m_i (e stored when needed);
#               u_i, t_i = sums over p ascending in float64 (fixed order);
#               r_i = u_i + (t_i - 1), log s_i = log1p r_i, lse_i = m_i + log s_i
#      phase 3  per-row scalars (serial, n values), then the scaling pass per segment.
# ---------------------------------------------------------------------------------------


@njit(**_PJIT)
def _seg_max_par(x, seglen, nseg, mseg):
    n, c = x.shape
    for task in prange(n * nseg):
        i = task // nseg
        p = task - i * nseg
        mseg[i, p] = _row_max(x[i, p * seglen:min(c, (p + 1) * seglen)])


@njit(**_PJIT)
def _seg_sumexp_par(x, m, seglen, nseg, useg, tseg, g, mode):
    """mode 0: sums only;  1: also e -> g;  2: in place (g is x; only g is used);
    3: softmax's compensated e -> g."""
    n, c = x.shape
    for task in prange(n * nseg):
        i = task // nseg
        p = task - i * nseg
        lo = p * seglen
        hi = min(c, lo + seglen)
        if mode == 0:
            u, t = _row_sumexp(x[i, lo:hi], m[i])
        elif mode == 1:
            u, t = _row_sumexp_store(x[i, lo:hi], m[i], g[i, lo:hi])
        elif mode == 3:
            u, t = _row_softmax_exp(x[i, lo:hi], m[i], g[i, lo:hi])
        else:
            u, t = _row_sumexp_store_ip(g[i, lo:hi], m[i])
        useg[i, p] = u
        tseg[i, p] = t


@njit(**_PJIT)
def _seg_scale_par(g, a, seglen, nseg):
    n, c = g.shape
    for task in prange(n * nseg):
        i = task // nseg
        p = task - i * nseg
        _row_scale(g[i, p * seglen:min(c, (p + 1) * seglen)], a[i])


@njit(**_PJIT)
def _seg_softmax_par(g, r, seglen, nseg):
    n, c = g.shape
    one = g.dtype.type(1)
    for task in prange(n * nseg):
        i = task // nseg
        p = task - i * nseg
        _row_softmax(g[i, p * seglen:min(c, (p + 1) * seglen)], one, r[i])


@njit(**_PJIT)
def _seg_logsm_par(x, m, log_s, seglen, nseg, out):
    n, c = x.shape
    for task in prange(n * nseg):
        i = task // nseg
        p = task - i * nseg
        lo = p * seglen
        hi = min(c, lo + seglen)
        _row_logsm(x[i, lo:hi], m[i], log_s[i], out[i, lo:hi])


# The split kernels compiled without parallel=True (prange is then range): the same
# segments in the same order on the calling thread, for a plan with parallel=False
# (a forked child, or forced).  Not cached: Numba's cache key does not include the
# parallel flag, so a cached twin would load the parallel build of the same source.
_SPLIT_SERIAL = {f: njit(**dict(_JIT, cache=False))(f.py_func)
                 for f in (_seg_max_par, _seg_sumexp_par, _seg_scale_par, _seg_softmax_par,
                           _seg_logsm_par)}


def _split_kernel(f, p: "Plan"):
    """The split kernel f as the plan runs it."""
    if p.parallel:
        _forkguard.note_parallel()
        return f
    return _SPLIT_SERIAL[f]


@njit(**_JIT)
def _seg_combine(useg, tseg, m, r, log_s, lse):
    """u_i, t_i = sums of the segments' in segment order; fills r, log_s and lse."""
    n, nseg = useg.shape
    for i in range(n):
        u = 0.0
        t = 0.0
        for p in range(nseg):
            u += useg[i, p]
            t += tseg[i, p]
        ri, log_si, lsei = _row_scalars(m, m[i], u, t)
        r[i] = ri
        log_s[i] = log_si
        lse[i] = lsei


@njit(**_JIT)
def _seg_rowmax(mseg, m):
    n, nseg = mseg.shape
    for i in range(n):
        acc = mseg.dtype.type(-np.inf)
        for p in range(nseg):
            acc = _maxnum(acc, mseg[i, p])
        m[i] = acc


@njit(**_JIT)
def _split_sparse_scalars(labels, w, ignore_index, z, gs, m, r, log_s, xy, loss, a):
    """Per-row loss and scale factor a_i of _sparse_grad_rows, for the split path
    (xy[i] = x[i, y_i], read before phase 2)."""
    T = m.dtype.type
    zero = T(0)
    one = T(1)
    has_w = w.shape[0] != 0
    for i in range(m.shape[0]):
        y = labels[i]
        if y == ignore_index:
            loss[i] = zero
            a[i] = zero
            continue
        ls = _log_sum_exp(m[i], log_s[i])
        wy = w[y] if has_w else one
        loss[i] = _sparse_loss(m[i], log_s[i], xy[i], wy, one, zero, zero, zero, z)
        a[i] = _sparse_scale(one, r[i], ls, wy, one, zero, zero, z, gs)


@njit(**_JIT)
def _split_sparse_fix(labels, ignore_index, z, gs, m, r, log_s, w, g, ey):
    """True class after the scaling pass (rowmath.sparse_true_grad from e_y saved before
    scaling); ignored rows are zeroed."""
    T = m.dtype.type
    zero = T(0)
    one = T(1)
    has_w = w.shape[0] != 0
    for i in range(m.shape[0]):
        y = labels[i]
        if y == ignore_index:
            _row_fill(g[i], zero)
            continue
        ls = _log_sum_exp(m[i], log_s[i])
        wy = w[y] if has_w else one
        g[i, y] = _sparse_true_grad(one, ey[i], r[i], ls, wy, one, zero, zero, z, gs)


# ---------------------------------------------------------------------------------------
# 8. Public kernels (plain Python): ``plan`` names the path from the shape and the
#    options alone, ``tuning`` forces one (so that tests reach every path by
#    construction), and each kernel converts scalars to the accumulation dtype (so no
#    float64 constant sneaks into float32 arithmetic) and calls the path's driver.
# ---------------------------------------------------------------------------------------

Path = Literal["small", "rows", "split"]
PATHS: tuple[str, ...] = ("small", "rows", "split")
OPS: tuple[str, ...] = ("sparse", "dense", "logsumexp", "log_softmax", "softmax")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call runs.

    path      "small": blocks of SMALL_C_BLOCK rows transposed class-major (SIMD across
              rows); "rows": one row at a time, SIMD along it; "split": every row cut
              into SPLIT_SEGMENTS segments that run in parallel (few, very long rows).
    parallel  chunks of rows (split: segments) under ``prange``; else the same bodies
              on the calling thread, no launch.  Always False in a child forked after
              a parallel region ran (``_forkguard``): same bodies, same bits.
    wide      rows: the 512-bit passes A+B(+C) of ``_row_max_sumexp_wide`` (only where
              the kernel has them: logsumexp, and index labels without smoothing, not
              in place for the gradient).
    prefetch  wide: request the next row into L2 during pass B.
    """

    path: Path
    parallel: bool
    wide: bool = False
    prefetch: bool = False


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Forced choices for ``plan`` (None: choose by shape).  A forced choice the call
    cannot take (split for probability labels or label smoothing; wide where the
    kernel has no wide passes, or rows of fewer than 64 classes) raises ValueError."""

    force_path: Path | None = None
    force_parallel: bool | None = None
    force_wide: bool | None = None
    force_prefetch: bool | None = None


_tuning: contextvars.ContextVar[Tuning] = contextvars.ContextVar(
    "xentfast_cpu_tuning", default=Tuning())


@contextlib.contextmanager
def tuning(**forced) -> Iterator[Tuning]:
    """``with tuning(force_path="small", force_parallel=True): ...`` for this context
    (thread / task) only."""
    t = dataclasses.replace(_tuning.get(), **forced)
    if t.force_path not in (None, *PATHS):
        raise ValueError(f"force_path must be None or one of {PATHS}; got {t.force_path!r}")
    token = _tuning.set(t)
    try:
        yield t
    finally:
        _tuning.reset(token)


def has_wide_passes(op: str, with_grad: bool, smoothing: bool, inplace: bool) -> bool:
    """Whether the rows path of ``op`` with these options has the 512-bit passes."""
    if op == "logsumexp":
        return True
    return op == "sparse" and not smoothing and not (with_grad and inplace)


def can_split(op: str, smoothing: bool) -> bool:
    """Whether ``op`` has a split path: the primitives and index labels without
    smoothing (the rarer dense / smoothed cases use the rows path for long rows)."""
    return op != "dense" and not (op == "sparse" and smoothing)


def plan(op: str, n: int, c: int, itemsize: int, *, with_grad: bool = False,
         smoothing: bool = False, inplace: bool = False, t: Tuning | None = None) -> Plan:
    """The path for a call of kernel ``op`` on (n, c) logits of ``itemsize`` bytes.
    Depends on the shape and the options only (never on the thread count), so the same
    call always takes the same path and gives the same bits."""
    t = t or _tuning.get()
    path = t.force_path
    threads = _forkguard.threads_ok()
    if path is None:
        if c <= SMALL_C_MAX:
            path = "small"
        elif (can_split(op, smoothing) and n <= SPLIT_MAX_ROWS and c >= SPLIT_MIN_C
              and n * c > SERIAL_MAX_ELEMS):
            path = "split"
        else:
            path = "rows"
    elif path == "split" and not can_split(op, smoothing):
        raise ValueError(f"the split path has no {op} kernel"
                         f"{' with label smoothing' if smoothing else ''}")
    if path == "split":
        parallel = t.force_parallel
        return Plan("split", threads and (parallel is None or parallel))
    parallel = t.force_parallel
    if parallel is None:
        parallel = n * c > SERIAL_MAX_ELEMS and n > 1
    parallel = parallel and threads
    if path == "small":
        if t.force_wide:
            raise ValueError("the small-C path has no wide passes")
        return Plan("small", bool(parallel))
    available = has_wide_passes(op, with_grad, smoothing, inplace) and c >= 64
    wide = t.force_wide
    if wide is None:
        wide = available and c >= WIDE_MIN_C
    elif wide and not available:
        raise ValueError(f"no wide passes for {op} with these options and {c} classes "
                         f"(they need index labels without smoothing, not in place for "
                         f"the gradient, and rows of at least 64 classes)")
    prefetch = t.force_prefetch
    if prefetch is None:
        limit = PREFETCH_MAX_GRAD_ROW_BYTES if with_grad else PREFETCH_MAX_ROW_BYTES
        prefetch = c * itemsize <= limit
    return Plan("rows", bool(parallel), bool(wide), bool(wide and prefetch))


def _chunking(p: Plan, n: int, c: int):
    """(nchunks, rows per chunk) for a parallel plan.  A row is never split across
    chunks, so the chunking never changes results."""
    if p.path == "small":
        chunk = max(SMALL_C_BLOCK,
                    (SMALL_C_CHUNK_ELEMS // c) // SMALL_C_BLOCK * SMALL_C_BLOCK)
    else:
        chunk = max(1, CHUNK_ELEMS // c)
    return (n + chunk - 1) // chunk, chunk


def _run(p: Plan, n: int, c: int, serial, par, *args):
    """serial(0, n, *args) or par(nchunks, chunk, *args) as the plan says."""
    if p.parallel:
        _forkguard.note_parallel()
        par(*_chunking(p, n, c), *args)
    else:
        serial(0, n, *args)


def _split_geometry(c: int):
    """(seglen, nseg) of the split path."""
    seglen = -(-c // SPLIT_SEGMENTS)
    return seglen, -(-c // seglen)


def _is_inplace(x: np.ndarray, g) -> bool:
    """True when g is x (in place).  Any other overlap is outside the contract."""
    if g is None:
        return False
    if g is x or (g.__array_interface__["data"][0] == x.__array_interface__["data"][0]
                  and g.shape == x.shape and g.strides == x.strides):
        return True
    if np.shares_memory(x, g):
        raise ValueError("grad/out overlaps the logits without being the same array; "
                         "pass the logits array itself for an in-place call, or a "
                         "separate array")
    return False


def _split_lse(p, x, store=None, softmax=False):
    """Phases 1-2 of the split path: (m, r, log_s, lse); e stored into `store` (as
    softmax stores it with ``softmax``)."""
    n, c = x.shape
    seglen, nseg = _split_geometry(c)
    T = x.dtype
    mseg = np.empty((n, nseg), T)
    useg = np.empty((n, nseg), np.float64)
    tseg = np.empty((n, nseg), np.float64)
    m = np.empty(n, T)
    r = np.empty(n, T)
    log_s = np.empty(n, T)
    lse = np.empty(n, T)
    _split_kernel(_seg_max_par, p)(x, seglen, nseg, mseg)
    _seg_rowmax(mseg, m)
    sumexp = _split_kernel(_seg_sumexp_par, p)
    if store is None:
        # Mode 0 never writes g, but Numba types the store branch anyway: hand it a
        # writeable placeholder so read-only logits compile.
        sumexp(x, m, seglen, nseg, useg, tseg, np.empty((1, 1), T), 0)
    elif store is x:
        sumexp(x, m, seglen, nseg, useg, tseg, x, 2)
    else:
        sumexp(x, m, seglen, nseg, useg, tseg, store, 3 if softmax else 1)
    _seg_combine(useg, tseg, m, r, log_s, lse)
    return m, r, log_s, lse


def logsumexp(x, out):
    n, c = x.shape
    p = plan("logsumexp", n, c, x.itemsize)
    if p.path == "split":
        out[...] = _split_lse(p, x)[3]
    elif p.path == "small":
        _run(p, n, c, _small_lse_rows, _small_lse_par, x, out, SMALL_C_BLOCK)
    else:
        _run(p, n, c, _lse_rows, _lse_par, x, out, p.wide, p.prefetch)


def log_softmax(x, out):
    n, c = x.shape
    if _is_inplace(x, out):
        x = x.copy()
    p = plan("log_softmax", n, c, x.itemsize)
    if p.path == "split":
        m, _, log_s, _ = _split_lse(p, x)
        seglen, nseg = _split_geometry(c)
        _split_kernel(_seg_logsm_par, p)(x, m, log_s, seglen, nseg, out)
    elif p.path == "small":
        _run(p, n, c, _small_log_softmax_rows, _small_log_softmax_par, x, out,
             SMALL_C_BLOCK)
    else:
        _run(p, n, c, _log_softmax_rows, _log_softmax_par, x, out)


def softmax(x, out):
    n, c = x.shape
    if _is_inplace(x, out):
        x = x.copy()
    p = plan("softmax", n, c, x.itemsize)
    if p.path == "split":
        _, r, _, _ = _split_lse(p, x, store=out, softmax=True)
        seglen, nseg = _split_geometry(c)
        _split_kernel(_seg_softmax_par, p)(out, r, seglen, nseg)
    elif p.path == "small":
        _run(p, n, c, _small_softmax_rows, _small_softmax_par, x, out, SMALL_C_BLOCK)
    else:
        _run(p, n, c, _softmax_rows, _softmax_par, x, out)


def _sparse_split(p, x, labels, w, ii, z, gs, loss, lse, grad, inplace):
    n, c = x.shape
    kept = labels != ii
    xy = np.zeros(n, x.dtype)
    xy[kept] = x[np.nonzero(kept)[0], labels[kept]]        # before phase 2 (in place)
    store = None if grad is None else (x if inplace else grad)
    m, r, log_s, row_lse = _split_lse(p, x, store=store)
    lse[...] = row_lse
    a = np.empty(n, x.dtype)
    _split_sparse_scalars(labels, w, ii, z, gs, m, r, log_s, xy, loss, a)
    if grad is None:
        return
    ey = np.zeros(n, x.dtype)
    ey[kept] = grad[np.nonzero(kept)[0], labels[kept]]      # e_y, before scaling
    seglen, nseg = _split_geometry(c)
    _split_kernel(_seg_scale_par, p)(grad, a, seglen, nseg)
    _split_sparse_fix(labels, ii, z, gs, m, r, log_s, w, grad, ey)


def sparse(logits, labels, weight, ignore_index, label_smoothing, z_loss, grad_scale,
           loss, lse, grad):
    n, c = logits.shape
    T = np.dtype(logits.dtype).type
    inplace = _is_inplace(logits, grad)
    ii = np.int64(ignore_index)
    eps = T(label_smoothing)
    z = T(z_loss)
    gs = T(grad_scale)
    w = np.ascontiguousarray(weight, dtype=T)
    smooth = bool(eps != 0)
    p = plan("sparse", n, c, logits.itemsize, with_grad=grad is not None,
             smoothing=smooth, inplace=inplace)
    if p.path == "split":
        _sparse_split(p, logits, labels, w, ii, z, gs, loss, lse, grad, inplace)
        return
    if smooth:
        if w.shape[0] == 0:
            w = np.ones(c, dtype=T)     # smoothing sums over every class weight
        one_m_eps = T(1) - eps
        eps_c = eps / T(c)
        w_sum = w.sum(dtype=T)
        bvec = (w * (eps_c * gs)).astype(T)
    else:
        one_m_eps, eps_c, w_sum = T(1), T(0), T(0)
        bvec = np.empty(0, dtype=T)
    if p.path == "small":
        want_grad = grad is not None
        g = grad if want_grad else np.empty((0, 0), dtype=T)
        _run(p, n, c, _small_sparse_rows, _small_sparse_par, logits, labels, w, bvec, ii,
             one_m_eps, eps_c, w_sum, smooth, z, gs, loss, lse, g, want_grad,
             SMALL_C_BLOCK)
    elif not smooth and grad is None:
        _run(p, n, c, _sparse_loss_rows, _sparse_loss_par, logits, labels, w, ii, z,
             loss, lse, p.wide, p.prefetch)
    elif not smooth:
        _run(p, n, c, _sparse_grad_rows, _sparse_grad_par, logits, labels, w, ii, z, gs,
             loss, lse, grad, inplace, p.wide, p.prefetch)
    elif grad is None:
        _run(p, n, c, _sparse_smooth_loss_rows, _sparse_smooth_loss_par, logits, labels,
             w, ii, one_m_eps, eps_c, w_sum, z, loss, lse)
    else:
        _run(p, n, c, _sparse_smooth_grad_rows, _sparse_smooth_grad_par, logits, labels,
             w, bvec, ii, one_m_eps, eps_c, w_sum, z, gs, loss, lse, grad, inplace)


def dense(logits, labels, weight, label_smoothing, z_loss, grad_scale, loss, lse, grad):
    n, c = logits.shape
    T = np.dtype(logits.dtype).type
    inplace = _is_inplace(logits, grad)
    t = labels if labels.dtype == logits.dtype else labels.astype(T)
    if grad is not None and np.shares_memory(t, grad):
        t = t.copy()                     # grad must not overwrite the labels we read
    z = T(z_loss)
    gs = T(grad_scale)
    w = np.ascontiguousarray(weight, dtype=T)
    if w.shape[0] == 0:
        w = np.ones(c, dtype=T)
    eps = T(label_smoothing)
    one_m_eps = T(1) - eps
    eps_c = eps / T(c)
    p = plan("dense", n, c, logits.itemsize, with_grad=grad is not None,
             smoothing=bool(eps != 0), inplace=inplace)
    if p.path == "small":
        want_grad = grad is not None
        g = grad if want_grad else np.empty((0, 0), dtype=T)
        _run(p, n, c, _small_dense_rows, _small_dense_par, logits, t, w, one_m_eps, eps_c,
             z, gs, loss, lse, g, want_grad, SMALL_C_BLOCK)
    elif grad is None:
        _run(p, n, c, _dense_loss_rows, _dense_loss_par, logits, t, w, one_m_eps, eps_c,
             z, loss, lse)
    else:
        _run(p, n, c, _dense_grad_rows, _dense_grad_par, logits, t, w, one_m_eps, eps_c,
             z, gs, loss, lse, grad, inplace)


# ---------------------------------------------------------------------------------------
# 9. Row statistics of a block of classes (``xentfast._shards``: class-chunked and
#    vocabulary-parallel cross-entropy).  Passes A and B of the kernels above, the
#    per-row epilogue left to the caller, who merges the statistics of several blocks.
#    mode 0: (m, u, t) -- the wide passes for long rows, as logsumexp;
#    mode 1: also dist = sum_{w_j != 0} w_j (m - x_j), the class coefficients w;
#    mode 2: also coef_sum = sum_j wt_j and dist with wt_j = smoothed_weight(w_j, t_j)
#            of probability rows t.
# ---------------------------------------------------------------------------------------


@njit(**_JIT)
def _stats_rows(r0, r1, x, coef, probs, one_m_eps, eps_c, mode, m, u, t, coef_sum, dist,
                wide, prefetch):
    unused = np.empty(0, x.dtype)
    for i in range(r0, r1):
        if mode == 0:
            mi, ui, ti = _row_max_sumexp(x, i, r1, wide, prefetch, unused, False)
        elif mode == 1:
            mi = _row_max(x[i])
            ui, ti, di = _row_sumexp_wsum(x[i], mi, coef)
            dist[i] = di
        else:
            mi = _row_max(x[i])
            ui, ti, tw, di = _row_sumexp_dense(x[i], probs[i], coef, one_m_eps, eps_c, mi)
            coef_sum[i] = tw
            dist[i] = di
        m[i] = mi
        u[i] = ui
        t[i] = ti


@njit(**_PJIT)
def _stats_par(nchunks, chunk, x, coef, probs, one_m_eps, eps_c, mode, m, u, t, coef_sum,
               dist, wide, prefetch):
    n = x.shape[0]
    for k in prange(nchunks):
        _stats_rows(k * chunk, min(n, (k + 1) * chunk), x, coef, probs, one_m_eps, eps_c,
                    mode, m, u, t, coef_sum, dist, wide, prefetch)


def row_stats(x, coef, probs, one_m_eps, eps_c, m, u, t, coef_sum, dist):
    """Row statistics of a block of classes: m = max_j x_j (x's dtype), u = sum of e_j
    off the max, t = ties at it (float64); with ``coef`` non-empty also coef_sum and
    dist = sum_{a_j != 0} a_j (m - x_j), a_j = coef_j or, with probability rows
    ``probs`` non-empty, coef_j ((1 - eps) t_j + eps_c).  Same contract as
    ``numpy_ref.row_stats``.  Always the rows path (the small-C and split paths have no
    statistics-only variant); parallel and wide as ``plan`` chooses for logsumexp
    (mode 0) or probability labels (modes 1, 2)."""
    n, c = x.shape
    T = np.dtype(x.dtype).type
    mode = 2 if probs.shape[0] else (1 if coef.shape[0] else 0)
    w = np.ascontiguousarray(coef, dtype=T) if mode else np.empty(0, dtype=T)
    pr = (probs if probs.dtype == x.dtype else probs.astype(T)) if mode == 2 \
        else np.empty((0, 0), dtype=T)
    forced = dataclasses.replace(_tuning.get(), force_path="rows")
    p = plan("logsumexp" if mode == 0 else "dense", n, c, x.itemsize, t=forced)
    _run(p, n, c, _stats_rows, _stats_par, x, w, pr, T(one_m_eps), T(eps_c), mode,
         m, u, t, coef_sum, dist, p.wide, p.prefetch)
    if mode == 1:
        coef_sum[...] = np.sum(w, dtype=np.float64)
