"""BatchRenorm vs nn.BatchNorm: train-mode forward+backward and eval forward, same shapes, same process.

The RL rows time BatchRenorm1d on a CrossQ-sized critic batch — the joint (s, a) / (s', a') pass of
2×256 rows, 256 features — where per-call overhead rather than memory traffic dominates; against
nn.BatchNorm1d and against a straightforward BRN written the way the RL ports write it (``PlainBatchRenorm1d``
below: eager arithmetic, a Python branch on the step counter).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks.timing import Ratio, measure_ratio
from normkit.nn import BatchRenorm1d, BatchRenorm2d

TITLE = "Batch Renormalization vs nn.BatchNorm"


class PlainBatchRenorm1d(nn.Module):
    """Batch Renormalization as the RL ports implement it: batch statistics, r and d and the normalization in
    eager per-element arithmetic, running variance, and a host-side branch on the step counter (a device
    synchronisation per call on a GPU)."""

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float = 0.01, warmup_steps: int = 100_000
    ):
        super().__init__()
        self.eps, self.momentum, self.warmup_steps = eps, momentum, warmup_steps
        self.r_max, self.d_max = 3.0, 5.0
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("steps", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            x_hat = (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)
            return self.weight * x_hat + self.bias
        batch_mean = x.mean(0)
        batch_var = x.var(0, unbiased=False)
        batch_std = torch.sqrt(batch_var + self.eps)
        x_hat = (x - batch_mean) / batch_std
        if self.steps >= self.warmup_steps:  # bool(tensor): a host sync, as in the ports
            running_std = torch.sqrt(self.running_var + self.eps)
            r = (batch_std.detach() / running_std).clamp(1 / self.r_max, self.r_max)
            d = ((batch_mean.detach() - self.running_mean) / running_std).clamp(-self.d_max, self.d_max)
            x_hat = x_hat * r + d
        with torch.no_grad():
            self.running_mean += self.momentum * (batch_mean - self.running_mean)
            self.running_var += self.momentum * (batch_var - self.running_var)
            self.steps += 1
        return self.weight * x_hat + self.bias


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
    results += _rl_rows(repeats)
    return results


def _rl_rows(repeats: int) -> list[Ratio]:
    rows = _rl_pair(repeats, "")
    threads = torch.get_num_threads()
    if threads > 1:
        # Small tensors: with several threads each kernel's parallel region costs as much as its arithmetic,
        # and on a shared machine far more; single-threaded figures show the per-call overhead itself.
        torch.set_num_threads(1)
        try:
            rows += _rl_pair(repeats, ", 1 thread")
        finally:
            torch.set_num_threads(threads)
    return rows


def _rl_pair(repeats: int, label: str) -> list[Ratio]:
    shape = (2 * 256, 256)  # CrossQ's joint batch: (s, a) and (s', a') of a 256 batch, 256 features
    renorm = BatchRenorm1d(shape[1], schedule="crossq").train()
    plain = PlainBatchRenorm1d(shape[1]).train()
    renorm.num_batches_tracked.fill_(200_000)  # past the switch: r and d active
    plain.steps.fill_(200_000)
    bn = nn.BatchNorm1d(shape[1]).train()
    x = torch.randn(shape).requires_grad_()
    grad = torch.randn_like(x)
    name = f"train fwd+bwd 1d RL {shape}{label}"
    return [
        measure_ratio(
            name,
            _train_step(renorm, x, grad),
            "nn.BatchNorm1d",
            _train_step(bn, x, grad),
            repeats=repeats,
            inner=20,
            target=1.3,
        ),
        measure_ratio(
            name,
            _train_step(renorm, x, grad),
            "plain BRN (RL ports' style)",
            _train_step(plain, x, grad),
            repeats=repeats,
            inner=20,
        ),
    ]
