"""The fused kernels allocate no (N, C) temporaries on the host backends.

Measured with tracemalloc, which sees NumPy's allocations (NumPy reports its data
buffers to it) made by the public layer -- conversions, outputs, scratch.  Memory a
compiled kernel allocates on its own (Numba's NRT, C malloc) is not traced, so this
checks the public layer plus any NumPy-level work of the backend.  The "numpy" backend
is the reference and is allowed its temporaries, so it is not tested here.  16-bit
logits a backend reads natively (float16, bfloat16) are held to the same bounds: a
loss+grad call allocates the 16-bit gradient and no float32 copy of the logits.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import xentfast as xf
from xentfast import _dispatch
from helpers import DTYPES, HOST_BACKENDS

FUSED = [b for b in HOST_BACKENDS if b != "numpy"]
N, C = 2048, 1024  # one (N, C) float32 buffer is 8 MiB: far above any O(N) bookkeeping


def _native_dtypes(backend):
    module = _dispatch.load(backend)
    return ([np.dtype(d).name for d in module.NATIVE_DTYPES]
            + list(getattr(module, "NATIVE_HALF", ())))


_DTYPES = {d.name: d for d in DTYPES}  # bfloat16 where ml_dtypes is installed


def _params():
    """float32 and float64 on every fused backend; the 16-bit dtypes a backend reads
    natively (its NATIVE_HALF: no float32 copy of the logits)."""
    for b in FUSED:
        for d in _native_dtypes(b):
            if d in _DTYPES:
                yield pytest.param(b, d, id=f"{b}-{d}")


def _peak(fn) -> int:
    fn()  # warm-up: compilation and caches are not the call's memory
    # A dropped gradient is kept for reuse (xentfast._buffers); measure the call as it
    # is when no such buffer is at hand: the worst case, fresh memory.
    xf.empty_cache()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


@pytest.fixture(params=["sparse", "dense"])
def problem(request):
    return request.param


def _inputs(dtype, kind):
    rng = np.random.default_rng(0)
    dtype = _DTYPES[dtype]
    x = rng.standard_normal((N, C)).astype(dtype)
    if kind == "sparse":
        return x, rng.integers(0, C, size=N)
    return x, rng.dirichlet(np.ones(C), size=N).astype(dtype)


@pytest.mark.skipif(not FUSED, reason="no fused host backend under test")
@pytest.mark.parametrize("backend_name,dtype", list(_params()))
def test_loss_only_allocates_no_n_by_c_buffer(backend_name, dtype, problem):
    assert dtype in _native_dtypes(backend_name)
    x, y = _inputs(dtype, problem)
    buffer = x.nbytes
    for reduction in ("mean", "none"):
        peak = _peak(lambda: xf.cross_entropy(x, y, reduction=reduction, label_smoothing=0.1,
                                              backend=backend_name))
        assert peak < buffer / 8, f"{reduction}: {peak} bytes traced, one (N, C) buffer is {buffer}"
    if dtype in ("float32", "float64"):  # the primitives widen 16-bit input (README)
        peak = _peak(lambda: xf.logsumexp(x, backend=backend_name))
        assert peak < buffer / 8, f"logsumexp: {peak} bytes traced"


@pytest.mark.skipif(not FUSED, reason="no fused host backend under test")
@pytest.mark.parametrize("backend_name,dtype", list(_params()))
def test_loss_and_grad_allocates_one_n_by_c_buffer(backend_name, dtype, problem):
    x, y = _inputs(dtype, problem)
    buffer = x.nbytes
    peak = _peak(lambda: xf.cross_entropy_with_grad(x, y, backend=backend_name))
    assert buffer <= peak < 1.25 * buffer, f"{peak} bytes traced, one (N, C) buffer is {buffer}"


@pytest.mark.skipif(not FUSED, reason="no fused host backend under test")
@pytest.mark.parametrize("backend_name,dtype", list(_params()))
def test_inplace_and_out_allocate_nothing_big(backend_name, dtype, problem):
    x, y = _inputs(dtype, problem)
    buffer = x.nbytes
    out = np.empty_like(x)
    peak = _peak(lambda: xf.cross_entropy_with_grad(x, y, out=out, backend=backend_name))
    assert peak < buffer / 8, f"out=: {peak} bytes traced, one (N, C) buffer is {buffer}"
    work = x.copy()

    def inplace():
        work[...] = x  # (no allocation) fresh logits each time
        xf.cross_entropy_with_grad(work, y, inplace=True, backend=backend_name)

    peak = _peak(inplace)
    assert peak < buffer / 8, f"inplace: {peak} bytes traced, one (N, C) buffer is {buffer}"
