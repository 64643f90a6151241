"""Step 3 of a run: from a resolved config and its data, build everything that trains.

The process (distributed or not, device, threads, seeds), the model (checked against the task before any
training), its initialization (orthogonal, LSUV), the optimizer (Euclidean, Grassmann, projected, trust-ratio,
normalized or clipped), the learning-rate schedule and ENorm. :func:`build` returns them as a :class:`Built`;
nothing here trains or writes a file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from normkit.train.runner.config import ConfigError, TrainConfig, scaled_brn_steps
from normkit.train.runner.data import TensorData
from normkit.train.runner.factories import (
    factory_source_hash,
    is_import_path,
    parameter_shapes_hash,
    user_model_call,
)
from normkit.train.runner.models import build_model
from normkit.train.runner.process import DistInfo, device_for

__all__ = [
    "Built",
    "ModelOutputError",
    "brn_steps",
    "build_optimizer",
    "build_run",
    "finalize_config",
    "lr_factor",
]

Log = Callable[[str], None]


class ModelOutputError(ConfigError):
    """The model's output does not fit the task (e.g. 5 logits for 10 classes), found before training."""


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


# ------------------------------------------------------------------------------------- data-dependent config


def finalize_config(cfg: TrainConfig, steps_per_epoch: int) -> TrainConfig:
    """The config with its data-dependent defaults filled in (what ``config.json`` records).

    BRN: unless ``brn_schedule="paper"``, the schedule's step counts not given explicitly are the paper's
    scaled to this run's length (:func:`~normkit.train.runner.config.scaled_brn_steps`).
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


# ------------------------------------------------------------------------------------------------ model


def model_options(cfg: TrainConfig) -> dict[str, Any]:
    return {"depth": cfg.depth, "width": cfg.width, "widen_factor": cfg.widen_factor, "dropout": cfg.dropout}


def check_output(model: nn.Module, cfg: TrainConfig, data: TensorData) -> None:
    """Refuse a model whose output does not fit the task — one line naming the shape — before training.

    A classifier for ``num_classes`` classes maps a batch of N inputs to N × num_classes logits. Checked on
    two training examples in eval mode (the model's state, running statistics included, is left as it was).
    """
    example = data.prepare(data.x_train[:2])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:
        raise ModelOutputError(
            f"model {cfg.model!r} cannot take {cfg.data} inputs of shape {tuple(data.input_shape)} "
            f"(a batch of {len(example)} failed: {type(exc).__name__}: {exc}); does it use in_shape?"
        ) from exc
    finally:
        model.train(was_training)
    want = (len(example), data.num_classes)
    if not isinstance(out, Tensor):
        raise ModelOutputError(
            f"model {cfg.model!r} returns a {type(out).__name__}; a classifier must return one tensor of "
            f"logits of shape (N, num_classes) = (N, {data.num_classes})"
        )
    if tuple(out.shape) != want:
        raise ModelOutputError(
            f"model {cfg.model!r} returns output of shape {tuple(out.shape)} for a batch of {want[0]} "
            f"{cfg.data} inputs; a classifier for its {data.num_classes} classes must return "
            f"(N, {data.num_classes}) logits"
        )


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


def build_fingerprint(cfg: TrainConfig, model: nn.Module | None, data: TensorData | None) -> dict[str, Any]:
    """What was built from a config beyond the config itself: bound into the completion record.

    For your own model / dataset factories the config names only an import path, so the record also holds a
    hash of each factory's module file, the keyword arguments the model factory got and the hash of the
    built model's parameter shapes; a run whose factory changed is then not taken for finished.
    """
    out: dict[str, Any] = {}
    if is_import_path(cfg.model):
        out["model_source"] = factory_source_hash(cfg.model)
        if data is not None:
            call = user_model_call(cfg.model, data.input_shape, data.num_classes, model_options(cfg))
            out["model_call"] = {k: list(v) if isinstance(v, tuple) else v for k, v in call.items()}
        if model is not None:
            out["parameter_shapes"] = parameter_shapes_hash(model)
    if is_import_path(cfg.data):
        out["data_source"] = factory_source_hash(cfg.data)
    return out


# -------------------------------------------------------------------------------------------- optimizer


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


# ------------------------------------------------------------------------------------------------ build


@dataclass
class Built:
    """Everything a run trains with, built from a resolved config and its data."""

    cfg: TrainConfig  # finalized: the data-dependent defaults filled in (what config.json records)
    info: DistInfo
    device: torch.device
    data: TensorData  # on the device
    steps_per_epoch: int
    drop_last: bool
    model: nn.Module  # the model as saved
    train_model: nn.Module  # what the loop calls: the model, maybe DDP-wrapped and compiled
    optimizer: torch.optim.Optimizer  # the optimizer to step
    inner_optimizer: torch.optim.Optimizer  # the one whose state ENorm transforms
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the data order and augmentation stream
    threads: int
    enorm: Any = None
    fingerprint: dict[str, Any] = field(default_factory=dict)


def build_run(cfg: TrainConfig, data: TensorData, info: DistInfo, log: Log) -> Built:
    """Device, model (checked against the task), init, optimizer, schedule and ENorm, in that order.

    The global RNGs are seeded before the data are loaded (:func:`seed_everything`), as they always were.
    """
    device = device_for(cfg, info)
    data = data.to(device)
    n_train = len(data.y_train)
    drop_last = n_train >= cfg.batch_size
    steps_per_epoch = n_train // cfg.batch_size if drop_last else 1
    cfg = finalize_config(cfg, steps_per_epoch)
    model = build_model(
        cfg.model,
        data.input_shape,
        data.num_classes,
        norm=cfg.resolved_norm,
        brn_options=cfg.brn_options(),
        **model_options(cfg),
    ).to(device)
    check_output(model, cfg, data)
    fingerprint = build_fingerprint(cfg, model, data)
    if "model_call" in fingerprint:
        call = ", ".join(f"{k}={v}" for k, v in fingerprint["model_call"].items())
        log(f"model {cfg.model} called with {call}")
    threads = _set_threads(cfg, model, device)
    _init_model(model, cfg, data, info, log)
    if info.enabled and cfg.sync_bn:
        from normkit.nn import convert_batchnorm

        if device.type == "cpu" and cfg.resolved_norm == "bn":
            raise ValueError(
                "--sync-bn with --norm bn needs CUDA: torch's SyncBatchNorm runs on GPUs only; "
                "on CPU use --norm brn (SyncBatchRenorm works with gloo) or drop --sync-bn"
            )
        model = convert_batchnorm(model, to="sync")
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.fsdp:
        if not info.enabled:
            raise ConfigError(
                "--fsdp shards the model over the processes torchrun starts: run "
                "`torchrun --nproc_per_node N -m normkit.cli train ... --fsdp`, or drop --fsdp in one process"
            )
        from normkit.train.runner.sharding import shard_model

        shard_model(model)  # before the optimizer, which must hold the sharded parameters
    example = data.prepare(data.x_train[:2])
    optimizer, inner = build_optimizer(model, cfg, example)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    enorm: Any = None
    if cfg.enorm > 0:
        from normkit.enorm import ENorm

        options: dict[str, Any] = {"bias": cfg.enorm_bias}
        if cfg.enorm_variant == "authors":
            options = dict(ENorm.AUTHORS_FC)  # their _step_fc arithmetic (biases left alone too)
        enorm = ENorm(
            model,
            inner,
            c=cfg.enorm,
            every=cfg.enorm_every,
            example_input=example,
            norm_layers=cfg.enorm_norm_layers,
            **options,
        )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    # dropout masks: every rank its own stream (rank 0's equals a single process's)
    torch.manual_seed(cfg.seed + 2 + 1000 * info.rank)
    train_model: nn.Module = model
    if info.enabled and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    return Built(
        cfg, info, device, data, steps_per_epoch, drop_last, model, train_model, optimizer, inner,
        scheduler, scaler, generator, threads, enorm, fingerprint,
    )  # fmt: skip
