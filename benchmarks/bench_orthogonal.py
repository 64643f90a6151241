"""Orthogonal init: ``normkit.init.orthogonal_init`` vs ``torch.nn.init.orthogonal_`` on large layers.

One layer per model, float32: VGG-16's first classifier layer (Linear 25088 → 4096, a 4096 × 25088 weight,
103 M parameters), a 4096 × 4096 linear layer and a 3×3 conv with 512 → 512 channels. Both do one QR of the
Gaussian matrix (float32, as torch) with the sign fix; ``orthogonal_init`` also zeroes the bias and keeps a
copy of the layer to restore on failure. Each call is timed end to end (interleaved repetitions, medians).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks.timing import Ratio, measure_ratio
from normkit.init import orthogonal_init

TITLE = "orthogonal_init vs torch.nn.init.orthogonal_ (float32, one layer)"


def _layers(quick: bool) -> list[tuple[str, nn.Module, int]]:
    if quick:
        return [
            ("Linear 6272 → 1024", nn.Linear(6272, 1024), 3),
            ("Conv2d 128 → 128, 3×3", nn.Conv2d(128, 128, 3), 5),
        ]
    return [
        ("Linear 25088 → 4096 (VGG-16 fc6)", nn.Linear(25088, 4096), 3),
        ("Linear 4096 → 4096", nn.Linear(4096, 4096), 5),
        ("Conv2d 512 → 512, 3×3", nn.Conv2d(512, 512, 3), 7),
    ]


def run(quick: bool) -> list[Ratio]:
    results = []
    for name, layer, repeats in _layers(quick):
        gen = torch.Generator().manual_seed(0)
        torch_gen = torch.Generator().manual_seed(0)
        results.append(
            measure_ratio(
                f"{name}, weight {tuple(layer.weight.shape)}",
                lambda layer=layer, gen=gen: orthogonal_init(layer, generator=gen),
                "torch.nn.init.orthogonal_",
                lambda layer=layer, g=torch_gen: nn.init.orthogonal_(layer.weight, generator=g),
                repeats=repeats,
                inner=1,
                warmup=0,
                target=1.0,
            )
        )
        r = results[-1]
        print(
            f"{r.name}: {r.ratio:.2f}× ({r.candidate_ms / 1e3:.2f} / {r.reference_ms / 1e3:.2f} s)",
            flush=True,
        )
    return results
