"""Backend ``cuda``: Numba CUDA kernels, one fused kernel launch per call.

The kernel set of the contract (``xentfast/backends/__init__.py``) over device arrays
(Numba device arrays; anything with ``__cuda_array_interface__`` is viewed as one),
plus ``DEVICE``, the public layer's array operations for CUDA arrays
(``_cuda_arrays.py``).  The device code and its derivations are in
``_cuda_kernels.py``.

Paths (``_plan``), by the row length C and the registers a row needs (``words``: 1 per
cached value for float32, 2 for float64, twice that for probability labels, whose
w_c t'_c are cached beside the logits):

=========  ====================================  ==========================================
path       when (defaults on a GPU)              how
=========  ====================================  ==========================================
warp       C <= 32 * max_vpt (1024 for float32   a team of 1..32 lanes per row, several rows
           index labels)                         per block; row in registers; shuffles only
block      C <= block_threads * max_vpt and,     one block per row (64..1024 threads); row
           with a gradient, C <= 4096            in registers; shuffles + 1 barrier/reduction
stream     larger C                              one block per row (256..1024 threads, by
                                                 row bytes); online max/sum pass, then a
                                                 second (backwards) pass from L2
=========  ====================================  ==========================================

``max_vpt = max_cached_words // words``.  All tunables live in a ``Tuning`` record read
by the host code when it plans a launch; kernels receive them as compile-time
specialisation constants or launch dimensions, never as globals.  ``set_tuning`` /
``tuning(...)`` change them (the tests lower the limits to reach every path with tiny
shapes; ``force_path`` pins a path for tests and benchmarks).  Under the CUDA
simulator the defaults are small (blocks of 32-64 threads, 4 cached values a lane) so
the test suite exercises all three paths with C of a few hundred.

Notes
-----
* Every kernel variant (op x path x lane/VPT shape x with/without gradient x dtype)
  is compiled by Numba on first use (about a second each) and kept for the process;
  kernels are not cached on disk.
* Loads are scalar and coalesced (a warp reads 32 consecutive elements per step);
  Numba has no vector loads from array memory, so none are used.
* One block per row on the block and stream paths: a handful of rows with a huge C
  (e.g. 2 x 66_000) occupies only that many SMs (a split-row variant would need a
  second combine pass; not implemented).
* Outputs come from the caller's memory pool when the call brings CuPy arrays or
  PyTorch tensors (on their default stream); with Numba device arrays, from Numba's
  allocator (a ``cudaMalloc`` and later a ``cudaFree`` per array: 4.7 ms extra for a
  4 GB gradient on an H100).  For large repeated calls pass ``out=`` for the gradient,
  or install a pooling allocator with ``numba.cuda.set_memory_manager``.
* ``check_labels=True`` costs one small kernel and one small read-back per call (it
  also yields the "mean" denominator); reduced losses cost one more read-back.
  ``reduction="none"`` with ``check_labels=False`` never synchronises the host.
* All work runs on the current CUDA device and the legacy default stream (see
  ``_cuda_arrays`` for how producers' streams are honoured).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import threading
from typing import Iterator, Literal

import numpy as np

from . import _cuda_kernels as _k
from ._cuda_arrays import DEVICE, as_numba  # noqa: F401  (DEVICE is the backend's arrays)
from ._cuda_arrays import dummy as _dummy

NAME = "cuda"
NATIVE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
SIMULATED = _k.SIMULATED

Path = Literal["warp", "block", "stream"]


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch parameters (read on the host; powers of two unless said otherwise).

    max_cached_words: 32-bit registers a lane may spend caching its share of a row
        (on-chip limit: 32 * max_vpt for the warp path, block_threads * max_vpt for
        the block path).  Above ~20 float32 values ptxas spills a little at 64
        registers; benchmarks/gpu_check.py measures both sides of the limit.
    warp_threads: block size of the warp path (several rows per block).
    warp_min_vpt: the warp path uses the smallest team (1..32 lanes) giving each lane
        at most this many values, then ceil(C / team) values per lane.
    block_threads: the largest block of the block path (one row per block).
    block_min_vpt: the block path uses the smallest block (>= 64) giving each thread
        at most this many values.
    block_max_classes: loss+grad rows longer than this take the stream path even when
        they fit the block path's registers.  Measured on an H100 (loss+grad, float32; float16
        alike): C = 2048 block 0.49 ms vs stream 0.54; C = 4096 0.44 vs 0.43; C = 8192
        0.58 vs 0.35; C = 16000 0.81 vs 0.70; C = 32000 (8192 rows) 1.54 vs 1.22, where
        the 1024 x 32 register cache spills.
    stream_threads, stream_unroll: the largest block of the stream path and the loads
        each thread has in flight per step.  The block is the power of two nearest
        above row_bytes / stream_bytes_per_thread, clamped to [256, stream_threads]:
        measured best on an H100 at 256 threads for 32 KiB rows, 512 for 64 KiB and
        1024 for 128 KiB and more (1024 x 8: 56 registers, no spills at sm_90).
    force_path: None (choose by C) or a path name; a cached path too small for the
        row raises ValueError.
    """

    max_cached_words: int = 32
    warp_threads: int = 256
    warp_min_vpt: int = 4
    block_threads: int = 1024
    block_min_vpt: int = 8
    block_max_classes: int = 4096
    stream_threads: int = 1024
    stream_bytes_per_thread: int = 128
    stream_unroll: int = 8
    force_path: Path | None = None


_SIM_DEFAULTS = Tuning(max_cached_words=4, warp_threads=32, warp_min_vpt=2, block_threads=64,
                       block_min_vpt=2, block_max_classes=256, stream_threads=64,
                       stream_unroll=2)
DEFAULT_TUNING = _SIM_DEFAULTS if SIMULATED else Tuning()
_tuning: contextvars.ContextVar[Tuning] = contextvars.ContextVar("xentfast_cuda_tuning",
                                                                  default=DEFAULT_TUNING)


def get_tuning() -> Tuning:
    """The tuning in force in this context."""
    return _tuning.get()


def set_tuning(**changes) -> Tuning:
    """Change tunables for this context (thread/task); returns the previous record.

    ``set_tuning()`` with no argument restores the defaults.
    """
    previous = _tuning.get()
    _tuning.set(_validated(dataclasses.replace(previous, **changes) if changes else DEFAULT_TUNING))
    return previous


@contextlib.contextmanager
def tuning(**changes) -> Iterator[Tuning]:
    """``with tuning(max_cached_words=2, force_path="stream"): ...``"""
    token = _tuning.set(_validated(dataclasses.replace(_tuning.get(), **changes)))
    try:
        yield _tuning.get()
    finally:
        _tuning.reset(token)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _validated(t: Tuning) -> Tuning:
    for name in ("warp_threads", "block_threads", "stream_threads"):
        value = getattr(t, name)
        if not (_pow2(value) and 32 <= value <= 1024):
            raise ValueError(f"{name} must be a power of two in [32, 1024]; got {value}")
    if t.block_threads < 64:
        raise ValueError(f"block_threads must be >= 64 (two warps); got {t.block_threads}")
    for name in ("max_cached_words", "warp_min_vpt", "block_min_vpt", "block_max_classes",
                 "stream_bytes_per_thread", "stream_unroll"):
        if getattr(t, name) < 1:
            raise ValueError(f"{name} must be >= 1; got {getattr(t, name)}")
    if t.force_path not in (None, "warp", "block", "stream"):
        raise ValueError(f"force_path must be None, 'warp', 'block' or 'stream'; got {t.force_path!r}")
    return t


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _round_vpt(v: int) -> int:
    """Values per lane: 1..4 as they are, then multiples of 4 (fewer variants)."""
    return v if v <= 4 else (v + 3) // 4 * 4


@dataclasses.dataclass(frozen=True)
class Plan:
    path: Path
    team: int  # lanes per row (stream: threads)
    vpt: int  # cached values per lane (stream: loads in flight per step)
    threads: int  # block size
    rows_per_block: int


def plan(c: int, acc_dtype, dense: bool, t: Tuning | None = None,
         itemsize: int | None = None, with_grad: bool = True) -> Plan:
    """Choose the path and launch shape for rows of ``c`` classes (see the table);
    ``itemsize``: bytes per logit (default: the accumulation dtype's).  Loss-only
    launches keep the block path up to its register limit (``block_max_classes`` is
    for the gradient: at 32768 x 32000 float32 loss-only, block 1.90 ms vs stream 2.81)."""
    t = t or get_tuning()
    words = (np.dtype(acc_dtype).itemsize // 4) * (2 if dense else 1)
    max_vpt = max(1, t.max_cached_words // words)
    forced = t.force_path
    if forced in (None, "warp") and c <= _k.WARP * max_vpt:
        team = min(_k.WARP, _next_pow2(math.ceil(c / t.warp_min_vpt)))
        vpt = min(max_vpt, _round_vpt(math.ceil(c / team)))
        if team * vpt < c:  # rounding hit the cap: use the whole warp
            team, vpt = _k.WARP, math.ceil(c / _k.WARP)
        return Plan("warp", team, vpt, t.warp_threads, t.warp_threads // team)
    if (forced == "block" or (forced is None and (c <= t.block_max_classes or not with_grad))) \
            and c <= t.block_threads * max_vpt:
        team = min(t.block_threads, max(64, _next_pow2(math.ceil(c / t.block_min_vpt))))
        vpt = min(max_vpt, _round_vpt(math.ceil(c / team)))
        if team * vpt < c:
            team, vpt = t.block_threads, math.ceil(c / t.block_threads)
        return Plan("block", team, vpt, team, 1)
    if forced in (None, "stream"):
        row_bytes = c * (itemsize or np.dtype(acc_dtype).itemsize)
        wanted = _next_pow2(math.ceil(row_bytes / t.stream_bytes_per_thread))
        threads = min(t.stream_threads, max(min(256, t.stream_threads), wanted))
        return Plan("stream", threads, t.stream_unroll, threads, 1)
    raise ValueError(
        f"force_path={forced!r} cannot hold rows of {c} classes on chip "
        f"(max_cached_words={t.max_cached_words}); use 'stream' or raise the limit"
    )


# --------------------------------------------------------------------------- compilation

_kernels: dict = {}
_lock = threading.Lock()


def _kernel(op: str, acc_dtype, p: Plan, with_grad: bool):
    acc = np.float64 if np.dtype(acc_dtype) == np.float64 else np.float32
    key = (op, acc, p.path, p.team, p.vpt, p.threads, with_grad)
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                if p.path == "stream":
                    kernel = _k.make_stream_kernel(op, acc, p.threads, p.vpt, with_grad)
                else:
                    kernel = _k.make_cached_kernel(op, acc, p.team, p.vpt, p.threads, with_grad)
                _kernels[key] = kernel
    return kernel


def _acc_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _launch(op: str, x, labels, weight, ignore_index, eps, z, scale, out_vec, out_lse, out_mat,
            with_grad: bool) -> None:
    x = as_numba(x)
    n, c = x.shape
    if n == 0 or c == 0:
        return
    acc = _acc_dtype(x.dtype)
    p = plan(c, acc, op == "dense", itemsize=x.dtype.itemsize, with_grad=with_grad)
    blocks = (n + p.rows_per_block - 1) // p.rows_per_block
    if blocks > 2**31 - 1:
        raise ValueError(f"{n} rows exceed one CUDA grid for this path; split the batch")
    kernel = _kernel(op, acc, p, with_grad)
    a = acc.type
    _k.launch(kernel, blocks, p.threads,
              x, labels, weight, np.int64(ignore_index), a(eps), a(z), a(scale),
              out_vec, out_lse, out_mat)


# --------------------------------------------------------------------------- kernel set


def _weight(weight, acc):
    return as_numba(weight) if weight is not None else _dummy(acc, 1, 0)


def sparse(logits, labels, weight, ignore_index, label_smoothing, z_loss, grad_scale,
           loss, lse, grad):
    """Index labels; see the contract.  ``grad`` may be ``logits`` itself (in-place)."""
    x = as_numba(logits)
    acc = _acc_dtype(x.dtype)
    with_grad = grad is not None
    _launch("sparse", x, as_numba(labels), _weight(weight, acc), ignore_index, label_smoothing,
            z_loss, grad_scale, as_numba(loss), as_numba(lse),
            as_numba(grad) if with_grad else x, with_grad)


def dense(logits, labels, weight, label_smoothing, z_loss, grad_scale, loss, lse, grad):
    """Probability labels (same dtype as logits); see the contract."""
    x = as_numba(logits)
    acc = _acc_dtype(x.dtype)
    with_grad = grad is not None
    _launch("dense", x, as_numba(labels), _weight(weight, acc), 0, label_smoothing, z_loss,
            grad_scale, as_numba(loss), as_numba(lse),
            as_numba(grad) if with_grad else x, with_grad)


def _primitive(op: str, x, out_vec, out_lse, out_mat) -> None:
    x = as_numba(x)
    acc = _acc_dtype(x.dtype)
    _launch(op, x, _dummy(np.int64, 1), _dummy(acc, 1, 0), 0, 0.0, 0.0, 1.0,
            out_vec, out_lse, out_mat, True)


def logsumexp(x, out):
    acc = _acc_dtype(as_numba(x).dtype)
    _primitive("logsumexp", x, _dummy(acc, 1), as_numba(out), _dummy(as_numba(x).dtype, 2))


def log_softmax(x, out):
    acc = _acc_dtype(as_numba(x).dtype)
    _primitive("log_softmax", x, _dummy(acc, 1), _dummy(acc, 1), as_numba(out))


def softmax(x, out):
    acc = _acc_dtype(as_numba(x).dtype)
    _primitive("softmax", x, _dummy(acc, 1), _dummy(acc, 1), as_numba(out))


__all__ = [
    "DEVICE", "NAME", "NATIVE_DTYPES", "Plan", "Tuning", "dense", "get_tuning", "log_softmax",
    "logsumexp", "plan", "set_tuning", "softmax", "sparse", "tuning",
]
