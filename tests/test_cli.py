"""``python -m xentfast`` and the timing core behind its ``bench`` command.

The command line runs in subprocesses, as users run it; the self-check's failure path
and the timing core's bookkeeping are tested in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xentfast
from xentfast import _bench, _dispatch
from xentfast import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "xentfast", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


def test_help_lists_the_commands() -> None:
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m xentfast" in proc.stdout
    for command in ("info", "check", "bench"):
        assert command in proc.stdout
    bench = _run("bench", "--help")
    assert bench.returncode == 0 and "--shape N C" in bench.stdout, bench.stderr


def test_info_names_every_backend_and_its_state() -> None:
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    assert f"backend in use {xentfast.get_backend()!r}" in proc.stdout
    for name in _dispatch.KNOWN_BACKENDS:
        state = "available" if _dispatch.unavailable_reason(name) is None else "unavailable: "
        assert f"  {name:<7} {state}" in proc.stdout, proc.stdout
    assert "numpy " + np.__version__ in proc.stdout


def test_check_passes_on_every_available_backend() -> None:
    proc = _run("check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
    for name in xentfast.available_backends():
        if name != "cuda" or not simulated:  # the simulator is too slow for the check
            assert f"PASS  {name}" in proc.stdout, proc.stdout


def test_check_reports_a_wrong_backend_and_exits_1(monkeypatch, capsys) -> None:
    """A backend whose float32 gradient is off by 1% must FAIL, naming the check."""
    real = cli.cross_entropy_with_grad

    def off_by_one_percent(logits, labels, **options):
        loss, grad = real(logits, labels, **options)
        if options.get("backend") == "numpy" and np.asarray(logits).dtype == np.float32:
            grad = grad * np.float32(1.01)
        return loss, grad

    monkeypatch.setattr(cli, "cross_entropy_with_grad", off_by_one_percent)
    assert cli.main(["check", "--backends", "numpy"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  numpy" in out
    assert "index labels, float32 64x10, mean (vs plain NumPy): output 1" in out


def test_bench_tiny_shape_prints_the_table() -> None:
    proc = _run("bench", "--shape", "64", "10", "--ops", "loss")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "| shape | op | contender | ms | GB/s | x best peer | % of copy |" in out
    host = [b for b in xentfast.available_backends() if b != "cuda"]
    for name in [f"xentfast-{b}" for b in host] + ["numpy-plain", "copy"]:
        assert f"| 64x10 | loss | {name} |" in out, out
    assert "loss+grad" not in out.split("\n\n")[0]  # only the requested op


def test_bench_json_records() -> None:
    proc = _run("bench", "--shape", "8", "5", "--ops", "loss", "loss+grad",
                "--contenders", "xentfast-numpy,numpy-plain,copy", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["environment"]["versions"]["numpy"] == np.__version__
    records = report["results"]
    assert [(r["op"], r["contender"]) for r in records] == [
        (op, name) for op in ("loss", "loss+grad")
        for name in ("xentfast-numpy", "numpy-plain", "copy")]
    for r in records:
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)


def test_bench_rejects_a_bad_shape() -> None:
    proc = _run("bench", "--shape", "0", "10")
    assert proc.returncode == 2 and "--shape needs positive N and C" in proc.stderr


# ----------------------------------------------------------- the timing core


def test_traffic_model_counts_bytes_read_and_written() -> None:
    n, c = 1000, 10
    logits = n * c * 4
    assert _bench.Case(n, c, "loss").traffic_bytes() == logits + 8 * n
    assert _bench.Case(n, c, "loss+grad").traffic_bytes() == 2 * logits + 8 * n
    assert _bench.Case(n, c, "loss+grad", labels="prob").traffic_bytes() == 3 * logits
    assert _bench.Case(n, c, "logsumexp", dtype="float64").traffic_bytes() == 2 * logits
    assert _bench.contenders()["copy"].traffic_bytes(_bench.Case(n, c, "loss")) == 2 * logits


def test_time_callable_warms_up_and_takes_repeats() -> None:
    calls = []
    timing = _bench.time_callable(lambda: calls.append(1), min_repeats=3, max_repeats=5,
                                  target_s=0.0, min_sample_s=1e-4)
    assert len(timing.times) == 3 and all(t > 0 for t in timing.times)
    # warm-up + calibration (the first repeat if it ran alone) + repeats
    assert len(calls) == 2 + 3 * timing.number - (timing.number == 1)
    assert timing.median == sorted(timing.times)[1]


def test_plain_numpy_baseline_matches_xentfast() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 7)), rng.integers(0, 7, 20)
    loss, grad = _bench.plain_cross_entropy(x, y, True)
    want_loss, want_grad = xentfast.cross_entropy_with_grad(x, y, backend="numpy")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)


def test_compare_and_plot_chain(tmp_path: Path) -> None:
    """benchmarks/compare.py (time and memory modes) writes JSON that plot.py draws."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    report = tmp_path / "bench.json"
    compare = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--shapes", "32x100",
               "--contenders", "xentfast-numpy,numpy-plain,copy", "--rounds", "2",
               "--target-time", "0"]
    proc = subprocess.run(compare + ["--json", str(report)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| 32x100 | loss+grad | numpy-plain |" in proc.stdout
    records = json.loads(report.read_text())["results"]
    assert len(records) == 2 * 3 and all(len(r["rounds_s"]) == 2 for r in records)

    memory = subprocess.run(compare + ["--mode", "memory", "--contenders",
                                       "xentfast-numpy,xentfast-numpy:inplace,numpy-plain"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert memory.returncode == 0, memory.stderr
    assert "| 32x100 | loss+grad | xentfast-numpy:inplace |" in memory.stdout

    png = tmp_path / "bench.png"
    plot = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), str(report),
                           "-o", str(png)], capture_output=True, text=True, env=env, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
