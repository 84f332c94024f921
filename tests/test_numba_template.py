"""The cpu backend's generated kernels: caching of the drivers, and no global side effect.

The kernels of ``numba_cpu`` are written once as templates and specialised at compile
time (``_numba_passes``); the only functions called from Python are the chunk drivers
made by ``numba_cpu._driver`` / ``_seg_driver``, closures over plain constants.  Here:
those drivers load from Numba's cache in a fresh process (a closure over a jitted
function would not), importing the backend changes no Numba setting, and under Numba's
default "workqueue" threading layer -- which aborts the process when two threads run
parallel kernels at once -- concurrent calls are serialised and give the single-thread
results.  (Bitwise equality with the hand-written variants the templates replaced was
checked against the old module when they were introduced; the path tests hold every
variant to the oracle.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import BACKENDS

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not under test")


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_leaves_numba_config_alone():
    out = _run("""
        import numba
        before = numba.config.THREADING_LAYER
        import xentfast.backends.numba_cpu
        print(before == numba.config.THREADING_LAYER)
    """)
    assert out.strip() == "True"


def test_drivers_load_from_the_cache():
    code = """
        import json, numpy as np
        from xentfast.backends import numba_cpu as nc
        x = np.random.default_rng(0).standard_normal((300, 400)).astype(np.float32)
        y = np.arange(300) % 400
        loss, lse, g = np.empty(300, np.float32), np.empty(300, np.float32), np.empty_like(x)
        for par in (False, True):
            with nc.tuning(force_parallel=par):
                nc.sparse(x, y, np.empty(0, np.float32), -100, 0.0, 0.0, 1.0, loss, lse, g)
        hits = sum(sum(d.stats.cache_hits.values()) for d in nc._DRIVERS.values())
        misses = sum(sum(d.stats.cache_misses.values()) for d in nc._DRIVERS.values())
        print(json.dumps([len(nc._DRIVERS), hits, misses]))
    """
    _run(code)                      # compiles (or loads) and stores
    n, hits, misses = json.loads(_run(code))
    assert n == 2 and hits == 2 and misses == 0, (n, hits, misses)


def test_concurrent_calls_under_workqueue_are_serialised():
    out = _run("""
        import threading, numpy as np, numba
        from xentfast.backends import numba_cpu as nc
        rng = np.random.default_rng(1)
        x = rng.standard_normal((2000, 300)).astype(np.float32)
        y = rng.integers(0, 300, 2000)
        def call():
            loss, lse, g = np.empty(2000, np.float32), np.empty(2000, np.float32), np.empty_like(x)
            nc.sparse(x, y, np.empty(0, np.float32), -100, 0.0, 0.0, 1.0, loss, lse, g)
            return loss, g
        ref = call()
        results = []
        def worker():
            for _ in range(5):
                results.append(call())
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        ok = all(np.array_equal(a, ref[0]) and np.array_equal(b, ref[1]) for a, b in results)
        print(numba.threading_layer(), len(results), ok)
    """, NUMBA_THREADING_LAYER="workqueue")
    assert out.split() == ["workqueue", "20", "True"]
