"""Read and write the weight that a linear / conv layer actually uses, whatever stands behind it.

A plain layer's ``weight`` is a Parameter. Behind a parametrized layer (``torch.nn.utils.parametrize``,
e.g. ``parametrizations.weight_norm``) the weight is recomputed from ``parametrizations.weight.original*``;
behind the deprecated hook-based ``torch.nn.utils.weight_norm`` it is recomputed from ``weight_g`` and
``weight_v`` before every forward. Writing ``module.weight.data`` in the last two cases is a silent no-op —
the peers' bug. Here every write goes to the tensors that really determine the weight, and is checked: when
they cannot express the new weight (spectral norm, orthogonal parametrization ...),
:class:`WeightAccessError` is raised.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import parametrize

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

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module: Any = module
        if _hook_of(module, "SpectralNorm") is not None:
            raise WeightAccessError(
                f"layer {name!r} uses torch.nn.utils.spectral_norm: its weight is divided by its largest "
                "singular value, so no rescaling can change its output scale. Apply spectral norm after the "
                "initialization, or leave this layer out with include=."
            )
        self._wn_hook = _hook_of(module, "WeightNorm")
        self._parametrized = parametrize.is_parametrized(module, "weight")
        if not self._parametrized and self._wn_hook is None and not isinstance(module.weight, Tensor):
            raise WeightAccessError(f"layer {name!r} has no weight tensor")

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
            return self.module.weight.detach()

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
            if not self._parametrized and self._wn_hook is None:
                self.module.weight.copy_(value)
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

    def scale_(self, factor: Tensor) -> None:
        """Multiply the effective weight by ``factor`` (a scalar, or a tensor broadcastable to the weight)."""
        with torch.no_grad():
            if not self._parametrized and self._wn_hook is None:
                self.module.weight.mul_(factor.to(self.module.weight.dtype))
            else:
                w = self.get()
                self.set(w * factor.to(w.dtype))
