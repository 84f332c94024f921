"""Path planning of the Numba CPU backend (``numba_cpu``): the dispatch tunables,
``plan`` (the path of a call, from its shape and options alone), ``tuning`` (forcing any
part of that choice, so that tests reach every path by construction) and the chunk and
segment geometry.  Plain Python; ``numba_cpu`` re-exports all of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Literal

from .. import _forkguard

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
    wide      rows: the 512-bit passes A+B(+C) of ``_wide_ab`` (only where the kernel
              has them: logsumexp, and index labels without smoothing, not in place for
              the gradient).
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


def _split_geometry(c: int):
    """(seglen, nseg) of the split path."""
    seglen = -(-c // SPLIT_SEGMENTS)
    return seglen, -(-c // seglen)
