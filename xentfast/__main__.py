"""``python -m xentfast``: configuration, self-check and a quick timing table.

Commands
--------
``python -m xentfast``          configuration, self-check, then a timing table for one
                                LLM-like shape (exit code 1 if the self-check fails)
``python -m xentfast info``     configuration only
``python -m xentfast check``    self-check only: every available backend (or those of
                                ``--backends``) against the NumPy reference in float64
                                (exit code 1 on failure)
``python -m xentfast bench``    timing table for your shape, e.g.
                                ``bench --shape 8192 50257 --ops loss loss+grad``

The timing table comes from :mod:`xentfast._bench` (the same core as
``benchmarks/compare.py``): every contender runs in its own process, one at a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from . import _bench, _dispatch, get_backend
from ._api import cross_entropy, cross_entropy_with_grad, log_softmax, logsumexp, softmax

# ------------------------------------------------------------------ configuration


def _config_lines() -> list[str]:
    env = _bench.environment()
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
    line = f"Threads: {_bench.environment()['usable_cpus']} usable CPUs"
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
            lambda: _bench.plain_cross_entropy(_as64(x), y, True))

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


def _contender_names(text: str | None) -> list[str]:
    if text in (None, "quick"):
        return _bench.lineup("quick")
    if text == "all":
        return _bench.lineup("default")
    return [name.strip() for name in text.split(",") if name.strip()]


def _timing(shape: tuple[int, int], ops: Sequence[str], *, dtype: str = "float32",
            labels: str = "index", contenders: str | None = None, rounds: int = 1,
            threads: int | None = None, as_json: bool = False) -> None:
    cases = [_bench.Case(*shape, op=op, dtype=dtype, labels=labels) for op in ops]
    names = _contender_names(contenders)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # before we add ours
    # A short budget per contender (>= 2 repeats, ~0.3 s): this is a quick look;
    # benchmarks/compare.py is the authoritative, several-round measurement.
    records = _bench.compare(cases, names, rounds=rounds, process_per="contender",
                             overlap=None, timing={"target_s": 0.3, "min_repeats": 2},
                             threads=threads)
    if as_json:
        print(json.dumps({"environment": _bench.environment(), "results": records}, indent=1))
        return
    cpus = _bench.environment()["usable_cpus"]
    print(f"Timing {shape[0]}x{shape[1]} {dtype}, {labels} labels; each contender in its "
          f"own process, {rounds} round(s)"
          + (f", {threads} thread(s) each" if threads else "")
          + (f"; load average {load:.1f} on {cpus} CPUs" if load is not None else "")
          + (" (busy machine: expect noise)" if load is not None and load > 0.5 * cpus else ""))
    print(_bench.format_time_table(records))


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xentfast",
        description="Show xentfast's configuration, check every backend against the NumPy "
                    "reference, and time it against plain NumPy and the installed peers "
                    "(PyTorch, TensorFlow, JAX). With no command: all three.",
        epilog="examples:\n  python -m xentfast check --backends cpu\n"
               "  python -m xentfast bench --shape 8192 50257 --ops loss+grad --rounds 3\n"
               "  python -m xentfast bench --shape 4096 32000 --threads 1 --json > out.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--no-timing", action="store_true",
                        help="skip the timing table (configuration and self-check only)")
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
        "bench", help="timing table for a shape",
        description="Time xentfast's backends against plain NumPy, the installed peers and "
                    "the np.copyto roofline, each contender in its own process.")
    bench.add_argument("--shape", nargs=2, type=int, metavar=("N", "C"),
                       default=list(_bench.QUICK_SHAPE),
                       help="rows and classes (default: %d %d)" % _bench.QUICK_SHAPE)
    bench.add_argument("--ops", nargs="+", choices=_bench.ALL_OPS, default=list(_bench.OPS),
                       help="operations (default: loss loss+grad)")
    bench.add_argument("--dtype", choices=_bench.DTYPES, default="float32")
    bench.add_argument("--labels", choices=_bench.LABEL_KINDS, default="index")
    bench.add_argument("--contenders", metavar="NAMES",
                       help="comma-separated names, or 'quick' (default) or 'all'; known: "
                            + ", ".join(_bench.contenders()))
    bench.add_argument("--rounds", type=int, default=1,
                       help="rounds over all contenders; the median is reported (default 1)")
    bench.add_argument("--threads", type=int, metavar="K",
                       help="cap every contender's compute threads at K (default: their own)")
    bench.add_argument("--json", action="store_true",
                       help="print the results as JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "bench":
        if min(args.shape) < 1:
            _parser().error(f"--shape needs positive N and C; got {args.shape}")
        _timing(tuple(args.shape), args.ops, dtype=args.dtype, labels=args.labels,
                contenders=args.contenders, rounds=args.rounds, threads=args.threads,
                as_json=args.json)
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
        _timing(_bench.QUICK_SHAPE, ["loss+grad"])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
