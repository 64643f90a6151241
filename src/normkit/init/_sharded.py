"""DTensor / FSDP2 plumbing private to ``normkit.init`` (weights built whole, kept as local shards).

FSDP2 (``fully_shard``) keeps every parameter as a ``Shard(0)`` DTensor between forward passes and swaps in a
gathered plain tensor while a module runs; in-place writes must go to the sharded parameter, the gathered one
is scratch that the next forward replaces. Plain DTensor models keep their DTensor parameters throughout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch import Tensor

from normkit._dtensor import Replicate, Shard, is_dtensor

__all__ = [
    "dtensor_moments",
    "fsdp_hooks_skip_tracing",
    "fsdp_modules",
    "local_channels",
    "local_indices",
    "replicate_like",
    "reshard",
    "rewrap",
    "shard_like",
    "shared_generator",
]


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` wrapped with FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back to its sharded parameters (after a forward pass, also one
    stopped half-way, the gathered ones may still be registered)."""
    for m in fsdp_modules(model):
        m.reshard()  # type: ignore[operator]


def replicate_like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` (the same on every rank) as a replicated DTensor on ``ref``'s mesh; no communication."""
    from torch.distributed.tensor import DTensor

    mesh = ref.device_mesh  # type: ignore[attr-defined]
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def shard_like(full: Tensor, ref: Tensor) -> Tensor:
    """``full`` (built identically on every rank) laid out like the DTensor ``ref``: each rank keeps its own
    shard of its own copy; no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        full.to(dtype=ref.dtype, device=ref.to_local().device),  # type: ignore[attr-defined]
        ref.device_mesh,  # type: ignore[attr-defined]
        ref.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    )


def local_indices(n: int, ref: Tensor, dim: int) -> Tensor | None:
    """Which of the ``n`` entries along ``dim`` of the DTensor ``ref`` this rank holds (None: all of them)."""
    from torch.distributed.tensor import distribute_tensor

    placements = [Shard(0) if isinstance(p, Shard) and p.dim == dim else Replicate() for p in ref.placements]  # type: ignore[attr-defined]
    if all(isinstance(p, Replicate) for p in placements):
        return None
    idx = torch.arange(n, device=ref.to_local().device)  # type: ignore[attr-defined]
    return distribute_tensor(idx, ref.device_mesh, placements, src_data_rank=None).to_local()  # type: ignore[attr-defined]


def shared_generator(tensors: list[Any], generator: torch.Generator | None) -> torch.Generator | None:
    """The generator every rank draws sharded weights from: ``generator`` when given (the caller seeds it
    alike on every rank), else a copy of rank 0's default generator, sent to every rank (one broadcast of
    its state, a few KB). Rank 0 keeps drawing from its default generator, so its random stream advances as
    it would in one process; the other ranks' default generators are not touched."""
    if generator is not None or not any(is_dtensor(t) for t in tensors):
        return generator
    if not (dist.is_available() and dist.is_initialized()):
        return None
    device = next(t for t in tensors if is_dtensor(t)).to_local().device
    if device.type == "cpu":
        state = torch.get_rng_state()
    else:
        state = torch.get_rng_state() if not hasattr(torch, device.type) else _device_state(device)
    src = 0
    wire = state.to(device) if dist.get_backend() == "nccl" else state.clone()
    dist.broadcast(wire, src)
    if dist.get_rank() == src:
        return None
    gen = torch.Generator(device=device)
    gen.set_state(wire.cpu())
    return gen


def _device_state(device: torch.device) -> Tensor:
    module = getattr(torch, device.type)
    return module.get_rng_state(device)  # type: ignore[no-any-return]


Moments = tuple[Tensor, Tensor, Tensor]


def dtensor_moments(y: Tensor, local_moments: Moments, cdim: int, merge: Any) -> Moments:
    """Per-channel (count, mean, M2) of the whole DTensor ``y`` from those of its local shard: merged over the
    ranks that hold other rows of the same channels (``Shard`` of another dim), concatenated over the ranks
    that hold other channels (``Shard(cdim)``); one all-gather per sharded mesh dimension. The result is the
    same on every rank."""
    count, mean, m2 = local_moments
    mesh = y.device_mesh  # type: ignore[attr-defined]
    cdim = cdim % y.dim()
    channel_sharded = 0
    for i, p in enumerate(y.placements):  # type: ignore[attr-defined]
        if isinstance(p, Replicate):
            continue
        if not isinstance(p, Shard):
            raise ValueError(
                f"the output is a DTensor with placement {p} (a pending reduction); LSUV measures outputs "
                "placed Shard(d) or Replicate(): redistribute it in the module, or leave this layer out "
                "with include="
            )
        group = mesh.get_group(i)
        parts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, (count.cpu(), mean.cpu(), m2.cpu()), group=group)
        dev = mean.device
        parts = [tuple(t.to(dev) for t in part) for part in parts]
        if p.dim == cdim:
            channel_sharded += 1
            if channel_sharded > 1:
                raise ValueError(
                    "the output's channel dimension is sharded over more than one mesh dimension; LSUV "
                    "handles one. Leave this layer out with include="
                )
            count = parts[0][0]
            mean = torch.cat([part[1] for part in parts])
            m2 = torch.cat([part[2] for part in parts])
        else:
            count, mean, m2 = merge(parts)
    return count, mean, m2


def local_channels(t: Tensor, y: Tensor, cdim: int) -> Tensor:
    """The entries of the per-channel vector ``t`` that belong to the channels of ``y``'s local shard."""
    if t.dim() == 0 or not is_dtensor(y):
        return t
    idx = local_indices(t.numel(), y, cdim % y.dim())
    return t if idx is None else t[idx.to(t.device)]


def rewrap(local_value: Tensor, like: Tensor) -> Tensor:
    """A new local shard put back into a DTensor laid out like ``like``; no communication."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_value,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


@contextlib.contextmanager
def fsdp_hooks_skip_tracing(model: nn.Module) -> Iterator[None]:
    """While ``torch.fx`` traces ``model``, FSDP2's forward hooks must not run on a wrapped block it traces
    into (they would all-gather on proxies and lazily initialize that block as a root); a real forward pass
    still runs them. Each FSDP2 forward hook is wrapped to step aside when its arguments hold an fx proxy."""
    saved: list[tuple[dict[int, Any], int, Any]] = []

    def skip_proxies(hook: Any) -> Any:
        def wrapped(*args: Any) -> Any:
            if any(isinstance(a, fx.Proxy) for a in pytree.tree_leaves(args[1:])):
                return None
            return hook(*args)

        return wrapped

    for module in fsdp_modules(model):
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                saved.append((hooks, key, hook))
                hooks[key] = skip_proxies(hook)
    try:
        yield
    finally:
        for hooks, key, hook in saved:
            hooks[key] = hook
