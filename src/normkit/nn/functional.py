"""Batch Renormalization as pure tensor functions (Ioffe 2017, Algorithm 1).

Training forward, per channel:  μ_B, σ_B = √(biased var_B + ε);  r = clip(σ_B/σ, 1/r_max, r_max),
d = clip((μ_B − μ)/σ, −d_max, d_max), both from the running statistics *before* this step's update and with no
gradient;  y = γ(x̂·r + d) + β;  then μ += α(μ_B − μ), σ += α(σ_B − σ).  Inference:  y = γ(x − μ)/σ + β.

Because r and d carry no gradient, y is exactly batch norm with weight γr and bias γd + β. The fast path
computes the statistics once, normalizes with PyTorch's fused kernel and back-propagates through
``native_batch_norm_backward`` — the same kernels as ``nn.BatchNorm``, no per-element eager arithmetic.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from normkit._moments import merge_moments

__all__ = ["batch_renorm", "renorm_correction", "renorm_limits"]

Number = float | Tensor


def renorm_limits(
    step: Tensor,
    r_max: float,
    d_max: float,
    warmup_steps: int,
    r_max_steps: int,
    d_max_steps: int,
) -> tuple[Tensor, Tensor]:
    """The paper's schedule: r_max = 1 and d_max = 0 up to ``warmup_steps``, then linear to the final values.

    ``step`` is a tensor (the layer's ``num_batches_tracked``): the result stays on its device, no host sync.
    """
    # float64 so that the limits are exact for float64 layers (MPS has no float64).
    t = step.to(torch.float32 if step.device.type == "mps" else torch.float64)
    ramp_r = ((t - warmup_steps) / max(r_max_steps - warmup_steps, 1)).clamp(0.0, 1.0)
    ramp_d = ((t - warmup_steps) / max(d_max_steps - warmup_steps, 1)).clamp(0.0, 1.0)
    return 1.0 + (r_max - 1.0) * ramp_r, d_max * ramp_d


def renorm_correction(
    batch_mean: Tensor,
    batch_std: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    r_max: Number,
    d_max: Number,
) -> tuple[Tensor, Tensor]:
    """r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max), without gradient."""
    batch_mean, batch_std = batch_mean.detach(), batch_std.detach()
    r_max_t = torch.as_tensor(r_max, dtype=batch_std.dtype, device=batch_std.device)
    d_max_t = torch.as_tensor(d_max, dtype=batch_std.dtype, device=batch_std.device)
    r = torch.clamp(batch_std / running_std, 1.0 / r_max_t, r_max_t)
    d = torch.clamp((batch_mean - running_mean) / running_std, -d_max_t, d_max_t)
    return r, d


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _gathered_moments(mean: Tensor, var: Tensor, count: int, group: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, total count) over every rank of ``group``; ranks may hold different batch sizes."""
    packed = torch.cat([mean.new_full((1,), float(count)), mean, var])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    table = torch.stack(gathered)
    c = mean.shape[0]
    counts = table[:, 0]
    total, g_mean, m2 = merge_moments(counts, table[:, 1 : 1 + c], table[:, 1 + c :] * counts[:, None])
    return g_mean, m2 / total, total


class _BatchRenormFunction(torch.autograd.Function):
    """y = BN_train(x) with weight γr, bias γd + β, given this batch's statistics (no gradient to r, d)."""

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
    ) -> Tensor:
        w_eff = r if weight is None else weight * r
        b_eff = d if weight is None else weight * d + (bias if bias is not None else 0.0)
        # Eval-mode batch norm with the batch statistics as "running" ones: one fused pass.
        y = F.batch_norm(x, mean, var, w_eff, b_eff, False, 0.0, eps)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, mean, invstd, w_eff, r, d)
        ctx.eps, ctx.group, ctx.total_count = eps, group, total_count
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, mean, invstd, w_eff, r, d = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        if ctx.group is None:
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, w_eff, None, None, mean, invstd, True, ctx.eps, [need_x, True, True]
            )
        else:
            grad_x, grad_w, grad_b = _sync_backward(
                grad_out, x, mean, invstd, w_eff, ctx.group, ctx.total_count
            )
        grad_weight = grad_w * r + grad_b * d if ctx.has_weight else None
        grad_bias = grad_b if ctx.has_bias else None
        return grad_x if need_x else None, grad_weight, grad_bias, None, None, None, None, None, None, None


def _sync_backward(
    grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, w_eff: Tensor, group: Any, total: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch-norm backward whose batch spans every rank: the two per-channel sums are all-reduced."""
    dims = _reduce_dims(x)
    shape = [1, -1] + [1] * (x.dim() - 2)
    x_hat = (x - mean.view(shape)) * invstd.view(shape)
    sum_g = grad_out.sum(dims)
    sum_g_xhat = (grad_out * x_hat).sum(dims)
    sums = torch.stack([sum_g, sum_g_xhat])
    dist.all_reduce(sums, group=group)
    scale = (w_eff * invstd).view(shape)
    grad_x = scale * (grad_out - (sums[0] / total).view(shape) - x_hat * (sums[1] / total).view(shape))
    # Parameter gradients stay local: DistributedDataParallel reduces them like any other.
    return grad_x, sum_g_xhat, sum_g


def _ghost_batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: Number,
    eps: float,
    r_max: Number,
    d_max: Number,
    k: int,
) -> Tensor:
    """Each group of ``k`` examples normalized with its own statistics and its own r, d (the paper's
    microbatches); running statistics move once, toward the whole batch's statistics."""
    n = x.shape[0]
    full = (n // k) * k
    pieces = [x[:full].unflatten(0, (n // k, k))]
    if full < n:
        pieces.append(x[full:].unsqueeze(0))
    stat_shape = [1, 1, -1] + [1] * (x.dim() - 2)
    outputs, counts, means, variances = [], [], [], []
    for xg in pieces:
        dims = [1, *range(3, xg.dim())]
        var_g, mean_g = torch.var_mean(xg, dims, correction=0, keepdim=True)
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
        group_size = xg.numel() // (xg.shape[0] * xg.shape[2])
        counts.append(torch.full((xg.shape[0],), float(group_size), device=x.device))
        means.append(mean_g.detach().reshape(xg.shape[0], -1))
        variances.append(var_g.detach().reshape(xg.shape[0], -1))
    with torch.no_grad():
        group_counts = torch.cat(counts)
        total, mean, m2 = merge_moments(
            group_counts, torch.cat(means), torch.cat(variances) * group_counts[:, None]
        )
        var = m2 / total
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_std.lerp_((var + eps).sqrt().to(running_std.dtype), momentum)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


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
) -> Tensor:
    """Batch Renormalization of ``input`` (N, C, *); updates ``running_mean`` / ``running_std`` in place when
    training.

    ``momentum`` is the weight of the new value (the paper's α). ``process_group``: merge the statistics over
    the ranks of this group (SyncBatchRenorm). ``virtual_batch_size``: normalize each group of that many
    examples on its own (ghost batches).
    """
    if not training:
        # (x − μ)/σ: the fused kernel with var = σ² and no ε (σ already contains it).
        return F.batch_norm(input, running_mean, running_std.square(), weight, bias, False, 0.0, 0.0)
    if virtual_batch_size is not None and virtual_batch_size < input.shape[0]:
        if process_group is not None:
            raise ValueError("virtual_batch_size cannot be combined with a process group")
        return _ghost_batch_renorm(
            input, running_mean, running_std, weight, bias, momentum, eps, r_max, d_max, virtual_batch_size
        )
    with torch.no_grad():
        # PyTorch's own batch-norm statistics kernel (mean, biased variance): several times faster than
        # torch.var_mean over the non-channel dimensions on CPU.
        mean, var = torch.batch_norm_update_stats(input, None, None, 0.0)
        mean, var = mean.to(running_mean.dtype), var.to(running_mean.dtype)
        total: Tensor | None = None
        if process_group is not None:
            mean, var, total = _gathered_moments(
                mean, var, math.prod(input.shape) // input.shape[1], process_group
            )
        std = (var + eps).sqrt()
        r, d = renorm_correction(mean, std, running_mean, running_std, r_max, d_max)
        running_mean.lerp_(mean, momentum)
        running_std.lerp_(std, momentum)
    out: Tensor = _BatchRenormFunction.apply(input, weight, bias, mean, var, r, d, eps, process_group, total)
    return out
