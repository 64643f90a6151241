"""Step 3 of a run: the process — joining ``torchrun``'s process group, the device, the global seeds."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from normkit.train.runner.config import TrainConfig

__all__ = ["DistInfo", "device_for", "seed_everything", "setup_distributed"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if world <= 1:
        return DistInfo()
    dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)


def device_for(cfg: TrainConfig, info: DistInfo) -> torch.device:
    if cfg.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = torch.device(cfg.device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {cfg.device}: CUDA is not available on this machine (use cpu or auto)"
            )
        index = info.local_rank if info.enabled else (torch.device(cfg.device).index or 0)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(cfg.device if cfg.device != "auto" else "cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
