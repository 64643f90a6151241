"""ENorm: function preservation, the fixed point, optimizer-state transformation, structure, errors, DDP."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from normkit.enorm import ENorm, ENormStructureError, balance_factors, unit_norms
from normkit.nn import BatchRenorm1d
from tests.distributed import run_gloo

# --- models ---------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.LeakyReLU(0.1),
        nn.Dropout(0.2),
        nn.Linear(16, 12),
        nn.PReLU(),
        nn.Linear(12, 3),
    )


def conv_pools() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.ZeroPad2d(1),
        nn.Conv2d(8, 6, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    )


class ConvFlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc1 = nn.Linear(5 * 7 * 7, 10)
        self.fc2 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


def conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 8, 5),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(8, 8, 3, groups=2),
        nn.ReLU(),
        nn.Conv1d(8, 4, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6, 2),
    )


def conv_transpose_net() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.ConvTranspose2d(6, 6, 3, groups=3),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, groups=2),
        nn.ReLU(),
        nn.ConvTranspose2d(6, 2, 1),
    )


def bn_between() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 12),
        BatchRenorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 3),
    )


class ResidualMLP(nn.Module):
    """Residual stream without normalization: fc_in, fc2 and fc4 are tied by the additions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(10, 16)
        self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 16)
        self.fc3, self.fc4 = nn.Linear(16, 24), nn.Linear(24, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        h = h + self.fc2(F.relu(self.fc1(F.relu(h))))
        h = h + self.fc4(F.relu(self.fc3(F.relu(h))))
        return self.head(F.relu(h))


class BasicBlockNet(nn.Module):
    """A ResNet basic block (BatchNorm) between a stem and a head, with a 1x1 projection shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.proj = nn.Conv2d(8, 12, 1)
        self.head = nn.Conv2d(12, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = F.relu(y + self.proj(x))
        y = F.relu(self.head(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class WRNBlock(nn.Module):
    """Wide-ResNet block (Zagoruyko & Komodakis): pre-activation BN-ReLU-conv3x3, dropout, BN-ReLU-conv3x3,
    plus a 1x1 shortcut when the width changes; with ``bn=False`` the same block without normalization."""

    def __init__(self, cin: int, cout: int, stride: int, bn: bool = True) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin) if bn else nn.Identity()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.drop = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=not bn) if cin != cout or stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(self.drop(F.relu(self.bn2(self.conv1(o)))))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WRNNet(nn.Module):
    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=not bn)
        self.block1 = WRNBlock(8, 16, 1, bn)
        self.block2 = WRNBlock(16, 16, 1, bn)
        self.bn = nn.BatchNorm2d(16) if bn else nn.Identity()
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1)
        return self.fc(x.flatten(1))


class SeedFullyConnected(nn.Module):
    """The seed's FC model: Linear (no bias) -> BatchNorm1d -> ReLU, last layer plain (smaller sizes)."""

    def __init__(self, n_layers: int = 4, width: int = 32, d_in: int = 48) -> None:
        super().__init__()
        sizes = [d_in] + [width] * (n_layers - 1) + [10]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(sizes))
        self.bns = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(n_layers - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, bn in zip(self.layers[:-1], self.bns):
            x = F.relu(bn(layer(x)))
        return self.layers[-1](x)


class SeedFullyConvolutional(nn.Module):
    """The seed's 9-conv net (Gitman et al.'s architecture): BN after conv3 and conv6, max pools, avg pool."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        a, b, c = int(128 * width), int(256 * width), int(320 * width)
        self.conv1, self.conv2, self.conv3 = (
            nn.Conv2d(3, a, 3, 1, 1),
            nn.Conv2d(a, a, 3, 1, 1),
            nn.Conv2d(a, a, 3, 1, 1),
        )
        self.conv4, self.conv5, self.conv6 = (
            nn.Conv2d(a, b, 3, 1, 1),
            nn.Conv2d(b, b, 3, 1, 1),
            nn.Conv2d(b, b, 3, 1, 1),
        )
        self.conv7, self.conv8, self.conv9 = (
            nn.Conv2d(b, c, 3, 1, 1),
            nn.Conv2d(c, c, 1),
            nn.Conv2d(c, 10, 1, 1, 1),
        )
        self.bn1, self.bn2 = nn.BatchNorm2d(a), nn.BatchNorm2d(b)
        self.pool1, self.pool2, self.pool3 = nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = self.pool1(F.relu(self.bn1(self.conv3(x))))
        x = F.relu(self.conv5(F.relu(self.conv4(x))))
        x = self.pool2(F.relu(self.bn2(self.conv6(x))))
        x = F.relu(self.conv8(F.relu(self.conv7(x))))
        x = self.pool3(F.relu(self.conv9(x)))
        return x.view(x.size(0), x.size(1))


class DenseBlock(nn.Module):
    """DenseNet-style concatenations: each conv reads the concatenation of all earlier feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 3, 3, padding=1)
        self.c2 = nn.Conv2d(7, 3, 3, padding=1)
        self.head = nn.Linear(10 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = torch.cat([h, F.relu(self.c1(h))], 1)
        h = torch.cat([h, F.relu(self.c2(h))], 1)
        return self.head(torch.flatten(F.max_pool2d(h, 2), 1))


# name -> (factory, input shape, producers of the balanced groups (tied sets joined by "+"))
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], list[str]]] = {
    "mlp_biases": (mlp, (4, 10), ["0", "2", "5"]),
    "conv_max_avg_pool": (conv_pools, (2, 3, 8, 8), ["0", "3", "7"]),
    "conv_flatten_linear": (ConvFlattenLinear, (2, 3, 16, 16), ["conv1", "conv2", "fc1"]),
    "conv1d": (conv1d_net, (2, 3, 20), ["0", "3", "5"]),
    "conv_transpose": (conv_transpose_net, (2, 4, 5, 5), ["0", "2", "4"]),
    "bn_between": (bn_between, (4, 10), ["3"]),
    "residual_mlp": (ResidualMLP, (4, 10), ["fc_in+fc2+fc4", "fc1", "fc3"]),
    "resnet_basic_block": (BasicBlockNet, (2, 3, 8, 8), ["stem", "head"]),
    "wrn_block_bn": (WRNNet, (2, 3, 8, 8), []),
    "wrn_block_no_bn": (
        lambda: WRNNet(bn=False),
        (2, 3, 8, 8),
        ["stem", "block1.conv1", "block1.conv2+block1.shortcut+block2.conv2", "block2.conv1"],
    ),
    "dense_concat": (DenseBlock, (2, 3, 8, 8), ["stem", "c1", "c2"]),
    "seed_fully_connected": (SeedFullyConnected, (4, 48), []),
    "seed_fully_convolutional": (
        lambda: SeedFullyConvolutional(width=0.125),
        (2, 3, 16, 16),
        ["conv1", "conv2", "conv4", "conv5", "conv7", "conv8"],
    ),
}


def _unbalance(model: nn.Module, gen: torch.Generator) -> None:
    """Spread the weights' scales (ReLU-invariant rescalings and plain noise) so that ENorm has work to do."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.mul_(
                    torch.exp(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64)).to(m.weight)
                )
                if m.bias is not None:
                    m.bias.copy_(
                        torch.randn(m.bias.shape, generator=gen, dtype=torch.float64).to(m.bias) * 0.1
                    )
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)


def _groups(enorm: ENorm) -> list[str]:
    return ["+".join(g.producers) for g in enorm.groups]


def _make(name: str, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape, _ = CASES[name]
    torch.manual_seed(seed)
    model = factory().to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    _unbalance(model, gen)
    return model, torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", list(CASES))
def test_function_preserved(name: str, dtype: torch.dtype, tol: float) -> None:
    model, x = _make(name, dtype)
    before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # models with nothing to balance warn so
        enorm = ENorm(model, None, c=1.2, example_input=x)
    assert _groups(enorm) == CASES[name][2]
    weights = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        enorm.step()
    assert _rel(model(x), before) <= tol
    if enorm.groups:  # it did rescale
        assert any(not torch.equal(w, p) for w, p in zip(weights, model.parameters()))


def test_function_preserved_in_train_mode_with_bn() -> None:
    model, x = _make("bn_between", torch.float64)
    model.train()
    for m in model.modules():
        m.momentum = 0.0 if isinstance(m, nn.BatchNorm1d) else getattr(m, "momentum", None)
    before = model(x)
    ENorm(model, None, example_input=x).cycle()
    assert _rel(model(x), before) <= 1e-10


def test_reshape_without_shapes_is_skipped_with_warning() -> None:
    model, x = _make("conv_flatten_linear", torch.float64)
    before = model(x)
    with pytest.warns(UserWarning, match=r"conv2.*view.*example_input"):
        enorm = ENorm(model, None)
    assert _groups(enorm) == ["conv1", "fc1"]
    enorm.cycle()
    assert _rel(model(x), before) <= 1e-10


# --- the objective and its fixed point ------------------------------------------------------------------


def _chain_weights(model: nn.Sequential) -> list[nn.Module]:
    return [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]


def _unit_ratios(layers: list[nn.Module], include_bias: bool = False) -> list[torch.Tensor]:
    """‖outgoing‖ / ‖incoming‖ per hidden unit, computed directly in float64."""
    ratios = []
    for prod, cons in itertools.pairwise(layers):
        w_in = prod.weight.detach().double().flatten(1)
        if include_bias:
            w_in = torch.cat([w_in, prod.bias.detach().double()[:, None]], 1)
        w_out = cons.weight.detach().double().transpose(0, 1).flatten(1)
        ratios.append(w_out.norm(dim=1) / w_in.norm(dim=1))
    return ratios


def _objective(layers: list[nn.Module], c: float) -> float:
    return sum(c ** (-2 * k) * float(m.weight.detach().double().square().sum()) for k, m in enumerate(layers))


@pytest.mark.parametrize("c", [1.0, 1.2])
@pytest.mark.parametrize("include_bias", [False, True])
def test_fixed_point_ratio_equals_c_and_objective_decreases(c: float, include_bias: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU()
    )
    model.append(nn.Linear(7, 2))
    _unbalance(model, torch.Generator().manual_seed(1))
    layers = _chain_weights(model)
    enorm = ENorm(model, None, c=c, include_bias=include_bias)
    assert len(enorm.groups) == 3
    values = [_objective(layers, c)]
    for _ in range(300):
        enorm.cycle()
        values.append(_objective(layers, c))
    if not include_bias:  # block coordinate descent on Σ c^{-2k} ‖W_k‖²: never increases
        assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(values))
        assert values[-1] < 0.9 * values[0]
    for r in _unit_ratios(layers, include_bias):
        torch.testing.assert_close(r, torch.full_like(r, c), rtol=1e-4, atol=0)


def test_fixed_point_l1() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 2))
    _unbalance(model, torch.Generator().manual_seed(4))
    ENorm(model, None, c=1.3, p=1, cycles=300).step()
    for prod, cons in itertools.pairwise(_chain_weights(model)):
        ratio = cons.weight.detach().double().abs().sum(0) / prod.weight.detach().double().abs().sum(1)
        torch.testing.assert_close(ratio, torch.full_like(ratio, 1.3), rtol=1e-4, atol=0)


def test_fixed_point_conv_net() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 5, 3), nn.ReLU())
    model.append(nn.Conv2d(5, 4, 1))
    _unbalance(model, torch.Generator().manual_seed(2))
    enorm = ENorm(model, None, c=1.1, cycles=200)
    enorm.step()
    for r in _unit_ratios(_chain_weights(model)):
        torch.testing.assert_close(r, torch.full_like(r, 1.1), rtol=1e-4, atol=0)


def test_functional_core_against_direct_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    w_in = torch.randn(1, 1, 5, 7, generator=gen)
    w_out = torch.randn(1, 3, 5, 1, generator=gen)
    a = w_in.double().square().sum((1, 3)).flatten()
    b = w_out.double().square().sum((1, 3)).flatten()
    torch.testing.assert_close(unit_norms([w_in]).double(), a)
    d = balance_factors(a, b, c=1.3)
    torch.testing.assert_close(d, (b.sqrt() / (1.3 * a.sqrt())).sqrt())
    # p = 1: the same formula on the l1 norms
    d1 = balance_factors(unit_norms([w_in], 1), unit_norms([w_out], 1), c=1.0, p=1)
    torch.testing.assert_close(d1, (w_out.abs().sum((1, 3)) / w_in.abs().sum((1, 3))).flatten().sqrt())
    # dead units keep d = 1
    dz = balance_factors(torch.tensor([0.0, 1.0, 4.0]), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(dz, torch.tensor([1.0, 1.0, 0.5**0.5]))


# --- optimizer state follows the gradients --------------------------------------------------------------


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


OPTIMIZERS: dict[str, Callable[[list[dict]], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda g: torch.optim.SGD(g, lr=0.0, momentum=0.9),
    "sgd_nesterov": lambda g: torch.optim.SGD(g, lr=0.0, momentum=0.9, nesterov=True),
    "adam": lambda g: torch.optim.Adam(g, lr=0.0),
    "adamw_amsgrad": lambda g: torch.optim.AdamW(g, lr=0.0, amsgrad=True),
}


@pytest.mark.parametrize("name", ["conv_flatten_linear", "residual_mlp"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_state_follows_gradient_of_rescaled_network(opt: str, name: str) -> None:
    model, x = _make(name, torch.float64)
    y = torch.randint(0, 2, (x.shape[0],), generator=torch.Generator().manual_seed(3))
    params = list(model.parameters())
    # several param groups: weights and biases apart
    groups = [{"params": [p for p in params if p.ndim > 1]}, {"params": [p for p in params if p.ndim == 1]}]
    optimizer = OPTIMIZERS[opt](groups)
    g0 = _grads(model, x, y)
    optimizer.step()  # lr = 0: the state holds g (momentum, (1-β1) g, (1-β2) g²), the weights do not move
    enorm = ENorm(model, optimizer, c=1.2, example_input=x)
    enorm.step()
    g1 = _grads(model, x, y)  # gradient of the rescaled network on the same batch
    changed = 0
    for p, a, b in zip(params, g0, g1):
        st = optimizer.state[p]
        changed += int(not torch.allclose(a, b))
        if "momentum_buffer" in st:
            torch.testing.assert_close(st["momentum_buffer"], b, rtol=1e-6, atol=1e-12)
        else:
            torch.testing.assert_close(st["exp_avg"] / 0.1, b, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(st["exp_avg_sq"] / 0.001, b.square(), rtol=1e-6, atol=1e-14)
            if "max_exp_avg_sq" in st:
                torch.testing.assert_close(st["max_exp_avg_sq"] / 0.001, b.square(), rtol=1e-6, atol=1e-14)
    assert changed >= 4  # the gradients did change


def test_before_first_step_and_plain_sgd() -> None:
    model, x = _make("mlp_biases", torch.float64)
    before = model(x)
    for optimizer in (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.optim.Adam(model.parameters()),
    ):
        ENorm(model, optimizer).step()  # empty state: the reference crashed here
    assert _rel(model(x), before) <= 1e-10


def test_unsupported_optimizer_errors_unless_none() -> None:
    model = mlp()
    with pytest.raises(TypeError, match=r"RMSprop.*optimizer=None"):
        ENorm(model, torch.optim.RMSprop(model.parameters()))
    ENorm(model, None)


def test_every_and_cycles() -> None:
    model, _ = _make("mlp_biases", torch.float64)
    reference = copy.deepcopy(model)
    ref = ENorm(reference, None)
    enorm = ENorm(model, None, every=3, cycles=2)
    w0 = model[0].weight.detach().clone()
    enorm.step()
    enorm.step()
    assert torch.equal(model[0].weight, w0)
    enorm.step()
    ref.cycle()
    ref.cycle()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
    assert enorm.state_dict() == {"calls": 3}


def test_cycle_follows_replaced_parameters_and_reloaded_state() -> None:
    """The cycle caches its views of the weights and optimizer state; a replaced parameter or state loaded
    into new tensors must be rescaled, exactly as a fresh ENorm would."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(x), torch.zeros(5, dtype=torch.long)).backward()
    optimizer.step()
    twin, twin_opt = copy.deepcopy((model, optimizer))

    enorm = ENorm(model, optimizer)
    enorm.cycle()
    ENorm(twin, twin_opt).cycle()
    for opt in (optimizer, twin_opt):
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new momentum tensors
    enorm.cycle()
    ENorm(twin, twin_opt).cycle()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["momentum_buffer"], twin_opt.state[q]["momentum_buffer"])

    weights_only = ENorm(model, None)
    weights_only.cycle()
    ENorm(twin, None).cycle()
    for m in (model, twin):
        m[2].weight = nn.Parameter(m[2].weight.detach() * 3.0)  # a new tensor in place of the old one
    weights_only.cycle()
    ENorm(twin, None).cycle()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_skip_last_reproduces_reference_choice() -> None:
    assert _groups(ENorm(mlp(), None, skip_last=True)) == ["0", "2"]


def test_cycle_has_no_host_sync() -> None:
    class NoSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            assert func not in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)
            return func(*args, **(kwargs or {}))

    model, x = _make("residual_mlp", torch.float32)
    optimizer = torch.optim.Adam(model.parameters())
    F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
    optimizer.step()
    enorm = ENorm(model, optimizer)
    with NoSync():
        enorm.step()


# --- structure and errors -------------------------------------------------------------------------------


class AddsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return self.fc3(F.gelu(self.fc2(h + x)))


def test_unsupported_structure_warns_naming_the_node() -> None:
    model = AddsInput().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    before = model(x)
    with pytest.warns(UserWarning, match=r"fc1: their output is added to the model input.*fc2: gelu"):
        enorm = ENorm(model, None)
    assert enorm.groups == []
    assert any("gelu" in reason for _, reason in enorm.skipped)
    enorm.cycle()
    assert _rel(model(x), before) == 0


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            x = -x
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_untraceable_model_error_offers_pairs() -> None:
    model = Untraceable().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ENormStructureError, match=r"could not trace.*pairs=\["):
        ENorm(model, None, example_input=x)
    before = model(x)
    enorm = ENorm(model, None, pairs=[("fc1", "fc2"), ("fc2", "fc3")])
    assert [(g.producers, g.consumers) for g in enorm.groups] == [
        (("fc1",), (("fc2", 0, 1),)),
        (("fc2",), (("fc3", 0, 1),)),
    ]
    enorm.cycle()
    assert _rel(model(x), before) <= 1e-10
    with pytest.raises(ENormStructureError, match="not a Linear"):
        ENorm(model, None, pairs=[("fc1", "nope")])


def test_training_with_enorm_stays_finite() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.ReLU())], nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    enorm = ENorm(model, optimizer, c=1.2)
    x, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        enorm.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))


# --- DDP ------------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    enorm = ENorm(ddp, optimizer, c=1.2)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x_eval = torch.randn(5, 8, generator=torch.Generator().manual_seed(7))
    for _ in range(3):
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 2, (16,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        before = model(x_eval).detach()
        enorm.step()
        assert _rel(model(x_eval).detach(), before) <= 1e-5
    return [p.detach().clone() for p in model.parameters()] + [
        optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()
    ]


def test_ddp_ranks_stay_identical() -> None:
    r0, r1 = run_gloo(_ddp_worker, 2)
    for a, b in zip(r0, r1):
        assert torch.equal(a, b)


def test_tied_and_parametrized_weights_are_left_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    model.append(nn.Linear(4, 2))
    model[2].weight = model[0].weight  # tied: rescaling one would rescale the other
    nn.utils.parametrizations.weight_norm(model[6])
    model = model.double()
    x = torch.randn(3, 4, dtype=torch.float64)
    _unbalance(model, torch.Generator().manual_seed(0))
    before = model(x)
    with pytest.warns(UserWarning, match=r"shares a parameter.*parametrized"):
        enorm = ENorm(model, None)
    assert _groups(enorm) == []
    enorm.cycle()
    assert _rel(model(x), before) == 0


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=2, max_size=6),
    c=st.floats(0.5, 2.0),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_mlps_keep_their_function(widths: list[int], c: float, bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential()
    for a, b in itertools.pairwise([3, *widths]):
        model.append(nn.Linear(a, b, bias=bias))
        model.append(nn.ReLU())
    model.append(nn.Linear(widths[-1], 2)).double()
    _unbalance(model, torch.Generator().manual_seed(seed))
    x = torch.randn(5, 3, dtype=torch.float64)
    before = model(x)
    enorm = ENorm(model, None, c=c, cycles=3, include_bias=bias)
    assert len(enorm.groups) == len(widths)
    enorm.step()
    assert float((model(x) - before).abs().max()) <= 1e-10 * max(1.0, float(before.abs().max()))


@pytest.mark.parametrize("train", [False, True])
def test_rescaling_across_bn_would_change_the_function(train: bool) -> None:
    """Why a normalization layer ends the chain: the reference code's rescaling across BN moves the output."""
    model, x = _make("seed_fully_connected", torch.float64)
    model.train(train)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = 0.0  # keep the running statistics fixed across the two forwards
    before = model(x)
    d = torch.exp(torch.randn(32, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    with torch.no_grad():
        model.layers[0].weight.mul_(d[:, None])
        model.layers[1].weight.mul_(1 / d)
    assert _rel(model(x), before) > 1e-2


def test_channels_last_weights_raise_a_clear_error_without_changing_the_function() -> None:
    model, x = _make("conv_max_avg_pool", torch.float64)
    before = model(x)
    enorm = ENorm(model, None)
    model[3].to(memory_format=torch.channels_last)  # the first group reads its columns
    with pytest.raises(RuntimeError, match="contiguous"):
        enorm.cycle()
    assert _rel(model(x), before) <= 1e-10  # raised before scaling any tensor of that group
