"""LARS (and LARC's clipping mode) and LAMB against float64 transcriptions of the papers' algorithms; the
1-D / normalization exclusions, zero norms, no host synchronisation, state and errors."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from normkit.optim import LAMB, LARS, trust_ratio_param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


class RefLARS:
    """You et al. 2017, Algorithm 1 per layer, with torch's rate convention (γ outside the buffer) and
    LARC's clipping mode; excluded tensors take the plain momentum step without decay."""

    def __init__(self, params, lr, momentum, wd, eta, eps, nesterov, clip, adapt):
        self.w = [p.detach().double().numpy().copy() for p in params]
        self.v = [None] * len(self.w)
        self.lr, self.mu, self.wd, self.eta, self.eps = lr, momentum, wd, eta, eps
        self.nesterov, self.clip, self.adapt = nesterov, clip, adapt

    def step(self, grads):
        for i, g in enumerate(grads):
            w = self.w[i]
            if self.adapt[i]:
                wn, gn = np.linalg.norm(w), np.linalg.norm(g)
                lam = self.eta * wn / (gn + self.wd * wn + self.eps) if wn > 0 and gn > 0 else 1.0
                if self.clip:
                    lam = min(lam / self.lr, 1.0)
                d = lam * (g + self.wd * w)
            else:
                d = g
            self.v[i] = d.copy() if self.v[i] is None else self.mu * self.v[i] + d
            step = d + self.mu * self.v[i] if self.nesterov else self.v[i]
            self.w[i] = w - self.lr * step


class RefLAMB:
    """You et al. 2020, Algorithm 2 (φ = identity); excluded tensors take the plain Adam step."""

    def __init__(self, params, lr, betas, eps, wd, adapt):
        self.w = [p.detach().double().numpy().copy() for p in params]
        self.m = [np.zeros_like(w) for w in self.w]
        self.v = [np.zeros_like(w) for w in self.w]
        self.t = 0
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.adapt = lr, betas, eps, wd, adapt

    def step(self, grads):
        self.t += 1
        for i, g in enumerate(grads):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat = self.m[i] / (1 - self.b1**self.t)
            v_hat = self.v[i] / (1 - self.b2**self.t)
            r = m_hat / (np.sqrt(v_hat) + self.eps)
            if self.adapt[i]:
                u = r + self.wd * self.w[i]
                wn, un = np.linalg.norm(self.w[i]), np.linalg.norm(u)
                ratio = wn / un if wn > 0 and un > 0 else 1.0
                self.w[i] = self.w[i] - self.lr * ratio * u
            else:
                self.w[i] = self.w[i] - self.lr * r


def _params(zero=False):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(6, 3, 3, 3), (5, 7), (8,), (4, 9)]]
    if zero:
        ps[3].zero_()  # ‖w‖ = 0: ratio 1
    return [p.requires_grad_() for p in ps]


def _run(opt, params, ref, steps=5, zero_grad_of=None):
    rng = np.random.default_rng(3)
    for _ in range(steps):
        grads = [rng.standard_normal(p.shape) for p in params]
        if zero_grad_of is not None:
            grads[zero_grad_of][:] = 0.0  # ‖g‖ = 0: ratio 1
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        ref.step(grads)
        for p, w in zip(params, ref.w):
            np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_lars_matches_paper(nesterov, clip, wd):
    params = _params()
    opt = LARS(
        params,
        lr=0.5,
        momentum=0.9,
        weight_decay=wd,
        trust_coefficient=0.02,
        nesterov=nesterov,
        trust_clip=clip,
    )
    ref = RefLARS(params, 0.5, 0.9, wd, 0.02, 1e-8, nesterov, clip, [True, True, False, True])
    _run(opt, params, ref)


def test_lars_zero_norms_and_no_exclusion():
    params = _params(zero=True)
    opt = LARS(params, lr=0.1, weight_decay=1e-3, exclude_1d=False)
    ref = RefLARS(params, 0.1, 0.9, 1e-3, 0.001, 1e-8, False, False, [True] * 4)
    _run(opt, params, ref, zero_grad_of=1)


def test_lars_without_momentum():
    params = _params()
    opt = LARS(params, lr=0.1, momentum=0.0)
    ref = RefLARS(params, 0.1, 0.0, 0.0, 0.001, 1e-8, False, False, [True, True, False, True])
    _run(opt, params, ref)
    assert all("momentum_buffer" not in opt.state[p] for p in params)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_matches_paper(wd):
    params = _params()
    opt = LAMB(params, lr=0.01, betas=(0.9, 0.99), weight_decay=wd)
    ref = RefLAMB(params, 0.01, (0.9, 0.99), 1e-6, wd, [True, True, False, True])
    _run(opt, params, ref)


def test_lamb_zero_norms_and_group_exclusion():
    params = _params(zero=True)
    groups = [{"params": params[:2]}, {"params": params[2:], "adapt": False}]
    opt = LAMB(groups, lr=0.01, weight_decay=0.01, exclude_1d=False)
    ref = RefLAMB(params, 0.01, (0.9, 0.999), 1e-6, 0.01, [True, True, False, False])
    _run(opt, params, ref)
    params = _params(zero=True)
    opt = LAMB(params, lr=0.01, weight_decay=0.01)
    ref = RefLAMB(params, 0.01, (0.9, 0.999), 1e-6, 0.01, [True, True, False, True])
    _run(opt, params, ref)


def test_trust_ratio_param_groups_excludes_norm_and_1d():
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm([6]), nn.Linear(6, 3))
    m[1].weight = nn.Parameter(torch.ones(6))
    groups = trust_ratio_param_groups(m, weight_decay=1e-3)
    adapted = next(g for g in groups if g["adapt"])
    excluded = next(g for g in groups if not g["adapt"])
    assert [id(p) for p in adapted["params"]] == [id(m[0].weight), id(m[2].weight)]
    assert adapted["weight_decay"] == 1e-3 and excluded["weight_decay"] == 0.0
    assert len(excluded["params"]) == 4


def test_no_host_sync(monkeypatch):
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model(torch.randn(3, 5)).sum().backward()
    opts = [LARS(model.parameters(), lr=0.1, weight_decay=1e-4, trust_clip=True), LAMB(model.parameters())]
    for opt in opts:
        opt.step()

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in the step")

    for name in ("__bool__", "item", "tolist", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(
        torch.Tensor, "__int__", lambda self: refuse() if self.numel() > 1 else int(self.detach().numpy())
    )
    for opt in opts:
        opt.step()


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_state_dict_round_trip(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    clone = copy.deepcopy(model)
    x = torch.randn(16, 5)
    a = cls(model.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(3):
        a.zero_grad()
        model(x).square().mean().backward()
        a.step()
    clone.load_state_dict(model.state_dict())
    b = cls(clone.parameters(), lr=0.05, weight_decay=1e-3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for m, opt in ((model, a), (clone, b)):
        for _ in range(2):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_grad_scaler_and_scheduler():
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ref = RefLARS([w], 0.1, 0.9, 0.0, 0.001, 1e-8, False, False, [True])
    opt = LARS([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    g = np.arange(12.0).reshape(3, 4)
    scaler.scale((w * torch.from_numpy(g)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    ref.step([g])
    np.testing.assert_allclose(w.detach().numpy(), ref.w[0], rtol=1e-12)
    assert math.isclose(opt.param_groups[0]["lr"], 0.05)


def test_errors_before_mutation():
    w = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="momentum"):
        LARS([w], lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS([w], lr=0.1, trust_coefficient=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        LARS([w], lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        LAMB([w], betas=(0.9,))
    opt = LAMB([w])
    with pytest.raises(ValueError, match="eps"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "eps": -1.0})
    assert len(opt.param_groups) == 1
    emb = nn.Embedding(4, 2, sparse=True)
    opt = LARS([w, emb.weight], lr=0.1)
    w.grad = torch.ones_like(w)
    emb(torch.tensor([0])).sum().backward()
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"optimizer": "sgdp"},
        {"optimizer": "adamp", "projection": "graph"},
        {"optimizer": "lars", "trust_clip": True, "trust_coefficient": 0.02, "lr": 0.5},
        {"optimizer": "lamb"},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_harness_builds_and_trains(overrides):
    """``normkit train --optimizer sgdp | adamp | lars | lamb``: the engine builds the optimizer with the
    graph's / the exclusion groups, and a few steps on digits stay finite and lower the loss."""
    from normkit.train.runner import build_optimizer, run
    from normkit.train.runner.config import resolve_config
    from normkit.train.runner.data import load_dataset

    cfg = dict(data="digits", model="mlp", depth=2, width=32, norm="bn", epochs=2, batch_size=64, **overrides)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    opt, _ = build_optimizer(model, resolve_config(cfg))
    expected = {"sgdp": "SGDP", "adamp": "AdamP", "lars": "LARS", "lamb": "LAMB"}[overrides["optimizer"]]
    assert type(opt).__name__ == expected
    if overrides.get("projection") == "graph":
        assert opt.param_groups[0]["projection"] == "row"
    if expected in ("LARS", "LAMB"):
        assert any(g["adapt"] is False for g in opt.param_groups)
    res = run(cfg, data=load_dataset("digits", subset=512), log=lambda s: None, save=False)
    first, last = res.metrics[0], res.metrics[-1]
    assert math.isfinite(last["train_loss"]) and last["train_loss"] < first["train_loss"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"optimizer": "sgd", "projection": "graph"}, "projection applies only"),
        ({"optimizer": "adam", "trust_clip": True}, "apply only to lars"),
        ({"optimizer": "lars", "trust_coefficient": -1.0}, "trust_coefficient must be positive"),
        ({"optimizer": "lamb", "enorm": 1.0}, "enorm cannot be combined with lamb"),
    ],
)
def test_harness_refuses_bad_options(overrides, message):
    from normkit.train.runner.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides)
