"""Batch Renormalization on sharded models (issue 21): FSDP2 ``fully_shard``, plain DTensor parameters,
Distributed Checkpoint. Two gloo processes, spawned once; every comparison is against one process.

- ``SyncBatchRenorm`` under FSDP2 equals one process on the global batch (statistics over every rank).
- ``BatchRenorm*d`` under FSDP2 keeps per-rank statistics, as DDP without synchronisation: it equals one
  process that runs each rank's batch with that rank's running statistics, the loss averaged over ranks.
- γ, β as plain DTensors (``Replicate()`` / ``Shard(0)``, the same input on every rank) equal one process.
"""

import copy
import os
import tempfile

import pytest
import torch
import torch.nn as nn

from normkit.nn import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenormState,
    BRNSchedule,
    SyncBatchRenorm,
    convert_batchnorm,
    functional_batch_renorm,
)
from tests.distributed import run_gloo

F64 = torch.float64
WORLD = 2
PER_RANK = 4
STEPS = 4
SAVE_AFTER = 2  # steps before the checkpoint; the rest run on the original and on the restored model
# Step 0 is batch norm, from step 1 on r and d are clipped to [1/2, 2] and [-0.5, 0.5].
SCHEDULE = BRNSchedule(r_max=2.0, d_max=0.5, warmup_steps=1)


def make_net(sync, seed=0):
    """5 and 7 channels: uneven Shard(0) over 2 ranks."""
    torch.manual_seed(seed)
    norm2 = SyncBatchRenorm if sync else BatchRenorm2d
    norm1 = SyncBatchRenorm if sync else BatchRenorm1d
    net = nn.Sequential(
        nn.Conv2d(3, 5, 3, bias=False),
        norm2(5, momentum=0.1, schedule=SCHEDULE),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 7),
        norm1(7, momentum=0.1, schedule=SCHEDULE),
        nn.ReLU(),
        nn.Linear(7, 3),
    ).to(F64)
    with torch.no_grad():
        for layer in (net[1], net[5]):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
            layer.running_mean.normal_(0.0, 0.5)
            layer.running_std.uniform_(0.3, 0.6)  # far from the batch's: r and d clip
    return net


def dtensor_layer():
    layer = BatchRenorm1d(3, dtype=F64, schedule=SCHEDULE)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.7, 1.3, 1.1], dtype=F64))
        layer.bias.copy_(torch.tensor([0.2, -0.4, 0.1], dtype=F64))
        layer.running_std.fill_(0.4)
        layer.num_batches_tracked.fill_(5)
    return layer


# Sequences of different lengths (one with a single valid position) for the (N, 3, 36) input.
MASK = torch.arange(36) < torch.tensor([36, 20, 7, 36, 1, 30, 36, 12])[:, None]


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(WORLD * PER_RANK, 3, 6, 6, generator=g, dtype=F64) * 2 + 1 for _ in range(STEPS)]
    ts = [torch.randn(WORLD * PER_RANK, 3, generator=g, dtype=F64) for _ in range(STEPS)]
    return xs, ts


def norm_buffers(net):
    return {k: v.clone() for k, v in net.named_buffers()}


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def sharded(sync, mesh, seed=0):
    from torch.distributed.fsdp import fully_shard

    net = make_net(sync, seed)
    for layer in net:
        if any(True for _ in layer.parameters(recurse=False)):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)


def train_steps(net, opt, xs, ts, rank, steps):
    record = []
    for step in steps:
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        y = net(xs[step][rows])
        (y * ts[step][rows]).sum().backward()
        grads = {k: full(p.grad).clone() for k, p in net.named_parameters()}
        opt.step()
        opt.zero_grad()
        params = {k: full(p.detach()).clone() for k, p in net.named_parameters()}
        record.append({"y": y.detach(), "grads": grads, "params": params, "buffers": norm_buffers(net)})
    return record


def _fsdp_worker(rank, world, checkpoint_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    xs, ts = data()
    out = {}

    # --- FSDP2: SyncBatchRenorm, then a Distributed Checkpoint round trip ---------------------------------
    net, opt = sharded(True, mesh)
    assert isinstance(net[1].weight, DTensor) and net[1].weight.placements == (Shard(0),)
    assert not isinstance(net[1].running_std, DTensor)  # buffers stay plain tensors under fully_shard
    with pytest.raises(ValueError, match=r"weight is already a DTensor.*Shard\(dim=0\).*before sharding"):
        convert_batchnorm(net, "batchnorm")
    out["sync"] = train_steps(net, opt, xs, ts, rank, range(SAVE_AFTER))
    model_state, optim_state = get_state_dict(net, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(checkpoint_dir, "sync"))
    saved_buffers = norm_buffers(net)

    restored, restored_opt = sharded(True, mesh, seed=5)  # other parameters and statistics before loading
    model_state, optim_state = get_state_dict(restored, restored_opt)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(checkpoint_dir, "sync"))
    set_state_dict(restored, restored_opt, model_state_dict=model_state, optim_state_dict=optim_state)
    out["restored_buffers"] = norm_buffers(restored)
    out["saved_buffers"] = saved_buffers
    out["sync"] += train_steps(net, opt, xs, ts, rank, range(SAVE_AFTER, STEPS))
    out["restored"] = train_steps(restored, restored_opt, xs, ts, rank, range(SAVE_AFTER, STEPS))

    # --- FSDP2: plain BatchRenorm keeps per-rank statistics -------------------------------------------------
    net, opt = sharded(False, mesh)
    out["plain"] = train_steps(net, opt, xs, ts, rank, range(STEPS))
    # Per-rank statistics are plain tensors that differ across ranks: what does a DCP round trip keep?
    model_state = get_model_state_dict(net)
    dcp.save({"model": model_state}, checkpoint_id=os.path.join(checkpoint_dir, "plain"))
    restored, _ = sharded(False, mesh, seed=5)
    model_state = get_model_state_dict(restored)
    dcp.load({"model": model_state}, checkpoint_id=os.path.join(checkpoint_dir, "plain"))
    set_model_state_dict(restored, model_state)
    out["plain_restored_buffers"] = norm_buffers(restored)

    # --- γ, β as plain DTensors (tensor parallel: the same input on every rank) ----------------------------
    x = xs[0].flatten(2)  # (N, 3, 36): BatchRenorm1d over 3 channels, uneven Shard(0)
    upstream = torch.linspace(-1, 1, x.numel(), dtype=F64).view_as(x)
    for placement in (Replicate(), Shard(0)):
        layer = dtensor_layer()
        state = BatchRenormState(layer.running_mean.clone(), layer.running_std.clone(), torch.tensor(5))
        layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [placement]))
        layer.bias = nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [placement]))
        y = layer(x, MASK)
        (y * upstream).sum().backward()
        assert isinstance(layer.weight.grad, DTensor) and layer.weight.grad.placements == (placement,)
        y_f, new_state = functional_batch_renorm(
            x, state, layer.weight, layer.bias, schedule=SCHEDULE, mask=MASK
        )
        layer.eval()
        out[f"dtensor-{placement}"] = {
            "y": y.detach(),
            "grad_w": layer.weight.grad.full_tensor(),
            "grad_b": layer.bias.grad.full_tensor(),
            "buffers": norm_buffers(layer),
            "y_functional": y_f.detach(),
            "state": new_state,
            "y_eval": layer(x).detach(),
        }
    # What cannot work sharded is refused with the placement and the alternative.
    bad = BatchRenorm1d(3, dtype=F64)
    bad.weight = nn.Parameter(DTensor.from_local(torch.ones(3, dtype=F64), mesh, [Partial()]))
    with pytest.raises(
        ValueError, match=r"weight is a DTensor with placements \(Partial\(sum\),\).*Replicate\(\)"
    ):
        bad(x)
    before = norm_buffers(bad)
    with pytest.raises(TypeError, match=r"DTensor input \(placements \(Replicate\(\),\)\).*to_local"):
        BatchRenorm1d(3, dtype=F64)(distribute_tensor(x, mesh, [Replicate()]))
    state = BatchRenormState.initial(3, dtype=F64)
    sharded_state = state._replace(running_std=distribute_tensor(state.running_std, mesh, [Shard(0)]))
    with pytest.raises(TypeError, match=r"DTensor state\.running_std.*running statistics stay plain"):
        functional_batch_renorm(x, sharded_state)
    assert all(torch.equal(v, before[k]) for k, v in norm_buffers(bad).items())
    return out


def one_process_sync(xs, ts):
    net = make_net(True)  # no process group in this process: SyncBatchRenorm is a local layer
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    record = []
    for x, t in zip(xs, ts):
        y = net(x)
        ((y * t).sum() / WORLD).backward()  # FSDP averages the ranks' gradients
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        opt.step()
        opt.zero_grad()
        params = {k: p.detach().clone() for k, p in net.named_parameters()}
        record.append({"y": y.detach(), "grads": grads, "params": params, "buffers": norm_buffers(net)})
    return record


def one_process_per_rank_statistics(xs, ts):
    """One model; each rank's batch runs with that rank's running statistics, the loss averaged over ranks."""
    net = make_net(False)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    statistics = [norm_buffers(net) for _ in range(WORLD)]
    record = []
    for x, t in zip(xs, ts):
        ys, loss = [], 0.0
        for rank in range(WORLD):
            with torch.no_grad():
                for k, b in net.named_buffers():
                    b.copy_(statistics[rank][k])
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            y = net(x[rows])
            loss = loss + (y * t[rows]).sum() / WORLD
            ys.append(y.detach())
            statistics[rank] = norm_buffers(net)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        opt.step()
        opt.zero_grad()
        params = {k: p.detach().clone() for k, p in net.named_parameters()}
        record.append({"ys": ys, "grads": grads, "params": params, "buffers": copy.deepcopy(statistics)})
    return record


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")


def test_batch_renorm_on_fsdp2_and_dtensor_parameters_equals_one_process():
    xs, ts = data()
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        results = run_gloo(_fsdp_worker, WORLD, checkpoint_dir)

    # SyncBatchRenorm under FSDP2 = one process on the global batch.
    single = one_process_sync(xs, ts)
    for step, expected in enumerate(single):
        close(torch.cat([r["sync"][step]["y"] for r in results]), expected["y"], f"sync output, step {step}")
        for r in results:
            for k in expected["params"]:
                close(r["sync"][step]["grads"][k], expected["grads"][k], f"sync grad {k}, step {step}")
                close(r["sync"][step]["params"][k], expected["params"][k], f"sync param {k}, step {step}")
            for k, v in expected["buffers"].items():
                close(r["sync"][step]["buffers"][k], v, f"sync buffer {k}, step {step}")
    assert int(results[0]["sync"][-1]["buffers"]["1.num_batches_tracked"]) == STEPS

    # The checkpoint restored the statistics and the step counter, and the run continued identically.
    for r in results:
        for k, v in r["saved_buffers"].items():
            assert torch.equal(r["restored_buffers"][k], v), k
        assert int(r["restored_buffers"]["5.num_batches_tracked"]) == SAVE_AFTER
        for original, restored in zip(r["sync"][SAVE_AFTER:], r["restored"]):
            torch.testing.assert_close(restored["y"], original["y"], rtol=1e-12, atol=1e-12)
            for key in ("params", "buffers"):
                for k, v in original[key].items():
                    torch.testing.assert_close(restored[key][k], v, rtol=1e-12, atol=1e-12)

    # Plain BatchRenorm under FSDP2 = per-rank statistics (as DDP without synchronisation).
    reference = one_process_per_rank_statistics(xs, ts)
    for step, expected in enumerate(reference):
        for rank, r in enumerate(results):
            got = r["plain"][step]
            close(got["y"], expected["ys"][rank], f"plain output, rank {rank}, step {step}")
            for k, v in expected["buffers"][rank].items():
                close(got["buffers"][k], v, f"plain buffer {k}, rank {rank}, step {step}")
            for k in expected["params"]:
                close(got["params"][k], expected["params"][k], f"plain param {k}, step {step}")
    # ... and the two ranks' statistics really differ: a synchronised result would not pass the check above.
    assert not torch.allclose(
        results[0]["plain"][-1]["buffers"]["1.running_mean"],
        results[1]["plain"][-1]["buffers"]["1.running_mean"],
    )

    # Documented limit: DCP stores a plain tensor once, so per-rank statistics come back as one rank's copy on
    # every rank (use SyncBatchRenorm under FSDP when the statistics must survive a checkpoint exactly).
    restored = [r["plain_restored_buffers"] for r in results]
    saved = [r["plain"][-1]["buffers"] for r in results]
    for k in saved[0]:
        assert torch.equal(restored[0][k], restored[1][k]), k
    assert any(all(torch.equal(restored[0][k], s[k]) for k in s) for s in saved)

    # γ, β as DTensors with Replicate() and Shard(0): one process on the same (whole) input.
    x = xs[0].flatten(2)
    upstream = torch.linspace(-1, 1, x.numel(), dtype=F64).view_as(x)
    ref = dtensor_layer()
    state = BatchRenormState(ref.running_mean.clone(), ref.running_std.clone(), torch.tensor(5))
    y = ref(x, MASK)
    (y * upstream).sum().backward()
    ref.eval()
    y_eval = ref(x)
    for name in ("R", "S(0)"):
        for r in results:
            got = r[f"dtensor-{name}"]
            close(got["y"], y.detach(), f"{name} output")
            close(got["grad_w"], ref.weight.grad, f"{name} weight grad")
            close(got["grad_b"], ref.bias.grad, f"{name} bias grad")
            for k, v in norm_buffers(ref).items():
                close(got["buffers"][k], v, f"{name} buffer {k}")
            close(got["y_functional"], y.detach(), f"{name} functional output")
            close(got["state"].running_std, ref.running_std, f"{name} functional state")
            assert int(got["state"].num_batches_tracked) == 6
            close(got["y_eval"], y_eval.detach(), f"{name} eval output")
    assert int(state.num_batches_tracked) == 5
