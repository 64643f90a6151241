"""Every technique on architectures users bring: the torchvision classification zoo (weights=None, small
inputs), ``nn.TransformerEncoder`` and an LSTM classifier.

Each invariant is checked against an independent computation written here, never against normkit's own
structure analysis:
  * LSUV: every layer output is re-measured with hooks (and a function mode for weights used through
    ``F.linear`` / ``F.conv*``), in the mode training runs (BatchNorm on batch statistics, dropout off); every
    status in the report is checked for what it claims;
  * Grassmann selection equals the set of weights found scale-invariant per row by the function itself
    (float64, train-mode BatchNorm with ε → 0: scale each row by a random positive factor, compare outputs);
    rows stay unit after SGD-G / Adam-G steps;
  * ENorm keeps the function in float64 (≤ 1e-10); BRN conversion keeps the eval output; NormalizedOptimizer
    normalizes each block's step to norm 1.

A fast subset (tiny configurations of the same classes) runs in the default suite; the full zoo runs with
``pytest -m slow`` (or NORMKIT_SLOW=1).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torch.overrides import TorchFunctionMode
from torchvision.models.convnext import CNBlockConfig

from normkit.enorm import ENorm
from normkit.init import LayerStatus, lsuv_init
from normkit.nn import convert_batchnorm
from normkit.optim import SGDG, AdamG, NormalizedOptimizer, grassmann_param_groups

# --- the models -------------------------------------------------------------------------------------------


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.rnn = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(torch.relu(self.embed(x)))
        return self.head(out[:, -1])


class TransformerClassifier(nn.Module):
    def __init__(self, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


@dataclass(frozen=True)
class Spec:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    lsuv_coverage: float = 0.0  # the fraction of linear / conv layers LSUV must handle (issue 13: 0.95)


def _small_head(model: nn.Module, features: int) -> nn.Module:
    """VGG / AlexNet with their classifier's structure (pool, flatten, Linear-ReLU-Dropout ×2, Linear) at
    width 256 on a 1×1 pool: the zoo's 25088×4096 first layer alone costs a minute of orthogonal QR."""
    model.avgpool = nn.AdaptiveAvgPool2d(1)  # type: ignore[assignment]
    model.classifier = nn.Sequential(  # type: ignore[assignment]
        nn.Linear(features, 256),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(256, 256),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(256, 10),
    )
    return model


def _tiny_convnext() -> nn.Module:
    return tvm.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


def _tiny_swin() -> nn.Module:
    return tvm.SwinTransformer([4, 4], 16, [1, 1], [2, 4], [2, 2], num_classes=10)


def _tiny_maxvit() -> nn.Module:
    return tvm.MaxVit((16, 16), 8, 2, [8, 16], [1, 1], 4, 0.1, num_classes=10)


def _tiny_densenet() -> nn.Module:
    return tvm.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=10)


def _tiny_vit() -> nn.Module:
    return tvm.VisionTransformer(16, 8, 2, 2, 16, 32, num_classes=10)


FAST: dict[str, Spec] = {
    "tiny_densenet": Spec(_tiny_densenet, (4, 3, 16, 16)),
    "tiny_convnext": Spec(_tiny_convnext, (4, 3, 16, 16), 0.95),
    "tiny_vit": Spec(_tiny_vit, (4, 3, 16, 16), 0.95),
    "tiny_swin": Spec(_tiny_swin, (4, 3, 16, 16), 0.95),
    "tiny_maxvit": Spec(_tiny_maxvit, (4, 3, 16, 16), 0.95),
    "transformer_encoder": Spec(TransformerClassifier, (4, 6, 8), 0.95),
    "lstm_classifier": Spec(LSTMClassifier, (4, 5, 6)),
}

ZOO: dict[str, Spec] = {
    "resnet18": Spec(lambda: tvm.resnet18(num_classes=10), (4, 3, 32, 32)),
    "densenet121": Spec(lambda: tvm.densenet121(num_classes=10), (4, 3, 32, 32)),
    "mobilenet_v2": Spec(lambda: tvm.mobilenet_v2(num_classes=10), (4, 3, 32, 32)),
    "mobilenet_v3_small": Spec(lambda: tvm.mobilenet_v3_small(num_classes=10), (4, 3, 32, 32)),
    "mobilenet_v3_large": Spec(lambda: tvm.mobilenet_v3_large(num_classes=10), (4, 3, 32, 32)),
    "efficientnet_b0": Spec(lambda: tvm.efficientnet_b0(num_classes=10), (4, 3, 32, 32)),
    "regnet_y_400mf": Spec(lambda: tvm.regnet_y_400mf(num_classes=10), (4, 3, 32, 32)),
    "shufflenet_v2_x0_5": Spec(lambda: tvm.shufflenet_v2_x0_5(num_classes=10), (4, 3, 32, 32)),
    "squeezenet1_1": Spec(lambda: tvm.squeezenet1_1(num_classes=10), (4, 3, 32, 32)),
    "googlenet": Spec(
        lambda: tvm.googlenet(num_classes=10, aux_logits=False, init_weights=False), (4, 3, 32, 32)
    ),
    "inception_v3": Spec(
        lambda: tvm.inception_v3(num_classes=10, aux_logits=False, init_weights=False), (2, 3, 75, 75)
    ),
    "vgg11": Spec(lambda: _small_head(tvm.vgg11(), 512), (2, 3, 32, 32)),
    "vgg11_bn": Spec(lambda: _small_head(tvm.vgg11_bn(), 512), (2, 3, 32, 32)),
    "alexnet": Spec(lambda: _small_head(tvm.alexnet(), 256), (2, 3, 63, 63)),
    "mnasnet0_5": Spec(lambda: tvm.mnasnet0_5(num_classes=10), (4, 3, 32, 32)),
    "convnext_tiny": Spec(lambda: tvm.convnext_tiny(num_classes=10), (2, 3, 32, 32), 0.95),
    "vit_b_16": Spec(lambda: tvm.vit_b_16(image_size=32, num_classes=10), (2, 3, 32, 32), 0.95),
    "swin_t": Spec(lambda: tvm.swin_t(num_classes=10), (2, 3, 32, 32), 0.95),
    "maxvit_t": Spec(lambda: tvm.maxvit_t(num_classes=10), (2, 3, 224, 224), 0.95),
    "transformer_encoder": FAST["transformer_encoder"],
    "lstm_classifier": FAST["lstm_classifier"],
}

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _make(spec: Spec, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = spec.build()
    with torch.no_grad():  # ViT's zero-initialized head would make every other weight irrelevant
        for p in model.parameters():
            if p.dim() >= 2 and not bool(p.any()):
                p.normal_(0, 0.02)
    return model, torch.randn(spec.shape)


@pytest.fixture
def slow_requested(pytestconfig: pytest.Config) -> None:
    if "slow" not in (pytestconfig.getoption("-m") or "") and not os.environ.get("NORMKIT_SLOW"):
        pytest.skip("the full zoo runs with -m slow (or NORMKIT_SLOW=1)")


# --- independent measurements -----------------------------------------------------------------------------


def training_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy in the mode training runs (BatchNorm on batch statistics), with dropout and other train-only
    randomness off: eval everywhere except batch-statistics normalization layers."""
    probe = copy.deepcopy(model)
    if dtype is not None:
        probe = probe.to(dtype)
    probe.eval()
    for m in probe.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return probe


class _Capture(TorchFunctionMode):
    """Outputs of every F.linear / F.conv* call whose weight *is* a linear / conv module's weight (module
    calls and functional calls alike), under that module's name."""

    FUNCS: ClassVar[set[Any]] = {F.linear, F.conv1d, F.conv2d, F.conv3d}

    def __init__(self, model: nn.Module, outputs: dict[str, list[torch.Tensor]]) -> None:
        super().__init__()
        self.names = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, _LAYERS)}
        self.outputs = outputs

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func in self.FUNCS:
            w = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
            name = self.names.get(id(w))
            if name is not None:
                self.outputs.setdefault(name, []).append(out.detach().double())
        return out


def layer_outputs(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    """Every linear / conv output of one training-mode forward (float64), keyed like LSUV's report, and the
    model output. MultiheadAttention's projections run inside one fused function: q, k, v are recomputed
    from its inputs, out_proj's output is the module's output."""
    probe = training_copy(model)
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in probe.named_modules():
        if not isinstance(m, nn.MultiheadAttention):
            continue
        prefix = f"{name}." if name else ""

        def pre(mod, args, kwargs, prefix=prefix):  # type: ignore[no-untyped-def]
            e = mod.embed_dim
            for i, (tag, inp) in enumerate(zip("qkv", args)):
                b = mod.in_proj_bias[i * e : (i + 1) * e] if mod.in_proj_bias is not None else None
                y = F.linear(inp, mod.in_proj_weight[i * e : (i + 1) * e], b)
                outputs.setdefault(f"{prefix}in_proj_weight[{tag}]", []).append(y.double())

        def post(mod, args, out, prefix=prefix):  # type: ignore[no-untyped-def]
            outputs.setdefault(f"{prefix}out_proj", []).append(out[0].detach().double())

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post))
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), _Capture(probe, outputs):
            y = probe(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for h in handles:
            h.remove()
    return outputs, y


def exact_training_copy(model: nn.Module) -> nn.Module:
    """The training-mode copy in float64 with BatchNorm's ε → 0: where normalization makes a weight's scale
    irrelevant, the function is then invariant up to rounding, not only up to ε / var."""
    probe = training_copy(model, torch.float64)
    for m in probe.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-20
    return probe


# --- LSUV -------------------------------------------------------------------------------------------------


def check_lsuv(model: nn.Module, x: torch.Tensor, spec: Spec) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = lsuv_init(model, x)
    outputs, y = layer_outputs(model, x)
    layer_names = {n for n, m in model.named_modules() if isinstance(m, _LAYERS)}
    reported = {r.name for r in report}
    assert layer_names <= reported, f"layers missing from the report: {sorted(layer_names - reported)}"
    assert set(outputs) <= reported, f"weights used but not reported: {sorted(set(outputs) - reported)}"
    invariant_claims = []
    for r in report:
        if r.status is LayerStatus.INITIALIZED:
            assert r.name in outputs, f"{r.name} initialized but never ran"
            var = torch.cat([o.flatten() for o in outputs[r.name]]).var().item()
            assert r.var_after is not None and abs(var - r.var_after) <= 1e-3 * max(1.0, var), (r.name, var)
            if r.converged:
                assert abs(var - report.target_var) < report.tol, (r.name, var)
        elif r.status is LayerStatus.FEEDS_NORMALIZATION:
            invariant_claims.append(r.name)
        elif r.status is LayerStatus.NOT_RUN:
            assert r.name not in outputs, f"{r.name} reported not run, but its weight was used"
        elif r.status is LayerStatus.UNSUPPORTED:
            assert not isinstance(dict(model.named_modules())[r.name], _LAYERS), r.name
        elif r.status is LayerStatus.NO_EFFECT:
            module = dict(model.named_modules())[r.name]
            with torch.no_grad():
                module.weight.mul_(3.0)
            again, _ = layer_outputs(model, x)
            with torch.no_grad():
                module.weight.div_(3.0)
            for a, b in zip(outputs[r.name], again[r.name]):
                torch.testing.assert_close(a, b)
        else:
            raise AssertionError(f"{r.name}: unexpected status {r.status}")
    if invariant_claims:  # scaling all those weights leaves the training-mode function unchanged (up to ε)
        probe = exact_training_copy(model)
        modules = dict(probe.named_modules())
        with torch.no_grad():
            base = probe(x.double())
            for name in invariant_claims:
                modules[name].weight.mul_(torch.rand((), dtype=torch.float64) * 3 + 0.5)
            scaled = probe(x.double())
        torch.testing.assert_close(scaled, base, rtol=1e-8, atol=1e-10 * float(base.abs().max()))
    handled = [r for r in report if r.status in (LayerStatus.INITIALIZED, LayerStatus.FEEDS_NORMALIZATION)]
    units = [r for r in report if r.status is not LayerStatus.UNSUPPORTED]
    coverage = len(handled) / len(units)
    assert coverage >= spec.lsuv_coverage, (coverage, [(r.name, r.status.value) for r in units])
    return {"coverage": coverage, "train_std": float(y.std())}


def _lsuv(name: str, spec: Spec) -> None:
    model, x = _make(spec)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    figures = check_lsuv(model, x, spec)
    if has_bn:  # the symptom: train-mode outputs of 1e4 .. 1e9 after an eval-mode LSUV
        assert 0.05 < figures["train_std"] < 20, figures
    print(f"\nLSUV {name}: {figures}")


@pytest.mark.parametrize("name", list(FAST))
def test_lsuv_fast(name: str) -> None:
    _lsuv(name, FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_lsuv_zoo(name: str, slow_requested: None) -> None:
    _lsuv(name, ZOO[name])


# --- Grassmann selection ----------------------------------------------------------------------------------


def scale_invariant_weights(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the linear / conv layers whose weight rows can be scaled by positive factors without changing
    the training-mode function (float64, batch statistics with ε → 0). By Euler's theorem such a row w has
    ⟨w, ∂f/∂w⟩ = 0 for every output f; a row that matters has a nonzero radial derivative for a random
    projection of the output (almost surely). One backward pass checks every row of every weight."""
    probe = exact_training_copy(model)
    for p in probe.parameters():
        p.requires_grad_(True)
    found = set()
    for seed in (1, 2):
        probe.zero_grad()
        y = probe(x.double())
        torch.manual_seed(seed)
        (y * torch.randn_like(y)).sum().backward()
        ok = set()
        for name, m in probe.named_modules():
            if not isinstance(m, _LAYERS) or m.weight.grad is None:
                continue
            w = m.weight.detach().reshape(m.weight.shape[0], -1)
            g = m.weight.grad.reshape(w.shape)
            radial = (w * g).sum(1).abs()
            scale = w.norm(dim=1) * g.norm(dim=1)
            if bool((radial <= 1e-9 * scale + 1e-300).all()):
                ok.add(name)
        found = ok if seed == 1 else found & ok
    return found


def scale_invariant_by_scaling(model: nn.Module, x: torch.Tensor, names: set[str]) -> set[str]:
    """The direct test for a few weights: scale each row by a random positive factor, run the function.
    It decides where the radial derivative and the selection disagree (the derivative can suffer from
    rounding where a batch-normalized channel has few values, e.g. 4 samples at 1×1 resolution)."""
    probe = exact_training_copy(model)
    modules = dict(probe.named_modules())
    xd = x.double()
    found = set()
    with torch.no_grad():
        base = probe(xd)
        for name in sorted(names):
            w = modules[name].weight
            saved = w.clone()
            w.mul_(torch.rand(w.shape[0], *[1] * (w.dim() - 1), dtype=torch.float64) * 1.5 + 0.5)
            if torch.allclose(probe(xd), base, rtol=1e-8, atol=1e-9 * float(base.abs().max())):
                found.add(name)
            w.copy_(saved)
    return found


def _grassmann(name: str, spec: Spec) -> None:
    model, x = _make(spec)
    groups = grassmann_param_groups(model, lr=0.01, lr_g=0.05, example_input=x)
    chosen = {id(p) for g in groups if g["grassmann"] for p in g["params"]}
    selected = {n for n, m in model.named_modules() if isinstance(m, _LAYERS) and id(m.weight) in chosen}
    by_gradient = scale_invariant_weights(model, x)
    disputed = by_gradient ^ selected
    truth = (by_gradient - disputed) | scale_invariant_by_scaling(model, x, disputed)
    assert selected == truth, {"missed": sorted(truth - selected), "wrong": sorted(selected - truth)}
    print(f"\nGrassmann {name}: {len(selected)} of {sum(isinstance(m, _LAYERS) for m in model.modules())}")


def _unit_rows(name: str, spec: Spec, Opt: type[torch.optim.Optimizer]) -> None:
    model, x = _make(spec)
    model.train()
    groups = grassmann_param_groups(model, lr=0.01, lr_g=0.05, example_input=x)
    if not any(g["grassmann"] for g in groups):
        pytest.skip(f"{name} has no scale-invariant weight")
    opt = Opt(groups)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for g in opt.param_groups:
        if g["grassmann"]:
            for p in g["params"]:
                norms = p.detach().reshape(p.shape[0], -1).double().norm(dim=1)
                torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_densenet", "tiny_convnext", "transformer_encoder"])
def test_grassmann_fast(name: str) -> None:
    _grassmann(name, FAST[name])


@pytest.mark.parametrize("Opt", [SGDG, AdamG])
def test_unit_rows_fast(Opt: type[torch.optim.Optimizer]) -> None:
    _unit_rows("tiny_densenet", FAST["tiny_densenet"], Opt)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_grassmann_zoo(name: str, slow_requested: None) -> None:
    _grassmann(name, ZOO[name])


@pytest.mark.slow
@pytest.mark.parametrize("Opt", [SGDG, AdamG])
@pytest.mark.parametrize("name", list(ZOO))
def test_unit_rows_zoo(name: str, Opt: type[torch.optim.Optimizer], slow_requested: None) -> None:
    _unit_rows(name, ZOO[name], Opt)


# --- ENorm, BRN conversion, normalized gradients ----------------------------------------------------------


def _function_preserving(name: str, spec: Spec) -> None:
    model, x = _make(spec)
    # ENorm: one cycle in float64 leaves the eval-mode function unchanged
    m64 = copy.deepcopy(model).double().eval()
    x64 = x.double()
    with torch.no_grad():
        before = m64(x64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enorm = ENorm(m64, None, c=1.0, example_input=x64)
        enorm.cycle()
        after = m64(x64)
    assert (after - before).abs().max() <= 1e-10 * max(1.0, float(before.abs().max())), name
    # BRN conversion keeps the eval output
    m32 = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = m32(x)
        converted = convert_batchnorm(m32).eval()
        torch.testing.assert_close(converted(x), ref, rtol=1e-5, atol=1e-6)
    # NormalizedOptimizer: each tensor's step is g / (‖g‖ + eps) (SGD, lr 1, no momentum): norm 1 up to eps
    mt = copy.deepcopy(model).train()
    eps = 1e-12
    opt = NormalizedOptimizer(torch.optim.SGD(mt.parameters(), lr=1.0), normalization="l2", eps=eps)
    old = [p.detach().clone() for p in mt.parameters()]
    opt.zero_grad()
    mt(x).square().mean().backward()
    gnorms = [float(p.grad.double().norm()) if p.grad is not None else 0.0 for p in mt.parameters()]
    opt.step()
    for p, o, g in zip(mt.parameters(), old, gnorms):
        step = float((p.detach() - o).double().norm())
        assert abs(step - g / (g + eps)) < 1e-3, (step, g)


@pytest.mark.parametrize("name", ["tiny_densenet", "tiny_vit", "lstm_classifier"])
def test_function_preserving_fast(name: str) -> None:
    _function_preserving(name, FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_function_preserving_zoo(name: str, slow_requested: None) -> None:
    _function_preserving(name, ZOO[name])


# --- generic checks for models we did not write (used by test_zoo_timm.py and test_zoo_hf.py) --------------
#
# These work on any model: layer outputs are taken by forward hooks on the real forward (also for layers
# whose forward transforms their weight, e.g. weight-standardized convs), the model output is the first
# tensor of whatever the model returns (HF ModelOutput: logits / last_hidden_state).

Forward = Callable[[nn.Module, Any], Any]


def first_tensor(y: Any) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        return first_tensor(next(iter(y.values())))
    return first_tensor(y[0])


def call(model: nn.Module, x: Any) -> torch.Tensor:
    return first_tensor(model(x))


def _to_double(x: Any) -> Any:
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def exact_copy(model: nn.Module) -> nn.Module:
    """float64, training-mode normalization, dropout off, every normalization's ε → 0 (BatchNorm's ``eps``,
    LayerNorm / GroupNorm / timm's ``eps``, HF RMSNorm's ``variance_epsilon``): weights whose scale a
    normalization cancels are then invariant up to rounding."""
    probe = training_copy(model, torch.float64)
    for m in probe.modules():
        for attr in ("eps", "variance_epsilon"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 1e-20 if isinstance(m, nn.modules.batchnorm._BatchNorm) else 1e-30)
    return probe


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def hooked_outputs(model: nn.Module, x: Any, names: set[str]) -> dict[str, torch.Tensor]:
    """The outputs (float64, every call concatenated) of the named modules in one training-mode forward of a
    copy (batch statistics, dropout off): what LSUV's report describes."""
    probe = training_copy(model)
    modules = dict(probe.named_modules())
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in names:
        if name in modules:

            def hook(mod, args, out, name=name):  # type: ignore[no-untyped-def]
                # clone: an in-place activation after the layer (timm SiLU(inplace=True)) would change a view
                seen.setdefault(name, []).append(first_tensor(out).detach().double().flatten().clone())

            handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            probe(x)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


_NOISY = (
    LayerStatus.UNSUPPORTED,
    LayerStatus.NOT_RUN,
    LayerStatus.NO_EFFECT,
    LayerStatus.OUT_OF_BOUNDS,
    LayerStatus.SHARED,
)


def lsuv_findings(model: nn.Module, x: Any, tol: float = 0.1) -> dict[str, Any]:
    """Run ``lsuv_init`` and measure what its report says against hooks on the real forward afterwards.

    Returns the lists of contradictions (each with the measured figures):
      * ``var_wrong``: INITIALIZED layers whose measured output variance differs from ``var_after`` (1e-3
        relative) — the report says more than was measured;
      * ``not_converged``: layers reported converged whose measured |var − 1| ≥ tol;
      * ``silent``: layers left alone (unsupported, not run, no effect, out of bounds) that no warning names;
      * ``norm_as_unsupported``: normalization layers (a ``*Norm*`` class) listed as unsupported layers;
      * ``untouched``: modules owning a weight matrix that are neither initialized / feeding a normalization
        nor named in a warning.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = lsuv_init(model, x, tol=tol)
    text = "\n".join(str(w.message) for w in caught)
    handled = {
        r.name for r in report if r.status in (LayerStatus.INITIALIZED, LayerStatus.FEEDS_NORMALIZATION)
    }
    shared = [r for r in report if r.status is LayerStatus.SHARED]  # kept, but measured: must be true too
    measured = hooked_outputs(model, x, {r.name for r in [*report.initialized, *shared]})
    var_wrong, not_converged = [], []
    for r in shared:
        var = float(measured[r.name].var())
        if r.var_after is None or abs(var - r.var_after) > 1e-3 * max(1.0, var):
            var_wrong.append((r.name, r.var_after, var))
    for r in report.initialized:
        assert r.name in measured, f"{r.name} reported initialized, but the module never ran"
        var = float(measured[r.name].var())
        assert r.var_after is not None
        if abs(var - r.var_after) > 1e-3 * max(1.0, var):
            var_wrong.append((r.name, r.var_after, var))
        if r.converged and not abs(var - report.target_var) < report.tol:
            not_converged.append((r.name, var))
    silent = [r.name for r in report if r.status in _NOISY and repr(r.name) not in text]
    norm_as_unsupported = [
        (r.name, r.type) for r in report if r.status is LayerStatus.UNSUPPORTED and "Norm" in r.type
    ]
    untouched = [
        name
        for name, m in model.named_modules()
        if any(p.dim() >= 2 for p in m.parameters(recurse=False))
        and name not in handled
        and repr(name) not in text
    ]
    return {
        "report": report,
        "warnings": text,
        "var_wrong": var_wrong,
        "not_converged": not_converged,
        "silent": silent,
        "norm_as_unsupported": norm_as_unsupported,
        "untouched": untouched,
    }


def not_scale_invariant(
    model: nn.Module, x: Any, params: list[torch.Tensor], per_row: bool, forward: Forward = call
) -> list[tuple[str, float]]:
    """The parameters among ``params`` whose scaling changes the training-mode function (float64, ε → 0),
    with the relative output change. Measured on the function, not on normkit's graph: all of them ×3 at
    once, and with ``per_row`` each output row by its own random factor in [0.5, 3]; when the output moves,
    the set is halved until the culprits are found (one forward per test when all is well)."""
    names = {id(p): n for n, p in model.named_parameters()}
    probe = exact_copy(model)
    probe_params = dict(probe.named_parameters())
    xd = _to_double(x)
    gen = torch.Generator().manual_seed(0)

    def change(subset: list[str], rows: bool) -> float:
        saved = {n: probe_params[n].detach().clone() for n in subset}
        with torch.no_grad():
            for n in subset:
                w = probe_params[n]
                shape = (w.shape[0], *[1] * (w.dim() - 1)) if rows else ()
                w.mul_(torch.rand(shape, generator=gen, dtype=torch.float64) * 2.5 + 0.5 if rows else 3.0)
            out = forward(probe, xd)
            for n in subset:
                probe_params[n].copy_(saved[n])
        return relative_change(out, base)

    def culprits(subset: list[str], rows: bool) -> list[tuple[str, float]]:
        moved = change(subset, rows)
        if moved <= 1e-7:
            return []
        if len(subset) == 1:
            return [(subset[0], moved)]
        half = len(subset) // 2
        return culprits(subset[:half], rows) + culprits(subset[half:], rows)

    with torch.no_grad():
        base = forward(probe, xd)
    selected = [names[id(p)] for p in params]
    bad = dict(culprits(selected, False))
    if per_row:
        bad.update({n: c for n, c in culprits([n for n in selected if n not in bad], True)})
    return sorted(bad.items())


def enorm_function_change(model: nn.Module, x: Any, forward: Forward = call) -> tuple[float, ENorm, str]:
    """One ENorm cycle (c = 1, no optimizer) on a float64 eval copy: the relative change of the output, the
    ENorm object and the warnings it gave."""
    m64 = copy.deepcopy(model).double().eval()
    xd = _to_double(x)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = forward(m64, xd)
        enorm = ENorm(m64, None, c=1.0, example_input=xd)
        enorm.cycle()
        after = forward(m64, xd)
    return relative_change(after, before), enorm, "\n".join(str(w.message) for w in caught)


def batchnorm_conversion(model: nn.Module, x: torch.Tensor, to: str = "renorm") -> dict[str, Any]:
    """``convert_batchnorm`` on an eval copy: batch-norm layers (every ``_BatchNorm`` subclass, counted here)
    before, those left unconverted after, and the relative change of the eval output."""
    from normkit.nn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, SyncBatchRenorm

    renorm = (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, SyncBatchRenorm)
    m = copy.deepcopy(model).eval()
    bns = [n for n, mod in m.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        ref = call(m, x)
        converted = convert_batchnorm(m, to=to).eval()  # type: ignore[arg-type]
        out = call(converted, x)
    layers = dict(converted.named_modules())
    target = renorm if to == "renorm" else (nn.SyncBatchNorm, SyncBatchRenorm)
    left = [n for n in bns if not isinstance(layers.get(n), target)]
    return {"batchnorms": len(bns), "left": left, "change": relative_change(out, ref)}


def one_step_each_optimizer(
    model: nn.Module, x: Any, example_input: Any = None, forward: Forward = call
) -> dict[str, tuple[bool, float]]:
    """One training step of every normkit optimizer on a fresh copy: (model finite after it — parameters and
    eval output —, largest absolute parameter change). Groups come from normkit's own helpers, as a user
    builds them."""
    from normkit.optim import (
        LAMB,
        LARS,
        SGDP,
        AdamP,
        ClippedOptimizer,
        scale_invariant_param_groups,
        trust_ratio_param_groups,
    )

    builders: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "SGDG": lambda m: SGDG(grassmann_param_groups(m, 0.01, 0.05, example_input=example_input), lr=0.01),
        "AdamG": lambda m: AdamG(grassmann_param_groups(m, 1e-3, 0.05, example_input=example_input), lr=1e-3),
        "AdamP": lambda m: AdamP(scale_invariant_param_groups(m, example_input=example_input), lr=1e-3),
        "SGDP": lambda m: SGDP(scale_invariant_param_groups(m, example_input=example_input), lr=0.01),
        "LARS": lambda m: LARS(trust_ratio_param_groups(m), lr=0.1),
        "LAMB": lambda m: LAMB(trust_ratio_param_groups(m), lr=1e-3),
        "Normalized": lambda m: NormalizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01)),
        "Clipped": lambda m: ClippedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01), clipnorm=1.0),
    }
    out = {}
    for name, build in builders.items():
        m = copy.deepcopy(model).train()
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = build(m)
        opt.zero_grad()
        forward(m, x).float().square().mean().backward()
        opt.step()
        finite = all(bool(p.isfinite().all()) for p in m.parameters())
        with torch.no_grad():
            finite = finite and bool(forward(m.eval(), x).isfinite().all())
        moved = max(float((p.detach() - before[n]).abs().max()) for n, p in m.named_parameters())
        out[name] = (finite, moved)
    return out
