"""`normkit compare`: the same model and budget under several methods and seeds, then a report.

A *method* is a named bundle of harness options (``TrainConfig`` overrides). A *suite* is a base configuration
(data, model, epochs ...) plus a list of arms — a method, maybe with regime overrides (e.g. a batch size) —
each compared with a baseline arm. Runs live in ``OUT/runs/<arm>/seed<k>/``; finished runs are reused and
interrupted ones resumed from their checkpoint, so an interrupted compare continues where it stopped.
"""

from __future__ import annotations

import concurrent.futures as futures
import csv
import dataclasses
import io
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normkit.train.checkpoint import atomic_write_text
from normkit.train.config import ConfigError, TrainConfig, resolve_config
from normkit.train.engine import finished_run, run

__all__ = [
    "METHODS",
    "SUITES",
    "Arm",
    "CompareResult",
    "Method",
    "Suite",
    "compare",
    "load_method_file",
    "plan",
]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    overrides: dict[str, Any]


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


@dataclass(frozen=True)
class Arm:
    """One line of a comparison: a method under a regime, compared with ``baseline`` (an arm label)."""

    label: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    base: dict[str, Any]
    arms: tuple[Arm, ...]
    seeds: int = 3
    claim: str = ""


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
        seeds=3,
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
        "Deep FC net without BN (15 linear layers, width 128) on MNIST-1D: ENorm c = 1 and c = 1.2 vs off; "
        "the paper's settings (plain SGD, lr 0.1 linearly to 0, weight decay 1e-3, batch 256, 60 epochs).",
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
        },
        (_arm("enorm-off"), _arm("enorm-1.0", "enorm-off"), _arm("enorm-1.2", "enorm-off")),
        claim="Stock et al. 2019: ENorm (c = 1.2) improves the 15-layer FC net on CIFAR-10 over plain SGD.",
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
        "30 x 128 MLP with BN and dropout 0.2 (the seed's deep MLP) on MNIST-1D: SGD (lr 0.01, Nesterov) / "
        "Adam (lr 1e-3) vs normalized SGD / Adam, constant learning rates as in the seed.",
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
        methods[name] = Method(name, str(spec.get("description", "user method")), overrides)
    return methods


# --- planning ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    arm: str
    seed: int
    config: dict[str, Any]
    out_dir: Path


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
    known = {**METHODS, **(extra_methods or {})}
    if suite is None:
        suite = SUITES["default"]
    if methods:
        missing = [m for m in methods if m not in known]
        if missing:
            raise ConfigError(f"unknown method(s) {missing}; choose from {', '.join(known)} (see --list)")
        arms = tuple(Arm(m, m, {}, None if i == 0 else methods[0]) for i, m in enumerate(methods))
        suite = dataclasses.replace(
            suite, name="custom" if suite.name == "default" else suite.name, arms=arms
        )
    for arm in suite.arms:
        if arm.method not in known:
            raise ConfigError(f"suite {suite.name}: unknown method {arm.method!r}")
    n_seeds = seeds if seeds is not None else suite.seeds
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n_seeds}")
    jobs = []
    for arm in suite.arms:
        for seed in range(n_seeds):
            config = {
                **suite.base,
                **known[arm.method].overrides,
                **arm.overrides,
                **(overrides or {}),
                "seed": seed,
            }
            try:
                resolved = resolve_config(config)
            except ConfigError as exc:
                raise ConfigError(f"arm {arm.label!r} ({arm.method}): {exc}") from exc
            jobs.append(
                Job(arm.label, seed, resolved.to_dict(), Path(out) / "runs" / arm.label / f"seed{seed}")
            )
    return suite, jobs


# --- running ----------------------------------------------------------------------------------------------


def _run_job(job: Job, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    log_path = job.out_dir / "log.txt"
    job.out_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log_file:

        def log(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()

        result = run(job.config, job.out_dir, reuse=True, log=log, progress=False)
    return {"arm": job.arm, "seed": job.seed, "metrics": result.metrics, "summary": result.summary}


@dataclass
class CompareResult:
    suite: Suite
    runs: list[dict[str, Any]]  # one per job: arm, seed, metrics, summary
    out_dir: Path
    reused: int  # jobs that were already finished
    report: Path | None = None


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
    log: Callable[[str], None] = print,
) -> CompareResult:
    """Run (or reuse) every arm × seed, then write ``report.md``, ``results.csv`` and PNG plots in ``out``."""
    if isinstance(suite, str):
        if suite not in SUITES:
            raise ConfigError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
        suite = SUITES[suite]
    extra = load_method_file(method_file) if method_file is not None else None
    suite, job_list = plan(
        suite, methods=methods, extra_methods=extra, overrides=overrides, seeds=seeds, out=out
    )
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reused = sum(finished_run(j.out_dir, TrainConfig.from_dict(j.config)) is not None for j in job_list)
    log(
        f"normkit compare: suite {suite.name}, {len(suite.arms)} arms x {len(job_list) // len(suite.arms)} "
        f"seeds = {len(job_list)} runs ({reused} already finished) -> {out}"
    )
    threads = max(1, (os.cpu_count() or 1) // jobs)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    if jobs == 1:
        for i, job in enumerate(job_list):
            results.append(_run_job(job, threads))
            log(_progress_line(i + 1, len(job_list), results[-1], start))
    else:
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            pending = {pool.submit(_run_job, job, threads): job for job in job_list}
            for i, fut in enumerate(futures.as_completed(pending)):
                results.append(fut.result())
                log(_progress_line(i + 1, len(job_list), results[-1], start))
    order = {(j.arm, j.seed): i for i, j in enumerate(job_list)}
    results.sort(key=lambda r: order[(r["arm"], r["seed"])])
    result = CompareResult(suite, results, out, reused)
    from normkit.train.report import write_report

    result.report = write_report(result, html=html)
    log(f"wrote {result.report}")
    return result


def _progress_line(done: int, total: int, run: dict[str, Any], start: float) -> str:
    acc = run["summary"].get("final_test_acc")
    acc_text = f"{100 * acc:.2f}%" if acc is not None else "n/a"
    elapsed = time.perf_counter() - start
    return f"[{done}/{total}] {run['arm']} seed {run['seed']}: test acc {acc_text} ({elapsed:.0f}s)"


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


def summarize(result: CompareResult) -> list[dict[str, Any]]:
    """One row per arm: median and range over seeds of the final test accuracy and loss, time per epoch,
    difference to the baseline arm."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in result.runs:
        by_arm.setdefault(r["arm"], []).append(r)
    rows: list[dict[str, Any]] = []
    for arm in result.suite.arms:
        runs = by_arm.get(arm.label, [])
        accs = [100 * r["metrics"][-1]["test_acc"] for r in runs if r["metrics"]]
        losses = [r["metrics"][-1]["test_loss"] for r in runs if r["metrics"]]
        times = [m["time"] for r in runs for m in r["metrics"]]
        rows.append(
            {
                "arm": arm.label,
                "method": arm.method,
                "baseline": arm.baseline or "",
                "seeds": len(accs),
                "acc_median": statistics.median(accs) if accs else float("nan"),
                "acc_min": min(accs) if accs else float("nan"),
                "acc_max": max(accs) if accs else float("nan"),
                "loss_median": statistics.median(losses) if losses else float("nan"),
                "epoch_time": statistics.median(times) if times else float("nan"),
            }
        )
    medians = {row["arm"]: row["acc_median"] for row in rows}
    for row in rows:
        row["delta"] = row["acc_median"] - medians[row["baseline"]] if row["baseline"] else None
    return rows


def write_csv(result: CompareResult, path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            "arm",
            "method",
            "seed",
            "epochs",
            "final_test_acc",
            "final_test_loss",
            "final_train_loss",
            "mean_epoch_time_s",
        ]
    )
    arms = {a.label: a for a in result.suite.arms}
    for r in result.runs:
        last = r["metrics"][-1] if r["metrics"] else {}
        times = [m["time"] for m in r["metrics"]]
        writer.writerow(
            [
                r["arm"],
                arms[r["arm"]].method,
                r["seed"],
                len(r["metrics"]),
                last.get("test_acc"),
                last.get("test_loss"),
                last.get("train_loss"),
                statistics.fmean(times) if times else "",
            ]
        )
    atomic_write_text(path, buf.getvalue())
