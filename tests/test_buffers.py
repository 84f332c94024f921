"""Reuse of dropped large output buffers (xentfast/_buffers.py).

What must hold: a dropped buffer comes back to the next request of its size; memory
that anything can still reach (the array, a view, a memoryview, a tensor sharing it)
is never handed out again; the cache stays within its byte limit; the finalizer never
deadlocks; and a reused, dirty buffer never shows through in a result (every kernel
writes every element it returns).
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import numpy as np
import pytest

import xentfast as xf
from xentfast import _buffers
from helpers import HOST_BACKENDS, assert_bitwise_equal

MIB = 1 << 20
SHAPE = (512, 1024)  # float32: 2 MiB, above MIN_BYTES
NBYTES = SHAPE[0] * SHAPE[1] * 4


@pytest.fixture
def cache():
    return _buffers.BufferCache(limit=64 * MIB)


def test_a_dropped_buffer_is_handed_out_again(cache):
    a = cache.empty(SHAPE, np.float32)
    address = a.ctypes.data
    assert cache.cached_bytes() == 0
    del a
    assert cache.cached_bytes() == NBYTES
    # Same size, other shape and dtype: the same memory, and it leaves the cache.
    b = cache.empty((NBYTES // 8,), np.float64)
    assert b.ctypes.data == address
    assert cache.cached_bytes() == 0
    assert b.shape == (NBYTES // 8,) and b.dtype == np.float64 and b.flags.c_contiguous
    assert b.flags.writeable and b.flags.aligned


def _views(a):
    """Ways a caller keeps the memory reachable after dropping the array itself."""
    return {
        "slice": lambda: a[3:],
        "reshape": lambda: a.reshape(-1),
        "transpose": lambda: a.T,
        "dtype view": lambda: a.view(np.int32),
        "memoryview": lambda: memoryview(a),
        "asarray of a view": lambda: np.asarray(a[:, 1:]),
        "container": lambda: [a],
    }


@pytest.mark.parametrize("how", list(_views(np.empty((2, 2)))))
def test_memory_still_reachable_is_never_handed_out(cache, how):
    a = cache.empty(SHAPE, np.float32)
    keep = _views(a)[how]()
    del a
    gc.collect()
    assert cache.cached_bytes() == 0, "the buffer went back while still reachable"
    b = cache.empty(SHAPE, np.float32)
    reachable = np.asarray(keep[0] if isinstance(keep, list) else keep)
    assert not np.shares_memory(b, reachable)
    del b, reachable, keep
    gc.collect()
    assert cache.cached_bytes() == 2 * NBYTES  # both came back once unreachable


def test_a_tensor_sharing_the_memory_keeps_it():
    torch = pytest.importorskip("torch", reason="PyTorch shares NumPy memory via from_numpy")
    cache = _buffers.BufferCache(limit=64 * MIB)
    a = cache.empty(SHAPE, np.float32)
    t = torch.from_numpy(a)
    del a
    gc.collect()
    assert cache.cached_bytes() == 0
    b = cache.empty(SHAPE, np.float32)
    assert not np.shares_memory(b, t.numpy())
    del t
    gc.collect()
    assert cache.cached_bytes() == NBYTES


def test_small_buffers_are_plain_numpy(cache):
    a = cache.empty((_buffers.MIN_BYTES // 4 - 1,), np.float32)
    assert a.base is None and a.flags.owndata
    del a
    assert cache.cached_bytes() == 0


def test_the_limit_evicts_the_oldest_size():
    cache = _buffers.BufferCache(limit=10 * MIB)
    first, second, third = (cache.empty((n * MIB,), np.uint8) for n in (4, 5, 3))
    del first, second
    assert cache.cached_bytes() == 9 * MIB
    del third  # 12 MiB > 10: the 4 MiB block (the oldest size) goes
    assert cache.cached_bytes() == 8 * MIB
    assert sorted(cache._free) == [3 * MIB, 5 * MIB]


def test_a_buffer_above_the_limit_is_never_kept():
    cache = _buffers.BufferCache(limit=2 * MIB)
    a = cache.empty((3 * MIB,), np.uint8)
    assert a.base is None  # not even leased
    del a
    assert cache.cached_bytes() == 0


def test_limit_zero_turns_reuse_off():
    cache = _buffers.BufferCache(limit=0)
    a = cache.empty(SHAPE, np.float32)
    assert a.flags.owndata
    del a
    assert cache.cached_bytes() == 0


def test_empty_cache_releases_what_is_kept():
    xf.empty_cache()
    a = _buffers.HOST_CACHE.empty(SHAPE, np.float32)
    del a
    assert _buffers.HOST_CACHE.cached_bytes() == NBYTES
    assert xf.empty_cache() == NBYTES
    assert _buffers.HOST_CACHE.cached_bytes() == 0
    assert xf.empty_cache() == 0


@pytest.mark.parametrize("text,expected", [("0", 0), ("512", 512 * MIB), (" 1.5 ", int(1.5 * MIB))])
def test_the_limit_comes_from_the_environment(monkeypatch, text, expected):
    monkeypatch.setenv("XENTFAST_BUFFER_CACHE_MB", text)
    assert _buffers.default_limit() == expected


def test_the_default_limit_is_bounded(monkeypatch):
    monkeypatch.delenv("XENTFAST_BUFFER_CACHE_MB", raising=False)
    assert 0 < _buffers.default_limit() <= 2 << 30


@pytest.mark.parametrize("text", ["lots", "-1", "1e3MB"])
def test_a_bad_limit_says_what_it_wants(monkeypatch, text):
    monkeypatch.setenv("XENTFAST_BUFFER_CACHE_MB", text)
    with pytest.raises(ValueError, match=r"XENTFAST_BUFFER_CACHE_MB must be .*MiB.*" + repr(text)):
        _buffers.default_limit()


def test_a_return_while_the_lock_is_held_is_settled_later(cache):
    """The finalizer may run inside a garbage collection while this thread holds the
    cache's lock: it must neither block nor lose the buffer."""
    a = cache.empty(SHAPE, np.float32)
    with cache._lock:
        del a  # finalizer runs here; a blocking acquire would deadlock
        assert len(cache._pending) == 1
    assert cache.cached_bytes() == NBYTES
    assert not cache._pending


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
# JAX, once imported by an earlier test in this process, warns at every fork; the child
# here touches neither JAX nor threads and leaves by os._exit.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_a_forked_child_starts_with_a_fresh_cache():
    """Forked while another thread holds the cache's lock, the child must not hang on
    it, and must not hand out blocks from free lists it cannot trust."""
    xf.empty_cache()
    a = _buffers.HOST_CACHE.empty(SHAPE, np.float32)
    del a  # one block cached in the parent
    assert _buffers.HOST_CACHE.cached_bytes() == NBYTES
    with _buffers.HOST_CACHE._lock:  # held at the fork, as by another thread
        pid = os.fork()
        if pid == 0:  # child: exit code says what went wrong
            code = 0
            try:
                if _buffers.HOST_CACHE.cached_bytes() != 0:
                    code = 2
                b = _buffers.HOST_CACHE.empty(SHAPE, np.float32)
                del b
                if _buffers.HOST_CACHE.cached_bytes() != NBYTES:
                    code = 3
            except BaseException:
                code = 4
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on the cache's lock")
        time.sleep(0.01)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert _buffers.HOST_CACHE.cached_bytes() == NBYTES  # the parent keeps its block


def test_threads_never_share_a_buffer():
    """Eight threads take, fill, check and drop buffers of three sizes; a buffer handed
    to two holders at once would show the other thread's stamp."""
    cache = _buffers.BufferCache(limit=24 * MIB)
    sizes = [MIB, MIB + 4096, 2 * MIB]
    errors = []

    def work(tid):
        held = []
        for i in range(300):
            a = cache.empty((sizes[(tid + i) % 3] // 8,), np.int64)
            stamp = tid * 1_000_000 + i
            a.fill(stamp)
            held.append((a, stamp))
            if len(held) > 3:
                b, s = held.pop(0)
                if not (b[0] == s and b[-1] == s and (b == s).all()):
                    errors.append((tid, i))
        for b, s in held:
            if not (b == s).all():
                errors.append((tid, "end"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.cached_bytes() <= cache.limit
    assert cache.cached_bytes() > 0  # something was kept, so reuse was exercised


# ------------------------------------------------------------- through the public API

CASES = {
    "sparse": dict(),
    "sparse ignore_index": dict(ignore=True),
    "sparse all ignored": dict(all_ignored=True),
    "sparse smoothing+z_loss+weight": dict(label_smoothing=0.1, z_loss=0.01, weight=True),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "axis 0": dict(axis=0),
    "dense": dict(dense=True),
    "float64": dict(dtype=np.float64),
    "float16": dict(dtype=np.float16),
}


def _call_args(case, rng):
    opts = dict(CASES[case])
    dtype = opts.pop("dtype", np.float32)
    axis = opts.pop("axis", -1)
    n, c = SHAPE
    x = rng.standard_normal((n, c) if axis == -1 else (c, n)).astype(dtype)
    kwargs = {"axis": axis}
    if opts.pop("dense", False):
        t = rng.random((n, c)) ** 2
        labels = (t / t.sum(axis=1, keepdims=True)).astype(dtype)
    else:
        labels = rng.integers(0, c, n)
        if opts.pop("ignore", False):
            labels[::3] = -100
        if opts.pop("all_ignored", False):
            labels[:] = -100
    if opts.pop("weight", False):
        kwargs["weight"] = rng.random(c) + 0.5
    kwargs.update(opts)
    return x, labels, kwargs


def _poison_cached_blocks():
    """Fill every kept block with 0xFF bytes (NaN in every float dtype)."""
    gc.collect()
    assert _buffers.HOST_CACHE.cached_bytes() > 0, "nothing was kept: the test would test nothing"
    for blocks in _buffers.HOST_CACHE._free.values():
        for block in blocks:
            block[...] = 0xFF


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
def test_a_dirty_reused_gradient_never_shows_through(backend_name, case, rng):
    """Poison a returned gradient, drop it, call again: the next gradient lands in the
    same memory and must equal, bitwise, the one written into a zeroed ``out=``."""
    x, labels, kwargs = _call_args(case, rng)
    xf.empty_cache()
    _, first = xf.cross_entropy_with_grad(x, labels, backend=backend_name, **kwargs)
    del first
    _poison_cached_blocks()
    loss, second = xf.cross_entropy_with_grad(x, labels, backend=backend_name, **kwargs)
    out = np.zeros(x.shape, x.dtype)
    loss_out, _ = xf.cross_entropy_with_grad(x, labels, backend=backend_name, out=out, **kwargs)
    assert_bitwise_equal(second, out, "gradient in a reused buffer vs a zeroed out=")
    assert_bitwise_equal(np.asarray(loss), np.asarray(loss_out), "loss")


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
def test_a_dirty_reused_primitive_output_never_shows_through(backend_name, op, rng):
    fn = getattr(xf, op)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    x[::5, ::7] = -np.inf  # masked entries must be written too (0 / -inf)
    xf.empty_cache()
    expected_twin = fn(x, backend=backend_name)
    expected = expected_twin.copy()
    del expected_twin
    _poison_cached_blocks()
    assert_bitwise_equal(fn(x, backend=backend_name), expected, op)
