"""Bitwise determinism: across repeated calls, across thread counts (Numba threads for
"cpu", OpenMP threads for "cython"), and under concurrent calls from Python threads."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import xentfast as xf
from helpers import BACKENDS, HOST_BACKENDS, assert_bitwise_equal, is_simulated_cuda

# Sizes chosen to reach the parallel code paths of the host kernels (>= 2**15 elements,
# small C, long rows split across threads); tiny under the CUDA simulator.
HOST_CASES = {
    "many_small_rows": (4096, 10),
    "medium": (512, 300),
    "few_long_rows": (2, 70_000),
}
SIM_CASES = {"small": (3, 70)}


def _cases(backend):
    return SIM_CASES if is_simulated_cuda(backend) else HOST_CASES


def _inputs(shape, dtype, kind, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    if kind == "sparse":
        y = rng.integers(0, shape[1], size=shape[0])
        y[::7] = -100
    else:
        y = rng.dirichlet(np.ones(shape[1]), size=shape[0]).astype(dtype)
    return x, y


def _all_outputs(x, y, backend, kind):
    """Every kernel once: loss+grad (mean, none), loss only, lse, primitives."""
    kw = dict(label_smoothing=0.1, z_loss=1e-3, backend=backend)
    if kind == "sparse":
        kw["weight"] = np.linspace(0.5, 1.5, x.shape[1])
    mean, grad = xf.cross_entropy_with_grad(x, y, **kw)
    none, grad_none, lse = xf.cross_entropy_with_grad(x, y, reduction="none", return_lse=True, **kw)
    loss_only = xf.cross_entropy(x, y, **kw)
    return {
        "mean": mean, "grad": grad, "none": none, "grad_none": grad_none, "lse": lse,
        "loss_only": loss_only,
        "softmax": xf.softmax(x, backend=backend),
        "log_softmax": xf.log_softmax(x, backend=backend),
        "logsumexp": xf.logsumexp(x, backend=backend),
    }


def _params():
    for b in BACKENDS:
        for case, shape in _cases(b).items():
            for dtype in ("float32",) if is_simulated_cuda(b) else ("float32", "float64"):
                for kind in ("sparse", "dense"):
                    yield pytest.param(b, shape, dtype, kind, id=f"{b}-{case}-{dtype}-{kind}")


@pytest.mark.parametrize("backend_name,shape,dtype,kind", list(_params()))
def test_repeated_calls_are_bitwise_identical(backend_name, shape, dtype, kind):
    x, y = _inputs(shape, dtype, kind)
    first = _all_outputs(x, y, backend_name, kind)
    for _ in range(1 if is_simulated_cuda(backend_name) else 2):
        again = _all_outputs(x, y, backend_name, kind)
        for name in first:
            assert_bitwise_equal(again[name], first[name], name)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu (Numba) backend is not under test")
@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("case", list(HOST_CASES))
def test_numba_thread_count_does_not_change_results(case, kind):
    import numba

    x, y = _inputs(HOST_CASES[case], np.float32, kind)
    default = numba.get_num_threads()
    reference = _all_outputs(x, y, "cpu", kind)
    try:
        numba.set_num_threads(1)
        single = _all_outputs(x, y, "cpu", kind)
    finally:
        numba.set_num_threads(default)
    for name in reference:
        assert_bitwise_equal(single[name], reference[name], f"{name}: 1 thread vs {default}")


_SCRIPT = """
import hashlib, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_determinism import _inputs, _all_outputs
h = hashlib.sha256()
for shape in {shapes!r}:
    for dtype in ("float32", "float64"):
        for kind in ("sparse", "dense"):
            x, y = _inputs(shape, dtype, kind)
            for name, value in sorted(_all_outputs(x, y, {backend!r}, kind).items()):
                h.update(np.ascontiguousarray(value).tobytes())
print(h.hexdigest())
"""

THREAD_ENV = {"cpu": "NUMBA_NUM_THREADS", "cython": "OMP_NUM_THREADS"}


@pytest.mark.parametrize("backend_name", [b for b in HOST_BACKENDS if b in THREAD_ENV])
def test_thread_count_in_fresh_processes(backend_name):
    """1 thread vs 2 threads, each in its own process (thread pools sized at start)."""
    script = _SCRIPT.format(tests=os.path.dirname(__file__), shapes=list(HOST_CASES.values()),
                            backend=backend_name)
    digests = {}
    for threads in ("1", "2"):
        env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV.values()}
        env[THREAD_ENV[backend_name]] = threads
        env["XENTFAST_BACKEND"] = backend_name
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=env, timeout=300,
                           cwd=os.path.dirname(os.path.dirname(xf.__file__)))
        assert r.returncode == 0, r.stderr[-3000:]
        digests[threads] = r.stdout.strip().splitlines()[-1]
    assert digests["1"] == digests["2"], f"{THREAD_ENV[backend_name]}=1 and =2 differ"


def test_concurrent_python_threads_match_serial_calls(backend):
    """Four workers at once (inplace, out=, loss-only, primitives mixed) give the bits
    of the same calls made one after another."""
    sim = is_simulated_cuda(backend)
    shape = (2, 40) if sim else (2048, 100)
    jobs = []
    for i in range(4 if sim else 12):
        dtype = np.float32 if i % 2 else np.float64
        kind = "sparse" if i % 3 else "dense"
        jobs.append((i, dtype, kind))

    def run(job):
        i, dtype, kind = job
        x, y = _inputs(shape, dtype, kind, seed=i)
        if i % 4 == 0:
            work = x.copy()
            loss, grad = xf.cross_entropy_with_grad(work, y, inplace=True, backend=backend)
        elif i % 4 == 1:
            out = np.empty_like(x)
            loss, grad = xf.cross_entropy_with_grad(x, y, out=out, backend=backend)
        elif i % 4 == 2:
            loss, grad = xf.cross_entropy(x, y, reduction="none", backend=backend), xf.softmax(x, backend=backend)
        else:
            loss, grad = xf.logsumexp(x, backend=backend), xf.log_softmax(x, backend=backend)
        return hashlib.sha256(np.ascontiguousarray(loss).tobytes()
                              + np.ascontiguousarray(grad).tobytes()).hexdigest()

    serial = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(1 if sim else 2):
            concurrent = list(pool.map(run, jobs))
            assert concurrent == serial
