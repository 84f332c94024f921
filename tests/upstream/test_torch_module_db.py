"""PyTorch's own CrossEntropyLoss / cross_entropy samples and error inputs, run through
xentfast and checked against PyTorch's reference implementation.

Upstream: github.com/pytorch/pytorch, as installed with torch 2.13.0 (git
cf30153c4c131c8164ee7798e5022d810682e2cb), imported from ``torch/testing/_internal/``:

- ``common_modules.py``: ``module_inputs_torch_nn_CrossEntropyLoss`` (105 samples per
  dtype: 4d/3d/2d/higher-dim index targets, probability targets, no batch dim; weights,
  ignore_index, label_smoothing; mean/sum/none),
  ``module_error_inputs_torch_nn_CrossEntropyLoss`` (7 error inputs), the
  ``ModuleInfo(torch.nn.CrossEntropyLoss)`` dtypes
  (float32, float64, float16) and its float16 CPU ``test_forward`` tolerance
  (atol=3e-2, rtol=1e-3); and the Softmax, LogSoftmax and Softmin module samples.
- ``common_methods_invocations.py``: ``sample_inputs_cross_entropy`` (21 samples) and
  the ``nn.functional.cross_entropy`` OpInfo dtypes (float32, float64, float16,
  bfloat16).
- ``common_nn.py``: ``loss_reference_fns['CrossEntropyLoss']``
  (``cross_entropy_loss_reference``), the reference every loss here is checked against.

How the samples are checked follows ``test/test_modules.py`` (pytorch/pytorch commit
33263640046f558d38b8e4bc306b1ca6abbf0b1f): ``test_forward`` compares the output with
the sample's ``reference_fn`` by ``assertEqual`` under ``TestModule.precision =
rel_tol = 1e-5`` (each tolerance is the larger of that and the dtype's
``assert_close`` default), ``test_non_contiguous_tensors`` compares strided inputs
with contiguous ones (gradients at atol=1e-4, rtol=0), ``test_errors`` expects each
error input to raise.  Gradients (``TestModule.test_grad`` runs gradcheck in float64
only) are checked in every dtype against torch autograd of the reference evaluated
in float64 on the same values, rounded once to the sample's dtype, under the same
TestModule tolerances without test_forward's float16 override (the float64 reference
is exact; the cotangent is ``loss.backward()``'s, ``loss.sum().backward()``'s for
``reduction="none"``).  The OpInfo samples, which upstream compares with no
reference, are checked the same way, loss and gradient, at ``assert_close``'s
defaults for their dtype.  ``reference_fn``'s module argument is a callable
running ``loss_reference_fns['CrossEntropyLoss']`` with the sample's options (the
no-batch-dim reference calls it on the batched input); for Softmax/LogSoftmax/Softmin
it is the torch module itself.

PyTorch's RuntimeError/IndexError for bad input is xentfast's ValueError (values,
shapes) or TypeError (dtypes); each error test also checks that our message names the
problem, and that torch still raises upstream's error for that input.

Left out, and why:

- The ``nn.functional.cross_entropy`` OpInfo has no ``error_inputs_func`` in torch
  2.13, and ``common_nn.criterion_tests`` is empty (its CrossEntropyLoss entries moved
  to the module database used here).
- CUDA/MPS/XPU parity (``test_cpu_gpu_parity``, ``test_multiple_device_transfer``):
  device placement of torch modules; xentfast's CUDA path has its own suites.
- ``test_gradgrad`` / forward-mode AD of the NumPy-level mapping (arrays have no
  autodiff); ``xentfast.torch.cross_entropy``'s are checked on the OpInfo samples by
  ``test_opinfo_autodiff_of_xentfast_torch`` below (test_ops_gradients' checks).
- ``test_memory_format`` (channels_last): an expected failure upstream for loss
  functions; layouts are covered by ``test_non_contiguous_tensors`` here.
- ``test_pickle``, ``test_repr``, ``test_factory_kwargs``, ``test_device_ctx_init``,
  ``test_if_train_and_eval_modes_differ``: properties of ``torch.nn.Module`` objects.
- Softmax2d: a module over dim -3 whose samples repeat Softmax's checks; and the
  gradients of Softmax/LogSoftmax/Softmin, which xentfast does not provide.
"""

from __future__ import annotations

import functools
import re

import pytest

import helpers

# Without PyTorch the module is skipped, with the reason (README: Run the tests).
torch = helpers.import_peer("torch")

import _torch_mapping as xt  # noqa: E402

common_nn = xt.load_torch_testing("common_nn")
common_modules = xt.load_torch_testing("common_modules")
common_methods_invocations = xt.load_torch_testing("common_methods_invocations")
common_utils = xt.load_torch_testing("common_utils")

REFERENCE = common_nn.loss_reference_fns["CrossEntropyLoss"]

MODULE_INFO = {info.module_cls: info for info in common_modules.module_db}
CROSS_ENTROPY_INFO = MODULE_INFO[torch.nn.CrossEntropyLoss]
OP_INFO = next(op for op in common_methods_invocations.op_db
               if op.name == "nn.functional.cross_entropy")

MODULE_DTYPES = list(CROSS_ENTROPY_INFO.dtypes)  # float32, float64, float16
OP_DTYPES = sorted(OP_INFO.dtypes, key=str)  # + bfloat16


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------ tolerances

# TestModule.precision and TestModule.rel_tol (test/test_modules.py).
MODULE_PRECISION = 1e-5
MODULE_REL_TOL = 1e-5
# ModuleInfo(CrossEntropyLoss): toleranceOverride({float16: tol(atol=3e-2, rtol=1e-3)})
# on TestModule.test_forward, device_type='cpu'.
FORWARD_FLOAT16_OVERRIDE = (3e-2, 1e-3)


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``torch.testing.assert_close``'s (atol, rtol) for ``dtype``."""
    rtol, atol = torch.testing._comparison.default_tolerances(dtype)
    return atol, rtol


def module_tolerance(dtype: torch.dtype, forward: bool = False) -> tuple[float, float]:
    """TestCase.assertEqual under TestModule: each tolerance is the larger of the dtype
    default and the test's precision/rel_tol (the float16 override for test_forward)."""
    atol, rtol = default_tolerance(dtype)
    precision, rel_tol = MODULE_PRECISION, MODULE_REL_TOL
    if forward and dtype == torch.float16:
        precision, rel_tol = FORWARD_FLOAT16_OVERRIDE
    return max(atol, precision), max(rtol, rel_tol)


def assert_equal(actual, expected, atol, rtol, exact_dtype=True):
    """TestCase.assertEqual: NaN equals NaN, dtypes must match unless told otherwise."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True,
                               check_dtype=exact_dtype)


# ------------------------------------------------------------------ samples


def _seeded():
    """TestCase.setUp: ``set_rng_seed(SEED)`` (torch, random and NumPy)."""
    common_utils.set_rng_seed(common_utils.SEED)


@functools.lru_cache(maxsize=None)
def module_samples(module_cls, dtype: torch.dtype) -> dict:
    """The module's ModuleInputs for ``dtype`` by description (generated once, seeded)."""
    _seeded()
    info = MODULE_INFO[module_cls]
    inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                     training=True)
    return {module_input.desc: module_input for module_input in inputs}


@functools.lru_cache(maxsize=None)
def op_samples(dtype: torch.dtype) -> list:
    _seeded()
    return list(OP_INFO.sample_inputs_func(OP_INFO, "cpu", dtype, requires_grad=False))


def _op_sample_id(index: int, sample) -> str:
    kind = "prob" if sample.args[0].shape == sample.input.shape else "index"
    options = "-".join(f"{k}={v if k != 'weight' else 'w'}" for k, v in sample.kwargs.items())
    shape = "x".join(map(str, sample.input.shape))
    return f"{index}-{shape}-{kind}" + (f"-{options}" if options else "")


MODULE_DESCS = list(module_samples(torch.nn.CrossEntropyLoss, torch.float32))
OP_SAMPLE_IDS = [_op_sample_id(i, s) for i, s in enumerate(op_samples(torch.float32))]


class ReferenceCriterion:
    """What ``reference_fn(m, ...)`` calls as the module: PyTorch's reference with the
    sample's constructor options (``no_batch_dim_reference_fn`` reads ``reduction``)."""

    def __init__(self, **options):
        self.options = options
        self.reduction = options.get("reduction", "mean")

    def parameters(self):
        return []

    def __call__(self, input, target):
        return REFERENCE(input, target, **self.options)


def _float64_reference_and_grad(input, target, options):
    """PyTorch's reference on the float64 values and its autograd gradient for
    ``loss.backward()``, or ``loss.sum().backward()`` for per-element losses:
    xentfast's gradient for ``reduction="none"`` (any other cotangent would be applied
    by the mapping in the 16-bit dtype, a second rounding)."""
    x = input.detach().to(torch.float64).requires_grad_(True)
    t = target.to(torch.float64) if target.is_floating_point() else target
    options = dict(options)
    if options.get("weight") is not None:
        options["weight"] = options["weight"].to(torch.float64)
    if x.dim() == 1:  # no batch dim: the reference wants (N, C); batch one row
        loss = REFERENCE(x.unsqueeze(0), t.unsqueeze(0), **options)
        if options.get("reduction", "mean") == "none":
            loss = loss.squeeze(0)
    else:
        loss = REFERENCE(x, t, **options)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    return loss.detach(), grad


# ------------------------------------------------------------- CrossEntropyLoss


@pytest.mark.parametrize("dtype", MODULE_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("desc", MODULE_DESCS)
def test_module_forward(desc, dtype):
    """TestModule.test_forward: the loss equals the sample's reference_fn."""
    sample = module_samples(torch.nn.CrossEntropyLoss, dtype)[desc]
    options = sample.constructor_input.kwargs
    args = sample.forward_input.args
    actual = xt.cross_entropy(*args, **options)
    expected = sample.reference_fn(ReferenceCriterion(**options), *args)
    atol, rtol = module_tolerance(dtype, forward=True)
    assert_equal(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", MODULE_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("desc", MODULE_DESCS)
def test_module_grad(desc, dtype):
    """d(loss)/d(input) equals torch autograd of the reference, in float64, rounded once
    to the dtype (TestModule.test_grad runs gradcheck in float64)."""
    sample = module_samples(torch.nn.CrossEntropyLoss, dtype)[desc]
    options = sample.constructor_input.kwargs
    input, target = sample.forward_input.args
    loss_ref, grad_ref = _float64_reference_and_grad(input, target, options)
    loss, grad = xt.cross_entropy_and_grad(input, target, **options)
    atol, rtol = module_tolerance(dtype)
    assert_equal(loss, loss_ref.to(dtype), atol=atol, rtol=rtol)
    assert_equal(grad, grad_ref.to(dtype), atol=atol, rtol=rtol)


def _make_non_contiguous(obj):
    """test_non_contiguous_tensors: each tensor of dim > 0 as a strided view."""
    if isinstance(obj, tuple):
        return tuple(_make_non_contiguous(o) for o in obj)
    if not isinstance(obj, torch.Tensor) or obj.dim() == 0:
        return obj
    return torch.repeat_interleave(obj, 2, dim=-1)[..., ::2].detach()


@pytest.mark.parametrize("dtype", MODULE_DTYPES, ids=_dtype_id)
def test_module_non_contiguous_tensors(dtype):
    """TestModule.test_non_contiguous_tensors: strided inputs and cotangents give the
    contiguous results (outputs at the module tolerance, gradients at atol=1e-4)."""
    atol, rtol = module_tolerance(dtype)
    failures = []
    for desc, sample in module_samples(torch.nn.CrossEntropyLoss, dtype).items():
        options = sample.constructor_input.kwargs
        args = sample.forward_input.args
        default_output = xt.cross_entropy(*args, **options)
        # grad_output = default_output.clone().normal_() upstream: a seeded normal draw
        generator = torch.Generator().manual_seed(common_utils.SEED)
        grad_output = torch.randn(default_output.shape, generator=generator).to(dtype)
        _, default_grad = xt.cross_entropy_and_grad(*args, grad_output=grad_output, **options)
        for in_args in (args, _make_non_contiguous(args)):
            for g_out in (grad_output, _make_non_contiguous(grad_output)):
                out, grad = xt.cross_entropy_and_grad(*in_args, grad_output=g_out, **options)
                try:
                    assert_equal(out, default_output, atol=atol, rtol=rtol)
                    assert_equal(grad, default_grad, atol=1e-4, rtol=0)
                except AssertionError as error:
                    failures.append(f"{desc}: {error}")
    assert not failures, "\n".join(failures)


# PyTorch's error (type, regex) -> ours: (type, regex our message must match).
ERROR_MAPPING = {
    "Expected floating point type for target with class probabilities":
        (TypeError, r"labels of shape \(2, 3\) match the logits, so they are read as "
                    r"probabilities, but their dtype is int64"),
    "expected target dtype to be Long or Byte":
        (TypeError, r"labels of shape \(2,\) are read as class indices, but their dtype "
                    r"is float"),
    "Expected input batch_size .* to match target batch_size":
        (ValueError, r"labels of shape \(3,\) do not fit logits of shape \(2, 3\)"),
    "weight tensor should be defined either for all .* classes or no classes":
        (ValueError, r"weight must be a 1-D array with one entry per class, shape \(3,\); "
                     r"got shape \(2,\)"),
    "ignore_index is not supported for floating point target":
        (ValueError, r"ignore_index"),
    "label_smoothing must be between 0.0 and 1.0":
        (ValueError, r"label_smoothing must lie in \[0, 1\]; got 1.5"),
    "Expected target size":
        (ValueError, r"labels of shape \(2, 4\) do not fit logits of shape \(2, 3, 5\)"),
}


def _error_inputs(dtype):
    _seeded()
    return CROSS_ENTROPY_INFO.module_error_inputs_func(
        CROSS_ENTROPY_INFO, device="cpu", dtype=dtype, requires_grad=False, training=True)


ERROR_REGEXES = [e.error_regex for e in _error_inputs(torch.float32)]


@pytest.mark.parametrize("dtype", MODULE_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("upstream_regex", ERROR_REGEXES,
                         ids=[re.sub(r"\W+", "_", r).strip("_")[:40] for r in ERROR_REGEXES])
def test_module_errors(upstream_regex, dtype):
    """TestModule.test_errors: every error input raises, naming the problem."""
    error_input = next(e for e in _error_inputs(dtype) if e.error_regex == upstream_regex)
    assert error_input.error_on == common_modules.ModuleErrorEnum.FORWARD_ERROR
    module_input = error_input.module_error_input
    options = module_input.constructor_input.kwargs
    args = module_input.forward_input.args
    # The input still makes PyTorch raise upstream's error ...
    with pytest.raises(error_input.error_type, match=upstream_regex):
        torch.nn.CrossEntropyLoss(**options)(*args)
    # ... and xentfast raises its own, naming the problem.
    error_type, our_regex = ERROR_MAPPING[upstream_regex]
    with pytest.raises(error_type, match=our_regex):
        xt.cross_entropy(*args, **options)


# ----------------------------------------------------- nn.functional.cross_entropy


@pytest.mark.parametrize("dtype", OP_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("index", range(len(OP_SAMPLE_IDS)), ids=OP_SAMPLE_IDS)
def test_opinfo_sample(index, dtype):
    """Each sample_inputs_cross_entropy sample: loss and gradient equal PyTorch's
    reference and its autograd gradient in float64, rounded to the dtype."""
    sample = op_samples(dtype)[index]
    input, target, options = sample.input, sample.args[0], sample.kwargs
    loss_ref, grad_ref = _float64_reference_and_grad(input, target, options)
    atol, rtol = default_tolerance(dtype)
    assert_equal(xt.cross_entropy(input, target, **options), loss_ref.to(dtype),
                 atol=atol, rtol=rtol)
    loss, grad = xt.cross_entropy_and_grad(input, target, **options)
    assert_equal(loss, loss_ref.to(dtype), atol=atol, rtol=rtol)
    assert_equal(grad, grad_ref.to(dtype), atol=atol, rtol=rtol)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("index", range(len(OP_SAMPLE_IDS)), ids=OP_SAMPLE_IDS)
def test_opinfo_autodiff_of_xentfast_torch(index):
    """test_ops_gradients on ``xentfast.torch.cross_entropy``: each sample in float64
    with every float tensor requiring grad (probability targets too, as the OpInfo makes
    them): gradcheck with forward-mode AD and batched gradients, gradgradcheck with
    forward-over-reverse (supports_forward_ad, supports_fwgrad_bwgrad)."""
    import xentfast.torch as xft

    _seeded()
    sample = list(OP_INFO.sample_inputs_func(OP_INFO, "cpu", torch.float64,
                                             requires_grad=True))[index]
    target, options = sample.args[0], sample.kwargs
    inputs = (sample.input, target) if target.requires_grad else (sample.input,)

    def loss(input, *maybe_target):
        return xft.cross_entropy(input, maybe_target[0] if maybe_target else target,
                                 **options)

    assert torch.autograd.gradcheck(loss, inputs, check_forward_ad=True,
                                    check_batched_grad=True)
    assert torch.autograd.gradgradcheck(loss, inputs, check_fwd_over_rev=True,
                                        check_batched_grad=True)


# ------------------------------------------------- Softmax, LogSoftmax, Softmin


def _ours(module_cls, dim):
    if module_cls is torch.nn.Softmax:
        return lambda i: xt.softmax(i, dim)
    if module_cls is torch.nn.LogSoftmax:
        return lambda i: xt.log_softmax(i, dim)
    return lambda i: xt.softmax(-i, dim)  # Softmin: softmax(-x)


SOFTMAX_CASES = [
    pytest.param(cls, desc, id=f"{cls.__name__}-{desc or 'default'}")
    for cls in (torch.nn.Softmax, torch.nn.LogSoftmax, torch.nn.Softmin)
    for desc in module_samples(cls, torch.float32)
]


@pytest.mark.parametrize("dtype", list(MODULE_INFO[torch.nn.Softmax].dtypes), ids=_dtype_id)
@pytest.mark.parametrize("module_cls, desc", SOFTMAX_CASES)
def test_softmax_module_forward(module_cls, desc, dtype):
    """TestModule.test_forward for Softmax/LogSoftmax/Softmin: the sample's reference_fn
    (the torch module's output where the sample has none)."""
    sample = module_samples(module_cls, dtype)[desc]
    (dim,) = sample.constructor_input.args
    (input,) = sample.forward_input.args
    module = module_cls(dim)
    actual = _ours(module_cls, dim)(input)
    if sample.reference_fn is not None:
        expected = sample.reference_fn(module, input)
    else:
        expected = module(input)
    atol, rtol = module_tolerance(dtype)
    assert_equal(actual, expected, atol=atol, rtol=rtol)
