"""A model of your own for the normkit harness: a small residual CNN with BatchNorm.

The harness calls ``small_resnet(num_classes=..., in_shape=...)`` (``in_shape`` is one example's shape,
here ``(1, 16, 16)``) and trains whatever ``nn.Module`` it returns. ``--norm brn`` turns its BatchNorm layers
into Batch Renormalization, ``--optimizer sgdg`` finds the convolutions that feed them from the graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + y)


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*(Block(channels) for _ in range(blocks)))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_resnet(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """The factory the harness calls (``--model my_model:small_resnet``)."""
    if len(in_shape) != 3:
        raise ValueError(f"small_resnet takes images (C, H, W), got examples of shape {in_shape}")
    return SmallResNet(in_shape[0], num_classes)
