"""Every path of the cpu backend, reached by construction.

``numba_cpu.plan`` names the path of a call from its shape and options alone;
``numba_cpu.tuning`` forces any part of that choice.  Here every plan that ``plan`` can
return for an op and its options is enumerated (all combinations of path, parallel,
wide and prefetch that it accepts when forced), each one is run through the public API
on the same adversarial rows -- confident rows, ties at the max, a masked logit, an
ignored row, a row of +-1e30 -- with every option, out= and inplace=True, and checked
against the exact oracle of ``tests/naive.py``.  A last test sweeps shapes through the
unforced ``plan`` and checks that whatever it picks is among the plans tested here, so
a new path or a moved threshold cannot go untested.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import naive
import xentfast as xf
from helpers import BACKENDS, ULPS, assert_accurate

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not under test")

nc = pytest.importorskip("xentfast.backends.numba_cpu") if "cpu" in BACKENDS else None

# Results are held to the accuracy rule (helpers.ULPS, DESIGN.md): relative to the
# exact value -- or, at a genuine near-zero crossing of terms of both signs, to the
# magnitude of those terms (the oracle's ``scale``), which no evaluation can beat.

# Options of the cross-entropy ops (reason for each: every per-row term of rowmath).
SPARSE_OPTIONS = {
    "plain": {},
    "weight": {"weight": "w"},
    "smooth": {"label_smoothing": 0.1},
    "smooth-weight-z": {"label_smoothing": 0.05, "weight": "w", "z_loss": 1e-3},
    "z": {"z_loss": 1e-2},
}
DENSE_OPTIONS = {
    "plain": {},
    "weight-smooth": {"weight": "w", "label_smoothing": 0.1},
    "z": {"z_loss": 1e-2},
}
GRAD_MODES = ("loss", "grad", "out", "inplace")
SHAPES = {  # n rows (two small-C blocks and a remainder), c classes per path
    "small": (133, 10),
    "rows": (133, 70),     # >= 64: the wide passes exist; a 6-element tail window
    "split": (9, 70),     # forced: any n; the unforced choice needs n <= 4
}


def _plans(op: str, c: int, with_grad: bool, smoothing: bool, inplace: bool):
    """Every plan the forced choices give for this call (invalid combinations raise)."""
    found = set()
    for path, parallel, wide, prefetch in itertools.product(
            nc.PATHS, (False, True), (False, True), (False, True)):
        t = nc.Tuning(force_path=path, force_parallel=parallel, force_wide=wide,
                      force_prefetch=prefetch)
        try:
            found.add(nc.plan(op, SHAPES[path][0], c, 4, with_grad=with_grad,
                              smoothing=smoothing, inplace=inplace, t=t))
        except ValueError:
            continue
    return sorted(found, key=lambda p: (p.path, p.parallel, p.wide, p.prefetch))


def _plan_id(p) -> str:
    return f"{p.path}{'-par' if p.parallel else ''}{'-wide' if p.wide else ''}" \
           f"{'-pf' if p.prefetch else ''}"


def _cases():
    for op, options in (("sparse", SPARSE_OPTIONS), ("dense", DENSE_OPTIONS)):
        for opt_name, mode in itertools.product(options, GRAD_MODES):
            smoothing = "label_smoothing" in options[opt_name]
            for path in nc.PATHS if nc else ():
                c = SHAPES[path][1]
                for p in _plans(op, c, mode != "loss", smoothing, mode == "inplace"):
                    if p.path == path:
                        yield pytest.param(op, opt_name, mode, p,
                                           id=f"{op}-{opt_name}-{mode}-{_plan_id(p)}")
    for op in ("logsumexp", "log_softmax", "softmax"):
        for path in nc.PATHS if nc else ():
            for p in _plans(op, SHAPES[path][1], False, False, False):
                if p.path == path:
                    yield pytest.param(op, None, None, p, id=f"{op}-{_plan_id(p)}")


def _rows(n: int, c: int, dtype, rng):
    """Adversarial rows: random, confident (margins 8..30), ties at the max, a masked
    logit, +-1e30, a large common offset."""
    x = rng.standard_normal((n, c)) * 3
    y = rng.integers(0, c, n)
    rows = np.arange(n)
    confident = rows % 3 == 0
    x[confident, y[confident]] = x[confident].max(axis=1) + rng.uniform(8, 30, confident.sum())
    x[1, :] = 0.0
    x[1, [2, 5]] = 4.0            # a tie at the max, label on it
    y[1] = 5
    x[2, 3] = -np.inf             # a masked logit (not the label)
    y[2] = 0
    x[4, :] = -1e30
    x[4, [0, c - 1]] = 1e30       # a tie at +1e30 in the last element (tail window)
    y[4] = 0
    x[5] += 1e4                   # large common offset
    return x.astype(dtype), y


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op, opt_name, mode, forced", list(_cases()))
def test_every_plan_against_the_exact_oracle(op, opt_name, mode, forced, dtype, rng):
    n, c = SHAPES[forced.path]
    x, y = _rows(n, c, dtype, rng)
    tuning = dict(force_path=forced.path, force_parallel=forced.parallel,
                  force_wide=forced.wide, force_prefetch=forced.prefetch)
    if opt_name is None:
        with nc.tuning(**tuning):
            got = getattr(xf, op)(x, backend="cpu")
        exact = naive.exact_primitive(x, op)
        assert_accurate(got, exact, dtype, op, ULPS["lse" if op == "logsumexp" else op])
        return
    options = dict((SPARSE_OPTIONS if op == "sparse" else DENSE_OPTIONS)[opt_name])
    if options.get("weight") == "w":
        options["weight"] = rng.uniform(0.5, 2.0, c)
    labels = y
    if op == "sparse":
        labels = y.copy()
        labels[7] = -100          # an ignored row
    else:
        t = rng.random((n, c))
        t[np.arange(n) % 3 == 0] = 0
        t[np.arange(n) % 3 == 0, y[np.arange(n) % 3 == 0]] = 1   # one-hot confident rows
        t[2, 3] = 0               # no mass on the masked logit
        labels = (t / t.sum(axis=1, keepdims=True)).astype(dtype)
    exact = naive.exact_cross_entropy(x, labels, **options)
    x_in = x.copy()
    with nc.tuning(**tuning):
        if mode == "loss":
            loss = xf.cross_entropy(x_in, labels, reduction="none", backend="cpu", **options)
            grad = None
        elif mode == "grad":
            loss, grad = xf.cross_entropy_with_grad(x_in, labels, reduction="none",
                                                    backend="cpu", **options)
        elif mode == "out":
            out = np.full_like(x, np.nan)
            loss, grad = xf.cross_entropy_with_grad(x_in, labels, reduction="none",
                                                    backend="cpu", out=out, **options)
            assert grad is out
        else:
            loss, grad = xf.cross_entropy_with_grad(x_in, labels, reduction="none",
                                                    backend="cpu", inplace=True, **options)
            assert grad is x_in
    if mode != "inplace":
        np.testing.assert_array_equal(x_in, x)   # the logits are never modified
    assert_accurate(loss, exact["loss"], dtype, "loss", ULPS["loss"])
    if grad is not None:
        assert_accurate(grad, exact["grad"], dtype, "grad", ULPS["grad"])


@pytest.mark.parametrize("op", nc.OPS if nc else [])
def test_plan_picks_only_tested_plans(op):
    """Whatever plan() picks unforced, over a sweep of shapes crossing every threshold,
    is one of the plans the test above runs (for its path)."""
    tested = {}
    for path in nc.PATHS:
        for wg, sm, ip in itertools.product((False, True), repeat=3):
            for p in _plans(op, SHAPES[path][1], wg, sm, ip):
                tested.setdefault((wg, sm, ip), set()).add(
                    (p.path, p.parallel, p.wide, p.prefetch))
    for n, c in itertools.product(
            (1, 2, nc.SPLIT_MAX_ROWS, nc.SPLIT_MAX_ROWS + 1, 1000, 100_000),
            (1, 10, nc.SMALL_C_MAX, nc.SMALL_C_MAX + 1, 64, nc.WIDE_MIN_C - 1,
             nc.WIDE_MIN_C, 32000, nc.SPLIT_MIN_C, 128_000, 1_000_000)):
        for itemsize in (4, 8):
            for wg, sm, ip in itertools.product((False, True), repeat=3):
                if ip and not wg:
                    continue
                p = nc.plan(op, n, c, itemsize, with_grad=wg, smoothing=sm, inplace=ip)
                assert (p.path, p.parallel, p.wide, p.prefetch) in tested[wg, sm, ip], (
                    f"{op} {n}x{c} itemsize {itemsize} grad={wg} smooth={sm} inplace={ip}: "
                    f"plan {p} is not among the tested plans")


def test_plan_thresholds():
    """The unforced choices at the documented thresholds."""
    f32 = 4
    assert nc.plan("sparse", 1000, nc.SMALL_C_MAX, f32).path == "small"
    assert nc.plan("sparse", 1000, nc.SMALL_C_MAX + 1, f32).path == "rows"
    assert nc.plan("sparse", 2, nc.SPLIT_MIN_C, f32) == nc.Plan("split", True)
    assert nc.plan("sparse", 2, nc.SPLIT_MIN_C, f32, smoothing=True).path == "rows"
    assert nc.plan("dense", 2, nc.SPLIT_MIN_C, f32).path == "rows"
    assert nc.plan("sparse", nc.SPLIT_MAX_ROWS + 1, nc.SPLIT_MIN_C, f32).path == "rows"
    assert not nc.plan("sparse", 1, 1000, f32).parallel          # one row: no launch
    assert not nc.plan("sparse", 16, 1000, f32).parallel         # n*c <= SERIAL_MAX_ELEMS
    assert nc.plan("sparse", 17, 1000, f32).parallel
    assert not nc.plan("sparse", 100, nc.WIDE_MIN_C - 1, f32).wide
    assert nc.plan("sparse", 100, nc.WIDE_MIN_C, f32).wide
    assert not nc.plan("sparse", 100, 1000, f32, smoothing=True).wide
    assert not nc.plan("sparse", 100, 1000, f32, with_grad=True, inplace=True).wide
    assert not nc.plan("softmax", 100, 1000, f32).wide
    past = nc.PREFETCH_MAX_ROW_BYTES // f32 + 1
    assert not nc.plan("logsumexp", 8, past, f32).prefetch
    grad_past = nc.PREFETCH_MAX_GRAD_ROW_BYTES // f32 + 1
    assert nc.plan("sparse", 8, grad_past, f32).prefetch
    assert not nc.plan("sparse", 8, grad_past, f32, with_grad=True).prefetch


def test_forcing_an_impossible_plan_is_a_clear_error():
    with pytest.raises(ValueError, match="split path has no dense"):
        with nc.tuning(force_path="split"):
            xf.cross_entropy(np.zeros((2, 3), np.float32), np.full((2, 3), 1 / 3, np.float32),
                             backend="cpu")
    with pytest.raises(ValueError, match="no wide passes"):
        with nc.tuning(force_path="rows", force_wide=True):
            xf.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]), backend="cpu")
    with pytest.raises(ValueError, match="force_path must be"):
        with nc.tuning(force_path="fast"):
            pass
