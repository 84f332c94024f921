"""Class-chunked statistics and their merge (xentfast._shards) against the exact oracle.

Every case cuts the classes of a batch into chunks, takes ``shard_stats`` of each chunk,
merges them with ``merge_shard_stats`` (in a shuffled order) and computes every chunk's
gradient columns with ``shard_grad`` from the merged row totals.  The per-row loss, the
lse and every gradient element must meet the single-array accuracy rule (DESIGN.md §1,
tests/helpers.py ``ULPS``) against tests/naive.py's exact results on the whole rows --
whatever the partition, including single-class chunks, empty chunks and chunks holding
only -inf.  Label smoothing must use the global class count and sums.

Grid: statistics backend (those with the ``row_stats`` kernel) x data kind
(helpers.ACCURACY_KINDS, each with its reason) x dtype x label option x partition
(reasons in PARTITIONS); reductions on the "mixed" kind; adversarial values; forced
kernel paths; a Hypothesis property for associativity and order independence; errors.
"""

from __future__ import annotations

import functools
import pickle
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import naive
import xentfast as xf
from helpers import (
    ACCURACY_KINDS,
    HOST_BACKENDS,
    LOSS_RTOL_FLOAT64,
    REDUCED_LOSS_ULPS,
    ULPS,
    VALUE_CASES,
    LABEL_OPTIONS,
    accuracy_inputs,
    adversarial_values,
    assert_accurate,
    oracle_inputs,
)
from xentfast import _dispatch, _shards
from xentfast._shards import (
    RowTotals,
    ShardStats,
    combine_shard_stats,
    merge_shard_stats,
    shard_grad,
    shard_stats,
)

#: Backends whose kernel set has the statistics op (the others fall back to one of
#: these; test_backend_without_statistics_kernel_falls_back checks that).
STATS_BACKENDS = [b for b in HOST_BACKENDS if hasattr(_dispatch.load(b), "row_stats")]

DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
          "float16": np.dtype(np.float16)}

#: (rows, classes) per kind; "long" rows are a long sum of small terms cut into chunks.
SHAPES = {"normal": (20, 300), "confident": (16, 200), "ties": (12, 8), "offset": (12, 100),
          "huge": (12, 16), "masked": (12, 120), "mixed": (24, 64), "long": (2, 20_000)}

LONG_OPTIONS = [("sparse", "plain"), ("sparse", "smooth"), ("dense", "onehot")]


def _cuts_uneven(c: int) -> list[int]:
    return sorted({0, min(1, c), min(2, c), c // 3, max(c - 1, 0), c})


def _cuts_many(c: int) -> list[int]:
    inner = np.linspace(0, c, 17).astype(int).tolist()
    return [0, 0] + inner[1:]  # a chunk of no classes first


def _cuts_one(c: int) -> list[int]:
    return [0, c]


#: Partitions of [0, C) (reason): "one" -- one chunk must give what one array gives;
#: "uneven" -- single-class chunks next to a large one (a chunk's max is its only
#: element: u = 0, t = 1); "many" -- 16 chunks and an empty one (m = -inf, s = 0).
PARTITIONS = {"one": _cuts_one, "uneven": _cuts_uneven, "many": _cuts_many}


def _seed(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("-".join(map(str, parts)).encode()))


@functools.lru_cache(maxsize=None)
def _data(kind: str, dtype_name: str, label: str, option: str):
    """(logits, labels, kwargs, row kinds) for one case; read-only."""
    dtype = DTYPES[dtype_name]
    shape = SHAPES[kind]
    if kind == "long" and dtype == np.float64:
        shape = (2, 6000)  # the float64 oracle takes mpmath's exp: ~7 us an element
    rng = _seed(kind, dtype_name, label, option)
    return accuracy_inputs(rng, kind, shape, dtype, label, option)


@functools.lru_cache(maxsize=None)
def _exact(kind: str, dtype_name: str, label: str, option: str, reduction: str = "none"):
    x, labels, kwargs, _ = _data(kind, dtype_name, label, option)
    o_x, o_labels, o_kwargs = oracle_inputs(x, labels, kwargs, x.dtype)
    return naive.exact_cross_entropy(o_x, o_labels, reduction=reduction, **o_kwargs)


def _chunk_labels(labels, kind_is_dense: bool, a: int, b: int, axis: int = -1):
    if not kind_is_dense:
        return labels
    return np.take(labels, np.arange(a, b), axis=axis)


def _run_shards(x, labels, kwargs, cuts, *, axis=-1, reduction="none", backend=None,
                order_seed=0, grad_scale=1.0):
    """Stats of each chunk, merged in a shuffled order; every chunk's gradient from the
    totals.  Returns (loss, lse, grad)."""
    c = x.shape[axis]
    dense = labels.dtype.kind == "f"
    parts = list(zip(cuts, cuts[1:]))
    stats = [shard_stats(np.take(x, np.arange(a, b), axis=axis),
                         _chunk_labels(labels, dense, a, b, axis), class_offset=a,
                         num_classes=c, axis=axis, backend=backend, **kwargs)
             for a, b in parts]
    order = np.random.default_rng(order_seed).permutation(len(stats))
    loss, lse, totals = merge_shard_stats([stats[i] for i in order], reduction=reduction,
                                          return_totals=True)
    grads = [shard_grad(np.take(x, np.arange(a, b), axis=axis),
                        _chunk_labels(labels, dense, a, b, axis), totals, class_offset=a,
                        num_classes=c, axis=axis, grad_scale=grad_scale, **kwargs)
             for a, b in parts]
    return loss, lse, np.concatenate(grads, axis=axis)


# ----------------------------------------------------------------------- the grid


def _grid():
    for backend in STATS_BACKENDS:
        for kind in ACCURACY_KINDS:
            dtypes = ["float32", "float64"] + (["float16"] if kind == "mixed" else [])
            options = LONG_OPTIONS if kind == "long" else LABEL_OPTIONS
            partitions = ["uneven", "many"] if kind == "long" else list(PARTITIONS)
            for dtype_name in dtypes:
                for label, option in options:
                    for partition in partitions:
                        yield pytest.param(
                            backend, kind, dtype_name, label, option, partition,
                            id=f"{backend}-{kind}-{dtype_name}-{label}-{option}-{partition}")


@pytest.mark.parametrize("backend,kind,dtype_name,label,option,partition", list(_grid()))
def test_merged_rows_are_exact(backend, kind, dtype_name, label, option, partition):
    x, labels, kwargs, row_kinds = _data(kind, dtype_name, label, option)
    exact = _exact(kind, dtype_name, label, option)
    cuts = PARTITIONS[partition](x.shape[1])
    loss, lse, grad = _run_shards(x, labels, kwargs, cuts, backend=backend)
    dtype = x.dtype
    assert loss.dtype == dtype and lse.dtype == dtype and grad.dtype == dtype
    assert grad.shape == x.shape
    assert_accurate(loss, exact["loss"], dtype, "merged loss", ULPS["loss"],
                    LOSS_RTOL_FLOAT64, row_kinds)
    assert_accurate(lse, exact["lse"], dtype, "merged lse", ULPS["lse"], row_kinds=row_kinds)
    assert_accurate(grad, exact["grad"], dtype, "chunk gradients", ULPS["grad"],
                    row_kinds=row_kinds)


REDUCED = [("sparse", "plain"), ("sparse", "all"), ("dense", "soft_all")]


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("label,option", REDUCED)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(dtype_name, label, option, reduction):
    """The reduced loss (REDUCED_LOSS_ULPS: the per-row bound summed) and the gradient
    of the returned loss with grad_scale = 1 / denominator."""
    x, labels, kwargs, row_kinds = _data("mixed", dtype_name, label, option)
    exact = _exact("mixed", dtype_name, label, option, reduction)
    den = exact["denominator"] if reduction == "mean" else 1.0
    scale = 1.0 / den if den else 0.0
    loss, _, grad = _run_shards(x, labels, kwargs, _cuts_uneven(x.shape[1]),
                                reduction=reduction, grad_scale=scale)
    assert np.ndim(loss) == 0 and np.asarray(loss).dtype == x.dtype
    assert_accurate(loss, exact["loss"], x.dtype, f"{reduction} loss", REDUCED_LOSS_ULPS,
                    LOSS_RTOL_FLOAT64)
    assert_accurate(grad, exact["grad"], x.dtype, f"grad of the {reduction}", ULPS["grad"],
                    row_kinds=row_kinds)


def test_mean_over_nothing_kept_is_zero():
    """Every row ignored: mean 0.0 (the documented difference from PyTorch's NaN)."""
    x = np.arange(12.0).reshape(3, 4)
    y = np.full(3, -100)
    stats = [shard_stats(x[:, a:b], y, class_offset=a, num_classes=4) for a, b in ((0, 1), (1, 4))]
    loss, _ = merge_shard_stats(stats, reduction="mean")
    assert loss == 0.0 and not np.isnan(loss)


@pytest.mark.parametrize("case", VALUE_CASES)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_adversarial_values(case, dtype_name):
    """NaN rows stay NaN (and only they), -inf masks are probability 0, an all -inf row
    is NaN, +inf is NaN in its row, +-1e30 exact -- cut into chunks, with smoothing
    and weights so that every statistic is involved."""
    dtype = DTYPES[dtype_name]
    rng = _seed("adversarial", case, dtype_name)
    x64, y = adversarial_values(rng, 6, 23, dtype, case)
    with np.errstate(over="ignore"):
        x = x64.astype(dtype)
    kwargs = {"weight": rng.uniform(0.5, 2.0, 23), "label_smoothing": 0.1, "z_loss": 1e-4}
    o_x, o_y, o_kw = oracle_inputs(x, y, kwargs, dtype)
    exact = naive.exact_cross_entropy(o_x, o_y, reduction="none", **o_kw)
    loss, lse, grad = _run_shards(x, y, kwargs, [0, 3, 4, 11, 23])
    assert_accurate(loss, exact["loss"], dtype, f"{case} loss", ULPS["loss"], LOSS_RTOL_FLOAT64)
    assert_accurate(lse, exact["lse"], dtype, f"{case} lse", ULPS["lse"])
    assert_accurate(grad, exact["grad"], dtype, f"{case} grad", ULPS["grad"])


@pytest.mark.parametrize("label", ["sparse", "dense"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_chunks_of_only_neg_inf(label, smoothing):
    """A chunk that is -inf in every row, and rows that are -inf in one chunk, merge as
    (m, s) = (-inf, 0) -- never -inf - (-inf) (the suite turns that RuntimeWarning into
    an error).  With smoothing a masked class with a nonzero weight makes the loss
    +inf, as on one array; without, the mask changes nothing."""
    rng = _seed("neg-inf-chunks", label, smoothing)
    x = rng.standard_normal((8, 30)) * 3
    x[:, 10:20] = -np.inf          # chunk [10, 20): -inf in every row
    x[2, 20:30] = -np.inf          # row 2: -inf in chunk [20, 30) only
    x[5, 0:10] = -np.inf           # row 5: -inf in chunk [0, 10) only
    x[7, :] = -np.inf              # row 7: all -inf -- NaN
    y = rng.integers(0, 10, 8)
    y[5] = 25
    if label == "dense":
        labels = np.zeros((8, 30))
        labels[np.arange(8), y] = 1.0
    else:
        labels = y
    kwargs = {"label_smoothing": smoothing}
    exact = naive.exact_cross_entropy(x, labels, reduction="none", **kwargs)
    loss, lse, grad = _run_shards(x, labels, kwargs, [0, 10, 20, 30])
    assert_accurate(loss, exact["loss"], x.dtype, "loss", ULPS["loss"], LOSS_RTOL_FLOAT64)
    assert_accurate(lse, exact["lse"], x.dtype, "lse", ULPS["lse"])
    assert_accurate(grad, exact["grad"], x.dtype, "grad", ULPS["grad"])
    assert np.isnan(loss[7]) and np.isnan(lse[7])
    ref = xf.cross_entropy(x, labels, reduction="none", **kwargs)
    np.testing.assert_array_equal(np.isinf(loss), np.isinf(ref))


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_class_axis_not_last(dtype_name):
    """axis=1 of (3, C, 5) logits: chunks cut along the middle axis."""
    dtype = DTYPES[dtype_name]
    rng = _seed("axis", dtype_name)
    x = (rng.standard_normal((3, 40, 5)) * 3).astype(dtype)
    y = rng.integers(0, 40, (3, 5))
    kwargs = {"label_smoothing": 0.1, "weight": rng.uniform(0.5, 2.0, 40)}
    o_x, o_y, o_kw = oracle_inputs(x, y, kwargs, dtype)
    exact = naive.exact_cross_entropy(o_x, o_y, axis=1, reduction="none", **o_kw)
    loss, lse, grad = _run_shards(x, y, kwargs, [0, 7, 8, 40], axis=1)
    assert loss.shape == (3, 5) and grad.shape == x.shape
    assert_accurate(loss, exact["loss"], dtype, "loss", ULPS["loss"], LOSS_RTOL_FLOAT64)
    assert_accurate(lse, exact["lse"], dtype, "lse", ULPS["lse"])
    assert_accurate(grad, exact["grad"], dtype, "grad", ULPS["grad"])


@pytest.mark.skipif("cpu" not in STATS_BACKENDS, reason="the cpu backend is unavailable")
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("label,option", [("sparse", "plain"), ("sparse", "all"),
                                          ("dense", "soft_all")])
def test_cpu_statistics_paths(parallel, wide, label, option):
    """Each path of the cpu statistics kernel (serial/parallel; the 512-bit passes of
    rows of index labels without smoothing, wide=True, where they apply) meets the
    bounds."""
    from xentfast.backends import numba_cpu

    x, labels, kwargs, row_kinds = _data("normal", "float32", label, option)
    exact = _exact("normal", "float32", label, option)
    applies = label == "sparse" and option == "plain"
    with numba_cpu.tuning(force_parallel=parallel, force_wide=wide and applies):
        loss, lse, grad = _run_shards(x, labels, kwargs, [0, 100, 200, 300], backend="cpu")
    assert_accurate(loss, exact["loss"], x.dtype, "loss", ULPS["loss"], row_kinds=row_kinds)
    assert_accurate(lse, exact["lse"], x.dtype, "lse", ULPS["lse"], row_kinds=row_kinds)
    assert_accurate(grad, exact["grad"], x.dtype, "grad", ULPS["grad"], row_kinds=row_kinds)


def test_backend_without_statistics_kernel_falls_back():
    """cython (and cuda) have no row_stats op: the statistics come from cpu or numpy,
    with the same results as there."""
    missing = [b for b in HOST_BACKENDS if b not in STATS_BACKENDS]
    if not missing:
        pytest.skip("every host backend under test has the statistics kernel")
    x, labels, kwargs, _ = _data("mixed", "float32", "sparse", "all")
    got = shard_stats(x, labels, class_offset=0, num_classes=x.shape[1], backend=missing[0],
                      **kwargs)
    fallback = "cpu" if "cpu" in xf.available_backends() else "numpy"
    ref = shard_stats(x, labels, class_offset=0, num_classes=x.shape[1], backend=fallback,
                      **kwargs)
    for name in _shards.FIELDS:
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)


def test_one_chunk_equals_the_single_array_functions():
    """One chunk holding every class: the merge gives xentfast.cross_entropy's loss and
    logsumexp within the bounds, and the same special values."""
    x, labels, kwargs, _ = _data("mixed", "float32", "sparse", "all")
    stats = shard_stats(x, labels, class_offset=0, num_classes=x.shape[1], **kwargs)
    loss, lse = merge_shard_stats([stats])
    ref_loss, ref_lse = xf.cross_entropy(x, labels, reduction="none", return_lse=True,
                                         **kwargs)
    exact = _exact("mixed", "float32", "sparse", "all")
    for got, ref, what in ((loss, ref_loss, "loss"), (lse, ref_lse, "lse")):
        assert_accurate(got, exact[what], x.dtype, f"merged {what}", ULPS[what])
        assert_accurate(ref, exact[what], x.dtype, f"single-array {what}", ULPS[what])
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))


def test_vocabulary_parallel_ranks():
    """Four "ranks" each hold a quarter of the vocabulary: their statistics are
    pickled (the all-gather), every rank merges the gathered list in its own order
    and gets bitwise the same totals, and the four gradient quarters make the exact
    gradient of the mean."""
    x, labels, kwargs, row_kinds = _data("confident", "float32", "sparse", "all")
    c = x.shape[1]
    cuts = [0, 50, 100, 150, 200]
    gathered = [pickle.dumps(shard_stats(x[:, a:b], labels, class_offset=a, num_classes=c,
                                         **kwargs)) for a, b in zip(cuts, cuts[1:])]
    results = []
    for rank in range(4):
        order = gathered[rank:] + gathered[:rank]
        results.append(merge_shard_stats([pickle.loads(s) for s in order], reduction="mean",
                                         return_totals=True))
    for other in results[1:]:
        assert np.asarray(other[0]).tobytes() == np.asarray(results[0][0]).tobytes()
        for a, b in zip(other[2], results[0][2]):
            assert a.tobytes() == b.tobytes()
    exact = _exact("confident", "float32", "sparse", "all", "mean")
    totals = results[0][2]
    grad = np.concatenate([
        shard_grad(x[:, a:b], labels, totals, class_offset=a, num_classes=c,
                   grad_scale=1.0 / exact["denominator"], **kwargs)
        for a, b in zip(cuts, cuts[1:])], axis=1)
    assert_accurate(results[0][0], exact["loss"], x.dtype, "mean loss", REDUCED_LOSS_ULPS)
    assert_accurate(grad, exact["grad"], x.dtype, "grad of the mean", ULPS["grad"],
                    row_kinds=row_kinds)


def test_shard_grad_from_a_plain_lse():
    """A per-row lse array instead of the totals (index labels): exact to the rounding
    of lse, which for ordinary rows (kind "normal") is inside the gradient bound."""
    x, labels, kwargs, row_kinds = _data("normal", "float32", "sparse", "all")
    c = x.shape[1]
    stats = [shard_stats(x[:, a:b], labels, class_offset=a, num_classes=c, **kwargs)
             for a, b in ((0, 150), (150, 300))]
    _, _, totals = merge_shard_stats(stats, return_totals=True)
    grad = np.concatenate([
        shard_grad(x[:, a:b], labels, totals.lse, class_offset=a, num_classes=c, **kwargs)
        for a, b in ((0, 150), (150, 300))], axis=1)
    exact = _exact("normal", "float32", "sparse", "all")
    assert_accurate(grad, exact["grad"], x.dtype, "grad from lse", ULPS["grad"],
                    row_kinds=row_kinds)


# ----------------------------------------------------------------------- properties


def _partitions(draw, c: int):
    k = draw(st.integers(1, min(c, 6) + 1))
    cuts = sorted(draw(st.lists(st.integers(0, c), min_size=k - 1, max_size=k - 1)))
    return [0] + cuts + [c]


def _tree(stats, rng):
    """Combine the statistics in a random binary tree over a random order (groups of
    any chunks, adjacent or not)."""
    items = list(stats)
    rng.shuffle(items)
    while len(items) > 1:
        i = int(rng.integers(0, len(items) - 1))
        items[i:i + 2] = [combine_shard_stats(items[i:i + 2])]
    return items[0]


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_merge_is_associative_and_order_independent(data):
    """For random rows (ties, -inf masks, large magnitudes), options and partitions:
    any order of the chunks gives bitwise the same merge; a random tree of
    combinations gives the same maximum and tie count exactly, a rest mass equal to
    float64 rounding, and -- like the flat merge -- results within the bounds."""
    dtype = np.dtype(data.draw(st.sampled_from(["float32", "float64"])))
    n = data.draw(st.integers(1, 5))
    c = data.draw(st.integers(1, 24))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = data.draw(st.sampled_from([1.0, 30.0, 1e4]))
    x = np.round(rng.standard_normal((n, c)) * 2) * scale / 2  # rounded: ties happen
    x[rng.random((n, c)) < 0.15] = -np.inf
    y = rng.integers(0, c, n)
    x[np.arange(n), y] = np.where(np.isinf(x[np.arange(n), y]), 0.0, x[np.arange(n), y])
    if data.draw(st.booleans()):
        y[rng.random(n) < 0.3] = -100
    kwargs: dict[str, Any] = {}
    if data.draw(st.booleans()):
        kwargs["weight"] = rng.uniform(0.0, 2.0, c)
    if data.draw(st.booleans()):
        kwargs["label_smoothing"] = data.draw(st.floats(0.0, 1.0))
    if data.draw(st.booleans()):
        kwargs["z_loss"] = 1e-4
    x = x.astype(dtype)
    cuts = _partitions(data.draw, c)
    stats = [shard_stats(x[:, a:b], y, class_offset=a, num_classes=c, **kwargs)
             for a, b in zip(cuts, cuts[1:])]
    flat_loss, flat_lse, flat = merge_shard_stats(stats, return_totals=True)
    shuffled = [stats[i] for i in rng.permutation(len(stats))]
    loss2, lse2, totals2 = merge_shard_stats(shuffled, return_totals=True)
    assert flat_loss.tobytes() == loss2.tobytes() and flat_lse.tobytes() == lse2.tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(flat, totals2))

    tree = _tree(stats, rng)
    ordered = combine_shard_stats(stats)
    assert tree.classes == ((0, c),)
    np.testing.assert_array_equal(tree.m, ordered.m)
    np.testing.assert_array_equal(tree.t, ordered.t)
    finite = np.isfinite(ordered.u)
    np.testing.assert_array_equal(np.isfinite(tree.u), finite)
    # each of the K chunk masses is scaled and added in another order: a few float64
    # roundings per chunk, relative to the (non-negative) terms, u + t
    k = len(stats)
    bound = 4 * k * 2.0**-53 * (ordered.u[finite] + ordered.t[finite])
    assert np.all(np.abs(tree.u[finite] - ordered.u[finite]) <= bound)

    tree_loss, tree_lse = merge_shard_stats([tree])
    o_x, o_y, o_kw = oracle_inputs(x, y, kwargs, dtype)
    exact = naive.exact_cross_entropy(o_x, o_y, reduction="none", **o_kw)
    for loss, lse, what in ((flat_loss, flat_lse, "flat"), (tree_loss, tree_lse, "tree")):
        assert_accurate(loss, exact["loss"], dtype, f"{what} loss", ULPS["loss"],
                        LOSS_RTOL_FLOAT64)
        assert_accurate(lse, exact["lse"], dtype, f"{what} lse", ULPS["lse"])


# ----------------------------------------------------------------------- errors


def _two_chunks(**kwargs):
    x = np.arange(24.0).reshape(4, 6)
    y = np.array([0, 5, 2, 3])
    return [shard_stats(x[:, a:b], y, class_offset=a, num_classes=6, **kwargs)
            for a, b in ((0, 2), (2, 6))]


def test_stats_are_small_named_tuples():
    s = _two_chunks()[0]
    assert isinstance(s, ShardStats) and s.classes == ((0, 2),) and s.num_classes == 6
    assert s.m.shape == (4,) and s.m.dtype == np.float64 and s.owns.dtype == bool
    assert pickle.loads(pickle.dumps(s)).classes == s.classes


@pytest.mark.parametrize("case,match", [
    ("overlap", "overlap"),
    ("missing", r"not all of \[0, 6\)"),
    ("options", "different options"),
    ("rows", "different rows"),
    ("empty", "non-empty"),
    ("not_stats", "ShardStats"),
])
def test_merge_errors(case, match):
    a, b = _two_chunks()
    lists = {
        "overlap": [a, b, a],
        "missing": [b],
        "options": [a, _two_chunks(label_smoothing=0.1)[1]],
        "rows": [a, b._replace(m=b.m[:2])],
        "empty": [],
        "not_stats": [a, (b.m,)],
    }
    error = TypeError if case == "not_stats" else ValueError
    with pytest.raises(error, match=match):
        merge_shard_stats(lists[case])


def test_label_out_of_range_names_it():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"label value of 9 at labels\[2\]"):
        shard_stats(x, np.array([0, 1, 9]), class_offset=0, num_classes=8)
    with pytest.raises(ValueError, match=r"label value of -1 at labels\[0\]"):
        shard_grad(x, np.array([-1, 1, 2]), np.zeros(3), class_offset=0, num_classes=8)


def test_chunks_given_different_labels():
    x = np.zeros((2, 4))
    stats = [shard_stats(x[:, :2], np.array([0, 3]), class_offset=0, num_classes=4),
             shard_stats(x[:, 2:], np.array([0, 1]), class_offset=2, num_classes=4)]
    with pytest.raises(ValueError, match="different labels, class weights or ignore_index"):
        merge_shard_stats(stats)
    # Statistics without the digest (built by hand): the ownership check still catches it.
    with pytest.raises(ValueError, match="owned by no chunk"):
        merge_shard_stats([s._replace(inputs="") for s in stats])


@pytest.mark.parametrize("kwargs,error,match", [
    ({"class_offset": 3, "num_classes": 4}, ValueError, r"\[3, 5\) do not lie in"),
    ({"class_offset": -1, "num_classes": 4}, ValueError, "class_offset must be >= 0"),
    ({"class_offset": 0, "num_classes": 0}, ValueError, "num_classes must be >= 1"),
    ({"class_offset": 1.0, "num_classes": 4}, TypeError, "class_offset must be an integer"),
    ({"class_offset": 0, "num_classes": 4, "weight": np.ones(2)}, ValueError, r"shape \(4,\)"),
    ({"class_offset": 0, "num_classes": 4, "label_smoothing": 2.0}, ValueError, "lie in"),
])
def test_stats_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        shard_stats(np.zeros((2, 2)), np.array([0, 1]), **kwargs)


def test_grad_errors():
    x = np.zeros((2, 3))
    t = np.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="return_totals"):
        shard_grad(x, t, np.zeros(2), class_offset=0, num_classes=3)
    with pytest.raises(ValueError, match="batch shape"):
        shard_grad(x, np.array([0, 1]), np.zeros(3), class_offset=0, num_classes=3)
    bad = RowTotals(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="row totals have shape"):
        shard_grad(x, np.array([0, 1]), bad, class_offset=0, num_classes=3)


# ----------------------------------------------------------------------- gradient kernel
#
# shard_grad's columns come from the cpu backend's compiled ``shard_grad_rows`` where it
# is available, else from ``_shards.grad_rows_numpy`` (numpy-only installs).  Bounds
# tested below (the kernel against the NumPy path):
#   * with the NumPy path's np.exp replaced by the backend's exponential: BITWISE equal,
#     float32 and float64 logits, every option -- the formulas and their rounding are
#     the same, the exponential is the only difference;
#   * that exponential is within 1 ulp (float64) of np.exp on [-708, 0];
#   * with np.exp as it is: float32 gradients within 1 ulp, equal in all but at most 1
#     element in 10**4; float64 ones (where a 1-ulp e_j shows in cancelling elements)
#     within the accuracy bound of the exact oracle, as the NumPy path is.

HAS_CPU = "cpu" in xf.available_backends()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the cpu backend is unavailable")

KERNEL_OPTIONS = [("sparse", "plain"), ("sparse", "smooth"), ("sparse", "z_loss"),
                  ("sparse", "all"), ("dense", "onehot"), ("dense", "soft_all")]


class _BackendExp:
    """numpy, with exp replaced by the cpu backend's exponential (``_exp``): patched
    into ``_shards`` so that its NumPy path uses the kernel's exponential."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def exp(a, out=None):
        from xentfast.backends import numba_cpu

        a = np.ascontiguousarray(a, dtype=np.float64)
        res = np.empty_like(a) if out is None else out
        numba_cpu.exp_array(a.reshape(-1), res.reshape(-1))
        return res


def _hostile_chunked_case(dtype_name: str, label: str, option: str, partition: str):
    """The "mixed" rows cut into chunks, plus a NaN row, an all -inf row, and one chunk
    that is -inf in every row (index labels in it get an infinite loss and a finite
    gradient); (x, labels, kwargs, cuts)."""
    x0, labels, kwargs, _ = _data("mixed", dtype_name, label, option)
    x = np.array(x0)
    cuts = PARTITIONS[partition](x.shape[1])
    a, b = max(zip(cuts, cuts[1:]), key=lambda ab: (ab[1] - ab[0], -ab[0]))
    if partition == "many":
        x[:, a:b] = -np.inf
    x[1, 7] = np.nan
    x[2, :] = -np.inf
    return x, np.array(labels), kwargs, cuts


def _chunk_grads(x, labels, kwargs, cuts, backend: str, grad_scale: float = 1.0):
    """Every chunk's shard_grad columns (concatenated) with the gradient path of
    ``backend`` ("cpu": the kernel; "numpy": the NumPy path), from totals merged once."""
    c = x.shape[1]
    dense = labels.dtype.kind == "f"
    parts = list(zip(cuts, cuts[1:]))
    stats = [shard_stats(x[:, a:b], _chunk_labels(labels, dense, a, b), class_offset=a,
                         num_classes=c, **kwargs) for a, b in parts]
    _, _, totals = merge_shard_stats(stats, return_totals=True)
    with xf.use_backend(backend):
        return np.concatenate([
            shard_grad(x[:, a:b], _chunk_labels(labels, dense, a, b), totals,
                       class_offset=a, num_classes=c, grad_scale=grad_scale, **kwargs)
            for a, b in parts], axis=1)


def _same_bits(got, ref, what):
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions")
    bits = np.int64 if got.dtype == np.float64 else np.int32
    diff = np.flatnonzero(got[~nan].view(bits) != ref[~nan].view(bits))
    assert diff.size == 0, (f"{what}: {diff.size} elements differ, e.g. "
                            f"{got[~nan][diff[:3]]} vs {ref[~nan][diff[:3]]}")


def _ulps(got, ref):
    """|got - ref| in ulps of ref's dtype (NaN positions must match; 0 there)."""
    bits = np.int64 if ref.dtype == np.float64 else np.int32
    g = got.view(bits).astype(np.int64)
    r = ref.view(bits).astype(np.int64)
    # sign-magnitude to a monotonic integer line (so -0.0 and 0.0 are 0 ulps apart)
    top = np.int64(np.iinfo(bits).min)
    g = np.where(g < 0, top - g, g)
    r = np.where(r < 0, top - r, r)
    return np.where(np.isnan(ref), 0, np.abs(g - r))


@needs_cpu
@pytest.mark.parametrize("partition", ["uneven", "many"])
@pytest.mark.parametrize("label,option", KERNEL_OPTIONS)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_grad_kernel_is_the_numpy_path(dtype_name, label, option, partition, monkeypatch):
    """The kernel against the NumPy path and the exact oracle, chunk by chunk: labels
    owned by other chunks, ignored rows, weights, smoothing (global C), z_loss, a NaN
    row, an all -inf row, a chunk of only -inf (partition "many")."""
    x, labels, kwargs, cuts = _hostile_chunked_case(dtype_name, label, option, partition)
    got = _chunk_grads(x, labels, kwargs, cuts, "cpu")
    ref = _chunk_grads(x, labels, kwargs, cuts, "numpy")
    assert got.dtype == ref.dtype == x.dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ulps = _ulps(got, ref)
    if x.dtype == np.float32:
        assert ulps.max() <= 1
        assert np.count_nonzero(ulps) <= max(1, ulps.size // 10_000)
    o_x, o_labels, o_kwargs = oracle_inputs(x, labels, kwargs, x.dtype)
    exact = naive.exact_cross_entropy(o_x, o_labels, reduction="none", **o_kwargs)
    for g, what in ((got, "kernel"), (ref, "numpy path")):
        assert_accurate(g, exact["grad"], x.dtype, f"{what} gradient", ULPS["grad"])
    monkeypatch.setattr(_shards, "np", _BackendExp())
    _same_bits(_chunk_grads(x, labels, kwargs, cuts, "cpu", grad_scale=0.37),
               _chunk_grads(x, labels, kwargs, cuts, "numpy", grad_scale=0.37),
               "with the same exp")


@needs_cpu
def test_backend_exp_is_within_one_ulp_of_numpy():
    """The kernel's float64 e_j = exp(d) (d = x - M <= 0) against np.exp: at most 1 ulp
    on [-708, 0] and 1 step of the subnormals on [-745, -708] (rounded there, not
    flushed to 0), equal at the special values."""
    from xentfast.backends import numba_cpu

    rng = _seed("exp-ulp")
    d = np.concatenate([-rng.exponential(4.0, 500_000), rng.uniform(-708.0, 0.0, 500_000),
                        rng.uniform(-745.0, -708.0, 100_000),
                        [0.0, -0.0, -1e-300, -708.0, -np.inf, np.nan]])
    got = np.empty_like(d)
    numba_cpu.exp_array(d, got)
    assert _ulps(got, np.exp(d)).max() <= 1
    assert got[-4] == 1.0 and got[-2] == 0.0 and np.isnan(got[-1])


@needs_cpu
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("label,option", [("sparse", "all"), ("dense", "soft_all")])
def test_grad_kernel_tasks_and_serial_twin(dtype_name, label, option):
    """Rows cut into column blocks of any size (the true class in any block), and the
    serial twin a forked child runs: bitwise the one-task-per-row parallel result."""
    from xentfast.backends import _numba_shards

    x, labels, kwargs, _ = _data("mixed", dtype_name, label, option)
    n, c = x.shape
    eps = kwargs.get("label_smoothing", 0.0)
    w = kwargs.get("weight")
    offset = 16                       # the chunk [16, c): labels below are others'
    xs = np.ascontiguousarray(x[:, offset:])
    ys = labels if label == "sparse" else np.ascontiguousarray(labels[:, offset:])
    rng = _seed("tasks", dtype_name, label)
    big = np.max(x, axis=1).astype(np.float64) + 0.5
    rest = rng.uniform(0.0, 3.0, n)
    lse = big + np.log1p(rest)
    coef_sum = rng.uniform(1.0, c, n)
    label_weight = rng.uniform(0.5, 2.0, n)
    w_chunk = None if w is None else np.ascontiguousarray(w[offset:])
    runs = []
    for parallel, blk in ((True, _numba_shards.GRAD_BLOCK), (True, 7), (True, 1),
                          (False, 5)):
        out = np.empty_like(xs)
        _numba_shards.shard_grad_rows(xs, ys, "index" if label == "sparse" else "dense",
                                      offset, c, w_chunk, -100, eps,
                                      kwargs.get("z_loss", 0.0), big, rest, lse, coef_sum,
                                      label_weight, 0.5, out, parallel=parallel, blk=blk)
        runs.append(out)
    for other in runs[1:]:
        _same_bits(other, runs[0], "tasks")
    ref = np.empty_like(xs)
    _shards.grad_rows_numpy(xs, ys, "index" if label == "sparse" else "dense", offset, c,
                            w_chunk, -100, eps, kwargs.get("z_loss", 0.0), big, rest, lse,
                            coef_sum, label_weight, 0.5, ref)
    assert _ulps(runs[0], ref).max() <= 1 or xs.dtype == np.float64


def test_grad_rows_chooses_the_kernel_as_the_statistics(monkeypatch):
    """grad_rows runs the cpu kernel where stats_kernels(None) gives the cpu backend
    (itself or as the fallback of cython / cuda), and the NumPy path under "numpy"."""
    calls = []
    x, labels, kwargs, _ = _data("mixed", "float32", "sparse", "all")
    if HAS_CPU:
        from xentfast.backends import numba_cpu

        real = numba_cpu.shard_grad_rows
        monkeypatch.setattr(numba_cpu, "shard_grad_rows",
                            lambda *a: calls.append(1) or real(*a))
    got = _chunk_grads(x, labels, kwargs, [0, 30, 64], "cpu" if HAS_CPU else "numpy")
    assert len(calls) == (2 if HAS_CPU else 0)
    ref = _chunk_grads(x, labels, kwargs, [0, 30, 64], "numpy")
    assert len(calls) == (2 if HAS_CPU else 0)
    assert _ulps(got, ref).max() <= 1


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("label,option", [("sparse", "all"), ("dense", "soft_all")])
def test_numpy_grad_path_meets_the_bounds(dtype_name, label, option):
    """The NumPy path (numpy-only installs) against the exact oracle; the grid above
    runs the kernel where the cpu backend is available."""
    x, labels, kwargs, row_kinds = _data("mixed", dtype_name, label, option)
    exact = _exact("mixed", dtype_name, label, option)
    grad = _chunk_grads(x, labels, kwargs, _cuts_many(x.shape[1]), "numpy", grad_scale=1.0)
    assert_accurate(grad, exact["grad"], x.dtype, "numpy-path gradient", ULPS["grad"],
                    row_kinds=row_kinds)


def test_return_totals_must_be_a_bool():
    x = np.zeros((3, 6), np.float32)
    y = np.array([0, 4, 5])
    stats = [xf.shard_stats(x[:, :3], y, class_offset=0, num_classes=6),
             xf.shard_stats(x[:, 3:], y, class_offset=3, num_classes=6)]
    with pytest.raises(TypeError, match="return_totals must be True or False; got 'no'"):
        xf.merge_shard_stats(stats, return_totals="no")


@pytest.mark.parametrize("change", ["weight", "ignore_index", "labels"])
def test_chunks_given_different_inputs_do_not_merge(change):
    """Every chunk must get the same labels, full weight vector and ignore_index: a
    mismatch gave a wrong loss without a word."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 10)).astype(np.float32)
    y = np.array([0, 9, 5, 3, 7])
    common = dict(num_classes=10, weight=np.ones(10), ignore_index=-100)
    other = dict(common)
    y_other = y
    if change == "weight":
        other["weight"] = np.full(10, 2.0)
    elif change == "ignore_index":
        other["ignore_index"] = 3
    else:
        y_other = np.array([0, 9, 5, 3, 8])
    a = xf.shard_stats(x[:, :4], y, class_offset=0, **common)
    b = xf.shard_stats(x[:, 4:], y_other, class_offset=4, **other)
    with pytest.raises(ValueError, match="different labels, class weights or ignore_index"):
        xf.merge_shard_stats([a, b])
    same = xf.shard_stats(x[:, 4:], y, class_offset=4, **common)
    loss, _ = xf.merge_shard_stats([a, same])
    np.testing.assert_allclose(loss, xf.cross_entropy(x, y, weight=np.ones(10),
                                                      reduction="none"), rtol=1e-6)
