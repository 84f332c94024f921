"""``torch.nn.functional.cross_entropy``, ``softmax`` and ``log_softmax`` computed by
xentfast on the tensors' NumPy arrays: what PyTorch's own tests call where they call
PyTorch.

PyTorch's layout puts the classes on dimension 1 of ``(N, C, d1, ...)`` and on
dimension 0 of an unbatched ``(C,)`` input; xentfast takes the class axis as
``axis``, so the mapping is ``axis = 0 if input.dim() == 1 else 1``.  Tensors go in
(bfloat16 through ``ml_dtypes``, the same 16 bits), tensors come out.

``cross_entropy_and_grad`` returns what ``loss.backward(grad_output)`` leaves in
``input.grad``.  Row ``r``'s loss depends on row ``r``'s logits only, so with
``G = xentfast's gradient of sum_r loss_r`` (``reduction="none"``) the gradient of
``sum_r g_r * loss_r`` is ``g_r * G_r``: ``grad_output`` broadcast along the class
axis.  For ``"mean"``/``"sum"`` the loss is a scalar and the gradient is
``g * d(loss)/d(input)``.

``load_torch_testing`` imports ``torch.testing._internal`` modules (PyTorch's
reference functions and sample databases) on installs without ``expecttest``: that
package only supplies the base class of PyTorch's ``TestCase``, which these tests do
not use.
"""

from __future__ import annotations

import importlib
import sys
import types
import unittest

import numpy as np
import torch

import xentfast

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - ml_dtypes comes with the peer libraries
    ml_dtypes = None


def load_torch_testing(name: str):
    """``torch.testing._internal.<name>``.

    ``common_utils`` does ``import expecttest`` for ``expecttest.TestCase`` only; when
    the package is absent a module holding ``TestCase = unittest.TestCase`` stands in.
    """
    try:
        importlib.import_module("expecttest")
    except ImportError:
        stand_in = types.ModuleType("expecttest")
        stand_in.TestCase = unittest.TestCase
        sys.modules["expecttest"] = stand_in
    return importlib.import_module(f"torch.testing._internal.{name}")


# ---------------------------------------------------------------- tensors <-> arrays


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values as a NumPy array of the same dtype (bfloat16 as ml_dtypes')."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        if ml_dtypes is None:  # pragma: no cover
            raise RuntimeError("bfloat16 tensors need ml_dtypes")
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def to_torch(array) -> torch.Tensor:
    """A NumPy array or scalar as a tensor of the same dtype (a copy: xentfast may hand
    back read-only arrays, which ``torch.from_numpy`` would warn about)."""
    array = np.array(array, copy=True)
    if ml_dtypes is not None and array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def class_axis(input: torch.Tensor) -> int:
    """PyTorch's class dimension: 0 for an unbatched ``(C,)`` input, else 1."""
    return 0 if input.dim() == 1 else 1


# ------------------------------------------------------------------------ functions


def _options(input, target, weight, ignore_index, reduction, label_smoothing):
    return dict(
        logits=to_numpy(input),
        labels=to_numpy(target),
        axis=class_axis(input),
        weight=None if weight is None else to_numpy(weight),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0) -> torch.Tensor:
    """``F.cross_entropy(input, target, weight, ignore_index=..., reduction=...,
    label_smoothing=...)`` by ``xentfast.cross_entropy``."""
    options = _options(input, target, weight, ignore_index, reduction, label_smoothing)
    return to_torch(xentfast.cross_entropy(options.pop("logits"), options.pop("labels"),
                                           **options))


def cross_entropy_and_grad(input, target, weight=None, ignore_index=-100, reduction="mean",
                           label_smoothing=0.0, grad_output=None):
    """``(loss, input.grad)`` after ``loss.backward(grad_output)``, by
    ``xentfast.cross_entropy_with_grad``; ``grad_output`` defaults to ones (for
    ``reduction="none"``: the gradient of the summed losses)."""
    options = _options(input, target, weight, ignore_index, reduction, label_smoothing)
    loss, grad = xentfast.cross_entropy_with_grad(options.pop("logits"),
                                                  options.pop("labels"), **options)
    loss, grad = to_torch(loss), to_torch(grad)
    if grad_output is not None:
        g = grad_output.to(grad.dtype)
        if reduction == "none":
            # d(sum_r g_r loss_r)/dx_r = g_r dloss_r/dx_r: g broadcast along the classes.
            g = g.unsqueeze(class_axis(input))
        grad = grad * g
    return loss, grad


def softmax(input: torch.Tensor, dim: int) -> torch.Tensor:
    """``F.softmax(input, dim)`` by ``xentfast.softmax``."""
    return to_torch(xentfast.softmax(to_numpy(input), axis=dim))


def log_softmax(input: torch.Tensor, dim: int) -> torch.Tensor:
    """``F.log_softmax(input, dim)`` by ``xentfast.log_softmax``."""
    return to_torch(xentfast.log_softmax(to_numpy(input), axis=dim))
