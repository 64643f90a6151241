"""ENorm across normalization layers ("stop" / "ignore" / "affine"), the authors' arithmetic, biases, frozen
weights and argument checks."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normkit.enorm import ENorm
from tests.test_enorm import SeedFullyConnected, SeedFullyConvolutional, _rel, _unbalance, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _seed_fc(seed: int = 0, bias: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """The authors' FC net (5 Linear layers, width 32) in float64 with spread scales and random γ, β."""
    torch.manual_seed(seed)
    model = SeedFullyConnected(n_layers=5, width=32, d_in=48).double()
    gen = torch.Generator().manual_seed(seed)
    _unbalance(model, gen)
    with torch.no_grad():
        for bn in model.bns:
            bn.weight.copy_(torch.randn(32, generator=gen, dtype=torch.float64))
            bn.bias.copy_(torch.randn(32, generator=gen, dtype=torch.float64) * 0.3)
    if bias:  # the same net with biases on every Linear (not the authors')
        for layer in model.layers:
            layer.bias = nn.Parameter(torch.randn(layer.out_features, generator=gen, dtype=torch.float64))
    return model, torch.randn(16, 48, generator=gen, dtype=torch.float64)


def _seed_conv(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = SeedFullyConvolutional(width=0.125).double()
    gen = torch.Generator().manual_seed(seed)
    _unbalance(model, gen)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64) * 0.3)
    return model, torch.randn(4, 3, 28, 28, generator=gen, dtype=torch.float64)


def _freeze_running_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0


def _quiet_enorm(*args: object, **kwargs: object) -> ENorm:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ENorm(*args, **kwargs)  # type: ignore[arg-type]


# --- float64 transcriptions of the authors' cycle (facebookresearch/enorm, enorm/enorm.py) ----------------
#
# Their cycle pairs the weights in parameter order (BatchNorm weights filtered out), reads every norm before
# the rescaling that would change it (so all factors come from the norms at the start of the cycle), leaves
# the last hidden layer alone and never touches biases; the conv version also rescales SGD momentum.


def authors_fc_cycle(weights: list[torch.Tensor], c: float) -> list[torch.Tensor]:
    w = [t.clone() for t in weights]  # Linear weights (out, in), input to output
    left, right = w[0].norm(dim=1), w[1].norm(dim=0)
    for i in range(1, len(w) - 1):
        factor = (right / (left * c)).sqrt()
        left, right = w[i].norm(dim=1), w[i + 1].norm(dim=0)
        w[i - 1] = w[i - 1] * factor[:, None]
        w[i] = w[i] / factor[None, :]
    return w


def authors_conv_cycle(
    weights: list[torch.Tensor], buffers: list[torch.Tensor], c: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    w = [t.clone() for t in weights]  # conv weights (out, in, k, k)
    m = [t.clone() for t in buffers]  # their SGD momentum buffers

    def out_norms(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).norm(dim=1)

    def in_norms(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1).flatten(1).norm(dim=1)

    left, right = out_norms(w[0]), in_norms(w[1])
    for i in range(1, len(w) - 1):
        factor = (right / (left * c)).sqrt()
        left, right = out_norms(w[i]), in_norms(w[i + 1])
        w[i - 1] = w[i - 1] * factor[:, None, None, None]
        w[i] = w[i] / factor[None, :, None, None]
        m[i - 1] = m[i - 1] / factor[:, None, None, None]
        m[i] = m[i] * factor[None, :, None, None]
    return w, m


def test_ignore_reproduces_the_authors_fc_cycle() -> None:
    model, _ = _seed_fc()
    expected = authors_fc_cycle([layer.weight.detach() for layer in model.layers], c=1.2)
    enorm = _quiet_enorm(model, None, c=1.2, norm_layers="ignore", sweep="simultaneous", skip_last=True)
    enorm.cycle()
    for layer, want in zip(model.layers, expected):
        torch.testing.assert_close(layer.weight.detach(), want, rtol=1e-12, atol=0)
    start = _seed_fc()[0].layers
    assert sum(not torch.allclose(a.weight, b.weight) for a, b in zip(model.layers, start)) == 4


def test_ignore_reproduces_the_authors_conv_cycle_with_momentum() -> None:
    model, x = _seed_conv()
    convs = [getattr(model, f"conv{i}") for i in range(1, 10)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    F.cross_entropy(model(x), torch.arange(4)).backward()
    optimizer.step()  # lr 0: weights unchanged, momentum buffers = gradients
    biases = [conv.bias.detach().clone() for conv in convs]
    want_w, want_m = authors_conv_cycle(
        [conv.weight.detach() for conv in convs],
        [optimizer.state[conv.weight]["momentum_buffer"] for conv in convs],
        c=1.1,
    )
    enorm = _quiet_enorm(
        model,
        optimizer,
        c=1.1,
        norm_layers="ignore",
        sweep="simultaneous",
        skip_last=True,
        bias="keep",
        example_input=x,
    )
    assert [g.producers[0] for g in enorm.groups] == [f"conv{i}" for i in range(1, 8)]
    enorm.cycle()
    for conv, w, m, b in zip(convs, want_w, want_m, biases):
        torch.testing.assert_close(conv.weight.detach(), w, rtol=1e-12, atol=0)
        torch.testing.assert_close(optimizer.state[conv.weight]["momentum_buffer"], m, rtol=1e-12, atol=0)
        assert torch.equal(conv.bias, b)  # bias="keep": the authors leave biases alone


def test_ignore_changes_the_function_and_says_so_once() -> None:
    model, x = _seed_fc()
    model.train()
    _freeze_running_stats(model)
    before = model(x)
    with pytest.warns(UserWarning, match="changes the network's function"):
        enorm = ENorm(model, None, c=1.0, norm_layers="ignore")
    assert [g.crossed for g in enorm.groups] == [("bns.0",), ("bns.1",), ("bns.2",), ("bns.3",)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enorm.step()
        enorm.step()
    assert _rel(model(x), before) > 1e-3


def test_ignore_scales_running_statistics_with_the_rows() -> None:
    """In eval mode the normalization layer still cancels the row scaling (its running mean and variance
    follow the rows), so its output is unchanged by the cycle; only the column scaling after it acts."""
    model, x = _seed_fc()
    model.eval()
    for bn in model.bns:
        bn.eps = 1e-300  # eps does not scale with the rows: take it out of the comparison
        bn.running_mean.uniform_(-1.0, 1.0)
    layer0, bn0 = model.layers[0], model.bns[0]
    before = bn0(layer0(x)).detach()
    _quiet_enorm(model, None, c=1.0, norm_layers="ignore").cycle()
    torch.testing.assert_close(bn0(layer0(x)), before, rtol=1e-10, atol=1e-12)
    assert _rel(layer0(x), before) > 1e-3  # the rows did move


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("net", ["fc", "conv"])
def test_affine_keeps_the_function(net: str, train: bool) -> None:
    model, x = _seed_fc() if net == "fc" else _seed_conv()
    model.train(train)
    _freeze_running_stats(model)
    before = model(x)
    enorm = _quiet_enorm(model, None, c=1.2, norm_layers="affine", example_input=x)
    norms = {"fc": ["bns.0", "bns.1", "bns.2", "bns.3"], "conv": ["bn1", "bn2"]}[net]
    producers = [g.producers[0] for g in enorm.groups]
    assert all(n in producers for n in norms)
    weights = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        enorm.step()
    assert _rel(model(x), before) <= 1e-10
    assert sum(not torch.equal(w, p) for w, p in zip(weights, model.parameters())) >= 4


def test_affine_fixed_point_and_state() -> None:
    model, x = _seed_fc()
    model.train()
    _freeze_running_stats(model)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    enorm = ENorm(model, optimizer, c=1.2, norm_layers="affine")
    for _ in range(200):
        enorm.cycle()
    for bn, nxt in zip(model.bns, model.layers[1:]):
        ratio = nxt.weight.norm(dim=0) / bn.weight.abs()
        torch.testing.assert_close(ratio, torch.full_like(ratio, 1.2), rtol=1e-6, atol=0)
    # the momentum buffers are the gradients of the rescaled network
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], p.grad, rtol=1e-8, atol=1e-14)


def test_stop_is_the_default_and_keeps_the_function_in_train_mode() -> None:
    model, x = _seed_conv()
    model.train()
    _freeze_running_stats(model)
    before = model(x)
    default = _quiet_enorm(model, None, c=1.2, example_input=x)
    stop = _quiet_enorm(model, None, c=1.2, norm_layers="stop", example_input=x)
    assert [g.producers for g in default.groups] == [g.producers for g in stop.groups]
    assert ("conv3",) not in [g.producers for g in stop.groups]  # BN after conv3 ends its chain
    for _ in range(3):
        stop.cycle()
    assert _rel(model(x), before) <= 1e-10


def test_normalization_layers_that_cannot_be_crossed_are_reported() -> None:
    group_norm = nn.Sequential(nn.Linear(6, 8, bias=False), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="normalizes across channels"):
        enorm = ENorm(group_norm, None, norm_layers="ignore")
    assert enorm.groups == []
    no_affine = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="affine=False"):
        ENorm(no_affine, None, norm_layers="affine")


# --- biases ------------------------------------------------------------------------------------------------


def test_bias_keep_leaves_biases_alone_and_changes_the_function() -> None:
    torch.manual_seed(0)
    model = mlp().double().eval()
    _unbalance(model, torch.Generator().manual_seed(0))
    x = torch.randn(4, 10, dtype=torch.float64)
    before = model(x)
    twin = copy.deepcopy(model)
    biases = [m.bias.detach().clone() for m in model.modules() if isinstance(m, nn.Linear)]
    ENorm(model, None, bias="keep").cycle()
    assert all(
        torch.equal(m.bias, b)
        for m, b in zip([m for m in model.modules() if isinstance(m, nn.Linear)], biases)
    )
    assert _rel(model(x), before) > 1e-4
    ENorm(twin, None, bias="scale").cycle()  # the default keeps the function
    assert _rel(twin(x), before) <= 1e-10


def test_trainable_biases_with_c_not_one_warn_naming_the_remedy() -> None:
    with pytest.warns(UserWarning, match=r"trainable biases \(0, 2, 5\).*bias-free"):
        ENorm(mlp(), None, c=1.2)
    for quiet in (
        lambda: ENorm(mlp(), None, c=1.0),  # c = 1: stable
        lambda: ENorm(_seed_fc()[0], None, c=1.2, norm_layers="ignore"),  # bias-free, the paper's nets
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet()
        assert not [w for w in caught if "trainable biases" in str(w.message)]
    frozen = mlp()
    for m in frozen.modules():
        if isinstance(m, nn.Linear):
            m.bias.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ENorm(frozen, None, c=1.2, bias="keep")
    assert not [w for w in caught if "trainable biases" in str(w.message)]


def test_include_bias_with_bias_keep_is_refused() -> None:
    with pytest.raises(ValueError, match="choose one"):
        ENorm(mlp(), None, include_bias=True, bias="keep")


# --- frozen weights, weights outside the optimizer (issue 13, item 5) ---------------------------------------


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("how", ["frozen", "not_optimized"])
def test_frozen_and_unoptimized_weights_are_left_alone(how: str) -> None:
    torch.manual_seed(0)
    model = mlp().double().eval()
    _unbalance(model, torch.Generator().manual_seed(0))
    x = torch.randn(4, 10, dtype=torch.float64)
    before = model(x)
    middle = _linears(model)[1]  # module "2": consumer of group "0", producer of group "2"
    if how == "frozen":
        middle.weight.requires_grad_(False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    else:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p is not middle.weight], lr=0.1)
    kept = middle.weight.detach().clone()
    enorm = ENorm(model, optimizer, c=1.0)
    assert [g.producers for g in enorm.groups] == [("5",)]
    reasons = [r for layers, r in enorm.skipped if layers in (("0",), ("2",))]
    want = "frozen (requires_grad=False)" if how == "frozen" else "not in the optimizer"
    assert len(reasons) == 2 and all(want in r and "2.weight" in r for r in reasons)
    for _ in range(3):
        enorm.step()
    assert torch.equal(middle.weight, kept)
    assert _rel(model(x), before) <= 1e-10
    everything = ENorm(model, optimizer, c=1.0, include_frozen=True)
    assert [g.producers for g in everything.groups] == [("0",), ("2",), ("5",)]


@pytest.mark.parametrize("c", [math.inf, math.nan, 0.0, -1.0])
def test_c_must_be_finite_and_positive(c: float) -> None:
    model = mlp()
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="finite and positive"):
        ENorm(model, None, c=c)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm_layers": "skip"}, "norm_layers must be one of"),
        ({"bias": "drop"}, "bias must be one of"),
        ({"sweep": "jacobi"}, "sweep must be one of"),
        ({"p": math.inf}, "finite and positive"),
    ],
)
def test_bad_options_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ENorm(mlp(), None, **kwargs)


# --- the harness passes the options through -----------------------------------------------------------------


def test_harness_options_reach_enorm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from normkit.train import ConfigError, resolve_config, run
    from normkit.train.runner.data import load_dataset

    data = load_dataset("digits", subset=256)
    cfg = {
        "data": "digits",
        "model": "enorm-fc",
        "depth": 4,
        "width": 16,
        "epochs": 1,
        "batch_size": 64,
        "enorm": 1.2,
        "enorm_norm_layers": "ignore",
        "momentum": 0.0,
        "nesterov": False,
    }
    with pytest.warns(UserWarning, match="balances across"):
        result = run(cfg, tmp_path / "ignore", data=data, log=lambda _: None)
    assert math.isfinite(result.metrics[-1]["train_loss"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # affine keeps the function: nothing to warn about
        run({**cfg, "enorm_norm_layers": "affine"}, tmp_path / "affine", data=data, log=lambda _: None)
    with pytest.raises(ConfigError, match="enorm_norm_layers"):
        resolve_config(cfg, enorm_norm_layers="skip")


# --- the authors' FC training, step for step (issue: optimizer state and running statistics) -----------


def authors_step_fc_(weights: list[torch.Tensor], c: float, p: float = 2.0) -> None:
    """In place, line by line after their ``ENorm._step_fc`` (enorm/enorm/enorm.py): BatchNorm weights
    filtered out by name, no biases, ``C[i] = c``, ``alpha = 0.5``; nothing else (no momentum buffer, no
    running statistics) is touched."""
    left_norms = weights[0].norm(p=p, dim=1)
    right_norms = weights[1].norm(p=p, dim=0)
    for i in range(1, len(weights) - 1):
        balancer = (right_norms / (left_norms * c)).pow(0.5)
        left_norms = weights[i].norm(p=p, dim=1)
        right_norms = weights[i + 1].norm(p=p, dim=0)
        weights[i - 1].t_().mul_(balancer).t_()
        weights[i].mul_(1 / balancer)


def _authors_fc_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = SeedFullyConnected(n_layers=5, width=32, d_in=48).double()
    for layer in model.layers:  # their reset_parameters
        nn.init.kaiming_normal_(layer.weight)
    return model


@pytest.mark.parametrize("c", [1.0, 1.2])
def test_authors_variant_follows_their_fc_training_with_momentum(c: float) -> None:
    ours = _authors_fc_net(0)
    theirs = copy.deepcopy(ours)
    default = copy.deepcopy(ours)
    opts = [
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        for m in (ours, theirs, default)
    ]
    enorm = _quiet_enorm(ours, opts[0], c=c, norm_layers="ignore", **ENorm.AUTHORS_FC)
    rescaling = _quiet_enorm(
        default, opts[2], c=c, norm_layers="ignore", sweep="simultaneous", skip_last=True, bias="keep"
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        x = torch.randn(64, 48, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (64,), generator=gen)
        for model, opt in zip((ours, theirs, default), opts):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        enorm.step()
        rescaling.step()
        with torch.no_grad():
            authors_step_fc_([layer.weight.data for layer in theirs.layers], c)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(
            opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"], rtol=1e-11, atol=1e-13
        )
    # the default (state and statistics rescaled) is a different training: the option is what matches
    far = max(_rel(p, q) for p, q in zip(default.parameters(), theirs.parameters()))
    assert far > 1e-2
