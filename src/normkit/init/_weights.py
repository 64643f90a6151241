"""Read and write the weight that a linear / conv layer actually uses, whatever stands behind it.

A plain layer's ``weight`` is a Parameter. Behind a parametrized layer (``torch.nn.utils.parametrize``,
e.g. ``parametrizations.weight_norm``) the weight is recomputed from ``parametrizations.weight.original*``;
behind the deprecated hook-based ``torch.nn.utils.weight_norm`` it is recomputed from ``weight_g`` and
``weight_v`` before every forward. Writing ``module.weight.data`` in the last two cases is a silent no-op —
the peers' bug. Here every write goes to the tensors that really determine the weight, and is checked: when
they cannot express the new weight (spectral norm, orthogonal parametrization ...),
:class:`WeightAccessError` is raised.

A DTensor weight (FSDP2 ``fully_shard``, tensor parallel) is written through its local shard: a new weight is
built whole on every rank and each rank keeps its shard, a scale multiplies the shard (rows of a ``Shard(0)``
weight by their own factors). While FSDP2 runs the module, the gathered plain weight it swapped in gets the
same write, so the rest of that forward sees it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import parametrize

from normkit._dtensor import is_dtensor, local
from normkit.init._sharded import replicate_like, shard_like

__all__ = ["WeightAccess", "WeightAccessError"]


class WeightAccessError(RuntimeError):
    """The layer's effective weight cannot be set to the requested value."""


def _hook_of(module: nn.Module, cls_name: str) -> object | None:
    for hook in module._forward_pre_hooks.values():
        if type(hook).__name__ == cls_name and getattr(hook, "name", None) == "weight":
            return hook
    return None


class WeightAccess:
    """The effective weight of one layer: ``get()`` it, ``set(value)`` it, ``scale_(s)`` it in place."""

    def __init__(self, name: str, module: nn.Module, param: str = "weight") -> None:
        self.name = name
        self.module: Any = module
        self.param = param  # or another parameter the output is linear in (a gain)
        if _hook_of(module, "SpectralNorm") is not None:
            raise WeightAccessError(
                f"layer {name!r} uses torch.nn.utils.spectral_norm: its weight is divided by its largest "
                "singular value, so no rescaling can change its output scale. Apply spectral norm after the "
                "initialization, or leave this layer out with include=."
            )
        self._wn_hook = _hook_of(module, "WeightNorm") if param == "weight" else None
        self._parametrized = parametrize.is_parametrized(module, param)
        if not self._parametrized and self._wn_hook is None and not isinstance(self._live(), Tensor):
            raise WeightAccessError(f"layer {name!r} has no weight tensor")
        # the sharded parameter that persists (read outside a forward pass, when FSDP2 has resharded)
        self._sharded: Tensor | None = None
        if not self._parametrized and self._wn_hook is None and is_dtensor(self._live()):
            self._sharded = self._live()
        elif any(is_dtensor(p) for p in module.parameters(recurse=True)):
            raise WeightAccessError(
                f"layer {name!r}: a weight-normalized or parametrized layer with DTensor (sharded) "
                "parameters is not supported; initialize before sharding (fully_shard / "
                "parallelize_module), or leave this layer out with include=."
            )

    @property
    def sharded(self) -> bool:
        """The weight is a DTensor (each rank holds a shard of it)."""
        return self._sharded is not None

    def _live(self) -> Any:
        return getattr(self.module, self.param)

    def _gathered(self) -> Tensor | None:
        """The plain weight FSDP2 registered on the module while it runs, if any (scratch, not persistent)."""
        live = self._live()
        if self._sharded is None or live is self._sharded or is_dtensor(live):
            return None
        return live  # type: ignore[no-any-return]

    @property
    def kind(self) -> str:
        if self._parametrized:
            return "parametrized"
        return "weight_norm_hook" if self._wn_hook is not None else "plain"

    def get(self) -> Tensor:
        """The weight the forward pass uses (detached)."""
        with torch.no_grad():
            if self._wn_hook is not None:
                return self._wn_hook.compute_weight(self.module).detach()  # type: ignore[attr-defined]
            if self._sharded is not None:
                return self._sharded.detach()
            return self._live().detach()  # type: ignore[no-any-return]

    @property
    def shape(self) -> torch.Size:
        return self.get().shape

    @property
    def dtype(self) -> torch.dtype:
        return self.get().dtype

    @property
    def device(self) -> torch.device:
        return self.get().device

    def set(self, value: Tensor) -> None:
        """Make the effective weight equal ``value``; raise :class:`WeightAccessError` if that is impossible
        (the layer is then left as it was)."""
        with torch.no_grad():
            if self._sharded is not None:
                gathered = self._gathered()
                if gathered is not None:
                    gathered.copy_(value.full_tensor() if is_dtensor(value) else value)  # type: ignore[attr-defined]
                self._sharded.copy_(value if is_dtensor(value) else shard_like(value, self._sharded))
                return
            if not self._parametrized and self._wn_hook is None:
                self._live().copy_(value)
                return
            if self._wn_hook is not None:
                dim = self._wn_hook.dim  # type: ignore[attr-defined]
                v = self.module.weight_v
                g = self.module.weight_g
                v.copy_(value)
                g.copy_(torch.norm_except_dim(value, 2, dim).reshape(g.shape))
                self.module.weight = self._wn_hook.compute_weight(self.module)  # type: ignore[attr-defined]
                return
            originals = [p.detach().clone() for p in self.module.parametrizations.weight.parameters()]
            try:
                self.module.weight = value
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                raise WeightAccessError(
                    f"layer {self.name!r}: its weight parametrization cannot be set to a new value ({exc}). "
                    "Give the parametrization a right_inverse, initialize before parametrizing, or leave "
                    "this layer out with include=."
                ) from exc
            got = self.module.weight.detach()
            if not torch.allclose(got, value.to(got.dtype), rtol=1e-4, atol=1e-6 * float(value.abs().max())):
                for p, old in zip(self.module.parametrizations.weight.parameters(), originals):
                    p.copy_(old)
                kinds = [type(p).__name__ for p in self.module.parametrizations.weight]
                raise WeightAccessError(
                    f"layer {self.name!r}: its weight parametrization {kinds} cannot express the requested "
                    "weight (it is scale-invariant or constrained), so LSUV cannot rescale it. Leave this "
                    "layer out with include=, or initialize before parametrizing."
                )

    def save(self) -> tuple[Tensor, Tensor | None]:
        """A copy of the weight to :meth:`restore` later; while FSDP2 runs the module, also of the gathered
        weight, so that restoring it needs no communication."""
        gathered = self._gathered()
        return self.get().clone(), None if gathered is None else gathered.detach().clone()

    def restore(self, saved: tuple[Tensor, Tensor | None]) -> None:
        """Put back a weight from :meth:`save`."""
        weight, gathered_copy = saved
        gathered = self._gathered()
        if self._sharded is None or gathered is None or gathered_copy is None:
            self.set(weight)  # (a gathered weight saved nowhere: gathered again from the shards)
            return
        with torch.no_grad():
            self._sharded.copy_(weight)
            gathered.copy_(gathered_copy)

    def scale_(self, factor: Tensor) -> None:
        """Multiply the effective weight by ``factor`` (a scalar, or a tensor broadcastable to the weight)."""
        with torch.no_grad():
            if self._sharded is not None:
                f = factor.to(self._sharded.dtype)
                gathered = self._gathered()
                if gathered is not None:
                    gathered.mul_(f)
                if f.dim() == 0:
                    local(self._sharded).mul_(f)
                else:  # a factor per row: replicated, each rank multiplies the rows it holds
                    self._sharded.mul_(replicate_like(f, self._sharded))
            elif not self._parametrized and self._wn_hook is None:
                live = self._live()
                live.mul_(factor.to(live.dtype))
            else:
                w = self.get()
                self.set(w * factor.to(w.dtype))
