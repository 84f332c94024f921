"""examples/train_digits.py trains to >= 95% test accuracy on every host backend.

It runs as a user would run it, in a subprocess; the exit code says whether it reached
the accuracy, and the printed accuracy is checked independently of that.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_digits.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                reason="scikit-learn (the digits data set) is not installed")


@pytest.mark.parametrize("backend", helpers.HOST_BACKENDS)
def test_train_digits_reaches_95_percent(backend: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--backend", backend],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    match = re.search(r"test accuracy: (\d\.\d+)", proc.stdout)
    assert match, output
    assert float(match.group(1)) >= 0.95, output
    assert re.search(r"epoch\s+1\s+loss \d", proc.stdout), output  # per-epoch losses printed
