"""Every optimizer normkit registers in timm, built through timm's own factory (``create_optimizer_v2``):
what timm expects of a registered optimizer (a class, its signature, ``eps``), convergence on a Rosenbrock
valley and on a BatchNorm network, the state-dict round trip, dtypes and a compiled step. References: the
function values before and after, the same optimizer run without interruption, float64, the eager step."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

timm_optim = pytest.importorskip("timm.optim")

from normkit.integrations.timm import NAMES, register, unregister  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GRASSMANN = ("sgdg", "adamg")


@pytest.fixture(scope="module", autouse=True)
def registered() -> Iterator[None]:
    register()
    yield
    unregister()


def options(name: str, lr: float | None = None) -> dict[str, Any]:
    """Learning rates per family (SGD-like names take larger ones); clipping needs its threshold."""
    out: dict[str, Any] = {"lr": lr if lr is not None else (0.05 if "sgd" in name else 0.01)}
    if name.startswith("clipped"):
        out["clipnorm"] = 1.0
    return out


def bn_net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).to(
        dtype
    )


def batch(i: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(32, 8, generator=g, dtype=torch.float64)
    teacher = torch.linspace(-1, 1, 24, dtype=torch.float64).view(8, 3)
    return x.to(dtype), torch.tanh(x @ teacher).to(dtype)


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, i: int, dtype: torch.dtype = torch.float32
) -> float:
    x, y = batch(i, dtype)
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("name", NAMES)
def test_registered_entry_is_an_optimizer_class_with_its_real_signature(name: str) -> None:
    cls = timm_optim.get_optimizer_class(name, bind_defaults=False)
    assert isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
    info = timm_optim.get_optimizer_info(name)
    parameters = inspect.signature(cls).parameters
    assert info.has_eps == ("eps" in parameters)
    assert info.has_betas == ("betas" in parameters)
    assert info.has_momentum == ("momentum" in parameters)
    # timm's eps reaches the class when it has one (its fp16 eps fix depends on it), and is dropped otherwise
    opt = timm_optim.create_optimizer_v2(bn_net(), name, eps=1e-3, **options(name))
    assert isinstance(opt, cls)
    eps_seen = {g.get("eps") for g in opt.param_groups}
    assert eps_seen == ({1e-3} if info.has_eps else {None})


def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    return (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2


@pytest.mark.parametrize("name", [n for n in NAMES if n not in GRASSMANN])
def test_rosenbrock_valley(name: str) -> None:
    xy = nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
    opt = timm_optim.create_optimizer_v2([xy], name, **options(name, lr=1e-3 if "sgd" in name else 1e-2))
    start = float(rosenbrock(xy.detach()))
    dist0 = float(torch.dist(xy.detach(), torch.ones(2, dtype=torch.float64)))
    for _ in range(1500):
        opt.zero_grad()
        rosenbrock(xy).backward()
        opt.step()
    end = float(rosenbrock(xy.detach()))
    assert end < 0.1 * start
    assert float(torch.dist(xy.detach(), torch.ones(2, dtype=torch.float64))) < dist0


@pytest.mark.parametrize("name", NAMES)
def test_bn_network_learns_the_teacher(name: str) -> None:
    model = bn_net()
    opt = timm_optim.create_optimizer_v2(model, name, **options(name))
    losses = [train_step(model, opt, i % 8) for i in range(120)]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.5 * first, (first, last)
    if name in GRASSMANN:  # the BN-input weight stayed on the manifold: unit rows
        rows = model[0].weight.detach().norm(dim=1)
        torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_bit_exactly(name: str) -> None:
    model = bn_net()
    opt = timm_optim.create_optimizer_v2(model, name, **options(name))
    for i in range(5):
        train_step(model, opt, i)
    twin = bn_net()
    twin_opt = timm_optim.create_optimizer_v2(twin, name, **options(name, lr=0.123))  # other settings
    twin.load_state_dict(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    twin_opt.load_state_dict(copy.deepcopy(saved))
    assert [g["lr"] for g in twin_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    for i in range(5, 10):
        train_step(model, opt, i)
        train_step(twin, twin_opt, i)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q), f"{name}: step {i} differs after the round trip"
    assert _flat(opt.state_dict()) == _flat(twin_opt.state_dict())


def _flat(sd: dict[str, Any]) -> list[Any]:
    """A state_dict as comparable leaves (tensors as tuples of their values)."""
    out: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                out.append(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, torch.Tensor):
            out.append((x.dtype, tuple(x.reshape(-1).tolist())))
        else:
            out.append(x)

    walk(sd)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_float64_model_stays_float64_and_agrees_with_float32(name: str) -> None:
    runs = {}
    for dtype in (torch.float32, torch.float64):
        model = bn_net(dtype)
        opt = timm_optim.create_optimizer_v2(model, name, **options(name))
        for i in range(4):
            train_step(model, opt, i, dtype)
        assert all(p.dtype == dtype for p in model.parameters())
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step" and value.is_floating_point():
                    assert value.dtype == dtype, (key, value.dtype)
        runs[dtype] = model
    for p32, p64 in zip(runs[torch.float32].parameters(), runs[torch.float64].parameters()):
        torch.testing.assert_close(p32.double(), p64, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_matches_eager(name: str) -> None:
    model, twin = bn_net(), bn_net()
    opt = timm_optim.create_optimizer_v2(model, name, **options(name))
    twin_opt = timm_optim.create_optimizer_v2(twin, name, **options(name))
    compiled = torch.compile(opt.step, backend="eager")
    before = [p.detach().clone() for p in model.parameters()]
    for i in range(2):
        for m, o, step in ((model, opt, compiled), (twin, twin_opt, twin_opt.step)):
            x, y = batch(i)
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", GRASSMANN)
def test_grassmann_names_on_a_model_without_batchnorm_say_why(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError) as err:
        timm_optim.create_optimizer_v2(model, name, lr=0.01)
    message = str(err.value)
    assert "BatchNorm" in message and "'sgd'" in message and "Pass the model" not in message
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # no unit_init happened
    # a parameter list (no model) gets the other advice
    with pytest.raises(ValueError, match="Pass the model itself"):
        timm_optim.create_optimizer_v2(list(model.parameters()), name, lr=0.01)
