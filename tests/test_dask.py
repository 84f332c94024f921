"""xentfast.dask: Dask-array logits chunked along rows and classes, against the exact
oracle (tests/naive.py) with the single-array accuracy bounds (tests/helpers.py
``ULPS``), and against xentfast on the materialised array.

Chunkings (reason in CHUNKINGS) x label options x dtypes on the synchronous
scheduler; -inf-only chunks, ignored rows, other axes, the primitives, perplexity,
labels chunked differently, bad labels raised from the task, laziness, the size and
serialisability of the graph, one pass shared by the loss and the gradient; then the
threaded scheduler, a dask.distributed LocalCluster of two worker processes (a worker
killed mid-computation is retried), and examples/corpus_perplexity.py at a tiny size.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import naive  # noqa: E402
import xentfast as xf  # noqa: E402
import xentfast.dask as xd  # noqa: E402
from helpers import (  # noqa: E402
    HOST_BACKENDS,
    LOSS_RTOL_FLOAT64,
    REDUCED_LOSS_ULPS,
    ULPS,
    accuracy_case,
    accuracy_probabilities,
    assert_accurate,
    oracle_inputs,
)

ROOT = Path(__file__).resolve().parents[1]
N, C = 24, 64

#: Chunkings of the (24, 64) logits (reason): "whole" -- one block, the fused kernel;
#: "rows" -- ragged row blocks, the class axis whole (fused kernel per block);
#: "classes" -- class chunks, merged statistics; "both" -- rows and classes;
#: "ragged" -- uneven blocks, a single-row and a single-class one; "single_classes" --
#: one class per chunk, a deep merge tree (split_every=3).
CHUNKINGS = {
    "whole": ((N, C), None),
    "rows": ((5, C), None),
    "classes": ((N, 10), None),
    "both": ((7, 9), None),
    "ragged": (((1, 20, 3), (1, 40, 2, 21)), None),
    "single_classes": ((N, 1), 3),
}

#: Label options (reason): index labels plain; with weights, ignored rows, smoothing
#: and z-loss (every term of the merge); probability labels with all of them.
OPTIONS = {
    "plain": ("sparse", {}),
    "all": ("sparse", {"weight": True, "ignore": True, "label_smoothing": 0.1,
                       "z_loss": 1e-4}),
    "dense_all": ("dense", {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-4}),
}


def _seed(*parts) -> np.random.Generator:
    import zlib

    return np.random.default_rng(zlib.crc32("-".join(map(str, parts)).encode()))


def _problem(dtype_name: str, option: str, n: int = N, c: int = C, kind: str = "mixed"):
    dtype = np.dtype(dtype_name)
    rng = _seed("dask", dtype_name, option, n, c, kind)
    case = accuracy_case(rng, kind, n, c, dtype)
    label, opts = OPTIONS[option]
    opts = dict(opts)
    kwargs: dict[str, Any] = {}
    if opts.pop("weight", False):
        kwargs["weight"] = rng.uniform(0.5, 2.0, c)
    if label == "sparse":
        labels = case.y.copy()
        if opts.pop("ignore", False):
            labels[1::4] = -100
    else:
        labels = accuracy_probabilities(rng, case, "soft").astype(dtype)
    kwargs.update(opts)
    return case.x, labels, kwargs, case.row_kinds


def _exact(x, labels, kwargs, reduction, axis=-1):
    o_x, o_labels, o_kwargs = oracle_inputs(x, labels, kwargs, x.dtype)
    return naive.exact_cross_entropy(o_x, o_labels, axis=axis, reduction=reduction,
                                     **o_kwargs)


def _dask_labels(labels, chunks):
    if labels.dtype.kind == "f":
        return da.from_array(labels, chunks=chunks)
    return da.from_array(labels, chunks=(chunks[0],))


# ----------------------------------------------------------------------- chunkings


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_chunkings(chunking, option, dtype_name):
    """Per-row losses, the mean and the gradient of the mean within the bounds, for
    every chunking; and the same special values as one xentfast call."""
    x, labels, kwargs, row_kinds = _problem(dtype_name, option)
    chunks, split_every = CHUNKINGS[chunking]
    X = da.from_array(x, chunks=chunks)
    Y = _dask_labels(labels, X.chunks)
    rows = xd.cross_entropy(X, Y, reduction="none", split_every=split_every, **kwargs)
    mean, grad = xd.cross_entropy_with_grad(X, Y, split_every=split_every, **kwargs)
    assert isinstance(rows, da.Array) and isinstance(grad, da.Array)
    assert grad.chunks == X.chunks
    rows, mean, grad = dask.compute(rows, mean, grad, scheduler="sync")
    assert rows.dtype == x.dtype and mean.dtype == x.dtype and grad.dtype == x.dtype
    exact_rows = _exact(x, labels, kwargs, "none")
    exact_mean = _exact(x, labels, kwargs, "mean")
    assert_accurate(rows, exact_rows["loss"], x.dtype, "per-row loss", ULPS["loss"],
                    LOSS_RTOL_FLOAT64, row_kinds)
    assert_accurate(mean, exact_mean["loss"], x.dtype, "mean", REDUCED_LOSS_ULPS,
                    LOSS_RTOL_FLOAT64)
    assert_accurate(grad, exact_mean["grad"], x.dtype, "grad of the mean", ULPS["grad"],
                    row_kinds=row_kinds)
    single = xf.cross_entropy(x, labels, reduction="none", **kwargs)
    np.testing.assert_array_equal(np.isnan(rows), np.isnan(single))
    np.testing.assert_array_equal(np.isinf(rows), np.isinf(single))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("chunking", ["rows", "both"])
def test_backends(backend, chunking):
    """backend= reaches the kernels inside the tasks (the fused kernel of that backend;
    its statistics kernel, or the fallback for backends without one)."""
    x, labels, kwargs, row_kinds = _problem("float32", "all")
    X = da.from_array(x, chunks=CHUNKINGS[chunking][0])
    rows, grad = dask.compute(*xd.cross_entropy_with_grad(X, labels, reduction="none",
                                                          backend=backend, **kwargs),
                              scheduler="sync")
    exact = _exact(x, labels, kwargs, "none")
    assert_accurate(rows, exact["loss"], x.dtype, "loss", ULPS["loss"], row_kinds=row_kinds)
    assert_accurate(grad, exact["grad"], x.dtype, "grad", ULPS["grad"], row_kinds=row_kinds)


def test_class_chunked_gradient_follows_backend(monkeypatch):
    """backend="numpy" computes the class-chunked gradient with the NumPy path, as it
    does the statistics, even where the cpu backend's compiled gradient exists."""
    from xentfast import _shards

    calls = []
    real = _shards.grad_rows_numpy
    monkeypatch.setattr(_shards, "grad_rows_numpy",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    x, labels, kwargs, _ = _problem("float32", "all")
    X = da.from_array(x, chunks=CHUNKINGS["both"][0])
    dask.compute(*xd.cross_entropy_with_grad(X, labels, backend="numpy", **kwargs),
                 scheduler="sync")
    assert calls  # every class block went through the NumPy path


def test_importing_xentfast_does_not_import_dask():
    code = ("import sys, xentfast, xentfast._shards; "
            "assert not any(m == 'dask' or m.startswith('dask.') for m in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("chunking", ["whole", "classes", "both"])
def test_sum_reduction(chunking):
    x, labels, kwargs, _ = _problem("float32", "all")
    X = da.from_array(x, chunks=CHUNKINGS[chunking][0])
    total, grad = dask.compute(*xd.cross_entropy_with_grad(X, labels, reduction="sum",
                                                           **kwargs), scheduler="sync")
    exact = _exact(x, labels, kwargs, "sum")
    assert_accurate(total, exact["loss"], x.dtype, "sum", REDUCED_LOSS_ULPS)
    assert_accurate(grad, exact["grad"], x.dtype, "grad of the sum", ULPS["grad"])


@pytest.mark.parametrize("chunking", ["whole", "classes"])
def test_float16(chunking):
    """16-bit logits: float32 arithmetic, results rounded once to float16."""
    x16, labels, kwargs, _ = _problem("float16", "all")
    X = da.from_array(x16, chunks=CHUNKINGS[chunking][0])
    rows, grad = dask.compute(*xd.cross_entropy_with_grad(X, labels, reduction="none",
                                                          **kwargs), scheduler="sync")
    assert rows.dtype == np.float16 and grad.dtype == np.float16
    exact = _exact(x16, labels, kwargs, "none")
    assert_accurate(rows, exact["loss"], np.float16, "float16 loss", ULPS["loss"])
    assert_accurate(grad, exact["grad"], np.float16, "float16 grad", ULPS["grad"])


@pytest.mark.parametrize("label", ["sparse", "dense"])
def test_chunks_holding_only_neg_inf(label):
    """A class chunk that is -inf in every row, rows -inf in one chunk, a row -inf
    everywhere (NaN), with smoothing (a masked class makes the loss inf) -- never
    -inf - (-inf) (a RuntimeWarning would fail the suite)."""
    rng = _seed("neg-inf", label)
    x = rng.standard_normal((12, 30)) * 3
    x[:, 10:20] = -np.inf
    x[3, 20:30] = -np.inf
    x[11, :] = -np.inf
    y = rng.integers(0, 10, 12)
    labels = y if label == "sparse" else np.eye(30)[y]
    for smoothing in (0.0, 0.2):
        X = da.from_array(x, chunks=(5, 10))
        rows, grad = dask.compute(*xd.cross_entropy_with_grad(
            X, labels, reduction="none", label_smoothing=smoothing), scheduler="sync")
        exact = _exact(x, labels, {"label_smoothing": smoothing}, "none")
        assert_accurate(rows, exact["loss"], x.dtype, "loss", ULPS["loss"], LOSS_RTOL_FLOAT64)
        assert_accurate(grad, exact["grad"], x.dtype, "grad", ULPS["grad"])
        assert np.isnan(rows[11])


@pytest.mark.parametrize("chunking", ["rows", "classes"])
def test_ignored_rows(chunking):
    """A whole row block ignored, and every row ignored (mean 0, zero gradient)."""
    x, labels, kwargs, _ = _problem("float64", "plain")
    X = da.from_array(x, chunks=CHUNKINGS[chunking][0])
    y = labels.copy()
    y[:5] = -100
    mean, grad = dask.compute(*xd.cross_entropy_with_grad(X, y), scheduler="sync")
    exact = _exact(x, y, {}, "mean")
    assert_accurate(mean, exact["loss"], x.dtype, "mean", REDUCED_LOSS_ULPS, LOSS_RTOL_FLOAT64)
    assert_accurate(grad, exact["grad"], x.dtype, "grad", ULPS["grad"])
    assert not grad[:5].any()
    nothing = np.full_like(y, -100)
    mean, grad = dask.compute(*xd.cross_entropy_with_grad(X, nothing), scheduler="sync")
    assert mean == 0.0 and not grad.any()


@pytest.mark.parametrize("label", ["sparse", "dense"])
def test_class_axis_in_the_middle(label):
    """(3, C, 5) logits, axis=1, chunked along every axis: losses of shape (3, 5), the
    gradient in the caller's layout."""
    rng = _seed("axis1", label)
    x = (rng.standard_normal((3, 40, 5)) * 3).astype(np.float32)
    if label == "sparse":
        labels = rng.integers(0, 40, (3, 5))
        Y = da.from_array(labels, chunks=(2, 3))
    else:
        labels = rng.dirichlet(np.ones(40), (3, 5)).transpose(0, 2, 1).astype(np.float32)
        Y = da.from_array(labels, chunks=(2, 7, 3))
    kwargs = {"weight": rng.uniform(0.5, 2.0, 40), "label_smoothing": 0.1}
    X = da.from_array(x, chunks=(2, 7, 3))
    rows, grad = dask.compute(*xd.cross_entropy_with_grad(X, Y, axis=1, reduction="none",
                                                          **kwargs), scheduler="sync")
    assert rows.shape == (3, 5) and grad.shape == x.shape
    exact = _exact(x, labels, kwargs, "none", axis=1)
    assert_accurate(rows, exact["loss"], x.dtype, "loss", ULPS["loss"])
    assert_accurate(grad, exact["grad"], x.dtype, "grad", ULPS["grad"])


@pytest.mark.parametrize("chunking", ["whole", "rows", "classes", "ragged"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_primitives(chunking, dtype_name):
    x, _, _, row_kinds = _problem(dtype_name, "plain")
    X = da.from_array(x, chunks=CHUNKINGS[chunking][0])
    exact = naive.exact_primitives(x)
    lse, lse_kept, sm, lsm = dask.compute(xd.logsumexp(X), xd.logsumexp(X, keepdims=True),
                                          xd.softmax(X), xd.log_softmax(X), scheduler="sync")
    assert lse_kept.shape == (N, 1) and sm.dtype == x.dtype and lsm.shape == x.shape
    assert_accurate(lse, exact["logsumexp"], x.dtype, "logsumexp", ULPS["lse"],
                    row_kinds=row_kinds)
    assert_accurate(lse_kept[:, 0], exact["logsumexp"], x.dtype, "logsumexp", ULPS["lse"])
    assert_accurate(sm, exact["softmax"], x.dtype, "softmax", ULPS["softmax"],
                    row_kinds=row_kinds)
    assert_accurate(lsm, exact["log_softmax"], x.dtype, "log_softmax", ULPS["log_softmax"],
                    row_kinds=row_kinds)


def test_primitives_other_axis():
    rng = _seed("primitives-axis0")
    x = rng.standard_normal((30, 4)) * 5
    X = da.from_array(x, chunks=(7, 3))
    exact = naive.exact_primitives(x, axis=0)
    lse, sm = dask.compute(xd.logsumexp(X, axis=0), xd.softmax(X, axis=0), scheduler="sync")
    assert_accurate(lse, exact["logsumexp"], x.dtype, "logsumexp", ULPS["lse"])
    assert_accurate(sm, exact["softmax"], x.dtype, "softmax", ULPS["softmax"])


@pytest.mark.parametrize("chunking", ["rows", "both"])
def test_perplexity(chunking):
    """exp of the mean over kept tokens, weighted as the "mean" reduction (rows of
    ordinary and confident predictions; with the "huge" rows of 1e30 the mean is
    ~1e28 and the perplexity inf, test_perplexity_overflows)."""
    x, labels, kwargs, _ = _problem("float32", "all", kind="confident")
    kwargs = {"weight": kwargs["weight"]}
    X = da.from_array(x, chunks=CHUNKINGS[chunking][0])
    ppl = xd.perplexity(X, labels, **kwargs).compute(scheduler="sync")
    assert ppl.dtype == np.float64
    exact = _exact(x, labels, kwargs, "mean")
    assert_accurate(np.log(ppl), exact["loss"], np.float32, "log perplexity",
                    REDUCED_LOSS_ULPS)


def test_perplexity_overflows_to_inf():
    x, labels, _, _ = _problem("float32", "plain", kind="huge")
    ppl = xd.perplexity(da.from_array(x, chunks=(5, 9)), labels).compute(scheduler="sync")
    assert ppl == np.inf


def test_labels_chunked_differently():
    """Label chunks that do not match the row chunks are rechunked: same results."""
    x, labels, kwargs, _ = _problem("float32", "all")
    X = da.from_array(x, chunks=(7, 9))
    a = xd.cross_entropy(X, da.from_array(labels, chunks=5), reduction="none", **kwargs)
    b = xd.cross_entropy(X, labels, reduction="none", **kwargs)
    a, b = dask.compute(a, b, scheduler="sync")
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("chunking", ["rows", "both"])
def test_label_out_of_range_raises_from_the_task(chunking):
    """The task holding the bad label raises xentfast's ValueError, naming the value
    and its position in the whole label array (not in its block)."""
    x, labels, _, _ = _problem("float32", "plain")
    bad = labels.copy()
    bad[17] = C
    X = da.from_array(x, chunks=CHUNKINGS[chunking][0])
    loss = xd.cross_entropy(X, da.from_array(bad, chunks=6))  # building it is fine
    with pytest.raises(ValueError, match=rf"label value of {C} at labels\[17\]"):
        loss.compute(scheduler="threads")
    y2 = np.zeros((4, 5), np.int64)
    y2[3, 1] = -7
    X2 = da.from_array(np.zeros((4, 5, 3)), chunks=(2, 2, 3))
    with pytest.raises(ValueError, match=r"label value of -7 at labels\[3, 1\]"):
        xd.cross_entropy(X2, da.from_array(y2, chunks=2)).compute(scheduler="sync")


def test_lazy():
    """Nothing is computed until asked: logits whose computation would fail build a
    graph of the right shapes and dtypes."""
    def fail():
        raise AssertionError("computed too early")

    X = da.from_delayed(dask.delayed(fail)(), shape=(6, 10), dtype=np.float32)
    X = X.rechunk((3, 5))
    loss, grad = xd.cross_entropy_with_grad(X, np.zeros(6, np.int64), label_smoothing=0.1)
    rows = xd.cross_entropy(X, np.zeros(6, np.int64), reduction="none")
    ppl = xd.perplexity(X, np.zeros(6, np.int64))
    assert loss.shape == () and loss.dtype == np.float32
    assert grad.shape == (6, 10) and grad.dtype == np.float32
    assert rows.shape == (6,) and ppl.dtype == np.float64
    assert xd.softmax(X).shape == (6, 10) and xd.logsumexp(X).shape == (6,)


def test_graph_is_small_and_serialisable():
    """A few tasks per block (none per element or per row), the weight vector in the
    graph once, and the whole graph picklable (what a distributed scheduler ships)."""
    rng = _seed("graph")
    X = da.random.default_rng(0).standard_normal((400, 3000), chunks=(100, 750),
                                                 dtype=np.float32)  # 4 x 4 blocks
    y = da.random.default_rng(1).integers(0, 3000, 400, chunks=100)
    w = rng.uniform(0.5, 2.0, 3000)
    loss, grad = xd.cross_entropy_with_grad(X, y, weight=w, label_smoothing=0.1)
    graph = {**dict(loss.__dask_graph__()), **dict(grad.__dask_graph__())}
    assert len(graph) <= 12 * X.npartitions, len(graph)
    size = len(pickle.dumps(graph))
    # the weight vector (24 kB) enters once, not once per task; no per-row tasks
    assert size < 2 * w.nbytes + 100_000, size


@pytest.mark.parametrize("chunking", ["rows", "both"])
def test_loss_and_grad_share_one_pass(chunking, monkeypatch):
    """dask.compute(loss, grad): one kernel pass per block, shared by the two."""
    x, labels, kwargs, _ = _problem("float32", "all")
    X = da.from_array(x, chunks=CHUNKINGS[chunking][0])
    calls = {"n": 0}
    from xentfast import _shards

    if chunking == "rows":
        original = xf.cross_entropy_with_grad

        def counting(*a, **k):
            calls["n"] += 1
            return original(*a, **k)
        monkeypatch.setattr(xf, "cross_entropy_with_grad", counting)
    else:
        original = _shards.chunk_rows

        def counting(*a, **k):
            calls["n"] += 1
            return original(*a, **k)
        monkeypatch.setattr(_shards, "chunk_rows", counting)
    loss, grad = xd.cross_entropy_with_grad(X, labels, **kwargs)
    dask.compute(loss, grad, scheduler="sync")
    assert calls["n"] == X.npartitions


def test_split_every_builds_a_deeper_tree():
    x, labels, kwargs, _ = _problem("float32", "all")
    X = da.from_array(x, chunks=(N, 4))  # 16 class chunks
    shallow = xd.cross_entropy(X, labels, reduction="none", **kwargs)
    deep = xd.cross_entropy(X, labels, reduction="none", split_every=2, **kwargs)
    layers = set(deep.__dask_graph__().layers) - set(shallow.__dask_graph__().layers)
    assert any("partial" in str(name) for name in layers), layers
    exact = _exact(x, labels, kwargs, "none")
    for got in dask.compute(shallow, deep, scheduler="sync"):
        assert_accurate(got, exact["loss"], x.dtype, "loss", ULPS["loss"])


@pytest.mark.parametrize("call,error,match", [
    (lambda X, y: xd.cross_entropy(X, y, axis=(0, 1)), TypeError, "one integer"),
    (lambda X, y: xd.cross_entropy(X.astype(np.int32), y), TypeError, "dtype"),
    (lambda X, y: xd.cross_entropy(X, y[:5]), ValueError, "do not fit"),
    (lambda X, y: xd.cross_entropy(X, y, reduction="avg"), ValueError, "reduction"),
    (lambda X, y: xd.cross_entropy(X, y, weight=np.ones(3)), ValueError, "weight"),
    (lambda X, y: xd.cross_entropy(X[X[:, 0] > 0], y), ValueError, "unknown chunk sizes"),
    (lambda X, y: xd.logsumexp(X, axis=None), TypeError, "one integer"),
])
def test_bad_inputs(call, error, match):
    X = da.from_array(np.zeros((6, 8), np.float32), chunks=(3, 4))
    with pytest.raises(error, match=match):
        call(X, np.zeros(6, np.int64))


def test_threaded_scheduler():
    x, labels, kwargs, row_kinds = _problem("float64", "dense_all")
    X = da.from_array(x, chunks=(7, 9))
    mean, grad = dask.compute(*xd.cross_entropy_with_grad(X, labels, **kwargs),
                              scheduler="threads")
    exact = _exact(x, labels, kwargs, "mean")
    assert_accurate(mean, exact["loss"], x.dtype, "mean", REDUCED_LOSS_ULPS, LOSS_RTOL_FLOAT64)
    assert_accurate(grad, exact["grad"], x.dtype, "grad", ULPS["grad"], row_kinds=row_kinds)


# ----------------------------------------------------------------------- dask.distributed


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       memory_limit="1GiB", dashboard_address=None,
                                       silence_logs=logging.CRITICAL)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def test_cluster_loss_grad_perplexity(client):
    """Class-chunked loss, gradient and perplexity computed by two worker processes."""
    x, labels, kwargs, row_kinds = _problem("float32", "all", n=60, c=300)
    X = da.from_array(x, chunks=(16, 70))
    mean, grad = xd.cross_entropy_with_grad(X, da.from_array(labels, chunks=16), **kwargs)
    ppl = xd.perplexity(X, labels, **kwargs)
    mean, grad, ppl = client.compute([mean, grad, ppl], sync=True)
    exact = _exact(x, labels, kwargs, "mean")
    assert_accurate(mean, exact["loss"], x.dtype, "mean", REDUCED_LOSS_ULPS)
    assert_accurate(grad, exact["grad"], x.dtype, "grad", ULPS["grad"], row_kinds=row_kinds)
    assert_accurate(np.log(ppl), exact["loss"], np.float32, "log perplexity",
                    REDUCED_LOSS_ULPS)
    assert len(client.scheduler_info()["workers"]) == 2


def test_cluster_bad_label_raises_from_the_worker(client):
    x, labels, _, _ = _problem("float32", "plain")
    bad = labels.copy()
    bad[9] = -3
    for chunks in ((5, C), (7, 9)):
        X = da.from_array(x, chunks=chunks)
        with pytest.raises(ValueError, match=r"label value of -3 at labels\[9\]"):
            client.compute(xd.cross_entropy(X, bad), sync=True)


def _wait_for_event(name: str) -> float:
    from distributed import Event, secede

    secede()  # wait outside the worker's thread pool: its one thread stays free
    if not Event(name).wait(timeout=60):
        raise TimeoutError(f"event {name} was never set")
    return 0.0


def _after(value, gate):
    return value


def test_cluster_worker_killed_mid_computation_is_retried(client):
    """The per-row losses are computed and held in worker memory while the final task
    waits on an event; the worker holding them is killed (its process exits); Dask
    recomputes what it lost on the surviving and restarted workers, and the result is
    still exact."""
    from distributed import Event

    x, labels, kwargs, row_kinds = _problem("float64", "all", n=64, c=200)
    X = da.from_array(x, chunks=(16, 50))
    rows = xd.cross_entropy(X, labels, reduction="none", **kwargs)
    name = f"xentfast-gate-{uuid.uuid4().hex}"
    event = Event(name, client=client)
    gate = dask.delayed(_wait_for_event, pure=False)(name)
    result = client.compute(dask.delayed(_after)(rows, gate))
    deadline = time.monotonic() + 60
    while True:  # the losses in some worker's memory; only the gate still running
        held = {k: v for k, v in client.who_has().items() if v}
        running = [str(t) for ts in client.processing().values() for t in ts]
        if held and all("_wait_for_event" in t for t in running):
            break
        assert time.monotonic() < deadline, ("the losses were never computed", held, running)
        time.sleep(0.05)
    victim = sorted({w for holders in held.values() for w in holders})[0]
    try:
        client.run(os._exit, 1, workers=[victim])
    except Exception:  # the worker dies before it can answer
        pass
    deadline = time.monotonic() + 60
    while victim in client.scheduler_info()["workers"]:
        assert time.monotonic() < deadline, "the killed worker is still listed"
        time.sleep(0.05)
    event.set()
    got = result.result(timeout=120)
    lost = [k for k, holders in held.items() if victim in holders]
    # the scheduler's story of what the victim held: computed (processing -> memory)
    # once before the loss and again after it
    story = client.story(*lost)
    computed = [e for e in story
                if e[0] == "scheduler" and e[1] in lost and e[2:4] == ("processing", "memory")]
    assert len(computed) >= 2 * len(lost), story
    exact = _exact(x, labels, kwargs, "none")
    assert_accurate(got, exact["loss"], x.dtype, "loss after a worker died", ULPS["loss"],
                    LOSS_RTOL_FLOAT64, row_kinds)
    client.wait_for_workers(2, timeout=60)


# ----------------------------------------------------------------------- the example


def test_corpus_perplexity_example(tmp_path):
    """examples/corpus_perplexity.py at a tiny size (class-chunked, on its own
    two-worker cluster): the perplexity it prints and the per-token losses it stores
    against the exact oracle on the logits it wrote."""
    pytest.importorskip("distributed")
    zarr = pytest.importorskip("zarr")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "corpus_perplexity.py"), "--gigabytes",
         "0.0006", "--vocab", "300", "--chunk-mb", "0.1", "--class-chunks", "2",
         "--store", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    match = re.search(r"perplexity: ([0-9.e+]+)", proc.stdout)
    assert match, output
    assert re.search(r"peak worker memory: [0-9,.]+ MiB of 512.0 MiB", proc.stdout), output
    x = zarr.open_array(str(tmp_path / "logits.zarr"), mode="r")[...]
    y = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[...]
    losses = zarr.open_array(str(tmp_path / "losses.zarr"), mode="r")[...]
    assert x.shape == (500, 300) and x.dtype == np.float32
    exact_rows = naive.exact_cross_entropy(x, y, reduction="none")
    exact_mean = naive.exact_cross_entropy(x, y, reduction="mean")
    assert_accurate(losses, exact_rows["loss"], np.float32, "stored losses", ULPS["loss"])
    assert_accurate(math.log(float(match.group(1))), exact_mean["loss"], np.float32,
                    "log perplexity", REDUCED_LOSS_ULPS)
