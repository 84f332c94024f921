"""Backend ``cython``: the compiled kernels of ``_cython.pyx`` behind the contract's API.

The extension ``xentfast.backends._cython`` (Cython + OpenMP, built by ``setup.py``;
optional) does the work; this module gives it exactly the signatures of the kernel
contract in ``xentfast/backends/__init__.py`` and turns the extension's count of
out-of-range class ids into the ``ValueError`` the rest of xentfast raises.  (The public
layer checks labels before any kernel runs, so that normally never fires; the extension
itself never indexes with a bad label.)

Importing this module raises ``ImportError`` with the reason when the extension was not
built.
"""

from __future__ import annotations

import numpy as np


try:
    from xentfast.backends import _cython as _ext
except ImportError as exc:  # pragma: no cover - depends on how xentfast was installed
    raise ImportError(
        "the Cython backend is unavailable: the compiled extension "
        f"xentfast.backends._cython cannot be imported ({exc}). It is built by setup.py "
        "at install time when a C compiler, Cython>=3.0 and NumPy are present; a failed "
        "build only warns. Reinstall from source (`pip install -v .`, or "
        "`python setup.py build_ext --inplace` in a checkout) and read the warning, or "
        "set XENTFAST_REQUIRE_CYTHON=1 to make a failed build an error."
    ) from exc

# A child forked after any OpenMP region ran (this backend's or the cpu backend's)
# must not enter one (libgomp would deadlock): it runs the kernels single-threaded --
# the extension registers itself with xentfast._forkguard when imported.

NAME = "cython"
NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: 16-bit logits that ``sparse`` and ``dense`` read natively (``half=`` names them for
#: uint16 arrays of raw bits, e.g. PyTorch bfloat16 memory): float32 arithmetic, the
#: gradient rounded once into the input's format -- bitwise the float32 kernel on the
#: upcast logits (with NumPy's / ml_dtypes' casts), without an (n, c) float32 copy.
NATIVE_HALF = ("float16", "bfloat16")

#: True when the row passes were compiled as target_clones (SSE2 / AVX2+FMA / AVX-512).
MULTIVERSIONED = _ext.MULTIVERSIONED
#: The calling thread's OpenMP thread cap (``max_threads()``) and its setter
#: (``set_max_threads(k)``, per calling thread, as ``omp_set_num_threads``).
max_threads = _ext.max_threads
set_max_threads = _ext.set_max_threads
#: The benchmarks' ``exp-par`` yardstick (``exp_floor(elements)``: the kernels' float32
#: pass 2 over that many values from an L1-resident block, on every core).
exp_floor = _ext.exp_floor


def _c1(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


def _raise_bad_labels(labels: np.ndarray, num_classes: int, ignore_index: int) -> None:
    ids = np.asarray(labels).reshape(-1)
    bad = ((ids < 0) | (ids >= num_classes)) & (ids != ignore_index)
    first = int(np.flatnonzero(bad)[0])
    try:
        from xentfast._validate import out_of_range_message
    except ImportError:  # pragma: no cover - the shim used on its own
        raise ValueError(
            f"labels[{first}] = {int(ids[first])} is outside the valid range "
            f"[0, {num_classes}) of class indices (and is not ignore_index={ignore_index}); "
            "class indices must lie in [0, num_classes), mark entries to skip with "
            "ignore_index"
        ) from None
    raise ValueError(out_of_range_message(int(ids[first]), (first,), num_classes, ignore_index))


def _into(out: np.ndarray, compute) -> None:
    """Run ``compute(dst)`` on ``out`` itself when it is C-contiguous, else on a copy."""
    if out.flags.c_contiguous:
        compute(out)
    else:  # pragma: no cover - the public layer allocates contiguous outputs
        tmp = np.empty(out.shape, out.dtype)
        compute(tmp)
        out[...] = tmp


def _half_bits(a, name: str, what: str) -> np.ndarray:
    """a (dtype `name`, or uint16 holding its bits) as a uint16 view; no copy."""
    if a.dtype == np.uint16 or a.dtype.name == name:
        return a.view(np.uint16)
    raise TypeError(f"{what} must have the logits' 16-bit format {name} (or uint16 bits); "
                    f"got {a.dtype}")


def _half_args(logits, grad, labels, half):
    """(logits, grad, labels, format code): the 16-bit operands as uint16 views and
    the extension's code for their format; code 0 and the operands unchanged when the
    logits are not 16-bit.  A bfloat16 dtype is recognised by its name (ml_dtypes is
    never imported here)."""
    if half is None:
        name = logits.dtype.name
        if name not in NATIVE_HALF:
            return logits, grad, labels, 0
    elif half in NATIVE_HALF:
        name = half
    else:
        raise ValueError(f"half must be one of {NATIVE_HALF} or None; got {half!r}")
    logits = _half_bits(logits, name, "logits")
    if grad is not None:
        grad = _half_bits(grad, name, "grad")
    if labels is not None:
        labels = _half_bits(labels, name, "dense labels")
    return logits, grad, labels, _ext.HALF_CODES[name]


def sparse(logits, labels, weight, ignore_index, label_smoothing, z_loss, grad_scale,
           loss, lse, grad, *, half=None):
    """Index labels: fill loss (n,), lse (n,) and, unless None, grad (n, c).

    16-bit logits (float16, ml_dtypes bfloat16, or uint16 bits with ``half`` =
    "float16" / "bfloat16"): grad in the same format, loss / lse / weight float32."""
    logits, grad, _, code = _half_args(logits, grad, None, half)
    labels = np.asarray(labels, dtype=np.int64)
    if not (loss.flags.c_contiguous and lse.flags.c_contiguous):
        loss_c, lse_c = np.empty_like(loss), np.empty_like(lse)  # pragma: no cover
    else:
        loss_c, lse_c = loss, lse
    bad = _ext.sparse(logits, labels, _c1(weight), int(ignore_index), float(label_smoothing),
                      float(z_loss), float(grad_scale), loss_c, lse_c, grad, code)
    if loss_c is not loss:  # pragma: no cover
        loss[...], lse[...] = loss_c, lse_c
    if bad:
        _raise_bad_labels(labels, logits.shape[1], int(ignore_index))


def dense(logits, labels, weight, label_smoothing, z_loss, grad_scale, loss, lse, grad, *,
          half=None):
    """Probability labels: fill loss (n,), lse (n,) and, unless None, grad (n, c).

    16-bit logits as for ``sparse``; the labels then have the logits' 16-bit format."""
    logits, grad, labels, code = _half_args(logits, grad, _c1(labels), half)
    if not (loss.flags.c_contiguous and lse.flags.c_contiguous):
        loss_c, lse_c = np.empty_like(loss), np.empty_like(lse)  # pragma: no cover
    else:
        loss_c, lse_c = loss, lse
    _ext.dense(logits, labels, _c1(weight), float(label_smoothing), float(z_loss),
               float(grad_scale), loss_c, lse_c, grad, code)
    if loss_c is not loss:  # pragma: no cover
        loss[...], lse[...] = loss_c, lse_c


def logsumexp(x, out):
    """out (n,) = log(sum(exp(x), axis=1))."""
    _into(out, lambda dst: _ext.logsumexp(x, dst))


def log_softmax(x, out):
    """out (n, c) = x - logsumexp(x)[:, None]."""
    _into(out, lambda dst: _ext.log_softmax(x, dst))


def softmax(x, out):
    """out (n, c) = exp(x - logsumexp(x)[:, None])."""
    _into(out, lambda dst: _ext.softmax(x, dst))
