"""LSUV: normkit.init.lsuv_init against PyPI ``lsuv`` 0.3.0 (the paper author's package).

Models: a plain net of 20 conv layers (3×3, 64 channels, ReLU, no normalization) + linear head on 32×32
inputs, and WRN-16-4 (pre-activation wide ResNet, with BatchNorm), batch 128. Both initializers do the
orthonormal pre-init and LSUV with tol 0.1, 10 tries; each call is timed end to end (interleaved repetitions,
medians), and the full forward passes of the model are counted by a forward pre-hook on the model.

``lsuv`` is installed only for the benchmark, outside the project's environment, in a throwaway venv
(default ``/tmp/lsuv_venv``, override with ``NORMKIT_LSUV_PYTHON=/path/to/python``). The whole measurement —
normkit and lsuv, interleaved — then runs in one subprocess of that Python, which sees the same torch
through a ``.pth`` file. Without it, the table says so and only normkit is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

TITLE = "LSUV initialization vs PyPI lsuv 0.3.0 (wall time, full forward passes)"
HERE = Path(__file__).resolve().parent
DEFAULT_PEER_PYTHON = "/tmp/lsuv_venv/bin/python"


def plain_net(depth: int = 20, width: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


class _WideBlock(nn.Module):
    """Pre-activation basic block of a wide ResNet (Zagoruyko & Komodakis 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k for 32×32 inputs: depth = 6n + 4."""

    def __init__(self, depth: int = 16, k: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for g, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                blocks.append(_WideBlock(cin, widths[g + 1], stride if i == 0 else 1))
                cin = widths[g + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _count_forwards(model: nn.Module, fn: Any) -> int:
    count = [0]
    handle = model.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        fn()
    finally:
        handle.remove()
    return count[0]


def _cases(quick: bool) -> list[tuple[str, nn.Module, dict[str, Any]]]:
    return [
        ("plain 20-conv net, 64 ch", plain_net(), {}),
        ("WRN-16-4 (convs into BN keep orthogonal init)", WideResNet(16, 4), {}),
        ("WRN-16-4, skip_normalized=False (all 17 layers)", WideResNet(16, 4), {"skip_normalized": False}),
    ]


def _measure(quick: bool, with_peer: bool) -> list[dict[str, Any]]:
    """Runs in the process that can import both (the peer's venv), or in ours when the peer is missing."""
    from benchmarks.timing import measure_ratio
    from normkit.init import lsuv_init

    torch.manual_seed(0)
    batch = 16 if quick else 128
    x = torch.randn(batch, 3, 32, 32)
    repeats, warmup = (1, 0) if quick else (3, 1)
    rows = []
    for name, model, kwargs in _cases(quick):
        model.eval()  # both initializers run the model in eval mode
        ours = lambda model=model, kwargs=kwargs: lsuv_init(model, x, **kwargs)
        row: dict[str, Any] = {"case": name, "layers": len(ours().initialized)}
        row["ours_fwd"] = _count_forwards(model, ours)
        if with_peer:
            import lsuv  # the PyPI package, importable only in the peer's venv

            peer = lambda model=model: lsuv.lsuv_with_singlebatch(model, x, verbose=False)
            row["peer_fwd"] = _count_forwards(model, peer)
            r = measure_ratio(name, ours, "lsuv 0.3.0", peer, repeats=repeats, inner=1, warmup=warmup)
            row["ours_ms"], row["peer_ms"] = r.candidate_ms, r.reference_ms
        else:
            r = measure_ratio(name, ours, "itself", ours, repeats=repeats, inner=1, warmup=warmup)
            row["ours_ms"] = r.candidate_ms
        rows.append(row)
    return rows


def _peer_python() -> str | None:
    python = os.environ.get("NORMKIT_LSUV_PYTHON", DEFAULT_PEER_PYTHON)
    if not Path(python).exists():
        return None
    probe = subprocess.run([python, "-c", "import lsuv, torch"], capture_output=True, text=True)
    return python if probe.returncode == 0 else None


def run(quick: bool) -> tuple[list[str], list[list[str]]]:
    python = _peer_python()
    if python is None:
        rows = _measure(quick, with_peer=False)
        peer_note = "lsuv 0.3.0 not found (NORMKIT_LSUV_PYTHON)"
    else:
        root = HERE.parent
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root), env.get("PYTHONPATH", "")])
        env["NORMKIT_BENCH_THREADS"] = str(torch.get_num_threads())
        cmd = [python, "-m", "benchmarks.bench_lsuv", "--worker"] + (["--quick"] if quick else [])
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"lsuv benchmark worker failed:\n{done.stderr[-4000:]}")
        rows = json.loads(done.stdout.strip().splitlines()[-1])
        peer_note = ""
    header = [
        "model (batch 128, 32×32)" if not quick else "model (batch 16, 32×32)",
        "LSUV layers",
        "normkit ms",
        "lsuv 0.3.0 ms",
        "speed-up",
        "normkit fwd passes",
        "lsuv fwd passes",
        "target",
    ]
    table = []
    for i, r in enumerate(rows):
        target = "≤ 2 passes, ≥ 20×" if i == 0 else ""
        if "peer_ms" in r:
            speed = r["peer_ms"] / r["ours_ms"]
            verdict = ""
            if i == 0:
                ok = r["ours_fwd"] <= 2 and speed >= 20
                verdict = " (meets target)" if ok else " (misses target)"
            table.append(
                [
                    r["case"],
                    str(r["layers"]),
                    f"{r['ours_ms']:.0f}",
                    f"{r['peer_ms']:.0f}",
                    f"{speed:.1f}×",
                    str(r["ours_fwd"]),
                    str(r["peer_fwd"]),
                    target + verdict,
                ]
            )
        else:
            table.append(
                [
                    r["case"],
                    str(r["layers"]),
                    f"{r['ours_ms']:.0f}",
                    peer_note,
                    "",
                    str(r["ours_fwd"]),
                    "",
                    target,
                ]
            )
    return header, table


if __name__ == "__main__":
    if "--worker" in sys.argv:
        threads = os.environ.get("NORMKIT_BENCH_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        print(json.dumps(_measure("--quick" in sys.argv, with_peer=True)))
    else:
        header, table = run("--quick" in sys.argv)
        print(header)
        for row in table:
            print(row)
