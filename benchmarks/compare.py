"""The authoritative side-by-side benchmark behind BENCHMARKS.md.

Every contender (xentfast backends, plain NumPy, PyTorch, TensorFlow, JAX, and the
``np.copyto`` roofline) is timed in its own fresh Python process, one process at a
time: peers' thread pools keep spinning after their work and would slow whatever ran
next in a shared process.  Contenders alternate over ``--rounds`` rounds with the order
rotated each round; each process warms up, then reports the median of its repeats; the
table shows the median across rounds.  The timing core is :mod:`xentfast._bench`
(shared with ``python -m xentfast bench`` and the pytest-benchmark suite).

Modes
-----
``time`` (default)
    Markdown table: shape, op, contender, ms, GB/s, x best peer, % of np.copyto.
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
The BENCHMARKS.md numbers (tens of minutes on 2 cores; run on a quiet machine)::

    python benchmarks/compare.py --mode all --rounds 5 --json bench.json
    python benchmarks/plot.py bench.json -o benchmarks.png

Narrower runs::

    python benchmarks/compare.py --shapes 4096x32000 --ops loss+grad --rounds 3
    python benchmarks/compare.py --contenders xentfast-cpu,torch,copy --labels prob
    python benchmarks/compare.py --mode memory --shapes 4096x32000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

try:
    from xentfast import _bench
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from xentfast import _bench

#: Shape of the memory measurement when --shapes is not given.
MEMORY_SHAPES: tuple[tuple[int, int], ...] = ((4_096, 32_000),)


def _names(text: str | None, mode: str) -> list[str]:
    """Contenders: the given ones, else the default line-up; memory mode adds the
    ``:inplace`` and ``:out`` variants and drops the copy (it measures nothing there)."""
    if text:
        return [name.strip() for name in text.split(",") if name.strip()]
    if mode != "memory":
        return _bench.lineup("default")
    registry = _bench.contenders()
    names = []
    for name in _bench.lineup("default"):
        if registry[name].kind == "roofline":
            continue
        names.append(name)
        names += [f"{name}:{v}" for v in ("inplace", "out") if f"{name}:{v}" in registry]
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Contenders: " + ", ".join(_bench.contenders()),
    )
    parser.add_argument("--mode", choices=("time", "memory", "coldstart", "all"),
                        default="time")
    parser.add_argument("--shapes", nargs="+", type=_bench.parse_shape, metavar="NxC",
                        help="e.g. 4096x32000 256x128000 (default: the four BENCHMARKS.md "
                             "shapes; memory mode: 4096x32000)")
    parser.add_argument("--ops", nargs="+", choices=_bench.ALL_OPS, default=list(_bench.OPS))
    parser.add_argument("--dtype", choices=_bench.DTYPES, default="float32")
    parser.add_argument("--labels", choices=_bench.LABEL_KINDS, default="index")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all contenders (default 3)")
    parser.add_argument("--contenders", metavar="NAMES",
                        help="comma-separated names (default: every available default one)")
    parser.add_argument("--repeats", type=int, default=15,
                        help="most repeats per process (at least 3; default 15)")
    parser.add_argument("--target-time", type=float, default=1.0, metavar="S",
                        help="seconds of repeats per process, once 3 are done (default 1)")
    parser.add_argument("--threads", type=int, metavar="K",
                        help="cap every contender's compute threads at K (OpenMP, Numba, "
                             "TensorFlow; JAX only for K=1); default: each library's own")
    parser.add_argument("--overlap-setup", action="store_true",
                        help="start a round's processes together (imports and warm-ups "
                             "overlap; timing stays one at a time); needs RAM for every "
                             "contender's inputs at once")
    parser.add_argument("--json", metavar="OUT", help="also write everything to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; returns the exit code."""
    args = _parser().parse_args(argv)
    modes = ("time", "memory", "coldstart") if args.mode == "all" else (args.mode,)
    report: dict[str, Any] = {"environment": _bench.environment(), "config": vars(args)}
    env = report["environment"]
    print(f"<!-- {env['date']}; {env['cpu']}, {env['usable_cpus']} usable CPUs; "
          + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + " -->\n")

    def progress(message: str) -> None:
        print(f"  ... {message}", file=sys.stderr, flush=True)

    if "time" in modes:
        shapes = args.shapes or _bench.DEFAULT_SHAPES
        cases = [_bench.Case(n, c, op=op, dtype=args.dtype, labels=args.labels)
                 for n, c in shapes for op in args.ops]
        report["results"] = _bench.compare(
            cases, _names(args.contenders, "time"), rounds=args.rounds,
            overlap=args.overlap_setup, threads=args.threads, progress=progress,
            timing={"max_repeats": args.repeats, "target_s": args.target_time})
        print(_bench.format_time_table(report["results"]) + "\n")
    if "memory" in modes:
        shapes = args.shapes or MEMORY_SHAPES
        cases = [_bench.Case(n, c, op=op, dtype=args.dtype, labels=args.labels)
                 for n, c in shapes for op in args.ops if op in _bench.OPS]
        report["memory"] = _bench.measure_memory(cases, _names(args.contenders, "memory"),
                                                 threads=args.threads)
        print(_bench.format_memory_table(report["memory"]) + "\n")
    if "coldstart" in modes:
        registry = _bench.contenders()
        backends = [registry[n].backend for n in _bench.lineup("default")
                    if registry[n].backend]
        report["coldstart"] = _bench.measure_coldstart(backends)
        print(_bench.format_coldstart_table(report["coldstart"]) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
