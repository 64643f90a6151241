"""AdamP / SGDP, sphere projection, LARS / LAMB: step cost against the torch optimizer each builds on
(target ≤ 1.3×), and AdamP against the plain per-parameter AdamP of the authors' algorithm
(target ≥ 3× faster, i.e. ratio ≤ 0.33).

Models: the parameter tensors of WRN-16-4 (2.7 M parameters) and WRN-28-10 (36.5 M) from the harness, with
random gradients; the gradients of the weights the graph finds scale-invariant per row are made orthogonal
to their rows, as in real training (so the cosine test passes there, as it would). All steps on one thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import Ratio, measure_ratio
from normkit.optim import (
    LAMB,
    LARS,
    SGDP,
    AdamP,
    SphereProjection,
    scale_invariant_param_groups,
    scale_invariant_weights,
)
from normkit.train.runner.models import wrn

TITLE = "AdamP / SGDP, sphere projection, LARS / LAMB: step vs the torch optimizer they build on"


class PlainAdamP(torch.optim.Optimizer):
    """AdamP as the paper's algorithm reads, one parameter at a time: the channel-view cosine test, then the
    layer view, each decided in Python (a host synchronisation per test on an accelerator)."""

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(group["eps"])
                update = m / denom
                ratio = 1.0
                if p.dim() > 1:
                    for view in (p.reshape(p.shape[0], -1), p.reshape(1, -1)):
                        g_view = grad.reshape(view.shape)
                        cos = F.cosine_similarity(g_view, view, dim=1, eps=group["eps"]).abs_()
                        if cos.max() < 0.1 / math.sqrt(view.shape[1]):
                            unit = view / view.norm(dim=1, keepdim=True).add_(group["eps"])
                            u_view = update.view(view.shape)
                            u_view -= unit * (unit * u_view).sum(1, keepdim=True)
                            ratio = 0.1
                            break
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"] * ratio)
                p.add_(update, alpha=-group["lr"] / (1 - beta1 ** state["step"]))


def _model(depth: int, width: int) -> nn.Module:
    return wrn((3, 32, 32), 10, depth=depth, widen_factor=width)


def _with_grads(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    rows, _ = scale_invariant_weights(model)
    row_ids = {id(w) for w in rows}
    for p in model.parameters():
        g = torch.randn_like(p)
        if id(p) in row_ids:
            r, w = g.view(p.shape[0], -1), p.detach().view(p.shape[0], -1)
            r -= w * ((r * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True))
        p.grad = g
    return model


Make = Callable[[nn.Module], torch.optim.Optimizer]


def _pair(base: nn.Module, cand: Make, ref: Make) -> tuple[Callable[[], object], Callable[[], object]]:
    import copy

    a, b = copy.deepcopy(base), copy.deepcopy(base)
    for pa, pb, p in zip(a.parameters(), b.parameters(), base.parameters()):
        pa.grad, pb.grad = p.grad.clone(), p.grad.clone()  # type: ignore[union-attr]
    oa, ob = cand(a), ref(b)
    return oa.step, ob.step


def run(quick: bool) -> list[Ratio]:
    wd = 5e-4
    sgd: Make = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=wd, foreach=True)
    adamw: Make = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=wd, foreach=True)
    cases: list[tuple[str, Make, str, Make, float | None]] = [
        ("AdamP (cosine test)", lambda m: AdamP(m.parameters(), weight_decay=wd), "AdamW", adamw, 1.3),
        (
            "AdamP (graph groups)",
            lambda m: AdamP(scale_invariant_param_groups(m), weight_decay=wd),
            "AdamW",
            adamw,
            1.3,
        ),
        (
            "SGDP (cosine test)",
            lambda m: SGDP(m.parameters(), lr=0.1, momentum=0.9, weight_decay=wd),
            "SGD",
            sgd,
            1.3,
        ),
        (
            "SGDP (graph groups)",
            lambda m: SGDP(scale_invariant_param_groups(m), lr=0.1, momentum=0.9, weight_decay=wd),
            "SGD",
            sgd,
            1.3,
        ),
        ("LARS", lambda m: LARS(m.parameters(), lr=0.1, weight_decay=wd), "SGD", sgd, 1.3),
        (
            "LARS (LARC clip)",
            lambda m: LARS(m.parameters(), lr=0.1, weight_decay=wd, trust_clip=True),
            "SGD",
            sgd,
            1.3,
        ),
        ("LAMB", lambda m: LAMB(m.parameters(), weight_decay=wd), "AdamW", adamw, 1.3),
        ("SphereProjection(SGD), graph units", lambda m: SphereProjection(sgd(m), model=m), "SGD", sgd, 1.3),
        (
            "AdamP (cosine test)",
            lambda m: AdamP(m.parameters(), weight_decay=wd),
            "plain per-parameter AdamP",
            lambda m: PlainAdamP(m.parameters(), weight_decay=wd),
            0.33,
        ),
        (
            "AdamP (graph groups)",
            lambda m: AdamP(scale_invariant_param_groups(m), weight_decay=wd),
            "plain per-parameter AdamP",
            lambda m: PlainAdamP(m.parameters(), weight_decay=wd),
            0.33,
        ),
    ]
    models = {"WRN-16-4": (16, 4), "WRN-28-10": (28, 10)}
    out: list[Ratio] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 OpenMP threads measure contention
    try:
        for model_name, (depth, width) in models.items():
            base = _with_grads(_model(depth, width))
            n = sum(p.numel() for p in base.parameters())
            k = len(list(base.parameters()))
            big = n > 10_000_000
            if quick:
                reps = dict(repeats=3, inner=1, warmup=1)
            else:
                reps = dict(repeats=11, inner=1, warmup=2) if big else dict(repeats=21, inner=3, warmup=3)
            for name, cand, ref_name, ref, target in cases:
                c, r = _pair(base, cand, ref)
                out.append(
                    measure_ratio(
                        f"{name}.step, {model_name} ({n / 1e6:.1f} M params, {k} tensors), 1 thread",
                        c,
                        f"{ref_name}.step" + (" (foreach)" if ref_name in ("SGD", "AdamW") else ""),
                        r,
                        target=target,
                        **reps,  # type: ignore[arg-type]
                    )
                )
                print(f"  {out[-1].name} vs {out[-1].reference}: {out[-1].ratio:.2f}×", flush=True)
    finally:
        torch.set_num_threads(threads)
    return out
