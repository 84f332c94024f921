"""Accuracy report: ulp errors of every xentfast backend and of the peers, against the
exact oracle, on the adversarial data sets of the test suite.

For each contender (every available xentfast backend; PyTorch ``F.cross_entropy`` with
autograd, TensorFlow's fused ``SparseSoftmaxCrossEntropyWithLogits`` op -- the kernel
behind ``tf.nn.sparse_softmax_cross_entropy_with_logits`` and its gradient -- and
JAX/optax ``softmax_cross_entropy_with_integer_labels`` with ``jax.grad``, each where
installed; and the textbook NumPy formulas as a baseline), data set
(``tests/helpers.py``'s ``ACCURACY_KINDS``) and dtype, it prints the maximum and the
median error, in ulps of the output dtype, of

    loss      per-row loss, index labels                  (bound 32 ulps; float64 1e-12)
    lse       log-sum-exp                                 (bound 4)
    log_sm    log_softmax                                 (bound 32)
    softmax   softmax                                     (bound 4)
    grad      every element of d(sum of losses)/d(logits) (bound 64)
    grad[y]   its true-class elements p_y - 1 alone       (bound 64)

as Markdown, one row per contender and data set, each cell ``max / median``; a cell
over xentfast's bound (DESIGN.md, "Accuracy") is in bold, and ``inf`` means a
non-finite result where the exact one is finite (or the reverse).  Errors are measured
as in ``tests/test_accuracy.py``: |got - exact| / ulp(ref), ref = |exact|, or the
magnitude of the terms where the exact value is a genuine near-zero crossing.  The
float64 loss column is in ulps too (1e-12 relative is about 4500 ulps).

Usage::

    python benchmarks/accuracy_report.py                 # every data set, float32 + float64
    python benchmarks/accuracy_report.py --quick         # small sizes (seconds)
    python benchmarks/accuracy_report.py --dtypes float32 --kinds confident,ties
    python benchmarks/accuracy_report.py --backends cpu,numpy --no-peers
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the oracle and the data generator
try:
    import xentfast as xf
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, ROOT)
    import xentfast as xf

import naive  # noqa: E402  (tests/naive.py: the exact oracle)
from helpers import ACCURACY_KINDS, LOSS_RTOL_FLOAT64, ULPS, accuracy_case  # noqa: E402

QUANTITIES = ("loss", "lse", "log_softmax", "softmax", "grad", "grad[y]")
HEADS = {"loss": "loss", "lse": "lse", "log_softmax": "log_sm", "softmax": "softmax",
         "grad": "grad", "grad[y]": "grad[y]"}
BOUNDS = dict(ULPS, **{"grad[y]": ULPS["grad"]})  # the test suite's bounds
BOUND_LOSS_FLOAT64 = LOSS_RTOL_FLOAT64  # relative

#: (rows, classes) per data set: the test suite's host sizes, and small ones (--quick).
FULL_SHAPES = {
    "normal": (40, 1000), "confident": (16, 1000), "ties": (12, 8), "offset": (12, 100),
    "huge": (12, 16), "masked": (12, 300), "mixed": (24, 64), "long": (2, 100_000),
}
QUICK_SHAPES = {
    "normal": (8, 100), "confident": (8, 100), "ties": (12, 8), "offset": (6, 32),
    "huge": (6, 16), "masked": (6, 64), "mixed": (12, 16), "long": (1, 20_000),
}

Results = dict  # quantity -> ndarray


@dataclass(frozen=True)
class Contender:
    name: str
    run: Callable[[np.ndarray, np.ndarray], Results]  # (logits, labels) -> results


# ----------------------------------------------------------------------- contenders


def _xentfast(backend: str) -> Contender:
    def run(x, y):
        loss, grad, lse = xf.cross_entropy_with_grad(x, y, reduction="none", return_lse=True,
                                                     backend=backend)
        return {"loss": loss, "lse": lse, "grad": grad,
                "log_softmax": xf.log_softmax(x, backend=backend),
                "softmax": xf.softmax(x, backend=backend)}
    return Contender(f"xentfast-{backend}", run)


def _textbook(x, y):
    """What a straightforward NumPy implementation computes (the baseline)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = x.max(axis=1, keepdims=True)
        e = np.exp(x - m)
        s = e.sum(axis=1, keepdims=True)
        lse = (m + np.log(s))[:, 0]
        rows = np.arange(x.shape[0])
        p = e / s
        grad = p.copy()
        grad[rows, y] -= 1
        return {"loss": lse - x[rows, y], "lse": lse, "grad": grad,
                "log_softmax": x - lse[:, None], "softmax": p}


def _quiet_import(name: str):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return __import__(name, fromlist=["_"])
        except Exception:  # not installed, or broken: not a contender
            return None


def _torch() -> Contender | None:
    torch = _quiet_import("torch")
    if torch is None:
        return None
    F = torch.nn.functional

    def run(x, y):
        t = torch.from_numpy(np.array(x)).requires_grad_(True)
        loss = F.cross_entropy(t, torch.from_numpy(y), reduction="none")
        loss.sum().backward()
        xt = torch.from_numpy(np.array(x))
        return {"loss": loss.detach().numpy(), "grad": t.grad.numpy(),
                "lse": torch.logsumexp(xt, dim=-1).numpy(),
                "log_softmax": F.log_softmax(xt, dim=-1).numpy(),
                "softmax": F.softmax(xt, dim=-1).numpy()}
    return Contender(f"torch-{torch.__version__.split('+')[0]}", run)


def _tensorflow() -> Contender | None:
    tf = _quiet_import("tensorflow")
    if tf is None:
        return None

    def run(x, y):
        xt = tf.constant(x)
        # the fused op: (per-row loss, gradient of their sum) -- what tf.nn's sparse
        # cross-entropy and its registered gradient run
        loss, backprop = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(
            features=xt, labels=tf.constant(y))
        return {"loss": loss.numpy(), "grad": backprop.numpy(),
                "lse": tf.reduce_logsumexp(xt, axis=-1).numpy(),
                "log_softmax": tf.nn.log_softmax(xt, axis=-1).numpy(),
                "softmax": tf.nn.softmax(xt, axis=-1).numpy()}
    return Contender(f"tensorflow-{tf.__version__}", run)


def _jax() -> Contender | None:
    jax = _quiet_import("jax")
    if jax is None:
        return None
    jax.config.update("jax_enable_x64", True)  # else float64 inputs become float32
    optax = _quiet_import("optax")
    jnp = jax.numpy

    def xent(logits, labels):
        if optax is not None:
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        log_p = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]

    grad_of_sum = jax.grad(lambda logits, labels: xent(logits, labels).sum())

    def run(x, y):
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        return {"loss": np.asarray(xent(xj, yj)), "grad": np.asarray(grad_of_sum(xj, yj)),
                "lse": np.asarray(jax.nn.logsumexp(xj, axis=-1)),
                "log_softmax": np.asarray(jax.nn.log_softmax(xj, axis=-1)),
                "softmax": np.asarray(jax.nn.softmax(xj, axis=-1))}
    name = "jax" + ("/optax" if optax is not None else "") + f"-{jax.__version__}"
    return Contender(name, run)


PEERS = {"torch": _torch, "tensorflow": _tensorflow, "jax": _jax}


# ----------------------------------------------------------------------- measuring


def ulp_errors(got, exact: naive.Exact, dtype) -> np.ndarray:
    """|got - exact| / ulp(ref) per element, in the output dtype (float32 for 16-bit);
    ref = |exact|, or the terms' scale at a genuine near-zero crossing.  inf where one
    side is finite and the other is not; 0 where both are the same non-finite value."""
    work = np.dtype(np.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)
    g = np.asarray(got).astype(np.float64)
    value, low, scale = exact.value, exact.low, exact.scale
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        rounded = value.astype(work).astype(np.float64)
        special = ~np.isfinite(rounded)
        cross = np.nan_to_num(scale, nan=0.0, posinf=0.0) > np.abs(value) * (1 + 2.0 ** -20)
        ref = np.where(cross, scale, np.abs(value))
        ulp = np.spacing(np.where(special, 0.0, ref).astype(work)).astype(np.float64)
        err = np.abs((g - value) - low) / ulp
        same = np.where(np.isnan(rounded), np.isnan(g), g == rounded)
        out = np.where(special, np.where(same, 0.0, np.inf),
                       np.where(np.isfinite(g), err, np.inf))
    return out


def _summary(errors: np.ndarray) -> tuple[float, float]:
    errors = errors.reshape(-1)
    if errors.size == 0:
        return 0.0, 0.0
    return float(np.max(errors)), float(np.median(errors))


def _fmt(v: float) -> str:
    if not np.isfinite(v):
        return "inf"
    if v == 0:
        return "0"
    if v < 10:
        return f"{v:.2g}"
    return f"{v:.3g}" if v < 1e4 else f"{v:.1e}"


def _cell(q: str, mx: float, med: float, dtype) -> str:
    bound = BOUNDS[q]
    if q == "loss" and np.dtype(dtype) == np.float64:
        bound = BOUND_LOSS_FLOAT64 / np.finfo(np.float64).eps  # ~4500 ulps (at 1 ulp = eps)
    text = f"{_fmt(mx)} / {_fmt(med)}"
    return f"**{text}**" if mx > bound else text


def exact_results(x: np.ndarray, y: np.ndarray) -> dict:
    res = naive.exact_cross_entropy(x, y)
    return {"loss": res["loss"], "lse": res["lse"], "grad": res["grad"],
            "log_softmax": naive.exact_primitive(x, "log_softmax"),
            "softmax": naive.exact_primitive(x, "softmax")}


def measure(contender: Contender, x, y, exact: dict) -> dict:
    """quantity -> (max, median) ulps, or a string saying why it could not run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = contender.run(x, y)
    except Exception as exc:  # a peer that rejects the dtype, say
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
    out = {}
    rows = np.arange(x.shape[0])
    for q in QUANTITIES:
        if q == "grad[y]":
            g = np.asarray(got["grad"])[rows, y]
            ex = exact["grad"]
            part = naive.Exact(ex.value[rows, y], ex.low[rows, y], ex.scale[rows, y])
            out[q] = _summary(ulp_errors(g, part, x.dtype))
        else:
            out[q] = _summary(ulp_errors(got[q], exact[q], x.dtype))
    return out


# ----------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data sets (seconds)")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--kinds", default=",".join(ACCURACY_KINDS),
                        help=f"data sets, of: {', '.join(ACCURACY_KINDS)}")
    parser.add_argument("--backends", default=None,
                        help="xentfast backends (default: available_backends(), without a "
                             "simulated cuda)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="peer libraries to include where installed")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        backends = [b for b in xf.available_backends() if not (b == "cuda" and simulated)]
    contenders = [_xentfast(b) for b in backends]
    skipped = []
    if not args.no_peers:
        for name in [p.strip() for p in args.peers.split(",") if p.strip()]:
            peer = PEERS[name]()
            if peer is None:
                skipped.append(name)
            else:
                contenders.append(peer)
    contenders.append(Contender("textbook-numpy", _textbook))
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]

    print("# xentfast accuracy report\n")
    print(f"xentfast {xf.__version__}; numpy {np.__version__}; Python "
          f"{sys.version.split()[0]}; {'quick' if args.quick else 'full'} data sets; "
          f"seed {args.seed}" + (f"; not installed: {', '.join(skipped)}" if skipped else ""))
    print("\nEach cell: max / median error in ulps of the output dtype against the exact "
          "oracle (tests/naive.py); **bold**: over xentfast's bound "
          f"({', '.join(f'{HEADS[q]} {BOUNDS[q]}' for q in QUANTITIES)}; float64 loss "
          "1e-12 relative).  Data sets (tests/helpers.py ACCURACY_KINDS):\n")
    for k in kinds:
        print(f"- `{k}` {shapes[k][0]}x{shapes[k][1]}: {ACCURACY_KINDS[k]}")
    started = time.perf_counter()
    for dtype_name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        dtype = np.dtype(dtype_name)
        print(f"\n## {dtype_name}\n")
        print("| contender | data | " + " | ".join(HEADS[q] for q in QUANTITIES) + " |")
        print("|---|---|" + "---:|" * len(QUANTITIES))
        for kind in kinds:
            if kind == "long" and dtype.itemsize == 2:
                continue
            n, c = shapes[kind]
            rng = np.random.default_rng([args.seed, sum(map(ord, kind)), dtype.itemsize])
            case = accuracy_case(rng, kind, n, c, dtype)
            exact = exact_results(case.x, case.y)
            for contender in contenders:
                res = measure(contender, case.x, case.y, exact)
                if "error" in res:
                    cells = [f"not run: {res['error']}"] + [""] * (len(QUANTITIES) - 1)
                else:
                    cells = [_cell(q, *res[q], dtype) for q in QUANTITIES]
                print(f"| {contender.name} | {kind} | " + " | ".join(cells) + " |")
            sys.stdout.flush()
    print(f"\n({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
