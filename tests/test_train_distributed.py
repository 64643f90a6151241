"""`torchrun --nproc_per_node=2` on CPU (gloo) gives the one-process result for the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normkit.train import run

ARGS = [
    "--data", "digits", "--model", "mlp", "--depth", "2", "--width", "32", "--norm", "brn",
    "--epochs", "2", "--batch-size", "64", "--subset", "512", "--lr", "0.05", "--seed", "3",
]  # fmt: skip


def test_torchrun_two_processes_match_one(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "normkit.cli", "train", *ARGS, "--sync-bn", "--out", str(tmp_path / "ddp"), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("epoch   2/2") == 1  # only rank 0 logs
    assert "2 processes" in proc.stdout
    ddp = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "best.pt", "checkpoint.pt", "config.json", "metrics.jsonl", "summary.json",
    ]  # fmt: skip

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = {
            "data": "digits", "model": "mlp", "depth": 2, "width": 32, "norm": "brn", "epochs": 2,
            "batch_size": 64, "subset": 512, "lr": 0.05, "seed": 3, "sync_bn": True,
        }  # fmt: skip
        single = run(cfg, tmp_path / "single", log=lambda s: None).metrics
    finally:
        torch.set_num_threads(n)
    for a, b in zip(ddp, single):
        assert a["step"] == b["step"]
        # same examples per step, gradients all-reduced, batch statistics synchronized: equal up to rounding
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 360 + 1e-9)


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "normkit.cli",
    ]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("NORMKIT_SLOW"), reason="three more torchrun launches: set NORMKIT_SLOW=1"
)
def test_torchrun_resume_is_bit_exact_with_per_rank_dropout(tmp_path: Path) -> None:
    args = ["train", *ARGS, "--epochs", "3", "--dropout", "0.2", "--sync-bn", "--no-progress"]
    for extra in (
        ["--out", str(tmp_path / "full")],
        ["--out", str(tmp_path / "part"), "--stop-after-epoch", "1"],
    ):
        proc = _torchrun(*args, *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _torchrun("train", "--resume", str(tmp_path / "part"), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def strip(path: Path) -> list[dict]:
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "time" not in k} for r in rows]

    assert strip(tmp_path / "part") == strip(tmp_path / "full")


# --- reported metrics are the saved model's; uneven global batches weigh every example equally ------------


def _train_in_group(rank: int, world: int, cases: list[tuple[dict, str]]) -> list[list[dict]]:
    out = []
    for cfg, path in cases:
        res = run(cfg, path, log=lambda s: None, progress=False)
        out.append([{k: v for k, v in m.items() if "time" not in k} for m in res.metrics])
    return out


def test_ddp_weighs_uneven_batches_exactly_and_reports_the_saved_model(tmp_path: Path) -> None:
    """Two processes (gloo, CPU) train two runs:

    - BN-free, global batch 63 = 32 + 31 per rank: the weighting is the only thing two processes could change,
      so they must equal one process to float32 round-off;
    - with BN and without --sync-bn (ranks' running statistics differ): the reported test metrics must be
      those of the checkpoint rank 0 saved, evaluated by one process on the whole test set.
    """
    from normkit.train.runner import evaluate_checkpoint
    from normkit.train.runner.checkpoint import load_checkpoint
    from tests.distributed import run_gloo

    uneven = {
        "data": "digits", "model": "mlp", "depth": 2, "width": 32, "norm": "none", "epochs": 2,
        "batch_size": 63, "subset": 252, "lr": 0.1, "seed": 5,
    }  # fmt: skip
    bn = {**uneven, "norm": "bn", "epochs": 1, "batch_size": 64, "subset": 256, "seed": 1}
    cases = [(uneven, str(tmp_path / "uneven")), (bn, str(tmp_path / "bn"))]
    (ddp_uneven, ddp_bn), _ = run_gloo(_train_in_group, 2, cases)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run(uneven, tmp_path / "single", log=lambda s: None).metrics
    finally:
        torch.set_num_threads(n)
    for a, b in zip(ddp_uneven, single):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
    p = load_checkpoint(tmp_path / "uneven")["model"]
    q = load_checkpoint(tmp_path / "single")["model"]
    for k in p:
        torch.testing.assert_close(p[k], q[k], rtol=1e-5, atol=1e-6)  # float32 round-off only

    saved = evaluate_checkpoint(tmp_path / "bn", device="cpu")  # one process, the whole test set
    assert saved["test_acc"] == ddp_bn[-1]["test_acc"]
    assert saved["test_loss"] == pytest.approx(ddp_bn[-1]["test_loss"], rel=1e-6)
