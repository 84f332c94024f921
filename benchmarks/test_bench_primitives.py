"""pytest-benchmark suite: the fused primitives ``softmax``, ``log_softmax``, ``logsumexp``.

Same contenders, shapes, options and usage as ``test_bench_cross_entropy.py`` (its
docstring lists them); ``tf-raw`` has no primitive and is skipped.  GB/s counts the
logits read plus the ``(n, c)`` output written (``logsumexp`` writes only ``n`` values).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

import harness


@pytest.mark.parametrize("op", harness.PRIMITIVE_OPS)
def test_primitive(measure: Callable, shape: tuple[int, int],
                   inputs: tuple[np.ndarray, np.ndarray], contender: str, op: str) -> None:
    measure(contender, harness.Case(*shape, op=op), inputs)
