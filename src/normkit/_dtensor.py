"""What every technique needs to know about DTensor parameters (FSDP2 ``fully_shard``, tensor parallel).

FSDP2 shards each parameter on dim 0 (``Shard(0)``): for Linear / Conv weights that is the output dimension,
so every row (one unit's incoming weights) lies whole on one rank and row-wise math can run on the local
shard. A norm over a whole sharded tensor, or over all tensors, needs one reduction across the mesh.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # public since torch 2.5; the library supports torch >= 2.4 without DTensor support there
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a parameter, gradient or state of a sharded model)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor (no communication); any other tensor unchanged."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def rows_are_local(tensor: torch.Tensor) -> bool:
    """True when every row ``tensor.reshape(len(tensor), -1)[i]`` lies whole on one rank: a plain tensor, or a
    DTensor whose placements are ``Replicate()`` or ``Shard(0)`` only."""
    if not is_dtensor(tensor):
        return True
    return all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in tensor.placements)
