"""What an optimizer step does with a NaN or ±inf in a gradient: the ``nonfinite=`` policy.

* ``"propagate"`` (default, what ``torch.optim`` does): no check; the non-finite values flow into the
  update (a normalized block, a manifold row and its momentum become NaN). No host synchronisation.
* ``"skip"``: the step is not taken — parameters, optimizer state and gradients are left as they are — and
  the optimizer's ``skipped_steps`` counter (saved in its ``state_dict``) goes up by one, as
  ``torch.amp.GradScaler`` skips a step with an overflowed gradient.
* ``"raise"``: :class:`NonFiniteGradientError` before anything is changed.

The check is one fused reduction over all gradients (``torch._foreach_norm`` with ``ord=inf`` per device,
which is NaN for a NaN and inf for an inf anywhere in a tensor) and **one host synchronisation per step** to
read its verdict: the step has to decide whether to run. (A synchronisation-free masked update would need a
copy of every parameter and state tensor of an arbitrary inner optimizer, plus a pass to clear the NaNs out of
the gradients before they meet a zero mask — slower than the one read.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from normkit._dtensor import is_dtensor, local, reduce_partials

__all__ = [
    "NONFINITE_POLICIES",
    "NonFiniteGradientError",
    "check_policy",
    "nonfinite_norms_verdict",
    "nonfinite_verdict",
]

NONFINITE_POLICIES = ("propagate", "skip", "raise")


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or ±inf and the optimizer was built with ``nonfinite="raise"``."""


def check_policy(owner: str, policy: object) -> str:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(
            f"{owner}: nonfinite must be one of {NONFINITE_POLICIES} ('propagate': no check, as torch.optim; "
            f"'skip': leave parameters and state untouched for that step; 'raise': stop with an error), "
            f"got {policy!r}"
        )
    return str(policy)


def _finite_flags(grads: Sequence[Tensor]) -> Tensor:
    """One flag per gradient, ``True`` where every entry is finite, on the first gradient's device."""
    if any(is_dtensor(g) for g in grads):
        # sharded gradients: local shards, then one MAX all_reduce of the "has a non-finite entry" flags, so
        # that every rank takes the same decision (an empty shard has nothing non-finite)
        shards = [local(g) for g in grads]
        bad = torch.stack(
            [
                (~torch.isfinite(t).all()).to(torch.float32)
                if t.numel()
                else t.new_zeros((), dtype=torch.float32)
                for t in shards
            ]
        )
        verdict = reduce_partials(bad, grads, "max")
        return verdict == 0
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    home = grads[0].device
    maxima = []
    for ts in by_device.values():
        dense = [t._values() if t.is_sparse else t for t in ts]
        maxima.append(torch.stack(torch._foreach_norm(dense, math.inf)).to(home))
    order = [g for ts in by_device.values() for g in ts]
    flags = torch.cat(maxima).isfinite()
    if order != list(grads):  # put the flags back in the gradients' order (several devices)
        index = {id(g): i for i, g in enumerate(order)}
        flags = flags[torch.tensor([index[id(g)] for g in grads], device=home)]
    return flags


def nonfinite_verdict(owner: str, policy: str, params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
    """Apply ``policy`` to ``grads`` (of ``params``): True when the step must be skipped.

    ``"propagate"`` returns False without looking (no synchronisation); otherwise one fused reduction and one
    host read. ``"raise"`` raises :class:`NonFiniteGradientError` naming the offending parameters' shapes.
    """
    if policy == "propagate" or not grads:
        return False
    flags = _finite_flags(grads)
    if bool(flags.all()):  # the step's single host synchronisation
        return False
    if policy == "skip":
        return True
    bad = [tuple(p.shape) for p, ok in zip(params, flags.tolist()) if not ok]
    raise NonFiniteGradientError(
        f"{owner}: the gradients of {len(bad)} of {len(grads)} parameter tensors hold NaN or inf (shapes "
        f"{bad[:5]}{' ...' if len(bad) > 5 else ''}); nothing was changed. Find the source (e.g. "
        "torch.autograd.set_detect_anomaly(True)), or build the optimizer with nonfinite='skip' to skip such "
        "steps."
    )


def nonfinite_norms_verdict(owner: str, policy: str, norm_name: str, norms: Sequence[Tensor]) -> bool:
    """Apply ``policy`` to the block norms a wrapper computed from finite gradients (``norms``: 1-D tensors,
    any devices): True when the step must be skipped. A custom norm can return NaN or inf where the
    gradients are finite; ``"skip"`` / ``"raise"`` must catch that before any gradient is scaled by it.
    One fused check and one host read (the caller has already paid one for the gradients)."""
    if policy == "propagate" or not norms:
        return False
    home = norms[0].device
    ok = torch.stack([n.isfinite().all().to(home) for n in norms]).all()
    if bool(ok):
        return False
    if policy == "skip":
        return True
    raise NonFiniteGradientError(
        f"{owner}: the norm {norm_name!r} is NaN or inf for a block whose gradients are finite; nothing was "
        "changed. Check the norm function (a custom norm must return a finite number ≥ 0 for every finite "
        "block, including a block of zeros), or build the optimizer with nonfinite='skip' to skip such steps."
    )
