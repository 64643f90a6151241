"""Argument checks shared by every normkit optimizer's constructor and ``add_param_group``.

One place decides what a valid learning rate, ε, β, momentum or weight decay is, so that no optimizer lets
NaN, ±inf or a negative value through where another refuses it (``SGDG(lr=nan)`` was taken while ``AdamP``
refused it). All checks run before anything is built or changed. A number is a Python ``int`` / ``float``
(or a NumPy / 0-dim tensor scalar that converts exactly), never a ``bool``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_betas", "check_lr", "check_number", "missing_lr_message"]


def _as_real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_number(
    owner: str,
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> float:
    """``value`` as a float if it is a finite number in the interval ``[low, high]`` (ends open as asked);
    otherwise a ``ValueError`` naming the owner, the argument, the interval and (``why``) what goes wrong."""
    x = _as_real(value)
    ok = x is not None and math.isfinite(x)
    if ok:
        assert x is not None
        ok = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        if high == math.inf:
            where = f"{'>' if low_open else '≥'} {low:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(
            f"{owner}: {name} must be a finite number {where}, got {value!r}" + (f" ({why})" if why else "")
        )
    assert x is not None
    return x


def check_lr(owner: str, lr: Any) -> None:
    """A learning rate: a finite number ≥ 0, or (as ``torch.optim`` accepts, for capturable / compiled
    schedules) a one-element real floating tensor holding one. Reading the tensor's value syncs once, here
    at construction, not per step."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(
                f"{owner}: a tensor lr must hold one real floating-point number, got shape "
                f"{tuple(lr.shape)} and dtype {lr.dtype}"
            )
        value = float(lr.detach().reshape(()).to("cpu", torch.float64))
        check_number(owner, "lr", value)
        return
    check_number(owner, "lr", lr)


def check_betas(owner: str, betas: Any) -> None:
    """Adam's ``(β1, β2)``, each a finite number in ``[0, 1)``."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
    check_number(owner, "betas[0]", betas[0], 0.0, 1.0, high_open=True)
    check_number(owner, "betas[1]", betas[1], 0.0, 1.0, high_open=True)


def missing_lr_message(owner: str) -> str:
    return (
        f"{owner}: a parameter group sets no lr and the optimizer has no default one: pass lr=... to "
        f"{owner}(...) or set 'lr' in every parameter group"
    )
