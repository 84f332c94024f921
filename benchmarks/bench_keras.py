"""One Keras ``train_on_batch`` step with xentfast's loss vs Keras' own, per Keras backend.

The model is a classifier head: 8_192 rows of 512 features -> ``Dense(32_000)`` (logits;
no activation), compiled with ``optimizer="sgd"`` and the loss

``keras``
    ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``;
``xentfast``
    ``xentfast.keras.SparseCategoricalCrossentropy(from_logits=True)`` (the same
    constructor: the fused kernel computes the loss and its gradient in one pass).

A step is forward (matmul + loss), backward (loss gradient + two matmuls) and the SGD
update, so the matmuls (about 0.8 TFLOP per step) bound what the loss can save; the
table also shows the loss's share, timed as the difference of two steps.  Each
(backend, loss) pair runs in its own fresh Python process (Keras reads
``KERAS_BACKEND`` once, at import); a process builds and compiles the model, runs
``--warmup`` steps, then times ``--steps`` steps one by one and reports their median.
Pairs alternate over ``--rounds`` rounds (keras, xentfast, keras, ...); the table gives
the median over rounds.

Usage::

    python benchmarks/bench_keras.py                       # ~10 min on 2 cores
    python benchmarks/bench_keras.py --backends jax --rounds 1 --steps 3
    python benchmarks/bench_keras.py --rows 1024 --classes 4000   # a quick look
    python benchmarks/bench_keras.py --json out.json
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
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("tensorflow", "jax", "torch")
LOSSES = ("keras", "xentfast")
_MARK = "@@bench-keras"


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process whose KERAS_BACKEND is spec["backend"]."""
    import numpy as np

    import keras

    import xentfast.keras as xfk

    rows, features, classes = spec["rows"], spec["features"], spec["classes"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, features), dtype=np.float32)
    y = rng.integers(0, classes, rows).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(classes)])
    if spec["loss"] == "keras":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        loss = xfk.SparseCategoricalCrossentropy(from_logits=True)
    compile_args = {"jit_compile": False} if spec["backend"] == "tensorflow" else {}
    model.compile(optimizer="sgd", loss=loss, **compile_args)
    values = []
    for _ in range(spec["warmup"]):
        values.append(float(model.train_on_batch(x, y)))
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        values.append(float(model.train_on_batch(x, y)))
        times.append(time.perf_counter() - start)
    return {"backend": spec["backend"], "loss": spec["loss"],
            "median_s": statistics.median(times), "min_s": min(times),
            "first_loss": values[0], "last_loss": values[-1]}


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, KERAS_BACKEND=spec["backend"], TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(f"worker {spec['backend']}/{spec['loss']} failed:\n"
                       f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _table(records: list[dict[str, Any]], backends) -> str:
    lines = ["| Keras backend | Keras' loss: step s | xentfast's loss: step s | speed-up | "
             "time saved per step s | first / last loss (Keras, xentfast) |",
             "|---|---:|---:|---:|---:|---|"]
    for backend in backends:
        per = {}
        for loss in LOSSES:
            mine = [r for r in records if r["backend"] == backend and r["loss"] == loss]
            if mine:
                per[loss] = (statistics.median(r["median_s"] for r in mine), mine[-1])
        if len(per) < 2:
            continue
        (tk, rk), (tx, rx) = per["keras"], per["xentfast"]
        lines.append(
            f"| {backend} | {tk:.2f} | {tx:.2f} | {tk / tx:.2f}x | {tk - tx:.2f} | "
            f"{rk['first_loss']:.4f} / {rk['last_loss']:.4f}, "
            f"{rx['first_loss']:.4f} / {rx['last_loss']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--rows", type=int, default=8_192)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--classes", type=int, default=32_000)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the records and the machine here")
    args = parser.parse_args(argv)
    if args.worker:
        print(_MARK + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    records = []
    for round_index in range(args.rounds):
        for backend in args.backends:
            order = LOSSES if round_index % 2 == 0 else LOSSES[::-1]
            for loss in order:
                spec = dict(backend=backend, loss=loss, rows=args.rows,
                            features=args.features, classes=args.classes,
                            warmup=args.warmup, steps=args.steps)
                print(f"  round {round_index + 1}: {backend} / {loss}", file=sys.stderr,
                      flush=True)
                records.append(_run_child(spec))
    print(f"train_on_batch, Dense({args.classes}) on {args.rows} x {args.features} "
          f"float32, SGD; median of {args.steps} steps after {args.warmup} warm-up, "
          f"median over {args.rounds} rounds; {datetime.date.today()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print(_table(records, args.backends))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"records": records, "args": vars(args),
                       "python": sys.version, "platform": platform.platform()}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
