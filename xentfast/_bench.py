"""Timing core shared by ``python -m xentfast bench``, ``benchmarks/compare.py`` and the
pytest-benchmark suite in ``benchmarks/``.

Nothing here is imported by ``import xentfast``; it is a tool, not part of the API.

What is measured
----------------
A *contender* is one way of computing softmax cross-entropy: an xentfast backend, a
peer library (plain NumPy written the straightforward way, PyTorch, TensorFlow, JAX)
or the ``np.copyto`` memory-bandwidth roofline.  A :class:`Case` is one problem:
``(n, c)`` logits of one dtype, index or probability labels, and one operation
(``"loss"``, ``"loss+grad"``, or a primitive: ``"softmax"``, ``"log_softmax"``,
``"logsumexp"``).  :meth:`Contender.build` turns a contender and a case's arrays into a
zero-argument callable; :func:`time_callable` times it: one warm-up call, then the
median of repeats, each repeat ``number`` calls long (``timeit``-style) for tiny cases.

Traffic model (for GB/s): bytes that must cross the memory bus at least once, i.e. the
logits read, the labels read (``n`` int64 class ids, or an ``(n, c)`` probability
array), and every ``(n, c)`` output written (the gradient, or the softmax).  The copy
roofline moves ``2 * logits.nbytes`` (read + write).  Reductions' scalars are ignored.

Isolation
---------
Peers' thread pools keep spinning after their work and slow whatever runs next in the
same process, so :func:`run_specs` times every contender in its own fresh Python
process (``python -m xentfast._bench SPEC``).  A worker imports its library, builds the
inputs, warms up, prints ``READY`` and waits; the parent then lets workers time one at a
time, so a worker's timed loop never overlaps another process's work.  With
``overlap=True`` the (untimed) start-up of all workers runs concurrently, which hides the
seconds TensorFlow takes to import; timing itself stays one process at a time.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

__all__ = [
    "ALL_OPS",
    "DEFAULT_SHAPES",
    "OPS",
    "PRIMITIVE_OPS",
    "QUICK_SHAPE",
    "Case",
    "Contender",
    "compare",
    "contenders",
    "environment",
    "format_coldstart_table",
    "format_memory_table",
    "format_time_table",
    "lineup",
    "make_inputs",
    "measure_coldstart",
    "measure_memory",
    "plain_cross_entropy",
    "run_specs",
    "thread_env",
    "time_callable",
]

OPS: tuple[str, ...] = ("loss", "loss+grad")
PRIMITIVE_OPS: tuple[str, ...] = ("softmax", "log_softmax", "logsumexp")
ALL_OPS: tuple[str, ...] = OPS + PRIMITIVE_OPS
LABEL_KINDS: tuple[str, ...] = ("index", "prob")
DTYPES: tuple[str, ...] = ("float16", "float32", "float64")
#: The shapes of BENCHMARKS.md: many tiny rows, a classifier, an LLM vocabulary, a
#: very wide vocabulary with few rows (the case a row-per-thread kernel gets wrong).
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = (
    (1_000_000, 10),
    (65_536, 1_000),
    (4_096, 32_000),
    (256, 128_000),
)
#: The LLM-like shape of ``python -m xentfast``'s quick table (131 MB of float32 logits:
#: large enough to be memory-bound, small enough to keep the whole run near 20 s).
QUICK_SHAPE: tuple[int, int] = (1_024, 32_000)

Op = Literal["loss", "loss+grad", "softmax", "log_softmax", "logsumexp"]
Kind = Literal["xentfast", "peer", "roofline"]
Builder = Callable[["Case", np.ndarray, "np.ndarray | None"], Callable[[], object]]

_MARK = "@@xentfast-bench"
_UNSUPPORTED = "does not implement"


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One benchmark problem: ``(n, c)`` logits, a dtype, a label kind and an operation."""

    n: int
    c: int
    op: str = "loss+grad"
    dtype: str = "float32"
    labels: str = "index"

    def __post_init__(self) -> None:
        if self.op not in ALL_OPS:
            raise ValueError(f"op must be one of {ALL_OPS}; got {self.op!r}")
        if self.labels not in LABEL_KINDS:
            raise ValueError(f"labels must be one of {LABEL_KINDS}; got {self.labels!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}; got {self.dtype!r}")
        if self.n < 1 or self.c < 1:
            raise ValueError(f"shape must be positive; got {self.n}x{self.c}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.c)

    @property
    def elements(self) -> int:
        return self.n * self.c

    @property
    def logits_bytes(self) -> int:
        return self.elements * np.dtype(self.dtype).itemsize

    @property
    def needs_labels(self) -> bool:
        return self.op in OPS

    @property
    def group(self) -> str:
        """The pytest-benchmark group: operation x shape (plus dtype/labels if unusual)."""
        extra = "" if (self.dtype, self.labels) == ("float32", "index") else (
            f" {self.dtype} {self.labels}")
        return f"{self.op} {self.n}x{self.c}{extra}"

    def traffic_bytes(self) -> int:
        """Bytes read and written at least once: logits, labels, (n, c) outputs."""
        labels = 0
        if self.needs_labels:
            labels = self.n * 8 if self.labels == "index" else self.logits_bytes
        writes = self.logits_bytes if self.op in ("loss+grad", "softmax", "log_softmax") else 0
        return self.logits_bytes + labels + writes


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x32000"`` (underscores allowed) to ``(4096, 32000)``."""
    try:
        n, c = (int(part.replace("_", "")) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a shape is NxC, e.g. 4096x32000; got {text!r}") from None
    return n, c


def make_inputs(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Seeded logits (uniform in [-4, 4)) and labels for ``case``.

    Uniform logits are generated in the target dtype in place (no float64 temporary):
    ~8x faster than normal variates for the 100M-element cases, and exp costs the same.
    Probability labels are a random distribution per row.  Primitives get no labels.
    """
    rng = np.random.default_rng(seed)
    gen_dtype = np.float64 if case.dtype == "float64" else np.float32
    x = rng.random(case.shape, dtype=gen_dtype)
    x *= 8
    x -= 4
    x = x.astype(case.dtype, copy=False)
    if not case.needs_labels:
        return x, None
    if case.labels == "index":
        return x, rng.integers(0, case.c, case.n, dtype=np.int64)
    y = rng.random(case.shape, dtype=gen_dtype)
    y /= y.sum(axis=1, keepdims=True)
    return x, y.astype(case.dtype, copy=False)


# ------------------------------------------------------------------ the contenders


def plain_cross_entropy(x: np.ndarray, y: np.ndarray,
                        want_grad: bool) -> np.floating | tuple[np.floating, np.ndarray]:
    """Mean softmax cross-entropy written the straightforward NumPy way (the baseline).

    ``y`` holds class indices (1-D) or probabilities (``x``'s shape).  Returns the loss,
    and with ``want_grad`` also ``(softmax(x) - onehot(y)) / n``.
    """
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


def _plain_primitive(op: str, x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    if op == "softmax":
        e = np.exp(x - m)
        return e / e.sum(axis=1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    return x - lse if op == "log_softmax" else lse[:, 0]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence peers' import-time chatter (TensorFlow's C++ log, deprecations)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _build_xentfast(backend: str, grad_storage: str) -> Builder:
    def build(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
        import xentfast

        sync: Callable[[], None] = lambda: None  # noqa: E731
        new_grad = np.zeros_like  # written once: resident before the timed calls
        if backend == "cuda":
            from numba import cuda

            x, y = cuda.to_device(x), (None if y is None else cuda.to_device(y))
            sync, new_grad = cuda.synchronize, cuda.device_array_like
        if case.op in PRIMITIVE_OPS:
            primitive = getattr(xentfast, case.op)
            return lambda: (primitive(x, backend=backend), sync())
        if case.op == "loss":
            return lambda: (xentfast.cross_entropy(x, y, backend=backend), sync())
        options: dict[str, Any] = {"backend": backend}
        if grad_storage == "out":
            options["out"] = new_grad(x)
        elif grad_storage == "inplace":
            options["inplace"] = True
        return lambda: (xentfast.cross_entropy_with_grad(x, y, **options), sync())

    return build


def _build_numpy_plain(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
    if case.op in PRIMITIVE_OPS:
        return lambda: _plain_primitive(case.op, x)
    want_grad = case.op == "loss+grad"
    return lambda: plain_cross_entropy(x, y, want_grad)


def _build_torch(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
    with _quiet():
        import torch
        import torch.nn.functional as F

    xt = torch.from_numpy(x)
    yt = None if y is None else torch.from_numpy(y)
    if case.op == "loss+grad":
        leaf = torch.from_numpy(x).requires_grad_(True)

        def forward_backward():
            loss = F.cross_entropy(leaf, yt)
            (grad,) = torch.autograd.grad(loss, leaf)
            return loss, grad

        return forward_backward
    if case.op == "loss":
        fn = lambda: F.cross_entropy(xt, yt)  # noqa: E731
    elif case.op == "logsumexp":
        fn = lambda: torch.logsumexp(xt, dim=-1)  # noqa: E731
    else:
        op = getattr(torch, case.op)
        fn = lambda: op(xt, dim=-1)  # noqa: E731

    def inference():
        with torch.inference_mode():
            return fn()

    return inference


def _import_tf():
    with _quiet():
        import tensorflow as tf
    return tf


def _build_tf(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
    tf = _import_tf()
    xt = tf.constant(x)
    if case.op == "softmax":
        return lambda: tf.nn.softmax(xt, axis=-1)
    if case.op == "log_softmax":
        return lambda: tf.nn.log_softmax(xt, axis=-1)
    if case.op == "logsumexp":
        return lambda: tf.reduce_logsumexp(xt, axis=-1)
    yt = tf.constant(y)
    xent = (tf.nn.sparse_softmax_cross_entropy_with_logits if case.labels == "index"
            else tf.nn.softmax_cross_entropy_with_logits)

    def loss_of(logits):
        return tf.reduce_mean(xent(labels=yt, logits=logits))

    if case.op == "loss":
        return lambda: loss_of(xt)

    def loss_and_grad():
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = loss_of(xt)
        return loss, tape.gradient(loss, xt)

    return loss_and_grad


def _build_tf_raw(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
    tf = _import_tf()
    xt, yt = tf.constant(x), tf.constant(y)
    # The fused kernels behind tf.nn.*: (per-row loss, backprop) in one op.  Its backprop
    # is the gradient of the *sum*; xentfast's "mean" scaling is free inside its kernel.
    op = (tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits if case.labels == "index"
          else tf.raw_ops.SoftmaxCrossEntropyWithLogits)
    return lambda: op(features=xt, labels=yt)


def _build_jax(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
    with _quiet():
        import jax
        import jax.numpy as jnp

        if case.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
    xj = jax.device_put(x)
    if case.op in PRIMITIVE_OPS:
        fn = {"softmax": jax.nn.softmax, "log_softmax": jax.nn.log_softmax,
              "logsumexp": jax.nn.logsumexp}[case.op]
        jitted = jax.jit(lambda a: fn(a, axis=-1))
        return lambda: jitted(xj).block_until_ready()
    yj = jax.device_put(y)

    def loss_fn(logits, labels):
        # optax.softmax_cross_entropy_with_integer_labels, spelt out (optax optional).
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        if case.labels == "index":
            picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
            return -picked.mean()
        return -(labels * log_probs).sum(axis=-1).mean()

    jitted = jax.jit(loss_fn if case.op == "loss" else jax.value_and_grad(loss_fn))
    return lambda: jax.block_until_ready(jitted(xj, yj))


def _build_copy(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
    dst = np.empty_like(x)
    return lambda: np.copyto(dst, x)


def _build_copy_cuda(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
    from numba import cuda

    src, dst = cuda.to_device(x), cuda.device_array_like(x)
    return lambda: (dst.copy_to_device(src), cuda.synchronize())


@dataclass(frozen=True)
class Contender:
    """One way of computing the thing being timed.

    Parameters
    ----------
    name : str
        What tables and ``--contenders`` call it, e.g. ``"xentfast-cpu"``, ``"torch"``.
    kind : {"xentfast", "peer", "roofline"}
        Rows of kind ``"peer"`` define the "x best peer" column; ``"roofline"`` rows
        define "% of copy".
    summary : str
        What exactly is called, for the timing table's legend.
    build : callable
        ``build(case, logits, labels) -> fn``; ``fn()`` does one timed call.
    ops : tuple of str
        The operations it implements.
    requires : tuple of str
        Modules that must be importable.
    backend : str, optional
        The xentfast backend it runs (its availability comes from the registry).
    device : {"host", "cuda"}
        Where it computes; a row's roofline is the copy on the same device.
    grad_storage : {"new", "out", "inplace"}
        Where the gradient goes: a fresh array, a preallocated ``out=``, or the logits.
    default : bool
        Part of the default line-up of ``compare.py`` and the pytest suite.
    quick : bool
        Part of the line-up of ``python -m xentfast`` and ``python -m xentfast bench``.
    """

    name: str
    kind: Kind
    summary: str
    build: Builder
    ops: tuple[str, ...] = ALL_OPS
    requires: tuple[str, ...] = ()
    backend: str | None = None
    device: Literal["host", "cuda"] = "host"
    grad_storage: Literal["new", "out", "inplace"] = "new"
    default: bool = True
    quick: bool = True

    def unavailable_reason(self) -> str | None:
        """None when this contender can run here, else why not (cheap: imports nothing)."""
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        if self.backend is not None:
            from . import _dispatch

            reason = _dispatch.unavailable_reason(self.backend)
            if reason is not None:
                return reason
        if self.device == "cuda":
            if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
                return "the CUDA simulator is not benchmarked"
            from . import _dispatch

            return _dispatch.unavailable_reason("cuda")
        return None

    def supports(self, case: Case) -> bool:
        return case.op in self.ops

    @property
    def roofline(self) -> str:
        """The name of the copy contender this one is compared against."""
        return "copy-cuda" if self.device == "cuda" else "copy"

    def traffic_bytes(self, case: Case) -> int:
        return 2 * case.logits_bytes if self.kind == "roofline" else case.traffic_bytes()

    def output_bytes(self, case: Case) -> int:
        """(n, c) output bytes a call allocates (the gradient or the softmax)."""
        if case.op == "loss+grad":
            return case.logits_bytes if self.grad_storage == "new" else 0
        return case.logits_bytes if case.op in ("softmax", "log_softmax") else 0


def _xentfast_contenders() -> list[Contender]:
    from ._dispatch import KNOWN_BACKENDS

    found = []
    for backend in KNOWN_BACKENDS:
        device = "cuda" if backend == "cuda" else "host"
        base = f"xentfast.cross_entropy[_with_grad](backend={backend!r})"
        found.append(Contender(f"xentfast-{backend}", "xentfast", base,
                               _build_xentfast(backend, "new"), backend=backend, device=device))
        for storage in ("out", "inplace"):
            found.append(Contender(
                f"xentfast-{backend}:{storage}", "xentfast",
                f"{base} with {'a preallocated out=' if storage == 'out' else 'inplace=True'}",
                _build_xentfast(backend, storage), ops=("loss+grad",), backend=backend,
                device=device, grad_storage=storage, default=False, quick=False))
    return found


def contenders() -> dict[str, Contender]:
    """Every known contender by name, available here or not, in table order."""
    registry = _xentfast_contenders() + [
        Contender("numpy-plain", "peer", "NumPy, the straightforward stable formula",
                  _build_numpy_plain),
        Contender("torch", "peer",
                  "torch.nn.functional.cross_entropy (+ torch.autograd.grad)",
                  _build_torch, requires=("torch",)),
        Contender("tf", "peer",
                  "tf.nn.sparse_softmax_cross_entropy_with_logits, reduce_mean "
                  "(+ GradientTape)", _build_tf, requires=("tensorflow",), quick=False),
        Contender("tf-raw", "peer",
                  "tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits: fused (loss, backprop)",
                  _build_tf_raw, ops=("loss+grad",), requires=("tensorflow",)),
        Contender("jax", "peer", "jax.jit(jax.nn.log_softmax + take_along_axis; "
                  "value_and_grad)", _build_jax, requires=("jax",)),
        Contender("copy", "roofline", "np.copyto(dst, logits): read + write bandwidth",
                  _build_copy),
        Contender("copy-cuda", "roofline", "device-to-device copy of the logits",
                  _build_copy_cuda, device="cuda"),
    ]
    return {c.name: c for c in registry}


def lineup(which: Literal["default", "quick"] = "default") -> list[str]:
    """Names of the contenders of a line-up that can run here, in table order."""
    flag = "quick" if which == "quick" else "default"
    return [name for name, c in contenders().items()
            if getattr(c, flag) and c.unavailable_reason() is None]


# ------------------------------------------------------------------------ timing


@dataclass
class Timing:
    """What :func:`time_callable` measured: per-repeat seconds per call."""

    times: list[float]
    number: int
    warmup_s: float

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_callable(
    fn: Callable[[], object],
    *,
    warmup: bool = True,
    min_repeats: int = 3,
    max_repeats: int = 15,
    target_s: float = 1.0,
    min_sample_s: float = 2e-3,
) -> Timing:
    """Time ``fn()`` with ``time.perf_counter``: warm-up, then the median of repeats.

    Parameters
    ----------
    fn : callable
        Zero-argument callable doing one call of the operation.
    warmup : bool, default True
        Make one untimed call first (compilation, page faults, thread-pool start).
    min_repeats, max_repeats : int
        Repeats continue until ``min_repeats`` are done and ``target_s`` has passed, or
        ``max_repeats`` are done.
    target_s : float, default 1.0
        Time budget of the repeats.
    min_sample_s : float, default 2 ms
        A repeat runs ``fn`` ``number`` times in a row, ``number`` chosen so one repeat
        lasts at least this long (so that microsecond calls are not timer noise).  The
        call that sizes ``number`` is the first repeat when ``number`` is 1.

    Returns
    -------
    Timing
        ``times`` holds seconds per call, one entry per repeat.
    """
    warm = 0.0
    if warmup:
        t0 = time.perf_counter()
        fn()
        warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()  # the calibration call sizes `number`; a slow call is the first repeat
    once = time.perf_counter() - t0
    number = 1 if once >= min_sample_s else min(100_000, math.ceil(min_sample_s / max(once, 1e-7)))
    times: list[float] = [once] if number == 1 else []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while len(times) < max_repeats and (
            len(times) < min_repeats or time.perf_counter() - start < target_s
        ):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - t0) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(times, number, warm)


# ---------------------------------------------------------------- process isolation


def _current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss()


def _peak_rss() -> int:
    """``getrusage`` max RSS in bytes (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _record(name: str, case: Case, **fields: Any) -> dict[str, Any]:
    """A result record: the contender, the case, its traffic, then ``fields``."""
    contender = contenders()[name]
    record = {"contender": name, "kind": contender.kind, "device": contender.device,
              **asdict(case), "bytes": contender.traffic_bytes(case),
              "status": "ok", "reason": ""}
    record.update(fields)
    return record


def _spec_cases(spec: dict[str, Any]) -> list[Case]:
    return [Case(**case) for case in spec["cases"]]


def _prepare(spec: dict[str, Any]) -> Callable[[], list[dict[str, Any]]]:
    """Worker side, before READY: import, build inputs, warm up.  Returns the measurement.

    A "time" spec may hold several cases (the quick table times every operation of a
    contender in one process); a "memory" spec holds one, since a peak is per process.
    """
    name = spec["contender"]
    contender = contenders()[name]
    reason = contender.unavailable_reason()
    if reason is not None:
        raise _Skip(reason)
    cases = _spec_cases(spec)
    if spec["mode"] == "memory":
        (case,) = cases
        # Compile / initialise on a small case with the same row length (the same code
        # paths), so that neither the JIT nor the imports set the peak; then allocate
        # the real inputs (the new peak so far).
        tiny = replace(case, n=min(case.n, 16))
        warm = contender.build(tiny, *make_inputs(tiny))
        warm()
        warm()
        x, y = make_inputs(case)
        fn = contender.build(case, x, y)
        inputs = x.nbytes + (0 if y is None else y.nbytes)

        def measure_memory_once() -> list[dict[str, Any]]:
            gc.collect()
            rss_before, peak_before = _current_rss(), _peak_rss()
            fn()
            peak_after = _peak_rss()
            return [_record(name, case, inputs_bytes=inputs,
                            outputs_bytes=contender.output_bytes(case), rss_before=rss_before,
                            peak_before=peak_before, peak_after=peak_after,
                            extra_peak_bytes=peak_after - rss_before,
                            exact=peak_after > peak_before)]

        return measure_memory_once
    inputs: dict[Case, tuple[np.ndarray, np.ndarray | None]] = {}
    fns = []
    for case in cases:  # cases differing only in op share their inputs
        key = replace(case, op="loss" if case.needs_labels else "softmax")
        if key not in inputs:
            inputs[key] = make_inputs(key, seed=spec.get("seed", 0))
        fn = contender.build(case, *inputs[key])
        fn()  # warm-up: compilation, page faults, thread pools
        fns.append(fn)

    def measure_time() -> list[dict[str, Any]]:
        records = []
        for case, fn in zip(cases, fns):
            timing = time_callable(fn, warmup=False, **spec.get("timing", {}))
            median = timing.median
            record = _record(name, case, times_s=timing.times, number=timing.number,
                             median_s=median)
            record["gbps"] = record["bytes"] / median / 1e9
            record["elements_per_s"] = case.elements / median
            records.append(record)
        return records

    return measure_time


class _Skip(Exception):
    """The contender cannot run here (not an error)."""


def _emit(tag: str, payload: Any) -> None:
    sys.stdout.write(f"{_MARK} {tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


def _failed(spec: dict[str, Any], status: str, reason: str) -> list[dict[str, Any]]:
    return [_record(spec["contender"], case, status=status, reason=reason)
            for case in _spec_cases(spec)]


def _worker(spec: dict[str, Any]) -> None:
    """Entry point of ``python -m xentfast._bench SPEC``: prepare, READY, wait, measure."""
    try:
        measure = _prepare(spec)
    except _Skip as exc:
        _emit("RESULT", _failed(spec, "skipped", str(exc)))
        return
    except BaseException as exc:  # reported to the parent, which carries on
        _emit("RESULT", _failed(spec, "error", _describe(exc)))
        return
    _emit("READY", {})
    sys.stdin.readline()  # the parent's GO: nothing else is running now
    try:
        results = measure()
    except BaseException as exc:
        results = _failed(spec, "error", _describe(exc))
    _emit("RESULT", results)


def _describe(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)
    place = f" (at {os.path.basename(where[-1].filename)}:{where[-1].lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300] + place


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables capping every library's compute threads at ``threads``.

    OpenMP (PyTorch, the Cython backend), Numba, BLAS, TensorFlow's intra-op pool; JAX
    (XLA) can only be told "one thread", which it is for ``threads == 1``.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1; got {threads}")
    env = {var: str(threads) for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                                         "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                         "TF_NUM_INTRAOP_THREADS")}
    env["TF_NUM_INTEROP_THREADS"] = "1"
    if threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: this xentfast first on the path, peers quiet."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.update(extra or {})
    return env


class _WorkerProcess:
    """A running worker: start it, wait for READY, send GO, collect its RESULT."""

    def __init__(self, spec: dict[str, Any], timeout_s: float) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xentfast._bench", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=_child_env(thread_env(spec["threads"]) if spec.get("threads") else None),
        )
        self.results: list[dict[str, Any]] | None = None

    def _next_message(self) -> tuple[str, Any] | None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # peers may print their own lines: skip them
            if line.startswith(_MARK):
                _, tag, payload = line.rstrip("\n").split(" ", 2)
                return tag, json.loads(payload)
        return None

    def wait_ready(self) -> None:
        message = self._next_message()
        if message is None:
            self.results = self._crashed()
        elif message[0] == "RESULT":  # skipped or failed while preparing
            self.results = message[1]
            self._close()

    def go(self) -> list[dict[str, Any]]:
        if self.results is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("GO\n")
            self.proc.stdin.flush()
            message = self._next_message()
            self.results = message[1] if message else self._crashed()
            self._close()
        return self.results

    def _close(self) -> None:
        try:
            self.proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        self.stderr.close()

    def _crashed(self) -> list[dict[str, Any]]:
        self.proc.wait()
        self.stderr.seek(0)
        tail = " | ".join(self.stderr.read().strip().splitlines()[-3:])
        self.stderr.close()
        return _failed(self.spec, "error",
                       f"worker exited with code {self.proc.returncode}: {tail}"[:500])


def _overlap_fits(specs: Sequence[dict[str, Any]]) -> bool:
    """Whether every worker can hold its inputs at once (~4 logits' worth per case)."""
    need = sum(4 * case.logits_bytes for spec in specs for case in _spec_cases(spec))
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return False
    return need < min(4 << 30, free // 4)


def run_specs(
    specs: Sequence[dict[str, Any]], *, overlap: bool | None = False, timeout_s: float = 600.0
) -> list[dict[str, Any]]:
    """Run worker specs, each in a fresh process; timed parts run one at a time.

    Parameters
    ----------
    specs : sequence of dict
        ``{"mode": "time" | "memory", "contender": name, "cases": [asdict(Case), ...],
        "timing": {time_callable options}, "threads": int or None}``.
    overlap : bool or None, default False
        Start every worker at once so their imports and warm-ups overlap, then let them
        time one after another.  None: overlap when their inputs fit comfortably in RAM.
    timeout_s : float
        Limit for one worker's measurement.

    Returns
    -------
    list of dict
        One record per spec and case, in order, ``status`` "ok", "skipped" or "error".
    """
    if overlap is None:
        overlap = _overlap_fits(specs)
    if overlap:
        workers = [_WorkerProcess(spec, timeout_s) for spec in specs]
        for worker in workers:
            worker.wait_ready()
        return [record for worker in workers for record in worker.go()]
    records = []
    for spec in specs:
        worker = _WorkerProcess(spec, timeout_s)
        worker.wait_ready()
        records += worker.go()
    return records


def _spec(mode: str, name: str, cases: Sequence[Case], timing: dict[str, Any] | None = None,
          threads: int | None = None) -> dict[str, Any]:
    return {"mode": mode, "contender": name, "cases": [asdict(c) for c in cases],
            "timing": timing or {}, "threads": threads}


def _runnable(names: Sequence[str], case: Case) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Split ``names`` into those that can run ``case`` here and "skipped" records."""
    registry = contenders()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; known: {', '.join(registry)}")
    runnable, skipped = [], {}
    for name in names:
        reason = registry[name].unavailable_reason()
        if reason is None and not registry[name].supports(case):
            reason = f"{_UNSUPPORTED} {case.op!r}"
        if reason is None:
            runnable.append(name)
        else:
            skipped[name] = _record(name, case, status="skipped", reason=reason)
    return runnable, skipped


def compare(
    cases: Sequence[Case],
    names: Sequence[str],
    *,
    rounds: int = 3,
    process_per: Literal["case", "contender"] = "case",
    overlap: bool | None = False,
    timing: dict[str, Any] | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every contender on every case, each run in its own process, over rounds.

    Each round runs every contender once, in an order rotated by one each round (so no
    contender always follows the same neighbour); a contender's result is the median
    across rounds of its per-process medians.

    Parameters
    ----------
    cases : sequence of Case
    names : sequence of str
        Contender names (see :func:`contenders`); ones that cannot run a case are
        reported as skipped with the reason.
    rounds : int, default 3
    process_per : {"case", "contender"}, default "case"
        A fresh process for every (case, contender), or one per contender that times
        all its cases in turn (faster start-up; what the quick CLI table does).
    overlap : bool or None
        See :func:`run_specs`.
    timing : dict, optional
        Options for :func:`time_callable` in the workers.
    threads : int, optional
        Cap every library's threads (see :func:`thread_env`); default: theirs.
    progress : callable, optional
        Called with a one-line message per finished round.

    Returns
    -------
    list of dict
        One record per (case, contender), cases outer: ``median_s`` (median across
        rounds), ``rounds_s`` (each round's median), ``gbps``, ``elements_per_s``,
        ``status``.
    """
    runnable_for: dict[Case, list[str]] = {}
    skipped: dict[Case, dict[str, dict[str, Any]]] = {}
    for case in cases:
        runnable_for[case], skipped[case] = _runnable(names, case)
    if process_per == "case":
        plan = [([case], runnable_for[case]) for case in cases]
    else:  # one batch: every contender, timing all the cases it can run
        plan = [(list(cases), list(dict.fromkeys(n for c in cases for n in runnable_for[c])))]
    measured: dict[tuple[Case, str], list[dict[str, Any]]] = {}
    for batch_cases, batch_names in plan:
        for r in range(rounds if batch_names else 0):
            k = r % len(batch_names)
            order = batch_names[k:] + batch_names[:k]
            specs = [_spec("time", name, [c for c in batch_cases if name in runnable_for[c]],
                           timing, threads) for name in order]
            for record in run_specs(specs, overlap=overlap):
                key = (Case(**_case_fields(record)), record["contender"])
                measured.setdefault(key, []).append(record)
            if progress:
                progress(f"{', '.join(c.group for c in batch_cases)}: round {r + 1}/{rounds}")
    return [skipped[case][name] if name in skipped[case]
            else _aggregate(measured.get((case, name), []), case, name)
            for case in cases for name in names]


def _case_fields(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("n", "c", "op", "dtype", "labels")}


def _aggregate(runs: list[dict[str, Any]], case: Case, name: str) -> dict[str, Any]:
    """One record from a contender's rounds: the median of the per-round medians."""
    ok = [run for run in runs if run["status"] == "ok"]
    if not ok:
        return runs[-1] if runs else _record(name, case, status="error", reason="no result")
    medians = [run["median_s"] for run in ok]
    median = statistics.median(medians)
    record = dict(ok[0], median_s=median, rounds_s=medians,
                  gbps=ok[0]["bytes"] / median / 1e9, elements_per_s=case.elements / median)
    record.pop("times_s", None)
    return record


# ------------------------------------------------------------------ memory, cold start


def measure_memory(
    cases: Sequence[Case], names: Sequence[str], *, overlap: bool | None = False,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Peak extra memory of one call, each (case, contender) in a fresh process.

    The worker compiles on a tiny case, allocates the inputs, then reads the current RSS
    and ``getrusage`` max RSS around one call: ``extra_peak_bytes`` is the call's peak
    above what was resident before it (the gradient it returns included).
    ``exact`` is False when an earlier peak (imports) hid the call's own.
    """
    records = []
    for case in cases:
        runnable, skipped = _runnable(names, case)
        records += skipped.values()
        records += run_specs([_spec("memory", n, [case], threads=threads) for n in runnable],
                             overlap=overlap)
    return records


_COLDSTART_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import xentfast
t2 = time.perf_counter()
record = {"import_numpy_s": t1 - t0, "import_xentfast_s": t2 - t1}
backend = sys.argv[1]
if backend:
    rng = np.random.default_rng(0)
    x = rng.random((1024, 1000), dtype=np.float32)
    y = rng.integers(0, 1000, 1024)
    t3 = time.perf_counter()
    xentfast.cross_entropy_with_grad(x, y, backend=backend)
    t4 = time.perf_counter()
    xentfast.cross_entropy_with_grad(x, y, backend=backend)
    t5 = time.perf_counter()
    record.update(first_call_s=t4 - t3, second_call_s=t5 - t4)
print("@@xentfast-bench RESULT " + json.dumps(record))
"""


def _coldstart_process(backend: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _COLDSTART_CODE, backend],
                          capture_output=True, text=True, env=_child_env(env), timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line.split(" ", 2)[2])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"error": f"exit code {proc.returncode}: {tail}"[:500]}


def measure_coldstart(backends: Sequence[str], *, repeats: int = 3) -> list[dict[str, Any]]:
    """Import time and first-call latency, in fresh processes.

    ``import xentfast`` is timed alone (NumPy imported first) ``repeats`` times.  For
    each backend, a first call of ``cross_entropy_with_grad`` on 1024x1000 float32 is
    timed with an empty temporary ``NUMBA_CACHE_DIR`` (first call ever: JIT compile),
    then ``repeats`` times with that cache warm (load from the disk cache).  The second
    call of the same process is the steady-state reference.

    Returns
    -------
    list of dict
        ``{"what", "backend", "seconds", "steady_s"}`` records (medians).
    """
    imports = [_coldstart_process("") for _ in range(repeats)]
    good = [r for r in imports if "error" not in r]
    records: list[dict[str, Any]] = [
        {"what": "import numpy", "backend": "", "seconds": _median_of(good, "import_numpy_s")},
        {"what": "import xentfast", "backend": "",
         "seconds": _median_of(good, "import_xentfast_s")},
    ]
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="xentfast-numba-cache-") as cache:
            env = {"NUMBA_CACHE_DIR": cache}
            cold = _coldstart_process(backend, env)
            warm = [_coldstart_process(backend, env) for _ in range(repeats)]
        for what, runs in (("first call, cache cleared", [cold]),
                           ("first call, cache warm", warm)):
            ok = [r for r in runs if "error" not in r]
            error = next((r["error"] for r in runs if "error" in r), "")
            records.append({"what": what, "backend": backend,
                            "seconds": _median_of(ok, "first_call_s"),
                            "steady_s": _median_of(ok, "second_call_s"), "error": error})
    return records


def _median_of(records: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------- reporting


def _pkg_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


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
    """Machine, date and versions, read without importing any peer library."""
    from . import __version__

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    versions = {"python": platform.python_version(), "xentfast": __version__}
    for dist in ("numpy", "numba", "numba-cuda", "torch", "tensorflow", "tensorflow-cpu",
                 "jax", "jaxlib", "optax"):
        version = _pkg_version(dist)
        if version is not None:
            versions[dist] = version
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "versions": versions,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_time_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table: shape, op, contender, ms, GB/s, x best peer, % of copy.

    ``x best peer`` is the fastest peer's time divided by the row's time (above 1: faster
    than every peer); ``% of copy`` is the row's GB/s over the same-device copy's GB/s.
    Skipped and failed contenders are listed under the table.
    """
    rows, notes = [], []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        key = (rec["n"], rec["c"], rec["op"], rec["dtype"], rec["labels"])
        groups.setdefault(key, []).append(rec)
    registry = contenders()
    for (n, c, op, dtype, labels), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        peers = [r["median_s"] for r in ok if r["kind"] == "peer"]
        best_peer = min(peers) if peers else None
        copies = {r["contender"]: r["gbps"] for r in ok if r["kind"] == "roofline"}
        shape = f"{n}x{c}" + ("" if (dtype, labels) == ("float32", "index") else f" {dtype} {labels}")
        for r in group:
            if r["status"] != "ok":
                if not r["reason"].startswith(_UNSUPPORTED):  # by design, not news
                    notes.append(f"- {r['contender']} ({op} {n}x{c}): {r['status']}: "
                                 f"{r['reason']}")
                continue
            copy = copies.get(registry[r["contender"]].roofline)
            rows.append([
                shape, op, r["contender"], _fmt(r["median_s"] * 1e3), _fmt(r["gbps"]),
                f"{best_peer / r['median_s']:.2f}" if best_peer and r["kind"] != "roofline" else "-",
                f"{100 * r['gbps'] / copy:.0f}" if copy else "-",
            ])
    table = _markdown(["shape", "op", "contender", "ms", "GB/s", "x best peer", "% of copy"],
                      rows, "llrrrrr")
    legend = ("\nms: median across rounds of each process's median; GB/s: (logits read + labels "
              "read + gradient written) / time; x best peer: fastest peer's time / this time; "
              "% of copy: this GB/s / np.copyto's GB/s (read + write).")
    shown = dict.fromkeys(r["contender"] for r in records if r["status"] == "ok")
    legend += "\n\nContenders:\n" + "\n".join(
        f"- {name}: {registry[name].summary}" for name in shown)
    return table + legend + ("\n\nNot measured:\n" + "\n".join(notes) if notes else "")


def format_memory_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`measure_memory` records (MB = 10**6 bytes)."""
    rows, notes = [], []
    for r in records:
        if r["status"] != "ok":
            if not r["reason"].startswith(_UNSUPPORTED):
                notes.append(f"- {r['contender']} ({r['op']} {r['n']}x{r['c']}): "
                             f"{r['status']}: {r['reason']}")
            continue
        logits = r["n"] * r["c"] * np.dtype(r["dtype"]).itemsize
        temporaries = max(r["extra_peak_bytes"] - r["outputs_bytes"], 0)  # page rounding
        rows.append([
            f"{r['n']}x{r['c']}", r["op"], r["contender"], f"{r['inputs_bytes'] / 1e6:.0f}",
            f"{r['outputs_bytes'] / 1e6:.0f}", f"{r['extra_peak_bytes'] / 1e6:.0f}"
            + ("" if r["exact"] else " (<=)"), f"{temporaries / 1e6:.0f}",
            f"{r['extra_peak_bytes'] / logits:.2f}",
        ])
    table = _markdown(["shape", "op", "contender", "inputs MB", "outputs MB",
                       "call peak MB", "temporaries MB", "peak / logits"], rows, "lllrrrrr")
    legend = ("\ncall peak: max RSS during the call above the RSS just before it (getrusage); "
              "temporaries: call peak - outputs; (<=): an earlier peak hid the call's.")
    return table + legend + ("\n\nNot measured:\n" + "\n".join(notes) if notes else "")


def format_coldstart_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`measure_coldstart` records."""
    rows = [[r["what"], r["backend"] or "-", _fmt(r["seconds"] and r["seconds"] * 1e3),
             _fmt(r.get("steady_s") and r["steady_s"] * 1e3), r.get("error", "")]
            for r in records]
    return _markdown(["what", "backend", "ms", "steady call ms", "error"], rows, "llrrl")


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
