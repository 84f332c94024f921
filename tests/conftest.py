"""Fixtures: a seeded ``rng`` per test, the ``backend`` under test, the adversarial
value cases; and a report header naming the backends and Numba's threading layer.

The grids themselves (per-backend shapes -- small under the CUDA simulator --, dtypes,
options, the adversarial-input generator with a reason per value and per memory
layout) live in helpers.py, because ``@pytest.mark.parametrize`` needs them when the
test modules are collected.

Environment:
  XENTFAST_TEST_BACKENDS=cpu,numpy  restrict the backends under test (must be available)
  XENTFAST_BACKEND=numpy            read by xentfast at import; also restricts the tests
  NUMBA_ENABLE_CUDASIM=1            (set before numba imports) test "cuda" on the
                                    simulator, with the small shapes of helpers.py
"""

from __future__ import annotations

import os
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before any TensorFlow import

import warnings

import numpy as np
import pytest

# Hypothesis imports libcst lazily when it reports a failure, and libcst triggers a
# DeprecationWarning from mypy_extensions; under filterwarnings=error that turns a
# failing example into an INTERNALERROR that hides it.  Import it now, warnings off.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import hypothesis.extra._patching  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installed extras
        pass

import xentfast
from xentfast import _dispatch

import helpers


def pytest_report_header(config):
    lines = [
        f"xentfast {xentfast.__version__}: available backends {xentfast.available_backends()} "
        f"(import-time choice {xentfast.get_backend()!r})",
        f"backends under test: {helpers.BACKENDS} (XENTFAST_TEST_BACKENDS="
        f"{os.environ.get('XENTFAST_TEST_BACKENDS', '')!r}, XENTFAST_BACKEND="
        f"{os.environ.get('XENTFAST_BACKEND', '')!r}, NUMBA_ENABLE_CUDASIM="
        f"{os.environ.get('NUMBA_ENABLE_CUDASIM', '')!r})",
    ]
    for name in _dispatch.KNOWN_BACKENDS:
        reason = _dispatch.unavailable_reason(name)
        if reason:
            lines.append(f"  {name}: unavailable: {reason}")
    lines.append(f"numba threading layer: {_threading_layer()}")
    return lines


def _threading_layer() -> str:
    try:
        import numba
    except ImportError:
        return "numba not installed"
    try:
        resolved = numba.threading_layer()
    except ValueError:  # no parallel function has run yet in this process
        resolved = "not chosen yet (resolved on the first parallel call)"
    return (f"{resolved}; requested NUMBA_THREADING_LAYER={numba.config.THREADING_LAYER!r}, "
            f"{numba.get_num_threads()} threads")


def pytest_terminal_summary(terminalreporter):
    if "numba" in __import__("sys").modules:
        terminalreporter.write_line(f"numba threading layer after the run: {_threading_layer()}")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "sim_sample(fraction): under the CUDA simulator (~1e4x slower) run only this "
        "fraction of the test's 'cuda' cases, chosen deterministically by test id; the "
        "others are deselected (reported as such, never as passed)",
    )


def _item_backend(item) -> str | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("backend", params.get("backend_name"))


def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("sim_sample")
        backend = _item_backend(item)
        if marker is not None and backend is not None and helpers.is_simulated_cuda(backend):
            if zlib.crc32(item.nodeid.encode()) % 1000 >= marker.args[0] * 1000:
                dropped.append(item)
                continue
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test id: every case is reproducible on its own,
    and different cases get different data."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=helpers.BACKENDS)
def backend(request) -> str:
    """Each backend under test, its kernel module imported (a broken backend errors
    here, loudly, instead of being skipped)."""
    _dispatch.load(request.param)
    return request.param


@pytest.fixture(params=helpers.HOST_BACKENDS)
def host_backend(request) -> str:
    _dispatch.load(request.param)
    return request.param


@pytest.fixture(params=helpers.VALUE_CASES)
def value_case(request) -> str:
    """The adversarial value cases (helpers.adversarial_values documents each)."""
    return request.param


@pytest.fixture
def restore_backend():
    """Put the process-wide backend back after a test that calls set_backend."""
    saved = _dispatch._named_default
    yield
    _dispatch._named_default = saved
