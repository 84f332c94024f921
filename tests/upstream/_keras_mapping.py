"""Keras' ``testing.TestCase`` assertions, as the ported Keras tests use them.

Taken from keras/src/testing/test_case.py of keras-team/keras at v3.15.1 (commit
250b42181ce9f37df68319d8f4753ec89a349a43; identical to the installed keras 3.15.1):

* ``assertAllClose(actual, desired, atol=1e-6, rtol=1e-6)`` is
  ``numpy.testing.assert_allclose`` with those defaults;
* ``assertAlmostEqual(actual, desired, decimal=3)`` is
  ``numpy.testing.assert_almost_equal``, i.e. ``|actual - desired| < 1.5 * 10**-decimal``;
* ``assertDType(x, dtype)`` compares the standardised dtype names;
* ``run_class_serialization_test`` (its ``get_config``/``from_config`` half; the
  ``serialize_keras_object`` half exercises Keras' own registry and is not ported).

The arrays under test are xentfast's NumPy results; nothing here computes a result.
"""

from __future__ import annotations

import json

import numpy as np

import helpers

# Keras' TestCase defaults (keras/src/testing/test_case.py).
ALL_CLOSE_ATOL = 1e-6
ALL_CLOSE_RTOL = 1e-6
ALMOST_EQUAL_DECIMAL = 3


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a Keras dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        if helpers.BFLOAT16 is None:  # pragma: no cover - ml_dtypes is installed here
            raise RuntimeError("bfloat16 needs ml_dtypes")
        return helpers.BFLOAT16
    return np.dtype(name)


def assert_all_close(actual, desired, atol=ALL_CLOSE_ATOL, rtol=ALL_CLOSE_RTOL, msg=None):
    """``TestCase.assertAllClose``: |actual - desired| <= atol + rtol * |desired|, shapes
    broadcast as ``numpy.testing.assert_allclose`` does."""
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(desired), atol=atol, rtol=rtol, err_msg=msg or ""
    )


def assert_almost_equal(actual, desired, decimal=ALMOST_EQUAL_DECIMAL, msg=None):
    """``TestCase.assertAlmostEqual``: |actual - desired| < 1.5 * 10**(-decimal)."""
    np.testing.assert_almost_equal(
        np.asarray(actual), np.asarray(desired), decimal=decimal, err_msg=msg or ""
    )


def assert_dtype(x, dtype: str):
    """``TestCase.assertDType``: ``x`` carries a dtype and its name is ``dtype``."""
    assert hasattr(x, "dtype"), f"expected an array or NumPy scalar of dtype {dtype}; got {x!r}"
    got = np.dtype(x.dtype)
    expected = numpy_dtype(dtype)
    assert got == expected, (
        "The dtype of x does not match the expected one. "
        f"Received: x.dtype={got.name} and dtype={dtype}"
    )


def to_json_with_tuples(value) -> str:
    """keras/src/testing/test_case.py's ``to_json_with_tuples``: JSON that keeps
    tuples distinct from lists, keys sorted."""

    def encode(obj):
        if isinstance(obj, tuple):
            return {"__class__": "tuple", "__value__": list(obj)}
        if isinstance(obj, list):
            return [encode(e) for e in obj]
        if isinstance(obj, dict):
            return {key: encode(v) for key, v in obj.items()}
        return obj

    return json.dumps(encode(value), sort_keys=True, indent=4)


def run_class_serialization_test(instance):
    """The ``get_config`` round trip of ``TestCase.run_class_serialization_test``:
    ``cls.from_config(instance.get_config())`` has the same config (as JSON) and the
    same attribute names."""
    cls = instance.__class__
    config = instance.get_config()
    config_json = to_json_with_tuples(config)
    ref_dir = dir(instance)[:]
    revived_instance = cls.from_config(config)
    revived_config_json = to_json_with_tuples(revived_instance.get_config())
    assert config_json == revived_config_json
    assert set(ref_dir) == set(dir(revived_instance))
    return revived_instance
