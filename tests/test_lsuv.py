"""LSUV and orthogonal init: checked against independent float64 forward passes written here."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations

from normkit.init import LayerStatus, LSUVError, lsuv_init, orthogonal_init, orthogonal_weight
from normkit.init.lsuv import blob_variance, channel_moments, merge_moments, rescale_moments
from tests.distributed import run_gloo

# --- independent checks ----------------------------------------------------------------------------------


def output_variances(model: nn.Module, x: torch.Tensor, names: list[str], per_channel: bool = False):
    """Unbiased float64 variance of each named layer's output over all its calls, from a plain forward."""
    mods = dict(model.named_modules())
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        mods[n].register_forward_hook(lambda m, i, o, n=n: outs[n].append(o.detach().double())) for n in names
    ]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, f in flags:
            m.training = f
    if per_channel:
        return {
            n: torch.cat([o.transpose(0, 1).reshape(o.shape[1], -1) for o in v], 1).var(1)
            for n, v in outs.items()
        }
    return {n: torch.cat([o.flatten() for o in v]).var().item() for n, v in outs.items()}


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def plain_relu_net(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=bias),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=bias),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32, bias=bias),
        nn.ReLU(),
        nn.Linear(32, 5, bias=bias),
    )


LAYERS = ["0", "2", "4", "7", "9"]

# --- the functional core ---------------------------------------------------------------------------------


def test_moments_match_float64_and_rescale_exactly():
    torch.manual_seed(0)
    y = torch.randn(6, 3, 5, 4) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 2.0
    count, mean, m2 = channel_moments(y, 1)
    ref = y.double()
    assert torch.allclose(blob_variance(count, mean, m2), ref.var(), rtol=1e-6)
    assert torch.allclose(m2 / (count - 1), ref.transpose(0, 1).reshape(3, -1).var(1), rtol=1e-6)
    # merging two halves gives the moments of the whole
    merged = merge_moments([channel_moments(y[:2], 1), channel_moments(y[2:], 1)])
    assert torch.allclose(blob_variance(*merged), ref.var(), rtol=1e-6)
    # s·(y − b) + b: predicted moments equal those of the rescaled tensor
    b, s = torch.tensor([0.3, -1.0, 2.0]), torch.tensor(0.7, dtype=torch.float64)
    mean2, m22 = rescale_moments(mean, m2, b.double(), s)
    y2 = s * (ref - b.double().view(1, 3, 1, 1)) + b.double().view(1, 3, 1, 1)
    assert torch.allclose(blob_variance(count, mean2, m22), y2.var(), rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "groups", "transposed"),
    [
        ((6, 4), 1, False),
        ((4, 9), 1, False),
        ((8, 2, 3, 3), 4, False),
        ((8, 1, 3), 8, False),
        ((6, 4, 3, 3), 2, True),
    ],
)
def test_orthogonal_weight_per_group_and_axes(shape, groups, transposed):
    w = orthogonal_weight(shape, groups=groups, transposed=transposed, dtype=torch.float64)
    assert w.shape == shape
    k = math.prod(shape[2:])
    for g in range(groups):
        if transposed:
            in_g = shape[0] // groups
            block = w[g * in_g : (g + 1) * in_g].transpose(0, 1)  # rows = output channels
        else:
            out_g = shape[0] // groups
            block = w[g * out_g : (g + 1) * out_g]
        m = block.reshape(block.shape[0], -1)
        rows, cols = m.shape
        assert cols == (shape[0] // groups if transposed else shape[1]) * k
        gram = m @ m.T if rows <= cols else m.T @ m
        assert torch.allclose(gram, torch.eye(min(rows, cols), dtype=torch.float64), atol=1e-10)


def test_orthogonal_init_zeroes_biases_and_reports_names():
    model = plain_relu_net()
    names = orthogonal_init(model)
    assert names == LAYERS
    for n in names:
        layer = dict(model.named_modules())[n]
        assert torch.count_nonzero(layer.bias) == 0
    w = model[7].weight.double()  # 32 × 256: orthonormal rows
    assert torch.allclose(w @ w.T, torch.eye(32, dtype=torch.float64), atol=1e-5)


# --- the paper's property --------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_bias", [True, False])
def test_every_layer_reaches_unit_variance(zero_bias):
    torch.manual_seed(1)
    model = plain_relu_net()
    if not zero_bias:
        with torch.no_grad():
            for n in LAYERS:
                dict(model.named_modules())[n].bias.uniform_(0.5, 1.5)  # iterations are needed
    x = torch.randn(64, 3, 8, 8) * 3 + 1
    report = lsuv_init(model, x, zero_bias=zero_bias)
    assert [r.name for r in report.initialized] == LAYERS
    assert report.forward_passes == 1
    measured = output_variances(model, x, LAYERS)
    for r in report.initialized:
        assert abs(measured[r.name] - 1.0) < 0.1, (r.name, measured[r.name])
        assert r.converged and abs(r.var_after - measured[r.name]) < 1e-4
    if zero_bias:
        assert all(r.iterations == 1 for r in report.initialized)  # scaling is exact when b = 0
    assert report.converged


def test_target_var_and_per_channel():
    torch.manual_seed(2)
    model = plain_relu_net()
    x = torch.randn(64, 3, 8, 8)
    lsuv_init(model, x, target_var=2.0, tol=0.05)
    for n, v in output_variances(model, x, LAYERS).items():
        assert abs(v - 2.0) < 0.05, n
    lsuv_init(model, x, per_channel=True)
    for n, v in output_variances(model, x, ["0", "2", "4"], per_channel=True).items():
        assert torch.all((v - 1).abs() < 0.1), n


def test_function_is_orthogonal_net_up_to_positive_layer_scales():
    torch.manual_seed(3)
    base = plain_relu_net(bias=False)
    x = torch.randn(32, 3, 8, 8)
    ortho = copy.deepcopy(base)
    lsuv = copy.deepcopy(base)
    torch.manual_seed(7)
    orthogonal_init(ortho)
    torch.manual_seed(7)  # the same random orthogonal matrices
    report = lsuv_init(lsuv, x)
    mods_o, mods_l = dict(ortho.named_modules()), dict(lsuv.named_modules())
    total = 1.0
    for r in report.initialized:
        wo, wl = mods_o[r.name].weight.detach().double(), mods_l[r.name].weight.detach().double()
        s = (wl * wo).sum() / (wo * wo).sum()
        assert s > 0 and torch.allclose(wl, s * wo, rtol=1e-5, atol=1e-7)
        assert math.isclose(float(s), r.scale, rel_tol=1e-5)
        total *= float(s)
    with torch.no_grad():
        yo, yl = ortho(x).double(), lsuv(x).double()
    # a bias-free ReLU net is positively homogeneous in each layer's weight: outputs are proportional
    assert torch.allclose(yl, total * yo, rtol=1e-4, atol=1e-6 * float(yl.abs().max()))


class Reordered(nn.Module):
    """Defines its layers in the reverse of the order it runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(16, 4, bias=False)
        self.middle = nn.Linear(32, 16, bias=False)
        self.first = nn.Linear(8, 32, bias=False)

    def forward(self, x):
        return self.last(F.relu(self.middle(F.relu(self.first(x)))))


def registration_order_lsuv(model: nn.Module, x: torch.Tensor) -> None:
    """The peers' order: model.modules(), one exact correction per layer."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            out: list[torch.Tensor] = []
            h = m.register_forward_hook(lambda mod, i, o, out=out: out.append(o))
            with torch.no_grad():
                model(x)
                m.weight /= out[0].double().var().sqrt().float()
            h.remove()


def test_execution_order_beats_registration_order():
    torch.manual_seed(4)
    x = torch.randn(128, 8) * 4
    model = Reordered()
    orthogonal_init(model)
    naive = copy.deepcopy(model)
    registration_order_lsuv(naive, x)
    naive_var = output_variances(naive, x, ["first", "middle", "last"])
    assert abs(naive_var["last"] - 1) > 0.5  # scaled first, then its input changed under it
    report = lsuv_init(model, x, orthogonal=False)
    assert [r.name for r in report.initialized] == ["first", "middle", "last"]
    for n, v in output_variances(model, x, ["first", "middle", "last"]).items():
        assert abs(v - 1) < 0.1, n


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.block = nn.Linear(12, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        x = self.inp(x)
        x = self.block(torch.relu(self.block(torch.relu(x))))
        return self.out(x)


def test_shared_module_uses_all_its_calls():
    torch.manual_seed(5)
    x = torch.randn(256, 6) * 2
    model = Shared()
    report = lsuv_init(model, x)
    assert report["block"].calls == 2 and report["block"].converged
    measured = output_variances(model, x, ["inp", "block", "out"])
    for n, v in measured.items():
        assert abs(v - 1) < 0.1, n
    assert report.forward_passes == report["block"].iterations + 1  # one pass per try of the shared block


def test_conv1d_and_transposed_conv_nets():
    torch.manual_seed(6)
    net1d = nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, groups=8),  # depthwise
        nn.ReLU(),
        nn.Conv1d(8, 4, 1),
    )
    x1 = torch.randn(16, 2, 40)
    lsuv_init(net1d, x1)
    for n, v in output_variances(net1d, x1, ["0", "2", "4"]).items():
        assert abs(v - 1) < 0.1, n
    net2d = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 3, 3, padding=1),
    )
    x2 = torch.randn(8, 3, 16, 16)
    report = lsuv_init(net2d, x2, per_channel=True)
    assert report.converged
    for n, v in output_variances(net2d, x2, ["0", "2", "4"], per_channel=True).items():
        assert torch.all((v - 1).abs() < 0.1), n


# --- normalization, parametrizations, unsupported layers -------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


def test_layer_feeding_normalization_keeps_orthogonal_init():
    torch.manual_seed(8)
    model = ConvBN().train()
    x = torch.randn(16, 3, 8, 8) * 5
    report = lsuv_init(model, x)
    assert report["conv1"].status is LayerStatus.FEEDS_NORMALIZATION
    assert [r.name for r in report.initialized] == ["conv2", "fc"]
    w = model.conv1.weight.reshape(8, -1).double()
    assert torch.allclose(w @ w.T, torch.eye(8, dtype=torch.float64), atol=1e-5)  # orthonormal, not rescaled
    assert model.training and model.bn.training
    assert int(model.bn.num_batches_tracked) == 0 and torch.equal(model.bn.running_var, torch.ones(8))
    report = lsuv_init(model, x, skip_normalized=False)
    assert report["conv1"].status is LayerStatus.INITIALIZED
    assert abs(output_variances(model, x, ["conv1"])["conv1"] - 1) < 0.1


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_weight_norm_layers_are_really_rescaled(kind):
    torch.manual_seed(9)
    model = plain_relu_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for i in (0, 7):
            if kind == "parametrization":
                model[i] = parametrizations.weight_norm(model[i])
            else:
                model[i] = torch.nn.utils.weight_norm(model[i])
    x = torch.randn(32, 3, 8, 8) * 4
    report = lsuv_init(model, x)
    assert report.converged
    for n, v in output_variances(model, x, LAYERS).items():
        assert abs(v - 1) < 0.1, n


def test_spectral_norm_is_refused_and_model_untouched():
    model = plain_relu_net()
    model[2] = parametrizations.spectral_norm(model[2])
    before = params_of(model)
    with pytest.raises(LSUVError, match=r"'2'.*cannot express"):
        lsuv_init(model, torch.randn(8, 3, 8, 8))
    assert_same_params(model, before)
    old = plain_relu_net()
    old[2] = torch.nn.utils.spectral_norm(old[2])
    before = params_of(old)
    with pytest.raises(LSUVError, match="spectral_norm"):
        lsuv_init(old, torch.randn(8, 3, 8, 8))
    assert_same_params(old, before)


class WithEmbeddingAndLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        out, _ = self.rnn(self.emb(tokens))
        return self.head(out)


def test_unsupported_layers_are_reported_not_passed_silently():
    model = WithEmbeddingAndLSTM()
    with pytest.warns(RuntimeWarning, match="'emb' \\(Embedding, unsupported\\).*'rnn' \\(LSTM"):
        report = lsuv_init(model, torch.randint(0, 20, (16, 7)))
    assert report["emb"].status is LayerStatus.UNSUPPORTED and report["rnn"].status is LayerStatus.UNSUPPORTED
    assert report["head"].status is LayerStatus.INITIALIZED and report["head"].converged


# --- data, options, errors -------------------------------------------------------------------------------


def test_fresh_batches_from_a_dataloader():
    torch.manual_seed(10)
    data = torch.utils.data.TensorDataset(torch.randn(512, 3, 8, 8) * 2, torch.zeros(512))
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True)
    model = plain_relu_net()
    report = lsuv_init(model, loader, fresh_batches=True)
    assert report.forward_passes == len(LAYERS)  # one partial pass per layer, each on its own batch
    measured = output_variances(model, data.tensors[0], LAYERS)
    for n, v in measured.items():
        assert abs(v - 1) < 0.25, n  # fitted on one batch of 128, checked on all 512
    model2 = plain_relu_net()
    report2 = lsuv_init(model2, (data.tensors[0][:128], data.tensors[1][:128]))  # (input, target) tuple
    assert report2.forward_passes == 1 and report2.converged


def test_non_convergence_warns_naming_the_layer():
    torch.manual_seed(11)
    model = plain_relu_net()
    with torch.no_grad():
        model[0].bias.copy_(torch.linspace(-2.0, 2.0, 8))  # a spread of biases: one scaling cannot be exact
    with pytest.warns(RuntimeWarning, match=r"did not reach.*'0' \(var"):
        report = lsuv_init(
            model, torch.randn(32, 3, 8, 8), zero_bias=False, max_iters=1, tol=1e-3, include=["0"]
        )
    assert report["0"].converged is False and report["0"].iterations == 1


class MidwayDead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x)) * 0.0))


def test_layer_whose_output_ignores_its_weight_keeps_it_and_is_named():
    torch.manual_seed(10)
    x = torch.randn(16, 4)
    model = MidwayDead()
    # b sees an all-zero input: its output is its bias whatever its weight. The old loop multiplied the weight
    # by 1/sqrt(var(bias)) ten times over (~1e7) without changing anything.
    with pytest.warns(RuntimeWarning, match=r"kept the weights of: 'b' \(the output does not depend"):
        report = lsuv_init(model, x, zero_bias=False)
    assert report["b"].status is LayerStatus.NO_EFFECT and report["b"].iterations == 0
    w = model.b.weight.detach().double()
    assert torch.allclose(w @ w.T, torch.eye(8, dtype=torch.float64), atol=1e-5)  # orthogonal, never scaled
    assert report["a"].status is LayerStatus.INITIALIZED and report["a"].converged
    # with zero biases every layer after the zeroing is dead: reported, not an error, nothing scaled
    model = MidwayDead()
    with pytest.warns(RuntimeWarning, match="'b'.*'c'"):
        report = lsuv_init(model, x)
    assert [r.status for r in report] == [
        LayerStatus.INITIALIZED,
        LayerStatus.NO_EFFECT,
        LayerStatus.NO_EFFECT,
    ]
    for name in ("b", "c"):
        w = getattr(model, name).weight.detach().double()
        rows = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert torch.allclose(rows, torch.eye(min(w.shape), dtype=torch.float64), atol=1e-5)


def test_scale_beyond_max_scale_keeps_the_weight():
    torch.manual_seed(11)
    model = plain_relu_net()
    x = torch.randn(32, 3, 8, 8) * 1e-6  # the first layer would need a factor of about 1e6
    with pytest.warns(RuntimeWarning, match=r"'0' \(would scale the weight by .*beyond max_scale=10000"):
        report = lsuv_init(model, x)
    assert report["0"].status is LayerStatus.OUT_OF_BOUNDS and report["0"].iterations == 0
    w = model[0].weight.detach().reshape(8, -1).double()
    assert torch.allclose(w @ w.T, torch.eye(8, dtype=torch.float64), atol=1e-5)
    for r in report.initialized:
        assert 1e-4 <= r.scale <= 1e4, r.name
    report = lsuv_init(model, x, max_scale=1e8)  # a wider bound lets it through
    assert report["0"].status is LayerStatus.INITIALIZED and report["0"].converged


def test_non_finite_output_raises_and_restores_the_model():
    model = MidwayDead()
    before = params_of(model)
    x = torch.randn(16, 4)
    x[0, 0] = float("nan")
    with pytest.raises(LSUVError, match="'a' gives a non-finite output variance"):
        lsuv_init(model, x)
    assert_same_params(model, before)


class BNThenPlain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn(self.conv1(x))))
        return self.fc(self.drop(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1)))


def train_mode_variances(model, x, names):
    """Float64 variances of the named layers' outputs with BatchNorm on batch statistics and dropout off
    (the mode training will run), measured on a copy so the model's running statistics stay untouched."""
    probe = copy.deepcopy(model).eval()
    for m in probe.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    return output_variances_in_mode(probe, x, names)


def output_variances_in_mode(model, x, names):
    mods = dict(model.named_modules())
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        mods[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o.detach())) for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: outs[n].double().var().item() for n in names}


def test_variances_are_measured_with_batch_statistics_as_training_runs():
    torch.manual_seed(12)
    model = BNThenPlain().train()
    x = torch.randn(16, 3, 8, 8) * 5  # conv1's output is far from unit variance: BN in eval would not fix it
    report = lsuv_init(model, x)
    assert report["conv1"].status is LayerStatus.FEEDS_NORMALIZATION
    for name, v in train_mode_variances(model, x, ["conv2", "fc"]).items():
        assert abs(v - 1) < 0.1, (name, v)
    # running statistics, the counter and every mode flag are as before
    assert model.training and model.bn.training and model.drop.training
    assert int(model.bn.num_batches_tracked) == 0 and torch.equal(model.bn.running_var, torch.ones(8))
    assert torch.equal(model.bn.running_mean, torch.zeros(8))
    # batch_statistics=False keeps the old, eval-mode semantics (frozen statistics)
    report = lsuv_init(model, x, batch_statistics=False)
    assert abs(output_variances(model, x, ["conv2"])["conv2"] - 1) < 0.1


def test_bad_arguments_give_clear_errors_and_touch_nothing():
    model = plain_relu_net()
    before = params_of(model)
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match="tol"):
        lsuv_init(model, x, tol=0)
    with pytest.raises(ValueError, match="max_iters"):
        lsuv_init(model, x, max_iters=0)
    with pytest.raises(ValueError, match="target_var"):
        lsuv_init(model, x, target_var=-1)
    with pytest.raises(ValueError, match="'6', which is not a linear / conv layer"):
        lsuv_init(model, x, include=["6"])
    with pytest.raises(ValueError, match="'nope', which is no module"):
        lsuv_init(model, x, include=["nope"])
    with pytest.raises(ValueError, match="fresh_batches=True needs an iterable"):
        lsuv_init(model, x, fresh_batches=True)
    with pytest.raises(TypeError, match="tensor batch"):
        lsuv_init(model, {"x": x})
    with pytest.raises(LSUVError, match="nothing to initialize"):
        lsuv_init(nn.Sequential(nn.ReLU()), x)
    assert_same_params(model, before)


def test_include_restricts_the_layers():
    model = plain_relu_net()
    before = params_of(model)
    x = torch.randn(16, 3, 8, 8)
    report = lsuv_init(model, x, include=lambda name, m: isinstance(m, nn.Linear))
    assert [r.name for r in report.initialized] == ["7", "9"]
    assert report["0"].status is LayerStatus.EXCLUDED
    assert torch.equal(model[0].weight, before["0.weight"])


def test_dtype_device_and_mode_are_kept():
    model = plain_relu_net().double().train()
    report = lsuv_init(model, torch.randn(16, 3, 8, 8))  # float input is cast to the model's dtype
    assert report.converged and model.training
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())


# --- distributed -----------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(100 + rank)  # different initial weights and RNG on each rank
    model = plain_relu_net()
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(32, 3, 8, 8, generator=g) * (1.0 + 2.0 * rank)  # different batches
    ddp = nn.parallel.DistributedDataParallel(model)
    report = lsuv_init(ddp, x)
    assert report.converged and dist.is_initialized()
    return {"x": x, **{k: v.detach().clone() for k, v in model.state_dict().items()}}


def test_distributed_ranks_end_identical_on_the_union_of_batches():
    r0, r1 = run_gloo(_ddp_worker, 2)
    for k in r0:
        if k != "x":
            assert torch.equal(r0[k], r1[k]), k
    model = plain_relu_net()
    model.load_state_dict({k: v for k, v in r0.items() if k != "x"})
    both = torch.cat([r0["x"], r1["x"]])
    for n, v in output_variances(model, both, LAYERS).items():
        assert abs(v - 1) < 0.1, n
    # ... and not on one rank's batch alone: the ranks really pooled their statistics
    assert abs(output_variances(model, r1["x"], ["0"])["0"] - 1) > 0.3


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(4, 16)
        self.a = nn.Linear(16, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = -x
        return self.a(torch.relu(self.b(x)))


def test_untraceable_model_uses_a_hooked_forward_and_verbose_prints_the_table(capsys):
    torch.manual_seed(12)
    model = Untraceable()
    x = torch.randn(64, 4) * 3
    report = lsuv_init(model, x, verbose=True)
    assert report.forward_passes == 2  # one hooked pass for the structure, one for LSUV
    assert [r.name for r in report.initialized] == ["b", "a"]
    for n, v in output_variances(model, x, ["b", "a"]).items():
        assert abs(v - 1) < 0.1, n
    out = capsys.readouterr().out
    assert "var before" in out and "2 forward pass(es)" in out


def _deep_plain_mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(20):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


@pytest.mark.slow
def test_deep_plain_net_trains_after_lsuv_not_from_default_init():
    """20 linear + ReLU layers, no normalization, on scikit-learn's real 8×8 digits: PyTorch's default init
    (weight variance 1/(3 fan_in): the signal shrinks ~6× per layer) stays at chance; LSUV trains."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    accuracy = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: two threads only spin on a loaded machine
    try:
        for init in ("default", "lsuv"):
            accuracy[init] = _train_digits(init, xtr, ytr, xte, yte)
    finally:
        torch.set_num_threads(threads)
    print(f"deep plain MLP on digits, test accuracy after 9 epochs: {accuracy}")
    assert accuracy["default"] < 0.2, accuracy  # chance is 0.1
    assert accuracy["lsuv"] > 0.8, accuracy


def _train_digits(init: str, xtr, ytr, xte, yte) -> float:
    torch.manual_seed(1)
    model = _deep_plain_mlp()
    if init == "lsuv":
        assert lsuv_init(model, xtr[:512]).converged
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    for _ in range(9):
        order = torch.randperm(1400, generator=g)
        for i in range(0, 1400, 50):
            idx = order[i : i + 50]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).double().mean().item()


def test_conv3d_and_transposed_conv1d_nets():
    torch.manual_seed(13)
    net3d = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 6, 3, groups=3))
    x3 = torch.randn(4, 2, 6, 6, 6)
    assert lsuv_init(net3d, x3).converged
    for n, v in output_variances(net3d, x3, ["0", "2"]).items():
        assert abs(v - 1) < 0.1, n
    net1t = nn.Sequential(
        nn.ConvTranspose1d(3, 8, 4, stride=2), nn.ReLU(), nn.ConvTranspose1d(8, 4, 3, groups=4)
    )
    x1 = torch.randn(16, 3, 20)
    assert lsuv_init(net1t, x1, per_channel=True).converged
    for n, v in output_variances(net1t, x1, ["0", "2"], per_channel=True).items():
        assert torch.all((v - 1).abs() < 0.1), n


# --- models people download: measured reports --------------------------------------------------------------


def assert_report_is_measured(model: nn.Module, x: torch.Tensor, report) -> dict[str, float]:
    """Every variance the report gives equals the one hooks measure on the real forward after the init, and
    every layer it calls converged is within the tolerance by that measurement."""
    names = [r.name for r in report if r.var_after is not None]
    measured = output_variances(model, x, names)
    for r in report:
        if r.var_after is None:
            continue
        assert r.var_after == pytest.approx(measured[r.name], rel=1e-4, abs=1e-12), r
        if r.converged:
            assert abs(measured[r.name] - report.target_var) < report.tol, r
    return measured


def test_weight_standardized_convs_are_measured_not_predicted():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(
        timm_layers.StdConv2d(3, 8, 3),
        nn.ReLU(),
        timm_layers.ScaledStdConv2d(8, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3),
    )
    x = torch.randn(8, 3, 12, 12)
    before = params_of(model)
    with pytest.warns(RuntimeWarning, match="'0' \\(its output does not change when its weight is scaled"):
        report = lsuv_init(model, x, orthogonal=False)
    assert_report_is_measured(model, x, report)
    # StdConv2d normalizes its weight: no scale can move it, so it is kept and said so
    assert report["0"].status is LayerStatus.NO_EFFECT and report["0"].converged is None
    assert torch.equal(model[0].weight, before["0.weight"])
    # ScaledStdConv2d: its gain is scaled, the standardized weight is left as it was
    assert report["2"].status is LayerStatus.INITIALIZED and report["2"].converged
    assert "gain" in report["2"].note
    assert torch.equal(model[2].weight, before["2.weight"])
    assert not torch.equal(model[2].gain, before["2.gain"])
    assert report["4"].status is LayerStatus.INITIALIZED and report["4"].converged


@pytest.mark.slow
def test_nfnet_report_equals_hook_measurements():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("nfnet_l0", pretrained=False)
    x = torch.randn(2, 3, 32, 32)
    # orthogonal=False: the QR of nfnet_l0's 82 weights takes minutes on a loaded 2-core machine; the
    # report's honesty does not depend on it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lsuv_init(model, x, orthogonal=False)
    measured = assert_report_is_measured(model, x, report)
    initialized = [r for r in report if r.status is LayerStatus.INITIALIZED]
    assert len(initialized) > 20 and all(r.converged for r in initialized)
    # the residual branches' last convs start with gain 0 (NFNet's skip-init): their output ignores the weight
    kept = [r for r in report if r.status is LayerStatus.NO_EFFECT]
    assert kept and all(measured[r.name] == pytest.approx(r.var_before, abs=1e-12) for r in kept)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, i):
        return self.head(self.fc2(F.relu(self.fc1(self.emb(i)))))


def test_tied_weights_are_kept_and_measured():
    torch.manual_seed(0)
    model = TiedLM()
    emb = model.emb.weight.detach().clone()
    x = torch.randint(0, 50, (8, 12))
    with pytest.warns(RuntimeWarning, match="kept the weights of: 'head' \\(shares its weight with 'emb'"):
        report = lsuv_init(model, x)
    measured = assert_report_is_measured(model, x, report)
    assert report["head"].status is LayerStatus.SHARED and "'emb'" in report["head"].note
    assert torch.equal(model.emb.weight, emb)  # neither orthogonalized nor scaled through the head
    for name in ("fc1", "fc2"):
        assert report[name].converged and abs(measured[name] - 1) < 0.1


def test_gpt2_conv1d_layers_are_initialized():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2Model(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    )
    x = torch.randint(0, 100, (4, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = lsuv_init(model, x)
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8
    measured = assert_report_is_measured(model, x, report)
    for name in conv1d:
        assert report[name].status is LayerStatus.INITIALIZED, report[name]
        assert abs(measured[name] - 1) < 0.1
    untouched = " ".join(str(w.message) for w in caught if "left untouched" in str(w.message))
    assert "'wte'" in untouched and "Conv1D" not in untouched
    # the orthogonal pre-init sees a Conv1D weight as (in, out): its transpose has orthonormal rows / columns
    orthogonal_init(model)
    for name in conv1d:
        m = model.get_submodule(name).weight.detach().double().T
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        assert torch.allclose(gram, torch.eye(len(gram), dtype=gram.dtype), atol=1e-5)


def test_norm_layers_lsuv_does_not_know_are_not_listed():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=32,
    )
    model = transformers.LlamaModel(config)
    x = torch.randint(0, 100, (4, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = lsuv_init(model, x)
    norms = [n for n, m in model.named_modules() if "RMSNorm" in type(m).__name__]
    assert norms and not any(n in {r.name for r in report} for n in norms)
    assert not any("RMSNorm" in str(w.message) for w in caught)
    assert [r.name for r in report if r.status is LayerStatus.UNSUPPORTED] == ["embed_tokens"]
    assert_report_is_measured(model, x, report)


@pytest.mark.parametrize("value", [0.0, 3.0])
def test_constant_input_is_refused_before_anything_changes(value):
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    before = params_of(model)
    with pytest.raises(LSUVError, match="the init batch is constant"):
        lsuv_init(model, torch.full((32, 10), value))
    assert_same_params(model, before)


# --- Lightning: LSUVInit on a LightningModule without forward --------------------------------------------


def _lightning_fit(select, with_forward: bool):
    L = pytest.importorskip("lightning.pytorch")
    from normkit.integrations.lightning import LSUVInit

    class NoForward(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: after fit, the weights are the init's

    class WithForward(NoForward):
        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    module = (WithForward if with_forward else NoForward)()
    g = torch.Generator().manual_seed(1)
    x, y = 3 * torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    callback = LSUVInit(select=select)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    before = params_of(module)
    return trainer, module, data, callback, before, x


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's "few workers" notes
def test_lightning_lsuv_init_select_by_name_and_clear_error_without_forward():
    trainer, module, data, _, before, _ = _lightning_fit(None, with_forward=False)
    with pytest.raises(RuntimeError, match=r"defines no forward\(\).*LSUVInit\(select='net'\)") as info:
        trainer.fit(module, data)
    assert info.value.__cause__ is None and info.value.__context__ is None  # one message, no chain
    assert_same_params(module, before)

    trainer, module, data, _, before, _ = _lightning_fit("nope", with_forward=False)
    with pytest.raises(ValueError, match=r"no submodule of that name; its submodules are \['net'\]"):
        trainer.fit(module, data)
    assert_same_params(module, before)

    for select in ("net", lambda m: m.net):
        trainer, module, data, callback, _, x = _lightning_fit(select, with_forward=False)
        trainer.fit(module, data)
        assert [r.name for r in callback.report.initialized] == ["0", "2"]
        measured = output_variances(module.net, x, ["0", "2"])
        assert all(abs(v - 1) < 0.1 for v in measured.values()), measured
    with pytest.raises(TypeError, match="name of a submodule"):
        from normkit.integrations.lightning import LSUVInit

        LSUVInit(select=3)  # type: ignore[arg-type]
