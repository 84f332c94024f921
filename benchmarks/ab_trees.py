"""A/B of two source trees of xentfast: the same public calls, side by side in one run.

Each (tree, backend, shape, op) cell runs in a process of its own (PYTHONPATH = that
tree, so each tree brings its own compiled extension and Numba cache), after a warm-up
call; the rounds alternate the trees, and a cell's number is the median over rounds of
each process's median.  For "before/after" checks of a kernel change:

    git worktree add /tmp/before <commit>
    (cd /tmp/before && python setup.py build_ext --inplace -q)
    python benchmarks/ab_trees.py /tmp/before . --rounds 3

prints a Markdown table of milliseconds and the after/before ratio per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SHAPES = [(1_000_000, 10), (65536, 1000), (4096, 32000), (256, 128000)]

_CHILD = r"""
import json, sys, time
import numpy as np
import xentfast as xf
backend, n, c, op, dtype, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
rng = np.random.default_rng(0)
if dtype == "bfloat16":
    import ml_dtypes
    dtype = ml_dtypes.bfloat16
x = rng.standard_normal((n, c), dtype=np.float32).astype(dtype)
y = rng.integers(0, c, n)
if op == "loss":
    call = lambda: xf.cross_entropy(x, y, backend=backend)
else:
    call = lambda: xf.cross_entropy_with_grad(x, y, backend=backend)
call(); call()
times = []
for _ in range(reps):
    t0 = time.perf_counter(); call(); times.append(time.perf_counter() - t0)
print(json.dumps(sorted(times)[len(times) // 2]))
"""


def _cell(tree: str, backend: str, n: int, c: int, op: str, dtype: str, reps: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run([sys.executable, "-c", _CHILD, backend, str(n), str(c), op, dtype,
                          str(reps)], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.abspath(tree))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--backends", default="cpu,cython")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shapes", default=",".join(f"{n}x{c}" for n, c in SHAPES))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    cells = [(b, n, c, op) for (n, c) in shapes for op in ("loss", "loss+grad")
             for b in args.backends.split(",")]
    times = {(tree, *cell): [] for tree in ("before", "after") for cell in cells}
    for r in range(args.rounds):
        for cell in cells:
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for tree in order:
                path = args.before if tree == "before" else args.after
                times[(tree, *cell)].append(_cell(path, *cell, args.dtype, args.reps))
    print("| shape | op | backend | before ms | after ms | after/before |")
    print("|:---|:---|:---|---:|---:|---:|")
    rows = []
    for b, n, c, op in cells:
        before = statistics.median(times[("before", b, n, c, op)]) * 1e3
        after = statistics.median(times[("after", b, n, c, op)]) * 1e3
        rows.append({"shape": f"{n}x{c}", "op": op, "backend": b, "before_ms": before,
                     "after_ms": after, "ratio": after / before})
        print(f"| {n}x{c} | {op} | {b} | {before:.2f} | {after:.2f} | {after / before:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
