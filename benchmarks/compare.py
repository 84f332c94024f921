"""The table of record behind BENCHMARKS.md: xentfast, the peers and the yardsticks.

Every contender (``harness.contenders()``: xentfast's host backends, allocating and with
buffer reuse off; NumPy written plainly, PyTorch, TensorFlow; the all-core yardsticks
``copy-par`` and ``read-par``) runs in its own fresh Python process, one process at a
time, alternating over ``--rounds`` rounds with the order rotated each round; a process
warms up, then times each operation of its shape; the table shows the median across
rounds of the per-process medians (``benchmarks/harness/runner.py``: how, and why not
pyperf).  Ratios: loss+grad as a % of the parallel copy of the logits, loss-only as a %
of the parallel read, and "x best peer".

Modes
-----
``time`` (default)
    Markdown table: shape, op, contender, ms, GB/s, x best peer, % of copy, % of read.
``memory``
    Peak memory of one call (``getrusage`` max RSS in a fresh process) against the
    inputs' and outputs' sizes, including ``inplace=True`` and ``out=`` variants.
``coldstart``
    ``import xentfast`` time; first call in a fresh process with the Numba disk cache
    warm; first call ever, with an empty temporary ``NUMBA_CACHE_DIR``.
``all``
    The three, in that order.

Examples
--------
The table of record (about 10 minutes on 2 cores; run on a quiet machine)::

    python benchmarks/compare.py --json bench.json
    python benchmarks/plot.py bench.json -o benchmarks/throughput.png

With 16-bit rows (the backends that read float16/bfloat16 natively, and the
yardsticks), every call on fresh memory, or narrower::

    python benchmarks/compare.py --dtypes float32 float16 bfloat16
    python benchmarks/compare.py --buffer-reuse off --ops loss+grad
    python benchmarks/compare.py --shapes 4096x32000 --contenders xentfast-cpu,torch,copy-par
    python benchmarks/compare.py --contenders all --labels prob
    python benchmarks/compare.py --mode memory --shapes 4096x32000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness package
try:
    import xentfast  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402

#: Shape of the memory measurement when --shapes is not given.
MEMORY_SHAPES: tuple[tuple[int, int], ...] = ((4_096, 32_000),)


def _names(text: str | None, mode: str, dtype: str = "float32") -> list[str]:
    """Contenders: the given ones (or ``all``), else the default line-up.  16-bit cases
    keep the xentfast contenders whose backend reads the dtype natively, and the
    yardsticks.  Memory mode adds the ``:inplace`` and ``:out`` variants and drops the
    yardsticks and ``:fresh`` (a peak is per process: reuse plays no part)."""
    registry = harness.contenders()
    if text and text != "all":
        return [name.strip() for name in text.split(",") if name.strip()]
    names = harness.lineup("all" if text == "all" else "default")
    if mode == "memory":
        out = []
        for name in names:
            if registry[name].kind == "yardstick" or name.endswith(":fresh"):
                continue
            out.append(name)
            out += [f"{name}:{v}" for v in ("inplace", "out") if f"{name}:{v}" in registry]
        return list(dict.fromkeys(out))
    if dtype in harness.HALF_DTYPES:
        from xentfast import _dispatch

        def native(name: str) -> bool:
            backend = registry[name].backend
            return dtype in getattr(_dispatch.load(backend), "NATIVE_HALF", ())

        keep = [n for n in names if registry[n].kind == "xentfast" and native(n)]
        return keep + [n for n in names if registry[n].kind == "yardstick"] if keep else []
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Contenders (default ones marked *): " + ", ".join(
            name + ("*" if c.default else "") for name, c in harness.contenders().items()),
    )
    parser.add_argument("--mode", choices=("time", "memory", "coldstart", "all"),
                        default="time")
    parser.add_argument("--shapes", nargs="+", type=harness.parse_shape, metavar="NxC",
                        help="e.g. 4096x32000 256x128000 (default: the four BENCHMARKS.md "
                             "shapes; memory mode: 4096x32000)")
    parser.add_argument("--ops", nargs="+", choices=harness.ALL_OPS,
                        default=list(harness.OPS))
    parser.add_argument("--dtypes", nargs="+", choices=harness.DTYPES, default=["float32"],
                        help="logits dtypes (default float32); float16/bfloat16 rows time "
                             "the backends that read them natively, and the yardsticks")
    parser.add_argument("--labels", choices=harness.LABEL_KINDS, default="index")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all contenders (default 3)")
    parser.add_argument("--contenders", metavar="NAMES",
                        help="comma-separated names, or 'all' (default: the default ones "
                             "that can run here)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed samples per process at least (default 3)")
    parser.add_argument("--max-repeats", type=int, default=15,
                        help="timed samples per process at most (default 15)")
    parser.add_argument("--target-time", type=float, default=0.3, metavar="S",
                        help="seconds of samples per operation and process, once --repeats "
                             "are done (default 0.3)")
    parser.add_argument("--buffer-reuse", choices=("on", "off"), default="on",
                        help="off: every worker runs with XENTFAST_BUFFER_CACHE_MB=0 (a fresh "
                             "gradient per call; the :fresh contenders do this per row)")
    parser.add_argument("--threads", type=int, metavar="K",
                        help="cap every contender's compute threads at K (OpenMP, Numba, "
                             "TensorFlow; JAX only for K=1; the yardsticks too); default: "
                             "each library's own")
    parser.add_argument("--json", metavar="OUT", help="also write everything to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; returns the exit code."""
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    modes = ("time", "memory", "coldstart") if args.mode == "all" else (args.mode,)
    report: dict[str, Any] = {"environment": harness.environment(), "config": vars(args)}
    env = report["environment"]
    load = env["load_average"]
    print(f"<!-- {env['date']}; {env['cpu']}, {env['usable_cpus']} usable CPUs"
          + (f", load average {load:.1f}" if load is not None else "") + "; "
          + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + " -->\n")
    extra_env: dict[str, str] = {}
    if args.threads:
        extra_env.update(harness.thread_env(args.threads))
    if args.buffer_reuse == "off":
        extra_env["XENTFAST_BUFFER_CACHE_MB"] = "0"

    def progress(message: str) -> None:
        print(f"  ... {message} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
              flush=True)

    if "time" in modes:
        report["results"] = []
        timing = {"repeats": args.repeats, "max_repeats": args.max_repeats,
                  "target_s": args.target_time}
        for dtype in args.dtypes:
            names = _names(args.contenders, "time", dtype)
            if not names:
                print(f"{dtype}: no backend reads it natively here (NATIVE_HALF); skipped\n")
                continue
            cases = [harness.Case(n, c, op=op, dtype=dtype, labels=args.labels)
                     for n, c in args.shapes or harness.DEFAULT_SHAPES for op in args.ops]
            records = harness.compare(cases, names, rounds=args.rounds, timing=timing,
                                      extra_env=extra_env, progress=progress)
            for r in records:
                r["buffer_reuse"] = args.buffer_reuse == "on" and not r["contender"].endswith(
                    ":fresh")
            print(harness.format_time_table(records) + "\n")
            report["results"] += records
    if "memory" in modes:
        cases = [harness.Case(n, c, op=op, dtype=dtype, labels=args.labels)
                 for dtype in args.dtypes for n, c in args.shapes or MEMORY_SHAPES
                 for op in args.ops if op in harness.OPS]
        report["memory"] = harness.measure_memory(cases, _names(args.contenders, "memory"),
                                                  extra_env=extra_env)
        print(harness.format_memory_table(report["memory"]) + "\n")
    if "coldstart" in modes:
        registry = harness.contenders()
        backends = dict.fromkeys(registry[n].backend for n in harness.lineup()
                                 if registry[n].backend and registry[n].device == "host")
        report["coldstart"] = harness.measure_coldstart(list(backends))
        print(harness.format_coldstart_table(report["coldstart"]) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    print(f"compare.py: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
