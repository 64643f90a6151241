"""Every harness model builds for its inputs and runs a forward / backward pass on a tiny batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from normkit.nn import BatchRenorm1d, BatchRenorm2d
from normkit.train.runner.models import MODELS, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


# (model, input shape, options): small widths / depths so the whole file stays fast
CASES = [
    ("cnn", (1, 8, 8), {}),
    ("cnn", (3, 32, 32), {"width": 8}),
    ("mlp", (1, 8, 8), {"depth": 3, "width": 16, "dropout": 0.2}),
    ("mlp", (1, 40), {"depth": 30, "width": 8, "norm": "bn", "dropout": 0.2}),
    ("enorm-fc", (3, 32, 32), {"depth": 4, "width": 20}),
    ("enorm-conv", (3, 32, 32), {"width": 4}),
    ("enorm-conv", (1, 8, 8), {"width": 4}),
    ("vgg11", (3, 32, 32), {"width": 4}),
    ("vgg13", (3, 32, 32), {"width": 4}),
    ("vgg16", (1, 8, 8), {"width": 4}),
    ("vgg19", (3, 32, 32), {"width": 4, "dropout": 0.1}),
    ("wrn", (3, 32, 32), {"depth": 10, "widen_factor": 1, "dropout": 0.3}),
    ("wrn", (1, 8, 8), {"depth": 16, "widen_factor": 1}),
    ("cnn1d", (1, 40), {"width": 8}),
    ("mnist-convnet", (1, 28, 28), {}),
    ("mnist-convnet", (1, 8, 8), {}),
]


def test_every_model_is_covered() -> None:
    assert {name for name, _, _ in CASES} == set(MODELS)


# each model with its default normalization, plus the swaps on a few
NORM_CASES = [(*c, None) for c in CASES] + [
    (*CASES[i], norm)
    for i in (0, 3, 7, 11, 13)
    for norm in ("brn", "none", "bn")
    if norm != MODELS[CASES[i][0]].default_norm
]


@pytest.mark.parametrize(
    ("name", "shape", "options", "norm"),
    NORM_CASES,
    ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[3] or 'default'}" for c in NORM_CASES],
)
def test_forward_backward(name: str, shape: tuple[int, ...], options: dict, norm: str | None) -> None:
    torch.manual_seed(0)
    opts = dict(options)
    if norm is not None:
        opts["norm"] = norm
    model = build_model(name, shape, 7, **opts)
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads if g is not None)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    has_brn = any(isinstance(m, (BatchRenorm1d, BatchRenorm2d)) for m in model.modules())
    resolved = opts.get("norm") or MODELS[name].default_norm
    assert has_bn == (resolved == "bn")
    assert has_brn == (resolved == "brn")
    model.eval()
    assert model(x).shape == (4, 7)


def test_architecture_sizes() -> None:
    # WRN-16-4: 2 blocks per stage, widths 64/128/256 (≈2.75 M parameters, as in the WRN paper)
    wrn = build_model("wrn", (3, 32, 32), 10, depth=16, widen_factor=4)
    n = sum(p.numel() for p in wrn.parameters())
    assert 2.7e6 < n < 2.8e6
    convs = [m for m in build_model("enorm-conv", (3, 32, 32), 10).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9
    linears = [m for m in build_model("enorm-fc", (3, 32, 32), 10).modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 15 and all(m.out_features == 500 for m in linears[:-1])
    mlp30 = build_model("mlp", (1, 28, 28), 10, depth=30, width=128, norm="bn", dropout=0.2)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in mlp30.modules()) == 30
    vgg16 = build_model("vgg16", (3, 32, 32), 10)
    assert sum(isinstance(m, nn.Conv2d) for m in vgg16.modules()) == 13
    # the Torch MNIST demo net: 64·2·2 features into a 200-unit layer
    convnet = build_model("mnist-convnet", (1, 28, 28), 10)
    assert [m.in_features for m in convnet.modules() if isinstance(m, nn.Linear)] == [256, 200]


def test_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match=r"choose from .*cnn"):
        build_model("resnet", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="image"):
        build_model("cnn", (1, 40), 10)
    with pytest.raises(ValueError, match="6n"):
        build_model("wrn", (3, 32, 32), 10, depth=15)
    with pytest.raises(ValueError, match="bn, brn, none"):
        build_model("cnn", (1, 8, 8), 10, norm="gn")


def test_enorm_nets_are_he_initialized_like_the_paper_code():
    torch.manual_seed(0)
    model = build_model("enorm-fc", (3, 16, 16), 10, depth=5, width=256)
    conv = build_model("enorm-conv", (3, 28, 28), 10, width=16)
    layers = [m for m in [*model.modules(), *conv.modules()] if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) == 5 + 9
    for layer in layers:
        fan_in = layer.weight[0].numel()
        assert abs(layer.weight.std().item() / (2.0 / fan_in) ** 0.5 - 1) < 0.1
        assert layer.bias is None


# --- the authors' architectures (facebookresearch/enorm, models/), transcribed layer by layer -------------


def _signature(m: nn.Module) -> tuple:
    if isinstance(m, nn.Linear):
        return ("Linear", m.in_features, m.out_features, m.bias is not None)
    if isinstance(m, nn.Conv2d):
        return (
            "Conv2d",
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            m.stride,
            m.padding,
            m.bias is not None,
        )
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return (type(m).__name__, m.num_features)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return (type(m).__name__, m.kernel_size, m.stride, m.padding)
    return (type(m).__name__,)


def authors_fully_connected(n_layers: int, p: int, d_in: int = 3072) -> list[tuple]:
    """Their FullyConnected(n_layers, p): layer_i = Linear(3072 if i == 0 else p, p or 10 for the last,
    bias=False), then for every layer but the last bn_i = BatchNorm1d(p) and relu_i; the forward runs
    layer, bn, relu in that order. (They flatten the CIFAR images in the data loader.)"""
    out: list[tuple] = []
    for i in range(n_layers):
        last = i == n_layers - 1
        out.append(("Linear", d_in if i == 0 else p, 10 if last else p, False))
        if not last:
            out += [("BatchNorm1d", p), ("ReLU",)]
    return out


def authors_fully_convolutional() -> list[tuple]:
    """Their FullyConvolutional() in forward order (conv / bn / relu / pool calls), all convs bias-free."""
    conv = lambda i, o, k, s, p: ("Conv2d", i, o, (k, k), (s, s), (p, p), False)
    pool = ("MaxPool2d", 3, 2, 1)
    relu = ("ReLU",)
    return [
        conv(3, 128, 3, 1, 1), relu, conv(128, 128, 3, 1, 1), relu,
        conv(128, 128, 3, 1, 1), ("BatchNorm2d", 128), relu, pool,
        conv(128, 256, 3, 1, 1), relu, conv(256, 256, 3, 1, 1), relu,
        conv(256, 256, 3, 1, 1), ("BatchNorm2d", 256), relu, pool,
        conv(256, 320, 3, 1, 1), relu, conv(320, 320, 1, 1, 0), relu,
        conv(320, 10, 1, 1, 1), relu, ("AvgPool2d", 5, 5, 0),
    ]  # fmt: skip


def _layers(model: nn.Module) -> list[tuple]:
    return [_signature(m) for m in model.children() if not isinstance(m, nn.Flatten)]


def test_enorm_fc_matches_the_authors_layer_for_layer() -> None:
    ours = build_model("enorm-fc", (3, 32, 32), 10, depth=15, width=500)
    assert _layers(ours) == authors_fully_connected(15, 500)
    assert isinstance(next(iter(ours.children())), nn.Flatten)
    bn_free = build_model("enorm-fc", (3, 32, 32), 10, depth=15, width=500, norm="none")
    assert _layers(bn_free) == [s for s in authors_fully_connected(15, 500) if s[0] != "BatchNorm1d"]


def test_enorm_conv_matches_the_authors_layer_for_layer() -> None:
    ours = build_model("enorm-conv", (3, 28, 28), 10)  # their CIFAR crops are 28 x 28
    assert _layers(ours) == authors_fully_convolutional()
    assert isinstance(list(ours.children())[-1], nn.Flatten)
    bn_free = build_model("enorm-conv", (3, 28, 28), 10, norm="none")
    assert _layers(bn_free) == [s for s in authors_fully_convolutional() if s[0] != "BatchNorm2d"]
    narrow = build_model("enorm-conv", (3, 28, 28), 10, width=32)
    widths = [m.out_channels for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [32, 32, 32, 64, 64, 64, 80, 80, 10]
    with torch.no_grad():
        assert ours.eval()(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
