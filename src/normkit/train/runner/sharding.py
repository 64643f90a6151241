"""``normkit train --fsdp``: the model sharded with FSDP2 and checkpointed with Distributed Checkpoint.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter, gradient and optimizer state as a
``DTensor`` sharded on dim 0 over the ranks: memory per rank falls with the world size, at the cost of an
all-gather of each block's weights in forward and backward and a reduce-scatter of its gradients. A
checkpoint is then written by every rank, each its own shards (``torch.distributed.checkpoint``): a
directory ``sharded/epoch-N`` beside ``checkpoint.pt``, which holds the rest of the state and names it.
``normkit test`` reads that directory into an unsharded model in one process.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_sharded", "load_unsharded_model", "prune_sharded", "save_sharded", "shard_model"]

SHARDED_DIR = "sharded"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one at a time: each element of a container (``Sequential``, ``ModuleList``,
    ``ModuleDict``) and each other direct child with parameters, looked for from the root down through
    containers — the transformer / ResNet block granularity, where an all-gather covers one block."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, _CONTAINERS):
                visit(child)
            elif any(True for _ in child.parameters()):
                found.append(child)

    visit(model)
    return found


def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard`` every block of ``model`` (see :func:`_blocks`), then the root; returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def _dcp() -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank writes its shards of the model and optimizer state to ``directory`` (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    _dcp().save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Inverse of :func:`save_sharded` on a model sharded the same way (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not directory.is_dir():
        raise FileNotFoundError(f"the sharded checkpoint {directory} is missing; this run cannot resume")
    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    _dcp().load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_unsharded_model(model: nn.Module, directory: Path) -> None:
    """Load the model part of a sharded checkpoint into an ordinary model, in one process."""
    if not directory.is_dir():
        raise FileNotFoundError(f"the sharded checkpoint {directory} is missing")
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        _dcp().load(state, checkpoint_id=str(directory), no_dist=True)
    model.load_state_dict(state["model"])


def prune_sharded(out: Path, keep: set[str]) -> None:
    """Remove the sharded checkpoints of ``out`` that no run file names any more (rank 0, after the files
    naming the new one were written: a crash in between leaves an extra directory, never a missing one)."""
    root = out / SHARDED_DIR
    if not root.is_dir():
        return
    for path in root.iterdir():
        if f"{SHARDED_DIR}/{path.name}" not in keep:
            shutil.rmtree(path, ignore_errors=True)
