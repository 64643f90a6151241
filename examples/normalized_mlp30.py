"""The deep-MLP experiment of Yu et al.'s reference code: 30 dense layers of 128 units, each followed by
BatchNorm and dropout 0.2, small L2 regularization of the weights; plain vs block-normalized SGD / Adam
(offline, a few minutes on CPU).

Data: MNIST-1D (the `mnist1d` package generates it locally: 4 000 train / 1 000 test sequences of 40 values,
10 classes) or scikit-learn's digits (`--data digits`: 1 400 / 397 images of 8×8). Optimizers as in the
reference code: SGD(lr 0.01, momentum 0.9, Nesterov) and Adam(lr 0.001), each plain and wrapped in
`NormalizedOptimizer(..., "l2")` (per tensor), plus the paper's per-layer blocks (`granularity="layer"`).
The L2 term is part of the loss (as in Keras), so it is normalized with the rest of the gradient.

    python examples/normalized_mlp30.py [--data mnist1d|digits] [--epochs 30] [--seeds 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from normkit.optim import NormalizedOptimizer


def load(name: str) -> tuple[torch.Tensor, ...]:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32)
        y = torch.tensor(d.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        x, y = x[order], y[order]
        xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())
        xtr, ytr = torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"])
        xte, yte = torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"])
    mean, std = xtr.mean(0), xtr.std(0) + 1e-3
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


def mlp(inputs: int, classes: int, depth: int = 30, width: int = 128) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [
            nn.Linear(inputs if i == 0 else width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Dropout(0.2),
        ]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def sgd(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)


def adam(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(m.parameters(), lr=1e-3)


METHODS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "SGD nesterov": sgd,
    "Normalized SGD (l2, tensor)": lambda m: NormalizedOptimizer(sgd(m), "l2"),
    "Normalized SGD (l2, layer)": lambda m: NormalizedOptimizer(sgd(m), "l2", "layer", model=m),
    "Adam": adam,
    "Normalized Adam (l2, tensor)": lambda m: NormalizedOptimizer(adam(m), "l2"),
}


def train(method: str, data: tuple[torch.Tensor, ...], epochs: int, seed: int, l2: float, batch: int) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = mlp(xtr.shape[1], int(ytr.max()) + 1)
    opt = METHODS[method](model)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    gen = torch.Generator().manual_seed(seed)
    hist: dict[str, list[float]] = {"train_loss": [], "test_loss": [], "test_acc": []}
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(xtr), generator=gen).split(batch):
            if len(idx) < 2:
                continue
            opt.zero_grad()
            ce = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss = ce + l2 * sum((w * w).sum() for w in weights)
            loss.backward()
            opt.step()
            total += float(ce.detach()) * len(idx)
            count += len(idx)
        model.eval()
        with torch.no_grad():
            out = model(xte)
            hist["train_loss"].append(total / count)
            hist["test_loss"].append(float(F.cross_entropy(out, yte)))
            hist["test_acc"].append(float((out.argmax(1) == yte).float().mean()))
    return hist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["mnist1d", "digits"], default="mnist1d")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--l2", type=float, default=1e-4, help="coefficient of Σ‖W‖² in the loss")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the figure (needs matplotlib)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load(args.data)
    print(
        f"{args.data}: {len(data[0])} train / {len(data[2])} test, 30×128 MLP + BN + dropout 0.2, "
        f"l2 {args.l2:g}, batch {args.batch}, {args.epochs} epochs, {args.seeds} seeds"
    )
    print(
        f"{'method':30s} {'final train CE':>15s} {'final test acc':>15s} {'best test acc':>14s} {'s/run':>6s}"
    )
    runs: dict[str, list[dict]] = {}
    for method in args.methods:
        start = time.perf_counter()
        runs[method] = [
            train(method, data, args.epochs, seed, args.l2, args.batch) for seed in range(args.seeds)
        ]
        secs = (time.perf_counter() - start) / args.seeds
        tr = statistics.mean(h["train_loss"][-1] for h in runs[method])
        acc = [h["test_acc"][-1] for h in runs[method]]
        best = statistics.mean(max(h["test_acc"]) for h in runs[method])
        spread = f" ± {statistics.stdev(acc) * 100:.1f}" if len(acc) > 1 else ""
        print(
            f"{method:30s} {tr:15.4f} {statistics.mean(acc) * 100:10.1f}{spread:>5s} "
            f"{best * 100:14.1f} {secs:6.0f}"
        )
    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        args.out.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for method, hists in runs.items():
            for key, ax in (("train_loss", axes[0]), ("test_acc", axes[1])):
                mean = [statistics.mean(v) for v in zip(*(h[key] for h in hists))]
                ax.plot(range(1, len(mean) + 1), mean, label=method)
        axes[0].set(
            xlabel="epoch", ylabel="train cross-entropy", yscale="log", title=f"30×128 MLP, {args.data}"
        )
        axes[1].set(xlabel="epoch", ylabel="test accuracy", title=f"mean of {args.seeds} seeds")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = args.out / f"normalized_mlp30_{args.data}.png"
        fig.savefig(path, dpi=110)
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
