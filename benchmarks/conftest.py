"""Fixtures of the pytest-benchmark suites (see ``test_bench_cross_entropy.py``).

The contenders, inputs and traffic model come from :mod:`xentfast._bench`, the timing
core that ``benchmarks/compare.py`` and ``python -m xentfast bench`` share.

Shapes: the four of BENCHMARKS.md by default; under ``--benchmark-disable`` (CI) tiny
ones, so the suite runs in seconds and only checks that every contender still runs;
``--bench-shapes 4096x32000,256x128000`` picks others.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

from xentfast import _bench

#: Tiny stand-ins for DEFAULT_SHAPES, same spirit (many rows, wide rows), for CI.
SMOKE_SHAPES: tuple[tuple[int, int], ...] = ((256, 10), (16, 1_000), (2, 32_000))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xentfast benchmarks")
    group.addoption("--bench-shapes", default=None, metavar="NxC[,NxC...]",
                    help="shapes to benchmark (default: the BENCHMARKS.md shapes, or tiny "
                         "ones under --benchmark-disable)")
    group.addoption("--bench-contenders", default=None, metavar="NAME[,NAME...]",
                    help="contenders to benchmark (default: every default contender; "
                         "unavailable ones are skipped with the reason); known: "
                         + ", ".join(_bench.contenders()))


def _shapes(config: pytest.Config) -> list[tuple[int, int]]:
    text = config.getoption("--bench-shapes")
    if text:
        return [_bench.parse_shape(part) for part in text.split(",")]
    return list(SMOKE_SHAPES if config.getoption("benchmark_disable") else _bench.DEFAULT_SHAPES)


def _contender_names(config: pytest.Config) -> list[str]:
    text = config.getoption("--bench-contenders")
    if text:
        return [name.strip() for name in text.split(",") if name.strip()]
    return [name for name, c in _bench.contenders().items() if c.default]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # scope="module": pytest groups the tests by shape, so only one shape's inputs
    # (up to half a gigabyte of logits) are alive at a time.
    if "shape" in metafunc.fixturenames:
        shapes = _shapes(metafunc.config)
        metafunc.parametrize("shape", shapes, ids=[f"{n}x{c}" for n, c in shapes],
                             scope="module")
    if "contender" in metafunc.fixturenames:
        metafunc.parametrize("contender", _contender_names(metafunc.config))


@pytest.fixture(scope="module")
def inputs(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Seeded float32 logits and int64 class labels for ``shape``."""
    return _bench.make_inputs(_bench.Case(*shape, op="loss"))


@pytest.fixture
def measure(benchmark: Any) -> Callable[[str, _bench.Case, tuple], object]:
    """``measure(contender, case, inputs)``: skip if it cannot run, warm up, benchmark,
    and record the traffic, GB/s and elements/s in ``extra_info``."""

    def run(name: str, case: _bench.Case, arrays: tuple) -> object:
        contender = _bench.contenders()[name]
        reason = contender.unavailable_reason()
        if reason is not None:
            pytest.skip(f"{name}: {reason}")
        if not contender.supports(case):
            pytest.skip(f"{name} does not implement {case.op!r}")
        x, y = arrays
        fn = contender.build(case, x, y if case.needs_labels else None)
        fn()  # warm-up: compilation, page faults, thread pools
        nbytes = contender.traffic_bytes(case)
        benchmark.group = case.group
        benchmark.extra_info.update(contender=name, kind=contender.kind, n=case.n, c=case.c,
                                    op=case.op, dtype=case.dtype, labels=case.labels,
                                    bytes=nbytes, elements=case.elements)
        result = benchmark(fn)
        if benchmark.stats:  # None under --benchmark-disable
            median = benchmark.stats.stats.median
            benchmark.extra_info["GB/s"] = nbytes / median / 1e9
            benchmark.extra_info["elements/s"] = case.elements / median
        return result

    return run
