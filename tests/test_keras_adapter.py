"""xentfast.keras in Keras 3 itself: losses and gradients equal Keras' own on every
installed Keras backend, ``model.fit`` of seed 2's program (examples/keras_mnist.py)
gives the same curve, and the TensorFlow backend's XLA case raises our clear error.

Each backend runs in a fresh process (Keras reads ``KERAS_BACKEND`` once, at import):
tests/keras_backend_checks.py computes, this module compares.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None,
                                reason="Keras 3 is not installed")


def _backends():
    return [pytest.param(name, marks=pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{module} is not installed"))
        for name, module in BACKEND_MODULES.items()]


def _run(backend: str, *args: str):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, os.path.join(HERE, "keras_backend_checks.py"),
                             *args], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("backend", _backends())
def test_losses_and_gradients_equal_keras(backend):
    results = _run(backend, "cases")
    round_trip = results.pop("config_round_trip")
    assert round_trip == {"same_type": True, "same_config": True}
    for name, row in results.items():
        ours, keras_ = row["ours"], row["keras"]
        # float32 throughout; Keras' own loss is the less exact one (see README), so the
        # comparison allows its rounding, not ours.
        np.testing.assert_allclose(ours["loss"], keras_["loss"], rtol=2e-6, atol=1e-7,
                                   err_msg=f"{backend} {name} loss")
        np.testing.assert_allclose(ours["grad"], keras_["grad"], rtol=1e-5, atol=2e-7,
                                   err_msg=f"{backend} {name} gradient")


@pytest.mark.parametrize("backend", _backends())
def test_seed2_program_trains_like_keras(backend):
    """examples/keras_mnist.py (seed 2's model, compile, fit, evaluate), 2 epochs: the
    per-epoch loss and accuracy, and the held-out evaluation, within 1e-4 relative of a
    run with Keras' own loss."""
    results = _run(backend, "fit", "2")
    ours, keras_ = results["xentfast"], results["keras"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(ours["history"][key], keras_["history"][key], rtol=1e-4,
                                   err_msg=f"{backend} {key}")
    np.testing.assert_allclose(ours["test_loss"], keras_["test_loss"], rtol=1e-4)
    np.testing.assert_allclose(ours["test_accuracy"], keras_["test_accuracy"], rtol=1e-4)
    assert ours["history"]["loss"][-1] < ours["history"]["loss"][0]  # it trained


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="tensorflow is not installed")
def test_tensorflow_xla_raises_a_clear_error():
    message = _run("tensorflow", "jit")
    assert "jit_compile=False" in message, message
