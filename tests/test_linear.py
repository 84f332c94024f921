"""Fused linear cross-entropy: ``linear_cross_entropy(_with_grad)`` equals the unfused
composition -- the logits materialised in float64 and the exact oracle of tests/naive.py,
then the chain rule through the matmul -- for every option, chunking, rank and dtype;
PyTorch's ``F.linear_cross_entropy`` / ``F.cross_entropy`` agree where installed; the
extra memory stays within one chunk of logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import naive
import xentfast as xf
from helpers import assert_close, import_peer, make_weight

DTYPE_NAMES = ["float16", "bfloat16", "float32", "float64"]


def _dtype(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


def _problem(rng, batch_shape, d, v, dtype, ignored=True, bias=True):
    h = (rng.standard_normal(batch_shape + (d,)) * 0.8).astype(dtype)
    w = (rng.standard_normal((v, d)) * 0.6).astype(dtype)
    b = (rng.standard_normal(v) * 0.5).astype(dtype) if bias else None
    y = rng.integers(0, v, batch_shape)
    if ignored:
        y.reshape(-1)[::5] = -100
    return h, w, b, y


def _unfused(h, w, b, y, **kwargs):
    """The oracle: float64 logits from the inputs as given (what the fused call reads),
    the exact loss and logit gradient, and the chain rule in float64."""
    h64 = np.asarray(h, np.float64)
    w64 = np.asarray(w, np.float64)
    z = h64 @ w64.T + (0.0 if b is None else np.asarray(b, np.float64))
    softcap = kwargs.pop("softcap", None)
    z_in = z if softcap is None else softcap * np.tanh(z / softcap)
    loss, g, lse = naive.cross_entropy(z_in, y, **kwargs)
    if softcap is not None:
        g = g / np.cosh(z / softcap) ** 2
    g_rows = g.reshape(-1, w.shape[0])
    grads = [(g_rows @ w64).reshape(h.shape), g_rows.T @ h64.reshape(-1, h.shape[-1])]
    if b is not None:
        grads.append(g_rows.sum(axis=0))
    return loss, grads, lse


def _tolerance(dtype, d):
    """The inputs are exact; the logits the kernels see carry the rounding of a length-d
    dot product in the working dtype (float32 for 16-bit), and 16-bit results are
    rounded once more."""
    work = np.float64 if dtype == np.float64 else np.float32
    eps = float(np.finfo(work).eps) * np.sqrt(d) * 4
    if np.dtype(dtype).itemsize == 2:
        eps += 2.0 ** -8 if np.dtype(dtype).name == "bfloat16" else 2.0 ** -11
    return eps


OPTIONS = {
    "plain": {},
    "class_weight": {"class_weight": "weights"},
    "smoothing": {"label_smoothing": 0.15},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 4.0},
    "all": {"class_weight": "weights", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 2.0},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("chunk", [1, 7, "n", "more", None], ids=str)
def test_equals_the_unfused_composition(host_backend, chunk, option, reduction, rng):
    n, d, v = 23, 12, 37
    h, w, b, y = _problem(rng, (n,), d, v, np.float64)
    kwargs = {k: (make_weight(rng, v) if val == "weights" else val)
              for k, val in OPTIONS[option].items()}
    chunk_size = {"n": n, "more": n + 5}.get(chunk, chunk)
    got = xf.linear_cross_entropy_with_grad(h, w, y, bias=b, reduction=reduction,
                                            chunk_size=chunk_size, return_lse=True,
                                            backend=host_backend, **kwargs)
    loss, d_h, d_w, d_b, lse = got
    oracle_kwargs = dict(kwargs)
    if "class_weight" in oracle_kwargs:
        oracle_kwargs["weight"] = oracle_kwargs.pop("class_weight")
    exp_loss, exp_grads, exp_lse = _unfused(h, w, b, y, reduction=reduction, **oracle_kwargs)
    tol = _tolerance(np.float64, d)
    assert_close(loss, exp_loss, rtol=tol, atol=tol, what="loss")
    assert_close(lse, exp_lse, rtol=tol, atol=tol, what="lse")
    for name, got_g, exp_g in zip(("d_hidden", "d_weight", "d_bias"), (d_h, d_w, d_b),
                                  exp_grads):
        assert got_g.shape == exp_g.shape and got_g.dtype == np.float64
        assert_close(got_g, exp_g, rtol=tol, atol=tol * np.abs(exp_g).max(), what=name)
    loss_only = xf.linear_cross_entropy(h, w, y, bias=b, reduction=reduction,
                                        chunk_size=chunk_size, backend=host_backend, **kwargs)
    # The loss-only kernels are other code paths than loss+grad: equal to a few ulps.
    assert_close(loss_only, loss, rtol=8 * np.finfo(np.float64).eps, atol=0, what="loss only")


@pytest.mark.parametrize("chunk", [1, 7, None], ids=str)
def test_bitwise_the_materialised_call(host_backend, chunk, rng):
    """Same kernels on the same logits: identical to cross_entropy_with_grad of the
    logits computed the same way, whatever the chunking (float32, no bias)."""
    h, w, _, y = _problem(rng, (20,), 8, 30, np.float32, bias=False)
    loss, d_h, d_w = xf.linear_cross_entropy_with_grad(h, w, y, chunk_size=chunk,
                                                       reduction="sum", backend=host_backend)
    ref_loss = xf.linear_cross_entropy(h, w, y, chunk_size=20, reduction="sum",
                                       backend=host_backend)
    assert loss == ref_loss
    rows = [np.matmul(h[i:i + 1], w.T) for i in range(20)]  # per-row logits, as chunk=1
    z = np.concatenate(rows)
    _, g = xf.cross_entropy_with_grad(z, y, reduction="sum", backend=host_backend)
    assert_close(d_h, g @ w, rtol=1e-5, atol=1e-6, what="d_hidden")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_dtypes_and_three_d_hidden(host_backend, dtype_name, rng):
    dtype = _dtype(dtype_name)
    d, v = 16, 29
    h, w, b, y = _problem(rng, (3, 5), d, v, dtype)
    loss, d_h, d_w, d_b = xf.linear_cross_entropy_with_grad(h, w, y, bias=b, chunk_size=4,
                                                            backend=host_backend)
    exp_loss, (e_h, e_w, e_b), _ = _unfused(h, w, b, y)
    assert np.asarray(loss).dtype == dtype
    assert d_h.shape == h.shape and d_h.dtype == dtype
    assert d_w.shape == w.shape and d_w.dtype == dtype and d_b.dtype == dtype
    tol = _tolerance(dtype, d)
    assert_close(np.float64(np.asarray(loss).astype(np.float64)), exp_loss, rtol=tol, atol=0,
                 what="loss")
    for name, got, exp in (("d_hidden", d_h, e_h), ("d_weight", d_w, e_w), ("d_bias", d_b, e_b)):
        assert_close(got.astype(np.float64), exp, rtol=tol, atol=tol * np.abs(exp).max(),
                     what=name)


def test_ignored_rows_get_no_gradient_and_mean_over_kept(host_backend, rng):
    h, w, b, y = _problem(rng, (12,), 6, 9, np.float64)
    y[:] = -100
    y[3] = 2
    loss, d_h, d_w, d_b = xf.linear_cross_entropy_with_grad(h, w, y, bias=b, chunk_size=5,
                                                            backend=host_backend)
    assert np.all(d_h[np.arange(12) != 3] == 0)
    exp_loss, (e_h, e_w, e_b), _ = _unfused(h, w, b, y)
    assert_close(loss, exp_loss, rtol=1e-12, atol=0, what="loss")
    assert_close(d_w, e_w, rtol=1e-12, atol=1e-15, what="d_weight")
    y[3] = -100  # nothing kept: the mean is 0 with zero gradients (README)
    loss, d_h, d_w, d_b = xf.linear_cross_entropy_with_grad(h, w, y, bias=b,
                                                            backend=host_backend)
    assert loss == 0 and not d_h.any() and not d_w.any() and not d_b.any()


def test_matches_pytorch(rng):
    torch = import_peer("torch")
    import torch.nn.functional as F

    h, w, b, y = _problem(rng, (31,), 10, 40, np.float64)
    th, tw, tb = (torch.tensor(a, requires_grad=True) for a in (h, w, b))
    for fused in (hasattr(F, "linear_cross_entropy"), False):
        for t in (th, tw, tb):
            t.grad = None
        if fused:
            ref = F.linear_cross_entropy(th, tw, torch.tensor(y), linear_bias=tb,
                                         label_smoothing=0.1, ignore_index=-100)
        else:
            ref = F.cross_entropy(F.linear(th, tw, tb), torch.tensor(y), label_smoothing=0.1)
        ref.backward()
        got = xf.linear_cross_entropy_with_grad(h, w, y, bias=b, label_smoothing=0.1,
                                                chunk_size=8)
        assert_close(got[0], ref.item(), rtol=1e-12, atol=0, what="loss")
        for g, t in zip(got[1:], (th, tw, tb)):
            assert_close(g, t.grad.numpy(), rtol=1e-10, atol=1e-14, what="grad")


@pytest.mark.parametrize("args,error,message", [
    (dict(h=(4, 5), w=(6, 4)), ValueError, r"hidden's last dimension \(5\) must equal"),
    (dict(w=(6,)), ValueError, r"weight must be a 2-D array"),
    (dict(b=(5,)), ValueError, r"bias must have shape \(num_classes,\) = \(6,\)"),
    (dict(y=(3,)), ValueError, r"labels must have hidden's shape without its last axis"),
    (dict(y_float=True), TypeError, r"labels must be integer class indices"),
    (dict(w_dtype=np.float32), TypeError, r"must share one floating dtype"),
    (dict(chunk=0), ValueError, r"chunk_size must be a positive integer"),
    (dict(chunk=2.5), TypeError, r"chunk_size must be a positive integer"),
    (dict(w=(0, 5)), ValueError, r"zero classes"),
    (dict(y_bad=True), ValueError, r"label value of 6 at labels\[1\] which is outside"),
], ids=lambda v: str(v)[:40])
def test_bad_input(args, error, message):
    h = np.ones(args.get("h", (4, 5)))
    w = np.ones(args.get("w", (6, 5)), args.get("w_dtype", np.float64))
    b = np.ones(args["b"]) if "b" in args else None
    y = np.zeros(args.get("y", (4,)), np.float64 if args.get("y_float") else np.int64)
    if args.get("y_bad"):
        y[1] = 6
    with pytest.raises(error, match=message):
        xf.linear_cross_entropy_with_grad(h, w, y, bias=b, chunk_size=args.get("chunk"))


def test_extra_memory_is_one_chunk_of_logits():
    """Peak memory of the call (tracemalloc sees NumPy's buffers), after a warm-up call,
    in a fresh process: at most the chunk buffer plus the outputs, +5%."""
    script = textwrap.dedent("""
        import json, tracemalloc
        import numpy as np
        import xentfast as xf
        rng = np.random.default_rng(0)
        n, d, v, chunk = 2048, 64, 20000, 128
        h = rng.standard_normal((n, d), dtype=np.float32)
        w = rng.standard_normal((v, d), dtype=np.float32) * 0.1
        y = rng.integers(0, v, n)
        xf.linear_cross_entropy_with_grad(h[:2 * chunk], w, y[:2 * chunk], chunk_size=chunk)
        tracemalloc.start()
        loss, d_h, d_w = xf.linear_cross_entropy_with_grad(h, w, y, chunk_size=chunk)
        peak = tracemalloc.get_traced_memory()[1]
        print(json.dumps({"peak": peak, "chunk": chunk * v * 4,
                          "outputs": d_h.nbytes + d_w.nbytes,
                          "logits": n * v * 4}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    m = json.loads(result.stdout.strip().splitlines()[-1])
    bound = (m["chunk"] + m["outputs"]) * 1.05
    assert m["peak"] <= bound, m
    assert m["peak"] < m["logits"] / 4, m  # the materialised logits would be 4x more


# ------------------------------------------------------------------ xentfast.torch


def _torch_problem(torch, dtype, bias=True):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, dtype=dtype, generator=gen, requires_grad=True)
    w = (torch.randn(20, 8, dtype=dtype, generator=gen) * 0.7).requires_grad_()
    b = torch.randn(20, dtype=dtype, generator=gen, requires_grad=True) if bias else None
    y = torch.randint(0, 20, (13,), generator=gen)
    y[2] = -100
    return h, w, b, y


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_op_matches_pytorch(reduction, bias):
    """xentfast.torch.linear_cross_entropy: loss and the gradients of input, weight and
    bias equal PyTorch's linear + cross_entropy, with a non-uniform cotangent for
    'none' (the backward re-runs the chunks with the rows scaled)."""
    torch = import_peer("torch")
    import torch.nn.functional as F

    import xentfast.torch as xft

    h, w, b, y = _torch_problem(torch, torch.float64, bias)
    params = [t for t in (h, w, b) if t is not None]
    cotangent = (torch.randn(13, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
                 if reduction == "none" else torch.tensor(2.5, dtype=torch.float64))
    ours = xft.linear_cross_entropy(h, w, y, linear_bias=b, reduction=reduction,
                                    label_smoothing=0.1, z_loss=1e-3, chunk_size=4)
    ref_logits = F.linear(h, w, b)
    # z-loss by hand (PyTorch has none): z * lse^2 per kept row, reduced like the loss
    zl = 1e-3 * torch.logsumexp(ref_logits, -1) ** 2 * (y != -100)
    ref = F.cross_entropy(ref_logits, y, reduction=reduction, label_smoothing=0.1) + (
        zl if reduction == "none" else zl.sum() / (y != -100).sum() if reduction == "mean"
        else zl.sum())
    got_grads = torch.autograd.grad(ours, params, cotangent)
    ref_grads = torch.autograd.grad(ref, params, cotangent)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-13)
    for got, exp in zip(got_grads, ref_grads):
        torch.testing.assert_close(got, exp, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_op_gradcheck(reduction):
    torch = import_peer("torch")
    import xentfast.torch as xft

    h, w, b, y = _torch_problem(torch, torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, b: xft.linear_cross_entropy(h, w, y, linear_bias=b, reduction=reduction,
                                                 softcap=3.0, label_smoothing=0.05,
                                                 chunk_size=5), (h, w, b))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_op_refuses_double_backward_instead_of_a_zero(reduction):
    """create_graph=True: the chunked gradients are constants to autograd, so a second
    derivative would silently be 0 -- refused with the way out instead."""
    torch = import_peer("torch")
    import xentfast.torch as xft

    h, w, b, y = _torch_problem(torch, torch.float64)
    loss = xft.linear_cross_entropy(h, w, y, linear_bias=b, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="linear_cross_entropy has no second derivative"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_op_under_torch_func_and_forward_ad():
    """torch.func.grad / hessian and forward-mode dual tensors (which the chunked
    operator cannot serve) get PyTorch's linear + cross_entropy values, not an error or
    a missing tangent."""
    torch = import_peer("torch")
    import torch.nn.functional as F

    import xentfast.torch as xft

    h, w, b, y = (t.detach() if t is not None else t
                  for t in _torch_problem(torch, torch.float64))
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0)

    def ours(h, w):
        return xft.linear_cross_entropy(h, w, y, linear_bias=b, chunk_size=4, **kw)

    def ref(h, w):
        z = 3.0 * torch.tanh(F.linear(h, w, b) / 3.0)
        kept = y != -100
        rows = F.cross_entropy(z, y, label_smoothing=0.1, reduction="none") + (
            1e-3 * torch.logsumexp(z, -1) ** 2 * kept)
        return rows.sum() / kept.sum()

    for got, want in [
            (torch.func.grad(ours, argnums=(0, 1))(h, w), torch.func.grad(ref, argnums=(0, 1))(h, w)),
            ((torch.func.hessian(lambda a: ours(a, w))(h),),
             (torch.func.hessian(lambda a: ref(a, w))(h),))]:
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)
    fw = torch.autograd.forward_ad
    tangent = torch.randn_like(h)
    with fw.dual_level():
        got = fw.unpack_dual(ours(fw.make_dual(h, tangent), w)).tangent
        want = fw.unpack_dual(ref(fw.make_dual(h, tangent), w)).tangent
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_torch_op_no_grad_and_16_bit():
    """Without grad the loss-only pass runs; bfloat16 tensors computed in float32 give
    the float32 result rounded once."""
    torch = import_peer("torch")
    import xentfast.torch as xft

    h, w, b, y = _torch_problem(torch, torch.float32)
    with torch.no_grad():
        loss = xft.linear_cross_entropy(h, w, y, linear_bias=b)
    assert loss.dtype == torch.float32 and loss.grad_fn is None
    h16, w16, b16 = (t.detach().to(torch.bfloat16).requires_grad_() for t in (h, w, b))
    loss16 = xft.linear_cross_entropy(h16, w16, y, linear_bias=b16)
    loss16.backward()
    ref = xft.linear_cross_entropy(h16.detach().float(), w16.detach().float(), y,
                                   linear_bias=b16.detach().float())
    assert loss16.dtype == torch.bfloat16 and h16.grad.dtype == torch.bfloat16
    assert loss16.item() == ref.to(torch.bfloat16).item()


def test_torch_op_compiles_without_graph_breaks():
    torch = import_peer("torch")
    import xentfast.torch as xft

    h, w, b, y = _torch_problem(torch, torch.float32)

    def step(h, w, b, y):
        return xft.linear_cross_entropy(h, w, y, linear_bias=b, chunk_size=4)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    loss = compiled(h, w, b, y)
    loss.backward()
    eager_h = h.detach().clone().requires_grad_()
    ref = step(eager_h, w.detach(), b.detach(), y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, eager_h.grad)


def test_return_lse_must_be_a_bool():
    h, w = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
    with pytest.raises(TypeError, match="return_lse must be True or False; got 'False'"):
        xf.linear_cross_entropy_with_grad(h, w, np.array([0, 1, 2]), return_lse="False")
