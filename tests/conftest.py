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
    if not (path / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST t10k files not found in {path} (set NORMKIT_MNIST_DIR to their folder)")
    return path
