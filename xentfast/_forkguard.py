"""Threads in a forked child.

GNU OpenMP (libgomp), under both the ``cpu`` backend (Numba's "omp" threading layer)
and the ``cython`` backend, cannot start a thread team in a child forked after any team
ran in the parent: Numba's layer terminates such a child ("fork() called from a process
already using GNU OpenMP, this is unsafe"), and libgomp itself deadlocks.  Process
pools, PyTorch DataLoader workers, Dask's process workers and gunicorn all fork.

So every backend reports here when it launches a parallel region (``note_parallel``,
or a probe given to ``register``), and asks ``threads_ok()`` before it launches one
(or has its threads switched off through ``register``'s second function).  In a child forked after any parallel
region ran, ``threads_ok()`` is False for good and every kernel runs on the calling
thread: the same row bodies in the same order, so the same bits as in the parent.
(A child forked before any parallel region ran, or started with "spawn" or
"forkserver", keeps its threads.)
"""

from __future__ import annotations

import os

_parallel_ran = False
_threads_ok = True
_backends: list = []  # (ran_parallel() -> bool, disable_threads() -> None)


def note_parallel() -> None:
    """Record that this process is about to run (or ran) an OpenMP parallel region."""
    global _parallel_ran
    _parallel_ran = True


def threads_ok() -> bool:
    """False in a child forked after a parallel region ran in its parent."""
    return _threads_ok


def register(ran_parallel, disable_threads) -> None:
    """A backend with its own record of parallel regions (the Cython extension): asked
    in a forked child whether it ran one, and told to stop using threads if any did --
    at once, when it is first imported in a child that already may not use them."""
    _backends.append((ran_parallel, disable_threads))
    if not _threads_ok:
        disable_threads()


def _after_fork_in_child() -> None:
    global _threads_ok
    if _parallel_ran or any(ran() for ran, _ in _backends):
        _threads_ok = False
        for _, disable in _backends:
            disable()


if hasattr(os, "register_at_fork"):  # no fork on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
