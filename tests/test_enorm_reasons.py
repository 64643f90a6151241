"""ENorm's skip reasons say what is refused (layer scale, chunk / split, Swin's patch merging, untraceable
HF models), a layer scale is balanced through, and non-finite weights never spread."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normkit.enorm import ENorm, ENormStructureError

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _enorm(*args: object, **kwargs: object) -> ENorm:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ENorm(*args, **kwargs)  # type: ignore[arg-type]


class ConvGamma(nn.Module):
    """ConvNeXt's layer scale, written as timm writes it: ``x.mul(self.gamma.reshape(1, -1, 1, 1))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3)
        self.gamma = nn.Parameter(torch.linspace(-1.0, 2.0, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)).mul(self.gamma.reshape(1, -1, 1, 1)))


def test_layer_scale_is_balanced_through_and_keeps_the_function() -> None:
    from timm.layers import LayerScale

    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), LayerScale(16, init_values=0.3), nn.Linear(16, 4)
    ).double()
    with torch.no_grad():
        mlp[2].gamma.copy_(torch.linspace(-2.0, 3.0, 16))  # any sign: a fixed factor commutes with d > 0
        mlp[0].weight.mul_(torch.logspace(-1, 1, 16, dtype=torch.float64)[:, None])
    cases = [
        (mlp, torch.randn(5, 8, dtype=torch.float64), ("0",)),
        (ConvGamma().double(), torch.randn(2, 3, 6, 6, dtype=torch.float64), ("conv1",)),
    ]
    for model, x, producer in cases:
        before = model(x).detach()
        w0 = [p.detach().clone() for p in model.parameters()]
        enorm = _enorm(model, None, example_input=x)
        assert [g.producers for g in enorm.groups] == [producer], enorm.skipped
        enorm.cycle()
        assert _rel(model(x).detach(), before) < 1e-12
        assert max(_rel(p.detach(), q) for p, q in zip(model.parameters(), w0)) > 1e-3  # it did balance


class Chunked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.fc1(x)).chunk(2, dim=-1)
        return self.fc2(a) + self.fc2(b)


def test_reasons_say_what_is_refused() -> None:
    import timm
    import torchvision

    reasons = [r for _, r in _enorm(Chunked(), None).skipped]
    assert any("takes part of the tensor" in r for r in reasons), reasons
    swin = torchvision.models.swin_t(weights=None)
    reasons = [r for _, r in _enorm(swin, None, example_input=torch.randn(1, 3, 64, 64)).skipped]
    merging = [r for r in reasons if "_patch_merging_pad" in r]
    assert merging and all("2×2 neighbouring positions" in r and "commute" not in r for r in merging)
    convnext = timm.create_model("convnext_nano", pretrained=False)
    reasons = [r for _, r in _enorm(convnext, None, example_input=torch.randn(1, 3, 64, 64)).skipped]
    assert reasons and not any("mul" in r for r in reasons), reasons  # the layer scale is not the obstacle
    assert any("normalization layer" in r or "LayerNorm" in r for r in reasons)


def test_untraceable_hf_model_says_what_failed_and_what_to_do() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    with pytest.raises(ENormStructureError) as info:
        ENorm(transformers.BertModel(cfg), None)
    text = str(info.value)
    assert "could not trace BertModel" in text and "pairs=" in text and "hooked forward pass" in text
    assert "no Python control flow" not in text


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_weight_does_not_spread(bad: float) -> None:
    model = _mlp()
    with torch.no_grad():
        model[2].weight[3, 5] = bad
    before = [p.detach().clone() for p in model.parameters()]
    ENorm(model, None, cycles=3).step()
    nonfinite = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    assert nonfinite == 1  # the one bad entry, still alone
    assert torch.equal(model[2].weight[3, 5].isnan(), torch.tensor(bad != bad))
    # the rest was balanced: finite entries moved
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_nonfinite_raise_refuses_before_anything_changes_and_warn_names_it() -> None:
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"2\.weight"):
        ENorm(model, None, nonfinite="raise").step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.warns(UserWarning, match=r"non-finite values .* in 2\.weight"):
        ENorm(model, None, nonfinite="warn").step()
    assert sum(int((~torch.isfinite(p)).sum()) for p in model.parameters()) == 1
