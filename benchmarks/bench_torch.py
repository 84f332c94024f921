"""xentfast.torch inside PyTorch autograd, side by side with PyTorch's own cross-entropy.

What is timed: one training step's loss part on CPU tensors -- the forward and the
backward through autograd to the logits (``torch.autograd.grad(loss, logits)``), index
targets, ``reduction="mean"`` -- for

``xentfast.torch``
    ``xentfast.torch.cross_entropy`` (the fused loss+grad kernel in the forward, the
    backward hands back the kept gradient);
``torch eager``
    ``torch.nn.functional.cross_entropy``;
``torch.compile``
    ``torch.compile(F.cross_entropy)`` (Inductor, default mode; compiled during the
    warm-up, not timed).

Each contender runs in its own fresh Python process (one per dtype and round, one
process at a time: thread pools left spinning by one library would slow the next), on
all cores, with every library's default thread count.  A process warms up each shape,
then reports the median of its repeats (``xentfast.__main__.time_call``); contenders
alternate over ``--rounds`` rounds in rotated order and the table shows the median
across rounds.

The adapter's overhead is measured in one process against the NumPy-level call on the
same memory (``xentfast.cross_entropy_with_grad(x.numpy(), y.numpy(), axis=1)``),
interleaving the variants: at 4096 x 32000 (float32) in percent, and per call at 64 x 10.

Usage::

    python benchmarks/bench_torch.py                       # everything (~30 min, 2 cores)
    python benchmarks/bench_torch.py --shapes 4096x32000 --dtypes float32 --rounds 1
    python benchmarks/bench_torch.py --only overhead
    python benchmarks/bench_torch.py --json out.json
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

#: The shapes: many tiny rows, a classifier, an LLM vocabulary, GPT-2's vocabulary,
#: Llama 3's vocabulary with few rows.
SHAPES: tuple[tuple[int, int], ...] = (
    (1_000_000, 10),
    (65_536, 1_000),
    (4_096, 32_000),
    (8_192, 50_257),
    (256, 128_256),
)
DTYPES = ("float32", "bfloat16")
CONTENDERS = ("xentfast.torch", "torch eager", "torch.compile")
OVERHEAD_SHAPES = ((4_096, 32_000), (64, 10))
_MARK = "@@bench-torch"


# --------------------------------------------------------------------------- worker


def _inputs(n: int, c: int, dtype: str, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=generator) * 3).to(getattr(torch, dtype))
    y = torch.randint(0, c, (n,), generator=generator)
    return x, y


def _step(contender: str, x, y) -> Callable[[], object]:
    """One forward + backward through autograd, as a zero-argument callable."""
    import torch
    import torch.nn.functional as F

    leaf = x.detach().requires_grad_(True)
    if contender == "xentfast.torch":
        import xentfast.torch as xft

        loss_fn = xft.cross_entropy
    elif contender == "torch eager":
        loss_fn = F.cross_entropy
    elif contender == "torch.compile":
        loss_fn = torch.compile(F.cross_entropy, dynamic=False)  # one static graph a shape
    else:
        raise ValueError(f"unknown contender {contender!r}")

    def step():
        loss = loss_fn(leaf, y)
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss, grad

    step.loss_fn = loss_fn
    return step


def _time_contender(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import statistics

    import torch

    from xentfast.__main__ import time_call

    records = []
    for n, c in spec["shapes"]:
        x, y = _inputs(n, c, spec["dtype"])
        step = _step(spec["contender"], x, y)
        start = time.perf_counter()
        step()  # warm-up: Numba/Inductor compilation, page faults, thread pools
        warm = time.perf_counter() - start
        times = time_call(step, repeats=3, max_repeats=spec["repeats"],
                          target_s=spec["target_s"])
        records.append({"contender": spec["contender"], "n": n, "c": c,
                        "dtype": spec["dtype"], "median_s": statistics.median(times),
                        "times_s": times, "first_call_s": warm,
                        "threads": torch.get_num_threads()})
        del x, y, step
    return records


def _interleaved(variants: dict[str, Callable[[], object]], rounds: int,
                 min_sample_s: float) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``rounds`` samples each, taken in turns (so a
    slow spell of the machine hits every variant alike)."""
    import math

    numbers = {}
    for name, fn in variants.items():
        fn()
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        numbers[name] = max(1, math.ceil(min_sample_s / max(once, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            number = numbers[name]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - start) / number)
    return samples


def _overhead(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import gc

    import torch

    import xentfast as xf
    import xentfast.torch as xft

    records = []
    for n, c in spec["shapes"]:
        x, y = _inputs(n, c, "float32")
        leaf = x.detach().requires_grad_(True)
        xn, yn = x.numpy(), y.numpy()

        def numpy_level():
            return xf.cross_entropy_with_grad(xn, yn, axis=1)

        def adapter_forward():
            return xft.cross_entropy(leaf, y)

        def adapter_step():
            return torch.autograd.grad(xft.cross_entropy(leaf, y), leaf)

        nothing = _nothing_function()

        def trivial_autograd_step():  # the autograd engine's own cost of a Python node
            return torch.autograd.grad(nothing.apply(leaf), leaf)

        variants = {"numpy-level cross_entropy_with_grad": numpy_level,
                    "xentfast.torch forward (loss+grad kernel)": adapter_forward,
                    "xentfast.torch forward+backward": adapter_step}
        if n * c < 1_000_000:
            variants["autograd.Function doing nothing, forward+backward"] = \
                trivial_autograd_step
        big = n * c >= 10_000_000
        gc.disable()
        try:
            samples = _interleaved(variants, rounds=spec["rounds"] * (3 if big else 30),
                                   min_sample_s=0.0 if big else 5e-3)
        finally:
            gc.enable()
        for name, times in samples.items():
            records.append({"variant": name, "n": n, "c": c, "median_s": statistics.median(times),
                            "min_s": min(times), "samples": len(times)})
    return records


def _threads(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A language-model head's training step, logits = hidden @ weight.T, with the loss
    from ``spec["contender"]``: PyTorch's matmuls (its OpenMP pool) and the loss kernel
    (xentfast's pool) take turns.  Times the loss part inside the step (forward and
    backward to the logits) and alone, in a loop of nothing but loss steps: the
    difference is what the two pools cost each other."""
    import torch

    n, d, c = spec["shape"]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=generator, requires_grad=True)
    weight = (torch.randn(c, d, generator=generator) / d ** 0.5).requires_grad_(True)
    y = torch.randint(0, c, (n,), generator=generator)
    loss_step = _step(spec["contender"], torch.empty(0), y)  # only for the loss function
    loss_fn = loss_step.loss_fn
    in_step, matmuls, whole = [], [], []
    for i in range(spec["steps"] + 2):
        t0 = time.perf_counter()
        logits = hidden @ weight.t()
        t1 = time.perf_counter()
        loss = loss_fn(logits, y)
        (dlogits,) = torch.autograd.grad(loss, logits)
        t2 = time.perf_counter()
        logits.backward(dlogits)
        t3 = time.perf_counter()
        hidden.grad = weight.grad = None
        if i >= 2:  # two warm-up steps
            in_step.append(t2 - t1)
            matmuls.append((t1 - t0) + (t3 - t2))
            whole.append(t3 - t0)
    alone = []
    logits = (hidden @ weight.t()).detach().requires_grad_(True)
    for i in range(spec["steps"] + 2):
        t0 = time.perf_counter()
        loss = loss_fn(logits, y)
        torch.autograd.grad(loss, logits)
        if i >= 2:
            alone.append(time.perf_counter() - t0)
    return [{"contender": spec["contender"], "env": spec.get("env_name", "default"),
             "shape": [n, d, c], "loss_in_step_s": statistics.median(in_step),
             "loss_alone_s": statistics.median(alone), "matmuls_s": statistics.median(matmuls),
             "step_s": statistics.median(whole), "threads": torch.get_num_threads()}]


def _nothing_function():
    """An autograd.Function that computes nothing: a scalar forward, a broadcast
    backward (the fixed cost any Python-defined autograd node pays)."""
    import torch

    class Nothing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.shape = x.shape
            return x.new_zeros(())

        @staticmethod
        def backward(ctx, grad):
            return grad.expand(ctx.shape)

    return Nothing


def _worker(spec: dict[str, Any]) -> None:
    if spec.get("xentfast_backend"):
        import xentfast

        xentfast.set_backend(spec["xentfast_backend"])
    if spec["mode"] == "time":
        records = _time_contender(spec)
    elif spec["mode"] == "threads":
        records = _threads(spec)
    else:
        records = _overhead(spec)
    print(_MARK, json.dumps(records), flush=True)


# --------------------------------------------------------------------------- parent


def _run_worker(spec: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    env = dict(os.environ)
    env.update(spec.get("env", {}))
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


def _environment() -> dict[str, Any]:
    import numpy
    import torch

    import xentfast

    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name")), cpu)
    except OSError:
        pass
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu,
            "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__,
            "xentfast": xentfast.__version__, "xentfast_backend": xentfast.get_backend(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def time_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per shape and dtype, the contenders side by side."""
    by_case: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        key = (r["n"], r["c"], r["dtype"])
        by_case.setdefault(key, {}).setdefault(r["contender"], []).append(r["median_s"])
    lines = ["| shape | dtype | xentfast.torch ms | torch eager ms | torch.compile ms "
             "| x eager | x compiled | xentfast GB/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (n, c, dtype), results in by_case.items():
        med = {k: statistics.median(v) for k, v in results.items()}
        ours = med.get("xentfast.torch")
        eager, compiled = med.get("torch eager"), med.get("torch.compile")
        itemsize = 4 if dtype == "float32" else 2
        gbps = 2 * n * c * itemsize / ours / 1e9 if ours else float("nan")

        def cell(v):
            return _fmt_ms(v) if v else "-"

        def ratio(v):
            return f"{v / ours:.1f}x" if v and ours else "-"

        lines.append(f"| {n:_} x {c:_} | {dtype} | {cell(ours)} | {cell(eager)} | "
                     f"{cell(compiled)} | {ratio(eager)} | {ratio(compiled)} | {gbps:.1f} |")
    return "\n".join(lines)


def overhead_table(records: Sequence[dict[str, Any]]) -> str:
    lines = ["| shape | variant | median | min | vs NumPy-level (median) |",
             "|---|---|---:|---:|---:|"]
    for n, c in sorted({(r["n"], r["c"]) for r in records}, key=lambda s: -s[0] * s[1]):
        rows = [r for r in records if (r["n"], r["c"]) == (n, c)]
        base = next(r for r in rows if r["variant"].startswith("numpy-level"))
        for r in rows:
            big = n * c >= 10_000_000
            unit, scale = ("ms", 1e3) if big else ("us", 1e6)
            diff = r["median_s"] - base["median_s"]
            versus = (f"{diff / base['median_s'] * 100:+.1f}%" if big
                      else f"{diff * 1e6:+.1f} us")
            if r is base:
                versus = "-"
            lines.append(f"| {n:_} x {c:_} | {r['variant']} | {r['median_s'] * scale:.2f} {unit} "
                         f"| {r['min_s'] * scale:.2f} {unit} | {versus} |")
    return "\n".join(lines)


def threads_table(records: Sequence[dict[str, Any]]) -> str:
    lines = ["| loss | environment | loss in the step ms | loss alone ms | matmuls ms "
             "| whole step ms |", "|---|---|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['contender']} | {r['env']} | {r['loss_in_step_s'] * 1e3:.1f} | "
                     f"{r['loss_alone_s'] * 1e3:.1f} | {r['matmuls_s'] * 1e3:.1f} | "
                     f"{r['step_s'] * 1e3:.1f} |")
    return "\n".join(lines)


#: Thread-interplay runs: environment variants of the OpenMP runtimes' idle policy.
THREAD_ENVS = {"default": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}
THREADS_SHAPE = (4_096, 64, 16_000)  # hidden rows, hidden size, classes


def _parse_shape(text: str) -> tuple[int, int]:
    n, c = text.lower().replace("_", "").split("x")
    return int(n), int(c)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("time", "overhead", "threads"))
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, metavar="NxC")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
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
    print(f"<!-- {env['date']}; {env['cpu']}, {env['usable_cpus']} usable CPUs; torch "
          f"{env['torch']}, numpy {env['numpy']}, xentfast {env['xentfast']} "
          f"(backend {args.xentfast_backend or env['xentfast_backend']}); `{env['command']}` -->\n",
          flush=True)
    report: dict[str, Any] = {"environment": env, "config": vars(args)}
    if args.only in (None, "time"):
        shapes = args.shapes or list(SHAPES)
        records = []
        for round_index in range(args.rounds):
            for dtype in args.dtypes:
                order = list(args.contenders)
                shift = round_index % len(order)
                for contender in order[shift:] + order[:shift]:
                    spec = {"mode": "time", "contender": contender, "dtype": dtype,
                            "shapes": shapes, "repeats": args.repeats,
                            "target_s": args.target_time,
                            "xentfast_backend": args.xentfast_backend}
                    print(f"  ... round {round_index + 1}/{args.rounds}: {contender}, {dtype}",
                          file=sys.stderr, flush=True)
                    records += _run_worker(spec, timeout_s=3600)
        report["time"] = records
        print("Forward + backward through autograd (CPU, mean over index targets), "
              "median ms:\n")
        print(time_table(records) + "\n", flush=True)
    if args.only in (None, "overhead"):
        spec = {"mode": "overhead", "shapes": [list(s) for s in OVERHEAD_SHAPES],
                "rounds": args.rounds, "xentfast_backend": args.xentfast_backend}
        print("  ... adapter overhead", file=sys.stderr, flush=True)
        records = _run_worker(spec, timeout_s=3600)
        report["overhead"] = records
        print("Adapter overhead (float32, one process, variants interleaved):\n")
        print(overhead_table(records) + "\n", flush=True)
    if args.only in (None, "threads"):
        records = []
        for round_index in range(args.rounds):
            for env_name, extra in THREAD_ENVS.items():
                for contender in ("xentfast.torch", "torch eager"):
                    spec = {"mode": "threads", "contender": contender, "env": extra,
                            "env_name": env_name, "shape": list(THREADS_SHAPE), "steps": 10,
                            "xentfast_backend": args.xentfast_backend}
                    print(f"  ... threads: {contender}, {env_name}", file=sys.stderr,
                          flush=True)
                    records += _run_worker(spec, timeout_s=3600)
        merged = {}
        for r in records:  # the median over rounds of each field
            merged.setdefault((r["contender"], r["env"]), []).append(r)
        rows = []
        for (contender, env_name), runs in merged.items():
            row = dict(runs[0])
            for key in ("loss_in_step_s", "loss_alone_s", "matmuls_s", "step_s"):
                row[key] = statistics.median(run[key] for run in runs)
            rows.append(row)
        report["threads"] = records
        n, d, c = THREADS_SHAPE
        print(f"Thread pools taking turns: logits = hidden @ weight.T ({n} x {d} @ {d} x {c}), "
              "loss, backward; medians:\n")
        print(threads_table(rows) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
