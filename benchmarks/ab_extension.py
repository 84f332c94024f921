"""In-process A/B of two builds of the Cython extension on its raw kernels.

Both trees' ``xentfast/backends/_cython*.so`` are loaded into one process (under the
module name each was built for) and called alternately on the same arrays, so the two
builds see the same memory, caches and clock; min and median per build, their ratio
(new / old), and whether the outputs are bitwise the same.  For kernel changes too small
for ``ab_trees.py``'s process-per-cell noise:

    git worktree add /tmp/before <commit>
    (cd /tmp/before && python setup.py build_ext --inplace -q)
    python benchmarks/ab_extension.py /tmp/before . 65536 1000 --op grad --labels dense \\
        --smoothing 0.1
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import time

import numpy as np


def _load(tree: str):
    (path,) = glob.glob(os.path.join(tree, "xentfast", "backends", "_cython*.so"))
    spec = importlib.util.spec_from_file_location("xentfast.backends._cython", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("n", type=int)
    p.add_argument("c", type=int)
    p.add_argument("--op", choices=["loss", "grad"], default="grad")
    p.add_argument("--labels", choices=["sparse", "dense"], default="sparse")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--smoothing", type=float, default=0.0)
    p.add_argument("--reps", type=int, default=30)
    a = p.parse_args()
    dt = np.dtype(a.dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.n, a.c)).astype(dt)
    if a.labels == "sparse":
        y = rng.integers(0, a.c, a.n)
    else:
        y = rng.dirichlet(np.ones(a.c) * 0.5, a.n).astype(dt)
    w = np.empty(0, dt)
    builds = {}
    for key, tree in (("old", a.old), ("new", a.new)):
        outs = (np.empty(a.n, dt), np.empty(a.n, dt),
                np.empty((a.n, a.c), dt) if a.op == "grad" else None)
        builds[key] = (_load(tree), outs)

    def call(key):
        module, (loss, lse, grad) = builds[key]
        if a.labels == "sparse":
            module.sparse(x, y, w, -100, a.smoothing, 0.0, 1.0, loss, lse, grad)
        else:
            module.dense(x, y, w, a.smoothing, 0.0, 1.0, loss, lse, grad)

    for key in ("old", "new", "old", "new"):
        call(key)
    same = all(u is None or np.array_equal(u.view(np.uint8), v.view(np.uint8))
               for u, v in zip(builds["old"][1], builds["new"][1]))
    times = {"old": [], "new": []}
    for r in range(a.reps):
        for key in (("old", "new") if r % 2 == 0 else ("new", "old")):
            t0 = time.perf_counter()
            call(key)
            times[key].append(time.perf_counter() - t0)
    o, n = (np.array(times[k]) * 1e3 for k in ("old", "new"))
    print(f"{a.n}x{a.c} {a.labels} {a.op} {a.dtype} smoothing={a.smoothing}: "
          f"old min {o.min():.3f} med {np.median(o):.3f} ms | new min {n.min():.3f} "
          f"med {np.median(n):.3f} ms | new/old min {n.min() / o.min():.3f} med "
          f"{np.median(n) / np.median(o):.3f} | bitwise same: {same}")


if __name__ == "__main__":
    main()
