"""Batch Norm vs Batch Renormalization on scikit-learn's digits (offline, about a minute of CPU time).

Three regimes from the paper (Ioffe 2017), at toy scale: ordinary i.i.d. minibatches, microbatches of 4
examples (each normalized on its own: ghost batches), and non-i.i.d. minibatches drawn from 2 classes at a
time. The schedule is shortened to fit a short run (r_max, d_max start to grow after 100 steps instead of
5 000); everything else is the paper's algorithm. Prints a table of test accuracy and the code version that
produced it (the git commit of a checkout, see ``normkit.train.runner.provenance``).

    python examples/brn_digits_demo.py [--epochs 30] [--seeds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from normkit.nn import BatchRenorm1d
from normkit.train.runner.provenance import code_version

SCHEDULE = {"warmup_steps": 100, "r_max_steps": 600, "d_max_steps": 400}


def load(seed: int = 0) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    x = (x - x[:1400].mean(0)) / (x[:1400].std(0) + 1e-3)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def net(norm: str, micro: int | None) -> nn.Module:
    def layer(width: int) -> nn.Module:
        if norm == "bn":
            # Batch norm on microbatches = renorm with r = 1, d = 0 forever, each microbatch on its own.
            return BatchRenorm1d(
                width, momentum=0.01, schedule=lambda step: (1.0, 0.0), virtual_batch_size=micro
            )
        return BatchRenorm1d(width, momentum=0.01, virtual_batch_size=micro, **SCHEDULE)

    return nn.Sequential(
        nn.Linear(64, 128),
        layer(128),
        nn.ReLU(),
        nn.Linear(128, 128),
        layer(128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def batches(y: torch.Tensor, batch: int, non_iid: bool, gen: torch.Generator) -> list[torch.Tensor]:
    if not non_iid:
        return list(torch.randperm(len(y), generator=gen).split(batch))
    # Each minibatch holds examples of only 2 classes.
    by_class = [torch.nonzero(y == c).flatten() for c in range(10)]
    by_class = [idx[torch.randperm(len(idx), generator=gen)] for idx in by_class]
    pairs = torch.randperm(10, generator=gen).view(5, 2)
    out = []
    for a, b in pairs.tolist():
        pool = torch.cat([by_class[a], by_class[b]])
        pool = pool[torch.randperm(len(pool), generator=gen)]
        out += list(pool.split(batch))
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def train(norm: str, regime: str, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y, x_test, y_test = load()
    micro = 4 if regime == "microbatch 4" else None
    model = net(norm, micro)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        model.train()
        for idx in batches(y, 32, regime == "non-iid (2 classes)", gen):
            if len(idx) < 2 or (micro and len(idx) < micro):
                continue
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item() * 100


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: PyTorch's; on a shared or loaded machine --threads 1 is often fastest "
        "for a model this small)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.time()
    print(f"digits (1400 train / 397 test), MLP 64-128-128-10, batch 32, SGD 0.05, {args.epochs} epochs")
    print(f"{'regime':<22} {'BatchNorm':>10} {'BatchRenorm':>12}   (test accuracy %, median of seeds)")
    for regime in ["iid batch 32", "microbatch 4", "non-iid (2 classes)"]:
        row = []
        for norm in ["bn", "brn"]:
            accs = [train(norm, regime, args.epochs, seed) for seed in range(args.seeds)]
            row.append(statistics.median(accs))
        print(f"{regime:<22} {row[0]:>10.1f} {row[1]:>12.1f}")
    code = code_version()
    print(f"({time.time() - start:.0f} s, {torch.get_num_threads()} threads; code {code['version']})")


if __name__ == "__main__":
    main()
