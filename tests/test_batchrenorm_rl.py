"""Batch Renormalization for RL and sequences (issue 16): schedules as data, masks, torch.func ensembles, the
functional form; and validation before mutation (issue 12, item 5)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from normkit.nn import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    BatchRenormState,
    BRNSchedule,
    SyncBatchRenorm,
    batch_renorm,
    functional_batch_renorm,
)
from tests.distributed import run_gloo
from tests.test_batchrenorm import reference_step, schedule_limits

F64 = torch.float64


def masked_reference(x, mask, gamma, beta, mu, sigma, r_max, d_max, eps, alpha):
    """Algorithm 1 of Ioffe (2017) in float64 with μ_B, σ_B over the valid positions only; every position,
    padded ones included, is renormalized with them. Autograd only through x, gamma, beta."""
    xc = x.movedim(1, -1)  # (N, *spatial, C): the valid positions are mask's True entries
    valid = xc[mask]  # (M, C)
    mu_b = valid.mean(0)
    sigma_b = torch.sqrt(eps + ((valid - mu_b) ** 2).mean(0))
    r = torch.clamp(sigma_b.detach() / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu_b.detach() - mu) / sigma, -d_max, d_max)
    y = gamma * ((xc - mu_b) / sigma_b * r + d) + beta
    return y.movedim(-1, 1), mu + alpha * (mu_b.detach() - mu), sigma + alpha * (sigma_b.detach() - sigma)


def random_layer(cls, c, step, shift=3.0, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = cls(c, dtype=F64, **kwargs)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.copy_(torch.randn(c, dtype=F64) * 0.1 + shift)
        layer.running_std.copy_(torch.rand(c, dtype=F64) * 0.5 + 0.75 + shift)
        layer.num_batches_tracked.fill_(step)
    return layer


# --- schedules as data ----------------------------------------------------------------------------------


def test_presets_are_the_papers_schedules_exactly():
    paper, crossq = BRNSchedule.preset("paper"), BRNSchedule.preset("crossq")
    for step in [0, 4999, 5000, 5001, 12345, 25000, 39999, 40000, 10**6]:
        r_max, d_max = paper.limits(torch.tensor(step))
        assert r_max.dtype == F64
        expected = schedule_limits(step)
        assert abs(float(r_max) - expected[0]) < 1e-15 and abs(float(d_max) - expected[1]) < 1e-15
    # CrossQ: batch norm for the first 100 000 steps (0 … 99 999), then r_max 3 and d_max 5 at once.
    for step, expected in [
        (0, (1, 0)),
        (99_999, (1, 0)),
        (100_000, (3, 5)),
        (100_001, (3, 5)),
        (10**7, (3, 5)),
    ]:
        r_max, d_max = crossq.limits(torch.tensor(step))
        assert (float(r_max), float(d_max)) == expected
    # One step count per ensemble member: the limits come out per member.
    r_max, d_max = crossq.limits(torch.tensor([99_999, 100_000]))
    assert r_max.tolist() == [1.0, 3.0] and d_max.tolist() == [0.0, 5.0]


def test_limits_are_sync_free_and_follow_the_layer_dtype():
    # fullgraph compilation fails on any .item() / bool(tensor): the limits never leave the device.
    for schedule in ["paper", "crossq"]:
        layer = BatchRenorm1d(3, schedule=schedule)
        limits = torch.compile(layer.current_limits, fullgraph=True, backend="eager")
        layer.num_batches_tracked.fill_(150_000)
        assert [float(v) for v in limits()] == [3.0, 5.0]
    assert BatchRenorm1d(3).current_limits()[0].dtype == torch.float32
    assert BatchRenorm1d(3, dtype=F64).current_limits()[0].dtype == F64
    assert BatchRenorm1d(3, dtype=torch.bfloat16).current_limits()[0].dtype == torch.float32


def test_scaled_schedules():
    paper = BRNSchedule.preset("paper").scaled(0.1)
    assert paper == BRNSchedule(3.0, 5.0, warmup_steps=500, r_max_steps=4000, d_max_steps=2500)
    crossq = BRNSchedule.preset("crossq").scaled(0.05)
    assert crossq.warmup_steps == 5000 and crossq.r_max_steps is None
    assert [float(v) for v in crossq.limits(torch.tensor(4999))] == [1.0, 0.0]
    assert [float(v) for v in crossq.limits(torch.tensor(5000))] == [3.0, 5.0]
    with pytest.raises(ValueError, match="factor"):
        paper.scaled(0.0)
    with pytest.raises(ValueError, match="unknown schedule preset 'sbx'"):
        BRNSchedule.preset("sbx")
    with pytest.raises(ValueError, match="r_max >= 1"):
        BRNSchedule(r_max=0.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        BRNSchedule(warmup_steps=-1)


def test_crossq_layer_is_batch_norm_until_the_switch_then_full_renorm():
    layer = random_layer(BatchRenorm1d, 6, step=0, schedule="crossq", warmup_steps=3)
    assert layer.schedule == BRNSchedule(3.0, 5.0, warmup_steps=3)
    for step in range(5):
        x = torch.randn(32, 6, dtype=F64) * 2 + 1
        mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
        y = layer(x)
        if step < 3:
            expected = F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, 1e-5)
        else:
            expected, _, _ = reference_step(x, layer.weight, layer.bias, mu, sigma, 3.0, 5.0, 1e-5, 0.01)
            assert not torch.allclose(expected, F.batch_norm(x, None, None, layer.weight, layer.bias, True))
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def test_constructor_arguments_keep_working():
    layer = BatchRenorm1d(3, r_max=2.0, d_max=1.0, warmup_steps=10, r_max_steps=20, d_max_steps=30)
    assert layer.schedule == BRNSchedule(2.0, 1.0, 10, 20, 30)
    assert (layer.r_max, layer.d_max, layer.warmup_steps, layer.r_max_steps, layer.d_max_steps) == (
        2,
        1,
        10,
        20,
        30,
    )
    layer.warmup_steps = 0  # settable as before, and the forward follows
    layer.num_batches_tracked.fill_(10)
    assert [float(v) for v in layer.current_limits()] == pytest.approx([1.5, 1 / 3], rel=1e-7)
    # Defaults: the paper's schedule; overrides of a preset keep its other fields.
    assert BatchRenorm2d(3).schedule == BRNSchedule.preset("paper")
    assert BatchRenorm2d(3, schedule="paper", r_max=2.0).schedule == dataclasses.replace(
        BRNSchedule.preset("paper"), r_max=2.0
    )
    assert BatchRenorm3d(3, schedule=BRNSchedule(4.0, 1.0, 7)).warmup_steps == 7
    crossq = BatchRenorm1d(3, schedule="crossq")
    assert crossq.r_max_steps == crossq.warmup_steps == 100_000
    assert "warmup_steps=100000" in repr(crossq)
    with pytest.raises(ValueError, match="do not apply to a callable schedule"):
        BatchRenorm1d(3, schedule=lambda step: (2.0, 1.0), r_max=2.0)
    with pytest.raises(TypeError, match="schedule must be"):
        BatchRenorm1d(3, schedule=3.0)  # type: ignore[arg-type]


def test_callable_schedule_keeps_the_layer_dtype():
    # Issue 12: a float64 layer used to get float32 limits (2.7 became 2.7000000477, a 1.8e-8 error).
    layer = random_layer(BatchRenorm1d, 4, step=0, shift=0.0, schedule=lambda step: (2.7, 0.3))
    r_max, d_max = layer.current_limits()
    assert r_max.dtype == F64 and float(r_max) == 2.7 and float(d_max) == 0.3
    x = torch.randn(64, 4, dtype=F64) * 10 + 3  # σ_B/σ far above 2.7 and |μ_B − μ|/σ above 0.3: both clip
    mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
    expected, _, _ = reference_step(x, layer.weight, layer.bias, mu, sigma, 2.7, 0.3, 1e-5, 0.01)
    torch.testing.assert_close(layer(x), expected, rtol=1e-13, atol=1e-13)


# --- validation before mutation ---------------------------------------------------------------------------


def snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_unchanged(layer, before):
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected call"


def test_bad_eps_is_rejected_before_anything_changes():
    for eps in [-1e-5, 0.0]:
        with pytest.raises(ValueError, match="eps must be > 0"):
            BatchRenorm1d(3, eps=eps)
    mean, std = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="eps must be > 0"):
        batch_renorm(torch.randn(8, 3), mean, std, training=True, eps=-1.0)
    assert torch.equal(std, torch.ones(3)) and torch.equal(mean, torch.zeros(3))


@pytest.mark.parametrize("training", [True, False])
def test_empty_and_integer_inputs_change_nothing(training):
    layer = random_layer(BatchRenorm1d, 3, step=7).train(training)
    before = snapshot(layer)
    with pytest.raises(TypeError, match=r"floating-point input, got torch\.int64"):
        layer(torch.ones(8, 3, dtype=torch.long))
    assert_unchanged(layer, before)
    if training:
        with pytest.raises(ValueError, match="empty input"):
            layer(torch.empty(0, 3, dtype=F64))
        with pytest.raises(ValueError, match="empty input"):
            layer(torch.empty(4, 3, 0, dtype=F64))
    else:
        assert layer(torch.empty(0, 3, dtype=F64)).shape == (0, 3)
    assert_unchanged(layer, before)
    assert int(layer.num_batches_tracked) == 7


def test_bad_masks_change_nothing():
    layer = random_layer(BatchRenorm1d, 3, step=7)
    before = snapshot(layer)
    x = torch.randn(4, 3, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"expected \(4, 5\)"):
        layer(x, torch.ones(4, 3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        layer(x, torch.ones(4, 5))
    assert_unchanged(layer, before)


# --- masks ------------------------------------------------------------------------------------------------


def random_mask(shape, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand((shape[0], *shape[2:]), generator=g) < 0.6
    mask.view(-1)[:2] = True  # at least two valid positions
    return mask


@pytest.mark.parametrize("step", [100, 50000], ids=["warm-up", "clipping"])
@pytest.mark.parametrize(
    "cls, shape",
    [
        (BatchRenorm1d, (16, 5)),
        (BatchRenorm1d, (6, 5, 7)),
        (BatchRenorm2d, (4, 5, 3, 4)),
        (BatchRenorm3d, (3, 5, 2, 3, 2)),
    ],
    ids=["1d-NC", "1d-NCL", "2d", "3d"],
)
def test_masked_step_matches_float64_algorithm_1(cls, shape, step):
    layer = random_layer(cls, 5, step=step)
    x = (torch.randn(shape, dtype=F64) * 2 + 1).requires_grad_()
    mask = random_mask(shape, seed=len(shape))
    x_ref = x.detach().clone().requires_grad_()
    gamma = layer.weight.detach().clone().requires_grad_()
    beta = layer.bias.detach().clone().requires_grad_()
    r_max, d_max = schedule_limits(step)
    y_ref, mu_ref, sigma_ref = masked_reference(
        x_ref,
        mask,
        gamma,
        beta,
        layer.running_mean.clone(),
        layer.running_std.clone(),
        r_max,
        d_max,
        1e-5,
        0.01,
    )
    y = layer(x, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.running_mean, mu_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_std, sigma_ref, rtol=1e-12, atol=1e-12)
    # Upstream gradient on every position, padded ones included: they depend on μ_B, σ_B too.
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, gamma.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, beta.grad, rtol=1e-9, atol=1e-10)


def padded_sequences(lengths, c, length, pad_value):
    mask = torch.arange(length) < torch.tensor(lengths)[:, None]
    x = torch.randn(len(lengths), c, length) * 2 + 1
    return torch.where(mask[:, None], x, pad_value), mask


def test_mask_equals_running_on_the_valid_elements_alone():
    torch.manual_seed(11)
    layer = BatchRenorm1d(4)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_std.fill_(0.4)
        layer.num_batches_tracked.fill_(30000)
    alone = copy.deepcopy(layer)
    # Padding holds large values: they must not reach the statistics, and padded outputs stay finite.
    x, mask = padded_sequences([7, 3, 5, 1, 6], 4, 7, pad_value=1e6)
    x.requires_grad_()
    y = layer(x, mask)
    valid = x.detach().movedim(1, -1)[mask].clone().requires_grad_()  # (M, C): the valid positions only
    y_alone = alone(valid)
    torch.testing.assert_close(y.movedim(1, -1)[mask], y_alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(layer.running_mean, alone.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_std, alone.running_std, rtol=1e-6, atol=1e-6)
    assert int(layer.num_batches_tracked) == int(alone.num_batches_tracked) == 30001
    # A loss on the valid positions only (the usual masked loss): the same gradients as the valid batch alone.
    upstream = torch.randn_like(y_alone)
    (y.movedim(1, -1)[mask] * upstream).sum().backward()
    (y_alone * upstream).sum().backward()
    torch.testing.assert_close(x.grad.movedim(1, -1)[mask], valid.grad, rtol=1e-4, atol=1e-5)
    assert (x.grad.movedim(1, -1)[~mask] == 0).all()
    torch.testing.assert_close(layer.weight.grad, alone.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad, alone.bias.grad, rtol=1e-4, atol=1e-4)


def test_mask_for_flat_features_and_an_all_padding_batch():
    layer = random_layer(BatchRenorm1d, 3, step=30000)
    alone = copy.deepcopy(layer)
    x = torch.randn(10, 3, dtype=F64)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    torch.testing.assert_close(layer(x, mask)[mask], alone(x[mask]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_std, alone.running_std, rtol=1e-12, atol=1e-12)
    # No valid position at all: outputs finite, running statistics untouched, the step still counts.
    before = snapshot(layer)
    y = layer(x, torch.zeros(10, dtype=torch.bool))
    assert torch.isfinite(y).all()
    assert torch.equal(layer.running_mean, before["running_mean"])
    assert torch.equal(layer.running_std, before["running_std"])
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


def test_masked_ghost_batches_equal_separate_masked_microbatches():
    layer = random_layer(BatchRenorm1d, 3, step=30000, virtual_batch_size=4)
    single = copy.deepcopy(layer)
    single.virtual_batch_size = None
    x = torch.randn(10, 3, 6, dtype=F64)
    mask = random_mask(x.shape, seed=5)
    y = layer(x, mask)
    parts = [copy.deepcopy(single)(xc, mc) for xc, mc in zip(x.split(4), mask.split(4))]
    torch.testing.assert_close(y, torch.cat(parts), rtol=1e-10, atol=1e-10)
    single(x, mask)  # the running statistics move once, toward the whole batch's valid positions
    torch.testing.assert_close(layer.running_mean, single.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_std, single.running_std, rtol=1e-12, atol=1e-12)


def _masked_sync_worker(rank, world, batches, masks, state):
    layer = SyncBatchRenorm(3, dtype=F64)
    layer.load_state_dict(state)
    x = batches[rank].clone().requires_grad_()
    y = layer(x, masks[rank])
    weights = torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y) + rank
    (y * weights).sum().backward()
    return {
        "y": y.detach(),
        "grad_x": x.grad,
        "grad_w": layer.weight.grad,
        "grad_b": layer.bias.grad,
        "running_mean": layer.running_mean,
        "running_std": layer.running_std,
    }


def test_masked_sync_batch_renorm_equals_one_process_and_is_identical_across_ranks():
    torch.manual_seed(12)
    batches = [torch.randn(5, 3, 4, dtype=F64) * 2 + 1, torch.randn(3, 3, 4, dtype=F64)]
    masks = [random_mask(b.shape, seed=20 + i) for i, b in enumerate(batches)]
    single = random_layer(BatchRenorm1d, 3, step=30000, shift=0.5)
    state = copy.deepcopy(single.state_dict())
    results = run_gloo(_masked_sync_worker, 2, batches, masks, state)
    x = torch.cat(batches).requires_grad_()
    y = single(x, torch.cat(masks))
    weights = torch.cat(
        [torch.linspace(-1, 1, b.numel(), dtype=F64).view_as(b) + rank for rank, b in enumerate(batches)]
    )
    (y * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in results]), x.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(results[0]["grad_w"] + results[1]["grad_w"], single.weight.grad)
    torch.testing.assert_close(results[0]["grad_b"] + results[1]["grad_b"], single.bias.grad)
    for r in results:
        torch.testing.assert_close(r["running_mean"], single.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["running_std"], single.running_std, rtol=1e-12, atol=1e-12)
    assert torch.equal(results[0]["running_std"], results[1]["running_std"])
    assert torch.equal(results[0]["running_mean"], results[1]["running_mean"])


# --- torch.func: ensembles of critics and the functional form ----------------------------------------------


def make_critics(n, seed=0):
    torch.manual_seed(seed)
    critics = []
    for _ in range(n):
        critic = nn.Sequential(nn.Linear(5, 16), BatchRenorm1d(16), nn.ReLU(), nn.Linear(16, 1))
        with torch.no_grad():
            critic[1].weight.uniform_(0.5, 1.5)
            critic[1].bias.normal_()
            critic[1].running_mean.normal_()
            critic[1].running_std.uniform_(0.2, 0.5)  # r and d clip
            critic[1].num_batches_tracked.fill_(30000)
        critics.append(critic)
    return critics


def run_ensemble(critics, x, shared_input, training, compile_):
    params, buffers = stack_module_state([c.train(training) for c in critics])
    base = copy.deepcopy(critics[0]).to("meta")

    def call(p, b, inp):
        return functional_call(base, (p, b), (inp,))

    fn = vmap(call, in_dims=(0, 0, None if shared_input else 0))
    if compile_:
        fn = torch.compile(fn)
    out = fn(params, buffers, x)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), list(params.values()))
    return out.detach(), dict(zip(params, grads)), buffers


def run_loop(critics, x, shared_input):
    outs, grads = [], []
    for i, critic in enumerate(critics):
        out = critic(x if shared_input else x[i])
        outs.append(out)
    out = torch.stack(outs)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    for critic in critics:
        grads.append({name: p.grad for name, p in critic.named_parameters()})
    stacked = {name: torch.stack([g[name] for g in grads]) for name in grads[0]}
    buffers = {
        name: torch.stack([dict(c.named_buffers())[name] for c in critics])
        for name, _ in critics[0].named_buffers()
    }
    return out.detach(), stacked, buffers


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shared_input", [True, False], ids=["shared-batch", "batch-per-member"])
def test_vmapped_ensemble_equals_a_loop_over_members(training, shared_input):
    critics = make_critics(3)
    looped = [copy.deepcopy(c).train(training) for c in critics]
    x = torch.randn(32, 5) if shared_input else torch.randn(3, 32, 5)
    out, grads, buffers = run_ensemble(critics, x, shared_input, training, compile_=False)
    out_ref, grads_ref, buffers_ref = run_loop(looped, x, shared_input)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
    for name in buffers_ref:
        torch.testing.assert_close(buffers[name], buffers_ref[name], rtol=1e-6, atol=1e-6, msg=name)
    assert buffers["1.num_batches_tracked"].tolist() == [30001 if training else 30000] * 3


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_vmapped_ensemble_equals_a_loop_over_members(training):
    critics = make_critics(3, seed=1)
    looped = [copy.deepcopy(c).train(training) for c in critics]
    x = torch.randn(32, 5)
    out, grads, buffers = run_ensemble(critics, x, True, training, compile_=True)
    out_ref, grads_ref, buffers_ref = run_loop(looped, x, True)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
    for name in buffers_ref:
        torch.testing.assert_close(buffers[name], buffers_ref[name], rtol=1e-6, atol=1e-6, msg=name)


def test_functional_form_equals_the_module_and_mutates_nothing():
    layer = random_layer(BatchRenorm1d, 4, step=29999, shift=0.5, momentum=None)
    state = BatchRenormState(
        layer.running_mean.clone(), layer.running_std.clone(), layer.num_batches_tracked.clone()
    )
    kept = [t.clone() for t in state]
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    for step in range(3):
        x = torch.randn(8, 4, 6, dtype=F64) * 2 + 1
        mask = random_mask(x.shape, seed=step)
        x2 = x.clone().requires_grad_()
        y, new_state = functional_batch_renorm(x2, state, weight, bias, momentum=None, mask=mask)
        for before, tensor in zip(kept, state):
            assert torch.equal(before, tensor)  # the old state is left as it was
        x1 = x.clone().requires_grad_()
        y_module = layer(x1, mask)
        torch.testing.assert_close(y, y_module, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new_state.running_mean, layer.running_mean, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(new_state.running_std, layer.running_std, rtol=1e-13, atol=1e-13)
        assert torch.equal(new_state.num_batches_tracked, layer.num_batches_tracked)
        upstream = torch.randn_like(y)
        layer.zero_grad()
        weight.grad = bias.grad = None
        (y * upstream).sum().backward()
        (y_module * upstream).sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(weight.grad, layer.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bias.grad, layer.bias.grad, rtol=1e-10, atol=1e-12)
        state, kept = new_state, [t.clone() for t in new_state]
    y_eval, same = functional_batch_renorm(x, state, weight, bias, training=False)
    assert same is state
    torch.testing.assert_close(y_eval, layer.eval()(x), rtol=1e-13, atol=1e-13)
    fresh = BatchRenormState.initial(4, dtype=F64)
    assert torch.equal(fresh.running_std, torch.ones(4, dtype=F64)) and int(fresh.num_batches_tracked) == 0


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_functional_form_under_vmap_equals_a_loop(compile_):
    torch.manual_seed(13)
    members = 3
    states = [
        BatchRenormState(torch.randn(6), torch.rand(6) * 0.3 + 0.2, torch.tensor(s))
        for s in [99, 100, 5000]  # a CrossQ-style switch at 100: members before, at and after it
    ]
    weights, biases = torch.rand(members, 6) + 0.5, torch.randn(members, 6)
    weights.requires_grad_()
    biases.requires_grad_()
    x = torch.randn(members, 16, 6) * 2 + 1
    schedule = BRNSchedule(3.0, 5.0, warmup_steps=100)

    def step(inp, state, w, b):
        return functional_batch_renorm(inp, state, w, b, schedule=schedule)

    stacked = BatchRenormState(*(torch.stack(t) for t in zip(*states)))
    fn = vmap(step)
    if compile_:
        fn = torch.compile(fn)
    y, new = fn(x, stacked, weights, biases)
    upstream = torch.randn_like(y)
    gw, gb = torch.autograd.grad((y * upstream).sum(), [weights, biases])
    for i, state in enumerate(states):
        w = weights[i].detach().clone().requires_grad_()
        b = biases[i].detach().clone().requires_grad_()
        y_i, new_i = functional_batch_renorm(x[i], state, w, b, schedule=schedule)
        (y_i * upstream[i]).sum().backward()
        torch.testing.assert_close(y[i], y_i, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw[i], w.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gb[i], b.grad, rtol=1e-4, atol=1e-5)
        for field, a, ref in zip(BatchRenormState._fields, new, new_i):
            torch.testing.assert_close(a[i], ref, rtol=1e-6, atol=1e-6, msg=field)


@pytest.mark.parametrize("large", [False, True], ids=["small-batch path", "fused-backward path"])
def test_both_training_paths_match_float64_algorithm_1(large):
    # Small inputs run batch norm's training kernel through autograd, large ones the fused custom backward.
    from normkit.nn.functional import _SMALL_BATCH_NUMEL

    n = _SMALL_BATCH_NUMEL // (3 * 8) + (1 if large else -1)
    shape = (n, 3, 8)
    assert (torch.Size(shape).numel() > _SMALL_BATCH_NUMEL) == large
    layer = random_layer(BatchRenorm1d, 3, step=50000, shift=0.5)
    x = (torch.randn(shape, dtype=F64) * 2 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    gamma = layer.weight.detach().clone().requires_grad_()
    beta = layer.bias.detach().clone().requires_grad_()
    y_ref, mu_ref, sigma_ref = reference_step(
        x_ref, gamma, beta, layer.running_mean.clone(), layer.running_std.clone(), 3.0, 5.0, 1e-5, 0.01
    )
    y = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.running_mean, mu_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_std, sigma_ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, gamma.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.bias.grad, beta.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n", [64, 6000], ids=["small-batch path", "fused-backward path"])
def test_bias_without_weight_is_applied(n):
    torch.manual_seed(14)
    x = torch.randn(n, 3, 15, dtype=F64) * 2
    bias = torch.randn(3, dtype=F64)
    stats = [torch.full((3,), 0.5, dtype=F64), torch.full((3,), 0.7, dtype=F64)]
    copies = [t.clone() for t in stats]
    y = batch_renorm(x, *stats, None, bias, training=True, r_max=3.0, d_max=5.0)
    expected = batch_renorm(x, *copies, torch.ones(3, dtype=F64), bias, training=True, r_max=3.0, d_max=5.0)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
