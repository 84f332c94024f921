"""Train a small NumPy MLP on scikit-learn's digits with xentfast's fused loss + gradient.

The network is 64 -> 128 (ReLU) -> 10, trained with Adam written in NumPy on the
8x8 digit images bundled with scikit-learn (no download).  ``xentfast.
cross_entropy_with_grad`` returns the mean loss and ``d loss / d logits`` in one pass,
which is all the output layer's backward step needs.

Usage::

    python examples/train_digits.py                 # automatic backend
    python examples/train_digits.py --backend numpy --epochs 30

Prints the loss per epoch and the final test accuracy; exits with code 1 if the test
accuracy is below 0.95.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import numpy as np

try:
    import xentfast
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import xentfast

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

REQUIRED_ACCURACY = 0.95


class Adam:
    """Adam (Kingma & Ba, 2015) over a list of parameter arrays, updated in place."""

    def __init__(self, params: list[np.ndarray], lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.params, self.lr, self.beta1, self.beta2, self.eps = params, lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: Sequence[np.ndarray]) -> None:
        self.t += 1
        correction1 = 1 - self.beta1 ** self.t
        correction2 = 1 - self.beta2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            p -= self.lr * (m / correction1) / (np.sqrt(v / correction2) + self.eps)


class MLP:
    """64 -> hidden (ReLU) -> 10, He-initialised, float32."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, rng: np.random.Generator) -> None:
        self.w1 = (rng.standard_normal((n_in, n_hidden)) * np.sqrt(2 / n_in)).astype(np.float32)
        self.b1 = np.zeros(n_hidden, np.float32)
        self.w2 = (rng.standard_normal((n_hidden, n_out)) * np.sqrt(2 / n_hidden)).astype(
            np.float32)
        self.b2 = np.zeros(n_out, np.float32)

    @property
    def params(self) -> list[np.ndarray]:
        return [self.w1, self.b1, self.w2, self.b2]

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hidden activations, logits)."""
        h = np.maximum(x @ self.w1 + self.b1, 0)
        return h, h @ self.w2 + self.b2

    def backward(self, x: np.ndarray, h: np.ndarray, dlogits: np.ndarray) -> list[np.ndarray]:
        """Gradients of the parameters, given d loss / d logits."""
        dh = dlogits @ self.w2.T
        dh *= h > 0
        return [x.T @ dh, dh.sum(axis=0), h.T @ dlogits, dlogits.sum(axis=0)]


def train(epochs: int, batch_size: int, lr: float, seed: int, backend: str | None) -> float:
    """Train and return the test accuracy; prints one line per epoch."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values 0..16 -> 0..1
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
    rng = np.random.default_rng(seed)
    model = MLP(x.shape[1], 128, 10, rng)
    optimizer = Adam(model.params, lr=lr)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images; backend "
          f"{backend or xentfast.get_backend()!r}")
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        total, batches = 0.0, 0
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            h, logits = model.forward(x_train[batch])
            # Mean loss over the batch and its gradient w.r.t. the logits, one fused pass;
            # the logits are not needed afterwards, so the gradient may overwrite them.
            loss, dlogits = xentfast.cross_entropy_with_grad(
                logits, y_train[batch], inplace=True, backend=backend)
            optimizer.step(model.backward(x_train[batch], h, dlogits))
            total += float(loss)
            batches += 1
        print(f"epoch {epoch:3d}  loss {total / batches:.4f}")
    _, logits = model.forward(x_test)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y_test))
    test_loss = float(xentfast.cross_entropy(logits, y_test, backend=backend))
    print(f"trained in {time.perf_counter() - start:.2f} s; test loss {test_loss:.4f}")
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit code 1 if the test accuracy is below 0.95."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=xentfast.available_backends(), default=None,
                        help="xentfast backend (default: the automatic choice)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    accuracy = train(args.epochs, args.batch_size, args.lr, args.seed, args.backend)
    if accuracy < REQUIRED_ACCURACY:
        print(f"FAILED: test accuracy {accuracy:.4f} < {REQUIRED_ACCURACY}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
