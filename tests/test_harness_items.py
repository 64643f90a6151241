"""What a new user meets in the run loop: a factory gets only what the user set and a changed factory makes
old runs stale; a wrong model output, a wrongly typed method value, an empty split, dict items, a full disk,
an exception in the user's code and a malicious checkpoint each end in one clear line; a diverged run is a
result; two ``train --out SAME`` at once cannot both write."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import normkit
from normkit.cli import main
from normkit.train.runner import ConfigError, load_checkpoint, load_dataset, resolve_config

SRC = str(Path(normkit.__file__).resolve().parents[1])

FACTORIES = """
import torch
import torch.nn as nn

from helper import HIDDEN


def net(num_classes, in_shape, width=8, depth=1):
    n = 1
    for s in in_shape:
        n *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(n, width), nn.ReLU(), nn.Linear(width, num_classes))


def net_with_helper(num_classes, in_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes))


def five(num_classes, in_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))


def twenty(num_classes, in_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 20))


class Column(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)).unsqueeze(-1)


def column(num_classes, in_shape):
    return Column()


def ignores_in_shape(num_classes, in_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))  # an MNIST model on 8x8 digits


def _make_layer(width):
    raise ValueError(f"width {width} is not a power of two")


def boom(num_classes, in_shape):
    return _make_layer(12)
"""

DATA = """
import torch
from torch.utils.data import Dataset


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))[y] + 0.3 * torch.randn(
        n, 1, 4, 4, generator=g
    ), y


class Dicts(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": int(self.y[i])}


def dicts():
    return Dicts(*_blobs(60, 1)), Dicts(*_blobs(30, 2))


def pairs():
    return _blobs(60, 1), _blobs(30, 2)


def empty_test():
    return _blobs(60, 1), (torch.empty(0, 1, 4, 4), torch.empty(0, dtype=torch.long))


def with_nan():
    x, y = _blobs(60, 1)
    x[5, 0, 0, 0] = float("nan")
    return (x, y), _blobs(30, 2)
"""


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_models.py").write_text(FACTORIES)
    (work / "helper.py").write_text("HIDDEN = 8\n")
    (work / "my_data.py").write_text(DATA)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield work
    _forget_user_modules()


def _forget_user_modules() -> None:
    """As a new process would: the user's modules are imported afresh."""
    for name in ("my_models", "helper", "my_data"):
        sys.modules.pop(name, None)


def _mlp_parameters(n_in: int, width: int, n_out: int) -> int:
    return n_in * width + width + width * n_out + n_out


def _summary(path: Path) -> dict[str, Any]:
    return json.loads((path / "summary.json").read_text())


# --- item 8: a diverged run is a result ---------------------------------------------------------------------


def test_a_run_diverging_in_its_first_epoch_is_a_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "d"
    args = ["train", "--model", "mlp", "--depth", "1", "--width", "16", "--epochs", "2", "--lr", "1e30"]
    assert main([*args, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "done: diverged at epoch 1" in captured.out and str(out) in captured.out
    summary = _summary(out)
    assert summary["diverged"] is True and summary["best_acc"] is None and summary["epochs_done"] == 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not math.isfinite(metrics[0]["train_loss"])


def test_one_nan_in_your_data_is_a_diverged_result(user_dir: Path, capsys: pytest.CaptureFixture[str]):
    args = ["train", "--data", "my_data:with_nan", "--model", "mlp", "--depth", "1", "--width", "8"]
    assert main([*args, "--epochs", "2", "--batch-size", "16", "--out", "nan"]) == 0
    assert "done: diverged at epoch 1" in capsys.readouterr().out
    assert _summary(user_dir / "nan")["diverged"] is True


# --- item 4: a user's factory gets only what the user set ---------------------------------------------------


def test_the_factory_gets_only_what_the_user_set_in_train_and_compare(user_dir: Path, capsys):
    from normkit.train import compare_methods

    assert main(["train", "--model", "my_models:net", "--epochs", "1", "--out", "t"]) == 0
    train = _summary(user_dir / "t")
    assert train["built"]["model_call"] == {"num_classes": 10, "in_shape": [1, 8, 8]}
    assert train["parameters"] == _mlp_parameters(64, 8, 10)  # the factory's own default width

    # the default suite's base sets depth 4, width 64 for its MLP: they do not reach the user's factory
    args = ["compare", "--model", "my_models:net", "--methods", "bn-sgd", "--seeds", "1", "--epochs", "1"]
    assert main([*args, "--no-progress", "--out", "c"]) == 0
    study = _summary(user_dir / "c" / "runs" / "bn-sgd" / "seed0")
    assert study["built"]["model_call"] == train["built"]["model_call"]
    assert study["parameters"] == train["parameters"]

    # what the user sets does reach it, and is recorded
    result = compare_methods(["bn-sgd"], model="my_models:net", width=16, epochs=1, seeds=1, out="api")
    record = result.runs[0]["summary"]
    assert record["built"]["model_call"] == {"num_classes": 10, "in_shape": [1, 8, 8], "width": 16}
    assert record["parameters"] == _mlp_parameters(64, 16, 10)
    capsys.readouterr()


# --- item 9: editing your factory makes old runs stale ------------------------------------------------------


def test_editing_the_factory_reruns_compare_instead_of_reusing(user_dir: Path, capsys):
    def compare(model: str) -> tuple[str, dict[str, Any]]:
        _forget_user_modules()  # each `normkit compare` is a new process
        args = ["compare", "--model", model, "--methods", "bn-sgd", "--seeds", "1", "--epochs", "1"]
        assert main([*args, "--no-progress", "--out", f"study-{model.split(':')[1]}"]) == 0
        run_dir = user_dir / f"study-{model.split(':')[1]}" / "runs" / "bn-sgd" / "seed0"
        return capsys.readouterr().out, _summary(run_dir) | {"log": (run_dir / "log.txt").read_text()}

    out, first = compare("my_models:net")
    assert "(0 already finished)" in out and first["parameters"] == _mlp_parameters(64, 8, 10)
    out, same = compare("my_models:net")
    assert "(1 already finished)" in out and same["wall_time_this_session"] == first["wall_time_this_session"]

    source = (user_dir / "my_models.py").read_text()
    (user_dir / "my_models.py").write_text(source.replace("width=8, depth=1", "width=12, depth=1"))
    out, edited = compare("my_models:net")
    assert "(0 already finished)" in out
    assert edited["parameters"] == _mlp_parameters(64, 12, 10)  # the model of the edited file
    assert "changed since this run" in edited["log"]

    # a change outside the factory's file that changes what it builds: caught by the parameter shapes
    out, first = compare("my_models:net_with_helper")
    assert first["parameters"] == _mlp_parameters(64, 8, 10)
    (user_dir / "helper.py").write_text("HIDDEN = 6\n")
    out, edited = compare("my_models:net_with_helper")
    assert "(0 already finished)" in out and edited["parameters"] == _mlp_parameters(64, 6, 10)
    assert "builds other parameter shapes" in edited["log"]


# --- item 10: user input that is wrong ends in one line -----------------------------------------------------


@pytest.mark.parametrize(
    "factory, expected",
    [
        ("five", "returns output of shape (2, 5)"),
        ("column", "returns output of shape (2, 10, 1)"),
        ("twenty", "returns output of shape (2, 20)"),
        ("ignores_in_shape", "cannot take digits inputs of shape (1, 8, 8)"),
    ],
)
def test_a_model_output_that_does_not_fit_the_task_is_refused_before_training(
    user_dir: Path, capsys: pytest.CaptureFixture[str], factory: str, expected: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", f"my_models:{factory}", "--epochs", "1", "--out", "bad"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert expected in last, last
    assert "(N, 10) logits" in last or "does it use in_shape?" in last, last
    assert not (user_dir / "bad").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "value, expected",
    [
        ({"epochs": "ten"}, "epochs must be a whole number, got 'ten' (str)"),
        ({"lr": True}, "lr must be a number or null, got True (bool)"),
        ({"epochs": 2.5}, "epochs must be a whole number, got 2.5 (float)"),
        ({"milestones": ["5"]}, "milestones must be a list of whole numbers"),
    ],
)
def test_method_file_values_of_the_wrong_type_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: dict[str, Any], expected: str
) -> None:
    methods = tmp_path / "methods.json"
    methods.write_text(json.dumps({"mine": value}))
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--method-file", str(methods), "--methods", "mine", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="must be"):
        resolve_config(value)  # the Python API refuses them alike


def test_resolve_config_still_takes_whole_numbers_for_real_options() -> None:
    cfg = resolve_config({"weight_decay": 0, "warmup_epochs": 1, "enorm": 1})
    assert cfg.weight_decay == 0 and cfg.enorm == 1  # an int where a float is expected is a number


def test_an_empty_test_split_is_one_line(user_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", "my_data:empty_test", "--model", "mlp", "--epochs", "1", "--out", "e"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "the test split is empty" in err and "Traceback" not in err


def test_dict_items_are_read_by_their_keys(user_dir: Path) -> None:
    from_dicts = load_dataset("my_data:dicts")
    from_pairs = load_dataset("my_data:pairs")  # the same examples as (inputs, labels) tensors
    for split in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(from_dicts, split), getattr(from_pairs, split)), split
    assert from_dicts.num_classes == 3


def test_an_exception_in_your_factory_shows_your_frames_and_one_line(user_dir: Path, capsys) -> None:
    assert main(["train", "--model", "my_models:boom", "--epochs", "1", "--out", "b"]) == 1
    err = capsys.readouterr().err
    assert 'my_models.py", line' in err and "in boom" in err and "in _make_layer" in err
    assert "normkit/train" not in err and "normkit/cli" not in err  # none of normkit's frames
    last = err.strip().splitlines()[-1]
    assert last == (
        "normkit train: error: your model factory my_models:boom raised ValueError: width 12 is not a power "
        "of two"
    )
    assert not (user_dir / "b").exists()


def test_an_exception_in_your_factory_in_a_worker_process_is_reported_alike(user_dir: Path, capsys) -> None:
    args = ["compare", "--model", "my_models:boom", "--methods", "bn-sgd", "--seeds", "1", "--epochs", "1"]
    assert main([*args, "--jobs", "2", "--no-progress", "--out", "s"]) == 1
    err = capsys.readouterr().err
    assert 'my_models.py", line' in err and "in _make_layer" in err and "normkit/train" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("normkit compare: error: your model factory my_models:boom raised ValueError")


def test_a_resumed_malicious_checkpoint_is_refused_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--depth", "1", "--width", "8", "--epochs", "2", "--out", str(out)]
    assert main([*args, "--stop-after-epoch", "1"]) == 0
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**state, "best": Payload()}, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"holds Python objects ({os.system.__module__}.system)" in err and "refused" in err
    assert "truncated or corrupt" not in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def _fill_disk_and_resume(out: Path, free_bytes: int) -> subprocess.CompletedProcess[str]:
    """Resume ``out`` with its file system full (a real tmpfs) or, without the right to mount one, with the
    process's file-size limit below the checkpoint's size (the kernel fails the write with EFBIG)."""
    code = (
        "import resource, signal, sys\n"
        "limit = int(sys.argv[2])\n"
        "if limit:\n"
        "    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
        "from normkit.cli import main\n"
        "sys.exit(main(['train', '--resume', sys.argv[1]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, str(out), str(free_bytes)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_full_disk_while_checkpointing_is_one_line_and_the_old_checkpoint_stays(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
        ).returncode
        == 0
    )
    try:
        out = mount / "run"
        args = [
            "train",
            "--model",
            "mlp",
            "--depth",
            "1",
            "--width",
            "256",
            "--epochs",
            "2",
            "--out",
            str(out),
        ]
        assert main([*args, "--stop-after-epoch", "1"]) == 0
        before = (out / "checkpoint.pt").read_bytes()
        assert len(before) > 100_000  # a checkpoint the remaining space cannot take
        if mounted:  # a real full disk: leave 20 kB, enough for config.json and metrics.jsonl
            stat = os.statvfs(mount)
            (mount / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 20_000))
        proc = _fill_disk_and_resume(out, 0 if mounted else 50_000)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        reason = "the disk is full" if mounted else os.strerror(errno.EFBIG)
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"cannot write {out / 'checkpoint.pt'}: {reason} (the previous file is intact)" in lines[0]
        assert (out / "checkpoint.pt").read_bytes() == before
        assert load_checkpoint(out)["epoch"] == 1
        assert not list(out.glob(".*.tmp"))
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)


# --- item 11: train --out is locked -------------------------------------------------------------------------


def test_two_trains_into_the_same_out_the_second_refuses(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--depth", "1", "--width", "8", "--epochs", "500", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "normkit", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # the first one is training and writing
            assert first.poll() is None and time.monotonic() < deadline, first.stderr and first.stderr.read()
            time.sleep(0.2)
        assert main(args) == 1
        err = capsys.readouterr().err
        assert f"another normkit train (pid {first.pid} " in err and str(out) in err
        assert len(err.strip().splitlines()) == 1
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(60)
    assert first.returncode == 130
    assert not (out / ".lock").exists()  # released and removed
    capsys.readouterr()
    assert main([*args[:-4], "--epochs", "1", "--out", str(tmp_path / "other")]) == 0
