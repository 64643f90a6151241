"""Datasets held whole as tensors on the device, with batch-wise augmentation there (airbench style).

Every loader returns a :class:`TensorData`: int64 labels; image datasets keep their uint8 pixels (4× less
memory: SVHN train + extra is 1.9 GB instead of 7.4 GB) and :meth:`TensorData.prepare` turns a batch into
normalized float32 on the device; small datasets (digits, MNIST-1D) are stored normalized already.
Files are read in their real on-disk formats: MNIST idx (optionally gzipped), the CIFAR python pickle
batches and the SVHN ``.mat`` files; ``download=True`` fetches them with torchvision first.
"""

from __future__ import annotations

import gzip
import importlib
import pickle
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normkit.train.runner.factories import is_import_path, load_user_data

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "MissingDataError",
    "MissingDependencyError",
    "TensorData",
    "augment",
    "batches",
    "load_dataset",
    "non_iid_order",
    "read_idx",
]


class MissingDataError(FileNotFoundError):
    """A dataset's files are not where they were looked for (the message lists them)."""


class MissingDependencyError(ImportError):
    """An optional package a dataset or report needs is not installed (the message names the extra)."""


def require(module: str, extra: str, purpose: str) -> Any:
    """Import an optional dependency, or say which ``normkit[extra]`` provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the package {module.split('.')[0]!r}: pip install 'normkit[{extra}]'"
        ) from exc


@dataclass
class TensorData:
    """A whole dataset as tensors: train, test and an optional validation split held out of train."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    augment: str = "none"  # "none" | "crop-flip" | "crop"
    mean: tuple[float, ...] | None = None  # per-channel constants applied by prepare() to integer pixels
    std: tuple[float, ...] | None = None
    scale: float = 255.0

    def prepare(self, x: Tensor) -> Tensor:
        """A batch as normalized float32: integer pixels are scaled and normalized, floats pass unchanged."""
        if x.is_floating_point():
            return x
        x = x.to(torch.float32) / self.scale
        if self.mean is None or self.std is None:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, device=x.device).view(shape)
        std = torch.tensor(self.std, device=x.device).view(shape)
        return (x - mean) / std

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> TensorData:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            x_val=move(self.x_val),
            y_val=move(self.y_val),
        )


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    augment: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    offline: bool
    description: str


# Normalization constants (per channel) computed on each training set.
DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        "digits", (1, 8, 8), 10, "none", (0.3053,), (0.3760,), True, "scikit-learn 8x8 digits"
    ),
    "mnist1d": DatasetInfo("mnist1d", (1, 40), 10, "none", (0.0,), (1.0,), True, "MNIST-1D (generated)"),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, "none", (0.1307,), (0.3081,), False, "MNIST"),
    "mnist-t10k": DatasetInfo(
        "mnist-t10k",
        (1, 28, 28),
        10,
        "none",
        (0.1307,),
        (0.3081,),
        True,
        "the real MNIST test set split 8 000 train / 2 000 test",
    ),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", (1, 28, 28), 10, "none", (0.2860,), (0.3530,), False, "Fashion-MNIST"
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        (3, 32, 32),
        10,
        "crop-flip",
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        False,
        "CIFAR-10",
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        (3, 32, 32),
        100,
        "crop-flip",
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        False,
        "CIFAR-100",
    ),
    "svhn": DatasetInfo(
        "svhn",
        (3, 32, 32),
        10,
        "none",
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
        False,
        "SVHN (train, or train+extra)",
    ),
}

_SPLIT_SEED = 0  # fixed: the train/test split of digits and mnist-t10k never depends on the run's seed


# ----------------------------------------------------------------------------------------- file formats


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (MNIST format), gzipped or not, into a numpy array."""
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).copy()
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


_TORCHVISION_CLASS = {"mnist": "MNIST", "mnist-t10k": "MNIST", "fashion-mnist": "FashionMNIST"}


def fetch_command(name: str, data_dir: str | Path = "data") -> str:
    """A shell command that downloads the files of MNIST / Fashion-MNIST (``name``) into ``data_dir``."""
    cls = _TORCHVISION_CLASS[name]
    return f"python -c \"import torchvision; torchvision.datasets.{cls}('{data_dir}', download=True)\""


def _find(
    directory: Path, names: list[str], dataset: str, download_hint: bool, key: str | None = None
) -> list[Path]:
    """Locate each of ``names`` (with or without .gz) in ``directory`` or its torchvision sub-folders.

    ``key``: the dataset's name in :data:`DATASETS`, for the message (with the command that fetches them).
    """
    folders = [directory, directory / dataset / "raw"]  # flat, or torchvision's MNIST/raw, FashionMNIST/raw
    found, missing = [], []
    for name in names:
        hit = next((f / n for f in folders for n in (name, name + ".gz") if (f / n).is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found.append(hit)
    if missing:
        fetch = (
            f"; fetch them by adding --download to this command (needs torchvision: pip install "
            f"'normkit[vision]'), or with: {fetch_command(key, directory)}"
            if download_hint and key in _TORCHVISION_CLASS
            else ""
        )
        raise MissingDataError(
            f"{key or dataset}: missing {', '.join(missing)} (gzipped or not) in {directory} "
            f"(or {directory / dataset / 'raw'}){fetch}"
        )
    return found


def _find_or_none(directory: Path, names: list[str], dataset: str) -> list[Path] | None:
    try:
        return _find(directory, names, dataset, False)
    except MissingDataError:
        return None


def _to_float(
    x: np.ndarray | Tensor, mean: tuple[float, ...], std: tuple[float, ...], scale: float
) -> Tensor:
    t = torch.as_tensor(np.ascontiguousarray(x)).to(torch.float32) / scale
    shape = (1, -1) + (1,) * (t.dim() - 2)
    return (t - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def _pixels(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))


def _permutation(n: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))


# ---------------------------------------------------------------------------------------------- loaders


def _digits(**_: Any) -> TensorData:
    load_digits = require("sklearn.datasets", "data", "the digits dataset").load_digits

    info = DATASETS["digits"]
    bunch = load_digits()
    x = _to_float(bunch.images[:, None], info.mean, info.std, 16.0)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    perm = _permutation(len(y))
    n_test = 360  # 20 %, fixed split
    test, train = perm[:n_test], perm[n_test:]
    return TensorData("digits", x[train], y[train], x[test], y[test], 10)


def _mnist1d(num_samples: int = 5000, **_: Any) -> TensorData:
    mnist1d_data = require("mnist1d.data", "data", "the MNIST-1D dataset")
    get_dataset_args, make_dataset = mnist1d_data.get_dataset_args, mnist1d_data.make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    # make_dataset seeds the global numpy / python RNGs: keep the caller's streams untouched.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)  # generated locally from the templates, no download
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def f(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float32)[:, None, :]

    def lab(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=torch.long)

    return TensorData("mnist1d", f(data["x"]), lab(data["y"]), f(data["x_test"]), lab(data["y_test"]), 10)


_MNIST_FILES = {
    "train": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
    "test": ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
}


def _download_torchvision(name: str, root: Path, **kwargs: Any) -> None:
    tvd = require("torchvision.datasets", "vision", "--download")

    cls = {
        "mnist": tvd.MNIST,
        "fashion-mnist": tvd.FashionMNIST,
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
        "svhn": tvd.SVHN,
    }[name]
    root.mkdir(parents=True, exist_ok=True)
    try:
        if name == "svhn":
            for split in kwargs.get("splits", ("train", "test")):
                cls(str(root), split=split, download=True)
        else:
            for train in (True, False):
                cls(str(root), train=train, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise MissingDataError(f"{name}: downloading into {root} failed ({e})") from e


def _mnist_like(name: str, data_dir: Path, download: bool) -> TensorData:
    info = DATASETS[name]
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    if download:
        _download_torchvision(name, data_dir)
    out = []
    for split in ("train", "test"):
        img_path, lab_path = _find(data_dir, _MNIST_FILES[split], folder, not download, name)
        out += [
            _pixels(read_idx(img_path)[:, None]),
            torch.as_tensor(read_idx(lab_path).astype(np.int64)),
        ]
    return TensorData(name, out[0], out[1], out[2], out[3], 10, mean=info.mean, std=info.std)


def _mnist(data_dir: Path, download: bool = False, **_: Any) -> TensorData:
    return _mnist_like("mnist", data_dir, download)


def _fashion(data_dir: Path, download: bool = False, **_: Any) -> TensorData:
    return _mnist_like("fashion-mnist", data_dir, download)


def _mnist_t10k(data_dir: Path, download: bool = False, **_: Any) -> TensorData:
    info = DATASETS["mnist-t10k"]
    if download and _find_or_none(data_dir, _MNIST_FILES["test"], "MNIST") is None:
        _download_torchvision("mnist", data_dir)
    img_path, lab_path = _find(data_dir, _MNIST_FILES["test"], "MNIST", not download, "mnist-t10k")
    x = _pixels(read_idx(img_path)[:, None])
    y = torch.as_tensor(read_idx(lab_path).astype(np.int64))
    perm = _permutation(len(y))
    train, test = perm[:8000], perm[8000:]
    return TensorData("mnist-t10k", x[train], y[train], x[test], y[test], 10, mean=info.mean, std=info.std)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch is made of: dicts, lists, bytes, numbers and numpy arrays.

    The distribution format is a Python pickle; a plain ``pickle.load`` would run any callable a planted file
    names. Here every global outside numpy's array reconstruction is refused.
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol 2 stores Python 3 bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[Any, Any]:
    with open(path, "rb") as f:
        try:
            d = _CifarUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise ValueError(
                f"{path} is not a CIFAR batch (the python version of the dataset): refused to load {e}"
            ) from None
    if not isinstance(d, dict) or not isinstance(d.get(b"data"), np.ndarray):
        raise ValueError(f"{path} is not a CIFAR batch: expected a dict with an array under b'data'")
    return d


def _cifar(name: str, data_dir: Path, download: bool) -> TensorData:
    info = DATASETS[name]
    if download:
        _download_torchvision(name, data_dir)
    if name == "cifar10":
        folder, train_files, test_files, key = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
        )
    else:
        folder, train_files, test_files, key = "cifar-100-python", ["train"], ["test"], b"fine_labels"
    base = data_dir / folder if (data_dir / folder).is_dir() else data_dir
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise MissingDataError(
            f"{name}: missing {', '.join(missing)} in {data_dir / folder} (the python version "
            f"of the dataset, as extracted from {folder.replace('-batches', '')}.tar.gz)"
            + ("" if download else "; pass --download to fetch it")
        )

    def load(files: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for f in files:
            d = _unpickle(base / f)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[key], dtype=np.int64))
        return _pixels(np.concatenate(xs)), torch.as_tensor(np.concatenate(ys))

    x_tr, y_tr = load(train_files)
    x_te, y_te = load(test_files)
    return TensorData(
        name, x_tr, y_tr, x_te, y_te, info.num_classes, augment="crop-flip", mean=info.mean, std=info.std
    )


def _cifar10(data_dir: Path, download: bool = False, **_: Any) -> TensorData:
    return _cifar("cifar10", data_dir, download)


def _cifar100(data_dir: Path, download: bool = False, **_: Any) -> TensorData:
    return _cifar("cifar100", data_dir, download)


def _svhn(data_dir: Path, download: bool = False, svhn_extra: bool = False, **_: Any) -> TensorData:
    scipy_io = require("scipy.io", "vision", "the SVHN loader")

    info = DATASETS["svhn"]
    splits = ["train", "test"] + (["extra"] if svhn_extra else [])
    if download:
        _download_torchvision("svhn", data_dir, splits=splits)
    missing = [s for s in splits if not (data_dir / f"{s}_32x32.mat").is_file()]
    if missing:
        raise MissingDataError(
            f"svhn: missing {', '.join(f'{s}_32x32.mat' for s in missing)} in {data_dir} (the cropped-digits "
            "format 2 .mat files)" + ("" if download else "; pass --download to fetch them")
        )

    def load(split: str) -> tuple[Tensor, Tensor]:
        d = scipy_io.loadmat(str(data_dir / f"{split}_32x32.mat"))
        x = np.transpose(d["X"], (3, 2, 0, 1))  # (32, 32, 3, N) -> (N, 3, 32, 32)
        y = d["y"].astype(np.int64).reshape(-1) % 10  # the files label digit 0 as 10
        return _pixels(x), torch.as_tensor(y)

    x_tr, y_tr = load("train")
    if svhn_extra:
        x_ex, y_ex = load("extra")
        x_tr, y_tr = torch.cat([x_tr, x_ex]), torch.cat([y_tr, y_ex])
    x_te, y_te = load("test")
    return TensorData("svhn", x_tr, y_tr, x_te, y_te, 10, mean=info.mean, std=info.std)


_LOADERS: dict[str, Callable[..., TensorData]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "mnist": _mnist,
    "mnist-t10k": _mnist_t10k,
    "fashion-mnist": _fashion,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "svhn": _svhn,
}


def load_dataset(
    name: str,
    data_dir: str | Path = "data",
    *,
    download: bool = False,
    val_size: int = 0,
    mnist1d_samples: int = 5000,
    svhn_extra: bool = False,
    subset: int | None = None,
) -> TensorData:
    """Load ``name`` (one of :data:`DATASETS`) on the CPU (uint8 pixels or normalized floats: ``prepare``).

    ``val_size`` examples are held out of the training set (a fixed split) as a validation set;
    ``subset`` keeps only the first ``subset`` training examples (quick experiments).
    ``name`` may also be the import path of your own dataset factory, ``package.module:factory``
    (see :mod:`normkit.train.runner.factories`).
    """
    if is_import_path(name):
        user = load_user_data(name)
        data = TensorData(
            name,
            user.x_train,
            user.y_train,
            user.x_test,
            user.y_test,
            user.num_classes,
            user.x_val,
            user.y_val,
        )
        if val_size and data.x_val is not None:
            raise ValueError(f"{name} returns its own validation split: val_size must be 0, got {val_size}")
    elif name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(_LOADERS)}")
    else:
        data = _LOADERS[name](
            data_dir=Path(data_dir), download=download, num_samples=mnist1d_samples, svhn_extra=svhn_extra
        )
        data.augment = DATASETS[name].augment
    if val_size:
        n = len(data.y_train)
        if not 0 < val_size < n:
            raise ValueError(f"val_size must be between 1 and {n - 1} for {name}, got {val_size}")
        perm = _permutation(n)
        val, train = perm[:val_size], perm[val_size:]
        data.x_val, data.y_val = data.x_train[val], data.y_train[val]
        data.x_train, data.y_train = data.x_train[train], data.y_train[train]
    if subset is not None:
        data.x_train, data.y_train = data.x_train[:subset], data.y_train[:subset]
    return data


# --------------------------------------------------------------------------------- batches, augmentation


def augment(x: Tensor, kind: str, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Batch-wise augmentation on ``x``'s device: random crop with zero padding (+ horizontal flip).

    Random numbers come from ``generator`` (CPU) so the data order and augmentation are reproducible and
    restorable from a checkpoint independently of the model's RNG use.
    """
    if kind == "none":
        return x
    n, _, h, w = x.shape
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (shifts[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (shifts[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    if kind == "crop-flip":
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)[:, None, None, None]
        out = torch.where(flip, out.flip(-1), out)
    return out


def non_iid_order(y: Tensor, batch_size: int, classes_per_batch: int, generator: torch.Generator) -> Tensor:
    """An epoch's example order in which every consecutive ``batch_size`` block holds at most
    ``classes_per_batch`` classes (Ioffe 2017's non-i.i.d. minibatches: 16 classes × 2 examples there).

    Classes are dealt into random groups of ``classes_per_batch``; each group's examples, shuffled, fill whole
    batches. The epoch has exactly ``len(y) // batch_size`` batches, like an i.i.d. epoch with drop_last: a
    group whose remainder is needed to reach that count tops it up with examples of its own classes.
    """
    classes = torch.unique(y)
    shuffled = classes[torch.randperm(len(classes), generator=generator)]
    pools = []
    for group in shuffled.split(classes_per_batch):
        members = torch.nonzero(torch.isin(y, group)).flatten()
        pools.append(members[torch.randperm(len(members), generator=generator)])
    blocks: list[Tensor] = []
    remainders: list[tuple[int, Tensor, Tensor]] = []
    for pool in pools:
        full = len(pool) // batch_size * batch_size
        blocks += list(pool[:full].split(batch_size))
        if full < len(pool):
            remainders.append((len(pool) - full, pool[full:], pool))
    remainders.sort(key=lambda r: -r[0])
    for _, rest, pool in remainders[: max(0, len(y) // batch_size - len(blocks))]:
        extra = pool[torch.randperm(len(pool), generator=generator)[: batch_size - len(rest)]]
        blocks.append(torch.cat([rest, extra]))
    blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
    return torch.cat(blocks) if blocks else torch.empty(0, dtype=torch.long)


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    aug: str = "none",
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    prepare: Callable[[Tensor], Tensor] | None = None,
    classes_per_batch: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (inputs, labels) batches of the global ``batch_size``; shuffled when a generator is given.

    ``prepare`` turns stored inputs into model inputs (e.g. uint8 pixels into normalized floats) before the
    augmentation. Under data parallelism each rank gets its contiguous share of every global batch (the
    permutation and the augmentation draws are made for the whole global batch on every rank, so one process
    and N processes see exactly the same examples per step). ``classes_per_batch``: non-i.i.d. batches, see
    :func:`non_iid_order` (needs ``drop_last`` and a generator).
    """
    n = len(y)
    order = torch.randperm(n, generator=generator).to(x.device) if generator is not None else None
    if classes_per_batch is not None and generator is not None and drop_last:
        order = non_iid_order(y.cpu(), batch_size, classes_per_batch, generator).to(x.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = (
            order[start : start + batch_size]
            if order is not None
            else torch.arange(start, min(start + batch_size, n), device=x.device)
        )
        xb, yb = x[idx], y[idx]
        if prepare is not None:
            xb = prepare(xb)
        if aug != "none" and generator is not None:
            xb = augment(xb, aug, generator)
        if world_size > 1:
            xb = torch.tensor_split(xb, world_size)[rank]
            yb = torch.tensor_split(yb, world_size)[rank]
        yield xb, yb
