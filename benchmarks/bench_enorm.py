"""One ENorm cycle vs one SGD training step (forward + backward + step) on the paper's two networks.

The "floor" rows time the memory traffic no exact cycle can avoid — one read of every balanced weight and one
in-place rescale of it and of its momentum buffer — against the same step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.timing import Ratio, measure_ratio
from normkit.enorm import ENorm

TITLE = "ENorm cycle vs SGD training step"


def fc_net(depth: int = 15, width: int = 500, d_in: int = 3072, classes: int = 10) -> nn.Sequential:
    """The paper's FC network: ``depth`` linear layers of width 500 with ReLUs (CIFAR-10 flattened input)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(d_in if i == 0 else width, classes if i == depth - 1 else width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def authors_fc_net(depth: int = 15, width: int = 500, d_in: int = 3072, classes: int = 10) -> nn.Sequential:
    """The FC network as the authors published it: bias-free linear layers, BatchNorm1d + ReLU after each
    hidden one (ENorm balances across the BatchNorm with ``norm_layers="ignore"`` or ``"affine"``)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(d_in if i == 0 else width, classes if i == depth - 1 else width, bias=False))
        if i < depth - 1:
            layers += [nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers)


class ConvNet9(nn.Module):
    """The paper's 9-conv network (Gitman et al.'s architecture, no BatchNorm), global average pooling at the
    end so it takes 32x32 inputs."""

    def __init__(self) -> None:
        super().__init__()
        spec = [(3, 128, 3), (128, 128, 3), (128, 128, 3), (128, 256, 3), (256, 256, 3), (256, 256, 3)]
        spec += [(256, 320, 3), (320, 320, 1), (320, 10, 1)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, k, padding=k // 2) for a, b, k in spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i in (2, 5):
                x = F.max_pool2d(x, 3, 2, 1)
        return x.mean((2, 3))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def _case(
    label: str,
    make: Callable[[], nn.Module],
    shape: tuple[int, ...],
    momentum: float,
    c: float,
    repeats: int,
    inner: int,
    threads: int,
    floor: bool = False,
    norm_layers: str = "stop",
) -> Ratio:
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum, weight_decay=1e-3)
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    step = _train_step(model, optimizer, x, y)
    step()  # momentum buffers exist: the cycle rescales them too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ignore" says that it changes the function: known here
        enorm = ENorm(model, optimizer, c=c, norm_layers=norm_layers)
    name = f"{label}, {len(enorm.groups)} groups, batch {shape[0]}, momentum {momentum}, {threads} thr"
    candidate = enorm.cycle
    if floor:
        # The least any exact cycle does: read every balanced weight once (its norms) and rescale it and its
        # momentum buffer in place once (rows and columns of a matrix are in fact rescaled in two passes).
        weights = list({id(t): t.detach() for t in enorm._tensors()}.values())
        buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters() if momentum]

        def candidate() -> None:
            torch._foreach_norm(weights)
            torch._foreach_mul_(weights, 1.0)
            if buffers:
                torch._foreach_mul_(buffers, 1.0)

        name = f"floor (1 read + 1 in-place rescale of weights and buffers): {name}"
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_ratio(
            name,
            candidate,
            "SGD step (fwd+bwd+step)",
            step,
            repeats=repeats,
            inner=inner,
            warmup=1,
            target=None if floor else 0.03,
        )
    finally:
        torch.set_num_threads(saved)


def run(quick: bool) -> list[Ratio]:
    conv_batch = 16 if quick else 64
    fc_repeats, conv_repeats = (5, 3) if quick else (15, 5)
    results = []
    for threads in dict.fromkeys((torch.get_num_threads(), 1)):
        results += [
            _case("FC 15x500", fc_net, (256, 3072), 0.0, 1.2, fc_repeats, 3, threads),
            _case("FC 15x500", fc_net, (256, 3072), 0.9, 1.2, fc_repeats, 3, threads),
            _case("9-conv", ConvNet9, (conv_batch, 3, 32, 32), 0.9, 1.1, conv_repeats, 1, threads),
            _case("FC 15x500", fc_net, (256, 3072), 0.0, 1.2, fc_repeats, 3, threads, floor=True),
            _case("FC 15x500", fc_net, (256, 3072), 0.9, 1.2, fc_repeats, 3, threads, floor=True),
            _case(
                "authors' BN FC 15x500, ignore",
                authors_fc_net,
                (256, 3072),
                0.0,
                1.2,
                fc_repeats,
                3,
                threads,
                norm_layers="ignore",
            ),
            _case(
                "authors' BN FC 15x500, affine",
                authors_fc_net,
                (256, 3072),
                0.0,
                1.2,
                fc_repeats,
                3,
                threads,
                norm_layers="affine",
            ),
        ]
    return results
