"""The convex experiment of Yu et al.'s reference code: L(x) = ½ xᵀQx + bᵀx, plain vs block-normalized SGD
and Adam (offline).

Q is a random symmetric positive-definite matrix with eigenvalues log-spaced in [1/κ, 1], b a random vector;
L* = −½ bᵀQ⁻¹b. Full (deterministic) gradients. For every optimizer the learning rate is the best of a grid
(final L − L*); each normalized run is `NormalizedOptimizer(inner, "l2")` on the single tensor x, so the step
length is lr whatever the gradient's scale. A second table: normalized Adam across learning rates (the
reference code's learning-rate study). With `--decay`, an `ExponentialLR` scheduler built on the *wrapper*
drives the inner lr.

    python examples/normalized_quadratic.py [--dim 50] [--kappa 1000] [--steps 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch

from normkit.optim import NormalizedOptimizer

LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0]


def problem(dim: int, kappa: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eig = torch.logspace(-math.log10(kappa), 0, dim, dtype=torch.float64)
    Q = q @ torch.diag(eig) @ q.T
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    best = float(-0.5 * b @ torch.linalg.solve(Q, b))
    return Q, b, best


def run(
    make: Callable[[list[torch.Tensor], float], torch.optim.Optimizer],
    lr: float,
    Q: torch.Tensor,
    b: torch.Tensor,
    best: float,
    steps: int,
    decay: float | None,
) -> list[float]:
    x = torch.zeros(len(b), dtype=torch.float64, requires_grad=True)
    opt = make([x], lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, decay) if decay else None
    gaps = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * x @ Q @ x + b @ x
        loss.backward()
        gaps.append(max(float(loss.detach()) - best, 1e-16))
        opt.step()
        if sched is not None:
            sched.step()
    return gaps


METHODS: dict[str, Callable[[list[torch.Tensor], float], torch.optim.Optimizer]] = {
    "SGD": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "SGD momentum 0.9 nesterov": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    "Normalized SGD (l2)": lambda p, lr: NormalizedOptimizer(torch.optim.SGD(p, lr=lr), "l2"),
    "Normalized SGD nesterov (l2)": lambda p, lr: NormalizedOptimizer(
        torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True), "l2"
    ),
    "Adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "Normalized Adam (l2)": lambda p, lr: NormalizedOptimizer(torch.optim.Adam(p, lr=lr), "l2"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--kappa", type=float, default=1000.0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--decay", type=float, default=None, help="ExponentialLR gamma per step (e.g. 0.998)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the figures (needs matplotlib)")
    args = ap.parse_args()
    Q, b, best = problem(args.dim, args.kappa)
    print(f"dim {args.dim}, κ {args.kappa:g}, {args.steps} full-gradient steps, L(0) − L* = {-best:.4g}")
    curves: dict[str, list[float]] = {}
    print(
        f"{'optimizer':32s} {'best lr':>8s} {'L − L* final':>13s} {'min over run':>13s} "
        f"{'steps to 1e-3·gap0':>19s}"
    )
    for name, make in METHODS.items():
        results = {}
        for lr in LRS:
            gaps = run(make, lr, Q, b, best, args.steps, args.decay)
            if all(math.isfinite(v) for v in gaps):
                results[lr] = gaps
        lr = min(results, key=lambda k: results[k][-1])
        gaps = results[lr]
        curves[f"{name}, lr {lr:g}"] = gaps
        hit = next((i for i, v in enumerate(gaps) if v < 1e-3 * -best), None)
        print(f"{name:32s} {lr:8g} {gaps[-1]:13.3e} {min(gaps):13.3e} {hit if hit is not None else '-':>19}")
    print("\nNormalized Adam (l2) by learning rate: final L − L*")
    lr_study = {}
    for lr in (1e-2, 1e-1, 1.0, 10.0):
        lr_study[lr] = run(METHODS["Normalized Adam (l2)"], lr, Q, b, best, args.steps, args.decay)
        print(f"  lr {lr:<6g} {lr_study[lr][-1]:.3e}")
    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        args.out.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for label, gaps in curves.items():
            axes[0].semilogy(gaps, label=label)
        axes[0].set(xlabel="step", ylabel="L(x) − L*", title=f"½xᵀQx + bᵀx, dim {args.dim}, κ {args.kappa:g}")
        axes[0].legend(fontsize=7)
        for lr, gaps in lr_study.items():
            axes[1].semilogy(gaps, label=f"lr {lr:g}")
        axes[1].set(xlabel="step", ylabel="L(x) − L*", title="Normalized Adam (l2): learning rate")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = args.out / "normalized_quadratic.png"
        fig.savefig(path, dpi=110)
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
