"""pytest-benchmark suite: softmax cross-entropy, xentfast backends vs peers.

Contenders (``harness.lineup("suite")``, from ``benchmarks/harness/registry.py``): every
xentfast backend available here (``xentfast-cpu``, ``xentfast-cython``, ``xentfast-numpy``;
``xentfast-cuda`` only on a real GPU), plain NumPy written the straightforward way
(``numpy-plain``), PyTorch ``F.cross_entropy`` forward / forward+backward (``torch``),
TensorFlow ``tf.nn.sparse_softmax_cross_entropy_with_logits`` (``tf``) and its fused raw
op (``tf-raw``, loss+grad only), JAX/optax under ``jit`` (``jax``), and the yardsticks:
``copy-par`` (the logits copied by every core, for loss+grad), ``read-par`` (the logits'
bytes summed by every core, for loss-only) and ``copy-1t`` (``np.copyto`` on one
thread).  Peers that are not installed are skipped with the reason.

Shapes 1_000_000x10, 65_536x1_000, 4_096x32_000, 256x128_000; float32 logits, int64
class labels; operations ``loss`` (mean loss) and ``loss+grad`` (mean loss and its
gradient).  Groups are operation x shape.  ``extra_info`` holds ``bytes`` (the harness's
traffic model: logits read + labels read + gradient written; the copy counts read +
write), ``GB/s``, ``elements/s`` and the row's ``yardstick``.

All contenders share one process here, so a peer's spinning thread pool can slow the
test after it; ``benchmarks/compare.py`` (one process per contender, several rounds)
gives the authoritative numbers.

Usage
-----
Full run (minutes; the numbers)::

    pytest benchmarks/ --benchmark-columns=median,ops,rounds --benchmark-sort=name

CI smoke (seconds; tiny shapes, every contender called once, nothing timed)::

    pytest benchmarks/ --benchmark-disable

Save a run, then compare a later one against it (``0001`` is the saved run's number
under ``.benchmarks/``; ``--benchmark-compare`` alone compares with the latest)::

    pytest benchmarks/ --benchmark-autosave
    pytest benchmarks/ --benchmark-compare=0001 --benchmark-compare-fail=median:10%

Narrower runs::

    pytest benchmarks/ --bench-shapes 4096x32000 --bench-contenders xentfast-cpu,torch
    pytest benchmarks/ -k "loss+grad and 4096x32000"

Plot a saved run: ``python benchmarks/plot.py .benchmarks/*/0001_*.json -o bench.png``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

import harness


@pytest.mark.parametrize("op", harness.OPS)
def test_cross_entropy(measure: Callable, shape: tuple[int, int],
                       inputs: tuple[np.ndarray, np.ndarray], contender: str, op: str) -> None:
    measure(contender, harness.Case(*shape, op=op), inputs)
