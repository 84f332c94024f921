"""Core semantics of cross_entropy / cross_entropy_with_grad against the naive oracle.

Grid: backend x shape x dtype x (label kind, option) x reduction x (loss only | loss
and gradient), one case per id.  Reasons for the shapes, dtypes and options are in
helpers.py.  The oracle (tests/naive.py) runs on exactly the inputs the library sees.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest

import naive
import xentfast as xf
from xentfast import _dispatch
from helpers import (
    DENSE_OPTIONS,
    DTYPE_IDS,
    DTYPES,
    REDUCTIONS,
    SPARSE_OPTIONS,
    ShapeCase,
    assert_bitwise_equal,
    assert_close,
    backend_shape_params,
    dense_case,
    grad_atol,
    is_simulated_cuda,
    loss_atol,
    oracle_inputs,
    rtol_for,
    sparse_case,
)

KIND_OPTIONS = [("sparse", o) for o in SPARSE_OPTIONS] + [("dense", o) for o in DENSE_OPTIONS]
# The oracle is a Python loop: big rows get the baseline and the everything-at-once
# options only (the options are independent of C; these two cover their code paths).
BIG_OPTIONS = {"plain", "all"}


@functools.lru_cache(maxsize=None)
def _case(shape_case: ShapeCase, dtype_name: str, kind: str, option: str, reduction: str):
    """Inputs and oracle results, seeded by the case (not the backend): every backend
    and both modes see the same data, and the oracle runs once per case."""
    dtype = np.dtype(next(d for d in DTYPES if d.name == dtype_name))
    rng = np.random.default_rng(zlib.crc32(f"{shape_case.id}-{dtype_name}-{kind}-{option}".encode()))
    make = sparse_case if kind == "sparse" else dense_case
    logits, labels, kwargs = make(rng, shape_case, dtype, option)
    for a in (logits, labels):
        a.setflags(write=False)  # shared between tests: nobody may write it
    o_logits, o_labels, o_kwargs = oracle_inputs(logits, labels, kwargs, dtype)
    loss, grad, lse = naive.cross_entropy(o_logits, o_labels, reduction=reduction, **o_kwargs)
    return logits, labels, kwargs, loss, grad, lse


def _grid():
    """The full grid; under the CUDA simulator (~1e4x slower) every (shape, dtype,
    option) case still runs, but with one reduction and one mode each, rotating so
    that every reduction and mode is exercised across the cases."""
    turn = 0
    for p in backend_shape_params():
        backend, shape_case = p.values
        thin = is_simulated_cuda(backend)
        for dtype_index, dtype_name in enumerate(DTYPE_IDS):
            if shape_case.dtypes is not None and dtype_name not in shape_case.dtypes:
                continue
            for kind, option in KIND_OPTIONS:
                if shape_case.big and option not in BIG_OPTIONS:
                    continue
                turn += 1
                # simulator: float32 always, plus one other dtype per case, rotating
                if thin and dtype_name != "float32" and turn % (len(DTYPE_IDS) - 1) != dtype_index % (len(DTYPE_IDS) - 1):
                    continue
                for reduction in REDUCTIONS:
                    for mode in ("loss", "grad"):
                        if thin and (reduction, mode) != ROTATION[turn % len(ROTATION)]:
                            continue
                        yield pytest.param(
                            backend, shape_case, dtype_name, kind, option, reduction, mode,
                            id=f"{p.id}-{dtype_name}-{kind}-{option}-{reduction}-{mode}",
                        )


ROTATION = [(r, m) for m in ("grad", "loss") for r in REDUCTIONS]


def _check_loss(loss, expected, logits, labels, kwargs, reduction, dtype, batch_shape):
    if reduction == "none":
        assert isinstance(loss, np.ndarray), type(loss)
        assert loss.shape == batch_shape
    else:
        assert np.ndim(loss) == 0, f"reduction={reduction!r} must give a scalar, got {np.shape(loss)}"
    assert np.asarray(loss).dtype == dtype, f"loss dtype {np.asarray(loss).dtype}, expected {dtype}"
    assert_close(loss, expected, rtol=rtol_for(dtype),
                 atol=loss_atol(logits, labels, kwargs, reduction, dtype), what="loss")


@pytest.mark.parametrize("backend_name,shape_case,dtype_name,kind,option,reduction,mode", list(_grid()))
def test_matches_oracle(backend_name, shape_case, dtype_name, kind, option, reduction, mode):
    logits, labels, kwargs, exp_loss, exp_grad, _ = _case(shape_case, dtype_name, kind, option, reduction)
    dtype = logits.dtype
    before = logits.copy()
    if mode == "loss":
        loss = xf.cross_entropy(logits, labels, reduction=reduction, backend=backend_name, **kwargs)
    else:
        loss, grad = xf.cross_entropy_with_grad(
            logits, labels, reduction=reduction, backend=backend_name, **kwargs)
        assert isinstance(grad, np.ndarray) and grad.shape == logits.shape and grad.dtype == dtype
        assert_close(grad, exp_grad, rtol=rtol_for(dtype), atol=grad_atol(logits, labels, kwargs, reduction, dtype), what="grad")
        assert not np.shares_memory(grad, logits)
    _check_loss(loss, exp_loss, logits, labels, kwargs, reduction, dtype, shape_case.batch_shape)
    assert_bitwise_equal(logits, before, "logits after the call")


def _target_grid():
    turn = 0
    for p in backend_shape_params():
        backend, shape_case = p.values
        if shape_case.big:
            continue  # out=/inplace handling does not depend on the size
        for dtype_name in DTYPE_IDS:
            for kind in ("sparse", "dense"):
                turn += 1
                for reduction in REDUCTIONS:
                    for target in ("out", "inplace"):
                        # one reduction per case under the simulator, rotating
                        if is_simulated_cuda(backend) and reduction != REDUCTIONS[turn % 3]:
                            continue
                        yield pytest.param(backend, shape_case, dtype_name, kind, reduction, target,
                                           id=f"{p.id}-{dtype_name}-{kind}-{reduction}-{target}")


@pytest.mark.sim_sample(0.2)
@pytest.mark.parametrize("backend_name,shape_case,dtype_name,kind,reduction,target", list(_target_grid()))
def test_out_and_inplace(backend_name, shape_case, dtype_name, kind, reduction, target):
    """out= and inplace=True write the very array given and return it; the numbers are
    bitwise those of the plain call (same kernel, same inputs)."""
    logits, labels, kwargs, _, _, _ = _case(shape_case, dtype_name, kind, "all", reduction)
    ref_loss, ref_grad = xf.cross_entropy_with_grad(
        logits, labels, reduction=reduction, backend=backend_name, **kwargs)
    if target == "out":
        out = np.full(logits.shape, 123, logits.dtype)
        loss, grad = xf.cross_entropy_with_grad(
            logits, labels, reduction=reduction, backend=backend_name, out=out, **kwargs)
        assert grad is out
    else:
        work = logits.copy()
        loss, grad = xf.cross_entropy_with_grad(
            work, labels, reduction=reduction, backend=backend_name, inplace=True, **kwargs)
        assert grad is work
    assert_bitwise_equal(grad, ref_grad, "gradient written to the target")
    assert_bitwise_equal(loss, ref_loss, "loss")


@pytest.mark.parametrize("dtype_name", DTYPE_IDS)
@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_return_lse(backend, dtype_name, kind, rng):
    shape_case = ShapeCase("3D_axis1", (3, 6, 2), 1, "")
    dtype = np.dtype(next(d for d in DTYPES if d.name == dtype_name))
    make = sparse_case if kind == "sparse" else dense_case
    logits, labels, kwargs = make(rng, shape_case, dtype, "all")
    o_logits, o_labels, o_kwargs = oracle_inputs(logits, labels, kwargs, dtype)
    _, _, exp_lse = naive.cross_entropy(o_logits, o_labels, **o_kwargs)
    loss, lse = xf.cross_entropy(logits, labels, backend=backend, return_lse=True, **kwargs)
    loss2, grad, lse2 = xf.cross_entropy_with_grad(logits, labels, backend=backend,
                                                   return_lse=True, **kwargs)
    for got in (lse, lse2):
        assert got.shape == (3, 2) and got.dtype == dtype
        assert_close(got, exp_lse, rtol=rtol_for(dtype),
                     atol=rtol_for(dtype) * (np.max(np.abs(exp_lse)) + 1), what="lse")
    assert_bitwise_equal(loss, loss2, "loss with and without the gradient")


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("option", ["plain", "weight", "smooth", "z_loss", "all"])
def test_gradient_is_the_derivative_of_the_loss(host_backend, kind, option, rng):
    """Central differences of the float64 loss: checks the gradient formula itself, not
    just agreement with an oracle that was derived the same way.  (Host backends only:
    ~100 calls per case; the CUDA gradient is checked against the oracle elsewhere.)"""
    backend = host_backend
    shape_case = ShapeCase("C5", (4, 5), -1, "")
    make = sparse_case if kind == "sparse" else dense_case
    logits, labels, kwargs = make(rng, shape_case, np.float64, option)
    for reduction in REDUCTIONS:
        _, grad = xf.cross_entropy_with_grad(logits, labels, reduction=reduction,
                                             backend=backend, **kwargs)
        h = 1e-6
        numeric = np.zeros_like(logits)
        for idx in np.ndindex(logits.shape):
            plus, minus = logits.copy(), logits.copy()
            plus[idx] += h
            minus[idx] -= h
            f = lambda z: np.sum(xf.cross_entropy(z, labels, reduction=reduction,  # noqa: E731
                                                  backend=backend, **kwargs), dtype=np.float64)
            numeric[idx] = (f(plus) - f(minus)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7,
                                   err_msg=f"reduction={reduction}")


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_none_gradient_is_gradient_of_sum(backend, kind, rng):
    """reduction="none" returns TF's backprop: the gradient of the sum of row losses."""
    make = sparse_case if kind == "sparse" else dense_case
    logits, labels, kwargs = make(rng, ShapeCase("C7", (6, 7), -1, ""), np.float32, "all")
    loss_none, g_none = xf.cross_entropy_with_grad(logits, labels, reduction="none",
                                                   backend=backend, **kwargs)
    loss_sum, g_sum = xf.cross_entropy_with_grad(logits, labels, reduction="sum",
                                                 backend=backend, **kwargs)
    assert_bitwise_equal(g_none, g_sum, "gradient of 'none' vs 'sum'")
    np.testing.assert_allclose(np.sum(loss_none, dtype=np.float64), loss_sum, rtol=1e-6)


def test_mean_over_no_kept_row_is_zero(backend):
    """Documented difference from PyTorch (NaN): a mean over no kept row is 0."""
    logits = np.arange(12, dtype=np.float32).reshape(3, 4)
    for labels, kw in [(np.full(3, -100), {}),
                       (np.full(3, 1), {"ignore_index": 1}),
                       (np.array([0, 0, -100]), {"weight": np.array([0.0, 1, 1, 1])})]:
        loss, grad = xf.cross_entropy_with_grad(logits, labels, backend=backend, **kw)
        assert loss == 0.0 and not np.isnan(loss), kw
        assert np.all(grad == 0), kw
        assert xf.cross_entropy(logits, labels, backend=backend, **kw) == 0.0


def test_one_class_loss_is_exactly_zero(backend, rng):
    logits = rng.standard_normal((5, 1)).astype(np.float32) * 10
    loss, grad = xf.cross_entropy_with_grad(logits, np.zeros(5, np.int64), reduction="none",
                                            backend=backend)
    assert np.all(loss == 0) and np.all(grad == 0)


@pytest.mark.parametrize("label_dtype", ["int8", "int16", "int32", "uint8", "uint16", "uint32",
                                         "uint64", ">i8", "<i4"])
def test_label_integer_dtypes_give_identical_results(backend, label_dtype, rng):
    """Any integer dtype (and byte order) of class ids means the same ids."""
    logits = rng.standard_normal((6, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=6)
    ref = xf.cross_entropy_with_grad(logits, labels, reduction="none", backend=backend)
    got = xf.cross_entropy_with_grad(logits, labels.astype(label_dtype), reduction="none",
                                     backend=backend)
    assert_bitwise_equal(got[0], ref[0], "loss")
    assert_bitwise_equal(got[1], ref[1], "grad")


def test_python_lists_and_weight_dtypes(backend):
    """array_like inputs: lists are converted (float64 logits), int weights accepted."""
    logits = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    labels = [2, 0]
    loss = xf.cross_entropy(logits, labels, weight=[1, 2, 3], backend=backend)
    expected, _, _ = naive.cross_entropy(np.array(logits), np.array(labels),
                                         weight=np.array([1.0, 2, 3]))
    assert np.asarray(loss).dtype == np.float64
    assert_close(loss, expected, rtol=1e-10, what="loss")


@pytest.mark.parametrize("weight_dtype", ["bfloat16", "float16", "int8", "float32"])
def test_class_weights_of_any_real_dtype(backend, weight_dtype, rng):
    """Class weights in bfloat16 (as logits may be), float16 or integers: read as their
    exact values in the accumulation dtype."""
    if weight_dtype == "bfloat16":
        weight_dtype = pytest.importorskip("ml_dtypes").bfloat16
    weight = np.array([1, 2.5, 0.5, 3, 1], dtype=weight_dtype)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = rng.integers(0, 5, 6)
    loss, grad = xf.cross_entropy_with_grad(x, y, weight=weight, backend=backend)
    exact_weight = weight.astype(np.float64)
    expected, expected_grad, _ = naive.cross_entropy(x, y, weight=exact_weight)
    assert_close(loss, expected, rtol=1e-6, what="loss")
    assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7, what="grad")


@pytest.mark.parametrize("dtype_name", DTYPE_IDS)
def test_dense_labels_of_another_float_dtype(backend, dtype_name, rng):
    """Probability labels of any float dtype are read in the compute dtype."""
    dtype = np.dtype(next(d for d in DTYPES if d.name == dtype_name))
    logits = rng.standard_normal((4, 6)).astype(dtype)
    labels64 = rng.dirichlet(np.ones(6), size=4)
    native = [np.dtype(d) for d in _dispatch.load(backend).NATIVE_DTYPES]
    labels_c = labels64.astype(dtype if dtype in native else np.float32)  # the compute dtype
    got = xf.cross_entropy(logits, labels64, reduction="none", backend=backend)
    exp, _, _ = naive.cross_entropy(logits, labels_c, reduction="none")
    assert got.dtype == dtype
    assert_close(got, exp, rtol=rtol_for(dtype), atol=rtol_for(dtype) * 20, what="loss")


def test_mean_denominator_hand_over_from_the_label_check():
    """check_labels returns the kept-row count when every row is kept (all labels are
    class ids and ignore_index is none of them); any other case is counted."""
    from xentfast._arrays import HOST

    no_weight = np.empty(0)
    y = np.array([0, 1, 2, 1])
    kept = HOST.check_labels(y, (4,), 3, -100)
    assert HOST.kept_weight_total(y, no_weight, -100, kept) == 4.0
    kept = HOST.check_labels(y, (4,), 3, 1)  # ignore_index is a class id: rows 1 and 3 skipped
    assert kept is None
    assert HOST.kept_weight_total(y, no_weight, 1, kept) == 2.0
    other = np.array([0, -100, 2, 1])  # contains ignored rows: counted
    assert HOST.check_labels(other, (4,), 3, -100) is None
    assert HOST.kept_weight_total(other, no_weight, -100) == 3.0
    assert HOST.kept_weight_total(y, no_weight, 2) == 3.0
    # end to end: mean over the kept rows
    x = np.zeros((4, 3))
    assert np.isclose(xf.cross_entropy(x, [0, 1, 2, 1], ignore_index=1, backend="numpy"),
                      np.log(3.0))
