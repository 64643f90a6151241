"""The models of the papers' reference training scripts, built for any input shape and class count.

``build_model(name, input_shape, num_classes, ...)``: 2-D conv nets take (C, H, W) inputs, ``cnn1d`` takes
(C, L), the MLPs flatten anything. Pooling stops when the feature map reaches 1×1 so every conv net also
runs on small inputs (8×8 digits, tests). ``norm="brn"`` swaps every BatchNorm for Batch Renormalization
through :func:`normkit.nn.convert_batchnorm`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from normkit.train.runner.factories import build_user_model, is_import_path

__all__ = ["MODELS", "ModelSpec", "build_model"]


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](channels)


def _mlp_layers(
    in_features: int, widths: list[int], norm: str, dropout: float, bias: bool = True
) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for w in widths:
        layers += [nn.Linear(prev, w, bias=bias), _norm(norm, w, 1), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        prev = w
    return layers


def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    depth: int | None = None,
    width: int | None = None,
    norm: str = "none",
    dropout: float = 0.0,
    **_: Any,
) -> nn.Module:
    """``depth`` hidden layers of ``width`` units (Linear → [BN] → ReLU → [Dropout]), then a classifier.

    ``mlp --depth 30 --width 128 --norm bn --dropout 0.2`` is the deep MLP of Yu et al.'s reference code.
    """
    depth, width = depth if depth is not None else 3, width or 256
    layers = _mlp_layers(math.prod(input_shape), [width] * depth, norm, dropout)
    return nn.Sequential(*layers, nn.Linear(width if depth else math.prod(input_shape), num_classes))


def enorm_fc(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    depth: int | None = None,
    width: int | None = None,
    norm: str = "bn",
    dropout: float = 0.0,
    **_: Any,
) -> nn.Module:
    """The ENorm paper's fully connected net (the authors' ``models/fully_connected.py``).

    ``depth`` (15) Linear layers in all, as the authors count them (``--n-layers 15``): ``depth - 1`` hidden
    layers of ``width`` (500) units, each Linear → BatchNorm1d → ReLU, then the classifier. Every Linear is
    bias-free and Kaiming-normal initialized, as in their code. ``norm="none"`` drops the BatchNorm layers
    (the BN-free variant); ``dropout`` (not in the paper) follows each ReLU.
    """
    depth, width = depth if depth is not None else 15, width or 500
    if depth < 1:
        raise ValueError(f"enorm-fc needs --depth of at least 1 (Linear layers in all), got {depth}")
    layers: list[nn.Module] = [nn.Flatten()]
    prev = math.prod(input_shape)
    for _i in range(depth - 1):
        layers += [nn.Linear(prev, width, bias=False), _norm(norm, width, 1), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        prev = width
    layers.append(nn.Linear(prev, num_classes, bias=False))
    model = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def enorm_conv(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int | None = None,
    norm: str = "bn",
    **_: Any,
) -> nn.Module:
    """The ENorm paper's fully convolutional net (the authors' ``models/fully_convolutional.py``, after
    Gitman & Ginsburg 2017).

    Nine bias-free convolutions, each followed by ReLU: three 3×3 of ``w`` channels, max pool (3, stride 2,
    pad 1); three 3×3 of ``2w``, max pool; a 3×3 of ``2.5w``, a 1×1 of ``2.5w``, and a 1×1 to the classes
    with zero padding 1 (as theirs), then average pooling. ``w`` = ``width`` (128: 128 / 256 / 320 channels).
    BatchNorm2d after conv3 and conv6 (before their ReLU); ``norm="none"`` drops both. Kaiming-normal init.
    The final pool is theirs (``AvgPool2d(5)``, which covers their 9×9 map of a 28×28 crop) when the map is
    between 5 and 9 pixels wide, a global average otherwise, so that the net runs on any image size.
    """
    w = width or 128
    widths = (w, w, w, 2 * w, 2 * w, 2 * w, (5 * w) // 2, (5 * w) // 2)
    cin, size = input_shape[0], min(input_shape[1:])
    layers: list[nn.Module] = []
    for i, cout in enumerate(widths):
        k = 1 if i == 7 else 3
        layers.append(nn.Conv2d(cin, cout, k, 1, k // 2, bias=False))
        if i in (2, 5) and norm != "none":
            layers.append(_norm(norm, cout, 2))
        layers.append(nn.ReLU(inplace=True))
        if i in (2, 5):
            layers.append(nn.MaxPool2d(3, 2, 1))
            size = (size - 1) // 2 + 1
        cin = cout
    layers += [nn.Conv2d(cin, num_classes, 1, 1, 1, bias=False), nn.ReLU(inplace=True)]
    size += 2
    layers += [nn.AvgPool2d(5) if 5 <= size < 10 else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def _conv_bn_relu(cin: int, cout: int, norm: str, k: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=norm == "none"),
        _norm(norm, cout, 2),
        nn.ReLU(inplace=True),
    ]


_VGG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}


def vgg(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    depth: int = 16,
    width: int | None = None,
    norm: str = "bn",
    dropout: float = 0.0,
    **_: Any,
) -> nn.Module:
    """CIFAR-style VGG with BatchNorm: 3×3 convs, 5 max-pools (skipped at 1×1), one linear classifier.

    ``width`` scales the channel counts (64 by default, as in the paper).
    """
    scale = (width or 64) / 64
    layers: list[nn.Module] = []
    cin, size = input_shape[0], min(input_shape[1:])
    for v in _VGG[depth]:
        if v == "M":
            if size > 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            cout = max(1, round(int(str(v)) * scale))
            layers += _conv_bn_relu(cin, cout, norm)
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)


class _WideBlock(nn.Module):
    """Pre-activation basic block of a wide residual network (BN-ReLU-conv, dropout between the convs)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float, norm: str) -> None:
        super().__init__()
        self.bn1 = _norm(norm, cin, 2)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = _norm(norm, cout, 2)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else None
        )

    def forward(self, x: Tensor) -> Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.drop(torch.relu(self.bn2(y))))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-d-k (Zagoruyko & Komodakis 2016): (d − 4)/6 blocks per stage, widths 16k, 32k, 64k."""

    def __init__(
        self, in_channels: int, num_classes: int, depth: int, widen: int, dropout: float, norm: str
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 (10, 16, 22, 28, 40 ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            for i in range(n):
                blocks.append(_WideBlock(cin, cout, stride if i == 0 else 1, dropout, norm))
                cin = cout
            del stage
        self.blocks = nn.Sequential(*blocks)
        self.bn = _norm(norm, cin, 2)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.conv(x))
        x = torch.relu(self.bn(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def wrn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    depth: int | None = None,
    widen_factor: int | None = None,
    dropout: float = 0.0,
    norm: str = "bn",
    **_: Any,
) -> nn.Module:
    """Wide ResNet: ``--depth`` (16) and ``--widen-factor`` (4); WRN-16-4, 22-8, 28-10, 40-10 in papers."""
    return WideResNet(input_shape[0], num_classes, depth or 16, widen_factor or 4, dropout, norm)


def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int | None = None,
    norm: str = "bn",
    dropout: float = 0.0,
    **_: Any,
) -> nn.Module:
    """The default small CNN (digits / MNIST): 2 stages of two 3×3 convs, max-pool, global average, linear."""
    w = width or 32
    size = min(input_shape[1:])
    layers = _conv_bn_relu(input_shape[0], w, norm) + _conv_bn_relu(w, w, norm)
    if size > 1:
        layers.append(nn.MaxPool2d(2))
        size //= 2
    layers += _conv_bn_relu(w, 2 * w, norm) + _conv_bn_relu(2 * w, 2 * w, norm)
    if size > 1:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(2 * w, num_classes))
    return nn.Sequential(*layers)


def mnist_convnet(
    input_shape: tuple[int, ...], num_classes: int, *, norm: str = "none", **_: Any
) -> nn.Module:
    """The Torch MNIST example of the LSUV reference code: conv5×5(32) → ReLU → maxpool 3 → conv5×5(64) →
    ReLU → maxpool 2 → linear 200 → ReLU → linear (classes)."""
    c, h, w = input_shape
    features = nn.Sequential(
        nn.Conv2d(c, 32, 5),
        _norm(norm, 32, 2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, ceil_mode=True),
        nn.Conv2d(32, 64, 5, padding=2 if min(h, w) < 20 else 0),
        _norm(norm, 64, 2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(),
    )
    with torch.no_grad():
        n = features.eval()(torch.zeros(1, *input_shape)).shape[1]
    features.train()
    return nn.Sequential(*features, nn.Linear(n, 200), nn.ReLU(inplace=True), nn.Linear(200, num_classes))


def cnn1d(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int | None = None,
    norm: str = "none",
    **_: Any,
) -> nn.Module:
    """A 1-D conv net for MNIST-1D (as in its paper): 3 strided Conv1d + ReLU, then a linear classifier."""
    w = width or 32
    cin, length = input_shape
    layers: list[nn.Module] = []
    for k in (5, 3, 3):
        layers += [nn.Conv1d(cin, w, k, stride=2, padding=k // 2), _norm(norm, w, 1), nn.ReLU(inplace=True)]
        cin = w
        length = (length + 2 * (k // 2) - k) // 2 + 1
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(w * length, num_classes))


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    input_dims: int | None  # number of non-batch input dims required (3 = C,H,W; 2 = C,L; None = any)
    default_norm: str
    description: str


def _vgg(depth: int) -> Callable[..., nn.Module]:
    def build(input_shape: tuple[int, ...], num_classes: int, **kw: Any) -> nn.Module:
        kw.pop("depth", None)
        return vgg(input_shape, num_classes, depth=depth, **kw)

    return build


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(cnn, 3, "bn", "small CNN for digits / MNIST (--width)"),
    "mlp": ModelSpec(mlp, None, "none", "MLP (--depth hidden layers of --width, --norm, --dropout)"),
    "enorm-fc": ModelSpec(
        enorm_fc, None, "bn", "ENorm paper FC net: --depth 15 bias-free Linear in all, width 500, BN"
    ),
    "enorm-conv": ModelSpec(enorm_conv, 3, "bn", "ENorm paper 9-conv bias-free net, BN after conv3, conv6"),
    "vgg11": ModelSpec(_vgg(11), 3, "bn", "CIFAR-style VGG-11 with BN"),
    "vgg13": ModelSpec(_vgg(13), 3, "bn", "CIFAR-style VGG-13 with BN"),
    "vgg16": ModelSpec(_vgg(16), 3, "bn", "CIFAR-style VGG-16 with BN"),
    "vgg19": ModelSpec(_vgg(19), 3, "bn", "CIFAR-style VGG-19 with BN"),
    "wrn": ModelSpec(wrn, 3, "bn", "Wide ResNet (--depth, --widen-factor, --dropout)"),
    "cnn1d": ModelSpec(cnn1d, 2, "none", "1-D conv net for MNIST-1D"),
    "mnist-convnet": ModelSpec(mnist_convnet, 3, "none", "the LSUV reference code's Torch MNIST conv net"),
}


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    norm: str | None = None,
    brn_options: dict[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (no batch dim). ``norm``: "bn", "brn" or "none".

    ``name`` may also be the import path of your own model factory, ``package.module:factory`` (see
    :mod:`normkit.train.runner.factories`); its normalization layers are kept unless ``norm`` is "brn"
    (BatchNorm
    becomes Batch Renormalization) or "bn" (the reverse).
    """
    if is_import_path(name):
        if norm == "none":
            raise ValueError(f"model {name!r} is built by your factory: norm 'none' cannot remove its layers")
        user = build_user_model(name, tuple(input_shape), num_classes, options)
        from normkit.nn import convert_batchnorm

        if norm == "brn":
            user = convert_batchnorm(user, to="renorm", **(brn_options or {}))
        elif norm == "bn":
            user = convert_batchnorm(user, to="batchnorm")
        return user
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    spec = MODELS[name]
    if spec.input_dims is not None and len(input_shape) != spec.input_dims:
        kind = {3: "image (C, H, W)", 2: "sequence (C, L)"}[spec.input_dims]
        raise ValueError(f"model {name!r} needs {kind} inputs, got input shape {tuple(input_shape)}")
    norm = norm or spec.default_norm
    if norm not in ("bn", "brn", "none"):
        raise ValueError(f"norm must be one of bn, brn, none; got {norm!r}")
    model = spec.build(tuple(input_shape), num_classes, norm="none" if norm == "none" else "bn", **options)
    if norm == "brn":
        from normkit.nn import convert_batchnorm

        model = convert_batchnorm(model, to="renorm", **(brn_options or {}))
    return model
