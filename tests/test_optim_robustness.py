"""Every normkit optimizer as users handle it: copied, pickled and saved whole, given a tensor learning rate,
given bad numbers, given a norm that returns NaN. References: the same optimizer run without interruption,
the float learning rate, the state before a refused call."""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from normkit.optim import (
    LAMB,
    LARS,
    SGDG,
    SGDP,
    AdamG,
    AdamP,
    ClippedOptimizer,
    NonFiniteGradientError,
    NormalizedOptimizer,
    SphereProjection,
    register_norm,
    unregister_norm,
)

pytestmark = pytest.mark.usefixtures("one_thread")

Factory = Callable[..., torch.optim.Optimizer]


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(6, 5, generator=g)),  # a matrix: rows for SGD-G / sphere / AdamP
        nn.Parameter(torch.randn(6, generator=g)),  # a bias
        nn.Parameter(torch.randn(3, 6, generator=g)),  # a second layer
    ]


def _loss(params: list[Tensor]) -> Tensor:
    """A fixed smooth objective of the three tensors (a two-layer net on fixed data)."""
    g = torch.Generator().manual_seed(123)
    x, t = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
    w1, b1, w2 = params
    return ((torch.tanh(x @ w1.T + b1) @ w2.T - t) ** 2).mean()


def _step(opt: torch.optim.Optimizer, params: list[nn.Parameter], nan: bool = False) -> None:
    opt.zero_grad()
    _loss(params).backward()
    if nan:
        params[0].grad[0, 0] = float("nan")  # type: ignore[index]
    opt.step()


# Each: (name, factory(params, lr) -> optimizer). Settings chosen so that the state a copy must keep is
# non-trivial: momentum buffers, Adam moments, nonfinite policies, skipped-step counts, excluded tensors.
OPTIMIZERS: list[tuple[str, Factory]] = [
    (
        "SGDG",
        lambda p, lr=0.05: SGDG(
            [{"params": [p[0]], "grassmann": True}, {"params": p[1:]}], lr=lr, nonfinite="skip", grad_clip=0.5
        ),
    ),
    (
        "AdamG",
        lambda p, lr=0.05: AdamG(
            [{"params": [p[0]], "grassmann": True}, {"params": p[1:]}], lr=lr, nonfinite="skip", omega=0.1
        ),
    ),
    (
        "NormalizedOptimizer",
        lambda p, lr=0.05: NormalizedOptimizer(
            torch.optim.SGD(p, lr=lr, momentum=0.9), "std", "unit", exclude=[p[1]], nonfinite="skip"
        ),
    ),
    (
        "ClippedOptimizer",
        lambda p, lr=0.05: ClippedOptimizer(
            torch.optim.Adam(p, lr=lr), "l1_l2", relative=True, clip_factor=0.05, nonfinite="skip"
        ),
    ),
    (
        "SphereProjection",
        lambda p, lr=0.05: SphereProjection(
            torch.optim.SGD(p, lr=lr, momentum=0.9), rows=[p[0]], tensors=[p[2]], project_grad=True
        ),
    ),
    ("AdamP", lambda p, lr=0.05: AdamP(p, lr=lr, weight_decay=0.01, nesterov=True)),
    ("SGDP", lambda p, lr=0.05: SGDP(p, lr=lr, momentum=0.9, weight_decay=0.01)),
    ("LARS", lambda p, lr=0.05: LARS(p, lr=lr, weight_decay=0.01, exclude_1d=False)),
    ("LAMB", lambda p, lr=0.05: LAMB(p, lr=lr, weight_decay=0.01)),
]
IDS = [name for name, _ in OPTIMIZERS]
SKIPS_NAN = {"SGDG", "AdamG", "NormalizedOptimizer", "ClippedOptimizer"}


def _deepcopy(obj: Any) -> Any:
    return copy.deepcopy(obj)


def _pickle(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


def _torch_save(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # whole objects, not a state_dict


def _state_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out += [v for _, v in sorted(opt.state[p].items()) if isinstance(v, Tensor)]
    return out


@pytest.mark.parametrize("how", [_deepcopy, _pickle, _torch_save], ids=["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name,factory", OPTIMIZERS, ids=IDS)
def test_copies_continue_bit_exactly(name: str, factory: Factory, how: Callable[[Any], Any]) -> None:
    params = _params()
    opt = factory(params)
    # a scheduler patches opt.step on the instance: the copy must not carry (or choke on) that patch
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for i in range(3):
        _step(opt, params, nan=(i == 1 and name in SKIPS_NAN))
        scheduler.step()
    # the parameters travel with the optimizer (one memo), as in torch.save({"model": ..., "opt": ...})
    params_c, opt_c = how((params, opt))
    assert type(opt_c) is type(opt)
    assert all(pc is not p for pc, p in zip(params_c, params))
    assert {id(p) for g in opt_c.param_groups for p in g["params"]} == {id(p) for p in params_c}
    for attr in ("nonfinite", "skipped_steps"):
        assert getattr(opt_c, attr, None) == getattr(opt, attr, None)
    if name in SKIPS_NAN:
        assert opt.skipped_steps == 1  # type: ignore[attr-defined]
    for i in range(4):  # the uninterrupted optimizer is the reference
        _step(opt, params, nan=(i == 2 and name in SKIPS_NAN))
        _step(opt_c, params_c, nan=(i == 2 and name in SKIPS_NAN))
        for p, pc in zip(params, params_c):
            assert torch.equal(p, pc), f"{name}: step {i} after the copy differs"
    for s, sc in zip(_state_tensors(opt), _state_tensors(opt_c)):
        assert torch.equal(s, sc)
    assert opt.state_dict().keys() == opt_c.state_dict().keys()
    if isinstance(opt, NormalizedOptimizer):  # the excluded bias stayed excluded in the copy
        assert opt_c._excluded == {id(params_c[1])}  # type: ignore[attr-defined]


def test_copied_custom_norm_is_the_registered_one() -> None:
    register_norm("robust_mean_abs", _mean_abs, overwrite=True)
    try:
        params = _params()
        opt = NormalizedOptimizer(torch.optim.SGD(params, lr=0.1), "robust_mean_abs")
        for how in (_deepcopy, _pickle, _torch_save):
            assert how(opt).norm.fn is _mean_abs
    finally:
        unregister_norm("robust_mean_abs")


def _mean_abs(x: Tensor) -> Tensor:
    return x.abs().mean()


# --- a tensor learning rate ------------------------------------------------------------------------------

TENSOR_LR = [(name, f) for name, f in OPTIMIZERS if name in ("AdamP", "SGDP", "LARS", "LAMB", "SGDG")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,factory", TENSOR_LR, ids=[n for n, _ in TENSOR_LR])
def test_tensor_lr_takes_the_float_lr_steps_under_a_scheduler(
    name: str, factory: Factory, dtype: torch.dtype
) -> None:
    runs = []
    for lr in (0.05, torch.tensor(0.05, dtype=dtype)):
        params = _params()
        opt = factory(params, lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for _ in range(6):
            _step(opt, params)
            sched.step()
        if isinstance(lr, Tensor):
            assert opt.param_groups[0]["lr"] is lr  # the scheduler wrote into the tensor (fill_)
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.05 * 0.5**3)
        runs.append(params)
    moved = max((p - q).abs().max().item() for p, q in zip(runs[0], _params()))
    assert moved > 1e-3
    for p, q in zip(*runs):
        # the same arithmetic up to where the rate is rounded to float32 or applied through a multiply
        torch.testing.assert_close(q, p, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("cls", [SGDP, LARS])
def test_no_default_lr_needed_when_every_group_sets_one(cls: type[torch.optim.Optimizer]) -> None:
    a, b = _params(), _params()
    per_group = cls([{"params": a[:2], "lr": 0.1}, {"params": a[2:], "lr": 0.01}])
    reference = cls([{"params": b[:2]}, {"params": b[2:], "lr": 0.01}], lr=0.1)
    for _ in range(3):
        _step(per_group, a)
        _step(reference, b)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    # a group without lr, no default: refused, with the fix in the message, before anything is added
    with pytest.raises(ValueError, match="sets no lr"):
        cls([{"params": a[:2], "lr": 0.1}, {"params": a[2:]}])
    with pytest.raises(ValueError, match="sets no lr"):
        per_group.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert len(per_group.param_groups) == 2


# --- bad numbers: refused up front, nothing changed -------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _sgd(p: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(p, lr=0.1)


BAD: list[tuple[str, Callable[[list[nn.Parameter], Any], Any], list[Any]]] = [
    ("SGDG lr", lambda p, v: SGDG(p, lr=v), [NAN, INF, -0.1, torch.tensor(NAN), torch.tensor([0.1, 0.2])]),
    ("SGDG momentum", lambda p, v: SGDG(p, momentum=v), [NAN, 1.0, -0.5]),
    ("SGDG weight_decay", lambda p, v: SGDG(p, weight_decay=v), [NAN, INF, -1.0]),
    (
        "SGDG grad_clip",
        lambda p, v: SGDG([{"params": [p[0]], "grassmann": True}], grad_clip=v),
        [NAN, INF, 0],
    ),
    ("SGDG omega", lambda p, v: SGDG([{"params": [p[0]], "grassmann": True}], omega=v), [NAN, INF, -1.0]),
    ("AdamG lr", lambda p, v: AdamG(p, lr=v), [NAN, INF]),
    ("AdamG eps", lambda p, v: AdamG(p, eps=v), [NAN, INF, -1e-8, 0.0]),
    ("AdamG betas", lambda p, v: AdamG(p, betas=v), [(NAN, 0.99), (0.9, 1.0), (0.9,)]),
    ("AdamP lr", lambda p, v: AdamP(p, lr=v), [NAN, INF, -1.0, True]),
    ("AdamP eps", lambda p, v: AdamP(p, eps=v), [NAN, INF, 0.0]),
    ("SGDP eps", lambda p, v: SGDP(p, lr=0.1, eps=v), [0.0, NAN]),
    ("LAMB eps", lambda p, v: LAMB(p, eps=v), [0.0, NAN, INF]),
    ("AdamP weight_decay", lambda p, v: AdamP(p, weight_decay=v), [NAN, INF, -0.1]),
    ("AdamP delta", lambda p, v: AdamP(p, delta=v), [NAN, INF]),
    ("SGDP momentum", lambda p, v: SGDP(p, lr=0.1, momentum=v), [NAN, 1.0]),
    ("SGDP lr", lambda p, v: SGDP(p, lr=v), [INF, torch.tensor(-1.0)]),
    ("LARS trust_coefficient", lambda p, v: LARS(p, lr=0.1, trust_coefficient=v), [0.0, NAN, INF, -1e-3]),
    ("LARS eps", lambda p, v: LARS(p, lr=0.1, eps=v), [NAN, INF]),
    ("LAMB betas", lambda p, v: LAMB(p, betas=v), [(1.0, 0.999), (0.9, NAN)]),
    ("LAMB lr", lambda p, v: LAMB(p, lr=v), [NAN, INF]),
    ("Normalized eps", lambda p, v: NormalizedOptimizer(_sgd(p), eps=v), [0.0, NAN, INF]),
    ("Clipped clipnorm", lambda p, v: ClippedOptimizer(_sgd(p), clipnorm=v), [0.0, NAN, INF]),
    ("Clipped clip_factor", lambda p, v: ClippedOptimizer(_sgd(p), relative=True, clip_factor=v), [NAN, INF]),
    ("Clipped weight_eps", lambda p, v: ClippedOptimizer(_sgd(p), relative=True, weight_eps=v), [NAN, -1.0]),
    ("Sphere radius", lambda p, v: SphereProjection(_sgd(p), rows=[p[0]], radius=v), [INF, NAN, 0.0, -1.0]),
]


@pytest.mark.parametrize("what,build,values", BAD, ids=[b[0] for b in BAD])
def test_bad_numbers_are_refused_before_anything_changes(
    what: str, build: Callable[[list[nn.Parameter], Any], Any], values: list[Any]
) -> None:
    params = _params()
    before = [p.detach().clone() for p in params]
    argument = what.split()[1]
    for value in values:
        with pytest.raises(ValueError, match=argument.split("_")[0]):
            build(params, value)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_bad_group_is_refused_and_the_optimizer_is_unchanged() -> None:
    params = _params()
    extra = nn.Parameter(torch.randn(4, 3))
    for opt in (SGDG(params[:2], lr=0.1), AdamP(params[:2]), LARS(params[:2], lr=0.1), LAMB(params[:2])):
        _step_two(opt, params)
        sizes = [len(g["params"]) for g in opt.param_groups]
        state = [t.clone() for t in _state_tensors(opt)]
        with pytest.raises(ValueError, match="lr"):
            opt.add_param_group({"params": [extra], "lr": NAN})
        assert [len(g["params"]) for g in opt.param_groups] == sizes
        assert all(torch.equal(a, b) for a, b in zip(_state_tensors(opt), state))
        assert extra not in opt.state


def _step_two(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    opt.zero_grad()
    _loss(params).backward()
    opt.step()


# --- a custom norm returning NaN --------------------------------------------------------------------------


def _nan_norm(x: Tensor) -> Tensor:
    return x.abs().sum() * math.nan


@pytest.mark.parametrize("granularity", ["tensor", "unit", "global"])
@pytest.mark.parametrize("cls", [NormalizedOptimizer, ClippedOptimizer])
def test_nan_norm_is_caught_by_skip_and_raise(cls: type, granularity: str) -> None:
    register_norm("robust_nan", _nan_norm, overwrite=True)
    try:
        extra = {"clipnorm": 1.0} if cls is ClippedOptimizer else {}
        runs = {}
        for policy in ("propagate", "skip", "raise"):
            params = _params()
            opt = cls(
                torch.optim.SGD(params, lr=0.1, momentum=0.9),
                "robust_nan",
                granularity=granularity,
                nonfinite=policy,
                **extra,
            )
            _step(opt.inner, params)  # prime the inner SGD: its momentum state exists from here on
            opt.zero_grad()
            _loss(params).backward()
            assert all(torch.isfinite(p.grad).all() for p in params)  # type: ignore[arg-type]
            snapshot = [t.clone() for p in params for t in (p.detach(), p.grad)]  # type: ignore[misc]
            state = [t.clone() for t in _state_tensors(opt)]
            if policy == "raise":
                with pytest.raises(NonFiniteGradientError, match="robust_nan"):
                    opt.step()
            else:
                opt.step()
            runs[policy] = (params, snapshot, state, opt)
        # without a check the NaN reaches the weights (the failure the policies exist for) ...
        assert not all(torch.isfinite(p).all() for p in runs["propagate"][0])
        # ... with "skip" / "raise": weights, gradients and the inner state as they were
        for policy in ("skip", "raise"):
            params, snapshot, state, opt = runs[policy]
            after = [t for p in params for t in (p.detach(), p.grad)]
            assert all(torch.equal(a, b) for a, b in zip(after, snapshot))
            assert all(torch.equal(a, b) for a, b in zip(_state_tensors(opt), state))
        assert runs["skip"][3].skipped_steps == 1
        assert runs["raise"][3].skipped_steps == 0
    finally:
        unregister_norm("robust_nan")
