"""PyTorch Lightning glue: LSUV at the start of training, ENorm after every optimizer step, and a layer
sync that knows Batch Renormalization.

>>> import lightning as L
>>> from normkit.integrations.lightning import ENormCallback, LSUVInit, SyncBatchRenormPlugin
>>> trainer = L.Trainer(callbacks=[LSUVInit(), ENormCallback(c=1.0)])
>>> trainer = L.Trainer(strategy="ddp", devices=4, plugins=[SyncBatchRenormPlugin()])

Lightning's own ``Trainer(sync_batchnorm=True)`` converts ``torch.nn`` batch-norm layers only, so Batch
Renormalization layers would keep per-process statistics; :class:`SyncBatchRenormPlugin` converts both (use it
instead of ``sync_batchnorm=True``; Lightning refuses the two together). Needs ``pip install
'normkit[lightning]'`` (the ``lightning`` package, ≥ 2.2).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.layer_sync import LayerSync
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "normkit.integrations.lightning needs PyTorch Lightning: pip install 'normkit[lightning]'"
    ) from exc

from normkit.nn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, SyncBatchRenorm, convert_batchnorm

__all__ = ["ENormCallback", "LSUVInit", "SyncBatchRenormPlugin"]

ModuleSelector = Callable[["pl.LightningModule"], nn.Module]


def _default_input(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _check_options(
    owner: str, target: Callable[..., Any], options: dict[str, Any], fixed: tuple[str, ...]
) -> None:
    """Refuse at construction an option ``target`` does not take (it would only fail when training starts)."""
    params = inspect.signature(target).parameters
    known = [n for n, p in params.items() if p.kind is not p.VAR_KEYWORD and n not in ("self", *fixed)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(
            f"{owner} got unknown option(s) {', '.join(map(repr, unknown))}; it passes options to "
            f"{target.__qualname__.split('.')[0]}, which takes: {', '.join(known)}"
        )


def _has_own_forward(module: nn.Module) -> bool:
    """False for a LightningModule (or any module) that does not define ``forward``: calling it raises."""
    forward = type(module).forward
    return forward not in (pl.LightningModule.forward, nn.Module.forward)


def _submodules_with_parameters(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_children() if any(True for _ in m.parameters())]


class LSUVInit(pl.Callback):
    """LSUV-initialize the model on the first training batch, before the first optimizer step.

    Runs in ``on_train_start`` (the model is on its device, wrapped for DDP, and ranks hold the same weights;
    :func:`normkit.init.lsuv_init` all-reduces the variances, so every rank ends with the same weights). A fit
    resumed from a checkpoint (``global_step > 0``) is left alone.

    Args:
        select: the part of the LightningModule to initialize: the name of a submodule (``"net"``), or a
            function ``pl_module -> module``. Default: the LightningModule itself, whose ``forward`` must take
            the batch input (a LightningModule without ``forward`` needs ``select``).
        batch_to_input: the model input of a training batch (default: ``batch[0]`` for a tuple / list, else
            the batch itself).
        **lsuv_options: passed to :func:`normkit.init.lsuv_init` (``tol``, ``max_iters``,
            ``skip_normalized`` ...).

    Attributes:
        report: the :class:`~normkit.init.LSUVReport` of the initialization (None before it ran).
    """

    def __init__(
        self,
        select: str | ModuleSelector | None = None,
        batch_to_input: Callable[[Any], Any] = _default_input,
        **lsuv_options: Any,
    ) -> None:
        if select is not None and not isinstance(select, str) and not callable(select):
            raise TypeError(
                "LSUVInit(select=...) takes the name of a submodule ('net') or a function pl_module -> "
                f"module, got {type(select).__name__}"
            )
        if not callable(batch_to_input):
            raise TypeError(
                "LSUVInit: batch_to_input must be callable (a function batch -> model input), got "
                f"{type(batch_to_input).__name__}"
            )
        from normkit.init import lsuv_init

        _check_options("LSUVInit", lsuv_init, lsuv_options, ("model", "data"))
        self.select = select
        self.batch_to_input = batch_to_input
        self.lsuv_options = lsuv_options
        self.report: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0:
            return
        from normkit.init import lsuv_init

        module = self._selected(pl_module)
        loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError("LSUVInit needs a training dataloader")
        batch = next(iter(loader))
        batch = trainer.strategy.batch_to_device(batch, pl_module.device)
        self.report = lsuv_init(module, self.batch_to_input(batch), **self.lsuv_options)

    def _selected(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module LSUV runs on; a clear error, before anything changes, when there is no usable one."""
        children = [name for name, _ in pl_module.named_children()]
        if self.select is None:
            if type(pl_module).forward is pl.LightningModule.forward:
                raise RuntimeError(
                    f"LSUVInit: {type(pl_module).__name__} defines no forward(), so LSUV has nothing to run "
                    "the batch through. Name the submodule that takes the batch input, e.g. "
                    f"LSUVInit(select={children[0] if children else 'net'!r}) (submodules: {children}), or "
                    "pass select=lambda m: ... returning it."
                )
            return pl_module
        if isinstance(self.select, str):
            try:
                module = pl_module.get_submodule(self.select)
            except AttributeError:
                raise ValueError(
                    f"LSUVInit(select={self.select!r}): {type(pl_module).__name__} has no submodule of that "
                    f"name; its submodules are {children}"
                ) from None
        else:
            module = self.select(pl_module)
        if not isinstance(module, nn.Module):
            raise TypeError(f"LSUVInit: select returned a {type(module).__name__}, not an nn.Module")
        return module


class ENormCallback(pl.Callback):
    """One Equi-normalization cycle after each optimizer step (Stock et al. 2019).

    Built in ``on_train_start`` from the trainer's optimizer (SGD, Adam or AdamW: its momentum / moment
    buffers are rescaled with the weights, see :class:`normkit.enorm.ENorm`); steps are counted by
    ``trainer.global_step``, so gradient accumulation is respected.

    Args:
        c: the asymmetry coefficient (‖outgoing‖ = c·‖incoming‖ at the fixed point; 1 = symmetric).
        every: a cycle every ``every`` optimizer steps.
        select: the part of the LightningModule to balance: the name of a submodule (``"net"``) or a function
            of the LightningModule returning it (default: the LightningModule itself, which then needs a
            ``forward``).
        optimizer_index: which of ``trainer.optimizers`` steps the selected module.
        example_input: an input of the selected module, needed when a flatten / reshape or a concatenation
            sits between two layers.
        **enorm_options: passed to :class:`~normkit.enorm.ENorm` (``p``, ``cycles``, ``include_bias`` ...).

    Arguments are checked here; the selected module at ``setup`` (before anything runs) and
    ``optimizer_index`` against the trainer's optimizers when training starts (before anything is changed).

    Attributes:
        enorm: the :class:`~normkit.enorm.ENorm` object once training started (``groups``, ``skipped``).
    """

    def __init__(
        self,
        c: float = 1.0,
        every: int = 1,
        *,
        select: ModuleSelector | str | None = None,
        optimizer_index: int = 0,
        example_input: Any = None,
        **enorm_options: Any,
    ) -> None:
        from normkit.enorm import BIAS_MODES, NORM_LAYER_MODES, SWEEPS, ENorm

        _check_options(
            "ENormCallback", ENorm, enorm_options, ("model", "optimizer", "c", "every", "example_input")
        )
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c > 0):
            raise ValueError(f"ENormCallback c must be a finite positive number (1 = symmetric), got {c!r}")
        for name, value in (("every", every), ("optimizer_index", optimizer_index)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ENormCallback {name} must be an int, got {type(value).__name__} {value!r}")
        if every < 1:
            raise ValueError(
                f"ENormCallback every must be at least 1 (a cycle every `every` steps), got {every}"
            )
        if optimizer_index < 0:
            raise ValueError(
                "ENormCallback optimizer_index must be ≥ 0 (an index into trainer.optimizers), "
                f"got {optimizer_index}"
            )
        if select is not None and not isinstance(select, str) and not callable(select):
            raise TypeError(
                "ENormCallback select must be a submodule name (select='net') or a function of the "
                f"LightningModule returning the module (select=lambda m: m.net), got {type(select).__name__}"
            )
        for name, choices in (("bias", BIAS_MODES), ("norm_layers", NORM_LAYER_MODES), ("sweep", SWEEPS)):
            if name in enorm_options and enorm_options[name] not in choices:
                raise ValueError(
                    f"ENormCallback {name} must be one of {', '.join(map(repr, choices))}, "
                    f"got {enorm_options[name]!r}"
                )
        self.c, self.every = c, every
        self.select = select
        self.optimizer_index = optimizer_index
        self.example_input = example_input
        self.enorm_options = enorm_options
        self.enorm: Any = None
        self._seen_step = 0

    def _module(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module to balance, with a message saying how to point the callback at it when it is wrong."""
        if isinstance(self.select, str):
            try:
                module = pl_module.get_submodule(self.select)
            except AttributeError:
                raise ValueError(
                    f"ENormCallback(select={self.select!r}): {type(pl_module).__name__} has no submodule "
                    f"{self.select!r}; its submodules with parameters: "
                    f"{', '.join(map(repr, _submodules_with_parameters(pl_module))) or 'none'}"
                ) from None
        elif self.select is not None:
            module = self.select(pl_module)
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"ENormCallback select returned {type(module).__name__}, not an nn.Module: return the "
                    "network to balance (select=lambda m: m.net), or pass its name (select='net')"
                )
        else:
            module = pl_module
        if not _has_own_forward(module):
            names = _submodules_with_parameters(module)
            hint = f"select={names[0]!r}" if names else "select='<submodule name>'"
            where = "" if module is pl_module else f" (selected by select={self.select!r})"
            raise ValueError(
                f"ENormCallback: {type(module).__name__}{where} does not define forward(), so ENorm cannot "
                "follow its layers (it traces a forward to find which layer feeds which). Point the callback "
                f"at the network that has one: ENormCallback(..., {hint})"
                + (f"; submodules with parameters: {', '.join(map(repr, names))}" if names else "")
            )
        return module

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._module(pl_module)  # a wrong select fails now, before the sanity check and the first step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from normkit.enorm import ENorm

        module = self._module(pl_module)
        optimizers = trainer.optimizers
        if self.optimizer_index >= len(optimizers):
            kinds = ", ".join(type(o).__name__ for o in optimizers)
            raise ValueError(
                f"ENormCallback(optimizer_index={self.optimizer_index}): the trainer has {len(optimizers)} "
                f"optimizer(s) from configure_optimizers ({kinds}); "
                f"pass the index (0 .. {len(optimizers) - 1}) of the one that steps the selected module"
                if optimizers
                else f"ENormCallback(optimizer_index={self.optimizer_index}): the trainer has no optimizer "
                "(configure_optimizers returned none)"
            )
        optimizer = optimizers[self.optimizer_index]
        self.enorm = ENorm(
            module,
            optimizer,
            c=self.c,
            every=self.every,
            example_input=self.example_input,
            **self.enorm_options,
        )
        self._seen_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps: unchanged while gradients accumulate or when a step is skipped.
        if self.enorm is not None and trainer.global_step != self._seen_step:
            self._seen_step = trainer.global_step
            self.enorm.step()


_RENORM_TYPES = (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d)
_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class SyncBatchRenormPlugin(LayerSync):
    """Synchronize Batch Renormalization *and* BatchNorm statistics across processes.

    ``apply`` converts ``BatchRenorm1d/2d/3d`` to :class:`~normkit.nn.SyncBatchRenorm` and ``nn.BatchNorm*d``
    to ``nn.SyncBatchNorm`` (with :func:`normkit.nn.convert_batchnorm`); ``revert`` restores the original
    layer classes, with the trained parameters and statistics. Pass it as ``Trainer(plugins=[...])`` with a
    DDP or FSDP strategy; like Lightning's ``sync_batchnorm``, it does nothing in a single process.
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self._original: dict[str, type[nn.Module]] = {}

    def apply(self, model: nn.Module) -> nn.Module:
        self._original = {
            name: type(m) for name, m in model.named_modules() if type(m) in _RENORM_TYPES + _BATCHNORM_TYPES
        }
        return convert_batchnorm(model, to="sync", process_group=self.process_group)

    def revert(self, model: nn.Module) -> nn.Module:
        for name, cls in self._original.items():
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                continue  # the model changed since apply; leave it alone
            if not isinstance(layer, (SyncBatchRenorm, nn.SyncBatchNorm)):
                continue
            new = _unsynced(layer, cls)
            if not name:
                model = new
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        self._original = {}
        return model


@torch.no_grad()
def _unsynced(layer: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A layer of class ``cls`` holding ``layer``'s settings, parameters (the same objects) and buffers."""
    factory = {"device": layer.running_mean.device, "dtype": layer.running_mean.dtype}
    if isinstance(layer, SyncBatchRenorm):
        settings = {
            k: getattr(layer, k)
            for k in (
                "eps",
                "momentum",
                "affine",
                "r_max",
                "d_max",
                "warmup_steps",
                "r_max_steps",
                "d_max_steps",
            )
        }
        out: Any = cls(layer.num_features, schedule=layer.schedule, **settings, **factory)
    else:
        assert isinstance(layer, nn.SyncBatchNorm)
        out = cls(
            layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats, **factory
        )
    for key, buffer in layer.named_buffers(recurse=False):
        if buffer is not None:
            getattr(out, key).copy_(buffer)
    if getattr(layer, "affine", False):
        out.weight, out.bias = layer.weight, layer.bias
    out.train(layer.training)
    return out
