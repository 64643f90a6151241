"""Which weights the graph calls scale invariant (``grassmann_param_groups`` and
``scale_invariant_param_groups``), checked by measuring the model's output: ×3 on a selected weight (a
different positive factor per row for row-wise ones) must leave the output unchanged; ``unit_init`` must too.
Shared weights count at every use."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from normkit.optim import grassmann_param_groups, scale_invariant_param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


class SharedOneUseBN(nn.Module):
    """The issue's repro: one weight used twice, only one use feeds BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.b.weight = self.a.weight
        self.bn, self.head = nn.BatchNorm1d(16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.a(x)) + self.b(x)))


class SharedBothBN(nn.Module):
    """One weight used twice, both uses into their own BatchNorm: invariant at every use."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.b.weight = self.a.weight
        self.bn1, self.bn2, self.head = nn.BatchNorm1d(16), nn.BatchNorm1d(16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn1(self.a(x))) + self.bn2(self.b(x)))


class DirectRead(nn.Module):
    """A weight feeding BatchNorm through its layer and also read directly by the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.head = nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.a(x))) + x @ self.a.weight.t())


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # train mode: the normalization uses the batch statistics, which is where the invariance holds (the
    # running statistics it updates do not enter the output)
    model.train()
    with torch.no_grad():
        return model(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _change(model: nn.Module, x: torch.Tensor, w: torch.Tensor, per_row: bool) -> float:
    """Relative output change when ``w`` is rescaled by 3 (per row: 0.5 ... 4, one factor per row)."""
    before = _out(model, x)
    saved = w.detach().clone()
    with torch.no_grad():
        if per_row:
            w.mul_(torch.linspace(0.5, 4.0, w.shape[0], dtype=w.dtype).view(-1, *([1] * (w.dim() - 1))))
        else:
            w.mul_(3.0)
        after = _out(model, x)
        w.copy_(saved)
    return _rel(after, before)


def _small_eps(model: nn.Module) -> nn.Module:
    # BatchNorm's ε (1e-5 added to the variance) breaks the invariance by ~1e-5 for weights of this size
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-14
    return model


def _models() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    models = [
        ("shared-one-bn", SharedOneUseBN().double(), torch.randn(32, 16, dtype=torch.float64)),
        ("shared-both-bn", SharedBothBN().double(), torch.randn(32, 16, dtype=torch.float64)),
        ("direct-read", DirectRead().double(), torch.randn(32, 16, dtype=torch.float64)),
        (
            "resnet18",
            torchvision.models.resnet18(weights=None, num_classes=10).double(),
            torch.randn(4, 3, 16, 16, dtype=torch.float64),
        ),
    ]
    return [(name, _small_eps(model), x) for name, model, x in models]


def test_shared_weight_with_one_bn_use_is_not_selected() -> None:
    model, x = SharedOneUseBN().double(), torch.randn(32, 16, dtype=torch.float64)
    w = model.a.weight
    assert _change(model, x, w, per_row=False) > 1e-2  # measured: not scale invariant
    groups = grassmann_param_groups(model, 0.1, 0.2, example_input=x)
    assert not any(g["grassmann"] and any(p is w for p in g["params"]) for g in groups)
    groups = scale_invariant_param_groups(model, example_input=x)
    assert not any(g["projection"] != "none" and any(p is w for p in g["params"]) for g in groups)


@pytest.mark.parametrize("index", range(4))
def test_selected_weights_are_scale_invariant_measured(index: int) -> None:
    name, model, x = _models()[index]
    grass = [
        p
        for g in grassmann_param_groups(model, 0.1, 0.2, unit_init=False)
        if g["grassmann"]
        for p in g["params"]
    ]
    groups = scale_invariant_param_groups(model, example_input=x)
    rows = [p for g in groups if g["projection"] == "row" for p in g["params"]]
    tensors = [p for g in groups if g["projection"] == "tensor" for p in g["params"]]
    expected = {"shared-one-bn": 0, "shared-both-bn": 1, "direct-read": 0}.get(name)
    if expected is not None:
        assert len(grass) == len(rows) == expected, name
    else:
        assert len(grass) >= 19  # every conv of resnet18 feeds a BatchNorm
    assert {id(p) for p in grass} == {id(p) for p in rows}, name  # the two helpers agree
    for w in rows:
        assert _change(model, x, w, per_row=True) < 1e-9, name
    for w in tensors:
        assert _change(model, x, w, per_row=False) < 1e-9, name
    # and every weight left out really matters (for these models): ×3 changes the output
    chosen = {id(p) for p in grass}
    for p in model.parameters():
        if p.dim() >= 2 and id(p) not in chosen and name != "resnet18":
            assert _change(model, x, p, per_row=False) > 1e-3, name


@pytest.mark.parametrize("index", range(4))
def test_unit_init_keeps_the_output(index: int) -> None:
    _, model, x = _models()[index]
    before = _out(model, x)
    grassmann_param_groups(model, 0.1, 0.2, example_input=x)
    assert _rel(_out(model, x), before) < 1e-9
