"""Correctness and speed of the ``cuda`` backend on a real GPU (H100/H200 targets).

Run on a machine with a CUDA GPU::

    python benchmarks/gpu_check.py                 # tests + checks + timing table
    python benchmarks/gpu_check.py --skip-tests    # checks + timing only
    python benchmarks/gpu_check.py --sweep         # also time every feasible path/limit
    python benchmarks/gpu_check.py --json out.json # keep the numbers

and, anywhere (CI, no GPU), the smoke run that checks this script itself under the CUDA
simulator with tiny shapes::

    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_check.py --sim-smoke

What it does
------------
(a) Correctness: ``pytest tests -k cuda`` (the suite parametrised over the backends,
    plus tests/test_cuda_interop.py), then its own checks of the raw kernels against
    the NumPy reference on large shapes, on every path (``force_path``), float16/32/64,
    loss-only and loss+grad, in-place, with label smoothing / weights / z-loss; and the
    exactness checks of the accuracy contract (DESIGN.md section 1) on every path,
    against a 60-digit ``decimal`` reference: confident rows (loss << 1, within 32
    ulps), ties at +-1e30, the true-class gradient p_y - 1 of a confident row (within
    64 ulps), log_softmax of logits offset by 1e7, lse and softmax (within 4 ulps).
    These are what the device's libdevice exp/log1p decide, which the simulator
    cannot show.
(b) Speed: for float32 (and float16) shapes 65_536 x 1_000, 32_768 x 32_000 and
    4_096 x 128_000, the median of ``--reps`` CUDA-event-timed runs after ``--warmup``
    runs, of

    * ``xentfast kernel``: the fused kernel on preallocated device arrays;
    * ``xentfast api``: ``cross_entropy_with_grad`` / ``cross_entropy`` (mean) on
      device arrays, allocation, label check and the reduction included;
    * ``torch eager``: ``F.cross_entropy`` forward (+ ``backward``);
    * ``torch.compile`` and Liger Kernel's cross entropy, where installed and working;
    * the yardsticks of ``benchmarks/harness`` (``copy-cuda``: a device-to-device copy
      of the logits, read + write; ``read-cuda``: a grid-stride sum of their bytes).

    GB/s is the harness's traffic model (``harness.traffic_bytes``: logits read + labels
    read, + the gradient written for loss+grad); "% yardstick" is that bandwidth over the
    copy's (loss+grad) or the read's (loss-only), same bytes, same run; "x torch" is the
    speed-up over PyTorch eager.  Targets on an H100: loss+grad >= 75 % of copy
    bandwidth for C <= 32k and >= 55 % at 128k, and >= 2x PyTorch eager.  (Tables before
    2026-12 left the labels out of the bytes and put loss-only against the copy.)

Peers that are absent (PyTorch, CuPy, Liger, a working ``torch.compile``) are skipped
with the reason; nothing here needs them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness package
try:
    import xentfast
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import xentfast

import harness  # noqa: E402

# A module global (the CUDA simulator swaps ``cuda`` in a kernel's globals); reading
# NUMBA_ENABLE_CUDASIM happens here, so set it before running this script.
from numba import cuda

SHAPES = ((65_536, 1_000), (32_768, 32_000), (4_096, 128_000))
SMOKE_SHAPES = ((8, 40), (3, 300))
TARGETS = {"copy_fraction_small_c": 0.75, "copy_fraction_128k": 0.55, "vs_torch": 2.0}


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    shape: tuple[int, int]
    dtype: str
    op: str  # "loss+grad" | "loss"
    impl: str
    ms: float | None = None
    gbps: float | None = None
    yardstick_pct: float | None = None
    vs_torch: float | None = None
    note: str = ""


@dataclass
class Report:
    machine: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)


#: gpu_check's row names of the harness's yardsticks (and back).
YARDSTICKS = {"copy": "copy-cuda", "read": "read-cuda"}


def row_bytes(r: Row) -> int:
    """The harness's traffic model for a row: a yardstick moves the logits' bytes
    (copy: twice), every other row its case's bytes (logits, labels, gradient)."""
    case = harness.Case(*r.shape, op=r.op, dtype=r.dtype)
    if r.impl in YARDSTICKS:
        return harness.traffic_bytes(r.impl, case.logits_bytes)
    return case.traffic_bytes()


def fill_derived(rows: list[Row]) -> None:
    """GB/s, % of the op's yardstick (copy for loss+grad, read for loss-only) and the
    speed-up over PyTorch eager, in place."""
    for r in rows:
        if r.ms is not None and r.ms > 0:
            r.gbps = row_bytes(r) / (r.ms * 1e6)
    yard = {(r.shape, r.dtype, r.impl): r.gbps for r in rows if r.impl in YARDSTICKS and r.gbps}
    torch = {(r.shape, r.dtype, r.op): r.ms for r in rows if r.impl == "torch eager" and r.ms}
    for r in rows:
        base = yard.get((r.shape, r.dtype, harness.yardstick_for(r.op)))
        if r.gbps and base and r.impl not in YARDSTICKS:
            r.yardstick_pct = 100.0 * r.gbps / base
        t = torch.get((r.shape, r.dtype, r.op))
        if t and r.ms and r.impl != "torch eager" and r.impl not in YARDSTICKS:
            r.vs_torch = t / r.ms


def format_table(rows: list[Row]) -> str:
    """A Markdown table (missing numbers shown as '-')."""
    head = ("shape", "dtype", "op", "impl", "ms", "GB/s", "% yardstick", "x torch", "note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        lines.append("| " + " | ".join((
            f"{r.shape[0]}x{r.shape[1]}", r.dtype, r.op, r.impl, num(r.ms, ".3f"),
            num(r.gbps, ".0f"), num(r.yardstick_pct, ".0f"), num(r.vs_torch, ".2f"), r.note,
        )) + " |")
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    """The H100 targets, checked against the xentfast kernel and api rows (loss+grad)."""
    out = []
    for r in rows:
        if r.op != "loss+grad" or not r.impl.startswith("xentfast"):
            continue
        if r.yardstick_pct is not None:
            need = 100 * (TARGETS["copy_fraction_small_c"] if r.shape[1] <= 32_768
                          else TARGETS["copy_fraction_128k"])
            out.append(f"{'PASS' if r.yardstick_pct >= need else 'MISS'} {r.impl} {r.shape} "
                       f"{r.dtype}: {r.yardstick_pct:.0f}% of copy bandwidth (target {need:.0f}%)")
        if r.vs_torch is not None:
            out.append(f"{'PASS' if r.vs_torch >= TARGETS['vs_torch'] else 'MISS'} {r.impl} "
                       f"{r.shape} {r.dtype}: {r.vs_torch:.2f}x PyTorch eager (target "
                       f"{TARGETS['vs_torch']:.0f}x)")
    return out


# --------------------------------------------------------------------------- timing


def _timer():
    """(start, stop) -> milliseconds, with CUDA events (wall clock under the simulator)."""
    from numba import cuda

    from xentfast.backends.numba_cuda import SIMULATED

    if SIMULATED:
        def run(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return run

    def run(fn):
        start, stop = cuda.event(), cuda.event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return cuda.event_elapsed_time(start, stop)

    return run


def median_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    timed = _timer()
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(reps))


# --------------------------------------------------------------------------- inputs


_FILL = None


def _fill_kernel():
    """A counter-hash filler (compiled once): logits uniform in [-4, 4), labels in [0, C)."""
    global _FILL
    if _FILL is None:
        from xentfast.backends import _cuda_kernels as K

        @K.jit()
        def fill(x, y, seed):
            K.prologue()  # the simulator: uint64 products wrap, as on the device
            i = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
            step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
            c = x.shape[1]
            total = np.int64(x.shape[0]) * c
            while i < total:
                h = np.uint64(i) * np.uint64(0x9E3779B97F4A7C15) + seed
                h ^= h >> np.uint64(31)
                h *= np.uint64(0xBF58476D1CE4E5B9)
                h ^= h >> np.uint64(29)
                u = np.float64(h >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                r = i // c
                j = i - r * c
                x[r, j] = 8.0 * (u - 0.5)
                if j == 0:
                    y[r] = np.int64(h % np.uint64(c))
                i += step

        _FILL = fill
    return _FILL


def device_inputs(n: int, c: int, dtype, seed: int = 0):
    """Logits and labels made on the device (no big host arrays): a counter hash per
    element, so every run sees the same data."""
    from numba import cuda

    x = cuda.device_array((n, c), dtype=dtype)
    y = cuda.device_array(n, dtype=np.int64)
    blocks = min(65_535, max(1, (n * c + 255) // 256))
    from xentfast.backends._cuda_kernels import launch

    launch(_fill_kernel(), blocks, 256, x, y, np.uint64(seed))
    cuda.synchronize()
    return x, y


# --------------------------------------------------------------------------- (a) checks


def run_pytest(extra: list[str]) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", os.path.join(root, "tests"), "-k", "cuda", "-q",
           "-p", "no:cacheprovider", *extra]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=root)


def kernel_checks(shapes, dtypes, report: Report, rows_checked: int = 48) -> bool:
    """Raw kernels vs numpy_ref on (the first rows of) large shapes, every feasible path."""
    from xentfast.backends import numba_cuda as B
    from xentfast.backends import numpy_ref as R

    ok_all = True
    for n, c in shapes:
        for dtype in dtypes:
            dt = np.dtype(dtype)
            acc = np.dtype(np.float64 if dt == np.float64 else np.float32)
            x, y = device_inputs(n, c, dt, seed=n + c)
            k = min(n, rows_checked)
            xh = x[:k].copy_to_host()
            yh = y[:k].copy_to_host()
            yh[::7] = -100  # some ignored rows
            y_dev_part = y[:k]
            y_dev_part.copy_to_device(yh)
            xr = xh.astype(np.float32) if dt == np.float16 else xh
            for path in ("auto", "warp", "block", "stream"):
                try:
                    t = B.tuning(force_path=None if path == "auto" else path)
                    with t:
                        p = B.plan(c, acc, False, itemsize=dt.itemsize)
                except ValueError:
                    continue  # the row does not fit this path
                for opts in ({}, {"eps": 0.1, "z": 1e-3, "weighted": True}):
                    w = (np.linspace(0.5, 1.5, c).astype(acc) if opts.get("weighted")
                         else np.empty(0, acc))
                    from numba import cuda

                    dw = cuda.to_device(w)
                    loss = cuda.device_array(n, acc)
                    lse = cuda.device_array(n, acc)
                    grad = cuda.device_array((n, c), dt)
                    with B.tuning(force_path=None if path == "auto" else path):
                        B.sparse(x, y, dw, -100, opts.get("eps", 0.0), opts.get("z", 0.0), 1.0 / n,
                                 loss, lse, grad)
                    cuda.synchronize()
                    rl, rs = np.zeros(k, acc), np.zeros(k, acc)
                    rg = np.zeros(xr.shape, xr.dtype)
                    R.sparse(xr, yh, w, -100, opts.get("eps", 0.0), opts.get("z", 0.0), 1.0 / n,
                             rl, rs, rg)
                    tol = dict(rtol=1e-10, atol=1e-12) if dt == np.float64 else dict(rtol=2e-5, atol=1e-6)
                    gtol = dict(rtol=5e-3, atol=1e-6) if dt == np.float16 else tol
                    good = (np.allclose(loss[:k].copy_to_host(), rl, **tol)
                            and np.allclose(lse[:k].copy_to_host(), rs, **tol)
                            and np.allclose(grad[:k].copy_to_host().astype(np.float64),
                                            rg.astype(dt).astype(np.float64), **gtol))
                    name = f"sparse {n}x{c} {dt.name} {p.path}({path}) {'opts' if opts else 'plain'}"
                    report.checks.append({"check": name, "ok": bool(good)})
                    print(("ok   " if good else "FAIL ") + name, flush=True)
                    ok_all &= bool(good)
            del x, y
    return ok_all


def _decimal_rows(x, labels=None, probs=None):
    """Exact-to-60-digits loss, lse, gradient (of the sum), softmax and log_softmax of
    each row of x (the very values the kernel reads), from the standard library's
    ``decimal`` (no dependency).  Shifted by the row max (exp(1e30) would overflow)."""
    import decimal

    out = []
    with decimal.localcontext(decimal.Context(prec=60, Emin=-10**6, Emax=10**6)):
        D = decimal.Decimal
        for i, row in enumerate(np.asarray(x, dtype=np.float64)):
            d = [D(float(v)) for v in row]  # exact: every float is a finite decimal
            m = max(d)
            e = [(v - m).exp() for v in d]
            s = sum(e, D(0))
            log_s = s.ln()
            lse = m + log_s
            p = [v / s for v in e]
            lsm = [(v - m) - log_s for v in d]
            if labels is not None:
                y = int(labels[i])
                loss = lse - d[y]
                g = [p[j] - (1 if j == y else 0) for j in range(len(d))]
            else:
                t = [D(float(v)) for v in np.asarray(probs[i], np.float64)]
                total = sum(t, D(0))
                loss = sum((t[j] * (lse - d[j]) for j in range(len(d)) if t[j] != 0), D(0))
                g = [p[j] * total - t[j] for j in range(len(d))]
            out.append({"loss": loss, "lse": lse, "grad": g, "p": p, "lsm": lsm})
    return out


def _ulps(got, exact, dtype) -> float:
    """max |got - exact| in ulps of the exact value (in ``dtype``); inf for a NaN."""
    import decimal

    worst = 0.0
    for gv, ev in zip(np.asarray(got, dtype=np.float64).ravel(), exact):
        if not np.isfinite(gv):
            return float("inf")
        spacing = float(np.spacing(np.abs(dtype.type(float(ev))))) or float(
            np.finfo(dtype).smallest_subnormal)
        worst = max(worst, float(abs(decimal.Decimal(float(gv)) - ev)) / spacing)
    return worst


def exact_cases():
    """(name, logits, labels | None, probs | None, {quantity: ulps allowed}) of the
    accuracy contract; seeded."""
    rng = np.random.default_rng(2026)
    x = rng.standard_normal(1000).astype(np.float32)
    x[7] = x.max() + np.float32(18)  # loss ~ 1e-6: s = 1 + r rounds r away
    confident = {"loss": 32, "grad_y": 64, "lse": 4, "softmax": 4, "log_softmax": 32}
    ties = {"loss": 32, "grad_y": 64, "lse": 4}
    cases = [("f32 C=1000, target ahead by 18", x[None, :], np.array([7]), None, confident)]
    for dt in (np.float32, np.float64):
        name = np.dtype(dt).name
        cases += [
            (f"{name} [1e30, 1e30, 0] label 0 (log 2)", np.array([[1e30, 1e30, 0]], dt),
             np.array([0]), None, ties),
            (f"{name} [1e30] * 4 label 0 (log 4)", np.array([[1e30] * 4], dt), np.array([0]),
             None, ties),
            (f"{name} [-1e4] * 3 label 1 (log 3)", np.array([[-1e4] * 3], dt), np.array([1]),
             None, ties),
        ]
    cases.append(("f64 [37.43, 0] one-hot 0 (p_0 - 1 ~ -5.55e-17)", np.array([[37.43, 0.0]]),
                  None, np.array([[1.0, 0.0]]), {"loss": 32, "grad_y": 64}))
    cases.append(("f64 [37.43, 0] label 0", np.array([[37.43, 0.0]]), np.array([0]), None,
                  {"loss": 32, "grad_y": 64}))
    offset = (np.float32(1e7) + np.arange(64, dtype=np.float32)).astype(np.float32)[None, :]
    cases.append(("f32 1e7 + arange(64): log_softmax", offset, np.array([63]), None,
                  {"log_softmax": 32, "lse": 4, "softmax": 4}))
    wide = (rng.standard_normal((1, 3000)) * 20).astype(np.float32)
    cases.append(("f32 C=3000, logits ~ N(0, 20^2)", wide, np.array([5]), None,
                  {"loss": 32, "lse": 4, "softmax": 4, "log_softmax": 32}))
    return cases


def exact_checks(report: Report) -> bool:
    """The accuracy contract's hard cases on every path that holds the row."""
    import xentfast as xf
    from xentfast.backends import numba_cuda as B

    ok_all = True
    for name, x, labels, probs, limits in exact_cases():
        dt = x.dtype
        acc = np.dtype(np.float64 if dt == np.float64 else np.float32)
        exact = _decimal_rows(x, labels, probs)
        target = labels if labels is not None else probs
        for path in ("warp", "block", "stream"):
            try:
                with B.tuning(force_path=path):
                    B.plan(x.shape[1], acc, probs is not None, itemsize=dt.itemsize)
            except ValueError:
                continue  # the row does not fit this path
            with B.tuning(force_path=path):
                loss, grad = xf.cross_entropy_with_grad(x, target, reduction="sum",
                                                        backend="cuda")
                loss = xf.cross_entropy(x, target, reduction="none", backend="cuda")
                got = {"loss": loss,
                       "lse": xf.logsumexp(x, backend="cuda"),
                       "softmax": xf.softmax(x, backend="cuda"),
                       "log_softmax": xf.log_softmax(x, backend="cuda"),
                       "grad_y": grad[0, int(labels[0]) if labels is not None else 0]}
            want = {"loss": [r["loss"] for r in exact], "lse": [r["lse"] for r in exact],
                    "softmax": [v for r in exact for v in r["p"]],
                    "log_softmax": [v for r in exact for v in r["lsm"]],
                    "grad_y": [exact[0]["grad"][int(labels[0]) if labels is not None else 0]]}
            measured = {q: _ulps(got[q], want[q], dt) for q in limits}
            good = all(measured[q] <= limits[q] for q in limits)
            text = ", ".join(f"{q} {measured[q]:.2f} ulp (<= {limits[q]})" for q in limits)
            label = f"exact {name} [{path}]: {text}"
            report.checks.append({"check": f"exact {name} [{path}]", "ok": bool(good),
                                  "ulps": measured})
            print(("ok   " if good else "FAIL ") + label, flush=True)
            ok_all &= bool(good)
    return ok_all


# --------------------------------------------------------------------------- (b) timing


def _torch():
    try:
        import torch
    except ImportError as exc:
        return None, f"PyTorch not installed ({exc})"
    if not torch.cuda.is_available():
        return None, "PyTorch has no CUDA device"
    return torch, ""


def _array_kinds():
    """(name, wrap) for the CUDA array libraries present: zero-copy views of a Numba array."""
    kinds = []
    try:
        import cupy

        kinds.append(("cupy", cupy.asarray))
    except Exception:
        pass
    torch, _ = _torch()
    if torch is not None:
        kinds.append(("torch", lambda a: torch.as_tensor(a, device="cuda")))
    return kinds


def profile_api(n: int, c: int, reps: int, top: int = 25) -> None:
    """cProfile of the public calls on Numba device arrays: where the host time goes."""
    import cProfile
    import io
    import pstats

    import xentfast as xf
    from numba import cuda

    x, y = device_inputs(n, c, np.dtype(np.float32))
    grad = cuda.device_array((n, c), np.float32)
    calls = {"loss+grad out=grad": lambda: xf.cross_entropy_with_grad(x, y, out=grad),
             "loss+grad allocating": lambda: xf.cross_entropy_with_grad(x, y),
             "loss": lambda: xf.cross_entropy(x, y)}
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        cuda.synchronize()
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        for _ in range(reps):
            fn()
        cuda.synchronize()
        prof.disable()
        wall = (time.perf_counter() - t) * 1e3 / reps
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        print(f"\n=== profile {n}x{c} float32 {name}: {wall:.3f} ms per call (wall) ===")
        print("\n".join(buf.getvalue().splitlines()[:top + 12]))


def _sweep(n, c, acc, x, y, w0, loss, lse, grad, add, B) -> None:
    """Time every feasible path / cached-word limit / stream launch shape."""
    stream_shapes = [(t, u) for t in (256, 512, 1024) for u in (4, 8)]
    for path in ("warp", "block", "stream"):
        for words in ((16, 20, 32) if path != "stream" else (32,)):
            for threads, unroll in (stream_shapes if path == "stream" else [(None, None)]):
                changes = {"force_path": path, "max_cached_words": words}
                if threads:
                    changes.update(stream_threads=threads, stream_unroll=unroll)
                try:
                    with B.tuning(**changes):
                        p = B.plan(c, acc, False, itemsize=x.dtype.itemsize)
                except ValueError:
                    continue

                def run(changes=changes):
                    with B.tuning(**changes):
                        B.sparse(x, y, w0, -100, 0.0, 0.0, 1.0 / n, loss, lse, grad)

                add(f"sweep {path}", "loss+grad", run,
                    f"team {p.team} x vpt/unroll {p.vpt}, threads={p.threads}, words={words}")


def time_shape(n: int, c: int, dtype, warmup: int, reps: int, report: Report,
               sweep: bool, kernels_only: bool = False) -> None:
    from numba import cuda

    import xentfast as xf
    from xentfast.backends import numba_cuda as B

    dt = np.dtype(dtype)
    acc = np.dtype(np.float64 if dt == np.float64 else np.float32)
    x, y = device_inputs(n, c, dt)
    w0 = cuda.device_array(0, acc)
    loss = cuda.device_array(n, acc)
    lse = cuda.device_array(n, acc)
    grad = cuda.device_array((n, c), dt)
    rows = []

    def add(impl, op, fn, note=""):
        try:
            ms = median_ms(fn, warmup, reps)
            rows.append(Row((n, c), dt.name, op, impl, ms, note=note))
        except Exception as exc:  # a peer failing must not stop the run
            rows.append(Row((n, c), dt.name, op, impl, None, note=f"failed: {exc!r}"[:120]))

    # the harness's yardsticks on the same bytes: copy (read + write), read
    registry = harness.contenders()
    for kind, op in (("copy", "loss+grad"), ("read", "loss")):
        add(kind, op, harness.registry.cuda_yardstick(kind, x, sync=False),
            registry[YARDSTICKS[kind]].summary)

    for op, target in (("loss+grad", grad), ("loss", None)):
        plan = B.plan(c, acc, False, itemsize=dt.itemsize, with_grad=target is not None)
        add("xentfast kernel", op,
            lambda target=target: B.sparse(x, y, w0, -100, 0.0, 0.0, 1.0 / n, loss, lse, target),
            f"{plan.path} {plan.team}x{plan.vpt}")
    if kernels_only:
        _sweep(n, c, acc, x, y, w0, loss, lse, grad, add, B)
        report.rows.extend(rows)
        return
    add("xentfast api", "loss+grad", lambda: xf.cross_entropy_with_grad(x, y, out=grad),
        "mean, out=grad")
    add("xentfast api", "loss+grad", lambda: xf.cross_entropy_with_grad(x, y), "mean, allocating")
    add("xentfast api", "loss", lambda: xf.cross_entropy(x, y), "mean")
    # The same calls on the arrays users hold: CuPy arrays and PyTorch tensors.
    for kind, wrap in _array_kinds():
        try:
            xk, yk = wrap(x), wrap(y)
        except Exception as exc:
            report.skipped.setdefault(f"api on {kind}", repr(exc)[:200])
            continue
        add("xentfast api", "loss+grad", lambda: xf.cross_entropy_with_grad(xk, yk),
            f"mean, allocating, {kind} in")
        add("xentfast api", "loss", lambda: xf.cross_entropy(xk, yk), f"mean, {kind} in")
        del xk, yk

    if sweep:
        _sweep(n, c, acc, x, y, w0, loss, lse, grad, add, B)

    torch, why = _torch()
    if torch is None:
        report.skipped.setdefault("torch", why)
    else:
        import torch.nn.functional as F

        xt = torch.as_tensor(x, device="cuda")
        yt = torch.as_tensor(y, device="cuda")

        def eager_fb():
            xl = xt.detach().requires_grad_(True)
            F.cross_entropy(xl, yt).backward()

        add("torch eager", "loss+grad", eager_fb)
        add("torch eager", "loss", lambda: F.cross_entropy(xt, yt))
        try:
            compiled = torch.compile(lambda a, b: F.cross_entropy(a, b))

            def compiled_fb():
                xl = xt.detach().requires_grad_(True)
                compiled(xl, yt).backward()

            compiled_fb()  # compile outside the timing
            add("torch.compile", "loss+grad", compiled_fb)
        except Exception as exc:
            report.skipped.setdefault("torch.compile", f"failed: {exc!r}"[:200])
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            def liger_fb():
                xl = xt.detach().requires_grad_(True)
                liger_cross_entropy(xl, yt).backward()

            liger_fb()
            add("liger", "loss+grad", liger_fb)
        except Exception as exc:
            report.skipped.setdefault("liger", f"unavailable: {exc!r}"[:200])
        del xt, yt
    report.rows.extend(rows)
    del x, y, grad


# --------------------------------------------------------------------------- main


def machine_info() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "xentfast": getattr(xentfast, "__version__", "?"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import numba
        from numba import cuda

        info["numba"] = numba.__version__
        from xentfast.backends.numba_cuda import SIMULATED, get_tuning

        info["simulated"] = SIMULATED
        info["tuning"] = asdict(get_tuning())
        if not SIMULATED:
            dev = cuda.get_current_device()
            info["gpu"] = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
            info["compute_capability"] = dev.compute_capability
    except Exception as exc:  # pragma: no cover - reporting only
        info["error"] = repr(exc)
    return info


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim-smoke", action="store_true",
                    help="tiny shapes, 1 repeat, no pytest: checks this script under "
                         "NUMBA_ENABLE_CUDASIM=1")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest tests -k cuda")
    ap.add_argument("--skip-checks", action="store_true", help="no kernel-vs-reference checks")
    ap.add_argument("--skip-timing", action="store_true", help="no timing")
    ap.add_argument("--shapes", default=None, metavar="NxC[,NxC...]",
                    help="shapes to time (default: 65536x1000,32768x32000,4096x128000)")
    ap.add_argument("--dtypes", default="float32,float16", help="logit dtypes to time")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true",
                    help="also time each feasible path / register limit / stream block size")
    ap.add_argument("--kernels-only", action="store_true",
                    help="with --sweep: only the copy, the kernels and the sweep (no API, no peers)")
    ap.add_argument("--json", default=None, help="write the report to this file")
    ap.add_argument("--profile", default=None, metavar="NxC",
                    help="cProfile the public calls at this shape (host-side overhead)")
    ap.add_argument("--pytest-args", default="", help="extra arguments for pytest")
    args = ap.parse_args(argv)
    args.shape_list = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
                       if args.shapes else list(SMOKE_SHAPES if args.sim_smoke else SHAPES))
    for s in args.shape_list:
        if len(s) != 2 or min(s) < 1:
            ap.error(f"--shapes wants NxC pairs of positive integers; got {s}")
    args.dtype_list = [np.dtype(d.strip()) for d in args.dtypes.split(",") if d.strip()]
    if args.sim_smoke:
        args.skip_tests = True
        args.warmup, args.reps = 0, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "cuda" not in xentfast.available_backends():
        from xentfast import _dispatch

        print(f"the cuda backend is unavailable: {_dispatch.unavailable_reason('cuda')}")
        return 2
    report = Report(machine=machine_info())
    print(json.dumps(report.machine, indent=1, default=str))
    status = 0
    if not args.skip_tests:
        rc = run_pytest(args.pytest_args.split())
        report.checks.append({"check": "pytest tests -k cuda", "ok": rc == 0, "rc": rc})
        status |= rc != 0
    if not args.skip_checks:
        check_shapes = (SMOKE_SHAPES if args.sim_smoke
                        else ((4_096, 1_000), (256, 32_000), (64, 128_000), (300, 33_000)))
        dtypes = ("float32",) if args.sim_smoke else ("float16", "float32", "float64")
        if not kernel_checks(check_shapes, dtypes, report, rows_checked=3 if args.sim_smoke else 48):
            status = 1
        if not exact_checks(report):
            status = 1
    if args.profile:
        pn, pc = (int(v) for v in args.profile.lower().split("x"))
        profile_api(pn, pc, reps=3 if args.sim_smoke else 30)
    if not args.skip_timing:
        for n, c in args.shape_list:
            for dt in args.dtype_list:
                print(f"timing {n}x{c} {dt.name} ...", flush=True)
                try:
                    time_shape(n, c, dt, args.warmup, args.reps, report, args.sweep,
                               args.kernels_only)
                except Exception:
                    traceback.print_exc()
                    status = 1
        fill_derived(report.rows)
        print()
        print(format_table(report.rows))
        print()
        for line in verdicts(report.rows):
            print(line)
        for name, why in report.skipped.items():
            print(f"skipped {name}: {why}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": report.machine, "checks": report.checks,
                       "rows": [asdict(r) for r in report.rows], "skipped": report.skipped},
                      fh, indent=1, default=str)
    print("gpu_check:", "OK" if status == 0 else "PROBLEMS (see above)")
    return status


if __name__ == "__main__":
    sys.exit(main())
