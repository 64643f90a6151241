"""SGDP and AdamP: momentum optimizers that do not shrink the effective step of scale-invariant weights.

Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR 2021
(arXiv 2006.08217). A weight ``w`` whose scale does not change the loss (it feeds a normalization layer) has
a gradient orthogonal to ``w``; momentum nevertheless carries a radial component that grows ``‖w‖`` and so
shrinks the effective step ``η/‖w‖²``. AdamP / SGDP remove the radial part of the update ``q`` of such
weights, ``q ← q − ŵ⟨ŵ, q⟩`` with ``ŵ = w/(‖w‖ + ε)``, and scale their weight decay by ``wd_ratio``.

Which weights are projected, per parameter group (``projection``):

* ``"auto"`` (default) — the paper's test, every step: with ``cos = |⟨g, w⟩| / (max(‖g‖, ε) max(‖w‖, ε))``
  per output channel (row ``w.reshape(out, -1)``), project each row when ``max cos < δ/√(row length)``;
  otherwise test the whole tensor (``cos < δ/√numel``) and project it as one vector. Tensors of one
  dimension are never projected (as in the authors' code). Unlike the authors' code the decision is taken on
  the device with ``torch.where``: no host synchronisation.
* ``"row"`` / ``"tensor"`` — weights known to be scale-invariant per output unit (they feed a per-channel
  normalization) or as a whole (they feed LayerNorm / GroupNorm without a bias): always projected, no test.
  :func:`scale_invariant_param_groups` builds these groups from :func:`normkit.graph.trace`.
* ``"none"`` — never projected: the plain Adam (decoupled weight decay) / SGD step of the authors' code.

Sharded models (FSDP2 ``fully_shard``, DTensor ``Shard(0)`` / ``Replicate()``): the step runs on the local
shards; the per-layer sums (``‖w‖²``, ``⟨w, q⟩``, ``⟨g, w⟩``, ``‖g‖²``) of the tensors of all groups take
one SUM all_reduce per step and the cosine test's per-layer ``max cos`` one MAX all_reduce (none for
``"row"`` and ``"none"`` groups; the SUM only for ``"tensor"``). The state is DTensors like the
parameters. Per-row projection or the test on a weight whose rows are split (``Shard(1)``) is refused
before anything changes.

Where we follow the authors' code (github.com/clovaai/AdamP, also shipped by timm) rather than the paper's
pseudo-code: weight decay is decoupled (``w ← w(1 − η λ r)``, ``r = wd_ratio`` on projected tensors, 1
elsewhere) and for SGDP divided by ``1 − momentum``; SGDP's momentum buffer starts at zero and, without
Nesterov, the buffer itself is projected (the step is the buffer); with Nesterov the step ``g + μ·buf`` is
projected and the buffer is not. The cosine test always uses the raw gradient ``g``.

How it runs: multi-tensor (``torch._foreach_*``) throughout. Per tensor, the graph's groups add one row norm
and one row dot product to Adam's / SGD's arithmetic (the projection is folded into the weight-decay multiply,
Adam's bias corrections into the step size); the cosine test adds one more of each. On CPU that is
1.0–1.25× AdamW / SGD with the graph's groups and 1.9–2.4× with the test (``BENCHMARKS.md``, WRN shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim import Optimizer

from normkit._dtensor import Reply, Request, check_rows_local, drive, is_dtensor, local, run
from normkit.optim._adam import adam_moments_
from normkit.optim._checks import check_betas, check_lr, check_number, missing_lr_message
from normkit.optim._wrapper import PicklableOptimizer

__all__ = ["SGDP", "AdamP", "scale_invariant_param_groups", "scale_invariant_weights"]

PROJECTIONS = ("auto", "row", "tensor", "none")


# --- functional core ----------------------------------------------------------------------------------


def _row_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def _as_rows(x: Tensor) -> Tensor:
    """A vector or scalar as one row; matrices and kernels as they are (their rows: dim 0)."""
    return x if x.dim() > 1 else x.view(1, -1)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``⟨a_r, b_r⟩`` per row, shaped to broadcast against ``a`` (works for any memory format)."""
    return torch.mul(a, b).sum(_row_dims(a), keepdim=True)


def _row_sq_norm(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a, dim=_row_dims(a), keepdim=True).square_()


def projection_coefficients(
    params: list[Tensor],
    grads: list[Tensor],
    updates: list[Tensor],
    modes: list[str],
    *,
    delta: float,
    eps: float,
    sources: list[Tensor] | None = None,
) -> tuple[list[Tensor | None], list[Tensor | bool]]:
    """For each tensor, the coefficient ``c`` (``None``: no projection) such that the projected update is
    ``q − c·w``, and whether it is projected (a bool tensor for ``"auto"``, decided on the device).

    ``"row"``: ``c_r = ⟨w_r, q_r⟩/(‖w_r‖ + ε)²``; ``"tensor"``: ``c = ⟨w, q⟩/(‖w‖ + ε)²``; ``"auto"``: the
    row coefficients if the channel test passes, else the tensor one if the layer test passes, else 0.

    ``sources``: the DTensor parameters when the lists hold their local shards (rows whole on a rank): the
    per-layer sums and the channel test's maximum are then reduced across the mesh, every tensor's in one
    SUM and (``"auto"``) one MAX all_reduce."""
    if sources is not None:
        return run(_sharded_projection_coefficients(params, grads, updates, modes, sources, delta, eps))
    coefs: list[Tensor | None] = []
    projected: list[Tensor | bool] = []
    for w, g, q, mode in zip(params, grads, updates, modes):
        if mode == "none" or (mode != "tensor" and w.dim() <= 1):
            coefs.append(None)
            projected.append(False)
            continue
        w, g, q = _as_rows(w), _as_rows(g), _as_rows(q)
        ww = _row_sq_norm(w)
        wq = _row_dot(w, q)
        if mode == "row":
            coefs.append(wq / (ww.sqrt() + eps).square_())
            projected.append(True)
            continue
        w_norm = ww.sum().sqrt()
        layer_coef = wq.sum() / (w_norm + eps).square()
        if mode == "tensor":
            coefs.append(layer_coef.expand_as(wq))
            projected.append(True)
            continue
        gw = _row_dot(g, w)
        gg = _row_sq_norm(g)
        row_len, numel = w[0].numel(), w.numel()
        cos_rows = gw.abs() / (gg.sqrt().clamp_min(eps) * ww.sqrt().clamp_min(eps))
        cos_layer = gw.sum().abs() / (gg.sum().sqrt().clamp_min(eps) * w_norm.clamp_min(eps))
        channel_ok = cos_rows.amax() < delta / math.sqrt(row_len)
        layer_ok = cos_layer < delta / math.sqrt(numel)
        row_coef = wq / (ww.sqrt() + eps).square_()
        zero = torch.zeros((), dtype=wq.dtype, device=wq.device)
        coefs.append(torch.where(channel_ok, row_coef, torch.where(layer_ok, layer_coef, zero)))
        projected.append(channel_ok | layer_ok)
    return coefs, projected


def _sharded_projection_coefficients(
    params: list[Tensor],
    grads: list[Tensor],
    updates: list[Tensor],
    modes: list[str],
    sources: list[Tensor],
    delta: float,
    eps: float,
) -> Generator[Request, Reply, tuple[list[Tensor | None], list[Tensor | bool]]]:
    """:func:`projection_coefficients` on local shards, as a task of :func:`normkit._dtensor.drive`: the row
    quantities are local; it pauses once for the layer sums (``‖w‖²``, ``⟨w, q⟩``, ``⟨g, w⟩``, ``‖g‖²``,
    SUM) and the channel test's ``max cos`` (MAX) of all its tensors, which ``drive`` reduces together
    with the other groups'."""
    rows_of: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None] = []
    sums: list[Tensor] = []
    maxima: list[Tensor] = []
    reduced: list[int] = []
    summed_sources: list[Tensor] = []
    for i, (w, g, q, mode) in enumerate(zip(params, grads, updates, modes)):
        if mode == "none" or (mode != "tensor" and w.dim() <= 1):
            rows_of.append(None)
            continue
        w, g, q = _as_rows(w), _as_rows(g), _as_rows(q)
        ww, wq = _row_sq_norm(w), _row_dot(w, q)
        gw = gg = None
        if mode == "auto":
            gw, gg = _row_dot(g, w), _row_sq_norm(g)
            cos_rows = gw.abs() / (gg.sqrt().clamp_min(eps) * ww.sqrt().clamp_min(eps))
            # cos ≥ 0: an empty shard (fewer rows than ranks) contributes 0 to the maximum
            maxima.append(cos_rows.amax() if cos_rows.numel() else ww.new_zeros(()))
        rows_of.append((ww, wq, gw, gg))
        if mode != "row":
            zero = torch.zeros((), dtype=ww.dtype, device=ww.device)
            parts = [ww.sum(), wq.sum()]
            parts += [zero, zero] if gw is None or gg is None else [gw.sum(), gg.sum()]
            sums.append(torch.stack(parts))
            reduced.append(i)
            summed_sources.append(sources[i])
    auto = [i for i, m in enumerate(modes) if rows_of[i] is not None and m == "auto"]
    request: Request = {}
    if sums:
        request["sum"] = (torch.stack(sums), summed_sources)
    if auto:
        request["max"] = (torch.stack(maxima), [sources[i] for i in auto])
    reply: Reply = (yield request) if request else {}
    layer = dict(zip(reduced, reply["sum"].unbind())) if sums else {}
    top = dict(zip(auto, reply["max"].unbind())) if auto else {}
    coefs: list[Tensor | None] = []
    projected: list[Tensor | bool] = []
    for i, mode in enumerate(modes):
        entry = rows_of[i]
        if entry is None:
            coefs.append(None)
            projected.append(False)
            continue
        ww, wq, _, _ = entry
        row_coef = wq / (ww.sqrt() + eps).square_()
        if mode == "row":
            coefs.append(row_coef)
            projected.append(True)
            continue
        s_ww, s_wq, s_gw, s_gg = layer[i].unbind()
        w_norm = s_ww.sqrt()
        layer_coef = s_wq / (w_norm + eps).square()
        if mode == "tensor":
            coefs.append(layer_coef.expand_as(wq))
            projected.append(True)
            continue
        shape = sources[i].shape
        row_len, numel = shape[1:].numel() if len(shape) > 1 else shape.numel(), shape.numel()
        cos_layer = s_gw.abs() / (s_gg.sqrt().clamp_min(eps) * w_norm.clamp_min(eps))
        channel_ok = top[i] < delta / math.sqrt(row_len)
        layer_ok = cos_layer < delta / math.sqrt(numel)
        zero = torch.zeros((), dtype=wq.dtype, device=wq.device)
        coefs.append(torch.where(channel_ok, row_coef, torch.where(layer_ok, layer_coef, zero)))
        projected.append(channel_ok | layer_ok)
    return coefs, projected


def _coefficients(
    params: list[Tensor],
    grads: list[Tensor],
    updates: list[Tensor],
    modes: list[str],
    delta: float,
    eps: float,
    sources: list[Tensor] | None,
) -> Generator[Request, Reply, tuple[list[Tensor | None], list[Tensor | bool]]]:
    if sources is not None:
        return (
            yield from _sharded_projection_coefficients(params, grads, updates, modes, sources, delta, eps)
        )
    return projection_coefficients(params, grads, updates, modes, delta=delta, eps=eps)


def _localize(
    group_params: list[Tensor], *lists: list[Any]
) -> tuple[list[Tensor] | None, tuple[list[Any], ...]]:
    """For a group holding DTensors: ``(sources, lists of local shards)``; else ``(None, lists)`` unchanged.
    Rows must be whole on a rank where a row-wise projection may be taken (checked by the caller)."""
    if not any(is_dtensor(p) for p in group_params):
        return None, lists
    return group_params, tuple([local(t) if isinstance(t, Tensor) else t for t in items] for items in lists)


def _project_(updates: list[Tensor], params: list[Tensor], coefs: list[Tensor | None]) -> None:
    """``q ← q − c·w`` in place for the tensors with a coefficient (one multi-tensor call)."""
    idx = [i for i, c in enumerate(coefs) if c is not None]
    if not idx:
        return
    views = [_as_rows(updates[i]) for i in idx]
    ws = [_as_rows(params[i]) for i in idx]
    torch._foreach_addcmul_(views, ws, [coefs[i] for i in idx], value=-1.0)  # type: ignore[misc]


def _decay_factors(
    params: list[Tensor], projected: list[Tensor | bool], lr: float, weight_decay: float, wd_ratio: float
) -> list[Tensor | float]:
    """``1 − η λ r`` per tensor, ``r = wd_ratio`` where projected."""
    on, off = 1.0 - lr * weight_decay * wd_ratio, 1.0 - lr * weight_decay
    out: list[Tensor | float] = []
    for w, p in zip(params, projected):
        if isinstance(p, Tensor):
            out.append(p.to(w.dtype).mul_(on - off).add_(off))
        else:
            out.append(on if p else off)
    return out


def _scale_(tensors: list[Tensor], factors: list[Tensor | float]) -> None:
    """``t ← f·t`` for each tensor (numbers and broadcastable tensors; factors of 1 skipped)."""
    numbers = [i for i, f in enumerate(factors) if not isinstance(f, Tensor) and f != 1.0]
    tensor_idx = [i for i, f in enumerate(factors) if isinstance(f, Tensor)]
    if numbers:
        torch._foreach_mul_([tensors[i] for i in numbers], [float(factors[i]) for i in numbers])
    if tensor_idx:
        torch._foreach_mul_(
            [_as_rows(tensors[i]) if tensors[i].dim() <= 1 else tensors[i] for i in tensor_idx],
            [factors[i] for i in tensor_idx],  # type: ignore[misc]
        )


def _step_(
    params: list[Tensor],
    updates: list[Tensor],
    coefs: list[Tensor | None],
    decays: list[Tensor | float],
    step_sizes: list[float],
) -> None:
    """``w ← w·decay − s(q − c·w) = w·(decay + s·c) − s·q``: the projection folded into the decay multiply,
    so the update ``q`` is read once more instead of being projected in place (it may be a temporary)."""
    factors: list[Tensor | float] = [
        d if c is None else c.mul(s).add_(d) for c, d, s in zip(coefs, decays, step_sizes)
    ]
    _scale_(params, factors)
    if len(set(step_sizes)) == 1:
        torch._foreach_add_(params, updates, alpha=-step_sizes[0])
    else:
        torch._foreach_mul_(updates, [-s for s in step_sizes])
        torch._foreach_add_(params, updates)


def adamp(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    modes: list[str],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    sources: list[Tensor] | None = None,
) -> None:
    """One AdamP step on lists of tensors (``steps``: the step count of each tensor after this step).
    ``sources``: the DTensor parameters when the lists hold their local shards."""
    run(_adamp_task(**locals()))


def _adamp_task(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    modes: list[str],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    sources: list[Tensor] | None = None,
) -> Generator[Request, Reply, None]:
    """:func:`adamp` as a task of :func:`normkit._dtensor.drive` (it pauses for the sharded sums)."""
    if not params:
        return
    denom, bc2_sqrt = adam_moments_(grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2, eps=eps)
    step_sizes = [lr * b / (1.0 - beta1**t) for b, t in zip(bc2_sqrt, steps)]
    if nesterov:
        updates = list(torch._foreach_mul(exp_avgs, beta1))
        torch._foreach_add_(updates, grads, alpha=1.0 - beta1)
        torch._foreach_div_(updates, denom)
    else:
        updates = list(torch._foreach_div(exp_avgs, denom))
    coefs, projected = yield from _coefficients(params, grads, updates, modes, delta, eps, sources)
    decays = _decay_factors(params, projected, lr, weight_decay, wd_ratio)
    _step_(params, updates, coefs, decays, step_sizes)


def sgdp(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    modes: list[str],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    sources: list[Tensor] | None = None,
) -> None:
    """One SGDP step on lists of tensors (the authors' code: see the module docstring). ``sources``: the
    DTensor parameters when the lists hold their local shards."""
    run(_sgdp_task(**locals()))


def _sgdp_task(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    modes: list[str],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    sources: list[Tensor] | None = None,
) -> Generator[Request, Reply, None]:
    """:func:`sgdp` as a task of :func:`normkit._dtensor.drive` (it pauses for the sharded sums)."""
    if not params:
        return
    torch._foreach_mul_(momentum_buffers, momentum)
    torch._foreach_add_(momentum_buffers, grads, alpha=1.0 - dampening)
    wd = weight_decay / (1.0 - momentum)
    if nesterov:
        updates = list(torch._foreach_mul(momentum_buffers, momentum))
        torch._foreach_add_(updates, grads)
        coefs, projected = yield from _coefficients(params, grads, updates, modes, delta, eps, sources)
        _step_(
            params, updates, coefs, _decay_factors(params, projected, lr, wd, wd_ratio), [lr] * len(params)
        )
        return
    # the authors' code projects the buffer itself (it is the step)
    coefs, projected = yield from _coefficients(params, grads, momentum_buffers, modes, delta, eps, sources)
    _project_(momentum_buffers, params, coefs)
    _scale_(params, _decay_factors(params, projected, lr, wd, wd_ratio))
    torch._foreach_add_(params, momentum_buffers, alpha=-lr)


# --- optimizers ---------------------------------------------------------------------------------------


def _check_grads(opt: Optimizer) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(opt).__name__} does not support sparse gradients (an nn.Embedding with "
                    "sparse=True?); use dense gradients"
                )


class _CheckedOptimizer(PicklableOptimizer):
    """An optimizer whose parameter groups are validated (``_check_group``, with the shared checks of
    :mod:`normkit.optim._checks`) before one is added. ``lr=None`` in the constructor means no default: then
    every group must set its own (``torch.optim``'s rule for a required argument)."""

    def _check_defaults(self, defaults: dict[str, Any]) -> None:
        """The constructor's settings, before anything is built (``lr=None``: every group sets its own)."""
        self._check_group({**defaults, "lr": 0.0} if defaults["lr"] is None else defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if merged.get("lr") is None:
            raise ValueError(missing_lr_message(type(self).__name__))
        self._check_group(merged)
        super().add_param_group(param_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError


class _ProjectedBase(_CheckedOptimizer):
    def _check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_lr(name, group["lr"])
        check_number(
            name,
            "eps",
            group["eps"],
            low_open=True,
            why="it keeps a denominator away from zero: with eps = 0 a gradient entry or weight row of "
            "zeros gives 0/0 = NaN",
        )
        check_number(name, "weight_decay", group["weight_decay"])
        check_number(name, "delta", group["delta"])
        check_number(name, "wd_ratio", group["wd_ratio"], 0.0, 1.0)
        if group.get("projection", "auto") not in PROJECTIONS:
            raise ValueError(
                f"projection must be one of {PROJECTIONS}, got {group.get('projection')!r} "
                "(use scale_invariant_param_groups(model) for the graph-known groups)"
            )

    def _check_placements(self) -> None:
        """Before anything changes: DTensor weights projected per row must have their rows on one rank."""
        for group in self.param_groups:
            if group.get("projection", "auto") in ("row", "auto"):
                check_rows_local(
                    type(self).__name__,
                    [p for p in group["params"] if p.dim() > 1],
                    "the per-output-channel projection and cosine test (projection='row' / 'auto'; "
                    "projection='tensor' or 'none' work on any placement)",
                )

    def _collect(self, group: dict[str, Any], keys: Iterable[str]) -> tuple[list[Tensor], ...]:
        params, grads, modes = [], [], []
        extra: dict[str, list[Tensor]] = {k: [] for k in keys}
        steps: list[int] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            params.append(p)
            grads.append(p.grad)
            modes.append(group.get("projection", "auto"))
            for k in extra:
                extra[k].append(state[k])
            if "step" in state:
                state["step"] += 1
                steps.append(int(state["step"]))
        return (params, grads, modes, steps, *extra.values())  # type: ignore[return-value]

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError


class AdamP(_ProjectedBase):
    """Adam with the radial part of the update removed on scale-invariant weights (Heo et al., ICLR 2021).

    Args:
        params: parameters or groups; a group may set ``projection`` to ``"auto"`` (the paper's cosine test,
            default), ``"row"``, ``"tensor"`` (known scale-invariant: no test) or ``"none"``.
        lr, betas, eps: as in ``torch.optim.Adam`` (``lr`` a number or a one-element tensor; ``eps`` also
            guards the norms of the projection).
        weight_decay: decoupled weight decay ``λ`` (``w ← w(1 − η λ r)``), ``r = wd_ratio`` on projected
            tensors.
        delta: the threshold ``δ`` of the cosine test, ``cos < δ/√(dim)``.
        wd_ratio: the weight-decay multiplier of projected tensors.
        nesterov: use ``β1 m + (1 − β1) g`` in place of ``m`` in the update (the authors' option).

    See the module docstring for the test and where we follow the authors' code.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            projection="auto",
        )
        self._check_defaults(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_betas(type(self).__name__, group["betas"])

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _check_grads(self)
        self._check_placements()
        tasks = []  # sharded groups: run together, their sums reduced in one all_reduce (per op) for all
        for group in self.param_groups:
            params, grads, modes, steps, exp_avgs, exp_avg_sqs = self._collect(
                group, ("exp_avg", "exp_avg_sq")
            )
            sources, (params, grads, exp_avgs, exp_avg_sqs) = _localize(
                params, params, grads, exp_avgs, exp_avg_sqs
            )
            beta1, beta2 = group["betas"]
            task = _adamp_task(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,  # type: ignore[arg-type]
                modes,  # type: ignore[arg-type]
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                delta=group["delta"],
                wd_ratio=group["wd_ratio"],
                nesterov=group["nesterov"],
                sources=sources,
            )
            if sources is None:
                run(task)
            else:
                tasks.append(task)
        drive(tasks)
        return loss


class SGDP(_ProjectedBase):
    """SGD with momentum with the radial part of the step removed on scale-invariant weights (Heo et al.).

    Follows the authors' code (see the module docstring): the buffer starts at zero and accumulates
    ``(1 − dampening) g``; without Nesterov the buffer itself is projected; weight decay is decoupled and
    divided by ``1 − momentum`` (``wd_ratio`` on projected tensors). ``projection`` per group as in
    :class:`AdamP`. ``lr`` may be a one-element tensor (as in ``torch.optim``); without a default
    (``lr=None``) every parameter group must set its own.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor | None = None,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
            projection="auto",
        )
        self._check_defaults(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_number("SGDP", "momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_number("SGDP", "dampening", group["dampening"], 0.0, 1.0)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _check_grads(self)
        self._check_placements()
        tasks = []  # sharded groups: run together, their sums reduced in one all_reduce (per op) for all
        for group in self.param_groups:
            params, grads, modes, _, buffers = self._collect(group, ("momentum_buffer",))
            sources, (params, grads, buffers) = _localize(params, params, grads, buffers)
            task = _sgdp_task(
                params,
                grads,
                buffers,
                modes,  # type: ignore[arg-type]
                lr=group["lr"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                eps=group["eps"],
                delta=group["delta"],
                wd_ratio=group["wd_ratio"],
                sources=sources,
            )
            if sources is None:
                run(task)
            else:
                tasks.append(task)
        drive(tasks)
        return loss


# --- parameter groups from the graph ------------------------------------------------------------------


def scale_invariant_weights(
    model: nn.Module, example_input: Any = None
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The conv/linear weights of ``model`` whose scale does not change its function, found by
    :func:`normkit.graph.trace`: ``(per_row, per_tensor)``.

    * per row: every output path of the layer goes into a per-channel normalization (BatchNorm,
      BatchRenorm, InstanceNorm) directly, or through ReLU / pooling when the layer has no bias — then each
      output unit's weight row may be rescaled on its own;
    * per tensor: every output path goes into any normalization (LayerNorm, GroupNorm, RMSNorm ...), the
      layer has no bias — then only a common rescaling of the whole weight is invisible.

    Transposed convolutions (their output units are columns) are left out; a weight shared by several layers
    (or read directly by the forward) is kept only if it is invariant at every use.
    """
    from normkit import graph as G

    model = G.unwrap_model(model)
    g = G.trace(model, example_input)
    commuting = (G.OpKind.IDENTITY, G.OpKind.SCALE_COMMUTING)
    rows: list[nn.Parameter] = []
    tensors: list[nn.Parameter] = []

    def invariance(name: str | None) -> str | None:
        """ "row", "tensor" or None: how the weight of layer ``name`` may be rescaled unseen."""
        if name is None or g[name].kind not in (G.LayerKind.LINEAR, G.LayerKind.CONV):
            return None
        bias_free = getattr(g[name].module, "bias", None) is None
        through = commuting if bias_free and g.traced else (G.OpKind.IDENTITY,)
        if g.feeds_normalization(name, per_channel=True, through=through):
            return "row"
        if bias_free and g.feeds_normalization(name, through=through):
            return "tensor"
        return None

    for node in g.execution_order((G.LayerKind.LINEAR, G.LayerKind.CONV)):
        w = getattr(node.module, "weight", None)
        if not isinstance(w, nn.Parameter) or not w.requires_grad:
            continue
        # a shared weight is invariant only as far as it is at every use (rows only if rows everywhere)
        kinds = {invariance(h) for h in G.weight_holders(g, w)}
        if None in kinds:
            continue
        target = rows if kinds == {"row"} else tensors
        if all(w is not x for x in rows + tensors):
            target.append(w)
    return rows, tensors


def scale_invariant_param_groups(
    model: nn.Module,
    weight_decay: float | None = None,
    *,
    test_others: bool = False,
    example_input: Any = None,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`AdamP` / :class:`SGDP` with the scale-invariant weights known from the
    graph (:func:`scale_invariant_weights`): they are projected without the cosine test (no host
    synchronisation, multi-tensor).

    Groups (empty ones left out): the per-row weights (``projection="row"``), the per-tensor weights
    (``"tensor"``), the other weights with two or more dimensions (``"auto"`` with ``test_others``, else
    ``"none"``), and the 1-D parameters and normalization parameters (``"none"``, no weight decay).
    ``weight_decay``: set on the weight groups (default: the optimizer's).
    """
    from normkit import graph as G

    rows, tensors = scale_invariant_weights(model, example_input)
    known = {id(p) for p in rows + tensors}
    norm_params = {
        id(p) for m in G.unwrap_model(model).modules() if G.is_normalization(m) for p in m.parameters()
    }
    others: list[Tensor] = []
    no_decay: list[Tensor] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in known or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.dim() <= 1 or id(p) in norm_params else others).append(p)
    wd = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups: list[dict[str, Any]] = [
        {"params": rows, "projection": "row", **wd},
        {"params": tensors, "projection": "tensor", **wd},
        {"params": others, "projection": "auto" if test_others else "none", **wd},
        {"params": no_decay, "projection": "none", "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
