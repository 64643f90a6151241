"""The ENorm paper's fully connected net trained with plain SGD, with and without ENorm (a cycle per step).

Offline: MNIST-1D (generated locally by the ``mnist1d`` package) or scikit-learn's digits.

    python examples/enorm_fc.py                          # as published: BatchNorm, ENorm across it (authors')
    python examples/enorm_fc.py --norm-layers affine     # ENorm through BN's γ, β (keeps the function)
    python examples/enorm_fc.py --norm none              # the BN-free variant
    python examples/enorm_fc.py --norm none --bias       # with biases: c = 1.2 diverges (ENorm warns)

The authors' net (``--depth`` bias-free Linear layers in all, BatchNorm1d + ReLU after each hidden one,
Kaiming-normal init) and optimizer (batch 256, lr 0.1 -> 0 linearly, weight decay 1e-3 on every parameter,
no momentum), scaled down to width 128 for a CPU run. The measured figures (5 seeds, the same settings
through ``normkit compare --suite enorm``) are in docs/results.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from normkit.enorm import ENorm


def load(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())
        x, y, xt, yt = d["x"], d["y"], d["x_test"], d["y_test"]
    else:
        from sklearn.datasets import load_digits

        xs, ys = load_digits(return_X_y=True)
        perm = np.random.default_rng(0).permutation(len(xs))
        xs, ys = xs[perm] / 16.0, ys[perm]
        x, y, xt, yt = xs[:1400], ys[:1400], xs[1400:], ys[1400:]
    x, xt = torch.tensor(x, dtype=torch.float32), torch.tensor(xt, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    return (x - mean) / std, torch.tensor(y).long(), (xt - mean) / std, torch.tensor(yt).long()


def fc_net(d_in: int, depth: int, width: int, norm: bool, bias: bool, classes: int = 10) -> nn.Sequential:
    """The authors' FullyConnected: Linear (bias-free) -> BatchNorm1d -> ReLU, ..., Linear (classifier)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        last = i == depth - 1
        layers.append(nn.Linear(d_in if i == 0 else width, classes if last else width, bias=bias))
        if not last:
            layers += [nn.BatchNorm1d(width), nn.ReLU()] if norm else [nn.ReLU()]
    for m in layers:
        if isinstance(m, nn.Linear):  # He init, as the paper's code
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def train(data, args, seed: int, c: float | None) -> dict[str, float]:  # type: ignore[no-untyped-def]
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = fc_net(x.shape[1], args.depth, args.width, args.norm == "bn", args.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=args.wd)
    enorm = ENorm(model, optimizer, c=c, norm_layers=args.norm_layers) if c is not None else None
    steps = args.epochs * (len(x) // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)  # lr -> 0 linearly
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // args.batch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if enorm is not None:
                enorm.step()
            sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(x), y))  # NaN when training diverged
        test_acc = float((model(xt).argmax(1) == yt).float().mean())
        weight_sq = float(sum(m.weight.square().sum() for m in model if isinstance(m, nn.Linear)))
    return {"test_acc": test_acc, "train_loss": train_loss, "weight_sq": weight_sq, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=["mnist1d", "digits"], default="mnist1d")
    parser.add_argument("--depth", type=int, default=15)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--wd", type=float, default=1e-3)
    parser.add_argument(
        "--norm", choices=["bn", "none"], default="bn", help="BatchNorm1d after hidden layers"
    )
    parser.add_argument(
        "--norm-layers",
        choices=["ignore", "affine", "stop"],
        default="ignore",
        help="ENorm across BN: ignore (the authors'), affine (γ, β; keeps the function), stop",
    )
    parser.add_argument("--bias", action="store_true", help="Linear layers with biases (not the paper's)")
    parser.add_argument("--c", type=float, nargs="+", default=[1.0, 1.2], help="ENorm arms (paper: 1.2)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    data = load(args.dataset)
    print(
        f"{args.dataset}: {len(data[0])} train / {len(data[2])} test, FC {args.depth} x {args.width} "
        f"(norm {args.norm}, ENorm norm_layers {args.norm_layers}, biases {args.bias}), "
        f"SGD lr {args.lr} -> 0, wd {args.wd}, batch {args.batch}, {args.epochs} epochs, seeds {args.seeds}"
    )
    arms: list[tuple[str, float | None]] = [("SGD", None)] + [(f"SGD + ENorm (c={c})", c) for c in args.c]
    for label, c in arms:
        runs = [train(data, args, seed, c) for seed in range(args.seeds)]
        accs = [r["test_acc"] * 100 for r in runs]
        print(
            f"{label:24s} test acc {statistics.mean(accs):5.1f} % ± {statistics.pstdev(accs):.1f} "
            f"(per seed {', '.join(f'{a:.1f}' for a in accs)}), "
            f"train loss {statistics.mean(r['train_loss'] for r in runs):.3f}, "
            f"Σ‖W‖² {statistics.mean(r['weight_sq'] for r in runs):.1f}, "
            f"{statistics.mean(r['seconds'] for r in runs):.1f} s/run"
        )


if __name__ == "__main__":
    main()
