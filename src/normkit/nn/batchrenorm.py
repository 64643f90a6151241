"""Batch Renormalization layers (Ioffe 2017), drop-in replacements for ``nn.BatchNorm*d``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from normkit.nn.functional import batch_renorm, renorm_limits

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "SyncBatchRenorm"]

Schedule = Callable[[Tensor], tuple[Any, Any]]


class _BatchRenormBase(nn.Module):
    """Shared by the 1d/2d/3d and synchronized layers.

    Differences from the paper: ``momentum`` follows PyTorch's convention (the weight of the new value, the
    paper's α = 0.01), and ``momentum=None`` gives a cumulative average as in ``nn.BatchNorm``.
    """

    running_mean: Tensor
    running_std: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        virtual_batch_size: int | None = None,
        schedule: Schedule | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if r_max < 1.0 or d_max < 0.0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (weight of the new value), got {momentum}")
        if virtual_batch_size is not None and virtual_batch_size < 1:
            raise ValueError(
                f"virtual_batch_size must be a positive number of examples, got {virtual_batch_size}"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps
        self.r_max_steps = r_max_steps
        self.d_max_steps = d_max_steps
        self.virtual_batch_size = virtual_batch_size
        self.schedule = schedule
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
        """(r_max, d_max) for the next training step, as tensors on the layer's device."""
        if self.schedule is not None:
            r_max, d_max = self.schedule(self.num_batches_tracked)
            return torch.as_tensor(r_max), torch.as_tensor(d_max)
        return renorm_limits(
            self.num_batches_tracked,
            self.r_max,
            self.d_max,
            self.warmup_steps,
            self.r_max_steps,
            self.d_max_steps,
        )

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def _process_group(self) -> Any:
        return None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got input of shape {tuple(input.shape)}: "
                f"expected {self.num_features} channels in dimension 1"
            )
        if not self.training:
            return batch_renorm(
                input, self.running_mean, self.running_std, self.weight, self.bias, training=False
            )
        group = n = input.shape[0]
        k = self.virtual_batch_size
        if k is not None and k < n:
            group = min(k, n % k or k)  # the smallest group: a remainder group may be short
        per_channel = math.prod(input.shape[2:]) * group
        if per_channel == 1 and self._process_group() is None:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
                + (f" with virtual_batch_size={self.virtual_batch_size}" if self.virtual_batch_size else "")
            )
        r_max, d_max = self.current_limits()
        self.num_batches_tracked.add_(1)
        momentum: float | Tensor = (
            self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.to(torch.float32)
        )
        return batch_renorm(
            input,
            self.running_mean,
            self.running_std,
            self.weight,
            self.bias,
            training=True,
            momentum=momentum,
            eps=self.eps,
            r_max=r_max,
            d_max=d_max,
            virtual_batch_size=self.virtual_batch_size,
            process_group=self._process_group(),
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
            f"r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}"
        )
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        if self.schedule is not None:
            text += f", schedule={self.schedule!r}"
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
    """Batch Renormalization over a 2D (N, C) or 3D (N, C, L) input. See ``nn.BatchNorm1d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchRenorm2d(_BatchRenormBase):
    """Batch Renormalization over a 4D (N, C, H, W) input. See ``nn.BatchNorm2d``.

    Example::

        >>> layer = BatchRenorm2d(64)                # r_max 3, d_max 5, after the paper's schedule
        >>> model = convert_batchnorm(model)         # or swap every BatchNorm of a model
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchRenorm3d(_BatchRenormBase):
    """Batch Renormalization over a 5D (N, C, D, H, W) input. See ``nn.BatchNorm3d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class SyncBatchRenorm(_BatchRenormBase):
    """Batch Renormalization with statistics over every rank of a ``torch.distributed`` process group.

    Each rank's (count, mean, M2) is all-gathered and merged exactly (ranks may have different batch sizes),
    so r, d and the running statistics are identical on every rank. Without an initialized process group
    (or in eval mode) it behaves like ``BatchRenorm*d``. Ghost batches are not supported here.
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
