"""Train a small PyTorch MLP on scikit-learn's digits with ``xentfast.torch.CrossEntropyLoss``.

The same network (64 -> 128 (ReLU) -> 10, float32, Adam) is trained twice from the same
seed -- once with ``xentfast.torch.CrossEntropyLoss``, once with
``torch.nn.CrossEntropyLoss`` -- on the same mini-batches, and the two per-step loss
curves are compared: the largest relative difference must stay within 1e-5.  Also
printed: each curve's final values, the test accuracy, and the wall time spent in the
loss step (the loss forward plus its backward to the logits) for each loss.

Usage::

    python examples/train_digits_torch.py                  # automatic backend
    python examples/train_digits_torch.py --backend cython --epochs 5

Exit code 1 if the curves differ by more than 1e-5 relative (or the test accuracy is
below 0.9).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

try:
    import xentfast
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import xentfast
import xentfast.torch as xft

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

MAX_RELATIVE_DIFFERENCE = 1e-5
REQUIRED_ACCURACY = 0.9


@dataclass
class Run:
    """One training run's record."""

    losses: list[float] = field(default_factory=list)  # one per optimizer step
    loss_step_s: float = 0.0  # wall time in the loss forward + backward to the logits
    accuracy: float = 0.0


def _data(seed: int):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values 0..16 -> 0..1
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
    return (torch.from_numpy(x_train), torch.from_numpy(x_test),
            torch.from_numpy(y_train.astype(np.int64)), torch.from_numpy(y_test.astype(np.int64)))


def train(criterion: torch.nn.Module, epochs: int, batch_size: int, lr: float,
          seed: int) -> Run:
    """Train from ``seed`` with ``criterion`` and record every step's loss."""
    x_train, x_test, y_train, y_test = _data(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order_rng = np.random.default_rng(seed)  # the same batches for every criterion
    run = Run()
    for _ in range(epochs):
        order = torch.from_numpy(order_rng.permutation(len(x_train)))
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            optimizer.zero_grad(set_to_none=True)
            logits = model(x_train[batch])
            # The loss step on its own: forward, and backward as far as the logits.
            start = time.perf_counter()
            loss = criterion(logits, y_train[batch])
            (dlogits,) = torch.autograd.grad(loss, logits)
            run.loss_step_s += time.perf_counter() - start
            logits.backward(dlogits)  # the rest of the network
            optimizer.step()
            run.losses.append(loss.item())
    with torch.no_grad():
        run.accuracy = float((model(x_test).argmax(dim=1) == y_test).double().mean())
    return run


def compare(epochs: int = 10, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
            backend: str | None = None, label_smoothing: float = 0.1
            ) -> tuple[Run, Run, float]:
    """Both runs and the largest relative difference between their loss curves."""
    with xentfast.use_backend(backend or xentfast.get_backend()):
        ours = train(xft.CrossEntropyLoss(label_smoothing=label_smoothing), epochs,
                     batch_size, lr, seed)
    theirs = train(torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing), epochs,
                   batch_size, lr, seed)
    a, b = np.asarray(ours.losses), np.asarray(theirs.losses)
    worst = float(np.max(np.abs(a - b) / np.abs(b)))
    return ours, theirs, worst


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit code 1 if the curves differ by more than 1e-5 relative."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=xentfast.available_backends(), default=None,
                        help="xentfast backend (default: the automatic choice)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    args = parser.parse_args(argv)
    backend = args.backend or xentfast.get_backend()
    ours, theirs, worst = compare(args.epochs, args.batch_size, args.lr, args.seed,
                                  backend, args.label_smoothing)
    steps = len(ours.losses)
    print(f"digits, {steps} steps of {args.batch_size}; xentfast backend {backend!r}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, run in (("xentfast.torch.CrossEntropyLoss", ours),
                      ("torch.nn.CrossEntropyLoss", theirs)):
        print(f"{name:32s} first loss {run.losses[0]:.7f}  final loss {run.losses[-1]:.7f}  "
              f"test accuracy {run.accuracy:.4f}  loss step {run.loss_step_s * 1e3:7.1f} ms "
              f"({run.loss_step_s / steps * 1e6:.1f} us/step)")
    print(f"largest relative difference between the loss curves: {worst:.3e} "
          f"(allowed {MAX_RELATIVE_DIFFERENCE:g})")
    if worst > MAX_RELATIVE_DIFFERENCE:
        print("FAILED: the loss curves differ")
        return 1
    if ours.accuracy < REQUIRED_ACCURACY:
        print(f"FAILED: test accuracy {ours.accuracy:.4f} < {REQUIRED_ACCURACY}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
