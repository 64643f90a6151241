"""Expected cost of running each seed table's recipe unchanged, extrapolated by FLOPs.

We cannot train WRN-28-10 on CIFAR here (no GPU, no CIFAR). Instead: count the training FLOPs of each recipe's
model (3 × forward FLOPs per example, torch's FlopCounterMode) × training examples × epochs, and divide by
the training throughput (FLOP/s) *measured here* on a smaller model of the same family (WRN-16-1 on random
CIFAR-shaped batches). GPU time is the same FLOP count at an assumed sustained 20 TFLOP/s (a guess for a
current data-centre GPU in TF32/bf16 — not measured). Both are estimates, not measurements.

    python -m benchmarks.recipe_cost
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from normkit.train.runner.config import resolve_config
from normkit.train.runner.data import DATASETS
from normkit.train.runner.models import build_model

# One recipe per table of the seeds (train-set sizes: CIFAR 50 000, SVHN train 73 257 (+ extra 531 131),
# MNIST 60 000; the ENorm runs hold out 9 040 CIFAR images).
TABLES = [
    ("Cho & Lee Table 1 (CIFAR-10, WRN-28-10, SGD-G)", "rbn-wrn28-10-cifar10-sgdg", 50_000),
    ("Cho & Lee Table 1 (CIFAR-10, VGG-13, SGD-G)", "rbn-vgg13-cifar10-sgdg", 50_000),
    ("Cho & Lee Table 2 (SVHN, WRN-22-8, SGD-G)", "rbn-wrn22-8-svhn-sgdg", 73_257),
    ("Stock et al. FC net (CIFAR-10)", "enorm-fc-cifar10", 50_000 - 9_040),
    ("Stock et al. 9-conv net (CIFAR-10)", "enorm-conv-cifar10", 50_000 - 9_040),
    ("Mishkin & Matas MNIST table (LSUV)", "lsuv-mnist", 60_000),
    ("Ioffe BRN seed: WRN-16-4 on CIFAR-10", "brn-wrn16-4-cifar10", 50_000),
    ("Yu et al. seed: 30 x 128 MLP", "normalized-mlp30", 60_000),
]
GPU_FLOPS = 20e12
SVHN_EXTRA = 531_131


def duration(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:.1f} min"


def forward_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, *shape))
    return counter.get_total_flops()


def measured_throughput(threads: int) -> float:
    """Training FLOP/s of WRN-16-1 (the smaller model) on random CIFAR-shaped batches of 32, on this CPU."""
    torch.set_num_threads(threads)
    model = build_model("wrn", (3, 32, 32), 10, depth=16, widen_factor=1, norm="bn")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    flops = 3 * forward_flops(model, (3, 32, 32)) * 32
    model.train()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    steps, start = 5, time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return flops * steps / (time.perf_counter() - start)


def main() -> None:
    throughput = measured_throughput(torch.get_num_threads())
    print(f"measured training throughput here (WRN-16-1, batch 32): {throughput / 1e9:.1f} GFLOP/s")
    print(
        "| table | recipe | epochs | train GFLOP / example | total PFLOP | CPU here (est.) "
        "| GPU @ 20 TFLOP/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for table, name, n_train in TABLES:
        cfg = resolve_config(recipe=name)
        shape = DATASETS[cfg.data].input_shape
        model = build_model(
            cfg.model,
            shape,
            DATASETS[cfg.data].num_classes,
            norm=cfg.resolved_norm,
            depth=cfg.depth,
            width=cfg.width,
            widen_factor=cfg.widen_factor,
            dropout=cfg.dropout,
        )
        if cfg.svhn_extra:
            n_train += SVHN_EXTRA
        per_example = 3 * forward_flops(model, shape)
        total = per_example * n_train * cfg.epochs
        cpu_h = total / throughput / 3600
        gpu_h = total / GPU_FLOPS / 3600
        print(
            f"| {table} | `{name}` | {cfg.epochs} | {per_example / 1e9:.3f} | {total / 1e15:.2f} | "
            f"{duration(cpu_h)} | {duration(gpu_h)} |"
        )


if __name__ == "__main__":
    main()
