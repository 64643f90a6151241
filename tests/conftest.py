import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Two cores on CI: keep each test process to them and deterministic.
torch.set_num_threads(min(2, torch.get_num_threads()))

_DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-tensor tests: on shared cores, OpenMP parallel regions over
    tiny tensors stall far longer than they compute. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_t10k_dir() -> Path:
    """The real MNIST test set (raw idx files), kept outside the repo; skip where it is absent."""
    path = Path(os.environ.get("NORMKIT_MNIST_DIR", _DEFAULT_MNIST))
    reason = mnist_skip_reason(path, from_env="NORMKIT_MNIST_DIR" in os.environ)
    if reason:
        pytest.skip(reason)
    return path


def mnist_skip_reason(path: Path, *, from_env: bool) -> str | None:
    """Why the MNIST tests skip, or None. Names the folder only when the user gave it (NORMKIT_MNIST_DIR):
    the default is a location on the development machines, meaningless elsewhere."""
    if (path / "t10k-images-idx3-ubyte.gz").exists():
        return None
    where = f" in {path}" if from_env else ""
    return (
        f"MNIST t10k files not found{where}: set NORMKIT_MNIST_DIR to the folder holding "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
    )
