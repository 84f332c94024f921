"""xentfast inside JAX: optax's softmax cross-entropy losses on the fused kernels.

``softmax_cross_entropy_with_integer_labels(logits, labels, axis=-1)`` and
``softmax_cross_entropy(logits, labels, axis=-1)`` have optax's names, arguments and
results (per-example losses; ``axis`` an int or a tuple of axes, ``None`` too for
probability labels; the loss's dtype is the logits', promoted with the labels' for
probability labels).  ``cross_entropy(logits, labels, *, axis=-1, weight=None,
ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean")`` is
:func:`xentfast.cross_entropy` (PyTorch's options, class axis ``axis``).  All three
work under ``jax.jit``, ``jax.grad``, ``jax.value_and_grad``, ``jax.vjp`` and
``jax.vmap``, on float32, float64 (``jax_enable_x64``), bfloat16 and float16 logits.

Where they differ from optax (README, "JAX"):

* a class index outside ``[0, C)`` is an error, not optax's NaN (and not its
  wrap-around for negative indices);
* a zero probability at a ``-inf`` logit adds nothing (``0 * log 0 = 0``, as
  ``optax.safe_softmax_cross_entropy``) where optax's ``softmax_cross_entropy`` gives
  NaN;
* optax's ``where=`` is not supported (a clear ``NotImplementedError``).

How the gradient is made
------------------------
Each loss is a ``jax.custom_jvp``.  Outside differentiation (a plain forward, jitted or
not) the primal runs xentfast's loss-only kernel.  Under any differentiation the rule
runs the fused kernel once, which returns the loss and ``g = d loss / d logits``
together, and gives the tangent ``<g, d logits>`` -- along the class axis for
``"none"``, over everything for mean and sum.  It is linear in the tangent, so reverse
mode (``grad``/``vjp``) is its transpose, which only scales the saved ``g`` by the
cotangent ``ct``:

    mean, sum:  d logits = ct * g                    (ct a scalar; XLA drops ct = 1)
    none:       d logits = expand_dims(ct, axis) * g
                (loss_i depends on row i only, so scaling row i's gradient by ct_i is
                the exact vector-Jacobian product)

Integer labels get no cotangent (JAX's float0 zero).  Probability labels get the exact
one: ``d loss / d t_c = -(1 - eps) w_c log_softmax(x)_c`` per row (scaled like the
logits' gradient, divided by the row count for ``"mean"``), with ``log_softmax`` from
xentfast's fused kernel -- computed only when the labels are being differentiated.
Class weights are constants: differentiating with respect to ``weight`` raises
``NotImplementedError`` (PyTorch does not implement that derivative either).

Forward mode (``jax.jvp``, ``jacfwd``) is the rule itself.  Second derivatives
(``hessian``, grad of grad, ``jacfwd(grad)``): the fused ``(loss, g)`` is a
``custom_jvp`` of its own whose tangent of ``g`` is the Hessian-vector product, which
JAX takes through the same formulas written with jnp operators (``_composite_loss``):
exact in form, XLA's rounding, only ever run when a second derivative is asked for.
The host call: XLA FFI, zero copy
---------------------------------
The kernels run in a JAX primitive whose CPU lowering is an XLA FFI custom call
(``jax.ffi``), registered with a handler that ``ctypes`` builds from Python: XLA hands
it the operand and result buffers, which become NumPy arrays *on XLA's own memory*
(no copy in, no copy out: the gradient kernel writes straight into the result buffer
through ``xentfast.cross_entropy_with_grad(..., out=)``).  Only the C ABI of
``xla/ffi/api/c_api.h`` (a versioned, stable interface) is mirrored; its version and
struct sizes are checked on every call, and any Python exception in the handler is
returned to XLA as an error carrying xentfast's message.  Measured on the benchmark
machine (2-core AMD EPYC shared with other jobs, jax 0.10.2; interleaved, median and
minimum of 9), ``jax.jit(jax.value_and_grad(cross_entropy))`` on 65 536 x 1 000 float32:

    ===============================  ===============  ===============================
    host call                        time             copies, page faults per call
    ===============================  ===============  ===============================
    the NumPy-level call alone        70 ms (38 min)  - (xentfast reuses its buffer)
    ``jax.pure_callback``            980 ms (754)     logits in, gradient out; 128 765
    FFI, plain result buffer         326 ms (245)     none; 64 001
    FFI, huge-page advice (default)  100 ms (80)      none; 637
    ===============================  ===============  ===============================

``pure_callback`` in this JAX hands the callback fresh ``jax.Array`` copies of its
operands and copies the returned arrays into XLA's buffers, each copy into fresh
memory.  At 64 x 10 the whole jitted call costs 0.22 ms through FFI (0.06 ms of it is
JAX's dispatch of any jitted function, 0.12 ms the xentfast call on XLA's thread),
0.48 ms through ``pure_callback``; the NumPy-level call alone takes 0.07 ms.  So FFI
is the default.  Its first use runs a small loss+grad through the handler and compares
the bits with the NumPy-level call; ``pure_callback`` is the fallback when the handler
cannot be registered or fails that check (with a ``RuntimeWarning``; ``HOST_CALL`` says
which is in use, ``FFI_UNAVAILABLE_REASON`` why).

Errors: shapes, dtypes and options are checked when a function is traced, with
xentfast's messages and exception types.  What depends on the data -- a class index
outside ``[0, C)``, a non-finite class weight -- is found by the kernel while the
computation runs; JAX then raises ``jax.errors.JaxRuntimeError`` (a ``RuntimeError``;
some dispatch paths raise ``ValueError``) whose message is xentfast's.  Labels that are
values when the function is called (an eager call, ``jax.grad`` over the logits) are
checked before it, with the ``ValueError`` of the rest of xentfast; e.g.
``INVALID_ARGUMENT: xentfast.jax: ValueError: Received a label value of 9 at
labels[2] which is outside the valid range of [0, 7) ...``.

Huge pages: XLA allocates each large result afresh and glibc maps it with 4 KiB pages,
so first writes into a 262 MB gradient cost 64 000 page faults (0.2-0.3 s here; optax
pays them too, for its own gradient).  The handler advises the kernel to back result
buffers of 4 MiB or more with transparent huge pages (``madvise(MADV_HUGEPAGE)`` on the
aligned interior, Linux only; NumPy does the same for its own arrays), before anything
is written.  It changes no values and fails silently where unsupported.

Vectorisation: ``jax.vmap`` adds leading dimensions to the primitive's operands (an
unmapped operand gets a size-1 dimension, broadcast on the host without a copy); the
host call then computes each batch element's reduction separately (one kernel call for
all rows when the reduction is ``"none"``).

Devices: the primitive lowers only for CPU.  A computation placed on a GPU or TPU
raises ``xentfast.BackendUnavailableError`` when it is lowered, saying what to do;
arrays are never copied from a device to the host behind the caller's back.

Backend: the xentfast backend is fixed when a function is traced (``backend=``, else
``xentfast.use_backend``/``set_backend``, else the best host backend).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import sys
import threading
import warnings
from typing import Literal

try:
    import jax
    import jax.numpy as jnp
except ImportError as exc:  # pragma: no cover - exercised only without JAX
    raise ImportError(
        "xentfast.jax needs JAX, which is not installed: pip install jax "
        "(xentfast itself works without it)"
    ) from exc

import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

import xentfast as _xf
from . import _dispatch, _validate

__all__ = [
    "cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]

Reduction = Literal["mean", "sum", "none"]

_FFI_TARGET = "xentfast_cross_entropy"
# Result buffers at least this large get the transparent-huge-page advice.
_HUGEPAGE_MIN_BYTES = 4 << 20


# --------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class _Options:
    """Everything static about one host call (a primitive parameter: hashable)."""

    mode: str  # "loss", "loss_grad" or "log_softmax"
    kind: str  # "sparse" (class ids) or "dense" (probabilities)
    axis: int  # the class axis, >= 0, of the un-vmapped logits
    ignore_index: int
    label_smoothing: float
    z_loss: float
    reduction: str
    softcap: float | None
    backend: str
    has_weight: bool
    host_call: str  # "ffi" or "callback"
    batch_ndim: int = 0  # leading dimensions added by jax.vmap


# The FFI handler receives an index into this table as its one attribute: options are
# Python objects, and an integer is the simplest attribute to decode through ctypes.
_option_table: list[_Options] = []
_option_index: dict[_Options, int] = {}
_option_lock = threading.Lock()


def _option_key(opts: _Options) -> int:
    with _option_lock:
        key = _option_index.get(opts)
        if key is None:
            key = len(_option_table)
            _option_table.append(opts)
            _option_index[opts] = key
        return key


# --------------------------------------------------------------------------- host side


def _call_once(opts: _Options, x, y, w, outputs) -> None:
    """One xentfast call on NumPy arrays, results written into ``outputs``."""
    kwargs = dict(axis=opts.axis, weight=w, ignore_index=opts.ignore_index,
                  label_smoothing=opts.label_smoothing, z_loss=opts.z_loss,
                  reduction=opts.reduction, softcap=opts.softcap, backend=opts.backend)
    if opts.mode == "loss":
        outputs[0][...] = _xf.cross_entropy(x, y, **kwargs)
    else:  # the gradient lands in the result buffer itself
        loss, _ = _xf.cross_entropy_with_grad(x, y, out=outputs[1], **kwargs)
        outputs[0][...] = loss


def _host_compute(opts: _Options, inputs: list[np.ndarray], outputs: list[np.ndarray]):
    """Fill ``outputs`` (allocated by the caller, the primitive's result shapes).

    Under ``jax.vmap`` every operand carries ``opts.batch_ndim`` leading dimensions,
    of size 1 where that operand is not mapped."""
    k = opts.batch_ndim
    if opts.mode == "log_softmax":
        (x,) = inputs
        outputs[0][...] = _xf.log_softmax(x, axis=opts.axis + k, backend=opts.backend)
        return
    x, y = inputs[0], inputs[1]
    w = inputs[2] if opts.has_weight else None
    if k == 0:
        _call_once(opts, x, y, w, outputs)
        return
    lead = np.broadcast_shapes(*(a.shape[:k] for a in inputs))
    shared_weight = w is None or all(d == 1 for d in w.shape[:k])
    if opts.reduction == "none" and shared_weight:
        # Per-row losses: the batch dimensions are just more rows (zero-stride views
        # for the unmapped operand), one kernel call for all of them.
        xb = np.broadcast_to(x, lead + x.shape[k:])
        yb = np.broadcast_to(y, lead + y.shape[k:])
        wb = None if w is None else w.reshape(w.shape[k:])
        _call_once(dataclasses.replace(opts, axis=opts.axis + k), xb, yb, wb, outputs)
        return
    # A reduction (or class weights) per batch element: one call each.
    for index in np.ndindex(*lead):
        def pick(a):
            return a[tuple(i if d != 1 else 0 for i, d in zip(index, a.shape[:k]))]
        _call_once(opts, pick(x), pick(y), None if w is None else pick(w),
                   [out[index + (Ellipsis,)] for out in outputs])


# ------------------------------------------------------------ the XLA FFI handler (ctypes)
# Mirrors of the structs of xla/ffi/api/c_api.h that the handler reads (API 0.x).


class _ExtensionBase(ctypes.Structure):
    pass


_ExtensionBase._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                           ("next", ctypes.POINTER(_ExtensionBase))]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


_ErrorCreate = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):  # the leading fields only
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("api_version", _ApiVersion), ("internal_api", ctypes.c_void_p),
                ("error_create", _ErrorCreate)]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("dtype", ctypes.c_int), ("data", ctypes.c_void_p),
                ("rank", ctypes.c_int64), ("dims", ctypes.POINTER(ctypes.c_int64))]


class _Args(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets share this layout
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
                ("args", ctypes.POINTER(ctypes.c_void_p))]


class _ByteSpan(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
                ("names", ctypes.POINTER(ctypes.POINTER(_ByteSpan))),
                ("attrs", ctypes.POINTER(ctypes.c_void_p))]


class _Scalar(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("value", ctypes.c_void_p)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("api", ctypes.POINTER(_Api)), ("ctx", ctypes.c_void_p),
                ("stage", ctypes.c_int), ("args", _Args), ("rets", _Args),
                ("attrs", _Attrs), ("future", ctypes.c_void_p)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion),
                ("traits", ctypes.c_uint32), ("state_type_id", ctypes.c_int64)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase),
                ("metadata", ctypes.POINTER(_Metadata))]


def _struct_size(struct, last_field: str) -> int:
    """XLA_FFI_STRUCT_SIZE: the size up to and including ``last_field``."""
    field = getattr(struct, last_field)
    return field.offset + field.size


_CALL_FRAME_SIZE = _struct_size(_CallFrame, "attrs")
_BUFFER_SIZE = _struct_size(_Buffer, "dims")
_EXTENSION_METADATA = 1
_STAGE_EXECUTE = 3
_ATTR_SCALAR = 3
_FFI_S64 = 5
_ERR_INVALID_ARGUMENT, _ERR_INTERNAL = 3, 13
# The handler is written against API 0.1's structs (the fields above exist since then).
_HANDLER_API_VERSION = (0, 1)
_ARG_BUFFER = 1


def _ffi_dtypes() -> dict[int, np.dtype]:
    table = {1: np.bool_, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.uint8,
             7: np.uint16, 8: np.uint32, 9: np.uint64, 10: np.float16, 11: np.float32,
             12: np.float64}
    dtypes = {code: np.dtype(t) for code, t in table.items()}
    dtypes[16] = np.dtype(jnp.bfloat16)  # ml_dtypes.bfloat16, which xentfast reads natively
    return dtypes


_FFI_DTYPES = _ffi_dtypes()


class _Memory:
    """Exposes one XLA buffer to NumPy through the array interface (no copy)."""

    def __init__(self, address: int, nbytes: int, readonly: bool):
        self.__array_interface__ = {"data": (address, readonly), "shape": (nbytes,),
                                    "typestr": "|u1", "version": 3}


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()
_MADV_HUGEPAGE = 14  # Linux
_HUGE_PAGE = 2 << 20


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """Ask Linux to back [address, address + nbytes) with 2 MiB pages (the aligned
    interior only): a fresh buffer then faults in 512 times fewer pages."""
    if _MADVISE is None or nbytes < _HUGEPAGE_MIN_BYTES:
        return
    start = (address + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = (address + nbytes) & ~(_HUGE_PAGE - 1)
    if end > start:
        _MADVISE(start, end - start, _MADV_HUGEPAGE)  # advice only: errors are harmless


def _buffer_array(pointer: int, readonly: bool) -> np.ndarray:
    buf = ctypes.cast(pointer, ctypes.POINTER(_Buffer)).contents
    if buf.struct_size < _BUFFER_SIZE:
        raise RuntimeError(f"XLA FFI buffer struct of {buf.struct_size} bytes; expected "
                           f"at least {_BUFFER_SIZE}")
    dtype = _FFI_DTYPES.get(buf.dtype)
    if dtype is None:
        raise TypeError(f"XLA FFI buffer of unsupported element type code {buf.dtype}")
    shape = tuple(int(buf.dims[i]) for i in range(buf.rank))
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0 or not buf.data:
        return np.empty(shape, dtype)
    if not readonly:
        _advise_huge_pages(buf.data, nbytes)
    raw = np.asarray(_Memory(buf.data, nbytes, readonly))
    return raw.view(dtype).reshape(shape)


def _frame_options(frame: _CallFrame) -> _Options:
    attrs = frame.attrs
    for i in range(attrs.size):
        span = attrs.names[i].contents
        name = ctypes.string_at(span.ptr, span.len)
        if name == b"config" and attrs.types[i] == _ATTR_SCALAR:
            scalar = ctypes.cast(attrs.attrs[i], ctypes.POINTER(_Scalar)).contents
            if scalar.dtype == _FFI_S64:
                return _option_table[ctypes.cast(scalar.value,
                                                 ctypes.POINTER(ctypes.c_int64)).contents.value]
    raise RuntimeError("the xentfast custom call carries no 'config' attribute")


def _ffi_error(frame: _CallFrame, exc: BaseException) -> int | None:
    code = _ERR_INVALID_ARGUMENT if isinstance(exc, (ValueError, TypeError)) else _ERR_INTERNAL
    message = f"xentfast.jax: {type(exc).__name__}: {exc}".encode("utf-8", "replace")
    args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message, code)
    return frame.api.contents.error_create(ctypes.byref(args))


def _ffi_handler(frame_pointer) -> int | None:
    """XLA_FFI_Handler: metadata query, or one execution of the host computation."""
    frame = frame_pointer.contents
    try:
        ext = frame.extension_start
        if ext and ext.contents.type == _EXTENSION_METADATA:
            metadata = ctypes.cast(ext, ctypes.POINTER(_MetadataExtension)).contents.metadata
            if metadata.contents.struct_size < _struct_size(_Metadata, "traits"):
                raise RuntimeError("XLA FFI metadata struct smaller than API 0.1's")
            major, minor = _HANDLER_API_VERSION
            metadata.contents.api_version = _ApiVersion(ctypes.sizeof(_ApiVersion), None,
                                                        major, minor)
            metadata.contents.traits = 0
            return None
        if frame.struct_size < _CALL_FRAME_SIZE:
            raise RuntimeError(f"XLA FFI call frame of {frame.struct_size} bytes; expected "
                               f"at least {_CALL_FRAME_SIZE}")
        if frame.api.contents.api_version.major_version != _HANDLER_API_VERSION[0]:
            raise RuntimeError("XLA FFI API major version "
                               f"{frame.api.contents.api_version.major_version}; this "
                               f"handler speaks {_HANDLER_API_VERSION[0]}")
        if frame.stage != _STAGE_EXECUTE:
            return None
        opts = _frame_options(frame)
        for i in range(frame.args.size):
            if frame.args.types[i] != _ARG_BUFFER:
                raise RuntimeError("the xentfast custom call takes buffer operands only")
        inputs = [_buffer_array(frame.args.args[i], True) for i in range(frame.args.size)]
        outputs = [_buffer_array(frame.rets.args[i], False) for i in range(frame.rets.size)]
        _host_compute(opts, inputs, outputs)
        return None
    except BaseException as exc:  # everything goes back to XLA as an error
        return _ffi_error(frame, exc)


_HandlerType = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))
_HANDLER = _HandlerType(_ffi_handler)  # kept alive for the life of the process


def _register_ffi() -> str | None:
    """Register the handler with XLA's CPU client; the reason it failed, or None."""
    try:
        address = ctypes.cast(_HANDLER, ctypes.c_void_p).value
        jax.ffi.register_ffi_target(_FFI_TARGET, jax.ffi.pycapsule(address),
                                    platform="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure means: use pure_callback
        return f"{type(exc).__name__}: {exc}"
    return None


FFI_UNAVAILABLE_REASON: str | None = _register_ffi()
# "ffi" (zero copy) or "callback" (jax.pure_callback); read when a function is traced.
HOST_CALL: str = "ffi" if FFI_UNAVAILABLE_REASON is None else "callback"
_ffi_checked = False  # whether the first use has run the self-check below


# --------------------------------------------------------------------------- primitive

_xent_p = Primitive("xentfast_cross_entropy")
_xent_p.multiple_results = True


def _result_avals(avals, opts: _Options):
    k = opts.batch_ndim
    lead = tuple(np.broadcast_shapes(*(tuple(a.shape[:k]) for a in avals)))
    x = avals[0]
    shape = tuple(x.shape[k:])
    if opts.mode == "log_softmax":
        return [jax.core.ShapedArray(lead + shape, x.dtype)]
    rows = shape[:opts.axis] + shape[opts.axis + 1:]
    loss_shape = lead + (rows if opts.reduction == "none" else ())
    results = [jax.core.ShapedArray(loss_shape, x.dtype)]
    if opts.mode == "loss_grad":
        results.append(jax.core.ShapedArray(lead + shape, x.dtype))
    return results


@_xent_p.def_abstract_eval
def _abstract_eval(*avals, opts):
    return _result_avals(avals, opts)


@functools.partial(jax.jit, static_argnames="opts")
def _apply(*args, opts):
    return _xent_p.bind(*args, opts=opts)


@_xent_p.def_impl
def _impl(*args, opts):
    # Eager use compiles the primitive alone (so it meets the same lowering, host
    # call and device check as under jit), also inside jax.disable_jit().
    with jax.disable_jit(False):
        return _apply(*args, opts=opts)


def _batch_rule(args, dims, *, opts):
    """jax.vmap: the mapped dimension moves to the front; an unmapped operand gets a
    size-1 one (a reshape, no copy); the host broadcasts."""
    moved = [jnp.expand_dims(a, 0) if d is None else jnp.moveaxis(a, d, 0)
             for a, d in zip(args, dims)]
    results = _xent_p.bind(*moved, opts=dataclasses.replace(opts,
                                                            batch_ndim=opts.batch_ndim + 1))
    return results, [0] * len(results)


batching.primitive_batchers[_xent_p] = _batch_rule


def _callback_host(opts: _Options, result_avals):
    def host(*arrays):
        inputs = [np.asarray(a) for a in arrays]
        outputs = [np.empty(a.shape, a.dtype) for a in result_avals]
        _host_compute(opts, inputs, outputs)
        return outputs
    return host


def _lower_cpu(ctx, *args, opts):
    if opts.host_call == "ffi":
        rule = jax.ffi.ffi_lowering(_FFI_TARGET)
        return rule(ctx, *args, config=np.int64(_option_key(opts)))
    result_avals = list(ctx.avals_out)

    def through_callback(*operands):
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in result_avals]
        return jax.pure_callback(_callback_host(opts, result_avals), shapes, *operands)

    return mlir.lower_fun(through_callback, multiple_results=True)(ctx, *args)


def _lower_elsewhere(ctx, *args, opts):
    platforms = ", ".join(ctx.module_context.platforms)
    raise _xf.BackendUnavailableError(
        f"xentfast.jax computes on CPU devices only, but this computation is placed on "
        f"{platforms}. xentfast never copies device arrays to the host behind your back: "
        "put the arrays on the CPU first (jax.device_put(x, jax.devices('cpu')[0])), or "
        "compute this loss with optax on the accelerator"
    )


mlir.register_lowering(_xent_p, _lower_elsewhere)
mlir.register_lowering(_xent_p, _lower_cpu, platform="cpu")


def _ffi_self_check() -> str | None:
    """One small loss+grad through the FFI handler, compared with the NumPy-level call
    (bits): the reason it failed, or None.  Runs eagerly even inside a trace."""
    x = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], np.float32)
    y = np.array([2, 0], np.int32)
    opts = _Options(mode="loss_grad", kind="sparse", axis=1, ignore_index=-100,
                    label_smoothing=0.0, z_loss=0.0, reduction="none", softcap=None,
                    backend=_resolved_backend(None), has_weight=False, host_call="ffi")
    try:
        cpu = jax.devices("cpu")[0]
        with jax.ensure_compile_time_eval():
            loss, grad = _apply(jax.device_put(x, cpu), jax.device_put(y, cpu), opts=opts)
            loss, grad = np.asarray(loss), np.asarray(grad)
    except Exception as exc:  # noqa: BLE001 - any failure means: use pure_callback
        return f"the FFI self-check failed: {type(exc).__name__}: {exc}"
    ref_loss, ref_grad = _xf.cross_entropy_with_grad(x, y, axis=1, reduction="none",
                                                     backend=opts.backend)
    if not (np.array_equal(loss, ref_loss) and np.array_equal(grad, ref_grad)):
        return "the FFI self-check gave results that differ from xentfast's NumPy call"
    return None


def _host_call() -> str:
    """The host call new traces use: FFI after its self-check on first use (which falls
    back to pure_callback, with a warning, should the handler misbehave)."""
    global HOST_CALL, FFI_UNAVAILABLE_REASON, _ffi_checked
    if HOST_CALL == "ffi" and not _ffi_checked:
        _ffi_checked = True
        reason = _ffi_self_check()
        if reason is not None:
            FFI_UNAVAILABLE_REASON, HOST_CALL = reason, "callback"
            warnings.warn(f"xentfast.jax falls back to jax.pure_callback (about 10x slower "
                          f"for large arrays): {reason}", RuntimeWarning, stacklevel=3)
    return HOST_CALL


def _bind(opts: _Options, mode: str, *args):
    return _xent_p.bind(*args, opts=dataclasses.replace(opts, mode=mode))


# --------------------------------------------------------------------------- custom_jvp


def _acc_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _contract(opts: _Options, d, t, dtype):
    """<d, t> along the class axis ("none": one value per row, the other axes batch
    axes) or over everything (mean, sum): the tangent of the loss when ``d`` is its
    derivative, accumulated in float32/float64.  One ``dot_general``, linear in ``t``:
    its transpose (reverse mode) is one op too, the cotangent times ``d`` --
    ``expand_dims(ct, axis) * d`` or ``ct * d`` -- with no full-size broadcast or
    conversions of its own (which a sum of a product would add, op by op, outside jit)."""
    t = t.astype(d.dtype)
    if opts.reduction == "none":
        contract = ((opts.axis,), (opts.axis,))
        batch = tuple(i for i in range(d.ndim) if i != opts.axis)
    else:
        contract = (tuple(range(d.ndim)), tuple(range(d.ndim)))
        batch = ()
    out = jax.lax.dot_general(d, t, (contract, (batch, batch)),
                              preferred_element_type=_acc_dtype(dtype))
    return out.astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _loss(opts: _Options, logits, labels, weight):
    args = (logits, labels) if weight is None else (logits, labels, weight)
    return _bind(opts, "loss", *args)[0]


def _loss_jvp(opts: _Options, primals, tangents):
    """Under any differentiation the fused kernel runs once (``_loss_and_grad``) and the
    tangent is <g, d logits> (+ <d loss / d labels, d labels> for probability labels):
    linear in the tangents, so reverse mode is its transpose, the cotangent times the
    saved ``g``."""
    x, y, w = primals
    dx, dy, dw = tangents
    _check_weight_constant(w, dw)
    labels_differentiated = opts.kind == "dense" and not isinstance(dy, SymbolicZero)
    if isinstance(dx, SymbolicZero):
        loss = _loss(opts, x, y, w)
        tangent = jnp.zeros_like(loss)
    else:
        loss, g = _loss_and_grad(opts, x, y, w)
        tangent = _contract(opts, g, dx, loss.dtype)
    if labels_differentiated:
        tangent = tangent + _contract(opts, _labels_derivative(opts, x, w), dy, loss.dtype)
    return loss, tangent


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _loss_and_grad(opts: _Options, logits, labels, weight):
    """(loss, g = d loss / d logits) from one fused kernel call."""
    args = (logits, labels) if weight is None else (logits, labels, weight)
    return tuple(_bind(opts, "loss_grad", *args))


def _check_weight_constant(w, dw) -> None:
    if w is not None and not isinstance(dw, SymbolicZero):
        raise NotImplementedError(
            "xentfast.jax does not differentiate with respect to the class weights "
            "(PyTorch does not either); treat them as constants with "
            "jax.lax.stop_gradient(weight)"
        )


def _loss_and_grad_jvp(opts: _Options, primals, tangents):
    """Second derivatives (grad of grad, hessian, jvp of grad): the tangent of ``g`` is
    the Hessian-vector product, taken by JAX through ``_composite_loss`` (the same
    formulas with jnp operators), with respect to the logits and, for probability
    labels, the labels."""
    x, y, w = primals
    dx, dy, dw = tangents
    _check_weight_constant(w, dw)  # (the gradient's derivative too: no silent zero)
    loss, g = _loss_and_grad(opts, x, y, w)
    dx = jnp.zeros_like(x) if isinstance(dx, SymbolicZero) else dx
    dloss = _contract(opts, g, dx, loss.dtype)
    if opts.kind == "dense" and not isinstance(dy, SymbolicZero):
        composite_grad = jax.grad(lambda a, t: _composite_loss(opts, a, t, w).sum())
        _, dg = jax.jvp(composite_grad, (x, y), (dx, dy))
        dloss = dloss + _contract(opts, _labels_derivative(opts, x, w), dy, loss.dtype)
    else:
        composite_grad = jax.grad(lambda a: _composite_loss(opts, a, y, w).sum())
        _, dg = jax.jvp(composite_grad, (x,), (dx,))
    return (loss, g), (dloss, dg.astype(g.dtype))


def _composite_loss(opts: _Options, x, y, w):
    """xentfast's loss from jnp operators (only differentiated, for second derivatives):
    per row, classes last, -log p_c = lse - x_c,
        class ids y (kept):  (1 - eps) w_y (-log p_y) + eps/C sum_c w_c (-log p_c)
        probabilities t:     sum_c w_c ((1 - eps) t_c + eps/C) (-log p_c)   (0 where that
                             weight is 0)
    plus z lse^2 per kept row; "mean" divides by the sum of w_y over kept rows (the row
    count for probabilities), 0 when that is 0.  The softcap, if any, first."""
    acc = _acc_dtype(x.dtype)
    xc = x.astype(acc)
    if opts.softcap is not None:
        xc = opts.softcap * jnp.tanh(xc / opts.softcap)
    xl = jnp.moveaxis(xc, opts.axis, -1)
    num_classes = xl.shape[-1]
    eps = opts.label_smoothing
    kept = None
    if opts.kind == "sparse":
        info = np.iinfo(np.dtype(y.dtype))
        if info.min <= opts.ignore_index <= info.max:  # else no label can equal it
            kept = y != jnp.asarray(opts.ignore_index, y.dtype)
            # an ignored row is no function of its logits (NaN included)
            xl = jnp.where(kept[..., None], xl, 0)
    lse = jax.nn.logsumexp(xl, axis=-1)
    neg_log_p = lse[..., None] - xl
    wv = jnp.ones(num_classes, acc) if w is None else w.astype(acc)
    if opts.kind == "dense":
        q = wv * ((1 - eps) * jnp.moveaxis(y, opts.axis, -1).astype(acc) + eps / num_classes)
        rows = jnp.sum(jnp.where(q == 0, 0, q * neg_log_p), axis=-1)
        kept = jnp.ones(rows.shape, bool)
        den = jnp.asarray(rows.size, acc)
    else:
        if kept is None:
            kept = jnp.ones(y.shape, bool)
        safe = jnp.where(kept, y, 0)
        w_y = wv[safe]
        picked = jnp.take_along_axis(neg_log_p, safe[..., None], axis=-1)[..., 0]
        rows = (1 - eps) * w_y * picked
        if eps:
            rows = rows + eps / num_classes * jnp.sum(wv * neg_log_p, axis=-1)
        den = jnp.sum(jnp.where(kept, w_y, 0))
    if opts.z_loss:
        rows = rows + opts.z_loss * lse * lse
    rows = jnp.where(kept, rows, 0)
    if opts.reduction == "none":
        return rows
    total = jnp.sum(rows)
    if opts.reduction == "sum":
        return total
    return jnp.where(den != 0, total / jnp.where(den != 0, den, 1), 0)


def _labels_derivative(opts: _Options, x, w):
    """d loss / d t for probability labels t: per row, with wt_c = w_c ((1 - eps) t_c +
    eps / C), loss = -sum_c wt_c log p_c (+ z lse^2, free of t), so
    d loss / d t_c = -(1 - eps) w_c log p_c, times the reduction's factor (1 / rows for
    "mean"); log p from xentfast's kernel."""
    capped = x if opts.softcap is None else opts.softcap * jnp.tanh(x / opts.softcap)
    log_p = _log_softmax(opts, capped)
    scale = -(1.0 - opts.label_smoothing)
    if opts.reduction == "mean":
        rows = math.prod(x.shape) // x.shape[opts.axis]
        scale = scale / rows if rows else 0.0
    acc = _acc_dtype(x.dtype)
    d = log_p.astype(acc) * scale
    if w is not None:
        shape = [1] * x.ndim
        shape[opts.axis] = x.shape[opts.axis]
        d = d * w.astype(acc).reshape(shape)
    return d


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _log_softmax(opts: _Options, x):
    (log_p,) = _bind(opts, "log_softmax", x)
    return log_p


def _log_softmax_jvp(opts: _Options, primals, tangents):
    """d log p = dx - <p, dx> along the class axis."""
    (x,), (dx,) = primals, tangents
    log_p = _log_softmax(opts, x)
    acc = _acc_dtype(x.dtype)
    mean = jnp.sum(jnp.exp(log_p.astype(acc)) * dx.astype(acc), axis=opts.axis, keepdims=True)
    return log_p, (dx.astype(acc) - mean).astype(log_p.dtype)


_loss.defjvp(_loss_jvp, symbolic_zeros=True)
_loss_and_grad.defjvp(_loss_and_grad_jvp, symbolic_zeros=True)
_log_softmax.defjvp(_log_softmax_jvp)


# --------------------------------------------------------------------------- public API


def _resolved_backend(backend: str | None) -> str:
    """The host backend the traced computation will run on (fixed at trace time)."""
    name = _dispatch.resolve(backend, on_device=False)
    if name == "cuda":
        raise ValueError(
            "xentfast.jax computes on the host: backend 'cuda' would copy every call's "
            "arrays to the GPU and back. Name a host backend (see "
            "xentfast.available_backends()), or leave backend=None"
        )
    return name


def _as_array(value, name: str):
    """A JAX array (or tracer) of ``value``; TypeError naming the argument if none."""
    try:
        return jnp.asarray(value)
    except TypeError as exc:
        raise TypeError(f"{name} must be an array; got {type(value).__name__}") from exc


def _check_concrete_labels(labels, num_classes: int,
                           ignore_index: int = _validate.NO_IGNORE) -> None:
    """Labels that are values (an eager call, or jax.grad over the logits only) are
    checked here, with the ValueError of the rest of xentfast; traced labels (jit, vmap)
    can only be checked by the kernel, when the computation runs (JaxRuntimeError)."""
    if isinstance(labels, jax.core.Tracer):
        return
    _validate.check_label_range(np.asarray(labels), num_classes, ignore_index)


def _index_labels(labels):
    """Class ids as int32 or int64 (xentfast's label dtypes), other integers widened."""
    if labels.dtype in (jnp.int32, jnp.int64):
        return labels
    return labels.astype(jnp.int32)


def _options(kind, axis, ignore_index=_validate.NO_IGNORE, label_smoothing=0.0,
             z_loss=0.0, reduction="none", softcap=None, backend=None,
             has_weight=False) -> _Options:
    return _Options(mode="loss", kind=kind, axis=axis, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction,
                    softcap=softcap, backend=_resolved_backend(backend),
                    has_weight=has_weight, host_call=_host_call())


def _no_where(where) -> None:
    if where is not None:
        raise NotImplementedError(
            "xentfast.jax does not support optax's where= argument. Mask rows with "
            "xentfast.jax.cross_entropy(..., ignore_index=...) (class ids) or a zero "
            "label row (probabilities); mask classes with jnp.where(mask, logits, -jnp.inf)"
        )


def _classes_last(x, axes: tuple[int, ...]):
    """Move ``axes`` (in the given order) to the end and merge them into one axis, as
    optax does for a tuple ``axis``: a class index is then a flat index into them."""
    ndim = x.ndim
    batch_axes = tuple(a for a in range(ndim) if a not in axes)
    x = jnp.transpose(x, batch_axes + axes)
    return x.reshape(x.shape[:len(batch_axes)] + (-1,))


def _class_axes(axis, ndim: int, allow_none: bool) -> tuple[int, ...] | int:
    """optax's ``axis``: an int, a tuple of ints (or None: every axis)."""
    if axis is None and allow_none:
        return tuple(range(ndim))
    if isinstance(axis, tuple):
        return _validate.normalize_axes(axis, ndim, "logits")
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, (bool, np.bool_)):
        return _validate.normalize_axis(axis, ndim)
    expected = "'int', 'tuple[int, ...]' or None" if allow_none else \
        "'int' or 'tuple[int, ...]'"
    raise ValueError(
        f"Keyword argument 'axis' must be of type {expected} but actual type is "
        f"{type(axis)}."
    )


def softmax_cross_entropy_with_integer_labels(logits, labels, axis=-1, where=None, *,
                                              backend: str | None = None):
    """Softmax cross-entropy between logits and integer class labels, per example.

    optax's ``softmax_cross_entropy_with_integer_labels``: ``loss = logsumexp(x) - x_y``
    along ``axis``, on xentfast's fused kernels, differentiable (``jax.custom_jvp``).

    Parameters
    ----------
    logits : array
        Unnormalised log-probabilities, floating (float16, bfloat16, float32, float64).
    labels : integer array
        Class ids in ``[0, C)``, of the logits' shape without ``axis``.  Any other value
        is an error (optax gives NaN, or wraps a negative id around).
    axis : int or tuple of ints, default -1
        The class axis.  A tuple: those axes together (in that order) hold the classes,
        and a label is a flat index into them, as in optax.
    where : None
        optax's mask argument is not supported (``NotImplementedError``).
    backend : str, optional
        A host backend of xentfast, fixed when the function is traced.

    Returns
    -------
    Array of the logits' shape without the class axes, in the logits' dtype.
    """
    _no_where(where)
    logits = _as_array(logits, "logits")
    labels = _as_array(labels, "labels")
    dtype = _validate.check_float_dtype(logits.dtype, "logits")
    if np.dtype(labels.dtype).kind not in "iu":
        raise TypeError(
            f"labels must be integer class indices; got dtype {labels.dtype}. For "
            "probabilities use xentfast.jax.softmax_cross_entropy"
        )
    _validate.check_ndim(tuple(logits.shape), "logits")
    axes = _class_axes(axis, logits.ndim, allow_none=False)
    if isinstance(axes, tuple):
        logits = _classes_last(logits, axes)
        axes = logits.ndim - 1
    shape = tuple(logits.shape)
    _validate.check_classes(shape[axes], shape, axes)
    _validate.label_kind(np.dtype(labels.dtype), tuple(labels.shape), shape, axes)
    _check_concrete_labels(labels, shape[axes])
    opts = _options("sparse", axes, backend=backend)
    return _loss(opts, logits.astype(dtype), _index_labels(labels), None)


def softmax_cross_entropy(logits, labels, axis=-1, where=None, *,
                          backend: str | None = None):
    """Softmax cross-entropy between logits and label distributions, per example.

    optax's ``softmax_cross_entropy``: ``loss = -sum_c labels_c log_softmax(logits)_c``
    along ``axis``, on xentfast's fused kernels, differentiable with respect to the
    logits and the labels (``jax.custom_jvp``).

    Parameters
    ----------
    logits : array
        Unnormalised log-probabilities, floating.
    labels : array
        Label distributions (one-hot rows, smoothed ones, any weights: they need not sum
        to 1), of a shape that broadcasts against the logits'.  A zero label at a
        ``-inf`` logit adds nothing (optax's ``softmax_cross_entropy`` gives NaN there).
    axis : int, tuple of ints or None, default -1
        The class axis (a tuple: those axes together; None: all of them).
    where : None
        optax's mask argument is not supported (``NotImplementedError``).
    backend : str, optional
        A host backend of xentfast, fixed when the function is traced.

    Returns
    -------
    Array of the broadcast shape without the class axes, in the dtype that the logits'
    and labels' dtypes promote to (as optax's product ``labels * log_probs``).
    """
    _no_where(where)
    logits = _as_array(logits, "logits")
    labels = _as_array(labels, "labels")
    _validate.check_float_dtype(logits.dtype, "logits")
    kind = np.dtype(labels.dtype).kind
    if kind not in "biuf" and not _validate.is_bfloat16(np.dtype(labels.dtype)):
        raise TypeError(f"labels must be real numbers (probabilities); got dtype "
                        f"{labels.dtype}")
    dtype = jnp.result_type(logits, labels)
    try:
        shape = jnp.broadcast_shapes(logits.shape, labels.shape)
    except ValueError:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not broadcast against logits of "
            f"shape {tuple(logits.shape)}; expected probabilities of the logits' shape"
        ) from None
    logits = jnp.broadcast_to(logits.astype(dtype), shape)
    labels = jnp.broadcast_to(labels.astype(dtype), shape)
    _validate.check_ndim(tuple(shape), "logits")
    axes = _class_axes(axis, len(shape), allow_none=True)
    if isinstance(axes, tuple):
        logits, labels = _classes_last(logits, axes), _classes_last(labels, axes)
        axes = logits.ndim - 1
    _validate.check_classes(logits.shape[axes], tuple(logits.shape), axes)
    opts = _options("dense", axes, ignore_index=-100, backend=backend)
    return _loss(opts, logits, labels, None)


def cross_entropy(logits, labels, *, axis: int = -1, weight=None, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  reduction: Reduction = "mean", softcap: float | None = None,
                  backend: str | None = None):
    """:func:`xentfast.cross_entropy` for JAX arrays, differentiable (``jax.custom_jvp``).

    Parameters
    ----------
    logits : array
        Unnormalised scores, floating (float16, bfloat16, float32, float64); the classes
        lie along ``axis``.
    labels : array
        Class indices (integers, the logits' shape without ``axis``) or class
        probabilities (floats, the logits' shape; cast to the logits' dtype).
    axis : int, default -1
        The class axis.
    weight : array of shape (C,), optional
        Per-class weights, as PyTorch's ``weight`` (a constant: no gradient).
    ignore_index : int, default -100
        Class-index labels equal to it contribute neither loss nor gradient.
    label_smoothing : float in [0, 1], default 0
    z_loss : float >= 0, default 0
        Adds ``z_loss * lse**2`` per kept row.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the sum of ``weight[label]`` over kept rows (the number
        of rows for probabilities); with no kept row the mean is 0.0, not NaN.
    softcap : float > 0, optional
        ``softcap * tanh(logits / softcap)`` first (Gemma 2).
    backend : str, optional
        A host backend of xentfast, fixed when the function is traced.

    Returns
    -------
    A scalar, or for ``reduction="none"`` an array of the logits' shape without
    ``axis``; in the logits' dtype.
    """
    reduction = _validate.check_reduction(reduction)
    ignore_index = _validate.check_ignore_index(ignore_index)
    label_smoothing = _validate.check_fraction(label_smoothing, "label_smoothing")
    z_loss = _validate.check_nonnegative(z_loss, "z_loss")
    softcap = _validate.check_softcap(softcap)
    logits = _as_array(logits, "logits")
    labels = _as_array(labels, "labels")
    dtype = _validate.check_float_dtype(logits.dtype, "logits")
    shape = tuple(logits.shape)
    _validate.check_ndim(shape, "logits")
    axis = _validate.normalize_axis(axis, len(shape))
    _validate.check_classes(shape[axis], shape, axis)
    kind = _validate.label_kind(np.dtype(labels.dtype), tuple(labels.shape), shape, axis)
    if kind == "dense":
        _validate.check_no_ignore_index_for_probabilities(ignore_index)
        labels = labels.astype(dtype)
    else:
        _check_concrete_labels(labels, shape[axis], ignore_index)
        labels = _index_labels(labels)
    if weight is not None:
        weight = _as_array(weight, "weight")
        _validate.check_weight_dtype(np.dtype(weight.dtype))
        _validate.check_weight_shape(tuple(weight.shape), shape[axis])
        weight = weight.astype(jnp.float64 if dtype == np.float64 else jnp.float32)
    opts = _options(kind, axis, ignore_index=ignore_index, label_smoothing=label_smoothing,
                    z_loss=z_loss, reduction=reduction, softcap=softcap, backend=backend,
                    has_weight=weight is not None)
    return _loss(opts, logits, labels, weight)
