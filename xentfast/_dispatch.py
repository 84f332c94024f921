"""Backend registry, import-time choice, and ``set_backend`` / ``get_backend`` /
``use_backend``.

One registry holds the backends as frozen records (name, module, probe).  A probe is
cheap: it never imports Numba or compiles anything, so ``import xentfast`` stays fast;
the backend module itself is imported on first use.  Choice rules:

* A backend *named* by the caller (``backend=``, ``use_backend``, ``set_backend`` or
  the environment variable ``XENTFAST_BACKEND`` read at import) runs every call:
  NumPy inputs under ``"cuda"`` are copied to the GPU and back.
* With nothing named, NumPy inputs go to the best available *host* backend
  (``cython`` > ``cpu`` > ``numpy``: the fastest first, see ``_REGISTRY``) and device arrays (``__cuda_array_interface__``)
  go to ``cuda``.  ``get_backend()`` then reports the import-time choice, which is
  ``cuda`` when a GPU is usable.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes.util
import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def _probe_cuda() -> str | None:
    """Return None when the CUDA backend is usable, else the reason it is not."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install 'xentfast[cuda]')"
    if importlib.util.find_spec("numba_cuda") is None:
        return ("numba-cuda is not installed: the CUDA stack is an extra, "
                "pip install 'xentfast[cuda]' (Linux and Windows)")
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
    if not simulated and ctypes.util.find_library("cuda") is None:
        # Checked before importing numba.cuda so that a machine without a driver
        # pays nothing for the CUDA backend at import time.
        return "no CUDA driver (libcuda) was found on this machine"
    try:
        from numba import cuda
    except Exception as exc:  # pragma: no cover - depends on the installation
        return f"numba.cuda failed to import: {exc}"
    try:
        if not cuda.is_available():
            return "numba.cuda.is_available() is False: no usable CUDA GPU"
    except Exception as exc:  # pragma: no cover - depends on the driver
        return f"numba.cuda.is_available() failed: {exc}"
    return None if simulated else _numba_cuda_numpy_mismatch()


def _numba_cuda_numpy_mismatch() -> str | None:
    """numba-cuda registers its NumPy overloads at the first kernel compilation; with a
    NumPy newer than it supports that fails there (numba-cuda 0.30 under NumPy 2.5:
    ``np.row_stack`` is gone).  Importing that module here (only when a GPU is usable)
    turns a failure at the first call into an unavailability reason."""
    try:
        importlib.import_module("numba.cuda.np.arrayobj")
    except ModuleNotFoundError:  # another numba-cuda layout: nothing to check
        return None
    except Exception as exc:
        import numpy

        return (f"numba-cuda cannot compile kernels with NumPy {numpy.__version__} "
                f"({type(exc).__name__}: {exc}); install a NumPy that numba-cuda supports")
    return None


def _probe_module(module: str, requirement: str, hint: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        if importlib.util.find_spec(requirement) is None:
            return f"{requirement} is not importable; {hint}"
        return None

    probe.__name__ = f"probe_{module.rsplit('.', 1)[-1]}"
    return probe


def _probe_cython() -> str | None:
    if importlib.util.find_spec("xentfast.backends._cython") is None:
        return (
            "the compiled extension xentfast.backends._cython is missing: the build was "
            "skipped or failed (reinstall with a C compiler, OpenMP and Cython present, "
            "`XENTFAST_REQUIRE_CYTHON=1 pip install -v .` shows why)"
        )
    return None


@dataclass(frozen=True)
class Backend:
    """A registry record: the backend's name, where it lives, and its probe."""

    name: str
    module: str
    probe: Callable[[], str | None]
    host: bool


#: Best first.  Among the host backends ``cython`` comes before ``cpu``: in the table of
#: record (BENCHMARKS.md, 2026-12-03 evening) it is the fastest host backend, or within
#: 5% of it, at every cell -- float32 loss and loss+grad at 1M x 10, 65_536 x 1_000,
#: 4_096 x 32_000 and 256 x 128_000 (1.06-1.57x the ``cpu`` backend in that run, 0.97x
#: at worst in an earlier one), and 16-bit (1.01-2.2x) -- and its first
#: call in a fresh process takes milliseconds where Numba's import and cache load take
#: most of a second.  ``cpu`` is the choice where the extension was not built.
_REGISTRY: tuple[Backend, ...] = (
    Backend("cuda", "xentfast.backends.numba_cuda", _probe_cuda, host=False),
    Backend("cython", "xentfast.backends.cython_shim", _probe_cython, host=True),
    Backend(
        "cpu",
        "xentfast.backends.numba_cpu",
        _probe_module("numba_cpu", "numba", "pip install numba"),
        host=True,
    ),
    Backend("numpy", "xentfast.backends.numpy_ref", lambda: None, host=True),
)
_BY_NAME = {b.name: b for b in _REGISTRY}
KNOWN_BACKENDS: tuple[str, ...] = tuple(_BY_NAME)

_reasons: dict[str, str | None] = {}
_modules: dict[str, ModuleType] = {}


def unavailable_reason(name: str) -> str | None:
    """None if backend ``name`` is usable, else why not (probed once, then cached)."""
    record = _lookup(name)
    if name not in _reasons:
        _reasons[name] = record.probe()
    return _reasons[name]


def available_backends() -> list[str]:
    """The usable backends, best first (``cuda`` > ``cython`` > ``cpu`` > ``numpy``)."""
    return [b.name for b in _REGISTRY if unavailable_reason(b.name) is None]


def _lookup(name: str) -> Backend:
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(
            f"unknown backend {name!r}; expected one of {', '.join(map(repr, KNOWN_BACKENDS))}"
        )
    return _BY_NAME[name]


def _require(name: str) -> Backend:
    record = _lookup(name)
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {name!r} is unavailable: {reason}. "
            f"Available here: {', '.join(available_backends())}."
        )
    return record


def load(name: str) -> ModuleType:
    """The kernel module of an available backend, imported on first use."""
    if name not in _modules:
        record = _require(name)
        try:
            _modules[name] = importlib.import_module(record.module)
        except ImportError as exc:
            _reasons[name] = f"importing {record.module} failed: {exc}"
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {exc}") from exc
    return _modules[name]


def best_host_backend() -> str:
    return next(b.name for b in _REGISTRY if b.host and unavailable_reason(b.name) is None)


def _import_time_choice() -> tuple[str | None, str]:
    """(named backend or None, automatic choice), from XENTFAST_BACKEND and the probes."""
    requested = os.environ.get("XENTFAST_BACKEND", "").strip()
    if requested:
        _require(requested)  # a wrong name or an unusable backend fails loudly at import
        return requested, requested
    automatic = "cuda" if unavailable_reason("cuda") is None else best_host_backend()
    return None, automatic


_named_default, _automatic = _import_time_choice()
# The backend named for the current context: use_backend() sets it for a block, and
# set_backend() sets the process-wide default it falls back to.
_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "xentfast_backend", default=None
)


def get_backend() -> str:
    """The backend calls use now: the named one, else the import-time choice."""
    return _context_backend.get() or _named_default or _automatic


def named_backend() -> str | None:
    """The backend the caller named (context, then process default), or None."""
    return _context_backend.get() or _named_default


def set_backend(name: str) -> None:
    """Make ``name`` the process-wide backend for every later call.

    Raises ``ValueError`` for an unknown name and ``BackendUnavailableError`` (with the
    reason) for a backend that cannot run here.
    """
    global _named_default
    _require(name)
    _named_default = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the calls of a ``with`` block on backend ``name``; restores on exit.

    Context-local: other threads and asyncio tasks keep their own backend.
    """
    _require(name)
    token = _context_backend.set(name)
    try:
        yield name
    finally:
        _context_backend.reset(token)


def resolve(backend: str | None, on_device: bool) -> str:
    """The backend one call runs on: ``backend=``, else the named one, else automatic."""
    if on_device:
        # A device array is computed where it lives; a host backend cannot read it.
        if backend not in (None, "cuda"):
            raise ValueError(
                f"backend={backend!r} runs on the host, but the input is a CUDA device "
                "array; use backend='cuda' (or None), or copy the array to the host first "
                "(e.g. cupy.asnumpy(x) or tensor.cpu().numpy())"
            )
        _require("cuda")
        return "cuda"
    if backend is not None:
        _require(backend)
        return backend
    named = named_backend()
    if named is not None:
        return named
    return "cuda" if on_device else best_host_backend()
