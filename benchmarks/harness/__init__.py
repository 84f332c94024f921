"""The benchmark harness of xentfast (a source-checkout tool; not installed).

One contender registry, one traffic model, one way of timing, used by every report:

- ``benchmarks/test_bench_*.py`` (pytest-benchmark, in-process, grouped tables),
- ``benchmarks/compare.py`` (the table of record: each contender in its own process,
  alternating over rounds, medians after a warm-up),
- ``benchmarks/gpu_check.py`` (CUDA-event timings on a GPU; same traffic model and
  yardstick ratios, its own device-side rows).

Modules: :mod:`.registry` (cases, traffic, contenders and the all-core yardsticks),
:mod:`.runner` (processes, rounds, memory and cold-start measurements; why not pyperf),
:mod:`.report` (ratios and Markdown tables).  The pieces ``python -m xentfast bench``
needs too (traffic model, yardsticks, timing loop, environment) live in
:mod:`xentfast.__main__`, once, and are re-exported here.
"""

from xentfast.__main__ import environment, time_call, traffic_bytes, yardstick_for

from .registry import (
    ALL_OPS,
    DEFAULT_SHAPES,
    DTYPES,
    HALF_DTYPES,
    LABEL_KINDS,
    OPS,
    PRIMITIVE_OPS,
    Case,
    Contender,
    Skip,
    contenders,
    lineup,
    make_inputs,
    parse_shape,
    prepare,
)
from .report import add_ratios, format_coldstart_table, format_memory_table, format_time_table
from .runner import compare, measure_coldstart, measure_memory, record, thread_env

__all__ = [
    "ALL_OPS", "DEFAULT_SHAPES", "DTYPES", "HALF_DTYPES", "LABEL_KINDS", "OPS",
    "PRIMITIVE_OPS", "Case", "Contender", "Skip", "add_ratios", "compare", "contenders",
    "environment", "format_coldstart_table", "format_memory_table", "format_time_table",
    "lineup", "make_inputs", "measure_coldstart", "measure_memory", "parse_shape",
    "prepare", "record", "thread_env", "time_call", "traffic_bytes", "yardstick_for",
]
