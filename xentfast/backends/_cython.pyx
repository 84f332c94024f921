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
The kernels' bodies are written once, in the Tempita template ``_cython_kernels.pxi.in``
(rendered by setup.py into ``_cython_kernels.pxi``, included below), and instantiated
for float and double.  Every kernel runs on one block driver (``_drive_f`` /
``_drive_d``): a ``prange`` (OpenMP, ``schedule(static)``) over blocks of rows -- a
tile of short rows or one long row; each row is processed start to finish by one
thread, in at most three passes over its memory, with no (n, c) temporaries:

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
fork-safe; see disable_threads).

Precision rule: arithmetic is in the input dtype (float32 -> float32 accumulation,
float64 -> float64), which the contract names the accumulation dtype; e, p_y - 1 and
every product are formed in it and rounded once to the output (same dtype).  16-bit
logits (float16, bfloat16; ``sparse`` and ``dense`` only) are read natively: each block
of rows is widened to float32 in a per-thread scratch (exactly), runs the float32 code,
and its gradient is rounded once (to nearest even) into the 16-bit output -- bitwise the
float32 kernel on the upcast logits, without an (n, c) float32 temporary.  Two refinements: the long-row sums add blocks of 1024 floats
(512 doubles) into double-precision lane totals, so they do not drift with C; and the
row's scalars use the non-cancelling forms of rowmath.py -- r (not s) into log1p,
loss = (m - x_y) + log s, p_y - 1 = -((1 - e_y) + r) / s, the dense gradient
((e_j A - wt_j) - wt_j r) gs / s, log_softmax (x_j - m) - log s, softmax e_j (1 / s) --
so confident rows (loss ~ 1e-8 in float32, 1e-17 in float64), ties at the max and
+-1e30 logits keep their relative precision.  exp/log are within about 1 ulp (1.01,
see _fastexp.h); on AVX2/AVX-512 machines a*b+c is fused.

Memory safety: shapes are checked here; a class id outside [0, c) that is not
ignore_index is never used as an index -- the row gets loss NaN, lse NaN, grad 0 and is
counted, and the shim raises ValueError naming the first such label.
"""

from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t, uint16_t
from libc.stddef cimport ptrdiff_t
from libc.string cimport memset
from libc.math cimport NAN, log1p, log1pf

import numpy as np

from xentfast import _forkguard


cdef extern from "_xfrows.h" nogil:
    int XF_MULTIVERSIONED
    enum:
        XF_TILE            # rows per tile of short rows (16)
        XF_SMALL_C         # rows of at most this many classes use tiles (32)
        XF_HALF_F16        # the 16-bit formats of xf_load_h16 / xf_store_h16
        XF_HALF_BF16
    void xf_load_h16(const uint16_t *h, float *x, ptrdiff_t n, int kind)
    float xf_load_h16_max(const uint16_t *h, float *x, ptrdiff_t n, int kind)
    void xf_scale_store_h16(const float *e, uint16_t *h, ptrdiff_t n, float a, int kind)
    uint16_t xf_store1_h16(float f, int kind)
    void xf_store_h16(const float *x, uint16_t *h, ptrdiff_t n, int kind)
    void xf_load_h16_bits(const uint16_t *h, float *x, ptrdiff_t n, int kind)
    void xf_store_h16_bits(const float *x, uint16_t *h, ptrdiff_t n, int kind)
    int xf_use_f16c()
    float xf_f16_to_f32(unsigned int h)
    unsigned int xf_f32_to_f16(float f)
    float xf_bf16_to_f32(unsigned int h)
    unsigned int xf_f32_to_bf16(float f)
    int xf_max_threads()
    int xf_can_stream()
    void xf_stream_fence()
    void xf_set_max_threads(int k)


# Tunables: compile-time constants, not module globals (see NOTES_cython_kernels.md).
cdef enum:
    _PAR_MIN_ELEMS = 32768   # below this many elements one thread does the whole call
    # Prefetch the next long row during pass 2 only while this row, its gradient and the
    # next row fit a server-class L2 (1-2 MiB): measured at 128000 float32 classes
    # (512 KiB rows), prefetching gained 1.3x without a gradient and lost 1.1x with one.
    # A row's bytes are its input type's: a 16-bit row of 128000 classes (256 KiB; its
    # float32 scratch, the next row and its 16-bit gradient row: 1 MiB) is prefetched
    # -- loss+grad 1.5x (float16) / 1.2x (bfloat16) faster on one thread than without.
    _PF_MAX_BYTES_LOSS = 1048576
    _PF_MAX_BYTES_GRAD = 262144
    # Fuse a long row's pass 1 into the previous row's pass 2 (_run_*) from this many
    # bytes a row: measured on one thread (AMD Zen 4), it gained 7-10% (loss) and 3-15%
    # (loss+grad) at 8000-128000 float32 classes, but lost 25% for loss+grad at 1000
    # (4 KiB rows: pass 2's loads of the next row, its prefetch and the gradient's
    # stores then contend within one loop; apart, pass 1 reads an L2-resident row).
    _FUSE_MIN_BYTES = 16384
    # Index-label gradients of at least _STREAM_MIN_BYTES in rows of _FUSE_MIN_BYTES to
    # _PF_MAX_BYTES_GRAD are written by streaming stores (xf_scale_stream, _xfrows.h):
    # beyond the caches, the gradient's write-allocate reads are a third of the bus
    # traffic of loss+grad; a gradient that fits a last-level cache stays in it instead.
    # Measured (AMD Zen 4, float32, min of 12-50 calls): 4096 x 32000 and 8192 x 16000
    # 9-11% faster on one thread, 12% on two; but 30% slower at 256 x 128000 (the e_j
    # buffer, this row and the next no longer fit L2 together) and 26% at 65536 x 1000
    # (4 KiB rows: every row shares a partly streamed line with the next).
    _STREAM_MIN_BYTES = 33554432

# Fork safety.  GNU OpenMP (libgomp) is not fork-safe: a child forked after the parent
# ran a parallel region -- here, or in the cpu backend, which uses the same runtime --
# deadlocks in its first parallel region (the team's threads do not exist in the
# child).  This module registers ran_parallel / disable_threads with xentfast._forkguard
# when it is imported (through cython_shim or directly), so such a child runs every
# kernel on its one thread instead.
cdef bint _threads_ok = True
cdef bint _ran_parallel = False


def ran_parallel():
    """True once this process ran a kernel on an OpenMP team."""
    return bool(_ran_parallel)


def disable_threads():
    """Run every later kernel on the calling thread (a forked child; _forkguard)."""
    global _threads_ok
    _threads_ok = False


_forkguard.register(ran_parallel, disable_threads)


cdef inline bint _use_threads(Py_ssize_t elems) noexcept nogil:
    global _ran_parallel
    if elems >= _PAR_MIN_ELEMS and _threads_ok:
        _ran_parallel = True
        return True
    return False


def max_threads():
    """The most OpenMP threads a kernel called from this thread may use."""
    return int(xf_max_threads())


def set_max_threads(int k):
    """Cap the kernels called from this thread at ``k`` >= 1 OpenMP threads (OpenMP's
    ``omp_set_num_threads``: per calling thread; other threads keep their own)."""
    if k < 1:
        raise ValueError(f"the thread count must be at least 1; got {k}")
    xf_set_max_threads(k)


def threads_enabled():
    """False in a process forked after this one ran a parallel kernel (see above)."""
    return bool(_threads_ok)


MULTIVERSIONED = bool(XF_MULTIVERSIONED)
SMALL_C = XF_SMALL_C
TILE_ROWS = XF_TILE
PAR_MIN_ELEMS = _PAR_MIN_ELEMS
FUSE_MIN_BYTES = _FUSE_MIN_BYTES



cdef enum:
    # what a _Job_* asks of the block driver (_cython_kernels.pxi.in)
    _K_SPARSE = 0
    _K_DENSE = 1
    _K_LSE = 2
    _K_LOG_SOFTMAX = 3
    _K_SOFTMAX = 4


cdef inline Py_ssize_t _rows_per_block(Py_ssize_t c) noexcept nogil:
    """1 for long rows (one row per prange iteration), a tile of XF_TILE for short."""
    return XF_TILE if c <= XF_SMALL_C else 1


cdef enum:
    _HALF_TILES = 32    # tiles of short 16-bit rows per block (see below)


cdef inline Py_ssize_t _half_rows_per_block(Py_ssize_t c) noexcept nogil:
    """16-bit logits: short rows are widened and rounded _HALF_TILES tiles at a time
    (the conversions then run over 512 rows per call instead of 16; the float32 scratch
    is at most 512 x 32 floats, 64 KiB, per array: in L2), long rows one at a time.
    Measured at 1M x 10 (bfloat16 loss+grad): 14.0 ms with one tile per block, 8.9 ms
    with 8, 8.3 ms with 32."""
    return XF_TILE * _HALF_TILES if c <= XF_SMALL_C else 1


def _scratch(Py_ssize_t n, Py_ssize_t c, Py_ssize_t stride):
    """The 16-bit path's float32 scratch: `stride` floats per thread that may run."""
    threads = xf_max_threads() if n * c >= _PAR_MIN_ELEMS and _threads_ok else 1
    return np.empty(max(threads, 1) * stride, np.float32)


def _stream_buffer(Py_ssize_t n, Py_ssize_t c, Py_ssize_t itemsize, bint inplace,
                   bint smoothing, dtype):
    """Per-run buffers of c elements for pass 2's e_j when the gradient is to be
    streamed (see _STREAM_MIN_BYTES), else None (also in place: the logits' lines are
    read anyway; and with label smoothing, whose pass 3 reads the weights instead)."""
    if (inplace or smoothing or c * itemsize < _FUSE_MIN_BYTES or c * itemsize > _PF_MAX_BYTES_GRAD
            or n * c * itemsize < _STREAM_MIN_BYTES or not xf_can_stream()):
        return None
    runs = xf_max_threads() if n * c >= _PAR_MIN_ELEMS and _threads_ok else 1
    return np.empty(max(min(runs, n), 1) * c, dtype)


def _check_rows(kernel, Py_ssize_t n, Py_ssize_t c, Py_ssize_t n_labels, Py_ssize_t n_loss,
                Py_ssize_t n_lse, Py_ssize_t n_weight, grad):
    if kernel == "sparse" and (n_labels != n or n_loss != n or n_lse != n):
        raise ValueError(
            f"sparse kernel: labels, loss and lse must have {n} rows; got "
            f"{n_labels}, {n_loss}, {n_lse}")
    if n_loss != n or n_lse != n:
        raise ValueError(f"{kernel} kernel: loss and lse must have {n} rows; got "
                         f"{n_loss}, {n_lse}")
    if n_weight not in (0, c):
        raise ValueError(f"{kernel} kernel: weight must have shape (0,) or ({c},); "
                         f"got ({n_weight},)")
    if grad is not None and tuple(grad.shape) != (n, c):
        raise ValueError(f"{kernel} kernel: grad must have shape ({n}, {c}); got "
                         f"{tuple(grad.shape)}")


include "_cython_kernels.pxi"


# =====================================================================================
# The kernels (contract: xentfast/backends/__init__.py).  The mathematics, step by step,
# is in the comments of _cython_kernels.pxi.in; half: 0 for float32 / float64 logits,
# XF_HALF_F16 / XF_HALF_BF16 for uint16 arrays holding those bits (cython_shim passes
# float16 and bfloat16 arrays that way).
# =====================================================================================

def sparse(logits, labels, weight, int64_t ignore_index, double label_smoothing,
           double z_loss, double grad_scale, loss, lse, grad=None, int half=0):
    """Index-label kernel; returns the number of labels outside [0, c) that are not
    ignore_index (their rows: loss NaN, lse NaN, grad 0).  See the module docstring."""
    if half:
        return _sparse_h(logits, labels, weight, ignore_index, label_smoothing, z_loss,
                         grad_scale, loss, lse, grad, half)
    if logits.dtype.char == "d":
        return _sparse_d(logits, labels, weight, ignore_index, label_smoothing, z_loss,
                         grad_scale, loss, lse, grad, 0)
    return _sparse_f(logits, labels, weight, ignore_index, label_smoothing, z_loss,
                     grad_scale, loss, lse, grad, 0)


def dense(logits, labels, weight, double label_smoothing, double z_loss,
          double grad_scale, loss, lse, grad=None, int half=0):
    """Probability-label kernel.  See the module docstring."""
    if half:
        _dense_h(logits, labels, weight, label_smoothing, z_loss, grad_scale, loss, lse,
                 grad, half)
    elif logits.dtype.char == "d":
        _dense_d(logits, labels, weight, label_smoothing, z_loss, grad_scale, loss, lse,
                 grad, 0)
    else:
        _dense_f(logits, labels, weight, label_smoothing, z_loss, grad_scale, loss, lse,
                 grad, 0)
    return 0


def logsumexp(x, out):
    """out[i] = log(sum_j exp(x[i, j]))."""
    if x.dtype.char == "d":
        _logsumexp_d(x, out)
    else:
        _logsumexp_f(x, out)


def log_softmax(x, out):
    """out[i, j] = x[i, j] - logsumexp(x[i])."""
    if x.dtype.char == "d":
        _softmaxes_d(_K_LOG_SOFTMAX, x, out)
    else:
        _softmaxes_f(_K_LOG_SOFTMAX, x, out)


def softmax(x, out):
    """out[i, j] = exp(x[i, j] - logsumexp(x[i]))."""
    if x.dtype.char == "d":
        _softmaxes_d(_K_SOFTMAX, x, out)
    else:
        _softmaxes_f(_K_SOFTMAX, x, out)


HALF_CODES = {"float16": XF_HALF_F16, "bfloat16": XF_HALF_BF16}


def f16c_used():
    """True when float16 loads and stores use the CPU's F16C instructions (_xfrows.h)."""
    return bool(xf_use_f16c())


cdef _same_length(Py_ssize_t a, Py_ssize_t b):
    if a != b:
        raise ValueError(f"source and destination lengths differ: {a} != {b}")


def half_to_float(const uint16_t[::1] h, float[::1] out, int half, bint bits=False):
    """out[i] = the float32 value of the 16-bit bits h[i]: the kernels' load (tests);
    bits=True: always the portable bit arithmetic (not F16C)."""
    _same_length(h.shape[0], out.shape[0])
    if h.shape[0]:
        (xf_load_h16_bits if bits else xf_load_h16)(&h[0], &out[0], h.shape[0], half)


def float_to_half(const float[::1] x, uint16_t[::1] out, int half, bint bits=False):
    """out[i] = x[i] rounded once to the 16-bit format: the kernels' gradient store
    (tests); bits=True: always the portable bit arithmetic (not F16C)."""
    _same_length(x.shape[0], out.shape[0])
    if x.shape[0]:
        (xf_store_h16_bits if bits else xf_store_h16)(&x[0], &out[0], x.shape[0], half)


# ---- a benchmark yardstick: the exponential's share, without memory ----

cdef enum:
    _FLOOR_BLOCK = 4096       # floats of an exp_floor block: 16 KiB, L1-resident


cdef double _exp_floor_run(Py_ssize_t count) noexcept nogil:
    cdef float block[_FLOOR_BLOCK]
    cdef float ties
    cdef double total = 0
    cdef Py_ssize_t i, k, done = 0
    for i in range(_FLOOR_BLOCK):         # d = x - m in [-10, 0): every exp a full one
        block[i] = -10.0 * (i + 1) / _FLOOR_BLOCK
    while done < count:
        k = count - done if count - done < _FLOOR_BLOCK else _FLOOR_BLOCK
        total += xf_expsum_f(block, k, 0, block, &ties)
        done += k
    return total


def exp_floor(Py_ssize_t elements):
    """Run the float32 pass 2 of a loss call (xf_expsum_f: e_j = exp(x_j - m) summed,
    ties counted) over `elements` values on every core the kernels may use, reading
    them from an L1-resident block instead of memory.  Returns the sum (it keeps the
    work alive).  The benchmarks' ``exp-par`` yardstick: the arithmetic a loss over that
    many logits cannot avoid (one exp each), with no memory traffic -- a loss call's
    time is at least the larger of this and ``read-par``'s."""
    cdef bint par = _use_threads(elements)     # as the kernels: fork-safe, one team
    cdef Py_ssize_t nrun = xf_max_threads() if par else 1
    cdef Py_ssize_t b
    cdef double total = 0
    if elements <= 0:
        return 0.0
    for b in prange(nrun, nogil=True, schedule="static", use_threads_if=par):
        total += _exp_floor_run((b + 1) * elements // nrun - b * elements // nrun)
    return total
