"""Each technique's overhead on a whole training step (forward + backward + optimizer step) of real models.

The technique benchmarks time the technique alone (a normalization layer, an optimizer step); what a user
pays is its share of a training step. Here each candidate step and its plain reference step train the same
architecture (a fresh copy each, same batch) and are timed interleaved. CPU, small spatial inputs (so the
convolutions do not drown everything else in a 2-core machine's time budget): ResNet-18 (torchvision, 11.2 M
parameters) on 32×32 and WRN-16-4 (2.7 M) on 16×16, batch 32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.timing import Ratio, measure_ratio

TITLE = "End to end: one training step (fwd + bwd + step) with each technique vs without"

Step = Callable[[], None]


def _models() -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    from torchvision.models import resnet18

    from normkit.train.runner.models import build_model

    return [
        ("ResNet-18", lambda: resnet18(num_classes=10), (32, 3, 32, 32)),
        (
            "WRN-16-4",
            lambda: build_model("wrn", (3, 16, 16), 10, depth=16, widen_factor=4, norm="bn"),
            (32, 3, 16, 16),
        ),
    ]


def _step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, after: Step | None = None
) -> Step:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if after is not None:
            after()

    return step


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _cases(
    make: Callable[[], nn.Module], x: torch.Tensor
) -> list[
    tuple[
        str,
        str,
        Callable[[], tuple[nn.Module, torch.optim.Optimizer, Step | None]],
        Callable[[], tuple[nn.Module, torch.optim.Optimizer, Step | None]],
    ]
]:
    from normkit.nn import convert_batchnorm
    from normkit.optim import SGDG, AdamG, NormalizedOptimizer, grassmann_param_groups

    def plain_sgd() -> tuple[nn.Module, torch.optim.Optimizer, Step | None]:
        m = make()
        return m, _sgd(m), None

    def plain_adam() -> tuple[nn.Module, torch.optim.Optimizer, Step | None]:
        m = make()
        return m, torch.optim.Adam(m.parameters(), lr=1e-3), None

    def brn() -> tuple[nn.Module, torch.optim.Optimizer, Step | None]:
        m = convert_batchnorm(make(), to="renorm")
        for buf_name, buf in m.named_buffers():
            if buf_name.endswith("num_batches_tracked"):
                buf.fill_(30_000)  # past the warm-up: r and d active, the general path
        return m, _sgd(m), None

    def sgdg(omega: float) -> Callable[[], tuple[nn.Module, torch.optim.Optimizer, Step | None]]:
        def build() -> tuple[nn.Module, torch.optim.Optimizer, Step | None]:
            m = make()
            groups = grassmann_param_groups(
                m, lr=0.01, lr_g=0.2, grad_clip=0.1, omega=omega, example_input=x[:2]
            )
            return m, SGDG(groups, momentum=0.9, nesterov=True), None

        return build

    def adamg() -> tuple[nn.Module, torch.optim.Optimizer, Step | None]:
        m = make()
        groups = grassmann_param_groups(m, lr=0.01, lr_g=0.05, grad_clip=0.1, example_input=x[:2])
        return m, AdamG(groups), None

    def normalized() -> tuple[nn.Module, torch.optim.Optimizer, Step | None]:
        m = make()
        return m, NormalizedOptimizer(_sgd(m), normalization="l2"), None

    return [
        ("BatchRenorm (past warm-up) + SGD", "BatchNorm + SGD", brn, plain_sgd),
        ("SGD-G (ν 0.1)", "SGD (momentum 0.9, Nesterov)", sgdg(0.0), plain_sgd),
        ("SGD-G (ν 0.1, ω 0.1), the paper's setting", "SGD (momentum 0.9, Nesterov)", sgdg(0.1), plain_sgd),
        ("Adam-G (ν 0.1)", "Adam", adamg, plain_adam),
        ("normalized SGD (l2 per tensor)", "SGD (momentum 0.9, Nesterov)", normalized, plain_sgd),
    ]


def run(quick: bool) -> list[Ratio]:
    repeats = 3 if quick else 11
    results = []
    torch.manual_seed(0)
    # One intra-op thread: on a shared 2-core machine, two threads' parallel regions stall each other and the
    # step times vary several-fold (measured: 4-8 s per ResNet-18 step at load 20 vs ~2 s with one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(repeats, results)
    finally:
        torch.set_num_threads(threads)


def _measure(repeats: int, results: list[Ratio]) -> list[Ratio]:
    for model_name, make, shape in _models():
        x = torch.randn(shape)
        y = torch.randint(0, 10, (shape[0],))
        for cand_name, ref_name, cand_build, ref_build in _cases(make, x):
            cm, co, ca = cand_build()
            rm, ro, ra = ref_build()
            cm.train()
            rm.train()
            results.append(
                measure_ratio(
                    f"{model_name} {tuple(shape)}: {cand_name}, {torch.get_num_threads()} thread(s)",
                    _step(cm, co, x, y, ca),
                    ref_name,
                    _step(rm, ro, x, y, ra),
                    repeats=repeats,
                    inner=1,
                    warmup=2,
                )
            )
            del cm, rm, co, ro
    return results
