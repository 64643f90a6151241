"""Batch Renormalization as pure tensor functions (Ioffe 2017, Algorithm 1).

Training forward, per channel:  μ_B, σ_B = √(biased var_B + ε);  r = clip(σ_B/σ, 1/r_max, r_max),
d = clip((μ_B − μ)/σ, −d_max, d_max), both from the running statistics *before* this step's update and with no
gradient;  y = γ(x̂·r + d) + β;  then μ += α(μ_B − μ), σ += α(σ_B − σ).  Inference:  y = γ(x − μ)/σ + β.

Because r and d carry no gradient, y is exactly batch norm with weight γr and bias γd + β. The fast path
computes the statistics once, normalizes with PyTorch's fused kernel and back-propagates through
``native_batch_norm_backward`` — the same kernels as ``nn.BatchNorm``, no per-element eager arithmetic.
Under ``torch.func`` transforms (``vmap``, ``grad``) and for ghost batches a plain-tensor path with the same
math runs instead.

Masks: ``mask`` (N, *spatial), True at valid positions, restricts μ_B, σ_B (hence r, d and the running
statistics) to the valid positions; every position, padded ones included, is then normalized with them, so
padded outputs are finite and well defined. Padded positions holding inf or NaN are read as 0: they reach
neither the statistics nor (through 0·inf = NaN) any gradient. A batch without any valid position leaves the
running statistics unchanged (the step counter still advances: it counts training calls, and reading the
number of valid positions would cost a host synchronisation). One valid position gives variance 0, σ_B = √ε —
where an unmasked input with one value per channel is refused (as ``nn.BatchNorm`` does), a mask cannot be
counted without a host synchronisation, so the masked layers compute instead of raising.

DTensor parameters (``torch.distributed.tensor``): under FSDP2's ``fully_shard`` the layers see ordinary
tensors (FSDP gathers γ, β before the forward). A γ or β that is itself a DTensor with ``Replicate()`` or
``Shard(0)`` placements (tensor parallelism: every rank holds the same input) is used whole — a ``Shard(0)``
one is gathered once per call, and its gradient goes back sharded. ``Partial()`` placements, DTensor inputs,
masks and running statistics are refused with a message.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from normkit._dtensor import is_dtensor
from normkit._moments import merge_moments

__all__ = [
    "BRNSchedule",
    "BatchRenormState",
    "batch_renorm",
    "functional_batch_renorm",
    "renorm_correction",
    "renorm_limits",
    "schedule_limits",
]

Number = float | Tensor
Schedule = Callable[[Tensor], tuple[Any, Any]]


@dataclass(frozen=True)
class BRNSchedule:
    """When r_max and d_max open up: 1 and 0 for the first ``warmup_steps`` steps (plain batch norm), then
    linearly to ``r_max`` at step ``r_max_steps`` and to ``d_max`` at step ``d_max_steps``.

    A ramp that ends at or before ``warmup_steps`` (``None``: the default) is a hard switch: steps
    0 … warmup_steps − 1 are batch norm, from step ``warmup_steps`` on the limits are ``r_max`` and ``d_max``.
    The step is the layer's ``num_batches_tracked`` before the call, so the limits are computed on its device
    from integers — exact, and without a host synchronisation.

    Presets (``BRNSchedule.preset(name)``, or ``schedule=name`` on the layers):

    - ``"paper"``: Ioffe (2017) — 5 000 warm-up steps, r_max → 3 at 40 000, d_max → 5 at 25 000 (the default);
    - ``"crossq"``: CrossQ (Bhatt et al., 2024) and its ports — batch norm for 100 000 steps, then r_max 3 and
      d_max 5 at once.

    Step counts are absolute. To fit a preset to a run of a different length, scale every step count:
    ``BRNSchedule.preset("paper").scaled(my_steps / their_steps)`` (e.g. ``scaled(0.1)`` warms up for 500
    steps and reaches r_max 3 at 4 000), or replace fields with ``dataclasses.replace``.
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 0
    r_max_steps: int | None = None
    d_max_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("r_max", "d_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {value!r}")
            object.__setattr__(self, name, float(value))  # numpy / torch scalars become plain floats
        if not (self.r_max >= 1.0 and self.d_max >= 0.0) or math.isinf(self.r_max) or math.isinf(self.d_max):
            raise ValueError(
                f"need finite r_max >= 1 and d_max >= 0, got r_max={self.r_max}, d_max={self.d_max}"
            )
        for name in ("warmup_steps", "r_max_steps", "d_max_steps"):
            value = getattr(self, name)
            if value is None and name != "warmup_steps":
                continue
            # numbers.Integral: int, numpy.int64 and friends (step counts read from arrays or configs).
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer step count, got {value!r}")
            object.__setattr__(self, name, int(value))

    @staticmethod
    def preset(name: str) -> BRNSchedule:
        """The named schedule: ``"paper"`` or ``"crossq"``."""
        if name not in PRESETS:
            raise ValueError(f"unknown schedule preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name]

    def scaled(self, factor: float) -> BRNSchedule:
        """The same schedule with every step count multiplied by ``factor`` (rounded to whole steps)."""
        if not factor > 0 or math.isinf(factor):
            raise ValueError(f"factor must be a positive finite number, got {factor}")

        def scale(steps: int | None) -> int | None:
            return None if steps is None else round(steps * factor)

        return dataclasses.replace(
            self,
            warmup_steps=round(self.warmup_steps * factor),
            r_max_steps=scale(self.r_max_steps),
            d_max_steps=scale(self.d_max_steps),
        )

    def limits(self, step: Tensor, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) at ``step`` (an integer tensor; any shape, e.g. one step per ensemble member)."""
        # Method calls rather than operators with a Python number on the left, and a hard switch compares the
        # integer step directly: this runs every training step, where per-op overhead is most of the cost on
        # small (RL-sized) batches.
        hard = self._is_hard(self.r_max_steps) and self._is_hard(self.d_max_steps)
        t = step if hard else step.to(dtype)
        ramp_r = self._ramp(t, self.r_max_steps, dtype)
        ramp_d = ramp_r if self.d_max_steps == self.r_max_steps else self._ramp(t, self.d_max_steps, dtype)
        return ramp_r.mul(self.r_max - 1.0).add(1.0), ramp_d.mul(self.d_max)

    def _is_hard(self, end: int | None) -> bool:
        return end is None or end <= self.warmup_steps

    def _ramp(self, t: Tensor, end: int | None, dtype: torch.dtype) -> Tensor:
        start = self.warmup_steps
        if end is None or end <= start:
            return torch.ge(t, start).to(dtype)
        return t.sub(start).div(end - start).clamp(0.0, 1.0)


PRESETS: dict[str, BRNSchedule] = {
    "paper": BRNSchedule(r_max=3.0, d_max=5.0, warmup_steps=5000, r_max_steps=40000, d_max_steps=25000),
    "crossq": BRNSchedule(r_max=3.0, d_max=5.0, warmup_steps=100_000),
}


def renorm_limits(
    step: Tensor,
    r_max: float,
    d_max: float,
    warmup_steps: int,
    r_max_steps: int,
    d_max_steps: int,
) -> tuple[Tensor, Tensor]:
    """The schedule's (r_max, d_max) at ``step`` (see ``BRNSchedule``), in float64 on ``step``'s device."""
    # MPS has no float64.
    dtype = torch.float32 if step.device.type == "mps" else torch.float64
    return BRNSchedule(r_max, d_max, warmup_steps, r_max_steps, d_max_steps).limits(step, dtype)


def renorm_correction(
    batch_mean: Tensor,
    batch_std: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    r_max: Number,
    d_max: Number,
) -> tuple[Tensor, Tensor]:
    """r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max), without gradient."""
    r_max_t, d_max_t = _as_limit(r_max, batch_std), _as_limit(d_max, batch_std)
    r = torch.clamp(batch_std.detach().div(running_std), torch.reciprocal(r_max_t), r_max_t)
    d = torch.clamp(batch_mean.detach().sub(running_mean).div_(running_std), torch.neg(d_max_t), d_max_t)
    if torch.compiler.is_compiling():
        # The compiler's partitioner may recompute cheap values in the backward from the graph's inputs —
        # here from running statistics and a step counter that this very step has already updated in place.
        # Stacking r and d ends that chain with an op it never recomputes: the backward sees this step's r, d.
        r, d = torch.stack([r, d]).unbind(0)
    return r, d


def _as_limit(value: Number, like: Tensor) -> Tensor:
    if isinstance(value, Tensor) and value.dtype == like.dtype and value.device == like.device:
        return value
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _folded_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """γ(x̂·r + d) + β = x̂·(γr) + (γd + β): the weight and bias batch norm applies instead of γ and β."""
    if weight is None:
        return r, d if bias is None else d + bias
    return weight * r, weight * d if bias is None else torch.addcmul(bias, weight, d)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _gathered_moments(mean: Tensor, var: Tensor, count: Tensor, group: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, total count) over every rank of ``group``; ranks may hold different batch sizes."""
    packed = torch.cat([count.reshape(1).to(mean.dtype), mean, var])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    table = torch.stack(gathered)
    c = mean.shape[0]
    counts = table[:, 0]
    total, g_mean, m2 = merge_moments(counts, table[:, 1 : 1 + c], table[:, 1 + c :] * counts[:, None])
    # No valid position anywhere: zero statistics instead of 0/0 (the caller then leaves the running
    # statistics alone).
    valid = total > 0
    return torch.where(valid, g_mean, 0.0), torch.where(valid, m2 / total.clamp_min(1.0), 0.0), total


def _masked_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (mean, biased var) over the positions where ``mask`` (N, *spatial) is True; the count."""
    dims = _reduce_dims(x)
    m = mask.unsqueeze(1)
    count = m.sum().to(x.dtype)
    safe = count.clamp_min(1.0)
    # where, not a product with the mask: whatever padded positions hold (inf, NaN) stays out of the sums.
    mean = torch.where(m, x, 0.0).sum(dims) / safe
    var = torch.where(m, (x - mean.view(_channel_shape(x))).square(), 0.0).sum(dims) / safe
    return mean, var, count


class _BatchRenormFunction(torch.autograd.Function):
    """y = BN_train(x) with weight γr, bias γd + β, given this batch's statistics (no gradient to r, d).

    ``mask``: the statistics came from the valid positions only; ``group``: from every rank of the group.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        r: Tensor,
        d: Tensor,
        eps: float,
        group: Any,
        total_count: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        w_eff, b_eff = _folded_affine(weight, bias, r, d)
        original = x
        if mask is not None:
            # Padding may hold inf / NaN (the statistics never saw it): normalize it as 0, so that padded
            # outputs are finite and the backward's sums over all positions never meet 0·inf. Valid positions
            # are left as they are by this too: a non-finite valid value has made μ_B, σ_B NaN already.
            x = x.nan_to_num(0.0, 0.0, 0.0)
        # Eval-mode batch norm with the batch statistics as "running" ones: one fused pass.
        y = F.batch_norm(x, mean, var, w_eff, b_eff, False, 0.0, eps)
        ctx.save_for_backward(x, mean, var, w_eff, r, d, mask, None if mask is None else original)
        ctx.eps, ctx.group, ctx.total_count = eps, group, total_count
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, mean, var, w_eff, r, d, mask, original = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        invstd = torch.rsqrt(var + ctx.eps)
        if ctx.group is None and mask is None:
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, w_eff, None, None, mean, invstd, True, ctx.eps, [need_x, True, True]
            )
        else:
            grad_x, grad_w, grad_b = _general_backward(
                grad_out, x, mean, invstd, w_eff, mask, ctx.group, ctx.total_count
            )
            if original is not None and need_x:
                # A value read as 0 (non-finite padding, the only values nan_to_num changed) gets no gradient.
                grad_x = torch.where(x == original, grad_x, 0.0)
        grad_weight = torch.addcmul(grad_w * r, grad_b, d) if ctx.has_weight else None
        grad_bias = grad_b if ctx.has_bias else None
        return (grad_x if need_x else None, grad_weight, grad_bias) + (None,) * 8


def _general_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    w_eff: Tensor,
    mask: Tensor | None,
    group: Any,
    total: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch-norm backward when the statistics cover only the masked positions and/or every rank.

    Every output (padded ones too) depends on μ_B, σ_B, so the two per-channel sums run over all positions;
    only valid positions receive the statistics' share of the gradient. Across ranks the sums are all-reduced.
    """
    dims = _reduce_dims(x)
    shape = _channel_shape(x)
    x_hat = (x - mean.view(shape)) * invstd.view(shape)
    sum_g = grad_out.sum(dims)
    sum_g_xhat = (grad_out * x_hat).sum(dims)
    sums = torch.stack([sum_g, sum_g_xhat])
    if group is not None:
        dist.all_reduce(sums, group=group)
    sums = sums / total.clamp_min(1.0)
    share = sums[0].view(shape) + x_hat * sums[1].view(shape)
    if mask is not None:
        share = torch.where(mask.unsqueeze(1), share, 0.0)
    grad_x = (w_eff * invstd).view(shape) * (grad_out - share)
    # Parameter gradients stay local: DistributedDataParallel reduces them like any other.
    return grad_x, sum_g_xhat, sum_g


def _plain_batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    r_max: Number,
    d_max: Number,
    k: int | None,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Algorithm 1 with plain tensor ops and autograd (``torch.func`` transforms, ghost batches).

    With ``k``, each group of ``k`` examples is normalized with its own statistics and its own r, d (the
    paper's microbatches); the returned statistics are the whole batch's. Returns (y, μ_B, σ_B, valid count).
    """
    n = x.shape[0]
    k = n if k is None or k >= n else k
    full = (n // k) * k
    pieces = [
        (x[:full].unflatten(0, (n // k, k)), None if mask is None else mask[:full].unflatten(0, (n // k, k)))
    ]
    if full < n:
        pieces.append((x[full:].unsqueeze(0), None if mask is None else mask[full:].unsqueeze(0)))
    stat_shape = [1, 1, -1] + [1] * (x.dim() - 2)
    outputs, counts, means, variances = [], [], [], []
    for xg, mg in pieces:
        dims = [1, *range(3, xg.dim())]
        if mg is None:
            var_g, mean_g = torch.var_mean(xg, dims, correction=0, keepdim=True)
            count_g = torch.full((xg.shape[0],), xg.numel() // (xg.shape[0] * xg.shape[2]), dtype=x.dtype)
            count_g = count_g.to(x.device)
        else:
            m = mg.unsqueeze(2)
            count_g = m.sum(dims, keepdim=True).to(xg.dtype)
            safe = count_g.clamp_min(1.0)
            mean_g = torch.where(m, xg, 0.0).sum(dims, keepdim=True) / safe
            var_g = torch.where(m, (xg - mean_g).square(), 0.0).sum(dims, keepdim=True) / safe
            count_g = count_g.reshape(-1)
        std_g = (var_g + eps).sqrt()
        r, d = renorm_correction(
            mean_g, std_g, running_mean.view(stat_shape), running_std.view(stat_shape), r_max, d_max
        )
        y = (xg - mean_g) / std_g * r + d
        if weight is not None:
            y = y * weight.view(stat_shape)
        if bias is not None:
            y = y + bias.view(stat_shape)
        outputs.append(y.flatten(0, 1))
        counts.append(count_g)
        means.append(mean_g.detach().reshape(xg.shape[0], -1))
        variances.append(var_g.detach().reshape(xg.shape[0], -1))
    with torch.no_grad():
        if len(pieces) == 1 and pieces[0][0].shape[0] == 1:
            total, mean, var = counts[0][0], means[0][0], variances[0][0]
        else:
            group_counts = torch.cat(counts)
            total, mean, m2 = merge_moments(
                group_counts, torch.cat(means), torch.cat(variances) * group_counts[:, None]
            )
            valid = total > 0
            mean, var = torch.where(valid, mean, 0.0), torch.where(valid, m2 / total.clamp_min(1.0), 0.0)
        std = (var.to(running_std.dtype) + eps).sqrt()
    y_out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return y_out, mean.to(running_mean.dtype), std, (None if mask is None else total)


def _renorm_train(
    x: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    r_max: Number,
    d_max: Number,
    virtual_batch_size: int | None,
    process_group: Any,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The training forward without the running-statistics update: (y, μ_B, σ_B, count or None).

    The count is returned when it may be zero (masks): the caller then keeps the running statistics.
    """
    ghost = virtual_batch_size is not None and virtual_batch_size < x.shape[0]
    if ghost and process_group is not None:
        raise ValueError("virtual_batch_size cannot be combined with a process group")
    if ghost or torch._C._are_functorch_transforms_active():
        if process_group is not None:
            raise ValueError("SyncBatchRenorm cannot run under torch.func transforms (vmap, grad)")
        return _plain_batch_renorm(
            x if mask is None else _finite_padding(x, mask),
            running_mean,
            running_std,
            weight,
            bias,
            eps,
            r_max,
            d_max,
            virtual_batch_size,
            mask,
        )
    # The statistics carry no gradient of their own (the normalization below differentiates through them).
    xd = x.detach()
    count: Tensor | None = None
    if mask is None:
        # PyTorch's own batch-norm statistics kernel (mean, biased variance): several times faster than
        # torch.var_mean over the non-channel dimensions on CPU.
        if torch.compiler.is_compiling():
            # That kernel has no fake-tensor implementation for symbolic shapes: a second batch size (dynamic
            # shapes after a recompilation) would fail to compile. The compiler fuses this reduction anyway.
            var, mean = torch.var_mean(xd, _reduce_dims(xd), correction=0)
        else:
            mean, var = torch.batch_norm_update_stats(xd, None, None, 0.0)
    else:
        mean, var, count = _masked_moments(xd, mask)
    mean, var = mean.to(running_mean.dtype), var.to(running_mean.dtype)
    total = count
    if process_group is not None:
        local = count if count is not None else xd.new_tensor(float(x.numel() // x.shape[1]))
        mean, var, total = _gathered_moments(mean, var, local, process_group)
        count = total if mask is not None else None
    std = var.add(eps).sqrt_()
    r, d = renorm_correction(mean, std, running_mean, running_std, r_max, d_max)
    if mask is None and process_group is None and x.numel() <= _SMALL_BATCH_NUMEL:
        # Small batches (RL critics): per-call overhead dominates, and batch norm's own training kernel with
        # weight γr and bias γd + β — differentiated by autograd, r and d constants — costs less than a custom
        # autograd.Function, even though it computes the batch statistics a second time.
        w_eff, b_eff = _folded_affine(weight, bias, r, d)
        y = F.batch_norm(x, None, None, w_eff, b_eff, True, 0.0, eps)
    else:
        y = _BatchRenormFunction.apply(x, weight, bias, mean, var, r, d, eps, process_group, total, mask)
    return y, mean, std, count


def _finite_padding(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with inf / NaN at padded positions read as 0; valid positions untouched (a non-finite valid value
    must still show in the statistics)."""
    # Without this, padded outputs would be non-finite, and the backward's per-channel sums (Σ g·x̂ over every
    # position) would turn 0·inf into NaN in γ's, β's and every valid position's gradient. Through where(),
    # the replaced positions get no gradient. (The fused training path does the same inside its autograd
    # Function, with fewer passes; this serves eval and the plain-tensor path.)
    return torch.where(mask.unsqueeze(1), x, x.nan_to_num(0.0, 0.0, 0.0))


# Up to this many input elements the training forward uses batch norm's training kernel through autograd;
# above it, one statistics pass and the fused custom backward (measured crossover on CPU: 2^17 .. 2^20).
_SMALL_BATCH_NUMEL = 1 << 18


def _check_mask(input: Tensor, mask: Tensor | None) -> None:
    if mask is None:
        return
    expected = (input.shape[0], *input.shape[2:])
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (True at valid positions), got {mask.dtype}; use mask.bool()"
        )
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit input {tuple(input.shape)}: expected {expected} "
            "(the input's shape without the channel dimension)"
        )
    if mask.device != input.device:
        raise ValueError(f"mask is on {mask.device} but the input is on {input.device}")


def _check_arguments(input: Tensor, eps: float, training: bool) -> None:
    if not input.is_floating_point():
        raise TypeError(
            f"Batch Renormalization needs a floating-point input, got {input.dtype}; use input.float()"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps σ_B away from zero), got {eps}")
    if training and input.numel() == 0:
        raise ValueError(f"cannot compute batch statistics of an empty input of shape {tuple(input.shape)}")


def _check_state_shapes(
    input: Tensor,
    tensors: tuple[tuple[str, Tensor | None], ...],
    step: tuple[str, Tensor] | None = None,
) -> None:
    """Every per-channel tensor must have shape (C,): a (1,) state would otherwise broadcast silently."""
    if input.dim() < 2:
        raise ValueError(
            f"expected an input of shape (N, C, *), got {input.dim()}D input {tuple(input.shape)}"
        )
    c = input.shape[1]
    for name, tensor in tensors:
        if tensor is not None and tuple(tensor.shape) != (c,):
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, but the input {tuple(input.shape)} has {c} "
                f"channels: expected ({c},)"
            )
    if step is not None and step[1].numel() != 1:
        raise ValueError(f"{step[0]} must be a single step count, got shape {tuple(step[1].shape)}")


def _dense_affine(
    weight: Tensor | None, bias: Tensor | None, plain: tuple[tuple[str, Tensor | None], ...]
) -> tuple[Tensor | None, Tensor | None]:
    """γ and β as ordinary tensors; DTensors that cannot be used that way are refused with a message.

    A DTensor γ / β with ``Replicate()`` / ``Shard(0)`` placements is used whole: ``full_tensor()`` (an
    all-gather for ``Shard(0)``, nothing for ``Replicate()``) is differentiable, so the gradient returns to
    the DTensor parameter with its own placements. This assumes what tensor parallelism assumes: every rank
    computes on the same input.
    """
    for name, tensor in plain:
        if is_dtensor(tensor):
            raise TypeError(
                f"Batch Renormalization got a DTensor {name} (placements {tuple(tensor.placements)}): pass "  # type: ignore[union-attr]
                f"{name}.to_local() (each rank's own batch) or {name}.full_tensor(); running statistics stay "
                "plain tensors (as under FSDP2's fully_shard — distribute only weight and bias)"
            )
    return _dense(weight, "weight"), _dense(bias, "bias")


def _dense(tensor: Tensor | None, name: str) -> Tensor | None:
    if tensor is None or not is_dtensor(tensor):
        return tensor
    dtensor: Any = tensor
    placements = tuple(dtensor.placements)
    if any(p.is_partial() for p in placements):
        raise ValueError(
            f"{name} is a DTensor with placements {placements}: a Partial() value is not a parameter yet; "
            f"redistribute it to Replicate() or Shard(0) first ({name}.redistribute(mesh, [Replicate()]))"
        )
    return dtensor.full_tensor()


def _eval_forward(
    input: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None = None,
) -> Tensor:
    if mask is not None:
        input = _finite_padding(input, mask)
    if torch._C._are_functorch_transforms_active():
        shape = _channel_shape(input)
        y = (input - running_mean.view(shape)) / running_std.view(shape)
        if weight is not None:
            y = y * weight.view(shape)
        return y if bias is None else y + bias.view(shape)
    # (x − μ)/σ: the fused kernel with var = σ² and no ε (σ already contains it).
    return F.batch_norm(input, running_mean, running_std.square(), weight, bias, False, 0.0, 0.0)


def _updated(old: Tensor, new: Tensor, momentum: Number, count: Tensor | None, inplace: bool) -> Tensor:
    if count is not None:
        # A batch without any valid position does not move the running statistics.
        momentum = (count > 0).to(old.dtype) * momentum
    elif isinstance(momentum, Tensor):
        momentum = momentum.to(old.dtype)
    if torch._C._are_functorch_transforms_active():
        # vmap has no batching rule for lerp_: the same update, old + momentum·(new − old), in two ops.
        delta = (new - old) * momentum
        return old.add_(delta) if inplace else old + delta
    return old.lerp_(new, momentum) if inplace else old.lerp(new, momentum)


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: Number = 0.01,
    eps: float = 1e-5,
    r_max: Number = 1.0,
    d_max: Number = 0.0,
    virtual_batch_size: int | None = None,
    process_group: Any = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Batch Renormalization of ``input`` (N, C, *); updates ``running_mean`` / ``running_std`` in place when
    training.

    ``momentum`` is the weight of the new value (the paper's α). ``process_group``: merge the statistics over
    the ranks of this group (SyncBatchRenorm). ``virtual_batch_size``: normalize each group of that many
    examples on its own (ghost batches). ``mask`` (N, *spatial) bool: statistics from the True positions only.
    """
    _check_arguments(input, eps, training)
    _check_mask(input, mask)
    weight, bias = _dense_affine(
        weight,
        bias,
        (("input", input), ("running_mean", running_mean), ("running_std", running_std), ("mask", mask)),
    )
    _check_state_shapes(
        input,
        (("running_mean", running_mean), ("running_std", running_std), ("weight", weight), ("bias", bias)),
    )
    if not training:
        return _eval_forward(input, running_mean, running_std, weight, bias, mask)
    return _train_inplace(
        input,
        running_mean,
        running_std,
        weight,
        bias,
        momentum,
        eps,
        r_max,
        d_max,
        virtual_batch_size,
        process_group,
        mask,
    )


def _train_inplace(
    input: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: Number,
    eps: float,
    r_max: Number,
    d_max: Number,
    virtual_batch_size: int | None,
    process_group: Any,
    mask: Tensor | None,
) -> Tensor:
    """``batch_renorm``'s training step on checked arguments (the layers check their own)."""
    y, mean, std, count = _renorm_train(
        input,
        running_mean,
        running_std,
        weight,
        bias,
        eps,
        r_max,
        d_max,
        virtual_batch_size,
        process_group,
        mask,
    )
    # μ_B and σ_B carry no gradient: the in-place updates need no no_grad block.
    _updated(running_mean, mean, momentum, count, inplace=True)
    _updated(running_std, std, momentum, count, inplace=True)
    return y


class BatchRenormState(NamedTuple):
    """The state of a Batch Renormalization layer, kept outside a module (``functional_batch_renorm``)."""

    running_mean: Tensor
    running_std: Tensor
    num_batches_tracked: Tensor

    @staticmethod
    def initial(num_features: int, device: Any = None, dtype: Any = None) -> BatchRenormState:
        """μ = 0, σ = 1, step 0 — a fresh layer's state."""
        return BatchRenormState(
            torch.zeros(num_features, device=device, dtype=dtype),
            torch.ones(num_features, device=device, dtype=dtype),
            torch.zeros((), dtype=torch.long, device=device),
        )


def functional_batch_renorm(
    input: Tensor,
    state: BatchRenormState,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = True,
    schedule: BRNSchedule | str | Schedule = "paper",
    momentum: float | None = 0.01,
    eps: float = 1e-5,
    virtual_batch_size: int | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, BatchRenormState]:
    """Batch Renormalization with explicit state: returns ``(output, new_state)``, changes no tensor in place.

    The same computation as ``BatchRenorm*d`` (r_max, d_max from ``schedule`` at
    ``state.num_batches_tracked``; ``momentum=None`` is a cumulative average), for code that keeps state
    outside modules — e.g. under ``torch.func.vmap`` over an ensemble with a stacked state, or in a
    ``jax``-style training step. In eval mode the state is returned unchanged. Every per-channel tensor must
    have the input's channel count (no broadcasting of a (1,) state). The step advances on every training
    call, a batch without any valid position included (its running statistics stay as they were).
    """
    _check_arguments(input, eps, training)
    _check_mask(input, mask)
    weight, bias = _dense_affine(
        weight,
        bias,
        (
            ("input", input),
            ("state.running_mean", state.running_mean),
            ("state.running_std", state.running_std),
            ("state.num_batches_tracked", state.num_batches_tracked),
            ("mask", mask),
        ),
    )
    _check_state_shapes(
        input,
        (
            ("state.running_mean", state.running_mean),
            ("state.running_std", state.running_std),
            ("weight", weight),
            ("bias", bias),
        ),
        ("state.num_batches_tracked", state.num_batches_tracked),
    )
    if not training:
        return _eval_forward(input, state.running_mean, state.running_std, weight, bias, mask), state
    step = state.num_batches_tracked
    r_max, d_max = schedule_limits(schedule, step, state.running_std.dtype)
    y, mean, std, count = _renorm_train(
        input,
        state.running_mean,
        state.running_std,
        weight,
        bias,
        eps,
        r_max,
        d_max,
        virtual_batch_size,
        None,
        mask,
    )
    alpha: Number = momentum if momentum is not None else 1.0 / (step + 1).to(state.running_std.dtype)
    new_state = BatchRenormState(
        _updated(state.running_mean, mean, alpha, count, inplace=False),
        _updated(state.running_std, std, alpha, count, inplace=False),
        step + 1,
    )
    return y, new_state


def _resolve_schedule(schedule: BRNSchedule | str | Schedule | None) -> BRNSchedule | Schedule:
    """A ``BRNSchedule`` for a preset name (``None``: ``"paper"``); schedules and callables unchanged."""
    if schedule is None:
        return PRESETS["paper"]
    if isinstance(schedule, str):
        return BRNSchedule.preset(schedule)
    if isinstance(schedule, BRNSchedule) or callable(schedule):
        return schedule
    raise TypeError(
        f"schedule must be a preset name ({sorted(PRESETS)}), a BRNSchedule or a callable "
        "step -> (r_max, d_max), "
        f"got {type(schedule).__name__}"
    )


def schedule_limits(
    schedule: BRNSchedule | str | Schedule | None,
    step: Tensor,
    dtype: torch.dtype,
    check_device_tensors: bool = False,
) -> tuple[Tensor, Tensor]:
    """(r_max, d_max) of ``schedule`` at ``step``, as tensors on ``step``'s device.

    The limits are computed in ``dtype`` promoted to at least float32 (exact for float64 layers;
    half-precision layers still count steps beyond 65 504). A callable's results are converted likewise, and
    checked (finite, r_max ≥ 1, d_max ≥ 0) where that costs no host synchronisation: Python / numpy numbers
    and CPU tensors on every call (outside ``torch.compile`` and ``torch.func`` transforms); tensors on an
    accelerator only with ``check_device_tensors`` (the layers pass it on their first training call).
    """
    limit_dtype = torch.promote_types(dtype, torch.float32)
    if step.device.type == "mps" and limit_dtype == torch.float64:
        limit_dtype = torch.float32
    resolved = _resolve_schedule(schedule)
    if isinstance(resolved, BRNSchedule):
        return resolved.limits(step, limit_dtype)
    r_max, d_max = resolved(step)
    _check_schedule_result(r_max, d_max, step, check_device_tensors)
    return (
        torch.as_tensor(r_max, dtype=limit_dtype, device=step.device),
        torch.as_tensor(d_max, dtype=limit_dtype, device=step.device),
    )


def _check_schedule_result(r_max: Any, d_max: Any, step: Tensor, check_device_tensors: bool) -> None:
    """Refuse r_max < 1, d_max < 0 or non-finite limits from a callable schedule (see ``schedule_limits``)."""
    for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if isinstance(value, Tensor):
            if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
                continue  # a check would break the graph / cannot read a batched value
            if value.device.type != "cpu" and not check_device_tensors:
                continue  # reading it would wait for the device on every step
            ok = bool(torch.all(torch.isfinite(value) & (value >= low)))
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TypeError(
                    f"the schedule must return numbers or tensors (r_max, d_max), got {name}={value!r}"
                ) from None
            ok = math.isfinite(number) and number >= low
        if not ok:
            compiling = torch.compiler.is_compiling()
            shown = value.tolist() if isinstance(value, Tensor) and not compiling else float(value)
            at = f" at step {step.tolist()}" if not compiling else ""
            raise ValueError(
                f"the schedule returned {name}={shown}{at}: Batch Renormalization needs finite r_max >= 1 "
                "(r is clipped to [1/r_max, r_max]) and d_max >= 0 (d to [-d_max, d_max])"
            )
