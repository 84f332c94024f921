"""Corpus perplexity out of core: xentfast.dask on a Zarr array of logits bigger than the
memory of the workers that evaluate it.

Evaluating a language model over a corpus gives one row of logits per token, one column
per vocabulary entry -- more than one machine holds for any real corpus.  This script
plays it through on a local Dask cluster:

1. it writes synthetic logits (tokens x vocabulary, float32; standard normal times 2,
   the next token's logit raised by a random margin in [0, 6), so that the "model" is
   right often and confident sometimes) and the next-token labels into a Zarr store,
   chunk by chunk on the workers: the whole array never exists in memory;
2. it restarts the workers and, in one pass over the logits, computes every token's
   loss (written to another Zarr array) and the corpus perplexity with
   ``xentfast.dask`` -- the loss and perplexity share the kernel pass over each chunk;
   chunks of the vocabulary (``--class-chunks``) are merged exactly;
3. it prints the perplexity, the time, and each worker's peak memory (its resident
   size sampled every 5 ms during step 2) against the size of the logits and the
   workers' combined memory limit.

The default is a few megabytes (a quick check).  The out-of-core run on a 24 GB,
2-core machine -- 3 GB of logits, two workers of 512 MiB each, 64 MiB chunks:

    python examples/corpus_perplexity.py --gigabytes 3 --vocab 32000 --chunk-mb 64 \\
        --workers 2 --memory-limit 512MiB

Each worker holds about one chunk at a time (plus its Python, NumPy, Numba and Dask,
~200 MiB): the limit needs about 200 MiB + 3 chunks.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _logits_block(token_ids, class_ids, labels, boost, *, seed: int):
    """One chunk of synthetic logits, from its position alone (any worker, any order,
    the same numbers for the same chunking): N(0, 1) * 2, the label's entry raised by
    ``boost``."""
    r0, c0 = int(token_ids[0]), int(class_ids[0])
    rng = np.random.default_rng([seed, r0, c0])
    x = rng.standard_normal((len(token_ids), len(class_ids)), dtype=np.float32)
    x *= np.float32(2.0)
    local = np.asarray(labels) - c0
    rows = np.flatnonzero((local >= 0) & (local < len(class_ids)))
    x[rows, local[rows]] += np.asarray(boost, dtype=np.float32)[rows]
    return x


def _create_zarr(path: Path, shape, chunks, dtype):
    """An empty uncompressed Zarr array (random logits do not compress)."""
    import zarr

    if hasattr(zarr, "create_array"):  # zarr 3
        return zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype,
                                 compressors=None, overwrite=True)
    return zarr.open(str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype,
                     compressor=None)


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


def _warm_up() -> bool:
    """Import xentfast and load its kernels on a worker (before its memory is read)."""
    import dask.array as da

    import xentfast.dask as xd

    x = da.from_array(np.zeros((4, 64), np.float32), chunks=(2, 32))
    y = np.zeros(4, np.int64)
    xd.cross_entropy(x, y).compute(scheduler="sync")
    xd.cross_entropy(x.rechunk((2, 64)), y).compute(scheduler="sync")
    return True


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--gigabytes", type=float, default=0.004,
                        help="size of the logits (float32), in GB (default: a quick check)")
    parser.add_argument("--vocab", type=int, default=1000, help="vocabulary size (classes)")
    parser.add_argument("--chunk-mb", type=float, default=0.5,
                        help="chunk size in MiB (rows per chunk follow from it)")
    parser.add_argument("--class-chunks", type=int, default=1,
                        help="chunks along the vocabulary (1: row chunks only)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="512MiB", help="per worker")
    parser.add_argument("--store", default=None,
                        help="directory for the Zarr stores (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import dask.array as da
    import zarr
    from dask.utils import parse_bytes
    from distributed import Client, LocalCluster, progress

    import xentfast.dask as xd

    vocab = args.vocab
    tokens = max(1, int(args.gigabytes * 1e9 // (vocab * 4)))
    width = math.ceil(vocab / args.class_chunks)
    rows = max(1, int(args.chunk_mb * 2**20 // (width * 4)))
    chunks = (rows, width)
    nbytes = tokens * vocab * 4
    limit = parse_bytes(args.memory_limit)
    print(f"logits: {tokens:,} tokens x {vocab:,} classes, float32 = {nbytes / 1e9:.3f} GB "
          f"in chunks of {chunks[0]:,} x {chunks[1]:,} ({_mib(chunks[0] * chunks[1] * 4)}); "
          f"{args.workers} workers of {_mib(limit)} = {args.workers * limit / 1e9:.3f} GB "
          f"({'out of core' if nbytes > args.workers * limit else 'fits in memory'})",
          flush=True)

    with tempfile.TemporaryDirectory(prefix="xentfast-corpus-") as tmp:
        root = Path(args.store) if args.store else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          memory_limit=args.memory_limit, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            # ---- 1. the synthetic corpus, chunk by chunk on the workers
            rng = np.random.default_rng(args.seed)
            labels = rng.integers(0, vocab, tokens).astype(np.int64)
            boost = rng.uniform(0.0, 6.0, tokens).astype(np.float32)
            _create_zarr(root / "labels.zarr", (tokens,), (rows,), np.int64)[...] = labels
            y = da.from_zarr(str(root / "labels.zarr"))
            b = da.from_array(boost, chunks=(rows,))
            logits = da.blockwise(
                _logits_block, "ij", da.arange(tokens, chunks=rows), "i",
                da.arange(vocab, chunks=width), "j", y, "i", b, "i", dtype=np.float32,
                meta=np.empty((0, 0), np.float32), seed=args.seed)
            store = _create_zarr(root / "logits.zarr", (tokens, vocab), chunks, np.float32)
            print("writing the logits:", flush=True)
            t0 = time.perf_counter()
            written = client.compute(da.store(logits, store, lock=False, compute=False))
            progress(written)
            written.result()
            print(f"\nwritten in {time.perf_counter() - t0:.1f} s", flush=True)

            # ---- 2. losses and perplexity, out of core, one pass
            client.restart()
            client.run(_warm_up)
            idle = client.run(_start_rss_sampler)
            X = da.from_zarr(str(root / "logits.zarr"))
            y = da.from_zarr(str(root / "labels.zarr"))
            losses = xd.cross_entropy(X, y, reduction="none")
            ppl = xd.perplexity(X, y)
            out = _create_zarr(root / "losses.zarr", (tokens,), (rows,), np.float32)
            print("per-token losses and perplexity:", flush=True)
            t0 = time.perf_counter()
            jobs = client.compute([da.store(losses, out, lock=False, compute=False), ppl])
            progress(jobs)
            perplexity = float(jobs[1].result())
            jobs[0].result()
            seconds = time.perf_counter() - t0
            peaks = client.run(_stop_rss_sampler)

        token_losses = zarr.open_array(str(root / "losses.zarr"), mode="r")[...]
        print(f"\nperplexity: {perplexity!r}")
        print(f"mean loss: {math.log(perplexity):.6f} nats/token; first losses: "
              f"{np.array2string(token_losses[:5], precision=4)}")
        print(f"evaluated {nbytes / 1e9:.3f} GB in {seconds:.1f} s "
              f"({nbytes / seconds / 1e9:.2f} GB/s)")
        for address, peak in sorted(peaks.items()):
            print(f"peak worker memory: {_mib(peak)} of {_mib(limit)} ({address}; "
                  f"{_mib(peak - idle[address])} above its idle size)")
        print(f"logits {nbytes / 1e9:.3f} GB; workers' combined memory limit "
              f"{args.workers * limit / 1e9:.3f} GB; largest worker peak "
              f"{max(peaks.values()) / 1e9:.3f} GB")
        if args.store:
            print(f"stores kept in {root}: logits.zarr, labels.zarr, losses.zarr")
    return 0


if __name__ == "__main__":
    sys.exit(main())
