"""xentfast.dask on a 2-worker LocalCluster against one xentfast.cross_entropy call.

The logits (float32, ``--rows`` x ``--classes``; the default 32768 x 32000 is 4.2 GB)
are written once to two Zarr stores, uncompressed: row chunks (the whole class axis,
``--chunk-mb`` each) and class chunks (the class axis cut in ``--class-split`` pieces,
blocks of the same size).  Then, best of ``--repeats`` runs, the mean loss:

``single``          one ``xentfast.cross_entropy(x, y)`` on the materialised array, in
                    this process (the cpu backend on every core); timed once at the
                    start and again right after every other contender, whose ratio is
                    taken against that nearest single-call time (the load of a shared
                    machine drifts)
``xentfast.dask``   ``xentfast.dask.cross_entropy(X, y).compute()`` on a LocalCluster of
                    ``--workers`` worker processes of one task thread and
                    ``--kernel-threads`` Numba threads each, the logits read from the
                    Zarr store by the workers (from the page cache after the first run)
``naive-dask``      the composition a user would write: ``m = X.max(-1)``,
                    ``log(exp(X - m).sum(-1)) + m``, the target logits gathered by a
                    one-hot ``where`` and a sum, ``.mean()``
``... persisted``   (``--persist``) the same on logits already held in the workers'
                    memory (``X.persist()``): the computation without the reading

Peak worker memory: each contender runs on freshly restarted workers that have
imported xentfast and run a tiny call (kernels loaded); a thread in each worker samples
its resident size every 5 ms during the runs: "peak" is the largest, "over idle" that
minus the size before the runs (with ``--persist``: the held logits included), compared
with the chunk size.

    python benchmarks/bench_dask.py --persist --worker-memory 6GiB   # 4.2 GB, as recorded
    python benchmarks/bench_dask.py --rows 8192 --persist --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _start_rss_sampler(dask_worker, interval: float = 0.005) -> int:
    """In a worker: sample the process's resident size every ``interval`` seconds on a
    daemon thread, keeping the maximum; returns the size now (the idle size)."""
    import threading

    import psutil

    process = psutil.Process()
    state = {"peak": process.memory_info().rss, "stop": threading.Event()}

    def sample():
        while not state["stop"].wait(interval):
            state["peak"] = max(state["peak"], process.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    dask_worker._xentfast_rss = state
    return state["peak"]


def _stop_rss_sampler(dask_worker) -> int:
    """The maximum resident size the worker's sampler saw."""
    state = dask_worker._xentfast_rss
    state["stop"].set()
    return state["peak"]


def _worker_warm_up():
    """Imports and one tiny call of each path, so that kernels are loaded before the
    idle size is taken."""
    import dask
    import dask.array as da

    import xentfast.dask as xd

    x = da.from_array(np.zeros((8, 400), np.float32), chunks=(4, 200))
    y = np.zeros(8, np.int64)
    dask.compute(xd.cross_entropy(x, y), xd.cross_entropy(x.rechunk((4, 400)), y),
                 scheduler="sync")
    return True


def _naive_loss(X, y):
    import dask.array as da

    m = X.max(axis=-1, keepdims=True)
    lse = da.log(da.exp(X - m).sum(axis=-1)) + m[..., 0]
    classes = da.arange(X.shape[-1], chunks=X.chunks[-1])
    target = da.where(classes[None, :] == y[:, None], X, 0).sum(axis=-1)
    return (lse - target).mean()


def _write_stores(client, root: Path, n: int, c: int, row_chunk: int, class_chunks):
    import dask.array as da

    rows_path = root / "rows.zarr"
    classes_path = root / "classes.zarr"
    labels_path = root / "labels.npy"
    meta = root / "meta.json"
    want = {"rows": n, "classes": c, "row_chunk": row_chunk, "class_chunks": class_chunks}
    if meta.exists() and json.loads(meta.read_text()) == json.loads(json.dumps(want)):
        return rows_path, classes_path, np.load(labels_path)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    x = da.random.default_rng(0).standard_normal((n, c), chunks=(row_chunk, c),
                                                  dtype=np.float32) * np.float32(2.0)
    # da.store with the stores' own chunks: one task writes one Zarr chunk
    da.store(x, _create_zarr(rows_path, (n, c), (row_chunk, c)), lock=False)
    xc = da.from_zarr(str(rows_path), chunks=class_chunks)
    da.store(xc, _create_zarr(classes_path, (n, c), class_chunks), lock=False)
    y = np.random.default_rng(1).integers(0, c, n)
    np.save(labels_path, y)
    meta.write_text(json.dumps(want))
    print(f"wrote the stores in {time.perf_counter() - t0:.1f} s", flush=True)
    return rows_path, classes_path, y


def _create_zarr(path: Path, shape, chunks, dtype=np.float32):
    """An empty uncompressed Zarr array (random logits do not compress)."""
    import zarr

    if hasattr(zarr, "create_array"):  # zarr 3
        return zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype,
                                 compressors=None, overwrite=True)
    return zarr.open(str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype,
                     compressor=None)


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--chunk-mb", type=float, default=256.0)
    parser.add_argument("--class-split", type=int, default=4,
                        help="class chunks per row in the class-chunked store")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-memory", default="4GiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernel-threads", type=int, default=1,
                        help="NUMBA_NUM_THREADS and OMP_NUM_THREADS of each worker (0: "
                             "the libraries' default, every core)")
    parser.add_argument("--store", default=os.path.join(tempfile.gettempdir(),
                                                        "xentfast-bench-dask"))
    parser.add_argument("--persist", action="store_true",
                        help="also time xentfast.dask on logits held in worker memory")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]",
                        help="run only these contenders (e.g. 'xentfast.dask persisted')")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import dask.array as da
    from distributed import Client, LocalCluster, wait

    import xentfast as xf
    import xentfast.dask as xd

    n, c = args.rows, args.classes
    itemsize = 4
    chunk_bytes = int(args.chunk_mb * 2**20)
    row_chunk = max(1, chunk_bytes // (c * itemsize))
    class_width = -(-c // args.class_split)
    class_rows = max(1, chunk_bytes // (class_width * itemsize))
    nbytes = n * c * itemsize
    print(f"logits {n} x {c} float32 = {nbytes / 1e9:.2f} GB; row chunks ({row_chunk}, {c}) "
          f"= {row_chunk * c * 4 / 2**20:.0f} MiB; class chunks ({class_rows}, "
          f"{class_width}) = {class_rows * class_width * 4 / 2**20:.0f} MiB", flush=True)

    results = {"machine": platform.platform(), "cpus": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "rows": n, "classes": c,
               "gigabytes": nbytes / 1e9, "workers": args.workers,
               "worker_memory": args.worker_memory, "runs": []}
    # one kernel thread per worker process (``--kernel-threads``): the workers share
    # the cores between them, as Dask's one task thread each does
    env = ({var: str(args.kernel_threads) for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
           if args.kernel_threads else {})
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                           memory_limit=args.worker_memory, dashboard_address=None,
                           silence_logs=logging.ERROR, env=env)
    client = Client(cluster)
    try:
        rows_path, classes_path, y = _write_stores(
            client, Path(args.store), n, c, row_chunk, (class_rows, class_width))

        # ---- one call on the materialised array, timed again next to every contender
        # (the machine's load drifts: each ratio compares runs minutes apart at most)
        import zarr

        x = zarr.open_array(str(rows_path), mode="r")[...]
        xf.cross_entropy(np.ascontiguousarray(x[:64]), y[:64])  # kernels loaded
        reference = float(xf.cross_entropy(x, y))

        def single_call() -> float:
            return min(_time(lambda: xf.cross_entropy(x, y), args.repeats))

        single = single_call()
        results["runs"].append({"contender": "single", "layout": "whole array",
                                "seconds": single, "gb_per_s": nbytes / single / 1e9})
        print(f"single call: {single:.3f} s = {nbytes / single / 1e9:.2f} GB/s "
              f"(loss {reference:.6f})", flush=True)

        layouts = {"row chunks": (rows_path, (row_chunk, c)),
                   "class chunks": (classes_path, (class_rows, class_width))}
        contenders = [("xentfast.dask", False)]
        if not args.skip_naive:
            contenders.append(("naive-dask", False))
        if args.persist:
            contenders.append(("xentfast.dask persisted", True))
            if not args.skip_naive:
                contenders.append(("naive-dask persisted", True))
        if args.only:
            wanted = {name.strip() for name in args.only.split(",")}
            contenders = [(name, p) for name, p in contenders if name in wanted]
        y_dask = da.from_array(y, chunks=row_chunk)
        for layout, (path, chunks) in layouts.items():
            for name, persisted in contenders:
                client.restart()
                client.run(_worker_warm_up)
                idle = client.run(_start_rss_sampler)
                X = da.from_zarr(str(path))
                held = None
                if persisted:
                    held = X.persist()
                    wait(held)
                    X = held
                graph = _naive_loss(X, y_dask) if name.startswith("naive") else \
                    xd.cross_entropy(X, y_dask)
                values = []
                times = _time(lambda: values.append(float(graph.compute())), args.repeats)
                after = client.run(_stop_rss_sampler)
                del held
                single_now = single_call()
                best = min(times)
                peak = max(after.values())
                over = max(after[w] - idle[w] for w in after)
                chunk_mb = chunks[0] * chunks[1] * 4 / 2**20
                rel = abs(values[-1] - reference) / abs(reference)
                run = {"contender": name, "layout": layout, "seconds": best,
                       "gb_per_s": nbytes / best / 1e9, "single_seconds": single_now,
                       "vs_single": single_now / best,
                       "peak_worker_mib": peak / 2**20,
                       "peak_over_idle_mib": over / 2**20, "chunk_mib": chunk_mb,
                       "over_idle_per_chunk": over / 2**20 / chunk_mb,
                       "loss": values[-1], "relative_difference": rel,
                       "times": times}
                results["runs"].append(run)
                print(f"{name:24s} {layout:12s} {best:7.3f} s {nbytes / best / 1e9:6.2f} GB/s "
                      f"x{single_now / best:5.2f} of the single call ({single_now:.3f} s); "
                      f"peak worker {peak / 2**20:6.0f} MiB ({over / 2**20:5.0f} MiB over "
                      f"idle = {over / 2**20 / chunk_mb:4.2f} chunks); |loss - single| / "
                      f"loss = {rel:.1e}", flush=True)
    finally:
        client.close()
        cluster.close()

    print()
    print("| contender | layout | time (s) | GB/s | × single call (its time then) "
          "| peak worker (MiB) | over idle (chunks) |")
    print("|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        if r["contender"] == "single":
            print(f"| xentfast.cross_entropy, one call | {r['layout']} | {r['seconds']:.3f} "
                  f"| {r['gb_per_s']:.2f} | 1 | | |")
            continue
        print(f"| {r['contender']} | {r['layout']} | {r['seconds']:.3f} | {r['gb_per_s']:.2f} "
              f"| {r['vs_single']:.2f} ({r['single_seconds']:.3f} s) | {r['peak_worker_mib']:.0f} "
              f"| {r['peak_over_idle_mib']:.0f} ({r['over_idle_per_chunk']:.2f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
