"""ENorm and the graph helpers on sharded models: FSDP2 ``fully_shard`` and plain DTensor parameters
(``Shard(0)`` / ``Replicate()``), 2 gloo processes against one process on the same global batch.

One spawn runs every case (spawning costs seconds); the tests below read its results.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.distributed import run_gloo

WORLD = 2
STEPS = 4


# --- models (widths 5 and 7: shards of 3 + 2 and 4 + 3 rows, uneven) --------------------------------------


def mlp(norm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 5, bias=False)]
    if norm:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.ReLU(), nn.Linear(5, 7, bias=True)]
    if norm:
        layers.append(nn.BatchNorm1d(7))
    layers += [nn.ReLU(), nn.Dropout(0.0), nn.Linear(7, 3)]
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.BatchNorm1d):  # spread statistics and γ so that every mode matters
                layer.running_mean.copy_(torch.randn(layer.num_features, generator=gen))
                layer.running_var.copy_(torch.rand(layer.num_features, generator=gen) + 0.5)
                layer.weight.copy_(torch.randn(layer.num_features, generator=gen))
    # Eval mode: the normalization uses its running statistics, so the function does not depend on how the
    # batch is split over the ranks (train-mode BatchNorm would need SyncBatchNorm for that comparison).
    return model.eval()


def convnet() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, bias=False),
        nn.ReLU(),
        nn.Conv2d(5, 7, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),  # each of conv2's 7 channels is a block of 4 of the Linear's inputs
        nn.Linear(7 * 2 * 2, 3),
    )


class Residual(nn.Module):
    """Convs into BatchNorm, a residual addition and a flatten: for the graph helpers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = x + self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.head(torch.flatten(F.max_pool2d(x, 2), 1))


def _shard(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if isinstance(m, kinds):
            fully_shard(m)
    fully_shard(model)
    return model


def _full(t: Any) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _optimizer(name: str, params: Any) -> torch.optim.Optimizer | None:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01)
    return None


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _train(
    model: nn.Module, opt: torch.optim.Optimizer | None, enorm: Any, rank: int | None, shape: tuple[int, ...]
) -> None:
    """STEPS steps on the same global batches; with ``rank`` the rank's half of each."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(8, *shape, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        if rank is not None:
            x, y = x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]
        if opt is not None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if enorm is not None:
            enorm.step()


def _compare(ref: nn.Module, sharded: nn.Module, o1: Any, o2: Any) -> float:
    """Largest relative difference over parameters, buffers and optimizer state."""
    err = 0.0
    for (_, p), q in zip(ref.named_parameters(), sharded.parameters()):
        err = max(err, _rel(_full(q).detach(), p.detach()))
        if o1 is not None:
            for key, value in o1.state[p].items():
                if key != "step":
                    err = max(err, _rel(_full(o2.state[q][key]), value))
    for p, q in zip(ref.buffers(), sharded.buffers()):
        if p.is_floating_point():
            err = max(err, _rel(_full(q), p))
    return err


# --- the spawned function: every case ----------------------------------------------------------------------


def _enorm_fsdp_cases(rank: int) -> dict[str, Any]:
    from normkit.enorm import ENorm

    out: dict[str, Any] = {}
    for opt_name in ("sgd", "adam", "none"):
        for mode in ("stop", "ignore", "affine"):
            for sweep in ("sequential", "simultaneous"):
                base = mlp(norm=mode != "stop")
                ref, plain = base, copy.deepcopy(base)
                sharded = _shard(copy.deepcopy(base), (nn.Linear, nn.BatchNorm1d))
                o1, o2 = _optimizer(opt_name, ref.parameters()), _optimizer(opt_name, sharded.parameters())
                o0 = _optimizer(opt_name, plain.parameters())
                kw = dict(c=1.2, norm_layers=mode, sweep=sweep)
                e1 = _quiet(ENorm, ref, o1, **kw)
                e2 = _quiet(ENorm, sharded, o2, **kw)
                if o0 is None:  # without an optimizer: perturb the balance so the cycles have work to do
                    with torch.no_grad():
                        for m in (ref, sharded, plain):
                            layer = m[0]
                            w = layer.weight
                            scale = torch.linspace(0.2, 3.0, 5)[:, None]
                            if hasattr(w, "to_local"):
                                from torch.distributed.tensor import distribute_tensor

                                scale = distribute_tensor(scale.expand(5, 6), w.device_mesh, w.placements)
                            w.mul_(scale)
                _train(ref, o1, e1, None, (6,))
                _train(sharded, o2, e2, rank, (6,))
                _train(plain, o0, None, None, (6,))
                key = f"mlp/{opt_name}/{mode}/{sweep}"
                out[key] = {
                    "err": _compare(ref, sharded, o1, o2),
                    "groups": ([g.producers for g in e1.groups], [g.producers for g in e2.groups]),
                    "moved": max(
                        _rel(p.detach(), q.detach()) for p, q in zip(ref.parameters(), plain.parameters())
                    ),
                }
    # conv -> conv -> flatten -> linear, discovered with an example input (meta shape propagation)
    for sweep in ("sequential", "simultaneous"):
        base = convnet()
        ref, sharded = base, _shard(copy.deepcopy(base), (nn.Conv2d, nn.Linear))
        o1, o2 = _optimizer("sgd", ref.parameters()), _optimizer("sgd", sharded.parameters())
        x = torch.randn(2, 3, 6, 6)
        e1 = _quiet(ENorm, ref, o1, c=1.1, sweep=sweep, example_input=x)
        e2 = _quiet(ENorm, sharded, o2, c=1.1, sweep=sweep, example_input=x[rank : rank + 1])
        _train(ref, o1, e1, None, (3, 6, 6))
        _train(sharded, o2, e2, rank, (3, 6, 6))
        out[f"conv/{sweep}"] = {
            "err": _compare(ref, sharded, o1, o2),
            "groups": (
                [(g.producers, g.consumers) for g in e1.groups],
                [(g.producers, g.consumers) for g in e2.groups],
            ),
        }
    return out


def _plain_dtensor_cases(rank: int) -> dict[str, Any]:
    """Parameters made DTensors by hand: alternately Shard(0) and Replicate(), float64, SGD with momentum."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from normkit.enorm import ENorm

    mesh = init_device_mesh("cpu", (WORLD,))
    out: dict[str, Any] = {}
    for sweep in ("sequential", "simultaneous"):
        ref = mlp(norm=False).double()
        dist_model = copy.deepcopy(ref)
        for i, (_, module) in enumerate(n for n in dist_model.named_modules() if isinstance(n[1], nn.Linear)):
            placement = Shard(0) if i % 2 == 0 else Replicate()
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [placement])))
        o1 = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        o2 = torch.optim.SGD(dist_model.parameters(), lr=0.1, momentum=0.9)
        e1 = ENorm(ref, o1, c=1.2, sweep=sweep, cycles=2)
        e2 = ENorm(dist_model, o2, c=1.2, sweep=sweep, cycles=2)
        gen = torch.Generator().manual_seed(3)
        for _ in range(STEPS):  # the same gradients on both, fed as DTensors with the parameter's placement
            for p, q in zip(ref.parameters(), dist_model.parameters()):
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.grad = g
                q.grad = distribute_tensor(g, mesh, q.placements)
            o1.step()
            o2.step()
            e1.step()
            e2.step()
        out[f"dtensor/{sweep}"] = _compare(ref, dist_model, o1, o2)
    # a weight sharded on dim 1: its rows are spread over the ranks -> a clear error, nothing changed
    model = mlp(norm=False)
    w = model[2].weight
    model[2].weight = nn.Parameter(distribute_tensor(w.detach(), mesh, [Shard(1)]))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
    before = [_full(p).clone() for p in model.parameters()]
    try:
        ENorm(model, None).cycle()
        out["shard1"] = None
    except ValueError as exc:
        out["shard1"] = str(exc)
    out["shard1_untouched"] = all(torch.equal(_full(p), b) for p, b in zip(model.parameters(), before))
    # a grouped conv whose shards cut a group in two: refused, naming the fix
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 1, groups=3), nn.ReLU(), nn.Conv2d(6, 2, 1)
    )
    net = _shard(net, (nn.Conv2d,))
    try:
        _quiet(ENorm, net, None).cycle()
        out["groups"] = None
    except ValueError as exc:
        out["groups"] = str(exc)
    return out


def _names(model: nn.Module, groups: list[dict[str, Any]]) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (tuple(names[id(p)] for p in g["params"]), {k: v for k, v in g.items() if k != "params"})
        for g in groups
    ]


def _graph_cases(rank: int) -> dict[str, Any]:
    import torchvision

    from normkit.enorm import discover_groups
    from normkit.graph import trace
    from normkit.optim import grassmann_param_groups, scale_invariant_param_groups

    out: dict[str, Any] = {}
    cases = [
        ("residual", Residual, torch.randn(2, 3, 8, 8), (nn.Conv2d, nn.Linear)),
        (
            "resnet18",
            lambda: torchvision.models.resnet18(weights=None, num_classes=10),
            torch.randn(2, 3, 32, 32),
            (torchvision.models.resnet.BasicBlock,),
        ),
    ]
    for name, build, x, kinds in cases:
        torch.manual_seed(0)
        ref = build()
        sharded = _shard(copy.deepcopy(ref), kinds)

        def summary(model: nn.Module, x: torch.Tensor = x) -> Any:
            g = trace(model, x)
            return [
                (
                    n.name,
                    n.kind,
                    n.output_shape,
                    [(e.dst, tuple(op.kind for op in e.ops)) for e in n.consumers],
                )
                for n in g
            ]

        out[f"{name}/trace"] = (summary(ref), summary(sharded))
        for fn, kw in (
            (grassmann_param_groups, dict(lr=0.1, lr_g=0.2, unit_init=False, example_input=x)),
            (scale_invariant_param_groups, dict(example_input=x)),
        ):
            out[f"{name}/{fn.__name__}"] = (_names(ref, fn(ref, **kw)), _names(sharded, fn(sharded, **kw)))
        for mode in ("stop", "ignore", "affine"):
            found = [
                [(g.producers, g.consumers, g.crossed) for g in discover_groups(m, x, norm_layers=mode)[0]]
                for m in (ref, sharded)
            ]
            out[f"{name}/enorm/{mode}"] = tuple(found)
        # unit_init on the shards: the full weights equal the one-process unit rows
        grassmann_param_groups(ref, 0.1, 0.2, example_input=x)
        grassmann_param_groups(sharded, 0.1, 0.2, example_input=x)
        out[f"{name}/unit_init"] = max(
            _rel(_full(q).detach(), p.detach()) for p, q in zip(ref.parameters(), sharded.parameters())
        )
        # the sharded model still runs after the analysis (no meta tensor left behind)
        out[f"{name}/runs"] = bool(torch.isfinite(sharded(x)).all())
    return out


def _all_cases(rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    return {**_enorm_fsdp_cases(rank), **_plain_dtensor_cases(rank), **_graph_cases(rank)}


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    ranks = run_gloo(_all_cases, WORLD)
    return ranks[0]  # type: ignore[no-any-return]


def test_enorm_fsdp_equals_one_process_in_every_mode(results: dict[str, Any]) -> None:
    keys = [k for k in results if k.startswith("mlp/")]
    assert len(keys) == 18
    for key in keys:
        r = results[key]
        assert r["err"] <= 1e-5, (key, r["err"])
        assert r["groups"][0] == r["groups"][1] and r["groups"][0], key
        assert r["moved"] > 1e-3, key  # ENorm did change the training (else the comparison proves nothing)


def test_enorm_fsdp_conv_flatten_with_example_input(results: dict[str, Any]) -> None:
    for sweep in ("sequential", "simultaneous"):
        r = results[f"conv/{sweep}"]
        assert r["err"] <= 1e-5, (sweep, r["err"])
        assert r["groups"][0] == r["groups"][1]
        assert [c for _, cons in r["groups"][0] for c in cons] == [("2", 0, 1), ("6", 0, 4)]


def test_enorm_plain_dtensor_shard0_and_replicate(results: dict[str, Any]) -> None:
    for sweep in ("sequential", "simultaneous"):
        assert results[f"dtensor/{sweep}"] <= 1e-12, sweep


def test_enorm_refuses_placements_it_cannot_balance(results: dict[str, Any]) -> None:
    assert "Shard(dim=1)" in results["shard1"] and "Shard(0)" in results["shard1"]
    assert results["shard1_untouched"]
    assert "whole groups" in results["groups"] and "fully_shard" in results["groups"]


@pytest.mark.parametrize("model", ["residual", "resnet18"])
def test_graph_helpers_on_fsdp_equal_unwrapped(results: dict[str, Any], model: str) -> None:
    ref, sharded = results[f"{model}/trace"]
    assert ref == sharded and len(ref) > 3
    for fn in ("grassmann_param_groups", "scale_invariant_param_groups"):
        ref, sharded = results[f"{model}/{fn}"]
        assert ref == sharded, fn
        assert any(g.get("grassmann") or g.get("projection") == "row" for _, g in ref)
    for mode in ("stop", "ignore", "affine"):
        ref, sharded = results[f"{model}/enorm/{mode}"]
        assert ref == sharded, mode
    assert results[f"{model}/unit_init"] <= 1e-6
    assert results[f"{model}/runs"]
