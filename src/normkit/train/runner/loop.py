"""Step 5 of a run: the loop — train, evaluate, hand each epoch to the run's records, stop at the end.

Data live on the device as whole tensors; per-step statistics stay on the device and are read once per
epoch (no host synchronisation per step). Under ``torchrun`` the loop uses DDP: every rank draws the same
global batch and trains on its contiguous share, metrics are all-reduced, rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from normkit.train.runner.build import Built, brn_steps
from normkit.train.runner.checkpoint import capture_rng, restore_rng
from normkit.train.runner.config import config_hash
from normkit.train.runner.data import batches
from normkit.train.runner.process import DistInfo
from normkit.train.runner.records import Records
from normkit.train.runner.rundir import Claim, RunResult, code_version
from normkit.train.runner.sharding import SHARDED_DIR, load_sharded, save_sharded

__all__ = ["Trainer", "TrainingInterrupted", "evaluate", "train"]

Log = Callable[[str], None]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which checkpoint is kept and how to resume."""


def _all_reduce(t: Tensor, info: DistInfo) -> Tensor:
    if info.enabled:
        dist.all_reduce(t)
    return t


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
    sharded: bool = False,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode; the data split over the ranks and the sums
    all-reduced under torchrun. ``sharded``: the model is FSDP-sharded (its forward is a collective)."""
    info = info or DistInfo()
    was_training = model.training
    model.eval()
    rank, world = info.rank, info.world_size
    if info.enabled and not sharded:
        x, y = torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]
        rank, world = 0, 1
    # A sharded model's forward is a collective: every rank takes its share of each global batch, so all
    # ranks run the same number of forward passes.
    stats = torch.zeros(3, dtype=torch.float64, device=x.device)
    for xb, yb in batches(x, y, batch_size, prepare=prepare, rank=rank, world_size=world):
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
    """One run's state over what :func:`~normkit.train.runner.build.build_run` made; :func:`train` runs it."""

    def __init__(self, built: Built, log: Log | None = None) -> None:
        self.built = built
        self.cfg = built.cfg
        self.log: Log = log or (lambda s: print(s, flush=True))
        self.info = built.info
        self.device = built.device
        self.data = built.data
        self.drop_last = built.drop_last
        self.steps_per_epoch = built.steps_per_epoch
        self.model = built.model
        self.train_model = built.train_model
        self.optimizer, self.inner_optimizer = built.optimizer, built.inner_optimizer
        self.scheduler = built.scheduler
        self.enorm = built.enorm
        self.scaler = built.scaler
        self.generator = built.generator
        self.threads = built.threads
        self.epoch = 0
        self.step = 0
        self.request: dict[str, Any] | None = None  # the configuration as asked (before finalize_config)
        self.metrics: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.sharded: str | None = None  # --fsdp: the directory of the last sharded checkpoint

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
            **(
                {"sharded": self.sharded}  # model and optimizer: every rank's shards, save_sharded
                if self.cfg.fsdp
                else {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            ),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "enorm": self.enorm.state_dict() if hasattr(self.enorm, "state_dict") else None,
            "rng": capture_rng(self.generator),
            "metrics": self.metrics,
            "best": self.best,
            "built": self.built.fingerprint,
        }

    def save_sharded(self, out: Path) -> None:
        """Every rank writes its shards of model and optimizer (``--fsdp``; a collective)."""
        self.sharded = f"{SHARDED_DIR}/epoch-{self.epoch}"
        save_sharded(self.model, self.optimizer, out / self.sharded)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sharded" in state:
            if not self.cfg.fsdp:
                raise ValueError(
                    "this checkpoint was written with --fsdp: resume it with --fsdp under torchrun"
                )
            load_sharded(self.model, self.optimizer, Path(state["source_dir"]) / state["sharded"])
            self.sharded = state["sharded"]
        elif self.cfg.fsdp:
            raise ValueError("this checkpoint was written without --fsdp: resume it without --fsdp")
        else:
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
            sharded=self.cfg.fsdp,
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


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the dev extras
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ train


def train(
    built: Built,
    request: dict[str, Any],
    where: Claim,
    *,
    log: Log,
    progress: bool | None = None,
    stop_after_epoch: int | None = None,
) -> RunResult:
    """Train ``built`` epoch by epoch, writing the run's records in ``where.out`` (if any) as it goes.

    Each epoch: train, evaluate, then checkpoint and metrics (:class:`~normkit.train.runner.records.Records`);
    at the end the completion record. A diverged run (training loss not finite) stops and is a result: its
    summary says ``diverged``. Ctrl-C raises :class:`TrainingInterrupted` naming the checkpoint kept.
    """
    info = built.info
    main = info.is_main
    quiet: Log = log if main else (lambda s: None)
    trainer = Trainer(built, log=quiet)
    cfg = trainer.cfg
    trainer.request = request
    with Records(where, cfg, main=main) as records:
        if where.state is not None:
            trainer.load_state_dict(where.state)
            quiet(f"resumed from epoch {trainer.epoch} (step {trainer.step})")
            records.metrics(trainer.metrics)  # the checkpoint is the truth: drop a line written after it
        n_params = sum(p.numel() for p in trainer.model.parameters())
        if trainer.epoch == 0:
            quiet(
                f"normkit train: {cfg.model} on {cfg.data} ({len(trainer.data.y_train)} train / "
                f"{len(trainer.data.y_test)} test), {n_params:,} parameters, {cfg.optimizer}, "
                f"{cfg.epochs} epochs, "
                f"device {trainer.device}"
                + (f", {info.world_size} processes" if info.enabled else "")
                + (f" -> {records.out}" if records.out else "")
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
                rank_rng = trainer.rank_rng_states() if records.out is not None else None
                if cfg.fsdp and records.out is not None:
                    trainer.save_sharded(records.out)
                records.epoch(trainer, rec, rank_rng)
                if info.enabled:
                    dist.barrier()
                if rec.get("diverged"):
                    quiet(
                        f"diverged: the training loss is not finite at epoch {rec['epoch']}; stopping this "
                        "run (its results are kept and flagged)"
                    )
                    break
                if cfg.max_steps is not None and trainer.step >= cfg.max_steps:
                    break
                if stop_after_epoch is not None and trainer.epoch >= stop_after_epoch:
                    return RunResult(cfg, list(trainer.metrics), {}, records.out)
        except KeyboardInterrupt:
            done = trainer.epoch
            where_to = (
                f"the checkpoint keeps epoch {done}; continue with: normkit train --resume {records.out}"
                if records.out is not None and done
                else "no epoch was finished, nothing to resume"
            )
            raise TrainingInterrupted(
                f"interrupted during epoch {done + 1}/{cfg.epochs}: {where_to}"
            ) from None
        summary = _summary(trainer, request, n_params, time.perf_counter() - start)
        if cfg.resolved_norm == "brn" and summary["brn_warmup_only"]:
            quiet(
                f"warning: this run ended inside BRN's warm-up ({trainer.step} steps <= "
                f"{summary['brn_schedule']['warmup']}): r_max stayed 1 and d_max 0, so it trained plain "
                "batch norm"
            )
        records.complete(summary)
    return RunResult(cfg, list(trainer.metrics), summary, records.out)


def _summary(trainer: Trainer, request: dict[str, Any], n_params: int, wall: float) -> dict[str, Any]:
    """The completion record: bound to the requested config's hash and to what was built."""
    cfg, info = trainer.cfg, trainer.info
    last = trainer.metrics[-1] if trainer.metrics else {}
    summary: dict[str, Any] = {
        "complete": True,
        "config_hash": config_hash(request),
        "epochs_done": trainer.epoch,
        "epochs": cfg.epochs,
        "steps": trainer.step,
        "diverged": bool(last.get("diverged")),
        "final_test_acc": last.get("test_acc"),
        "final_test_loss": last.get("test_loss"),
        "final_train_loss": last.get("train_loss"),
        "best_epoch": trainer.best.get("epoch"),
        "best_acc": trainer.best.get("acc"),
        "best_on": trainer.best.get("key"),
        "mean_epoch_time": float(np.mean([m["time"] for m in trainer.metrics])) if trainer.metrics else None,
        "wall_time_this_session": wall,
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
    if trainer.built.fingerprint:
        summary["built"] = trainer.built.fingerprint
    if cfg.resolved_norm == "brn":
        b = brn_steps(cfg)
        summary["brn_schedule"] = b
        summary["brn_warmup_only"] = trainer.step <= b["warmup"]
    return summary
