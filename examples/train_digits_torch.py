"""Train a small PyTorch MLP on scikit-learn's digits with ``xentfast.torch.CrossEntropyLoss``.

The network (64 -> 128 (ReLU) -> 10, float32, Adam) is trained with
``xentfast.torch.CrossEntropyLoss``; at every step ``torch.nn.CrossEntropyLoss`` is
evaluated on the very same logits, and the two losses and gradients are compared: the
largest relative difference of the losses, and of the gradients (against the largest
gradient element of the step), must stay within 1e-5.  (Two separate training runs
cannot be compared this way: float32 Adam amplifies any last-bit difference, the
reference's own included, and after a few hundred steps two runs of the same loss
differ by up to 1e-3 depending on the seed.)  Then the same network is trained from
the same seed with ``torch.nn.CrossEntropyLoss`` alone, for its final loss and test
accuracy.  Also printed: the wall time spent in the loss step (the loss forward plus
its backward to the logits) for each loss.

Usage::

    python examples/train_digits_torch.py                  # automatic backend
    python examples/train_digits_torch.py --backend cython --epochs 5

Exit code 1 if a step's loss or gradient differs by more than 1e-5 relative (or the
test accuracy is below 0.9).
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


def _loss_step(criterion: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor,
               run: Run) -> torch.Tensor:
    """The loss step on its own, timed: forward, and backward as far as the logits."""
    start = time.perf_counter()
    loss = criterion(logits, labels)
    (dlogits,) = torch.autograd.grad(loss, logits)
    run.loss_step_s += time.perf_counter() - start
    run.losses.append(loss.item())
    return dlogits


def train(criterion: torch.nn.Module, epochs: int, batch_size: int, lr: float,
          seed: int, reference: torch.nn.Module | None = None
          ) -> tuple[Run, Run, float]:
    """Train from ``seed`` with ``criterion``; with a ``reference``, evaluate it on the
    same logits at every step too.  Returns both records and the largest relative
    difference of a step's loss or gradient (0 without a reference)."""
    x_train, x_test, y_train, y_test = _data(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order_rng = np.random.default_rng(seed)  # the same batches for every criterion
    run, ref, worst = Run(), Run(), 0.0
    for _ in range(epochs):
        order = torch.from_numpy(order_rng.permutation(len(x_train)))
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            optimizer.zero_grad(set_to_none=True)
            logits = model(x_train[batch])
            dlogits = _loss_step(criterion, logits, y_train[batch], run)
            if reference is not None:
                dref = _loss_step(reference, logits, y_train[batch], ref)
                worst = max(worst, abs(run.losses[-1] - ref.losses[-1]) / abs(ref.losses[-1]),
                            float((dlogits - dref).abs().max() / dref.abs().max()))
            logits.backward(dlogits)  # the rest of the network
            optimizer.step()
    with torch.no_grad():
        run.accuracy = float((model(x_test).argmax(dim=1) == y_test).double().mean())
    return run, ref, worst


def compare(epochs: int = 10, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
            backend: str | None = None, label_smoothing: float = 0.1
            ) -> tuple[Run, Run, Run, float]:
    """Training with xentfast (torch's loss checked at every step on the same logits),
    then with torch's loss alone: (ours, torch's on our logits, torch's own run, the
    largest relative difference of a step's loss or gradient)."""
    torch_loss = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    with xentfast.use_backend(backend or xentfast.get_backend()):
        ours, checked, worst = train(xft.CrossEntropyLoss(label_smoothing=label_smoothing),
                                     epochs, batch_size, lr, seed, reference=torch_loss)
    theirs, _, _ = train(torch_loss, epochs, batch_size, lr, seed)
    return ours, checked, theirs, worst


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit code 1 if a step's loss or gradient differs by more than 1e-5
    relative."""
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
    ours, checked, theirs, worst = compare(args.epochs, args.batch_size, args.lr, args.seed,
                                           backend, args.label_smoothing)
    steps = len(ours.losses)
    print(f"digits, {steps} steps of {args.batch_size}; xentfast backend {backend!r}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, run, timed in (("xentfast.torch.CrossEntropyLoss", ours, ours),
                             ("torch.nn.CrossEntropyLoss", theirs, checked)):
        print(f"{name:32s} first loss {run.losses[0]:.7f}  final loss {run.losses[-1]:.7f}  "
              f"test accuracy {run.accuracy:.4f}  loss step {timed.loss_step_s * 1e3:7.1f} ms "
              f"({timed.loss_step_s / steps * 1e6:.1f} us/step)")
    print(f"largest relative difference of a step's loss or gradient, both losses on the "
          f"same logits: {worst:.3e} (allowed {MAX_RELATIVE_DIFFERENCE:g})")
    if worst > MAX_RELATIVE_DIFFERENCE:
        print("FAILED: the losses differ")
        return 1
    if ours.accuracy < REQUIRED_ACCURACY:
        print(f"FAILED: test accuracy {ours.accuracy:.4f} < {REQUIRED_ACCURACY}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
