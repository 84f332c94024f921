"""Fused linear cross-entropy, side by side: time and peak memory of the loss and the
gradients of ``hidden @ weight.T`` (N tokens, d features, V classes), float32.

Contenders, each in its own fresh process, alternating over ``--rounds`` rounds (order
rotated each round), median of ``--repeats`` timed calls after one warm-up call:

``matmuls``          the three matmuls alone (z = h W^T, z W, z^T h): the floor
``xentfast-fused``   xentfast.linear_cross_entropy_with_grad (default chunking)
``xentfast-unfused`` h W^T, xentfast.cross_entropy_with_grad(inplace=True), two matmuls
``torch-eager``      F.linear + F.cross_entropy + backward
``torch-chunked``    F.linear_cross_entropy with LinearCrossEntropyOptions (PyTorch's
                     own chunked implementation), + backward

Peak memory: the process's max RSS growth over the first full-size call (``getrusage``),
after the inputs are allocated and a warm-up call on a small problem has run (imports,
JIT and thread pools excluded).

    python benchmarks/bench_linear.py --vocab 32000 128256 --rounds 3
    python benchmarks/bench_linear.py --vocab 8000 16000 32000 64000 128256 --rounds 1 \
        --repeats 1 --contenders xentfast-fused,xentfast-unfused,torch-eager,torch-chunked \
        --plot benchmarks/linear_memory.png          # peak memory against V
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONTENDERS = ["matmuls", "xentfast-fused", "xentfast-unfused", "torch-eager", "torch-chunked"]


def _make_step(name: str, n: int, d: int, v: int):
    import numpy as np

    rng = np.random.default_rng(0)
    h = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((v, d), dtype=np.float32) * 0.05
    y = rng.integers(0, v, n)

    if name.startswith("torch"):
        import torch
        import torch.nn.functional as F

        th = torch.from_numpy(h).requires_grad_()
        tw = torch.from_numpy(w).requires_grad_()
        ty = torch.from_numpy(y)
        if name == "torch-eager":
            def step():
                th.grad = tw.grad = None
                F.cross_entropy(F.linear(th, tw), ty).backward()
        else:
            options = torch.nn.LinearCrossEntropyOptions()

            def step():
                th.grad = tw.grad = None
                F.linear_cross_entropy(th, tw, ty, options=options).backward()
        return step
    import xentfast as xf

    if name == "matmuls":
        def step():
            z = h @ w.T
            z @ w
            z.T @ h
    elif name == "xentfast-fused":
        def step():
            xf.linear_cross_entropy_with_grad(h, w, y)
    else:
        def step():
            z = h @ w.T
            xf.cross_entropy_with_grad(z, y, inplace=True)
            z @ w
            z.T @ h
    return step


def _worker(name: str, n: int, d: int, v: int, repeats: int) -> dict:
    """Warm up on a small problem (imports, JIT, thread pools), then: the max RSS growth
    of the first full-size call (its inputs already allocated), then the timed calls."""
    import resource

    _make_step(name, 64, d, 1000)()
    step = _make_step(name, n, d, v)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_extra_mb": (after - before) / 1024,
            "logits_mb": n * v * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--plot", help="draw peak extra memory against V into this PNG")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, n, d, v, repeats = args.worker
        print(json.dumps(_worker(name, int(n), int(d), int(v), int(repeats))))
        return

    contenders = args.contenders.split(",")
    results = {}
    for v in args.vocab:
        for r in range(args.rounds):
            order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
            for name in order:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", name, str(args.tokens),
                     str(args.dim), str(v), str(args.repeats)],
                    capture_output=True, text=True, env=dict(os.environ))
                if out.returncode:
                    print(f"{name} V={v}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                results.setdefault((v, name), []).append(json.loads(out.stdout.splitlines()[-1]))

    print(f"\nN={args.tokens}, d={args.dim}, float32; median over {args.rounds} rounds\n")
    print("| V | contender | s | x matmuls | peak extra MB | logits MB |")
    print("|---|---|---|---|---|---|")
    table = []
    for v in args.vocab:
        floor = results.get((v, "matmuls"))
        floor_s = statistics.median(x["seconds"] for x in floor) if floor else float("nan")
        for name in contenders:
            runs = results.get((v, name))
            if not runs:
                continue
            s = statistics.median(x["seconds"] for x in runs)
            mem = max(x["peak_extra_mb"] for x in runs)
            row = {"V": v, "contender": name, "seconds": s, "x_matmuls": s / floor_s,
                   "peak_extra_mb": mem, "logits_mb": runs[0]["logits_mb"]}
            table.append(row)
            print(f"| {v} | {name} | {s:.2f} | {s / floor_s:.2f} | {mem:.0f} | "
                  f"{runs[0]['logits_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    if args.plot:
        _plot_memory(table, args.tokens, args.dim, args.plot)


def _plot_memory(table: list, n: int, d: int, path: str) -> None:
    """Peak extra memory of each contender against V (log-log), with the logits' size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    vocab = sorted({row["V"] for row in table})
    ax.plot(vocab, [n * v * 4 / 2**20 for v in vocab], "k:", label="the logits (N x V float32)")
    for name in CONTENDERS:
        rows = sorted((row["V"], row["peak_extra_mb"]) for row in table
                      if row["contender"] == name)
        if rows:
            ax.plot([v for v, _ in rows], [max(m, 1.0) for _, m in rows], "o-", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("classes V")
    ax.set_ylabel("peak extra memory, MB")
    ax.set_title(f"loss + gradients of hidden @ weight.T, N={n}, d={d}, float32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
