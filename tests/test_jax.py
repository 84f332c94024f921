"""xentfast.jax: optax's losses and xentfast.cross_entropy as differentiable JAX ops.

Oracles, each independent of the code under test:
* xentfast's NumPy API on the same backend -- the JAX ops must give its bits (they run
  the same kernel on XLA's buffers), and its gradient scaled by the cotangent;
* optax (when installed) for the optax-named functions, values and vector-Jacobian
  products;
* tests/naive.py (float64 loops) for the analytic gradients, with respect to logits
  and probability labels.

Grids: the option ids of helpers.SPARSE_OPTIONS / DENSE_OPTIONS (reasons there) x the
three reductions, on helpers' (6, 7) shape; every option together ("all") on the
other layouts (class axis 1, a single row, one class, an empty batch).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import xentfast as xf  # noqa: E402
import xentfast.jax as xj  # noqa: E402

import helpers  # noqa: E402
import naive  # noqa: E402

BF16 = np.dtype(jnp.bfloat16)  # ml_dtypes.bfloat16 (a JAX dependency)

SHAPE_C7 = next(s for s in helpers.HOST_SHAPES if s.id == "C7")
OTHER_SHAPES = [s for s in helpers.HOST_SHAPES if s.id in ("3D_axis1", "1D", "C1")]

# A data-dependent error raised inside a compiled computation comes back from XLA:
# JAX raises it as JaxRuntimeError (some dispatch paths as ValueError, for XLA's
# INVALID_ARGUMENT status), with xentfast's message.
HOST_ERRORS = (ValueError, jax.errors.JaxRuntimeError)


def _optax():
    return pytest.importorskip("optax")


def _enable_x64():
    """jax.enable_x64 (newer JAX) or jax.experimental.enable_x64 (older)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # pragma: no cover - older JAX

    return enable_x64()


def _np(a) -> np.ndarray:
    return np.asarray(a)


def _jax_kwargs(kwargs):
    return {k: (jnp.asarray(v) if k == "weight" else v) for k, v in kwargs.items()}


def _row_cotangent(ct, reduction, axis):
    """The cotangent as it multiplies a row's gradient."""
    return np.expand_dims(ct, axis) if reduction == "none" else ct


def _cotangent(rng, x, kwargs, reduction, dtype):
    """A random, non-uniform cotangent of the loss's shape (a scalar for mean/sum)."""
    if reduction != "none":
        return np.asarray(rng.uniform(0.5, 2.0), dtype)
    batch = np.delete(np.array(x.shape), kwargs.get("axis", -1) % x.ndim)
    return rng.uniform(0.5, 2.0, tuple(batch)).astype(dtype)


def _host_calls(closed_jaxpr) -> list:
    """The options of every host call in a jaxpr and the jaxprs nested in it."""
    from jax.extend.core import subjaxprs

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "xentfast_cross_entropy":
                found.append(eqn.params["opts"])
        for sub in subjaxprs(jaxpr):
            walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


# ---------------------------------------------------------------- importing


def test_import_xentfast_does_not_import_jax():
    code = "import sys, xentfast; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_jax_names_the_install_command():
    code = ("import sys; sys.modules['jax'] = None\n"
            "try:\n    import xentfast.jax\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert "pip install jax" in out, out


def test_host_call_is_the_zero_copy_ffi_handler():
    """On this jaxlib the FFI handler registers; pure_callback is only the fallback."""
    assert xj.FFI_UNAVAILABLE_REASON is None, xj.FFI_UNAVAILABLE_REASON
    assert xj.HOST_CALL == "ffi"


def test_ffi_self_check_runs_inside_a_trace(monkeypatch):
    """The first use checks the handler, even when it happens inside jit tracing."""
    monkeypatch.setattr(xj, "_ffi_checked", False)
    x, y = jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)
    fresh = jax.jit(lambda a, b: xj.cross_entropy(a, b))  # a new function: traced now
    helpers.assert_close(fresh(x, y), np.log(3.0), rtol=1e-6)
    assert xj._ffi_checked and xj.HOST_CALL == "ffi"


def test_failed_ffi_self_check_falls_back_with_a_warning(monkeypatch):
    for name in ("_ffi_checked", "HOST_CALL", "FFI_UNAVAILABLE_REASON"):
        monkeypatch.setattr(xj, name, getattr(xj, name))  # restored after the test
    monkeypatch.setattr(xj, "_ffi_checked", False)
    monkeypatch.setattr(xj, "_ffi_self_check", lambda: "the handler misbehaved")
    x, y = jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)
    with pytest.warns(RuntimeWarning, match="falls back to jax.pure_callback.*misbehaved"):
        loss = jax.jit(lambda a, b: xj.cross_entropy(a, b))(x, y)
    helpers.assert_close(loss, np.log(3.0), rtol=1e-6)
    assert xj.HOST_CALL == "callback"
    assert xj.FFI_UNAVAILABLE_REASON == "the handler misbehaved"


# ---------------------------------------------------------------- xentfast parity


def _check_against_numpy_api(rng, logits, labels, kwargs, reduction, backend,
                             labels_grad=False):
    """Loss (bits), d logits and (probability labels) d labels via jax.vjp with a
    random cotangent, against xentfast's NumPy API on the same backend."""
    dtype = logits.dtype
    axis = kwargs.get("axis", -1) % logits.ndim
    ref_loss, ref_grad = xf.cross_entropy_with_grad(logits, labels, reduction=reduction,
                                                    backend=backend, **kwargs)
    jkw = _jax_kwargs(kwargs)

    def f(x, t):
        return xj.cross_entropy(x, t, reduction=reduction, backend=backend, **jkw)

    x, t = jnp.asarray(logits), jnp.asarray(labels)
    loss, vjp = jax.vjp(f, x, t) if labels_grad else jax.vjp(lambda a: f(a, t), x)
    helpers.assert_bitwise_equal(_np(loss), np.asarray(ref_loss), "loss")
    ct = _cotangent(rng, logits, kwargs, reduction, dtype)
    grads = vjp(jnp.asarray(ct))
    expected = (ref_grad * _row_cotangent(ct, reduction, axis)).astype(dtype)
    helpers.assert_bitwise_equal(_np(grads[0]), expected, "d logits")
    if labels_grad:
        # d loss / d t_c = -(1 - eps) w_c log p_c per row, times the reduction's factor
        eps = kwargs.get("label_smoothing", 0.0)
        w = kwargs.get("weight")
        log_p = naive.log_softmax(logits.astype(np.float64), axis=axis)
        d = -(1.0 - eps) * log_p
        if w is not None:
            shape = [1] * logits.ndim
            shape[axis] = logits.shape[axis]
            d = d * np.asarray(w, np.float64).reshape(shape)
        if reduction == "mean":
            d = d / max(1, logits.size // logits.shape[axis])
        d = d * _row_cotangent(ct.astype(np.float64), reduction, axis)
        helpers.assert_close(_np(grads[1]), d, rtol=1e-5, atol=1e-6 * np.abs(d).max(),
                             what="d labels")


@pytest.mark.parametrize("reduction", helpers.REDUCTIONS)
@pytest.mark.parametrize("option", list(helpers.SPARSE_OPTIONS))
def test_index_labels_every_option_matches_numpy_api(rng, option, reduction):
    logits, labels, kwargs = helpers.sparse_case(rng, SHAPE_C7, np.float32, option)
    _check_against_numpy_api(rng, logits, labels, kwargs, reduction, None)


@pytest.mark.parametrize("reduction", helpers.REDUCTIONS)
@pytest.mark.parametrize("option", list(helpers.DENSE_OPTIONS))
def test_probability_labels_every_option_matches_numpy_api(rng, option, reduction):
    logits, labels, kwargs = helpers.dense_case(rng, SHAPE_C7, np.float32, option)
    _check_against_numpy_api(rng, logits, labels, kwargs, reduction, None, labels_grad=True)


@pytest.mark.parametrize("reduction", helpers.REDUCTIONS)
@pytest.mark.parametrize("shape_case", OTHER_SHAPES, ids=lambda s: s.id)
def test_other_layouts_all_options(rng, shape_case, reduction):
    logits, labels, kwargs = helpers.sparse_case(rng, shape_case, np.float32, "all")
    _check_against_numpy_api(rng, logits, labels, kwargs, reduction, None)
    logits, labels, kwargs = helpers.dense_case(rng, shape_case, np.float32, "all")
    _check_against_numpy_api(rng, logits, labels, kwargs, reduction, None, labels_grad=True)


@pytest.mark.parametrize("option", ["all", "all_ignored"])
def test_each_host_backend_gives_its_numpy_bits(rng, host_backend, option):
    """backend= reaches the kernels: each host backend's own bits, under jit too."""
    logits, labels, kwargs = helpers.sparse_case(rng, SHAPE_C7, np.float32, option)
    _check_against_numpy_api(rng, logits, labels, kwargs, "mean", host_backend)
    jkw = _jax_kwargs(kwargs)
    step = jax.jit(jax.value_and_grad(
        lambda x: xj.cross_entropy(x, jnp.asarray(labels), backend=host_backend, **jkw)))
    loss, grad = step(jnp.asarray(logits))
    ref_loss, ref_grad = xf.cross_entropy_with_grad(logits, labels, backend=host_backend,
                                                    **kwargs)
    helpers.assert_bitwise_equal(_np(loss), ref_loss, "jit loss")
    helpers.assert_bitwise_equal(_np(grad), ref_grad, "jit grad")


def test_softcap_matches_numpy_api(rng):
    logits = helpers.make_logits(rng, (6, 7), np.float32, scale=20.0)
    labels = rng.integers(0, 7, 6)
    ref_loss, ref_grad = xf.cross_entropy_with_grad(logits, labels, softcap=5.0)
    loss, grad = jax.value_and_grad(
        lambda x: xj.cross_entropy(x, jnp.asarray(labels), softcap=5.0))(jnp.asarray(logits))
    helpers.assert_bitwise_equal(_np(loss), ref_loss, "loss")
    helpers.assert_bitwise_equal(_np(grad), ref_grad, "grad")


def test_softcap_probability_labels_gradient(rng):
    """With softcap c the labels' gradient is -log_softmax(c tanh(x / c)) per row."""
    logits = helpers.make_logits(rng, (5, 6), np.float32, scale=20.0)
    t = helpers.make_probabilities(rng, (5, 6), -1, np.float32)
    ref_loss = xf.cross_entropy(logits, t, softcap=5.0, reduction="sum")
    loss, (d_x, d_t) = jax.value_and_grad(
        lambda x, p: xj.cross_entropy(x, p, softcap=5.0, reduction="sum"), (0, 1))(
        jnp.asarray(logits), jnp.asarray(t))
    helpers.assert_bitwise_equal(_np(loss), ref_loss, "loss")
    capped = 5.0 * np.tanh(logits.astype(np.float64) / 5.0)
    helpers.assert_close(_np(d_t), -naive.log_softmax(capped), rtol=1e-5, atol=1e-6,
                         what="d labels")
    _, ref_grad = xf.cross_entropy_with_grad(logits, t, softcap=5.0, reduction="sum")
    helpers.assert_bitwise_equal(_np(d_x), ref_grad, "d logits")


def test_use_backend_is_read_when_tracing(rng):
    logits, labels, _ = helpers.sparse_case(rng, SHAPE_C7, np.float32, "plain")
    with xf.use_backend("numpy"):
        jaxpr = jax.make_jaxpr(lambda x: xj.cross_entropy(x, jnp.asarray(labels)))(logits)
    assert [opts.backend for opts in _host_calls(jaxpr)] == ["numpy"]


# ---------------------------------------------------------------- analytic gradients


@pytest.mark.parametrize("reduction", helpers.REDUCTIONS)
def test_grad_is_the_analytic_gradient(rng, reduction):
    """d loss / d x = softmax(x) - onehot(y) per row (weighted, smoothed, z-loss: the
    naive float64 oracle), for every option together."""
    logits, labels, kwargs = helpers.sparse_case(rng, SHAPE_C7, np.float32, "all")
    _, exact_grad, _ = naive.cross_entropy(logits.astype(np.float64), labels,
                                           reduction=reduction, **kwargs)
    jkw = _jax_kwargs(kwargs)
    grad = jax.grad(lambda x: jnp.sum(xj.cross_entropy(x, jnp.asarray(labels),
                                                       reduction=reduction, **jkw)))(
        jnp.asarray(logits))
    helpers.assert_close(_np(grad), exact_grad, rtol=1e-5, atol=1e-7, what="grad")


def test_optax_named_grad_is_softmax_minus_one_hot(rng):
    logits = helpers.make_logits(rng, (9, 11), np.float32)
    labels = rng.integers(0, 11, 9)
    grad = jax.grad(lambda x: xj.softmax_cross_entropy_with_integer_labels(
        x, jnp.asarray(labels)).sum())(jnp.asarray(logits))
    x64 = logits.astype(np.float64)
    p = np.exp(x64 - x64.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(9), labels] -= 1.0
    helpers.assert_close(_np(grad), p, rtol=1e-5, atol=1e-7, what="grad")


# ---------------------------------------------------------------- optax parity

INDEX_AXES = [
    pytest.param((6, 7), -1, id="2d"),
    pytest.param((2, 5, 3), 1, id="3d_axis1"),
    pytest.param((7,), 0, id="1d"),
    pytest.param((2, 3, 4, 5), (2, 3), id="axes23"),
    pytest.param((2, 3, 4, 5), (3, 1), id="axes31"),
]


def _batch_shape(shape, axis):
    axes = axis if isinstance(axis, tuple) else (axis,)
    axes = [a % len(shape) for a in axes]
    return tuple(d for i, d in enumerate(shape) if i not in axes), \
        int(np.prod([shape[a] for a in axes]))


@pytest.mark.parametrize("shape,axis", INDEX_AXES)
def test_integer_labels_match_optax(rng, shape, axis):
    optax = _optax()
    batch, classes = _batch_shape(shape, axis)
    x = jnp.asarray(helpers.make_logits(rng, shape, np.float32))
    y = jnp.asarray(rng.integers(0, classes, batch).astype(np.int32))
    ours, vjp = jax.vjp(lambda a: xj.softmax_cross_entropy_with_integer_labels(a, y, axis), x)
    theirs, vjp_o = jax.vjp(
        lambda a: optax.softmax_cross_entropy_with_integer_labels(a, y, axis), x)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    helpers.assert_close(ours, theirs, rtol=2e-6, atol=1e-6, what="loss")
    ct = jnp.asarray(rng.standard_normal(batch).astype(np.float32))
    helpers.assert_close(vjp(ct)[0], vjp_o(ct)[0], rtol=1e-5, atol=1e-7, what="d logits")


DENSE_AXES = INDEX_AXES + [pytest.param((3, 4, 5), None, id="axis_none")]


@pytest.mark.parametrize("shape,axis", DENSE_AXES)
def test_probability_labels_match_optax(rng, shape, axis):
    optax = _optax()
    x = jnp.asarray(helpers.make_logits(rng, shape, np.float32))
    t = jnp.asarray(rng.random(shape).astype(np.float32))  # unnormalised weights
    ours, vjp = jax.vjp(lambda a, b: xj.softmax_cross_entropy(a, b, axis), x, t)
    theirs, vjp_o = jax.vjp(lambda a, b: optax.softmax_cross_entropy(a, b, axis), x, t)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    helpers.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, what="loss")
    ct = jnp.asarray(rng.standard_normal(ours.shape).astype(np.float32))
    for got, want, what in zip(vjp(ct), vjp_o(ct), ("d logits", "d labels")):
        helpers.assert_close(got, want, rtol=1e-5, atol=1e-6, what=what)


def test_probability_labels_broadcast_like_optax(rng):
    """One label row for every logit row, and one logit row for many label rows."""
    optax = _optax()
    x = jnp.asarray(helpers.make_logits(rng, (5, 6), np.float32))
    t = jax.nn.softmax(jnp.asarray(rng.standard_normal((1, 6)).astype(np.float32)))
    for a, b in ((x, t), (x[:1], jnp.broadcast_to(t, (5, 6)) * 0.5)):
        g = jax.grad(lambda u, v: xj.softmax_cross_entropy(u, v).sum(), (0, 1))(a, b)
        g_o = jax.grad(lambda u, v: optax.softmax_cross_entropy(u, v).sum(), (0, 1))(a, b)
        helpers.assert_close(xj.softmax_cross_entropy(a, b),
                             optax.softmax_cross_entropy(a, b), rtol=1e-5, what="loss")
        for got, want in zip(g, g_o):
            assert got.shape == want.shape
            helpers.assert_close(got, want, rtol=1e-5, atol=1e-6, what="grad")


@pytest.mark.parametrize("logits_dtype,labels_dtype", [
    ("bfloat16", "float32"), ("float32", "bfloat16"), ("bfloat16", "int32"),
    ("float16", "float16"), ("float32", "int8"),
])
def test_probability_labels_dtype_promotion_as_optax(rng, logits_dtype, labels_dtype):
    """The loss's dtype is optax's (labels * log_probs promotes); its value is the
    exact cross-entropy of the given (rounded) inputs, to the result dtype's precision
    -- optax itself rounds log_softmax to the logits' dtype first, so it is compared
    only to 16-bit precision."""
    optax = _optax()
    x = jnp.asarray(helpers.make_logits(rng, (4, 5), np.float32)).astype(logits_dtype)
    t = jnp.asarray(np.eye(5)[rng.integers(0, 5, 4)] * 0.75).astype(labels_dtype)
    ours, theirs = xj.softmax_cross_entropy(x, t), optax.softmax_cross_entropy(x, t)
    assert ours.dtype == theirs.dtype
    x64, t64 = _np(x.astype(jnp.float32)).astype(np.float64), _np(t.astype(jnp.float32))
    exact = -(t64 * naive.log_softmax(x64)).sum(-1)
    tol = 1e-2 if np.dtype(ours.dtype).itemsize == 2 else 1e-5
    helpers.assert_close(ours.astype(np.float32), exact, rtol=tol, what="loss")
    helpers.assert_close(ours.astype(np.float32), theirs.astype(np.float32), rtol=1e-2,
                         what="loss vs optax")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_integer_labels_loss_dtype_is_the_logits(rng, dtype):
    optax = _optax()
    x = jnp.asarray(helpers.make_logits(rng, (4, 5), np.float32)).astype(dtype)
    y = jnp.asarray(rng.integers(0, 5, 4).astype(np.uint8))  # any integer dtype
    ours = xj.softmax_cross_entropy_with_integer_labels(x, y)
    theirs = optax.softmax_cross_entropy_with_integer_labels(x, y)
    assert ours.dtype == theirs.dtype == x.dtype


def test_zero_label_at_minus_inf_logit_is_zero_not_nan():
    """0 log 0 = 0 (optax.safe_softmax_cross_entropy's convention); a documented
    difference from optax.softmax_cross_entropy, which gives NaN."""
    x = jnp.asarray([[0.0, -jnp.inf, 1.0]])
    t = jnp.asarray([[0.5, 0.0, 0.5]])
    loss, grad = jax.value_and_grad(lambda a: xj.softmax_cross_entropy(a, t).sum())(x)
    lse = np.logaddexp(0.0, 1.0)
    helpers.assert_close(loss, 0.5 * (lse - 0.0) + 0.5 * (lse - 1.0), rtol=1e-6)
    assert np.isfinite(_np(grad)).all() and _np(grad)[0, 1] == 0.0


# ---------------------------------------------------------------- transformations


def _modes(closed_jaxpr) -> list[str]:
    return [opts.mode for opts in _host_calls(closed_jaxpr)]


def test_forward_runs_loss_only_kernel_and_grad_one_fused_call(rng):
    logits, labels, _ = helpers.sparse_case(rng, SHAPE_C7, np.float32, "plain")
    y = jnp.asarray(labels)
    f = lambda x: xj.cross_entropy(x, y)  # noqa: E731
    assert _modes(jax.make_jaxpr(jax.jit(f))(logits)) == ["loss"]
    assert _modes(jax.make_jaxpr(jax.value_and_grad(f))(logits)) == ["loss_grad"]
    t = jnp.asarray(helpers.make_probabilities(rng, (6, 7), -1, np.float32))
    g = lambda x, p: xj.softmax_cross_entropy(x, p).sum()  # noqa: E731
    assert _modes(jax.make_jaxpr(jax.grad(g))(logits, t)) == ["loss_grad"]
    assert sorted(_modes(jax.make_jaxpr(jax.grad(g, (0, 1)))(logits, t))) == \
        ["log_softmax", "loss_grad"]
    assert sorted(_modes(jax.make_jaxpr(jax.grad(g, 1))(logits, t))) == \
        ["log_softmax", "loss"]


def test_jit_value_and_grad_equal_eager(rng):
    logits, labels, kwargs = helpers.sparse_case(rng, SHAPE_C7, np.float32, "all")
    jkw = _jax_kwargs(kwargs)
    f = lambda x, y: xj.cross_entropy(x, y, **jkw)  # noqa: E731
    x, y = jnp.asarray(logits), jnp.asarray(labels)
    eager = jax.value_and_grad(f)(x, y)
    jitted = jax.jit(jax.value_and_grad(f))(x, y)
    for a, b in zip(eager, jitted):
        helpers.assert_bitwise_equal(_np(a), _np(b))
    helpers.assert_bitwise_equal(_np(jax.jit(f)(x, y)), _np(eager[0]), "jit forward")
    with jax.disable_jit():  # the primitive still compiles itself (no recursion)
        for a, b in zip(jax.value_and_grad(f)(x, y), eager):
            helpers.assert_bitwise_equal(_np(a), _np(b), "disable_jit")


def _stack(fn, *batches):
    return np.stack([_np(fn(*args)) for args in zip(*batches)])


@pytest.mark.parametrize("reduction", helpers.REDUCTIONS)
def test_vmap_each_batch_element_gets_its_own_reduction(rng, reduction):
    b, n, c = 3, 5, 7
    x = jnp.asarray(helpers.make_logits(rng, (b, n, c), np.float32))
    y = jnp.asarray(rng.integers(0, c, (b, n)))
    y = y.at[0, 1].set(-100)  # an ignored row changes element 0's mean denominator
    w = jnp.asarray(rng.uniform(0.5, 2.0, (b, c)).astype(np.float32))
    f = lambda a, t, v=None: xj.cross_entropy(a, t, weight=v, reduction=reduction)  # noqa
    cases = [
        ((0, 0), (x, y)),                     # both mapped
        ((0, None), (x, y[0])),               # labels shared
        ((None, 0), (x[0], y)),               # logits shared
        ((0, 0, 0), (x, y, w)),               # class weights per element
        ((0, 0, None), (x, y, w[0])),         # weights shared
    ]
    for in_axes, args in cases:
        got = jax.jit(jax.vmap(f, in_axes=in_axes))(*args)
        mapped = [a if ax == 0 else [a] * b for a, ax in zip(args, in_axes)]
        helpers.assert_bitwise_equal(_np(got), _stack(f, *mapped), f"vmap {in_axes}")
        g = jax.vmap(jax.grad(lambda *a: jnp.sum(f(*a))), in_axes=in_axes)(*args)
        want = _stack(jax.grad(lambda *a: jnp.sum(f(*a))), *mapped)
        helpers.assert_bitwise_equal(_np(g), want, f"vmap grad {in_axes}")


def test_vmap_moved_axis_nested_and_probability_labels(rng):
    x = jnp.asarray(helpers.make_logits(rng, (4, 2, 3, 6), np.float32))
    y = jnp.asarray(rng.integers(0, 6, (4, 2, 3)))
    f = lambda a, t: xj.cross_entropy(a, t)  # noqa: E731
    # the outer vmap maps axis 1 of the swapped arrays (x's axis 0), the inner one the
    # leading axis of what remains (x's axis 1)
    got = jax.vmap(jax.vmap(f), in_axes=(1, 1))(jnp.swapaxes(x, 0, 1), jnp.swapaxes(y, 0, 1))
    want = np.array([[_np(f(x[i, j], y[i, j])) for j in range(2)] for i in range(4)])
    helpers.assert_bitwise_equal(_np(got), want, "nested vmap")
    p = jnp.asarray(helpers.make_probabilities(rng, (4, 3, 6), -1, np.float32))
    h = lambda a, t: xj.softmax_cross_entropy(a, t).mean()  # noqa: E731
    g = jax.jit(jax.vmap(jax.grad(h, (0, 1))))(x[:, 0], p)
    for i in range(4):
        gi = jax.grad(h, (0, 1))(x[i, 0], p[i])
        for a, b in zip(g, gi):
            helpers.assert_bitwise_equal(_np(a[i]), _np(b), "vmap grad (logits, labels)")


# ---------------------------------------------------------------- dtypes


def _dtype_case(rng, dtype, shape=(6, 7)):
    logits = helpers.make_logits(rng, shape, np.float32).astype(dtype)
    labels = rng.integers(0, shape[-1], shape[:-1])
    return logits, labels


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", helpers.REDUCTIONS)
def test_dtypes_give_numpy_api_bits(rng, dtype, reduction):
    logits, labels = _dtype_case(rng, dtype)
    _check_against_numpy_api(rng, logits, labels.astype(np.int32), {"z_loss": 0.01},
                             reduction, None)


@pytest.mark.parametrize("reduction", helpers.REDUCTIONS)
def test_float64_with_x64(rng, reduction):
    with _enable_x64():
        logits, labels = _dtype_case(rng, np.float64)
        _check_against_numpy_api(rng, logits, labels.astype(np.int64),
                                 {"label_smoothing": 0.1}, reduction, None)
        t = helpers.make_probabilities(rng, (6, 7), -1, np.float64)
        _check_against_numpy_api(rng, logits, t, {}, reduction, None, labels_grad=True)
        loss = xj.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits),
                                                            jnp.asarray(labels))
        assert loss.dtype == jnp.float64


def test_large_gradient_buffer(rng):
    """A result of >= 4 MiB takes the huge-page advice: values unchanged."""
    logits, labels = _dtype_case(rng, np.float32, shape=(1100, 1000))
    _check_against_numpy_api(rng, logits, labels, {}, "none", None)


def test_empty_batch():
    x = jnp.zeros((0, 5), jnp.float32)
    y = jnp.zeros((0,), jnp.int32)
    loss, grad = jax.value_and_grad(lambda a: xj.cross_entropy(a, y))(x)
    assert float(loss) == 0.0 and grad.shape == (0, 5)
    assert xj.cross_entropy(x, y, reduction="none").shape == (0,)


# ---------------------------------------------------------------- the fallback path


def test_pure_callback_fallback_gives_the_same_bits(rng, monkeypatch):
    monkeypatch.setattr(xj, "HOST_CALL", "callback")
    logits, labels, kwargs = helpers.sparse_case(rng, SHAPE_C7, np.float32, "all")
    jaxpr = jax.make_jaxpr(lambda a: xj.cross_entropy(a, jnp.asarray(labels)))(logits)
    assert [opts.host_call for opts in _host_calls(jaxpr)] == ["callback"]
    for reduction in helpers.REDUCTIONS:
        _check_against_numpy_api(rng, logits, labels, kwargs, reduction, None)
    x = jnp.asarray(logits.reshape(2, 3, 7))
    y = jnp.asarray(labels.reshape(2, 3))
    got = jax.jit(jax.vmap(lambda a, b: xj.cross_entropy(a, b)))(x, y)
    helpers.assert_bitwise_equal(_np(got), _stack(lambda a, b: xj.cross_entropy(a, b), x, y))
    with pytest.raises(HOST_ERRORS, match="Received a label value of 9"):
        jax.block_until_ready(jax.jit(xj.cross_entropy)(x[0], y[0].at[1].set(9)))


# ---------------------------------------------------------------- errors


def test_out_of_range_label_raises_xentfast_message_under_jit():
    x = jnp.zeros((4, 3))
    y = jnp.asarray([0, 1, 9, 2])
    with pytest.raises(HOST_ERRORS, match=r"label value of 9 at labels\[2\].*\[0, 3\)"):
        jax.block_until_ready(jax.jit(jax.grad(lambda a: xj.cross_entropy(a, y)))(x))
    with pytest.raises(HOST_ERRORS, match=r"label value of -1 at labels\[1\]") as info:
        jax.block_until_ready(xj.softmax_cross_entropy_with_integer_labels(
            x, jnp.asarray([0, -1, 1, 2])))
    # optax's API has no ignore_index: not offered as this call's option, only as the
    # option of the functions that have one
    assert "is not ignore_index" not in str(info.value)
    assert "cross_entropy(..., ignore_index=)" in str(info.value)


def test_bad_inputs_raise_at_trace_time():
    x = jnp.zeros((4, 3))
    y = jnp.zeros(4, jnp.int32)
    with pytest.raises(TypeError, match="logits must be a floating-point array"):
        xj.cross_entropy(jnp.zeros((4, 3), jnp.int32), y)
    with pytest.raises(TypeError, match="logits must be a floating-point array"):
        xj.softmax_cross_entropy_with_integer_labels(jnp.zeros((4, 3), jnp.int32), y)
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        xj.softmax_cross_entropy_with_integer_labels(x, y.astype(jnp.float32))
    with pytest.raises(TypeError, match="read as class indices"):
        xj.cross_entropy(x, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="do not fit logits of shape"):
        xj.cross_entropy(x, jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="do not fit logits of shape"):
        jax.jit(xj.softmax_cross_entropy_with_integer_labels)(x, jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="do not broadcast"):
        xj.softmax_cross_entropy(x, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="reduction must be one of"):
        xj.cross_entropy(x, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        xj.cross_entropy(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="axis 2 is out of bounds"):
        xj.cross_entropy(x, y, axis=2)
    with pytest.raises(ValueError, match="weight must be a 1-D array"):
        xj.cross_entropy(x, y, weight=jnp.ones(4))
    with pytest.raises(ValueError, match="ignore_index is not supported for probability"):
        xj.cross_entropy(x, jnp.zeros((4, 3)), ignore_index=1)
    with pytest.raises(ValueError, match="Keyword argument 'axis' must be of type"):
        xj.softmax_cross_entropy_with_integer_labels(x, y, axis=None)
    with pytest.raises(NotImplementedError, match="where="):
        xj.softmax_cross_entropy_with_integer_labels(x, y, where=jnp.ones(4, bool))
    with pytest.raises(ValueError, match="unknown|Unknown"):
        xj.cross_entropy(x, y, backend="no-such-backend")


def test_non_finite_weight_is_reported():
    x = jnp.zeros((4, 3))
    y = jnp.zeros(4, jnp.int32)
    with pytest.raises(HOST_ERRORS, match=r"ValueError: weight\[1\] = inf is not finite"):
        jax.block_until_ready(xj.cross_entropy(x, y, weight=jnp.asarray([1.0, jnp.inf, 1.0])))


def test_weight_gradient_is_refused_not_zero():
    x = jnp.zeros((4, 3))
    y = jnp.zeros(4, jnp.int32)
    with pytest.raises(NotImplementedError, match="class weights"):
        jax.grad(lambda w: xj.cross_entropy(x, y, weight=w))(jnp.ones(3))
    # nor the gradient's derivative with respect to them (mixed second derivatives)
    f = lambda a, w: xj.cross_entropy(a, y, weight=w)  # noqa: E731
    with pytest.raises(NotImplementedError, match="class weights"):
        jax.jacfwd(lambda w: jax.grad(f)(x, w))(jnp.ones(3))
    with pytest.raises(NotImplementedError, match="class weights"):
        jax.grad(lambda w: (jax.grad(f)(x, w) ** 2).sum())(jnp.ones(3))
    # a constant weight (not differentiated) is fine, to any order
    jax.grad(lambda a: xj.cross_entropy(a, y, weight=jnp.ones(3)))(x)
    jax.hessian(lambda a: xj.cross_entropy(a, y, weight=jnp.ones(3)))(x)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_second_derivatives_and_forward_mode_match_finite_differences(kind, reduction):
    """jax.test_util.check_grads to order 2 in both modes (jvp, vjp, jvp of vjp, vjp of
    vjp) against finite differences in float64, every option together; probability
    labels differentiated too."""
    from jax.test_util import check_grads

    rng = np.random.default_rng(3)
    with _enable_x64():
        x = jnp.asarray(rng.standard_normal((5, 4, 3)) * 2)
        w = jnp.asarray(rng.uniform(0.5, 2.0, 4))
        kw = dict(axis=1, weight=w, label_smoothing=0.1, z_loss=0.05, softcap=4.0,
                  reduction=reduction)
        if kind == "sparse":
            y = jnp.asarray(rng.integers(0, 4, (5, 3))).at[1, 2].set(-100)
            check_grads(lambda a: xj.cross_entropy(a, y, **kw), (x,), order=2,
                        modes=("fwd", "rev"))
        else:
            t = jax.nn.softmax(jnp.asarray(rng.standard_normal((5, 4, 3))), axis=1)
            check_grads(lambda a, b: xj.cross_entropy(a, b, **kw), (x, t), order=2,
                        modes=("fwd", "rev"))


def test_hessian_jacfwd_jvp_and_per_example_grads_match_optax():
    """The transforms optax users run (hessian, jacfwd of grad, jvp, vmap of grad) give
    optax's values; the first derivative inside them is still the fused kernel's."""
    optax = _optax()
    rng = np.random.default_rng(4)
    with _enable_x64():
        x = jnp.asarray(rng.standard_normal((6, 5)))
        y = jnp.asarray(rng.integers(0, 5, 6))
        t = jax.nn.softmax(jnp.asarray(rng.standard_normal((6, 5))))
        pairs = [(lambda a, b: xj.softmax_cross_entropy_with_integer_labels(a, b).sum(),
                  lambda a, b: optax.softmax_cross_entropy_with_integer_labels(a, b).sum(), y),
                 (lambda a, b: xj.softmax_cross_entropy(a, b).sum(),
                  lambda a, b: optax.softmax_cross_entropy(a, b).sum(), t)]
        for ours, theirs, labels in pairs:
            for name, transform in {
                "hessian": lambda f: jax.hessian(f)(x, labels),
                "jacfwd(grad)": lambda f: jax.jacfwd(jax.grad(f))(x, labels),
                "jvp": lambda f: jax.jvp(lambda a: f(a, labels), (x,), (x,)),
                "per-example grad": lambda f: jax.vmap(jax.grad(f))(x[:, None],
                                                                    labels[:, None]),
                "grad wrt labels, then logits": lambda f: jax.jacrev(
                    jax.grad(f, argnums=1))(x, labels) if labels is t else 0.0,
            }.items():
                np.testing.assert_allclose(_np(jax.tree.leaves(transform(ours))[-1]),
                                           _np(jax.tree.leaves(transform(theirs))[-1]),
                                           rtol=1e-10, atol=1e-13, err_msg=name)


def test_ignored_row_with_nan_logits_has_zero_second_derivatives():
    """An ignored row is no function of its logits (NaN ones included), in the Hessian
    as in the gradient."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 4)), jnp.float32)
    x = x.at[1, 2].set(jnp.nan)
    y = jnp.asarray([0, -100, 3])
    f = lambda a: xj.cross_entropy(a, y)  # noqa: E731
    assert np.all(_np(jax.grad(f)(x))[1] == 0)
    hessian = _np(jax.hessian(f)(x))
    assert np.all(np.isfinite(hessian)) and np.all(hessian[1] == 0) and np.all(hessian[:, :, 1] == 0)


def test_first_derivative_is_one_fused_call():
    """Under grad the jaxpr holds one host call, the fused loss+grad kernel."""
    x = jnp.ones((4, 3))
    y = jnp.zeros(4, jnp.int32)
    calls = _host_calls(jax.make_jaxpr(jax.grad(lambda a: xj.cross_entropy(a, y)))(x))
    assert [c.mode for c in calls] == ["loss_grad"]


def test_gpu_placement_raises_instead_of_copying():
    """Lowering for a GPU (cross-platform lowering: no GPU needed) fails clearly."""
    x = jnp.ones((4, 3))
    y = jnp.zeros(4, jnp.int32)
    traced = jax.jit(jax.value_and_grad(lambda a: xj.cross_entropy(a, y))).trace(x)
    with pytest.raises(xf.BackendUnavailableError, match="CPU devices only.*cuda"):
        traced.lower(lowering_platforms=("cuda",))
    traced.lower(lowering_platforms=("cpu",))  # the same function lowers for the CPU


# ---------------------------------------------------------------- the benchmark script


def test_benchmark_script_runs_every_contender(monkeypatch):
    """benchmarks/bench_jax.py's worker on a tiny shape, in this process (so the
    script cannot rot between benchmark runs)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_jax.py")
    spec = importlib.util.spec_from_file_location("bench_jax", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(xj, "HOST_CALL", xj.HOST_CALL)  # the callback contender sets it
    pytest.importorskip("optax")
    records = []
    for contender in bench.ALL_CONTENDERS:
        records += bench._time_contender({"contender": contender, "shapes": [(8, 5)],
                                          "repeats": 3, "target_s": 0.01})
    assert [r["contender"] for r in records] == list(bench.ALL_CONTENDERS)
    assert all(r["median_s"] > 0 for r in records)
    assert "| 8 x 5 |" in bench.time_table(records, bench.ALL_CONTENDERS)


def test_concrete_out_of_range_labels_raise_value_error():
    """Labels that are values (eager calls, jax.grad over the logits) are checked before
    the computation, with xentfast's ValueError; traced ones by the kernel."""
    f = xj.softmax_cross_entropy_with_integer_labels
    x = jnp.ones((4, 5))
    with pytest.raises(ValueError, match=r"label value of -1 at labels\[3\]"):
        f(x, jnp.array([0, 1, 2, -1]))
    with pytest.raises(ValueError, match=r"label value of 7 at labels\[3\]"):
        jax.grad(lambda z: f(z, jnp.array([0, 1, 2, 7])).sum())(x)
    with pytest.raises(ValueError, match=r"label value of 9 .* is not ignore_index=-1"):
        xj.cross_entropy(x, jnp.array([0, 1, 2, 9]), ignore_index=-1)
    assert float(xj.cross_entropy(x, jnp.array([0, 1, -1, 4]), ignore_index=-1)) == \
        pytest.approx(np.log(5))
