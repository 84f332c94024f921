"""The harness itself: traffic model, registry, ratios, the process runner behind
compare.py (tiny shapes), plot.py on its output, and gpu_check.py's CPU-side logic.

Collected by ``pytest benchmarks --benchmark-disable`` (CI), like the suites beside it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import harness

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


# ------------------------------------------------------------------ traffic model


def test_case_traffic_counts_bytes_read_and_written() -> None:
    n, c = 1000, 10
    logits = n * c * 4
    assert harness.Case(n, c, "loss").traffic_bytes() == logits + 8 * n
    assert harness.Case(n, c, "loss+grad").traffic_bytes() == 2 * logits + 8 * n
    assert harness.Case(n, c, "loss+grad", labels="prob").traffic_bytes() == 3 * logits
    assert harness.Case(n, c, "logsumexp", dtype="float64").traffic_bytes() == 2 * logits
    assert harness.Case(n, c, "softmax", dtype="bfloat16").traffic_bytes() == logits
    assert harness.Case(n, c, "loss", dtype="float16").logits_bytes == logits // 2


def test_yardsticks_move_the_logits_bytes_and_pair_with_the_op() -> None:
    registry_ = harness.contenders()
    case = harness.Case(100, 30, "loss")
    assert registry_["copy-par"].traffic_bytes(case) == 2 * case.logits_bytes
    assert registry_["read-par"].traffic_bytes(case) == case.logits_bytes
    assert registry_["copy-cuda"].traffic_bytes(case) == 2 * case.logits_bytes
    cpu = registry_["xentfast-cpu"]
    assert cpu.yardstick(case) == "read-par"
    assert cpu.yardstick(harness.Case(100, 30, "loss+grad")) == "copy-par"
    assert registry_["xentfast-cuda"].yardstick(case) == "read-cuda"
    assert registry_["copy-par"].supports(harness.Case(1, 1, "loss+grad"))
    assert not registry_["copy-par"].supports(case)


def test_registry_lineups() -> None:
    registry_ = harness.contenders()
    default = {n for n, c in registry_.items() if c.default}
    assert {"xentfast-numpy", "xentfast-cpu", "xentfast-cython", "xentfast-cpu:fresh",
            "xentfast-cython:fresh", "numpy-plain", "torch", "tf", "copy-par",
            "read-par"} <= default
    assert {"torch-compile", "jax", "tf-raw"} <= set(registry_) - default
    suite = {n for n, c in registry_.items() if c.in_suite}
    assert not any(n.endswith(":fresh") for n in suite)  # needs a process of its own
    assert {"tf-raw", "jax", "copy-1t", "copy-par", "read-par"} <= suite
    assert registry_["xentfast-cpu:fresh"].env == {"XENTFAST_BUFFER_CACHE_MB": "0"}
    assert set(harness.lineup("default")) <= default


def test_prepare_skips_with_the_reason() -> None:
    case = harness.Case(4, 3, "loss")
    with pytest.raises(harness.Skip, match="does not implement 'loss'"):
        harness.prepare("copy-par", case, *harness.make_inputs(case))


def test_half_precision_runs_only_where_native(monkeypatch) -> None:
    from xentfast import _dispatch

    kernels = _dispatch.load("numpy")
    case = harness.Case(4, 3, "loss", dtype="float16")
    monkeypatch.setattr(kernels, "NATIVE_HALF", (), raising=False)
    with pytest.raises(harness.Skip, match="not read natively"):
        harness.prepare("xentfast-numpy", case, *harness.make_inputs(case))
    compare = _load("compare")
    monkeypatch.setattr(compare.harness, "lineup", lambda which="default": [
        "xentfast-numpy", "numpy-plain", "copy-par"])
    assert compare._names(None, "time", "float16") == []
    monkeypatch.setattr(kernels, "NATIVE_HALF", ("float16",), raising=False)
    assert compare._names(None, "time", "float16") == ["xentfast-numpy", "copy-par"]
    assert compare._names(None, "time", "float32") == ["xentfast-numpy", "numpy-plain",
                                                       "copy-par"]


def test_add_ratios() -> None:
    def rec(name, kind, op, median_s, nbytes, yardstick):
        return {"contender": name, "kind": kind, "n": 2, "c": 3, "op": op,
                "dtype": "float32", "labels": "index", "status": "ok", "median_s": median_s,
                "bytes": nbytes, "gbps": nbytes / median_s / 1e9, "yardstick": yardstick}

    records = [rec("xentfast-cpu", "xentfast", "loss+grad", 1.0, 200, "copy-par"),
               rec("torch", "peer", "loss+grad", 4.0, 200, "copy-par"),
               rec("tf", "peer", "loss+grad", 2.0, 200, "copy-par"),
               rec("copy-par", "yardstick", "loss+grad", 0.5, 160, "copy-par"),
               rec("exp-par", "yardstick", "loss+grad", 0.25, 200, "copy-par"),
               dict(rec("xentfast-cuda", "xentfast", "loss+grad", 0.1, 200, "copy-cuda"),
                    device="cuda")]
    harness.add_ratios(records)
    ours, torch, tf, copy, floor, device = records
    assert device["pct_of_exp"] is None          # the host's floor is no device's
    assert ours["x_best_peer"] == 2.0 and torch["x_best_peer"] == 0.5
    assert copy["x_best_peer"] is None and copy["pct_of_yardstick"] == 100
    assert ours["pct_of_yardstick"] == pytest.approx(100 * 200 / 1.0 / (160 / 0.5))
    assert ours["pct_of_exp"] == pytest.approx(25) and tf["pct_of_exp"] == pytest.approx(12.5)
    assert copy["pct_of_exp"] is None and floor["pct_of_exp"] is None
    table = harness.format_time_table(records)
    assert "| 2x3 | loss+grad | xentfast-cpu | 1000 | 2e-07 | 2.00 | 62 | - | 25 |" in table
    # the floor's own % of copy says which bound is the higher: here memory (250% > 100)
    assert "| 2x3 | loss+grad | exp-par | 250 | 8e-07 | - | 250 | - | - |" in table


# ------------------------------------------------------------- compare.py, plot.py


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_compare_and_plot_chain(tmp_path: Path) -> None:
    """compare.py (each contender in its own process; time and memory modes) writes JSON
    that plot.py draws; :fresh runs with buffer reuse off."""
    report = tmp_path / "bench.json"
    compare = [sys.executable, str(HERE / "compare.py"), "--shapes", "32x100",
               "--rounds", "2", "--target-time", "0", "--repeats", "2"]
    names = "xentfast-numpy,xentfast-numpy:fresh,numpy-plain,copy-par,read-par"
    proc = subprocess.run(compare + ["--contenders", names, "--json", str(report)],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert ("| shape | op | contender | ms | GB/s | x best peer | % of copy | % of read "
            "| % of exp |") in out
    assert "| 32x100 | loss+grad | xentfast-numpy:fresh |" in out
    assert "| 32x100 | loss | read-par |" in out and "| 32x100 | loss+grad | copy-par |" in out
    records = json.loads(report.read_text())["results"]
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 2 * 3 + 1  # :fresh: loss+grad only; each yardstick: its op only
    assert all(len(r["rounds_s"]) == 2 for r in ok)
    fresh = next(r for r in ok if r["contender"] == "xentfast-numpy:fresh")
    assert fresh["buffer_reuse"] is False and fresh["yardstick"] == "copy-par"
    assert next(r for r in ok if r["contender"] == "numpy-plain")["buffer_reuse"] is True

    memory = subprocess.run(compare + ["--mode", "memory", "--contenders",
                                       "xentfast-numpy,xentfast-numpy:inplace,numpy-plain"],
                            capture_output=True, text=True, env=_env(), timeout=600)
    assert memory.returncode == 0, memory.stderr
    assert "| 32x100 | loss+grad | xentfast-numpy:inplace |" in memory.stdout

    png = tmp_path / "bench.png"
    plot = subprocess.run([sys.executable, str(HERE / "plot.py"), str(report), "-o", str(png)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_worker_is_reported_not_fatal(monkeypatch) -> None:
    case = harness.Case(4, 3, "loss")
    spec = {"mode": "time", "contender": "numpy-plain", "cases": [dict(
        n=4, c=3, op="loss", dtype="float32", labels="index")], "timing": {"bogus": 1}}
    (rec,) = harness.runner.run_spec(spec)
    assert rec["status"] == "error" and "bogus" in rec["reason"]
    assert (rec["n"], rec["c"], rec["op"]) == (case.n, case.c, case.op)


def test_old_records_still_plot(tmp_path: Path) -> None:
    """Result files of the old timing core (kind "roofline") keep working in plot.py."""
    plot = _load("plot")
    points, title = plot.load_points(str(HERE / "results-2026-12-02.json"))
    assert points and any(p["kind"] == "roofline" for p in points) and title
    plot.plot(points, str(tmp_path / "old.png"))
    assert (tmp_path / "old.png").stat().st_size > 0


# ------------------------------------------------------------ gpu_check, CPU side


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


def test_gpu_check_uses_the_harness_traffic_model(gpu_check) -> None:
    Row = gpu_check.Row
    n, c = 1000, 100
    logits = n * c * 4
    rows = [Row((n, c), "float32", "loss+grad", "copy", ms=1.0),
            Row((n, c), "float32", "loss", "read", ms=0.25),
            Row((n, c), "float32", "loss+grad", "xentfast kernel", ms=2.0),
            Row((n, c), "float32", "loss", "xentfast kernel", ms=0.5),
            Row((n, c), "float32", "loss+grad", "torch eager", ms=4.0),
            Row((n, c), "float32", "loss", "torch eager", ms=None, note="failed")]
    gpu_check.fill_derived(rows)
    copy, read, grad, loss, torch, _ = rows
    assert copy.gbps == pytest.approx(2 * logits / 1e6)  # ms -> GB/s
    assert read.gbps == pytest.approx(logits / 0.25e6)
    assert grad.gbps == pytest.approx(harness.Case(n, c).traffic_bytes() / 2e6)
    assert grad.yardstick_pct == pytest.approx(100 * grad.gbps / copy.gbps)
    assert loss.yardstick_pct == pytest.approx(100 * loss.gbps / read.gbps)
    assert grad.vs_torch == 2.0 and loss.vs_torch is None and copy.yardstick_pct is None
    table = gpu_check.format_table(rows)
    assert "| shape | dtype | op | impl | ms | GB/s | % yardstick | x torch | note |" in table
    assert "| 1000x100 | float32 | loss | torch eager | - | - | - | - | failed |" in table
    verdicts = gpu_check.verdicts(rows)
    assert len(verdicts) == 2 and verdicts[0].startswith("MISS xentfast kernel")
    assert verdicts[1].startswith("PASS") and "2.00x PyTorch eager" in verdicts[1]


def test_gpu_check_arguments(gpu_check) -> None:
    args = gpu_check.parse_args(["--shapes", "8x40,3x300", "--dtypes", "float16"])
    assert args.shape_list == [(8, 40), (3, 300)]
    assert args.dtype_list == [np.dtype(np.float16)]
    smoke = gpu_check.parse_args(["--sim-smoke"])
    assert smoke.skip_tests and smoke.reps == 1 and smoke.shape_list == list(gpu_check.SMOKE_SHAPES)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--shapes", "0x10"])
