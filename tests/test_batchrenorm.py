import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normkit.nn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, SyncBatchRenorm, convert_batchnorm
from tests.distributed import run_gloo


def reference_step(x, gamma, beta, mu, sigma, r_max, d_max, eps, alpha):
    """Algorithm 1 of Ioffe (2017), written out in float64 with autograd only through x, gamma, beta."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(eps + ((x - mu_b.view(shape)) ** 2).mean(dims))
    r = torch.clamp(sigma_b.detach() / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu_b.detach() - mu) / sigma, -d_max, d_max)
    x_hat = (x - mu_b.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    y = gamma.view(shape) * x_hat + beta.view(shape)
    new_mu = mu + alpha * (mu_b.detach() - mu)
    new_sigma = sigma + alpha * (sigma_b.detach() - sigma)
    return y, new_mu, new_sigma


def schedule_limits(step, r_max=3.0, d_max=5.0, warmup=5000, r_steps=40000, d_steps=25000):
    ramp_r = min(max((step - warmup) / (r_steps - warmup), 0.0), 1.0)
    ramp_d = min(max((step - warmup) / (d_steps - warmup), 0.0), 1.0)
    return 1 + (r_max - 1) * ramp_r, d_max * ramp_d


@pytest.mark.parametrize("step", [0, 5000, 20000, 50000])
@pytest.mark.parametrize("shift", [0.0, 3.0], ids=["clip-inactive", "clip-active"])
@pytest.mark.parametrize("shape", [(16, 5), (8, 5, 7), (6, 5, 4, 3), (4, 5, 2, 3, 2)])
def test_training_step_matches_float64_algorithm_1(step, shift, shape):
    torch.manual_seed(step + len(shape))
    cls = {2: BatchRenorm1d, 3: BatchRenorm1d, 4: BatchRenorm2d, 5: BatchRenorm3d}[len(shape)]
    layer = cls(5, momentum=0.01, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        # Statistics far from the batch's make r and d hit their limits ("clip-active").
        layer.running_mean.copy_(torch.randn(5, dtype=torch.float64) * 0.1 + shift)
        layer.running_std.copy_(torch.rand(5, dtype=torch.float64) * 0.5 + 0.75 + shift)
        layer.num_batches_tracked.fill_(step)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    gamma = layer.weight.detach().clone().requires_grad_()
    beta = layer.bias.detach().clone().requires_grad_()
    r_max, d_max = schedule_limits(step)
    y_ref, mu_ref, sigma_ref = reference_step(
        x_ref, gamma, beta, layer.running_mean.clone(), layer.running_std.clone(), r_max, d_max, 1e-5, 0.01
    )
    y = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.running_mean, mu_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_std, sigma_ref, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == step + 1
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, gamma.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, beta.grad, rtol=1e-9, atol=1e-10)


def test_clipping_is_really_active_in_the_clip_case():
    layer = BatchRenorm1d(3, dtype=torch.float64)
    layer.running_mean.fill_(3.0)
    layer.running_std.fill_(4.0)
    layer.num_batches_tracked.fill_(50000)
    r_max, d_max = layer.current_limits()
    assert float(r_max) == 3.0 and float(d_max) == 5.0
    x = torch.randn(32, 3, dtype=torch.float64) * 20
    y = layer(x)
    mu_b, sigma_b = x.mean(0), torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    assert (sigma_b / 4.0 > 3.0).all()  # the unclipped r would exceed r_max = 3
    d = torch.clamp((mu_b - 3.0) / 4.0, -5.0, 5.0)
    torch.testing.assert_close(y, (x - mu_b) / sigma_b * 3.0 + d)


def test_warmup_equals_batch_norm_in_training_mode():
    torch.manual_seed(0)
    layer = BatchRenorm2d(4)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.normal_()
        bn.weight.copy_(layer.weight)
        bn.bias.copy_(layer.bias)
        layer.running_mean.normal_()  # r_max = 1, d_max = 0: running statistics must not matter
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = layer(x)
    expected = F.batch_norm(x2, None, None, bn.weight, bn.bias, training=True, eps=1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-4)


def test_eval_is_the_inference_formula():
    torch.manual_seed(1)
    layer = BatchRenorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_std.uniform_(0.5, 2.0)
    layer.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    shape = (1, 3, 1, 1)
    expected = layer.weight.view(shape) * (x - layer.running_mean.view(shape)) / layer.running_std.view(
        shape
    ) + layer.bias.view(shape)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_momentum_none_is_a_cumulative_average():
    layer = BatchRenorm1d(2, momentum=None, dtype=torch.float64)
    batches = [torch.randn(10, 2, dtype=torch.float64) + i for i in range(3)]
    for b in batches:
        layer(b)
    expected = torch.stack([b.mean(0) for b in batches]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected)


def test_callable_schedule_gets_the_step_tensor():
    seen = []

    def schedule(step):
        seen.append(step.clone())
        return 2.0, 0.5

    layer = BatchRenorm1d(2, schedule=schedule)
    layer(torch.randn(4, 2))
    layer(torch.randn(4, 2))
    assert [int(s) for s in seen] == [0, 1]
    assert "schedule=" in repr(layer)


def test_state_dict_round_trip_keeps_the_schedule_position():
    layer = BatchRenorm2d(3)
    layer.num_batches_tracked.fill_(12345)
    for _ in range(2):
        layer(torch.randn(4, 3, 2, 2))
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_std", "num_batches_tracked"}
    fresh = BatchRenorm2d(3)
    fresh.load_state_dict(state)
    assert int(fresh.num_batches_tracked) == 12347
    for a, b in zip(fresh.current_limits(), layer.current_limits()):
        assert torch.equal(a, b)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(fresh(x), layer(x))


def test_batchnorm_state_dict_loads_with_sigma_conversion():
    bn = nn.BatchNorm2d(3)
    bn.train()
    bn(torch.randn(8, 3, 4, 4) * 3)
    bn.eval()
    layer = BatchRenorm2d(3).eval()
    layer.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-6)


def make_bn_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.BatchNorm1d(6),
    )


def test_converters_keep_eval_outputs_and_parameters():
    torch.manual_seed(2)
    net = make_bn_net()
    net.train()
    for _ in range(3):
        net(torch.randn(8, 3, 6, 6) * 2 + 1)
    net.eval()
    x = torch.randn(5, 3, 6, 6)
    before = net(x)
    weight = net[1].weight
    renorm = convert_batchnorm(net, "renorm", r_max=2.0)
    assert isinstance(renorm[1], BatchRenorm2d) and isinstance(renorm[5], BatchRenorm1d)
    assert renorm[1].weight is weight and renorm[1].r_max == 2.0 and not renorm[1].training
    assert int(renorm[1].num_batches_tracked) == 3
    torch.testing.assert_close(renorm(x), before, rtol=1e-5, atol=1e-6)
    back = convert_batchnorm(copy.deepcopy(renorm), "batchnorm")
    assert type(back[1]) is nn.BatchNorm2d and type(back[5]) is nn.BatchNorm1d
    torch.testing.assert_close(back(x), before, rtol=1e-5, atol=1e-6)
    synced = convert_batchnorm(copy.deepcopy(renorm), "sync")
    assert type(synced[1]) is SyncBatchRenorm and synced[1].r_max == 2.0
    torch.testing.assert_close(synced(x), before, rtol=1e-5, atol=1e-6)  # no process group: local
    plain_sync = convert_batchnorm(make_bn_net(), "sync")
    assert type(plain_sync[1]) is nn.SyncBatchNorm


def test_converting_the_root_module_and_errors():
    bn = nn.BatchNorm1d(3)
    out = convert_batchnorm(bn)
    assert isinstance(out, BatchRenorm1d)
    with pytest.raises(ValueError, match="track_running_stats=True"):
        convert_batchnorm(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))
    with pytest.raises(ValueError, match="to must be"):
        convert_batchnorm(bn, "layernorm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="virtual_batch_size"):
        convert_batchnorm(BatchRenorm1d(3, virtual_batch_size=2), "sync")


def test_ghost_batches_equal_separate_microbatches():
    torch.manual_seed(3)
    ghost = BatchRenorm2d(4, virtual_batch_size=4, dtype=torch.float64)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.normal_()
        ghost.running_mean.normal_()
        ghost.running_std.uniform_(0.5, 1.5)
        ghost.num_batches_tracked.fill_(30000)  # r, d active
    single = copy.deepcopy(ghost)
    x = torch.randn(14, 4, 3, 3, dtype=torch.float64) * 2  # 3 groups of 4 and a remainder of 2
    y = ghost(x)
    parts = []
    for chunk in x.split(4):
        layer = copy.deepcopy(single)  # same statistics before the step for every microbatch
        parts.append(layer(chunk))
    torch.testing.assert_close(y, torch.cat(parts), rtol=1e-10, atol=1e-10)
    # Running statistics move once, toward the whole batch's statistics.
    whole = copy.deepcopy(single)
    whole.virtual_batch_size = None
    whole(x)
    torch.testing.assert_close(ghost.running_mean, whole.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ghost.running_std, whole.running_std, rtol=1e-10, atol=1e-12)
    assert int(ghost.num_batches_tracked) == 30001


def test_ghost_gradients_equal_separate_microbatches():
    torch.manual_seed(4)
    ghost = BatchRenorm1d(3, virtual_batch_size=4, dtype=torch.float64)
    ghost.num_batches_tracked.fill_(40000)
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    ghost(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref = BatchRenorm1d(3, dtype=torch.float64)
    ref.num_batches_tracked.fill_(40000)
    out = torch.cat([copy.deepcopy(ref)(c) for c in x2.split(4)])
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_errors_like_batchnorm():
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchRenorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        BatchRenorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expected 5D input"):
        BatchRenorm3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expected 3 channels"):
        BatchRenorm2d(3)(torch.randn(2, 4, 5, 5))
    layer = BatchRenorm1d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    assert int(layer.num_batches_tracked) == 0  # the failed call changed nothing
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm1d(3, virtual_batch_size=1)(torch.randn(4, 3))
    layer.eval()
    assert layer(torch.randn(1, 3)).shape == (1, 3)  # eval accepts a single example
    with pytest.raises(ValueError, match="r_max"):
        BatchRenorm1d(3, r_max=0.5)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        SyncBatchRenorm(3, virtual_batch_size=4)


def test_affine_false_and_resets():
    layer = BatchRenorm2d(3, affine=False)
    assert list(layer.parameters()) == []
    assert layer(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)
    layer.reset_running_stats()
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_std, torch.ones(3))
    affine = BatchRenorm2d(3)
    with torch.no_grad():
        affine.weight.fill_(3)
    affine.reset_parameters()
    assert torch.equal(affine.weight, torch.ones(3))
    assert "r_max=3.0" in affine.extra_repr() and "warmup_steps=5000" in affine.extra_repr()


def test_channels_last_matches_contiguous():
    torch.manual_seed(5)
    layer = BatchRenorm2d(6)
    layer.num_batches_tracked.fill_(30000)
    layer.running_std.fill_(0.7)
    x = torch.randn(4, 6, 5, 5)
    y_ref = copy.deepcopy(layer)(x.clone().requires_grad_())
    xc = x.to(memory_format=torch.channels_last).requires_grad_()
    y = layer(xc)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert xc.grad is not None and xc.grad.shape == x.shape


def test_runs_under_torch_compile():
    torch.manual_seed(6)
    layer = BatchRenorm1d(4)
    layer.num_batches_tracked.fill_(30000)
    reference = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(8, 4)
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_std, reference.running_std)
    assert int(layer.num_batches_tracked) == 30002


# --- SyncBatchRenorm over 2 gloo processes -----------------------------------------------------------------


def _sync_worker(rank, world, batches, state):
    layer = SyncBatchRenorm(3, dtype=torch.float64)
    layer.load_state_dict(state)
    x = batches[rank].clone().requires_grad_()
    y = layer(x)
    # The loss is the sum over both ranks of (y * w): each rank back-propagates its own share.
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y) + rank
    (y * weights).sum().backward()
    return {
        "y": y.detach(),
        "grad_x": x.grad,
        "grad_w": layer.weight.grad,
        "grad_b": layer.bias.grad,
        "running_mean": layer.running_mean,
        "running_std": layer.running_std,
    }


def test_sync_batch_renorm_equals_one_process_on_the_concatenated_batch():
    torch.manual_seed(7)
    # Different batch sizes per rank: the statistics must be merged exactly, not averaged.
    batches = [torch.randn(5, 3, 4, dtype=torch.float64) * 2 + 1, torch.randn(3, 3, 4, dtype=torch.float64)]
    single = BatchRenorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        single.weight.uniform_(0.5, 1.5)
        single.bias.normal_()
        single.running_mean.normal_()
        single.running_std.uniform_(0.5, 1.5)
        single.num_batches_tracked.fill_(30000)
    state = copy.deepcopy(single.state_dict())
    results = run_gloo(_sync_worker, 2, batches, state)
    x = torch.cat(batches).requires_grad_()
    y = single(x)
    weights = torch.cat(
        [
            torch.linspace(-1, 1, b.numel(), dtype=torch.float64).view_as(b) + rank
            for rank, b in enumerate(batches)
        ]
    )
    (y * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in results]), x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0]["grad_w"] + results[1]["grad_w"], single.weight.grad)
    torch.testing.assert_close(results[0]["grad_b"] + results[1]["grad_b"], single.bias.grad)
    for r in results:
        torch.testing.assert_close(r["running_mean"], single.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["running_std"], single.running_std, rtol=1e-5, atol=1e-6)
    assert torch.equal(results[0]["running_std"], results[1]["running_std"])
