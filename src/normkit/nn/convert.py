"""Swap BatchNorm and Batch Renormalization layers in a model, keeping the eval-mode function."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit._dtensor import is_dtensor
from normkit.nn.batchrenorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    SyncBatchRenorm,
    _BatchRenormBase,
)

__all__ = ["Converter", "convert_batchnorm", "register_converter"]

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
def _bn_to_renorm(bn: Any, cls: type[_BatchRenormBase], name: str, kwargs: dict[str, Any]) -> nn.Module:
    if not bn.track_running_stats or bn.running_var is None or bn.running_mean is None:
        raise ValueError(
            f"cannot convert {name or 'the module'} ({bn}): Batch Renormalization needs running statistics; "
            "construct the BatchNorm with track_running_stats=True"
        )
    options: dict[str, Any] = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine, **kwargs}
    if issubclass(cls, SyncBatchRenorm):
        options["process_group"] = getattr(bn, "process_group", None)
    factory: dict[str, Any] = {"device": bn.running_mean.device, "dtype": bn.running_mean.dtype}
    out = cls(bn.num_features, **options, **factory)
    out.running_mean.copy_(bn.running_mean)
    out.running_std.copy_((bn.running_var + bn.eps).sqrt())
    return _copy_common(bn, out)


@torch.no_grad()
def _renorm_to_bn(layer: Any, cls: type[_BatchNorm], process_group: Any) -> nn.Module:
    factory: dict[str, Any] = {"device": layer.running_mean.device, "dtype": layer.running_mean.dtype}
    options: dict[str, Any] = {"eps": layer.eps, "momentum": layer.momentum, "affine": layer.affine}
    if issubclass(cls, nn.SyncBatchNorm):
        options["process_group"] = process_group
    out: Any = cls(layer.num_features, **options, **factory)
    out.running_mean.copy_(layer.running_mean)
    # BatchNorm divides by √(var + ε): var = σ² − ε gives back exactly σ.
    out.running_var.copy_((layer.running_std.square() - layer.eps).clamp_min(0.0))
    return _copy_common(layer, out)


@torch.no_grad()
def _renorm_to_sync(
    layer: Any,
    group: Any,
    options: dict[str, Any],
    name: str,
    cls: type[SyncBatchRenorm] = SyncBatchRenorm,
) -> nn.Module:
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
    out = cls(layer.num_features, process_group=group, **settings, **factory)
    out.running_mean.copy_(layer.running_mean)
    out.running_std.copy_(layer.running_std)
    return _copy_common(layer, out)


Target = Literal["renorm", "batchnorm", "sync"]
# converter(layer, process_group, renorm_options, qualified_name) -> the new layer. It must not change
# ``layer``: convert_batchnorm builds every new layer before it installs any.
Converter = Callable[[nn.Module, Any, dict[str, Any], str], nn.Module]

_CONVERTERS: dict[tuple[type[nn.Module], str], Converter] = {}

# Packages whose BatchNorm subclasses a normkit integration knows. The integration is imported the first
# time a model holds one of their layers (the package is imported by then): the core imports no third party.
_PROVIDERS: dict[str, str] = {"timm": "normkit.integrations.timm"}


def register_converter(cls: type[nn.Module], to: Target, converter: Converter) -> None:
    """Teach :func:`convert_batchnorm` to convert layers of exactly type ``cls`` for ``to``.

    ``converter(layer, process_group, renorm_options, name)`` returns the replacement without changing
    ``layer`` (share its parameters, copy its buffers). BatchNorm / BatchRenorm subclasses without a converter
    are refused, never converted as their base class: that would drop what the subclass adds.
    ``normkit.integrations.timm`` registers timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` this way.
    """
    if to not in ("renorm", "batchnorm", "sync"):
        raise ValueError(f"to must be 'renorm', 'batchnorm' or 'sync', got {to!r}")
    _CONVERTERS[(cls, to)] = converter


def _to_renorm(cls: type[_BatchRenormBase]) -> Converter:
    return lambda m, group, options, name: _bn_to_renorm(m, cls, name, options)


def _to_batchnorm(cls: type[_BatchNorm]) -> Converter:
    return lambda m, group, options, name: _renorm_to_bn(m, cls, getattr(m, "process_group", None))


def _core_converters() -> None:
    for bn_cls, brn_cls in _TO_RENORM.items():
        _CONVERTERS[(bn_cls, "renorm")] = _to_renorm(brn_cls)
    for renorm_cls, norm_cls in _TO_BATCHNORM.items():
        _CONVERTERS[(renorm_cls, "batchnorm")] = _to_batchnorm(norm_cls)
    for local_renorm in (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d):
        _CONVERTERS[(local_renorm, "sync")] = _renorm_to_sync
    for local_norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        _CONVERTERS[(local_norm, "sync")] = lambda m, group, options, name: (
            nn.SyncBatchNorm.convert_sync_batchnorm(m, group)
        )


_core_converters()


def _done(module: nn.Module, to: str) -> bool:
    """Already what ``to`` asks for (a subclass included: converting it further would strip it)."""
    if to == "renorm":
        return isinstance(module, _BatchRenormBase)
    if to == "batchnorm":
        return isinstance(module, _BatchNorm)
    return isinstance(module, (nn.SyncBatchNorm, SyncBatchRenorm))


def _converter(module: nn.Module, to: str, name: str) -> Converter | None:
    kind = type(module)
    if (kind, to) in _CONVERTERS:
        return _CONVERTERS[(kind, to)]
    if _done(module, to) or not isinstance(module, (_BatchNorm, _BatchRenormBase)):
        return None
    provider = _PROVIDERS.get(kind.__module__.split(".")[0])
    if provider is not None:
        importlib.import_module(provider).register_norm_converters()
        if (kind, to) in _CONVERTERS:
            return _CONVERTERS[(kind, to)]
    base = next(c for c in kind.__mro__[1:] if (c, to) in _CONVERTERS or c in (_BatchNorm, _BatchRenormBase))
    raise ValueError(
        f"cannot convert {name or 'the module'} ({kind.__module__}.{kind.__qualname__}) to {to!r}: it is a "
        f"subclass of {base.__qualname__} that convert_batchnorm does not know, and converting it as a plain "
        f"{base.__qualname__} would drop what the subclass adds. Register a conversion with "
        f"normkit.nn.register_converter({kind.__qualname__}, {to!r}, fn), or replace the layer yourself. "
        "Nothing was converted."
    )


def _refuse_sharded(layer: nn.Module, name: str) -> None:
    """A normalization layer with DTensor parameters (fully_shard, distribute_module) is not swapped: the new
    layer would lose the sharding (and FSDP's hooks point at the old one)."""
    if not isinstance(layer, (_BatchNorm, _BatchRenormBase)):
        return
    for pname, param in layer.named_parameters(recurse=False):
        if is_dtensor(param):
            placements = tuple(param.placements)  # type: ignore[attr-defined]
            raise ValueError(
                f"cannot convert {name or 'the module'}: its {pname} is already a DTensor (placements "
                f"{placements}, e.g. after fully_shard); convert the model before sharding it"
            )


def convert_batchnorm(
    module: nn.Module,
    to: Target = "renorm",
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

    timm's ``BatchNormAct2d`` (batch norm + drop + activation in one layer) becomes
    ``normkit.integrations.timm.BatchRenormAct2d``, keeping its activation and drop layers
    (``SyncBatchNormAct`` likewise; ``to="sync"`` gives timm's ``SyncBatchNormAct`` /
    ``SyncBatchRenormAct``). Any other subclass of a batch norm or Batch Renormalization layer is refused with
    a message naming it (teach the converter with :func:`register_converter`), as are layers whose parameters
    are already DTensors (convert before ``fully_shard``). Every check and every new layer comes before the
    first change to the model.

    Parameters are the same objects (an existing optimizer keeps working). Returns the converted module (a new
    object when ``module`` itself is converted, else ``module`` modified in place).
    """
    if to not in ("renorm", "batchnorm", "sync"):
        raise ValueError(f"to must be 'renorm', 'batchnorm' or 'sync', got {to!r}")
    if renorm_options and to == "batchnorm":
        raise ValueError(f"options {sorted(renorm_options)} only apply to to='renorm' or to='sync'")
    plan: list[tuple[str, nn.Module, Converter]] = []
    skip: list[str] = []
    for name, layer in module.named_modules(remove_duplicate=False):
        if any(name.startswith(prefix + ".") for prefix in skip):
            continue  # inside a converted layer (timm's act / drop): the converter carries it over
        _refuse_sharded(layer, name)
        converter = _converter(layer, to, name)
        if converter is None:
            continue
        plan.append((name, layer, converter))
        skip.append(name)
    # Build every replacement first: a refused layer leaves the model as it was. A layer reached by several
    # names (a shared module) gets one replacement, installed under each of them.
    built: dict[int, nn.Module] = {}
    for name, layer, converter in plan:
        if id(layer) not in built:
            built[id(layer)] = converter(layer, process_group, renorm_options, name)
    for name, layer, _ in plan:
        if not name:
            return built[id(layer)]
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, built[id(layer)])
    return module
