"""``run(config)``: one training run, top-down, one step per file.

1. the configuration — :mod:`~normkit.train.runner.config` (as asked, or the checkpoint's when resuming);
2. the run directory — :mod:`~normkit.train.runner.rundir` (finished already? a checkpoint to continue?
   other results to protect?);
3. the process — :mod:`~normkit.train.runner.process` (``torchrun``'s process group, the global seeds);
4. the data — :mod:`~normkit.train.runner.data`;
5. everything that trains — :mod:`~normkit.train.runner.build` (model checked against the task, init,
   optimizer, schedule, ENorm);
6. the loop — :mod:`~normkit.train.runner.loop`, which hands each epoch to the run's records
   (:mod:`~normkit.train.runner.records`).

The config goes down these files once and never comes back to one it left.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from normkit.train.runner.build import build_run
from normkit.train.runner.checkpoint import load_checkpoint
from normkit.train.runner.config import TrainConfig, resolve_config, resumed_config
from normkit.train.runner.data import TensorData, load_dataset
from normkit.train.runner.loop import Trainer, train
from normkit.train.runner.process import DistInfo, seed_everything, setup_distributed
from normkit.train.runner.rundir import RunResult, claim
from normkit.train.runner.sharding import load_unsharded_model

__all__ = ["evaluate_checkpoint", "run"]

Log = Callable[[str], None]


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
    # 1. the configuration
    state: dict[str, Any] | None = None
    if resume:
        if resume is True and out_dir is None:
            raise ValueError("resume=True needs out_dir")
        path = Path(out_dir) / "checkpoint.pt" if resume is True and out_dir else Path(str(resume))
        state = load_checkpoint(path)
        state["source_dir"] = str(path if path.is_dir() else path.parent)  # where its sharded part is
        out_dir = out_dir if out_dir is not None else (path if path.is_dir() else path.parent)
        cfg, request = resumed_config(state, config)
    else:
        cfg = resolve_config(config)
        request = cfg.to_dict()
    # 2. the run directory
    out = (Path(out_dir) if out_dir is not None else _default_out_dir(cfg)) if save else None
    where = claim(out, cfg, request, state=state, reuse=reuse, overwrite=overwrite, log=log)
    if where.finished is not None:
        return where.finished
    # 3. the process
    info = setup_distributed(cfg)
    threads = torch.get_num_threads()
    try:
        seed_everything(cfg.seed)
        quiet: Log = log if info.is_main else (lambda s: None)
        # 4. the data (loaded before anything is written: a missing file leaves no run directory)
        if data is None:
            data = _load_data(cfg, info)
        # 5. everything that trains
        built = build_run(cfg, data, info, quiet)
        # 6. the loop, writing the run's records
        return train(built, request, where, log=log, progress=progress, stop_after_epoch=stop_after_epoch)
    finally:
        torch.set_num_threads(threads)  # the run's thread setting does not leak into the caller
        if info.initialized_here:
            dist.destroy_process_group()


def _load_data(cfg: TrainConfig, info: DistInfo) -> TensorData:
    wait = cfg.download and info.enabled
    if wait and not info.is_main:
        dist.barrier()  # rank 0 downloads first
    data = load_dataset(
        cfg.data,
        cfg.data_dir,
        download=cfg.download and info.is_main,
        val_size=cfg.val_size,
        mnist1d_samples=cfg.mnist1d_samples,
        svhn_extra=cfg.svhn_extra,
        subset=cfg.subset,
    )
    if wait and info.is_main:
        dist.barrier()
    return data


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


def evaluate_checkpoint(
    path: str | Path, *, data_dir: str | None = None, device: str = "auto", split: str = "test"
) -> dict[str, Any]:
    """Evaluate a checkpoint file (or run directory) on its dataset's test (or val) split."""
    state = load_checkpoint(path)
    overrides: dict[str, Any] = {"device": device}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    cfg = resolve_config({**state["config"], **overrides, "init": "default", "enorm": 0.0, "fsdp": False})
    info = DistInfo()
    seed_everything(cfg.seed)
    trainer = Trainer(build_run(cfg, _load_data(cfg, info), info, lambda s: None), log=lambda s: None)
    if "sharded" in state:  # written by --fsdp: read the shards into this one-process model
        base = Path(path) if Path(path).is_dir() else Path(path).parent
        load_unsharded_model(trainer.model, base / state["sharded"])
    else:
        trainer.model.load_state_dict(state["model"])
    if split == "val" and trainer.data.x_val is None:
        raise ValueError("this run has no validation split (val_size = 0)")
    loss, acc = trainer.evaluate(split)
    return {"checkpoint": str(path), "epoch": int(state["epoch"]), f"{split}_loss": loss, f"{split}_acc": acc}
