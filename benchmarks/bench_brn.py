"""BatchRenorm vs nn.BatchNorm: train-mode forward+backward and eval forward, same shapes, same process."""

from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks.timing import Ratio, measure_ratio
from normkit.nn import BatchRenorm1d, BatchRenorm2d

TITLE = "Batch Renormalization vs nn.BatchNorm"


def _train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    return step


def _eval_step(layer: nn.Module, x: torch.Tensor):
    def step() -> None:
        with torch.no_grad():
            layer(x)

    return step


def run(quick: bool) -> list[Ratio]:
    repeats = 5 if quick else 21
    cases = [
        ("2d", BatchRenorm2d, nn.BatchNorm2d, (128, 64, 32, 32), torch.contiguous_format),
        ("2d channels_last", BatchRenorm2d, nn.BatchNorm2d, (128, 64, 32, 32), torch.channels_last),
        ("1d", BatchRenorm1d, nn.BatchNorm1d, (4096, 1024), torch.contiguous_format),
    ]
    results = []
    for label, renorm_cls, bn_cls, shape, memory_format in cases:
        renorm, bn = renorm_cls(shape[1]), bn_cls(shape[1])
        renorm.num_batches_tracked.fill_(30000)  # past warm-up: r and d active, the general path
        x = torch.randn(shape)
        if x.dim() == 4:
            x = x.to(memory_format=memory_format)
        x.requires_grad_()
        grad = torch.randn_like(x)
        results.append(
            measure_ratio(
                f"train fwd+bwd {label} {shape}",
                _train_step(renorm.train(), x, grad),
                f"nn.{bn_cls.__name__}",
                _train_step(bn.train(), x, grad),
                repeats=repeats,
                target=1.3,
            )
        )
        results.append(
            measure_ratio(
                f"eval fwd {label} {shape}",
                _eval_step(renorm.eval(), x),
                f"nn.{bn_cls.__name__}",
                _eval_step(bn.eval(), x),
                repeats=repeats,
                inner=10,
                target=1.05,
            )
        )
    return results
