"""Hostile use: forks and process pools, bad inputs that once slipped through, the disk
cache, and a crash or hang turned into a test failure.

Every case that could crash or hang the interpreter (forks, pools, a fresh compile)
runs in a subprocess with a timeout, so a segfault, an abort or a deadlock is a failed
test with the child's output, not a dead test run.  Inputs are hashed before and after
every call that must not modify them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import xentfast as xf
from helpers import BACKENDS

HOST_BACKENDS = [b for b in BACKENDS if b != "cuda"]
TIMEOUT = 240


def _run_python(code: str, env: dict | None = None, timeout: int = TIMEOUT) -> str:
    """Run code in a fresh interpreter; a non-zero exit, a signal or a timeout fails the
    test with the child's output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"child timed out after {timeout} s (a hang)\nstdout: {exc.stdout}\n"
                    f"stderr: {exc.stderr}")
    assert proc.returncode == 0, (f"child exited with {proc.returncode}\nstdout: "
                                  f"{proc.stdout}\nstderr: {proc.stderr}")
    return proc.stdout


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a)
        h.update(str((a.dtype, a.shape, a.strides)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------ fork safety

# The parent runs every host backend on inputs big enough for its thread team (any of
# them can leave GNU OpenMP unusable in a forked child); then the children call every
# backend again, on the parallel-sized, the split-path and a small input, and must
# reproduce the parent's bits.
_FORK_PRELUDE = f"""
import os, sys
import numpy as np
import xentfast as xf
BACKENDS = {HOST_BACKENDS!r}
rng = np.random.default_rng(0)
CASES = [
    (rng.standard_normal((2048, 600)).astype(np.float32), rng.integers(0, 600, 2048)),
    (rng.standard_normal((2, 40000)).astype(np.float32), np.array([5, 7])),
    (rng.standard_normal((3000, 10)).astype(np.float32), rng.integers(0, 10, 3000)),
]
def results():
    out = []
    for b in BACKENDS:
        for x, y in CASES:
            loss, grad = xf.cross_entropy_with_grad(x, y, backend=b, reduction="none")
            out.append((loss.tobytes(), grad.tobytes()))
        out.append(xf.softmax(CASES[0][0], backend=b).tobytes())
        # the class-chunked path: statistics and gradient kernels of two class chunks
        x, y = CASES[0]
        with xf.use_backend(b):
            stats = [xf.shard_stats(x[:, a:a + 300], y, class_offset=a, num_classes=600)
                     for a in (0, 300)]
            _, _, totals = xf.merge_shard_stats(stats, return_totals=True)
            out.append(xf.shard_grad(x[:, 300:], y, totals, class_offset=300,
                                     num_classes=600).tobytes())
    return out
EXPECTED = results()
def check():
    return results() == EXPECTED
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_os_fork_child_calls_every_backend():
    out = _run_python(_FORK_PRELUDE + """
pids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if check() else 3)
    pids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
print(codes)
assert codes == [0, 0], codes
""")
    assert "[0, 0]" in out


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
@pytest.mark.skipif("cython" not in xf.available_backends(), reason="needs the extension")
@pytest.mark.parametrize("module", ["cython_shim", "_cython"])
def test_fork_after_the_extension_ran_a_team(module):
    """A child forked after the extension ran an OpenMP team -- the benchmarks' exp-par
    yardstick, reached through the shim or with the private extension imported directly
    (the harness imports nothing else first) -- runs the kernels, and the yardstick."""
    out = _run_python(f"""
import os
import numpy as np
from xentfast.backends import {module} as ext
ext.exp_floor(10**6)                             # a parallel team in the parent
pid = os.fork()
if pid == 0:
    import xentfast as xf
    x = np.random.default_rng(0).standard_normal((2048, 600)).astype(np.float32)
    loss = xf.cross_entropy(x, np.zeros(2048, np.int64), backend="cython")
    os._exit(0 if np.isfinite(loss) and ext.exp_floor(10**6) > 0 else 3)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
""", timeout=120)
    assert out.strip() == "0", out


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_process_pool_executor(method):
    if method not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip(f"start method {method} does not exist on this platform")
    _run_python(_pool_program("ProcessPoolExecutor", method))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_multiprocessing_pool():
    _run_python(_pool_program("Pool", "fork"))


def _pool_program(kind: str, method: str) -> str:
    """A program whose pool workers import a module that recomputes the parent's
    results (spawn/forkserver children re-import; fork children inherit the state)."""
    return f"""
import os, sys, tempfile, textwrap
d = tempfile.mkdtemp()
open(os.path.join(d, "xf_hostile_child.py"), "w").write({_FORK_PRELUDE!r} + textwrap.dedent('''
def task(_):
    return check()
'''))
sys.path.insert(0, d)
os.environ["PYTHONPATH"] = d + os.pathsep + os.environ.get("PYTHONPATH", "")
import multiprocessing as mp
import xf_hostile_child as child
ctx = mp.get_context({method!r})
if {kind!r} == "Pool":
    with ctx.Pool(2) as pool:
        ok = pool.map(child.task, range(3))
else:
    import concurrent.futures as cf
    with cf.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        ok = list(pool.map(child.task, range(3)))
print(ok)
assert all(ok), ok
"""


def test_torch_dataloader_workers():
    pytest.importorskip("torch")
    _run_python(_FORK_PRELUDE + """
import torch
class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return int(check())
loader = torch.utils.data.DataLoader(Rows(), batch_size=2, num_workers=2)
got = [int(v) for batch in loader for v in batch]
assert got == [1, 1, 1, 1], got
""")


# ------------------------------------------------------------------- cache determinism


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not under test")
def test_fresh_compile_and_disk_cache_give_the_same_bits(tmp_path):
    """Two processes sharing an empty NUMBA_CACHE_DIR: the first compiles every kernel,
    the second loads them from the cache (a third warms part of a second directory
    first, so that callers compile against cached callees).  Same bits everywhere."""
    program = """
import hashlib, numpy as np, xentfast as xf
rng = np.random.default_rng(0)
digest = hashlib.sha256()
for n, c in [(700, 100), (3000, 10), (64, 2000), (2, 40000)]:
    x = rng.standard_normal((n, c)).astype(np.float32)
    y = rng.integers(0, c, n)
    for kw in ({}, {"label_smoothing": 0.1}, {"weight": rng.random(c), "z_loss": 1e-3}):
        loss, grad = xf.cross_entropy_with_grad(x, y, backend="cpu", reduction="none", **kw)
        digest.update(loss.tobytes()); digest.update(grad.tobytes())
    t = rng.random((n, c)).astype(np.float32)
    loss, grad = xf.cross_entropy_with_grad(x, t, backend="cpu", reduction="none")
    digest.update(loss.tobytes()); digest.update(grad.tobytes())
    for f in (xf.softmax, xf.log_softmax, xf.logsumexp):
        digest.update(f(x, backend="cpu").tobytes())
print(digest.hexdigest())
"""
    warm_part = """
import numpy as np, xentfast as xf
x = np.ones((100, 100), np.float32)
xf.logsumexp(x, backend="cpu"); xf.cross_entropy(x, np.zeros(100, int), backend="cpu")
"""
    fresh = _run_python(program, {"NUMBA_CACHE_DIR": str(tmp_path / "a")}, timeout=600)
    cached = _run_python(program, {"NUMBA_CACHE_DIR": str(tmp_path / "a")}, timeout=600)
    _run_python(warm_part, {"NUMBA_CACHE_DIR": str(tmp_path / "b")}, timeout=600)
    mixed = _run_python(program, {"NUMBA_CACHE_DIR": str(tmp_path / "b")}, timeout=600)
    assert fresh == cached == mixed


# -------------------------------------------------------------- inputs once mishandled


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_most_negative_int64_label_is_not_ignored(backend):
    """TF and Keras sparse APIs have no ignore_index: every label must be a class."""
    x = np.zeros((3, 4), np.float32)
    labels = np.array([0, np.iinfo(np.int64).min, 1])
    before = _digest(x, labels)
    with pytest.raises(ValueError, match=r"label value of -9223372036854775808 at labels\[1\]"):
        xf.sparse_softmax_cross_entropy_with_logits(labels, x, backend=backend)
    with pytest.raises(ValueError, match=r"label value of -9223372036854775808"):
        xf.sparse_categorical_crossentropy(labels, x, from_logits=True, backend=backend)
    with pytest.raises(ValueError, match=r"label value of -9223372036854775808"):
        xf.SparseCategoricalCrossentropy(from_logits=True)(labels, x)
    assert _digest(x, labels) == before


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e20], ids=["nan", "inf", "-inf", "1e20"])
def test_keras_float_labels_must_be_class_ids(bad):
    x = np.zeros((3, 4), np.float32)
    y = np.array([1.0, bad, 0.0])
    with pytest.raises(ValueError, match=r"y_true\[1\] = .* is not a class id"):
        xf.sparse_categorical_crossentropy(y, x, from_logits=True)
    with pytest.raises(ValueError, match=r"is not a class id"):
        xf.SparseCategoricalCrossentropy(from_logits=True)(y, x)


def test_keras_float_labels_that_are_class_ids_still_work():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    got = xf.sparse_categorical_crossentropy(np.array([1.0, 3.0, 0.0]), x, from_logits=True)
    want = xf.sparse_categorical_crossentropy(np.array([1, 3, 0]), x, from_logits=True)
    np.testing.assert_array_equal(got, want)


def test_ignore_index_beyond_int64_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ignore_index must fit in a 64-bit signed integer"):
        xf.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]), ignore_index=2 ** 64)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_zero_d_array_options_are_numbers(backend):
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    y = np.arange(5)
    want = xf.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, backend=backend)
    got = xf.cross_entropy(x, y, label_smoothing=np.array(0.1), z_loss=np.array(1e-3),
                           backend=backend)
    assert got == want


def test_bool_and_object_labels_say_how_to_fix_them():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match=r"got dtype bool.*labels.astype\(np.int64\)"):
        xf.cross_entropy(x, np.array([True, False, True]))
    with pytest.raises(ValueError, match=r"label value of 18446744073709551616 at labels\[0\]"):
        xf.cross_entropy(x, [2 ** 64, 1, 0])


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "lots"])
def test_buffer_cache_env_names_the_variable(value):
    proc = subprocess.run([sys.executable, "-c", "import xentfast"], capture_output=True,
                          text=True, env=dict(os.environ, XENTFAST_BUFFER_CACHE_MB=value),
                          timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "XENTFAST_BUFFER_CACHE_MB must be a" in proc.stderr
    assert repr(value) in proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_empty_cache_returns_memory_to_the_system():
    out = _run_python("""
import numpy as np, xentfast as xf
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
x = np.ones((2048, 8192), np.float32)
y = np.zeros(2048, np.int64)
for _ in range(3):
    loss, grad = xf.cross_entropy_with_grad(x, y, backend="numpy")
    del grad
before = rss()
released = xf.empty_cache()
after = rss()
print(released, before - after)
assert released >= x.nbytes, released
assert before - after >= released // 2, (before, after, released)
""")
    assert out.strip()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case", ["out_shifted_by_a_row", "out_is_the_labels",
                                  "inplace_labels_are_the_logits"])
def test_overlapping_outputs_are_computed_correctly(backend, case, rng):
    """An out= or in-place gradient that overlaps what the kernel reads (other than the
    exact in-place identity) gives the same numbers as separate arrays."""
    if case == "out_shifted_by_a_row":
        base = rng.standard_normal((9, 5)).astype(np.float32)
        x, labels = base[:8], rng.integers(0, 5, 8)
        want = xf.cross_entropy_with_grad(x.copy(), labels, backend=backend)
        loss, grad = xf.cross_entropy_with_grad(x, labels, out=base[1:], backend=backend)
    elif case == "out_is_the_labels":
        x = rng.standard_normal((8, 5)).astype(np.float32)
        labels = rng.dirichlet(np.ones(5), 8).astype(np.float32)
        want = xf.cross_entropy_with_grad(x, labels.copy(), backend=backend)
        loss, grad = xf.cross_entropy_with_grad(x, labels, out=labels, backend=backend)
    else:
        x = rng.dirichlet(np.ones(5), 8).astype(np.float32)
        want = xf.cross_entropy_with_grad(x.copy(), x.copy(), backend=backend)
        loss, grad = xf.cross_entropy_with_grad(x, x, inplace=True, backend=backend)
    assert loss == want[0]
    np.testing.assert_array_equal(grad, want[1])


@pytest.mark.parametrize("weight", [[1.0, np.inf, 1.0], [1.0, np.nan, 1.0], [1.0, 1e39, 1.0]],
                         ids=["inf", "nan", "overflows-float32"])
def test_non_finite_class_weights_are_refused(weight):
    with pytest.raises(ValueError, match=r"weight\[1\] = .* is not finite in float32"):
        xf.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]),
                         weight=np.array(weight), label_smoothing=0.1, reduction="sum")
    if np.all(np.isfinite(weight)):
        # A weighted mean only needs the weights' ratios: 1e39 is scaled, not refused,
        # and the mean is the float64 computation's, rounded.
        x = np.array([[0.5, 0.0, -1.0], [2.0, 1.0, 0.0]])
        got = xf.cross_entropy(x.astype(np.float32), np.array([0, 1]), weight=np.array(weight),
                               label_smoothing=0.1)
        want = xf.cross_entropy(x, np.array([0, 1]), weight=np.array(weight),
                                label_smoothing=0.1)
        assert got == pytest.approx(want, rel=1e-6)
