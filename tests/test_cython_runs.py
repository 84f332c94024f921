"""The cython backend's long-row runs: a row's max (pass 1) is taken by the previous
row's pass 2 when rows are at least _FUSE_MIN_BYTES long (_cython_kernels.pxi.in,
_run_*).  The max is exact in any order, so every row of a batch must come out bitwise
as it does alone (a one-row call has no previous row: its own pass 1), whatever its
neighbours hold -- NaN, infinities, signed zeros, ties, bad and ignored labels -- and at
any thread count (a run ends where a thread's rows end)."""

from __future__ import annotations

import numpy as np
import pytest

import xentfast as xf
from helpers import assert_bitwise_equal

pytestmark = pytest.mark.skipif("cython" not in xf.available_backends(),
                                reason="the cython extension is not built")

# Rows at and above the fusing threshold (16 KiB: 4096 float32 / 2048 float64 classes),
# a length that is not a multiple of the vector width, and one just below it.
CASES = [(np.float32, 4096), (np.float32, 4103), (np.float32, 4000),
         (np.float64, 2048), (np.float64, 2053)]


def _rows(dtype, c, seed=0):
    """Ten rows whose maxima are hard to get right, each next to the others."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((10, c)) * 5).astype(dtype)
    x[1, c - 1] = 40                              # the max in the last element (tail)
    x[2, :] = 0.0
    x[2, ::2] = -0.0                              # signed-zero ties at the max
    x[3, 5] = np.nan                              # NaN row
    x[4, :] = -np.inf                             # an all -inf row
    x[5, 17] = np.inf                             # +inf row
    x[6, :] = x[6, :] + 1e30                      # large offset, ties by rounding
    x[7, c // 2] = np.finfo(dtype).max
    x[8, :] = -x[8, :] - 1e4                      # every logit far below 0
    y = rng.integers(0, c, 10)
    y[3] = 5
    y[6] = -100                                   # ignored
    return x, y


def _alone_and_batched(fn, x, *args):
    whole = fn(x, *args)
    alone = [fn(x[r:r + 1], *(a[r:r + 1] for a in args)) for r in range(len(x))]
    return whole, alone


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,c", CASES)
def test_every_row_as_alone(dtype, c, threads):
    from xentfast.backends import _cython
    fused = c * np.dtype(dtype).itemsize >= _cython.FUSE_MIN_BYTES
    assert fused == (c * np.dtype(dtype).itemsize >= 16384)   # the cases straddle it
    previous = _cython.max_threads()
    _cython.set_max_threads(threads)
    try:
        x, y = _rows(dtype, c)
        x = np.tile(x, (8, 1))                    # 80 rows: several per thread, parallel
        y = np.tile(y, 8)

        def sparse_loss(xx, yy):
            return xf.cross_entropy(xx, yy, reduction="none", backend="cython")

        def sparse_grad(xx, yy):
            return xf.cross_entropy_with_grad(xx, yy, reduction="none", return_lse=True,
                                              backend="cython")

        def smoothed_grad(xx, yy):
            return xf.cross_entropy_with_grad(xx, yy, reduction="none", label_smoothing=0.1,
                                              backend="cython")

        def dense_grad(xx, tt):
            return xf.cross_entropy_with_grad(xx, tt, reduction="none", backend="cython")

        def lse(xx):
            return xf.logsumexp(xx, backend="cython")

        def log_softmax(xx):
            return xf.log_softmax(xx, backend="cython")

        probs = np.random.default_rng(1).dirichlet(np.ones(c), size=len(x)).astype(dtype)
        checks = [(sparse_loss, (x, y)), (sparse_grad, (x, y)), (smoothed_grad, (x, np.where(y < 0, 0, y))),
                  (dense_grad, (x, probs)), (lse, (x,)), (log_softmax, (x,))]
        for fn, args in checks:
            whole, alone = _alone_and_batched(fn, *args)
            if not isinstance(whole, tuple):
                whole, alone = (whole,), [(a,) for a in alone]
            for k, part in enumerate(whole):
                joined = np.concatenate([np.atleast_1d(a[k]) for a in alone])
                assert_bitwise_equal(np.atleast_1d(part).reshape(joined.shape), joined)
    finally:
        _cython.set_max_threads(previous)


@pytest.mark.parametrize("dtype,c", [(np.float32, 4096), (np.float64, 2053)])
def test_bad_label_inside_a_run(dtype, c):
    """A row whose label is out of range skips its passes (loss and lse NaN, gradient
    0): the row after it must take its own max.  The kernel itself, since the public
    functions refuse such labels before it runs."""
    from xentfast.backends import _cython
    x, y = _rows(dtype, c)
    x = np.tile(x, (8, 1))
    y = np.tile(y, 8)
    y[8::10] = c + 3
    y[9::10] = -7

    def kernel(xx, yy):
        n = len(xx)
        loss, lse = np.empty(n, dtype), np.empty(n, dtype)
        grad = np.empty_like(xx)
        bad = _cython.sparse(xx, yy, np.empty(0, dtype), -100, 0.0, 0.0, 1.0, loss, lse,
                             grad)
        return bad, loss, lse, grad

    bad, loss, lse, grad = kernel(x, y)
    assert bad == 16
    alone = [kernel(x[r:r + 1], y[r:r + 1]) for r in range(len(x))]
    assert sum(a[0] for a in alone) == 16
    for k, part in enumerate((loss, lse, grad), start=1):
        assert_bitwise_equal(part, np.concatenate([a[k] for a in alone]))
    assert np.isnan(loss[8::10]).all() and not grad[8::10].any()


@pytest.mark.parametrize("dtype,n,c", [(np.float32, 520, 16400), (np.float64, 1040, 4100)])
def test_streamed_gradient_as_alone(dtype, n, c):
    """Gradients beyond the caches in mid-length rows are written by streaming stores
    from a per-run buffer (_cython._stream_buffer): the same values, bitwise, as a row
    alone gives (too small to stream), the true-class entry included; the buffer's
    rows and the neighbours' do not leak into each other."""
    from xentfast.backends import _cython
    size = np.dtype(dtype).itemsize
    if _cython._stream_buffer(n, c, size, False, False, dtype) is None:
        pytest.skip("this CPU has no streaming stores (x86-64 AVX) or this build none")
    assert _cython._stream_buffer(1, c, size, False, False, dtype) is None
    # in place, or with label smoothing (pass 3 then scales and subtracts in g itself),
    # no buffer is made
    assert _cython._stream_buffer(n, c, size, True, False, dtype) is None
    assert _cython._stream_buffer(n, c, size, False, True, dtype) is None
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((n, c)) * 6).astype(dtype)
    y = rng.integers(0, c, n)
    x[7, y[7]] = 80                                  # a confident row: g_y = -(tiny)
    y[11] = -100                                     # ignored: a zero row
    loss, grad = xf.cross_entropy_with_grad(x, y, reduction="sum", backend="cython")
    for r in (0, 1, 7, 11, n // 2, n - 2, n - 1):
        _, g_r = xf.cross_entropy_with_grad(x[r:r + 1], y[r:r + 1], reduction="sum",
                                            backend="cython")
        assert_bitwise_equal(grad[r:r + 1], g_r, f"row {r}")
    assert not grad[11].any()
    assert grad[7, y[7]] < 0
    ref_loss, ref_grad = xf.cross_entropy_with_grad(x, y, reduction="sum", backend="numpy")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-30)


def test_exp_floor_sums_the_exps_of_its_block_on_every_core():
    """The benchmarks' exp-par yardstick (_cython.exp_floor): `elements` exps of the
    block d_i = -10 (i + 1) / 4096, split over the threads in whole runs of that block --
    the sum is the float64 sum of those exps, whatever the thread count."""
    from xentfast.backends import _cython
    block = np.exp((-10.0 * np.arange(1, 4097) / 4096).astype(np.float32).astype(np.float64))
    previous = _cython.max_threads()
    try:
        for threads in (1, 2):
            _cython.set_max_threads(threads)
            for elements in (1, 4095, 4096, 10_000, 1_000_003):
                total = _cython.exp_floor(elements)
                # below the parallel threshold one thread does it all
                team = threads if elements >= _cython.PAR_MIN_ELEMS else 1
                runs = [(b + 1) * elements // team - b * elements // team
                        for b in range(team)]
                want = sum(block.sum() * (k // 4096) + block[:k % 4096].sum() for k in runs)
                assert total == pytest.approx(want, rel=1e-6), (elements, threads)
    finally:
        _cython.set_max_threads(previous)
    assert _cython.exp_floor(0) == 0.0
