"""Numba CUDA kernels of the ``cuda`` backend: the row kernels and their building blocks.

This module holds device code only; ``numba_cuda.py`` picks a path, compiles the
variant it needs through the factories below and launches it, and
``_cuda_arrays.py`` holds the layout, cast and reduction kernels of the array layer.
The contract is in ``xentfast/backends/__init__.py``; the per-row scalar mathematics
(rest mass, lse, loss, gradient coefficients) is ``xentfast/backends/rowmath.py``,
compiled here unchanged as device functions (``rm`` below).  This file says how the
row quantities that rowmath consumes (m, e_j, u, t) are evaluated on a GPU.

Execution model (one row = one softmax)
---------------------------------------
A *team* of threads owns a row: ``TEAM`` lanes, lane ``l`` handling the columns
``j = l, l + TEAM, l + 2 TEAM, ...``, so that for every step the team reads ``TEAM``
consecutive elements (coalesced: a warp touches 32 consecutive words, 128 bytes for
float32).  Three paths, chosen on the host by ``numba_cuda._plan``:

* ``warp``:  TEAM <= 32 lanes of one warp, ``blockDim / TEAM`` rows per block; the row
  lives in registers (``VPT`` values per lane) and every reduction is a butterfly of
  warp shuffles (no shared memory, no barrier).  Small C.
* ``block``: TEAM = the whole block (``THREADS`` lanes); the row lives in registers
  spread over the block, reductions are warp shuffles plus one exchange through
  shared memory and one barrier.  C up to ``THREADS * VPT`` (the on-chip limit).
* ``stream``: one block per row, C of any size.  Pass 1 reads the row once with an
  online max/sum; pass 2 reads it again (from L2 where it is still there: pass 2
  walks the row backwards, most recently read chunk first) to write the output.

Both cached paths read every logit exactly once and write every output once.

The row quantities (rowmath's docstring has the derivations)
------------------------------------------------------------
    m    = max_j x_j                       e_j = exp(x_j - m)
    u    = sum_{x_j < m} e_j               (the terms below the max, each < 1)
    t    = sum_{not x_j < m} e_j           (1 per tie at the max; NaN for a NaN or +inf)
    r    = u + (t - 1)                     (rowmath.rest_mass: s = 1 + r)
    log s = log1p(r),  lse = m + log s.
Keeping the ties apart from the small terms keeps r exact to a few ulps when the row is
confident (r << 1), where s = 1 + r would round r away: the loss of such a row is
(m - x_y) + log1p(r), of the order of r, and keeps its relative accuracy.

The numbered steps (cached paths; x = row, C classes, acc = accumulation dtype)
-------------------------------------------------------------------------------
1. Load: ``v[k] = acc(x[row, l + k TEAM])`` (float16 is widened on load), padding
   with -inf; thread max ``m_l = max_k v[k]``.  NaN is never taken as a max (``a > m``
   is false for NaN): a NaN row is caught by t in step 3.
2. Team max ``m = max_l m_l`` (butterfly: ``m = max(m, shfl_xor(m, o))`` for
   o = TEAM/2, ..., 1; every lane ends with the same m).  An all -inf row (m = -inf)
   sets m = NaN: every quantity derived from it is NaN, as the contract wants.
3. ``e_k = exp(v[k] - m)``, evaluated as ``exp_diff`` (below: the rounding error of
   the subtraction is put back).  ``v[k] < m``: e_k goes to the lane's u (compensated
   sum, below); else, unless v[k] is -inf (padding, or a mask while nothing finite is
   known), to t: exactly 1 for a tie, NaN for a NaN or +inf logit (+inf - +inf).  The
   label sums need m and are formed here too: sparse smoothing W = sum_c w_c and
   wd = sum_{w_c != 0} w_c (m - x_c); probability labels T = sum_c wt_c and
   wd = sum_{wt_c != 0} wt_c (m - x_c), wt_c = w_c ((1 - eps) t_c + eps / C).  Every
   term of wd is >= 0 (for weights >= 0) and rounded relative to itself: no
   cancellation.  Then team sums of u, t (and wd, W or T).  e_k replaces v[k] in
   registers when the output needs it.
4. ``r = rest_mass(u, t)``, ``log s = log1p(r)``, ``lse = m + log s``.
5. Loss (lane 0), rowmath: sparse ``sparse_loss = (1-eps) w_y ((m - x_y) + log s)
   + (eps/C) (W log s + wd) + z lse^2``; dense ``dense_loss = T log s + wd + z lse^2``.
   Never ``lse - x_y`` after rounding lse, never ``W lse - sum w x``.
6. Row output, rowmath (gs = grad_scale):
   sparse j != y:  ``g_j = e_j a - (eps/C) w_j gs``, ``a = sparse_scale = A gs / s``,
                   A = (1-eps) w_y + eps W/C + 2 z lse;
   sparse j == y:  ``sparse_true_grad``: p_y - 1 = -((1 - e_y) + r) / s, never
                   p_y - 1 after rounding p_y (a confident row's p_y rounds to 1);
                   stored once, after the loop, by the lane holding e_y (one copy of
                   its code instead of VPT);
   dense:          ``dense_grad = ((e_j coef + (e_j T_tie - wt_j)) - wt_j r) gs / s``,
                   coef = T_off + 2 z lse, T = T_off + T_tie split at the ties of the max
                   (rowmath: a smoothed row's maximum keeps its precision);
   softmax:        ``softmax = e_j / s`` (a division: one rounding fewer than e_j (1/s));
   log_softmax:    ``log_softmax = (x_j - m) - log s`` (never x_j - lse).
   All in acc (float32 for float16 input), rounded once, on the store, to the output
   dtype.

exp_diff: exp(x - m) to the accuracy of exp
-------------------------------------------
d = fl(x - m) carries an absolute error up to half an ulp of d, which exp turns into
a relative error of the same size: about |d| / 2 to |d| ulps of e (float32: 32 to 64
ulps at d = -100; float64: 256 to 512 ulps at d = -700).  Knuth's TwoSum gives that error exactly,
err = (x - m) - d, with six additions (no multiplication, so no FMA contraction can
change it), and exp(x - m) = exp(d) exp(err) = e + e err (err^2 < 2^-36 of e).
Where e = 0 (d = -inf: a mask, or x far below m) or e is NaN, e is returned as it is.
The stream path's rescale factors exp(m_old - m_new) are formed the same way.

Row sums: short per-lane sums, then a compensated tree (fixed order)
--------------------------------------------------------------------
u has terms >= 0, so the relative error of a sum is bounded by the depth of its
addition tree times u_r (u_r = unit roundoff, 2^-24 float32, 2^-53 float64).  Cached
paths: each lane adds its VPT terms into four interleaved partials (k mod 4: at most
ceil(VPT/4) terms each, selects rather than branches, all registers), combined in two
levels; the team reduction then carries pairs (u, uc) through the butterfly
(``warp_sum_c``: TwoSum of the two partners' u, their uc plus that exact error), so
the tree itself adds only about 2 u_r, and u + uc is rounded once at the end.  Bound:
|error of u| <= (ceil(VPT/4) + 3) u_r u, at most 11 u_r (5.5 to 11 ulps) at VPT = 32,
whatever TEAM and C: no drift along a row.  (A compensated per-lane sum would make it
about 3 u_r, but costs six more instructions per element, about a quarter more
arithmetic in these memory-bound kernels; the tree's compensation is per row.)  To
it add each term's exp error (libdevice expf <= 2 ulp, exp <= 1 ulp: relative per
term, so at most that relative to u).  t is a sum of ones (exact below 2^24) or NaN.
The label sums (wd, W, T) are plain per-lane sums and a plain tree: terms of one sign
(for weights >= 0), relative error <= (VPT + log2 TEAM) u_r.

The stream path (one block per row, any C)
------------------------------------------
Pass 1 keeps per thread an online triple (m, u, t) with the meaning above relative to
the running max m (Milakov & Gimelshein 2018, with the max's own term kept apart).
Each step loads U values into registers and takes their max cm first; if cm > m, the
old terms are rescaled once (the old ties become ordinary terms):

    f = exp(m - cm),   u = (u + t) f,   uc = uc f,   t = 0,   m = cm

(m = -inf, nothing seen: f = 0, and u = t = 0 stay 0; cm = +inf: f = 0, and the +inf
itself then puts NaN into t), then each value is added as in step 3.  Per thread, u
is summed with Neumaier/Kahan compensation (``comp_add``: TwoSum of the running sum
and each term, the errors summed apart in uc, scaled by f with u, and added back
once before the combine): about 2 u_r however many terms a thread sees.  Rescales
happen at most once per U-value step, and each only scales the mass already seen: its
error (the exp of f, <= 2 ulp, and two roundings) is at most about 3 ulps of that older
mass; a random row rescales O(log(C / T)) times per thread, an increasing row once per
step (ceil(C / (T U)) times), with errors of random sign.  The block combine below is
a plain tree of log2(T) <= 10 levels (one rounding each, plus the rescale factor of the
partial with the smaller max).  Bound for the stream path: about (2 + log2 T) u_r plus
3 ulps per rescale of the older mass, relative to r (without rescales, about the
cached paths' bound).
Triples from two threads combine by the same rule (m1 >= m2 is the larger):

    m1 == m2:  u = u1 + u2,  t = t1 + t2;
    m1 >  m2:  u = u1 + (u2 + t2) exp(m2 - m1),  t = t1,

which is commutative bit for bit (the same operations whichever side holds the
larger max; sums of two terms are commutative in IEEE arithmetic), so the
xor-butterfly leaves an identical triple in every lane and the block result is
deterministic.  A partial that saw nothing (m = -inf, u = t = 0) is the identity; one
that saw only NaN (m = -inf, t = NaN) makes u NaN ((NaN) * 0).  The block combine:
butterfly within each warp, lane 0 of warp w stores its triple in shared[w], one
barrier, then every warp reads the NW triples (lane l takes triple l mod NW) and runs
the same butterfly, so every thread holds the row's (m, u, t) after a single barrier.
Pass 2 recomputes e_j = exp_diff(x_j, m) from a second read of x and writes the
output (the true class excepted), and forms wd (now that m is known) for the loss.
Loss-only sparse rows run pass 2 only with label smoothing (for wd).  After pass 2 and
the barrier of wd's block sum, thread 0 writes the loss and the true-class gradient
(from x_y, which it read before pass 1); its inputs wait in shared memory across
pass 2, which keeps pass 2's registers free (float64 would otherwise spill).

Precision rule: float16 is read and widened to float32, float32 accumulates in
float32, float64 in float64; every reduction is a fixed tree (and the lane partials a
fixed order), so results are bitwise reproducible run to run.  Math is libdevice
``expf``/``log1pf`` (``exp``/``log1p`` for float64) without fastmath: Numba's fastmath
sets LLVM's ``nnan``/``ninf`` flags, which would license the compiler to break the NaN
and -inf rules of the contract, and ``reassoc``, which would undo TwoSum and the
non-cancelling forms.

Memory safety: every load is guarded by ``j < C`` and ``row < n``; a label outside
[0, C) that is not ignore_index is never used as an index (the row gets NaN loss and
gradient; the host-side check in ``_cuda_arrays`` raises before the kernel runs unless
``check_labels=False``).  All indices are int64.

In-place (grad aliases logits): a lane writes only the columns it read itself, after
it read them; the one cross-lane read, x_y by lane 0 for the loss, happens before a
barrier (block/stream) or a ``syncwarp`` (warp path) that precedes every store.  The
stream path's one cross-thread store, thread 0's true-class gradient, follows the
barrier that ends pass 2 (every thread's reads of the row are done).

Simulator: ``NUMBA_ENABLE_CUDASIM=1`` runs the same kernel code as Python threads.
The simulator has no warp shuffles: a warp reduction there is one rendezvous of the
warp's 32 threads (a per-warp ``threading.Barrier``) after which each lane evaluates
the same xor butterfly in Python; ``XENTFAST_SIM_SHUFFLES=1`` emulates each shuffle
instead, running the hardware helpers' code line by line.  Both rely on what the
full-mask hardware shuffle requires anyway: every lane of a warp executes the same
sequence of collectives.  ``prologue``, ``xexp`` and ``xlog1p`` give simulated threads
IEEE behaviour without warnings (log1p(-1) = -inf, inf - inf = NaN) and keep float32
in float32; on the device they are an empty inlined function and libdevice exp/log1p.
"""

from __future__ import annotations

import math
import os
import threading
import types
import warnings

import numpy as np
from numba import cuda

from . import rowmath

SIMULATED = bool(getattr(getattr(cuda, "config", None), "ENABLE_CUDASIM", 0))

# Host code reaches numba.cuda through ``host.cuda``: while a simulated kernel runs, the
# CUDA simulator rebinds every module global bound to ``numba.cuda`` (in the kernel's
# module) to its fake in-kernel module, which host code in other threads must not see.
host = types.SimpleNamespace(cuda=cuda)

WARP = 32
FULL_MASK = 0xFFFFFFFF
INT64_MAX = np.iinfo(np.int64).max


def jit(**options):
    """``cuda.jit`` with the options set in one place (the simulator ignores the
    hardware-only ones)."""
    if SIMULATED:
        options = {k: v for k, v in options.items() if k in ("device",)}
    return host.cuda.jit(**options)


def launch(kernel, blocks: int, threads: int, *args) -> None:
    """``kernel[blocks, threads](*args)`` on the default stream.

    Numba warns (NumbaPerformanceWarning) when a grid has fewer than 128 blocks; small
    inputs legitimately launch small grids, and a caller running with warnings as
    errors must not fail on them.  The warning is raised when a launch is *configured*
    (``kernel[blocks, threads]``), so small-grid configurations are made once, with
    that warning ignored, and kept: a configuration holds no arguments and is reused
    for every later launch of the same kernel and grid.  The message is matched after
    any prefix, because Numba highlights it with terminal escape codes.
    """
    if SIMULATED:
        # The simulator keeps one fake ``cuda`` module (grid, shared memory) per kernel
        # module while any launch runs: concurrent launches from several Python threads
        # would share it.  Run simulated launches one at a time.
        with _sim_launch_lock:
            kernel[blocks, threads](*args)
        return
    if blocks >= 128:
        kernel[blocks, threads](*args)
        return
    key = (id(kernel), blocks, threads)
    configured = _small_grid_launches.get(key)
    if configured is None or configured.dispatcher is not kernel:
        with _small_grid_lock, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*Grid size \d+ will likely result in GPU")
            configured = kernel[blocks, threads]
            _small_grid_launches[key] = configured
    configured(*args)


# (id(kernel), blocks, threads) -> configured launch; at most 127 grids per kernel and
# block size.  ``configured.dispatcher is kernel`` guards against a reused id.
_small_grid_launches: dict = {}
_small_grid_lock = threading.Lock()
_sim_launch_lock = threading.RLock()


def launch_bounds(threads: int) -> tuple[int, int]:
    """(max threads per block, min resident blocks per SM) for ptxas: enough
    blocks for 1024 resident threads per SM, i.e. at most 64 registers a thread."""
    return (threads, max(1, 1024 // threads))


# --------------------------------------------------------------------------- primitives

if SIMULATED:

    _sim_lock = threading.Lock()

    def _rendezvous(value):
        """All lanes of the calling warp deposit ``value``; returns (lane, {lane: value}).

        One wait on a per-warp ``threading.Barrier``; two slot tables used alternately
        (a lane writes table p again only two rendezvous later, after a barrier every
        lane reaches having read table p).  Valid because every lane of a warp runs the
        same sequence of collectives in these kernels (as full-mask shuffles require);
        the timeout keeps a failed kernel from leaving threads blocked forever.
        """
        me = threading.current_thread()
        manager = me._manager
        warp = me.thread_id // WARP
        table = manager.__dict__.get("_xentfast_warps")
        if table is None:
            with _sim_lock:
                table = manager.__dict__.setdefault("_xentfast_warps", {})
        entry = table.get(warp)
        if entry is None:
            with _sim_lock:
                if warp not in table:
                    size = int(np.prod(manager._block_dim))
                    lanes = min(WARP, size - warp * WARP)
                    table[warp] = (threading.Barrier(lanes), ({}, {}))
                entry = table[warp]
        barrier, slots = entry
        parity = me.__dict__.get("_xentfast_parity", 0)
        me._xentfast_parity = 1 - parity
        lane = me.thread_id % WARP
        slots[parity][lane] = value
        barrier.wait(timeout=120)
        return lane, slots[parity]

    def shfl_xor(value, offset):
        """Simulator stand-in for ``shfl_xor_sync(FULL_MASK, value, offset)``."""
        lane, values = _rendezvous(value)
        return values[lane ^ offset]

    def _sim_butterfly(v, width, op):
        """The xor butterfly of the hardware helpers, evaluated for the calling lane
        from one rendezvous (instead of log2(width) emulated shuffles)."""
        lane, values = _rendezvous(v)
        base = lane - lane % width
        group = [values[base + i] for i in range(width)]
        off = width // 2
        while off > 0:
            group = [op(group[i], group[i ^ off]) for i in range(width)]
            off //= 2
        return group[lane - base]

    def syncwarp():
        # Simulated lanes of a warp only share data through shfl_xor above, whose
        # barriers already order their memory accesses.
        pass

    def prologue():
        """Each simulated thread is a Python thread with NumPy's default error state;
        IEEE results (inf - inf = NaN, log(0) = -inf, 1/0 = inf) are part of the
        contract, so silence the warnings (which a test run may turn into errors)."""
        np.seterr(all="ignore")

    def xexp(v):
        return np.exp(v)  # keeps float32 in float32, like the device's expf

    def xlog1p(v):
        return np.log1p(v)  # keeps float32 in float32; log1p(-1) = -inf (math.log1p raises)

else:

    @cuda.jit(device=True, forceinline=True)
    def shfl_xor(value, offset):
        return cuda.shfl_xor_sync(FULL_MASK, value, offset)

    @cuda.jit(device=True, forceinline=True)
    def syncwarp():
        cuda.syncwarp(FULL_MASK)

    @cuda.jit(device=True, forceinline=True)
    def prologue():
        pass

    @cuda.jit(device=True, forceinline=True)
    def xexp(v):
        return math.exp(v)  # libdevice expf / exp by the argument's type

    @cuda.jit(device=True, forceinline=True)
    def xlog1p(v):
        return math.log1p(v)  # libdevice log1pf / log1p by the argument's type


_device = jit(device=True, forceinline=True)


def _device_rowmath() -> types.SimpleNamespace:
    """rowmath's functions as (inlined) device functions, the source unchanged (rowmath
    functions call no other function, so each compiles on its own)."""
    return types.SimpleNamespace(**{
        name: _device(obj) for name, obj in vars(rowmath).items()
        if isinstance(obj, types.FunctionType) and obj.__module__ == rowmath.__name__})


rm = _device_rowmath()
# Kernels call module globals (Numba resolves them when it compiles a kernel).
rest_mass = rm.rest_mass
log_sum_exp = rm.log_sum_exp
sparse_loss = rm.sparse_loss
dense_loss = rm.dense_loss
sparse_scale = rm.sparse_scale
sparse_true_grad = rm.sparse_true_grad
dense_coef = rm.dense_coef
dense_grad = rm.dense_grad
row_log_softmax = rm.log_softmax
row_softmax = rm.softmax
grad_over_sum = rm.grad_over_sum


@_device
def exp_diff(x, m):
    """exp(x - m) with the rounding error of x - m put back (see the docstring):
    d = fl(x - m), err = (x - m) - d exactly (TwoSum of x and -m), e (1 + err).
    e = 0 (d = -inf) and NaN are returned as they are (err is NaN there)."""
    nm = -m
    d = x + nm
    e = xexp(d)
    xp = d - nm
    mp = d - xp
    err = (x - xp) + (nm - mp)
    return e + e * err if e > 0 else e


@_device
def two_sum(a, b):
    """(fl(a + b), err) with a + b = fl(a + b) + err exactly (Knuth's TwoSum: six
    additions, no branch, exact for finite a, b barring overflow).  The error is the
    same number whichever order a, b come in."""
    s = a + b
    bp = s - a
    ap = s - bp
    return s, (a - ap) + (b - bp)


@_device
def comp_add(s, c, v):
    """(s, c) + v, Neumaier-compensated: s + v rounded, its rounding error (TwoSum,
    exact) added to c.  The sum is s + c."""
    t, err = two_sum(s, v)
    return t, c + err


@_device
def warp_max(v, width):
    """Butterfly max over groups of ``width`` lanes (a power of two <= 32); every lane
    of a group ends with the group's max.  NaN-free inputs (see step 1)."""
    off = width // 2
    while off > 0:
        o = shfl_xor(v, off)
        if o > v:
            v = o
        off //= 2
    return v


@_device
def warp_sum(v, width):
    """Butterfly sum over groups of ``width`` lanes; a + b == b + a bitwise, so every
    lane of a group ends with the identical sum."""
    off = width // 2
    while off > 0:
        v = v + shfl_xor(v, off)
        off //= 2
    return v


@_device
def warp_sum_c(v, c, width):
    """Compensated butterfly sum of the pairs (v, c) (each meaning v + c): v's rounding
    errors go to c.  Symmetric in the two partners (TwoSum's error does not depend on
    the order, a + b == b + a), so every lane of a group ends with the same pair."""
    off = width // 2
    while off > 0:
        o = shfl_xor(v, off)
        oc = shfl_xor(c, off)
        v, err = two_sum(v, o)
        c = (c + oc) + err
        off //= 2
    return v, c


@_device
def combine(m1, u1, t1, m2, u2, t2):
    """Merge two online triples (m, u, t) (see the docstring); commutative bit for bit:
    the same operations whichever argument holds the larger max."""
    if m1 == m2:
        return m1, u1 + u2, t1 + t2
    if m1 > m2:
        return m1, u1 + (u2 + t2) * exp_diff(m2, m1), t1
    return m2, u2 + (u1 + t1) * exp_diff(m1, m2), t2


@_device
def warp_combine(m, u, t, width):
    off = width // 2
    while off > 0:
        m2 = shfl_xor(m, off)
        u2 = shfl_xor(u, off)
        t2 = shfl_xor(t, off)
        m, u, t = combine(m, u, t, m2, u2, t2)
        off //= 2
    return m, u, t


if SIMULATED and os.environ.get("XENTFAST_SIM_SHUFFLES", "0") in ("", "0"):
    # Simulator speed: one rendezvous per warp reduction instead of one per shuffle
    # step, evaluating exactly the butterfly above (same pairings, same order).  Set
    # XENTFAST_SIM_SHUFFLES=1 to run the shuffle-by-shuffle helpers instead.

    def _max_op(v, o):
        return o if o > v else v

    def _sum_op(v, o):
        return v + o

    def warp_max(v, width):  # noqa: F811
        return _sim_butterfly(v, width, _max_op)

    def warp_sum(v, width):  # noqa: F811
        return _sim_butterfly(v, width, _sum_op)

    _two_sum_py = getattr(two_sum, "py_func", None) or two_sum.fn

    def _sum_c_op(a, b):
        v, err = _two_sum_py(a[0], b[0])
        return v, (a[1] + b[1]) + err

    def warp_sum_c(v, c, width):  # noqa: F811
        return _sim_butterfly((v, c), width, _sum_c_op)

    _combine_py = getattr(combine, "py_func", None) or combine.fn  # the Python body

    def warp_combine(m, u, t, width):  # noqa: F811
        def op(a, b):
            return _combine_py(a[0], a[1], a[2], b[0], b[1], b[2])

        return _sim_butterfly((m, u, t), width, op)


@_device
def block_max(v, buf, nwarps):
    """Max over the block (nwarps a power of two): warp butterfly, one exchange through
    ``buf`` (shared, >= nwarps), one barrier, then each warp reduces the nwarps values."""
    v = warp_max(v, WARP)
    lane = cuda.threadIdx.x % WARP
    if lane == 0:
        buf[cuda.threadIdx.x // WARP] = v
    cuda.syncthreads()
    return warp_max(buf[lane % nwarps], nwarps)


@_device
def block_sum1(a, buf, nwarps):
    a = warp_sum(a, WARP)
    lane = cuda.threadIdx.x % WARP
    if lane == 0:
        buf[0, cuda.threadIdx.x // WARP] = a
    cuda.syncthreads()
    return warp_sum(buf[0, lane % nwarps], nwarps)


@_device
def block_rest(u, uc, top, buf, nwarps):
    """Block sums of the pair (u, uc) (compensated, see ``warp_sum_c``) and of t;
    returns (u + uc, t)."""
    u, uc = warp_sum_c(u, uc, WARP)
    top = warp_sum(top, WARP)
    lane = cuda.threadIdx.x % WARP
    if lane == 0:
        w = cuda.threadIdx.x // WARP
        buf[0, w] = u
        buf[1, w] = uc
        buf[2, w] = top
    cuda.syncthreads()
    k = lane % nwarps
    u, uc = warp_sum_c(buf[0, k], buf[1, k], nwarps)
    top = warp_sum(buf[2, k], nwarps)
    return u + uc, top


@_device
def block_rest_labels(u, uc, top, q1, q2, q3, buf, nwarps):
    """``block_rest`` and the plain sums q1, q2, q3 in the same exchange."""
    u, uc = warp_sum_c(u, uc, WARP)
    top = warp_sum(top, WARP)
    q1 = warp_sum(q1, WARP)
    q2 = warp_sum(q2, WARP)
    q3 = warp_sum(q3, WARP)
    lane = cuda.threadIdx.x % WARP
    if lane == 0:
        w = cuda.threadIdx.x // WARP
        buf[0, w] = u
        buf[1, w] = uc
        buf[2, w] = top
        buf[3, w] = q1
        buf[4, w] = q2
        buf[5, w] = q3
    cuda.syncthreads()
    k = lane % nwarps
    u, uc = warp_sum_c(buf[0, k], buf[1, k], nwarps)
    top = warp_sum(buf[2, k], nwarps)
    q1 = warp_sum(buf[3, k], nwarps)
    q2 = warp_sum(buf[4, k], nwarps)
    q3 = warp_sum(buf[5, k], nwarps)
    return u + uc, top, q1, q2, q3


@_device
def block_sum2(a, b, buf, nwarps):
    """Block sums of a and b (``block_sum1`` for two values, one barrier), exchanged
    through rows 2 and 3 of ``buf``: a later ``block_sum1`` on the same buffer (row 0)
    cannot overwrite them while a slow warp still reads."""
    a = warp_sum(a, WARP)
    b = warp_sum(b, WARP)
    lane = cuda.threadIdx.x % WARP
    if lane == 0:
        buf[2, cuda.threadIdx.x // WARP] = a
        buf[3, cuda.threadIdx.x // WARP] = b
    cuda.syncthreads()
    k = lane % nwarps
    return warp_sum(buf[2, k], nwarps), warp_sum(buf[3, k], nwarps)


@_device
def block_combine(m, u, t, q, buf, nwarps):
    """Block merge of the online triple (m, u, t) and one plain sum q."""
    m, u, t = warp_combine(m, u, t, WARP)
    q = warp_sum(q, WARP)
    lane = cuda.threadIdx.x % WARP
    if lane == 0:
        w = cuda.threadIdx.x // WARP
        buf[0, w] = m
        buf[1, w] = u
        buf[2, w] = t
        buf[3, w] = q
    cuda.syncthreads()
    k = lane % nwarps
    m, u, t = warp_combine(buf[0, k], buf[1, k], buf[2, k], nwarps)
    q = warp_sum(buf[3, k], nwarps)
    return m, u, t, q


# --------------------------------------------------------------------------- row kernels
#
# Every row kernel has the same signature, so that one launcher serves them all:
#   kernel(x, labels, weight, ignore_index, eps, z, scale, out_vec, out_lse, out_mat)
# x (n, C); labels (n,) int64 [sparse] or (n, C) [dense] (else a dummy); weight (C,) or
# (0,) for none; eps, z, scale in acc dtype; out_vec (n,) the loss (sparse/dense, else a
# dummy); out_lse (n,) the lse (not written by softmax/log_softmax); out_mat (n, C) the
# gradient / softmax / log_softmax (a dummy, never written, when loss-only).
# Compile-time constants (closure variables, frozen by Numba) select the op and path;
# branches on them are removed before code generation.

OPS = ("sparse", "dense", "logsumexp", "log_softmax", "softmax")


def _op_flags(op: str, with_grad: bool):
    sparse = op == "sparse"
    dense = op == "dense"
    write_mat = with_grad if (sparse or dense) else op in ("log_softmax", "softmax")
    return sparse, dense, op == "log_softmax", op == "softmax", write_mat


def make_cached_kernel(op: str, acc, team: int, vpt: int, threads: int, with_grad: bool):
    """Warp path (team <= 32) or block path (team == threads > 32), row in registers.

    Grid: one block per ``threads // team`` rows (block path: per row); no grid-stride
    loop, so that the per-element offsets stay compile-time immediates.
    """
    SPARSE, DENSE, LOGSM, SOFTMAX, WRITE_MAT = _op_flags(op, with_grad)
    ACC = acc
    TEAM = team
    VPT = vpt
    BLOCK = team > WARP
    WIDTH = min(team, WARP)
    NWARPS = max(1, team // WARP)
    ROWS_PER_BLOCK = threads // team
    LABEL_SUMS = SPARSE or DENSE
    KEEP_E = WRITE_MAT and not LOGSM  # registers hold e_k (else x_k) after step 3
    if threads % team or (BLOCK and team != threads):
        raise ValueError("the block path runs one row per block: team == threads")

    @jit(launch_bounds=launch_bounds(threads))
    def kernel(x, labels, weight, ignore_index, eps, z, scale, out_vec, out_lse, out_mat):
        prologue()
        zero = ACC(0.0)
        one = ACC(1.0)
        ninf = ACC(-np.inf)
        nan = ACC(np.nan)
        n = x.shape[0]
        C = x.shape[1]
        Cf = ACC(C)
        has_w = weight.shape[0] != 0
        smooth = eps != zero
        tid = cuda.threadIdx.x
        red_max = cuda.shared.array(WARP, ACC)
        red_sum = cuda.shared.array((6, WARP), ACC)
        v = cuda.local.array(VPT, ACC)
        wt_reg = cuda.local.array(VPT, ACC)

        row = np.int64(cuda.blockIdx.x) * ROWS_PER_BLOCK + tid // TEAM
        active = row < n
        r = row if active else np.int64(0)
        # Column offsets are unsigned (no negative-index wraparound code) and of the
        # form lane + k * TEAM with k a compile-time constant after unrolling, so the
        # loads below address base + immediate.
        lane = np.uint64(tid % TEAM)
        limit = np.uint64(C) if active else np.uint64(0)  # j < limit: in the row
        xr = x[r]

        # Labels (sparse): y, whether the row is kept and y a valid index.
        yu = np.uint64(0)
        kept = False
        valid = False
        w_y = one
        x_y = zero
        if SPARSE:
            y = labels[r]
            kept = active and y != ignore_index
            valid = kept and y >= 0 and y < C
            if valid:
                yu = np.uint64(y)
                if has_w:
                    w_y = weight[yu]
                if lane == 0:
                    x_y = ACC(xr[yu])  # read before any store of this row

        # Step 1: one coalesced read of the row into registers; thread max.
        m = ninf
        for k in range(VPT):
            j = lane + np.uint64(k * TEAM)
            val = ninf
            if j < limit:
                val = ACC(xr[j])
            v[k] = val
            if val > m:
                m = val
        if DENSE:
            lr = labels[r]
            for k in range(VPT):
                j = lane + np.uint64(k * TEAM)
                wt = zero
                if j < limit:
                    t = ACC(lr[j])
                    if smooth:
                        t = (one - eps) * t + eps / Cf
                    wt = weight[j] * t if has_w else t
                wt_reg[k] = wt

        # Step 2: team max; an all -inf row is NaN from here on.
        if BLOCK:
            m = block_max(m, red_max, NWARPS)
        else:
            m = warp_max(m, WIDTH)
        if not m > ninf:
            m = nan

        # Step 3: e_k, the lane's u (four partials) and t, and the label sums (which
        # need x_k and m); team sums (u compensated).
        q1 = zero  # wd
        q2 = zero  # W (sparse smoothing) or T_off (dense)
        q3 = zero  # T_tie (dense): the label mass on the ties at the max
        u0 = zero  # four interleaved partials of u (k mod 4): VPT / 4 terms each
        u1 = zero
        u2 = zero
        u3 = zero
        top = zero
        for k in range(VPT):
            val = v[k]
            if SPARSE:
                if smooth:
                    j = lane + np.uint64(k * TEAM)
                    if j < limit:
                        wj = weight[j] if has_w else one
                        if wj != zero:
                            q1 += wj * (m - val)
                        q2 += wj
            if DENSE:
                wt = wt_reg[k]
                if wt != zero:
                    q1 += wt * (m - val)
                q2 += wt if val < m else zero
                q3 += zero if val < m else wt
            e = exp_diff(val, m)
            # Selects, not branches (branches here cost the unrolled loop its
            # immediates); m is never -inf here, so -inf gives e = 0 and goes to u.
            eb = e if val < m else zero  # a term below the max
            top += zero if val < m else e  # a tie at the max (1), or NaN
            if k % 4 == 0:
                u0 += eb
            elif k % 4 == 1:
                u1 += eb
            elif k % 4 == 2:
                u2 += eb
            else:
                u3 += eb
            if KEEP_E:
                v[k] = e
        u = (u0 + u1) + (u2 + u3)
        uc = zero
        if LABEL_SUMS:
            if BLOCK:
                u, top, q1, q2, q3 = block_rest_labels(u, uc, top, q1, q2, q3, red_sum,
                                                       NWARPS)
            else:
                u, uc = warp_sum_c(u, uc, WIDTH)
                u = u + uc
                top = warp_sum(top, WIDTH)
                q1 = warp_sum(q1, WIDTH)
                q2 = warp_sum(q2, WIDTH)
                q3 = warp_sum(q3, WIDTH)
        else:
            if BLOCK:
                u, top = block_rest(u, uc, top, red_sum, NWARPS)
            else:
                u, uc = warp_sum_c(u, uc, WIDTH)
                u = u + uc
                top = warp_sum(top, WIDTH)

        # Step 4: r, log s, lse.
        rest = rest_mass(u, top, one)
        log_s = xlog1p(rest)
        lse = log_sum_exp(m, log_s)

        # The label-dependent coefficients (sparse; without smoothing eps/C, W, wd = 0).
        one_m_eps = one - eps
        eps_c = zero
        w_sum = zero
        if SPARSE and smooth:
            eps_c = eps / Cf
            w_sum = q2 if has_w else Cf

        # Step 5: per-row outputs, by lane 0 of the team.
        if active and lane == 0:
            if not LOGSM and not SOFTMAX:
                out_lse[r] = lse
            if SPARSE:
                if not kept:
                    loss = zero
                elif not valid:
                    loss = nan
                else:
                    loss = sparse_loss(m, log_s, x_y, w_y, one_m_eps, eps_c, w_sum,
                                       q1 if smooth else zero, z)
                out_vec[r] = loss
            if DENSE:
                out_vec[r] = dense_loss(m, log_s, q2 + q3, q1, z)

        # Step 6: the row output (gradient, softmax or log_softmax).
        if WRITE_MAT:
            if not BLOCK:
                syncwarp()  # x_y (lane 0) was read before any lane stores
            orow = out_mat[r]
            if SPARSE:
                if not kept or not valid:
                    fill = zero if not kept else nan
                    for k in range(VPT):
                        j = lane + np.uint64(k * TEAM)
                        if j < limit:
                            orow[j] = fill
                else:
                    # j != y here; the true class is stored once, after the loop, by
                    # the lane that holds e_y (one copy of its code, not VPT).
                    a = sparse_scale(one, rest, lse, w_y, one_m_eps, eps_c, w_sum, z, scale)
                    e_y = zero
                    for k in range(VPT):
                        j = lane + np.uint64(k * TEAM)
                        if j == yu:
                            e_y = v[k]
                        elif j < limit:
                            g = v[k] * a
                            if smooth:
                                wj = weight[j] if has_w else one
                                g = g - eps_c * wj * scale
                            orow[j] = g
                    if lane == yu % np.uint64(TEAM):
                        orow[yu] = sparse_true_grad(one, e_y, rest, lse, w_y, one_m_eps,
                                                    eps_c, w_sum, z, scale)
            if DENSE:
                coef = dense_coef(lse, q2, z)
                gs_over_s = grad_over_sum(one, rest, scale)
                for k in range(VPT):
                    j = lane + np.uint64(k * TEAM)
                    if j < limit:
                        orow[j] = dense_grad(v[k], wt_reg[k], rest, coef, q3, gs_over_s)
            if SOFTMAX:
                for k in range(VPT):
                    j = lane + np.uint64(k * TEAM)
                    if j < limit:
                        orow[j] = row_softmax(v[k], one, rest)
            if LOGSM:
                for k in range(VPT):
                    j = lane + np.uint64(k * TEAM)
                    if j < limit:
                        orow[j] = row_log_softmax(v[k], m, log_s)

    return kernel


def make_stream_kernel(op: str, acc, threads: int, unroll: int, with_grad: bool):
    """Stream path: one block per row, two passes over the row (see the docstring)."""
    SPARSE, DENSE, LOGSM, SOFTMAX, WRITE_MAT = _op_flags(op, with_grad)
    ACC = acc
    T = threads
    U = unroll
    NWARPS = threads // WARP
    # Pass 2 writes the row output, and forms wd (dense; sparse with smoothing).
    SECOND_PASS = WRITE_MAT or DENSE or SPARSE
    if threads % WARP or threads & (threads - 1):
        raise ValueError("stream path threads must be a power of two >= 32")

    @jit(launch_bounds=launch_bounds(threads))
    def kernel(x, labels, weight, ignore_index, eps, z, scale, out_vec, out_lse, out_mat):
        prologue()
        zero = ACC(0.0)
        one = ACC(1.0)
        ninf = ACC(-np.inf)
        nan = ACC(np.nan)
        C = x.shape[1]
        Cf = ACC(C)
        Cu = np.uint64(C)
        has_w = weight.shape[0] != 0
        smooth = eps != zero
        tid = np.uint64(cuda.threadIdx.x)
        red_a = cuda.shared.array((4, WARP), ACC)
        red_b = cuda.shared.array((4, WARP), ACC)
        keep = cuda.shared.array(5, ACC)  # thread 0's epilogue inputs, across pass 2
        buf = cuda.local.array(U, ACC)
        chunk = np.uint64(T * U)
        nchunks = (Cu + chunk - np.uint64(1)) // chunk

        row = np.int64(cuda.blockIdx.x)  # grid = n (checked on the host)
        xr = x[row]
        yu = np.uint64(0)
        kept = False
        valid = False
        w_y = one
        x_y = zero
        if SPARSE:
            y = labels[row]
            kept = y != ignore_index
            valid = kept and y >= 0 and y < C
            if valid:
                yu = np.uint64(y)
                if has_w:
                    w_y = weight[yu]
                if tid == 0:
                    x_y = ACC(xr[yu])  # before the barrier, before any store

        # Pass 1: online (m, u, t) per thread, U loads in flight per step; q = W
        # (sparse smoothing) or T_off (dense), qt = T_tie (dense: the label mass on the
        # ties at the thread's running max; off the max once the max moves on).
        m = ninf
        u = zero
        uc = zero
        top = zero
        q = zero
        qc = zero  # dense: the rounding errors of q and qt (comp_add: smoothing adds
        qt = zero  # C / T equal terms eps/C per thread, whose plain sum errs alike)
        qtc = zero
        for c in range(nchunks):
            base = c * chunk + tid
            cm = ninf
            for k in range(U):
                j = base + np.uint64(k * T)
                val = ACC(xr[j]) if j < Cu else ninf
                buf[k] = val
                if val > cm:
                    cm = val
            if cm > m:  # one rescale per step: the old max and ties become terms
                f = exp_diff(m, cm)
                u = (u + top) * f
                uc = uc * f
                top = zero
                q, qc = comp_add(q, qc, qt + qtc)
                qt = zero
                qtc = zero
                m = cm
            for k in range(U):
                val = buf[k]
                e = exp_diff(val, m)
                if val < m:  # a term below the max
                    u, uc = comp_add(u, uc, e)
                elif val != ninf:  # a tie (1) or NaN; not -inf (NaN here while m = -inf)
                    top += e
            if SPARSE:
                if smooth:
                    for k in range(U):
                        j = base + np.uint64(k * T)
                        if j < Cu:
                            q += weight[j] if has_w else one
            if DENSE:
                lr = labels[row]
                for k in range(U):
                    j = base + np.uint64(k * T)
                    if j < Cu:
                        t = ACC(lr[j])
                        if smooth:
                            t = (one - eps) * t + eps / Cf
                        wt = weight[j] * t if has_w else t
                        if buf[k] == m:
                            qt, qtc = comp_add(qt, qtc, wt)
                        else:
                            q, qc = comp_add(q, qc, wt)
        u = u + uc
        q = q + qc
        qt = qt + qtc
        m_own = m
        m, u, top, q = block_combine(m, u, top, q, red_a, NWARPS)
        if DENSE:  # the ties of a thread whose max is not the row's are off the max
            at_max = m_own == m
            moved, qt = block_sum2(zero if at_max else qt, qt if at_max else zero, red_b,
                                   NWARPS)
            q += moved
        if not m > ninf:
            m = nan
        rest = rest_mass(u, top, one)
        log_s = xlog1p(rest)
        lse = log_sum_exp(m, log_s)
        one_m_eps = one - eps
        eps_c = zero
        w_sum = zero
        if SPARSE and smooth:
            eps_c = eps / Cf
            w_sum = q if has_w else Cf
        # Thread 0 writes the loss (and the true-class gradient) after pass 2; what it
        # needs then waits in shared memory instead of registers (pass 2 needs them free).
        if tid == 0:
            keep[0] = x_y
            keep[1] = w_y
            keep[2] = log_s
            keep[3] = rest
            keep[4] = q + qt if DENSE else q

        # Pass 2 (backwards: the chunks read last are the likeliest still in L2).
        wd = zero  # sum_{w != 0} w (m - x): dense wt_c, sparse smoothing w_c
        if SECOND_PASS and (WRITE_MAT or DENSE or smooth):
            orow = out_mat[row]
            fill = nan if kept else zero
            a = zero
            coef = zero
            gs_over_s = zero
            if SPARSE:
                a = sparse_scale(one, rest, lse, w_y, one_m_eps, eps_c, w_sum, z, scale)
            if DENSE:
                coef = dense_coef(lse, q, z)
                gs_over_s = grad_over_sum(one, rest, scale)
            for cc in range(nchunks):
                base = (nchunks - np.uint64(1) - cc) * chunk + tid
                for k in range(U):
                    j = base + np.uint64(k * T)
                    buf[k] = ACC(xr[j]) if j < Cu else ninf
                if DENSE:
                    lr = labels[row]
                for k in range(U):
                    j = base + np.uint64(k * T)
                    if j < Cu:
                        val = buf[k]
                        if SPARSE:
                            wj = one
                            if smooth:
                                wj = weight[j] if has_w else one
                                if wj != zero:
                                    wd += wj * (m - val)
                            if WRITE_MAT:
                                if not (kept and valid):
                                    orow[j] = fill
                                elif j != yu:  # the true class: thread 0, after pass 2
                                    g = exp_diff(val, m) * a
                                    if smooth:
                                        g = g - eps_c * wj * scale
                                    orow[j] = g
                        if DENSE:
                            t = ACC(lr[j])
                            if smooth:
                                t = (one - eps) * t + eps / Cf
                            wt = weight[j] * t if has_w else t
                            if wt != zero:
                                wd += wt * (m - val)
                            if WRITE_MAT:
                                orow[j] = dense_grad(exp_diff(val, m), wt, rest, coef,
                                                     qt, gs_over_s)
                        if SOFTMAX:
                            orow[j] = row_softmax(exp_diff(val, m), one, rest)
                        if LOGSM:
                            orow[j] = row_log_softmax(val, m, log_s)
        if DENSE or SPARSE:
            wd = block_sum1(wd, red_b, NWARPS)  # its barrier: every pass-2 read is done

        if tid == 0:
            x_y = keep[0]
            w_y = keep[1]
            log_s = keep[2]
            rest = keep[3]
            q = keep[4]
            lse = log_sum_exp(m, log_s)
            one_m_eps = one - eps
            if SPARSE and smooth:
                w_sum = q if has_w else Cf
            if not LOGSM and not SOFTMAX:
                out_lse[row] = lse
            if SPARSE:
                if not kept:
                    loss = zero
                elif not valid:
                    loss = nan
                else:
                    loss = sparse_loss(m, log_s, x_y, w_y, one_m_eps, eps_c, w_sum, wd, z)
                    if WRITE_MAT:  # x_y was read before pass 2; every read of it is done
                        out_mat[row][yu] = sparse_true_grad(
                            one, exp_diff(x_y, m), rest, lse, w_y, one_m_eps, eps_c, w_sum,
                            z, scale)
                out_vec[row] = loss
            if DENSE:
                out_vec[row] = dense_loss(m, log_s, q, wd, z)

    return kernel
