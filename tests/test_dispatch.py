"""Backend registry and selection: available_backends, get/set/use_backend, the
XENTFAST_BACKEND environment variable, and backend= per call."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import xentfast as xf
from xentfast import _dispatch
from xentfast.backends import numpy_ref

X = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
Y = np.array([0, 3, 1])
PRIORITY = ["cuda", "cython", "cpu", "numpy"]


def test_available_backends_in_priority_order():
    available = xf.available_backends()
    assert available, "numpy is always available"
    assert available[-1] == "numpy"
    assert available == [b for b in PRIORITY if b in available]
    assert set(available) <= set(_dispatch.KNOWN_BACKENDS)
    assert tuple(_dispatch.KNOWN_BACKENDS) == tuple(PRIORITY)


def test_get_backend_is_available():
    assert xf.get_backend() in xf.available_backends()


def test_set_backend(restore_backend):
    for name in xf.available_backends():
        xf.set_backend(name)
        assert xf.get_backend() == name


def test_use_backend_restores_on_exit(restore_backend):
    xf.set_backend("numpy")
    for name in xf.available_backends():
        with xf.use_backend(name) as got:
            assert got == name
            assert xf.get_backend() == name
            with xf.use_backend("numpy"):
                assert xf.get_backend() == "numpy"
            assert xf.get_backend() == name
        assert xf.get_backend() == "numpy"


def test_use_backend_restores_after_an_exception(restore_backend):
    before = xf.get_backend()
    with pytest.raises(KeyError):
        with xf.use_backend("numpy"):
            raise KeyError("boom")
    assert xf.get_backend() == before


def test_use_backend_is_context_local():
    """A use_backend block in one thread does not change what another thread uses."""
    before = xf.get_backend()
    inside = threading.Event()
    release = threading.Event()
    seen = {}

    def worker():
        with xf.use_backend("numpy"):
            seen["worker"] = xf.get_backend()
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main_during"] = xf.get_backend()
    release.set()
    t.join(10)
    assert seen["worker"] == "numpy"
    assert seen["main_during"] == before
    with xf.use_backend("numpy"), ThreadPoolExecutor(2) as pool:
        # a fresh thread starts from the process-wide setting, not this block's
        assert pool.submit(xf.get_backend).result() == before
        assert xf.get_backend() == "numpy"


def _spy(monkeypatch):
    """Count calls of the numpy backend's sparse kernel."""
    calls = []
    real = numpy_ref.sparse

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(numpy_ref, "sparse", spy)
    return calls


def test_backend_argument_picks_the_kernels(monkeypatch):
    calls = _spy(monkeypatch)
    xf.cross_entropy(X, Y, backend="numpy")
    assert len(calls) == 1
    others = [b for b in xf.available_backends() if b != "numpy"]
    for name in others:
        xf.cross_entropy(X, Y, backend=name)
    assert len(calls) == 1, "another backend= ran the numpy kernels"


def test_backend_argument_beats_use_backend(monkeypatch):
    calls = _spy(monkeypatch)
    others = [b for b in xf.available_backends() if b != "numpy"]
    for name in others:
        with xf.use_backend(name):
            xf.cross_entropy(X, Y, backend="numpy")
            xf.cross_entropy(X, Y)
    with xf.use_backend("numpy"):
        xf.cross_entropy(X, Y)
    assert len(calls) == len(others) + 1


def test_all_backends_agree_on_a_simple_case():
    results = {b: xf.cross_entropy_with_grad(X, Y, backend=b) for b in xf.available_backends()}
    ref_loss, ref_grad = results["numpy"]
    for name, (loss, grad) in results.items():
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15, err_msg=name)


def _run(code: str, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "XENTFAST_BACKEND"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120, cwd=os.path.dirname(os.path.dirname(xf.__file__)))


def test_env_var_names_the_backend():
    code = ("import xentfast, numpy as np; print(xentfast.get_backend()); "
            "print(xentfast.cross_entropy(np.zeros((2, 3)), np.array([0, 1])))")
    r = _run(code, XENTFAST_BACKEND="numpy")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "numpy"
    assert float(lines[1]) == pytest.approx(np.log(3))


def test_env_var_unset_chooses_automatically():
    r = _run("import xentfast; print(xentfast.get_backend()); print(xentfast.available_backends())")
    assert r.returncode == 0, r.stderr
    chosen = r.stdout.split("\n")[0]
    assert chosen in xf.available_backends()


def test_env_var_with_a_bad_name_fails_loudly_at_import():
    r = _run("import xentfast", XENTFAST_BACKEND="tpu")
    assert r.returncode != 0
    assert "ValueError" in r.stderr
    assert "unknown backend 'tpu'; expected one of 'cuda', 'cython', 'cpu', 'numpy'" in r.stderr


def test_env_var_with_an_unavailable_backend_fails_loudly():
    unavailable = [b for b in _dispatch.KNOWN_BACKENDS if b not in xf.available_backends()]
    if not unavailable:
        pytest.skip("every backend is available here")
    r = _run("import xentfast", XENTFAST_BACKEND=unavailable[0])
    assert r.returncode != 0
    assert "BackendUnavailableError" in r.stderr and f"backend '{unavailable[0]}' is unavailable" in r.stderr


class _GradTrackingTensor:
    """Stands in for a PyTorch CUDA tensor with ``requires_grad=True``: reading its
    ``__cuda_array_interface__`` raises RuntimeError (not AttributeError), and
    ``detach()`` gives a view that exports it."""

    requires_grad = True

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    def detach(self):
        return _Exporting()


class _Exporting:
    __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_grad_tracking_tensor_is_recognised_as_a_device_array():
    from xentfast._arrays import is_device_array, without_autograd

    t = _GradTrackingTensor()
    assert is_device_array(t)  # routed to the cuda backend, not np.asarray'd
    assert isinstance(without_autograd(t), _Exporting)
    plain = _Exporting()
    assert without_autograd(plain) is plain
    assert not is_device_array(np.zeros(2))


def test_numba_cuda_numpy_mismatch_becomes_a_reason(monkeypatch):
    """A numba-cuda that breaks under the installed NumPy (numba-cuda 0.30 with NumPy
    2.5 raised AttributeError: np.row_stack) is reported, not picked."""
    import importlib

    from xentfast import _dispatch

    def broken(name, *args, **kwargs):
        raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(importlib, "import_module", broken)
    reason = _dispatch._numba_cuda_numpy_mismatch()
    assert reason is not None and "row_stack" in reason and "NumPy" in reason

    def missing(name, *args, **kwargs):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib, "import_module", missing)
    assert _dispatch._numba_cuda_numpy_mismatch() is None
