"""The `normkit` command end to end: train on digits, test a checkpoint, recipes, argparse-style errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from normkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "normkit.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


SMALL = ["--data", "digits", "--subset", "512", "--model", "mlp", "--width", "32", "--norm", "bn"]


def test_train_then_test_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    proc = _cli("train", "--epochs", "2", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == 2  # one plain line per epoch off a terminal
    assert lines[-1].startswith("done: test acc")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["test_acc"] > 0.9
    config = json.loads((out / "config.json").read_text())
    assert (config["data"], config["model"], config["epochs"]) == ("digits", "cnn", 2)

    capsys.readouterr()
    assert main(["test", "--load", str(out / "checkpoint.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epoch"] == 2 and result["test_acc"] == pytest.approx(metrics[-1]["test_acc"])


def test_in_process_resume_and_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*SMALL, "--epochs", "3", "--no-progress"]
    assert main(["train", *args, "--out", str(tmp_path / "full")]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "part"), "--stop-after-epoch", "1"]) == 0
    assert main(["train", "--resume", str(tmp_path / "part"), "--no-progress"]) == 0
    assert "resumed from epoch 1" in capsys.readouterr().out

    def strip(path: Path) -> list[dict[str, Any]]:
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "time" not in k} for r in rows]

    assert strip(tmp_path / "part") == strip(tmp_path / "full")
    # a config.json starts a new run; flags override it
    assert main(["train", "--config", str(tmp_path / "full" / "config.json"), "--epochs", "1",
                 "--out", str(tmp_path / "again"), "--no-progress"]) == 0  # fmt: skip
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again == {**json.loads((tmp_path / "full" / "config.json").read_text()), "epochs": 1}


def test_recipes_command(capsys: pytest.CaptureFixture[str]) -> None:
    from normkit.train import RECIPES

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES)
    assert "3.85 % test error" in out  # WRN-28-10 SGD-G on CIFAR-10
    assert main(["recipes", "rbn-wrn28-10-cifar10-sgdg"]) == 0
    out = capsys.readouterr().out
    assert "lr_g = 0.2" in out and "seed command: python3 train.py --model=resnet --depth=28" in out
    assert main(["recipes", "--tag", "lsuv", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in listed} == {n for n, r in RECIPES.items() if "lsuv" in r.tags}


Q = "'?"  # Python < 3.12 quotes argparse's choices
ERRORS = {
    "bad choice": (
        ["train", "--optimizer", "lion"],
        rf"invalid choice: 'lion' \(choose from {Q}sgd{Q}, {Q}adam{Q}, {Q}adamw{Q}, "
        rf"{Q}sgdg{Q}, {Q}adamg{Q}, {Q}sgdp{Q}, {Q}adamp{Q}, {Q}lars{Q}, {Q}lamb{Q}\)",
    ),
    "bad dataset": (["train", "--data", "imagenet"], f"choose from {Q}digits{Q}, {Q}mnist1d"),
    "bad norm name": (["train", "--normalize", "l3"], f"choose from {Q}l1{Q}, {Q}l2"),
    "bad number": (["train", "--epochs", "many"], "invalid int value"),
    "incompatible": (
        ["train", "--optimizer", "sgdg", "--enorm", "1.2"],
        "--enorm cannot be combined with sgdg",
    ),
    "clip needs clipnorm": (["train", "--clip", "l2"], "needs --clipnorm"),
    "missing data": (
        ["train", "--data", "cifar10", "--data-dir", "{tmp}"],
        r"missing data_batch_1.*--download",
    ),
    "missing mnist": (["train", "--data", "mnist", "--data-dir", "{tmp}"], r"train-images-idx3.*--download"),
    "unknown recipe": (["train", "--recipe", "nope"], "unknown recipe 'nope'; choose from rbn-"),
    "unknown recipe listing": (["recipes", "nope"], "unknown recipe"),
    "no checkpoint": (["test", "--load", "{tmp}/none.pt"], "no checkpoint at"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_are_argparse_style(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args, message = ERRORS[name]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    monkeypatch.chdir(tmp_path)  # a refused run must not create runs/
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: normkit" in err
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "train" in out and "test" in out and "recipes" in out


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NORMKIT_SLOW"), reason="timed default run: set NORMKIT_SLOW=1")
def test_default_train_reaches_97_percent_in_under_a_minute(tmp_path: Path) -> None:
    start = time.perf_counter()
    proc = _cli("train", cwd=tmp_path)  # no arguments at all: small CNN on digits
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_test_acc"] >= 0.97
    assert elapsed < 60, f"default run took {elapsed:.0f}s"
