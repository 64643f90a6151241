"""Dataset loaders read the real on-disk formats; batches and augmentation are reproducible and sharded."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from normkit.train.runner.data import DATASETS, MissingDataError, augment, batches, load_dataset, read_idx

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def test_digits() -> None:
    d = load_dataset("digits")
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert set(d.y_test.tolist()) == set(range(10))
    x = torch.cat([d.x_train, d.x_test])
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01  # normalization constants
    again = load_dataset("digits")
    assert torch.equal(again.y_test, d.y_test)  # the split is fixed
    v = load_dataset("digits", val_size=100)
    assert len(v.y_train) == 1337 and v.x_val is not None and len(v.y_val) == 100  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", val_size=5000)


def test_mnist1d_generates_offline_and_keeps_global_rng() -> None:
    np.random.seed(123)
    random.seed(123)
    expect_np, expect_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    d = load_dataset("mnist1d", mnist1d_samples=500)
    assert np.random.rand() == expect_np and random.random() == expect_py
    assert d.x_train.shape == (400, 1, 40) and d.x_test.shape == (100, 1, 40)
    assert d.y_train.max() <= 9


def test_real_mnist_test_set(mnist_t10k_dir: Path) -> None:
    images = read_idx(mnist_t10k_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(mnist_t10k_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).min() > 800  # all ten classes, roughly balanced
    d = load_dataset("mnist-t10k", mnist_t10k_dir)
    assert d.x_train.shape == (8000, 1, 28, 28) and d.x_test.shape == (2000, 1, 28, 28)
    assert d.x_train.dtype == torch.uint8  # pixels stay bytes on the device; prepare() normalizes a batch
    assert abs(d.prepare(d.x_train).mean().item()) < 0.05  # MNIST constants
    with pytest.raises(MissingDataError, match=r"train-images-idx3-ubyte.*adding --download"):
        load_dataset("mnist", mnist_t10k_dir)  # only the test files are there


@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw", "fashion-raw"])
def test_mnist_idx_files(tmp_path: Path, layout: str) -> None:
    raw = {"torchvision-raw": tmp_path / "MNIST" / "raw", "fashion-raw": tmp_path / "FashionMNIST" / "raw"}
    folder = raw.get(layout, tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        imgs = rng.integers(0, 256, (n, 28, 28))
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", imgs, gz=layout == "flat-gz")
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz=layout == "flat-gz")
    name = "fashion-mnist" if layout == "fashion-raw" else "mnist"
    d = load_dataset(name, tmp_path)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert d.y_train.tolist() == [i % 10 for i in range(12)]
    mean, std = DATASETS[name].mean[0], DATASETS[name].std[0]
    expected = (torch.as_tensor(read_idx(next(folder.glob("train-images*")))[0]).float() / 255 - mean) / std
    x = d.prepare(d.x_train)
    assert x.dtype == torch.float32 and torch.allclose(x[0, 0], expected)


def test_cifar_pickle_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches_written = {}
    for name, n in [*((f"data_batch_{i}", 3) for i in range(1, 6)), ("test_batch", 4)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, n))
        batches_written[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    d = load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.augment == "crop-flip"
    data, labels = batches_written["data_batch_1"]
    mean, std = DATASETS["cifar10"].mean, DATASETS["cifar10"].std
    pixel = data[0].reshape(3, 32, 32)[1, 5, 7] / 255.0  # channel-major rows of 32
    assert d.prepare(d.x_train)[0, 1, 5, 7].item() == pytest.approx((pixel - mean[1]) / std[1], abs=1e-5)
    assert d.y_train[:3].tolist() == labels

    folder100 = tmp_path / "c100" / "cifar-100-python"
    folder100.mkdir(parents=True)
    for name, n in (("train", 6), ("test", 2)):
        with open(folder100 / name, "wb") as f:
            pickle.dump(
                {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": [99] * n}, f
            )
    d100 = load_dataset("cifar100", tmp_path / "c100")
    assert d100.num_classes == 100 and d100.y_train.tolist() == [99] * 6


def test_svhn_mat_files(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3), ("extra", 4)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # 1..10, 10 meaning digit 0
        scipy_io.savemat(str(tmp_path / f"{split}_32x32.mat"), {"X": x, "y": y})
    d = load_dataset("svhn", tmp_path)
    assert d.x_train.shape == (6, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.y_train.tolist() == [1, 2, 3, 4, 5, 6] and d.y_test.tolist() == [1, 2, 3]
    both = load_dataset("svhn", tmp_path, svhn_extra=True)
    assert len(both.y_train) == 10
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(MissingDataError, match=r"test_32x32\.mat"):
        load_dataset("svhn", tmp_path)


def test_missing_files_say_what_and_where(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match=r"data_batch_1.*cifar-10-batches-py.*--download"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match=r"choose from .*digits"):
        load_dataset("imagenet", tmp_path)


def test_augment_crop_flip() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    g = torch.Generator().manual_seed(0)
    out = augment(x, "crop-flip", g, pad=2)
    assert out.shape == x.shape
    for i in range(2):  # each output is a (possibly flipped) shifted window of the zero-padded image
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    again = augment(x, "crop-flip", torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, again)
    assert augment(x, "none", g) is x


def test_batches_shard_the_global_batch() -> None:
    x = torch.arange(20, dtype=torch.float32)[:, None]
    y = torch.arange(20)
    full = list(batches(x, y, 8, torch.Generator().manual_seed(3), drop_last=True))
    assert len(full) == 2 and all(len(b[1]) == 8 for b in full)
    shards = [
        list(batches(x, y, 8, torch.Generator().manual_seed(3), drop_last=True, rank=r, world_size=2))
        for r in (0, 1)
    ]
    for step, (_, yb) in enumerate(full):
        assert torch.equal(torch.cat([shards[0][step][1], shards[1][step][1]]), yb)
    ordered = list(batches(x, y, 8))
    assert [len(b[1]) for b in ordered] == [8, 8, 4] and torch.equal(torch.cat([b[1] for b in ordered]), y)


def test_non_iid_order_batches_hold_few_classes():
    from normkit.train.runner.data import batches, non_iid_order

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat_interleave(torch.tensor([370, 410, 290, 500, 330, 450, 380, 400, 360, 310]))
    order = non_iid_order(y, 32, 2, gen)
    assert len(order) == len(y) // 32 * 32
    for block in order.split(32):
        assert len(torch.unique(y[block])) <= 2
    assert len(torch.unique(order)) > 0.95 * len(y)  # nearly every example is seen each epoch
    x = torch.arange(len(y), dtype=torch.float32)[:, None]
    seen = list(batches(x, y, 32, gen, drop_last=True, classes_per_batch=2))
    assert len(seen) == len(y) // 32 and all(len(torch.unique(yb)) <= 2 for _, yb in seen)
    # The default is i.i.d.: batches mix many classes.
    iid = list(batches(x, y, 32, torch.Generator().manual_seed(0), drop_last=True))
    assert max(len(torch.unique(yb)) for _, yb in iid) > 2


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    import sys

    from normkit.cli import main
    from normkit.train.runner.data import MissingDependencyError, require

    with pytest.raises(MissingDependencyError, match=r"pip install 'normkit\[report\]'"):
        require("no_such_module_for_normkit", "report", "plots")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "1", "--no-progress"])
    assert exc.value.code == 2
    assert "pip install 'normkit[data]'" in capsys.readouterr().err


def test_cifar_loader_refuses_a_planted_payload(tmp_path: Path) -> None:
    """A pickle naming any callable besides numpy's array reconstruction is refused before it runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> Any:
            return (Path.touch, (marker,))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        with open(folder / name, "wb") as f:
            batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}
            if name == "data_batch_3":
                batch[b"batch_label"] = Payload()
            pickle.dump(batch, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3 is not a CIFAR batch.*refused to load .*getattr"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()  # the payload never ran
