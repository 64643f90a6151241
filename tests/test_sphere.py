"""SphereProjection against a float64 transcription (inner step, then each unit back to its sphere; optional
radial-gradient removal), the graph's units, function preservation, state, schedulers, GradScaler, errors."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from normkit.optim import SphereProjection

pytestmark = pytest.mark.usefixtures("one_thread")


def _ref_sgd(ws, grads, bufs, lr, mu, wd):
    out = []
    for i, (w, g) in enumerate(zip(ws, grads)):
        d = g + wd * w
        bufs[i] = d.copy() if bufs[i] is None else mu * bufs[i] + d
        out.append(w - lr * bufs[i])
    return out


def _radial_free(w, g, per_row):
    wv = w.reshape(w.shape[0], -1) if per_row else w.reshape(1, -1)
    gv = g.reshape(wv.shape).copy()
    for r in range(wv.shape[0]):
        gv[r] -= wv[r] * (wv[r] @ gv[r]) / (wv[r] @ wv[r])
    return gv.reshape(w.shape)


def _rescale(w_new, w_old, per_row, radius):
    nv = w_new.reshape(w_new.shape[0], -1) if per_row else w_new.reshape(1, -1)
    ov = w_old.reshape(nv.shape)
    out = nv.copy()
    for r in range(nv.shape[0]):
        target = radius if radius is not None else np.linalg.norm(ov[r])
        out[r] *= target / np.linalg.norm(nv[r])
    return out.reshape(w_new.shape)


@pytest.mark.parametrize("radius", [None, 1.0])
@pytest.mark.parametrize("project_grad", [False, True])
def test_matches_reference(radius, project_grad):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)  # rows
    b = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)  # whole tensor
    c = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)  # left alone
    params = [a, b, c]
    inner = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt = SphereProjection(inner, rows=[a], tensors=[b], radius=radius, project_grad=project_grad)
    ws = [p.detach().numpy().copy() for p in params]
    bufs = [None] * 3
    rng = np.random.default_rng(0)
    for _ in range(4):
        grads = [rng.standard_normal(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        if project_grad:
            grads[0] = _radial_free(ws[0], grads[0], True)
            grads[1] = _radial_free(ws[1], grads[1], False)
        new = _ref_sgd(ws, grads, bufs, 0.1, 0.9, 0.01)
        new[0] = _rescale(new[0], ws[0], True, radius)
        new[1] = _rescale(new[1], ws[1], False, radius)
        ws = new
        opt.step()
        for p, w in zip(params, ws):
            np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-10, atol=1e-12)
    if radius is None:  # the norms are those at the start
        assert torch.allclose(
            a.detach().flatten(1).norm(dim=1), torch.from_numpy(ws[0]).flatten(1).norm(dim=1)
        )


def test_units_from_graph_and_function_preserved():
    """With model=, the BN-fed conv is renormalized per row and the LayerNorm-fed linear as a whole; the
    renormalization alone (lr 0) changes neither the rows' norms nor the network function."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 5, bias=False),
        nn.LayerNorm(5),
        nn.Linear(5, 2),
    )
    opt = SphereProjection(torch.optim.SGD(model.parameters(), lr=0.0), model=model, radius=1.0)
    assert [id(p) for p in opt.rows] == [id(model[0].weight)]
    assert [id(p) for p in opt.tensors] == [id(model[4].weight)]
    x = torch.randn(8, 3, 4, 4)
    model.train()
    before = model(x)
    before.sum().backward()
    opt.step()
    torch.testing.assert_close(model[0].weight.flatten(1).norm(dim=1), torch.ones(4))
    torch.testing.assert_close(model[4].weight.norm(), torch.tensor(1.0))
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


def test_state_dict_scheduler_and_scaler():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.Linear(6, 2))
    clone = copy.deepcopy(model)
    x = torch.randn(10, 4)
    a = SphereProjection(torch.optim.Adam(model.parameters(), lr=0.01), model=model, project_grad=True)
    sched = torch.optim.lr_scheduler.StepLR(a, 1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    for _ in range(3):
        a.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.step(a)
        scaler.update()
        sched.step()
    assert a.param_groups[0]["lr"] == pytest.approx(0.01 / 8)
    clone.load_state_dict(model.state_dict())
    b = SphereProjection(torch.optim.Adam(clone.parameters(), lr=0.01), rows=[], tensors=[])
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert [id(p) for p in b.rows] == [id(clone[0].weight)] and b.project_grad
    for m, opt in ((model, a), (clone, b)):
        for _ in range(2):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_errors_before_anything_changes():
    w = torch.randn(3, 4, requires_grad=True)
    other = torch.randn(3, 4, requires_grad=True)
    inner = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(ValueError, match="radius"):
        SphereProjection(inner, rows=[w], radius=-1.0)
    with pytest.raises(ValueError, match="not among"):
        SphereProjection(inner, rows=[other])
    with pytest.raises(ValueError, match="model="):
        SphereProjection(inner)
    with pytest.raises(ValueError, match="twice"):
        SphereProjection(inner, rows=[w], tensors=[w])
    with pytest.raises(TypeError, match="Optimizer"):
        SphereProjection(torch.optim.SGD, rows=[w])  # type: ignore[arg-type]
    opt = SphereProjection(inner, rows=[w])
    sd = opt.state_dict()
    sd["normkit_sphere"]["rows"] = [5]
    with pytest.raises(ValueError, match="units"):
        opt.load_state_dict(sd)
    assert [id(p) for p in opt.rows] == [id(w)]
