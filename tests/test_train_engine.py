"""The training engine: bit-exact resume, reproducibility, atomic checkpoints, techniques, early refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from normkit.train import ConfigError, TensorData, resolve_config, run
from normkit.train.runner import evaluate_checkpoint
from normkit.train.runner.checkpoint import load_checkpoint, save_checkpoint
from normkit.train.runner.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


TIMES = ("time", "train_time")


def _strip(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in TIMES} for m in metrics]


@pytest.fixture(scope="module")
def digits() -> TensorData:
    return load_dataset("digits", subset=512)  # 8 steps of 64 per epoch: fast on two loaded cores


def _small(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "data": "digits",
        "model": "mlp",
        "depth": 2,
        "width": 32,
        "norm": "bn",
        "epochs": 3,
        "batch_size": 64,
    }
    base.update(kw)
    return base


def _quiet(_: str) -> None:
    pass


RESUME_CASES = {
    "sgd-bn-dropout": {"dropout": 0.3, "schedule": "multistep", "milestones": [1, 2], "gamma": 0.5},
    "brn-adamw-cnn": {
        "model": "cnn",
        "width": 4,
        "norm": "brn",
        "optimizer": "adamw",
        "brn_warmup_steps": 5,
        "brn_r_max_steps": 20,
    },
    "sgdg": {"optimizer": "sgdg", "omega": 0.1, "grad_clip": 0.1},
    "enorm-normalized": {
        "depth": 3,
        "norm": "none",
        "dropout": 0.1,
        "enorm": 1.2,
        "normalize": "l2",
        "schedule": "linear",
    },
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_exact(tmp_path: Path, digits: TensorData, case: str) -> None:
    cfg = _small(**RESUME_CASES[case])
    full = run(cfg, tmp_path / "full", data=digits, log=_quiet)
    part = run(cfg, tmp_path / "part", data=digits, log=_quiet, stop_after_epoch=1)
    assert len(part.metrics) == 1 and not (tmp_path / "part" / "summary.json").exists()
    resumed = run(None, tmp_path / "part", resume=True, data=digits, log=_quiet)
    assert _strip(resumed.metrics) == _strip(full.metrics)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert _strip([json.loads(x) for x in lines]) == _strip(full.metrics)


def test_same_seed_same_metrics_other_seed_differs(tmp_path: Path, digits: TensorData) -> None:
    cfg = _small(epochs=2, dropout=0.2)
    a = run(cfg, tmp_path / "a", data=digits, log=_quiet)
    b = run(cfg, tmp_path / "b", data=digits, log=_quiet)
    c = run({**cfg, "seed": 1}, tmp_path / "c", data=digits, log=_quiet)
    assert _strip(a.metrics) == _strip(b.metrics)
    assert _strip(a.metrics) != _strip(c.metrics)


def test_output_directory(tmp_path: Path, digits: TensorData) -> None:
    res = run(_small(epochs=2), tmp_path, data=digits, log=_quiet)
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoint.pt",
        "best.pt",
    }
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == res.config.to_dict() and config["epochs"] == 2
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "time", "step"}
    assert len(metrics) == 2 and all(keys <= set(m) for m in metrics)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["final_test_acc"] == metrics[-1]["test_acc"]
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == summary["best_epoch"]
    # checkpoints are plain data: torch.load(weights_only=True) reads them
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(raw) >= {"model", "optimizer", "scheduler", "rng", "epoch", "step", "config"}
    ev = evaluate_checkpoint(tmp_path / "checkpoint.pt")
    assert ev["test_acc"] == pytest.approx(metrics[-1]["test_acc"])


def test_reuse_returns_finished_runs(tmp_path: Path, digits: TensorData) -> None:
    cfg = _small(epochs=1)
    first = run(cfg, tmp_path, data=digits, log=_quiet)
    lines: list[str] = []
    again = run(cfg, tmp_path, data=digits, log=lines.append, reuse=True)
    assert lines == [] and _strip(again.metrics) == _strip(first.metrics)
    more = run({**cfg, "epochs": 2}, tmp_path / "x", data=digits, log=_quiet, stop_after_epoch=1)
    assert len(more.metrics) == 1
    cont = run({**cfg, "epochs": 2}, tmp_path / "x", data=digits, log=_quiet, reuse=True)
    assert len(cont.metrics) == 2 and cont.metrics[0] == more.metrics[0]


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self) -> Any:
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3), "bad": Boom()}, path)
    state = load_checkpoint(path)  # the previous checkpoint is intact, no temp file is left behind
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_checkpoints_are_data_not_code(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> Any:
            return (print, ("pwned",))

    torch.save({"format": 1, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match=r"\(print\).*weights only"):
        load_checkpoint(tmp_path / "evil.pt")


TECHNIQUES = {
    "sgdg": {"optimizer": "sgdg"},
    "adamg": {"optimizer": "adamg", "grad_clip": 0.1, "omega": 0.1},
    "lsuv-cnn": {"init": "lsuv", "model": "cnn", "width": 4, "norm": "none"},
    "orthogonal": {"init": "orthogonal"},
    "enorm-sgd": {"enorm": 1.0, "norm": "none"},
    "enorm-adam": {"enorm": 1.1, "optimizer": "adam", "norm": "none"},
    "normalized-layer": {"normalize": "max", "granularity": "layer"},
    "clipped-global": {"clip": "l2", "clipnorm": 0.5, "granularity": "global", "optimizer": "adam"},
    "brn-ghost": {"norm": "brn", "brn_virtual_batch_size": 16},
    "bf16-channels-last": {"amp": "bf16", "channels_last": True, "model": "cnn", "width": 4},
    "fp16-scaler": {"amp": "fp16"},
    "val-split-label-smoothing": {"val_size": 200, "label_smoothing": 0.1, "warmup_epochs": 0.5},
}


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_every_technique_trains_a_few_steps(name: str, digits: TensorData) -> None:
    cfg = _small(epochs=1, max_steps=3, **TECHNIQUES[name])
    data = digits
    if cfg.get("val_size"):
        data = load_dataset("digits", val_size=cfg["val_size"], subset=512)
    res = run(cfg, data=data, log=_quiet, save=False)
    (m,) = res.metrics
    assert m["step"] == 3 and all(v == v for v in m.values() if isinstance(v, float))  # no NaN
    if cfg.get("val_size"):
        assert "val_acc" in m and res.summary["best_on"] == "val_acc"


def test_a_real_run_learns(digits: TensorData) -> None:
    res = run(_small(epochs=4, width=64), data=digits, log=_quiet, save=False)
    assert res.metrics[-1]["test_acc"] > 0.9


REFUSED = {
    "enorm with sgdg": ({"optimizer": "sgdg", "enorm": 1.2}, "enorm cannot be combined with sgdg"),
    "normalize and clip": ({"normalize": "l2", "clip": "l2", "clipnorm": 1.0}, "not both"),
    "clip without clipnorm": ({"clip": "l2"}, "needs --clipnorm"),
    "clipnorm without clip": ({"clipnorm": 1.0}, "only with --clip"),
    "grassmann without bn": ({"optimizer": "adamg", "norm": "none"}, "use --norm bn"),
    "lr_g with sgd": ({"lr_g": 0.1}, "only to the Grassmann"),
    "grad_clip with adam": ({"optimizer": "adam", "grad_clip": 0.1}, "--clip l2 --clipnorm"),
    "brn flags without brn": ({"brn_r_max": 2.0}, "need --norm brn"),
    "milestones without multistep": ({"milestones": [2]}, "only to schedule multistep"),
    "multistep without milestones": ({"schedule": "multistep"}, "needs --milestones"),
    "1d model on images": ({"model": "cnn1d"}, "models for digits: .*cnn"),
    "bn model without bn is fine but sync_bn needs no ghost batches": (
        {"norm": "brn", "brn_virtual_batch_size": 8, "sync_bn": True},
        "cannot be combined with --sync-bn",
    ),
    "nesterov without momentum": ({"momentum": 0.0}, "nesterov needs momentum"),
    "bad choice": ({"optimizer": "lion"}, r"choose from sgd, adam, adamw, sgdg, adamg"),
    "unknown key": ({"lernrate": 0.1}, "unknown config keys"),
    "bad wrn depth": ({"model": "wrn", "depth": 20}, "6n"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_incompatible_combinations_are_refused_before_training(name: str, tmp_path: Path) -> None:
    overrides, message = REFUSED[name]
    with pytest.raises(ConfigError, match=message):
        run(_small(**overrides), tmp_path, log=_quiet)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_resume_refuses_changed_settings(tmp_path: Path, digits: TensorData) -> None:
    run(_small(epochs=1), tmp_path, data=digits, log=_quiet)
    with pytest.raises(ValueError, match="cannot change"):
        run({"lr": 1.0}, tmp_path, resume=True, data=digits, log=_quiet)
    res = run({"epochs": 2}, tmp_path, resume=True, data=digits, log=_quiet)  # more epochs is fine
    assert [m["epoch"] for m in res.metrics] == [1, 2]


def test_recipe_key_starts_from_the_recipe() -> None:
    cfg = resolve_config({"recipe": "lsuv-mnist", "epochs": 1})
    assert cfg.init == "lsuv" and cfg.model == "mnist-convnet" and cfg.epochs == 1 and cfg.lr == 0.1


def test_no_weight_decay_on_biases_and_normalization_unless_asked() -> None:
    from normkit.train.runner import build_optimizer
    from normkit.train.runner.models import build_model

    model = build_model("mlp", (1, 8, 8), 10, depth=2, width=8, norm="bn")
    matrices = {id(p) for p in model.parameters() if p.ndim > 1}
    opt, inner = build_optimizer(model, resolve_config(_small(weight_decay=1e-3)))
    assert opt is inner
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["weight_decay"] == (1e-3 if id(p) in matrices else 0.0)
    opt, _ = build_optimizer(model, resolve_config(_small(weight_decay=1e-3, decay_norm_and_bias=True)))
    assert all(g["weight_decay"] == 1e-3 for g in opt.param_groups)
    opt, inner = build_optimizer(model, resolve_config(_small(optimizer="sgdg")))
    grassmann = [g for g in opt.param_groups if g["grassmann"]]
    assert grassmann and all(g["weight_decay"] == 0 for g in grassmann)
    opt, inner = build_optimizer(model, resolve_config(_small(normalize="l2")))
    assert opt is not inner and opt.param_groups is inner.param_groups


def test_learning_rate_schedules() -> None:
    from normkit.train.runner import lr_factor

    f = lr_factor(resolve_config(_small(epochs=10, schedule="multistep", milestones=[3, 6], gamma=0.2)), 5)
    assert [f(s) for s in (0, 14, 15, 29, 30)] == pytest.approx([1, 1, 0.2, 0.2, 0.04])
    f = lr_factor(resolve_config(_small(epochs=2, schedule="cosine")), 5)
    assert [f(0), f(5), f(10)] == pytest.approx([1, 0.5, 0])
    f = lr_factor(resolve_config(_small(epochs=2, schedule="linear", warmup_epochs=1)), 5)
    assert [f(0), f(4), f(5)] == pytest.approx([0.2, 0.6, 0.5])


def test_mnist1d_with_cnn1d() -> None:
    cfg = {
        "data": "mnist1d",
        "mnist1d_samples": 600,
        "model": "cnn1d",
        "width": 16,
        "epochs": 2,
        "batch_size": 32,
    }
    res = run(cfg, save=False, log=_quiet)
    assert res.summary["steps"] == 2 * (480 // 32) and res.config.model == "cnn1d"
    assert res.metrics[-1]["train_loss"] < res.metrics[0]["train_loss"]


def test_brn_schedule_is_scaled_to_the_run_and_warmup_only_runs_say_so(
    tmp_path: Path, digits: TensorData
) -> None:
    from normkit.train.runner.config import scaled_brn_steps

    lines: list[str] = []
    res = run(_small(norm="brn", epochs=2), tmp_path / "scaled", data=digits, log=lines.append)
    steps = 2 * (512 // 64)
    assert scaled_brn_steps(steps) == {"brn_warmup_steps": 1, "brn_d_max_steps": 5, "brn_r_max_steps": 8}
    written = json.loads((tmp_path / "scaled" / "config.json").read_text())
    assert {k: written[k] for k in scaled_brn_steps(steps)} == scaled_brn_steps(steps)
    assert any("brn schedule (scaled to the run)" in line and "for 1 steps" in line for line in lines)
    assert res.summary["brn_warmup_only"] is False
    model_layer = load_checkpoint(tmp_path / "scaled" / "checkpoint.pt")["model"]
    assert any(k.endswith("num_batches_tracked") for k in model_layer)
    # the paper's own step counts in a 16-step run never leave the warm-up: the log and summary say so
    lines.clear()
    res = run(
        _small(norm="brn", epochs=2, brn_schedule="paper"), tmp_path / "paper", data=digits, log=lines.append
    )
    assert res.summary["brn_warmup_only"] is True and res.summary["brn_schedule"]["warmup"] == 5000
    assert any("ended inside BRN's warm-up" in line and "plain batch norm" in line for line in lines)
    # explicit steps always win over the scaling
    res = run(_small(norm="brn", epochs=1, brn_warmup_steps=3), tmp_path / "x", data=digits, log=_quiet)
    assert res.config.brn_warmup_steps == 3 and res.config.brn_r_max_steps == 4


def test_scaled_brn_steps_proportions() -> None:
    from normkit.train.runner.config import scaled_brn_steps

    # the paper's 5 000 / 25 000 / 40 000 keep their ratios 1 : 5 : 8, with r_max reached at half the run
    assert scaled_brn_steps(80_000) == {
        "brn_warmup_steps": 5000,
        "brn_d_max_steps": 25000,
        "brn_r_max_steps": 40000,
    }
    assert scaled_brn_steps(660) == {"brn_warmup_steps": 41, "brn_d_max_steps": 206, "brn_r_max_steps": 330}
