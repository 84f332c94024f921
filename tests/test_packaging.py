"""What a user's pip resolves: the CUDA stack is an extra, never pulled onto macOS.

The markers in pyproject.toml are evaluated for Linux, Windows and macOS environments
(no network).  Where PyPI can be reached, ``pip install --dry-run --platform ...``
resolves the runtime requirements for macOS (arm64) and Windows from binary wheels
only, as a user there would get them; without the index that check is skipped with
the reason.  The wheel built from this tree is checked by .ci/run (installed into a
fresh environment outside the checkout).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")
markers = pytest.importorskip("packaging.markers")
requirements = pytest.importorskip("packaging.requirements")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

ENVIRONMENTS = {
    "linux": {"platform_system": "Linux", "sys_platform": "linux"},
    "windows": {"platform_system": "Windows", "sys_platform": "win32"},
    "macos": {"platform_system": "Darwin", "sys_platform": "darwin"},
}


def _names(reqs, env) -> set[str]:
    out = set()
    for text in reqs:
        req = requirements.Requirement(text)
        if req.marker is None or req.marker.evaluate(dict(env, extra="")):
            out.add(req.name)
    return out


@pytest.mark.parametrize("system", list(ENVIRONMENTS))
def test_runtime_dependencies_have_no_cuda_stack(system):
    names = _names(PROJECT["dependencies"], ENVIRONMENTS[system])
    assert names == {"numpy", "numba"}, names


@pytest.mark.parametrize("system,expected", [("linux", {"numba-cuda"}),
                                             ("windows", {"numba-cuda"}),
                                             ("macos", set())])
def test_cuda_extra_is_for_linux_and_windows(system, expected):
    assert _names(PROJECT["optional-dependencies"]["cuda"], ENVIRONMENTS[system]) == expected


@pytest.mark.parametrize("platform", ["macosx_11_0_arm64", "win_amd64"])
def test_runtime_requirements_resolve_from_wheels(platform, tmp_path):
    reqs = list(PROJECT["dependencies"])
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-cache-dir",
           "--only-binary=:all:", "--platform", platform, "--python-version",
           f"{sys.version_info.major}.{sys.version_info.minor}", "--target", str(tmp_path),
           "--report", str(tmp_path / "report.json"), *reqs]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("the package index did not answer within 180 s")
    if proc.returncode != 0 and ("Could not fetch" in proc.stderr or "connection" in
                                 proc.stderr.lower() or "Network" in proc.stderr):
        pytest.skip(f"the package index cannot be reached: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    import json

    installed = {item["metadata"]["name"].lower()
                 for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert {"numpy", "numba", "llvmlite"} <= installed, installed
    assert "numba-cuda" not in installed
