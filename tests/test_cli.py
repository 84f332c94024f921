"""``python -m xentfast`` and what its ``bench`` command shares with ``benchmarks/harness``.

The command line runs in subprocesses, as users run it; the self-check's failure path,
the traffic model, the yardsticks and the timing loop are tested in-process.  The
harness itself (registry, process runner, tables, compare.py, gpu_check.py's CPU side)
is tested in ``benchmarks/test_harness.py``.
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
from xentfast import _dispatch
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


def test_info_into_a_pipe_closed_early_ends_quietly() -> None:
    """``python -m xentfast info | head -1``: the reader leaves after one line; the
    command ends without a BrokenPipeError traceback (exit 141, as for SIGPIPE)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "xentfast", "info"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert proc.stdout.read(1)  # one byte, then the reader goes away
    proc.stdout.close()
    with proc.stderr:
        stderr = proc.stderr.read().decode()
    code = proc.wait(timeout=300)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert code in (0, 141), (code, stderr)  # 0: it had written everything already


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
    assert "| shape | op | contender | ms | GB/s | % of yardstick |" in out
    backend = xentfast.get_backend() if xentfast.get_backend() != "cuda" else (
        _dispatch.best_host_backend())
    assert f"| 64x10 | loss | xentfast-{backend} |" in out, out
    assert "| 64x10 | loss | read-par |" in out, out
    assert "| loss+grad |" not in out and "| copy-par |" not in out  # only the requested op


def test_bench_json_records_and_yardstick_ratios() -> None:
    proc = _run("bench", "--shape", "8", "5", "--ops", "loss+grad", "loss", "--backend",
                "numpy", "--repeats", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["environment"]["versions"]["numpy"] == np.__version__
    records = report["results"]
    assert [(r["op"], r["contender"]) for r in records] == [
        ("loss+grad", "xentfast-numpy"), ("loss+grad", "copy-par"),
        ("loss", "xentfast-numpy"), ("loss", "read-par")]
    logits, labels = 8 * 5 * 4, 8 * 8
    assert [r["bytes"] for r in records] == [2 * logits + labels, 2 * logits,
                                             logits + labels, logits]
    for ours, yard in (records[:2], records[2:]):
        for r in (ours, yard):
            assert r["median_s"] > 0
            assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        assert yard["pct_of_yardstick"] == 100
        assert ours["pct_of_yardstick"] == pytest.approx(100 * ours["gbps"] / yard["gbps"])


def test_bench_rejects_a_bad_shape() -> None:
    proc = _run("bench", "--shape", "0", "10")
    assert proc.returncode == 2 and "--shape needs positive N and C" in proc.stderr


def test_bench_stands_alone_without_the_benchmarks_folder(tmp_path: Path) -> None:
    """The installed command imports nothing from benchmarks/ (which is not installed),
    and the old timing core is gone from the package."""
    code = ("import sys, xentfast.__main__ as m\n"
            "assert m.main(['bench', '--shape', '4', '3', '--repeats', '1']) == 0\n"
            "assert not [k for k in sys.modules if k.split('.')[0] in ('harness', 'benchmarks')]\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('xentfast._bench') is None\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------- what the command shares with benchmarks/harness


def test_traffic_model_counts_bytes_read_and_written() -> None:
    logits, labels = 4000, 8 * 100
    assert cli.traffic_bytes("loss", logits, labels) == logits + labels
    assert cli.traffic_bytes("loss+grad", logits, labels) == 2 * logits + labels
    assert cli.traffic_bytes("loss+grad", logits, logits) == 3 * logits  # probabilities
    assert cli.traffic_bytes("softmax", logits) == cli.traffic_bytes("log_softmax", logits)
    assert cli.traffic_bytes("logsumexp", logits) == logits
    assert cli.traffic_bytes("copy", logits) == 2 * logits
    assert cli.traffic_bytes("read", logits) == logits
    assert [cli.yardstick_for(op) for op in ("loss", "loss+grad", "softmax", "logsumexp")] == [
        "read", "copy", "copy", "read"]
    with pytest.raises(ValueError, match="op must be one of"):
        cli.traffic_bytes("loss+hessian", logits)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (1000, 1234)],
                         ids=["one-element", "odd-bytes", "several-pages"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_yardsticks_touch_every_byte(shape, threads) -> None:
    """The byte ranges the threads work on tile the buffer exactly, and both yardsticks
    run on any size and thread count."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ranges = cli._byte_ranges(x.nbytes, threads)
    assert ranges[0][0] == 0 and ranges[-1][1] == x.nbytes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert len(ranges) <= threads
    assert cli.parallel_copy(x, threads)() is None
    assert cli.parallel_read(x, threads)() is None


def test_parallel_read_reads_every_byte(monkeypatch) -> None:
    seen = []
    real_reduce = np.add.reduce

    class Add:
        @staticmethod
        def reduce(a):
            seen.append(a.nbytes)
            return real_reduce(a)

    monkeypatch.setattr(cli.np, "add", Add)
    x = np.ones((5, 4099), dtype=np.float16)  # an odd number of bytes per 8
    cli.parallel_read(x, 3)()
    assert sum(seen) == x.nbytes
    seen.clear()
    big = np.ones((3, cli.MIN_BYTES_PER_THREAD + 1), dtype=np.uint8)  # 3 threads' worth
    cli.parallel_read(big, 8)()
    assert sum(seen) == big.nbytes and len(seen) == 2 * 3  # words + tail per thread


def test_parallel_copy_copies(monkeypatch) -> None:
    made = []
    real_empty_like = np.empty_like
    monkeypatch.setattr(cli.np, "empty_like", lambda a: made.append(real_empty_like(a)) or made[-1])
    x = np.arange(3 * 40_000, dtype=np.float64).reshape(3, 40_000)  # 960 kB: 3 threads
    cli.parallel_copy(x, 3)()
    assert made and np.array_equal(made[0].view(np.float64).reshape(x.shape), x)


def test_time_call_warms_up_and_takes_repeats() -> None:
    calls = []
    times = cli.time_call(lambda: calls.append(1), repeats=3, max_repeats=5, target_s=0.0,
                          min_sample_s=1e-4)
    assert len(times) == 3 and all(t > 0 for t in times)
    number = (len(calls) - 2) // 3  # warm-up + sizing call, then 3 samples of `number`
    assert len(calls) == 2 + 3 * number and number >= 1
    assert len(cli.time_call(lambda: None, repeats=2, warmup=False, min_sample_s=0)) >= 2


def test_plain_numpy_baseline_matches_xentfast() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 7)), rng.integers(0, 7, 20)
    loss, grad = cli.plain_cross_entropy(x, y, True)
    want_loss, want_grad = xentfast.cross_entropy_with_grad(x, y, backend="numpy")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)
