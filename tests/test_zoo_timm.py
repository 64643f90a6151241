"""normkit on timm models built with ``pretrained=False`` (no download), 32×32 inputs, batch 2: EfficientNet
and RegNetY (timm's fused ``BatchNormAct2d``), NFNet (weight-standardized ``ScaledStdConv2d``, no batch norm),
ConvNeXt (LayerNorm2d, layer scale), ViT and MobileViT-v2 (``BatchNormAct2d`` plus attention). Optional group:
skipped without ``timm`` (in the dev extra, so CI runs it).

Each check measures what a user relies on outside the code under test (helpers in ``tests/test_zoo.py``):
batch-norm layers counted here by type, the eval function before/after conversion, LSUV's report against
forward hooks on the real forward, parameter groups against the function (×3 on each selected weight, and
random factors per row), ENorm against the function, one step of each optimizer.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d  # noqa: E402

from normkit.enorm import ENormStructureError  # noqa: E402
from normkit.optim import grassmann_param_groups, scale_invariant_param_groups  # noqa: E402
from tests.test_zoo import (  # noqa: E402
    batchnorm_conversion,
    enorm_function_change,
    lsuv_findings,
    not_scale_invariant,
    one_step_each_optimizer,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _timm(name: str, **kwargs: int) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _nfnet_l0_narrow() -> nn.Module:
    """nfnet_l0's own configuration (deep-quad stem, ScaledStdConv2d, SE, extra conv) at depth 1 per stage and
    a fraction of the width: the same layer types in seconds instead of nfnet_l0's 33 M parameters."""
    from timm.models.nfnet import NormFreeNet, model_cfgs

    cfg = dataclasses.replace(
        model_cfgs["nfnet_l0"],
        depths=(1, 1, 1, 1),
        channels=(64, 128, 192, 256),
        stem_chs=32,
        group_size=16,
        num_features=384,
    )
    return NormFreeNet(cfg, num_classes=10)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "efficientnet_b0": _timm("efficientnet_b0"),
    "regnety_002": _timm("regnety_002"),
    "nfnet_l0_narrow": _nfnet_l0_narrow,
    "nfnet_l0": _timm("nfnet_l0"),  # the real one: slow
    "convnext_nano": _timm("convnext_nano"),
    "vit_tiny_patch16_224": _timm("vit_tiny_patch16_224", img_size=32),
    "mobilevitv2_050": _timm("mobilevitv2_050"),
}
# timm's BatchNormAct2d layers, counted in the issue on the same models; recounted here
BN_ACT = {"efficientnet_b0": 49, "regnety_002": 44, "mobilevitv2_050": 25}


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():  # a zero-initialized head or layer scale would make every other weight irrelevant
        for p in model.parameters():
            if not bool(p.any()) and p.dim() >= 1 and p.numel() > 1:
                p.normal_(0, 0.02)
    return model.eval(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def models(**marks: Any) -> list[Any]:
    """Every model, nfnet_l0 marked slow, with the given marks per name."""
    out = []
    for name in MODELS:
        m = list(marks.get(name, []))
        if name == "nfnet_l0":
            m.append(pytest.mark.slow)
        out.append(pytest.param(name, marks=m))
    return out


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request: pytest.FixtureRequest, pytestconfig: pytest.Config) -> None:
    """Like tests/test_zoo.py: slow cases run with -m slow (or NORMKIT_SLOW=1), not in the default suite."""
    asked = "slow" in (pytestconfig.getoption("-m") or "") or os.environ.get("NORMKIT_SLOW")
    if request.node.get_closest_marker("slow") is not None and not asked:
        pytest.skip("slow: runs with -m slow (or NORMKIT_SLOW=1)")


# --- convert_batchnorm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BN_ACT))
def test_convert_batchnorm_converts_every_batchnorm_and_keeps_the_eval_function(name: str) -> None:
    model, x = make(name)
    assert sum(isinstance(m, BatchNormAct2d) for m in model.modules()) == BN_ACT[name]
    found = batchnorm_conversion(model, x, "renorm")
    assert found["batchnorms"] >= BN_ACT[name]
    assert found["change"] <= 1e-5, found["change"]
    assert found["left"] == [], (
        f"{len(found['left'])}/{found['batchnorms']} not converted: {found['left'][:3]}"
    )


@pytest.mark.parametrize("name", list(BN_ACT))
def test_convert_batchnorm_to_sync_keeps_the_eval_function(name: str) -> None:
    model, x = make(name)
    found = batchnorm_conversion(model, x, "sync")
    assert found["left"] == []
    assert found["change"] <= 1e-5, found["change"]


# --- LSUV ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    models(
        vit_tiny_patch16_224=[
            pytest.mark.xfail(
                strict=True,
                reason="NEW, not in issue 22: the model's own pos_embed / cls_token (weights LSUV does not "
                "cover) are neither in the report nor in a warning; BERT's position embedding is reported "
                "'unsupported'",
            )
        ],
    ),
)
def test_lsuv_report_is_what_hooks_measure(name: str) -> None:
    model, x = make(name)
    # float64: at 32×32 the last stages are 1×1, where batch norm over 2 values amplifies differences by up to
    # 1/(2√ε) per layer; in float32 the same forward with 1 and with 2 threads measured 1.05 and 1.23 for
    # efficientnet_b0's blocks.6.0.se.conv_reduce. float64 leaves only what LSUV's logic does.
    found = lsuv_findings(model.double(), x.double())
    problems = {
        k: found[k] for k in ("var_wrong", "not_converged", "silent", "norm_as_unsupported", "untouched")
    }
    assert not any(problems.values()), problems
    assert found["report"].initialized, "LSUV initialized nothing"


# --- parameter groups: only really scale-invariant weights --------------------------------------------------


@pytest.mark.parametrize("name", models())
def test_param_groups_select_only_scale_invariant_weights(name: str) -> None:
    model, x = make(name)
    groups = grassmann_param_groups(model, 0.01, 0.05, example_input=x, unit_init=False)
    grassmann = [p for g in groups if g["grassmann"] for p in g["params"]]
    assert not_scale_invariant(model, x, grassmann, per_row=True) == []
    groups = scale_invariant_param_groups(model, example_input=x)
    rows = [p for g in groups if g["projection"] == "row" for p in g["params"]]
    tensors = [p for g in groups if g["projection"] == "tensor" for p in g["params"]]
    assert not_scale_invariant(model, x, rows, per_row=True) == []
    assert not_scale_invariant(model, x, tensors, per_row=False) == []
    if name in BN_ACT:  # the weights feeding a BatchNormAct2d are found (they are scale invariant)
        assert grassmann and rows
    print(f"\n{name}: grassmann {len(grassmann)}, rows {len(rows)}, tensors {len(tensors)}")


# --- ENorm --------------------------------------------------------------------------------------------------

# Operations a positive per-channel scale passes through unchanged: splitting / chunking / padding / indexing
# along any axis, and (per model) multiplications that are by a per-channel constant — in timm's ConvNeXt the
# only `mul` is the layer scale `x.mul(gamma.reshape(1, -1, 1, 1))` (timm/models/convnext.py). A skip reason
# saying one of them "does not commute" is false (issue 22 item 10). Squeeze-excitation's only `mean` is the
# spatial mean `x.mean((2, 3))` (timm/layers/squeeze_excite.py), which commutes too; its `x * gate(x)` does
# not (the gate depends on the scaled channels), so `mul` is not listed for SE models.
_COMMUTING = {"chunk", "split", "_patch_merging_pad", "pad", "getitem", "unbind"}
_SE = {"mean"}
_COMMUTING_IN = {
    "convnext_nano": {"mul"},
    "efficientnet_b0": _SE,
    "regnety_002": _SE,
    "nfnet_l0_narrow": _SE,
    "nfnet_l0": _SE,
}


def false_commute_claims(name: str, skipped: list[tuple[tuple[str, ...], str]]) -> list[str]:
    """Skip reasons claiming that an operation does not commute with a positive per-channel scale, checked:
    unary functions are evaluated (f(d·x) = d·f(x) for random x and d > 0 means the claim is false)."""
    false = []
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 3, 3, generator=gen, dtype=torch.float64)
    d = torch.rand(1, 6, 1, 1, generator=gen, dtype=torch.float64) + 0.5
    for _, reason in skipped:
        match = re.search(r"(\w+) does not commute", reason)
        if match is None:
            continue
        op = match.group(1)
        if op in _COMMUTING | _COMMUTING_IN.get(name, set()):
            false.append(reason)
            continue
        fn = getattr(F, op, None) or getattr(torch, op, None)
        try:
            commutes = fn is not None and torch.allclose(fn(d * x), d * fn(x))
        except TypeError:  # needs more arguments than a tensor: not a unary function, cannot evaluate
            continue
        if commutes:
            false.append(reason)
    return false


@pytest.mark.parametrize(
    "name",
    models(),
)
def test_enorm_keeps_the_function_and_gives_true_skip_reasons(name: str) -> None:
    model, x = make(name)
    try:
        change, enorm, _ = enorm_function_change(model, x)
    except ENormStructureError as exc:  # MobileViT: fx cannot trace its control flow on tensor values
        message = str(exc)
        assert type(model).__name__ in message and "TraceError" in message, message  # what failed
        assert "pairs=" in message, message  # and the way forward
        return
    assert change <= 1e-10, change
    assert all(reason for _, reason in enorm.skipped)
    assert false_commute_claims(name, enorm.skipped) == []
    print(f"\n{name}: ENorm {len(enorm.groups)} groups, {len(enorm.skipped)} skipped, change {change:.1e}")


# --- one step of each optimizer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    models(
        # eight optimizers, four graph traces per model: in the default run one batch-norm model (the
        # transformers of test_zoo_hf take the same steps); the others with -m slow
        **{n: [pytest.mark.slow] for n in MODELS if n not in ("regnety_002", "efficientnet_b0")},
        efficientnet_b0=[
            pytest.mark.slow,
            pytest.mark.xfail(
                strict=True,
                reason="NOT in issue 22, undiagnosed: one SGDP step makes efficientnet_b0 non-finite "
                "(largest parameter change 3.8e8; SGD-G's 429) at batch 2, 32×32 — likely the train-mode "
                "gradients of 1×1 batch norm over 2 values; plain SGD not compared",
            ),
        ],
    ),
)
def test_one_step_of_each_optimizer_keeps_the_model_finite(name: str) -> None:
    model, x = make(name)
    results = one_step_each_optimizer(model, x, example_input=x)
    assert all(finite for finite, _ in results.values()), results
    assert all(moved > 0 for _, moved in results.values()), results
