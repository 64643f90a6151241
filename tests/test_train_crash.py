"""Real SIGKILLs at chosen points of `normkit train`, refusals to replace finished work, clean failures.

A crash point is armed with ``NORMKIT_CRASH_AT=<point>:<epoch>`` (see ``checkpoint.crash_point``): the process
kills itself with SIGKILL there, as a power cut or the OOM killer would.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from normkit.cli import main
from normkit.train import run
from normkit.train.runner import finished_run

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--data", "digits", "--subset", "256", "--model", "mlp", "--depth", "2", "--width", "16",
        "--norm", "bn", "--batch-size", "64", "--no-progress"]  # fmt: skip
CFG = {
    "data": "digits",
    "subset": 256,
    "model": "mlp",
    "depth": 2,
    "width": 16,
    "norm": "bn",
    "batch_size": 64,
}


def _cli(*args: str, crash: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("NORMKIT_CRASH_AT", None)
    if crash:
        env["NORMKIT_CRASH_AT"] = crash
    return subprocess.run(
        [sys.executable, "-m", "normkit.cli", "train", *args],
        capture_output=True, text=True, env=env, timeout=300, preexec_fn=lambda: os.umask(0o022),
    )  # fmt: skip


def _metrics(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ref") / "run"
    run({**CFG, "epochs": 3}, out, log=lambda s: None)
    return _metrics(out)


@pytest.mark.parametrize(
    "point",
    [
        "before-replace-checkpoint:2",
        "after-checkpoint:2",
        pytest.param(  # both files written: the common case, and the plainest
            "after-metrics:2",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(not os.environ.get("NORMKIT_SLOW"), reason="set NORMKIT_SLOW=1"),
            ],
        ),
    ],
)
def test_kill_then_resume_never_duplicates_or_skips_an_epoch(
    tmp_path: Path, point: str, reference: list[dict[str, Any]]
) -> None:
    out = tmp_path / "run"
    proc = _cli(*ARGS, "--epochs", "3", "--out", str(out), crash=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt_epoch = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    lines = _metrics(out)
    # the metrics file is never ahead of the checkpoint, and holds exactly its first epochs
    assert [m["epoch"] for m in lines] == list(range(1, len(lines) + 1)) and len(lines) <= ckpt_epoch
    assert not (out / "summary.json").exists()  # killed: not finished
    assert finished_run(out, __import__("normkit.train", fromlist=["resolve_config"]).resolve_config(
        {**CFG, "epochs": 3})) is None  # fmt: skip
    if point.startswith("before-replace"):
        assert list(out.glob(".*.tmp")), "the kill left a temporary file behind"
    old_umask = os.umask(0o022)
    try:  # the resume itself need not be another process
        run(None, out, resume=True, log=lambda s: None)
    finally:
        os.umask(old_umask)
    assert _metrics(out) == reference  # every epoch exactly once, same numbers as an uninterrupted run
    assert not list(out.glob(".*.tmp"))  # temporary files cleaned
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f  # the umask decides, not mkstemp's 0600


def test_finished_work_is_never_replaced_silently(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    same = _fails(capsys, ["train", *ARGS, "--epochs", "1", "--out", str(out)])
    other = _fails(capsys, ["train", *ARGS, "--epochs", "2", "--out", str(out)])
    for err in (same, other):
        assert "usage" not in err and "--overwrite" in err and "another --out" in err
    assert "same configuration" in same and "epochs 1 -> 2" in other
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched

    # A new configuration killed right after its first checkpoint: neither config counts as finished.
    proc = _cli(*ARGS, "--epochs", "2", "--out", str(out), "--overwrite", crash="after-checkpoint:1")
    assert proc.returncode == -signal.SIGKILL
    from normkit.train import resolve_config

    assert finished_run(out, resolve_config({**CFG, "epochs": 1})) is None  # the old record is gone
    assert finished_run(out, resolve_config({**CFG, "epochs": 2})) is None  # the new run is not done
    lines: list[str] = []
    res = run({**CFG, "epochs": 2}, out, reuse=True, log=lines.append)  # what compare does: resume it
    assert "resumed from epoch 1 (step 4)" in lines and [m["epoch"] for m in res.metrics] == [1, 2]
    assert finished_run(out, resolve_config({**CFG, "epochs": 2})) is not None


def test_completion_record_binds_config_and_code(tmp_path: Path) -> None:
    from normkit.train.runner.config import config_hash

    res = run({**CFG, "epochs": 1}, tmp_path, log=lambda s: None)
    record = json.loads((tmp_path / "summary.json").read_text())
    assert record["complete"] and record["config_hash"] == config_hash(res.config)
    assert record["code"]["normkit"] and record["code"]["torch"] == torch.__version__
    assert record["train_size"] == 256 and record["test_size"] == 360
    # an old-style summary (no completion record) beside a matching config is not a finished run
    record.pop("complete")
    (tmp_path / "summary.json").write_text(json.dumps(record))
    assert finished_run(tmp_path, res.config) is None


# --- clean failures ------------------------------------------------------------------------------------


def _fails(capsys: pytest.CaptureFixture[str], args: list[str], code: int = 1) -> str:
    status = main(args) if code == 1 else None
    if code != 1:
        with pytest.raises(SystemExit) as exc:
            main(args)
        status = exc.value.code
    err = capsys.readouterr().err
    assert status == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == (1 if code == 1 else 2), err  # one line (argument errors: + the one-line usage)
    return err


def test_bad_checkpoints_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run({**CFG, "epochs": 1}, tmp_path / "good", log=lambda s: None)
    raw = (tmp_path / "good" / "checkpoint.pt").read_bytes()
    files = {
        "empty.pt": (b"", "is empty"),
        "truncated.pt": (raw[: len(raw) // 2], "truncated or corrupt"),
        "corrupt.pt": (bytes(range(256)) * 40, "truncated or corrupt"),
        "notes.pt": (b'{"epoch": 3}', "truncated or corrupt"),
    }
    for name, (content, message) in files.items():
        (tmp_path / name).write_bytes(content)
        for cmd in (["test", "--load"], ["train", "--resume"]):
            err = _fails(capsys, [*cmd, str(tmp_path / name)])
            assert message in err and name in err, err
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "not a normkit checkpoint" in _fails(capsys, ["test", "--load", str(tmp_path / "list.pt")])


def test_out_must_be_a_writable_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert "is a file" in _fails(capsys, ["train", *ARGS, "--out", str(tmp_path / "file")])
    assert "not writable" in _fails(capsys, ["train", *ARGS, "--out", "/sys/normkit-run"])


def test_disk_full_while_checkpointing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--epochs", "2", "--out", str(out), "--stop-after-epoch", "1"]) == 0
    capsys.readouterr()

    def full(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    real_save = torch.save
    monkeypatch.setattr(torch, "save", full)
    err = _fails(capsys, ["train", "--resume", str(out)])
    assert "disk is full" in err and "checkpoint.pt" in err and "previous file is intact" in err
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the last good checkpoint
    assert not list(out.glob(".*.tmp"))


def test_ctrl_c_says_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from normkit.train.runner import Trainer

    real = Trainer.run_epoch

    def interrupted(self: Trainer, progress: Any = None) -> dict[str, Any]:
        if self.epoch == 1:
            raise KeyboardInterrupt
        return real(self, progress)

    monkeypatch.setattr(Trainer, "run_epoch", interrupted)
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--epochs", "3", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"normkit train --resume {out}" in err and "epoch 1" in err and "Traceback" not in err


VALIDATION = {
    "subset 0": (["--subset", "0"], "subset must be at least 1"),
    "momentum nan": (["--momentum", "nan"], "momentum must be a finite number"),
    "momentum 1.5": (["--momentum", "1.5"], r"momentum must be in \[0, 1\)"),
    "lr inf": (["--lr", "inf"], "lr must be a finite number"),
    "subset 1 with bn": (["--subset", "1"], "batch normalization needs at least 2"),
    "channels-last enorm": (
        ["--channels-last", "--enorm", "1.0", "--norm", "none"],
        "--channels-last cannot",
    ),
}


@pytest.mark.parametrize("name", list(VALIDATION))
def test_validated_before_any_work(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flags, message = VALIDATION[name]
    monkeypatch.chdir(tmp_path)
    args = [a for a in ARGS if a not in ("--subset", "256")] + flags
    err = _fails(capsys, ["train", *args], code=2)
    assert err.startswith("usage: normkit train [options]")
    import re

    assert re.search(message, err), err
    assert not any(tmp_path.iterdir())  # no half-made run directory


def test_failed_download_and_interrupted_compare_are_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    import normkit.train.runner.data as data
    import normkit.train.study.comparison as compare_module

    def unreachable(*a: Any, **k: Any) -> None:
        raise OSError("<urlopen error [Errno 101] Network is unreachable>")

    names = ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", "SVHN")
    fake = types.SimpleNamespace(**dict.fromkeys(names, unreachable))
    monkeypatch.setattr(data, "require", lambda *a, **k: fake)
    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, ["train", "--data", "mnist", "--download", "--data-dir", str(tmp_path)], code=2)
    assert "downloading into" in err and "Network is unreachable" in err
    assert not (tmp_path / "runs").exists()

    def interrupted(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_module, "_run_job", interrupted)
    status = main(["compare", "--methods", "bn-sgd", "--seeds", "1", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert status == 130 and "Traceback" not in err  # Ctrl-C: the shell's convention, 128 + SIGINT
    assert "run the same command again to continue" in err and len(err.strip().splitlines()) == 1
