"""Numba CUDA kernels of the ``cuda`` backend: the row kernels and their building blocks.

This module holds device code only; ``numba_cuda.py`` picks a path, compiles the
variant it needs through the factories below and launches it, and
``_cuda_arrays.py`` holds the layout, cast and reduction kernels of the array layer.
The contract and the per-row mathematics are in ``xentfast/backends/__init__.py``;
this file says how they are evaluated on a GPU.

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

The numbered steps (cached paths; x = row, C classes, acc = accumulation dtype)
-------------------------------------------------------------------------------
1. Load: ``v[k] = acc(x[row, l + k TEAM])`` (float16 is widened on load), padding
   with -inf; thread max ``m_l = max_k v[k]``.  NaN is never taken as a max (``a > m``
   is false for NaN): a NaN row is caught by the sum in step 2.
2. Team max ``m = max_l m_l`` (butterfly: ``m = max(m, shfl_xor(m, o))`` for
   o = TEAM/2, ..., 1; every lane ends with the same m).
3. ``shift = m`` (0 when m = -inf, so that a row of -inf does not compute
   -inf - -inf), ``e_k = exp(v[k] - shift)``, thread sums, then team sums of
   s = sum e, and of the label terms (sparse smoothing: sum_{w_c != 0} w_c x_c and W =
   sum w_c; dense: Wt = sum w_c t'_c and A = sum_{w_c t'_c != 0} w_c t'_c (m - x_c)).
   e_k replaces v[k] in registers when the output needs p = e / s.
4. ``lse = m + log(s)``; NaN when m = -inf (an all -inf row, by contract).  A +inf
   logit makes exp(inf - inf) = NaN in s, a NaN logit makes s NaN: the row is NaN.
5. Loss (lane 0): sparse ``(1-eps) w_y (lse - x_y) + z lse^2 [+ eps/C (W lse - sum
   w x)]``; dense ``sum_{wt!=0} wt (lse - x) + z lse^2 = A + Wt log(s) + z lse^2``
   (all terms >= 0 before the sum: no cancellation against lse).
6. Gradient ``p_j = e_j / s`` (as e_j times 1/s), sparse
   ``g_j = s_g [p_j coef - (1-eps) w_y [j == y] - (eps/C) w_j]`` with
   ``coef = (1-eps) w_y + 2 z lse + eps W / C``; dense ``g_j = s_g [p_j (Wt + 2 z lse)
   - wt_j]``; s_g = grad_scale.  All in acc (float32 for float16 input): the
   true-class term p_y coef - (1 - eps) w_y, i.e. p_y - 1 for the plain loss, is
   formed in float32 and rounded once, on the store, to the output dtype.

The stream path (one block per row, any C)
------------------------------------------
Pass 1, per thread, the online softmax normaliser (Milakov & Gimelshein 2018):
for each element x, with the running pair (m, s) meaning s = sum_i exp(x_i - m),

    x > m:   m_new = x,  s = s * exp(m - m_new) + exp(x - m_new)    (the old terms
                                                                     rescaled)
    else:    s = s + exp(x - m)

because exp(x_i - m_new) = exp(x_i - m) exp(m - m_new).  exp(x - m_new) = exp(0) = 1
is written ``1 + (x - x)`` so that x = +inf still gives NaN, and a running m of -inf
(nothing but -inf seen yet, s = 0) rescales by 1 instead of exp(-inf - -inf).
Pairs from two threads combine the same way:

    m = max(m_a, m_b),   s = s_a exp(m_a - m) + s_b exp(m_b - m),

which is commutative bit for bit (the two products are added in either order with
the same result), so the xor-butterfly leaves an identical (m, s) in every lane and
the block result is deterministic.  The block combine: butterfly within each warp,
lane 0 of warp w stores its pair in shared[w], one barrier, then every warp reads the
NW pairs (lane l takes pair l mod NW) and runs the same butterfly, so every thread
holds the row's (m, s) after a single barrier.  Pass 2 recomputes e_j = exp(x_j - m)
from a second read of x and writes the output (and, for dense labels, accumulates A
now that m is known; the label row is read in both passes).

Precision rule: float16 is read and widened to float32, float32 accumulates in
float32, float64 in float64; every reduction is a fixed tree, so results are
bitwise reproducible run to run.  Math is libdevice ``expf``/``logf`` (``exp``/``log``
for float64) without fastmath: Numba's fastmath sets LLVM's ``nnan``/``ninf`` flags,
which would license the compiler to break the NaN and -inf rules of the contract.

Memory safety: every load is guarded by ``j < C`` and ``row < n``; a label outside
[0, C) that is not ignore_index is never used as an index (the row gets NaN loss and
gradient; the host-side check in ``_cuda_arrays`` raises before the kernel runs unless
``check_labels=False``).  All indices are int64.

In-place (grad aliases logits): a lane writes only the columns it read itself, after
it read them; the one cross-lane read, x_y by lane 0 for the loss, happens before a
barrier (block/stream) or a ``syncwarp`` (warp path) that precedes every store.

Simulator: ``NUMBA_ENABLE_CUDASIM=1`` runs the same kernel code as Python threads.
The simulator has no warp shuffles: a warp reduction there is one rendezvous of the
warp's 32 threads (a per-warp ``threading.Barrier``) after which each lane evaluates
the same xor butterfly in Python; ``XENTFAST_SIM_SHUFFLES=1`` emulates each shuffle
instead, running the hardware helpers' code line by line.  Both rely on what the
full-mask hardware shuffle requires anyway: every lane of a warp executes the same
sequence of collectives.  ``prologue``, ``xexp`` and ``xlog`` give simulated threads
IEEE behaviour without warnings (log(0) = -inf, inf - inf = NaN); on the device they
are an empty inlined function and libdevice exp/log.
"""

from __future__ import annotations

import math
import os
import threading
import types
import warnings

import numpy as np
from numba import cuda

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

    def xlog(v):
        return np.log(v)  # log(0) = -inf (Python's math.log raises)

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
    def xlog(v):
        return math.log(v)


_device = jit(device=True, forceinline=True)


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
def combine(m1, s1, m2, s2, one, ninf):
    """Merge two online-softmax pairs (see the module docstring); commutative."""
    m = m1 if m1 > m2 else m2
    f1 = xexp(m1 - m) if m1 > ninf else one
    f2 = xexp(m2 - m) if m2 > ninf else one
    return m, s1 * f1 + s2 * f2


@_device
def warp_combine(m, s, width, one, ninf):
    off = width // 2
    while off > 0:
        m2 = shfl_xor(m, off)
        s2 = shfl_xor(s, off)
        m, s = combine(m, s, m2, s2, one, ninf)
        off //= 2
    return m, s


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

    _combine_py = getattr(combine, "py_func", None) or combine.fn  # the Python body

    def warp_combine(m, s, width, one, ninf):  # noqa: F811
        def op(a, b):
            return _combine_py(a[0], a[1], b[0], b[1], one, ninf)

        return _sim_butterfly((m, s), width, op)


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
def block_sum3(a, b, c, buf, nwarps):
    a = warp_sum(a, WARP)
    b = warp_sum(b, WARP)
    c = warp_sum(c, WARP)
    lane = cuda.threadIdx.x % WARP
    if lane == 0:
        w = cuda.threadIdx.x // WARP
        buf[0, w] = a
        buf[1, w] = b
        buf[2, w] = c
    cuda.syncthreads()
    k = lane % nwarps
    a = warp_sum(buf[0, k], nwarps)
    b = warp_sum(buf[1, k], nwarps)
    c = warp_sum(buf[2, k], nwarps)
    return a, b, c


@_device
def block_combine(m, s, q1, q2, buf, nwarps, one, ninf):
    """Block merge of the online pair (m, s) and two plain sums q1, q2."""
    m, s = warp_combine(m, s, WARP, one, ninf)
    q1 = warp_sum(q1, WARP)
    q2 = warp_sum(q2, WARP)
    lane = cuda.threadIdx.x % WARP
    if lane == 0:
        w = cuda.threadIdx.x // WARP
        buf[0, w] = m
        buf[1, w] = s
        buf[2, w] = q1
        buf[3, w] = q2
    cuda.syncthreads()
    k = lane % nwarps
    m, s = warp_combine(buf[0, k], buf[1, k], nwarps, one, ninf)
    q1 = warp_sum(buf[2, k], nwarps)
    q2 = warp_sum(buf[3, k], nwarps)
    return m, s, q1, q2


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
        two = ACC(2.0)
        ninf = ACC(-np.inf)
        nan = ACC(np.nan)
        n = x.shape[0]
        C = x.shape[1]
        Cf = ACC(C)
        has_w = weight.shape[0] != 0
        smooth = eps != zero
        tid = cuda.threadIdx.x
        red_max = cuda.shared.array(WARP, ACC)
        red_sum = cuda.shared.array((3, WARP), ACC)
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

        # Step 2: team max.
        if BLOCK:
            m = block_max(m, red_max, NWARPS)
        else:
            m = warp_max(m, WIDTH)

        # Step 3: exponentials and the label sums, then team sums.
        shift = m if m > ninf else zero
        s = zero
        q1 = zero
        q2 = zero
        if SPARSE:
            if smooth:
                for k in range(VPT):
                    j = lane + np.uint64(k * TEAM)
                    if j < limit:
                        wj = weight[j] if has_w else one
                        if wj != zero:
                            q1 += wj * v[k]
                        q2 += wj
        if DENSE:
            for k in range(VPT):
                wt = wt_reg[k]
                if wt != zero:
                    q1 += wt * (m - v[k])
                q2 += wt
        for k in range(VPT):
            e = xexp(v[k] - shift)
            s += e
            if KEEP_E:
                v[k] = e
        if LABEL_SUMS:
            if BLOCK:
                s, q1, q2 = block_sum3(s, q1, q2, red_sum, NWARPS)
            else:
                s = warp_sum(s, WIDTH)
                q1 = warp_sum(q1, WIDTH)
                q2 = warp_sum(q2, WIDTH)
        else:
            if BLOCK:
                s = block_sum1(s, red_sum, NWARPS)
            else:
                s = warp_sum(s, WIDTH)

        # Step 4: lse.
        log_s = xlog(s)
        lse = m + log_s if m > ninf else nan

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
                    loss = (one - eps) * w_y * (lse - x_y) + z * lse * lse
                    if smooth:
                        w_total = q2 if has_w else Cf
                        loss = loss + eps / Cf * (w_total * lse - q1)
                out_vec[r] = loss
            if DENSE:
                out_vec[r] = (q1 + q2 * log_s) + z * lse * lse

        # Step 6: the row output (gradient, softmax or log_softmax).
        if WRITE_MAT:
            if not BLOCK:
                syncwarp()  # x_y (lane 0) was read before any lane stores
            inv_s = one / s
            orow = out_mat[r]
            if SPARSE:
                if not kept or not valid:
                    fill = zero if not kept else nan
                    for k in range(VPT):
                        j = lane + np.uint64(k * TEAM)
                        if j < limit:
                            orow[j] = fill
                else:
                    a_y = (one - eps) * w_y
                    coef = a_y + z * two * lse
                    if smooth:
                        w_total = q2 if has_w else Cf
                        coef = coef + eps * w_total / Cf
                        eps_c = eps / Cf
                        for k in range(VPT):
                            j = lane + np.uint64(k * TEAM)
                            if j < limit:
                                g = v[k] * inv_s * coef
                                if j == yu:
                                    g = g - a_y
                                wj = weight[j] if has_w else one
                                orow[j] = (g - eps_c * wj) * scale
                    else:
                        for k in range(VPT):
                            j = lane + np.uint64(k * TEAM)
                            if j < limit:
                                g = v[k] * inv_s * coef
                                if j == yu:
                                    g = g - a_y
                                orow[j] = g * scale
            if DENSE:
                coef = q2 + z * two * lse
                for k in range(VPT):
                    j = lane + np.uint64(k * TEAM)
                    if j < limit:
                        orow[j] = (v[k] * inv_s * coef - wt_reg[k]) * scale
            if SOFTMAX:
                for k in range(VPT):
                    j = lane + np.uint64(k * TEAM)
                    if j < limit:
                        orow[j] = v[k] * inv_s
            if LOGSM:
                for k in range(VPT):
                    j = lane + np.uint64(k * TEAM)
                    if j < limit:
                        orow[j] = v[k] - lse

    return kernel


def make_stream_kernel(op: str, acc, threads: int, unroll: int, with_grad: bool):
    """Stream path: one block per row, two passes over the row (see the docstring)."""
    SPARSE, DENSE, LOGSM, SOFTMAX, WRITE_MAT = _op_flags(op, with_grad)
    ACC = acc
    T = threads
    U = unroll
    NWARPS = threads // WARP
    SECOND_PASS = WRITE_MAT or DENSE
    if threads % WARP or threads & (threads - 1):
        raise ValueError("stream path threads must be a power of two >= 32")

    @jit(launch_bounds=launch_bounds(threads))
    def kernel(x, labels, weight, ignore_index, eps, z, scale, out_vec, out_lse, out_mat):
        prologue()
        zero = ACC(0.0)
        one = ACC(1.0)
        two = ACC(2.0)
        ninf = ACC(-np.inf)
        nan = ACC(np.nan)
        C = x.shape[1]
        Cf = ACC(C)
        Cu = np.uint64(C)
        has_w = weight.shape[0] != 0
        smooth = eps != zero
        tid = np.uint64(cuda.threadIdx.x)
        red_a = cuda.shared.array((4, WARP), ACC)
        red_b = cuda.shared.array((3, WARP), ACC)
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

        # Pass 1: online (m, s) per thread, U loads in flight per step.
        m = ninf
        s = zero
        q1 = zero
        q2 = zero
        for c in range(nchunks):
            base = c * chunk + tid
            for u in range(U):
                j = base + np.uint64(u * T)
                buf[u] = ACC(xr[j]) if j < Cu else ninf
            for u in range(U):
                val = buf[u]
                if val > m:
                    s = s * (xexp(m - val) if m > ninf else one) + (one + (val - val))
                    m = val
                else:
                    s += xexp(val - (m if m > ninf else zero))
            if SPARSE:
                if smooth:
                    for u in range(U):
                        j = base + np.uint64(u * T)
                        if j < Cu:
                            wj = weight[j] if has_w else one
                            if wj != zero:
                                q1 += wj * buf[u]
                            q2 += wj
            if DENSE:
                lr = labels[row]
                for u in range(U):
                    j = base + np.uint64(u * T)
                    if j < Cu:
                        t = ACC(lr[j])
                        if smooth:
                            t = (one - eps) * t + eps / Cf
                        q2 += weight[j] * t if has_w else t
        m, s, q1, q2 = block_combine(m, s, q1, q2, red_a, NWARPS, one, ninf)
        log_s = xlog(s)
        lse = m + log_s if m > ninf else nan
        w_total = q2 if has_w else Cf  # sparse smoothing: the sum of the class weights

        # Pass 2 (backwards: the chunks read last are the likeliest still in L2).
        a_acc = zero  # dense: sum_{wt != 0} wt (m - x)
        if SECOND_PASS:
            shift = m if m > ninf else zero
            inv_s = one / s
            orow = out_mat[row]
            fill = nan if kept else zero
            a_y = (one - eps) * w_y
            coef = a_y + z * two * lse
            if SPARSE and smooth:
                coef = coef + eps * w_total / Cf
            if DENSE:
                coef = q2 + z * two * lse
            eps_c = eps / Cf
            for cc in range(nchunks):
                base = (nchunks - np.uint64(1) - cc) * chunk + tid
                for u in range(U):
                    j = base + np.uint64(u * T)
                    buf[u] = ACC(xr[j]) if j < Cu else ninf
                if DENSE:
                    lr = labels[row]
                for u in range(U):
                    j = base + np.uint64(u * T)
                    if j < Cu:
                        val = buf[u]
                        if SPARSE:
                            if kept and valid:
                                g = xexp(val - shift) * inv_s * coef
                                if j == yu:
                                    g = g - a_y
                                if smooth:
                                    wj = weight[j] if has_w else one
                                    g = g - eps_c * wj
                                orow[j] = g * scale
                            else:
                                orow[j] = fill
                        if DENSE:
                            t = ACC(lr[j])
                            if smooth:
                                t = (one - eps) * t + eps / Cf
                            wt = weight[j] * t if has_w else t
                            if wt != zero:
                                a_acc += wt * (m - val)
                            if WRITE_MAT:
                                orow[j] = (xexp(val - shift) * inv_s * coef - wt) * scale
                        if SOFTMAX:
                            orow[j] = xexp(val - shift) * inv_s
                        if LOGSM:
                            orow[j] = val - lse
        if DENSE:
            a_acc = block_sum1(a_acc, red_b, NWARPS)

        if tid == 0:
            if not LOGSM and not SOFTMAX:
                out_lse[row] = lse
            if SPARSE:
                if not kept:
                    loss = zero
                elif not valid:
                    loss = nan
                else:
                    loss = (one - eps) * w_y * (lse - x_y) + z * lse * lse
                    if smooth:
                        loss = loss + eps / Cf * (w_total * lse - q1)
                out_vec[row] = loss
            if DENSE:
                out_vec[row] = (a_acc + q2 * log_s) + z * lse * lse

    return kernel
