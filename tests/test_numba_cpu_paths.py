"""The cpu backend's long-row paths: the 512-bit passes against the plain ones.

The public-API suites reach the wide passes through their long-row shapes; here the two
paths are run side by side on the same rows (the plain one is itself checked against
the float64 oracle everywhere), and the compile-time pieces that the speed rests on are
checked where they can silently go missing: the function attribute and the dispatch
thresholds.
"""

from __future__ import annotations

import numpy as np
import pytest

import naive
from helpers import BACKENDS, assert_close

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not under test")


@pytest.fixture(scope="module")
def nc():
    from xentfast.backends import numba_cpu

    return numba_cpu


def test_wide_pass_is_compiled_for_512_bit_vectors_on_its_own(nc):
    import numba

    # An uncached compile of the same function (cached code cannot be inspected).
    fresh = numba.njit(**dict(nc._JIT, cache=False))(nc._row_max_sumexp_wide.py_func)
    x = np.zeros((2, 128), np.float32)
    fresh(x[0], x[1], True, x[0], False)
    llvm = fresh.inspect_llvm(fresh.signatures[0])
    assert '"prefer-vector-width"="512"' in llvm
    assert "noinline" in llvm


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [64, 320, 383, 1000, 1024, 4099])
def test_wide_and_plain_passes_agree(nc, c, dtype, rng):
    """Same rows through both paths (serial body; the parallel driver calls the same
    body per chunk), with and without the prefetch: losses and lse within a few ulps
    of each other and of the float64 oracle."""
    n = 7
    x = (rng.standard_normal((n, c)) * 4).astype(dtype)
    x[2, c - 1] = -np.inf  # a mask in the tail window
    y = rng.integers(0, c, n)
    y[3] = -100
    w = np.empty(0, dtype)
    results = {}
    for wide, prefetch in ((False, False), (True, False), (True, True)):
        loss, lse = np.empty(n, dtype), np.empty(n, dtype)
        nc._sparse_loss_rows(0, n, x, y, w, np.int64(-100), dtype(0), loss, lse, wide, prefetch)
        results[wide, prefetch] = (loss, lse)
    exp_loss, _, exp_lse = naive.cross_entropy(x, y, reduction="none")
    rtol = 4 * np.finfo(dtype).eps
    for key, (loss, lse) in results.items():
        assert_close(lse, exp_lse, rtol=rtol, what=f"lse {key}")
        assert_close(loss, exp_loss, rtol=rtol, atol=rtol * np.abs(exp_lse), what=f"loss {key}")
    # prefetching is a hint: bitwise the same numbers
    np.testing.assert_array_equal(results[True, False][0], results[True, True][0])
    np.testing.assert_array_equal(results[True, False][1], results[True, True][1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [64, 320, 383, 1000, 1024, 4099])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
def test_wide_and_plain_gradient_passes_agree(nc, c, dtype, weighted, rng):
    """Loss and gradient rows through the wide passes A+B (storing e_j, the tail window
    storing the overlap twice) and C, against the plain passes and the oracle."""
    n = 7
    x = (rng.standard_normal((n, c)) * 4).astype(dtype)
    x[2, c - 1] = -np.inf
    x[4, c - 70:] = 8.0  # the row max in the window's overlap and tail
    y = rng.integers(0, c, n)
    y[3] = -100
    w = (rng.random(c) + 0.5).astype(dtype) if weighted else np.empty(0, dtype)
    z, gs = dtype(0.01), dtype(0.25)
    results = {}
    for wide, prefetch in ((False, False), (True, False), (True, True)):
        loss, lse, g = np.empty(n, dtype), np.empty(n, dtype), np.full((n, c), np.nan, dtype)
        nc._sparse_grad_rows(0, n, x, y, w, np.int64(-100), z, gs, loss, lse, g, False,
                             wide, prefetch)
        results[wide, prefetch] = (loss, lse, g)
    kwargs = {"weight": w.astype(np.float64) if weighted else None, "z_loss": float(z)}
    exp_loss, exp_grad, exp_lse = naive.cross_entropy(x, y, reduction="none", **kwargs)
    rtol = 8 * np.finfo(dtype).eps
    for key, (loss, lse, g) in results.items():
        assert_close(lse, exp_lse, rtol=rtol, what=f"lse {key}")
        assert_close(loss, exp_loss, rtol=rtol, atol=rtol * np.abs(exp_lse) * 2, what=f"loss {key}")
        assert_close(g, exp_grad * float(gs), rtol=rtol, atol=rtol * float(gs) * 2, what=f"grad {key}")
    for a, b in zip(results[True, False], results[True, True]):
        np.testing.assert_array_equal(a, b)  # prefetching is a hint
