"""SGD vs SGD-G vs Adam-G (Cho & Lee, NIPS 2017) on offline data: a small BN conv net, the paper's recipe.

Data: scikit-learn's 8×8 digits (1 400 train / 397 test) or mnist1d (4 000 / 1 000, generated locally).
Model: three conv → BN → ReLU blocks and a linear classifier; the convs feed BN, so
``grassmann_param_groups(select="bn_input")`` puts their weights on the Grassmann manifold.
Recipe, the paper's CIFAR settings with the epochs shortened: SGD lr 0.1 (Nesterov, momentum 0.9, wd 5e-4 on
everything); SGD-G lr_e 0.01 / lr_g 0.2, Adam-G lr_e 0.01 / lr_g 0.05 (ν = 0.1, ω = 0.1, wd 5e-4 on the other
weights only, Nesterov SGD for them); batch 128; every lr ×0.2 at 30 %, 60 %, 80 % of the epochs (the paper:
60/120/160 of 200). Prints the median test accuracy over the seeds (the paper reports medians of five).

    python examples/grassmann_digits.py [--data digits|mnist1d] [--epochs 60] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from normkit.optim import SGDG, AdamG, grassmann_param_groups, orthogonality_penalty


def load(name: str) -> tuple[torch.Tensor, ...]:
    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        xt, yt = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y)
        order = torch.randperm(len(yt), generator=torch.Generator().manual_seed(1234))
        xt, yt = xt[order], yt[order]
        n_train = 1400
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())
        xt = torch.tensor(np_concat(d["x"], d["x_test"]), dtype=torch.float32).unsqueeze(1)
        yt = torch.tensor(np_concat(d["y"], d["y_test"]))
        n_train = len(d["y"])
    mean, std = xt[:n_train].mean(), xt[:n_train].std()
    xt = (xt - mean) / std
    return xt[:n_train], yt[:n_train], xt[n_train:], yt[n_train:]


def np_concat(a, b):  # type: ignore[no-untyped-def]
    import numpy as np

    return np.concatenate([a, b])


def net(dims: int) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool1d(1)
    k = 3 if dims == 2 else 5
    return nn.Sequential(
        conv(1, 32, k, padding=k // 2, bias=False),
        bn(32),
        nn.ReLU(),
        conv(32, 64, k, padding=k // 2, bias=False),
        bn(64),
        nn.ReLU(),
        nn.MaxPool2d(2) if dims == 2 else nn.MaxPool1d(2),
        conv(64, 128, k, padding=k // 2, bias=False),
        bn(128),
        nn.ReLU(),
        pool,
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def train(method: str, data: tuple[torch.Tensor, ...], epochs: int, seed: int) -> tuple[float, float]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = net(xtr.dim() - 2)
    opt: torch.optim.Optimizer
    if method == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    elif method == "SGD-G":
        opt = SGDG(grassmann_param_groups(model, 0.01, 0.2, grad_clip=0.1, omega=0.1), lr=0.01, nesterov=True)
    else:
        opt = AdamG(
            grassmann_param_groups(model, 0.01, 0.05, grad_clip=0.1, omega=0.1), lr=0.01, nesterov=True
        )
    milestones = [int(epochs * f) for f in (0.3, 0.6, 0.8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=gen).split(128):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    penalty = orthogonality_penalty(opt).item() if method != "SGD" else float("nan")
    return acc, penalty


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=["digits", "mnist1d"], default="digits")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this size)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load(args.data)
    print(
        f"{args.data}: {len(data[1])} train / {len(data[3])} test, {args.epochs} epochs, {args.seeds} seeds"
    )
    print("| method | median test acc | per seed | (ω/2)‖YYᵀ − I‖² at the end | time |")
    print("|---|---:|---|---:|---:|")
    for method in ("SGD", "SGD-G", "Adam-G"):
        start = time.perf_counter()
        runs = [train(method, data, args.epochs, seed) for seed in range(args.seeds)]
        accs = [a for a, _ in runs]
        per_seed = ", ".join(f"{100 * a:.2f}" for a in accs)
        print(
            f"| {method} | {100 * statistics.median(accs):.2f} % | {per_seed} | "
            f"{statistics.median(p for _, p in runs):.3g} | {time.perf_counter() - start:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
