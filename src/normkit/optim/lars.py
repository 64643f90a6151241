"""Layer-wise trust ratios for large batches: LARS (You et al. 2017, arXiv 1708.03888, with LARC's clipping
mode) and LAMB (You et al., ICLR 2020, arXiv 1904.00962).

* LARS (paper Algorithm 1, torch's learning-rate convention): per tensor ``λ = η‖w‖/(‖g‖ + β‖w‖ + ε)``
  (``η`` = ``trust_coefficient``, ``β`` = ``weight_decay``), ``d = λ(g + βw)``, ``v ← m v + d`` (``v = d``
  at the first step, as ``torch.optim.SGD``), ``w ← w − γ v`` (Nesterov: ``w ← w − γ(d + m v)``).
  ``trust_clip=True`` is LARC's clipping mode: ``λ ← min(λ/γ, 1)``, so the effective rate ``γλ`` never
  exceeds ``γ``.
* LAMB (paper Algorithm 2, φ the identity): Adam's ``r = m̂/(√v̂ + ε)``, ``u = r + βw``,
  ``w ← w − γ (‖w‖/‖u‖) u``.

Sharded models (FSDP2 ``fully_shard``, DTensor parameters of any placement): the step runs on the local
shards; the squared norms of the adapted tensors (``‖w‖`` and ``‖g‖`` for LARS, ``‖w‖`` and ``‖u‖`` for
LAMB) of all groups go through one all_reduce per step. Momentum buffers are DTensors placed like the
parameters.

The ratio is 1 when ``‖w‖ = 0`` or the denominator is 0 (chosen on the device with ``torch.where``: no
host synchronisation). Tensors with one dimension (biases, normalization weights) are excluded from
adaptation and weight decay by default (``exclude_1d``): they take the plain SGD-with-momentum / Adam step.
A group may set ``adapt=False`` to exclude its tensors too (:func:`trust_ratio_param_groups` does this for
every parameter of a normalization layer, found by module type). All arithmetic is multi-tensor: the norms
of all tensors come from one ``_foreach_norm`` each, LARS folds the ratio into the momentum update and LAMB
leaves Adam's bias corrections out of the ratio step (it does not depend on them). On CPU LARS costs
1.2–1.35× SGD and LAMB 1.25–1.5× AdamW (``BENCHMARKS.md``, WRN shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from normkit._dtensor import Reply, Request, drive, is_dtensor, local, run
from normkit.optim._adam import adam_moments_
from normkit.optim._checks import check_betas, check_lr, check_number
from normkit.optim.adamp import _check_grads, _CheckedOptimizer

__all__ = ["LAMB", "LARS", "trust_ratio_param_groups"]


def _norms(tensors: list[Tensor]) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors)) if tensors else torch.zeros(0)


def _norm_pair(
    a: list[Tensor], b: list[Tensor], sources: list[Tensor] | None
) -> Generator[Request, Reply, tuple[Tensor, Tensor]]:
    """``‖a_i‖`` and ``‖b_i‖`` per tensor (a task of :func:`normkit._dtensor.drive`). ``sources``: the
    DTensors whose local shards ``a`` and ``b`` are (``b_i`` placed like ``a_i``): it pauses once for the
    sum of the squared local norms of both lists across the mesh."""
    if sources is None:
        na = _norms(a)
        return na, _norms(b).to(na.device)
    sq = torch.stack(torch._foreach_norm(a + b)).square_()
    reply = yield {"sum": (sq, sources + sources)}
    na, nb = reply["sum"].sqrt().split(len(a))
    return na, nb


def lars_trust_ratios(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    lr: float,
    trust_coefficient: float,
    weight_decay: float,
    eps: float,
    trust_clip: bool,
    sources: list[Tensor] | None = None,
) -> list[Tensor]:
    """``η‖w‖/(‖g‖ + β‖w‖ + ε)`` per tensor (1 where ``‖w‖`` or ``‖g‖`` is 0); LARC: ``min(λ/γ, 1)``.
    ``sources``: the DTensor parameters when ``params`` / ``grads`` are their local shards (one
    all_reduce)."""
    return run(_trust_ratios_task(**locals()))


def _trust_ratios_task(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    lr: float,
    trust_coefficient: float,
    weight_decay: float,
    eps: float,
    trust_clip: bool,
    sources: list[Tensor] | None = None,
) -> Generator[Request, Reply, list[Tensor]]:
    w, g = yield from _norm_pair(params, grads, sources)
    ratio = trust_coefficient * w / (g + weight_decay * w + eps)
    ratio = torch.where((w > 0) & (g > 0), ratio, torch.ones_like(ratio))
    if trust_clip:
        ratio = (ratio / lr).clamp_(max=1.0) if lr > 0 else torch.ones_like(ratio)
    return [r if r.dtype == p.dtype else r.to(p.dtype) for r, p in zip(ratio.unbind(), params)]


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    adapt: list[bool],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
    sources: list[Tensor] | None = None,
) -> list[Tensor]:
    """One LARS step on lists of tensors; returns the momentum buffers (new ones where ``None`` was given).
    ``sources``: the DTensor parameters when the lists hold their local shards (the buffers must then all
    be given)."""
    return run(_lars_task(**locals()))


def _lars_task(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    adapt: list[bool],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
    sources: list[Tensor] | None = None,
) -> Generator[Request, Reply, list[Tensor]]:
    """:func:`lars` as a task of :func:`normkit._dtensor.drive` (it pauses for the sharded norms)."""
    if not params:
        return []
    ia = [i for i, a in enumerate(adapt) if a]
    raw: list[Tensor] = []  # g + βw of the adapted tensors, before the ratio
    ratios: list[Tensor] = []
    if ia:
        pa, ga = [params[i] for i in ia], [grads[i] for i in ia]
        ratios = yield from _trust_ratios_task(
            pa,
            ga,
            lr=lr,
            trust_coefficient=trust_coefficient,
            weight_decay=weight_decay,
            eps=eps,
            trust_clip=trust_clip,
            sources=None if sources is None else [sources[i] for i in ia],
        )
        raw = list(torch._foreach_add(ga, pa, alpha=weight_decay)) if weight_decay else ga
    plain = [i for i, a in enumerate(adapt) if not a]
    if momentum and not nesterov and all(b is not None for b in momentum_buffers):
        # the usual step: v ← m v + λ(g + βw) with the ratio folded into one multiply-add
        bufs: list[Tensor] = list(momentum_buffers)  # type: ignore[arg-type]
        torch._foreach_mul_(bufs, momentum)
        if ia:
            torch._foreach_addcmul_([bufs[i] for i in ia], raw, ratios)
        if plain:
            torch._foreach_add_([bufs[i] for i in plain], [grads[i] for i in plain])
        torch._foreach_add_(params, bufs, alpha=-lr)
        return bufs
    directions = list(grads)
    if ia:
        for i, d in zip(ia, torch._foreach_mul(raw, ratios)):
            directions[i] = d
    if momentum:
        out: list[Tensor] = [
            torch.clone(d).detach() if b is None else b for d, b in zip(directions, momentum_buffers)
        ]
        old = [k for k, b in enumerate(momentum_buffers) if b is not None]
        if old:
            torch._foreach_mul_([out[k] for k in old], momentum)
            torch._foreach_add_([out[k] for k in old], [directions[k] for k in old])
        steps = list(torch._foreach_add(directions, out, alpha=momentum)) if nesterov else out
        torch._foreach_add_(params, steps, alpha=-lr)
        return out
    torch._foreach_add_(params, directions, alpha=-lr)
    return [b for b in momentum_buffers]  # type: ignore[misc]


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    adapt: list[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    sources: list[Tensor] | None = None,
) -> None:
    """One LAMB step on lists of tensors (``steps``: each tensor's step count after this step).
    ``sources``: the DTensor parameters when the lists hold their local shards (one all_reduce)."""
    run(_lamb_task(**locals()))


def _lamb_task(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    adapt: list[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    sources: list[Tensor] | None = None,
) -> Generator[Request, Reply, None]:
    """:func:`lamb` as a task of :func:`normkit._dtensor.drive` (it pauses for the sharded norms)."""
    if not params:
        return
    # r = m̂/(√v̂ + ε) = c·r' with r' = m/(√v + ε√(1 − β2ᵗ)), c = √(1 − β2ᵗ)/(1 − β1ᵗ); u = c·u' with
    # u' = r' + (β/c)·w. The trust-ratio step γ(‖w‖/‖u‖)u = γ(‖w‖/‖u'‖)u' does not depend on c, so c only
    # enters where the ratio is 1 and in the plain Adam step of excluded tensors.
    denom, bc2_sqrt = adam_moments_(grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2, eps=eps)
    c = [b / (1.0 - beta1**t) for b, t in zip(bc2_sqrt, steps)]
    updates = list(torch._foreach_div(exp_avgs, denom))
    del denom
    ia = [i for i, a in enumerate(adapt) if a]
    plain = [i for i, a in enumerate(adapt) if not a]
    if plain:
        p_plain, u_plain = [params[i] for i in plain], [updates[i] for i in plain]
        if len({c[i] for i in plain}) == 1:
            torch._foreach_add_(p_plain, u_plain, alpha=-lr * c[plain[0]])
        else:
            torch._foreach_add_(p_plain, torch._foreach_mul(u_plain, [-lr * c[i] for i in plain]))
    if ia:
        pa, ua = [params[i] for i in ia], [updates[i] for i in ia]
        if weight_decay:
            if len({c[i] for i in ia}) == 1:
                torch._foreach_add_(ua, pa, alpha=weight_decay / c[ia[0]])
            else:
                torch._foreach_add_(ua, torch._foreach_mul(pa, [weight_decay / c[i] for i in ia]))
        w, u = yield from _norm_pair(pa, ua, None if sources is None else [sources[i] for i in ia])
        fallback = torch.tensor([c[i] for i in ia], dtype=w.dtype, device=w.device)
        ratio = torch.where((w > 0) & (u > 0), w / u.clamp_min(torch.finfo(u.dtype).tiny), fallback)
        scales = [r if r.dtype == p.dtype else r.to(p.dtype) for r, p in zip(ratio.mul_(-lr).unbind(), pa)]
        torch._foreach_addcmul_(pa, ua, scales)  # type: ignore[arg-type]


class _TrustBase(_CheckedOptimizer):
    @staticmethod
    def _adapt(group: dict[str, Any], p: Tensor) -> bool:
        if group.get("adapt") is not None:
            return bool(group["adapt"])
        return not (group["exclude_1d"] and p.dim() <= 1)


class LARS(_TrustBase):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017); ``trust_clip=True`` is LARC.

    Args:
        params: parameters or groups (a group may set ``adapt=False``: no trust ratio, no weight decay).
        lr: the global rate ``γ``: a number or a one-element tensor (as ``torch.optim``); ``None``: no
            default, every group sets its own.
        momentum, nesterov: as in ``torch.optim.SGD``.
        weight_decay: ``β``, added to the gradient of adapted tensors and to the ratio's denominator.
        trust_coefficient: ``η`` (0.001 in the paper).
        eps: added to the ratio's denominator.
        trust_clip: LARC's clipping mode, ``λ ← min(λ/γ, 1)``.
        exclude_1d: 1-D tensors take the plain momentum step (no ratio, no decay).
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
        trust_clip: bool = False,
        exclude_1d: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            trust_clip=trust_clip,
            exclude_1d=exclude_1d,
            adapt=None,
        )
        self._check_defaults(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr("LARS", group["lr"])
        check_number("LARS", "momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_number("LARS", "weight_decay", group["weight_decay"])
        check_number(
            "LARS",
            "trust_coefficient",
            group["trust_coefficient"],
            low_open=True,
            why="the trust ratio is proportional to it: with 0 the adapted weights would never move",
        )
        check_number("LARS", "eps", group["eps"])
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("nesterov=True needs momentum > 0")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _check_grads(self)
        tasks = []  # sharded groups: run together, all their norms reduced in one all_reduce
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
            bufs_in = [self.state[p].get("momentum_buffer") for p in params]
            sources = None
            dt = any(is_dtensor(p) for p in params)
            if dt:
                # local shards; buffers created up front as DTensors placed like the parameters (the first
                # step v = 0·m + d equals torch's v = d bit for bit)
                if group["momentum"]:
                    for p, b in zip(params, bufs_in):
                        if b is None:
                            self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    bufs_in = [self.state[p]["momentum_buffer"] for p in params]
                sources = params
                bufs_in = [None if b is None else local(b) for b in bufs_in]
            task = _lars_task(
                [local(p) for p in params] if dt else params,
                [local(g) for g in grads] if dt else grads,
                bufs_in,
                [self._adapt(group, p) for p in params],
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                trust_coefficient=group["trust_coefficient"],
                eps=group["eps"],
                nesterov=group["nesterov"],
                trust_clip=group["trust_clip"],
                sources=sources,
            )
            if dt:  # the buffers exist (updated in place)
                tasks.append(task)
                continue
            bufs = run(task)
            if group["momentum"]:
                for p, b in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = b
        drive(tasks)
        return loss


class LAMB(_TrustBase):
    """Adam with a layer-wise trust ratio ``‖w‖/‖u‖`` (You et al., ICLR 2020, Algorithm 2, φ = identity).

    Args:
        params: parameters or groups (a group may set ``adapt=False``: the plain Adam step, no decay).
        lr, betas, eps: as in ``torch.optim.Adam`` (bias-corrected moments, as in the paper).
        weight_decay: ``β`` in ``u = r + βw`` (decoupled from the moments).
        exclude_1d: 1-D tensors take the plain Adam step (no ratio, no decay).
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        exclude_1d: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, exclude_1d=exclude_1d, adapt=None
        )
        self._check_defaults(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr("LAMB", group["lr"])
        check_number(
            "LAMB",
            "eps",
            group["eps"],
            low_open=True,
            why="it keeps a denominator away from zero: with eps = 0 a gradient entry or weight row of "
            "zeros gives 0/0 = NaN",
        )
        check_number("LAMB", "weight_decay", group["weight_decay"])
        check_betas("LAMB", group["betas"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _check_grads(self)
        tasks = []  # sharded groups: run together, all their norms reduced in one all_reduce
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(int(state["step"]))
            beta1, beta2 = group["betas"]
            adapt = [self._adapt(group, p) for p in params]
            sources = None
            if any(is_dtensor(p) for p in params):  # local shards
                sources = params
                params, grads, exp_avgs, exp_avg_sqs = (
                    [local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)
                )
            task = _lamb_task(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                adapt,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                sources=sources,
            )
            if sources is None:
                run(task)
            else:
                tasks.append(task)
        drive(tasks)
        return loss


def trust_ratio_param_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Groups for :class:`LARS` / :class:`LAMB`: the parameters of normalization layers (found by module
    type, :func:`normkit.graph.is_normalization`) and all 1-D parameters get ``adapt=False`` and no weight
    decay; the others are adapted (with ``weight_decay`` when given)."""
    from normkit import graph as G

    norm_params = {
        id(p) for m in G.unwrap_model(model).modules() if G.is_normalization(m) for p in m.parameters()
    }
    adapted: list[Tensor] = []
    excluded: list[Tensor] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (excluded if p.dim() <= 1 or id(p) in norm_params else adapted).append(p)
    wd = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups = [
        {"params": adapted, "adapt": True, **wd},
        {"params": excluded, "adapt": False, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
