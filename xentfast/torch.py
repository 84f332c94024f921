"""xentfast inside PyTorch: ``torch.nn.functional.cross_entropy`` on the fused kernels.

``cross_entropy`` has exactly ``F.cross_entropy``'s signature and semantics (class
dimension 1 for ``(N, C, d1, ...)``, unbatched ``(C,)`` input, index and probability
targets, ``weight``, ``ignore_index``, ``label_smoothing``, the deprecated
``size_average``/``reduce``), plus ``z_loss`` and ``inplace_backward``.  The
differences are xentfast's documented ones (README, "Semantics"): ``reduction="mean"``
with every target ignored gives 0 (not NaN), a class index outside ``[0, C)`` that is
not ``ignore_index`` raises ``ValueError``, class weights must be finite.
``CrossEntropyLoss`` is ``torch.nn.CrossEntropyLoss`` (a subclass of it) on top.

How the gradient is made
------------------------
When ``input.requires_grad`` (and grad mode is on) the forward runs xentfast's fused
loss+grad kernel once and keeps ``g = d loss / d input``; the backward only scales it:

    mean, sum:  d input = grad_output * g              (grad_output a scalar)
    none:       d input = grad_output[:, None, ...] * g
                (loss_i's gradient lives in row i only, so scaling row i by
                grad_output_i is the exact vector-Jacobian product)

and when ``grad_output`` is all ones (``loss.backward()``) ``g`` itself is the
gradient: no multiplication, no copy.  ``.backward()`` stores it in ``.grad`` (autograd
copies it only while a retained graph still holds it); ``torch.autograd.grad(...,
retain_graph=True)`` returns that same memory, so clone the result before changing it
in place (``clamp_``): the retained graph's next backward would otherwise raise (it
sees its saved ``g`` modified), where ``F.cross_entropy`` hands out a fresh tensor.  Without ``requires_grad`` (evaluation,
``torch.no_grad()``) the loss-only kernel runs and no gradient memory exists.
``inplace_backward=True`` writes ``g`` into the input's own storage (xentfast's
``inplace=True``): no gradient memory at all, and the input's values are gone after the
call (its version counter is bumped, so autograd refuses any other use of them).
The saved ``g`` is itself an output of the autograd node (unused by the caller), so
second derivatives work too (``create_graph=True``, ``gradgradcheck``): differentiating
``grad_output * g`` reaches the node again, whose backward then returns the
Hessian-vector product computed from ``g`` alone (``xentfast._second_order``: per row
``g = K p - b`` with ``b`` the target weights, so ``p = (g + b) / K``), with no logits
kept for it.

What the fused kernels cannot serve -- ``torch.func`` transforms (``grad``, ``vmap``,
``jvp``, ``hessian``, per-sample gradients), forward-mode AD (dual tensors), gradients
with respect to probability targets -- runs the same formulas written with PyTorch's
differentiable operators (``_composite_cross_entropy``): the same semantics, PyTorch's
speed and rounding.  ``linear_cross_entropy`` does the same under torch.func and
forward-mode AD (the logits are then made); its double backward is refused.

The PyTorch operators
---------------------
``xentfast::cross_entropy_fwd(input, target, weight?, ignore_index, reduction,
label_smoothing, z_loss) -> (loss, grad)`` (with an autograd formula) and
``xentfast::cross_entropy_loss(...) -> loss``, registered with ``torch.library`` (fake
implementations included), so ``torch.compile(model, fullgraph=True)`` keeps them in
its graph and ``torch.export`` shows one ``xentfast`` operator.  Eager calls on plain
tensors run the same implementation through a ``torch.autograd.Function`` instead of
the dispatcher (whose Python round trip costs about 80 us a call); traced and compiled
code always meets the operators.

Memory and devices
------------------
float32 and float64 CPU tensors reach the host kernels through their own memory
(``tensor.numpy()``: no copy; non-contiguous strides go to xentfast as they are), and
the loss and gradient come back through ``torch.from_numpy`` (no copy; a gradient that
``loss.backward()`` stores in a leaf's ``.grad`` is that memory too).  The host kernels
compute 16-bit input in float32.  The ``cpu`` and ``cython`` backends read float16 and
bfloat16 natively (the bits widened in registers, the gradient rounded once into the
input's dtype): 16-bit tensors with index targets go to them as their raw bits (a
uint16 view, no copy, no ml_dtypes).  Otherwise (probability targets, the ``numpy``
backend) PyTorch converts them (on its threads) into float32 staging memory, at most
1 GiB at a time, which the kernel overwrites with the gradient and PyTorch rounds once
into the output.  Large buffers come from xentfast's cache of dropped ones, so a
training loop does not page-fault fresh memory every step.  CUDA tensors go to
xentfast's ``cuda`` backend through ``__cuda_array_interface__``; the kernels run on
the legacy default stream, ordered against PyTorch's current stream by stream waits
both ways (CUDA bfloat16 is computed from a float32 copy: PyTorch exports no bfloat16
array interface).

Threads: the host kernels run on their own pool (Numba's OpenMP or TBB layer for
``cpu``, OpenMP for ``cython``), which takes turns with PyTorch's intra-op pool: one
loss call is one parallel region between PyTorch's, and a training step measured the
same loss time inside the step as alone.  A call uses at most
``torch.get_num_threads()`` threads of the ``cpu`` or ``cython`` backend (set for the
calling thread only, then restored), so ``torch.set_num_threads(k)`` caps both.
"""

import math
from typing import Optional

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "xentfast.torch needs PyTorch, which is not installed: pip install torch "
        "(xentfast itself works without it)"
    ) from exc

import numpy as np

import xentfast as _xf
from . import _api, _arrays, _buffers, _dispatch, _linear, _second_order, _validate

__all__ = ["CrossEntropyLoss", "cross_entropy", "linear_cross_entropy"]

Tensor = torch.Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_NO_ML_DTYPES = object()
_bfloat16_numpy = None  # ml_dtypes.bfloat16, _NO_ML_DTYPES, or None before the first look


def _ml_bfloat16():
    """``ml_dtypes.bfloat16`` when ml_dtypes is installed, else None (imported once);
    only error messages use it, to name a bfloat16 target's dtype."""
    global _bfloat16_numpy
    if _bfloat16_numpy is None:
        try:
            import ml_dtypes
        except ImportError:
            _bfloat16_numpy = _NO_ML_DTYPES
        else:
            _bfloat16_numpy = np.dtype(ml_dtypes.bfloat16)
    return None if _bfloat16_numpy is _NO_ML_DTYPES else _bfloat16_numpy


# ------------------------------------------------------------------ metadata checks


def _class_dim(ndim: int) -> int:
    """PyTorch's class dimension: 1 for (N, C, d1, ...), 0 for unbatched (C,)."""
    return 1 if ndim >= 2 else 0


def _np_dtype_for_checks(dtype: torch.dtype) -> np.dtype:
    """A NumPy dtype of the same kind, so that xentfast's checks word the messages."""
    if dtype == torch.bfloat16:
        return _ml_bfloat16() or np.dtype(np.float32)
    if dtype == torch.bool:
        return np.dtype(np.bool_)
    if dtype.is_complex:
        return np.dtype(np.complex64)
    try:
        return np.dtype(str(dtype).replace("torch.", ""))
    except TypeError:  # quantized and other exotic dtypes
        return np.dtype(object)


def _check_float_input(dtype: torch.dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        hint = ""
        if not dtype.is_floating_point and not dtype.is_complex:
            hint = "; cast it first, e.g. input.float()"
        elif dtype.is_complex:
            hint = "; cross-entropy is defined for real logits only (take .real if intended)"
        raise TypeError(
            "input must be a floating-point tensor (float16, bfloat16, float32, float64); "
            f"got dtype {dtype}{hint}"
        )


def _check_call(input, target, weight, reduction, ignore_index, label_smoothing, z_loss):
    """Checks on metadata only (shapes, dtypes, devices, options), in xentfast's words;
    they hold for fake tensors too.  Returns (class dim, "sparse" or "dense")."""
    for name, value in (("input", input), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None; got {type(weight).__name__}")
    _validate.check_reduction(reduction)
    _validate.check_ignore_index(ignore_index)
    _validate.check_fraction(label_smoothing, "label_smoothing")
    _validate.check_nonnegative(z_loss, "z_loss")
    _check_float_input(input.dtype)
    shape = tuple(input.shape)
    _validate.check_ndim(shape, "logits")
    cdim = _class_dim(len(shape))
    _validate.check_classes(shape[cdim], shape, cdim)
    kind = _validate.label_kind(_np_dtype_for_checks(target.dtype), tuple(target.shape),
                                shape, cdim)
    if kind == "dense":
        _validate.check_no_ignore_index_for_probabilities(int(ignore_index))
    _check_devices(input, target, weight)
    if weight is not None:
        _validate.check_weight_dtype(_np_dtype_for_checks(weight.dtype))
        _validate.check_weight_shape(tuple(weight.shape), shape[cdim])
    return cdim, kind


def _check_devices(input, target, weight) -> None:
    for name, value in (("target", target), ("weight", weight)):
        if value is not None and value.device != input.device:
            raise ValueError(
                f"{name} is on {value.device} but input is on {input.device}; put them on "
                f"one device, e.g. {name}.to(input.device)"
            )


def _check_no_grad_wanted(weight) -> None:
    """Class weights are constants, as in PyTorch (whose nll_loss has no derivative for
    them either)."""
    if torch.is_grad_enabled() and weight is not None and weight.requires_grad:
        raise RuntimeError(
            "xentfast.torch differentiates with respect to the logits (or the linear "
            "layer's input and parameters) and probability targets, not class weights, "
            "but weight requires grad; pass weight.detach()"
        )


def _loss_dtype(input, target, kind: str) -> torch.dtype:
    """The loss's dtype: the input's; PyTorch promotes it with probability targets."""
    if kind == "dense" and target.dtype != input.dtype:
        return torch.promote_types(input.dtype, target.dtype)
    return input.dtype


def _batch_shape(shape, cdim: int) -> tuple:
    return tuple(shape[:cdim]) + tuple(shape[cdim + 1:])


def _empty_grad_like(input, cdim: int) -> Tensor:
    """The gradient's layout, as xentfast returns it: class dimension innermost in
    memory (plain row-major for (N, C) and (C,))."""
    shape = tuple(input.shape)
    return input.new_empty(_batch_shape(shape, cdim) + (shape[cdim],)).movedim(-1, cdim)


def _empty_loss_like(input, target, cdim, kind, reduction) -> Tensor:
    dtype = _loss_dtype(input, target, kind)
    shape = _batch_shape(tuple(input.shape), cdim) if reduction == "none" else ()
    return input.new_empty(shape, dtype=dtype)


# ------------------------------------------------------------------ the computation


def _host_tensor(a) -> Tensor:
    """``torch.from_numpy`` (no copy) of an array or a NumPy scalar."""
    return torch.from_numpy(np.asarray(a))


def _staging_buffer(shape, cdim: int, dtype) -> tuple:
    """Uninitialised (tensor, array) views of one buffer from xentfast's buffer cache
    (dropped large buffers are reused: no page faults), with ``shape`` and the class
    dimension ``cdim`` innermost in memory (the layout the kernels read without a copy
    and the gradient's layout)."""
    batch = _batch_shape(shape, cdim)
    array = _buffers.HOST_CACHE.empty(batch + (shape[cdim],), dtype)
    if dtype == np.int16:  # bfloat16 bits
        tensor = torch.from_numpy(array).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor.movedim(-1, cdim), np.moveaxis(array, -1, cdim)


#: The most threads each host backend may use, read on its first capped call: while
#: PyTorch's count is at least this, no call needs a cap (decided without asking).
_backend_max_threads: dict = {}


def _thread_controls(name: str):
    """(get, set, ceiling) of the calling thread's thread cap for host backend ``name``
    (ceiling: the most threads it can ever use), or None for a backend without threads
    (``numpy``)."""
    if name == "cpu":
        import numba

        return numba.get_num_threads, numba.set_num_threads, numba.config.NUMBA_NUM_THREADS
    if name == "cython":
        kernels = _dispatch.load("cython")
        return kernels.max_threads, kernels.set_max_threads, kernels.max_threads()
    return None


def _thread_cap():
    """(set, previous count) when this call must run on fewer threads than its backend
    would use (PyTorch's ``get_num_threads()``, when lower), else None."""
    wanted = torch.get_num_threads()
    name = _dispatch.resolve(None, False)
    known = _backend_max_threads.get(name)
    if known is not None and wanted >= known:
        return None  # the common case
    controls = _thread_controls(name)
    if controls is None:
        _backend_max_threads[name] = 1
        return None
    get, set_, ceiling = controls
    _backend_max_threads.setdefault(name, ceiling)
    current = get()
    return (set_, current) if wanted < current else None


def _with_thread_cap(run):
    """``run()`` on at most ``torch.get_num_threads()`` threads of the host backend
    (Numba's for ``cpu``, OpenMP's for ``cython``; set for the calling thread only)."""
    cap = _thread_cap()
    if cap is None:
        return run()
    set_, previous = cap
    set_(torch.get_num_threads())
    try:
        return run()
    finally:
        set_(previous)


def _host_call(x, y, w, cdim, ignore_index, reduction, label_smoothing, z_loss, want_grad,
               inplace):
    kwargs = dict(axis=cdim, weight=w, ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing, z_loss=z_loss)
    if want_grad:
        return _with_thread_cap(
            lambda: _xf.cross_entropy_with_grad(x, y, inplace=inplace, **kwargs))
    return _with_thread_cap(lambda: _xf.cross_entropy(x, y, **kwargs)), None


def _check_target_dtype(input, target, cdim: int) -> None:
    """PyTorch's reading of ``target``, with the fix in PyTorch's terms: class indices
    (the input's shape without the class dimension) must be an integer tensor,
    probabilities (the input's shape) a floating one."""
    shape, batch = tuple(target.shape), tuple(input.shape[:cdim] + input.shape[cdim + 1:])
    if target.dtype.is_floating_point and shape == batch and shape != tuple(input.shape):
        raise TypeError(
            f"target of shape {shape} holds class indices (the input's shape without its "
            f"class dimension), so it must be an integer tensor; got {target.dtype}. "
            "Cast it with target.long(), or pass class probabilities of the input's "
            f"shape {tuple(input.shape)}")
    if target.dtype == torch.bool or (not target.dtype.is_floating_point
                                      and shape == tuple(input.shape) and shape != batch):
        raise TypeError(
            f"target of dtype {target.dtype} and shape {shape}: class indices must be an "
            f"integer tensor of shape {batch}, class probabilities a floating tensor of "
            f"shape {tuple(input.shape)}. Cast one-hot rows with target.float(), or pass "
            f"indices with target.argmax(dim={cdim})")


def _compute(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
             want_grad: bool, inplace: bool = False):
    """Loss (a tensor) and, with ``want_grad``, d loss / d input (else None).

    ``inplace``: the gradient is written into ``input``'s storage and returned as a
    tensor aliasing it."""
    cdim = _class_dim(input.dim())
    _check_target_dtype(input, target, cdim)
    kind = "dense" if target.dtype.is_floating_point else "sparse"
    loss_dtype = _loss_dtype(input, target, kind)
    if input.device.type == "cuda":
        loss, grad = _compute_cuda(input, target, weight, cdim, ignore_index, reduction,
                                   label_smoothing, z_loss, want_grad, inplace)
    elif input.device.type == "cpu":
        loss, grad = _compute_host(input, target, weight, cdim, ignore_index, reduction,
                                   label_smoothing, z_loss, want_grad, inplace)
    else:
        raise ValueError(
            f"xentfast.torch runs on CPU and CUDA tensors; got a tensor on {input.device}. "
            "Move it with .cpu() or .cuda(), or use torch.nn.functional.cross_entropy"
        )
    if loss.dtype != loss_dtype:
        loss = loss.to(loss_dtype)
    return loss, grad


def _compute_host(input, target, weight, cdim, ignore_index, reduction, label_smoothing,
                  z_loss, want_grad, inplace):
    if input.dtype in _HALF_DTYPES and _reads_half_natively(input.dtype, target):
        return _compute_host_half_bits(input, target, weight, cdim, ignore_index, reduction,
                                       label_smoothing, z_loss, want_grad, inplace)
    if input.dtype in _HALF_DTYPES:
        return _compute_host_16bit(input, target, weight, cdim, ignore_index, reduction,
                                   label_smoothing, z_loss, want_grad, inplace)
    x = input.detach().numpy()
    if target.dtype in _HALF_DTYPES:  # 16-bit probabilities
        y = target.detach().float().numpy()
    else:
        y = target.detach().numpy()
    w = None if weight is None else _weight_array(weight)
    loss, grad = _host_call(x, y, w, cdim, ignore_index, reduction, label_smoothing, z_loss,
                            want_grad, inplace)
    loss_t = _host_tensor(loss)  # a NumPy scalar for "mean" and "sum"
    if grad is None:
        return loss_t, None
    return loss_t, (input.detach() if inplace else _host_tensor(grad))


def _reads_half_natively(dtype: torch.dtype, target) -> bool:
    """Index targets, and a default host backend that reads this 16-bit dtype natively."""
    if target.dtype.is_floating_point:
        return False
    kernels = _dispatch.load(_dispatch.resolve(None, False))
    return str(dtype).replace("torch.", "") in getattr(kernels, "NATIVE_HALF", ())


def _compute_host_half_bits(input, target, weight, cdim, ignore_index, reduction,
                            label_smoothing, z_loss, want_grad, inplace):
    """float16/bfloat16 with index targets on a backend that reads 16-bit natively: the
    input's bits as a uint16 array (no copy), the loss in float32 (``_compute`` rounds it
    once to the input's dtype), the gradient written as the input's bits."""
    half = str(input.dtype).replace("torch.", "")
    bits = input.detach().view(torch.int16).numpy().view(np.uint16)
    w = None if weight is None else _weight_array(weight)
    kwargs = dict(axis=cdim, weight=w, ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing, z_loss=z_loss, half_bits=half)
    result = _with_thread_cap(
        lambda: _api._cross_entropy(bits, target.detach().numpy(), want_grad=want_grad,
                                    inplace=inplace and want_grad, backend=None, **kwargs))
    loss, grad = result if want_grad else (result, None)
    loss_t = _host_tensor(loss)
    if grad is None:
        return loss_t, None
    if inplace:
        return loss_t, input.detach()
    return loss_t, torch.from_numpy(grad.view(np.int16)).view(input.dtype)


def _numpy_dtype(dtype: torch.dtype):
    """The NumPy dtype of a buffer holding ``dtype`` (bfloat16: its bits, int16)."""
    return np.int16 if dtype == torch.bfloat16 else _np_dtype_for_checks(dtype)


def _weight_array(weight) -> np.ndarray:
    weight = weight.detach()
    return (weight.float() if weight.dtype == torch.bfloat16 else weight).numpy()


#: Most float32 staging memory of a 16-bit call (1 GiB: with the 16-bit output it stays
#: within xentfast's default 2 GiB cache of reusable buffers).  Chunks stay large: each
#: one alternates between PyTorch's thread pool (the conversions) and xentfast's (the
#: kernel), and on busy cores every switch can wait a scheduler slice for a thread
#: (measured on 2 cores: 4 MiB chunks 5-10x slower than one chunk), and a chunked
#: "mean" costs one more pass (the scaling).
_STAGING_BYTES = 1 << 30


def _compute_host_16bit(input, target, weight, cdim, ignore_index, reduction,
                        label_smoothing, z_loss, want_grad, inplace):
    """float16 and bfloat16 on the host, whose kernels compute in float32 (the rule for
    16-bit input), through float32 staging memory of at most ``_STAGING_BYTES``:

    1. per chunk of leading-dimension slices (usually one chunk: the whole input),
       PyTorch converts the input (and probability targets) into the float32 staging
       buffer, one pass on its threads;
    2. the kernel overwrites the buffer with the gradient (xentfast's ``inplace=True``);
    3. PyTorch rounds it once into the 16-bit output (or into the input itself, for
       ``inplace``).

    With several chunks the kernel returns per-row losses ("none") and the gradient of
    their sum; the whole call's facts come first -- the labels checked at once (errors
    name positions in the whole target) and the "mean" denominator D, as xentfast
    forms it (sum of weight[label] over kept rows, their count without weights, the row
    count for probabilities) -- then each chunk's gradient is scaled by 1/D before the
    rounding, and the loss is the float64 sum of the per-row losses (times 1/D).

    The staging buffers come from xentfast's cache of dropped buffers (no page faults
    step after step).  (NumPy's casts, which xentfast's NumPy-level call uses for
    16-bit arrays, run on one thread over whole float32 copies, and its float32 ->
    float16 cast signals each result that underflows -- most gradient elements --
    through the floating-point status: 2x (bfloat16) and 50x (float16) slower measured
    on 65536 x 1000.)"""
    _, kind = _check_call(input, target, weight, reduction, ignore_index, label_smoothing,
                          z_loss)
    shape = tuple(input.shape)
    batch_shape = _batch_shape(shape, cdim)
    c = shape[cdim]
    x_in, t_in = input.detach(), target.detach()
    w = None if weight is None else _weight_array(weight)
    y_all = t_in.numpy() if kind == "sparse" else None

    # Chunks of the leading dimension (N; the unbatched (C,) input is one chunk).
    lead = shape[0] if len(shape) >= 2 else 1
    per_lead = math.prod(shape[1:]) if len(shape) >= 2 else c
    step = max(1, min(lead, _STAGING_BYTES // max(4 * per_lead, 1)))
    chunked = step < lead
    chunk_reduction, scale = reduction, 1.0
    if chunked:
        chunk_reduction = "none"
        w32 = _arrays.HOST.weight_vector(w, c, np.float32)  # xentfast's, for 16-bit input
        if kind == "sparse":
            y_rows = _arrays.HOST.label_rows(y_all)
            kept = _arrays.HOST.check_labels(y_rows, batch_shape, c, ignore_index)
        if reduction == "mean":
            if kind == "sparse":
                denominator = _arrays.HOST.kept_weight_total(y_rows, w32, ignore_index, kept)
            else:
                denominator = float(math.prod(batch_shape))
            scale = 1.0 / denominator if denominator != 0 else 0.0

    chunk_shape = ((step,) + shape[1:]) if len(shape) >= 2 else shape
    staged, staged_np = _staging_buffer(chunk_shape, cdim, np.float32)
    if kind == "dense":
        staged_t, staged_t_np = _staging_buffer(chunk_shape, cdim, np.float32)
    grad = None
    if want_grad:
        grad = x_in if inplace else _staging_buffer(
            shape, cdim, np.int16 if input.dtype == torch.bfloat16 else np.float16)[0]
    losses = []
    for first in range(0, max(lead, 1), step):
        if len(shape) >= 2:
            part, rows = slice(first, min(first + step, lead)), min(step, lead - first)
        else:
            part, rows = slice(None), None
        x_chunk, x_np = staged[:rows], staged_np[:rows]
        x_chunk.copy_(x_in[part])
        if kind == "dense":
            staged_t[:rows].copy_(t_in[part])
            y = staged_t_np[:rows]
        else:
            y = y_all[part]
        loss, _ = _host_call(x_np, y, w, cdim, ignore_index, chunk_reduction,
                             label_smoothing, z_loss, want_grad, inplace=want_grad)
        losses.append(loss)
        if want_grad:  # the float32 gradient, rounded once
            if scale != 1.0:  # (torch.mul(..., out=) a 16-bit tensor is 4x slower)
                x_chunk.mul_(scale)
            grad[part].copy_(x_chunk)
    if not chunked:  # xentfast's own result: float32, rounded once by _compute
        return _host_tensor(losses[0]), grad
    per_row = np.concatenate(losses)
    if reduction == "none":
        return torch.from_numpy(per_row), grad
    total = float(np.sum(per_row.reshape(-1), dtype=np.float64))
    return torch.tensor(total * scale if reduction == "mean" else total,
                        dtype=torch.float64), grad


def _compute_upcast(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                    want_grad, inplace):
    """bfloat16 on CUDA (no array interface for it): float32 in, results rounded once."""
    x32 = input.detach().float()
    t32 = target.detach().float() if target.dtype == torch.bfloat16 else target
    loss, grad = _compute(x32, t32, weight, ignore_index, reduction, label_smoothing,
                          z_loss, want_grad, inplace=False)
    # The loss stays float32: _compute rounds it once to the loss's dtype.
    if grad is not None:
        if inplace:
            alias = input.detach()
            alias.copy_(grad)
            grad = alias
        else:
            grad = grad.to(input.dtype)
    return loss, grad


def _compute_cuda(input, target, weight, cdim, ignore_index, reduction, label_smoothing,
                  z_loss, want_grad, inplace):
    if input.dtype == torch.bfloat16:
        return _compute_upcast(input, target, weight, ignore_index, reduction,
                               label_smoothing, z_loss, want_grad, inplace)
    from numba import cuda

    device = input.device
    current = torch.cuda.current_stream(device)
    default = torch.cuda.default_stream(device)
    side_stream = current != default
    if side_stream:  # xentfast launches on the legacy default stream
        default.wait_stream(current)
    x = input.detach()
    y = target.detach()
    w = None if weight is None else weight.detach()
    if w is not None and w.dtype == torch.bfloat16:
        w = w.float()
    kwargs = dict(axis=cdim, weight=w, ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing, z_loss=z_loss, backend="cuda")
    with cuda.gpus[device.index if device.index is not None else torch.cuda.current_device()]:
        if want_grad:
            loss, grad = _xf.cross_entropy_with_grad(x, y, inplace=inplace, **kwargs)
        else:
            loss, grad = _xf.cross_entropy(x, y, **kwargs), None
    if side_stream:
        current.wait_stream(default)
    loss_t = torch.as_tensor(loss, device=device)
    if grad is None:
        return loss_t, None
    return loss_t, (x if inplace else torch.as_tensor(grad, device=device))


# ------------------------------------------------------------------ backward


def _is_plain(t) -> bool:
    """A real tensor in eager mode (not a fake, functional, traced or torch.func-wrapped
    one: those have no single value to look at)."""
    return (type(t) is Tensor and not torch.compiler.is_compiling()
            and not _is_transformed(t))


def _is_transformed(t) -> bool:
    """A torch.func-wrapped tensor, or a batched one of autograd's own vmap
    (``is_grads_batched=True``, batched gradient checks)."""
    return (torch._C._functorch.is_functorch_wrapped_tensor(t)
            or torch._C._functorch.is_legacy_batchedtensor(t))


def _scale_grad(grad: Tensor, grad_loss: Optional[Tensor], reduction: str, cdim: int):
    """The vector-Jacobian product: g scaled by grad_output (see the module docstring)."""
    if grad_loss is None:
        return None
    if reduction == "none":
        if _is_plain(grad_loss) and bool((grad_loss == 1).all()):
            return grad
        factor = grad_loss.unsqueeze(cdim).to(grad.dtype)
        if (_is_plain(grad) and _is_plain(grad_loss) and grad.device.type == "cpu"
                and grad.dim() >= 1):
            # Keras and per-token weighting land here with every step's gradient: the
            # product goes into a reused buffer (a fresh one page-faults its memory, as
            # costly as the multiplication), on PyTorch's threads.
            out = _staging_buffer(tuple(grad.shape), cdim, _numpy_dtype(grad.dtype))[0]
            return torch.mul(grad, factor, out=out)
        return grad * factor
    if _is_plain(grad_loss) and grad_loss.item() == 1.0:
        return grad
    return grad * grad_loss.to(grad.dtype)


def _second_derivative_error() -> RuntimeError:
    return RuntimeError(
        "xentfast.torch.cross_entropy has no second derivative here: the gradient was "
        "written over the logits (inplace_backward=True), or the call went through the "
        "compiled operator (torch.compile), whose backward scales a gradient computed in "
        "the forward pass; create_graph=True (double backward) is refused. Call it eagerly "
        "without inplace_backward for gradients of gradients"
    )


def _backward(ctx, grad_loss):
    """The input's gradient; refuses to build a graph of it (create_graph=True), since
    the saved gradient would enter that graph as a constant: a wrong second derivative."""
    if torch.is_grad_enabled() and _is_plain(grad_loss):
        raise _second_derivative_error()
    (grad,) = ctx.saved_tensors
    return _scale_grad(grad, grad_loss, ctx.reduction, ctx.cdim)


def _target_weights(target, weight, cdim, num_classes, ignore_index, label_smoothing,
                    z_loss, reduction, dtype):
    """Per row, class dimension last: ``b`` with ``g = K p - b`` (the targets' weights
    times the reduction's scale) and ``z' = z * scale`` (0 on ignored rows), where the
    fused kernels' gradient of a row is ``g = (sum_j b_j + 2 z' lse) p - b``."""
    w = (torch.ones(num_classes, dtype=dtype, device=target.device) if weight is None
         else weight.detach().to(dtype))
    eps = float(label_smoothing)
    if target.dtype.is_floating_point:                  # probabilities
        t = target.detach().movedim(cdim, -1).to(dtype)
        b = w * ((1 - eps) * t + eps / num_classes)
        kept = torch.ones(t.shape[:-1], dtype=torch.bool, device=t.device)
        den = torch.tensor(float(kept.numel()), dtype=dtype, device=t.device)
    else:
        kept = target != ignore_index
        y = torch.where(kept, target, 0).long()
        w_y = torch.where(kept, w[y], 0)
        onehot = torch.zeros(y.shape + (num_classes,), dtype=dtype, device=y.device)
        onehot.scatter_(-1, y.unsqueeze(-1), 1)
        b = (1 - eps) * w_y.unsqueeze(-1) * onehot + kept.unsqueeze(-1) * (eps / num_classes * w)
        den = w_y.sum()
    if reduction == "mean":
        scale = torch.where(den != 0, 1 / torch.where(den != 0, den, 1), 0)
    else:
        scale = torch.ones((), dtype=dtype, device=b.device)
    return b * scale, torch.where(kept, z_loss * scale, 0)


def _hessian_product(ctx, grad, v):
    """H v, H = d g / d input, from the saved gradient ``g`` alone: the formula of
    ``xentfast._second_order`` (rows with the class dimension last)."""
    cdim = ctx.cdim
    dtype = torch.promote_types(grad.dtype, torch.float32)
    g = grad.movedim(cdim, -1).to(dtype)
    b, zs = _target_weights(ctx.target, ctx.weight, cdim, g.shape[-1], ctx.ignore_index,
                            ctx.label_smoothing, ctx.z_loss, ctx.reduction, dtype)
    hv = _second_order.hessian_vector_product(
        g, b, v.movedim(cdim, -1).to(dtype), 2 * zs.unsqueeze(-1),
        row_sum=lambda a: a.sum(-1, keepdim=True), where=torch.where)
    return hv.to(grad.dtype).movedim(-1, cdim)


def _versions(*tensors) -> tuple:
    return tuple(None if t is None else t._version for t in tensors)


class _FusedCrossEntropy(torch.autograd.Function):
    """Eager path: the forward keeps the fused gradient, the backward scales it.

    Outputs: the loss and ``g`` (the caller drops ``g``; it is an output so that a
    graph of the gradient, create_graph=True, leads back here for ``H v``).
    ``inplace``: the gradient overwrites the input's storage (no second output)."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                inplace):
        loss, grad = _compute(input, target, weight, ignore_index, reduction,
                              label_smoothing, z_loss, want_grad=True, inplace=inplace)
        ctx.set_materialize_grads(False)
        ctx.reduction, ctx.cdim, ctx.inplace = reduction, _class_dim(input.dim()), inplace
        if inplace:
            # The input's values are gone: whatever autograd saved of them is stale, and
            # the bump makes its backward raise instead of reading the gradient.
            torch.autograd.graph.increment_version(input)
            ctx.save_for_backward(grad)
            return loss, None
        # For H v only (never read by a first-order backward); plain references (target
        # and weight need no grad here), so a caller reusing its target buffer after the
        # forward breaks nothing.
        ctx.target, ctx.weight = target, weight
        ctx.ignore_index, ctx.label_smoothing, ctx.z_loss = ignore_index, label_smoothing, z_loss
        ctx.versions = _versions(target, weight)
        # Two handles on one memory: ``grad`` itself (no autograd history) is what a
        # first-order backward returns, as before (autograd steals it for .grad, or
        # copies it while a retained graph still holds it); the alias is the output
        # that leads a graph of the gradient back to this node.
        output = grad.view_as(grad)
        ctx.save_for_backward(grad, output)
        return loss, output

    @staticmethod
    def backward(ctx, grad_loss, grad_grad):
        grad, output = ctx.saved_tensors if not ctx.inplace else (ctx.saved_tensors[0], None)
        graph = torch.is_grad_enabled()
        if graph and ctx.inplace:
            raise _second_derivative_error()
        if grad_loss is None:
            result = None
        elif graph:  # create_graph=True: differentiable products of the output
            factor = grad_loss.unsqueeze(ctx.cdim) if ctx.reduction == "none" else grad_loss
            result = output * factor.to(output.dtype)
        else:
            result = _scale_grad(grad, grad_loss, ctx.reduction, ctx.cdim)
        if grad_grad is not None:
            if _versions(ctx.target, ctx.weight) != ctx.versions:
                raise RuntimeError(
                    "the target or weight of xentfast.torch.cross_entropy was modified in "
                    "place after the forward pass; its second derivative needs the "
                    "original values: modify a copy (.clone()) instead")
            hv = _hessian_product(ctx, output if graph else grad, grad_grad)
            result = hv if result is None else result + hv
        return (result, None, None, None, None, None, None, None)


def _needs_composite(input, target, weight) -> bool:
    """The calls the fused kernels cannot serve: a probability target that requires grad,
    and (eagerly) torch.func-transformed tensors or forward-mode dual tensors."""
    if torch.is_grad_enabled() and target.requires_grad:
        return True
    return _transformed_or_dual(input, target, weight)


def _transformed_or_dual(*tensors) -> bool:
    """Eagerly: a torch.func-transformed tensor, or a forward-mode dual tensor, among
    ``tensors`` (None entries skipped)."""
    forward_ad = torch.autograd.forward_ad._current_level >= 0
    if not (forward_ad or torch._C._are_functorch_transforms_active()):
        return False  # the common case, decided in two flag reads
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    present = [t for t in tensors if t is not None]
    if any(_is_transformed(t) for t in present):
        return True
    if forward_ad:
        unpack = torch.autograd.forward_ad.unpack_dual
        return any(unpack(t).tangent is not None for t in present)
    return False


def _composite_cross_entropy(input, target, weight, ignore_index, reduction,
                             label_smoothing, z_loss):
    """xentfast's loss from PyTorch's differentiable operators, for what
    ``_needs_composite`` names.  Per row, class dimension last (rowmath.py's terms):
        index target y (kept):  (1 - eps) w_y (-log p_y) + eps/C sum_j w_j (-log p_j)
        probabilities t:        sum_j w_j ((1 - eps) t_j + eps/C) (-log p_j)
    plus z lse^2 per kept row; "mean" divides by the sum of w_y over kept rows (the row
    count for probabilities) and is 0 when that is 0.  16-bit input is computed in
    float32, as the kernels compute it."""
    cdim, kind = _check_call(input, target, weight, reduction, ignore_index,
                             label_smoothing, z_loss)
    _check_target_dtype(input, target, cdim)
    dtype = torch.promote_types(_loss_dtype(input, target, kind), torch.float32)
    x = input.movedim(cdim, -1).to(dtype)
    num_classes = x.shape[-1]
    # (weight not detached: eagerly it cannot require grad here, and under torch.func
    # its derivatives -- mixed second ones included -- are then the true ones)
    w = None if weight is None else weight.to(dtype)
    if w is not None and _is_plain(w):
        _validate.check_weight_values(w.detach().cpu().numpy())
    eps = float(label_smoothing)
    kept = None if kind == "dense" else target != ignore_index
    if kept is not None:  # an ignored row is no function of its logits (NaN included)
        x = torch.where(kept.unsqueeze(-1), x, 0)
    lse = torch.logsumexp(x, dim=-1)
    neg_logp = lse.unsqueeze(-1) - x
    if kind == "dense":
        q = (1 - eps) * target.movedim(cdim, -1).to(dtype) + eps / num_classes
        wq = q if w is None else w * q
        # a class of weight 0 adds nothing, even at a -inf logit (not 0 * inf = NaN)
        rows = torch.where(wq == 0, 0, wq * neg_logp).sum(-1)
        den = float(rows.numel())
    else:
        _check_composite_labels(target, kept, num_classes, ignore_index)
        y = torch.where(kept, target, 0).long()
        w_y = torch.ones_like(lse) if w is None else w[y]
        rows = (1 - eps) * w_y * neg_logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if eps:
            rows = rows + eps / num_classes * (neg_logp if w is None else w * neg_logp).sum(-1)
        w_y = torch.where(kept, w_y, 0)
        den = w_y.sum()
    if z_loss:
        rows = rows + z_loss * lse * lse
    if kept is not None:
        rows = torch.where(kept, rows, 0)
    out_dtype = _loss_dtype(input, target, kind)
    if reduction == "none":
        return rows.to(out_dtype)
    total = rows.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    if isinstance(den, float):
        return (total / den if den else total * 0).to(out_dtype)
    return torch.where(den != 0, total / torch.where(den != 0, den, 1), 0).to(out_dtype)


def _check_composite_labels(target, kept, num_classes, ignore_index) -> None:
    """ValueError naming the first class index outside [0, C) that is not ignore_index
    (under vmap, where a tensor has no single truth value, gather raises instead)."""
    bad = kept & ((target < 0) | (target >= num_classes))
    try:
        any_bad = bool(bad.any())
    except RuntimeError:
        return
    if any_bad:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(_validate.out_of_range_message(int(target[first]), first,
                                                        num_classes, ignore_index))


# ------------------------------------------------------------------ the operators


@torch.library.custom_op("xentfast::cross_entropy_fwd", mutates_args=())
def _op_fwd(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
            reduction: str, label_smoothing: float, z_loss: float) -> tuple[Tensor, Tensor]:
    """Loss and d loss / d input in one fused pass (class dimension 1, or 0 for (C,))."""
    loss, grad = _compute(input, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, want_grad=True)
    return loss, grad


@torch.library.custom_op("xentfast::cross_entropy_loss", mutates_args=())
def _op_loss(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
             reduction: str, label_smoothing: float, z_loss: float) -> Tensor:
    """The loss alone (no gradient memory)."""
    loss, _ = _compute(input, target, weight, ignore_index, reduction, label_smoothing,
                       z_loss, want_grad=False)
    return loss


@_op_fwd.register_fake
def _op_fwd_fake(input, target, weight, ignore_index, reduction, label_smoothing, z_loss):
    cdim, kind = _check_call(input, target, weight, reduction, ignore_index,
                             label_smoothing, z_loss)
    return (_empty_loss_like(input, target, cdim, kind, reduction),
            _empty_grad_like(input, cdim))


@_op_loss.register_fake
def _op_loss_fake(input, target, weight, ignore_index, reduction, label_smoothing, z_loss):
    cdim, kind = _check_call(input, target, weight, reduction, ignore_index,
                             label_smoothing, z_loss)
    return _empty_loss_like(input, target, cdim, kind, reduction)


def _op_fwd_setup(ctx, inputs, output):
    input, _, _, _, reduction, _, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.reduction = reduction
    ctx.cdim = _class_dim(input.dim())


def _op_fwd_backward(ctx, grad_loss, grad_grad):
    # grad_grad: the gradient output is non-differentiable, so always None.
    return _backward(ctx, grad_loss), None, None, None, None, None, None


_op_fwd.register_autograd(_op_fwd_backward, setup_context=_op_fwd_setup)


def _op_loss_setup(ctx, inputs, output):
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss = inputs
    ctx.save_for_backward(input, target, weight)
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss)


def _op_loss_backward(ctx, grad_loss):
    """The loss-only operator differentiated by recomputing with the fused one (the
    Python wrapper never needs this: it picks cross_entropy_fwd when a gradient is
    wanted; direct callers of the operator get a correct gradient all the same)."""
    input, target, weight = ctx.saved_tensors
    ignore_index, reduction, label_smoothing, z_loss = ctx.options
    if torch.is_grad_enabled() and _is_plain(grad_loss):
        raise _second_derivative_error()
    _, grad = torch.ops.xentfast.cross_entropy_fwd(input.detach(), target, weight,
                                                   ignore_index, reduction,
                                                   label_smoothing, z_loss)
    return (_scale_grad(grad, grad_loss, reduction, _class_dim(input.dim())),
            None, None, None, None, None, None)


_op_loss.register_autograd(_op_loss_backward, setup_context=_op_loss_setup)


# ------------------------------------------------------------------ public API


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    inplace_backward: bool = False,
) -> Tensor:
    """Cross-entropy between logits and targets, as ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    input : Tensor
        Unnormalised logits, (N, C), (N, C, d1, ..., dK) or unbatched (C,); float16,
        bfloat16, float32 or float64; on the CPU or a CUDA device.
    target : Tensor
        Class indices (integers, the input's shape without the class dimension) or class
        probabilities (floats, the input's shape).
    weight : Tensor of shape (C,), optional
        Per-class rescaling weights (finite).
    size_average, reduce : bool, optional
        Deprecated; mapped to ``reduction`` exactly as PyTorch maps them (with its
        warning).
    ignore_index : int, default -100
        Index targets equal to it contribute neither loss nor gradient.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the sum of ``weight[target]`` over kept targets (the number
        of rows for probability targets); with no kept target the mean is 0, not NaN.
    label_smoothing : float in [0, 1], default 0
        Mixes the target with the uniform distribution: ``(1 - eps) t + eps / C``.
    z_loss : float >= 0, default 0
        Adds ``z_loss * lse**2`` per kept row (PaLM's auxiliary loss), gradient included.
    inplace_backward : bool, default False
        Write the gradient into ``input``'s storage instead of new memory.  ``input``'s
        values are destroyed by the call: use it when nothing else needs the logits
        (they come from a Linear layer, say).  Under ``torch.compile`` it is ignored
        (the compiled graph owns its memory).

    Returns
    -------
    Tensor
        A scalar for ``"mean"``/``"sum"``, else the per-element losses (the input's
        shape without the class dimension); the input's dtype and device.

    Raises
    ------
    ValueError
        A class index outside ``[0, C)`` that is not ``ignore_index``; a non-finite
        weight; shapes that do not fit.
    TypeError
        Non-floating input, or a target of neither index nor probability kind.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    inplace_backward = _validate.check_flag(inplace_backward, "inplace_backward")
    # The options' values in xentfast's words on every path (the compiled and traced
    # ones, and nn.Parameter inputs, pass them to the operators as int / float).
    ignore_index = _validate.check_ignore_index(ignore_index)
    label_smoothing = _validate.check_fraction(label_smoothing, "label_smoothing")
    z_loss = _validate.check_nonnegative(z_loss, "z_loss")
    if isinstance(input, Tensor):
        _check_float_input(input.dtype)  # torch's words (input.float(), not .astype)
    if not isinstance(target, Tensor) or not isinstance(input, Tensor):
        _check_call(input, target, weight, reduction, ignore_index, label_smoothing, z_loss)
    _check_devices(input, target, weight)
    _check_no_grad_wanted(weight)
    if input.dtype in _HALF_DTYPES and torch.is_autocast_enabled(input.device.type):
        # Autocast runs cross-entropy in float32 (PyTorch's policy for it): a float32
        # loss, and autograd rounds the gradient back to the logits' dtype.
        input = input.float()
        if target.dtype in _HALF_DTYPES:
            target = target.float()
    if _needs_composite(input, target, weight):
        return _composite_cross_entropy(input, target, weight, ignore_index, reduction,
                                        label_smoothing, z_loss)
    need_grad = torch.is_grad_enabled() and input.requires_grad
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and type(input) is Tensor:
        # Eager: the implementation directly (xentfast checks the options' values).
        args = (input, target, weight, ignore_index, reduction, label_smoothing, z_loss)
        if not need_grad:
            return _compute(*args, want_grad=False)[0]
        return _FusedCrossEntropy.apply(*args, bool(inplace_backward))[0]
    # Traced or compiled: the registered operators (their schema's scalar types).
    args = (input, target, weight, int(ignore_index), reduction, float(label_smoothing),
            float(z_loss))
    if need_grad:
        return torch.ops.xentfast.cross_entropy_fwd(*args)[0]
    return torch.ops.xentfast.cross_entropy_loss(*args)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by xentfast, plus ``z_loss``.

    The constructor is ``torch.nn.CrossEntropyLoss``'s (``weight`` is registered as a
    buffer, so it follows ``.to(device)``; ``size_average``/``reduce`` are mapped as
    PyTorch maps them), and instances are ``torch.nn.CrossEntropyLoss`` instances.

    Parameters
    ----------
    weight, size_average, ignore_index, reduce, reduction, label_smoothing
        As in ``torch.nn.CrossEntropyLoss``.
    z_loss : float >= 0, default 0
        Adds ``z_loss * lse**2`` per kept row, gradient included.
    inplace_backward : bool, default False
        Overwrite the logits with their gradient (see :func:`cross_entropy`).
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing", "z_loss",
                     "inplace_backward"]

    def __init__(self, weight: Optional[Tensor] = None, size_average=None,
                 ignore_index: int = -100, reduce=None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 inplace_backward: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction,
                         label_smoothing)
        _validate.check_reduction(self.reduction)
        _validate.check_ignore_index(ignore_index)
        _validate.check_fraction(label_smoothing, "label_smoothing")
        self.z_loss = _validate.check_nonnegative(z_loss, "z_loss")
        self.inplace_backward = _validate.check_flag(inplace_backward, "inplace_backward")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        return ", ".join(parts)


# ------------------------------------------------------------------ linear cross-entropy
#
# The loss of logits = input @ linear_weight.T (+ linear_bias), never materialised:
# xentfast.linear_cross_entropy(_with_grad) on the tensors' memory (CPU tensors; 16-bit
# ones computed from float32 copies, as that function computes them).  "mean" and "sum":
# the forward computes the loss and all gradients in one chunked pass and the backward
# scales them by the scalar grad_output.  "none": a per-row grad_output cannot be
# applied to d_weight after its sum over rows, so the backward runs the chunked pass
# again with the rows scaled (xentfast._linear's row_scale).


def _linear_arrays(input, linear_weight, target, linear_bias, weight):
    def host(t):
        t = t.detach()
        if t.device.type != "cpu":
            raise ValueError(
                "xentfast.torch.linear_cross_entropy computes on the host; got a tensor on "
                f"{t.device}. Move the tensors with .cpu(), or use "
                "torch.nn.functional.linear_cross_entropy on the GPU")
        return (t.float() if t.dtype in _HALF_DTYPES else t).numpy()

    return (host(input), host(linear_weight), host(target),
            None if linear_bias is None else host(linear_bias),
            None if weight is None else _weight_array(weight))


def _linear_options(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size):
    return dict(ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                chunk_size=chunk_size)


def _linear_outputs(values, dtypes):
    # np.array keeps 0-d results 0-d (np.ascontiguousarray would make them 1-d)
    return tuple(torch.from_numpy(np.array(v, order="C")).to(d) for v, d in zip(values, dtypes))


@torch.library.custom_op("xentfast::linear_cross_entropy_fwd", mutates_args=())
def _op_linear_fwd(input: Tensor, linear_weight: Tensor, target: Tensor,
                   linear_bias: Optional[Tensor], weight: Optional[Tensor], ignore_index: int,
                   reduction: str, label_smoothing: float, z_loss: float,
                   softcap: Optional[float], chunk_size: Optional[int]
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss and the gradients of input, linear_weight and linear_bias (an empty tensor
    without a bias) in one chunked pass."""
    h, w, y, b, cw = _linear_arrays(input, linear_weight, target, linear_bias, weight)
    result = _xf.linear_cross_entropy_with_grad(
        h, w, y, bias=b, class_weight=cw,
        **_linear_options(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size))
    loss, d_h, d_w = result[:3]
    d_b = result[3] if b is not None else np.zeros(0, np.float32)
    bias_dtype = linear_bias.dtype if linear_bias is not None else input.dtype
    return _linear_outputs((np.asarray(loss), d_h, d_w, d_b),
                           (input.dtype, input.dtype, linear_weight.dtype, bias_dtype))


@torch.library.custom_op("xentfast::linear_cross_entropy_loss", mutates_args=())
def _op_linear_loss(input: Tensor, linear_weight: Tensor, target: Tensor,
                    linear_bias: Optional[Tensor], weight: Optional[Tensor], ignore_index: int,
                    reduction: str, label_smoothing: float, z_loss: float,
                    softcap: Optional[float], chunk_size: Optional[int]) -> Tensor:
    """The loss alone."""
    h, w, y, b, cw = _linear_arrays(input, linear_weight, target, linear_bias, weight)
    loss = _xf.linear_cross_entropy(
        h, w, y, bias=b, class_weight=cw,
        **_linear_options(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size))
    return torch.from_numpy(np.array(loss, order="C")).to(input.dtype)


@torch.library.custom_op("xentfast::linear_cross_entropy_bwd", mutates_args=())
def _op_linear_bwd(input: Tensor, linear_weight: Tensor, target: Tensor,
                   linear_bias: Optional[Tensor], weight: Optional[Tensor], ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: Optional[float],
                   chunk_size: Optional[int], grad_loss: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_loss[i] * loss_i (reduction "none")."""
    from . import _linear

    h, w, y, b, cw = _linear_arrays(input, linear_weight, target, linear_bias, weight)
    result = _linear._linear(
        h, w, y, bias=b, class_weight=cw, return_lse=False, backend=None, want_grad=True,
        row_scale=grad_loss.detach().double().reshape(-1).numpy(),
        **_linear_options(ignore_index, "none", label_smoothing, z_loss, softcap, chunk_size))
    d_h, d_w = result[1:3]
    d_b = result[3] if b is not None else np.zeros(0, np.float32)
    bias_dtype = linear_bias.dtype if linear_bias is not None else input.dtype
    return _linear_outputs((d_h, d_w, d_b),
                           (input.dtype, linear_weight.dtype, bias_dtype))


def _linear_loss_shape(input, reduction):
    return input.shape[:-1] if reduction == "none" else ()


@_op_linear_fwd.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
      label_smoothing, z_loss, softcap, chunk_size):
    bias = (linear_bias.new_empty(linear_bias.shape) if linear_bias is not None
            else input.new_empty((0,)))
    return (input.new_empty(_linear_loss_shape(input, reduction)), input.new_empty(input.shape),
            linear_weight.new_empty(linear_weight.shape), bias)


@_op_linear_loss.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
      label_smoothing, z_loss, softcap, chunk_size):
    return input.new_empty(_linear_loss_shape(input, reduction))


@_op_linear_bwd.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing,
      z_loss, softcap, chunk_size, grad_loss):
    bias = (linear_bias.new_empty(linear_bias.shape) if linear_bias is not None
            else input.new_empty((0,)))
    return input.new_empty(input.shape), linear_weight.new_empty(linear_weight.shape), bias


def _linear_fwd_setup(ctx, inputs, output):
    _, d_h, d_w, d_b = output
    ctx.save_for_backward(d_h, d_w, d_b)
    ctx.has_bias = inputs[3] is not None


def _linear_second_derivative_error() -> RuntimeError:
    return RuntimeError(
        "xentfast.torch.linear_cross_entropy has no second derivative: its backward "
        "scales gradients computed chunk by chunk in the forward pass, so "
        "create_graph=True (double backward) is refused rather than answered with a "
        "zero. Where you need gradients of gradients, compute the logits and use "
        "xentfast.torch.cross_entropy(input @ linear_weight.T, target), which has them"
    )


def _linear_fwd_backward(ctx, grad_loss, *unused):
    if torch.is_grad_enabled() and _is_plain(grad_loss):
        raise _linear_second_derivative_error()
    d_h, d_w, d_b = ctx.saved_tensors
    scale = grad_loss.to(d_h.dtype)
    grads = [d_h * scale, d_w * scale.to(d_w.dtype),
             (d_b * scale.to(d_b.dtype)) if ctx.has_bias else None]
    return (grads[0], grads[1], None, grads[2]) + (None,) * 7


_op_linear_fwd.register_autograd(_linear_fwd_backward, setup_context=_linear_fwd_setup)


def _linear_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs[:5] if t is not None))
    ctx.present = [t is not None for t in inputs[:5]]
    ctx.options = inputs[5:]


def _linear_loss_backward(ctx, grad_loss):
    saved = iter(ctx.saved_tensors)
    input, linear_weight, target, linear_bias, weight = (
        next(saved) if present else None for present in ctx.present)
    ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size = ctx.options
    if reduction != "none" or (torch.is_grad_enabled() and _is_plain(grad_loss)):
        # ("mean" and "sum" never reach the loss-only operator's backward: see below)
        raise _linear_second_derivative_error()
    d_h, d_w, d_b = torch.ops.xentfast.linear_cross_entropy_bwd(
        input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing,
        z_loss, softcap, chunk_size, grad_loss)
    return (d_h, d_w, None, d_b if linear_bias is not None else None) + (None,) * 7


_op_linear_loss.register_autograd(_linear_loss_backward, setup_context=_linear_loss_setup)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """``torch.nn.functional.linear_cross_entropy`` on xentfast: the cross-entropy of
    ``input @ linear_weight.T (+ linear_bias)`` computed in chunks of rows, the logits
    never materialised (:func:`xentfast.linear_cross_entropy`), differentiable with
    respect to ``input``, ``linear_weight`` and ``linear_bias``.

    ``input`` is ``(..., d)`` and ``target`` its shape without ``d`` (class indices);
    the classes are the logits' last axis (PyTorch's K-dimensional form, with a bias of
    shape ``(C, d1, ..., dK)``, is not supported).  ``ignore_index=None`` means -100, as
    in PyTorch.  Plus xentfast's ``z_loss``, ``softcap`` and ``chunk_size`` (rows per
    chunk).  CPU tensors; 16-bit tensors are computed in float32.
    """
    ignore_index = _validate.check_ignore_index(-100 if ignore_index is None else ignore_index)
    _validate.check_reduction(reduction)
    label_smoothing = _validate.check_fraction(label_smoothing, "label_smoothing")
    z_loss = _validate.check_nonnegative(z_loss, "z_loss")
    softcap = _validate.check_softcap(softcap)
    chunk_size = _linear._check_chunk_size(chunk_size)
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None; got {type(weight).__name__}")
    _check_no_grad_wanted(weight)
    if target.dtype.is_floating_point:
        raise TypeError("xentfast.torch.linear_cross_entropy takes class indices as target; "
                        f"got dtype {target.dtype}")
    if _transformed_or_dual(input, linear_weight, linear_bias, target):
        # torch.func transforms, forward-mode AD: the logits made with PyTorch's
        # operators, then the same composite as cross_entropy's (classes to dim 1)
        logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return _composite_cross_entropy(logits.movedim(-1, 1) if logits.dim() > 2 else logits,
                                        target, weight, int(ignore_index), reduction,
                                        float(label_smoothing), float(z_loss))
    args = (input, linear_weight, target, linear_bias, weight, int(ignore_index), reduction,
            float(label_smoothing), float(z_loss),
            None if softcap is None else float(softcap),
            None if chunk_size is None else int(chunk_size))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, linear_weight, linear_bias))
    if needs_grad and reduction != "none":
        return torch.ops.xentfast.linear_cross_entropy_fwd(*args)[0]
    return torch.ops.xentfast.linear_cross_entropy_loss(*args)
