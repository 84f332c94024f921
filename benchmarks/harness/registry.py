"""Cases, the traffic model and the contender registry: what every report times.

A :class:`Case` is one problem: ``(n, c)`` logits of one dtype, index or probability
labels, one operation (``"loss"``, ``"loss+grad"``, or a primitive).  A
:class:`Contender` is one way of computing it: an xentfast backend (allocating, with a
preallocated ``out=``, ``inplace=True``, or in a process with buffer reuse off:
``:fresh``), a peer (NumPy written the straightforward way, PyTorch eager and
``torch.compile``'d, TensorFlow and its fused raw op, JAX/optax under ``jit``), or a
**yardstick**: the same bytes copied (``copy-par``: ``dst[:] = src``) or read
(``read-par``: a sum of the bytes) by every core at once.  ``build(case, x, y)`` turns a
contender and a case's arrays into the zero-argument call that is timed.

Traffic model (one, for every table): :func:`xentfast.__main__.traffic_bytes`: logits
read + labels read + the ``(n, c)`` output written (loss+grad, softmax, log_softmax);
the parallel copy moves the logits' bytes twice (read + write), the parallel read once.
A row's ratio is its GB/s over its yardstick's GB/s, same bytes, same run: loss+grad
(and the primitives that write) against ``copy-par``, loss-only against ``read-par``.
The yardsticks live in the package because ``python -m xentfast bench`` needs them too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np

from xentfast.__main__ import (
    OPS,
    PRIMITIVE_OPS,
    make_inputs as _make_inputs,
    parallel_copy,
    parallel_read,
    plain_cross_entropy,
    traffic_bytes,
    yardstick_for,
)

ALL_OPS: tuple[str, ...] = OPS + PRIMITIVE_OPS
LABEL_KINDS: tuple[str, ...] = ("index", "prob")
ITEMSIZE: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
DTYPES: tuple[str, ...] = tuple(ITEMSIZE)
HALF_DTYPES: tuple[str, ...] = ("float16", "bfloat16")
#: The shapes of BENCHMARKS.md: many tiny rows, a classifier, an LLM vocabulary, a
#: very wide vocabulary with few rows (the case a row-per-thread kernel gets wrong).
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = (
    (1_000_000, 10),
    (65_536, 1_000),
    (4_096, 32_000),
    (256, 128_000),
)

Kind = Literal["xentfast", "peer", "yardstick"]

#: The arithmetic yardstick (``% of exp`` in the tables): a call's time is at least the
#: larger of this one's and its memory yardstick's.
EXP_FLOOR = "exp-par"
Builder = Callable[["Case", Any, Any], Callable[[], object]]
UNSUPPORTED = "does not implement"


class Skip(Exception):
    """The contender cannot run this case here (not an error: reported as skipped)."""


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
        return self.elements * ITEMSIZE[self.dtype]

    @property
    def needs_labels(self) -> bool:
        return self.op in OPS

    @property
    def labels_bytes(self) -> int:
        if not self.needs_labels:
            return 0
        return self.n * 8 if self.labels == "index" else self.logits_bytes

    @property
    def group(self) -> str:
        """The pytest-benchmark group: operation x shape (plus dtype/labels if unusual)."""
        extra = "" if (self.dtype, self.labels) == ("float32", "index") else (
            f" {self.dtype} {self.labels}")
        return f"{self.op} {self.n}x{self.c}{extra}"

    def traffic_bytes(self) -> int:
        """Bytes read and written at least once: logits, labels, (n, c) outputs."""
        return traffic_bytes(self.op, self.logits_bytes, self.labels_bytes)


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x32000"`` (underscores allowed) to ``(4096, 32000)``."""
    try:
        n, c = (int(part.replace("_", "")) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a shape is NxC, e.g. 4096x32000; got {text!r}") from None
    return n, c


def make_inputs(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Seeded logits (uniform in [-4, 4)) and labels for ``case`` (None for primitives)."""
    x, y = _make_inputs(case.n, case.c, case.dtype, case.labels, seed)
    return x, (y if case.needs_labels else None)


# ------------------------------------------------------------------ the contenders


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence peers' import-time chatter (TensorFlow's C++ log, deprecations)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _plain_primitive(op: str, x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    if op == "softmax":
        e = np.exp(x - m)
        return e / e.sum(axis=1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    return x - lse if op == "log_softmax" else lse[:, 0]


def _build_xentfast(backend: str, storage: str) -> Builder:
    def build(case: Case, x: Any, y: Any) -> Callable[[], object]:
        import xentfast
        from xentfast import _dispatch

        if case.dtype in HALF_DTYPES and case.dtype not in getattr(
                _dispatch.load(backend), "NATIVE_HALF", ()):
            raise Skip(f"{case.dtype} is not read natively (NATIVE_HALF): it would time "
                       "a float32 copy")
        sync: Callable[[], object] = lambda: None  # noqa: E731
        new_grad = np.zeros_like  # written once: resident before the timed calls
        if backend == "cuda":
            from numba import cuda

            x, y = (cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in (x, y))
            sync, new_grad = cuda.synchronize, cuda.device_array_like
        if case.op in PRIMITIVE_OPS:
            primitive = getattr(xentfast, case.op)
            return lambda: (primitive(x, backend=backend), sync())
        if case.op == "loss":
            return lambda: (xentfast.cross_entropy(x, y, backend=backend), sync())
        options: dict[str, Any] = {"backend": backend}
        if storage == "out":
            options["out"] = new_grad(x)
        elif storage == "inplace":
            options["inplace"] = True
        return lambda: (xentfast.cross_entropy_with_grad(x, y, **options), sync())

    return build


def _build_numpy_plain(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
    if case.op in PRIMITIVE_OPS:
        return lambda: _plain_primitive(case.op, x)
    want_grad = case.op == "loss+grad"
    return lambda: plain_cross_entropy(x, y, want_grad)


def _build_torch(compiled: bool) -> Builder:
    def build(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
        with _quiet():
            import torch
            import torch.nn.functional as F

        xt = torch.from_numpy(x)
        yt = None if y is None else torch.from_numpy(y)
        if case.op in PRIMITIVE_OPS:
            fn = torch.logsumexp if case.op == "logsumexp" else getattr(torch, case.op)
            raw: Callable[..., object] = lambda a, b: fn(a, dim=-1)  # noqa: E731
        else:
            raw = F.cross_entropy
        if compiled:
            raw = torch.compile(raw, dynamic=False)  # one static graph a shape
        if case.op == "loss+grad":
            leaf = torch.from_numpy(x).requires_grad_(True)

            def forward_backward():
                loss = raw(leaf, yt)
                (grad,) = torch.autograd.grad(loss, leaf)
                return loss, grad

            return forward_backward

        def inference():
            with torch.inference_mode():
                return raw(xt, yt)

        return inference

    return build


def _build_tf(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
    with _quiet():
        import tensorflow as tf
    xt = tf.constant(x)
    if case.op in PRIMITIVE_OPS:
        fn = {"softmax": tf.nn.softmax, "log_softmax": tf.nn.log_softmax,
              "logsumexp": tf.reduce_logsumexp}[case.op]
        return lambda: fn(xt, axis=-1)
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
    with _quiet():
        import tensorflow as tf
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
    try:
        import optax

        per_row = (optax.softmax_cross_entropy_with_integer_labels if case.labels == "index"
                   else optax.softmax_cross_entropy)
    except ImportError:  # optax's formula, spelt out
        def per_row(logits, labels):
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            if case.labels == "index":
                return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
            return -(labels * log_probs).sum(axis=-1)

    def loss_fn(logits, labels):
        return per_row(logits, labels).mean()

    jitted = jax.jit(loss_fn if case.op == "loss" else jax.value_and_grad(loss_fn))
    return lambda: jax.block_until_ready(jitted(xj, yj))


def _build_yardstick(kind: str, threads: int | None = None) -> Builder:
    """Every usable core, or the contenders' cap (``--threads`` sets OMP_NUM_THREADS)."""
    def build(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
        cap = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None
        return (parallel_copy if kind == "copy" else parallel_read)(x, cap)

    return build


def _build_exp_floor(case: Case, x: np.ndarray, y: np.ndarray | None) -> Callable[[], object]:
    """One float32 exp (pass 2 of the C kernels: summed, ties counted) per logit, from an
    L1-resident block, on every core the kernels use: the arithmetic floor, no memory.
    (float32 arithmetic: the floor of float32 and 16-bit calls, not of float64 ones.)"""
    if case.dtype == "float64":
        raise Skip("exp-par times the float32 exp: it is no floor of a float64 call")
    from xentfast.backends import cython_shim   # (registers the fork guard)

    elements = case.elements
    return lambda: cython_shim.exp_floor(elements)


def cuda_yardstick(kind: str, x: Any, *, sync: bool = True) -> Callable[[], object]:
    """The device yardstick on ``x``'s bytes (a host array is copied over first):
    ``"copy"`` a device-to-device copy, ``"read"`` a grid-stride sum of 64-bit words.
    ``sync=False`` for callers that time with CUDA events (gpu_check.py)."""
    from numba import cuda

    src = cuda.to_device(x) if isinstance(x, np.ndarray) else x
    done = cuda.synchronize if sync else (lambda: None)
    if kind == "copy":
        dst = cuda.device_array_like(src)
        return lambda: (dst.copy_to_device(src), done())
    flat = src.reshape(src.size).view(np.uint8)
    words = flat[: flat.size // 8 * 8].view(np.uint64)
    kernel = _cuda_read_kernel()
    try:
        blocks = 4 * cuda.get_current_device().MULTIPROCESSOR_COUNT
    except AttributeError:  # the simulator's device
        blocks = 2
    out = cuda.device_array(blocks * 256, np.uint64)
    return lambda: (kernel[blocks, 256](words, out), done())


def _build_cuda_yardstick(kind: str) -> Builder:
    def build(case: Case, x: Any, y: Any) -> Callable[[], object]:
        return cuda_yardstick(kind, x)

    return build


_READ_KERNEL = None
cuda: Any = None  # numba.cuda, a module global once a device yardstick is built


def _cuda_read_kernel():
    """A grid-stride sum of 64-bit words, one partial per thread (bytes read once).
    ``cuda`` is made a module global first: the simulator swaps a kernel's globals."""
    global _READ_KERNEL, cuda
    if _READ_KERNEL is None:
        import numba.cuda

        cuda = numba.cuda

        @cuda.jit
        def read(words, out):
            i = cuda.grid(1)
            step = cuda.gridsize(1)
            total = np.uint64(0)
            while i < words.size:
                total += words[i]
                i += step
            out[cuda.grid(1)] = total

        _READ_KERNEL = read
    return _READ_KERNEL


@dataclass(frozen=True)
class Contender:
    """One way of computing the thing being timed.

    Parameters
    ----------
    name : str
        What tables and ``--contenders`` call it, e.g. ``"xentfast-cpu"``, ``"torch"``.
    kind : {"xentfast", "peer", "yardstick"}
        ``"peer"`` rows define "x best peer"; ``"yardstick"`` rows the "% of" columns.
    summary : str
        What exactly is called, for the table's legend.
    build : callable
        ``build(case, logits, labels) -> fn``; ``fn()`` does one timed call.
    ops : tuple of str
        The operations it implements.
    requires : tuple of str
        Modules that must be importable.
    backend : str, optional
        The xentfast backend it runs (its availability comes from the registry).
    device : {"host", "cuda"}
        Where it computes; a row's yardstick is on the same device.
    grad_storage : {"new", "out", "inplace"}
        Where the gradient goes: a fresh array, a preallocated ``out=``, or the logits.
    env : dict
        Environment variables of its worker process (``:fresh``: buffer reuse off).
    default : bool
        Part of the default line-up of ``compare.py`` (the table of record).
    suite : bool, optional
        Part of the pytest-benchmark suites' default line-up (None: as ``default``; those
        with ``env`` need a process of their own and never are).
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
    env: dict[str, str] = field(default_factory=dict, hash=False)
    default: bool = True
    suite: bool | None = None

    @property
    def in_suite(self) -> bool:
        return not self.env and (self.default if self.suite is None else self.suite)

    def unavailable_reason(self) -> str | None:
        """None when this contender can run here, else why not (imports no peer)."""
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        from xentfast import _dispatch

        if self.backend is not None and _dispatch.unavailable_reason(self.backend):
            return _dispatch.unavailable_reason(self.backend)
        if self.device == "cuda":
            if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
                return "the CUDA simulator is not benchmarked"
            return _dispatch.unavailable_reason("cuda")
        return None

    def supports(self, case: Case) -> bool:
        return case.op in self.ops

    def yardstick(self, case: Case) -> str:
        """The name of the yardstick this row is a percentage of (same device)."""
        suffix = "cuda" if self.device == "cuda" else "par"
        return f"{yardstick_for(case.op)}-{suffix}"

    def traffic_bytes(self, case: Case) -> int:
        if self.name == EXP_FLOOR:   # moves nothing: counted as the op's memory
            return traffic_bytes(yardstick_for(case.op), case.logits_bytes)  # yardstick
        if self.kind == "yardstick":
            return traffic_bytes(self.name.split("-")[0], case.logits_bytes)
        return case.traffic_bytes()

    def output_bytes(self, case: Case) -> int:
        """(n, c) output bytes a call allocates (the gradient or the softmax)."""
        if case.op == "loss+grad":
            return case.logits_bytes if self.grad_storage == "new" else 0
        return case.logits_bytes if case.op in ("softmax", "log_softmax") else 0


_FRESH = {"XENTFAST_BUFFER_CACHE_MB": "0"}
_WRITES = ("loss+grad", "softmax", "log_softmax")
_READS = ("loss", "logsumexp")


def _xentfast_contenders() -> list[Contender]:
    from xentfast._dispatch import KNOWN_BACKENDS

    found = []
    for backend in KNOWN_BACKENDS:
        device = "cuda" if backend == "cuda" else "host"
        base = f"xentfast.cross_entropy[_with_grad](backend={backend!r})"
        found.append(Contender(f"xentfast-{backend}", "xentfast", base,
                               _build_xentfast(backend, "new"), backend=backend, device=device))
        found.append(Contender(
            f"xentfast-{backend}:fresh", "xentfast",
            f"{base}, buffer reuse off (XENTFAST_BUFFER_CACHE_MB=0): a fresh gradient per call",
            _build_xentfast(backend, "new"), ops=("loss+grad",), backend=backend,
            device=device, env=_FRESH, default=backend in ("cpu", "cython")))
        for storage in ("out", "inplace"):
            found.append(Contender(
                f"xentfast-{backend}:{storage}", "xentfast",
                f"{base} with {'a preallocated out=' if storage == 'out' else 'inplace=True'}",
                _build_xentfast(backend, storage), ops=("loss+grad",), backend=backend,
                device=device, grad_storage=storage, default=False))
    return found


def contenders() -> dict[str, Contender]:
    """Every known contender by name, available here or not, in table order."""
    cores = "every usable core (threads, NumPy releases the GIL)"
    registry = _xentfast_contenders() + [
        Contender("numpy-plain", "peer", "NumPy, the straightforward stable formula",
                  _build_numpy_plain),
        Contender("torch", "peer", "torch.nn.functional.cross_entropy eager "
                  "(+ torch.autograd.grad)", _build_torch(False), requires=("torch",)),
        Contender("torch-compile", "peer", "torch.compile(F.cross_entropy, dynamic=False) "
                  "(+ torch.autograd.grad); compiled in the warm-up", _build_torch(True),
                  requires=("torch",), default=False),
        Contender("tf", "peer", "tf.nn.sparse_softmax_cross_entropy_with_logits, "
                  "reduce_mean (+ GradientTape)", _build_tf, requires=("tensorflow",)),
        Contender("tf-raw", "peer",
                  "tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits: fused (loss, backprop)",
                  _build_tf_raw, ops=("loss+grad",), requires=("tensorflow",), default=False,
                  suite=True),
        Contender("jax", "peer", "jax.jit(optax.softmax_cross_entropy_with_integer_labels "
                  "mean; value_and_grad)", _build_jax, requires=("jax",), default=False,
                  suite=True),
        Contender("copy-par", "yardstick", f"dst[:] = logits on {cores}: read + write",
                  _build_yardstick("copy"), ops=_WRITES),
        Contender("read-par", "yardstick", f"a sum of the logits' bytes on {cores}: read",
                  _build_yardstick("read"), ops=_READS),
        Contender(EXP_FLOOR, "yardstick", "the C kernels' float32 exp once per logit "
                  "(their pass 2: summed, ties counted) from an L1-resident block on "
                  f"{cores}: the arithmetic floor of a call, no memory traffic",
                  _build_exp_floor, ops=("loss", "loss+grad"), backend="cython",
                  suite=False),
        Contender("copy-1t", "yardstick", "np.copyto(dst, logits) on one thread (the "
                  "yardstick of the tables before 2026-12)", _build_yardstick("copy", 1),
                  ops=_WRITES, default=False, suite=True),
        Contender("copy-cuda", "yardstick", "device-to-device copy of the logits",
                  _build_cuda_yardstick("copy"), ops=_WRITES, device="cuda"),
        Contender("read-cuda", "yardstick", "a grid-stride sum of the logits' bytes on the "
                  "device", _build_cuda_yardstick("read"), ops=_READS, device="cuda"),
    ]
    return {c.name: c for c in registry}


def lineup(which: Literal["default", "suite", "all"] = "default") -> list[str]:
    """Names of the contenders that can run here, in table order: the table of record's
    (``"default"``), the pytest suites' (``"suite"``), or every one (``"all"``)."""
    chosen = {"default": lambda c: c.default, "suite": lambda c: c.in_suite,
              "all": lambda c: True}[which]
    return [name for name, c in contenders().items()
            if chosen(c) and c.unavailable_reason() is None]


def prepare(name: str, case: Case, x: Any, y: Any) -> Callable[[], object]:
    """``contenders()[name]`` built for ``case``; raises :class:`Skip` with the reason
    when it cannot run here (unavailable, operation not implemented, 16-bit not native)."""
    contender = contenders()[name]
    reason = contender.unavailable_reason()
    if reason is None and not contender.supports(case):
        reason = f"{UNSUPPORTED} {case.op!r}"
    if reason is not None:
        raise Skip(reason)
    return contender.build(case, x, y if case.needs_labels else None)
