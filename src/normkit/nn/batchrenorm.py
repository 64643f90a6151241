"""Batch Renormalization layers (Ioffe 2017), drop-in replacements for ``nn.BatchNorm*d``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from normkit.nn.functional import (
    BRNSchedule,
    Schedule,
    _check_arguments,
    _check_mask,
    _dense_affine,
    _eval_forward,
    _resolve_schedule,
    _train_inplace,
    schedule_limits,
)

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "SyncBatchRenorm"]

_SCHEDULE_FIELDS = ("r_max", "d_max", "warmup_steps", "r_max_steps", "d_max_steps")


class _BatchRenormBase(nn.Module):
    """Shared by the 1d/2d/3d and synchronized layers (documented on ``BatchRenorm1d``)."""

    running_mean: Tensor
    running_std: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        r_max: float | None = None,
        d_max: float | None = None,
        warmup_steps: int | None = None,
        r_max_steps: int | None = None,
        d_max_steps: int | None = None,
        virtual_batch_size: int | None = None,
        schedule: BRNSchedule | str | Schedule | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (it keeps σ_B away from zero), got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (weight of the new value), got {momentum}")
        if virtual_batch_size is not None and virtual_batch_size < 1:
            raise ValueError(
                f"virtual_batch_size must be a positive number of examples, got {virtual_batch_size}"
            )
        resolved = _resolve_schedule(schedule)
        overrides: dict[str, Any] = {
            name: value
            for name, value in zip(_SCHEDULE_FIELDS, (r_max, d_max, warmup_steps, r_max_steps, d_max_steps))
            if value is not None
        }
        if isinstance(resolved, BRNSchedule):
            resolved = dataclasses.replace(resolved, **overrides)
        elif overrides:
            raise ValueError(
                f"{sorted(overrides)} do not apply to a callable schedule: it returns (r_max, d_max) itself"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.virtual_batch_size = virtual_batch_size
        self.schedule: BRNSchedule | Schedule = resolved
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_std", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.reset_parameters()

    # The schedule's fields, readable and settable on the layer as before schedules became data.
    def _field(self, name: str) -> Any:
        if isinstance(self.schedule, BRNSchedule):
            value = getattr(self.schedule, name)
            if value is None and name.endswith("_steps"):
                return self.schedule.warmup_steps  # a hard switch: the ramp ends where the warm-up does
            return value
        return None

    def _set_field(self, name: str, value: Any) -> None:
        if not isinstance(self.schedule, BRNSchedule):
            raise AttributeError(f"{name} does not apply to a callable schedule")
        self.schedule = dataclasses.replace(self.schedule, **{name: value})

    r_max = property(lambda self: self._field("r_max"), lambda self, v: self._set_field("r_max", v))
    d_max = property(lambda self: self._field("d_max"), lambda self, v: self._set_field("d_max", v))
    warmup_steps = property(
        lambda self: self._field("warmup_steps"), lambda self, v: self._set_field("warmup_steps", v)
    )
    r_max_steps = property(
        lambda self: self._field("r_max_steps"), lambda self, v: self._set_field("r_max_steps", v)
    )
    d_max_steps = property(
        lambda self: self._field("d_max_steps"), lambda self, v: self._set_field("d_max_steps", v)
    )

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_std.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) for the next training step, as tensors on the layer's device (float64 for a float64
        layer, float32 otherwise)."""
        return schedule_limits(self.schedule, self.num_batches_tracked, self.running_std.dtype)

    def _limits(self, step: Tensor) -> tuple[Tensor, Tensor]:
        # A callable schedule's results are checked where that is free (numbers, CPU tensors: every call); on
        # an accelerator once, at the first training call with this schedule object (one synchronisation).
        first = self.__dict__.get("_checked_schedule") is not self.schedule
        limits = schedule_limits(self.schedule, step, self.running_std.dtype, check_device_tensors=first)
        if first and not torch.compiler.is_compiling():
            self.__dict__["_checked_schedule"] = self.schedule
        return limits

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def _process_group(self) -> Any:
        return None

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        # Everything is checked before the first buffer changes: a rejected call leaves the layer as it was.
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got input of shape {tuple(input.shape)}: "
                f"expected {self.num_features} channels in dimension 1"
            )
        _check_arguments(input, self.eps, self.training)
        _check_mask(input, mask)
        # Under FSDP2 γ, β are ordinary tensors here (gathered before the forward); plain DTensor ones are
        # used whole or refused with a message (see normkit.nn.functional).
        weight, bias = _dense_affine(
            self.weight,
            self.bias,
            (
                ("input", input),
                ("running_mean", self.running_mean),
                ("running_std", self.running_std),
                ("mask", mask),
            ),
        )
        if not self.training:
            return _eval_forward(input, self.running_mean, self.running_std, weight, bias, mask)
        process_group = self._process_group()
        group = n = input.shape[0]
        k = self.virtual_batch_size
        if k is not None and k < n:
            group = min(k, n % k or k)  # the smallest group: a remainder group may be short
        per_channel = math.prod(input.shape[2:]) * group
        if per_channel == 1 and mask is None and process_group is None:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
                + (f" with virtual_batch_size={self.virtual_batch_size}" if self.virtual_batch_size else "")
            )
        step = self.num_batches_tracked
        r_max, d_max = self._limits(step)
        momentum: float | Tensor = (
            self.momentum
            if self.momentum is not None
            else torch.reciprocal(step.add(1).to(self.running_std.dtype))
        )
        out = _train_inplace(
            input,
            self.running_mean,
            self.running_std,
            weight,
            bias,
            momentum,
            self.eps,
            r_max,
            d_max,
            self.virtual_batch_size,
            process_group,
            mask,
        )
        step.add_(1)
        return out

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
        if isinstance(self.schedule, BRNSchedule):
            text += ", ".join(f"{name}={self._field(name)}" for name in _SCHEDULE_FIELDS)
        else:
            text += f"schedule={self.schedule!r}"
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        return text

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A BatchNorm state dict (running_var) loads too: σ = √(var + ε), the eval function is unchanged.
        var_key, std_key = prefix + "running_var", prefix + "running_std"
        if var_key in state_dict and std_key not in state_dict:
            state_dict = dict(state_dict)
            state_dict[std_key] = (state_dict.pop(var_key) + self.eps).sqrt()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BatchRenorm1d(_BatchRenormBase):
    """Batch Renormalization over a 2D (N, C) or 3D (N, C, L) input: Algorithm 1 of Ioffe (2017), a drop-in
    replacement for ``nn.BatchNorm1d`` (the same for ``BatchRenorm2d``/``3d`` and ``SyncBatchRenorm``).

    Schedule: ``schedule`` is a preset name (``"paper"``, the default; ``"crossq"``), a ``BRNSchedule``, or a
    callable ``step_tensor -> (r_max, d_max)``. ``r_max``, ``d_max``, ``warmup_steps``, ``r_max_steps`` and
    ``d_max_steps`` override the named schedule's fields, e.g. ``BatchRenorm1d(256, schedule="crossq",
    warmup_steps=10_000)``: batch norm for steps 0 … 9 999, then r_max 3, d_max 5 at once. The step is
    ``num_batches_tracked`` (saved in the state dict, so a resumed run continues the schedule). A callable's
    limits are refused when r_max < 1, d_max < 0 or not finite: numbers and CPU tensors on every call, tensors
    on an accelerator once, on the first training call (reading them every step would wait for the device).

    Momentum conventions — the same running average, μ ← μ + 0.01·(μ_B − μ), written three ways:

    ======================================  =========  ==================================
    PyTorch (here, ``nn.BatchNorm``)         0.01       weight of the new (batch) value
    the paper's α; CrossQ's PyTorch ports    0.01       weight of the new value
    Keras / Flax ``momentum`` (CrossQ, sbx)  0.99       weight of the old (running) value
    ======================================  =========  ==================================

    ``momentum=None`` gives a cumulative average as in ``nn.BatchNorm``.

    ``forward(input, mask=None)``: ``mask`` (N, *spatial) bool, True at valid positions ((N, L) for an
    (N, C, L) input, (N,) for (N, C)); the batch statistics, r, d and the running statistics use the valid
    positions only, and every position (padded ones too) is normalized with them; padded inf / NaN are read
    as 0, so padded outputs are finite and no gradient turns NaN. A batch without valid positions leaves the
    running statistics unchanged (``num_batches_tracked`` still advances); a single valid position gives
    σ_B = √ε (variance 0) where the unmasked layer refuses one value per channel (counting the mask would
    cost a host synchronisation).

    Running σ is tracked directly (buffer ``running_std``), as the paper writes it; a BatchNorm state dict
    (``running_var``) loads with σ = √(var + ε).

    Sharded models: under FSDP2's ``fully_shard`` γ and β are DTensors between steps and ordinary tensors in
    the forward; running statistics are unsharded buffers. ``SyncBatchRenorm`` then equals one process on the
    global batch; ``BatchRenorm*d`` keeps per-rank statistics, as under DDP without synchronisation (and a
    Distributed Checkpoint stores one rank's copy of them). γ, β given as plain DTensors (``Replicate()`` /
    ``Shard(0)``, the same input on every rank) are used whole.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchRenorm2d(_BatchRenormBase):
    """Batch Renormalization over a 4D (N, C, H, W) input. See ``nn.BatchNorm2d`` and ``BatchRenorm1d``.

    Example::

        >>> layer = BatchRenorm2d(64)                # r_max 3, d_max 5, after the paper's schedule
        >>> model = convert_batchnorm(model)         # or swap every BatchNorm of a model
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchRenorm3d(_BatchRenormBase):
    """Batch Renormalization over a 5D (N, C, D, H, W) input. See ``nn.BatchNorm3d`` and ``BatchRenorm1d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class SyncBatchRenorm(_BatchRenormBase):
    """Batch Renormalization with statistics over every rank of a ``torch.distributed`` process group.

    Each rank's (count, mean, M2) — of its valid positions when ``forward`` gets a ``mask`` — is all-gathered
    and merged exactly (ranks may have different batch sizes and numbers of valid positions), so r, d and the
    running statistics are identical on every rank. Without an initialized process group (or in eval mode) it
    behaves like ``BatchRenorm*d``. Ghost batches and ``torch.func`` transforms are not supported here.
    """

    def __init__(self, num_features: int, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        if kwargs.get("virtual_batch_size") is not None:
            raise ValueError(
                "SyncBatchRenorm does not support virtual_batch_size; use BatchRenorm*d for ghost batches"
            )
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _process_group(self) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None
