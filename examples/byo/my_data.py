"""A dataset of your own for the normkit harness: scikit-learn's 8×8 digits, upsampled to 16×16.

The harness calls ``digits16()`` and gets ``(train, test)``: each split may be a ``torch.utils.data.Dataset``
of ``(input, label)`` pairs (as the training set here) or a pair of tensors ``(inputs, labels)`` (as the test
set). Return a third split to have a validation set. Everything is held in memory as tensors, so this suits
datasets that fit there.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class Digits16(Dataset):
    """Images as (1, 16, 16) float tensors, standardized; labels 0–9."""

    classes: ClassVar[list[str]] = [str(d) for d in range(10)]  # torchvision's convention: the class count

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def digits16() -> tuple[Dataset, tuple[torch.Tensor, torch.Tensor]]:
    """The factory the harness calls (``--data my_data:digits16``): 1 437 training and 360 test images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # a fixed split
    x, y = x[order], y[order]
    mean, std = x[360:].mean(), x[360:].std()
    x = (x - mean) / std
    return Digits16(x[360:], y[360:]), (x[:360], y[:360])
