"""PyTorch's ``test/test_nn.py`` cross-entropy, NLL-through-cross-entropy, softmax and
log_softmax tests, run on xentfast.

Upstream: github.com/pytorch/pytorch, ``test/test_nn.py`` at commit
74f2fa66feec00335f72813782f4802e80bff4cb, the recent one of the two versions of the
file the source store holds (the other is from 2017); the installed torch is 2.13.0,
git cf30153c4c131c8164ee7798e5022d810682e2cb, whose wheel does not ship ``test/``.
``loss_reference_fns`` and ``_test_bfloat16_ops`` come from the installed
``torch/testing/_internal/common_nn.py``, ``SEED``/``set_rng_seed`` from
``common_utils.py``.  Each test below names the
upstream test (class ``TestNN`` or ``TestNNDeviceType``, device ``cpu``) it ports.

Where upstream calls ``nn.CrossEntropyLoss``/``F.cross_entropy``/``F.softmax``/
``F.log_softmax``/``F.softmin`` as the code under test, these tests call xentfast
through ``_torch_mapping`` (softmin as ``softmax(-x)``); ``F.nll_loss(F.log_softmax(x))``
is ``cross_entropy(x)``, and an upstream ``F.nll_loss`` test whose property holds for
cross-entropy (shapes, empty inputs, ignored rows, zero weights, errors, byte targets)
is ported through it.  Where upstream compares with a reference (PyTorch's
``loss_reference_fns``, a slow formula, PyTorch on CPU as the reference device), the
reference stays PyTorch.  ``loss.backward()`` becomes xentfast's gradient
(``cross_entropy_and_grad``).  Inputs (the same RNG calls after
``set_rng_seed(SEED)``, as ``TestCase.setUp``), expected values and tolerances are
upstream's; ``assertEqual`` is ``torch.testing.assert_close`` with the dtype's
defaults (these classes set no precision), ``equal_nan=True`` and ``check_dtype``
unless upstream passes ``exact_dtype=False``.  Upstream tests that check three
reductions in one body where one of them is a documented difference are split by
reduction, so the others still run.  PyTorch's RuntimeError for bad input is
xentfast's ValueError/TypeError, with its message checked.

Deliberate differences (README, Semantics), ``xfail(strict=True)``:

- ``reduction="mean"`` with no kept row is 0.0, not NaN (``test_nll_loss_all_ignored``'s
  and ``test_nll_loss_empty_tensor_reduction_mean``'s NaN), and so is a mean whose
  total class weight is 0 (``test_nll_loss_total_weight_is_zero``'s NaN);
- zero classes raise ValueError (``test_cross_entropy_loss_zero_div``).

Left out, and why:

- CUDA/device internals: ``test_cross_entropy_large_tensor``, ``test_cross_entropy_64bit``,
  ``test_nll_loss_large_tensor``, ``test_softmax_forward_64bit_indexing``,
  ``test_softmax_64bit_indexing``, ``test_warp_softmax_64bit_indexing`` (CUDA only, and
  4-14 GiB tensors with int64-index overflow at 2**31 elements, beyond a 2-core 24 GiB
  machine for every host backend), ``test_softmax`` (CUDA; ``dtype=`` argument, which
  xentfast does not have), ``test_softmax_backward_*``, ``test_masked_softmax_devices_parity``,
  ``test_masked_softmax_transformer_layout``, ``test_masked_softmax_TxT_layout`` (CUDA
  kernels), the CUDA shape of ``test_log_softmax_big`` ((4, 1536), "non-persistent
  softmax kernel").
- ``test_cross_entropy_loss_precision``: (128, 2, 768, 768) logits in float32 and
  float64 (151M elements): 14 GiB and about 80 s on the numpy backend of this 2-core
  machine, per backend.
- ``test_masked_softmax``, ``test_masked_softmax_mask_types``, ``test_masked_softmax_lowp``:
  torch's fused ``_masked_softmax`` against a slow formula at up to (12, 4, 1024, 1024):
  about 12 s per backend each; the ``-inf`` masking they exercise is checked by
  ``test_masked_softmax_forward_with_nans`` below.  ``test_masked_softmax_grad``:
  gradients of softmax.
- Second derivatives, forward-mode AD and every softmax/log_softmax backward
  (``gradgradcheck``, the ``.backward()`` halves of ``test_softmax_cpu``,
  ``test_log_softmax_cpu``, ``test_softmax_results``, ``test_softmax_double``,
  ``_test_bfloat16_ops``): xentfast provides first derivatives of cross-entropy only.
- ``test_adaptive_log_softmax`` (a module with its own clusters), ``test_kl_div_log_softmax_target``
  (KL of a tensor with itself: zero for any deterministic log_softmax), the
  ``NLLLoss*`` criterion entries of ``common_nn`` (log-probabilities fed to nll_loss
  directly, not a softmax cross-entropy); ``criterion_tests`` is empty in torch 2.13.
"""

from __future__ import annotations

import math
from itertools import product

import pytest

import helpers

# Without PyTorch the module is skipped, with the reason (README: Run the tests).
torch = helpers.import_peer("torch")

import torch.nn.functional as F  # noqa: E402

import _torch_mapping as xt  # noqa: E402

common_nn = xt.load_torch_testing("common_nn")
common_utils = xt.load_torch_testing("common_utils")

loss_reference_fns = common_nn.loss_reference_fns
nan = float("nan")

# README, Semantics: the documented differences from PyTorch these cases hit.
MEAN_NO_KEPT_ROW = (
    'README Semantics: reduction="mean" with no kept row gives 0.0 and an all-zero '
    "gradient (PyTorch gives NaN)")
MEAN_ZERO_WEIGHT = (
    'README Semantics: reduction="mean" whose total class weight over kept rows is 0 '
    "gives 0.0 and an all-zero gradient, like no kept row (PyTorch gives NaN)")
ZERO_CLASSES = (
    "README Semantics: zero classes (logits.shape[axis] == 0) raise ValueError: "
    "cross-entropy needs at least one class")


@pytest.fixture(autouse=True)
def seeded():
    """TestCase.setUp: ``set_rng_seed(SEED)`` seeds torch, random and NumPy."""
    common_utils.set_rng_seed(common_utils.SEED)


def assert_equal(actual, expected, atol=None, rtol=None, exact_dtype=True):
    """TestCase.assertEqual (precision 0): assert_close's per-dtype defaults unless both
    tolerances are given, NaN equal to NaN."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True,
                               check_dtype=exact_dtype)


# =============================================================== TestNN


def test_cross_entropy_loss():
    """TestNN.test_cross_entropy_loss (dtype=torch.bfloat16): bfloat16 loss and
    gradient within 0.1 of float32's."""
    dtype = torch.bfloat16
    inputf = torch.randn(15, 10, device="cpu", dtype=torch.float, requires_grad=True)
    input = inputf.to(dtype).detach().requires_grad_(True)
    target = torch.empty(15, dtype=torch.long).random_(10)

    outf, gradf = xt.cross_entropy_and_grad(inputf, target)
    out, grad = xt.cross_entropy_and_grad(input, target)
    assert_equal(out, outf.to(dtype=dtype), atol=1e-1, rtol=0)
    assert_equal(grad, gradf.to(dtype=dtype), atol=1e-1, rtol=0)


@pytest.mark.xfail(strict=True, raises=ValueError, reason=ZERO_CLASSES)
def test_cross_entropy_loss_zero_div():
    """TestNN.test_cross_entropy_loss_zero_div (issue #73165): (5, 0) logits with
    (5, 0) probabilities must not raise."""
    input_1 = torch.rand([5, 0], dtype=torch.float32)
    input_2 = torch.rand([5, 0], dtype=torch.float32)
    xt.cross_entropy(input_1, input_2)


def test_softmin():
    """TestNN.test_softmin: softmin(x) == softmax(-x); ours against torch's softmin."""
    x = torch.randn(2, 16)
    assert_equal(xt.softmax(-x, 1), F.softmin(x, 1))
    assert_equal(xt.softmax(-x, 0), F.softmin(x, 0))


# ============================================== TestNNDeviceType: NLL through CE


def test_nll_loss_mismatched_batch():
    x = torch.randn((10, 3), requires_grad=True)
    # t should have size (10,)
    t = torch.zeros((3,), dtype=torch.int64)
    # upstream: ValueError 'Expected.*batch_size'
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) do not fit logits of "
                                         r"shape \(10, 3\)"):
        xt.cross_entropy(x, t)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nll_loss_out_of_bounds_ignore_index(reduction):
    """An ignored label outside [0, C) (255) is accepted, forward and backward; the
    values are checked against loss_reference_fns (upstream checks no error only)."""
    x = torch.randn(6, 3, requires_grad=True)
    t = torch.tensor([0, 1, 255, 0, 1, 2], dtype=torch.int64)
    loss, grad = xt.cross_entropy_and_grad(x, t, ignore_index=255, reduction=reduction)
    ref = loss_reference_fns["CrossEntropyLoss"](x, t, ignore_index=255, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    assert_equal(loss, ref.detach())
    assert_equal(grad, ref_grad)


def test_nll_loss_invalid_target_dim():
    x = torch.randn((10, 3))
    t = torch.zeros((10, 2), dtype=torch.int64)
    # upstream: RuntimeError "1D target tensor expected"
    with pytest.raises(ValueError, match=r"labels of shape \(10, 2\) do not fit logits of "
                                         r"shape \(10, 3\)"):
        xt.cross_entropy(x, t)


def test_nll_loss_invalid_weights():
    x = torch.randn((10, 3))
    t = torch.empty(10, dtype=torch.int64).random_(0, 3)
    invalid_weights = [
        torch.randn(4),
        torch.randn(1, 3),
    ]
    # upstream: RuntimeError "weight tensor should be defined either for all 3 classes
    # or no classes"
    for weight in invalid_weights:
        with pytest.raises(ValueError, match=r"weight must be a 1-D array with one entry "
                                             r"per class, shape \(3,\); got shape "
                                             + r"\(" + ", ".join(map(str, weight.shape))):
            xt.cross_entropy(x, t, weight=weight)


def _nll_loss_helper(input_size, reduction, expected):
    input = torch.rand(input_size, requires_grad=True, dtype=torch.float)
    num_channels = input_size[1]
    target_size = (input_size[0], ) + tuple(input_size[2:])
    target = torch.randint(num_channels, target_size)

    output, grad = xt.cross_entropy_and_grad(input, target, reduction=reduction)
    assert_equal(output, expected, exact_dtype=False)

    # output.sum().backward(); input.grad has the input's size
    assert grad.size() == input.size()


def test_nll_loss_empty_tensor_reduction_none():
    _nll_loss_helper([0, 3], "none", torch.empty([0]))
    _nll_loss_helper([0, 3, 5, 7], "none", torch.empty([0, 5, 7]))
    _nll_loss_helper([2, 3, 0, 7], "none", torch.empty([2, 0, 7]))
    _nll_loss_helper([2, 3, 5, 0], "none", torch.empty([2, 5, 0]))
    _nll_loss_helper([2, 3, 5, 7, 0], "none", torch.empty([2, 5, 7, 0]))


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=MEAN_NO_KEPT_ROW)
def test_nll_loss_empty_tensor_reduction_mean():
    nan = torch.tensor(float("nan"))
    _nll_loss_helper([0, 3], "mean", nan)
    _nll_loss_helper([0, 3, 5, 7], "mean", nan)
    _nll_loss_helper([2, 3, 0, 7], "mean", nan)
    _nll_loss_helper([2, 3, 5, 0], "mean", nan)
    _nll_loss_helper([2, 3, 5, 7, 0], "mean", nan)


def test_nll_loss_empty_tensor_reduction_sum():
    zero = torch.tensor(0)
    _nll_loss_helper([0, 3], "sum", zero)
    _nll_loss_helper([0, 3, 5, 7], "sum", zero)
    _nll_loss_helper([2, 3, 0, 7], "sum", zero)
    _nll_loss_helper([2, 3, 5, 0], "sum", zero)
    _nll_loss_helper([2, 3, 5, 7, 0], "sum", zero)


def _expected_for(reduction, target_shape):
    """Upstream's three assertions: sum -> 0., mean -> NaN, none -> zeros."""
    return {"sum": 0.0, "mean": float("nan"), "none": torch.zeros(target_shape)}[reduction]


def _check_reduction(output, reduction, target_shape):
    expected = _expected_for(reduction, target_shape)
    if reduction == "none":
        assert_equal(output, expected)
    else:
        # self.assertEqual(output.item(), <python float>)
        torch.testing.assert_close(output.item(), expected, equal_nan=True)


@pytest.mark.parametrize("reduction", [
    "sum",
    pytest.param("mean", marks=pytest.mark.xfail(strict=True, raises=AssertionError,
                                                  reason=MEAN_ZERO_WEIGHT)),
    "none",
])
def test_nll_loss_total_weight_is_zero(reduction):
    def helper(input_size):
        input = torch.ones(input_size, requires_grad=True)
        num_channels = input_size[1]
        target_size = (input_size[0], ) + tuple(input_size[2:])
        target = torch.zeros(target_size, dtype=torch.long)
        weight = torch.zeros([num_channels])
        output = xt.cross_entropy(input, target, weight, reduction=reduction)
        _check_reduction(output, reduction, target.shape)

    helper([2, 3])
    helper([2, 3, 5, 7])
    helper([2, 3, 5, 7, 9])


@pytest.mark.parametrize("reduction", [
    "sum",
    pytest.param("mean", marks=pytest.mark.xfail(strict=True, raises=AssertionError,
                                                  reason=MEAN_NO_KEPT_ROW)),
    "none",
])
def test_nll_loss_all_ignored(reduction):
    def helper(input_size):
        input = torch.ones(input_size)
        num_channels = input_size[1]
        target_size = (input_size[0], ) + tuple(input_size[2:])
        target = torch.zeros(target_size, dtype=torch.long)
        output = xt.cross_entropy(input, target, ignore_index=0, reduction=reduction)
        _check_reduction(output, reduction, target.shape)

    helper([2, 3])
    helper([2, 3, 5, 7])
    helper([2, 3, 5, 7, 9])


def test_nll_loss_byte_target_matches_long():
    """NLLLoss(log_softmax(input, -1)) is cross_entropy(input): uint8 targets give the
    int64 targets' loss and gradient."""
    N, C = 10, 4
    input = torch.randn(N, C, requires_grad=True)
    target = torch.empty(N, dtype=torch.long).random_(0, C)

    def compute_result_and_gradient(reduction, target_dtype):
        # result.sum().backward(): xentfast's gradient of the summed losses
        return xt.cross_entropy_and_grad(input, target.to(target_dtype), reduction=reduction)

    for reduction in ["none", "mean", "sum"]:
        result_long, grad_long = compute_result_and_gradient(reduction, torch.long)
        result_byte, grad_byte = compute_result_and_gradient(reduction, torch.uint8)
        assert_equal(result_long, result_byte)
        assert_equal(grad_long, grad_byte)


@pytest.mark.parametrize("reduction", ["none", "invalid"])
def test_invalid_reduction_strings(reduction):
    """The F.cross_entropy line of test_invalid_reduction_strings: a bogus reduction
    string is a ValueError."""
    input = torch.randn(3, 5, requires_grad=True)
    target = torch.tensor([1, 0, 4])
    if reduction == "invalid":
        with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', "
                                             r"'none'; got 'invalid'"):
            xt.cross_entropy(input, target, reduction=reduction)
    else:
        xt.cross_entropy(input, target, reduction=reduction)


# ======================================= TestNNDeviceType: cross-entropy tests


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32],
                         ids=["float16", "float32"])
def test_cross_entropy_loss_2d_out_of_bounds_class_index(dtype):
    """Issue #117532 (upstream: CUDA only, expects a device-side assert): a class index
    outside [0, C) that is not ignore_index raises ValueError naming the value and its
    position (README Semantics)."""
    ignore_index = 255
    b = 10
    n_classes = 3
    w = 768
    h = 1024
    pred = torch.randn(b, n_classes, w, h, dtype=dtype)
    labels = torch.zeros(b, w, h, dtype=torch.int64)
    labels[5, 200, 200] = ignore_index
    # Set invalid class index
    labels[5, 200, 200] = 254

    with pytest.raises(ValueError, match=r"label value of 254 at labels\[5, 200, 200\] "
                                         r"which is outside the valid range of \[0, 3\) "
                                         r"and is not ignore_index=255"):
        xt.cross_entropy(pred, labels, reduction="none", ignore_index=ignore_index)


def test_cross_entropy_loss_prob_target_all_reductions():
    # Test with k-dimensional loss.
    for k in range(5):
        N, C = 5, 4
        other_dims = [torch.randint(2, 5, size=(1,)).item() for _ in range(k)]
        input = torch.randn(N, C, *other_dims, requires_grad=True)
        target = torch.randn(N, C, *other_dims, requires_grad=True)
        weight = torch.randn(C).abs()

        for reduction, w in product(['none', 'mean', 'sum'], [None, weight]):
            output = xt.cross_entropy(input, target, weight=w, reduction=reduction)
            output_ref = loss_reference_fns['CrossEntropyLoss'](
                input, target, reduction=reduction, weight=w)
            assert_equal(output, output_ref.detach())


def test_cross_entropy_loss_prob_target_unit_weights():
    # Test with k-dimensional loss.
    for k in range(5):
        N, C = 5, 4
        other_dims = [torch.randint(2, 5, size=(1,)).item() for _ in range(k)]
        input = torch.randn(N, C, *other_dims, requires_grad=True)
        target = torch.randn(N, C, *other_dims, requires_grad=True)

        for reduction in ['none', 'mean', 'sum']:
            # Ensure result with unit weights is equivalent to result without weights.
            unit_weight = torch.ones(C, dtype=target.dtype)
            output = xt.cross_entropy(input, target, reduction=reduction)
            output_unit = xt.cross_entropy(input, target, weight=unit_weight,
                                           reduction=reduction)
            assert_equal(output, output_unit)


@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
@pytest.mark.parametrize('weighted', [False, True])
def test_cross_entropy_loss_prob_target_no_batch_dim(reduction, weighted):
    C = 5
    input = torch.randn(C).log_softmax(dim=-1)
    target = torch.randn(C).softmax(dim=-1)
    weight = torch.randn(C) if weighted else None
    loss_no_batch = xt.cross_entropy(input, target, weight=weight, reduction=reduction)
    loss_batch = xt.cross_entropy(input.unsqueeze(0), target.unsqueeze(0), weight=weight,
                                  reduction=reduction)
    if reduction == 'none':
        loss_batch = loss_batch.squeeze(0)
    assert_equal(loss_no_batch, loss_batch)


def test_cross_entropy_loss_index_target_unit_weights():
    # Test with k-dimensional loss.
    for k in range(5):
        N, C = 5, 4
        other_dims = [torch.randint(2, 5, size=(1,)).item() for _ in range(k)]
        input = torch.randn(N, C, *other_dims, requires_grad=True)
        target = torch.empty(N, *other_dims, dtype=torch.long).random_(0, C)

        for reduction in ['none', 'mean', 'sum']:
            # Ensure result with unit weights is equivalent to result without weights.
            unit_weight = torch.ones(C, dtype=input.dtype)
            output = xt.cross_entropy(input, target, reduction=reduction)
            output_unit = xt.cross_entropy(input, target, weight=unit_weight,
                                           reduction=reduction)
            assert_equal(output, output_unit)


def test_cross_entropy_loss_one_hot_target():
    # Test with k-dimensional loss.
    for k in range(5):
        N, C = 5, 4
        other_dims = [torch.randint(2, 5, size=(1,)).item() for _ in range(k)]
        input = torch.randn(N, C, *other_dims, requires_grad=True)
        target = torch.empty(N, *other_dims, dtype=torch.long).random_(0, C)
        weight = torch.randn(C).abs()

        # Get one-hot representation of the target.
        target_one_hot = F.one_hot(target, num_classes=C).to(input.dtype)
        # Need to put the C dim at index 1.
        target_one_hot = target_one_hot.permute(0, -1, *range(1, target_one_hot.dim() - 1))

        for reduction, w in product(['none', 'mean', 'sum'], [None, weight]):
            # Skip this case for now because soft and hard label CE are not consistent
            # in the way they apply class weights (see issue #61309).
            # (Upstream tests `weight`, not `w`: every "mean" case is skipped.)
            if reduction == 'mean' and weight is not None:
                continue

            # Ensure loss computed with class indices matches loss
            # computed with one-hot class probs.
            output = xt.cross_entropy(input, target, weight=w, reduction=reduction)
            output_one_hot = xt.cross_entropy(input, target_one_hot, weight=w,
                                              reduction=reduction)
            assert_equal(output, output_one_hot)


def test_cross_entropy_label_smoothing_errors():
    N, C = 3, 4
    input_args = [
        (torch.randn((N, C)), torch.arange(0, C)),
        (torch.randn((N, C)), torch.randn(N, C))
    ]
    # upstream: RuntimeError r"label_smoothing must be between 0\.0"
    for input_arg in input_args:
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\]; got 1\.2"):
            xt.cross_entropy(*input_arg, label_smoothing=1.2)


def test_cross_entropy_label_smoothing_consistent_index_target_and_probs():
    """@set_default_dtype(torch.double): the tensors are created as float64."""
    N, C = 10, 4
    ks = range(5)
    reductions = ['none', 'mean', 'sum']
    label_smoothings = [0.05, 0.15]

    for k, reduction, label_smoothing in product(ks, reductions, label_smoothings):
        other_dims = [torch.randint(2, 5, size=(1,)).item() for _ in range(k)]
        input = torch.randn(N, C, *other_dims, requires_grad=True, dtype=torch.double)
        target = torch.empty(N, *other_dims, dtype=torch.long).random_(0, C)

        # construct target probability that should have the same result as label_smoothing
        target_proba = F.one_hot(target, num_classes=C)
        # Need to put the C dim at index 1.
        target_proba = target_proba.permute(0, -1, *range(1, target_proba.dim() - 1))
        target_mask = (target_proba == 1)
        target_proba = target_proba.to(dtype=input.dtype)

        # y_k^ls = y_k * (1 - label_smoothing) + label_smoothing / n_classes
        # Get one-hot representation of the target.
        target_proba.masked_fill_(target_mask, 1 - label_smoothing + label_smoothing / C)
        target_proba.masked_fill_(~target_mask, label_smoothing / C)

        output_with_prob = xt.cross_entropy(input, target_proba, reduction=reduction)
        output_with_index = xt.cross_entropy(input, target, reduction=reduction,
                                             label_smoothing=label_smoothing)

        assert_equal(output_with_prob, output_with_index, rtol=1e-07, atol=1e-05)


def test_cross_entropy_label_smoothing_with_probs():
    N, C = 10, 4
    ks = range(5)
    reductions = ['none', 'mean', 'sum']
    label_smoothings = [0.05, 0.15]

    # Test with k-dimensional loss.
    for k, label_smoothing in product(ks, label_smoothings):
        other_dims = [torch.randint(2, 5, size=(1,)).item() for _ in range(k)]
        input = torch.randn(N, C, *other_dims, requires_grad=True)
        target = F.log_softmax(torch.randn(N, C, *other_dims), dim=1)

        for reduction in reductions:
            # use with label_smoothing
            output_with_smoothing = xt.cross_entropy(input, target, reduction=reduction,
                                                     label_smoothing=label_smoothing)

            # manually smoothing target
            # class_proba^ls = class_proba * (1 - label_smoothing) +
            #                  label_smoothing / n_classes
            target_with_smoothing = target * (1 - label_smoothing) + label_smoothing / C
            output_with_manual_smoothing = xt.cross_entropy(input, target_with_smoothing,
                                                            reduction=reduction)

            assert_equal(output_with_smoothing, output_with_manual_smoothing)


def test_cross_entropy_label_smoothing_weight_ignore_indices():
    reductions = ['none', 'sum', 'mean']
    label_smoothings = [0.05, 0.15]

    wgt = torch.tensor([0.3, 0.6])
    inp1 = torch.tensor([[0.3, 0.4], [1, 2]])
    inp2 = torch.tensor([[0.3, 0.6], [1, 2]])

    targ_default_ignore_index = torch.tensor([-100, 1])
    targ_negative_ignore_index = torch.tensor([-2, 1])
    targ_positive_ignore_index = torch.tensor([2, 1])

    for reduction, label_smoothing, weight in product(reductions, label_smoothings, (None, wgt)):
        def check_equal(loss, inp_targ_1, inp_targ_2):
            inp1, targ1 = inp_targ_1
            inp2, targ2 = inp_targ_2
            l1 = loss(inp1, targ1)
            l2 = loss(inp2, targ2)
            assert_equal(l1, l2)

        def make_loss(**options):
            return lambda input, target: xt.cross_entropy(
                input, target, reduction=reduction, label_smoothing=label_smoothing,
                weight=weight, **options)

        # Default ignore_index
        loss = make_loss()
        check_equal(loss, (inp1, targ_default_ignore_index), (inp2, targ_default_ignore_index))
        if reduction != 'none':
            # Check that we correctly tally the denominator for `mean`
            # i.e. we don't count the ignored_idx at all.
            check_equal(loss, (inp1, targ_default_ignore_index),
                        (inp2[1:], targ_default_ignore_index[1:]))

        # negative ignore_index
        loss = make_loss(ignore_index=-2)
        check_equal(loss, (inp1, targ_negative_ignore_index), (inp2, targ_negative_ignore_index))
        if reduction != 'none':
            check_equal(loss, (inp1, targ_negative_ignore_index),
                        (inp2[1:], targ_negative_ignore_index[1:]))

        # positive ignore_index
        loss = make_loss(ignore_index=2)
        check_equal(loss, (inp1, targ_positive_ignore_index), (inp2, targ_positive_ignore_index))
        if reduction != 'none':
            check_equal(loss, (inp1, targ_positive_ignore_index),
                        (inp2[1:], targ_positive_ignore_index[1:]))


# ============================================== TestNNDeviceType: softmax tests


def _test_bfloat16_ops(op, inp_dims=(), prec=1e-2, scale_factor=None):
    """common_nn._test_bfloat16_ops, forward half: the bfloat16 result within ``prec``
    of the float32 one (the cotangent is still drawn, keeping upstream's RNG stream)."""
    # fp32 compute
    input1 = torch.randn(inp_dims, dtype=torch.float32, requires_grad=True)
    if scale_factor is not None:
        input1 = (torch.rand(inp_dims, dtype=torch.bfloat16) * scale_factor).float().requires_grad_()
    out1 = op(input1)
    torch.randn_like(out1)  # grad_input1

    # bfloat16 compute
    input2 = input1.detach().bfloat16().requires_grad_()
    out2 = op(input2)

    assert_equal(out1, out2, atol=prec, rtol=prec, exact_dtype=False)


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_softmax_bfloat16(dim):
    """One case per ``dim`` of upstream's loop."""
    softmax = lambda x: xt.softmax(x, dim)  # noqa: E731  (torch.nn.Softmax(dim=dim))
    _test_bfloat16_ops(softmax, inp_dims=(16, 33, 15, 16), prec=1e-2)
    # test softmax with large input value which causes exp() to overflow
    _test_bfloat16_ops(softmax, inp_dims=(16, 33, 15, 16), prec=0.05, scale_factor=1000.0)


def test_nonlinearity_propagate_nan():
    """The softmin, softmax and log_softmax lines: NaN in, NaN out."""
    def test(fn):
        x = torch.tensor([nan])
        assert math.isnan(fn(x).item())

    test(lambda x: xt.softmax(-x, 0))  # test('softmin', 0)
    test(lambda x: xt.softmax(x, 0))  # test('softmax', 0)
    test(lambda x: xt.log_softmax(x, 0))  # test('log_softmax', 0)


def test_masked_softmax_forward_with_nans():
    """torch._masked_softmax(input, mask, dim, mask_type) is documented by its own test
    helper as ``softmax(input.masked_fill(mask, -inf))``: ours computes the latter and
    is compared with ``torch._softmax`` of it outside the fully masked columns, which
    are NaN (the forward pass is expected to produce NaN's: dim=0 has only masked
    values there).  The ``.backward()`` half of the helper is left out."""
    dim = 0
    shapes = [(4, 5), (50, 100), (1500, 1200)]
    for (x, y) in shapes:
        for mask_type in [1, 2]:  # 1 = BxL => src_key_padding_mask
            input = torch.randn((x, y), requires_grad=True)
            mask = torch.tensor([i % 2 for i in range(y)]).expand((x, y)).bool()
            # _test_masked_softmax_helper(input, dim, mask, mask_type), forward:
            result = xt.softmax(input.detach().masked_fill(mask, float('-inf')), dim)
            expected = torch._softmax(input.detach().masked_fill(mask, float('-inf')), dim, False)
            mask_out = mask.all(dim, keepdim=True).expand(mask.shape)
            assert_equal(result.masked_fill(mask_out, 0), expected.masked_fill(mask_out, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.half], ids=["bfloat16", "half"])
def test_log_softmax_cpu(dtype):
    for dim in [0, 1]:
        inputf = torch.rand(200, 200, dtype=torch.float, requires_grad=True)
        input = inputf.to(dtype).detach().requires_grad_(True)
        outf = xt.log_softmax(inputf, dim)
        out = xt.log_softmax(input, dim)
        assert_equal(out, outf.to(dtype=dtype), atol=0.1, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.half], ids=["bfloat16", "half"])
def test_softmax_cpu(dtype):
    for dim in [0, 1]:
        inputf = torch.rand(200, 200, dtype=torch.float, requires_grad=True)
        input = inputf.to(dtype).detach().requires_grad_(True)
        outf = xt.softmax(inputf, dim)
        out = xt.softmax(input, dim)
        assert_equal(out, outf.to(dtype), atol=1e-3, rtol=0)


@pytest.mark.parametrize("fn, ours", [(F.softmax, xt.softmax), (F.log_softmax, xt.log_softmax)],
                         ids=["softmax", "log_softmax"])
def test_softmax_results(fn, ours):
    """@dtypes(torch.float) on CPU: ours against PyTorch on the CPU (upstream's
    reference device), sliced (non-zero shift) inputs included; one case per function
    of upstream's loop."""
    dtype = torch.float
    # Non-even sizes and non-zero shifts test fallback paths in vectorized kernel
    # Note: dim1 > 1024 is needed to exercise the vectorized (non-persistent) path, (16, 30576) is BERT-esque
    sizes = [(0, 10), (32, 20), (10, 0), (31, 20), (32, 21), (31, 23), (32, 1536), (31, 2048), (33, 2049), (16, 30576)]
    shifts = [(0, 0), (1, 0), (0, 1), (1, 1)]
    for size in sizes:
        for shift in shifts:
            input = torch.rand(size, dtype=dtype)
            input = input[shift[0]:, shift[1]:]
            ref_input = input.clone().cpu().detach()
            for dim in [0, 1]:
                ref_output = fn(ref_input, dtype=torch.float, dim=dim)
                output = ours(input, dim)
                grad_output = torch.rand(size, dtype=dtype)  # noqa: F841 (upstream's RNG stream)
                assert_equal(output, ref_output)


def test_softmax_double():
    """Upstream @onlyCUDA; its forward check is a value property: exp(log_softmax)
    sums to one in float64."""
    logits = torch.randn(5, 513, dtype=torch.double)
    expected_ones = xt.log_softmax(logits, 1).exp().sum(dim=1)
    assert_equal(expected_ones, torch.ones_like(expected_ones))


def test_log_softmax_big():
    """@dtypes(torch.float): log_softmax is shift-invariant at an offset of 1e7."""
    dtype = torch.float

    def _test_helper(shape):
        # generate a tensor with big numbers that are exactly representable in dtype
        # and are at a constant offset from tensor with small numbers
        # the logsoftmax of a small and big tensors should be equal
        x_small = torch.randint(100, shape, dtype=dtype)
        offset = 1.5e3 if dtype == torch.half else 1e7
        x_big = x_small + offset
        assert_equal(xt.log_softmax(x_small, -1), xt.log_softmax(x_big, -1))
    _test_helper((16, 4))
