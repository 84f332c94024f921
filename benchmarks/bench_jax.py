"""xentfast.jax under jax.jit, side by side with optax.

What is timed: ``jax.jit(jax.value_and_grad(mean loss))`` on CPU arrays -- the loss of
a batch of float32 logits with integer labels and its gradient with respect to the
logits, the part of a training step the loss owns -- for

``optax``
    ``optax.softmax_cross_entropy_with_integer_labels(x, y).mean()``;
``xentfast.jax``
    ``xentfast.jax.cross_entropy(x, y)`` (``reduction="mean"`` inside the op: the
    backward hands back the fused kernel's gradient, XLA drops the scaling by 1);
``xentfast.jax rows``
    ``xentfast.jax.softmax_cross_entropy_with_integer_labels(x, y).mean()``, the
    drop-in line (the backward scales the gradient by the per-row cotangent 1/N: one
    more pass over it, in place);
``xentfast.jax callback``
    ``xentfast.jax.cross_entropy`` through ``jax.pure_callback`` instead of the FFI
    handler (not in the default line-up: ``--contenders``).

Each contender runs in its own fresh Python process (one at a time: thread pools left
spinning by one library would slow the next), with every library's default threads.
A process compiles and warms up each shape, then reports the median of its repeats
(``xentfast.__main__.time_call``); contenders alternate over ``--rounds`` rounds in
rotated order and the table shows the median across rounds.  ``--only overhead``
measures the fixed cost of a call at 64 x 10 in one process, the variants interleaved.

Usage::

    python benchmarks/bench_jax.py                          # ~5 min on 2 cores
    python benchmarks/bench_jax.py --shapes 4096x32000 --rounds 1
    python benchmarks/bench_jax.py --contenders optax "xentfast.jax callback"
    python benchmarks/bench_jax.py --only overhead
    python benchmarks/bench_jax.py --xentfast-backend cython
    python benchmarks/bench_jax.py --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: A classifier head, an LLM vocabulary, Llama 3's vocabulary with few rows.
SHAPES: tuple[tuple[int, int], ...] = ((65_536, 1_000), (4_096, 32_000), (256, 128_000))
CONTENDERS = ("optax", "xentfast.jax", "xentfast.jax rows")
ALL_CONTENDERS = CONTENDERS + ("xentfast.jax callback",)
OVERHEAD_SHAPE = (64, 10)
_MARK = "@@bench-jax"


# --------------------------------------------------------------------------- worker


def _inputs(n: int, c: int, seed: int = 0):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    x = jnp.asarray((rng.standard_normal((n, c), dtype=np.float32) * 3))
    y = jnp.asarray(rng.integers(0, c, n).astype(np.int32))
    return x, y


def _mean_loss(contender: str) -> Callable:
    """The contender's mean loss as a function of (logits, labels)."""
    if contender == "optax":
        import optax

        return lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()
    import xentfast.jax as xj

    if contender == "xentfast.jax rows":
        return lambda x, y: xj.softmax_cross_entropy_with_integer_labels(x, y).mean()
    if contender == "xentfast.jax callback":
        xj.HOST_CALL = "callback"  # read when the function is traced
    elif contender != "xentfast.jax":
        raise ValueError(f"unknown contender {contender!r}")
    return lambda x, y: xj.cross_entropy(x, y)


def _step(contender: str, x, y) -> Callable[[], object]:
    import jax

    value_and_grad = jax.jit(jax.value_and_grad(_mean_loss(contender)))

    def step():
        return jax.block_until_ready(value_and_grad(x, y))

    return step


def _time_contender(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import statistics

    from xentfast.__main__ import time_call

    records = []
    for n, c in spec["shapes"]:
        x, y = _inputs(n, c)
        step = _step(spec["contender"], x, y)
        start = time.perf_counter()
        step()  # compilation, Numba kernels, first page faults
        first = time.perf_counter() - start
        times = time_call(step, repeats=3, max_repeats=spec["repeats"],
                          target_s=spec["target_s"])
        records.append({"contender": spec["contender"], "n": n, "c": c,
                        "median_s": statistics.median(times), "times_s": times,
                        "first_call_s": first})
        del x, y, step
    return records


def _overhead(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Seconds per call at a tiny shape, the variants taken in turns."""
    import gc

    import numpy as np

    import xentfast as xf

    n, c = spec["shape"]
    x, y = _inputs(n, c)
    xn, yn = np.asarray(x), np.asarray(y)
    variants = {"NumPy-level cross_entropy_with_grad":
                lambda: xf.cross_entropy_with_grad(xn, yn)}
    for contender in ("optax", "xentfast.jax", "xentfast.jax callback"):
        variants[contender] = _step(contender, x, y)
        variants[contender]()  # traced now, while HOST_CALL says which host call
        import xentfast.jax as xj

        xj.HOST_CALL = "ffi" if xj.FFI_UNAVAILABLE_REASON is None else "callback"
    number = {}
    for name, fn in variants.items():
        fn()
        start = time.perf_counter()
        fn()
        number[name] = max(1, int(5e-3 / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    gc.disable()
    try:
        for _ in range(spec["rounds"]):
            for name, fn in variants.items():
                start = time.perf_counter()
                for _ in range(number[name]):
                    fn()
                samples[name].append((time.perf_counter() - start) / number[name])
    finally:
        gc.enable()
    return [{"variant": name, "n": n, "c": c, "median_s": statistics.median(times),
             "min_s": min(times), "samples": len(times)} for name, times in samples.items()]


def _worker(spec: dict[str, Any]) -> None:
    if spec.get("xentfast_backend"):
        import xentfast

        xentfast.set_backend(spec["xentfast_backend"])  # read when xentfast.jax traces
    records = _time_contender(spec) if spec["mode"] == "time" else _overhead(spec)
    print(_MARK, json.dumps(records), flush=True)


# --------------------------------------------------------------------------- parent


def _run_worker(spec: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                           json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
    raise RuntimeError(f"worker {spec.get('contender', spec['mode'])} failed "
                       f"(exit {proc.returncode}): {tail}")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _environment() -> dict[str, Any]:
    import jax
    import jaxlib
    import numpy

    import xentfast

    try:
        import optax

        optax_version = optax.__version__
    except ImportError:
        optax_version = "not installed"
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name")), cpu)
    except OSError:
        pass
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu,
            "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax_version,
            "numpy": numpy.__version__, "xentfast": xentfast.__version__,
            "xentfast_backend": xentfast.get_backend(),
            "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def time_table(records: Sequence[dict[str, Any]], contenders: Sequence[str]) -> str:
    """Markdown: one row per shape, the contenders side by side, speed-ups vs optax."""
    by_shape: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        by_shape.setdefault((r["n"], r["c"]), {}).setdefault(r["contender"], []).append(
            r["median_s"])
    ours = [c for c in contenders if c != "optax"]
    head = "| shape (float32) | " + " | ".join(f"{c} ms" for c in contenders)
    head += "".join(f" | {c} vs optax" for c in ours if "optax" in contenders) + " |"
    lines = [head, "|---|" + "---:|" * (len(contenders) + len(ours) * ("optax" in contenders))]
    for (n, c), results in by_shape.items():
        med = {k: statistics.median(v) for k, v in results.items()}
        cells = [_fmt_ms(med[k]) if k in med else "-" for k in contenders]
        if "optax" in contenders:
            base = med.get("optax")
            cells += [f"{base / med[k]:.1f}x" if base and k in med else "-" for k in ours]
        lines.append(f"| {n:_} x {c:_} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overhead_table(records: Sequence[dict[str, Any]]) -> str:
    lines = ["| shape | variant | median us | min us |", "|---|---|---:|---:|"]
    for r in records:
        lines.append(f"| {r['n']} x {r['c']} | {r['variant']} | {r['median_s'] * 1e6:.1f} "
                     f"| {r['min_s'] * 1e6:.1f} |")
    return "\n".join(lines)


def _parse_shape(text: str) -> tuple[int, int]:
    n, c = text.lower().replace("_", "").split("x")
    return int(n), int(c)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("time", "overhead"))
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, metavar="NxC")
    parser.add_argument("--contenders", nargs="+", choices=ALL_CONTENDERS,
                        default=list(CONTENDERS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=9, help="most repeats per process")
    parser.add_argument("--target-time", type=float, default=2.0, metavar="S",
                        help="seconds of repeats per shape and process (default 2)")
    parser.add_argument("--xentfast-backend", help="xentfast host backend (default automatic)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0

    env = _environment()
    backend = args.xentfast_backend or env["xentfast_backend"]
    print(f"<!-- {env['date']}; {env['cpu']}, {env['usable_cpus']} usable CPUs; jax "
          f"{env['jax']}, jaxlib {env['jaxlib']}, optax {env['optax']}, numpy {env['numpy']}, "
          f"xentfast {env['xentfast']} (backend {backend}); transparent huge pages "
          f"{env['transparent_hugepage']}; `{env['command']}` -->\n", flush=True)
    report: dict[str, Any] = {"environment": env, "config": vars(args)}
    if args.only in (None, "time"):
        shapes = args.shapes or list(SHAPES)
        records = []
        for round_index in range(args.rounds):
            order = list(args.contenders)
            shift = round_index % len(order)
            for contender in order[shift:] + order[:shift]:
                print(f"  ... round {round_index + 1}/{args.rounds}: {contender}",
                      file=sys.stderr, flush=True)
                spec = {"mode": "time", "contender": contender, "shapes": shapes,
                        "repeats": args.repeats, "target_s": args.target_time,
                        "xentfast_backend": args.xentfast_backend}
                records += _run_worker(spec, timeout_s=3600)
        report["time"] = records
        print("value_and_grad of the mean loss under jax.jit (median over rounds of "
              "per-process medians)\n")
        print(time_table(records, args.contenders), "\n", flush=True)
    if args.only in (None, "overhead"):
        spec = {"mode": "overhead", "shape": OVERHEAD_SHAPE, "rounds": 15 * args.rounds,
                "xentfast_backend": args.xentfast_backend}
        records = _run_worker(spec, timeout_s=1800)
        report["overhead"] = records
        print("Fixed cost of one call (jit value_and_grad; NumPy-level: the fused call "
              "alone)\n")
        print(overhead_table(records), "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
