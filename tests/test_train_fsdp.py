"""``normkit train --fsdp`` under ``torchrun --nproc_per_node=2`` on CPU (gloo): the model sharded with FSDP2,
checkpointed with Distributed Checkpoint: equal to DDP, read by ``normkit test``, resumed bit-exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from normkit.train import evaluate_checkpoint, run
from normkit.train.runner.config import ConfigError

ARGS = [
    "--data",
    "digits",
    "--model",
    "mlp",
    "--depth",
    "2",
    "--width",
    "33",
    "--norm",
    "brn",
    "--sync-bn",
    "--dropout",
    "0.2",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--subset",
    "512",
    "--lr",
    "0.05",
    "--seed",
    "3",
    "--no-progress",
]  # fmt: skip  (width 33: shards of 17 and 16 rows, uneven)


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "normkit.cli",
    ]
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _torchrun("train", *ARGS, "--fsdp", "--out", str(out))
    return out


def test_fsdp_equals_ddp_and_normkit_test_reads_the_sharded_checkpoint(
    fsdp_run: Path, tmp_path: Path
) -> None:
    _torchrun("train", *ARGS, "--out", str(tmp_path / "ddp"))
    fsdp, ddp = _metrics(fsdp_run), _metrics(tmp_path / "ddp")
    assert [m["step"] for m in fsdp] == [m["step"] for m in ddp]
    for a, b in zip(fsdp, ddp):
        # same examples per step, same dropout streams; FSDP reduce-scatters what DDP all-reduces
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 360 + 1e-9)
    summary = json.loads((fsdp_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["fsdp"] is True
    # one sharded checkpoint left: the one checkpoint.pt and best.pt name (epoch 2 is both)
    assert sorted(p.name for p in (fsdp_run / "sharded").iterdir()) == ["epoch-2"]
    # the reported figure is the saved model's, read back in one process
    tested = evaluate_checkpoint(fsdp_run)
    assert tested["test_acc"] == summary["final_test_acc"]
    assert tested["test_loss"] == pytest.approx(summary["final_test_loss"], rel=1e-6)


def test_an_interrupted_fsdp_run_resumes_bit_exactly(fsdp_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "part"
    _torchrun("train", *ARGS, "--fsdp", "--out", str(out), "--stop-after-epoch", "1")
    assert sorted(p.name for p in (out / "sharded").iterdir()) == ["epoch-1"]
    assert not (out / "summary.json").exists()
    proc = _torchrun("train", "--resume", str(out), "--no-progress")
    assert "resumed from epoch 1" in proc.stdout
    drop = ("time", "train_time")
    full = [{k: v for k, v in m.items() if k not in drop} for m in _metrics(fsdp_run)]
    resumed = [{k: v for k, v in m.items() if k not in drop} for m in _metrics(out)]
    assert resumed == full


def test_fsdp_in_one_process_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    cfg = {"data": "digits", "model": "mlp", "depth": 1, "width": 8, "epochs": 1, "subset": 64, "fsdp": True}
    with pytest.raises(ConfigError, match="torchrun"):
        run(cfg, tmp_path / "one", log=lambda s: None)
    assert not (tmp_path / "one").exists()
