"""Your own model, dataset and methods by import path; the Python API; data a new user can get; `normkit
bench` outside a checkout. The end-to-end runs are subprocesses started like the installed `normkit` script
(whose sys.path does not hold the working directory) in a folder holding the user's files."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normkit
from normkit.cli import main
from normkit.train.runner.config import ConfigError, resolve_config
from normkit.train.runner.data import MissingDataError, load_dataset
from normkit.train.runner.factories import ImportPathError, load_user_data
from normkit.train.runner.models import build_model

MODEL = """
import torch.nn as nn


def net(num_classes, in_shape, width=16):
    assert in_shape == (1, 6, 6), in_shape  # what the harness must pass
    assert num_classes == 4, num_classes
    return nn.Sequential(
        nn.Flatten(), nn.Linear(36, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, num_classes)
    )
"""

DATA = """
import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    classes = ["a", "b", "c", "d"]

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make(n, seed):
    centers = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 4
    return centers[y] + 0.5 * torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed)), y


def blobs():
    return Blobs(*make(256, 1)), make(64, 2)  # a Dataset and a tensor pair
"""

METHODS = {
    "tiny-bn": {"description": "my net, BN", "model": "tiny_model:net", "data": "tiny_data:blobs"},
    "tiny-brn": {"model": "tiny_model:net", "data": "tiny_data:blobs", "norm": "brn"},
}


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny_model.py").write_text(MODEL)
    (work / "tiny_data.py").write_text(DATA)
    (work / "methods.json").write_text(json.dumps(METHODS))
    return work


def normkit_command(work: Path, *args: str) -> subprocess.CompletedProcess:
    # A launcher outside the working directory, like the `normkit` console script in a venv's bin/.
    launcher = work.parent / "bin" / "normkit_launcher.py"
    launcher.parent.mkdir(exist_ok=True)
    launcher.write_text(
        "import sys\nfrom normkit.cli import main\n\nif __name__ == '__main__':\n    sys.exit(main())\n"
    )
    src = str(Path(normkit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(launcher), *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )


def test_train_user_model_and_data_from_the_working_directory(user_dir):
    proc = normkit_command(
        user_dir,
        *("train", "--model", "tiny_model:net", "--data", "tiny_data:blobs", "--width", "24"),
        *("--epochs", "3", "--batch-size", "32", "--out", "run"),
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((user_dir / "run" / "summary.json").read_text())
    assert summary["final_test_acc"] > 0.6  # 4 well-separated classes; chance is 0.25
    config = json.loads((user_dir / "run" / "config.json").read_text())
    assert (config["model"], config["data"]) == ("tiny_model:net", "tiny_data:blobs")
    state = torch.load(user_dir / "run" / "checkpoint.pt", weights_only=False)
    assert state["model"]["1.weight"].shape == (24, 36)  # --width reached the factory, which takes it


def test_compare_jobs_2_with_a_method_file_of_user_methods(user_dir):
    proc = normkit_command(
        user_dir,
        *("compare", "--method-file", "methods.json", "--methods", "tiny-bn,tiny-brn"),
        *("--seeds", "1", "--epochs", "2", "--jobs", "2", "--out", "study"),
    )
    assert proc.returncode == 0, proc.stderr
    with open(user_dir / "study" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["arm"] for r in rows) == ["tiny-bn", "tiny-brn"]
    assert all(float(r["final_test_acc"]) > 0.5 for r in rows)
    brn = torch.load(user_dir / "study" / "runs" / "tiny-brn" / "seed0" / "checkpoint.pt", weights_only=False)
    assert any(k.endswith("running_std") for k in brn["model"])  # --norm brn converted the user's BatchNorm


# --- in-process checks -------------------------------------------------------------------------------------


@pytest.fixture
def in_user_dir(user_dir, monkeypatch):
    monkeypatch.chdir(user_dir)
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo the working-directory entry afterwards
    yield user_dir
    for name in [m for m in sys.modules if m.startswith(("tiny_", "bad_"))]:
        del sys.modules[name]


def test_user_data_forms_and_class_count(in_user_dir):
    data = load_dataset("tiny_data:blobs", val_size=32)
    assert data.num_classes == 4 and data.input_shape == (1, 6, 6)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (224, 32, 64)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    model = build_model("tiny_model:net", data.input_shape, data.num_classes, norm="brn")
    assert type(model[2]).__name__ == "BatchRenorm1d"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def f():\n    return [1, 2, 3, 4]\n", r"must return \(train, test\)"),
        (
            "import torch\ndef f():\n    z = torch.zeros\n    return (z(4, 2), z(4)), (z(2, 2), z(2))\n",
            "integer class indices",
        ),
        (
            "import torch\ndef f():\n    t = torch.zeros(4, dtype=torch.long)\n"
            "    return (t[:, None], t), (t[:, None, None], t)\n",
            "differ in shape",
        ),
        ("def f():\n    return 3, 4\n", "Dataset or an"),
    ],
)
def test_bad_user_data_is_named(in_user_dir, body, message):
    (in_user_dir / "bad_data.py").write_text(body)
    with pytest.raises(ImportPathError, match=message):
        load_user_data("bad_data:f")


def test_config_errors_before_training(in_user_dir):
    with pytest.raises(ConfigError, match=r"no module named 'nosuch'.*working directory"):
        resolve_config(model="nosuch:net")
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        resolve_config(model="tiny_model:missing")
    (in_user_dir / "bad_model.py").write_text("def net(classes):\n    pass\n")
    with pytest.raises(ConfigError, match="num_classes and in_shape"):
        resolve_config(model="bad_model:net")
    with pytest.raises(ConfigError, match="cannot remove"):
        resolve_config(model="tiny_model:net", norm="none")
    with pytest.raises(ConfigError, match="--download"):
        resolve_config(data="tiny_data:blobs", download=True)
    with pytest.raises(ConfigError, match=r"package\.module:factory"):
        resolve_config(model="resnet")


def test_cli_rejects_a_name_that_is_neither(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model", "resnet"])
    assert "or give your own as package.module:factory" in capsys.readouterr().err


def test_compare_methods_returns_the_table(tmp_path):
    from normkit.train import compare_methods

    study = compare_methods(
        ["bn-sgd", "brn-sgd"], data="digits", model="mlp", depth=1, width=16, epochs=1, seeds=2, out=tmp_path
    )
    assert [r["arm"] for r in study.rows] == ["bn-sgd", "brn-sgd"]
    for row in study.rows:
        accs = [100 * r["metrics"][-1]["test_acc"] for r in study.runs if r["arm"] == row["arm"]]
        assert row["seeds"] == 2 and row["test_acc_min"] == min(accs) and row["test_acc_max"] == max(accs)
    base, other = study.rows
    assert base["delta_vs_baseline"] is None
    assert other["delta_vs_baseline"] == pytest.approx(other["test_acc_median"] - base["test_acc_median"])
    assert "| brn-sgd | brn-sgd | 2 |" in str(study)
    with pytest.raises(ConfigError, match="unknown option"):
        compare_methods(["bn-sgd"], epoch=1, out=tmp_path)


# --- data a new user can get -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("mnist-t10k", ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        ("mnist", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]),
    ],
)
def test_missing_mnist_names_the_files_and_the_fetch_command(tmp_path, name, files):
    with pytest.raises(MissingDataError) as info:
        load_dataset(name, tmp_path)
    message = str(info.value)
    assert all(f in message for f in files)
    assert "--download" in message
    assert f"torchvision.datasets.MNIST('{tmp_path}', download=True)" in message


def test_compare_download_fetches_before_any_run(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_load(name, data_dir="data", **kwargs):
        calls.append((name, str(data_dir), kwargs.get("download")))
        raise MissingDataError("offline test: no download")

    monkeypatch.setattr("normkit.train.runner.data.load_dataset", fake_load)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main(["compare", "--suite", "lsuv", "--download", "--data-dir", str(tmp_path), "--out", str(out)])
    assert calls == [("mnist-t10k", str(tmp_path), True)]
    assert not (out / "runs").exists()  # nothing ran
    assert "offline test" in capsys.readouterr().err


def test_lsuv_example_explains_and_falls_back_without_mnist(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "lsuv_deep_plain.py"
    src = str(Path(normkit.__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, str(example), "--mnist-dir", str(tmp_path), "--epochs", "1", "--depth", "2"],
        *(),
        env={**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "t10k-images-idx3-ubyte" in proc.stderr and "torchvision.datasets.MNIST" in proc.stderr
    assert proc.stdout.startswith("digits:")


# --- normkit bench -----------------------------------------------------------------------------------------


def test_bench_outside_a_checkout_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["bench", "--quick"])
    assert "not part of the installed package" in capsys.readouterr().err


def test_bench_runs_the_checkout_benchmarks_without_importing_them(tmp_path, monkeypatch):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "__init__.py").write_text("")
    (bench / "run.py").write_text(
        "import sys, json\nopen('argv.json', 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    monkeypatch.chdir(tmp_path)
    before = dict(sys.modules)
    assert main(["bench", "brn", "--quick"]) == 0
    assert json.loads((tmp_path / "argv.json").read_text()) == ["brn", "--quick"]
    new = [m for name, m in sys.modules.items() if name not in before]
    assert not any(str(getattr(m, "__file__", "") or "").startswith(str(tmp_path)) for m in new)
