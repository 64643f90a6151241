"""The README's Python snippets run as pasted: each block gets only a tiny model and loader (``model``,
``train_loader``) and must bring every import itself. Plus the structure summary the README shows."""

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def tiny_conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def prelude() -> dict:
    """What a reader already has: a model and a loader of (inputs, labels) batches — nothing imported."""
    batch = (torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    return {"model": tiny_conv_net(), "train_loader": [batch]}


@pytest.fixture
def clean_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write runs/ write them here
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # the scaling-out snippet's group of one process
        dist.destroy_process_group()
    if "normkit.integrations.timm" in sys.modules:
        sys.modules["normkit.integrations.timm"].unregister()


def test_readme_has_the_snippets():
    assert len(SNIPPETS) >= 9
    assert all("import" in s for s in SNIPPETS)


@pytest.mark.filterwarnings("ignore:ENorm")  # the generic snippet on this conv net balances what it can
@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's notes about the machine
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.strip().splitlines()[-1][:40] for s in SNIPPETS])
def test_readme_snippet_runs(snippet, clean_state):
    ns = prelude()
    exec(compile(snippet, "README.md", "exec"), ns)
    # Whatever optimizer the snippet built must take a real step on the model.
    for value in list(ns.values()):
        if isinstance(value, torch.optim.Optimizer):
            x, y = ns["train_loader"][0]
            before = [p.detach().clone() for p in ns["model"].parameters()]
            value.zero_grad()
            nn.functional.cross_entropy(ns["model"](x), y).backward()
            value.step()
            assert any(not torch.equal(a, p) for a, p in zip(before, ns["model"].parameters()))


def test_graph_summary_lists_layers_in_order_and_groups():
    import normkit

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.late = nn.Conv2d(4, 4, 1)  # registered before "early", runs after it
            self.early = nn.Conv2d(4, 4, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x)))
            h = self.late(self.early(h)) + h
            return self.head(h.mean((2, 3)))

    text = str(normkit.graph.trace(Residual()))
    rows = [line.split()[1] for line in text.splitlines()[2:7]]
    assert rows == ["conv", "bn", "early", "late", "head"]  # execution order, not registration order
    assert "feed a per-channel normalization (scale-invariant): conv\n" in text
    assert "summed by residual additions: bn, late" in text
    assert repr(normkit.graph.trace(Residual())) == text
