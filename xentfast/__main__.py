"""``python -m xentfast``: configuration, self-check and a quick timing table.

Commands
--------
``python -m xentfast``          configuration, self-check, then a timing table for one
                                LLM-like shape (exit code 1 if the self-check fails)
``python -m xentfast info``     configuration only
``python -m xentfast check``    self-check only: every available backend (or those of
                                ``--backends``) against the NumPy reference in float64
                                (exit code 1 on failure)
``python -m xentfast bench``    timing for your shape, e.g. ``bench --shape 8192 50257``:
                                our call against the all-core copy/read yardsticks

The timing is in-process and small on purpose: one backend, one shape, the yardsticks
that say how close to the memory bus a call runs.  The side-by-side comparison with the
peers (each contender in its own process, alternating, several rounds) is
``benchmarks/compare.py`` in a source checkout (not installed).  What both share lives
here, once, because the installed command needs it: the traffic model
(:func:`traffic_bytes`), the yardsticks (:func:`parallel_copy`, :func:`parallel_read`),
the timing loop (:func:`time_call`), the straightforward NumPy formula
(:func:`plain_cross_entropy`) and the environment record (:func:`environment`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from . import _dispatch, get_backend
from ._api import cross_entropy, cross_entropy_with_grad, log_softmax, logsumexp, softmax

#: The LLM-like shape of ``python -m xentfast``'s timing (131 MB of float32 logits:
#: large enough to be memory-bound, small enough to take a few seconds).
QUICK_SHAPE: tuple[int, int] = (1_024, 32_000)
OPS: tuple[str, ...] = ("loss", "loss+grad")
PRIMITIVE_OPS: tuple[str, ...] = ("softmax", "log_softmax", "logsumexp")
#: Operations that write an (n, c) output (the gradient, the softmax).
WRITE_OPS: frozenset[str] = frozenset({"loss+grad", "softmax", "log_softmax"})
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")


# ------------------------------------------------------ traffic model, yardsticks


def traffic_bytes(op: str, logits_bytes: int, labels_bytes: int = 0) -> int:
    """Bytes a call must move across the memory bus at least once.

    The one traffic model of every report (this command, ``benchmarks/``' tables, the
    GPU check): the logits read, the labels read (``n`` class ids, or a probability
    array), and the ``(n, c)`` output written for the operations that make one
    (:data:`WRITE_OPS`: loss+grad, softmax, log_softmax).  Per-row vectors and scalars
    are ignored.  The yardsticks move the logits' bytes: the parallel copy reads and
    writes them (``2 * logits_bytes``), the parallel read reads them once.
    """
    if op == "copy":
        return 2 * logits_bytes
    if op == "read":
        return logits_bytes
    if op not in OPS + PRIMITIVE_OPS:
        raise ValueError(f"op must be one of {OPS + PRIMITIVE_OPS}, 'copy', 'read'; got {op!r}")
    return logits_bytes + labels_bytes + (logits_bytes if op in WRITE_OPS else 0)


def yardstick_for(op: str) -> str:
    """The yardstick an operation is measured against: ``"copy"`` (read + write of the
    logits' bytes) for those that write an ``(n, c)`` output, else ``"read"``."""
    return "copy" if op in WRITE_OPS else "read"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: The yardsticks give each thread at least this many bytes (a thread costs ~10 us: on
#: small arrays more threads only measure the pool).
MIN_BYTES_PER_THREAD = 256 * 1024


def _yardstick_ranges(nbytes: int, threads: int | None) -> list[tuple[int, int]]:
    threads = threads or usable_cpus()
    return _byte_ranges(nbytes, max(1, min(threads, nbytes // MIN_BYTES_PER_THREAD)))


def _byte_ranges(nbytes: int, parts: int, align: int = 4096) -> list[tuple[int, int]]:
    """``parts`` near-equal ``[start, stop)`` ranges of ``nbytes``, starts page-aligned."""
    step = -(-max(nbytes, 1) // parts)
    step = -(-step // align) * align
    return [(a, min(a + step, nbytes)) for a in range(0, nbytes, step)]


def _on_threads(tasks: list[Callable[[], object]]) -> Callable[[], None]:
    """One call runs every task, each on its own thread of a pool made once (NumPy
    releases the GIL in copies and reductions, so the threads run on all the cores)."""
    if len(tasks) <= 1:
        only = tasks[0] if tasks else (lambda: None)
        return lambda: (only(), None)[1]
    pool = ThreadPoolExecutor(len(tasks), thread_name_prefix="xentfast-yardstick")

    def run() -> None:
        for future in [pool.submit(task) for task in tasks]:
            future.result()

    return run


def parallel_copy(src: np.ndarray, threads: int | None = None) -> Callable[[], None]:
    """Yardstick: ``dst[:] = src`` over ``src``'s bytes split across ``threads`` threads
    (default: every usable core; fewer below :data:`MIN_BYTES_PER_THREAD` a thread),
    each running ``np.copyto`` on its slice.

    Returns the zero-argument call to time; ``dst`` is allocated and written once here,
    so the timed calls write resident memory (as a reused gradient is)."""
    flat = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
    dst = np.empty_like(flat)
    pairs = [(dst[a:b], flat[a:b]) for a, b in _yardstick_ranges(flat.size, threads)]
    run = _on_threads([lambda d=d, s=s: np.copyto(d, s) for d, s in pairs])
    run()
    return run


def parallel_read(src: np.ndarray, threads: int | None = None) -> Callable[[], None]:
    """Yardstick: a sum of ``src``'s bytes (as 64-bit words) split across ``threads``
    threads (default: every usable core; fewer below :data:`MIN_BYTES_PER_THREAD` a
    thread), each reducing its slice with NumPy."""
    flat = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
    tasks = []
    for a, b in _yardstick_ranges(flat.size, threads):
        words = a + (b - a) // 8 * 8
        tasks.append(lambda a=a, w=words, b=b: (np.add.reduce(flat[a:w].view(np.uint64)),
                                                np.add.reduce(flat[w:b])))
    return _on_threads(tasks)


def time_call(fn: Callable[[], object], *, repeats: int = 5, target_s: float = 0.0,
              max_repeats: int = 50, min_sample_s: float = 2e-3,
              warmup: bool = True) -> list[float]:
    """Seconds per call of ``fn()``: a warm-up call (unless ``warmup=False``: the caller
    made it), then at least ``repeats`` samples
    (more while under ``target_s`` seconds, at most ``max_repeats``), each sample
    ``number`` back-to-back calls with ``number`` sized so a sample lasts at least
    ``min_sample_s`` (microsecond calls are not timer noise).  Take the median."""
    if warmup:
        fn()  # compilation, page faults, thread pools
    t0 = time.perf_counter()
    fn()  # sizes `number`; a slow call is the first sample
    once = time.perf_counter() - t0
    number = 1 if once >= min_sample_s else min(100_000, math.ceil(min_sample_s / max(once, 1e-7)))
    times = [once] if number == 1 else []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while len(times) < max_repeats and (
                len(times) < repeats or time.perf_counter() - start < target_s):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - t0) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def plain_cross_entropy(x: np.ndarray, y: np.ndarray,
                        want_grad: bool) -> np.floating | tuple[np.floating, np.ndarray]:
    """Mean softmax cross-entropy written the straightforward NumPy way (a baseline and an
    independent check).  ``y``: class indices (1-D) or probabilities (``x``'s shape).
    Returns the loss, and with ``want_grad`` also ``(softmax(x) - onehot(y)) / n``."""
    n = x.shape[0]
    shifted = x - x.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sumexp = exp.sum(axis=1, keepdims=True)
    log_probs = shifted - np.log(sumexp)
    index = y.ndim == 1
    rows = np.arange(n)
    loss = -(log_probs[rows, y].mean() if index else (y * log_probs).sum(axis=1).mean())
    if not want_grad:
        return loss
    grad = exp / sumexp
    if index:
        grad[rows, y] -= 1
    else:
        grad -= y
    grad /= n
    return loss, grad


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Machine, date and versions (read from package metadata: no peer is imported)."""
    from . import __version__

    versions = {"python": platform.python_version(), "xentfast": __version__}
    for dist in ("numpy", "numba", "numba-cuda", "ml_dtypes", "torch", "tensorflow",
                 "tensorflow-cpu", "jax", "jaxlib", "optax"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "platform": platform.platform(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(), "versions": versions,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


# ------------------------------------------------------------------ configuration


def _config_lines() -> list[str]:
    env = environment()
    chosen = get_backend()
    lines = [f"xentfast {env['versions']['xentfast']}: backend in use {chosen!r} "
             "(get_backend(); set XENTFAST_BACKEND or call set_backend() to change)",
             "", "Backends (priority order):"]
    for name in _dispatch.KNOWN_BACKENDS:
        reason = _dispatch.unavailable_reason(name)
        state = "available" if reason is None else f"unavailable: {reason}"
        lines.append(f"  {name:<7} {state}{'  <- in use' if name == chosen else ''}")
    versions = dict(env["versions"])
    cython = importlib.util.find_spec("xentfast.backends._cython") is not None
    versions["cython extension"] = "built" if cython else "not built"
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
              f"Machine: {env['cpu']}, {env['usable_cpus']} usable CPUs, {env['platform']}"]
    return lines


def _thread_lines() -> list[str]:
    """Thread counts; the Numba threading layer is known once a parallel kernel ran."""
    line = f"Threads: {usable_cpus()} usable CPUs"
    for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER"):
        if os.environ.get(var):
            line += f", {var}={os.environ[var]}"
    if "numba" in sys.modules or _dispatch.unavailable_reason("cpu") is None:
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = "not started yet (no parallel kernel has run)"
        line += f"; numba: {numba.get_num_threads()} threads, threading layer {layer}"
    return [line]


# ---------------------------------------------------------------------- self-check

_TOLERANCE = {  # (rtol, atol as a fraction of the reference's largest magnitude)
    np.dtype(np.float16): (2e-3, 1e-3),
    np.dtype(np.float32): (1e-4, 1e-5),
    np.dtype(np.float64): (1e-9, 1e-11),
}


def _mismatch(got: Any, want: Any, dtype: np.dtype) -> str | None:
    """None if ``got`` matches ``want`` to ``dtype``'s tolerance, else what differs."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return f"shape {got.shape}, expected {want.shape}"
    if got.dtype != dtype:
        return f"dtype {got.dtype}, expected {dtype}"
    got = got.astype(np.float64)
    if not np.array_equal(np.isnan(got), np.isnan(want)):
        return "NaN in different places"
    finite = np.isfinite(want)
    if not np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)]):
        return "infinities differ"
    if not finite.any():
        return None
    rtol, atol = _TOLERANCE[dtype]
    scale = max(float(np.max(np.abs(want[finite]))), 1e-300)
    err = np.abs(got[finite] - want[finite])
    bad = err > rtol * np.abs(want[finite]) + atol * scale
    if bad.any():
        return f"max abs error {err.max():.3g} (largest reference magnitude {scale:.3g})"
    return None


def _as64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) if a.dtype.kind == "f" else a


_Check = tuple[str, np.dtype, Callable[[str], Sequence[Any]], Callable[[], Sequence[Any]]]


def _checks() -> list[_Check]:
    """(label, logits dtype, run on a backend, float64 reference); seeded inputs."""
    rng = np.random.default_rng(20240601)

    def logits(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        return (rng.standard_normal(shape) * 3).astype(dtype)

    checks = []

    def add(label: str, dtype: Any, run: Callable[[str], Sequence[Any]],
            ref: Callable[[], Sequence[Any]]) -> None:
        checks.append((label, np.dtype(dtype), run, ref))

    def ce_pair(label: str, x: np.ndarray, y: np.ndarray, **options: Any) -> None:
        """cross_entropy_with_grad and cross_entropy against the NumPy backend in float64."""
        def run(b: str) -> Sequence[Any]:
            loss, grad = cross_entropy_with_grad(x, y, backend=b, **options)
            return loss, grad, cross_entropy(x, y, backend=b, **options)

        def ref() -> Sequence[Any]:
            loss, grad = cross_entropy_with_grad(_as64(x), _as64(y), backend="numpy", **options)
            return loss, grad, loss

        add(label, x.dtype, run, ref)

    def plain(label: str, x: np.ndarray, y: np.ndarray) -> None:
        """Against the plain formula, independent of xentfast's own reference."""
        add(label, x.dtype, lambda b: cross_entropy_with_grad(x, y, backend=b),
            lambda: plain_cross_entropy(_as64(x), y, True))

    def inplace(label: str, x: np.ndarray, y: np.ndarray) -> None:
        def run(b: str) -> Sequence[Any]:
            buffer = x.copy()
            loss, grad = cross_entropy_with_grad(buffer, y, inplace=True, backend=b)
            if grad is not buffer:
                raise AssertionError("inplace=True did not return the logits array")
            return loss, grad

        add(label, x.dtype, run, lambda: cross_entropy_with_grad(_as64(x), y, backend="numpy"))

    def primitives(label: str, x: np.ndarray) -> None:
        fns = (softmax, log_softmax, logsumexp)
        add(label, x.dtype, lambda b: [f(x, backend=b) for f in fns],
            lambda: [f(_as64(x), backend="numpy") for f in fns])

    plain("index labels, float32 64x10, mean (vs plain NumPy)", logits((64, 10)),
          rng.integers(0, 10, 64))
    ce_pair("index labels, float64 33x1000, reduction='none'",
            logits((33, 1000), np.float64), rng.integers(0, 1000, 33), reduction="none")
    y = rng.integers(0, 37, 50)
    y[::7] = -100
    ce_pair("weight, ignore_index, label_smoothing, z_loss, float32 50x37, sum",
            logits((50, 37)), y, weight=rng.random(37) + 0.5, label_smoothing=0.1,
            z_loss=1e-3, reduction="sum")
    p = rng.random((20, 17))
    ce_pair("probability labels, label_smoothing, float32 20x17",
            logits((20, 17)), (p / p.sum(1, keepdims=True)).astype(np.float32),
            label_smoothing=0.05)
    ce_pair("class axis 1 of a float64 2x5x7 array", logits((2, 5, 7), np.float64),
            rng.integers(0, 5, (2, 7)), axis=1)
    ce_pair("float16 8x300", logits((8, 300), np.float16), rng.integers(0, 300, 8))
    ce_pair("wide rows, float32 3x70000", logits((3, 70_000)), rng.integers(0, 70_000, 3))
    x = logits((4, 50))
    x[0, 1:] = -np.inf  # a masked row: only class 0 is possible
    x[1, 3], x[2, 5] = 1e30, -1e30
    ce_pair("-inf masks and +-1e30 logits, float32 4x50", x, np.array([0, 3, 7, 9]),
            reduction="none")
    inplace("inplace=True, float32 16x100", logits((16, 100)), rng.integers(0, 100, 16))
    primitives("softmax, log_softmax, logsumexp, float32 9x513", logits((9, 513)))

    def bad_label(b: str) -> Sequence[Any]:
        try:
            cross_entropy(np.zeros((3, 4), np.float32), np.array([0, 4, 1]), backend=b)
        except ValueError:
            return []
        raise AssertionError("label 4 with 4 classes did not raise ValueError")

    add("a label out of range raises ValueError", np.float32, bad_label, lambda: [])
    return checks


def self_check(backends: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Run the self-check on ``backends`` (default: every available host backend, plus
    ``cuda`` on a real GPU).

    Returns
    -------
    dict
        backend name -> list of failure descriptions (empty: PASS).
    """
    if backends is None:
        simulated = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
        backends = [b for b in _dispatch.available_backends()
                    if b != "cuda" or not simulated]
    checks = _checks()
    references = [ref() for *_, ref in checks]
    failures: dict[str, list[str]] = {}
    for backend in backends:
        failures[backend] = problems = []
        for (label, dtype, run, _), want in zip(checks, references):
            try:
                got = run(backend)
                for i, (g, w) in enumerate(zip(got, want)):
                    g = g.copy_to_host() if hasattr(g, "copy_to_host") else g
                    problem = _mismatch(g, w, dtype)
                    if problem:
                        problems.append(f"{label}: output {i}: {problem}")
                        break
                if len(got) != len(want):
                    problems.append(f"{label}: {len(got)} outputs, expected {len(want)}")
            except Exception as exc:  # a crash is a failure, reported with its cause
                problems.append(f"{label}: {type(exc).__name__}: {exc}".splitlines()[0])
    return failures


def _print_check(backends: Sequence[str] | None = None) -> bool:
    print("Self-check against the NumPy reference (float64):")
    failures = self_check(backends)
    for backend, problems in failures.items():
        if problems:
            print(f"  FAIL  {backend}")
            for problem in problems:
                print(f"        - {problem}")
        else:
            print(f"  PASS  {backend}")
    return not any(failures.values())


# --------------------------------------------------------------------------- timing


def make_inputs(n: int, c: int, dtype: str = "float32", labels: str = "index",
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded logits uniform in [-4, 4) of ``dtype`` and labels: int64 class ids
    (``labels="index"``) or a random distribution per row of the logits' dtype
    (``"prob"``).  Generated in float32 (float64 for float64) in place, no temporary."""
    rng = np.random.default_rng(seed)
    gen = np.float64 if dtype == "float64" else np.float32
    target = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(_bfloat16())
    x = rng.random((n, c), dtype=gen)
    x *= 8
    x -= 4
    x = x.astype(target, copy=False)
    if labels == "index":
        return x, rng.integers(0, c, n, dtype=np.int64)
    y = rng.random((n, c), dtype=gen)
    y /= y.sum(axis=1, keepdims=True)
    return x, y.astype(target, copy=False)


def _bfloat16() -> type:
    try:
        import ml_dtypes
    except ImportError:
        raise SystemExit("bfloat16 needs ml_dtypes: pip install ml_dtypes") from None
    return ml_dtypes.bfloat16


def bench_records(shape: tuple[int, int], ops: Sequence[str] = OPS, *,
                  dtype: str = "float32", backend: str | None = None, repeats: int = 5,
                  target_s: float = 0.3) -> list[dict[str, Any]]:
    """Time ``backend``'s call (default: the best host backend in use) for each op and
    its yardstick (:func:`yardstick_for`) on the same logits, in this process.

    Returns one record per row: ``op``, ``contender`` (``xentfast-<backend>``,
    ``copy-par``, ``read-par``), ``median_s``, ``bytes`` (:func:`traffic_bytes`),
    ``gbps`` and ``pct_of_yardstick``."""
    if backend is None:
        backend = get_backend()
        backend = backend if backend != "cuda" else _dispatch.best_host_backend()
    n, c = shape
    x, y = make_inputs(n, c, dtype)
    calls = {"loss": lambda: cross_entropy(x, y, backend=backend),
             "loss+grad": lambda: cross_entropy_with_grad(x, y, backend=backend)}
    yardsticks = {"copy": ("copy-par", parallel_copy), "read": ("read-par", parallel_read)}
    measured: dict[str, dict[str, Any]] = {}

    def record(op: str, name: str, fn: Callable[[], object], nbytes: int) -> dict[str, Any]:
        median = statistics.median(time_call(fn, repeats=repeats, target_s=target_s))
        return {"n": n, "c": c, "dtype": dtype, "op": op, "contender": name,
                "median_s": median, "bytes": nbytes, "gbps": nbytes / median / 1e9}

    records = []
    for op in ops:
        kind = yardstick_for(op)
        if kind not in measured:
            name, make = yardsticks[kind]
            measured[kind] = record(kind, name, make(x), traffic_bytes(kind, x.nbytes))
        ours = record(op, f"xentfast-{backend}", calls[op], traffic_bytes(op, x.nbytes, y.nbytes))
        yard = dict(measured[kind], op=op, pct_of_yardstick=100.0)
        ours["pct_of_yardstick"] = 100 * ours["gbps"] / yard["gbps"]
        records += [ours, yard]
    return records


def _timing(shape: tuple[int, int], ops: Sequence[str], *, dtype: str = "float32",
            backend: str | None = None, repeats: int = 5, as_json: bool = False) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # before we add ours
    records = bench_records(shape, ops, dtype=dtype, backend=backend, repeats=repeats)
    if as_json:
        print(json.dumps({"environment": environment(), "results": records}, indent=1))
        return
    cpus = usable_cpus()
    print(f"Timing {shape[0]}x{shape[1]} {dtype} logits, int64 labels, mean loss; in this "
          f"process, median of >= {repeats} calls after a warm-up"
          + (f"; load average {load:.1f} on {cpus} CPUs" if load is not None else "")
          + (" (busy machine: expect noise)" if load is not None and load > 0.5 * cpus else ""))
    print("| shape | op | contender | ms | GB/s | % of yardstick |\n"
          "|:---|:---|:---|---:|---:|---:|")
    for r in records:
        print(f"| {r['n']}x{r['c']} | {r['op']} | {r['contender']} | {r['median_s'] * 1e3:.3g} "
              f"| {r['gbps']:.3g} | {r['pct_of_yardstick']:.0f} |")
    print(f"GB/s: (logits read + labels read + gradient written) / time.  Yardsticks on "
          f"{cpus} threads: copy-par (dst[:] = logits, read + write) for loss+grad, "
          "read-par (a sum of the logits' bytes) for loss.  Peers, rounds, processes: "
          "benchmarks/compare.py in a source checkout.")


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xentfast",
        description="Show xentfast's configuration, check every backend against the NumPy "
                    "reference, and time it against the memory-bandwidth yardsticks. "
                    "With no command: all three.",
        epilog="examples:\n  python -m xentfast check --backends cpu\n"
               "  python -m xentfast bench --shape 8192 50257 --ops loss+grad\n"
               "  python -m xentfast bench --shape 4096 32000 --backend cython --json > out.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--no-timing", action="store_true",
                        help="skip the timing (configuration and self-check only)")
    commands = parser.add_subparsers(dest="command", metavar="{info,check,bench}")
    commands.add_parser("info", help="configuration only: backends, versions, threads")
    check = commands.add_parser(
        "check", help="self-check of every available backend; exit 1 on failure",
        description="Check backends against the NumPy reference computed in float64 "
                    "(several shapes, dtypes and options); exit code 1 on any failure.")
    check.add_argument("--backends", nargs="+", choices=_dispatch.KNOWN_BACKENDS,
                       metavar="NAME", help="check only these (default: every available "
                       "one; known: " + ", ".join(_dispatch.KNOWN_BACKENDS) + ")")
    bench = commands.add_parser(
        "bench", help="time our call for a shape against the copy/read yardsticks",
        description="Time xentfast's call for one shape, in this process, next to the "
                    "all-core yardsticks on the same bytes: a parallel copy (loss+grad) and "
                    "a parallel read (loss).  For the peers: benchmarks/compare.py.")
    bench.add_argument("--shape", nargs=2, type=int, metavar=("N", "C"),
                       default=list(QUICK_SHAPE),
                       help="rows and classes (default: %d %d)" % QUICK_SHAPE)
    bench.add_argument("--ops", nargs="+", choices=OPS, default=["loss+grad", "loss"],
                       help="operations (default: loss+grad loss)")
    bench.add_argument("--dtype", choices=DTYPES, default="float32")
    bench.add_argument("--backend", choices=[b for b in _dispatch.KNOWN_BACKENDS if b != "cuda"],
                       help="host backend to time (default: the one in use)")
    bench.add_argument("--repeats", type=int, default=5,
                       help="timed calls at least (the median is shown; default 5)")
    bench.add_argument("--json", action="store_true",
                       help="print the results as JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "bench":
        if min(args.shape) < 1:
            _parser().error(f"--shape needs positive N and C; got {args.shape}")
        if args.backend and _dispatch.unavailable_reason(args.backend):
            print(f"python -m xentfast bench: backend {args.backend!r} is unavailable: "
                  f"{_dispatch.unavailable_reason(args.backend)}", file=sys.stderr)
            return 2
        _timing(tuple(args.shape), args.ops, dtype=args.dtype, backend=args.backend,
                repeats=max(1, args.repeats), as_json=args.json)
        return 0
    if args.command == "check":
        for name in args.backends or ():
            try:
                _dispatch.load(name)
            except _dispatch.BackendUnavailableError as exc:
                print(f"python -m xentfast check: {exc}", file=sys.stderr)
                return 2
        return 0 if _print_check(args.backends) else 1
    print("\n".join(_config_lines()))
    if args.command == "info":
        print("\n".join(_thread_lines()))
        return 0
    print()
    passed = _print_check()
    print("\n".join(_thread_lines()))
    if not args.no_timing:
        print()
        _timing(QUICK_SHAPE, ["loss+grad"])
    return 0 if passed else 1


def _main_piped() -> int:
    """main() whose output may go to a pipe that closes early (``... | head``): a
    closed pipe ends the command quietly, as for any Unix tool, not with a traceback."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # the reader is gone: point stdout at devnull so the interpreter's final flush
        # does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for such a pipeline


if __name__ == "__main__":
    sys.exit(_main_piped())
