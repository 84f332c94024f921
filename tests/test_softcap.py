"""Logit soft-capping (Gemma 2): ``softcap=c`` means the logits ``c * tanh(z / c)``.

Oracle: the float64 loss and gradient (tests/naive.py) of the capped logits computed in
float64, the gradient times the chain factor ``1 / cosh^2(z / c)``.  The kernels see the
capped logits rounded to the working dtype, so the loss may differ from the oracle by
the effect of that one rounding (``|dL/dz| <= weight``-sized, per capped logit ``<= c``):
an absolute allowance of a few units of ``c * eps`` on top of the usual relative bound.
"""

from __future__ import annotations

import numpy as np
import pytest

import naive
import xentfast as xf
from helpers import DTYPES, assert_close, make_probabilities, make_weight, work_dtype


def _capped(z, cap):
    z = np.asarray(z, np.float64)
    return cap * np.tanh(z / cap)


def _slope(z, cap):
    with np.errstate(over="ignore"):
        return 1.0 / np.cosh(np.asarray(z, np.float64) / cap) ** 2


def _tolerances(dtype, cap, c):
    eps = float(np.finfo(work_dtype(dtype)).eps)
    if np.dtype(dtype).itemsize == 2:  # results rounded to 16 bits once more
        eps = float(np.finfo(dtype).eps)
    return dict(rtol=8 * eps, atol=8 * eps * max(cap, 1.0) * np.sqrt(c))


OPTIONS = {
    "plain": {},
    "weight_smooth_z": {"label_smoothing": 0.1, "z_loss": 1e-3},
    "ignore": {"ignore_index": 1},
}


@pytest.mark.sim_sample(0.3)
@pytest.mark.parametrize("labels_kind,option", [  # ignore_index: class-index labels only
    (kind, option) for kind in ("sparse", "dense") for option in OPTIONS
    if not (kind == "dense" and option == "ignore")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("cap", [0.5, 30.0])
def test_softcap_matches_capped_logits(backend, dtype, labels_kind, reduction, option, cap, rng):
    n, c = 9, 13
    x = (rng.standard_normal((n, c)) * 20).astype(dtype)
    kwargs = dict(OPTIONS[option])
    if option == "weight_smooth_z":
        kwargs["weight"] = make_weight(rng, c)
    if labels_kind == "sparse":
        y = rng.integers(0, c, n)
        y[2] = 1
    else:
        y = make_probabilities(rng, (n, c), -1, dtype)
    loss, grad = xf.cross_entropy_with_grad(x, y, softcap=cap, reduction=reduction,
                                            backend=backend, **kwargs)
    loss_only = xf.cross_entropy(x, y, softcap=cap, reduction=reduction, backend=backend,
                                 **kwargs)
    y64 = y if labels_kind == "sparse" else y.astype(np.float64)
    exp_loss, exp_grad, _ = naive.cross_entropy(_capped(x, cap), y64, reduction=reduction,
                                                **kwargs)
    exp_grad = exp_grad * _slope(x, cap)
    tol = _tolerances(dtype, cap, c)
    assert np.asarray(loss).dtype == dtype and grad.dtype == dtype and grad.shape == x.shape
    assert_close(np.asarray(loss).astype(np.float64), exp_loss, what="loss", **tol)
    # The loss-only kernels are other code paths than loss+grad: equal to a few ulps.
    assert_close(np.asarray(loss_only).astype(np.float64), np.asarray(loss).astype(np.float64),
                 rtol=8 * float(np.finfo(dtype).eps), atol=0, what="loss only")
    assert_close(grad.astype(np.float64), exp_grad, what="grad", **tol)


def test_softcap_in_place_and_out(host_backend, rng):
    """inplace=True overwrites the logits with the gradient: the chain factor is read
    from the logits before that; out= gets the same bits."""
    x = (rng.standard_normal((6, 7)) * 40).astype(np.float32)
    y = rng.integers(0, 7, 6)
    loss, grad = xf.cross_entropy_with_grad(x, y, softcap=10.0, backend=host_backend)
    out = np.empty_like(x)
    loss_out, grad_out = xf.cross_entropy_with_grad(x, y, softcap=10.0, out=out,
                                                    backend=host_backend)
    assert grad_out is out
    work = x.copy()
    loss_in, grad_in = xf.cross_entropy_with_grad(work, y, softcap=10.0, inplace=True,
                                                  backend=host_backend)
    assert grad_in is work
    for got in (grad_out, grad_in):
        np.testing.assert_array_equal(got, grad)
    assert loss_out == loss and loss_in == loss


def test_softcap_on_extreme_logits(backend):
    """+-inf and +-1e30 cap to +-c exactly with a chain factor of 0; the capped row is
    an ordinary row (a -inf logit is no longer a mask once capped, as in Gemma 2)."""
    cap = 5.0
    x = np.array([[np.inf, 0.0, -np.inf], [1e30, -1e30, 0.0], [3.0, 3.0, 3.0]], np.float64)
    y = np.array([1, 0, 2])
    loss, grad = xf.cross_entropy_with_grad(x, y, softcap=cap, reduction="none",
                                            backend=backend)
    z = np.array([[cap, 0.0, -cap], [cap, -cap, 0.0], [cap * np.tanh(0.6)] * 3])
    exp_loss, exp_grad, _ = naive.cross_entropy(z, y, reduction="none")
    exp_grad = exp_grad * np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [_slope(3.0, cap)] * 3])
    assert_close(loss, exp_loss, rtol=1e-13, atol=1e-15, what="loss")
    assert_close(grad, exp_grad, rtol=1e-13, atol=1e-15, what="grad")
    assert np.all(np.isfinite(grad))


def test_softcap_slope_has_no_cancellation(host_backend):
    """Deep in saturation the chain factor 1 - tanh^2 is tiny; computed as 1/cosh^2 it
    keeps its relative accuracy (1 - tanh^2 in float32 would be 0 or off by 100%)."""
    cap = 1.0
    x = np.array([[12.0, 0.0, -12.0]], np.float32)
    y = np.array([1])
    _, grad = xf.cross_entropy_with_grad(x, y, softcap=cap, reduction="sum",
                                         backend=host_backend)
    _, g, _ = naive.cross_entropy(_capped(x, cap), y, reduction="sum")
    expected = g * _slope(x, cap)
    assert expected[0, 0] != 0 and abs(expected[0, 0]) < 1e-9
    assert_close(grad.astype(np.float64), expected, rtol=16 * 2.0 ** -24, atol=0, what="grad")


@pytest.mark.parametrize("value,error", [(0.0, ValueError), (-1.0, ValueError),
                                         (np.inf, ValueError), (np.nan, ValueError),
                                         ("30", TypeError)], ids=str)
def test_bad_softcap(backend, value, error):
    with pytest.raises(error, match="softcap must be"):
        xf.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), softcap=value, backend=backend)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if work_dtype(d) == np.float32],
                         ids=lambda d: d.name)
@pytest.mark.parametrize("cap", [30.0, 50.0])
def test_softcap_confident_rows_within_the_accuracy_rule(host_backend, dtype, cap):
    """float32 (and 16-bit) soft-capped rows keep DESIGN's bounds against the exact
    oracle: confident rows, whose loss is a tiny exp of the capped gap.  With the capped
    logits rounded to float32 first, a gap of cap * (tanh(65.5/50) + tanh(38.1/50)) gave
    a loss 64 ulps off at cap = 50 (81.6 for [191.5, -37.9]) and gradients 75 ulps off."""
    from helpers import ULPS, assert_accurate

    rng = np.random.default_rng(int(cap))
    x = np.concatenate([
        np.array([[65.45801544189453, -38.088104248046875, -40.0, -45.0],
                  [191.48519897460938, -37.892147064208984, -60.0, -30.0]]),
        rng.standard_normal((30, 4)) * cap,
        rng.standard_normal((30, 4)) * 3 + np.array([[2.5 * cap, -cap, -cap, -0.8 * cap]]),
    ]).astype(dtype)
    y = np.argmax(x.astype(np.float64), axis=1)
    y[::5] = 1
    for kwargs in ({}, {"label_smoothing": 0.1, "weight": np.linspace(0.5, 2.0, 4)}):
        loss, grad = xf.cross_entropy_with_grad(x, y, softcap=cap, reduction="none",
                                                backend=host_backend, **kwargs)
        xw = x.astype(np.float64)
        exact = naive.exact_cross_entropy(_capped(xw, cap), y, reduction="none", **kwargs)
        assert_accurate(loss, exact["loss"], dtype, "loss", ULPS["loss"])
        slope = _slope(xw, cap)
        g = exact["grad"]
        g = type(g)(g.value * slope, g.low * slope, g.scale * slope)
        assert_accurate(grad, g, dtype, "grad", ULPS["grad"])


def test_softcap_blocks_of_rows_give_the_same_bits(host_backend, monkeypatch):
    """float32 soft-capping runs in float64 a block of rows at a time: several blocks
    and a partial last one (forced by a tiny block size) give the one-block bits, also
    in place (each block's rows are read before their gradient is written)."""
    import xentfast._api as api

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((10, 7)) * 40).astype(np.float32)
    y = rng.integers(0, 7, 10)
    one = xf.cross_entropy_with_grad(x, y, softcap=30.0, reduction="none",
                                     backend=host_backend)
    monkeypatch.setattr(api, "SOFTCAP_BLOCK_BYTES", 8 * 7 * 3)  # 3 rows a block: 3+3+3+1
    many = xf.cross_entropy_with_grad(x, y, softcap=30.0, reduction="none",
                                      backend=host_backend)
    work = x.copy()
    in_place = xf.cross_entropy_with_grad(work, y, softcap=30.0, reduction="none",
                                          inplace=True, backend=host_backend)
    for got in (many, in_place):
        np.testing.assert_array_equal(got[0], one[0])
        np.testing.assert_array_equal(got[1], one[1])
