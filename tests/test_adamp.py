"""AdamP / SGDP against float64 transcriptions of the paper's update (the authors' per-parameter algorithm
with its per-step cosine test), both modes (cosine test, graph-known groups), no host synchronisation,
state and the graph's scale-invariant groups."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from normkit.optim import SGDP, AdamP, scale_invariant_param_groups, scale_invariant_weights

pytestmark = pytest.mark.usefixtures("one_thread")

DELTA, EPS, WD_RATIO = 0.1, 1e-8, 0.1

# --- the paper's algorithm, one parameter at a time, in float64 numpy ---------------------------------------


def _cos(a, b):
    return abs(a @ b) / (max(np.linalg.norm(a), EPS) * max(np.linalg.norm(b), EPS))


def _project(w, g, q, mode):
    """(projected q, weight-decay ratio): the channel test, then the layer test (Heo et al., Algorithm 1);
    ``mode`` 'row' / 'tensor' force one view (graph-known weights), 'none' skips."""
    if mode == "none" or (w.ndim <= 1 and mode != "tensor"):
        return q, 1.0
    shape = w.shape
    views = {"row": (w.reshape(shape[0], -1), g.reshape(shape[0], -1), q.reshape(shape[0], -1))}
    views["tensor"] = (w.reshape(1, -1), g.reshape(1, -1), q.reshape(1, -1))
    order = ["row", "tensor"] if mode == "auto" else [mode]
    for view in order:
        wv, gv, qv = views[view]
        n = wv.shape[1]
        if mode == "auto" and not max(_cos(gr, wr) for gr, wr in zip(gv, wv)) < DELTA / math.sqrt(n):
            continue
        out = qv.copy()
        for r in range(wv.shape[0]):
            wn = wv[r] / (np.linalg.norm(wv[r]) + EPS)
            out[r] -= wn * (wn @ qv[r])
        return out.reshape(shape), WD_RATIO
    return q, 1.0


class RefAdamP:
    def __init__(self, params, lr, betas, wd, nesterov, modes):
        self.w = [p.detach().double().numpy().copy() for p in params]
        self.m = [np.zeros_like(w) for w in self.w]
        self.v = [np.zeros_like(w) for w in self.w]
        self.t = 0
        self.lr, self.b1, self.b2, self.wd, self.nesterov, self.modes = lr, *betas, wd, nesterov, modes

    def step(self, grads):
        self.t += 1
        for i, g in enumerate(grads):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            denom = np.sqrt(self.v[i]) / math.sqrt(1 - self.b2**self.t) + EPS
            step_size = self.lr / (1 - self.b1**self.t)
            m = self.b1 * self.m[i] + (1 - self.b1) * g if self.nesterov else self.m[i]
            q, ratio = _project(self.w[i], g, m / denom, self.modes[i])
            self.w[i] = self.w[i] * (1 - self.lr * self.wd * ratio) - step_size * q


class RefSGDP:
    """The authors' SGDP: buffer from zero, buffer projected in place without Nesterov, decay / (1 − μ)."""

    def __init__(self, params, lr, momentum, dampening, wd, nesterov, modes):
        self.w = [p.detach().double().numpy().copy() for p in params]
        self.buf = [np.zeros_like(w) for w in self.w]
        self.lr, self.mu, self.damp, self.wd, self.nesterov, self.modes = (
            lr,
            momentum,
            dampening,
            wd,
            nesterov,
            modes,
        )

    def step(self, grads):
        for i, g in enumerate(grads):
            self.buf[i] = self.mu * self.buf[i] + (1 - self.damp) * g
            d = g + self.mu * self.buf[i] if self.nesterov else self.buf[i]
            q, ratio = _project(self.w[i], g, d, self.modes[i])
            if not self.nesterov:
                self.buf[i] = q
            self.w[i] = self.w[i] * (1 - self.lr * self.wd * ratio / (1 - self.mu)) - self.lr * q


# --- gradients that exercise every branch of the test ------------------------------------------------------


def _grads(ws, rng):
    """Per parameter: g ⟂ each row of w (channel test passes); g ⟂ w as a whole only (layer test passes);
    g with a radial part (neither); a 1-D parameter; a 0-dim-like scalar row."""
    out = []
    for k, w in enumerate(ws):
        g = rng.standard_normal(w.shape)
        if k == 0:  # orthogonal per row
            wr, gr = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
            gr -= wr * ((gr * wr).sum(1, keepdims=True) / (wr * wr).sum(1, keepdims=True))
            g = gr.reshape(w.shape)
        elif k == 1:  # orthogonal to the whole tensor only
            g -= w * ((g * w).sum() / (w * w).sum())
        elif k == 2:
            g += 0.5 * w
        out.append(g)
    return out


def _params():
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 3, 3, 3), (5, 7), (4, 9), (8,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


def _run(opt, params, ref, steps=6, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        grads = _grads([p.detach().numpy() for p in params], rng)
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        ref.step(grads)
        for p, w in zip(params, ref.w):
            np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-10, atol=1e-12)


def test_branches_are_exercised():
    """The synthetic gradients hit the channel test, the layer test and neither (else the tests below
    would not check the projection)."""
    params = [p.detach().numpy() for p in _params()]
    grads = _grads(params, np.random.default_rng(1))
    ratios = [_project(w, g, g.copy(), "auto")[1] for w, g in zip(params, grads)]
    assert ratios == [WD_RATIO, WD_RATIO, 1.0, 1.0]
    w, g = params[1], grads[1]
    rows = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
    assert max(_cos(gr, wr) for gr, wr in zip(rows[1], rows[0])) >= DELTA / math.sqrt(7)  # channel fails


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamp_cosine_test_matches_paper(nesterov, wd):
    params = _params()
    opt = AdamP(params, lr=0.01, betas=(0.9, 0.99), weight_decay=wd, nesterov=nesterov)
    ref = RefAdamP(params, 0.01, (0.9, 0.99), wd, nesterov, ["auto"] * 4)
    _run(opt, params, ref)


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_known_groups_match_paper(nesterov):
    params = _params()
    groups = [
        {"params": [params[0]], "projection": "row"},
        {"params": [params[1]], "projection": "tensor"},
        {"params": [params[2]], "projection": "none"},
        {"params": [params[3]], "projection": "tensor"},
    ]
    opt = AdamP(groups, lr=0.02, weight_decay=0.1, nesterov=nesterov)
    ref = RefAdamP(params, 0.02, (0.9, 0.999), 0.1, nesterov, ["row", "tensor", "none", "tensor"])
    _run(opt, params, ref)


@pytest.mark.parametrize(
    "momentum,dampening,nesterov", [(0.9, 0.0, False), (0.9, 0.0, True), (0.5, 0.3, False), (0.0, 0.0, False)]
)
def test_sgdp_cosine_test_matches_authors_code(momentum, dampening, nesterov):
    params = _params()
    opt = SGDP(params, lr=0.1, momentum=momentum, dampening=dampening, weight_decay=1e-3, nesterov=nesterov)
    ref = RefSGDP(params, 0.1, momentum, dampening, 1e-3, nesterov, ["auto"] * 4)
    _run(opt, params, ref)


def test_sgdp_known_groups_match_authors_code():
    params = _params()
    groups = [{"params": params[:2], "projection": "row"}, {"params": params[2:], "projection": "none"}]
    opt = SGDP(groups, lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref = RefSGDP(params, 0.1, 0.9, 0.0, 1e-3, False, ["row", "row", "none", "none"])
    _run(opt, params, ref)


def test_projected_step_is_tangent():
    """With the radial part removed (no decay) the step of each row is orthogonal to the row."""
    w = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    w0 = w.detach().clone()
    opt = AdamP([{"params": [w], "projection": "row"}], lr=0.1)
    w.grad = torch.randn(4, 10, dtype=torch.float64)
    opt.step()
    dots = ((w.detach() - w0) * w0).sum(1) / w0.norm(dim=1)
    assert dots.abs().max() < 1e-6 * (w.detach() - w0).norm()


def test_no_host_sync_in_either_mode(monkeypatch):
    """The cosine test is decided on the device: the step never converts a tensor to a Python value."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    opts = [
        AdamP(model.parameters(), weight_decay=0.1),
        SGDP(scale_invariant_param_groups(model, 1e-4), lr=0.1, momentum=0.9),
    ]
    for opt in opts:
        opt.step()  # creates the state (step counters are CPU tensors, read as torch.optim does)

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in the step")

    for name in ("__bool__", "item", "tolist", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(
        torch.Tensor,
        "__int__",
        lambda self: refuse() if self.dim() or self.numel() > 1 else int(self.detach().numpy()),
    )
    for opt in opts:
        opt.step()


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6), nn.Linear(6, 2))
    clone = copy.deepcopy(model)
    x = torch.randn(16, 5)
    a = AdamP(scale_invariant_param_groups(model, 0.01), lr=0.01)
    for _ in range(3):
        a.zero_grad()
        model(x).square().mean().backward()
        a.step()
    clone.load_state_dict(model.state_dict())
    b = AdamP(scale_invariant_param_groups(clone, 0.01), lr=0.01)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as torch.save would: no shared tensors
    for m, opt in ((model, a), (clone, b)):
        for _ in range(2):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_scheduler_and_grad_scaler():
    w = torch.randn(3, 4, requires_grad=True)
    opt = SGDP([w], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    w0 = w.detach().clone()
    scaler.scale((w * torch.ones(3, 4)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    ref = RefSGDP([w0], 0.1, 0.9, 0.0, 0.0, False, ["auto"])
    ref.step([np.ones((3, 4))])
    np.testing.assert_allclose(w.detach().numpy(), ref.w[0], rtol=1e-6)


def test_errors_before_mutation():
    w = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        AdamP([w], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamP([w], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="wd_ratio"):
        SGDP([w], lr=0.1, wd_ratio=2.0)
    with pytest.raises(ValueError, match="nesterov"):
        SGDP([w], lr=0.1, nesterov=True)
    opt = AdamP([w])
    v = torch.randn(2, requires_grad=True)
    with pytest.raises(ValueError, match="projection"):
        opt.add_param_group({"params": [v], "projection": "rows"})
    assert len(opt.param_groups) == 1
    emb = nn.Embedding(5, 3, sparse=True)
    opt = AdamP([w, emb.weight])
    w.grad = torch.ones_like(w)
    emb(torch.tensor([1])).sum().backward()
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)
    assert not opt.state


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # -> BN: per row
        self.bn = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)  # bias, -> BN: per row (BN removes the bias)
        self.bn_b = nn.BatchNorm2d(8)
        self.conv_relu = nn.Conv2d(8, 8, 1, bias=False)  # -> ReLU -> BN, no bias: per row
        self.bn_r = nn.BatchNorm2d(8)
        self.conv_relu_b = nn.Conv2d(8, 8, 1)  # bias -> ReLU -> BN: not invariant
        self.bn_rb = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6, bias=False)  # -> LayerNorm: whole tensor
        self.ln = nn.LayerNorm(6)
        self.fc_b = nn.Linear(6, 6)  # bias -> LayerNorm: not invariant
        self.ln_b = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = self.bn_b(self.conv_b(x))
        x = self.bn_r(torch.relu(self.conv_relu(x)))
        x = self.bn_rb(torch.relu(self.conv_relu_b(x)))
        x = x.mean((2, 3))
        x = self.ln(self.fc(x))
        x = self.ln_b(self.fc_b(x))
        return self.head(x)


def test_scale_invariant_weights_from_graph():
    m = _Block()
    rows, tensors = scale_invariant_weights(m)
    assert [id(p) for p in rows] == [id(m.conv.weight), id(m.conv_b.weight), id(m.conv_relu.weight)]
    assert [id(p) for p in tensors] == [id(m.fc.weight)]


def test_found_weights_are_invariant():
    """What the graph calls invariant is: rescaling rows (per row) or the tensor leaves the output unchanged;
    what it leaves out is not."""
    torch.manual_seed(0)
    m = _Block().train().double()
    for mod in m.modules():
        if hasattr(mod, "eps"):
            mod.eps = 1e-12  # the normalization's ε is the only thing that sees the scale
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    base = m(x)
    rows, tensors = scale_invariant_weights(m)
    with torch.no_grad():
        for w in rows:
            w.mul_(torch.rand(w.shape[0], *[1] * (w.dim() - 1), dtype=w.dtype) * 3 + 0.2)
        for w in tensors:
            w.mul_(2.5)
    torch.testing.assert_close(m(x), base, rtol=1e-8, atol=1e-8)
    with torch.no_grad():
        m.conv_relu_b.weight.mul_(torch.rand(8, 1, 1, 1, dtype=torch.float64) * 3 + 0.2)
    assert not torch.allclose(m(x), base, atol=1e-3)


def test_param_groups_layout():
    m = _Block()
    groups = scale_invariant_param_groups(m, weight_decay=0.01)
    by_mode = {g["projection"]: g for g in groups if g["projection"] != "none"}
    assert len(by_mode["row"]["params"]) == 3 and len(by_mode["tensor"]["params"]) == 1
    none = [g for g in groups if g["projection"] == "none"]
    assert {g["weight_decay"] for g in none} == {0.01, 0.0}
    no_decay = next(g for g in none if g["weight_decay"] == 0.0)
    assert all(p.dim() == 1 for p in no_decay["params"])
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(m.parameters()))
    auto = scale_invariant_param_groups(m, test_others=True)
    assert any(g["projection"] == "auto" for g in auto)


def test_trains_a_bn_net():
    """AdamP (graph groups) fits digits with a BN net, and its invariant weights grow less than with Adam
    (the paper's point: smaller effective-step decay)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:512], dtype=torch.float32) / 16
    y = torch.tensor(y[:512])
    norms = {}
    for name in ("adam", "adamp"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        w = m[0].weight
        opt = (
            torch.optim.Adam(m.parameters(), lr=0.01)
            if name == "adam"
            else AdamP(scale_invariant_param_groups(m), lr=0.01)
        )
        n0 = w.detach().norm()
        for _ in range(60):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
        norms[name] = (w.detach().norm() / n0).item()
        assert loss.item() < 0.3
    assert norms["adamp"] < norms["adam"]
