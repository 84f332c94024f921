"""The ``cuda`` backend's device-array layer and launch paths.

Runs where the ``cuda`` backend is available: on a GPU, or under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1`` set before Numba is imported; small shapes there).

* Numba device arrays in -> Numba device arrays out, NumPy in -> NumPy out under
  ``backend="cuda"``, every launch path (warp / block / stream, reached with tiny
  shapes by lowering the on-chip limits), in-place and ``out=``, label errors, and
  bitwise-reproducible reductions: simulator and GPU.
* CuPy in -> CuPy out, PyTorch CUDA tensors in (no host copy), foreign streams: real
  GPU with CuPy / PyTorch only (skipped with the reason otherwise).

The full option x dtype x shape grid against the float64 oracle is in
test_cross_entropy.py / test_primitives.py (parametrised over every backend); the
checks here compare the cuda backend with the NumPy reference backend.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import xentfast as xf
from xentfast import _dispatch

pytestmark = pytest.mark.skipif(
    "cuda" not in xf.available_backends(),
    reason=f"cuda backend unavailable: {_dispatch.unavailable_reason('cuda')}",
)

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
gpu_only = pytest.mark.skipif(SIMULATED, reason="needs a real GPU (not the CUDA simulator)")


@pytest.fixture(scope="module")
def cuda():
    from numba import cuda

    return cuda


@pytest.fixture(scope="module")
def backend_module():
    return _dispatch.load("cuda")


def _host(v):
    """Device (Numba/CuPy) or host result -> NumPy."""
    if hasattr(v, "copy_to_host"):
        return v.copy_to_host()
    if type(v).__module__.split(".")[0] == "cupy":
        return v.get()
    return np.asarray(v)


def _close(got, want, dtype=np.float32):
    tol = {np.dtype(np.float16): 3e-3, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}
    t = tol[np.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(_host(got), np.float64), np.asarray(want, np.float64),
                               rtol=t, atol=t, equal_nan=True)


def _is_numba_device(v) -> bool:
    return bool(getattr(type(v), "__cuda_ndarray__", False))


# ----------------------------------------------------------------------- Numba / NumPy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_numba_in_numba_out(cuda, rng, reduction):
    x = rng.standard_normal((3, 2, 9)).astype(np.float32)
    y = rng.integers(0, 2, (3, 9))
    y[0, 0] = -100
    w = np.array([0.5, 2.0], np.float32)
    want = xf.cross_entropy_with_grad(x, y, axis=1, weight=w, reduction=reduction,
                                      label_smoothing=0.1, backend="numpy")
    got = xf.cross_entropy_with_grad(cuda.to_device(x), cuda.to_device(y), axis=1,
                                     weight=cuda.to_device(w), reduction=reduction,
                                     label_smoothing=0.1)
    assert _is_numba_device(got[0]) and _is_numba_device(got[1])
    assert tuple(got[1].shape) == x.shape and got[1].dtype == x.dtype
    assert tuple(got[0].shape) == np.shape(want[0])
    _close(got[0], want[0])
    _close(got[1], want[1])


def test_numpy_in_numpy_out_under_cuda(rng):
    x = rng.standard_normal((4, 6)).astype(np.float64)
    t = rng.random((4, 6))
    t /= t.sum(axis=1, keepdims=True)
    want = xf.cross_entropy_with_grad(x, t, z_loss=1e-3, return_lse=True, backend="numpy")
    got = xf.cross_entropy_with_grad(x, t, z_loss=1e-3, return_lse=True, backend="cuda")
    assert isinstance(got[0], np.generic) and isinstance(got[1], np.ndarray)
    assert isinstance(got[2], np.ndarray)
    for g, w in zip(got, want):
        _close(g, w, np.float64)


def test_float16_device_roundtrip(cuda, rng):
    x = rng.standard_normal((3, 40)).astype(np.float16)
    y = rng.integers(0, 40, 3)
    want = xf.cross_entropy_with_grad(x, y, reduction="none", backend="numpy")
    got = xf.cross_entropy_with_grad(cuda.to_device(x), cuda.to_device(y), reduction="none")
    assert got[0].dtype == np.float16 and got[1].dtype == np.float16
    _close(got[0], want[0], np.float16)
    _close(got[1], want[1], np.float16)


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp"])
@pytest.mark.parametrize("axis", [-1, 0, None])
def test_primitives_device(cuda, rng, op, axis):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    x[1, 2] = -np.inf
    want = getattr(xf, op)(x, axis=axis, backend="numpy")
    got = getattr(xf, op)(cuda.to_device(x), axis=axis)
    assert _is_numba_device(got)
    assert tuple(got.shape) == np.shape(want)
    _close(got, want)


# Lowered limits so that tiny rows reach every path (simulator-friendly block sizes):
# path id -> (tuning changes, C for index labels, C for probability labels, the path).
# A lane caches 1 value per float32 logit, 2 with probability labels (w_c t'_c too).
PATHS = {
    "warp_small_team": (dict(force_path="warp", warp_threads=32), 7, 7, "warp"),
    "warp_full_team": (dict(force_path="warp", warp_threads=64, max_cached_words=8), 100, 100,
                       "warp"),
    "block": (dict(force_path="block", block_threads=64, max_cached_words=8), 150, 150, "block"),
    "block_at_limit": (dict(force_path="block", block_threads=64, max_cached_words=4), 256, 128,
                       "block"),
    "stream": (dict(force_path="stream", stream_threads=64, stream_unroll=2), 300, 300, "stream"),
    "stream_one_chunk": (dict(force_path="stream", stream_threads=32, stream_unroll=1), 32, 32,
                         "stream"),
    "auto_above_limit": (dict(max_cached_words=2, block_threads=64), 129, 65, "stream"),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("labels", ["sparse", "dense"])
def test_every_path(cuda, rng, backend_module, path, labels):
    changes, c_sparse, c_dense, expected = PATHS[path]
    c = c_sparse if labels == "sparse" else c_dense
    x = rng.standard_normal((3, c)).astype(np.float32) * 4
    x[0, c // 2] = -np.inf
    if labels == "sparse":
        y = rng.integers(0, c, 3)
        y[2] = -100
        kw = dict(weight=rng.random(c).astype(np.float32), label_smoothing=0.1, z_loss=0.01)
    else:
        y = rng.random((3, c)).astype(np.float32)
        y[0, c // 2] = 0.0
        y /= y.sum(axis=1, keepdims=True)
        kw = dict(label_smoothing=0.05)
    want = xf.cross_entropy_with_grad(x, y, reduction="sum", backend="numpy", **kw)
    with backend_module.tuning(**changes):
        assert backend_module.plan(c, np.float32, labels == "dense").path == expected
        got = xf.cross_entropy_with_grad(cuda.to_device(x), cuda.to_device(y), reduction="sum", **kw)
        lse = xf.logsumexp(cuda.to_device(x))
    _close(got[0], want[0])
    _close(got[1], want[1])
    _close(lse, xf.logsumexp(x, backend="numpy"))


@pytest.mark.parametrize("c, itemsize, path, threads", [
    (256, 4, "warp", 256), (1000, 4, "warp", 256), (2048, 4, "block", 256),
    (4096, 4, "block", 512), (8192, 4, "stream", 256), (8192, 2, "stream", 256),
    (16000, 4, "stream", 512), (16000, 2, "stream", 256), (32000, 4, "stream", 1024),
    (32000, 2, "stream", 512), (128000, 4, "stream", 1024), (128000, 8, "stream", 1024),
])
def test_gpu_plan_follows_the_h100_measurements(backend_module, c, itemsize, path, threads):
    """The default GPU tuning (not the simulator's): the block path up to 4096 classes,
    then the stream path with a block sized by the row's bytes (see ``Tuning``)."""
    acc = np.float64 if itemsize == 8 else np.float32
    p = backend_module.plan(c, acc, False, t=backend_module.Tuning(), itemsize=itemsize)
    assert (p.path, p.threads) == (path, threads)
    loss_only = backend_module.plan(c, acc, False, t=backend_module.Tuning(), itemsize=itemsize,
                                    with_grad=False)
    # loss-only keeps the block path up to its register limit (32 float32 words a thread)
    words = 2 if itemsize == 8 else 1
    assert loss_only.path == ("stream" if c > 1024 * (32 // words) else
                              "warp" if c <= 32 * (32 // words) else "block")


def test_forced_cached_path_too_small_raises(backend_module):
    with backend_module.tuning(force_path="block", block_threads=64, max_cached_words=1):
        with pytest.raises(ValueError, match="cannot hold rows"):
            backend_module.plan(65, np.float32, False)
    with pytest.raises(ValueError, match="power of two"):
        backend_module.set_tuning(stream_threads=48)


def test_inplace_and_out_on_device(cuda, rng):
    x = rng.standard_normal((4, 33)).astype(np.float32)
    y = rng.integers(0, 33, 4)
    want = xf.cross_entropy_with_grad(x, y, label_smoothing=0.2, backend="numpy")
    dx = cuda.to_device(x)
    loss, grad = xf.cross_entropy_with_grad(dx, cuda.to_device(y), label_smoothing=0.2, inplace=True)
    assert grad is dx
    _close(loss, want[0])
    _close(dx, want[1])
    # out= a non-contiguous device view (class axis first): filled through a copy kernel
    buf = cuda.device_array((33, 4), np.float32)
    xt = cuda.to_device(np.ascontiguousarray(x.T))
    loss, grad = xf.cross_entropy_with_grad(xt, cuda.to_device(y), axis=0, label_smoothing=0.2,
                                            out=buf)
    assert grad is buf
    _close(buf, want[1].T)


def test_numpy_inplace_under_cuda(rng):
    x = rng.standard_normal((3, 10)).astype(np.float32)
    y = rng.integers(0, 10, 3)
    want = xf.cross_entropy_with_grad(x, y, backend="numpy")
    mine = x.copy()
    _, grad = xf.cross_entropy_with_grad(mine, y, inplace=True, backend="cuda")
    assert grad is mine
    _close(mine, want[1])


def test_bad_label_raises_like_the_host(cuda, rng):
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    y = rng.integers(0, 5, (2, 3))
    y[1, 2] = 7
    with pytest.raises(ValueError) as host_err:
        xf.cross_entropy(x, y, backend="numpy")
    with pytest.raises(ValueError) as dev_err:
        xf.cross_entropy(cuda.to_device(x), cuda.to_device(y))
    assert str(dev_err.value) == str(host_err.value)
    assert "labels[1, 2]" in str(dev_err.value)
    # nothing was written: in-place logits are intact after the error
    dx = cuda.to_device(x)
    with pytest.raises(ValueError):
        xf.cross_entropy_with_grad(dx, cuda.to_device(y), inplace=True)
    np.testing.assert_array_equal(dx.copy_to_host(), x)


def test_unsigned_label_above_int64_raises(cuda, rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = np.array([1, 2**63 + 3, 0], np.uint64)
    with pytest.raises(ValueError, match=str(2**63 + 3)):
        xf.cross_entropy(cuda.to_device(x), cuda.to_device(y), ignore_index=-1)


def test_check_labels_false_gives_nan_rows(cuda, rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y = np.array([1, 6, -3, 0])
    loss, grad = xf.cross_entropy_with_grad(cuda.to_device(x), cuda.to_device(y),
                                            reduction="none", check_labels=False)
    loss, grad = _host(loss), _host(grad)
    assert np.isnan(loss[1:3]).all() and np.isfinite(loss[[0, 3]]).all()
    assert np.isnan(grad[1:3]).all() and np.isfinite(grad[[0, 3]]).all()
    want = xf.cross_entropy_with_grad(x[[0, 3]], y[[0, 3]], reduction="none", backend="numpy")
    _close(loss[[0, 3]], want[0])
    _close(grad[[0, 3]], want[1])


def test_mean_of_nothing_kept_is_zero(cuda, rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    loss, grad = xf.cross_entropy_with_grad(cuda.to_device(x), cuda.to_device(np.full(3, -100)))
    assert float(_host(loss)) == 0.0
    assert not _host(grad).any()


def test_reduction_is_bitwise_reproducible(cuda, rng):
    x = cuda.to_device((rng.standard_normal((37, 11)) * 10).astype(np.float32))
    y = cuda.to_device(rng.integers(0, 11, 37))
    w = cuda.to_device(rng.random(11).astype(np.float32))
    values = {float(_host(xf.cross_entropy(x, y, weight=w))) for _ in range(3)}
    assert len(values) == 1


def test_device_inputs_are_not_modified(cuda, rng):
    x = rng.standard_normal((3, 12)).astype(np.float32)
    y = rng.integers(0, 12, 3)
    dx, dy = cuda.to_device(x), cuda.to_device(y)
    xf.cross_entropy_with_grad(dx, dy, z_loss=0.1)
    np.testing.assert_array_equal(dx.copy_to_host(), x)
    np.testing.assert_array_equal(dy.copy_to_host(), y)


def test_integer_one_hot_device_labels(cuda, rng):
    """TensorFlow's softmax_cross_entropy_with_logits casts integer one-hot labels."""
    x = rng.standard_normal((4, 5)).astype(np.float32)
    t = np.eye(5, dtype=np.int32)[rng.integers(0, 5, 4)]
    want = xf.softmax_cross_entropy_with_logits(t, x, backend="numpy")
    got = xf.softmax_cross_entropy_with_logits(cuda.to_device(t), cuda.to_device(x))
    _close(got, want)


def test_routing_without_a_backend_name(cuda, rng):
    """Device arrays go to cuda by themselves; NumPy input stays on the host."""
    x = rng.standard_normal((2, 3)).astype(np.float32)
    y = np.array([0, 2])
    assert _is_numba_device(xf.cross_entropy(cuda.to_device(x), cuda.to_device(y), reduction="none"))
    assert isinstance(xf.cross_entropy(x, y, reduction="none"), np.ndarray)
    with pytest.raises(ValueError, match="host"):
        xf.cross_entropy(cuda.to_device(x), y, backend="numpy")


# ----------------------------------------------------------------------- CuPy / PyTorch


@gpu_only
def test_cupy_in_cupy_out(rng):
    cp = pytest.importorskip("cupy")
    x = rng.standard_normal((5, 2, 7)).astype(np.float32)
    y = rng.integers(0, 2, (5, 7))
    want = xf.cross_entropy_with_grad(x, y, axis=1, reduction="none", backend="numpy")
    got = xf.cross_entropy_with_grad(cp.asarray(x), cp.asarray(y), axis=1, reduction="none")
    assert isinstance(got[0], cp.ndarray) and isinstance(got[1], cp.ndarray)
    _close(got[0], want[0])
    _close(got[1], want[1])
    scalar = xf.cross_entropy(cp.asarray(x), cp.asarray(y), axis=1)
    assert isinstance(scalar, cp.ndarray) and scalar.shape == ()
    # in-place on a CuPy array writes the caller's memory
    cx = cp.asarray(x.reshape(10, 7))
    cy = cp.asarray(rng.integers(0, 7, 10))
    want = xf.cross_entropy_with_grad(x.reshape(10, 7), cy.get(), backend="numpy")
    _, g = xf.cross_entropy_with_grad(cx, cy, inplace=True)
    assert g is cx
    _close(cx, want[1])


@gpu_only
def test_cupy_nondefault_stream(rng):
    cp = pytest.importorskip("cupy")
    x = rng.standard_normal((64, 100)).astype(np.float32)
    y = rng.integers(0, 100, 64)
    want = xf.cross_entropy(x, y, backend="numpy")
    with cp.cuda.Stream(non_blocking=True):
        cx, cy = cp.asarray(x), cp.asarray(y)  # produced on the side stream
        got = xf.cross_entropy(cx, cy)
    cp.cuda.Device().synchronize()
    _close(got, want)


@gpu_only
def test_torch_cuda_tensors(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    import torch.nn.functional as F

    x = torch.randn(6, 50, device="cuda", requires_grad=True)
    y = torch.randint(0, 50, (6,), device="cuda")
    loss, grad = xf.cross_entropy_with_grad(x, y)  # requires_grad tensors are detached
    ref = F.cross_entropy(x, y)
    ref.backward()
    np.testing.assert_allclose(float(_host(loss)), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(_host(grad), x.grad.cpu().numpy(), rtol=1e-5, atol=1e-7)
    # zero-copy: wrap the result back into a tensor
    t = torch.as_tensor(grad, device="cuda")
    assert t.data_ptr() == grad.__cuda_array_interface__["data"][0]


@gpu_only
def test_outputs_come_from_the_callers_memory_pool(rng):
    """CuPy in: the gradient lives in CuPy's pool; PyTorch in: in PyTorch's caching
    allocator (no cudaMalloc/cudaFree per call).  On a side stream: Numba allocates."""
    x = rng.standard_normal((256, 1000)).astype(np.float32)
    y = rng.integers(0, 1000, 256)
    want = xf.cross_entropy_with_grad(x, y, backend="numpy")
    grad_bytes = x.nbytes
    try:
        import cupy as cp
    except ImportError:
        cp = None
    if cp is not None:
        pool = cp.get_default_memory_pool()
        cx, cy = cp.asarray(x), cp.asarray(y)
        before = pool.used_bytes()
        loss, grad = xf.cross_entropy_with_grad(cx, cy)
        assert pool.used_bytes() - before >= grad_bytes
        _close(loss, want[0])
        _close(grad, want[1])
        with cp.cuda.Stream(non_blocking=True):
            before = pool.used_bytes()
            loss, grad = xf.cross_entropy_with_grad(cx, cy)
            assert pool.used_bytes() - before < grad_bytes  # Numba's memory, not the pool
        cp.cuda.Device().synchronize()
        _close(grad, want[1])
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    tx, ty = torch.as_tensor(x, device="cuda"), torch.as_tensor(y, device="cuda")
    before = torch.cuda.memory_allocated()
    loss, grad = xf.cross_entropy_with_grad(tx, ty)
    assert torch.cuda.memory_allocated() - before >= grad_bytes
    _close(loss, want[0])
    _close(grad, want[1])
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        before = torch.cuda.memory_allocated()
        loss, grad = xf.cross_entropy_with_grad(tx, ty)
        assert torch.cuda.memory_allocated() - before < grad_bytes
    torch.cuda.synchronize()
    _close(grad, want[1])


# ----------------------------------------------------------------------- gpu_check


def _gpu_check():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "gpu_check.py")
    import sys

    name = "xentfast_gpu_check"
    if name not in sys.modules:  # (dataclasses need the module registered)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_gpu_check_table_and_arguments():
    gc = _gpu_check()
    args = gc.parse_args(["--shapes", "4x40,2x300", "--dtypes", "float32", "--reps", "2"])
    assert args.shape_list == [(4, 40), (2, 300)] and args.reps == 2
    assert gc.parse_args(["--sim-smoke"]).skip_tests
    rows = [gc.Row((4, 40), "float32", "loss+grad", "copy", 1.0),
            gc.Row((4, 40), "float32", "loss+grad", "torch eager", 4.0),
            gc.Row((4, 40), "float32", "loss+grad", "xentfast kernel", 2.0),
            gc.Row((4, 40), "float32", "loss", "liger", None, note="failed: x")]
    gc.fill_derived(rows)
    logits = 4 * 40 * 4  # the harness's traffic: logits + labels + gradient, copy 2x logits
    assert rows[2].yardstick_pct == pytest.approx(100 * (2 * logits + 4 * 8) / 2 / (2 * logits))
    assert rows[2].vs_torch == pytest.approx(2.0)
    table = gc.format_table(rows)
    assert "| 4x40 | float32 | loss+grad | xentfast kernel | 2.000 |" in table
    assert any(line.startswith("MISS xentfast kernel") for line in gc.verdicts(rows))
    assert any(line.startswith("PASS xentfast kernel") for line in gc.verdicts(rows))


def test_gpu_check_smoke_run(tmp_path):
    """The whole script (checks, timing, table, JSON) on one tiny shape."""
    gc = _gpu_check()
    out = tmp_path / "report.json"
    args = ["--skip-tests", "--shapes", "4x40", "--dtypes", "float32", "--json", str(out)]
    if SIMULATED:
        args += ["--sim-smoke"]
    assert gc.main(args) == 0
    import json

    report = json.loads(out.read_text())
    impls = {row["impl"] for row in report["rows"]}
    assert {"copy", "xentfast kernel", "xentfast api"} <= impls
    assert all(check["ok"] for check in report["checks"])
