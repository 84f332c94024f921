"""Seed 2's Keras program -- Flatten, Dense(128, relu), Dense(10), Adam, 5 epochs,
``validation_split=0.2``, then ``evaluate`` -- with xentfast's loss in ``model.compile``.

    KERAS_BACKEND=tensorflow python examples/keras_mnist.py            # or jax, torch
    python examples/keras_mnist.py --loss keras                         # Keras' own loss

It trains on MNIST when ``~/.keras/datasets/mnist.npz`` is already on disk (no
download), else on scikit-learn's 8x8 digits (1_797 images, split 75/25 with a fixed
seed).  Prints the per-epoch loss and accuracy, the held-out evaluation and the wall
time, and with ``--json`` writes them for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def load_data(seed: int = 0):
    """MNIST from Keras' cache if present, else scikit-learn's digits; pixels in [0, 1]."""
    cached = os.path.expanduser("~/.keras/datasets/mnist.npz")
    if os.path.exists(cached):
        with np.load(cached) as f:
            return ((f["x_train"] / 255.0).astype("float32"), f["y_train"],
                    (f["x_test"] / 255.0).astype("float32"), f["y_test"], "mnist")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")
    order = np.random.default_rng(seed).permutation(len(images))
    split = int(0.75 * len(images))
    train, test = order[:split], order[split:]
    return images[train], digits.target[train], images[test], digits.target[test], "digits"


def train(loss_name: str = "xentfast", epochs: int = 5, seed: int = 0) -> dict:
    import keras

    x_train, y_train, x_test, y_test, dataset = load_data(seed)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input(x_train.shape[1:]),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])
    if loss_name == "xentfast":
        import xentfast.keras as xk

        loss = xk.SparseCategoricalCrossentropy(from_logits=True)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    start = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=epochs, validation_split=0.2, verbose=0,
                        shuffle=False)
    seconds = time.perf_counter() - start
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    return {"backend": keras.backend.backend(), "dataset": dataset, "loss_fn": loss_name,
            "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
            "test_loss": float(test_loss), "test_accuracy": float(test_accuracy),
            "fit_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=["xentfast", "keras"], default="xentfast")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    result = train(args.loss, args.epochs, args.seed)
    print(f"Keras backend {result['backend']}, {result['dataset']}, loss: {result['loss_fn']}")
    for epoch, (loss, accuracy) in enumerate(zip(result["history"]["loss"],
                                                  result["history"]["accuracy"]), 1):
        print(f"epoch {epoch}: loss {loss:.4f}, accuracy {accuracy:.4f}")
    print(f"held out: loss {result['test_loss']:.4f}, accuracy {result['test_accuracy']:.4f}"
          f" ({result['fit_seconds']:.1f} s to fit)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
