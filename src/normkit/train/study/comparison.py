"""`normkit compare`: the same model and budget under several methods and seeds, then a report.

A *method* is a named bundle of harness options (``TrainConfig`` overrides). A *suite* is a base configuration
(data, model, epochs ...) plus a list of arms — a method, maybe with regime overrides (e.g. a batch size) —
each compared with a baseline arm. Runs live in ``OUT/runs/<arm>/seed<k>/``; finished runs are reused and
interrupted ones resumed from their checkpoint, so an interrupted compare continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from normkit.train.rl.suite import CROSSQ_SUITE
from normkit.train.runner import (
    ConfigError,
    DirectoryLock,
    RunDirError,
    TrainConfig,
    check_writable,
    config_diff,
    config_hash,
    existing_run,
    finished_run,
    is_import_path,
    resolve_config,
    run,
)
from normkit.train.study.executor import Executor, StudyInterrupted, WorkerDied, local_executor
from normkit.train.study.report import write_report
from normkit.train.study.suite import Arm, CompareResult, Job, Method, Suite, SuiteKind

__all__ = [
    "METHODS",
    "SUITES",
    "SUPERVISED",
    "Arm",
    "CompareResult",
    "Job",
    "Method",
    "StudyInterrupted",
    "Suite",
    "WorkerDied",
    "compare",
    "load_method_file",
    "plan",
]


def _m(name: str, description: str, **overrides: Any) -> tuple[str, Method]:
    return name, Method(name, description, overrides)


METHODS: dict[str, Method] = dict(
    [
        _m("bn-sgd", "BatchNorm, SGD with Nesterov momentum", norm="bn", optimizer="sgd"),
        _m(
            "brn-sgd",
            "Batch Renormalization (paper schedule scaled to the run), SGD",
            norm="brn",
            optimizer="sgd",
        ),
        _m("plain-default", "no normalization, PyTorch's default init", norm="none", init="default"),
        _m("plain-orthogonal", "no normalization, orthonormal init", norm="none", init="orthogonal"),
        _m("lsuv-plain", "no normalization, LSUV init", norm="none", init="lsuv"),
        _m("enorm-off", "SGD without ENorm", enorm=0.0),
        _m("enorm-1.0", "ENorm with c = 1 after every SGD step", enorm=1.0),
        _m("enorm-1.2", "ENorm with c = 1.2 after every SGD step", enorm=1.2),
        _m(
            "enorm-ignore-1.0",
            "ENorm c = 1 balancing across BatchNorm as the authors do (changes the function)",
            enorm=1.0,
            enorm_norm_layers="ignore",
        ),
        _m(
            "enorm-ignore-1.1",
            "ENorm c = 1.1 balancing across BatchNorm as the authors do (changes the function)",
            enorm=1.1,
            enorm_norm_layers="ignore",
        ),
        _m(
            "enorm-ignore-1.2",
            "ENorm c = 1.2 balancing across BatchNorm as the authors do (changes the function)",
            enorm=1.2,
            enorm_norm_layers="ignore",
        ),
        _m(
            "enorm-affine-1.0",
            "ENorm c = 1, each BN unit's scale carried by its γ, β (function kept)",
            enorm=1.0,
            enorm_norm_layers="affine",
        ),
        _m(
            "enorm-affine-1.1",
            "ENorm c = 1.1, each BN unit's scale carried by its γ, β (function kept)",
            enorm=1.1,
            enorm_norm_layers="affine",
        ),
        _m(
            "enorm-affine-1.2",
            "ENorm c = 1.2, each BN unit's scale carried by its γ, β (function kept)",
            enorm=1.2,
            enorm_norm_layers="affine",
        ),
        _m("sgd", "SGD with Nesterov momentum", optimizer="sgd"),
        _m("adam", "Adam", optimizer="adam"),
        _m("sgdg", "SGD-G on the Grassmann manifold for BN-input weights", optimizer="sgdg", grad_clip=0.1),
        _m(
            "adamg", "Adam-G on the Grassmann manifold for BN-input weights", optimizer="adamg", grad_clip=0.1
        ),
        _m("nsgd-l2", "SGD on l2-normalized gradients (per tensor)", optimizer="sgd", normalize="l2"),
        _m("nsgd-max", "SGD on max-normalized gradients (per tensor)", optimizer="sgd", normalize="max"),
        _m("nadam-l2", "Adam on l2-normalized gradients (per tensor)", optimizer="adam", normalize="l2"),
        _m("nadam-max", "Adam on max-normalized gradients (per tensor)", optimizer="adam", normalize="max"),
        _m("adamw", "AdamW (decoupled weight decay)", optimizer="adamw"),
        _m("sgdp", "SGDP: SGD with the radial step removed (the paper's cosine test)", optimizer="sgdp"),
        _m("sgdp-graph", "SGDP on the graph's scale-invariant weights", optimizer="sgdp", projection="graph"),
        _m("adamp", "AdamP: Adam with the radial step removed (the paper's cosine test)", optimizer="adamp"),
        _m(
            "adamp-graph",
            "AdamP on the graph's scale-invariant weights",
            optimizer="adamp",
            projection="graph",
        ),
        _m("lars", "LARS: SGD with a layer-wise trust ratio", optimizer="lars"),
        _m(
            "larc",
            "LARS in LARC's clipping mode (trust coefficient 0.02)",
            optimizer="lars",
            trust_clip=True,
            trust_coefficient=0.02,
        ),
        _m("lamb", "LAMB: Adam with a layer-wise trust ratio", optimizer="lamb"),
    ]
)


def _arm(method: str, baseline: str | None = None, label: str | None = None, **overrides: Any) -> Arm:
    return Arm(label or method, method, overrides, baseline)


# The BRN schedule scaled to short runs: r_max, d_max grow after a tenth of the paper's warm-up.
_SHORT_BRN: dict[str, Any] = {
    "brn_warmup_steps": 100,
    "brn_r_max_steps": 600,
    "brn_d_max_steps": 400,
    "brn_momentum": 0.01,
}

SUITES: dict[str, Suite] = {
    "default": Suite(
        "default",
        "A short tour of the five techniques against their baselines on digits.",
        {
            "data": "digits",
            "model": "mlp",
            "depth": 4,
            "width": 64,
            "norm": "bn",
            "epochs": 15,
            "batch_size": 64,
        },
        (
            _arm("bn-sgd"),
            _arm("sgdg", "bn-sgd"),
            _arm("nsgd-l2", "bn-sgd", lr=0.02),
            _arm("bn-sgd", label="bn-noniid", batch_size=32, batch_classes=2),
            _arm("brn-sgd", "bn-noniid", label="brn-noniid", batch_size=32, batch_classes=2, **_SHORT_BRN),
            _arm("plain-default", depth=10),
            _arm("lsuv-plain", "plain-default", depth=10),
            _arm("enorm-off", label="plain-sgd", norm="none"),
            _arm("enorm-1.0", "plain-sgd", label="plain-enorm-1.0", norm="none"),
        ),
        seeds=5,  # 5 seeds: the sign test can call an effect (false-positive rate at most 6.25 %)
    ),
    "brn": Suite(
        "brn",
        "BN vs BRN at ordinary batches, at microbatches of 4 (ghost batches) and with non-iid batches.",
        {"data": "digits", "model": "mlp", "depth": 3, "width": 128, "epochs": 30, "batch_size": 128},
        (
            _arm("bn-sgd", label="bn-b128"),
            _arm("brn-sgd", "bn-b128", label="brn-b128", **_SHORT_BRN),
            _arm(
                "brn-sgd",
                label="bn-micro4",
                batch_size=32,
                brn_virtual_batch_size=4,
                brn_r_max=1.0,
                brn_d_max=0.0,
            ),
            _arm(
                "brn-sgd",
                "bn-micro4",
                label="brn-micro4",
                batch_size=32,
                brn_virtual_batch_size=4,
                **_SHORT_BRN,
            ),
            _arm("bn-sgd", label="bn-noniid", batch_size=32, batch_classes=2),
            _arm("brn-sgd", "bn-noniid", label="brn-noniid", batch_size=32, batch_classes=2, **_SHORT_BRN),
        ),
        claim="Ioffe 2017: BRN matches BN on iid batches and beats it on microbatches of 4 (BN 74.2 % vs BRN "
        "76.5 %, ImageNet) and on non-iid batches (67.0 % vs 78.5 %).",
    ),
    "lsuv": Suite(
        "lsuv",
        "Deep plain network without normalization (20 x 64 MLP) on the real MNIST test set split "
        "8 000 / 2 000: default init vs orthogonal vs LSUV.",
        {
            "data": "mnist-t10k",
            "model": "mlp",
            "depth": 20,
            "width": 64,
            "norm": "none",
            "epochs": 8,
            "batch_size": 64,
            "lr": 0.01,
        },
        (
            _arm("plain-default"),
            _arm("plain-orthogonal", "plain-default"),
            _arm("lsuv-plain", "plain-default"),
        ),
        claim="Mishkin & Matas 2016: LSUV lets very deep plain nets train where standard inits stall "
        "(their MNIST table: LSUV 99.5 %).",
    ),
    "enorm": Suite(
        "enorm",
        "The authors' FC net (15 bias-free Linear layers in all, width 128 instead of 500) on MNIST-1D, as "
        "published (BatchNorm1d after every hidden layer, ENorm across it as the authors do, or carried by "
        "BN's γ, β) and BN-free; the paper's optimizer (plain SGD, lr 0.1 linearly to 0, weight decay 1e-3 "
        "on every parameter, batch 256, 60 epochs), ENorm one cycle after every step.",
        {
            "data": "mnist1d",
            "model": "enorm-fc",
            "depth": 15,
            "width": 128,
            "epochs": 60,
            "batch_size": 256,
            "lr": 0.1,
            "momentum": 0.0,
            "nesterov": False,
            "schedule": "linear",
            "weight_decay": 1e-3,
            "decay_norm_and_bias": True,
        },
        (
            _arm("enorm-off", label="bn-sgd", norm="bn"),
            # the authors' arithmetic (their _step_fc: running statistics untouched, last layer left alone)
            _arm("enorm-ignore-1.0", "bn-sgd", label="bn-ignore-1.0", norm="bn", enorm_variant="authors"),
            _arm("enorm-ignore-1.2", "bn-sgd", label="bn-ignore-1.2", norm="bn", enorm_variant="authors"),
            _arm("enorm-affine-1.0", "bn-sgd", label="bn-affine-1.0", norm="bn"),
            _arm("enorm-affine-1.2", "bn-sgd", label="bn-affine-1.2", norm="bn"),
            _arm("enorm-off", label="nobn-sgd", norm="none"),
            _arm("enorm-1.0", "nobn-sgd", label="nobn-enorm-1.0", norm="none"),
            _arm("enorm-1.2", "nobn-sgd", label="nobn-enorm-1.2", norm="none"),
        ),
        seeds=5,
        claim="Stock et al. 2019: ENorm (c = 1.2) improves the 15-layer FC net on CIFAR-10 over plain SGD.",
    ),
    "enorm-conv": Suite(
        "enorm-conv",
        "The authors' 9-conv bias-free net with BN after conv3 and conv6, narrowed to 16 / 32 / 40 channels "
        "(theirs: 128 / 256 / 320), on digits (8x8, 1 437 / 360); the paper's optimizer (SGD, momentum 0.9, "
        "lr 0.05 linearly to 0, weight decay 1e-3 on every parameter), 30 epochs instead of 128 and batch 32 "
        "instead of 256 (1 437 images: 45 steps per epoch).",
        {
            "data": "digits",
            "model": "enorm-conv",
            "width": 16,
            "norm": "bn",
            "epochs": 30,
            "batch_size": 32,
            "lr": 0.05,
            "momentum": 0.9,
            "nesterov": False,
            "schedule": "linear",
            "weight_decay": 1e-3,
            "decay_norm_and_bias": True,
        },
        (
            _arm("enorm-off", label="conv-sgd"),
            _arm("enorm-ignore-1.1", "conv-sgd", label="conv-ignore-1.1"),
            _arm("enorm-affine-1.1", "conv-sgd", label="conv-affine-1.1"),
        ),
        seeds=5,
        claim="Stock et al. 2019: ENorm (c = 1.1) improves the fully convolutional net on CIFAR-10 over SGD.",
    ),
    "grassmann": Suite(
        "grassmann",
        "BN CNN on digits: SGD vs SGD-G vs Adam-G with the paper's rates (lr_e 0.01, lr_g 0.2 / 0.05, "
        "ν 0.1, ω 0.1; SGD baseline lr 0.1), step decay ×0.2 at 30/60/80 % of the epochs.",
        {
            "data": "digits",
            "model": "cnn",
            "epochs": 15,
            "batch_size": 128,
            "schedule": "multistep",
            "milestones": [5, 9, 12],
            "gamma": 0.2,
        },
        (
            _arm("sgd", lr=0.1),
            _arm("sgdg", "sgd", lr=0.01, lr_g=0.2, omega=0.1),
            _arm("adamg", "sgd", lr=0.01, lr_g=0.05, omega=0.1),
        ),
        claim="Cho & Lee 2017: SGD-G / Adam-G beat SGD on VGG / WRN (e.g. WRN-28-10 CIFAR-10 error: SGD-G "
        "3.85 %, Adam-G 3.78 % vs SGD 3.89 %).",
    ),
    "normalized": Suite(
        "normalized",
        "30 x 128 MLP with BN and dropout 0.2 (the original deep MLP) on MNIST-1D: SGD (lr 0.01, Nesterov) / "
        "Adam (lr 1e-3) vs normalized SGD / Adam, constant learning rates as in the original code.",
        {
            "data": "mnist1d",
            "model": "mlp",
            "depth": 30,
            "width": 128,
            "dropout": 0.2,
            "norm": "bn",
            "epochs": 40,
            "batch_size": 128,
            "schedule": "constant",
        },
        (
            _arm("sgd", lr=0.01),
            _arm("nsgd-l2", "sgd", lr=0.01),
            _arm("nsgd-max", "sgd", lr=0.01),
            _arm("adam"),
            _arm("nadam-l2", "adam"),
            _arm("nadam-max", "adam"),
        ),
        claim="Yu et al. 2017: block-normalized gradients speed up training of deep networks.",
    ),
    "crossq": CROSSQ_SUITE,
    "adamp": Suite(
        "adamp",
        "BN CNN on digits, batch 128, 12 epochs, cosine schedule: SGD (lr 0.1, wd 5e-4) vs SGDP, AdamW "
        "(lr 1e-3, wd 1e-2) vs AdamP, each with the paper's cosine test and with the graph's groups.",
        {"data": "digits", "model": "cnn", "epochs": 12, "batch_size": 128},
        (
            _arm("sgd", lr=0.1),
            _arm("sgdp", "sgd", lr=0.1),
            _arm("sgdp-graph", "sgd", lr=0.1),
            _arm("adamw", weight_decay=1e-2),
            _arm("adamp", "adamw", weight_decay=1e-2),
            _arm("adamp-graph", "adamw", weight_decay=1e-2),
        ),
        seeds=5,
        claim="Heo et al. 2021: SGDP / AdamP match or beat SGD / AdamW (ImageNet ResNets and other tasks) "
        "by avoiding the decay of the effective step of scale-invariant weights.",
    ),
    "large-batch": Suite(
        "large-batch",
        "MLP (3 x 256, BN) on MNIST-1D (20 000 samples), 20 epochs, cosine schedule: batch 128 vs batch "
        "2 048 with the learning rate scaled linearly (×16) and 3 warm-up epochs, SGD vs LARS / LARC and "
        "Adam vs LAMB at batch 2 048.",
        {
            "data": "mnist1d",
            "mnist1d_samples": 20000,
            "model": "mlp",
            "depth": 3,
            "width": 256,
            "norm": "bn",
            "epochs": 20,
        },
        (
            _arm("sgd", label="sgd-b128", batch_size=128, lr=0.05),
            _arm("sgd", "sgd-b128", label="sgd-b2048", batch_size=2048, lr=0.8, warmup_epochs=3),
            _arm("lars", "sgd-b2048", label="lars-b2048", batch_size=2048, lr=8.0, warmup_epochs=3),
            _arm("larc", "sgd-b2048", label="larc-b2048", batch_size=2048, lr=0.8, warmup_epochs=3),
            _arm("adam", label="adam-b128", batch_size=128, lr=1e-3),
            _arm("adam", "adam-b128", label="adam-b2048", batch_size=2048, lr=1.6e-2, warmup_epochs=3),
            _arm("lamb", "adam-b2048", label="lamb-b2048", batch_size=2048, lr=1.6e-2, warmup_epochs=3),
        ),
        seeds=5,
        claim="You et al. 2017 / 2020: with the learning rate scaled to the batch, the layer-wise trust "
        "ratio keeps the accuracy of small batches where plain SGD / Adam lose it (ImageNet AlexNet-BN / "
        "ResNet-50 with LARS, BERT with LAMB).",
    ),
}


# --- user method files -------------------------------------------------------------------------------------


def load_method_file(path: str | Path) -> dict[str, Method]:
    """Methods from a JSON or TOML file: ``{"name": {"description": "...", "overrides": {...}}}`` or
    ``{"name": {config keys ...}}``. Every key is checked against the harness configuration."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"method file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                raise ConfigError(f"{path}: TOML method files need Python 3.11+; use JSON") from None
            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}"
        ) from exc
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f'{path}: expected a table of methods, e.g. {{"my-sgd": {{"optimizer": "sgd"}}}}')
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    methods = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            raise ConfigError(
                f"{path}: method {name!r} must be a table of options, got {type(spec).__name__}"
            )
        overrides = spec.get("overrides", {k: v for k, v in spec.items() if k != "description"})
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: method {name!r}: 'overrides' must be a table")
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(
                f"{path}: method {name!r} has unknown options {unknown}; valid: {', '.join(sorted(valid))}"
            )
        try:
            resolve_config(overrides)
        except ConfigError as exc:
            raise ConfigError(f"{path}: method {name!r}: {exc}") from exc
        methods[name] = Method(name, str(spec.get("description", "user method")), overrides, str(path))
    return methods


# --- planning ---------------------------------------------------------------------------------------------

# Options that shape the suite's own model: they do not carry over to a model of yours (--model pkg.mod:f),
# whose factory gets only what you set.
MODEL_SHAPE = ("depth", "width", "widen_factor", "dropout")


def _without_model_shape(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in MODEL_SHAPE}


def plan(
    suite: Suite | None = None,
    *,
    methods: Sequence[str] | None = None,
    extra_methods: dict[str, Method] | None = None,
    overrides: dict[str, Any] | None = None,
    seeds: int | None = None,
    out: str | Path = "runs/compare",
) -> tuple[Suite, list[Job]]:
    """The suite actually run (``methods`` replaces its arms; the first method is the baseline) and its jobs.

    Every configuration is validated here, before anything trains.
    """
    if suite is None:
        suite = SUITES["default"]
    return kind_of(suite).plan(
        suite, methods=methods, extra_methods=extra_methods, overrides=overrides, seeds=seeds, out=out
    )


def _plan_supervised(
    suite: Suite,
    *,
    methods: Sequence[str] | None,
    extra_methods: dict[str, Method] | None,
    overrides: dict[str, Any] | None,
    seeds: int | None,
    out: str | Path,
) -> tuple[Suite, list[Job]]:
    known = {**METHODS, **(extra_methods or {})}
    if methods:
        missing = [m for m in methods if m not in known]
        if missing:
            raise ConfigError(f"unknown method(s) {missing}; choose from {', '.join(known)} (see --list)")
        arms = tuple(Arm(m, m, {}, None if i == 0 else methods[0]) for i, m in enumerate(methods))
        suite = dataclasses.replace(
            suite,
            name="custom" if suite.name == "default" else suite.name,
            arms=arms,
            description="",
            claim="",
        )
    if any(v != suite.base.get(k) for k, v in (overrides or {}).items() if k in ("data", "model")):
        suite = dataclasses.replace(suite, description="")  # the suite's blurb names its own data and model
    for arm in suite.arms:
        if arm.method not in known:
            raise ConfigError(f"suite {suite.name}: unknown method {arm.method!r}")
    n_seeds = seeds if seeds is not None else suite.seeds
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n_seeds}")
    base = dict(suite.base)
    user_model = is_import_path((overrides or {}).get("model"))
    if user_model:
        base = _without_model_shape(base)
    jobs = []
    for arm in suite.arms:
        arm_options = _without_model_shape(arm.overrides) if user_model else arm.overrides
        method_options = known[arm.method].overrides
        # A method naming a recipe (a paper's setting) starts from that recipe, not from the suite's base.
        arm_base = {} if "recipe" in method_options or "recipe" in arm_options else base
        for seed in range(n_seeds):
            config = {
                **arm_base,
                **method_options,
                **arm_options,
                **(overrides or {}),
                "seed": seed,
            }
            try:
                resolved = resolve_config(config)
            except ConfigError as exc:
                raise ConfigError(f"arm {arm.label!r} ({arm.method}): {exc}") from exc
            jobs.append(
                Job(
                    arm.label,
                    arm.method,
                    seed,
                    resolved.to_dict(),
                    Path(out) / "runs" / arm.label / f"seed{seed}",
                )
            )
    return suite, jobs


# --- running ----------------------------------------------------------------------------------------------


def _run_job(job: Job, threads: int, overwrite: bool = False) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    existing = existing_run(job.out_dir)
    continuing = existing is not None and config_hash(job.config) in (existing.hash, existing.checkpoint_hash)
    with open(job.out_dir / "log.txt", "a" if continuing else "w") as log_file:

        def log(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()

        result = run(job.config, job.out_dir, reuse=True, overwrite=overwrite, log=log, progress=False)
    return _record(job, result.config.to_dict(), result.metrics, result.summary)


def _call_run_job(job: Job, threads: int, overwrite: bool = False) -> dict[str, Any]:
    return _run_job(job, threads, overwrite)  # looked up at call time: tests replace _run_job


def _record(
    job: Job, config: dict[str, Any], metrics: list[dict[str, Any]], summary: dict[str, Any]
) -> dict[str, Any]:
    return {
        "arm": job.arm,
        "method": job.method,
        "seed": job.seed,
        "config": config,
        "metrics": metrics,
        "summary": summary,
    }


def _conflicts(job_list: Sequence[Job]) -> list[tuple[Job, str]]:
    """Jobs whose directory holds results of another configuration (finished or checkpointed)."""
    found = []
    for job in job_list:
        existing = existing_run(job.out_dir)
        if existing is None or not existing.has_results:
            continue
        h = config_hash(job.config)
        if existing.hash == h or (not existing.finished and existing.checkpoint_hash == h):
            continue
        found.append((job, config_diff(existing.old_config(), job.config)))
    return found


class _Supervised:
    """The kind of the supervised suites: each job is one ``normkit train`` run through the run layer."""

    kind = "train"

    def plan(self, suite: Suite, **options: Any) -> tuple[Suite, list[Job]]:
        return _plan_supervised(suite, **options)

    def check(self, suite: Suite) -> None:
        return None

    def finished(self, job: Job) -> dict[str, Any] | None:
        done = finished_run(job.out_dir, TrainConfig.from_dict(job.config))
        return None if done is None else _record(job, done.config.to_dict(), done.metrics, done.summary)

    def conflicts(self, jobs: Sequence[Job]) -> list[tuple[Job, str]]:
        return _conflicts(jobs)

    def job_function(self, overwrite: bool) -> Callable[[Job, int], dict[str, Any]]:
        return functools.partial(_call_run_job, overwrite=overwrite)

    def describe(self, record: dict[str, Any]) -> str:
        return _result_text(record)

    def report(self, result: CompareResult, *, html: bool, machine: dict[str, Any]) -> Path:
        return write_report(result, html=html)


SUPERVISED: SuiteKind = _Supervised()


def kind_of(suite: Suite) -> SuiteKind:
    return suite.runner if suite.runner is not None else SUPERVISED


def _Lock(out: Path) -> DirectoryLock:
    """The lock of a compare output directory (``OUT/.lock``)."""
    return DirectoryLock(out, "compare")


def compare(
    suite: Suite | str | None = None,
    out: str | Path = "runs/compare",
    *,
    methods: Sequence[str] | None = None,
    method_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    seeds: int | None = None,
    jobs: int = 1,
    html: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> CompareResult:
    """Run (or reuse) every arm × seed, then write ``report.md``, ``results.csv`` and PNG plots in ``out``.

    Finished runs of the same configuration are reused and interrupted ones resumed. A run directory holding
    results of *other* settings is refused (one line naming the difference) unless ``overwrite``. One
    ``compare`` at a time per ``out`` (a lock). ``progress``: one tqdm bar over all runs (default: on a
    terminal); otherwise one line per finished run. ``executor``: where the runs execute (default: this
    machine, ``jobs`` at a time; see :mod:`~normkit.train.study.executor`). Ctrl-C stops every run at a safe
    point and raises :class:`StudyInterrupted`; the same call again continues.
    """
    if isinstance(suite, str):
        if suite not in SUITES:
            raise ConfigError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
        suite = SUITES[suite]
    if suite is None:
        suite = SUITES["default"]
    kind = kind_of(suite)
    extra = load_method_file(method_file) if method_file is not None else None
    suite, job_list = kind.plan(
        suite, methods=methods, extra_methods=extra, overrides=overrides, seeds=seeds, out=out
    )
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    kind.check(suite)
    out = Path(out)
    check_writable(out)
    conflicts = kind.conflicts(
        job_list
    )  # checked before and again under the lock: nothing touched if refused
    if conflicts and not overwrite:
        raise RunDirError(_conflict_message(out, conflicts, len(job_list)))
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        conflicts = kind.conflicts(job_list)
        if conflicts and not overwrite:
            raise RunDirError(_conflict_message(out, conflicts, len(job_list)))
        runner = executor or local_executor(jobs)
        return _compare_locked(kind, suite, job_list, out, extra, runner, html, overwrite, progress, log)


def _conflict_message(out: Path, conflicts: list[tuple[Job, str]], total: int) -> str:
    job, diff = conflicts[0]
    return (
        f"{out} holds {len(conflicts)} of these {total} runs with other settings (e.g. {job.arm} seed "
        f"{job.seed}: {diff}); pass --overwrite to rerun them, or choose another --out"
    )


def _compare_locked(
    kind: SuiteKind,
    suite: Suite,
    job_list: list[Job],
    out: Path,
    extra: dict[str, Method] | None,
    executor: Executor,
    html: bool,
    overwrite: bool,
    progress: bool | None,
    log: Callable[[str], None],
) -> CompareResult:
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for job in job_list:
        record = kind.finished(job)
        if record is not None:
            done[(job.arm, job.seed)] = record
    reused = len(done)
    todo = [j for j in job_list if (j.arm, j.seed) not in done]
    log(
        f"normkit compare: suite {suite.name}, {len(suite.arms)} arms x {len(job_list) // len(suite.arms)} "
        f"seeds = {len(job_list)} runs ({reused} already finished) -> {out}"
    )
    threads = max(1, (os.cpu_count() or 1) // executor.workers)
    start, load_before = time.perf_counter(), _load()
    show = sys.stderr.isatty() if progress is None else progress
    bar = _bar(len(job_list), reused, show)

    def finished(record: dict[str, Any]) -> None:
        done[(record["arm"], record["seed"])] = record
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(kind.describe(record), refresh=False)
        else:
            elapsed = time.perf_counter() - start
            log(f"[{len(done)}/{len(job_list)}] {kind.describe(record)} ({elapsed:.0f}s)")

    try:
        executor.run(kind.job_function(overwrite), todo, threads, finished)
    except StudyInterrupted:
        raise StudyInterrupted(
            f"interrupted: {len(done)} of {len(job_list)} runs finished (kept), an interrupted run resumes "
            "from its last epoch; run the same command again to continue"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    results = [done[(j.arm, j.seed)] for j in job_list]
    known = {**METHODS, **(extra or {})}
    used = {arm.method: known[arm.method] for arm in suite.arms if arm.method in known}
    result = CompareResult(suite, results, out, reused, methods=used)
    machine = {
        "wall_time": time.perf_counter() - start,
        "load": (load_before, _load()),
        "workers": executor.workers,
    }
    result.report = kind.report(result, html=html, machine=machine)
    log(f"wrote {result.report}")
    return result


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _bar(total: int, reused: int, show: bool) -> Any:
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the harness extras
        return None
    # one bar over all runs; the ETA counts only runs trained in this call (reused ones finish at once)
    return tqdm(total=total, desc="compare", unit="run", dynamic_ncols=True, smoothing=0.0)


def _result_text(run: dict[str, Any]) -> str:
    acc = run["summary"].get("final_test_acc")
    acc_text = f"{100 * acc:.2f}%" if acc is not None else "n/a"
    flag = " DIVERGED" if run["summary"].get("diverged") else ""
    return f"{run['arm']} seed {run['seed']}: test acc {acc_text}{flag}"


def describe_methods(extra: dict[str, Method] | None = None) -> str:
    """The method and suite listing printed by ``normkit compare --list``."""
    buf = io.StringIO()
    buf.write("methods:\n")
    for m in {**METHODS, **(extra or {})}.values():
        opts = " ".join(f"{k}={v}" for k, v in m.overrides.items())
        buf.write(f"  {m.name:<18} {m.description}  [{opts}]\n")
    buf.write("\nsuites:\n")
    for s in SUITES.values():
        arms = ", ".join(a.label for a in s.arms)
        buf.write(f"  {s.name:<12} {s.description}\n  {'':<12} arms: {arms}\n")
    return buf.getvalue()
