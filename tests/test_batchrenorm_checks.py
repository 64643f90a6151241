"""Batch Renormalization, issue 22: non-finite padding (item 5), schedule limits and step counts (item 13),
shapes, single valid positions and empty batches in the functional form (item 15)."""

import numpy as np
import pytest
import torch

from normkit.nn import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenormState,
    BRNSchedule,
    batch_renorm,
    functional_batch_renorm,
)
from tests.test_batchrenorm import reference_step, schedule_limits

F64 = torch.float64


def snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_unchanged(layer, before):
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected call"


def trained_layer(cls, c, step, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = cls(c, dtype=F64, **kwargs)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_std.uniform_(0.3, 0.6)  # r and d clip once the schedule opens them
        layer.num_batches_tracked.fill_(step)
    return layer


# --- item 5: non-finite padding stays out of the forward and the backward ---------------------------------


@pytest.mark.parametrize("pad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("step", [100, 50000], ids=["warm-up", "clipping"])
@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_non_finite_padding_gives_the_gradients_of_the_valid_elements_alone(pad, step, large):
    # The repro, with the reference computed in float64 from Algorithm 1 on the valid elements only.
    layer = trained_layer(BatchRenorm1d, 3, step)
    length = 600 if large else 5  # large: the fused custom-backward path (> 2^18 elements is not needed:
    n = 160 if large else 2  # masks always take it); small keeps the repro's shape
    torch.manual_seed(1)
    lengths = torch.randint(1, length + 1, (n,))
    lengths[0] = length
    mask = torch.arange(length) < lengths[:, None]
    x = torch.randn(n, 3, length, dtype=F64, requires_grad=True)
    padded = torch.where(mask[:, None], x, pad)
    y = layer(padded, mask=mask)
    assert torch.isfinite(y).all()  # padded outputs too
    upstream = torch.randn(int(mask.sum()), 3, dtype=F64)
    (y.permute(0, 2, 1)[mask] * upstream).sum().backward()

    valid = x.detach().permute(0, 2, 1)[mask].clone().requires_grad_()  # (M, C)
    gamma = torch.tensor(layer.weight.detach().numpy(), requires_grad=True)
    beta = torch.tensor(layer.bias.detach().numpy(), requires_grad=True)
    before = trained_layer(BatchRenorm1d, 3, step)  # the same state before the step
    r_max, d_max = schedule_limits(step)
    y_ref, mu_ref, sigma_ref = reference_step(
        valid, gamma, beta, before.running_mean, before.running_std, r_max, d_max, 1e-5, 0.01
    )
    (y_ref * upstream).sum().backward()
    for grad in (layer.weight.grad, layer.bias.grad, x.grad):
        assert torch.isfinite(grad).all()
    torch.testing.assert_close(y.permute(0, 2, 1)[mask], y_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, gamma.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, beta.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x.grad.permute(0, 2, 1)[mask], valid.grad, rtol=1e-9, atol=1e-10)
    assert (x.grad.permute(0, 2, 1)[~mask] == 0).all()
    torch.testing.assert_close(layer.running_mean, mu_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_std, sigma_ref, rtol=1e-12, atol=1e-12)


def test_non_finite_padding_with_a_multiplied_mask_loss_and_in_eval():
    # (y * mask).sum() is a common masked loss: with finite padded outputs it stays finite.
    layer = trained_layer(BatchRenorm1d, 4, 50000)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    x = torch.randn(3, 4, 4, dtype=F64, requires_grad=True)
    y = layer(torch.where(mask[:, None], x, float("nan")), mask)
    (y * mask[:, None]).sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(x.grad).all()
    layer.eval()
    y_eval = layer(torch.where(mask[:, None], x.detach(), float("inf")), mask)
    assert torch.isfinite(y_eval).all()
    # Valid positions in eval: the inference formula, independent of the padding.
    shape = (1, 4, 1)
    expected = layer.weight.view(shape) * (
        x.detach() - layer.running_mean.view(shape)
    ) / layer.running_std.view(shape) + layer.bias.view(shape)
    torch.testing.assert_close(y_eval.permute(0, 2, 1)[mask], expected.permute(0, 2, 1)[mask].detach())


def test_a_non_finite_valid_value_is_not_hidden():
    layer = BatchRenorm1d(2)
    x = torch.randn(4, 2, 3)
    x[0, 0, 0] = float("nan")  # a valid position
    y = layer(x, torch.ones(4, 3, dtype=torch.bool))
    assert torch.isnan(y[:, 0]).all() and torch.isnan(layer.running_mean[0])


# --- item 13: schedule limits and step counts ---------------------------------------------------------------


@pytest.mark.parametrize(
    "result, name",
    [
        ((0.5, 1.0), "r_max=0.5"),
        ((2.0, -1.0), "d_max=-1.0"),
        ((float("inf"), 1.0), "r_max=inf"),
        ((np.float64(0.9), 1.0), "r_max=0.9"),
        ((torch.tensor(0.5), torch.tensor(1.0)), "r_max=0.5"),
        ((torch.tensor(2.0, dtype=F64), torch.tensor(-0.1, dtype=F64)), "d_max=-0.1"),
    ],
)
def test_a_schedule_returning_impossible_limits_is_refused_before_anything_changes(result, name):
    layer = trained_layer(BatchRenorm1d, 3, 7, schedule=lambda step: result)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=name + r".*at step 7.*r_max >= 1"):
        layer(torch.randn(8, 3, dtype=F64))
    assert_unchanged(layer, before)
    state = BatchRenormState(before["running_mean"], before["running_std"], before["num_batches_tracked"])
    with pytest.raises(ValueError, match=name):
        functional_batch_renorm(torch.randn(8, 3, dtype=F64), state, schedule=lambda step: result)


def test_a_schedule_that_turns_bad_later_is_caught_at_that_step():
    layer = BatchRenorm1d(3, schedule=lambda step: (torch.where(step < 2, 2.0, 0.5), torch.tensor(1.0)))
    layer(torch.randn(8, 3))
    layer(torch.randn(8, 3))
    with pytest.raises(ValueError, match="at step 2"):
        layer(torch.randn(8, 3))
    assert int(layer.num_batches_tracked) == 2


def test_a_tensor_schedule_compiles_without_a_graph_break():
    # The check on tensor results must not read them inside a compiled graph (fullgraph raises on a break).
    def schedule(step):
        return step.to(torch.float32).add(1.0).clamp(max=3.0), torch.ones((), dtype=torch.float32)

    torch._dynamo.reset()  # earlier tests compiled this forward too: start below the recompile limit
    layer = BatchRenorm1d(4, schedule=schedule)
    eager = BatchRenorm1d(4, schedule=schedule)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        x = torch.randn(16, 4) * 3 + 1
        torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(layer.running_std, eager.running_std)


def test_brn_schedule_accepts_numpy_integers_and_reals():
    reference = BRNSchedule(r_max=3.0, d_max=5.0, warmup_steps=100, r_max_steps=400, d_max_steps=250)
    numpy_made = BRNSchedule(
        r_max=np.float32(3.0),
        d_max=np.int64(5),
        warmup_steps=np.int64(100),
        r_max_steps=np.int32(400),
        d_max_steps=np.uint16(250),
    )
    assert numpy_made == reference
    assert type(numpy_made.warmup_steps) is int and type(numpy_made.r_max) is float
    steps = torch.tensor([0, 99, 100, 175, 250, 399, 400, 10**6])
    for a, b in zip(numpy_made.limits(steps), reference.limits(steps)):
        assert torch.equal(a, b)
    # Against the paper's formula written out here (linear ramps between warm-up and the end steps).
    for step in steps.tolist():
        r_max, d_max = schedule_limits(step, 3.0, 5.0, 100, 400, 250)
        r, d = numpy_made.limits(torch.tensor(step))
        assert abs(float(r) - r_max) < 1e-12 and abs(float(d) - d_max) < 1e-12
    assert BRNSchedule.preset("paper").scaled(np.float64(0.1)).warmup_steps == 500
    layer = BatchRenorm1d(3, warmup_steps=np.int64(10))
    assert layer.warmup_steps == 10
    for bad in (np.float64(1.5), True, -1):
        with pytest.raises(ValueError, match="warmup_steps must be a non-negative integer"):
            BRNSchedule(warmup_steps=bad)


# --- item 15: the functional form's shapes, one valid position, batches without valid positions -----------


def test_functional_state_of_another_width_is_refused_with_names_and_sizes():
    x = torch.randn(8, 4)
    with pytest.raises(
        ValueError, match=r"state\.running_mean has shape \(1,\).*4 channels: expected \(4,\)"
    ):
        functional_batch_renorm(x, BatchRenormState.initial(1))
    good = BatchRenormState.initial(4)
    with pytest.raises(ValueError, match=r"state\.running_std has shape \(3,\)"):
        functional_batch_renorm(x, good._replace(running_std=torch.ones(3)))
    with pytest.raises(ValueError, match=r"weight has shape \(1,\)"):
        functional_batch_renorm(x, good, torch.ones(1), torch.zeros(4))
    with pytest.raises(ValueError, match=r"bias has shape \(4, 1\)"):
        functional_batch_renorm(x, good, torch.ones(4), torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"num_batches_tracked must be a single step count"):
        functional_batch_renorm(x, good._replace(num_batches_tracked=torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"state\.running_mean has shape \(1,\)"):
        functional_batch_renorm(x, BatchRenormState.initial(1), training=False)
    mean, std = torch.zeros(1), torch.ones(1)
    with pytest.raises(ValueError, match=r"running_mean has shape \(1,\)"):
        batch_renorm(x, mean, std, training=True)
    assert torch.equal(mean, torch.zeros(1)) and torch.equal(std, torch.ones(1))


def test_one_valid_position_uses_variance_zero_and_the_unmasked_layer_refuses():
    # Documented decision: a mask cannot be counted without a host synchronisation, so one valid position
    # computes with σ_B = √ε (variance 0); the unmasked layer refuses one value per channel, like BatchNorm.
    eps = 1e-3
    layer = trained_layer(BatchRenorm1d, 3, 50000, eps=eps)
    x = torch.randn(5, 3, dtype=F64) * 2
    mask = torch.tensor([0, 0, 1, 0, 0], dtype=torch.bool)
    mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
    gamma, beta = layer.weight.detach().clone(), layer.bias.detach().clone()
    y = layer(x, mask)
    v = x[2]
    sigma_b = torch.full_like(v, eps**0.5)
    r = torch.clamp(sigma_b / sigma, 1 / 3.0, 3.0)
    d = torch.clamp((v - mu) / sigma, -5.0, 5.0)
    torch.testing.assert_close(y[2], gamma * (0.0 * r + d) + beta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_mean, mu + 0.01 * (v - mu), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_std, sigma + 0.01 * (sigma_b - sigma), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        trained_layer(BatchRenorm1d, 3, 50000, eps=eps)(x[2:3])
    state = BatchRenormState(mu, sigma, torch.tensor(50000))
    y_f, new_state = functional_batch_renorm(x, state, gamma, beta, eps=eps, mask=mask)
    torch.testing.assert_close(y_f, y.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_state.running_std, layer.running_std, rtol=1e-12, atol=1e-12)


def test_a_batch_without_valid_positions_advances_the_step_only():
    state = BatchRenormState(torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5, torch.tensor(41))
    x = torch.randn(6, 3, 2, dtype=F64)
    y, new = functional_batch_renorm(x, state, mask=torch.zeros(6, 2, dtype=torch.bool))
    assert torch.isfinite(y).all()
    assert torch.equal(new.running_mean, state.running_mean) and torch.equal(
        new.running_std, state.running_std
    )
    assert int(new.num_batches_tracked) == 42  # the step counts training calls, as the module's does
    layer = BatchRenorm2d(3, dtype=F64)
    layer.num_batches_tracked.fill_(41)
    layer(x.unsqueeze(-1), torch.zeros(6, 2, 1, dtype=torch.bool))
    assert int(layer.num_batches_tracked) == 42 and torch.equal(layer.running_std, torch.ones(3, dtype=F64))


def test_non_finite_padding_behaves_as_zero_padding_even_with_a_loss_on_padded_outputs():
    # A loss over every output (padded ones too): non-finite padding reads as 0, and gets no gradient.
    layer = trained_layer(BatchRenorm1d, 3, 50000)
    zeros = trained_layer(BatchRenorm1d, 3, 50000)
    mask = torch.arange(6) < torch.tensor([6, 2, 4, 1])[:, None]
    x = torch.randn(4, 3, 6, dtype=F64)
    pad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=F64).repeat(8)[:24].view(4, 6)
    nonfinite = torch.where(mask[:, None], x, pad[:, None]).requires_grad_()
    zero_padded = torch.where(mask[:, None], x, 0.0).requires_grad_()
    upstream = torch.randn(4, 3, 6, dtype=F64)
    (layer(nonfinite, mask) * upstream).sum().backward()
    (zeros(zero_padded, mask) * upstream).sum().backward()
    torch.testing.assert_close(layer.weight.grad, zeros.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, zeros.bias.grad, rtol=1e-12, atol=1e-12)
    valid = mask[:, None].expand_as(x)
    torch.testing.assert_close(nonfinite.grad[valid], zero_padded.grad[valid], rtol=1e-12, atol=1e-12)
    assert (nonfinite.grad[~valid] == 0).all() and (zero_padded.grad[~valid] != 0).all()
