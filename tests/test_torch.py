"""xentfast.torch: F.cross_entropy's semantics on xentfast's kernels, inside autograd.

The oracle is PyTorch itself in float64 (``F.cross_entropy``, and for ``z_loss``, which
PyTorch lacks, ``F.cross_entropy`` plus ``z * logsumexp**2`` differentiated by
autograd): loss and ``input.grad`` over the option grid, every reduction (``"none"``
with a random ``grad_output``), (N, C), (N, C, d1, d2) and unbatched (C,) inputs, all
four dtypes; ``torch.autograd.gradcheck``; the registered operators under
``torch.library.opcheck``, ``torch.compile(fullgraph=True)`` and ``torch.export``;
memory (zero-copy in and out, no gradient without ``requires_grad``,
``inplace_backward``); errors.  Host backends via the ``host_backend`` fixture; CUDA
cases run only where ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from helpers import RTOL, assert_close, import_peer, ml_dtypes

torch = import_peer("torch")
F = torch.nn.functional

import xentfast as xf  # noqa: E402
import xentfast.torch as xft  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REDUCTIONS = ["mean", "sum", "none"]

# Shapes, each with its reason: PyTorch's three input layouts.
SHAPES = {
    "NC": (7, 5),  # the classifier layout, class dimension 1
    "NCd1d2": (3, 4, 2, 3),  # segmentation-like: class dimension 1 of four
    "C": (6,),  # unbatched: class dimension 0, a 0-d target
}
# Index-target options: each PyTorch argument alone, then together, then z_loss.
INDEX_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": -100, "ignored": True},  # the default id, outside [0, C)
    "ignore_class": {"ignore_index": 1, "ignored": True},  # an id that is a class
    "smoothing": {"label_smoothing": 0.2},
    "all": {"weight": True, "ignore_index": -100, "ignored": True, "label_smoothing": 0.15},
    "z_loss": {"weight": True, "ignored": True, "label_smoothing": 0.1, "z_loss": 0.05},
}
# Probability-target options (PyTorch has no ignore_index for them).
PROB_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.2},
    "all": {"weight": True, "label_smoothing": 0.15},
    "z_loss": {"weight": True, "label_smoothing": 0.1, "z_loss": 0.05},
}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float64": torch.float64}


@pytest.fixture
def on_backend(host_backend):
    """Run the test's calls on one host backend."""
    with xf.use_backend(host_backend):
        yield host_backend


# ------------------------------------------------------------------ cases and oracle


def _case(rng, shape, option, kind, dtype=torch.float64):
    """(input leaf, target, kwargs) for one grid point."""
    cdim = 1 if len(shape) >= 2 else 0
    c = shape[cdim]
    batch = shape[:cdim] + shape[cdim + 1:]
    x = torch.tensor(rng.standard_normal(shape) * 3).to(dtype).requires_grad_(True)
    spec = (INDEX_OPTIONS if kind == "index" else PROB_OPTIONS)[option]
    kw = {}
    if spec.get("weight"):
        kw["weight"] = torch.tensor(rng.uniform(0.2, 2.0, c)).to(dtype)
    if "label_smoothing" in spec:
        kw["label_smoothing"] = spec["label_smoothing"]
    if "z_loss" in spec:
        kw["z_loss"] = spec["z_loss"]
    if kind == "index":
        y = torch.tensor(rng.integers(0, c, size=batch))
        ignore_index = spec.get("ignore_index", -100)
        if ignore_index != -100:
            kw["ignore_index"] = ignore_index
        flat = y.reshape(-1)
        if spec.get("ignored") and batch:  # a third of the entries (never all of them)
            flat[::3] = ignore_index
            flat[1] = (ignore_index + 1) % c
        elif ignore_index == int(flat[0]):  # unbatched: its one target stays kept
            flat[0] = (ignore_index + 1) % c
    else:
        p = rng.uniform(0.0, 1.0, shape)
        y = torch.tensor(p / p.sum(axis=cdim, keepdims=True)).to(dtype)
    return x, y, kw


def _oracle(x, y, kw, reduction, grad_output=None):
    """Loss and d(loss . grad_output)/d input by PyTorch autograd in float64."""
    x64 = x.detach().double().requires_grad_(True)
    target = y.double() if y.is_floating_point() else y
    loss = _oracle_loss(x64, target, kw, reduction)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, x64, go)
    return loss.detach(), grad


def _oracle_loss(x64, target, kw, reduction):
    """The loss from PyTorch's own operators, differentiable in x64 and target (any
    order): ``F.cross_entropy``, plus ``z * logsumexp**2`` for z_loss."""
    kw = dict(kw)
    z = kw.pop("z_loss", 0.0)
    weight = kw.pop("weight", None)
    weight = None if weight is None else weight.double()
    x = x64
    cdim = 1 if x.dim() >= 2 else 0
    per = F.cross_entropy(x64, target, weight=weight, reduction="none", **kw)
    if target.is_floating_point():
        kept = torch.ones_like(per)
        denominator = torch.tensor(float(per.numel()), dtype=torch.float64)
    else:
        ignore = kw.get("ignore_index", -100)
        kept = (target != ignore).double()
        w = torch.ones(x.shape[cdim], dtype=torch.float64) if weight is None else weight
        denominator = (w[target.clamp(0, x.shape[cdim] - 1)] * kept).sum()
    per = per + z * torch.logsumexp(x64, dim=cdim) ** 2 * kept
    return {"none": per, "sum": per.sum(), "mean": per.sum() / denominator}[reduction]


def _grad_output(rng, loss):
    """A random grad_output of the loss's shape (a scalar for "mean"/"sum")."""
    return torch.tensor(rng.uniform(-2.0, 2.0, tuple(loss.shape))).to(loss.dtype)


# ------------------------------------------------------------------ parity, float64


def _check_parity(x, y, kw, reduction, rng, what):
    loss = xft.cross_entropy(x, y, reduction=reduction, **kw)
    assert loss.dtype == x.dtype and loss.device == x.device
    go = _grad_output(rng, loss)
    # First the ones grad_output (loss.backward(): the saved gradient itself), then a
    # random one through the same graph (scaled per element for "none").
    (g_ones,) = torch.autograd.grad(loss, x, torch.ones_like(loss), retain_graph=True)
    (g_rand,) = torch.autograd.grad(loss, x, go)
    ref_loss, ref_ones = _oracle(x, y, kw, reduction)
    _, ref_rand = _oracle(x, y, kw, reduction, go)
    assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=1e-13, what=f"{what} loss")
    assert_close(g_ones, ref_ones, rtol=1e-11, atol=1e-14, what=f"{what} grad (ones)")
    assert_close(g_rand, ref_rand, rtol=1e-11, atol=1e-14, what=f"{what} grad (random)")
    assert g_ones.shape == x.shape and g_ones.dtype == x.dtype


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(INDEX_OPTIONS))
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_index_targets_match_pytorch(on_backend, shape_id, option, reduction, rng):
    x, y, kw = _case(rng, SHAPES[shape_id], option, "index")
    _check_parity(x, y, kw, reduction, rng, f"{shape_id}/{option}/{reduction}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(PROB_OPTIONS))
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_probability_targets_match_pytorch(on_backend, shape_id, option, reduction, rng):
    x, y, kw = _case(rng, SHAPES[shape_id], option, "prob")
    _check_parity(x, y, kw, reduction, rng, f"{shape_id}/{option}/{reduction}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad_loss_matches_pytorch(on_backend, reduction, rng):
    x, y, kw = _case(rng, SHAPES["NCd1d2"], "all", "index")
    with torch.no_grad():
        loss = xft.cross_entropy(x, y, reduction=reduction, **kw)
    assert loss.grad_fn is None and not loss.requires_grad
    assert_close(loss, _oracle(x, y, kw, reduction)[0], rtol=1e-12, atol=1e-13, what="loss")


# ------------------------------------------------------------------ every dtype


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_dtypes_against_float64_oracle(on_backend, staging, dtype, reduction, kind, rng):
    """Loss and grad in the input's dtype, within the dtype's tolerance of the float64
    oracle on the same (rounded) values; 16-bit results are float32 ones rounded once."""
    torch_dtype = TORCH_DTYPES[dtype]
    x, y, kw = _case(rng, (64, 33), "z_loss", kind, torch_dtype)  # every option at once
    loss = xft.cross_entropy(x, y, reduction=reduction, **kw)
    go = _grad_output(rng, loss) if reduction == "none" else None
    (grad,) = torch.autograd.grad(loss, x, go)
    assert loss.dtype == torch_dtype and grad.dtype == torch_dtype
    ref_loss, ref_grad = _oracle(x, y, kw, reduction, go)
    rtol = RTOL[dtype]
    assert_close(loss.detach().double(), ref_loss, rtol=rtol, what=f"{dtype} loss")
    # Elements near 0 are judged against the largest one (absolute error budget).
    atol = rtol * 1e-2 * float(ref_grad.abs().max())
    assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol, what=f"{dtype} grad")


@pytest.fixture(params=["one_chunk", "row_chunks"])
def staging(request, monkeypatch):
    """16-bit calls staged in one chunk, or one leading slice at a time."""
    if request.param == "row_chunks":
        monkeypatch.setattr(xft, "_STAGING_BYTES", 1)
    return request.param


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_staging_gives_the_numpy_level_bits(on_backend, staging, dtype, reduction, rng):
    """16-bit tensors are converted by PyTorch into float32 chunks that the kernel
    overwrites with the gradient; xentfast's NumPy-level call converts with NumPy.  Both
    are the float32 kernel on the same values rounded once: the same bits, except a
    chunked "mean" gradient, scaled after the kernel, and a reduced loss (within an ulp
    of the 16-bit result)."""
    if dtype == "bfloat16" and ml_dtypes is None:
        pytest.skip("the NumPy-level reference needs ml_dtypes for bfloat16")
    torch_dtype = TORCH_DTYPES[dtype]
    x, y, kw = _case(rng, (6, 9, 3), "z_loss", "index", torch_dtype)
    loss = xft.cross_entropy(x, y, reduction=reduction, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    numpy_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)

    def bits(t):
        return np.asarray(t.detach().view(torch.int16).numpy())

    kwargs = {k: v for k, v in kw.items() if k != "weight"}
    ref_loss, ref_grad = xf.cross_entropy_with_grad(
        bits(x).view(numpy_dtype), y.numpy(), axis=1, weight=kw["weight"].float().numpy(),
        reduction=reduction, **kwargs)
    one_ulp = 2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11
    if reduction == "none":
        assert np.array_equal(bits(loss), np.asarray(ref_loss).view(np.int16))
    else:  # the float64 total may be rounded to float32 first (one 16-bit ulp at most)
        assert_close(loss.detach().double(), np.float64(ref_loss), rtol=one_ulp, what="loss")
    if reduction == "mean" and staging == "row_chunks":  # scaled after the kernel
        assert_close(grad.double(), ref_grad.astype(np.float64), rtol=one_ulp,
                     atol=one_ulp * 1e-3 * float(np.abs(ref_grad.astype(np.float64)).max()),
                     what="mean grad")
    else:
        assert np.array_equal(bits(grad), ref_grad.view(np.int16))


def test_16bit_staging_errors_and_empty_batches(staging):
    x = torch.randn(8, 5, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    y[6] = 99
    with pytest.raises(ValueError, match="label value of 99 at labels\\[6\\]"):
        xft.cross_entropy(x, y)
    empty = torch.empty(0, 5, dtype=torch.float16, requires_grad=True)
    loss = xft.cross_entropy(empty, torch.empty(0, dtype=torch.int64))
    assert loss.item() == 0.0 and loss.dtype == torch.float16
    (grad,) = torch.autograd.grad(loss, empty)
    assert grad.shape == (0, 5)


def test_autocast_computes_in_float32_like_pytorch(rng):
    """Under autocast PyTorch runs cross-entropy in float32: a float32 loss, and the
    gradient rounded back to the 16-bit logits."""
    x, y, kw = _case(rng, (32, 17), "all", "index", torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = xft.cross_entropy(x, y, **kw)
        theirs = F.cross_entropy(x, y, **kw)
    assert ours.dtype == theirs.dtype == torch.float32
    (g_ours,) = torch.autograd.grad(ours, x)
    (g_theirs,) = torch.autograd.grad(theirs, x)
    assert g_ours.dtype == g_theirs.dtype == torch.bfloat16
    ref_loss, ref_grad = _oracle(x, y, kw, "mean")
    assert_close(ours.detach().double(), ref_loss, rtol=RTOL["float32"], what="loss")
    assert_close(g_ours.double(), ref_grad, rtol=RTOL["bfloat16"],
                 atol=RTOL["bfloat16"] * 1e-2 * float(ref_grad.abs().max()), what="grad")


# ------------------------------------------------------------------ gradcheck


GRADCHECK_SHAPES = {"NC": (3, 4), "NCd": (2, 3, 2), "C": (4,)}


@pytest.mark.parametrize("path", ["eager", "operator"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", [f"index-{o}" for o in INDEX_OPTIONS]
                         + [f"prob-{o}" for o in PROB_OPTIONS])
def test_gradcheck(on_backend, option, reduction, path, rng):
    """Finite differences against the analytic vector-Jacobian products, float64; for
    "none" gradcheck's unit grad_outputs check the per-element scaling."""
    kind, name = option.split("-", 1)
    for shape in GRADCHECK_SHAPES.values():
        x, y, kw = _case(rng, shape, name, kind)
        weight = kw.get("weight")
        ignore_index = kw.get("ignore_index", -100)
        smoothing = kw.get("label_smoothing", 0.0)
        z = kw.get("z_loss", 0.0)
        if path == "eager":
            def fn(t):
                return xft.cross_entropy(t, y, reduction=reduction, **kw)
        else:
            def fn(t):
                return torch.ops.xentfast.cross_entropy_fwd(t, y, weight, ignore_index,
                                                           reduction, smoothing, z)[0]
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_none_reduction_scales_each_element(on_backend, rng):
    """grad_output of shape (N, d1, d2) is broadcast along the class dimension."""
    x, y, kw = _case(rng, (4, 6, 3, 2), "all", "index")
    loss = xft.cross_entropy(x, y, reduction="none", **kw)
    assert loss.shape == (4, 3, 2)
    go = _grad_output(rng, loss)
    go[0, 0, 0] = 0.0  # a zero scale zeroes that element's whole class column
    (grad,) = torch.autograd.grad(loss, x, go)
    assert_close(grad, _oracle(x, y, kw, "none", go)[1], rtol=1e-11, atol=1e-14,
                 what="grad")
    assert torch.count_nonzero(grad[0, :, 0, 0]) == 0


# ------------------------------------------------------------------ the operators


def _export_targets(program):
    return [str(node.target) for node in program.graph.nodes if node.op == "call_function"]


class _Classifier(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.linear = torch.nn.Linear(12, 7)
        self.loss = loss

    def forward(self, x, y):
        return self.loss(self.linear(x), y)


@pytest.mark.parametrize("op", ["cross_entropy_fwd", "cross_entropy_loss"])
def test_opcheck(op, rng):
    """Schema, fake (meta) implementation, autograd registration, AOT dispatch."""
    x, y, kw = _case(rng, (5, 4, 3), "all", "index", torch.float32)
    args = (x, y, kw["weight"], -100, "mean", kw["label_smoothing"], 0.01)
    result = torch.library.opcheck(getattr(torch.ops.xentfast, op).default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_export_shows_one_xentfast_op(rng):
    model = _Classifier(xft.CrossEntropyLoss(label_smoothing=0.1))
    x = torch.randn(9, 12)
    y = torch.randint(0, 7, (9,))
    program = torch.export.export(model, (x, y))
    targets = _export_targets(program)
    assert [t for t in targets if t.startswith("xentfast.")] == [
        "xentfast.cross_entropy_fwd.default"], targets
    assert not [t for t in targets if "log_softmax" in t or "nll_loss" in t], targets
    with torch.no_grad():
        inference = torch.export.export(model, (x, y))
    assert [t for t in _export_targets(inference) if t.startswith("xentfast.")] == [
        "xentfast.cross_entropy_loss.default"]
    expected = F.cross_entropy(model.linear(x), y, label_smoothing=0.1)
    assert_close(program.module()(x, y).detach(), expected.detach(), rtol=2e-6,
                 what="exported loss")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph(rng):
    """One Inductor compile of a model using the loss: no graph break (fullgraph), the
    xentfast operator in the graph, the same loss and parameter gradients as eager
    PyTorch."""
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def inductor_recording(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch.manual_seed(0)
    model = _Classifier(xft.CrossEntropyLoss(weight=torch.rand(7) + 0.5, label_smoothing=0.1,
                                             ignore_index=3))
    x = torch.randn(16, 12)
    y = torch.randint(0, 7, (16,))
    compiled = torch.compile(model, fullgraph=True, backend=inductor_recording)
    loss = compiled(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = F.cross_entropy(model.linear(x), y, weight=model.loss.weight,
                               label_smoothing=0.1, ignore_index=3)
    expected.backward()
    assert len(graphs) == 1
    assert any(node.target is torch.ops.xentfast.cross_entropy_fwd
               or node.target is torch.ops.xentfast.cross_entropy_fwd.default
               for node in graphs[0].graph.nodes), graphs[0].code
    assert_close(loss.detach(), expected.detach(), rtol=2e-6, what="compiled loss")
    for got, param in zip(grads, model.parameters()):
        assert_close(got, param.grad, rtol=2e-5, atol=1e-7, what="compiled gradient")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_with_a_target_that_requires_grad(rng):
    """Mutual learning / distillation into a trained teacher: both sides get gradients
    under torch.compile(fullgraph=True) too (PyTorch's operators trace in the graph)."""
    x, soft, kw = _case(rng, (6, 5), "z_loss", "prob", torch.float32)
    soft = soft.requires_grad_(True)
    compiled = torch.compile(lambda a, t: xft.cross_entropy(a, t, **kw), fullgraph=True)
    got = torch.autograd.grad(compiled(x, soft), (x, soft))
    x64, t64 = (t.detach().double().requires_grad_(True) for t in (x, soft))
    kw64 = dict(kw, weight=kw["weight"].double())
    want = torch.autograd.grad(_oracle_loss(x64, t64, kw64, "mean"), (x64, t64))
    for g, w, name in zip(got, want, ("input", "target")):
        assert_close(g, w, rtol=2e-5, atol=1e-7, what=f"compiled d {name}")


def test_fake_tensors_give_xentfast_errors():
    """The operators' fake implementations check shapes as the real ones do."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 5)
        with pytest.raises(ValueError, match="do not fit logits"):
            torch.ops.xentfast.cross_entropy_fwd(x, torch.zeros(3, dtype=torch.int64), None,
                                                -100, "mean", 0.0, 0.0)
        loss, grad = torch.ops.xentfast.cross_entropy_fwd(
            torch.empty(2, 5, 3), torch.zeros(2, 3, dtype=torch.int64), None, -100, "none",
            0.0, 0.0)
        assert loss.shape == (2, 3) and grad.shape == (2, 5, 3)


def test_fake_layout_is_the_real_layout(rng):
    """Compiled code trusts the fake implementation's strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, y, _ = _case(rng, (2, 5, 3, 4), "plain", "index", torch.float32)
    loss, grad = torch.ops.xentfast.cross_entropy_fwd(x, y, None, -100, "none", 0.0, 0.0)
    mode = FakeTensorMode()
    fake_x, fake_y = mode.from_tensor(x.detach()), mode.from_tensor(y)
    with mode:
        fake_loss, fake_grad = torch.ops.xentfast.cross_entropy_fwd(
            fake_x, fake_y, None, -100, "none", 0.0, 0.0)
    assert grad.stride() == fake_grad.stride() and loss.stride() == fake_loss.stride()


# ------------------------------------------------------------------ memory


def test_zero_copy_in_and_out(monkeypatch, rng):
    """The kernels read the tensor's own memory (any strides), and the gradient
    autograd returns is the kernels' output memory."""
    seen = {}
    original = xf.cross_entropy_with_grad

    def recording(logits, labels, **kwargs):
        seen["logits"] = logits
        loss, grad = original(logits, labels, **kwargs)
        seen["grad"] = grad
        return loss, grad

    monkeypatch.setattr(xf, "cross_entropy_with_grad", recording)
    base = torch.randn(8, 20, dtype=torch.float32)
    for name, x in {"contiguous": base, "strided": base[:, ::2],
                    "transposed": base.t()[:7]}.items():
        x = x.detach().requires_grad_(True)
        y = torch.randint(0, x.shape[1], (x.shape[0],))
        loss = xft.cross_entropy(x, y)
        array = seen["logits"]
        assert array.__array_interface__["data"][0] == x.data_ptr(), name
        assert array.strides == tuple(s * x.element_size() for s in x.stride()), name
        (grad,) = torch.autograd.grad(loss, x)
        assert grad.data_ptr() == seen["grad"].__array_interface__["data"][0], name
        (ref,) = torch.autograd.grad(F.cross_entropy(x, y), x)
        assert_close(grad, ref, rtol=2e-5, atol=1e-7, what=name)
        # loss.backward() on a leaf: .grad takes the kernels' memory too (no copy).
        xft.cross_entropy(x, y).backward()
        assert x.grad.data_ptr() == seen["grad"].__array_interface__["data"][0], name


def test_no_grad_runs_the_loss_kernel_and_allocates_no_gradient(monkeypatch, rng):
    def refuse(*args, **kwargs):
        raise AssertionError("cross_entropy_with_grad called without requires_grad")

    x = torch.randn(2048, 1000)
    y = torch.randint(0, 1000, (2048,))
    grad_bytes = x.numel() * x.element_size()
    xft.cross_entropy(x.requires_grad_(True), y)  # compile and warm the kernels
    x.requires_grad_(False)

    def traced_peak(fn) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # The measurement can see a gradient: with requires_grad one is allocated.
    xf.empty_cache()  # a reused buffer would not be seen
    leaf = x.clone().requires_grad_(True)
    assert traced_peak(lambda: xft.cross_entropy(leaf, y)) >= grad_bytes
    monkeypatch.setattr(xf, "cross_entropy_with_grad", refuse)
    # Without: the loss, the per-row sums and label checks only (~3% of a gradient).
    assert traced_peak(lambda: xft.cross_entropy(x, y)) < grad_bytes // 8
    with torch.no_grad():
        assert traced_peak(lambda: xft.cross_entropy(leaf, y)) < grad_bytes // 8
    with torch.inference_mode():
        loss = xft.cross_entropy(leaf, y, reduction="none")
    assert loss.shape == (2048,)


def test_non_contiguous_and_channels_last(on_backend, rng):
    x4 = torch.tensor(rng.standard_normal((3, 5, 4, 6)))
    cases = {
        "channels_last": x4.to(memory_format=torch.channels_last),
        "permuted": torch.tensor(rng.standard_normal((3, 4, 6, 5))).permute(0, 3, 1, 2),
        "sliced": torch.tensor(rng.standard_normal((9, 11)))[::2, 1::2],
        "transposed": torch.tensor(rng.standard_normal((5, 7))).t(),
    }
    for name, x in cases.items():
        before = x.clone()
        x = x.requires_grad_(True)
        cdim = 1
        batch = x.shape[:cdim] + x.shape[cdim + 1:]
        y = torch.tensor(rng.integers(0, x.shape[cdim], size=batch))
        loss = xft.cross_entropy(x, y, reduction="none", label_smoothing=0.1)
        go = _grad_output(rng, loss)
        (grad,) = torch.autograd.grad(loss, x, go)
        ref_loss, ref_grad = _oracle(x, y, {"label_smoothing": 0.1}, "none", go)
        assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=1e-13, what=f"{name} loss")
        assert_close(grad, ref_grad, rtol=1e-11, atol=1e-14, what=f"{name} grad")
        assert torch.equal(x.detach(), before), f"{name}: the input was modified"


def test_inplace_backward_writes_the_gradient_into_the_logits(on_backend, rng):
    torch.manual_seed(0)
    linear = torch.nn.Linear(10, 6).double()
    h = torch.tensor(rng.standard_normal((12, 10)))
    y = torch.tensor(rng.integers(0, 6, 12))
    logits = linear(h)
    loss = xft.cross_entropy(logits, y, label_smoothing=0.1, inplace_backward=True)
    loss.backward()
    got = [p.grad.clone() for p in linear.parameters()]
    inplace_logits = logits.detach().clone()
    linear.zero_grad()
    ref_logits = linear(h)
    ref_loss = F.cross_entropy(ref_logits, y, label_smoothing=0.1)
    ref_logits.retain_grad()
    ref_loss.backward()
    assert_close(loss.detach(), ref_loss.detach(), rtol=1e-12, what="loss")
    for g, p in zip(got, linear.parameters()):
        assert_close(g, p.grad, rtol=1e-11, atol=1e-14, what="parameter gradient")
    # The logits' storage now holds d loss / d logits.
    assert_close(inplace_logits, ref_logits.grad, rtol=1e-11, atol=1e-14, what="logits")


def test_inplace_backward_on_a_leaf_and_stale_saved_logits(on_backend, rng):
    x = torch.tensor(rng.standard_normal((6, 5)), requires_grad=True)
    y = torch.tensor(rng.integers(0, 5, 6))
    (ref,) = torch.autograd.grad(F.cross_entropy(x, y, reduction="sum"), x)
    xft.cross_entropy(x, y, reduction="sum", inplace_backward=True).backward()
    assert_close(x.grad, ref, rtol=1e-11, atol=1e-14, what="leaf grad")
    assert_close(x.detach(), ref, rtol=1e-11, atol=1e-14, what="leaf storage")
    # An op that saved the logits for its backward must refuse to use overwritten ones.
    w = torch.ones(5, dtype=torch.float64, requires_grad=True)
    logits = torch.tensor(rng.standard_normal((6, 5)), requires_grad=True) * 1.0
    scaled = logits * w  # saves logits (for w's gradient)
    xft.cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scaled.sum().backward()


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_inplace_backward_gives_the_same_gradient(on_backend, staging, dtype, rng):
    x, y, kw = _case(rng, (10, 7, 2), "all", "index", TORCH_DTYPES[dtype])
    (expected,) = torch.autograd.grad(xft.cross_entropy(x, y, **kw), x)
    storage = x.data_ptr()
    loss = xft.cross_entropy(x, y, inplace_backward=True, **kw)
    loss.backward()
    assert torch.equal(x.grad, expected) and torch.equal(x.detach(), expected)
    assert x.data_ptr() == storage


# ------------------------------------------------------------------ higher-order autodiff


# PyTorch's forward-mode AD loads its decompositions through torch.jit.script, which
# warns that it is deprecated (PyTorch's own warning, not ours).
JIT_DEPRECATION = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _hessian_vector(loss_fn, x, v, grad_output):
    """(d/dx (grad_output . loss), d/dx <that gradient, v>): the gradient with its graph
    (create_graph=True), then differentiated again along v."""
    (grad,) = torch.autograd.grad(loss_fn(x), x, grad_output, create_graph=True)
    (hv,) = torch.autograd.grad((grad * v).sum(), x)
    return grad.detach(), hv


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind,option", [("index", o) for o in INDEX_OPTIONS]
                         + [("prob", o) for o in PROB_OPTIONS])
def test_second_derivative_matches_pytorch(on_backend, rng, kind, option, shape, reduction):
    """create_graph=True: the Hessian-vector product the saved gradient gives (no logits
    kept) equals PyTorch's double backward of its own loss, float64, every option."""
    x, y, kw = _case(rng, SHAPES[shape], option, kind)
    v = torch.tensor(rng.standard_normal(tuple(x.shape)))
    loss = xft.cross_entropy(x, y, reduction=reduction, **kw)
    go = _grad_output(rng, loss)
    grad, hv = _hessian_vector(lambda a: xft.cross_entropy(a, y, reduction=reduction, **kw),
                               x, v, go)
    want_grad, want_hv = _hessian_vector(lambda a: _oracle_loss(a, y, kw, reduction),
                                         x.detach().clone().requires_grad_(True), v, go)
    what = f"{kind}/{option}/{shape}/{reduction}"
    assert_close(grad, want_grad, rtol=1e-12, atol=1e-15, what=f"{what} grad")
    assert_close(hv, want_hv, rtol=1e-9, atol=1e-12, what=f"{what} H v")


@JIT_DEPRECATION
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_gradgradcheck_with_batched_and_forward_over_reverse(on_backend, rng, kind):
    x, y, kw = _case(rng, (3, 4, 2), "z_loss", kind)
    for reduction in REDUCTIONS:
        f = lambda a: xft.cross_entropy(a, y, reduction=reduction, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x,), check_batched_grad=True,
                                        check_forward_ad=True)
        assert torch.autograd.gradgradcheck(f, (x,), check_batched_grad=True,
                                            check_fwd_over_rev=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(PROB_OPTIONS))
def test_probability_targets_get_their_gradient(on_backend, rng, option, reduction):
    """A probability target that requires grad gets PyTorch's gradient (first and second
    order), as F.cross_entropy gives it; the input's gradient stays right too."""
    x, y, kw = _case(rng, (5, 4, 3), option, "prob")
    y = y.requires_grad_(True)
    loss = xft.cross_entropy(x, y, reduction=reduction, **kw)
    go = _grad_output(rng, loss)
    gx, gy = torch.autograd.grad(loss, (x, y), go)
    x64, y64 = (t.detach().clone().requires_grad_(True) for t in (x, y))
    want_x, want_y = torch.autograd.grad(_oracle_loss(x64, y64, kw, reduction), (x64, y64), go)
    assert_close(gx, want_x, rtol=1e-12, atol=1e-15, what=f"{option} d input")
    assert_close(gy, want_y, rtol=1e-12, atol=1e-15, what=f"{option} d target")
    assert torch.autograd.gradgradcheck(
        lambda a, t: xft.cross_entropy(a, t, reduction=reduction, **kw), (x, y))


@JIT_DEPRECATION
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_torch_func_transforms_match_pytorch(on_backend, rng, kind):
    """torch.func's grad, per-sample gradients (vmap of grad), jvp, jacrev and hessian,
    and forward-mode AD with dual tensors, against the same transforms of PyTorch's
    loss."""
    x, y, kw = _case(rng, (6, 5), "z_loss", kind)
    x = x.detach()
    ours = lambda a, t, r="mean": xft.cross_entropy(a, t, reduction=r, **kw)  # noqa: E731
    theirs = lambda a, t, r="mean": _oracle_loss(a, t, kw, r)  # noqa: E731
    # (per sample "sum": the "mean" of one ignored row is 0 here, 0/0 in PyTorch)
    per_sample = lambda f: torch.func.vmap(  # noqa: E731
        torch.func.grad(lambda a, t: f(a[None], t[None], "sum")))
    tangent = torch.tensor(rng.standard_normal(tuple(x.shape)))
    for name, transform in {
        "grad": lambda f: torch.func.grad(f)(x, y),
        "per-sample grad": lambda f: per_sample(f)(x, y),
        "vmap": lambda f: torch.func.vmap(lambda a, t: f(a, t, "sum"))(x[:, None], y[:, None]),
        "jvp": lambda f: torch.func.jvp(lambda a: f(a, y), (x,), (tangent,))[1],
        "jacrev": lambda f: torch.func.jacrev(f)(x, y),
        "hessian": lambda f: torch.func.hessian(lambda a: f(a, y))(x),
    }.items():
        assert_close(transform(ours), transform(theirs), rtol=1e-10, atol=1e-13, what=name)
    fw = torch.autograd.forward_ad
    with fw.dual_level():
        got = fw.unpack_dual(ours(fw.make_dual(x, tangent), y)).tangent
        want = fw.unpack_dual(theirs(fw.make_dual(x, tangent), y)).tangent
    assert got is not None
    assert_close(got, want, rtol=1e-10, atol=1e-13, what="forward AD")


def test_weight_derivatives_under_torch_func_are_true_ones(on_backend, rng):
    """Class weights under torch.func (outside it they are refused, as in PyTorch): the
    gradient's derivative with respect to them equals central differences (PyTorch's own
    forward mode gets this one wrong), never a silent zero."""
    x, y, kw = _case(rng, (5, 4), "weight", "index")
    x, w = x.detach(), kw["weight"]
    f = lambda a, ww: xft.cross_entropy(a, y, weight=ww, label_smoothing=0.1)  # noqa: E731
    mixed = torch.func.jacfwd(lambda ww: torch.func.grad(f)(x, ww))(w)
    h = 1e-6
    for k in range(len(w)):
        step = torch.zeros_like(w)
        step[k] = h
        central = (torch.func.grad(f)(x, w + step) - torch.func.grad(f)(x, w - step)) / (2 * h)
        assert_close(mixed[..., k], central, rtol=1e-6, atol=1e-9, what=f"d grad / d w_{k}")
    assert mixed.abs().max() > 0.01


def test_third_derivative_matches_pytorch(on_backend, rng):
    """The Hessian-vector product is differentiable again: d/dx |H v|^2 equals PyTorch's
    (no NaN from the guard of the K = 0 rows leaks into it)."""
    x, y, kw = _case(rng, (3, 4), "all", "index")
    v = torch.tensor(rng.standard_normal((3, 4)))

    def third(fn):
        xo = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xo), xo, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), xo, create_graph=True)
        return torch.autograd.grad((h ** 2).sum(), xo)[0]

    assert_close(third(lambda a: xft.cross_entropy(a, y, **kw)),
                 third(lambda a: _oracle_loss(a, y, kw, "mean")), rtol=1e-9, atol=1e-13,
                 what="third derivative")


def test_ignored_row_with_nan_logits_has_zero_derivatives_everywhere(on_backend, rng):
    """An ignored row is no function of its logits, NaN ones included: zero gradient on
    the fused path, under torch.func, and zero second derivatives."""
    x, y, _ = _case(rng, (3, 4), "plain", "index")
    x, y = x.detach().clone(), y.clone()
    x[1, 2], y[1] = float("nan"), -100
    for name, grad in {
        "eager": torch.autograd.grad(xft.cross_entropy(x.requires_grad_(True), y), x)[0],
        "torch.func": torch.func.grad(lambda a: xft.cross_entropy(a, y))(x.detach()),
        "hessian": torch.func.hessian(lambda a: xft.cross_entropy(a, y))(x.detach())[1],
    }.items():
        assert torch.equal(grad[1] if name != "hessian" else grad,
                           torch.zeros_like(grad[1] if name != "hessian" else grad)), name
    assert torch.isfinite(torch.func.grad(lambda a: xft.cross_entropy(a, y))(x.detach())).all()


def test_second_derivative_where_the_gradient_cannot_give_it_is_nan(on_backend):
    """With a z-loss, K = sum(b) + 2 z' lse vanishes where lse = -1 / (2 z) (one kept row,
    no weights): p cannot be recovered from g = -b there, so H v is NaN, not 0."""
    c, z = 4, 0.05
    x = torch.full((1, c), -10.0 - np.log(c), dtype=torch.float64, requires_grad=True)
    loss = xft.cross_entropy(x, torch.tensor([0]), z_loss=z)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    (hv,) = torch.autograd.grad(grad.sum(), x)
    assert torch.isnan(hv).all()


def test_composite_keeps_the_zero_label_at_minus_inf(on_backend):
    """A probability target that requires grad takes the composite path: same value as
    the fused one where a zero label meets a -inf logit (0, not 0 * inf = NaN)."""
    x = torch.tensor([[0.5, -1.0, -float("inf")], [0.1, 0.2, 0.3]], dtype=torch.float64)
    t = torch.tensor([[0.25, 0.75, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    fused = xft.cross_entropy(x, t)
    composite = xft.cross_entropy(x, t.clone().requires_grad_(True))
    assert torch.isfinite(fused)
    assert_close(composite.detach(), fused, rtol=1e-15, atol=0, what="composite")


def test_first_order_gradient_holds_no_graph(on_backend, rng):
    """The saved gradient is an output of the autograd node (for second derivatives); a
    plain backward must still hand over a detached tensor, the kernels' own memory."""
    x, y, _ = _case(rng, (4, 5), "plain", "index")
    xft.cross_entropy(x, y).backward()
    assert x.grad.grad_fn is None and not x.grad.requires_grad
    (g,) = torch.autograd.grad(xft.cross_entropy(x, y, reduction="none").sum(), x)
    assert g.grad_fn is None and not g.requires_grad
    # A retained graph, backward again after an in-place change of .grad (clipping,
    # say): accumulates as PyTorch does, the saved gradient untouched.
    for fn in (xft.cross_entropy, F.cross_entropy):
        x.grad = None
        loss = fn(x, y)
        loss.backward(retain_graph=True)
        x.grad.mul_(0.5)
        loss.backward(retain_graph=True)
        loss.backward()
        assert_close(x.grad, 2.5 * g / len(y), rtol=1e-12, atol=1e-15, what=fn.__module__)


def test_double_backward_refused_where_no_gradient_is_kept(on_backend, rng):
    """inplace_backward (the logits are gone) and the compiled operator (its backward
    scales a constant) refuse create_graph=True instead of a wrong second derivative;
    a target modified in place after the forward is refused too."""
    x, y, _ = _case(rng, (4, 5), "plain", "index")
    leaf = x.detach().clone().requires_grad_(True)
    loss = xft.cross_entropy(leaf * 1.0, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="no second derivative here"):
        torch.autograd.grad(loss, leaf, create_graph=True)
    loss = torch.ops.xentfast.cross_entropy_fwd(x, y, None, -100, "sum", 0.0, 0.0)[0]
    with pytest.raises(RuntimeError, match="no second derivative here"):
        torch.autograd.grad(loss, x, create_graph=True)
    soft = torch.softmax(torch.randn(4, 5, dtype=torch.float64), dim=1)
    weight = torch.ones(5, dtype=torch.float64)
    for modified in (soft, weight):
        loss = xft.cross_entropy(x, soft, weight=weight)
        modified.mul_(0.5)
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        with pytest.raises(RuntimeError, match="modified in place"):
            torch.autograd.grad(grad.sum(), x)


def test_weight_requiring_grad_is_refused():
    x = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight requires grad"):
        xft.cross_entropy(x, torch.randint(0, 5, (4,)), weight=torch.ones(5, requires_grad=True))
    with torch.no_grad():  # nothing is differentiated: fine
        xft.cross_entropy(x, torch.randint(0, 5, (4,)), weight=torch.ones(5, requires_grad=True))


def _host_thread_count(backend: str):
    """The calling thread's thread cap of a host backend (Numba's or OpenMP's)."""
    if backend == "cpu":
        import numba

        return numba.get_num_threads()
    from xentfast import _dispatch

    return _dispatch.load("cython").max_threads()


@pytest.mark.parametrize("backend", ["cpu", "cython"])
def test_host_threads_follow_torch_threads(monkeypatch, backend):
    """torch.set_num_threads(1) caps the kernel's threads during the call (forward and
    loss-only), and the cap is lifted afterwards."""
    if backend not in xf.available_backends():
        pytest.skip(f"the {backend} backend is not available")
    seen = []
    for name in ("cross_entropy_with_grad", "cross_entropy"):
        original = getattr(xf, name)

        def recording(*args, _original=original, **kwargs):
            seen.append(_host_thread_count(backend))
            return _original(*args, **kwargs)

        monkeypatch.setattr(xf, name, recording)
    before_torch = torch.get_num_threads()
    before = _host_thread_count(backend)
    x = torch.randn(64, 10, requires_grad=True)
    y = torch.randint(0, 10, (64,))
    try:
        torch.set_num_threads(1)
        with xf.use_backend(backend):
            xft.cross_entropy(x, y)
            with torch.no_grad():
                xft.cross_entropy(x, y)
    finally:
        torch.set_num_threads(before_torch)
    assert seen == [1, 1]
    assert _host_thread_count(backend) == before
    if before > 1:  # with PyTorch's count not below the backend's, no cap is set
        seen.clear()
        with xf.use_backend(backend):
            xft.cross_entropy(x, y)
        assert seen == [before]


# ------------------------------------------------------------------ module, legacy args


def test_cross_entropy_loss_module(on_backend, rng):
    weight = torch.tensor(rng.uniform(0.5, 2.0, 5))
    ours = xft.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.1,
                                z_loss=0.0)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert "weight" in dict(ours.named_buffers())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.tensor(rng.standard_normal((8, 5)), requires_grad=True)
    y = torch.tensor(rng.integers(0, 5, 8))
    (g_ours,) = torch.autograd.grad(ours(x, y), x)
    (g_theirs,) = torch.autograd.grad(theirs(x, y), x)
    assert_close(g_ours, g_theirs, rtol=1e-11, atol=1e-14, what="module grad")
    half = xft.CrossEntropyLoss(weight=weight).to(torch.float32)
    assert half.weight.dtype == torch.float32
    assert "z_loss=0.25" in repr(xft.CrossEntropyLoss(z_loss=0.25))
    with pytest.raises(ValueError, match="z_loss"):
        xft.CrossEntropyLoss(z_loss=-1.0)


LEGACY = [(False, None, "sum"), (None, False, "none"), (True, True, "mean"),
          (False, True, "sum"), (True, False, "none")]


@pytest.mark.parametrize("size_average, reduce, expected", LEGACY)
def test_legacy_size_average_and_reduce(size_average, reduce, expected, rng):
    x = torch.tensor(rng.standard_normal((6, 4)), requires_grad=True)
    y = torch.tensor(rng.integers(0, 4, 6))
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        ours = xft.cross_entropy(x, y, size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        module = xft.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    assert module.reduction == expected
    assert_close(ours.detach(), F.cross_entropy(x, y, reduction=expected).detach(),
                 rtol=1e-12, what="legacy reduction")
    assert_close(module(x, y).detach(), ours.detach(), rtol=0, what="module")


# ------------------------------------------------------------------ errors and differences


def test_documented_differences_from_pytorch():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    every_ignored = torch.full((3,), -100)
    loss = xft.cross_entropy(x, every_ignored)
    assert torch.isnan(F.cross_entropy(x, every_ignored))  # PyTorch: 0 / 0
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.count_nonzero(grad) == 0
    with pytest.raises(ValueError, match="label value of 7 at labels\\[1\\]"):
        xft.cross_entropy(x, torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="weight\\[2\\] = inf"):
        xft.cross_entropy(x, torch.tensor([0, 1, 2]),
                          weight=torch.tensor([1.0, 1.0, float("inf"), 1.0]))
    empty = xft.cross_entropy(torch.empty(0, 4, requires_grad=True),
                              torch.empty(0, dtype=torch.int64))
    assert empty.item() == 0.0


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
def test_bad_input_gives_clear_errors(no_grad):
    x = torch.randn(4, 5, requires_grad=not no_grad)
    y = torch.randint(0, 5, (4,))
    cases = [
        (TypeError, "floating-point", lambda: xft.cross_entropy(x.detach().long(), y)),
        (ValueError, "do not fit logits", lambda: xft.cross_entropy(x, y[:3])),
        (TypeError, r"holds class indices.*Cast it with target\.long\(\)",
         lambda: xft.cross_entropy(x, y.double())),
        (TypeError, r"Cast one-hot rows with target\.float\(\)",
         lambda: xft.cross_entropy(x, torch.zeros(4, 5, dtype=torch.int64))),
        (TypeError, r"dtype torch\.bool.*integer tensor of shape \(4,\)",
         lambda: xft.cross_entropy(x, y.bool())),
        (TypeError, r"holds class indices.*target\.long\(\)",  # unbatched
         lambda: xft.cross_entropy(x[0], torch.tensor(1.0))),
        (ValueError, "reduction must be one of", lambda: xft.cross_entropy(x, y, reduction="avg")),
        (ValueError, "label_smoothing must lie in", lambda: xft.cross_entropy(
            x, y, label_smoothing=1.5)),
        (ValueError, "z_loss must be", lambda: xft.cross_entropy(x, y, z_loss=-0.1)),
        (ValueError, "weight must be a 1-D array", lambda: xft.cross_entropy(
            x, y, weight=torch.ones(4))),
        (ValueError, "at least one dimension", lambda: xft.cross_entropy(
            torch.tensor(1.0), torch.tensor(0))),
        (ValueError, "zero classes", lambda: xft.cross_entropy(
            torch.empty(4, 0), torch.zeros(4, dtype=torch.int64))),
        (ValueError, "target is on meta", lambda: xft.cross_entropy(x, y.to("meta"))),
        (TypeError, "ignore_index must be an integer", lambda: xft.cross_entropy(
            x, y, ignore_index=True)),
        (ValueError, "do not fit logits", lambda: xft.cross_entropy(  # 16-bit staging
            x.detach().bfloat16().requires_grad_(not no_grad), torch.rand(4, 4))),
    ]
    context = torch.no_grad() if no_grad else torch.enable_grad()
    with context:
        for error, message, call in cases:
            with pytest.raises(error, match=message):
                call()


# ------------------------------------------------------------------ imports, example


def test_import_xentfast_does_not_import_torch():
    code = "import sys, xentfast; xentfast.cross_entropy([[1.0, 2.0]], [1]); " \
           "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_missing_torch_names_the_install_command():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import xentfast.torch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert "pip install torch" in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="scikit-learn (the digits data set) is not installed")
def test_train_digits_torch_example_matches_nn_cross_entropy_loss(monkeypatch):
    """On the automatic host backend (the per-backend parity is the grids above)."""
    spec = importlib.util.spec_from_file_location("train_digits_torch",
                                                  ROOT / "examples" / "train_digits_torch.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # its dataclass looks itself up
    spec.loader.exec_module(example)
    ours, checked, theirs, worst = example.compare(
        epochs=2, backend=xf._dispatch.best_host_backend())
    assert len(ours.losses) == len(checked.losses) == len(theirs.losses) > 50
    a, b = np.asarray(ours.losses), np.asarray(checked.losses)
    assert np.max(np.abs(a - b) / np.abs(b)) <= worst <= example.MAX_RELATIVE_DIFFERENCE
    assert 0 < worst  # the comparison ran (float32: not bitwise torch's)
    assert ours.losses[-1] < 0.5 * ours.losses[0]  # it trained
    assert theirs.losses[-1] < 0.5 * theirs.losses[0]


# ------------------------------------------------------------------ CUDA (where present)


cuda_only = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in xf.available_backends(),
    reason="needs a CUDA GPU visible to both PyTorch and xentfast")


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_tensors(dtype, reduction, rng):
    torch_dtype = TORCH_DTYPES[dtype]
    x, y, kw = _case(rng, (64, 33), "all", "index", torch_dtype)
    x = x.detach().cuda().requires_grad_(True)
    y = y.cuda()
    kw["weight"] = kw["weight"].cuda()
    loss = xft.cross_entropy(x, y, reduction=reduction, **kw)
    assert loss.device == x.device and loss.dtype == torch_dtype
    go = _grad_output(rng, loss).cuda()
    (grad,) = torch.autograd.grad(loss, x, go)
    assert grad.device == x.device and grad.dtype == torch_dtype
    cpu_kw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref_loss, ref_grad = _oracle(x.cpu(), y.cpu(), cpu_kw, reduction, go.cpu())
    rtol = RTOL[dtype]
    assert_close(loss.detach().double().cpu(), ref_loss, rtol=rtol, what="cuda loss")
    atol = rtol * 1e-2 * float(ref_grad.abs().max())
    assert_close(grad.double().cpu(), ref_grad, rtol=rtol, atol=atol, what="cuda grad")


@cuda_only
@pytest.mark.gpu
def test_cuda_side_stream_and_inplace(rng):
    x = torch.randn(512, 1000, device="cuda")
    y = torch.randint(0, 1000, (512,), device="cuda")
    (ref,) = torch.autograd.grad(F.cross_entropy(x.requires_grad_(True), y), x)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        logits = (x.detach() * 1.0).requires_grad_(True)  # queued on the side stream
        loss = xft.cross_entropy(logits, y)
        (grad,) = torch.autograd.grad(loss, logits)
        total = grad.sum()  # consumed on the side stream
    torch.cuda.synchronize()
    assert_close(grad.cpu(), ref.cpu(), rtol=2e-5, atol=1e-8, what="side-stream grad")
    assert abs(float(total)) < 1e-4
    logits = (x.detach() * 1.0).requires_grad_(True)
    xft.cross_entropy(logits, y, inplace_backward=True).backward()
    assert_close(logits.grad.cpu(), ref.cpu(), rtol=2e-5, atol=1e-8, what="inplace grad")


@pytest.mark.parametrize("value", ["False", "no", 0, None])
def test_inplace_backward_must_be_a_bool(value):
    """A truthy string must raise (as the NumPy API's inplace=), not overwrite the
    caller's logits with the gradient."""
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(TypeError, match="inplace_backward must be True or False"):
        xft.cross_entropy(x, torch.tensor([0, 1, 2, 4]), inplace_backward=value)
    with pytest.raises(TypeError, match="inplace_backward must be True or False"):
        xft.CrossEntropyLoss(inplace_backward=value)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"ignore_index": 1.5}, TypeError, "ignore_index must be an integer class id; got 1.5"),
    ({"chunk_size": 2.7}, TypeError, "chunk_size must be a positive integer"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ({"weight": "ones_requiring_grad"}, RuntimeError, "not class weights"),
])
def test_linear_cross_entropy_checks_its_options(kwargs, error, match):
    """Options are checked, not coerced: int(1.5) = 1 made the error blame a label."""
    h = torch.randn(4, 3)
    w = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 4])
    if kwargs.get("weight") == "ones_requiring_grad":
        kwargs = {"weight": torch.ones(5, requires_grad=True)}
    with pytest.raises(error, match=match):
        xft.linear_cross_entropy(h, w, y, **kwargs)


def test_parameter_inputs_check_their_options():
    """nn.Parameter logits take the operators' path: the options are still checked."""
    p = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="ignore_index must be an integer class id"):
        xft.cross_entropy(p, torch.tensor([0, 1, 2, 4]), ignore_index=1.5)


def test_integer_input_error_speaks_torch():
    with pytest.raises(TypeError, match=r"got dtype torch.int64; cast it first, e.g. input.float\(\)"):
        xft.cross_entropy(torch.ones(3, 4, dtype=torch.int64), torch.tensor([0, 1, 2]))
