"""Fixtures of the pytest-benchmark suites (see ``test_bench_cross_entropy.py``).

The contenders, inputs and traffic model come from :mod:`harness` (``benchmarks/harness/``),
the registry that ``benchmarks/compare.py`` and ``benchmarks/gpu_check.py`` use too.
The pytest suites' line-up is ``harness.lineup("suite")``'s contenders, unavailable ones
included (they are skipped with the reason).

Shapes: the four of BENCHMARKS.md by default; under ``--benchmark-disable`` (CI) tiny
ones, so the suite runs in seconds and only checks that every contender still runs;
``--bench-shapes 4096x32000,256x128000`` picks others.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

import harness

#: Tiny stand-ins for DEFAULT_SHAPES, same spirit (many rows, wide rows), for CI.
SMOKE_SHAPES: tuple[tuple[int, int], ...] = ((256, 10), (16, 1_000), (2, 32_000))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xentfast benchmarks")
    group.addoption("--bench-shapes", default=None, metavar="NxC[,NxC...]",
                    help="shapes to benchmark (default: the BENCHMARKS.md shapes, or tiny "
                         "ones under --benchmark-disable)")
    group.addoption("--bench-contenders", default=None, metavar="NAME[,NAME...]",
                    help="contenders to benchmark (default: the suites' line-up, "
                         "Contender.in_suite; unavailable ones are skipped with the "
                         "reason); known: "
                         + ", ".join(harness.contenders()))


def _shapes(config: pytest.Config) -> list[tuple[int, int]]:
    text = config.getoption("--bench-shapes")
    if text:
        return [harness.parse_shape(part) for part in text.split(",")]
    return list(SMOKE_SHAPES if config.getoption("benchmark_disable") else harness.DEFAULT_SHAPES)


def _contender_names(config: pytest.Config) -> list[str]:
    text = config.getoption("--bench-contenders")
    if text:
        return [name.strip() for name in text.split(",") if name.strip()]
    return [name for name, c in harness.contenders().items() if c.in_suite]


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
    return harness.make_inputs(harness.Case(*shape, op="loss"))


@pytest.fixture
def measure(benchmark: Any) -> Callable[[str, harness.Case, tuple], object]:
    """``measure(contender, case, inputs)``: skip if it cannot run, warm up, benchmark,
    and record the traffic, GB/s and elements/s in ``extra_info``."""

    def run(name: str, case: harness.Case, arrays: tuple) -> object:
        contender = harness.contenders()[name]
        try:
            fn = harness.prepare(name, case, *arrays)
        except harness.Skip as exc:
            pytest.skip(f"{name}: {exc}")
        fn()  # warm-up: compilation, page faults, thread pools
        nbytes = contender.traffic_bytes(case)
        benchmark.group = case.group
        benchmark.extra_info.update(contender=name, kind=contender.kind, n=case.n, c=case.c,
                                    op=case.op, dtype=case.dtype, labels=case.labels,
                                    bytes=nbytes, elements=case.elements,
                                    yardstick=contender.yardstick(case))
        result = benchmark(fn)
        if benchmark.stats:  # None under --benchmark-disable
            median = benchmark.stats.stats.median
            benchmark.extra_info["GB/s"] = nbytes / median / 1e9
            benchmark.extra_info["elements/s"] = case.elements / median
        return result

    return run
