"""The training loop: one function, ``run(config)``, that trains, evaluates, logs and checkpoints.

Data live on the device as whole tensors; per-step statistics stay on the device and are read once per
epoch (no host synchronisation per step). Under ``torchrun`` the loop uses DDP: every rank draws the same
global batch and trains on its contiguous share, metrics are all-reduced, rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from normkit.train.checkpoint import (
    atomic_write_text,
    capture_rng,
    crash_point,
    load_checkpoint,
    remove_stale_temps,
    restore_rng,
    save_checkpoint,
)
from normkit.train.config import TrainConfig, config_diff, config_hash, resolve_config, scaled_brn_steps
from normkit.train.data import TensorData, batches, load_dataset
from normkit.train.models import build_model

__all__ = [
    "RunDirError",
    "RunResult",
    "Trainer",
    "TrainingInterrupted",
    "evaluate",
    "evaluate_checkpoint",
    "finished_run",
    "run",
]

RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "config.json")


class RunDirError(ValueError):
    """The output directory cannot take this run: a file, unwritable, or it holds other finished work."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which checkpoint is kept and how to resume."""


Log = Callable[[str], None]


@dataclass
class RunResult:
    """What a run produced: the resolved config, one metrics dict per epoch and the summary."""

    config: TrainConfig
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


# ------------------------------------------------------------------------------------------ distributed


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


def _setup_distributed(device_kind: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)


def _device(cfg: TrainConfig, info: DistInfo) -> torch.device:
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


def _all_reduce(t: Tensor, info: DistInfo) -> Tensor:
    if info.enabled:
        dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------------ optimizer & friends


def _euclidean_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Weight decay on weight matrices / kernels only; biases and normalization affines (1-D) get none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.decay_norm_and_bias or cfg.weight_decay == 0:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _family_optimizer(model: nn.Module, cfg: TrainConfig, example_input: Any) -> torch.optim.Optimizer:
    """SGDP / AdamP (cosine test or graph-known groups), LARS / LAMB (1-D and norm parameters excluded)."""
    from normkit.optim import LAMB, LARS, SGDP, AdamP, scale_invariant_param_groups, trust_ratio_param_groups

    lr, wd = cfg.resolved_lr, cfg.weight_decay
    if cfg.optimizer in ("sgdp", "adamp"):
        if cfg.projection == "graph":
            groups = scale_invariant_param_groups(model, wd, example_input=example_input)
        else:
            groups = _euclidean_groups(model, cfg)
        if cfg.optimizer == "sgdp":
            return SGDP(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
        return AdamP(groups, lr=lr, weight_decay=wd)
    groups = trust_ratio_param_groups(model, wd)
    if cfg.optimizer == "lars":
        return LARS(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=wd,
            trust_coefficient=cfg.trust_coefficient,
            trust_clip=cfg.trust_clip,
        )
    return LAMB(groups, lr=lr, weight_decay=wd)


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, example_input: Any = None
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """(optimizer to step, inner optimizer whose state ENorm transforms)."""
    lr = cfg.resolved_lr
    inner: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        inner = torch.optim.SGD(
            _euclidean_groups(model, cfg), lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov
        )
    elif cfg.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        inner = cls(_euclidean_groups(model, cfg), lr=lr)
    elif cfg.optimizer in ("sgdp", "adamp", "lars", "lamb"):
        inner = _family_optimizer(model, cfg, example_input)
    else:
        from normkit.optim import SGDG, AdamG, grassmann_param_groups

        groups = grassmann_param_groups(
            model,
            lr=lr,
            lr_g=cfg.resolved_lr_g,
            weight_decay=cfg.weight_decay,
            select=cfg.grassmann_select,
            grad_clip=cfg.grad_clip,
            omega=cfg.omega,
            example_input=example_input,
        )
        if not any(g.get("grassmann") for g in groups):
            raise ValueError(
                f"{cfg.optimizer}: no weight of model {cfg.model!r} feeds a normalization layer "
                f"(select={cfg.grassmann_select!r}); nothing to optimize on the Grassmann manifold"
            )
        if cfg.optimizer == "sgdg":
            inner = SGDG(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        else:
            inner = AdamG(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    outer: torch.optim.Optimizer = inner
    granularity: Any = cfg.granularity
    if cfg.normalize:
        from normkit.optim import NormalizedOptimizer

        outer = NormalizedOptimizer(inner, normalization=cfg.normalize, granularity=granularity, model=model)
    elif cfg.clip:
        from normkit.optim import ClippedOptimizer

        outer = ClippedOptimizer(
            inner, normalization=cfg.clip, clipnorm=cfg.clipnorm, granularity=granularity, model=model
        )
    return outer, inner


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate multiplier as a function of the optimizer step (warm-up × schedule)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    milestones = [m * steps_per_epoch for m in cfg.milestones]

    def factor(step: int) -> float:
        w = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if cfg.schedule == "multistep":
            return w * cfg.gamma ** sum(step >= m for m in milestones)
        if cfg.schedule == "cosine":
            return w * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        if cfg.schedule == "linear":
            return w * max(0.0, 1 - step / total)
        return w

    return factor


def _init_model(model: nn.Module, cfg: TrainConfig, data: TensorData, info: DistInfo, log: Log) -> None:
    if cfg.init == "orthogonal":
        from normkit.init import orthogonal_init

        orthogonal_init(model)
    elif cfg.init == "lsuv":
        from normkit.init import lsuv_init

        g = torch.Generator().manual_seed(cfg.seed + 7)
        idx = torch.randperm(len(data.y_train), generator=g)[: cfg.batch_size].to(data.x_train.device)
        batch = data.prepare(data.x_train[idx])
        if info.enabled:
            batch = torch.tensor_split(batch, info.world_size)[info.rank]
        report = lsuv_init(model, batch, tol=cfg.lsuv_tol, max_iters=cfg.lsuv_max_iters)
        done = report.initialized
        log(
            f"lsuv: {len(done)} layers scaled to unit output variance "
            f"({sum(bool(r.converged) for r in done)} within tol {cfg.lsuv_tol}), "
            f"{report.forward_passes} forward passes"
        )


# ------------------------------------------------------------------------------------------------ eval


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 1000,
    *,
    info: DistInfo | None = None,
    amp: str = "none",
    channels_last: bool = False,
    prepare: Callable[[Tensor], Tensor] | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode; sharded and all-reduced under DDP."""
    info = info or DistInfo()
    was_training = model.training
    model.eval()
    if info.enabled:
        x, y = (
            torch.tensor_split(x, info.world_size)[info.rank],
            torch.tensor_split(y, info.world_size)[info.rank],
        )
    stats = torch.zeros(3, dtype=torch.float64, device=x.device)
    for xb, yb in batches(x, y, batch_size, prepare=prepare):
        if channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(xb.device, amp):
            out = model(xb)
        stats[0] += F.cross_entropy(out.float(), yb, reduction="sum").double()
        stats[1] += (out.argmax(1) == yb).sum()
        stats[2] += len(yb)
    _all_reduce(stats, info)
    model.train(was_training)
    loss, correct, n = stats.tolist()
    return loss / max(n, 1), correct / max(n, 1)


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ---------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Holds one run's state. ``run()`` is the usual entry point; the class is there for tests and tools."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        data: TensorData | None = None,
        log: Log | None = None,
        info: DistInfo | None = None,
    ) -> None:
        self.cfg = cfg
        self.log: Log = log or (lambda s: print(s, flush=True))
        self.info = info or DistInfo()
        self.device = _device(cfg, self.info)
        _seed_everything(cfg.seed)
        if data is None:
            wait = cfg.download and self.info.enabled
            if wait and not self.info.is_main:
                dist.barrier()  # rank 0 downloads first
            data = load_dataset(
                cfg.data,
                cfg.data_dir,
                download=cfg.download and self.info.is_main,
                val_size=cfg.val_size,
                mnist1d_samples=cfg.mnist1d_samples,
                svhn_extra=cfg.svhn_extra,
                subset=cfg.subset,
            )
            if wait and self.info.is_main:
                dist.barrier()
        self.data = data.to(self.device)
        n_train = len(self.data.y_train)
        self.drop_last = n_train >= cfg.batch_size
        self.steps_per_epoch = n_train // cfg.batch_size if self.drop_last else 1
        cfg = self.cfg = finalize_config(cfg, self.steps_per_epoch)
        model = build_model(
            cfg.model,
            self.data.input_shape,
            self.data.num_classes,
            norm=cfg.resolved_norm,
            brn_options=cfg.brn_options(),
            depth=cfg.depth,
            width=cfg.width,
            widen_factor=cfg.widen_factor,
            dropout=cfg.dropout,
        ).to(self.device)
        self.threads = _set_threads(cfg, model, self.device)
        _init_model(model, cfg, self.data, self.info, self.log)
        if self.info.enabled and cfg.sync_bn:
            from normkit.nn import convert_batchnorm

            if self.device.type == "cpu" and cfg.resolved_norm == "bn":
                raise ValueError(
                    "--sync-bn with --norm bn needs CUDA: torch's SyncBatchNorm runs on GPUs only; "
                    "on CPU use --norm brn (SyncBatchRenorm works with gloo) or drop --sync-bn"
                )

            model = convert_batchnorm(model, to="sync")
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer, self.inner_optimizer = build_optimizer(
            model, cfg, self.data.prepare(self.data.x_train[:2])
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg, self.steps_per_epoch)
        )
        self.enorm: Any = None
        if cfg.enorm > 0:
            from normkit.enorm import ENorm

            example = self.data.prepare(self.data.x_train[:2])
            self.enorm = ENorm(
                model,
                self.inner_optimizer,
                c=cfg.enorm,
                every=cfg.enorm_every,
                example_input=example,
                norm_layers=cfg.enorm_norm_layers,
                bias=cfg.enorm_bias,
            )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        # dropout masks: every rank its own stream (rank 0's equals a single process's)
        torch.manual_seed(cfg.seed + 2 + 1000 * self.info.rank)
        self.epoch = 0
        self.step = 0
        self.request: dict[str, Any] | None = None  # the configuration as asked (before finalize_config)
        self.metrics: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.train_model: nn.Module = model
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)  # type: ignore[assignment]

    # -- state ----------------------------------------------------------------------------------------------
    def rank_rng_states(self) -> list[Tensor] | None:
        """Every rank's torch RNG state (dropout streams), gathered on all ranks — a collective under DDP."""
        if not self.info.enabled:
            return None
        states: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(states, torch.get_rng_state())
        return [torch.as_tensor(s) for s in states]

    def state_dict(self, rank_rng: list[Tensor] | None = None) -> dict[str, Any]:
        return {
            "rank_rng": rank_rng,
            "config": self.cfg.to_dict(),
            "request": self.request if self.request is not None else self.cfg.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "enorm": self.enorm.state_dict() if hasattr(self.enorm, "state_dict") else None,
            "rng": capture_rng(self.generator),
            "metrics": self.metrics,
            "best": self.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if state.get("enorm") is not None and hasattr(self.enorm, "load_state_dict"):
            self.enorm.load_state_dict(state["enorm"])
        restore_rng(state["rng"], self.generator)
        rank_rng = state.get("rank_rng")
        if rank_rng is not None and len(rank_rng) == self.info.world_size:
            torch.set_rng_state(rank_rng[self.info.rank])  # each rank continues its own dropout stream
        elif self.info.rank:  # resumed with another world size: a fresh stream per rank
            torch.manual_seed(self.cfg.seed + 2 + 1000 * self.info.rank + state["epoch"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.metrics = list(state["metrics"])
        self.best = dict(state["best"])

    # -- loop ---------------------------------------------------------------------------------------------
    def train_epoch(self, progress: Any = None) -> dict[str, float]:
        cfg, model = self.cfg, self.train_model
        model.train()
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        start = time.perf_counter()
        n = len(self.data.y_train)
        stop = n - n % cfg.batch_size if self.drop_last else n
        sizes = iter([min(cfg.batch_size, n - b) for b in range(0, stop, cfg.batch_size)])
        for xb, yb in batches(
            self.data.x_train,
            self.data.y_train,
            cfg.batch_size,
            self.generator,
            aug=self.data.augment,
            drop_last=self.drop_last,
            rank=self.info.rank,
            world_size=self.info.world_size,
            prepare=self.data.prepare,
            classes_per_batch=cfg.batch_classes,
        ):
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break
            if cfg.channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(self.device, cfg.amp):
                out = model(xb)
                loss_sum = F.cross_entropy(
                    out.float(), yb, label_smoothing=cfg.label_smoothing, reduction="sum"
                )
            # The mean over the *global* batch: DDP averages the ranks' gradients, so each rank scales its
            # sum by world_size / global size — every example weighs 1/global size even when the ranks'
            # shares differ (63 on 2 ranks: 32 + 31), and N processes give the one-process gradient.
            global_size = next(sizes)
            loss = loss_sum * (self.info.world_size / global_size)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.enorm is not None:
                self.enorm.step()
            self.scheduler.step()
            self.step += 1
            with torch.no_grad():
                stats[0] += loss_sum.detach().double()
                stats[1] += (out.detach().argmax(1) == yb).sum()
                stats[2] += len(yb)
            if progress is not None:
                progress.update(1)
        _all_reduce(stats, self.info)
        loss_sum, correct, n = stats.tolist()
        return {
            "train_loss": loss_sum / max(n, 1),
            "train_acc": correct / max(n, 1),
            "train_time": time.perf_counter() - start,
        }

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (running statistics): the model rank 0 saves is the one evaluated.

        Without ``--sync-bn`` each rank's running statistics follow its own shard of the batches; evaluating
        each rank's copy on its shard of the test set would report a model that nobody saved.
        """
        if self.info.enabled:
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)

    def evaluate(self, split: str = "test") -> tuple[float, float]:
        x, y = (self.data.x_test, self.data.y_test) if split == "test" else (self.data.x_val, self.data.y_val)
        assert x is not None and y is not None
        self.sync_buffers()
        return evaluate(
            self.model,
            x,
            y,
            self.cfg.eval_batch_size,
            info=self.info,
            amp=self.cfg.amp,
            channels_last=self.cfg.channels_last,
            prepare=self.data.prepare,
        )

    def run_epoch(self, progress: Any = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        groups = self.optimizer.param_groups
        euclid = [g["lr"] for g in groups if not g.get("grassmann")]
        grass = [g["lr"] for g in groups if g.get("grassmann")]
        record: dict[str, Any] = {"epoch": self.epoch + 1}
        record.update(self.train_epoch(progress))
        record["test_loss"], record["test_acc"] = self.evaluate("test")
        if self.data.x_val is not None:
            record["val_loss"], record["val_acc"] = self.evaluate("val")
        record["lr"] = euclid[0] if euclid else grass[0]
        if grass:
            record["lr_g"] = grass[0]
        record["step"] = self.step
        if not math.isfinite(record["train_loss"]):
            record["diverged"] = True
        record["time"] = time.perf_counter() - t0
        self.epoch += 1
        self.metrics.append(record)
        key = "val_acc" if "val_acc" in record else "test_acc"
        if not record.get("diverged") and (not self.best or record[key] > self.best["acc"]):
            self.best = {"epoch": record["epoch"], "acc": record[key], "key": key}
        return record


def finalize_config(cfg: TrainConfig, steps_per_epoch: int) -> TrainConfig:
    """The config with its data-dependent defaults filled in (what ``config.json`` records).

    BRN: unless ``brn_schedule="paper"``, the schedule's step counts not given explicitly are the paper's
    scaled to this run's length (:func:`~normkit.train.config.scaled_brn_steps`).
    """
    if cfg.resolved_norm != "brn" or cfg.brn_schedule != "scaled":
        return cfg
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    scaled = scaled_brn_steps(total)
    fill: dict[str, Any] = {k: v for k, v in scaled.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **fill) if fill else cfg


def brn_steps(cfg: TrainConfig) -> dict[str, int]:
    """The BRN schedule a (finalized) config trains with: explicit values, else the layer's paper defaults."""
    return {
        "warmup": cfg.brn_warmup_steps if cfg.brn_warmup_steps is not None else 5000,
        "d_max": cfg.brn_d_max_steps if cfg.brn_d_max_steps is not None else 25000,
        "r_max": cfg.brn_r_max_steps if cfg.brn_r_max_steps is not None else 40000,
    }


SMALL_MODEL = 5_000_000


def _set_threads(cfg: TrainConfig, model: nn.Module, device: torch.device) -> int:
    """CPU intra-op threads: ``cfg.threads``; else 1 for small models on the CPU (unless OMP_NUM_THREADS).

    Small layers gain nothing from intra-op parallelism, and on shared cores its parallel regions stall (the
    default digits run measured 176 s with 2 threads vs 17 s with 1 on 2 cores under load 9).
    """
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif (
        device.type == "cpu"
        and "OMP_NUM_THREADS" not in os.environ
        and sum(p.numel() for p in model.parameters()) < SMALL_MODEL
    ):
        torch.set_num_threads(1)
    return torch.get_num_threads()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _line(rec: dict[str, Any], epochs: int) -> str:
    text = (
        f"epoch {rec['epoch']:>3}/{epochs}  train loss {rec['train_loss']:.4f} "
        f"acc {100 * rec['train_acc']:6.2f}%  "
        f"test loss {rec['test_loss']:.4f} acc {100 * rec['test_acc']:6.2f}%"
    )
    if "val_acc" in rec:
        text += f"  val acc {100 * rec['val_acc']:6.2f}%"
    if "lr_g" in rec:
        text += f"  lr_g {rec['lr_g']:.3g}"
    return text + f"  lr {rec['lr']:.3g}  {rec['time']:.1f}s"


def _default_out_dir(cfg: TrainConfig) -> Path:
    name = cfg.recipe or f"{cfg.data}-{cfg.model}-{cfg.optimizer}"
    # a portable directory name: `pkg.mod:factory` has a colon, which Windows and some tools refuse
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    base = Path("runs") / f"{name}-seed{cfg.seed}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the dev extras
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def run(
    config: TrainConfig | dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool | str | Path = False,
    reuse: bool = False,
    overwrite: bool = False,
    data: TensorData | None = None,
    log: Log | None = None,
    progress: bool | None = None,
    save: bool = True,
    stop_after_epoch: int | None = None,
) -> RunResult:
    """Train one run from ``config`` (a :class:`TrainConfig` or a dict, e.g. a ``config.json``).

    Writes ``out_dir``/config.json (the configuration as run, data-dependent defaults filled in),
    metrics.jsonl (one JSON object per epoch), checkpoint.pt (latest), best.pt and, last, summary.json — the
    completion record, bound to a hash of the requested configuration and naming the code version. A run is
    finished only when that record matches. Nothing is written with ``save=False``.

    - ``resume``: True continues from ``out_dir``/checkpoint.pt, a path continues from that run directory or
      checkpoint file (bit-exactly: same metrics as an uninterrupted run). The checkpoint's config is used;
      ``config`` may only change ``epochs`` / ``device`` / ``data_dir`` then.
    - ``reuse``: for sweeps — if ``out_dir`` holds the finished run of this exact config, return it without
      training; if it holds a checkpoint of it, resume from that.
    - ``overwrite``: replace what ``out_dir`` holds. Without it, a directory holding a finished run, or any
      checkpoint of another configuration, is refused before anything is touched (:class:`RunDirError`).
    - ``data``: train on these tensors instead of loading ``config.data`` (tests, dry runs).
    - ``stop_after_epoch``: stop (after checkpointing) once this many epochs are done — simulates a crash.
    """
    log = log or (lambda s: print(s, flush=True))
    state: dict[str, Any] | None = None
    if resume:
        if resume is True and out_dir is None:
            raise ValueError("resume=True needs out_dir")
        ckpt_path = Path(out_dir) / "checkpoint.pt" if resume is True and out_dir else Path(str(resume))
        state = load_checkpoint(ckpt_path)
        if out_dir is None:
            out_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
        allowed = {"epochs", "device", "data_dir", "download"}
        extra = _config_dict(config)
        changed = {k for k, v in extra.items() if k not in allowed and state["config"].get(k) != v}
        if changed:
            raise ValueError(
                f"cannot change {sorted(changed)} when resuming; only {sorted(allowed)} may change"
            )
        keep = {k: v for k, v in extra.items() if k in allowed}
        if "brn_schedule" not in state["config"]:  # written before the schedule was scaled by default
            state["config"] = {**state["config"], "brn_schedule": "paper"}
        cfg = resolve_config({**state["config"], **keep})
        request = {**state.get("request", state["config"]), **keep}
    else:
        cfg = resolve_config(config)
        request = cfg.to_dict()
        if save:
            if out_dir is not None:
                check_writable(Path(out_dir))
                existing = existing_run(Path(out_dir))
            else:
                existing = None
            if existing is not None and reuse:
                if existing.finished and existing.hash == config_hash(request):
                    return existing.result(cfg)
                if existing.checkpoint is not None and existing.checkpoint_hash == config_hash(request):
                    state = load_checkpoint(Path(str(out_dir)) / "checkpoint.pt")
            if existing is not None and state is None and existing.has_results and not overwrite:
                raise RunDirError(existing.refusal(request, Path(str(out_dir))))

    info = _setup_distributed(
        "cuda"
        if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    threads = torch.get_num_threads()
    try:
        return _run(cfg, request, out_dir, state, data, log, progress, save, stop_after_epoch, info)
    finally:
        torch.set_num_threads(threads)  # the run's thread setting does not leak into the caller
        if info.initialized_here:
            dist.destroy_process_group()


def _config_dict(config: TrainConfig | dict[str, Any] | None) -> dict[str, Any]:
    if config is None:
        return {}
    return config.to_dict() if isinstance(config, TrainConfig) else dict(config)


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` that is a file or lies in a place we cannot write — before any work."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose another --out")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunDirError(f"cannot create --out {out}: {probe} is a file")
    try:  # a real probe: permission bits say nothing for root, read-only mounts or pseudo file systems
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise RunDirError(f"cannot write to --out {out}: {probe} is not writable ({exc.strerror})") from None


def code_version() -> dict[str, str]:
    """normkit's version, the git commit of a checkout (with ``-dirty``), torch's version, the source hash."""
    from normkit.train.provenance import code_version as version

    return version()


@dataclass
class _Existing:
    """What a run directory already holds."""

    out: Path
    record: dict[str, Any] | None  # a valid completion record (summary.json)
    checkpoint: dict[str, Any] | None  # the checkpoint's header fields (config, request, epoch)

    @property
    def finished(self) -> bool:
        return self.record is not None

    @property
    def hash(self) -> str | None:
        return self.record.get("config_hash") if self.record else None

    @property
    def checkpoint_hash(self) -> str | None:
        if self.checkpoint is None:
            return None
        return config_hash(self.checkpoint.get("request", self.checkpoint["config"]))

    @property
    def has_results(self) -> bool:
        return self.record is not None or self.checkpoint is not None

    def old_config(self) -> dict[str, Any]:
        if self.record is not None and isinstance(self.record.get("config"), dict):
            return dict(self.record["config"])
        if self.checkpoint is not None:
            return dict(self.checkpoint.get("request", self.checkpoint["config"]))
        return {}

    def refusal(self, request: dict[str, Any], out: Path) -> str:
        old = self.old_config()
        if self.finished:
            what = f"a finished run ({self.record.get('epochs_done')} epochs)"  # type: ignore[union-attr]
        else:
            what = f"an unfinished run (checkpoint at epoch {self.checkpoint.get('epoch')})"  # type: ignore[union-attr]
        if old == request:
            diff = "of this same configuration"
            hint = f"continue it with --resume {out}"
            if self.finished:
                hint = "pass --overwrite to train it again"
        else:
            diff = f"with other settings ({config_diff(old, request)})"
            hint = "pass --overwrite to replace it"
        return f"{out} already holds {what} {diff}; {hint}, or choose another --out"

    def result(self, cfg: TrainConfig) -> RunResult:
        metrics = list(iter_metrics(self.out))
        ran = self.out / "config.json"
        if ran.is_file():
            cfg = TrainConfig.from_dict(json.loads(ran.read_text()))
        return RunResult(cfg, metrics, dict(self.record or {}), self.out)


def _read_record(out: Path) -> dict[str, Any] | None:
    """The completion record in ``out`` if it is one (complete, with a config hash), else None."""
    path = out / "summary.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not record.get("complete") or "config_hash" not in record:
        return None
    if not (out / "metrics.jsonl").is_file():
        return None
    return record


def existing_run(out: Path) -> _Existing | None:
    if not out.is_dir():
        return None
    record = _read_record(out)
    header: dict[str, Any] | None = None
    if (out / "checkpoint.pt").is_file():
        try:
            state = load_checkpoint(out / "checkpoint.pt")
            header = {k: state[k] for k in ("config", "request", "epoch") if k in state}
        except (ValueError, OSError):
            header = None  # unreadable: nothing to resume from, nothing of value to protect
    if record is None and header is None and not any((out / f).exists() for f in RUN_FILES):
        return None
    return _Existing(out, record, header)


def finished_run(out_dir: str | Path, cfg: TrainConfig) -> RunResult | None:
    """The finished run of exactly this config in ``out_dir``, or None (absent, other config, unfinished).

    Finished means: a completion record (``summary.json``, written last) whose config hash is this config's.
    """
    out_dir = Path(out_dir)
    record = _read_record(out_dir)
    if record is None or record["config_hash"] != config_hash(cfg):
        return None
    return _Existing(out_dir, record, None).result(cfg)


def _clear_run_files(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _run(
    cfg: TrainConfig,
    request: dict[str, Any],
    out_dir: str | Path | None,
    state: dict[str, Any] | None,
    data: TensorData | None,
    log: Log,
    progress: bool | None,
    save: bool,
    stop_after_epoch: int | None,
    info: DistInfo,
) -> RunResult:
    main = info.is_main
    quiet: Log = log if main else (lambda s: None)
    # the data are loaded first: a missing file writes nothing
    trainer = Trainer(cfg, data=data, log=quiet, info=info)
    cfg = trainer.cfg  # data-dependent defaults filled in (the BRN schedule's steps)
    trainer.request = request
    out: Path | None = None
    if save:
        out = Path(out_dir) if out_dir is not None else _default_out_dir(cfg)
        if main:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(out)
            if state is None:
                _clear_run_files(out)  # a fresh start: nothing of an earlier run may survive beside it
            else:
                (out / "summary.json").unlink(missing_ok=True)  # no longer complete until written again
            atomic_write_text(out / "config.json", cfg.to_json() + "\n")
    if state is not None:
        trainer.load_state_dict(state)
        quiet(f"resumed from epoch {trainer.epoch} (step {trainer.step})")
        if out is not None and main:
            _write_metrics(out, trainer.metrics)  # the checkpoint is the truth: drop a line written after it
    n_params = sum(p.numel() for p in trainer.model.parameters())
    if trainer.epoch == 0:
        quiet(
            f"normkit train: {cfg.model} on {cfg.data} ({len(trainer.data.y_train)} train / "
            f"{len(trainer.data.y_test)} test), {n_params:,} parameters, {cfg.optimizer}, "
            f"{cfg.epochs} epochs, "
            f"device {trainer.device}"
            + (f", {info.world_size} processes" if info.enabled else "")
            + (f" -> {out}" if out else "")
        )
        if cfg.resolved_norm == "brn":
            b = brn_steps(cfg)
            how = "scaled to the run" if cfg.brn_schedule == "scaled" else "as in the paper"
            quiet(
                f"brn schedule ({how}): r_max = 1, d_max = 0 for {b['warmup']} steps, d_max reached at "
                f"{b['d_max']}, r_max at {b['r_max']} (run: {cfg.epochs * trainer.steps_per_epoch} steps)"
            )
    show = (sys.stderr.isatty() if progress is None else progress) and main
    start = time.perf_counter()
    try:
        while trainer.epoch < cfg.epochs:
            bar = _progress(trainer.steps_per_epoch, f"epoch {trainer.epoch + 1}/{cfg.epochs}", show)
            rec = trainer.run_epoch(bar)
            if bar is not None:
                bar.close()
            quiet(_line(rec, cfg.epochs))
            rank_rng = trainer.rank_rng_states() if out is not None else None
            if out is not None and main:
                # Checkpoint first, then the metrics it contains: after a kill, metrics.jsonl is never ahead
                # of the checkpoint, and a resume rewrites it from the checkpoint.
                ckpt = trainer.state_dict(rank_rng)
                save_checkpoint(ckpt, out / "checkpoint.pt")
                crash_point(f"after-checkpoint:{trainer.epoch}")
                if trainer.best.get("epoch") == rec["epoch"]:
                    save_checkpoint(ckpt, out / "best.pt")
                _write_metrics(out, trainer.metrics)
                crash_point(f"after-metrics:{trainer.epoch}")
            if info.enabled:
                dist.barrier()
            if rec.get("diverged"):
                quiet(
                    f"diverged: the training loss is not finite at epoch {rec['epoch']}; stopping this run "
                    "(its results are kept and flagged)"
                )
                break
            if cfg.max_steps is not None and trainer.step >= cfg.max_steps:
                break
            if stop_after_epoch is not None and trainer.epoch >= stop_after_epoch:
                return RunResult(cfg, list(trainer.metrics), {}, out)
    except KeyboardInterrupt:
        done = trainer.epoch
        where = (
            f"the checkpoint keeps epoch {done}; continue with: normkit train --resume {out}"
            if out is not None and done
            else "no epoch was finished, nothing to resume"
        )
        raise TrainingInterrupted(f"interrupted during epoch {done + 1}/{cfg.epochs}: {where}") from None
    last = trainer.metrics[-1] if trainer.metrics else {}
    diverged = bool(last.get("diverged"))
    summary: dict[str, Any] = {
        "complete": True,
        "config_hash": config_hash(request),
        "epochs_done": trainer.epoch,
        "epochs": cfg.epochs,
        "steps": trainer.step,
        "diverged": diverged,
        "final_test_acc": last.get("test_acc"),
        "final_test_loss": last.get("test_loss"),
        "final_train_loss": last.get("train_loss"),
        "best_epoch": trainer.best.get("epoch"),
        "best_acc": trainer.best.get("acc"),
        "best_on": trainer.best.get("key"),
        "mean_epoch_time": float(np.mean([m["time"] for m in trainer.metrics])) if trainer.metrics else None,
        "wall_time_this_session": time.perf_counter() - start,
        "data": cfg.data,
        "model": cfg.model,
        "train_size": len(trainer.data.y_train),
        "test_size": len(trainer.data.y_test),
        "parameters": n_params,
        "world_size": info.world_size,
        "device": str(trainer.device),
        "threads": trainer.threads,
        "torch": torch.__version__,
        "code": code_version(),
        "config": request,
    }
    if cfg.resolved_norm == "brn":
        b = brn_steps(cfg)
        summary["brn_schedule"] = b
        summary["brn_warmup_only"] = trainer.step <= b["warmup"]
        if summary["brn_warmup_only"]:
            quiet(
                f"warning: this run ended inside BRN's warm-up ({trainer.step} steps <= {b['warmup']}): "
                "r_max stayed 1 and d_max 0, so it trained plain batch norm"
            )
    if out is not None and main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")  # the completion record
    return RunResult(cfg, list(trainer.metrics), summary, out)


def _write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))


def evaluate_checkpoint(
    path: str | Path, *, data_dir: str | None = None, device: str = "auto", split: str = "test"
) -> dict[str, Any]:
    """Evaluate a checkpoint file (or run directory) on its dataset's test (or val) split."""
    state = load_checkpoint(path)
    overrides: dict[str, Any] = {"device": device}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    cfg = resolve_config({**state["config"], **overrides, "init": "default", "enorm": 0.0})
    trainer = Trainer(cfg, log=lambda s: None)
    trainer.model.load_state_dict(state["model"])
    if split == "val" and trainer.data.x_val is None:
        raise ValueError("this run has no validation split (val_size = 0)")
    loss, acc = trainer.evaluate(split)
    return {"checkpoint": str(path), "epoch": int(state["epoch"]), f"{split}_loss": loss, f"{split}_acc": acc}


def iter_metrics(out_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Read a run directory's metrics.jsonl."""
    with open(Path(out_dir) / "metrics.jsonl") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
