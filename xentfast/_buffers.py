"""Reuse of large host output buffers (the gradient above all).

Why: a fresh large NumPy array is fresh memory from the operating system.  glibc
serves every block above its mmap threshold (at most 32 MiB) with a new mapping and
unmaps it on free, so *every* call that allocates a 500 MB gradient page-faults all of
it in again, and the kernel zeroes each page before we overwrite it.  Measured on the
project machine (2 threads, float32 4096 x 32000, loss+grad, Cython kernel): 68 ms
into a reused gradient, 128 ms into ``np.empty`` -- the faults and zeroing cost as much
as the cross-entropy itself.  A training loop drops each step's gradient and asks for
one of the same size the next step, so keeping the dropped buffer and handing it out
again removes that cost (the same idea as PyTorch's CUDA caching allocator).

How a buffer comes back: the array handed out is an ``np.ndarray`` whose ``base`` is
a private ``_Lease`` object.  NumPy stops collapsing a view's base chain at an object
of a different type, so every view of the returned array (slices, reshapes,
``torch.from_numpy``, memoryviews) keeps that array -- and through it the lease --
alive.  Only when the last of them is gone does the lease die, and a
``weakref.finalize`` hook returns its memory (``_Block``) to the cache.  Memory that
anything can still reach is never handed out twice.

Bounds: only blocks of at least ``MIN_BYTES`` are kept (smaller ones stay in malloc's
heap anyway), matched by exact size, and the cache holds at most ``limit`` bytes of
dropped blocks -- ``XENTFAST_BUFFER_CACHE_MB`` at import (default: 2048 MiB or an
eighth of physical memory, whichever is smaller; ``0`` turns reuse off), evicting the
oldest size first.  ``xentfast.empty_cache()`` frees every kept block.

Thread safety: the finalizer can run in any thread, including inside a garbage
collection triggered while this module holds its lock.  So the finalizer only appends
to a deque (atomic) and tries the lock without blocking; whoever holds the lock settles
the pending returns after releasing it.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import weakref

import numpy as np

#: Blocks smaller than this are plain ``np.empty`` (malloc keeps and reuses them).
MIN_BYTES = 1 << 20

_ENV = "XENTFAST_BUFFER_CACHE_MB"


class _Block(np.ndarray):
    """The raw memory of one cached buffer (a uint8 vector), a type of its own so that
    NumPy's base-collapsing stops at the lease instead of reaching it."""


class _Lease(np.ndarray):
    """One checkout of a block: the ``base`` of the array handed out."""


def default_limit() -> int:
    """The cache's byte limit: ``XENTFAST_BUFFER_CACHE_MB`` if set, else
    min(2 GiB, physical memory / 8)."""
    text = os.environ.get(_ENV, "").strip()
    if text:
        try:
            megabytes = float(text)
        except ValueError:
            raise ValueError(
                f"{_ENV} must be a number of MiB (0 turns buffer reuse off); got {text!r}"
            ) from None
        if not (math.isfinite(megabytes) and megabytes >= 0):
            raise ValueError(
                f"{_ENV} must be a finite number of MiB >= 0 (0 turns buffer reuse off); "
                f"got {text!r}"
            )
        return int(megabytes * (1 << 20))
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # pragma: no cover - non-POSIX
        physical = 16 << 30
    return int(min(2 << 30, physical // 8))


class BufferCache:
    """Exact-size free lists of dropped large blocks, at most ``limit`` bytes in all."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self._free: dict[int, list[_Block]] = {}  # nbytes -> blocks, oldest size first
        self._cached_bytes = 0
        self._pending: collections.deque[_Block] = collections.deque()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ handing out
    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array, like ``np.empty(shape, dtype)``."""
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        nbytes = dtype.itemsize * math.prod(int(extent) for extent in shape)
        if nbytes < MIN_BYTES or nbytes > self.limit:
            return np.empty(shape, dtype)
        block = None
        with self._lock:
            dropped = self._settle_locked()
            blocks = self._free.get(nbytes)
            if blocks:
                block = blocks.pop()
                self._cached_bytes -= nbytes
                if not blocks:
                    del self._free[nbytes]
        del dropped
        self._settle()
        if block is None:
            block = np.empty(nbytes, np.uint8).view(_Block)
        lease = block.view(_Lease)
        weakref.finalize(lease, self._returned, block).atexit = False
        return np.ndarray(shape, dtype, buffer=lease)

    # ------------------------------------------------------------------ taking back
    def _returned(self, block: _Block) -> None:
        """Finalizer of a lease: the block is free again."""
        self._pending.append(block)
        self._settle()

    def _settle(self) -> None:
        while self._pending:
            if not self._lock.acquire(blocking=False):
                return  # the holder settles after releasing
            try:
                dropped = self._settle_locked()
            finally:
                self._lock.release()
            del dropped  # freed outside the lock

    def _settle_locked(self) -> list:
        """Move pending returns into the free lists; returns the blocks evicted to stay
        within the limit (the caller drops them after releasing the lock)."""
        dropped = []
        while self._pending:
            block = self._pending.popleft()
            nbytes = block.nbytes
            if nbytes > self.limit:
                dropped.append(block)
                continue
            while self._cached_bytes + nbytes > self.limit:
                oldest = next(iter(self._free))
                blocks = self._free[oldest]
                dropped.append(blocks.pop(0))
                self._cached_bytes -= oldest
                if not blocks:
                    del self._free[oldest]
            self._free.setdefault(nbytes, []).append(block)
            self._cached_bytes += nbytes
        return dropped

    def _forget_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._pending = collections.deque()
        self._free = {}
        self._cached_bytes = 0

    # ------------------------------------------------------------------ control
    def cached_bytes(self) -> int:
        """Bytes of dropped blocks kept for reuse right now."""
        with self._lock:
            dropped = self._settle_locked()
            cached = self._cached_bytes
        del dropped
        return cached

    def clear(self) -> int:
        """Free every kept block; returns how many bytes that released."""
        with self._lock:
            dropped = self._settle_locked()
            for blocks in self._free.values():
                dropped.extend(blocks)
            released = self._cached_bytes
            self._free.clear()
            self._cached_bytes = 0
        del dropped
        _trim_heap()
        return released


def _trim_heap() -> None:
    """Hand freed heap memory back to the operating system where the C library allows
    (glibc's malloc_trim).  glibc serves blocks above its mmap threshold with their own
    mappings and unmaps them on free; but the threshold grows with every such free (up
    to 32 MiB), so most freed blocks land in the heap, where they stay resident until
    trimmed.  Elsewhere a no-op."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without it)
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


#: The process-wide cache the host arrays layer allocates from.
HOST_CACHE = BufferCache(default_limit())

if hasattr(os, "register_at_fork"):
    # A child forked while another thread held the lock would wait on it forever, and
    # free lists caught mid-update cannot be trusted: the child starts with a new lock
    # and an empty cache (arrays it inherited still come back to it when dropped).
    os.register_at_fork(after_in_child=HOST_CACHE._forget_after_fork)


def empty_cache() -> int:
    """Free the large host buffers xentfast keeps for reuse.

    xentfast keeps dropped output buffers of 1 MiB and more (gradients above all) to
    hand them out again to the next call of the same size, which saves the page faults
    and zeroing of fresh memory.  At most ``XENTFAST_BUFFER_CACHE_MB`` MiB are kept
    (default: 2048 or an eighth of physical memory, whichever is smaller; 0 turns reuse
    off).  Arrays you still hold are never affected.  With glibc the freed memory is
    also trimmed from the heap (``malloc_trim``), so the process's resident size drops
    by about the amount returned.

    Returns
    -------
    int
        The number of bytes released.
    """
    return HOST_CACHE.clear()
