"""NormalizedOptimizer / ClippedOptimizer against float64 references written here."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from normkit.optim import ClippedOptimizer, NormalizedOptimizer, register_norm, unregister_norm
from tests.test_norms import BUILTINS, reference

GRANULARITIES = ["tensor", "layer", "unit", "global"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


# The blocks each granularity promises on make_model(), written out by hand: lists of (parameter name, row).
LAYER_BLOCKS = [["0.weight", "0.bias"], ["1.weight", "1.bias"], ["3.weight", "3.bias"]]
SHAPES = {
    "0.weight": (4, 5),
    "0.bias": (4,),
    "1.weight": (4,),
    "1.bias": (4,),
    "3.weight": (3, 4),
    "3.bias": (3,),
}


def blocks_of(granularity: str) -> list[list[tuple[str, int | None]]]:
    names = list(SHAPES)
    if granularity == "tensor":
        return [[(n, None)] for n in names]
    if granularity == "layer":
        return [[(n, None) for n in layer] for layer in LAYER_BLOCKS]
    if granularity == "global":
        return [[(n, None) for n in names]]
    out: list[list[tuple[str, int | None]]] = []
    for n in names:  # unit: each row of a matrix, a whole vector
        out += [[(n, r)] for r in range(SHAPES[n][0])] if len(SHAPES[n]) == 2 else [[(n, None)]]
    return out


def piece(grads: dict[str, torch.Tensor], name: str, row: int | None) -> torch.Tensor:
    return grads[name] if row is None else grads[name][row]


def reference_transform(
    grads: dict[str, torch.Tensor], granularity: str, name: str, scale_of, weights=None
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """float64: every block scaled by scale_of(block norm[, weight block norm]); also the block norms."""
    out = {k: v.double().clone() for k, v in grads.items()}
    norms = []
    for block in blocks_of(granularity):
        cat = torch.cat([piece(grads, n, r).double().reshape(-1) for n, r in block])
        nrm = reference(cat, name)
        norms.append(nrm)
        if weights is None:
            s = scale_of(nrm)
        else:
            wcat = torch.cat([piece(weights, n, r).double().reshape(-1) for n, r in block])
            s = scale_of(nrm, reference(wcat, name))
        for n, r in block:
            if r is None:
                out[n] *= s
            else:
                out[n][r] *= s
    return out, norms


def backward(model: nn.Module, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g)
    y = torch.randn(16, 3, generator=g)
    loss = (model(x) - y).pow(2).mean() * scale
    loss.backward()
    return loss


def raw_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", BUILTINS)
def test_inner_receives_the_normalized_gradients(granularity: str, name: str) -> None:
    """Wrapper(SGD nesterov) == plain SGD fed by hand with the float64 reference; every block, every norm."""
    eps = 1e-7
    a, b = make_model(), make_model()
    opt_a = NormalizedOptimizer(
        torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9, nesterov=True),
        name,
        granularity,  # type: ignore[arg-type]
        eps,
        model=a,
        return_norms=True,
    )
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for step in range(3):
        opt_a.zero_grad()
        backward(a, step)
        want, norms = reference_transform(raw_grads(a), granularity, name, lambda n: 1.0 / (n + eps))
        opt_a.step()
        params_b = dict(b.named_parameters())
        for n, g in want.items():
            params_b[n].grad = g.float()
            torch.testing.assert_close(dict(a.named_parameters())[n].grad, g.float(), rtol=2e-5, atol=1e-7)
        opt_b.step()
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
    # the per-block norms kept for logging, at the blocks promised
    params = dict(a.named_parameters())
    got_blocks = []
    for block, nrm in zip(blocks_of(granularity), norms):
        for n, r in block:
            logged = opt_a.last_norms[params[n]]
            value = logged if r is None or logged.ndim == 0 else logged[r]
            if granularity == "unit" and r is None:
                assert logged.shape == (1,)
                value = logged[0]
            assert math.isclose(float(value), nrm, rel_tol=1e-5, abs_tol=1e-9), (n, r)
        got_blocks.append(block)
    assert len(opt_a.last_norms) == len(SHAPES)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_blocks_are_the_promised_ones(granularity: str) -> None:
    """After normalization each promised block has l2 norm N / (N + eps) (≈ 1 unless N is tiny)."""
    model = make_model()
    opt = NormalizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), "l2", granularity, model=model)
    backward(model, 0)
    before = raw_grads(model)
    opt.step()
    grads = raw_grads(model)
    for block in blocks_of(granularity):
        raw = float(torch.cat([piece(before, n, r).double().reshape(-1) for n, r in block]).norm())
        cat = torch.cat([piece(grads, n, r).reshape(-1) for n, r in block])
        assert math.isclose(float(cat.norm()), raw / (raw + 1e-7), rel_tol=1e-5)
    expected_blocks = {"tensor": 6, "layer": 3, "unit": 4 + 1 + 1 + 1 + 3 + 1, "global": 1}[granularity]
    assert len(blocks_of(granularity)) == expected_blocks


def test_layer_blocks_follow_the_module_tree() -> None:
    """Nested modules: a block is what a module owns directly; parameters outside the model stand alone."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 2)))
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) * self.scale

    net = Net()
    extra = nn.Parameter(torch.randn(4))
    opt = NormalizedOptimizer(
        torch.optim.SGD([*net.parameters(), extra], lr=0.0), granularity="layer", model=net, return_norms=True
    )
    (net(torch.randn(8, 3)).sum() + (extra**2).sum()).backward()
    raw = {id(p): p.grad.clone() for p in [*net.parameters(), extra]}
    opt.step()
    ln = opt.last_norms
    blocks = [
        [net.body[0].weight, net.body[0].bias],
        [net.body[1][0].weight, net.body[1][0].bias],
        [net.scale],
    ]
    blocks.append([extra])
    for block in blocks:
        want = float(torch.cat([raw[id(p)].reshape(-1) for p in block]).double().norm())
        for p in block:
            assert math.isclose(float(ln[p]), want, rel_tol=1e-5)


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zero_gradients_stay_zero(name: str, granularity: str) -> None:
    model = make_model()
    for cls, kw in ((NormalizedOptimizer, {}), (ClippedOptimizer, {"clipnorm": 1.0})):
        opt = cls(
            torch.optim.SGD(model.parameters(), lr=0.1), name, granularity=granularity, model=model, **kw
        )
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in model.parameters():
            assert torch.equal(p.grad, torch.zeros_like(p))


def test_foreach_and_single_paths_agree() -> None:
    for granularity in ("tensor", "layer", "global"):
        for name in ("l1_l2", "min_max", "std"):
            out = []
            for foreach in (True, False):
                model = make_model()
                opt = NormalizedOptimizer(
                    torch.optim.SGD(model.parameters(), lr=0.1),
                    name,
                    granularity,
                    model=model,
                    foreach=foreach,
                )
                backward(model, 1)
                opt.step()
                out.append([p.grad.clone() for p in model.parameters()])
            for x, y in zip(*out):
                torch.testing.assert_close(x, y)


def test_custom_norms_callable_and_registered() -> None:
    """A callable or a registered name gives the same result as the built-in with the same formula."""
    register_norm("test_mean_abs", lambda g: g.abs().mean())
    try:
        for granularity in GRANULARITIES:
            results = []
            for norm in ("avg_l1", "test_mean_abs", lambda g: g.abs().mean()):
                model = make_model()
                opt = NormalizedOptimizer(
                    torch.optim.SGD(model.parameters(), lr=0.1), norm, granularity, model=model
                )
                backward(model, 2)
                opt.step()
                results.append([p.grad.clone() for p in model.parameters()])
            for other in results[1:]:
                for x, y in zip(results[0], other):
                    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    finally:
        unregister_norm("test_mean_abs")


def test_is_an_optimizer_sharing_the_inner_state() -> None:
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = NormalizedOptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state and opt.defaults is inner.defaults
    backward(model, 0)
    opt.step()
    assert len(inner.state) == 6  # momentum buffers created by the inner step
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [extra], "lr": 1.0})
    assert inner.param_groups[-1]["params"][0] is extra
    extra.grad = torch.full((3,), 10.0)
    opt.step()
    assert math.isclose(float(extra.grad.norm()), 1.0, rel_tol=1e-6)
    hooks = []
    opt.register_step_pre_hook(lambda o, a, k: hooks.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: hooks.append("post"))
    opt.step()
    assert hooks == ["pre", "post"]
    assert "NormalizedOptimizer" in repr(opt) and "SGD" in repr(opt)


def test_closure_is_evaluated_first() -> None:
    model = make_model()
    opt = NormalizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        return backward(model, 0, scale=100.0)

    loss = opt.step(closure)
    assert calls == [1] and loss is not None and loss.requires_grad
    for p, p0 in zip(model.parameters(), before):  # the step used the normalized closure gradients
        if p is not model[0].bias:  # (its gradient is ~0: BatchNorm follows)
            assert math.isclose(float(p.grad.norm()), 1.0, rel_tol=1e-5)
        torch.testing.assert_close(p.detach(), p0 - 0.1 * p.grad)


def test_params_without_gradients_are_skipped() -> None:
    model = make_model()
    opt = NormalizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), granularity="global")
    model[3].weight.requires_grad_(False)
    backward(model, 0)
    opt.step()
    assert model[3].weight.grad is None
    total = math.sqrt(
        sum(float(p.grad.double().norm()) ** 2 for p in model.parameters() if p.grad is not None)
    )
    assert math.isclose(total, 1.0, rel_tol=1e-5)


def test_lr_scheduler_drives_the_inner_lr() -> None:
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = NormalizedOptimizer(inner)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            opt.zero_grad()
            backward(model, step)
            opt.step()
            sched.step()
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert math.isclose(inner.param_groups[0]["lr"], 0.1 * 0.5**3)
    assert sched.get_last_lr() == [inner.param_groups[0]["lr"]]
    # the step really uses that lr: p_new = p - lr * (momentum update of the normalized gradient)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
    plateau.step(1.0)
    plateau.step(2.0)
    assert math.isclose(inner.param_groups[0]["lr"], 0.1 * 0.5**3 * 0.1)


def test_state_dict_round_trip() -> None:
    a = make_model()
    opt_a = ClippedOptimizer(
        torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9),
        "avg_l2",
        clipnorm=0.02,
        granularity="layer",
        model=a,
        exclude=[a[3].bias],
    )
    for step in range(2):
        opt_a.zero_grad()
        backward(a, step)
        opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    b = copy.deepcopy(a)
    opt_b = ClippedOptimizer(torch.optim.SGD(b.parameters(), lr=1.0), "l1", clipnorm=5.0, model=b)
    opt_b.load_state_dict(sd)
    assert (opt_b.norm.name, opt_b.granularity, opt_b.clipnorm) == ("avg_l2", "layer", 0.02)
    assert opt_b._excluded == {id(b[3].bias)}
    assert opt_b.param_groups[0]["lr"] == 0.05 and opt_b.param_groups is opt_b.inner.param_groups
    for step in range(2, 4):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            backward(m, step)
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    # a plain optimizer of the inner type loads it (the wrapper's key is ignored)
    torch.optim.SGD(make_model().parameters(), lr=1.0).load_state_dict(opt_a.state_dict())
    with pytest.raises(ValueError, match="ClippedOptimizer, not a NormalizedOptimizer"):
        NormalizedOptimizer(torch.optim.SGD(b.parameters(), lr=1.0)).load_state_dict(sd)


def test_state_dict_refuses_an_unregistered_custom_norm() -> None:
    register_norm("test_custom", lambda g: g.abs().amax())
    model = make_model()
    opt = NormalizedOptimizer(torch.optim.Adam(model.parameters()), "test_custom")
    backward(model, 0)
    opt.step()
    sd = opt.state_dict()
    assert sd["normkit_wrapper"]["normalization"] == "test_custom"
    unregister_norm("test_custom")
    fresh = NormalizedOptimizer(torch.optim.Adam(model.parameters()), "l1")
    with pytest.raises(ValueError, match=r"custom normalization 'test_custom'.*register_norm"):
        fresh.load_state_dict(sd)
    assert fresh.norm.name == "l1" and len(fresh.state) == 0  # nothing half-loaded
    register_norm("test_custom", lambda g: g.abs().amax())
    try:
        fresh.load_state_dict(sd)
        assert fresh.norm.name == "test_custom" and len(fresh.state) == 6
    finally:
        unregister_norm("test_custom")
    # an anonymous callable cannot be named: the loader must supply a callable itself
    anon = NormalizedOptimizer(torch.optim.Adam(model.parameters()), lambda g: g.abs().sum())
    sd = anon.state_dict()
    assert sd["normkit_wrapper"]["normalization"] is None
    with pytest.raises(ValueError, match="unregistered custom normalization function"):
        NormalizedOptimizer(torch.optim.Adam(model.parameters())).load_state_dict(sd)
    NormalizedOptimizer(torch.optim.Adam(model.parameters()), lambda g: g.abs().sum()).load_state_dict(sd)


@pytest.mark.parametrize("unscale_first", [True, False])
def test_grad_scaler(unscale_first: bool) -> None:
    """GradScaler on CPU: clipping (not scale invariant) sees the unscaled gradients; inf skips the step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    a, b = make_model(), make_model()
    opt_a = ClippedOptimizer(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), clipnorm=0.05)
    opt_b = ClippedOptimizer(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), clipnorm=0.05)
    for step in range(3):
        opt_a.zero_grad()
        opt_b.zero_grad()
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
        scaler.scale((a(x) - y).pow(2).mean()).backward()
        if unscale_first:
            scaler.unscale_(opt_a)
        scaler.step(opt_a)
        scaler.update()
        (b(x) - y).pow(2).mean().backward()
        opt_b.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
    opt_a.zero_grad()
    scaler.scale(a(torch.randn(4, 5)).sum()).backward()
    a[0].weight.grad[0, 0] = math.inf
    before = [p.detach().clone() for p in a.parameters()]
    scaler.step(opt_a)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert scaler.get_scale() == 2.0**9


def test_absolute_clipping_against_formula_and_clip_grad_norm() -> None:
    for granularity in GRANULARITIES:
        model = make_model()
        eps = 1e-7
        backward(model, 3)
        _, norms = reference_transform(raw_grads(model), granularity, "l2", lambda n: 1.0)
        c = sorted(norms)[len(norms) // 2] * (1.1 if granularity == "global" else 1.0)  # some blocks clipped
        want, _ = reference_transform(
            raw_grads(model), granularity, "l2", lambda n, c=c, eps=eps: min(1.0, c / (n + eps))
        )
        opt = ClippedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0), "l2", c, eps, granularity=granularity, model=model
        )
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n].float(), rtol=1e-5, atol=1e-8)
    # global l2 clipping is torch.nn.utils.clip_grad_norm_ (which adds 1e-6 to the norm)
    a, b = make_model(), make_model()
    opt = ClippedOptimizer(
        torch.optim.SGD(a.parameters(), lr=0.0), clipnorm=0.1, eps=1e-6, granularity="global"
    )
    backward(a, 4)
    backward(b, 4)
    opt.step()
    torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_relative_clipping_against_its_formula() -> None:
    """AGC: each unit's gradient is clipped to clip_factor · max(‖W_unit‖, weight_eps); not the classifier."""
    model = make_model()
    with torch.no_grad():
        model[0].weight[0].mul_(1e-6)  # a tiny unit: the floor weight_eps applies
        model[0].weight[1].mul_(50.0)  # a large unit: left unclipped
    lam, weps, eps = 0.05, 1e-3, 1e-7
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        relative=True,
        clip_factor=lam,
        weight_eps=weps,
        eps=eps,
        exclude=[model[3]],
    )
    assert opt.granularity == "unit"
    backward(model, 5)
    raw = raw_grads(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    want, _ = reference_transform(
        raw, "unit", "l2", lambda n, w: min(1.0, lam * max(w, weps) / (n + eps)), weights=weights
    )
    opt.step()
    clipped = 0
    for n, p in model.named_parameters():
        if n.startswith("3."):
            assert torch.equal(p.grad, raw[n])  # excluded
            continue
        torch.testing.assert_close(p.grad, want[n].float(), rtol=1e-5, atol=1e-9)
        clipped += int(not torch.allclose(p.grad, raw[n]))
    assert 0 < clipped
    assert torch.equal(model[0].weight.grad[1], raw["0.weight"][1])  # large unit untouched
    assert math.isclose(float(model[0].weight.grad[0].norm()), lam * weps, rel_tol=1e-3)


def test_low_precision_and_complex_parameters() -> None:
    p = nn.Parameter(torch.randn(8, 4).to(torch.bfloat16))
    q = nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    opt = NormalizedOptimizer(torch.optim.SGD([p, q], lr=0.1), return_norms=True)
    p.grad = (torch.randn(8, 4) * 1e4).to(torch.bfloat16)
    q.grad = torch.randn(3, 2, dtype=torch.complex64) * 7
    want = q.grad.clone() / float(reference(q.grad, "l2"))
    opt.step()
    assert opt.last_norms[p].dtype == torch.float32
    assert math.isclose(float(p.grad.float().norm()), 1.0, rel_tol=1e-2)
    torch.testing.assert_close(q.grad, want)


@pytest.mark.parametrize("name", ["l2", "avg_l1_l2", "max", "std"])
def test_unit_blocks_of_convs_vectors_scalars_and_channels_last(name: str) -> None:
    """Granularity "unit": each conv filter, each vector, each scalar is a block — also for channels_last
    gradients and for same-shape tensors reduced together — against the float64 formula."""
    torch.manual_seed(0)
    shapes = [(6, 3, 3, 3), (6, 3, 3, 3), (5, 6, 1, 1), (2, 40, 3, 3), (7,), (7,), (), ()]
    params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape) * 3.0
    params[0].grad = params[0].grad.to(memory_format=torch.channels_last)
    params[3].grad = params[3].grad.to(memory_format=torch.channels_last)
    raw = [p.grad.double().clone() for p in params]
    opt = NormalizedOptimizer(torch.optim.SGD(params, lr=0.0), name, "unit", return_norms=True)
    opt.step()
    for p, g in zip(params, raw):
        units = g.reshape(g.shape[0], -1) if g.dim() >= 2 else g.reshape(1, -1)
        norms = [reference(u, name) for u in units]
        want = torch.stack([u / (n + 1e-7) for u, n in zip(units, norms)]).reshape(g.shape)
        torch.testing.assert_close(p.grad.double(), want, rtol=2e-5, atol=1e-7)
        logged = opt.last_norms[p].double()
        torch.testing.assert_close(logged, torch.tensor(norms, dtype=torch.float64), rtol=2e-6, atol=0)


def test_errors() -> None:
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown normalization 'l3'"):
        NormalizedOptimizer(sgd, "l3")
    with pytest.raises(TypeError, match=r"wraps a torch\.optim\.Optimizer instance"):
        NormalizedOptimizer(model.parameters())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="instantiate it"):
        NormalizedOptimizer(torch.optim.SGD)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LBFGS"):
        NormalizedOptimizer(torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match="granularity"):
        NormalizedOptimizer(sgd, granularity="row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs the model"):
        NormalizedOptimizer(sgd, granularity="layer")
    with pytest.raises(ValueError, match="clipnorm"):
        ClippedOptimizer(sgd)
    with pytest.raises(ValueError, match="not both"):
        ClippedOptimizer(sgd, clipnorm=1.0, relative=True)
    emb = nn.Embedding(10, 3, sparse=True)
    opt = NormalizedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_plan_follows_dtype_changes() -> None:
    model = make_model()
    opt = NormalizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), granularity="layer", model=model)
    backward(model, 0)
    opt.step()
    model.double()
    opt.zero_grad()
    g = torch.Generator().manual_seed(0)
    model(torch.randn(16, 5, generator=g, dtype=torch.float64)).sum().backward()
    opt.step()
    assert all(p.grad.dtype == torch.float64 for p in model.parameters())
    assert opt._plan is not None and opt._plan.checks[0][2] == torch.float64


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(BUILTINS),
    granularity=st.sampled_from(["tensor", "unit", "global"]),
    log_scale=st.floats(-6, 6),
    seed=st.integers(0, 10_000),
)
def test_scale_invariance_and_clip_bound(name: str, granularity: str, log_scale: float, seed: int) -> None:
    """Every built-in norm is positively homogeneous: with eps ≈ 0 (1e-300), normalizing c·g gives what
    normalizing g gives; clipping never leaves a block above the threshold."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 3, 2), (1,)]
    base = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    out = []
    for c in (1.0, 10.0**log_scale):
        ps = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
        for p, b in zip(ps, base):
            p.grad = b * c
        NormalizedOptimizer(torch.optim.SGD(ps, lr=0.0), name, granularity, eps=1e-300).step()  # type: ignore[arg-type]
        out.append([p.grad for p in ps])
    for x, y in zip(*out):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    ps = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    for p, b in zip(ps, base):
        p.grad = b * 10.0**log_scale
    clip = ClippedOptimizer(
        torch.optim.SGD(ps, lr=0.0), name, 0.5, granularity=granularity, return_norms=True
    )  # type: ignore[arg-type]
    clip.step()
    if granularity == "global":
        assert reference(torch.cat([p.grad.reshape(-1) for p in ps]), name) <= 0.5 * (1 + 1e-9)
    for p in ps:
        for block in p.grad.reshape(p.shape[0], -1) if granularity == "unit" and p.ndim >= 2 else [p.grad]:
            if granularity != "global":
                assert reference(block, name) <= 0.5 * (1 + 1e-9)


# --- issue 12: non-finite gradients, constant blocks under std, eps, nested wrappers ----------------------

WRAPPERS = [
    lambda opt, **kw: NormalizedOptimizer(opt, "l2", "tensor", **kw),
    lambda opt, **kw: NormalizedOptimizer(opt, "l2", "global", **kw),
    lambda opt, **kw: ClippedOptimizer(opt, "l2", 0.5, **kw),
    lambda opt, **kw: ClippedOptimizer(opt, relative=True, **kw),
]


def _nan_setup(wrap, nonfinite):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = wrap(torch.optim.Adam(model.parameters(), lr=0.1), nonfinite=nonfinite)
    model(torch.randn(4, 6)).square().sum().backward()
    opt.step()  # one clean step, so there is inner state to keep
    model(torch.randn(4, 6)).square().sum().backward()
    with torch.no_grad():
        model[0].weight.grad[1, 2] = float("nan")
        model[2].bias.grad[0] = float("inf")
    return model, opt


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_nonfinite_skip_leaves_everything_untouched_and_counts(wrap) -> None:
    model, opt = _nan_setup(wrap, "skip")
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.step()
    assert opt.skipped_steps == 1
    for p, before, g in zip(model.parameters(), params, grads):
        assert torch.equal(p.detach(), before)
        torch.testing.assert_close(p.grad, g, equal_nan=True, rtol=0, atol=0)  # not transformed either
    after = opt.state_dict()
    for k, st_ in state["state"].items():
        for key, v in st_.items():
            assert torch.equal(after["state"][k][key], v)
    assert after["normkit_wrapper"]["skipped_steps"] == 1
    # a finite step afterwards is taken and the count survives a round trip
    opt.zero_grad()
    model(torch.randn(4, 6)).square().sum().backward()
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), params))
    twin = wrap(torch.optim.Adam(model.parameters(), lr=0.1))
    twin.load_state_dict(opt.state_dict())
    assert twin.skipped_steps == 1 and twin.nonfinite == "skip"


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_nonfinite_raise_changes_nothing(wrap) -> None:
    from normkit.optim import NonFiniteGradientError

    model, opt = _nan_setup(wrap, "raise")
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(NonFiniteGradientError, match=r"2 of 4 parameter tensors.*\(5, 6\).*\(3,\)"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), params))
    assert torch.isnan(model[0].weight.grad).sum() == 1  # the gradient was not transformed
    after = opt.state_dict()
    assert all(torch.equal(after["state"][k]["exp_avg"], v["exp_avg"]) for k, v in state["state"].items())


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_nonfinite_propagate_is_the_default(wrap) -> None:
    model, opt = _nan_setup(wrap, "propagate")
    assert wrap(torch.optim.SGD(model.parameters(), lr=0.1)).nonfinite == "propagate"
    opt.step()
    assert opt.skipped_steps == 0
    assert torch.isnan(model[0].weight).any()  # today's behaviour: the NaN reaches the weights


def test_nonfinite_and_eps_are_validated() -> None:
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        NormalizedOptimizer(torch.optim.SGD([p], lr=0.1), nonfinite="ignore")
    for eps in (0.0, -1e-8, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            NormalizedOptimizer(torch.optim.SGD([p], lr=0.1), eps=eps)
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            ClippedOptimizer(torch.optim.SGD([p], lr=0.1), clipnorm=1.0, eps=eps)


@pytest.mark.parametrize("granularity", ["tensor", "layer", "unit", "global"])
def test_std_on_blocks_without_spread_gives_unit_size_steps(granularity: str) -> None:
    """One-element and constant blocks under std: normalized by their size |mean| (not by eps alone), so
    each entry of the normalized gradient has magnitude 1 (before: the one-element bias moved by |g|/eps)."""
    model = nn.Sequential(nn.Linear(4, 1), nn.Linear(1, 3))
    params = list(model.parameters())
    # every block is constant under "tensor", "unit" and "layer" (the layers' weight and bias agree)
    values = [
        torch.full((1, 4), 2e-3),
        torch.tensor([2e-3]),
        torch.full((3, 1), -5.0),
        torch.full((3,), -5.0),
    ]
    for p, v in zip(params, values):
        p.grad = v.clone()
    opt = NormalizedOptimizer(torch.optim.SGD(params, lr=1.0), "std", granularity, 1e-12, model=model)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b, v in zip(params, before, values):
        moved = (p.detach() - b).abs()
        if granularity == "global":
            assert moved.max() <= 1e3  # one global block of several values has a spread: a plain std step
        else:
            torch.testing.assert_close(moved, torch.ones_like(v), rtol=1e-5, atol=0)


def test_nested_wrappers_keep_both_settings() -> None:
    p = nn.Parameter(torch.randn(4, 3))
    inner = ClippedOptimizer(torch.optim.SGD([p], lr=0.1), "max", 0.25, eps=1e-5, nonfinite="skip")
    outer = NormalizedOptimizer(inner, "l1", "unit", eps=1e-6)
    sd = copy.deepcopy(outer.state_dict())
    assert sd["normkit_wrapper"]["wrapper"] == "NormalizedOptimizer"
    assert sd["normkit_wrapper"]["inner"]["wrapper"] == "ClippedOptimizer"
    q = nn.Parameter(p.detach().clone())
    inner2 = ClippedOptimizer(torch.optim.SGD([q], lr=0.1), "l2", 1.0)
    outer2 = NormalizedOptimizer(inner2, "l2")
    outer2.load_state_dict(sd)
    assert (outer2.norm.name, outer2.granularity, outer2.eps) == ("l1", "unit", 1e-6)
    assert (inner2.norm.name, inner2.clipnorm, inner2.eps, inner2.nonfinite) == ("max", 0.25, 1e-5, "skip")
    # both runs now step identically
    for o, w in ((outer, p), (outer2, q)):
        w.grad = torch.arange(12.0).reshape(4, 3)
        o.step()
    assert torch.equal(p, q)


def test_failed_nested_load_changes_nothing() -> None:
    p = nn.Parameter(torch.randn(4, 3))
    sd = NormalizedOptimizer(ClippedOptimizer(torch.optim.SGD([p], lr=0.1), "l2", 0.25), "l1").state_dict()
    sd["normkit_wrapper"]["inner"]["granularity"] = "layer"  # the inner one has no model: refused
    q = nn.Parameter(p.detach().clone())
    inner = ClippedOptimizer(torch.optim.SGD([q], lr=0.1), "max", 2.0)
    outer = NormalizedOptimizer(inner, "l2", eps=1e-3)
    with pytest.raises(ValueError, match="granularity"):
        outer.load_state_dict(sd)
    assert (outer.norm.name, outer.eps, inner.norm.name, inner.clipnorm) == ("l2", 1e-3, "max", 2.0)
    # an outer state_dict that names a nested wrapper cannot load into a plain one
    with pytest.raises(ValueError, match="wraps a SGD"):
        NormalizedOptimizer(torch.optim.SGD([q], lr=0.1), "l1").load_state_dict(
            NormalizedOptimizer(ClippedOptimizer(torch.optim.SGD([p], lr=0.1), "l2", 1.0), "l1").state_dict()
        )
