"""SGD-G / Adam-G step vs torch SGD (Nesterov) / Adam (foreach) on the manifold weights of wide ResNets.

The weights are those the paper puts on the Grassmann manifold (the reference rule: every 3×3 conv with
out < in·k·k, i.e. all of them, the stem included) of WRN-28-10 (CIFAR) and WRN-16-4 (SVHN); only the shapes
matter. Gradients are random and fixed; every call is one full optimizer step (state updated in place).
SGD-G / Adam-G use the paper's ν = 0.1; ω = 0 except in the marked rows (ω adds one (out×out) Gram matmul
and one matmul per tensor). "default" is the path the optimizer picks itself (single-tensor on CPU);
"batched" forces foreach=True (rows of equal length concatenated, one batch per row length);
"torch.compile(step)" is the default optimizer's step compiled by inductor (compiled once, before timing),
against the eager torch optimizer.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks.timing import Ratio, measure_ratio
from normkit.optim import SGDG, AdamG

TITLE = "SGD-G / Adam-G vs torch SGD / Adam on WRN manifold weights"


def wrn_manifold_shapes(depth: int, k: int) -> list[tuple[int, ...]]:
    """3×3 conv weight shapes of a pre-activation WRN-depth-k (the 1×1 shortcuts are overcomplete)."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    shapes: list[tuple[int, ...]] = [(16, 3, 3, 3)]
    for i in range(3):
        cin, cout = widths[i], widths[i + 1]
        for b in range(n):
            shapes += [(cout, cin if b == 0 else cout, 3, 3), (cout, cout, 3, 3)]
    return shapes


def _params(shapes: list[tuple[int, ...]]) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = nn.Parameter(torch.randn(s, generator=gen) * 0.05)
        p.grad = torch.randn(s, generator=gen) * 1e-2
        params.append(p)
    return params


class _Compiled:
    """``torch.compile(opt.step)`` (inductor), with the optimizer's state for the memory figure."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.state = opt.state
        self.step = torch.compile(opt.step)


class _OnePass:
    """One read-modify-write pass over the manifold weights (``w += 0·g``, foreach): the unit of memory
    traffic both steps are made of."""

    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        params = _params(shapes)
        self.params = [p.detach() for p in params]
        self.grads = [p.grad for p in params]
        self.state: dict = {}

    def step(self) -> None:
        torch._foreach_add_(self.params, self.grads, alpha=0.0)


def _state_mb(opt: torch.optim.Optimizer | _Compiled) -> float:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()) / 2**20


def run(quick: bool) -> list[Ratio]:
    results = []
    threads = torch.get_num_threads()
    for label, depth, k in (("WRN-28-10", 28, 10), ("WRN-16-4", 16, 4)):
        repeats, inner = (3, 1) if quick else ((7, 1) if depth == 28 else (11, 2))
        shapes = wrn_manifold_shapes(depth, k)
        numel = sum(torch.Size(s).numel() for s in shapes)
        what = f"{label} ({len(shapes)} tensors, {numel / 1e6:.1f} M)"
        sgd = torch.optim.SGD(_params(shapes), lr=0.1, momentum=0.9, nesterov=True, foreach=True)
        adam = torch.optim.Adam(_params(shapes), lr=1e-3, foreach=True)
        sgd.step()
        adam.step()
        cases = [
            ("SGD-G", "default", SGDG(_params(shapes), lr=0.2, grad_clip=0.1, grassmann=True), sgd),
            (
                "SGD-G",
                "batched",
                SGDG(_params(shapes), lr=0.2, grad_clip=0.1, grassmann=True, foreach=True),
                sgd,
            ),
            ("Adam-G", "default", AdamG(_params(shapes), lr=0.05, grad_clip=0.1, grassmann=True), adam),
            (
                "Adam-G",
                "batched",
                AdamG(_params(shapes), lr=0.05, grad_clip=0.1, grassmann=True, foreach=True),
                adam,
            ),
        ]
        if not quick:
            opt = SGDG(_params(shapes), lr=0.2, grad_clip=0.1, omega=0.1, grassmann=True)
            cases.append(("SGD-G ω=0.1", "default", opt, sgd))
            for name, cls, lr, ref in (("SGD-G", SGDG, 0.2, sgd), ("Adam-G", AdamG, 0.05, adam)):
                opt = cls(_params(shapes), lr=lr, grad_clip=0.1, grassmann=True)
                opt.step()
                cases.append((name, "torch.compile(step)", _Compiled(opt), ref))
        cases.append(("one elementwise pass (w += 0·g)", "foreach", _OnePass(shapes), sgd))
        # Also at one thread: on a small shared machine the per-op OpenMP barriers of a many-op step (SGD-G:
        # 12 kernels per tensor vs 4 for SGD) dominate at 2 threads when other processes run.
        for n_threads in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n_threads)
            try:
                for name, path, opt, ref in cases:
                    opt.step()
                    ref_name = "SGD(momentum=0.9, nesterov, foreach)" if ref is sgd else "Adam(foreach)"
                    memory = f"state {_state_mb(opt):.0f} MiB vs {_state_mb(ref):.0f} MiB"
                    if isinstance(opt, _OnePass):
                        memory = "no state"
                    results.append(
                        measure_ratio(
                            f"{name} step, {path}, {what}, {n_threads} thread(s); {memory}",
                            opt.step,
                            ref_name,
                            ref.step,
                            repeats=repeats,
                            inner=inner,
                            warmup=1,
                            target=None if "ω" in name or "pass" in name else 1.5,
                        )
                    )
                    r = results[-1]
                    print(
                        f"{r.name}: {r.ratio:.2f}× ({r.candidate_ms:.1f} / {r.reference_ms:.1f} ms)",
                        flush=True,
                    )
            finally:
                torch.set_num_threads(threads)
    return results
