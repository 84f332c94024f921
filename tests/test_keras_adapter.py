"""xentfast.keras in Keras 3 itself: losses and gradients equal Keras' own on every
installed Keras backend, ``model.fit`` of seed 2's program (examples/keras_mnist.py)
gives the same curve, and on the TensorFlow backend an XLA-compiled step trains where
Keras' default turns XLA on (a GPU machine) and raises our clear error where only an
explicit ``jit_compile=True`` can have asked for it.

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
def test_second_derivatives_equal_keras(backend):
    """A gradient differentiated again (gradient penalties, Hessian-vector products):
    nested GradientTapes (eager and tf.function), grad of grad, create_graph=True; the
    gradient with respect to probability labels, the mixed second derivative and (on
    TensorFlow) the third derivative; the same values as Keras' own loss (or the same
    loss in keras.ops where Keras' is wrong) in float64."""
    results = _run(backend, "second")
    for name, row in results.items():
        assert row["ours"].keys() == row["keras"].keys()
        for mode, theirs in row["keras"].items():
            np.testing.assert_allclose(row["ours"][mode], theirs, rtol=1e-10, atol=1e-14,
                                       err_msg=f"{backend} {name} {mode}")


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


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="tensorflow is not installed")
def test_tensorflow_auto_jit_on_a_gpu_machine_trains_like_keras():
    """Where TensorFlow sees a GPU, Keras' default jit_compile="auto" compiles the step
    with XLA: seed 2's program must still train, with the curve of Keras' own loss
    under the same XLA compilation (the GPU is only reported, the step runs on the CPU;
    the XLA decision and compilation are Keras' and TensorFlow's own)."""
    results = _run("tensorflow", "fit_gpu", "2")
    assert results["auto_resolved_to_xla"] is True
    assert results["fallback_warnings"] >= 1  # the XLA path ran, and said so
    ours, keras_ = results["xentfast"], results["keras"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(ours["history"][key], keras_["history"][key], rtol=1e-4,
                                   err_msg=f"XLA {key}")
    np.testing.assert_allclose(ours["test_loss"], keras_["test_loss"], rtol=1e-4)
    assert ours["history"]["loss"][-1] < ours["history"]["loss"][0]


#: The XLA path's cases: a batch holding rows of every adversarial kind
#: (helpers.ACCURACY_KINDS "mixed": normal, confident, ties, offset, huge, masked) and
#: long rows, with the options a Keras loss can reach (index labels with and without an
#: ignored class; probability labels one-hot, soft and smoothed -- Keras losses take no
#: class weights or z-loss), in each logits dtype.  (One XLA compilation per case.)
XLA_KINDS = {"mixed": (36, 300), "long": (2, 30_000)}
XLA_OPTIONS = [("sparse", "plain"), ("sparse", "ignore"), ("dense", "onehot"),
               ("dense", "soft"), ("dense", "smooth")]


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="tensorflow is not installed")
def test_tensorflow_xla_path_meets_the_accuracy_bounds(tmp_path):
    """The XLA-compiled formulas (float64, rounded once) against the exact oracle, with
    the contract's bounds, on adversarial rows in float32, float64, float16 and
    bfloat16: loss and every gradient element (reduction "none")."""
    import zlib

    import naive
    from helpers import (BFLOAT16, LOSS_RTOL_FLOAT64, ULPS, accuracy_inputs,
                         assert_accurate)

    dtypes = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
    if BFLOAT16 is not None:
        dtypes.append(BFLOAT16)
    cases, expected = {}, {}
    for kind, shape in XLA_KINDS.items():
        for dtype in dtypes:
            if kind == "long" and dtype.itemsize != 4:
                continue
            for label, option in XLA_OPTIONS:
                name = f"{kind}-{dtype.name}-{label}-{option}"
                rng = np.random.default_rng(zlib.crc32(name.encode()))
                base = "soft" if option == "smooth" else option
                x, labels, kwargs, row_kinds = accuracy_inputs(rng, kind, shape, dtype,
                                                               label, base)
                if option == "smooth":
                    kwargs["label_smoothing"] = 0.1
                cases[f"{name}/x"] = x.view(np.uint16) if dtype.itemsize == 2 else x
                cases[f"{name}/dtype"] = np.array(dtype.name)
                # probability labels in float64 (exact for every dtype; the child casts
                # them to the logits' dtype, as Keras does)
                cases[f"{name}/labels"] = np.asarray(labels, dtype=np.float64) \
                    if label == "dense" else np.asarray(labels)
                cases[f"{name}/ignore"] = np.array(kwargs.get("ignore_index", -100))
                cases[f"{name}/eps"] = np.array(kwargs.get("label_smoothing", 0.0))
                expected[name] = (dtype, row_kinds,
                                  naive.exact_cross_entropy(x, labels, reduction="none",
                                                            **kwargs))
    source, target = tmp_path / "cases.npz", tmp_path / "results.npz"
    np.savez(source, **cases)
    assert _run("tensorflow", "xla_rows", str(source), str(target))["cases"] == len(expected)
    with np.load(target) as got:
        for name, (dtype, row_kinds, exact) in expected.items():
            loss = got[f"{name}/loss"].astype(dtype)
            grad = got[f"{name}/grad"].astype(dtype)
            assert_accurate(loss, exact["loss"], dtype, f"{name} loss", ULPS["loss"],
                            LOSS_RTOL_FLOAT64, row_kinds)
            assert_accurate(grad, exact["grad"], dtype, f"{name} grad", ULPS["grad"],
                            row_kinds=row_kinds)
