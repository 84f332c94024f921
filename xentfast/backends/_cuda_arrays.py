"""``DEVICE``: the public layer's array operations for CUDA device arrays.

Implements every method of ``xentfast._arrays.HostArrays`` (same names, same
signatures) for arrays exposing ``__cuda_array_interface__`` (CuPy arrays, Numba device
arrays, PyTorch CUDA tensors) and for NumPy input under ``backend="cuda"``:

* Device inputs are used in place (zero-copy ``numba`` views; no host round-trip).
  Layout changes (class axis last, C order), dtype casts and making contiguous are
  one pass of a strided copy kernel on the device.
* Results come back as the caller's kind: CuPy in -> CuPy out (``cupy.asarray`` of the
  Numba result, zero-copy; CuPy is imported only when the input is a CuPy array);
  Numba device arrays otherwise (PyTorch tensors come back as Numba device arrays:
  ``torch.as_tensor(result, device="cuda")`` wraps them without a copy).  NumPy in ->
  NumPy out, through one host->device copy of each input and one device->host copy of
  each result.
* ``total`` sums per-row losses in float64 with a fixed tree (fixed grid for a given
  n, fixed order inside each block, the partial sums added on the host in index
  order): bitwise identical run to run, no floating-point atomics.
* Labels are checked on the device: one kernel scans them, recording per block the
  first bad row and the number of kept rows; the host reads the partials back and
  raises the host backends' ValueError before any output is written.

Streams (CUDA Array Interface v3): every kernel here and in ``numba_cuda`` is queued
on Numba's default stream, the legacy default stream, which orders itself after all
earlier work and before all later work on every *blocking* stream (CuPy's and
PyTorch's default streams included).  An input whose interface names a stream other
than the legacy default one (``"stream"`` not in (None, 1)) is synchronised on the
host before it is read, as the interface's consumer rule requires.  Outputs are
exported by Numba with no stream; a consumer on a *non-blocking* stream must order
itself after the default stream (e.g. ``torch.cuda.current_stream().wait_stream``).
Calls that return a reduced loss, or check labels, synchronise the host anyway.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import cuda

from .. import _validate
from .._arrays import HOST, without_autograd
from ._cuda_kernels import INT64_MAX, SIMULATED, host, jit, launch, prologue

if SIMULATED:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _NumbaArray
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _NumbaArray

MAX_GRID = 2**31 - 1


# --------------------------------------------------------------------------- kinds


def _is_numba(obj) -> bool:
    return isinstance(obj, _NumbaArray)


def _is_cupy(obj) -> bool:
    return type(obj).__module__.split(".", 1)[0] == "cupy" and _exports_interface(obj)


def _exports_interface(obj) -> bool:
    return hasattr(without_autograd(obj), "__cuda_array_interface__")


def is_device(obj) -> bool:
    """A CUDA array (anything the device layer reads in place)."""
    if isinstance(obj, np.ndarray):
        return False
    return _is_numba(obj) or _exports_interface(obj)


def as_numba(obj):
    """A Numba view of a device array (no copy); see the module docstring for streams."""
    if _is_numba(obj):
        return obj
    obj = without_autograd(obj)  # PyTorch refuses to export tensors that require grad
    if not hasattr(obj, "__cuda_array_interface__"):
        raise TypeError(
            f"expected a CUDA device array (Numba, CuPy, PyTorch CUDA); got {type(obj).__name__}. "
            "The public functions copy NumPy input to the device; the kernels do not"
        )
    if SIMULATED:  # pragma: no cover - the simulator only has its own arrays
        raise TypeError(f"the CUDA simulator cannot read {type(obj).__name__} arrays")
    desc = obj.__cuda_array_interface__
    arr = host.cuda.from_cuda_array_interface(desc, owner=obj, sync=False)
    stream = desc.get("stream")
    if stream not in (None, 1):  # 1: the legacy default stream, the one we launch on
        host.cuda.external_stream(stream).synchronize()
    return arr


def _upload(array: np.ndarray):
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
        array = array.copy(order="C")
    return host.cuda.to_device(array)


def _empty(shape, dtype):
    """Uninitialised device memory, from the caller's caching allocator when the call
    came with CuPy arrays or PyTorch tensors (see ``_pool_allocator``), else from Numba
    (a ``cudaMalloc`` per array, and a ``cudaFree``, which waits for the device)."""
    dtype = np.dtype(dtype)
    allocate = getattr(_call_allocator, "allocate", None)
    if allocate is not None:
        try:
            return allocate(tuple(shape) if isinstance(shape, tuple) else (int(shape),), dtype)
        except (TypeError, ValueError):  # a dtype that library lacks (bfloat16, ...)
            pass
    return host.cuda.device_array(shape, dtype=dtype)


# Per thread: the allocator of the array library the current public call came with.
_call_allocator = threading.local()


def _pool_allocator(obj):
    """``allocate(shape, dtype)`` from ``obj``'s library's memory pool, or None.

    CuPy's pool and PyTorch's caching allocator hand memory back to the next allocation
    on the same stream without cudaMalloc/cudaFree (a 4 GB gradient: ~5 ms each way on
    an H100).  Our kernels run on the legacy default stream, so the pool is used only
    while the library's current stream is its default stream: a block freed there is
    reused in stream order after our kernels.  On any other stream, Numba allocates.
    """
    module = type(obj).__module__.split(".", 1)[0]
    if module == "cupy":
        import cupy

        if cupy.cuda.get_current_stream().ptr != 0:
            return None
        return lambda shape, dtype: as_numba(cupy.empty(shape, dtype))
    if module == "torch" and getattr(obj, "is_cuda", False):
        import torch

        if torch.cuda.current_stream(obj.device) != torch.cuda.default_stream(obj.device):
            return None
        device = obj.device

        def allocate(shape, dtype):
            torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
            return as_numba(torch.empty(shape, dtype=torch_dtype, device=device))

        return allocate
    return None


def _view(a, shape, strides, dtype=None):
    """A view of ``a``'s memory starting at its element 0 (shape/strides in bytes);
    ``dtype`` reinterprets the bytes (same itemsize)."""
    shape = tuple(int(s) for s in shape)
    strides = tuple(int(s) for s in strides)
    dtype = np.dtype(dtype or a.dtype)
    if SIMULATED:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        base = a._ary
        if dtype != base.dtype:
            base = np.lib.stride_tricks.as_strided(base, (1,), (base.dtype.itemsize,)).view(dtype)
        return FakeCUDAArray(np.lib.stride_tricks.as_strided(base, shape, strides), a.stream)
    return _NumbaArray(shape, strides, dtype, stream=0, gpu_data=a.gpu_data)


def _contiguous_strides(shape, itemsize):
    strides = []
    step = itemsize
    for s in reversed(shape):
        strides.append(step)
        step *= max(int(s), 1)
    return tuple(reversed(strides))


def _is_c_contiguous(shape, strides, itemsize) -> bool:
    step = itemsize
    for s, st in zip(reversed(shape), reversed(strides)):
        if s == 0:
            return True
        if s != 1 and st != step:
            return False
        step *= s
    return True


def _moved(a, axis: int):
    """View of ``a`` with ``axis`` moved last (no copy)."""
    order = [d for d in range(a.ndim) if d != axis] + [axis]
    return _view(a, [a.shape[d] for d in order], [a.strides[d] for d in order])


def _as_rows_view(a, n, c):
    return _view(a, (n, c), (c * a.dtype.itemsize, a.dtype.itemsize))


def _check_byte_order(a) -> None:
    if not a.dtype.isnative:
        raise TypeError(
            f"device arrays must be in native byte order; got dtype {a.dtype}. "
            "Convert it first (e.g. x.astype(x.dtype.newbyteorder('=')))"
        )


# --------------------------------------------------------------------------- copy kernels

_copy_kernels: dict = {}
_copy_lock = threading.Lock()
COPY_THREADS = 16 if SIMULATED else 256


def _copy_kernel(ndim: int):
    """dst[idx] = src[idx] for every idx of an ndim-d shape (any strides, with a cast).

    Generated per ndim (Numba needs the index count at compile time).  The flat index
    runs in C order over the shape, so a contiguous ``dst`` is written coalesced.
    """
    key = ndim
    with _copy_lock:
        if key in _copy_kernels:
            return _copy_kernels[key]
        idx = ", ".join(f"i{d}" for d in range(ndim))
        lines = [
            "def copy(src, dst, total):",
            "    prologue()",
            "    i = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x",
            "    step = np.int64(cuda.gridDim.x) * cuda.blockDim.x",
            "    while i < total:",
            "        rem = i",
        ]
        for d in range(ndim - 1, 0, -1):
            lines.append(f"        i{d} = rem % dst.shape[{d}]")
            lines.append(f"        rem = rem // dst.shape[{d}]")
        lines.append("        i0 = rem")
        lines.append(f"        dst[{idx}] = src[{idx}]")
        lines.append("        i += step")
        namespace = {"np": np, "cuda": cuda, "prologue": prologue}
        exec(compile("\n".join(lines), f"<xentfast copy kernel ndim={ndim}>", "exec"), namespace)
        kernel = jit()(namespace["copy"])
        _copy_kernels[key] = kernel
        return kernel


def copy_into(src, dst) -> None:
    """dst[...] = src[...] (same shape, any strides, any dtypes) on the device."""
    total = int(np.prod(dst.shape, dtype=np.int64))
    if total == 0:
        return
    if tuple(src.shape) != tuple(dst.shape):  # pragma: no cover - internal misuse
        raise ValueError(f"copy shape mismatch {src.shape} vs {dst.shape}")
    if src.ndim == 0:
        src, dst = _view(src, (1,), (src.dtype.itemsize,)), _view(dst, (1,), (dst.dtype.itemsize,))
    kernel = _copy_kernel(src.ndim)
    blocks = min((total + COPY_THREADS - 1) // COPY_THREADS, 65536 if not SIMULATED else 8)
    launch(kernel, blocks, COPY_THREADS, src, dst, np.int64(total))


def contiguous(a, dtype=None):
    """``a`` as a C-contiguous array of ``dtype``: itself if it already is, else a copy."""
    dtype = np.dtype(dtype or a.dtype)
    if a.dtype == dtype and _is_c_contiguous(a.shape, a.strides, a.dtype.itemsize):
        return a
    out = _empty(tuple(a.shape), dtype)
    copy_into(a, out)
    return out


# --------------------------------------------------------------------------- elementwise

# Modes of the elementwise kernel on C-contiguous (n, c) rows, flattened:
SOFTCAP = 0        # out = cap * tanh(x / cap)                (Gemma 2's soft-capping)
SOFTCAP_SLOPE = 1  # out = 1 / cosh^2(x / cap) = 1 - tanh^2 without its cancellation,
                   # as 4a / (1 + a)^2 with a = exp(-2 |x / cap|) in [0, 1]: no overflow
MULTIPLY = 2       # out = out * x


@jit()
def _elementwise(x, out, cap, mode, total):
    """One of the modes above for every element of the flat arrays x and out (out may
    be x); arithmetic in out's dtype.  ``total`` elements, a grid-stride loop."""
    prologue()
    i = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
    while i < total:
        if mode == MULTIPLY:
            out[i] = out[i] * x[i]
        else:
            u = x[i] / cap
            if mode == SOFTCAP:
                out[i] = cap * math.tanh(u)
            else:
                a = math.exp(-abs(u + u))
                one = cap / cap  # 1 in out's dtype (a literal would be float64)
                out[i] = (a + a + a + a) / ((one + a) * (one + a))
        i += step


def elementwise(x, out, cap: float, mode: int) -> None:
    """Run ``_elementwise`` over C-contiguous arrays of one shape."""
    total = int(np.prod(tuple(out.shape), dtype=np.int64))
    if total == 0:
        return
    flat_x = _view(x, (total,), (x.dtype.itemsize,))
    flat_out = _view(out, (total,), (out.dtype.itemsize,))
    blocks = min((total + COPY_THREADS - 1) // COPY_THREADS, 65536 if not SIMULATED else 8)
    launch(_elementwise, blocks, COPY_THREADS, flat_x, flat_out, out.dtype.type(cap),
           np.int64(mode), np.int64(total))


# --------------------------------------------------------------------------- reductions

REDUCE_THREADS = 2 if SIMULATED else 256
REDUCE_MAX_BLOCKS = 4 if SIMULATED else 1024


def _reduce_grid(n: int) -> int:
    """Blocks for an n-element reduction: a function of n alone (determinism)."""
    per_block = REDUCE_THREADS * 8
    return max(1, min(REDUCE_MAX_BLOCKS, (n + per_block - 1) // per_block))


@jit()
def _sum_partials(values, labels, weight, ignore_index, mode, partials):
    """Per-block float64 sums over a fixed contiguous chunk, in a fixed order.

    mode 0: sum values[i]; mode 1: sum weight[labels[i]] over labels that are kept and
    valid indices (labels outside [0, C) are skipped, never dereferenced).
    Thread t adds chunk elements t, t + T, ... in order; then a shared-memory tree
    (halving strides) combines the T thread sums; block b writes partials[b].
    """
    prologue()
    sh = cuda.shared.array(REDUCE_THREADS, np.float64)
    tid = cuda.threadIdx.x
    nb = np.int64(cuda.gridDim.x)
    b = np.int64(cuda.blockIdx.x)
    n = np.int64(values.shape[0]) if mode == 0 else np.int64(labels.shape[0])
    per = (n + nb - 1) // nb
    start = b * per
    stop = min(start + per, n)
    c = np.int64(weight.shape[0])
    acc = np.float64(0.0)
    i = start + tid
    while i < stop:
        if mode == 0:
            acc += np.float64(values[i])
        else:
            y = labels[i]
            if y != ignore_index and y >= 0 and y < c:
                acc += np.float64(weight[y])
        i += REDUCE_THREADS
    sh[tid] = acc
    cuda.syncthreads()
    step = REDUCE_THREADS // 2
    while step > 0:
        if tid < step:
            sh[tid] = sh[tid] + sh[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        partials[b] = sh[0]


@jit()
def _scan_labels(labels, num_classes, ignore_index, first_bad, kept):
    """Per block: the first row whose label is neither ignore_index nor in [0, C)
    (INT64_MAX if none) and the number of rows whose label is not ignore_index."""
    sh_bad = cuda.shared.array(REDUCE_THREADS, np.int64)
    sh_cnt = cuda.shared.array(REDUCE_THREADS, np.int64)
    tid = cuda.threadIdx.x
    nb = np.int64(cuda.gridDim.x)
    b = np.int64(cuda.blockIdx.x)
    n = np.int64(labels.shape[0])
    per = (n + nb - 1) // nb
    start = b * per
    stop = min(start + per, n)
    bad = np.int64(INT64_MAX)
    cnt = np.int64(0)
    i = start + tid
    while i < stop:
        y = labels[i]
        if y != ignore_index:
            cnt += 1
            if (y < 0 or y >= num_classes) and i < bad:
                bad = i
        i += REDUCE_THREADS
    sh_bad[tid] = bad
    sh_cnt[tid] = cnt
    cuda.syncthreads()
    step = REDUCE_THREADS // 2
    while step > 0:
        if tid < step:
            if sh_bad[tid + step] < sh_bad[tid]:
                sh_bad[tid] = sh_bad[tid + step]
            sh_cnt[tid] = sh_cnt[tid] + sh_cnt[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        first_bad[b] = sh_bad[0]
        kept[b] = sh_cnt[0]


@jit()
def _first_negative(values, first):
    """Per block: the first index i of its chunk with values[i] < 0 (else INT64_MAX)."""
    sh = cuda.shared.array(REDUCE_THREADS, np.int64)
    tid = cuda.threadIdx.x
    nb = np.int64(cuda.gridDim.x)
    b = np.int64(cuda.blockIdx.x)
    n = np.int64(values.shape[0])
    per = (n + nb - 1) // nb
    start = b * per
    stop = min(start + per, n)
    bad = np.int64(INT64_MAX)
    i = start + tid
    while i < stop:
        if values[i] < 0 and i < bad:
            bad = i
        i += REDUCE_THREADS
    sh[tid] = bad
    cuda.syncthreads()
    step = REDUCE_THREADS // 2
    while step > 0:
        if tid < step and sh[tid + step] < sh[tid]:
            sh[tid] = sh[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        first[b] = sh[0]


def device_key() -> int:
    """The current CUDA device (allocations belong to one device)."""
    return 0 if SIMULATED else host.cuda.current_context().device.id


_DUMMIES: dict = {}


def dummy(dtype, ndim: int = 1, size: int = 1):
    """A tiny device array standing in for an argument a kernel variant never reads
    (``size=0``: the empty weight vector meaning "no class weights"); one per device."""
    key = (device_key(), np.dtype(dtype).str, ndim, size)
    d = _DUMMIES.get(key)
    if d is None:
        d = _DUMMIES.setdefault(key, host.cuda.device_array((size,) * ndim, dtype=np.dtype(dtype)))
    return d


def _dummy(dtype):
    return dummy(dtype)


def device_total(values) -> float:
    n = values.shape[0]
    if n == 0:
        return 0.0
    blocks = _reduce_grid(n)
    partials = _empty(blocks, np.float64)
    launch(_sum_partials, blocks, REDUCE_THREADS, values, _dummy(np.int64), _dummy(np.float64),
           np.int64(0), np.int64(0), partials)
    parts = partials.copy_to_host()
    total = 0.0
    for p in parts:  # fixed order
        total += float(p)
    return total


def device_weight_total(labels, weight, ignore_index: int) -> float:
    n = labels.shape[0]
    if n == 0:
        return 0.0
    blocks = _reduce_grid(n)
    partials = _empty(blocks, np.float64)
    launch(_sum_partials, blocks, REDUCE_THREADS, _dummy(np.float64), labels, weight,
           np.int64(ignore_index), np.int64(1), partials)
    parts = partials.copy_to_host()
    total = 0.0
    for p in parts:  # fixed order
        total += float(p)
    return total


def device_first_negative(labels) -> int:
    """Index of the first negative entry of an int64 vector, or -1."""
    n = labels.shape[0]
    blocks = _reduce_grid(n)
    out = _empty(blocks, np.int64)
    launch(_first_negative, blocks, REDUCE_THREADS, labels, out)
    bad = int(out.copy_to_host().min())
    return -1 if bad == INT64_MAX else bad


def device_scan(labels, num_classes: int, ignore_index: int) -> tuple[int, int]:
    """(first bad row or -1, number of rows not equal to ignore_index)."""
    n = labels.shape[0]
    if n == 0:
        return -1, 0
    blocks = _reduce_grid(n)
    out = _empty((2, blocks), np.int64)
    launch(_scan_labels, blocks, REDUCE_THREADS, labels, np.int64(num_classes),
           np.int64(ignore_index), out[0], out[1])
    parts = out.copy_to_host()
    bad = int(parts[0].min())
    return (-1 if bad == INT64_MAX else bad), int(parts[1].sum())


# --------------------------------------------------------------------------- DEVICE


class DeviceArrays:
    """The array operations of ``xentfast._arrays.HostArrays``, for CUDA arrays."""

    on_device = True

    # -- inputs -------------------------------------------------------------------
    @staticmethod
    def start_call(*inputs) -> None:
        """Outputs of this call come from the memory pool of the first CuPy array or
        PyTorch tensor among ``inputs`` (logits first), else from Numba."""
        allocate = None
        for obj in inputs:
            if obj is not None and not isinstance(obj, np.ndarray) and not _is_numba(obj):
                allocate = _pool_allocator(obj)
                if allocate is not None:
                    break
        _call_allocator.allocate = allocate

    def asarray(self, obj):
        """NumPy arrays and CuPy/Numba device arrays as they are (so ``x is logits``
        holds for ``inplace``); other CUDA arrays (PyTorch) as Numba views; anything
        else as the host layer reads it (masked arrays and tensors NumPy cannot read are
        refused there, with the reason)."""
        if ((isinstance(obj, np.ndarray) and not isinstance(obj, np.ma.MaskedArray))
                or _is_numba(obj) or _is_cupy(obj)):
            return obj
        if _exports_interface(obj):
            return as_numba(obj)
        return HOST.asarray(obj)

    def to_rows(self, x, axis: int, dtype):
        dtype = np.dtype(dtype)
        if not is_device(x):
            return _upload(HOST.to_rows(np.asarray(x), axis, dtype))
        a = as_numba(x)
        _check_byte_order(a)
        v = _moved(a, axis)
        c = tuple(v.shape)[-1]
        n = int(np.prod(tuple(v.shape)[:-1], dtype=np.int64))
        if a.dtype == dtype and _is_c_contiguous(v.shape, v.strides, a.dtype.itemsize):
            return _as_rows_view(v, n, c)
        out = _empty((n, c), dtype)
        copy_into(v, _view(out, v.shape, _contiguous_strides(v.shape, dtype.itemsize)))
        return out

    def broadcast_to(self, x, shape):
        """View of ``x`` broadcast to ``shape`` (NumPy's rules: zero strides on the
        stretched axes, no copy); host arrays through NumPy."""
        if not is_device(x):
            return HOST.broadcast_to(np.asarray(x), shape)
        a = as_numba(x)
        shape = tuple(int(s) for s in shape)
        lead = len(shape) - a.ndim
        strides = [0] * lead + [
            0 if size == 1 and want != 1 else stride
            for size, want, stride in zip(a.shape, shape[lead:], a.strides)
        ]
        return _view(a, shape, strides)

    def softcap(self, rows, cap: float, out=None):
        out = _empty(tuple(rows.shape), rows.dtype) if out is None else out
        elementwise(rows, out, cap, SOFTCAP)
        return out

    def softcap_slope(self, rows, cap: float, out=None):
        out = _empty(tuple(rows.shape), rows.dtype) if out is None else out
        elementwise(rows, out, cap, SOFTCAP_SLOPE)
        return out

    def multiply_into(self, target, factor) -> None:
        elementwise(factor, target, 1.0, MULTIPLY)

    def label_rows(self, labels, num_classes=None, ignore_index=None):
        if not is_device(labels):
            return _upload(HOST.label_rows(np.asarray(labels), num_classes, ignore_index))
        a = as_numba(labels)
        _check_byte_order(a)
        size = int(np.prod(a.shape, dtype=np.int64))
        huge_possible = a.dtype.kind == "u" and a.dtype.itemsize == 8
        if huge_possible:  # read the bits as int64: ids above 2**63 - 1 become negative
            a = _view(a, a.shape, a.strides, np.int64)
        if a.dtype == np.int64 and _is_c_contiguous(a.shape, a.strides, 8):
            out = _view(a, (size,), (8,))
        else:
            out = _empty(size, np.int64)
            copy_into(a, _view(out, a.shape, _contiguous_strides(a.shape, 8)))
        if huge_possible and size:
            # uint64 ids above 2**63 - 1 are no class ids and must not meet a negative
            # ignore_index after wrapping: raise with the true value, as the host does.
            first = device_first_negative(out)
            if first >= 0:
                position = tuple(int(i) for i in np.unravel_index(first, tuple(a.shape)))
                value = int(out[first:first + 1].copy_to_host().view(np.uint64)[0])
                raise ValueError(_validate.out_of_range_message(value, position, None, None))
        return out

    def check_labels(self, labels, batch_shape, num_classes: int, ignore_index,
                     enabled: bool = True) -> int | None:
        """One device scan (first bad row, kept count) and one small read-back;
        ``enabled=False`` skips both (the kernels then give such rows NaN).  Returns the
        number of kept rows (the unweighted "mean" denominator: no second scan), or
        None when nothing was scanned."""
        if not enabled:
            return None
        labels = as_numba(labels)
        bad, kept = device_scan(labels, num_classes, ignore_index)
        if bad >= 0:
            value = int(labels[bad:bad + 1].copy_to_host()[0])
            position = tuple(int(i) for i in np.unravel_index(bad, tuple(batch_shape)))
            raise ValueError(
                _validate.out_of_range_message(value, position, num_classes, ignore_index)
            )
        return kept

    def weight_vector(self, weight, num_classes: int, dtype):
        dtype = np.dtype(dtype)
        if weight is None:
            return _empty(0, dtype)
        if not is_device(weight):
            return _upload(HOST.weight_vector(weight, num_classes, dtype))
        w = as_numba(weight)
        _validate.check_weight_dtype(w.dtype)
        _validate.check_weight_shape(tuple(w.shape), num_classes)
        _check_byte_order(w)
        return contiguous(w, dtype)

    def kept_weight_total(self, labels, weight, ignore_index: int,
                          kept_rows: int | None = None) -> float:
        labels = as_numba(labels)
        if weight.shape[0] == 0:
            if kept_rows is not None:
                return float(kept_rows)
            return float(device_scan(labels, 0, ignore_index)[1])
        return device_weight_total(labels, as_numba(weight), ignore_index)

    # -- outputs ------------------------------------------------------------------
    def empty(self, shape, dtype):
        return _empty(shape, dtype)

    def full(self, shape, value, dtype):
        return _upload(np.full(shape, value, dtype))

    def total(self, values) -> float:
        """Sum in float64, a fixed tree: bitwise identical run to run."""
        return device_total(as_numba(values))

    def scalar(self, value: float, dtype, like):
        dtype = np.dtype(dtype)
        if _is_cupy(like):
            import cupy

            return cupy.asarray(np.asarray(value, dtype=dtype))
        if is_device(like):
            return _upload(np.asarray(value, dtype=dtype))
        return dtype.type(value)

    def from_rows(self, rows, batch_shape, axis: int, dtype, like):
        dtype = np.dtype(dtype)
        if not is_device(like):
            return HOST.from_rows(rows.copy_to_host(), batch_shape, axis, dtype, like)
        batch_shape = tuple(int(s) for s in batch_shape)
        if rows.ndim == 1:
            out_shape = batch_shape
            src = _view(rows, out_shape, _contiguous_strides(out_shape, rows.dtype.itemsize))
        else:
            c = rows.shape[1]
            shaped = batch_shape + (c,)
            strides = _contiguous_strides(shaped, rows.dtype.itemsize)
            # Move the class axis (last in ``rows``) back to ``axis``.
            order = list(range(len(batch_shape)))
            order.insert(axis, len(batch_shape))
            out_shape = tuple(shaped[d] for d in order)
            src = _view(rows, out_shape, [strides[d] for d in order])
        if rows.dtype == dtype and _is_c_contiguous(src.shape, src.strides, dtype.itemsize):
            result = src
        else:
            result = _empty(out_shape, dtype)
            copy_into(src, result)
        return self._like(result, like)

    def rows_view(self, target, axis: int, dtype):
        if not is_device(target) or not self.is_writeable(target):
            return None
        a = as_numba(target)
        if a.dtype != np.dtype(dtype):
            return None
        v = _moved(a, axis)
        if not _is_c_contiguous(v.shape, v.strides, a.dtype.itemsize):
            return None
        n = int(np.prod(tuple(v.shape)[:-1], dtype=np.int64))
        return _as_rows_view(v, n, tuple(v.shape)[-1])

    def write_back(self, target, rows, axis: int) -> None:
        if not is_device(target):
            HOST.write_back(target, rows.copy_to_host(), axis)
            return
        dst = _moved(as_numba(target), axis)
        src = _view(rows, dst.shape, _contiguous_strides(dst.shape, rows.dtype.itemsize))
        copy_into(src, dst)

    def is_writeable(self, x) -> bool:
        if isinstance(x, np.ndarray):
            return HOST.is_writeable(x)
        if _is_numba(x):
            return bool(x._ary.flags.writeable) if SIMULATED else True
        desc = getattr(without_autograd(x), "__cuda_array_interface__", None)
        if desc is not None:
            return not desc["data"][1]
        return False

    @staticmethod
    def _like(result, like):
        if _is_cupy(like):
            import cupy

            return cupy.asarray(result)
        return result


DEVICE = DeviceArrays()
