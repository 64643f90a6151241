"""Adam's moment update, shared by AdamP and LAMB."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def adam_moments_(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[list[Tensor], list[float]]:
    """Update m and v in place; return ``denom`` = √v + ε√(1 − β2ᵗ) and √(1 − β2ᵗ) per tensor.

    m̂/(√v̂ + ε) = √(1 − β2ᵗ)/(1 − β1ᵗ) · m/denom: the bias corrections stay host-side scalars of the step size.
    """
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bc2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
    denom = list(torch._foreach_sqrt(exp_avg_sqs))
    torch._foreach_add_(denom, [eps * b for b in bc2_sqrt])
    return denom, bc2_sqrt
