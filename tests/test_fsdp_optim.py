"""Every optimizer of normkit.optim on DTensor parameters: FSDP2 (``fully_shard``) and plain DTensors
(``Shard(0)`` / ``Replicate()``), two gloo ranks on CPU, against the same optimizer in one process on the
same global batch (parameters and optimizer state after several steps, full tensors), the collectives of a
step counted, rows split across ranks refused before anything changes, and a sharded state round trip
through ``torch.distributed.checkpoint``.

One spawn runs every configuration and returns, per configuration, its error (None when it passed) and the
all_reduce count of its sharded steps; the tests below read that table.
"""

from __future__ import annotations

import math
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from normkit.optim import (
    LAMB,
    LARS,
    SGDG,
    SGDP,
    AdamG,
    AdamP,
    ClippedOptimizer,
    NormalizedOptimizer,
    SphereProjection,
    orthogonality_penalty,
    register_norm,
    scale_invariant_param_groups,
    trust_ratio_param_groups,
    unregister_norm,
)
from tests.distributed import run_gloo

STEPS = 3
RTOL = 1e-5
NORMS = ["l1", "l2", "l1_l2", "avg_l1", "avg_l2", "avg_l1_l2", "max", "min_max", "std"]
NAMES = ["0.weight", "1.weight", "1.bias", "3.weight", "5.weight", "5.bias"]


def make_model() -> nn.Sequential:
    """Bias-free Linear → BatchNorm (eval: per-sample, so the ranks' slices do not change it) → Linear →
    Linear with a bias; output widths 7, 5, 3 (not divisible by 2: uneven shards)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 7, bias=False),
        nn.BatchNorm1d(7),
        nn.Tanh(),
        nn.Linear(7, 5, bias=False),
        nn.Tanh(),
        nn.Linear(5, 3),
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    model[1].eval()
    return model


def _p3(x: Tensor) -> Tensor:
    return x.abs().pow(3).sum().pow(1.0 / 3.0)


def _groups(params: list[Tensor], spec: list[tuple[list[int], dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"params": [params[i] for i in idx], **opts} for idx, opts in spec]


def _graph_spec(kind: str) -> list[tuple[list[int], dict[str, Any]]]:
    """A param-group helper's groups on the one-process model, as indices (applied to any copy)."""
    model = make_model()
    index = {id(p): i for i, p in enumerate(model.parameters())}
    if kind == "trust":
        groups = trust_ratio_param_groups(model, weight_decay=1e-3)
    else:
        groups = scale_invariant_param_groups(model, weight_decay=1e-3, test_others=kind == "test_others")
    return [
        ([index[id(p)] for p in g["params"]], {k: v for k, v in g.items() if k != "params"}) for g in groups
    ]


def _sgd(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


Factory = Callable[[list[Tensor], "nn.Module | None"], torch.optim.Optimizer]


def configs() -> dict[str, tuple[Factory, int | None]]:
    """name → (factory(params, model), all_reduce calls per sharded step expected; None: not checked)."""
    grass = [([0, 3], {"grassmann": True, "lr": 0.2}), ([1, 2, 4, 5], {"lr": 0.05, "weight_decay": 1e-3})]
    split = [([0], {"grassmann": True, "lr": 0.2}), ([3], {"grassmann": True, "lr": 0.1}), grass[1]]
    out: dict[str, tuple[Factory, int | None]] = {
        "sgdg": (lambda ps, m: SGDG(_groups(ps, grass), momentum=0.9), 0),
        "sgdg_clip_omega": (lambda ps, m: SGDG(_groups(ps, grass), grad_clip=0.1, omega=0.1), 1),
        "sgdg_two_groups_omega": (lambda ps, m: SGDG(_groups(ps, split), omega=0.1), 1),
        "sgdg_skip": (lambda ps, m: SGDG(_groups(ps, grass), omega=0.1, nonfinite="skip"), 2),
        "adamg": (lambda ps, m: AdamG(_groups(ps, grass), lr=0.05), 0),
        "sgdg_foreach": (lambda ps, m: SGDG(_groups(ps, grass), momentum=0.9, foreach=True), 0),
        "adamg_foreach": (lambda ps, m: AdamG(_groups(ps, grass), lr=0.05, foreach=True), 0),
        "adamg_clip_omega": (lambda ps, m: AdamG(_groups(ps, grass), lr=0.05, grad_clip=0.1, omega=0.1), 1),
    }
    for norm in NORMS:
        for gran in ("tensor", "global"):
            out[f"normalized_{gran}_{norm}"] = (
                lambda ps, m, n=norm, g=gran: NormalizedOptimizer(_sgd(ps), n, g, eps=1e-7),
                1,
            )
    for norm in ("l2", "min_max", "std", "p3"):
        out[f"normalized_unit_{norm}"] = (
            lambda ps, m, n=norm: NormalizedOptimizer(
                _sgd(ps), n, "unit", exclude=[ps[1], ps[2], ps[5]] if n == "p3" else ()
            ),
            0 if norm == "p3" else 1,
        )
    for norm in ("l2", "std"):
        out[f"normalized_layer_{norm}"] = (
            lambda ps, m, n=norm: NormalizedOptimizer(_sgd(ps), n, "layer", model=m),
            1,
        )
    out["clipped_global_l2"] = (lambda ps, m: ClippedOptimizer(_sgd(ps), "l2", 0.05, granularity="global"), 1)
    out["clipped_tensor_max"] = (lambda ps, m: ClippedOptimizer(_sgd(ps), "max", 0.01), 1)
    out["clipped_agc_unit"] = (lambda ps, m: ClippedOptimizer(_sgd(ps), relative=True, clip_factor=0.01), 1)
    out["clipped_agc_tensor"] = (
        lambda ps, m: ClippedOptimizer(_sgd(ps), relative=True, clip_factor=0.01, granularity="tensor"),
        1,
    )
    out["adamp_auto"] = (lambda ps, m: AdamP(ps, lr=0.01, weight_decay=1e-2), 2)
    out["adamp_nesterov"] = (lambda ps, m: AdamP(ps, lr=0.01, weight_decay=1e-2, nesterov=True), 2)
    out["sgdp_auto"] = (lambda ps, m: SGDP(ps, lr=0.05, momentum=0.9, weight_decay=1e-2), 2)
    out["sgdp_nesterov"] = (
        lambda ps, m: SGDP(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
        2,
    )
    graph = _graph_spec("graph")
    test_others = _graph_spec("test_others")
    tensor_mode = [([0, 3], {"projection": "tensor"}), ([1, 2, 4, 5], {"projection": "none"})]
    out["adamp_graph"] = (lambda ps, m: AdamP(_groups(ps, graph), lr=0.01), 0)
    out["sgdp_graph_test_others"] = (lambda ps, m: SGDP(_groups(ps, test_others), lr=0.05, momentum=0.9), 2)
    out["adamp_tensor"] = (lambda ps, m: AdamP(_groups(ps, tensor_mode), lr=0.01, weight_decay=1e-2), 1)
    three = [([0, 3], {"weight_decay": 1e-2}), ([4], {"lr": 0.02}), ([1, 2, 5], {"projection": "none"})]
    out["adamp_three_groups"] = (lambda ps, m: AdamP(_groups(ps, three), lr=0.01), 2)
    two = [([0, 3], {}), ([4], {"lr": 0.1}), ([1, 2, 5], {"adapt": False})]
    out["lars_three_groups"] = (lambda ps, m: LARS(_groups(ps, two), lr=0.5, trust_coefficient=0.02), 1)
    out["lamb_three_groups"] = (lambda ps, m: LAMB(_groups(ps, two), lr=0.01, weight_decay=1e-3), 1)
    trust = _graph_spec("trust")
    out["lars"] = (lambda ps, m: LARS(ps, lr=0.5, weight_decay=1e-3, trust_coefficient=0.02), 1)
    out["lars_nesterov_clip"] = (
        lambda ps, m: LARS(ps, lr=0.5, nesterov=True, trust_clip=True, trust_coefficient=0.02),
        1,
    )
    out["lamb"] = (lambda ps, m: LAMB(_groups(ps, trust), lr=0.01), 1)
    out["sphere_rows"] = (lambda ps, m: SphereProjection(_sgd(ps), rows=[ps[0], ps[3]]), 0)
    out["sphere_tensors_radius"] = (
        lambda ps, m: SphereProjection(
            torch.optim.Adam(ps, lr=0.01), rows=[ps[0]], tensors=[ps[3]], radius=1.0, project_grad=True
        ),
        2,
    )
    return out


# --- running one configuration ------------------------------------------------------------------------


def _batches(rank: int | None, world: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS + 2):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        if rank is not None:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        out.append((x, y))
    return out


def _synthetic_grads(step: int, params: list[Tensor]) -> list[Tensor]:
    """Gradients for plain-DTensor runs; the first weight's are orthogonal to its rows (scale-invariant)."""
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    w = params[0].detach()
    w = w.full_tensor() if hasattr(w, "full_tensor") else w
    grads[0] -= (grads[0] * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
    return grads


def _full(t: Any) -> Any:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _snapshot(model_params: list[Tensor], opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {f"param {NAMES[i]}": _full(p.detach()).clone() for i, p in enumerate(model_params)}
    for i, p in enumerate(model_params):
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, Tensor):
                out[f"state {NAMES[i]} {key}"] = _full(value).detach().clone().float()
    return out


def _compare(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float = RTOL) -> None:
    if set(got) != set(want):
        raise AssertionError(f"state keys differ: {sorted(set(got) ^ set(want))}")
    for key, w in want.items():
        d = (got[key].double() - w.double()).abs().max().item() if w.numel() else 0.0
        scale = max(w.double().abs().max().item() if w.numel() else 0.0, 1e-12)
        if not d <= rtol * scale:
            raise AssertionError(f"{key}: max difference {d:.3g} vs scale {scale:.3g}")


def _model_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]]) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _count_all_reduce(fn: Callable[[], None]) -> int:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        fn()
    return int(comm.get_total_counts())


def _fsdp_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for i in (0, 3, 5):
        fully_shard(model[i])
    fully_shard(model)
    return model


def _run_fsdp(rank: int, world: int, factory: Factory) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    ref_model = make_model()
    ref_opt = factory(list(ref_model.parameters()), ref_model)
    _model_steps(ref_model, ref_opt, _batches(None, world)[:STEPS])
    want = _snapshot(list(ref_model.parameters()), ref_opt)

    model = _fsdp_model()
    opt = factory(list(model.parameters()), model)
    batches = _batches(rank, world)[:STEPS]
    counts = []
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        counts.append(_count_all_reduce(opt.step))
    if len(set(counts)) != 1:
        raise AssertionError(f"collectives per step vary: {counts}")
    return _snapshot(list(model.parameters()), opt), want, counts[0]


def _run_dtensor(world: int, factory: Factory, placement: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    base = [p.detach().clone() for p in make_model().parameters()]
    ref = [nn.Parameter(t.clone()) for t in base]
    dts = [nn.Parameter(distribute_tensor(t.clone(), mesh, [placement])) for t in base]
    ref_opt, opt = factory(ref, None), factory(dts, None)  # type: ignore[arg-type]
    for step in range(STEPS):
        grads = _synthetic_grads(step, ref)
        for p, q, g in zip(ref, dts, grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [placement])
        ref_opt.step()
        opt.step()
    return _snapshot(dts, opt), _snapshot(ref, ref_opt)  # type: ignore[arg-type]


def _shard1_refusals(world: int) -> dict[str, str | None]:
    """Row-wise math on a weight whose rows are split (Shard(1)) raises a clear error, changing nothing."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    cases: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
        "shard1_sgdg": lambda ps: SGDG(ps, lr=0.1, grassmann=True),
        "shard1_adamg": lambda ps: AdamG(ps, lr=0.1, grassmann=True),
        "shard1_normalized_unit": lambda ps: NormalizedOptimizer(_sgd(ps), "l2", "unit"),
        "shard1_adamp_auto": lambda ps: AdamP(ps, lr=0.1),
        "shard1_sphere_rows": lambda ps: SphereProjection(_sgd(ps), rows=ps),
    }
    out: dict[str, str | None] = {}
    torch.manual_seed(3)
    w0 = torch.randn(4, 6)
    for name, make in cases.items():
        try:
            w = nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(1)]))
            w.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
            opt = make([w])
            try:
                opt.step()
            except ValueError as e:
                msg = str(e)
                if "Shard(dim=1)" not in msg or "dim 0" not in msg:
                    raise AssertionError(f"unclear message: {msg}") from None
            else:
                raise AssertionError("no error")
            if not torch.equal(w.full_tensor(), w0) or any(opt.state.values()):
                raise AssertionError("the refused step changed the weight or the state")
            out[name] = None
        except Exception:
            out[name] = traceback.format_exc()
    return out


def _checkpoint_round_trip(rank: int, world: int, factory: Factory, folder: str) -> None:
    """Sharded save after 3 steps, resume into fresh sharded copies, 2 more steps: as if uninterrupted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    batches = _batches(rank, world)
    model = _fsdp_model()
    opt = factory(list(model.parameters()), model)
    _model_steps(model, opt, batches[:STEPS])
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)
    _model_steps(model, opt, batches[STEPS:])
    want = _snapshot(list(model.parameters()), opt)

    fresh = _fsdp_model()
    with torch.no_grad():  # start from other weights, so that the load has to restore them
        for p in fresh.parameters():
            p.mul_(0.5)
    fresh_opt = factory(list(fresh.parameters()), fresh)
    msd, osd = get_state_dict(fresh, fresh_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _model_steps(fresh, fresh_opt, batches[STEPS:])
    _compare(_snapshot(list(fresh.parameters()), fresh_opt), want, rtol=1e-6)


CHECKPOINTED = ["sgdg_clip_omega", "adamg_clip_omega", "normalized_global_std", "adamp_auto", "lars", "lamb"]
DTENSOR_CONFIGS = [
    "sgdg_clip_omega",
    "adamg_clip_omega",
    "normalized_tensor_min_max",
    "normalized_global_std",
    "normalized_unit_l2",
    "clipped_agc_unit",
    "adamp_auto",
    "sgdp_auto",
    "lars",
    "lamb",
    "sphere_tensors_radius",
]


def _zoo(rank: int, world: int) -> dict[str, str | None]:
    """A model we did not write: torchvision's ShuffleNet-V2 (x0.5; eval-mode BatchNorm), one fully_shard
    per stage + root, 2 steps of several optimizers against one process on the same gradients."""
    import torchvision
    from torch.distributed.fsdp import fully_shard

    from normkit.optim import grassmann_param_groups

    def build() -> nn.Module:
        torch.manual_seed(0)
        return torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10).eval()

    def as_index(model: nn.Module, groups: list[dict[str, Any]]) -> list[tuple[list[int], dict[str, Any]]]:
        index = {id(p): i for i, p in enumerate(model.parameters())}
        return [
            ([index[id(p)] for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
            for g in groups
        ]

    plain = build()
    grass = as_index(plain, grassmann_param_groups(plain, lr=0.05, lr_g=0.05, unit_init=False))
    factories: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
        "zoo sgdg": lambda ps: SGDG(_groups(ps, grass), grad_clip=0.1),
        "zoo adamp": lambda ps: AdamP(ps, lr=1e-3, weight_decay=1e-2),
        "zoo normalized_global_std": lambda ps: NormalizedOptimizer(_sgd(ps), "std", "global"),
    }
    g = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)
    ]
    out: dict[str, str | None] = {}
    for name, factory in factories.items():
        try:
            ref = build()
            ref_opt = factory(list(ref.parameters()))
            model = build()
            for stage in (model.stage2, model.stage3, model.stage4):
                fully_shard(stage)
            fully_shard(model)
            opt = factory(list(model.parameters()))
            for x, y in batches:
                # the one-process copy steps on the sharded run's gradients (gathered), so that the check is
                # of the optimizer alone: Adam-type steps amplify the rounding of near-zero gradients
                opt.zero_grad()
                nn.functional.cross_entropy(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
                for p, q in zip(ref.parameters(), model.parameters()):
                    p.grad = _full(q.grad).clone()
                ref_opt.step()
                opt.step()
            names = [n for n, _ in plain.named_parameters()]
            got = {n: _full(p.detach()) for n, p in zip(names, model.parameters())}
            want = {n: p.detach() for n, p in zip(names, ref.parameters())}
            _compare(got, want)
            out[name] = None
        except Exception:
            out[name] = traceback.format_exc()
    return out


def _worker(rank: int, world: int, folder: str) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard

    register_norm("p3", _p3, overwrite=True)
    # ShuffleNet's stages end in a channel shuffle (a view); nothing here writes into it
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    errors: dict[str, str | None] = {}
    counts: dict[str, tuple[int, int | None]] = {}
    try:
        table = configs()
        for name, (factory, expected) in table.items():
            try:
                got, want, count = _run_fsdp(rank, world, factory)
                _compare(got, want)
                counts[name] = (count, expected)
                errors[f"fsdp {name}"] = None
            except Exception:
                errors[f"fsdp {name}"] = traceback.format_exc()
        for name in DTENSOR_CONFIGS:
            for placement in (Shard(0), Replicate()):
                key = f"dtensor {placement} {name}"
                try:
                    got, want = _run_dtensor(world, table[name][0], placement)
                    _compare(got, want)
                    errors[key] = None
                except Exception:
                    errors[key] = traceback.format_exc()
        errors.update(_zoo(rank, world))
        errors.update(_shard1_refusals(world))
        try:  # a NaN in one rank's shard: every rank skips the step (the verdict is reduced)
            model = _fsdp_model()
            opt = ClippedOptimizer(_sgd(list(model.parameters())), "l2", 1.0, nonfinite="skip")
            x, y = _batches(rank, world)[0]
            nn.functional.mse_loss(model(x), y).backward()
            before = [_full(p.detach()).clone() for p in model.parameters()]
            if rank == 0:
                next(iter(model.parameters())).grad.to_local()[0, 0] = math.nan
            opt.step()
            after = [_full(p.detach()) for p in model.parameters()]
            if opt.skipped_steps != 1 or not all(torch.equal(a, b) for a, b in zip(after, before)):
                raise AssertionError(f"skipped_steps={opt.skipped_steps}, weights changed")
            errors["nonfinite skip"] = None
        except Exception:
            errors["nonfinite skip"] = traceback.format_exc()
        try:  # the ω regularizer's value for logging, from the shards (YᵀY reduced once)
            grass = [([0, 3], {"grassmann": True, "lr": 0.2}), ([1, 2, 4, 5], {"lr": 0.05})]
            ref_model, model = make_model(), _fsdp_model()
            want_pen = orthogonality_penalty(SGDG(_groups(list(ref_model.parameters()), grass), omega=0.1))
            opt = SGDG(_groups(list(model.parameters()), grass), omega=0.1)
            got_pen: list[Tensor] = []
            calls = _count_all_reduce(lambda: got_pen.append(orthogonality_penalty(opt)))
            if not (abs(got_pen[0].item() - want_pen.item()) <= RTOL * want_pen.item() and calls == 1):
                raise AssertionError(f"penalty {got_pen[0].item()} vs {want_pen.item()}, {calls} all_reduce")
            errors["penalty orthogonality"] = None
        except Exception:
            errors["penalty orthogonality"] = traceback.format_exc()
        # a custom norm on a block split across ranks: refused with the alternative, nothing changed
        try:
            got, want, _ = _run_fsdp(rank, world, lambda ps, m: NormalizedOptimizer(_sgd(ps), "p3", "tensor"))
            errors["custom_norm_sharded_block"] = "no error"
        except ValueError as e:
            ok = "custom norm 'p3'" in str(e) and "built-in norm" in str(e)
            errors["custom_norm_sharded_block"] = None if ok else f"unclear message: {e}"
        for i, name in enumerate(CHECKPOINTED):
            try:
                _checkpoint_round_trip(rank, world, table[name][0], f"{folder}/{i}")
                errors[f"dcp {name}"] = None
            except Exception:
                errors[f"dcp {name}"] = traceback.format_exc()
    finally:
        unregister_norm("p3")
    dist.barrier()
    return {"errors": errors, "counts": counts}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = str(tmp_path_factory.mktemp("dcp"))
    return run_gloo(_worker, 2, folder)


def _errors(results: list[dict[str, Any]], prefix: str) -> dict[str, str]:
    bad = {}
    for rank, r in enumerate(results):
        for key, err in r["errors"].items():
            if key.startswith(prefix) and err is not None:
                bad[f"rank {rank}: {key}"] = err
    return bad


def test_fsdp_equals_one_process(results: list[dict[str, Any]]) -> None:
    """Parameters and optimizer state of every configuration under FSDP2 equal the one-process run."""
    names = set(results[0]["errors"])
    assert len([k for k in names if k.startswith("fsdp ")]) == len(configs())
    bad = _errors(results, "fsdp ")
    assert not bad, "\n".join(f"{k}:\n{v}" for k, v in bad.items())


def test_fsdp_zoo_model_equals_one_process(results: list[dict[str, Any]]) -> None:
    """torchvision ShuffleNet-V2 sharded per stage: SGD-G (graph groups), AdamP, normalized = one process."""
    assert len([k for k in results[0]["errors"] if k.startswith("zoo ")]) == 3
    bad = _errors(results, "zoo ")
    assert not bad, "\n".join(f"{k}:\n{v}" for k, v in bad.items())


def test_plain_dtensor_shard0_and_replicate(results: list[dict[str, Any]]) -> None:
    bad = _errors(results, "dtensor ")
    assert len([k for k in results[0]["errors"] if k.startswith("dtensor ")]) == 2 * len(DTENSOR_CONFIGS)
    assert not bad, "\n".join(f"{k}:\n{v}" for k, v in bad.items())


def test_rows_split_across_ranks_are_refused(results: list[dict[str, Any]]) -> None:
    """Shard(1) under row-wise math and a custom norm on a sharded block: clear errors, nothing changed;
    also the ω regularizer's logged value from the shards, and a NaN on one rank skipping the step on all."""
    bad = {
        **_errors(results, "shard1_"),
        **_errors(results, "custom_norm"),
        **_errors(results, "penalty"),
        **_errors(results, "nonfinite"),
    }
    assert "shard1_sgdg" in results[0]["errors"]
    assert not bad, "\n".join(f"{k}:\n{v}" for k, v in bad.items())


def test_collectives_per_step(results: list[dict[str, Any]]) -> None:
    """The claimed number of all_reduce calls per sharded step (cross-row quantities batched)."""
    wrong = {
        name: (got, expected)
        for r in results
        for name, (got, expected) in r["counts"].items()
        if expected is not None and got != expected
    }
    assert not wrong, wrong
    assert len(results[0]["counts"]) == len(configs())


def test_checkpoint_round_trip(results: list[dict[str, Any]]) -> None:
    bad = _errors(results, "dcp ")
    assert len([k for k in results[0]["errors"] if k.startswith("dcp ")]) == len(CHECKPOINTED)
    assert not bad, "\n".join(f"{k}:\n{v}" for k, v in bad.items())


def test_config_table_is_complete() -> None:
    """Every built-in norm at the cross-rank granularities, and every optimizer, is in the table."""
    names = configs()
    for norm in NORMS:
        assert f"normalized_global_{norm}" in names and f"normalized_tensor_{norm}" in names
    for name in (
        "sgdg",
        "adamg",
        "adamp_auto",
        "sgdp_auto",
        "lars",
        "lamb",
        "sphere_rows",
        "clipped_agc_unit",
    ):
        assert name in names


def test_sharded_omega_form_equals_rows_form() -> None:
    """The ω gradient from a mesh-wide YᵀY (sharded rows: Y(YᵀY − I)) equals the one-process YYᵀY − Y form,
    in the eager and the functional (torch.compile) code, float64."""
    from normkit.optim.grassmann import _compiled_tangent, _tangent_

    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64)
    g = torch.randn(5, 7, dtype=torch.float64)
    y = w / w.norm(dim=1, keepdim=True)
    want = g * w.norm(dim=1, keepdim=True) + 0.2 * (y @ y.T @ y - y)  # ∂/∂y of f plus 2ω(YYᵀY − Y)
    want = want - (want * y).sum(1, keepdim=True) * y
    gram = (y.T @ y).unsqueeze(0)
    _, h, _ = _compiled_tangent(w, g, 0.1, [(0, 1, 5)], None, [gram])
    torch.testing.assert_close(h, want, rtol=1e-12, atol=1e-12)
    w2 = w.clone()
    src, a, b, h2, _ = _tangent_(w2, g, 0.1, [(0, 1, 5)], torch.empty_like(w), True, [gram])
    torch.testing.assert_close(a * src + b * w2, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2, (want * want).sum(1, keepdim=True), rtol=1e-10, atol=1e-12)
