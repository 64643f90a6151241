"""BatchRenorm under torch.compile (inductor) equals eager: outputs, dx, dγ, dβ and running statistics, in
every mode, before, at and after the points where the schedule opens r_max and d_max (issue 12, item 1)."""

import copy

import pytest
import torch

from normkit.nn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

TOL = {"rtol": 2e-5, "atol": 2e-5}  # float32 round-off; the old compiled backward was off by 2e-2 .. 2


def _state(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(layer.num_features, generator=g))
        # Running statistics far from the batch's, so r and d hit their limits once the schedule opens them.
        layer.running_mean.fill_(0.5)
        layer.running_std.fill_(0.7)


def check_compiled_equals_eager(layer, shape, steps, channels_last=False, mask_fn=None):
    _state(layer, 0)
    eager = layer
    compiled_module = copy.deepcopy(layer)
    compiled = torch.compile(compiled_module)
    for i, step in enumerate(steps):
        eager.num_batches_tracked.fill_(step)
        compiled_module.num_batches_tracked.fill_(step)
        torch.manual_seed(100 + i)
        x = torch.randn(shape) * 2 + 1
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        upstream = torch.randn(shape)
        mask = None if mask_fn is None else mask_fn(shape)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager.zero_grad(set_to_none=True)
        compiled_module.zero_grad(set_to_none=True)
        ya = eager(xa) if mask is None else eager(xa, mask)
        yb = compiled(xb) if mask is None else compiled(xb, mask)
        (ya * upstream).sum().backward()
        (yb * upstream).sum().backward()
        where = f"step {step}"
        torch.testing.assert_close(yb, ya, **TOL, msg=lambda m, w=where: f"output at {w}: {m}")
        torch.testing.assert_close(xb.grad, xa.grad, **TOL, msg=lambda m, w=where: f"dx at {w}: {m}")
        torch.testing.assert_close(
            compiled_module.weight.grad, eager.weight.grad, **TOL, msg=lambda m, w=where: f"dγ at {w}: {m}"
        )
        torch.testing.assert_close(
            compiled_module.bias.grad, eager.bias.grad, **TOL, msg=lambda m, w=where: f"dβ at {w}: {m}"
        )
        torch.testing.assert_close(compiled_module.running_mean, eager.running_mean, **TOL)
        torch.testing.assert_close(compiled_module.running_std, eager.running_std, **TOL)
        assert int(compiled_module.num_batches_tracked) == int(eager.num_batches_tracked) == step + 1


# The paper's schedule: warm-up, its start (5 000 is still batch norm, 5 001 the first renormalized step),
# the ramps, and past them.
PAPER_STEPS = [100, 5000, 5001, 20000, 50000]


@pytest.mark.parametrize(
    "cls, shape, channels_last",
    [
        (BatchRenorm1d, (16, 6), False),
        (BatchRenorm1d, (8, 6, 5), False),
        (BatchRenorm2d, (4, 6, 5, 5), False),
        (BatchRenorm2d, (4, 6, 5, 5), True),
        (BatchRenorm3d, (2, 6, 3, 4, 4), False),
    ],
    ids=["1d-NC", "1d-NCL", "2d", "2d-channels_last", "3d"],
)
def test_compiled_equals_eager_through_the_paper_schedule(cls, shape, channels_last):
    check_compiled_equals_eager(cls(6), shape, PAPER_STEPS, channels_last=channels_last)


def test_compiled_equals_eager_with_ghost_batches():
    # 10 examples in groups of 4: two full groups and a remainder of 2, each with its own r and d.
    check_compiled_equals_eager(BatchRenorm2d(6, virtual_batch_size=4), (10, 6, 3, 3), PAPER_STEPS)


def test_compiled_equals_eager_at_a_hard_switch():
    # CrossQ's schedule: batch norm for 50 steps, r_max 3 and d_max 5 from step 50 on.
    check_compiled_equals_eager(BatchRenorm1d(6, schedule="crossq", warmup_steps=50), (32, 6), [49, 50, 51])


def test_compiled_equals_eager_with_a_mask():
    def mask_fn(shape):
        lengths = torch.tensor([5, 3, 1, 4, 2, 5, 0, 3])
        return torch.arange(shape[2]) < lengths[:, None]

    check_compiled_equals_eager(BatchRenorm1d(6), (8, 6, 5), PAPER_STEPS, mask_fn=mask_fn)


def test_compiled_layer_takes_a_second_batch_size():
    # A new batch size (the last, short batch of an epoch) makes torch.compile recompile with dynamic shapes;
    # batch norm's statistics kernel has no fake-tensor implementation for those, and the compiled layer
    # used to fail there ("does not support running with fake tensors").
    torch._dynamo.reset()  # earlier tests compiled this forward too: start below the recompile limit
    eager = BatchRenorm1d(6)
    _state(eager, 0)
    eager.num_batches_tracked.fill_(50000)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    for n in (16, 8, 12):
        x = torch.randn(n, 6) * 2 + 1
        torch.testing.assert_close(compiled(x), eager(x), **TOL)
        torch.testing.assert_close(compiled_module.running_std, eager.running_std, **TOL)
