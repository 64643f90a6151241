"""convert_batchnorm on timm's fused batch norm + activation layers (issue 22, item 1), and the refusal of
BatchNorm subclasses it does not know."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normkit.nn import BatchRenorm2d, SyncBatchRenorm, convert_batchnorm, register_converter
from tests.test_batchrenorm import reference_step

timm = pytest.importorskip("timm")
from timm.layers import SplitBatchNorm2d  # noqa: E402
from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct  # noqa: E402

from normkit.integrations.timm import BatchRenormAct2d, SyncBatchRenormAct  # noqa: E402


def with_trained_statistics(model, seed):
    """Random running statistics and affine parameters (set here, not by normkit), so that σ = √(var + ε) and
    the eval function are really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.num_batches_tracked.fill_(123)
    return model


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name, count", [("efficientnet_b0", 49), ("regnety_002", 44)])
def test_every_batchnorm_act_converts_and_the_eval_function_is_kept(name, count):
    torch.manual_seed(0)
    model = with_trained_statistics(timm.create_model(name, pretrained=False), seed=1).eval()
    originals = {n: m for n, m in model.named_modules() if type(m) is BatchNormAct2d}
    assert len(originals) == count
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)

    renorm = convert_batchnorm(copy.deepcopy(model))
    converted = {n: m for n, m in renorm.named_modules() if isinstance(m, BatchRenorm2d)}
    assert set(converted) == set(originals)
    assert all(type(m) is BatchRenormAct2d for m in converted.values())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in renorm.modules())
    for n, m in converted.items():  # the subclass's additions survive: the same kinds of act / drop modules
        assert type(m.act) is type(originals[n].act) and type(m.drop) is type(originals[n].drop)
        assert int(m.num_batches_tracked) == 123
    assert any(not isinstance(m.act, nn.Identity) for m in converted.values())
    with torch.no_grad():
        after = renorm(x)
        assert relative(after, before) <= 1e-5

        synced = convert_batchnorm(copy.deepcopy(model), "sync")  # timm's SyncBatchNormAct, act kept
        assert sum(type(m) is SyncBatchNormAct for m in synced.modules()) == count
        assert relative(synced(x), before) <= 1e-5  # no process group: a local batch norm

        renorm_synced = convert_batchnorm(copy.deepcopy(renorm), "sync")
        assert sum(type(m) is SyncBatchRenormAct for m in renorm_synced.modules()) == count
        assert relative(renorm_synced(x), before) <= 1e-5

        back = convert_batchnorm(copy.deepcopy(renorm), "batchnorm")
        assert sum(type(m) is BatchNormAct2d for m in back.modules()) == count
        assert relative(back(x), before) <= 1e-5


def test_mobilevit_and_cspresnet_convert_every_layer():
    for name, count in [("mobilevitv2_050", 25), ("cspresnet50", 55)]:
        model = timm.create_model(name, pretrained=False)
        assert sum(type(m) is BatchNormAct2d for m in model.modules()) == count
        renorm = convert_batchnorm(model)
        assert sum(type(m) is BatchRenormAct2d for m in renorm.modules()) == count
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in renorm.modules())


def test_converted_layer_in_training_is_brn_then_the_activation_by_hand():
    torch.manual_seed(2)
    model = timm.create_model("efficientnet_b0", pretrained=False)
    assert type(model.bn1) is BatchNormAct2d and isinstance(model.bn1.act, nn.SiLU)
    layer = convert_batchnorm(model).bn1.double().train()
    assert type(layer) is BatchRenormAct2d
    c = layer.num_features
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_std.uniform_(0.3, 0.6)
        layer.num_batches_tracked.fill_(50000)  # r_max 3, d_max 5: both clip
    mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
    x = (torch.randn(4, c, 5, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    gamma = layer.weight.detach().clone().requires_grad_()
    beta = layer.bias.detach().clone().requires_grad_()
    y = layer(x)
    y_brn, mu_ref, sigma_ref = reference_step(x_ref, gamma, beta, mu, sigma, 3.0, 5.0, layer.eps, 0.1)
    y_ref = y_brn * torch.sigmoid(y_brn)  # SiLU by hand
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert layer.momentum == 0.1  # BatchNormAct2d's, carried over
    torch.testing.assert_close(layer.running_mean, mu_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_std, sigma_ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, gamma.grad, rtol=1e-9, atol=1e-10)


def test_brn_act_built_directly_with_timm_arguments_and_a_drop_layer():
    layer = BatchRenormAct2d(6, act_layer="relu6", drop_layer=lambda: nn.Dropout(p=1.0), schedule="crossq")
    assert (
        isinstance(layer.act, nn.ReLU6)
        and isinstance(layer.drop, nn.Dropout)
        and layer.warmup_steps == 100_000
    )
    x = torch.randn(4, 6, 3, 3)
    assert torch.equal(layer(x), torch.zeros_like(x))  # drop p=1 before the act: timm's order
    layer.eval()
    plain = BatchRenorm2d(6).eval()
    plain.load_state_dict(layer.state_dict())  # the statistics the training call moved
    torch.testing.assert_close(layer(x), F.relu6(plain(x)))
    assert isinstance(BatchRenormAct2d(6, apply_act=False).act, nn.Identity)
    assert isinstance(SyncBatchRenormAct(6, act_layer="silu"), SyncBatchRenorm)


class ScaledBatchNorm(nn.BatchNorm2d):
    """A user's BatchNorm subclass that adds a learned output scale."""

    def __init__(self, c):
        super().__init__(c)
        self.scale = nn.Parameter(torch.full((c,), 2.0))

    def forward(self, x):
        return super().forward(x) * self.scale.view(1, -1, 1, 1)


def test_unknown_subclasses_are_refused_before_anything_changes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), ScaledBatchNorm(4), SplitBatchNorm2d(4))
    for to in ("renorm", "sync"):
        with pytest.raises(
            ValueError, match=r"2 \(.*ScaledBatchNorm\) to '" + to + r"'.*subclass of BatchNorm2d"
        ):
            convert_batchnorm(model, to)
        assert type(model[1]) is nn.BatchNorm2d  # the known layer before it was not converted either
    del model[2]
    with pytest.raises(
        ValueError, match=r"timm\.layers\.split_batchnorm\.SplitBatchNorm2d.*register_converter"
    ):
        convert_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d

    class MyRenorm(BatchRenorm2d):
        pass

    renorm_model = nn.Sequential(BatchRenorm2d(4), MyRenorm(4))
    for to in ("batchnorm", "sync"):
        with pytest.raises(ValueError, match=r"MyRenorm.*subclass of BatchRenorm2d"):
            convert_batchnorm(renorm_model, to)
        assert type(renorm_model[0]) is BatchRenorm2d


def test_a_registered_converter_is_used_and_shared_layers_stay_shared():
    def convert_scaled(layer, group, options, name):
        out = ScaledRenorm(layer.num_features)
        out.load_state_dict(layer.state_dict())
        return out.train(layer.training)

    class ScaledRenorm(BatchRenorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.scale = nn.Parameter(torch.full((c,), 2.0))

        def forward(self, x, mask=None):
            return super().forward(x, mask) * self.scale.view(1, -1, 1, 1)

    register_converter(ScaledBatchNorm, "renorm", convert_scaled)
    try:
        shared = nn.BatchNorm2d(4)
        model = nn.Sequential(ScaledBatchNorm(4), shared, nn.Sequential(shared)).eval()
        x = torch.randn(2, 4, 3, 3)
        before = model(x)
        out = convert_batchnorm(model)
        assert type(out[0]) is ScaledRenorm and out[1] is out[2][0] and type(out[1]) is BatchRenorm2d
        torch.testing.assert_close(out(x), before, rtol=1e-5, atol=1e-6)
    finally:
        from normkit.nn.convert import _CONVERTERS

        _CONVERTERS.pop((ScaledBatchNorm, "renorm"))


def test_the_core_does_not_import_timm():
    code = (
        "import sys, torch; from normkit.nn import convert_batchnorm; "
        "convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3))); "
        "assert 'timm' not in sys.modules and 'normkit.integrations.timm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
