"""16-bit logits read natively through the public API (backends listing ``NATIVE_HALF``).

The precision rule for float16/bfloat16 logits is: float32 arithmetic, each output
rounded once to the logits' dtype.  A backend that reads 16-bit natively must give,
bit for bit, what the float32 call on the widened logits gives once rounded -- widening
is exact, so the two are the same computation -- and must do it through every layout
the public layer accepts (a class axis that is not last, ``out=``, ``inplace=True``).
Probability labels of another dtype are not rounded to 16 bits (the call runs on
float32 copies).  The oracle is the backend's own float32 call: the float32 kernels
are checked against exact arithmetic elsewhere (test_accuracy, test_cross_entropy).
"""

from __future__ import annotations

import numpy as np
import pytest

import xentfast as xf
from xentfast import _dispatch
from helpers import DTYPES, HOST_BACKENDS, assert_bitwise_equal

HALF = [d for d in DTYPES if d.itemsize == 2]


def _native_half(backend: str) -> tuple:
    return tuple(getattr(_dispatch.load(backend), "NATIVE_HALF", ()))


PARAMS = [pytest.param(b, d, id=f"{b}-{d.name}") for b in HOST_BACKENDS for d in HALF
          if d.name in _native_half(b)]

OPTIONS = {
    "plain": {},
    "weight": {"weight": np.linspace(0.5, 2.0, 37)},
    "smooth": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "ignore": {"ignore_index": 3},
}


def test_the_compiled_backends_read_16_bit_natively():
    """The issue's promise: no float32 copy of 16-bit logits on cpu and cython."""
    for backend in ("cpu", "cython"):
        if backend in HOST_BACKENDS:
            assert set(_native_half(backend)) >= {"float16", "bfloat16"}, backend


def _logits(rng, shape, dtype):
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    x[0, 0] = 30.0  # a confident row: tiny losses and gradients (subnormal in float16)
    x[1, :] = x[1, 0]  # ties
    return x.astype(dtype)


def _reference(x16, y, dtype, backend, axis=-1, reduction="mean", **kw):
    """The float32 call on the widened logits, each output rounded once to ``dtype``: a
    reduced loss is formed as the public layer forms it (the float64 sum of the float32
    per-row losses, times 1 / the "mean" denominator) and rounded once from there."""
    x32 = x16.astype(np.float32)
    _, grad = xf.cross_entropy_with_grad(x32, y, axis=axis, reduction=reduction,
                                         backend=backend, **kw)
    rows = xf.cross_entropy(x32, y, axis=axis, reduction="none", backend=backend, **kw)
    if reduction == "none":
        return rows.astype(dtype), grad.astype(dtype)
    total = float(np.sum(rows, dtype=np.float64))
    if reduction == "mean":
        total *= 1.0 / _mean_denominator(y, kw)  # as the public layer scales
    return np.asarray(dtype.type(total)), grad.astype(dtype)


def _mean_denominator(y, kw) -> float:
    if y.dtype.kind == "f":  # probabilities: the row count
        return float(y.shape[0])
    kept = y != kw.get("ignore_index", -100)
    weight = kw.get("weight")
    if weight is None:
        return float(np.count_nonzero(kept))
    return float(np.sum(np.asarray(weight, np.float32)[y[kept]], dtype=np.float64))


@pytest.mark.parametrize("backend,dtype", PARAMS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(64, 37), (700, 37)], ids=["serial", "parallel"])
def test_index_labels_equal_the_float32_call_rounded_once(backend, dtype, option,
                                                          reduction, shape, rng):
    x = _logits(rng, shape, dtype)
    y = rng.integers(0, shape[1], shape[0])
    kw = dict(OPTIONS[option], reduction=reduction)
    loss, grad = xf.cross_entropy_with_grad(x, y, backend=backend, **kw)
    ref_loss, ref_grad = _reference(x, y, dtype, backend, **kw)
    assert grad.dtype == dtype and np.asarray(loss).dtype == dtype
    assert_bitwise_equal(grad, ref_grad, "gradient")
    assert_bitwise_equal(np.asarray(loss), ref_loss, "loss")
    only = xf.cross_entropy(x, y, backend=backend, **kw)
    assert_bitwise_equal(np.asarray(only), ref_loss, "loss-only call")


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_probability_labels_of_the_same_dtype(backend, dtype, rng):
    x = _logits(rng, (300, 50), dtype)
    t = rng.dirichlet(np.ones(50), size=300).astype(dtype)
    loss, grad = xf.cross_entropy_with_grad(x, t, label_smoothing=0.05, backend=backend)
    ref_loss, ref_grad = _reference(x, t.astype(np.float32), dtype, backend,
                                    label_smoothing=0.05)
    assert_bitwise_equal(grad, ref_grad, "gradient")
    assert_bitwise_equal(np.asarray(loss), ref_loss, "loss")


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_float32_probabilities_are_not_rounded_to_16_bits(backend, dtype, rng):
    x = _logits(rng, (40, 30), dtype)
    t = rng.dirichlet(np.ones(30), size=40).astype(np.float32)
    t[:, 0] += 1e-4  # not representable in 16 bits next to the other terms
    loss, grad = xf.cross_entropy_with_grad(x, t, reduction="none", backend=backend)
    ref_loss, ref_grad = _reference(x, t, dtype, backend, reduction="none")
    assert_bitwise_equal(loss, ref_loss, "loss")
    assert_bitwise_equal(grad, ref_grad, "gradient")


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_layouts_out_and_inplace(backend, dtype, rng):
    x = _logits(rng, (200, 33), dtype)
    y = rng.integers(0, 33, 200)
    ref_loss, ref_grad = _reference(x, y, dtype, backend)
    # class axis first: a transposed (strided) view
    loss_t, grad_t = xf.cross_entropy_with_grad(x.T, y, axis=0, backend=backend)
    assert_bitwise_equal(grad_t.T, ref_grad, "axis=0 gradient")
    assert_bitwise_equal(np.asarray(loss_t), ref_loss, "axis=0 loss")
    out = np.empty_like(x)
    returned = xf.cross_entropy_with_grad(x, y, out=out, backend=backend)[1]
    assert returned is out
    assert_bitwise_equal(out, ref_grad, "out= gradient")
    work = x.copy()
    loss_i, grad_i = xf.cross_entropy_with_grad(work, y, inplace=True, backend=backend)
    assert grad_i is work
    assert_bitwise_equal(work, ref_grad, "in-place gradient")
    assert_bitwise_equal(np.asarray(loss_i), ref_loss, "in-place loss")


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_softcap_computes_in_float32(backend, dtype, rng):
    """softcap's tanh is evaluated on float32 logits, as for every 16-bit call."""
    x = _logits(rng, (50, 20), dtype)
    y = rng.integers(0, 20, 50)
    loss, grad = xf.cross_entropy_with_grad(x, y, softcap=5.0, backend=backend)
    ref_loss, ref_grad = _reference(x, y, dtype, backend, softcap=5.0)
    assert_bitwise_equal(grad, ref_grad, "gradient")
    assert_bitwise_equal(np.asarray(loss), ref_loss, "loss")


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_raw_bits_equal_the_typed_call(backend, dtype, rng):
    """PyTorch's bfloat16 memory arrives as uint16 bits (no NumPy bfloat16 type needed):
    the same kernels, the same bits."""
    from xentfast import _api

    x = _logits(rng, (128, 40), dtype)
    y = rng.integers(0, 40, 128)
    loss, grad = xf.cross_entropy_with_grad(x, y, label_smoothing=0.1, backend=backend)
    with _dispatch.use_backend(backend):
        raw_loss, raw_grad = _api._cross_entropy(
            x.view(np.uint16), y, axis=-1, weight=None, ignore_index=-100,
            label_smoothing=0.1, z_loss=0.0, reduction="mean", backend=None,
            want_grad=True, half_bits=dtype.name)
    assert raw_grad.dtype == np.uint16 and np.asarray(raw_loss).dtype == np.float32
    assert_bitwise_equal(raw_grad.view(dtype), grad, "gradient bits")
    assert_bitwise_equal(np.asarray(np.float32(raw_loss)).astype(dtype), np.asarray(loss),
                         "loss")


def test_raw_bits_refuse_what_they_cannot_read(rng):
    from xentfast import _api

    x = np.zeros((4, 3), np.uint16)
    with pytest.raises(TypeError, match="raw bfloat16 bits need uint16 logits and a backend"):
        _api._cross_entropy(x, np.zeros(4, np.int64), axis=-1, weight=None,
                            ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                            reduction="mean", backend="numpy", want_grad=False,
                            half_bits="bfloat16")
