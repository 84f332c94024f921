"""Run by tests/test_keras_adapter.py in a fresh process per Keras backend
(``KERAS_BACKEND`` must be set before Keras is imported): computes xentfast.keras's
losses and gradients next to Keras' own on the same inputs, and prints them as JSON for
the parent test to compare.  Not a test module itself."""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def _to_numpy(t):
    if hasattr(t, "detach"):
        t = t.detach().cpu()
    return np.asarray(t, dtype=np.float64).tolist()


def _value_and_grad(loss_fn, y_true, logits):
    """The loss and d loss / d logits through the backend's own autodiff."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.Variable(logits)
        with tf.GradientTape() as tape:
            value = loss_fn(y_true, x)
        return value, tape.gradient(value, x)
    if backend == "jax":
        import jax

        return jax.value_and_grad(lambda x: loss_fn(y_true, x))(logits)
    import torch

    x = torch.tensor(logits, requires_grad=True)
    value = loss_fn(torch.as_tensor(y_true), x)
    value.backward()
    return value, x.grad


def cases():
    import keras

    import xentfast.keras as xk

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((12, 7)) * 3).astype("float32")
    y = rng.integers(0, 7, 12)
    y[[1, 5]] = 3
    probs = rng.dirichlet(np.ones(7), 12).astype("float32")
    x3 = (rng.standard_normal((3, 7, 4)) * 2).astype("float32")  # classes on axis 1
    t3 = rng.dirichlet(np.ones(7), (3, 4)).transpose(0, 2, 1).astype("float32")
    weights = rng.uniform(0.5, 2, 12).astype("float32")
    specs = {
        "sparse_logits": (dict(from_logits=True), y, x, None),
        "sparse_ignore_class": (dict(from_logits=True, ignore_class=3), y, x, None),
        "sparse_probs": (dict(from_logits=False), y,
                         np.asarray(keras.ops.softmax(x)).astype("float32"), None),
        # rows not summing to 1, entries above 1: Keras' JAX/torch backends scale them to
        # sum 1 before the clip, its TensorFlow backend clips them as they are
        "sparse_unnormalised_probs": (dict(from_logits=False), y,
                                      (np.abs(x) / 3 + 0.05).astype("float32"), None),
        "sparse_sum_weighted": (dict(from_logits=True, reduction="sum"), y, x, weights),
        "categorical_logits": (dict(from_logits=True), probs, x, None),
        "categorical_smoothing": (dict(from_logits=True, label_smoothing=0.2), probs, x, None),
        "categorical_axis1": (dict(from_logits=True, axis=1), t3, x3, None),
        "categorical_probs": (dict(from_logits=False, label_smoothing=0.1), probs,
                              np.asarray(keras.ops.softmax(x)).astype("float32"), None),
    }
    out = {}
    for name, (kwargs, y_true, y_pred, sample_weight) in specs.items():
        cls = "Sparse" if name.startswith("sparse") else ""
        ours = getattr(xk, f"{cls}CategoricalCrossentropy")(**kwargs)
        theirs = getattr(keras.losses, f"{cls}CategoricalCrossentropy")(**kwargs)
        row = {}
        for who, loss in (("ours", ours), ("keras", theirs)):
            def fn(t, p, loss=loss):
                return loss(t, p, sample_weight=sample_weight)
            value, grad = _value_and_grad(fn, y_true, y_pred)
            row[who] = {"loss": _to_numpy(value), "grad": _to_numpy(grad)}
        out[name] = row
    # Serialisation round trip through Keras' own machinery.
    loss = xk.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1, name="scce")
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    out["config_round_trip"] = {"same_type": type(clone) is type(loss),
                                "same_config": clone.get_config() == loss.get_config()}
    return out


def _hessian_vector(loss_fn, y_true, logits, v):
    """d/dx <d loss / d x, v> (a Hessian-vector product, plus nothing: v is constant)
    through the backend's own autodiff, differentiating the first gradient again."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def hv(x):
            with tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    value = loss_fn(y_true, x)
                grad = inner.gradient(value, x)
                dot = tf.reduce_sum(grad * v)
            return outer.gradient(dot, x)

        x = tf.constant(logits)
        return {"eager": hv(x), "tf.function": tf.function(hv)(x)}
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        grad = jax.grad(lambda x: loss_fn(y_true, x))
        return {"grad of grad": jax.grad(lambda x: jnp.sum(grad(x) * v))(logits)}
    import torch

    x = torch.tensor(logits, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_fn(torch.as_tensor(y_true), x), x, create_graph=True)
    (hv,) = torch.autograd.grad((grad * torch.as_tensor(v)).sum(), x)
    return {"create_graph": hv}


def second_derivatives():
    """Hessian-vector products of xentfast.keras's losses and Keras' own, float64."""
    import keras

    import xentfast.keras as xk

    if keras.backend.backend() == "jax":  # float64 needs JAX's x64 mode
        import jax

        jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 5)) * 2
    v = rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    y[2] = 1
    probs = rng.dirichlet(np.ones(5), 6)
    specs = {
        "sparse_ignore_class": ("Sparse", dict(from_logits=True, ignore_class=1), y),
        "categorical_smoothing": ("", dict(from_logits=True, label_smoothing=0.2), probs),
    }
    out = {}
    for name, (cls, kwargs, y_true) in specs.items():
        row = {}
        for who, module in (("ours", xk), ("keras", keras.losses)):
            loss = getattr(module, f"{cls}CategoricalCrossentropy")(dtype="float64", **kwargs)
            row[who] = {k: _to_numpy(h) for k, h in
                        _hessian_vector(loss, y_true, x, v).items()}
        out[name] = row
    # d loss / d y_true for probability labels (co-trained teacher), first order
    row = {}
    for who, module in (("ours", xk), ("keras", keras.losses)):
        loss = module.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2,
                                              dtype="float64")
        row[who] = {"labels": _to_numpy(_label_gradient(loss, probs, x))}
    out["categorical_label_gradient"] = row
    # d/dt of |d loss / d x|^2: the mixed second derivative (Keras' own loss gives 0 on
    # TensorFlow, so the reference is the same per-row loss written in keras.ops, under
    # the same Keras reduction)
    def per_row(t, z):
        q = 0.8 * t + 0.2 / 5
        return -keras.ops.sum(q * keras.ops.log_softmax(z, axis=-1), axis=-1)

    from keras.src.losses.losses import LossFunctionWrapper  # what Keras wraps its own in

    reference = LossFunctionWrapper(per_row, dtype="float64")
    ours = xk.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2, dtype="float64")
    out["categorical_mixed_second"] = {
        who: {"mixed": _to_numpy(_mixed_label_derivative(fn, probs, x))}
        for who, fn in (("ours", ours), ("keras", reference))}
    if keras.backend.backend() == "tensorflow":  # (torch and JAX: their own test suites)
        out["categorical_third"] = {
            who: {"third": _to_numpy(_third_derivative(fn, probs, x, v))}
            for who, fn in (("ours", ours), ("keras", reference))}
    return out


def _third_derivative(loss_fn, y_true, logits, v):
    """d/dx |H v|^2 on TensorFlow: three nested tapes."""
    import tensorflow as tf

    x, t = tf.constant(logits), tf.constant(y_true)
    with tf.GradientTape() as third:
        third.watch(x)
        with tf.GradientTape() as second:
            second.watch(x)
            with tf.GradientTape() as first:
                first.watch(x)
                value = loss_fn(t, x)
            dot = tf.reduce_sum(first.gradient(value, x) * v)
        hv = second.gradient(dot, x)
        total = tf.reduce_sum(hv * hv)
    return third.gradient(total, x)


def _mixed_label_derivative(loss_fn, y_true, logits):
    """d/d y_true of sum((d loss / d logits)^2), through the backend's autodiff."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        t, x = tf.constant(y_true), tf.constant(logits)
        with tf.GradientTape() as outer:
            outer.watch(t)
            with tf.GradientTape() as inner:
                inner.watch(x)
                value = loss_fn(t, x)
            grad = inner.gradient(value, x)
            total = tf.reduce_sum(grad * grad)
        return outer.gradient(total, t)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        return jax.grad(lambda t: jnp.sum(jax.grad(lambda x: loss_fn(t, x))(logits) ** 2))(
            y_true)
    import torch

    t = torch.tensor(y_true, requires_grad=True)
    x = torch.tensor(logits, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_fn(t, x), x, create_graph=True)
    (mixed,) = torch.autograd.grad((grad * grad).sum(), t)
    return mixed


def _label_gradient(loss_fn, y_true, logits):
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        t = tf.constant(y_true)
        with tf.GradientTape() as tape:
            tape.watch(t)
            value = loss_fn(t, tf.constant(logits))
        return tape.gradient(value, t)
    if backend == "jax":
        import jax

        return jax.grad(lambda t: loss_fn(t, logits))(y_true)
    import torch

    t = torch.tensor(y_true, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_fn(t, torch.tensor(logits)), t)
    return grad


def jit_compile_error():
    """model.fit with jit_compile=True on TensorFlow: our clear error, not XLA's."""
    import keras

    import xentfast.keras as xk

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=xk.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    try:
        model.fit(np.ones((8, 4), "float32"), np.zeros(8, "int64"), epochs=1, verbose=0)
    except Exception as error:  # noqa: BLE001 - reported to the parent for its assertion
        return f"{type(error).__name__}: {error}"
    return "no error"


def fit_as_on_a_gpu_machine(epochs: int):
    """Seed 2's program where TensorFlow reports a GPU: Keras' default
    ``jit_compile="auto"`` then compiles the training step with XLA (the decision is
    Keras' own, from ``tf.config.list_physical_devices``, which is all that is faked
    here); xentfast's loss must train under it like Keras' own loss."""
    import tensorflow as tf

    real = tf.config.list_physical_devices

    def with_a_gpu(device_type=None):
        devices = list(real(device_type))
        if device_type in (None, "GPU"):
            devices.append(tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU"))
        return devices

    tf.config.list_physical_devices = with_a_gpu
    import keras
    import keras_mnist

    import xentfast.keras as xk

    probe = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    probe.compile(optimizer="sgd", loss=xk.SparseCategoricalCrossentropy(from_logits=True))
    result = {"auto_resolved_to_xla": bool(probe.jit_compile)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for loss in ("keras", "xentfast"):
            result[loss] = keras_mnist.train(loss, epochs=epochs)
    result["fallback_warnings"] = sum(issubclass(w.category, xk.XLAFallbackWarning)
                                      for w in caught)
    return result


def xla_rows(source: str, target: str):
    """The TensorFlow XLA path's per-row losses and gradients (of the sum) for the cases
    in ``source`` (an .npz written by the parent test), compiled by XLA, into
    ``target``.  16-bit logits travel as their bits with a dtype name."""
    import ml_dtypes
    import tensorflow as tf

    import xentfast.keras as xk

    dtypes = {"float16": np.float16, "float32": np.float32, "float64": np.float64,
              "bfloat16": ml_dtypes.bfloat16}
    out = {}
    with np.load(source) as cases:
        names = sorted({k.split("/")[0] for k in cases.files})
        for name in names:
            dtype = dtypes[str(cases[f"{name}/dtype"])]
            x = cases[f"{name}/x"].view(dtype) if dtype in (np.float16, ml_dtypes.bfloat16) \
                else cases[f"{name}/x"]
            labels = cases[f"{name}/labels"]
            probabilities = labels.ndim == x.ndim
            ignore = int(cases[f"{name}/ignore"])
            eps = float(cases[f"{name}/eps"])

            @tf.function(jit_compile=True)
            def step(v, labels=labels, probabilities=probabilities, ignore=ignore, eps=eps):
                with tf.GradientTape() as tape:
                    tape.watch(v)
                    y = tf.cast(labels, v.dtype) if probabilities else tf.convert_to_tensor(labels)
                    loss = xk._tensorflow_xla_op(v, y, axis=-1,
                                                 ignore_index=ignore, label_smoothing=eps,
                                                 probabilities=probabilities)
                    total = tf.reduce_sum(tf.cast(loss, tf.float64))
                return loss, tape.gradient(total, v)

            loss, grad = step(tf.constant(x))
            out[f"{name}/loss"] = np.asarray(loss).astype(np.float64)
            out[f"{name}/grad"] = np.asarray(grad).astype(np.float64)
    np.savez(target, **out)
    return {"cases": len(names)}


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    what = sys.argv[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if what == "cases":
            result = cases()
        elif what == "jit":
            result = jit_compile_error()
        elif what == "xla_rows":
            result = xla_rows(sys.argv[2], sys.argv[3])
        elif what == "second":
            result = second_derivatives()
        elif what == "fit_gpu":
            result = fit_as_on_a_gpu_machine(int(sys.argv[2]))
        else:
            import keras_mnist

            result = {loss: keras_mnist.train(loss, epochs=int(sys.argv[2]))
                      for loss in ("keras", "xentfast")}
    print("RESULT " + json.dumps(result))
