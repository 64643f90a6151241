"""LSUV and orthogonal init on sharded models (FSDP2 ``fully_shard``, plain DTensor parameters): 2 gloo
processes, each holding its slice of the global batch, against one process on the whole batch."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from normkit.init import LSUVError, lsuv_init, orthogonal_init
from normkit.nn import BatchRenorm2d, SyncBatchRenorm
from tests.distributed import run_gloo

pytest.importorskip("torch.distributed.fsdp")
pytest.importorskip("timm")

GLOBAL_BATCH = 12  # split 6 / 6 over 2 ranks


def mlp() -> nn.Module:
    # output sizes 7 and 5 do not split evenly over 2 ranks
    return nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 4))


def convnet(norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        norm(5),
        nn.ReLU(),
        nn.Conv2d(5, 6, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(6, 3, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 3),
    )


def std_convnet() -> nn.Module:
    """timm's weight-standardized convs: LSUV's measured loop (reruns of the layer) under FSDP."""
    from timm.layers import ScaledStdConv2d, StdConv2d

    return nn.Sequential(
        StdConv2d(3, 5, 3), nn.ReLU(), ScaledStdConv2d(5, 6, 3), nn.ReLU(), nn.Conv2d(6, 3, 1)
    )


class Twice(nn.Module):
    """One Linear called twice per forward: LSUV's one-correction-per-pass loop, stopped mid-forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(10, 7), nn.Linear(7, 7), nn.Linear(7, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.mid(h))
        return self.out(torch.relu(self.mid(h)))


def blocknet(norm: type[nn.Module]) -> nn.Module:
    """Blocks of layers, each block one fully_shard unit (as the harness shards): fx traces into them."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), norm(5), nn.ReLU()),
        nn.Sequential(nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(6, 3, 3), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)),
    )


def _images(g: torch.Generator) -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=g) * 2


# Batch statistics must be those of the global batch for one process and two to agree: one process runs
# Batch Renormalization (= BatchNorm in training, r_max = 1, d_max = 0 at the start), the ranks its synced
# version. Plain BatchNorm is compared in eval mode (batch_statistics=False).
CASES = {
    "mlp": (mlp, lambda g: torch.randn(GLOBAL_BATCH, 10, generator=g) * 3 + 1),
    "conv": (lambda: convnet(BatchRenorm2d), _images),
    "conv_sync": (lambda: convnet(SyncBatchRenorm), _images),
    "conv_eval": (convnet, _images),
    "std": (std_convnet, _images),
    "blocks": (lambda: blocknet(BatchRenorm2d), _images),
    "blocks_sync": (lambda: blocknet(SyncBatchRenorm), _images),
    "twice": (Twice, lambda g: torch.randn(GLOBAL_BATCH, 10, generator=g) * 2),
}
SHARDED = (
    ("mlp", "mlp", {}),
    ("mlp_pc", "mlp", {"per_channel": True}),
    ("conv", "conv_sync", {}),
    ("conv_eval", "conv_eval", {"batch_statistics": False}),
    ("std", "std", {}),
    ("twice", "twice", {}),
    ("blocks", "blocks_sync", {}),
)


def _rows(report) -> list[tuple]:
    return [(r.name, r.status.value, r.var_before, r.var_after, r.scale, r.iterations) for r in report]


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def _shard(model: nn.Module, blocks: bool = False) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model.children() if blocks else model.modules():
        if blocks or isinstance(m, (nn.Linear, nn.Conv2d)):
            fully_shard(m)
    fully_shard(model)
    return model


def _one_process(case: str, **options) -> tuple[dict[str, torch.Tensor], list[tuple]]:
    build, data = CASES[case]
    torch.manual_seed(0)
    model = build()
    x = data(torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the orthogonal pre-init draws from the default generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lsuv_init(model, x, **options)
    return _full(model), _rows(report)


def _sharded_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    out: dict = {}
    for case, built, options in SHARDED:
        build, data = CASES[built]
        torch.manual_seed(0)
        model = _shard(build(), blocks=case == "blocks")
        x = data(torch.Generator().manual_seed(1)).chunk(world)[rank]
        # ranks with different default generators: rank 0's stream must be the one used
        torch.manual_seed(2 if rank == 0 else 99)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = lsuv_init(model, x, **options)
        out[case] = (_full(model), _rows(report))
        # the model still trains: one forward / backward through FSDP after the init
        model(x).square().mean().backward()
        assert all(isinstance(p, DTensor) for p in model.parameters())

    # orthogonal_init alone on the sharded MLP: the full weights of one process
    torch.manual_seed(0)
    model = _shard(mlp())
    torch.manual_seed(2 if rank == 0 else 7)
    orthogonal_init(model)
    out["orthogonal"] = _full(model)

    # a constant batch is refused on every rank, before anything changes
    before = _full(model)
    try:
        lsuv_init(model, torch.zeros(6, 10))
    except LSUVError as exc:
        out["constant"] = str(exc)
    after = _full(model)
    out["constant_untouched"] = all(torch.equal(before[k], after[k]) for k in before)

    # weights LSUV finds only by running the model (MultiheadAttention) cannot be followed sharded: refused
    torch.manual_seed(0)
    model = _shard(nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)))
    before = _full(model)
    try:
        lsuv_init(model, torch.randn(2, 5, 8))
    except LSUVError as exc:
        out["attention"] = str(exc)
    after = _full(model)
    out["attention_untouched"] = all(torch.equal(before[k], after[k]) for k in before)

    # plain DTensor parameters (no FSDP), Replicate or Shard(0); the batch a DTensor sharded on dim 0
    mesh = init_device_mesh("cpu", (world,))
    for key, placement in (("dtensor_replicate", Replicate()), ("dtensor_shard0", Shard(0))):
        torch.manual_seed(0)
        model = mlp()
        for m in model.modules():
            if isinstance(m, nn.Linear):
                for name, p in list(m.named_parameters()):
                    setattr(m, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [placement])))
        xs = CASES["mlp"][1](torch.Generator().manual_seed(1)).chunk(world)[rank]
        xd = DTensor.from_local(xs, mesh, [Shard(0)], run_check=False)
        torch.manual_seed(2 if rank == 0 else 5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = lsuv_init(model, xd, per_channel=placement == Shard(0))
        out[key] = (_full(model), _rows(report))
    dist.barrier()
    return out


def _assert_rows(got: list[tuple], want: list[tuple]) -> None:
    assert [r[:2] for r in got] == [r[:2] for r in want]
    for g, w in zip(got, want):
        assert g[5] == w[5], (g, w)
        for a, b in zip(g[2:5], w[2:5]):
            if b is None:
                assert a is None
            else:
                assert abs(a - b) <= 1e-5 * abs(b), (g, w)


def _assert_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if not want[k].is_floating_point():
            continue
        err = (got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)
        assert err <= 1e-5, (k, float(err))


def test_fsdp_lsuv_equals_one_process_on_the_global_batch():
    r0, r1 = run_gloo(_sharded_worker, 2)
    for case, _, options in SHARDED:
        want_w, want_rows = _one_process(case.split("_")[0] if case == "mlp_pc" else case, **options)
        for res in (r0, r1):
            got_w, got_rows = res[case]
            _assert_weights(got_w, want_w)
            _assert_rows(got_rows, want_rows)
        # LSUV did something: the report is not the identity
        assert any(r[1] == "initialized" and r[5] > 0 for r in want_rows)
        status = {r[0]: r[1] for r in want_rows}
        if case == "std":  # the standardized conv is kept, the scaled one's gain is set
            assert status["0"] == "no effect" and status["2"] == "initialized"
        if case == "twice":
            assert status["mid"] == "initialized" and next(r for r in want_rows if r[0] == "mid")[5] > 0

    torch.manual_seed(0)
    ref = mlp()
    torch.manual_seed(2)
    orthogonal_init(ref)
    for res in (r0, r1):
        _assert_weights(res["orthogonal"], _full(ref))

    for res in (r0, r1):
        assert "constant" in res["constant"] and res["constant_untouched"]
        assert "before fully_shard" in res["attention"] and res["attention_untouched"]

    for key, options in (("dtensor_replicate", {}), ("dtensor_shard0", {"per_channel": True})):
        want_w, want_rows = _one_process("mlp", **options)
        for res in (r0, r1):
            got_w, got_rows = res[key]
            _assert_weights(got_w, want_w)
            _assert_rows(got_rows, want_rows)
