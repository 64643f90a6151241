"""Swap BatchNorm and Batch Renormalization layers in a model, keeping the eval-mode function."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit.nn.batchrenorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    SyncBatchRenorm,
    _BatchRenormBase,
)

__all__ = ["convert_batchnorm"]

_TO_RENORM: dict[type[nn.Module], type[_BatchRenormBase]] = {
    nn.BatchNorm1d: BatchRenorm1d,
    nn.BatchNorm2d: BatchRenorm2d,
    nn.BatchNorm3d: BatchRenorm3d,
    nn.SyncBatchNorm: SyncBatchRenorm,
}
_TO_BATCHNORM: dict[type[nn.Module], type[_BatchNorm]] = {
    BatchRenorm1d: nn.BatchNorm1d,
    BatchRenorm2d: nn.BatchNorm2d,
    BatchRenorm3d: nn.BatchNorm3d,
    SyncBatchRenorm: nn.SyncBatchNorm,
}


def _copy_common(src: Any, dst: Any) -> nn.Module:
    # The same Parameter objects: an optimizer built before the conversion keeps working.
    if getattr(src, "affine", False):
        dst.weight = src.weight
        dst.bias = src.bias
    dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.train(src.training)
    return dst


@torch.no_grad()
def _bn_to_renorm(
    bn: _BatchNorm, cls: type[_BatchRenormBase], name: str, kwargs: dict[str, Any]
) -> nn.Module:
    if not bn.track_running_stats or bn.running_var is None or bn.running_mean is None:
        raise ValueError(
            f"cannot convert {name or 'the module'} ({bn}): Batch Renormalization needs running statistics; "
            "construct the BatchNorm with track_running_stats=True"
        )
    options: dict[str, Any] = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine, **kwargs}
    if cls is SyncBatchRenorm:
        options["process_group"] = getattr(bn, "process_group", None)
    factory: dict[str, Any] = {"device": bn.running_mean.device, "dtype": bn.running_mean.dtype}
    out = cls(bn.num_features, **options, **factory)
    out.running_mean.copy_(bn.running_mean)
    out.running_std.copy_((bn.running_var + bn.eps).sqrt())
    return _copy_common(bn, out)


@torch.no_grad()
def _renorm_to_bn(layer: _BatchRenormBase, cls: type[_BatchNorm], process_group: Any) -> nn.Module:
    factory: dict[str, Any] = {"device": layer.running_mean.device, "dtype": layer.running_mean.dtype}
    options: dict[str, Any] = {"eps": layer.eps, "momentum": layer.momentum, "affine": layer.affine}
    if cls is nn.SyncBatchNorm:
        options["process_group"] = process_group
    out: Any = cls(layer.num_features, **options, **factory)
    out.running_mean.copy_(layer.running_mean)
    # BatchNorm divides by √(var + ε): var = σ² − ε gives back exactly σ.
    out.running_var.copy_((layer.running_std.square() - layer.eps).clamp_min(0.0))
    return _copy_common(layer, out)


@torch.no_grad()
def _renorm_to_sync(layer: _BatchRenormBase, group: Any, options: dict[str, Any], name: str) -> nn.Module:
    if layer.virtual_batch_size is not None:
        raise ValueError(
            f"{name or 'the module'} uses virtual_batch_size, which SyncBatchRenorm does not support"
        )
    settings: dict[str, Any] = {
        "eps": layer.eps,
        "momentum": layer.momentum,
        "affine": layer.affine,
        "schedule": layer.schedule,
        **options,
    }
    factory: dict[str, Any] = {"device": layer.running_mean.device, "dtype": layer.running_mean.dtype}
    out = SyncBatchRenorm(layer.num_features, process_group=group, **settings, **factory)
    out.running_mean.copy_(layer.running_mean)
    out.running_std.copy_(layer.running_std)
    return _copy_common(layer, out)


def convert_batchnorm(
    module: nn.Module,
    to: Literal["renorm", "batchnorm", "sync"] = "renorm",
    process_group: Any = None,
    **renorm_options: Any,
) -> nn.Module:
    """Recursively replace normalization layers, like ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    - ``to="renorm"``: ``nn.BatchNorm1d/2d/3d`` → ``BatchRenorm1d/2d/3d`` (``nn.SyncBatchNorm``
      → ``SyncBatchRenorm``). ``renorm_options`` (``r_max``, ``d_max``, ``warmup_steps``,
      ``virtual_batch_size``, ``momentum`` ...) are passed to the new layers; eps and momentum are the
      BatchNorm's unless given.
      σ = √(running_var + ε), so the eval-mode function is unchanged; the step counter carries over.
    - ``to="batchnorm"``: the reverse (running_var = σ² − ε).
    - ``to="sync"``: ``BatchRenorm*d`` → ``SyncBatchRenorm`` and ``nn.BatchNorm*d`` → ``nn.SyncBatchNorm``,
      over ``process_group`` (default: the whole world).

    Parameters are the same objects (an existing optimizer keeps working). Returns the converted module (a new
    object when ``module`` itself is converted, else ``module`` modified in place).
    """
    if to not in ("renorm", "batchnorm", "sync"):
        raise ValueError(f"to must be 'renorm', 'batchnorm' or 'sync', got {to!r}")
    if renorm_options and to == "batchnorm":
        raise ValueError(f"options {sorted(renorm_options)} only apply to to='renorm' or to='sync'")
    return _convert(module, to, process_group, renorm_options, "")


def _convert(module: nn.Module, to: str, group: Any, options: dict[str, Any], name: str) -> nn.Module:
    kind = type(module)
    out = module
    if to == "renorm" and kind in _TO_RENORM:
        assert isinstance(module, _BatchNorm)
        out = _bn_to_renorm(module, _TO_RENORM[kind], name, options)
    elif to == "batchnorm" and kind in _TO_BATCHNORM:
        assert isinstance(module, _BatchRenormBase)
        out = _renorm_to_bn(module, _TO_BATCHNORM[kind], getattr(module, "process_group", None))
    elif to == "sync" and isinstance(module, (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d)):
        out = _renorm_to_sync(module, group, options, name)
    elif to == "sync" and isinstance(module, _BatchNorm) and kind is not nn.SyncBatchNorm:
        out = nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
    for child_name, child in module.named_children():
        new = _convert(child, to, group, options, f"{name}.{child_name}" if name else child_name)
        if new is not child:
            out.add_module(child_name, new)
    return out
