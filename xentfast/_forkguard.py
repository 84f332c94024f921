"""Threads in a forked child.

GNU OpenMP (libgomp), under both the ``cpu`` backend (Numba's "omp" threading layer)
and the ``cython`` backend, cannot start a thread team in a child forked after any team
ran in the parent: Numba's layer terminates such a child ("fork() called from a process
already using GNU OpenMP, this is unsafe"), and libgomp itself deadlocks.  Process
pools, PyTorch DataLoader workers, Dask's process workers and gunicorn all fork.

So every backend reports here when it launches a parallel region (``note_parallel``),
and asks ``threads_ok()`` before it launches one.  In a child forked after any parallel
region ran, ``threads_ok()`` is False for good and every kernel runs on the calling
thread: the same row bodies in the same order, so the same bits as in the parent.
(A child forked before any parallel region ran, or started with "spawn" or
"forkserver", keeps its threads.)
"""

from __future__ import annotations

import os

_parallel_ran = False
_threads_ok = True


def note_parallel() -> None:
    """Record that this process is about to run (or ran) an OpenMP parallel region."""
    global _parallel_ran
    _parallel_ran = True


def threads_ok() -> bool:
    """False in a child forked after a parallel region ran in its parent."""
    return _threads_ok


def _after_fork_in_child() -> None:
    global _threads_ok
    if _parallel_ran:
        _threads_ok = False


if hasattr(os, "register_at_fork"):  # no fork on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
