"""SGD-G / Adam-G against float64 transcriptions of the paper's algorithms, invariants, state, selection and a
small real training run."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.optim import SGDG, AdamG, grassmann_param_groups, orthogonality_penalty

# --- the paper's algorithms, written out row by row in float64 (numpy) -----------------------------------


def _rows(t):
    return t.detach().reshape(t.shape[0], -1).numpy().astype(np.float64).copy()


def _exp(y, d):
    t = np.linalg.norm(d)
    return y if t == 0 else y * math.cos(t) + d / t * math.sin(t)


def _transport(y, h1, h2):
    t = np.linalg.norm(h2)
    if t == 0:
        return h1
    u = h2 / t
    return h1 - (u @ h1) * (math.sin(t) * y + (1 - math.cos(t)) * u)


def _tangent_grads(w, g, omega, clip):
    """Unit rows y, clipped tangent gradients ĥ (gradient w.r.t. y = ‖w‖·∂f/∂w, plus 2ω(YYᵀY − Y))."""
    r = np.linalg.norm(w, axis=1, keepdims=True)
    y = w / r
    gy = g * r
    if omega:
        gy = gy + 2 * omega * (y @ y.T @ y - y)
    hs = []
    for yi, gi in zip(y, gy):
        h = gi - (yi @ gi) * yi
        if clip is not None:
            h = h * min(1.0, clip / np.linalg.norm(h))
        hs.append(h)
    return y, np.array(hs)


class RefSGDG:
    def __init__(self, lr, momentum, clip, omega):
        self.lr, self.mom, self.clip, self.omega, self.tau = lr, momentum, clip, omega, {}

    def step(self, i, w, g):
        y, hs = _tangent_grads(w, g, self.omega, self.clip)
        tau = self.tau.get(i, np.zeros_like(w))
        new_w, new_tau = [], []
        for yi, hi, ti in zip(y, hs, tau):
            d = self.mom * ti - self.lr * hi
            new_w.append(_exp(yi, d))
            new_tau.append(_transport(yi, d, d))
        self.tau[i] = np.array(new_tau)
        return np.array(new_w)


class RefAdamG:
    def __init__(self, lr, betas, eps, clip, omega):
        self.lr, (self.b1, self.b2), self.eps, self.clip, self.omega = lr, betas, eps, clip, omega
        self.m, self.v, self.t = {}, {}, {}

    def step(self, i, w, g):
        y, hs = _tangent_grads(w, g, self.omega, self.clip)
        m = self.b1 * self.m.get(i, np.zeros_like(w)) + (1 - self.b1) * hs
        v = self.b2 * self.v.get(i, np.zeros(w.shape[0])) + (1 - self.b2) * (hs * hs).sum(1)
        t = self.t[i] = self.t.get(i, 0) + 1
        alpha = math.sqrt(1 - self.b2**t) / (1 - self.b1**t)
        new_w, new_m = [], []
        for yi, mi, vi in zip(y, m, v):
            delta = -self.lr * alpha * mi / math.sqrt(vi + self.eps)
            new_w.append(_exp(yi, delta))
            new_m.append(_transport(yi, mi, delta))
        self.m[i], self.v[i] = np.array(new_m), v
        return np.array(new_w)


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 3, 3, 3), (5, 27), (4, 10), (3, 2, 2, 2)]
    ps = [torch.randn(s, generator=gen, dtype=dtype) * 1.7 for s in shapes]  # rows deliberately not unit
    ps[3] = ps[3].to(memory_format=torch.channels_last)
    return [nn.Parameter(p) for p in ps]


def grads_for(ps, step, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for p in ps:
        g = torch.randn(p.shape, generator=gen, dtype=dtype)
        # row norms spread over 3 decades: with ν = 0.1 some rows are clipped and some are not
        g *= torch.logspace(-3, 0, p.shape[0], dtype=dtype).view(-1, *([1] * (p.dim() - 1)))
        out.append(g)
    return out


CASES = [(clip, omega) for clip in (None, 0.1) for omega in (0.0, 0.1)]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("clip,omega", CASES)
@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_matches_float64_reference(method, clip, omega, foreach):
    ps = make_params()
    if method == "sgdg":
        opt = SGDG(ps, lr=0.2, momentum=0.9, grad_clip=clip, omega=omega, grassmann=True, foreach=foreach)
        ref = RefSGDG(0.2, 0.9, clip, omega)
    else:
        opt = AdamG(ps, lr=0.05, betas=(0.9, 0.99), eps=1e-8, grad_clip=clip, omega=omega, grassmann=True)
        opt.param_groups[0]["foreach"] = foreach
        ref = RefAdamG(0.05, (0.9, 0.99), 1e-8, clip, omega)
    ws = [_rows(p) for p in ps]
    clipped = 0
    for k in range(5):
        gs = grads_for(ps, k)
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        for i, (p, g) in enumerate(zip(ps, gs)):
            ws[i] = ref.step(i, ws[i], _rows(g))
            np.testing.assert_allclose(_rows(p), ws[i], rtol=0, atol=1e-10)
        if clip is not None:
            clipped += sum(int((np.linalg.norm(_rows(g), axis=1) > 0.1).sum()) for g in gs)
    if clip is not None:
        assert clipped > 0  # clipping really happened (and, by the logspace, not on every row)
    if method == "sgdg":  # the momentum buffers too
        for i, p in enumerate(ps):
            np.testing.assert_allclose(_rows(opt.state[p]["momentum_buffer"]), ref.tau[i], rtol=0, atol=1e-10)
    else:
        for i, p in enumerate(ps):
            np.testing.assert_allclose(_rows(opt.state[p]["exp_avg"]), ref.m[i], rtol=0, atol=1e-10)
            np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].numpy(), ref.v[i], rtol=1e-10, atol=0)


@pytest.mark.parametrize("Opt", [SGDG, AdamG])
def test_single_tensor_equals_multi_tensor(Opt):
    a, b = make_params(torch.float32), make_params(torch.float32)
    a[0].grad = None  # a parameter without gradient is skipped by both paths
    oa = Opt(a, lr=0.1, grad_clip=0.1, omega=0.1, grassmann=True, foreach=False)
    ob = Opt(b, lr=0.1, grad_clip=0.1, omega=0.1, grassmann=True, foreach=True)
    for k in range(4):
        gs = grads_for(a, k, torch.float32)
        for i, (pa, pb, g) in enumerate(zip(a, b, gs)):
            pa.grad = None if i == 1 and k == 2 else g.clone()
            pb.grad = None if i == 1 and k == 2 else g.clone()
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=2e-6)
        assert pa.stride() == pb.stride()
        for key, va in oa.state[pa].items():
            torch.testing.assert_close(va, ob.state[pb][key], rtol=0, atol=2e-6)


def test_channels_last_equals_contiguous():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=gen)
    a = nn.Parameter(w.clone())
    b = nn.Parameter(w.clone().to(memory_format=torch.channels_last))
    opts = [SGDG([p], lr=0.2, grad_clip=0.1, grassmann=True) for p in (a, b)]
    for _ in range(3):
        g = torch.randn(w.shape, generator=gen)
        a.grad, b.grad = g.clone(), g.clone().to(memory_format=torch.channels_last)
        for o in opts:
            o.step()
    assert b.is_contiguous(memory_format=torch.channels_last)  # updated in place, layout kept
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --- invariants (hypothesis) -----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 6),
    n=st.integers(2, 12),
    lr=st.floats(1e-4, 1.0),
    momentum=st.floats(0.0, 0.95),
    clip=st.one_of(st.none(), st.floats(1e-3, 1.0)),
)
def test_sgdg_invariants(seed, rows, n, lr, momentum, clip):
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(rows, n, generator=gen, dtype=torch.float64))
    opt = SGDG([p], lr=lr, momentum=momentum, grad_clip=clip, grassmann=True)
    for _ in range(3):
        y_old = p.detach() / p.detach().norm(dim=1, keepdim=True)
        p.grad = torch.randn(rows, n, generator=gen, dtype=torch.float64)
        opt.step()
        y, tau = p.detach(), opt.state[p]["momentum_buffer"]
        assert torch.allclose(y.norm(dim=1), torch.ones(rows, dtype=torch.float64), atol=1e-12)
        # τ is tangent at the new point, and the step moved each row by the angle θ = ‖τ‖ (= ‖d‖)
        assert (torch.linalg.vecdot(y, tau).abs() <= 1e-12 * (1 + tau.norm(dim=1))).all()
        theta = tau.norm(dim=1)
        cos = torch.linalg.vecdot(y, y_old)
        sin = (y - cos[:, None] * y_old).norm(dim=1)
        angle = torch.atan2(sin, cos)
        small = theta < math.pi
        torch.testing.assert_close(angle[small], theta[small], rtol=0, atol=1e-10)
        if clip is not None and momentum == 0:
            assert (theta <= lr * clip * (1 + 1e-12)).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), n=st.integers(2, 12), lr=st.floats(1e-4, 0.5))
def test_adamg_invariants(seed, rows, n, lr):
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(rows, n, generator=gen, dtype=torch.float64))
    opt = AdamG([p], lr=lr, grad_clip=0.1, grassmann=True)
    for _ in range(3):
        p.grad = torch.randn(rows, n, generator=gen, dtype=torch.float64)
        opt.step()
        y, m = p.detach(), opt.state[p]["exp_avg"]
        assert torch.allclose(y.norm(dim=1), torch.ones(rows, dtype=torch.float64), atol=1e-12)
        assert (torch.linalg.vecdot(y, m).abs() <= 1e-12 * (1 + m.norm(dim=1))).all()
        assert opt.state[p]["exp_avg_sq"].shape == (rows,)


def test_unit_norm_drift_over_10000_float32_steps():
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(4, 9, generator=gen))
    opt = SGDG([p], lr=0.2, momentum=0.9, grad_clip=0.1, grassmann=True)
    grads = torch.randn(64, 4, 9, generator=gen)
    for k in range(10_000):
        p.grad = grads[k % 64]
        opt.step()
    drift = (p.detach().norm(dim=1) - 1).abs().max().item()
    assert drift <= 1e-6
    tau = opt.state[p]["momentum_buffer"]
    assert (torch.linalg.vecdot(p.detach(), tau).abs() <= 1e-5 * tau.norm(dim=1)).all()


def test_zero_gradient_and_zero_row_give_no_nan():
    p = nn.Parameter(torch.randn(3, 5))
    with torch.no_grad():
        p[1] = 0.0
    for Opt in (SGDG, AdamG):
        q = nn.Parameter(p.detach().clone())
        opt = Opt([q], lr=0.1, grad_clip=0.1, omega=0.1, grassmann=True)
        q.grad = torch.zeros_like(q)
        opt.step()
        q.grad = torch.randn_like(q)
        opt.step()
        assert torch.isfinite(q).all()
        assert torch.equal(q[1], torch.zeros(5))


# --- orthogonality regularizer ---------------------------------------------------------------------------


def test_omega_term_is_the_gradient_of_the_penalty():
    """SGD-G with ω equals SGD-G without ω fed ∂f/∂w + ∂/∂Y (ω/2)‖YYᵀ − I‖² taken by autograd."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True)
    g = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    a, b = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    y = w.clone().requires_grad_()
    penalty = 0.5 * 0.3 * ((y @ y.T - torch.eye(5, dtype=torch.float64)) ** 2).sum()
    (pen_grad,) = torch.autograd.grad(penalty, y)
    a.grad, b.grad = g.clone(), g + pen_grad
    SGDG([a], lr=0.2, omega=0.3, grassmann=True).step()
    SGDG([b], lr=0.2, grassmann=True).step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert torch.equal(a.grad, g)  # p.grad is not written to
    torch.testing.assert_close(orthogonality_penalty([nn.Parameter(w * 3.0)], omega=0.3), penalty.detach())


def test_orthogonality_penalty_from_optimizer_and_model():
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    groups = grassmann_param_groups(model, lr=0.1, lr_g=0.2, omega=0.1)
    opt = SGDG(groups, lr=0.1)
    y = model[0].weight.detach()
    expected = 0.05 * ((y @ y.T - torch.eye(4)) ** 2).sum()
    torch.testing.assert_close(orthogonality_penalty(opt), expected)
    torch.testing.assert_close(orthogonality_penalty(model, omega=0.1), expected)
    with pytest.raises(ValueError, match="omega"):
        orthogonality_penalty(model)


# --- state, schedulers, scaler, compile, precision ---------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _loss(model, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 5, 5, generator=gen)
    return F.cross_entropy(model(x), torch.arange(6) % 4)


@pytest.mark.parametrize("Opt,lr_g", [(SGDG, 0.2), (AdamG, 0.05)])
def test_state_dict_round_trip_gives_identical_next_steps(Opt, lr_g):
    model = _model()
    opt = Opt(grassmann_param_groups(model, 0.1, lr_g, grad_clip=0.1, omega=0.1), lr=0.1, nesterov=True)
    for k in range(3):
        opt.zero_grad()
        _loss(model, k).backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    opt2 = Opt(grassmann_param_groups(twin, 0.1, lr_g, unit_init=False), lr=0.1, nesterov=True)
    opt2.load_state_dict(saved)
    for k in range(3, 6):
        for m, o in ((model, opt), (twin, opt2)):
            o.zero_grad()
            _loss(m, k).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_bf16_weights_keep_fp32_rows_in_state():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 16).bfloat16())
    opt = SGDG([p], lr=1e-3, grassmann=True)
    ref = nn.Parameter(p.detach().float())
    opt_ref = SGDG([ref], lr=1e-3, grassmann=True)
    for k in range(20):
        g = torch.randn(4, 16, generator=torch.Generator().manual_seed(k))
        p.grad, ref.grad = g.bfloat16(), g.bfloat16().float()
        opt.step()
        opt_ref.step()
    st_ = opt.state[p]
    assert st_["master"].dtype == torch.float32 and st_["momentum_buffer"].dtype == torch.float32
    torch.testing.assert_close(st_["master"], ref.detach(), rtol=0, atol=1e-6)  # small steps accumulate
    assert torch.equal(p.detach(), st_["master"].bfloat16())
    # load_state_dict keeps the fp32 state (torch would cast it to bf16)
    opt2 = SGDG([nn.Parameter(p.detach().clone())], lr=1e-3, grassmann=True)
    opt2.load_state_dict(opt.state_dict())
    st2 = next(iter(opt2.state.values()))
    assert st2["master"].dtype == torch.float32 and torch.equal(st2["master"], st_["master"])


def test_multistep_lr_drives_both_kinds_of_group():
    model = _model()
    opt = SGDG(grassmann_param_groups(model, 0.1, 0.2), lr=0.1, momentum=0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.2)
    for k in range(3):
        opt.zero_grad()
        _loss(model, k).backward()
        if k == 2:  # after the milestone the Grassmann step is lr_g·0.2·‖h‖ (momentum 0, no clip)
            w = model[0].weight.detach().reshape(8, -1).clone()
            g = model[0].weight.grad.reshape(8, -1)
            h = g - (w * g).sum(1, keepdim=True) * w
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2 * 0.2, 0.1 * 0.2, 0.1 * 0.2])
    w, w_new = w.double(), model[0].weight.detach().reshape(8, -1).double()
    cos = (w * w_new).sum(1)
    angle = torch.atan2((w_new - cos[:, None] * w).norm(dim=1), cos)
    torch.testing.assert_close(angle, 0.2 * 0.2 * h.double().norm(dim=1), rtol=2e-3, atol=0)


def test_grad_scaler_unscales_before_clipping():
    a, b = _model(), _model()
    oa = SGDG(grassmann_param_groups(a, 0.1, 0.2, grad_clip=0.1), lr=0.1)
    ob = SGDG(grassmann_param_groups(b, 0.1, 0.2, grad_clip=0.1), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for k in range(2):
        oa.zero_grad()
        ob.zero_grad()
        scaler.scale(_loss(a, k)).backward()
        scaler.step(oa)
        scaler.update()
        _loss(b, k).backward()
        ob.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("Opt", [SGDG, AdamG])
def test_step_works_under_torch_compile(Opt):
    a, b = make_params(torch.float32), make_params(torch.float32)
    oa = Opt(a, lr=0.1, grad_clip=0.1, omega=0.1, grassmann=True, foreach=True)
    ob = Opt(b, lr=0.1, grad_clip=0.1, omega=0.1, grassmann=True, foreach=True)
    torch._dynamo.reset()
    compiled = torch.compile(ob.step, backend="aot_eager")
    for k in range(3):
        gs = grads_for(a, k, torch.float32)
        for pa, pb, g in zip(a, b, gs):
            pa.grad, pb.grad = g.clone(), g.clone()
        oa.step()
        compiled()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("Opt", [SGDG, AdamG])
def test_step_compiles_with_inductor(Opt):
    """The default backend generates C++ for the step (about a minute on 2 loaded cores)."""
    a, b = make_params(torch.float32), make_params(torch.float32)
    oa = Opt(a, lr=0.1, grad_clip=0.1, omega=0.1, grassmann=True)
    ob = Opt(b, lr=0.1, grad_clip=0.1, omega=0.1, grassmann=True)
    torch._dynamo.reset()
    compiled = torch.compile(ob.step)
    for k in range(2):
        gs = grads_for(a, k, torch.float32)
        for pa, pb, g in zip(a, b, gs):
            pa.grad, pb.grad = g.clone(), g.clone()
        oa.step()
        compiled()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5)


def test_closure_and_zero_grad():
    model = _model()
    opt = AdamG(grassmann_param_groups(model, 0.1, 0.05), lr=0.1)

    def closure():
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.ndim == 0 and opt.state[model[0].weight]["step"].item() == 1
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_state_memory():
    model = _model()
    for Opt in (SGDG, AdamG):
        m = copy.deepcopy(model)
        opt = Opt(grassmann_param_groups(m, 0.1, 0.1), lr=0.1)
        _loss(m, 0).backward()
        opt.step()
        w = m[0].weight
        sizes = {k: v.numel() for k, v in opt.state[w].items()}
        if Opt is SGDG:
            assert sizes == {"momentum_buffer": w.numel()}  # one buffer per parameter
        else:
            assert sizes == {"step": 1, "exp_avg": w.numel(), "exp_avg_sq": w.shape[0]}  # + 1 scalar per row


# --- bad input -------------------------------------------------------------------------------------------


def test_bad_input_errors():
    w = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"weight_decay=0\.0005.*set weight_decay=0"):
        SGDG([{"params": [w], "grassmann": True, "weight_decay": 5e-4}], lr=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        AdamG([w], lr=0.1, weight_decay=1e-4, grassmann=True)
    opt = SGDG([{"params": [w], "grassmann": False}], lr=0.1, weight_decay=5e-4)  # fine for Euclidean groups
    with pytest.raises(ValueError, match="Grassmann group"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "grassmann": True})
    with pytest.raises(ValueError, match="no rows"):
        SGDG([nn.Parameter(torch.randn(4))], lr=0.1, grassmann=True)
    with pytest.raises(ValueError, match="maximize"):
        SGDG([w], lr=0.1, maximize=True)
    with pytest.raises(ValueError, match="grad_clip"):
        SGDG([w], lr=0.1, grad_clip=0.0, grassmann=True)
    with pytest.raises(ValueError, match="betas"):
        AdamG([w], lr=0.1, betas=(1.0, 0.9), grassmann=True)
    with pytest.raises(ValueError, match="select"):
        grassmann_param_groups(nn.Linear(2, 2), 0.1, 0.1, select="conv")


# --- selection: bn_input from the graph, undercomplete as in the reference code ---------------------------


def _names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in groups]


def test_bn_input_linear_bn1d():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    groups = grassmann_param_groups(model, 0.1, 0.2, weight_decay=1e-3)
    assert [g["grassmann"] for g in groups] == [True, False, False]
    assert _names(model, groups) == [
        ["0.weight"],
        ["3.weight", "5.weight"],
        ["0.bias", "1.bias", "1.weight", "3.bias", "5.bias"],
    ]
    assert [g["weight_decay"] for g in groups] == [0.0, 1e-3, 0.0]
    assert [g["lr"] for g in groups] == [0.2, 0.1, 0.1]
    torch.testing.assert_close(model[0].weight.norm(dim=1), torch.ones(8))  # unit_init


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)  # → BN directly: scale-invariant (bias or not)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)  # → ReLU → max-pool → BN: still invariant
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)  # with a bias, ReLU before BN breaks the invariance
        self.bn3 = nn.BatchNorm2d(8)
        self.conv4 = nn.Conv2d(8, 8, 1)  # feeds the classifier
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.bn2(F.max_pool2d(F.relu(self.conv2(x)), 2))
        x = self.bn3(F.relu(self.conv3(x)))
        x = F.adaptive_avg_pool2d(F.relu(self.conv4(x)), 1).flatten(1)
        return self.fc(x)


def test_bn_input_conv_bn():
    model = ConvBN()
    groups = grassmann_param_groups(model, 0.1, 0.2, unit_init=False)
    assert _names(model, groups)[0] == ["conv1.weight", "conv2.weight"]
    assert _names(model, groups)[1] == ["conv3.weight", "conv4.weight", "fc.weight"]


class WideBasic(nn.Module):
    """Pre-activation WRN block (Zagoruyko & Komodakis): BN-ReLU-conv-dropout-BN-ReLU-conv + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.dropout = nn.Dropout(0.3)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class TinyWRN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.block = WideBasic(16, 32, 2)
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.block(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_wrn_block_both_rules():
    model = TinyWRN()
    bn_input = _names(model, grassmann_param_groups(model, 0.1, 0.2, unit_init=False))[0]
    # conv1 → dropout → bn2 only; conv2 and the shortcut feed the residual sum, the stem feeds bn1 and the
    # shortcut: none of those is scale-invariant.
    assert bn_input == ["block.conv1.weight"]
    under = _names(model, grassmann_param_groups(model, 0.1, 0.2, select="undercomplete", unit_init=False))[0]
    # reference rule: convs with out < in·k·k — the 1×1 shortcut (32 ≥ 16) and the linear layer are not
    assert under == ["block.conv1.weight", "block.conv2.weight", "stem.weight"]


# --- a small BN network on real offline data --------------------------------------------------------------


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _bn_mlp():
    return nn.Sequential(
        nn.Linear(64, 64, bias=False),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 64, bias=False),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _train(method, data, epochs=12, seed=0):
    """The paper's settings scaled to the task: SGD lr 0.1 (Nesterov, wd 5e-4 on all weights); SGD-G / Adam-G
    lr_e 0.01 (Nesterov SGD, wd 5e-4 on the other weights), lr_g 0.2 / 0.05, ν = 0.1, ω = 0.1."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = _bn_mlp()
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    elif method == "sgdg":
        groups = grassmann_param_groups(model, lr=0.01, lr_g=0.2, grad_clip=0.1, omega=0.1)
        opt = SGDG(groups, lr=0.01, nesterov=True)
    else:
        groups = grassmann_param_groups(model, lr=0.01, lr_g=0.05, grad_clip=0.1, omega=0.1)
        opt = AdamG(groups, lr=0.01, nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).float().mean().item()


def test_bn_mlp_trains_on_digits_as_well_as_sgd():
    """12 epochs on 1 400 real 8×8 digits, test on the other 397; mean of 2 seeds (longer runs: the example
    examples/grassmann_digits.py)."""
    data = _digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and robust on a loaded machine
    try:
        acc = {m: sum(_train(m, data, seed=s) for s in range(2)) / 2 for m in ("sgd", "sgdg", "adamg")}
    finally:
        torch.set_num_threads(threads)
    assert acc["sgd"] > 0.95, acc
    assert acc["sgdg"] >= acc["sgd"] - 0.02, acc
    assert acc["adamg"] >= acc["sgd"] - 0.02, acc


# --- large steps: exact for every angle (issue 12, item 2) ------------------------------------------------


def test_half_turn_step_lands_exactly_opposite():
    """The issue's repro: a step of θ = π (grad_clip off) must land on −y, on the sphere."""
    p = nn.Parameter(torch.tensor([[1.0, 0.0, 0.0]]))
    opt = SGDG([{"params": [p], "grassmann": True, "lr": 0.2, "weight_decay": 0.0}], momentum=0.9)
    p.grad = torch.tensor([[0.0, -math.pi / 0.2, 0.0]])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([[-1.0, 0.0, 0.0]]), rtol=0, atol=1e-6)
    # the transported velocity: (u cos π − y sin π)·π = −π u with u = (0, 1, 0)
    tau = opt.state[p]["momentum_buffer"]
    torch.testing.assert_close(tau, torch.tensor([[0.0, -math.pi, 0.0]]), rtol=0, atol=1e-6)


STEP_ANGLES = np.concatenate(
    [[0.0, 1e-30, 1e-8, 1e-4, 0.1], np.linspace(0.5, 10 * math.pi, 60), math.pi * np.arange(1, 11)]
)


def _tangent_rows(n, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = len(STEP_ANGLES)
    y = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    y /= y.norm(dim=1, keepdim=True)
    u = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    u -= (u * y).sum(1, keepdim=True) * y
    u /= u.norm(dim=1, keepdim=True)
    return y, u


def _check_step(got_w, want_w, got_v, want_v, theta):
    # rows on the sphere to 1e-6, whatever the angle
    assert np.abs(np.linalg.norm(got_w, axis=1) - 1).max() <= 1e-6
    # end point and transported velocity vs the float64 evaluation of the paper's formulas on the same float32
    # inputs: 1e-6, plus two float32 units in the last place of θ itself (θ = ‖d‖ is formed in float32; at
    # 10π one ulp is 1.9e-6, below which no float32 step can know the angle)
    bound = 1e-6 + theta * 2.0**-22
    assert (np.linalg.norm(got_w - want_w, axis=1) / bound).max() <= 1.0
    speed = np.maximum(np.linalg.norm(want_v, axis=1), 1e-30)
    assert (np.linalg.norm(got_v - want_v, axis=1) / speed / bound).max() <= 1.0


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("n", [3, 64, 2000])
def test_sgdg_step_exact_for_angles_up_to_ten_pi(n, foreach):
    """One SGD-G step of angle θ = η‖ĥ‖ from 0 to 10π (odd multiples of π included), float32."""
    y, u = _tangent_rows(n, n)
    lr = 0.2
    p = nn.Parameter(y.float())
    p.grad = (-(torch.from_numpy(STEP_ANGLES).unsqueeze(1) / lr) * u).float()
    ref = RefSGDG(lr, 0.9, None, 0.0)
    want = ref.step(0, _rows(p), _rows(p.grad))
    opt = SGDG([p], lr=lr, momentum=0.9, grassmann=True, foreach=foreach)
    opt.step()
    _check_step(_rows(p), want, _rows(opt.state[p]["momentum_buffer"]), ref.tau[0], STEP_ANGLES)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("n", [3, 64, 2000])
def test_adamg_step_exact_for_angles_up_to_ten_pi(n, foreach):
    """Adam-G's first step has angle ≈ η (Δ = −η m̂/√v̂ with m̂/√v̂ a unit vector): one row per group, η = θ."""
    y, u = _tangent_rows(n, n + 1)
    ps = [nn.Parameter(y[i : i + 1].float()) for i in range(len(STEP_ANGLES))]
    for i, p in enumerate(ps):
        p.grad = u[i : i + 1].float()
    refs = [RefAdamG(float(t), (0.9, 0.99), 1e-8, None, 0.0) for t in STEP_ANGLES]
    want = np.concatenate([r.step(0, _rows(p), _rows(p.grad)) for r, p in zip(refs, ps)])
    groups = [{"params": [p], "lr": float(t)} for p, t in zip(ps, STEP_ANGLES)]
    opt = AdamG(groups, eps=1e-8, grassmann=True, foreach=foreach)
    opt.step()
    got_m = np.concatenate([_rows(opt.state[p]["exp_avg"]) for p in ps])
    want_m = np.concatenate([r.m[0] for r in refs])
    _check_step(np.concatenate([_rows(p) for p in ps]), want, got_m, want_m, STEP_ANGLES)


# --- resuming and validation (issue 12, items 5 and 6) ----------------------------------------------------


@pytest.mark.parametrize("Opt,lr_g", [(SGDG, 0.2), (AdamG, 0.05)])
def test_bf16_state_round_trip_resumes_bit_for_bit(Opt, lr_g):
    """bf16 weights in both kinds of group: the Euclidean momentum is bf16 (as in torch.optim.SGD), the
    manifold state fp32; a state_dict round trip keeps every dtype, and the resumed run equals the
    uninterrupted one."""
    model = _model().to(torch.bfloat16)

    def loss(m, k):
        gen = torch.Generator().manual_seed(k)
        x = torch.randn(6, 3, 5, 5, generator=gen).to(torch.bfloat16)
        return F.cross_entropy(m(x).float(), torch.arange(6) % 4)

    opt = Opt(grassmann_param_groups(model, 0.1, lr_g, grad_clip=0.1), lr=0.1, momentum=0.9)
    for k in range(2):
        opt.zero_grad()
        loss(model, k).backward()
        opt.step()
    twin = copy.deepcopy(model)
    opt2 = Opt(grassmann_param_groups(twin, 0.1, lr_g, unit_init=False), lr=0.1, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in opt.state[p].items():
            assert opt2.state[q][key].dtype == value.dtype and torch.equal(opt2.state[q][key], value), key
    assert any(v.dtype == torch.bfloat16 for st_ in opt2.state.values() for v in st_.values())
    for k in range(2, 5):
        for m, o in ((model, opt), (twin, opt2)):
            o.zero_grad()
            loss(m, k).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("Opt", [SGDG, AdamG])
def test_rejected_param_group_leaves_the_optimizer_unchanged(Opt):
    a, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))
    opt = Opt([{"params": [a], "grassmann": True}], lr=0.1)
    before = copy.deepcopy(opt.state_dict())
    for bad in (
        {"params": [b], "grassmann": True},  # a vector has no rows
        {"params": [b], "grassmann": False, "momentum": 1.5},
        {"params": (p for p in [b]), "grassmann": True, "weight_decay": 1e-4},  # a generator, consumed
    ):
        with pytest.raises(ValueError):
            opt.add_param_group(bad)
        assert len(opt.param_groups) == 1 and opt.state_dict() == before
    opt.add_param_group({"params": [b], "grassmann": False})  # the group that was rejected is now fine
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == [b]


# --- non-finite gradients (issue 12, item 3) ----------------------------------------------------------------


def _nan_model_and_opt(Opt, nonfinite, foreach=False):
    model = _model()
    opt = Opt(
        grassmann_param_groups(model, 0.1, 0.05, grad_clip=0.1),
        lr=0.1,
        nonfinite=nonfinite,
        foreach=foreach,
    )
    _loss(model, 0).backward()
    opt.step()  # a clean step first: there is state to keep
    opt.zero_grad()
    _loss(model, 1).backward()
    conv = model[0].weight  # a manifold weight
    with torch.no_grad():
        conv.grad[1, 0, 0, 0] = float("nan")
        model[-1].bias.grad[0] = float("-inf")  # a Euclidean one
    return model, opt


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snap):
    params, sd = snap
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), params))
    after = opt.state_dict()
    for k, st_ in sd["state"].items():
        for key, v in st_.items():
            assert torch.equal(after["state"][k][key], v), key


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("Opt", [SGDG, AdamG])
def test_nonfinite_skip_leaves_parameters_and_state_and_counts(Opt, foreach):
    model, opt = _nan_model_and_opt(Opt, "skip", foreach)
    snap = _snapshot(model, opt)
    opt.step()
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1 and opt.state_dict()["nonfinite"] == {"policy": "skip", "skipped_steps": 1}
    opt.zero_grad()
    _loss(model, 2).backward()
    opt.step()  # finite: taken
    assert opt.skipped_steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model[0].weight.detach(), snap[0][0])
    twin = Opt(grassmann_param_groups(copy.deepcopy(model), 0.1, 0.05, unit_init=False), lr=0.1)
    twin.load_state_dict(opt.state_dict())
    assert (twin.nonfinite, twin.skipped_steps) == ("skip", 1)


@pytest.mark.parametrize("Opt", [SGDG, AdamG])
def test_nonfinite_raise_changes_nothing(Opt):
    from normkit.optim import NonFiniteGradientError

    model, opt = _nan_model_and_opt(Opt, "raise")
    snap = _snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError, match=r"2 of \d+ parameter tensors.*nothing was changed"):
        opt.step()
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("Opt", [SGDG, AdamG])
def test_nonfinite_propagate_is_the_default_and_validated(Opt):
    model, opt = _nan_model_and_opt(Opt, "propagate")
    opt.step()
    assert torch.isnan(model[0].weight[1]).all()  # as before: the row goes NaN
    assert torch.isfinite(model[0].weight[0]).all()
    p = nn.Parameter(torch.randn(3, 4))
    assert Opt([p], lr=0.1).nonfinite == "propagate"
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        Opt([p], lr=0.1, nonfinite="zero")
