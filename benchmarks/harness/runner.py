"""Side-by-side timing: every contender in its own process, alternating, over rounds.

One round runs, for each shape, every contender once, each in a fresh Python process
(``python -m harness SPEC``) that imports its library, builds the inputs, makes
a warm-up call, then times every operation of that shape (:func:`time_call`: samples
until ``repeats`` are done and ``target_s`` has passed) and prints its medians.  The
order of the contenders is rotated by one each round, so none always follows the same
neighbour; a row's time is the median across rounds of its per-process medians.
Processes run one at a time: peers' thread pools keep spinning after their work and
would slow whatever ran next in the same process, or beside it.

Why not pyperf
--------------
pyperf does process-per-run, loop calibration and metadata, and we looked at driving
it.  Its ``Runner`` finishes all processes of one benchmark before starting the next, so
contenders do not alternate (a slow spell of a shared machine lands on whichever
contender is running); making each round a separate ``Runner`` invocation with
``--processes 1`` costs two interpreters per (contender, operation, round) plus a
calibration process per benchmark, and one worker cannot time both operations of a
shape.  With TensorFlow (4-5 s to import on this 2-core machine) and PyTorch in the
line-up, that is most of a 10-minute budget spent importing.  What remains here is
small: one process per (contender, shape, round), the ``@@`` result line, the median of
medians; the timing loop itself is :func:`xentfast.__main__.time_call` (a warm-up call,
then samples of ``number`` calls sized to last >= 2 ms, garbage collector off).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, replace
from typing import Any, Callable, Sequence

from xentfast.__main__ import environment, time_call

from .registry import UNSUPPORTED, Case, Skip, contenders, make_inputs, prepare

MARK = "@@xentfast-harness"
HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCHMARKS)

__all__ = ["compare", "environment", "measure_coldstart", "measure_memory", "record",
           "thread_env"]


def record(name: str, case: Case, **fields: Any) -> dict[str, Any]:
    """A result record: the contender, the case, its traffic and yardstick, ``fields``."""
    contender = contenders()[name]
    rec = {"contender": name, "kind": contender.kind, "device": contender.device,
           **asdict(case), "bytes": contender.traffic_bytes(case),
           "yardstick": contender.yardstick(case), "status": "ok", "reason": ""}
    rec.update(fields)
    return rec


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables capping every library's compute threads at ``threads``
    (OpenMP, Numba, BLAS, TensorFlow; JAX/XLA only for 1)."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1; got {threads}")
    env = {var: str(threads) for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                                         "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                         "TF_NUM_INTRAOP_THREADS")}
    env["TF_NUM_INTEROP_THREADS"] = "1"
    if threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


def _child_env(*extras: dict[str, str] | None) -> dict[str, str]:
    """A worker's environment: this checkout's xentfast and harness first, peers quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, BENCHMARKS, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for extra in extras:
        env.update(extra or {})
    return env


# ----------------------------------------------------------------- worker side


def _describe(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)
    place = f" (at {os.path.basename(where[-1].filename)}:{where[-1].lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300] + place


def _time_cases(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Worker: time ``spec["contender"]`` on each case (cases share their inputs)."""
    name, timing = spec["contender"], spec.get("timing", {})
    inputs: dict[Case, tuple] = {}
    records = []
    for case in (Case(**c) for c in spec["cases"]):
        key = replace(case, op="loss")
        try:
            if key not in inputs:
                inputs.clear()  # one shape's inputs alive at a time
                inputs[key] = make_inputs(key, seed=spec.get("seed", 0))
            fn = prepare(name, case, *inputs[key])
            fn()  # warm-up: compilation, page faults, thread pools
            times = time_call(fn, warmup=False, **timing)
        except Skip as exc:
            records.append(record(name, case, status="skipped", reason=str(exc)))
            continue
        except Exception as exc:  # reported to the parent, which carries on
            records.append(record(name, case, status="error", reason=_describe(exc)))
            continue
        median = statistics.median(times)
        rec = record(name, case, times_s=times, median_s=median)
        rec.update(gbps=rec["bytes"] / median / 1e9, elements_per_s=case.elements / median)
        records.append(rec)
    return records


def _peak_rss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss()


def _memory_case(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Worker: peak RSS of one call above the RSS just before it.  Compiles on a small
    case with the same row length first, so neither the JIT nor imports set the peak."""
    name = spec["contender"]
    (case,) = (Case(**c) for c in spec["cases"])
    try:
        tiny = replace(case, n=min(case.n, 16))
        warm = prepare(name, tiny, *make_inputs(tiny))
        warm()
        warm()
        x, y = make_inputs(case)
        fn = prepare(name, case, x, y)
    except Skip as exc:
        return [record(name, case, status="skipped", reason=str(exc))]
    except Exception as exc:
        return [record(name, case, status="error", reason=_describe(exc))]
    gc.collect()
    rss_before, peak_before = _current_rss(), _peak_rss()
    fn()
    peak_after = _peak_rss()
    return [record(name, case, inputs_bytes=x.nbytes + (0 if y is None else y.nbytes),
                   outputs_bytes=contenders()[name].output_bytes(case),
                   extra_peak_bytes=peak_after - rss_before, exact=peak_after > peak_before)]


def _worker(spec: dict[str, Any]) -> None:
    run = _memory_case if spec["mode"] == "memory" else _time_cases
    results = run(spec)
    sys.stdout.write(f"{MARK} {json.dumps(results)}\n")
    sys.stdout.flush()


# ----------------------------------------------------------------- parent side


def run_spec(spec: dict[str, Any], *, extra_env: dict[str, str] | None = None,
             timeout_s: float = 900.0) -> list[dict[str, Any]]:
    """Run one worker spec in a fresh process; its records, or "error" records."""
    env = _child_env(contenders()[spec["contender"]].env, extra_env)
    cases = [Case(**c) for c in spec["cases"]]
    try:
        proc = subprocess.run([sys.executable, "-m", "harness", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout_s,
                              cwd=BENCHMARKS)
    except subprocess.TimeoutExpired:
        return [record(spec["contender"], c, status="error",
                       reason=f"timed out after {timeout_s:.0f} s") for c in cases]
    for line in proc.stdout.splitlines():  # peers may print their own lines: skip them
        if line.startswith(MARK):
            return json.loads(line.split(" ", 1)[1])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return [record(spec["contender"], c, status="error",
                   reason=f"worker exited with code {proc.returncode}: {tail}"[:500])
            for c in cases]


def _runnable(names: Sequence[str], case: Case) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Split ``names`` into those that may run ``case`` here and "skipped" records."""
    registry = contenders()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; known: {', '.join(registry)}")
    runnable, skipped = [], {}
    for name in names:
        reason = registry[name].unavailable_reason()
        if reason is None and not registry[name].supports(case):
            reason = f"{UNSUPPORTED} {case.op!r}"
        if reason is None:
            runnable.append(name)
        else:
            skipped[name] = record(name, case, status="skipped", reason=reason)
    return runnable, skipped


def compare(
    cases: Sequence[Case],
    names: Sequence[str],
    *,
    rounds: int = 3,
    timing: dict[str, Any] | None = None,
    extra_env: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every contender on every case, one process per (contender, shape, round).

    Parameters
    ----------
    cases : sequence of Case
        Cases that differ only in ``op`` run in the same process.
    names : sequence of str
        Contender names (:func:`harness.contenders`); those that cannot run a case are
        reported as skipped with the reason.
    rounds : int
        Rounds; the order of the contenders is rotated by one each round.
    timing : dict, optional
        Options of :func:`xentfast.__main__.time_call` (``repeats``, ``target_s``,
        ``max_repeats``).
    extra_env : dict, optional
        Environment of every worker (thread caps, ``XENTFAST_BUFFER_CACHE_MB=0``).
    progress : callable, optional
        Called with a one-line message per finished (shape, round).

    Returns
    -------
    list of dict
        One record per (case, contender), cases outer: ``median_s`` (median across
        rounds), ``rounds_s``, ``gbps``, ``elements_per_s``, ``status``.
    """
    groups: dict[Case, list[Case]] = {}
    for case in cases:
        groups.setdefault(replace(case, op="loss"), []).append(case)
    runnable: dict[Case, list[str]] = {}
    skipped: dict[Case, dict[str, dict[str, Any]]] = {}
    for case in cases:
        runnable[case], skipped[case] = _runnable(names, case)
    measured: dict[tuple[Case, str], list[dict[str, Any]]] = {}
    for r in range(rounds):
        for key, group in groups.items():
            order = list(dict.fromkeys(n for c in group for n in runnable[c]))
            if not order:
                continue
            k = r % len(order)
            for name in order[k:] + order[:k]:
                spec = {"mode": "time", "contender": name, "timing": timing or {},
                        "cases": [asdict(c) for c in group if name in runnable[c]]}
                for rec in run_spec(spec, extra_env=extra_env):
                    case = Case(**{f: rec[f] for f in ("n", "c", "op", "dtype", "labels")})
                    measured.setdefault((case, name), []).append(rec)
            if progress:
                progress(f"{key.n}x{key.c} {key.dtype}: round {r + 1}/{rounds}")
    return [skipped[case][name] if name in skipped[case]
            else _aggregate(measured.get((case, name), []), case, name)
            for case in cases for name in names]


def _aggregate(runs: list[dict[str, Any]], case: Case, name: str) -> dict[str, Any]:
    """One record from a contender's rounds: the median of the per-round medians."""
    ok = [run for run in runs if run["status"] == "ok"]
    if not ok:
        return runs[-1] if runs else record(name, case, status="error", reason="no result")
    medians = [run["median_s"] for run in ok]
    median = statistics.median(medians)
    rec = dict(ok[0], median_s=median, rounds_s=medians,
               gbps=ok[0]["bytes"] / median / 1e9, elements_per_s=case.elements / median)
    rec.pop("times_s", None)
    return rec


def measure_memory(cases: Sequence[Case], names: Sequence[str], *,
                   extra_env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Peak extra memory of one call, each (case, contender) in a fresh process:
    ``extra_peak_bytes`` is the call's max RSS above the RSS just before it (the
    returned gradient included); ``exact`` is False when an earlier peak hid it."""
    records = []
    for case in cases:
        names_here, skipped = _runnable(names, case)
        records += skipped.values()
        for name in names_here:
            records += run_spec({"mode": "memory", "contender": name,
                                 "cases": [asdict(case)]}, extra_env=extra_env)
    return records


_COLDSTART_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import xentfast
t2 = time.perf_counter()
record = {"import_numpy_s": t1 - t0, "import_xentfast_s": t2 - t1}
backend = sys.argv[1]
if backend:
    rng = np.random.default_rng(0)
    x = rng.random((1024, 1000), dtype=np.float32)
    y = rng.integers(0, 1000, 1024)
    t3 = time.perf_counter()
    xentfast.cross_entropy_with_grad(x, y, backend=backend)
    t4 = time.perf_counter()
    xentfast.cross_entropy_with_grad(x, y, backend=backend)
    t5 = time.perf_counter()
    record.update(first_call_s=t4 - t3, second_call_s=t5 - t4)
print("MARK " + json.dumps(record))
""".replace("MARK", MARK)


def _coldstart_process(backend: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _COLDSTART_CODE, backend],
                          capture_output=True, text=True, env=_child_env(env), timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line.split(" ", 1)[1])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"error": f"exit code {proc.returncode}: {tail}"[:500]}


def _median_of(records: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else None


def measure_coldstart(backends: Sequence[str], *, repeats: int = 3) -> list[dict[str, Any]]:
    """Import time and first-call latency (1024x1000 float32 loss+grad), fresh processes:
    with an empty temporary ``NUMBA_CACHE_DIR`` (first call ever: JIT compile), then
    ``repeats`` times with that cache warm; the second call is the steady state."""
    imports = [r for r in (_coldstart_process("") for _ in range(repeats)) if "error" not in r]
    records: list[dict[str, Any]] = [
        {"what": "import numpy", "backend": "", "seconds": _median_of(imports, "import_numpy_s")},
        {"what": "import xentfast", "backend": "",
         "seconds": _median_of(imports, "import_xentfast_s")},
    ]
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="xentfast-numba-cache-") as cache:
            env = {"NUMBA_CACHE_DIR": cache}
            cold = _coldstart_process(backend, env)
            warm = [_coldstart_process(backend, env) for _ in range(repeats)]
        for what, runs in (("first call, cache cleared", [cold]),
                           ("first call, cache warm", warm)):
            ok = [r for r in runs if "error" not in r]
            records.append({"what": what, "backend": backend,
                            "seconds": _median_of(ok, "first_call_s"),
                            "steady_s": _median_of(ok, "second_call_s"),
                            "error": next((r["error"] for r in runs if "error" in r), "")})
    return records

