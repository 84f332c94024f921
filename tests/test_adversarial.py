"""Adversarial inputs: special values, empty batches, and every memory layout.

Value cases and layouts come from helpers.py (adversarial_values, LAYOUTS), each with
the reason it is there.  Layouts must give bitwise the results of the contiguous call
and leave their memory untouched; inplace=True / out= must write the caller's memory.
"""

from __future__ import annotations


import numpy as np
import pytest

import naive
import xentfast as xf
from helpers import (
    DTYPE_IDS,
    DTYPES,
    LAYOUTS,
    MARKER,
    REDUCTIONS,
    adversarial_values,
    assert_bitwise_equal,
    assert_close,
    grad_atol,
    loss_atol,
    rtol_for,
    unmap_rows,
)


def _dtype(name):
    return next(d for d in DTYPES if d.name == name)


def _dense_labels(rng, x, y, case):
    """Probability labels for a value case: zero on -inf masks (so they contribute
    nothing), all mass on the -inf true class for "inf_label", one-hot for "huge"."""
    n, c = x.shape
    t = rng.random((n, c)) + 0.1
    if case == "neg_inf":
        t[np.isneginf(x)] = 0.0
    if case in ("huge", "inf_label"):
        rows = slice(None) if case == "huge" else slice(0, 1)
        t[rows] = 0.0
        t[np.arange(n)[rows], y[rows]] = 1.0
    return t / t.sum(axis=1, keepdims=True)


@pytest.mark.sim_sample(0.5)
@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("dtype_name", DTYPE_IDS)
def test_value_cases(backend, value_case, dtype_name, kind, rng):
    dtype = _dtype(dtype_name)
    x64, y = adversarial_values(rng, 4, 6, dtype, value_case)
    x = x64.astype(dtype)
    labels = y if kind == "sparse" else _dense_labels(rng, x64, y, value_case).astype(dtype)
    loss, grad = xf.cross_entropy_with_grad(x, labels, reduction="none", backend=backend)
    exp_loss, exp_grad, _ = naive.cross_entropy(x, labels, reduction="none")
    assert loss.dtype == dtype and grad.dtype == dtype
    if value_case == "huge":  # exact: the oracle rounded once to the dtype
        assert_bitwise_equal(loss, exp_loss.astype(dtype), "loss of huge logits")
        assert_bitwise_equal(grad, exp_grad.astype(dtype), "grad of huge logits")
    else:
        assert_close(loss, exp_loss, rtol=rtol_for(dtype),
                     atol=loss_atol(x, labels, {}, "none", dtype), what="loss")
        assert_close(grad, exp_grad, rtol=rtol_for(dtype),
                     atol=grad_atol(x, labels, {}, "none", dtype), what="grad")

    others = [i for i in range(4) if i != 1]
    if value_case in ("nan", "all_neg_inf", "pos_inf"):
        # only row 1 is poisoned, entirely; every other row is finite
        assert np.isnan(loss[1]) and np.all(np.isnan(grad[1]))
        assert np.all(np.isfinite(loss[others])) and np.all(np.isfinite(grad[others]))
        for reduction in ("mean", "sum"):
            assert np.isnan(xf.cross_entropy(x, labels, reduction=reduction, backend=backend))
    elif value_case == "neg_inf":
        masked = np.isneginf(x)
        assert masked.any()
        assert np.all(grad[masked] == 0), "a -inf logit has probability 0 and gradient 0"
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
        assert np.all(xf.softmax(x, backend=backend)[masked] == 0)
    elif value_case == "inf_label":
        assert loss[0] == np.inf and np.all(np.isfinite(grad))
        assert xf.cross_entropy(x, labels, reduction="sum", backend=backend) == np.inf


# Long rows reach other code than the 4 x 6 grid above: the loss-only 512-bit row passes
# of the cpu backend (c >= 320) finish a row with a 64-element window that overlaps
# elements already counted, and every backend has vector tails.  A special value must
# act the same wherever it sits: in the vector body, in the overlap (counted once, not
# twice), or in the tail.
LONG_ROWS = {
    383: "63-element tail: the window overlaps 1 counted element",
    1000: "40-element tail, window overlaps 24 counted elements",
    1024: "a multiple of 64: no tail window",
}


def _long_row_positions(c):
    body = c - c % 64
    return {"first": 0, "overlap": max(c - 64, 0), "last_body": body - 1, "last": c - 1}


@pytest.mark.sim_sample(0.1)  # 5 x 1024 elements is slow on the simulator
@pytest.mark.parametrize("where", ["first", "overlap", "last_body", "last"])
@pytest.mark.parametrize("special", ["nan", "pos_inf", "neg_inf_mask", "max_here"])
@pytest.mark.parametrize("c", list(LONG_ROWS), ids=[f"C{c}" for c in LONG_ROWS])
def test_special_values_anywhere_in_a_long_row(backend, c, special, where, rng):
    n = 5
    x = rng.standard_normal((n, c)) * 3
    y = rng.integers(0, c, size=n)
    j = _long_row_positions(c)[where]
    y[1] = (j + 1) % c  # the poisoned element is not the true class
    if special == "nan":
        x[1, j] = np.nan
    elif special == "pos_inf":
        x[1, j] = np.inf
    elif special == "neg_inf_mask":
        x[1, j] = -np.inf
    else:  # the row's maximum sits at j, far above the rest: exp of everything else ~ 0
        x[1, j] = 60.0
    x = x.astype(np.float32)
    loss = xf.cross_entropy(x, y, reduction="none", backend=backend)
    lse = xf.logsumexp(x, backend=backend)
    loss_g, grad = xf.cross_entropy_with_grad(x, y, reduction="none", backend=backend)
    exp_loss, exp_grad, exp_lse = naive.cross_entropy(x, y, reduction="none")
    finite = [0, 2, 3, 4]
    assert np.all(np.isfinite(loss[finite])) and np.all(np.isfinite(lse[finite]))
    assert np.all(np.isfinite(grad[finite]))
    if special in ("nan", "pos_inf"):
        assert np.isnan(loss[1]), "the poisoned row must be NaN"
        # logsumexp of a row holding +inf is +inf (SciPy, PyTorch); NaN stays NaN
        assert (np.isnan(lse[1]) if special == "nan" else lse[1] == np.inf), lse[1]
        assert np.isnan(loss_g[1]) and np.all(np.isnan(grad[1]))
        rows = finite
    else:
        rows = list(range(n))
    if special == "neg_inf_mask":
        assert grad[1, j] == 0, "a -inf logit has probability 0 and gradient 0"
    assert_close(loss[rows], exp_loss[rows], rtol=rtol_for(np.float32),
                 atol=loss_atol(x[rows], y[rows], {}, "none", np.float32), what="loss")
    assert_close(loss_g[rows], exp_loss[rows], rtol=rtol_for(np.float32),
                 atol=loss_atol(x[rows], y[rows], {}, "none", np.float32), what="loss (grad)")
    assert_close(grad[rows], exp_grad[rows], rtol=rtol_for(np.float32),
                 atol=grad_atol(x[rows], y[rows], {}, "none", np.float32), what="grad")
    assert_close(lse[rows], exp_lse[rows], rtol=rtol_for(np.float32), atol=1e-6,
                 what="lse")


# exp(d) for d in the window where the result is a small normal or a subnormal number:
# float32 from -87.3 (below 2**-126) to -103.9 (the last subnormal), float64 from -708.4
# to -744.4.  Every element must be exp(d) itself, rounded, never flushed to 0.
UNDERFLOW_WINDOW = {"float32": (-86.0, -103.8), "float64": (-707.0, -744.3)}


@pytest.mark.sim_sample(0.5)
@pytest.mark.parametrize("c", [2, 70, 3000])  # the small-C, row and long-row paths
@pytest.mark.parametrize("dtype_name", list(UNDERFLOW_WINDOW))
def test_results_near_underflow_are_not_flushed(backend, dtype_name, c):
    """Rows [0, d, ..., d] of c classes: every softmax_j and gradient element (label 0)
    of a class at d is e / s with e = exp(d) and s = 1 + (c - 1) e, which rounds to 1
    here, so each must be e itself to within the contract's ulps, counted in the steps
    of its own binade or of the subnormals -- a normal 1.6e-38 or a subnormal 7e-44
    returned as 0 fails.  lse = loss = log1p((c - 1) e) adds c - 1 such terms, each
    rounded by up to half a step: that many half steps more."""
    dtype = np.dtype(dtype_name)
    lo, hi = UNDERFLOW_WINDOW[dtype_name]
    d = np.linspace(lo, hi, 48).astype(dtype)
    x = np.repeat(d[:, None], c, axis=1)
    x[:, 0] = 0
    y = np.zeros(len(d), np.int64)
    # exp(d) in extended precision where the platform has it (x86-64: 64-bit mantissa,
    # no underflow here), else libm's float64 (subnormal for the float64 window,
    # rounded within a step: the slack below covers that)
    e = np.exp(d.astype(np.longdouble))
    want = e.astype(dtype)
    step = np.spacing(np.abs(want)).astype(np.float64)  # a subnormal step below tiny
    total = (c - 1) * e                                 # lse, loss: log1p of it = it
    soft = xf.softmax(x, backend=backend)
    lse = xf.logsumexp(x, backend=backend)
    loss, grad = xf.cross_entropy_with_grad(x, y, reduction="none", backend=backend)
    total_step = np.spacing(np.abs(total.astype(dtype))).astype(np.float64)
    # (c - 1) half steps, multiplied before halving: half the smallest float64
    # subnormal is 0 in float64.  A sum that rounds each term (a subnormal e_j) needs
    # them; one that sums the terms unrounded and rounds once does not.
    sums_slack = (c - 1) * float(np.finfo(dtype).smallest_subnormal) / 2
    for what, got, exact, tol in [
            ("softmax", soft[:, 1:], e[:, None], 4 * step[:, None]),
            ("grad", grad[:, 1:], e[:, None], 64 * step[:, None]),
            # (lse's own 4 ulps on such rows: test_lse_of_many_equal_terms_within_4_ulps)
            ("lse", lse, total, 32 * total_step + sums_slack),
            ("loss", loss, total, 32 * total_step + sums_slack),
            ("-grad_y", -grad[:, 0], total, 64 * total_step + sums_slack)]:
        err = np.abs(got.astype(np.longdouble) - exact)
        bad = np.argwhere(~(err <= tol) | (got == 0))
        assert bad.size == 0, (
            f"{backend} {dtype_name} c={c} {what}: d = {d[bad[0][0]]!r} gives "
            f"{got[tuple(bad[0])]!r}, exact {np.broadcast_to(exact, got.shape)[tuple(bad[0])]!r}")
    assert np.all(soft[:, 0] == 1) and np.all(grad[:, 0] <= 0)


@pytest.mark.sim_sample(0.25)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_lse_of_many_equal_terms_within_4_ulps(backend, dtype_name):
    """Rows [0, d, ..., d]: lse = log1p((c - 1) exp(d)), m = 0, so the lse is the sum of
    the c - 1 equal terms itself, whose rounding errors all go the same way -- the worst
    case of a lane summing them one after the other.  The contract's 4 ulps hold at every
    length (oracle: long double, 64 significant bits)."""
    dtype = np.dtype(dtype_name)
    worst = (0.0, None)
    for c in [10, 40, 64, 65, 70, 1000, 3000, 40000]:   # tiles, small-C, rows
        d = np.array([-0.5, -3.0, -10.0, -20.0, -86.0], dtype)
        x = np.repeat(d[:, None], c, axis=1)
        x[:, 0] = 0
        exact = np.log1p((c - 1) * np.exp(d.astype(np.longdouble)))
        got = xf.logsumexp(x, backend=backend)
        ulps = np.abs(got.astype(np.longdouble) - exact) / np.spacing(exact.astype(dtype))
        k = int(np.argmax(ulps))
        if ulps[k] > worst[0]:
            worst = (float(ulps[k]), (c, float(d[k])))
    assert worst[0] <= 4, f"{backend} {dtype_name}: lse {worst[0]:.2f} ulps at (c, d) = {worst[1]}"


@pytest.mark.sim_sample(0.4)
@pytest.mark.parametrize("with_grad", [False, True], ids=["loss", "grad"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("shape,axis", [((0, 5), -1), ((2, 5, 0), 1), ((0, 3, 4), -1)],
                         ids=["0xC", "2xCx0_axis1", "0x3xC"])
def test_empty_batch(backend, shape, axis, kind, reduction, with_grad):
    """No rows: "none" gives an empty batch-shaped array, "mean" and "sum" give 0."""
    x = np.zeros(shape, np.float32)
    batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    labels = np.zeros(batch, np.int64) if kind == "sparse" else np.zeros(shape, np.float32)
    if with_grad:
        loss, grad = xf.cross_entropy_with_grad(x, labels, axis=axis, reduction=reduction,
                                                backend=backend)
        assert grad.shape == shape and grad.dtype == np.float32
    else:
        loss = xf.cross_entropy(x, labels, axis=axis, reduction=reduction, backend=backend)
    assert np.asarray(loss).dtype == np.float32
    if reduction == "none":
        assert loss.shape == batch
    else:
        assert np.ndim(loss) == 0 and loss == 0.0


def test_empty_batch_other_apis(backend):
    x = np.zeros((0, 4), np.float64)
    assert xf.sparse_softmax_cross_entropy_with_logits(np.zeros(0, np.int32), x,
                                                       backend=backend).shape == (0,)
    assert xf.softmax_cross_entropy_with_logits(x, x, backend=backend).shape == (0,)
    assert xf.softmax(x, backend=backend).shape == (0, 4)
    assert xf.logsumexp(x, backend=backend).shape == (0,)


# ----------------------------------------------------------------------- layouts


def _layout_inputs(rng, dtype, kind):
    """(6, 5) logits with a -inf mask and a NaN row (so a layout that mixes rows up is
    seen), and labels."""
    x = rng.standard_normal((6, 5)) * 3
    y = rng.integers(0, 5, size=6)
    x[2, (y[2] + 1) % 5] = -np.inf
    x[4, 0] = np.nan
    t = rng.random((6, 5)) + 0.1
    t[2, (y[2] + 1) % 5] = 0.0
    t = t / t.sum(axis=1, keepdims=True)
    return x.astype(dtype), (y if kind == "sparse" else t.astype(dtype))


def _labels_in_layout(labels, layout, arr, axis):
    if labels.dtype.kind in "iu":
        batch = tuple(s for i, s in enumerate(arr.shape) if i != axis % arr.ndim)
        return labels.reshape(batch)
    t, t_axis, _ = layout.make(labels)
    assert t_axis == axis
    return t


def _layout_dtype_params(layouts):
    # ml_dtypes' bfloat16 has no byte-swapped form (newbyteorder gives a void dtype),
    # so that one combination is not generated.
    return [pytest.param(layout, name, id=f"{layout.id}-{name}")
            for layout in layouts for name in DTYPE_IDS
            if layout.bfloat16_ok or name != "bfloat16"]


@pytest.mark.sim_sample(0.2)
@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("layout,dtype_name", _layout_dtype_params(LAYOUTS))
def test_layouts_match_contiguous_and_are_never_modified(backend, layout, dtype_name, kind, rng):
    dtype = _dtype(dtype_name)
    x, labels = _layout_inputs(rng, dtype, kind)
    ref_loss, ref_grad = xf.cross_entropy_with_grad(x, labels, reduction="none", backend=backend)
    ref_mean = xf.cross_entropy(x, labels, backend=backend)

    arr, axis, owner = layout.make(x)
    lab = _labels_in_layout(labels, layout, arr, axis)
    owner_before = owner.copy()
    lab_before = lab.copy()
    loss, grad = xf.cross_entropy_with_grad(arr, lab, axis=axis, reduction="none", backend=backend)
    mean = xf.cross_entropy(arr, lab, axis=axis, backend=backend)

    assert loss.dtype == dtype and grad.dtype == dtype  # native order out
    assert grad.shape == arr.shape
    assert_bitwise_equal(unmap_rows(loss, axis), ref_loss, f"loss ({layout.id})")
    assert_bitwise_equal(unmap_rows(grad, axis, 5), ref_grad, f"grad ({layout.id})")
    assert_bitwise_equal(mean, ref_mean, f"mean ({layout.id})")
    assert_bitwise_equal(owner, owner_before, f"the logits' memory ({layout.id})")
    assert_bitwise_equal(lab, lab_before, f"the labels ({layout.id})")
    exp_loss, _, _ = naive.cross_entropy(x, labels, reduction="none")
    assert_close(ref_loss, exp_loss, rtol=rtol_for(dtype),
                 atol=loss_atol(x, labels, {}, "none", dtype), what="loss")


@pytest.mark.parametrize("label_layout", ["strided", "reversed", "byteswapped", "readonly", "int32"])
def test_label_layouts(backend, label_layout, rng):
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=6)
    if label_layout == "strided":
        big = np.zeros(12, np.int64)
        big[::2] = y
        lab = big[::2]
    elif label_layout == "reversed":
        lab = np.ascontiguousarray(y[::-1])[::-1]
    elif label_layout == "byteswapped":
        lab = y.astype(y.dtype.newbyteorder())
    elif label_layout == "readonly":
        lab = y.copy()
        lab.setflags(write=False)
    else:
        lab = y.astype(np.int32)
    before = lab.copy()
    ref = xf.cross_entropy_with_grad(x, y, reduction="none", backend=backend)
    got = xf.cross_entropy_with_grad(x, lab, reduction="none", backend=backend)
    assert_bitwise_equal(got[0], ref[0], "loss")
    assert_bitwise_equal(got[1], ref[1], "grad")
    assert_bitwise_equal(lab, before, "labels")


def test_readonly_weight_and_labels(backend, rng):
    x = rng.standard_normal((4, 3))
    x.setflags(write=False)
    w = np.array([1.0, 2.0, 0.5])
    w.setflags(write=False)
    y = np.array([0, 1, 2, 1])
    y.setflags(write=False)
    loss, grad = xf.cross_entropy_with_grad(x, y, weight=w, backend=backend)
    exp, exp_grad, _ = naive.cross_entropy(x, y, weight=w)
    assert_close(loss, exp, rtol=1e-10, atol=1e-12)
    assert_close(grad, exp_grad, rtol=1e-10, atol=1e-12)


WRITEABLE = [layout for layout in LAYOUTS if layout.writeable]


@pytest.mark.sim_sample(0.2)
@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("layout,dtype_name", _layout_dtype_params(WRITEABLE))
def test_inplace_writes_the_logits_memory(backend, layout, dtype_name, kind, rng):
    """inplace=True returns the logits array itself, holding the gradient (written back
    for layouts the kernel cannot fill directly); gaps of strided views stay as they were."""
    dtype = _dtype(dtype_name)
    x, labels = _layout_inputs(rng, dtype, kind)
    ref_loss, ref_grad = xf.cross_entropy_with_grad(x, labels, reduction="mean", backend=backend)
    arr, axis, owner = layout.make(x)
    lab = _labels_in_layout(labels, layout, arr, axis)
    gaps = int(np.sum(owner == MARKER))
    loss, grad = xf.cross_entropy_with_grad(arr, lab, axis=axis, reduction="mean",
                                            inplace=True, backend=backend)
    assert grad is arr
    assert_bitwise_equal(unmap_rows(arr, axis, 5).astype(dtype), ref_grad, f"logits memory ({layout.id})")
    assert_bitwise_equal(loss, ref_loss, "loss")
    assert int(np.sum(owner == MARKER)) == gaps, "a gap between strided elements was written"


OUT_LAYOUTS = [layout for layout in WRITEABLE if layout.id != "byteswapped"]


@pytest.mark.sim_sample(0.5)
@pytest.mark.parametrize("layout", OUT_LAYOUTS, ids=[layout.id for layout in OUT_LAYOUTS])
def test_out_in_any_layout(backend, layout, rng):
    x, labels = _layout_inputs(rng, np.float32, "sparse")
    arr, axis, _ = layout.make(x)
    lab = _labels_in_layout(labels, layout, arr, axis)
    _, ref_grad = xf.cross_entropy_with_grad(arr, lab, axis=axis, backend=backend)
    out, _, owner = layout.make(np.full_like(x, 5.0))
    gaps = int(np.sum(owner == MARKER))
    before = arr.copy()
    _, grad = xf.cross_entropy_with_grad(arr, lab, axis=axis, out=out, backend=backend)
    assert grad is out
    assert_bitwise_equal(out, ref_grad, "out")
    assert int(np.sum(owner == MARKER)) == gaps
    assert_bitwise_equal(arr, before, "logits")


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("exponent", [-133, -166, 100, 664])
def test_weighted_mean_is_scale_free(backend, exponent, dtype_name):
    """A weighted "mean" is the same for weights w and 2**e w: weights of 1e-40 (2**-133)
    used to give an infinite float32 gradient (1 / sum w[label] overflowed), float64
    weights of 1e-50 (2**-166) a mean of 0 (cast to float32)."""
    x = np.array([[3.0, 1.0, 0.5], [0.2, 2.0, 1.0], [1.0, 1.0, -1.0]], dtype_name)
    y = np.array([0, 1, 2])
    w = np.array([1.0, 0.25, 3.0])
    ref_loss, ref_grad = xf.cross_entropy_with_grad(x, y, weight=w, label_smoothing=0.1,
                                                    backend=backend)
    scaled = np.ldexp(w, exponent)
    with np.errstate(over="ignore", under="ignore"):
        scaled32 = scaled.astype(np.float32)
    for weight in (scaled, scaled32):
        if not np.all(np.isfinite(weight) & (weight != 0)):
            continue  # s w is not representable in that dtype
        loss, grad = xf.cross_entropy_with_grad(x, y, weight=weight, label_smoothing=0.1,
                                                backend=backend)
        np.testing.assert_array_equal(loss, ref_loss, err_msg=str(weight.dtype))
        np.testing.assert_array_equal(grad, ref_grad, err_msg=str(weight.dtype))
