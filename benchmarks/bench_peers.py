"""normkit against its PyPI peers, side by side in one process: the same inputs, the same thread count,
interleaved repetitions, medians (``benchmarks.timing.measure_ratio``; the ratio is normkit / peer, below 1
means normkit is faster).

Every row first checks, in float64 and for one step, that the pair computes what the row says: the max
absolute difference of the parameters after one step from the same state and gradients (optimizers), of the
output and every gradient (Batch Renormalization), or of each layer's output variance after init (LSUV). A
row that claims the same update prints ``same`` when that difference is at float64 round-off (≤ 1e-10) and
``DIFFERS`` otherwise; a row whose peer computes something else says what in its name.

Peers (the optional ``bench`` extra): timm (``AdamP``, ``SGDP``, ``Lars``, ``Lamb``), pytorch-optimizer
(``LARS``, ``Lamb``), adamp (clovaai's ``AdamP``, ``SGDP``), lsuv 0.3.0, geoopt (``RiemannianSGD``),
sb3-contrib and torchrl (``BatchRenorm1d``). A peer that is not installed is skipped with a line naming
its package.

Settings per row (the same on both sides):
- AdamP: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 5e-4, δ 0.1, wd_ratio 0.1, the cosine test on
  every parameter (normkit's default path; no graph groups).
- SGDP: lr 0.1, momentum 0.9, Nesterov, dampening 0, weight decay 5e-4, δ 0.1, wd_ratio 0.1.
- LARS / LAMB: the parameters with two or more dimensions only (each library excludes biases and norm weights
  differently: normkit by ``exclude_1d``, timm not at all when weight decay is on), weight decay 5e-4.
  LARS: lr 0.1, momentum 0.9, trust coefficient 0.001, no clip. LAMB: lr 1e-3, betas (0.9, 0.999), eps 1e-6,
  no global gradient-norm clipping on the peers (``max_grad_norm=None`` / ``0``). pytorch-optimizer's ``Lamb``
  computes something else: no bias correction of m and v, and ‖w‖ clamped at 10 in the trust ratio.
- SGD-G vs geoopt on the sphere: each output unit's weight row, unit norm, as a (rows, fan-in) tensor — a
  point of G(1, n), whose tangent space, exp map and parallel transport are those of the sphere for one row.
  With momentum 0 and no clipping SGD-G's step is the exp map of −η·(tangent gradient), which is geoopt's
  ``SphereExact`` (exp-map retraction) step: the same update. With momentum 0.9 geoopt moves the momentum by
  projection onto the new tangent space (vector transport), SGD-G by parallel transport along the geodesic:
  a different update, O(η²) apart; ``Sphere`` (projection retraction) is a further O(η³) away.
- BatchRenorm1d, CrossQ shape (512 × 256, past warm-up, r_max 3, d_max 5; fwd + bwd with the input's grad):
  torchrl computes the same output and gradients from the same running statistics (it keeps the unbiased
  running variance, normkit σ; the check sets σ² = var + ε) — its running-statistic update differs.
  sb3-contrib normalizes with the unbiased batch variance and adds ε after dividing by r²: a different output.
- LSUV: both orthonormal-initialize and scale each layer to unit output variance (tol 0.1, 10 tries); their
  orthogonal draws differ, so the check compares each layer's output variance after init, not the weights.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.bench_brn import _train_step
from benchmarks.timing import Ratio, measure_ratio
from normkit.nn import BatchRenorm1d
from normkit.optim import LAMB, LARS, SGDG, SGDP, AdamP, scale_invariant_weights

TITLE = "normkit vs PyPI peers, side by side (ratio = normkit / peer; < 1: normkit faster)"

SAME_TOL = 1e-10
Make = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _have(package: str, module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        print(f"skipped: {package} is not installed (pip install {package})")
        return False
    return True


def _convnet(width: int) -> nn.Module:
    """A small conv net with BatchNorm: scale-invariant conv weights, a classifier that is not."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


def _timing_model(quick: bool) -> tuple[nn.Module, str]:
    if quick:
        return _convnet(16), "small conv net"
    from normkit.train.runner.models import wrn

    return wrn((3, 32, 32), 10, depth=16, widen_factor=4), "WRN-16-4"


def _with_grads(model: nn.Module) -> nn.Module:
    """Random gradients; those of the weights the graph finds scale-invariant per row are made orthogonal to
    their rows, as in real training (so the cosine test passes there, as it would)."""
    torch.manual_seed(0)
    rows, _ = scale_invariant_weights(model)
    row_ids = {id(w) for w in rows}
    for p in model.parameters():
        g = torch.randn_like(p)
        if id(p) in row_ids:
            r, w = g.view(p.shape[0], -1), p.detach().view(p.shape[0], -1)
            r -= w * ((r * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True))
        p.grad = g
    return model


def _select(model: nn.Module, only_matrices: bool) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.dim() > 1 or not only_matrices]


def _step_pair(
    base: nn.Module, only: bool, cand: Make, ref: Make
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    for pa, pb, p in zip(a.parameters(), b.parameters(), base.parameters()):
        pa.grad, pb.grad = p.grad.clone(), p.grad.clone()  # type: ignore[union-attr]
    return cand(_select(a, only)).step, ref(_select(b, only)).step


def optimizer_difference(only: bool, cand: Make, ref: Make, steps: int = 2) -> float:
    """Max |Δ| of every parameter after ``steps`` steps (two: momentum and state enter), same start."""
    base = _with_grads(_convnet(8).double())
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    oa, ob = cand(_select(a, only)), ref(_select(b, only))
    for _ in range(steps):
        for pa, pb, p in zip(a.parameters(), b.parameters(), base.parameters()):
            pa.grad, pb.grad = p.grad.clone(), p.grad.clone()  # type: ignore[union-attr]
        oa.step()
        ob.step()
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def _verdict(diff: float, claim_same: bool) -> str:
    if not claim_same:
        return "computes something else"
    return "same" if diff <= SAME_TOL else "DIFFERS"


def optimizer_rows() -> list[tuple[str, bool, Make, str, str, Make, bool]]:
    """(label, matrices only, normkit, peer package, peer name, peer, claims the same update)."""
    wd = 5e-4
    rows: list[tuple[str, bool, Make, str, str, Make, bool]] = []
    adamp_nk: Make = lambda ps: AdamP(ps, lr=1e-3, weight_decay=wd)
    sgdp_nk: Make = lambda ps: SGDP(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd)
    lars_nk: Make = lambda ps: LARS(ps, lr=0.1, momentum=0.9, weight_decay=wd, exclude_1d=False)
    lamb_nk: Make = lambda ps: LAMB(ps, lr=1e-3, eps=1e-6, weight_decay=wd, exclude_1d=False)
    if _have("timm", "timm"):
        import timm.optim as to

        rows += [
            (
                "AdamP (cosine test)",
                False,
                adamp_nk,
                "timm",
                "timm AdamP",
                lambda ps: to.AdamP(ps, lr=1e-3, weight_decay=wd),
                True,
            ),
            (
                "SGDP (cosine test)",
                False,
                sgdp_nk,
                "timm",
                "timm SGDP",
                lambda ps: to.SGDP(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd),
                True,
            ),
            (
                "LARS",
                True,
                lars_nk,
                "timm",
                "timm Lars",
                lambda ps: to.Lars(ps, lr=0.1, momentum=0.9, weight_decay=wd, trust_coeff=0.001),
                True,
            ),
            (
                "LAMB",
                True,
                lamb_nk,
                "timm",
                "timm Lamb",
                lambda ps: to.Lamb(ps, lr=1e-3, eps=1e-6, weight_decay=wd, max_grad_norm=None),
                True,
            ),
        ]
    if _have("adamp", "adamp"):
        import adamp

        rows += [
            (
                "AdamP (cosine test)",
                False,
                adamp_nk,
                "adamp",
                "clovaai adamp.AdamP",
                lambda ps: adamp.AdamP(ps, lr=1e-3, weight_decay=wd),
                True,
            ),
            (
                "SGDP (cosine test)",
                False,
                sgdp_nk,
                "adamp",
                "clovaai adamp.SGDP",
                lambda ps: adamp.SGDP(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd),
                True,
            ),
        ]
    if _have("pytorch-optimizer", "pytorch_optimizer"):
        import pytorch_optimizer as po

        rows += [
            (
                "LARS",
                True,
                lars_nk,
                "pytorch-optimizer",
                "pytorch_optimizer LARS",
                lambda ps: po.LARS(ps, lr=0.1, momentum=0.9, weight_decay=wd, trust_coefficient=0.001),
                True,
            ),
            # pytorch_optimizer's Lamb has no bias correction of m and v (with weight decay added to the Adam
            # direction that changes the update) and clamps ‖w‖ at 10 in the trust ratio: not the same update.
            (
                "LAMB",
                True,
                lamb_nk,
                "pytorch-optimizer",
                "pytorch_optimizer Lamb (no bias correction)",
                lambda ps: po.Lamb(
                    ps, lr=1e-3, eps=1e-6, weight_decay=wd, weight_decouple=False, max_grad_norm=0.0
                ),
                False,
            ),
        ]
    return rows


def _optimizer_ratios(quick: bool, repeats: int) -> list[Ratio]:
    model, label = _timing_model(quick)
    base = _with_grads(model)
    n_params = sum(p.numel() for p in base.parameters()) / 1e6
    results = []
    for name, only, cand, _package, peer_name, ref, same in optimizer_rows():
        diff = optimizer_difference(only, cand, ref)
        verdict = _verdict(diff, same)
        print(f"check {name} vs {peer_name}: max |Δ| after 2 steps (float64) = {diff:.3g} -> {verdict}")
        step_a, step_b = _step_pair(base, only, cand, ref)
        scope = "matrices" if only else "all params"
        results.append(
            measure_ratio(
                f"{name}.step, {label} ({n_params:.2f} M, {scope}), {torch.get_num_threads()} thr; {verdict} "
                f"(max Δ {diff:.1e})",
                step_a,
                peer_name,
                step_b,
                repeats=repeats,
            )
        )
    return results


def _sphere_rows(model: nn.Module, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each weight's rows (output units) as a unit-norm (rows, fan-in) tensor, with a random gradient."""
    torch.manual_seed(1)
    rows = []
    for p in model.parameters():
        if p.dim() > 1:
            w = p.detach().reshape(p.shape[0], -1).to(dtype)
            w = w / w.norm(dim=1, keepdim=True)
            rows.append(w)
    return rows


def _sgdg_geoopt_pair(
    rows: list[torch.Tensor], momentum: float, exact: bool
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """SGD-G on Grassmann rows and geoopt's RiemannianSGD on the sphere, same rows, same gradients."""
    import geoopt

    mine = [nn.Parameter(r.clone()) for r in rows]
    manifold = geoopt.SphereExact() if exact else geoopt.Sphere()
    theirs = [geoopt.ManifoldParameter(r.clone(), manifold=manifold) for r in rows]
    for a, b in zip(mine, theirs):
        g = torch.randn_like(a)
        a.grad, b.grad = g, g.clone()
    nk = SGDG([{"params": mine, "grassmann": True}], lr=0.2, momentum=momentum, grad_clip=None)
    return nk, geoopt.optim.RiemannianSGD(theirs, lr=0.2, momentum=momentum)


def sgdg_geoopt_difference(momentum: float, exact: bool) -> float:
    """Max |Δ| of the rows after two steps (float64) of SGD-G and geoopt from the same unit rows."""
    nk, peer = _sgdg_geoopt_pair(_sphere_rows(_convnet(8), torch.float64), momentum, exact)
    for _ in range(2):
        nk.step()
        peer.step()
    return max(
        (a - b).abs().max().item()
        for a, b in zip(nk.param_groups[0]["params"], peer.param_groups[0]["params"])
    )


def _sgdg_vs_geoopt(quick: bool, repeats: int) -> list[Ratio]:
    if not _have("geoopt", "geoopt"):
        return []
    results = []
    model, label = _timing_model(quick)
    for momentum, exact, same in ((0.0, True, True), (0.9, True, False), (0.9, False, False)):
        manifold = "SphereExact" if exact else "Sphere"
        diff = sgdg_geoopt_difference(momentum, exact)
        verdict = _verdict(diff, same)
        note = (
            ""
            if same
            else "; geoopt moves the momentum by projection (vector transport), SGD-G by parallel transport"
        )
        print(
            f"check SGD-G vs geoopt {manifold} momentum {momentum}: max |Δ| after 2 steps = {diff:.3g}{note}"
        )
        nk, peer = _sgdg_geoopt_pair(_sphere_rows(model, torch.float32), momentum, exact)
        results.append(
            measure_ratio(
                f"SGD-G (Grassmann rows, momentum {momentum}, no clip).step, {label} rows, "
                f"{torch.get_num_threads()} thr; {verdict} (max Δ {diff:.1e}){note}",
                nk.step,
                f"geoopt RiemannianSGD on {manifold}",
                peer.step,
                repeats=repeats,
            )
        )
    return results


def brn_peers() -> list[tuple[str, nn.Module, bool]]:
    """(name, layer past warm-up, claims the same output and gradients) for each installed peer."""
    peers = []
    if _have("torchrl", "torchrl"):
        from torchrl.modules import BatchRenorm1d as TorchRLBRN

        layer = TorchRLBRN(256, momentum=0.01, eps=1e-5, max_r=3.0, max_d=5.0, warmup_steps=100_000)
        # torchrl's warm-up factor is num_batches_tracked // warmup_steps (its clamp_max is not in place, so
        # the counter keeps growing): at exactly warmup_steps the factor is 1, r and d fully on.
        layer.num_batches_tracked.fill_(100_000)
        peers.append(("torchrl BatchRenorm1d", layer, True))
    if _have("sb3-contrib", "sb3_contrib"):
        from sb3_contrib.common.torch_layers import BatchRenorm1d as SB3BRN

        layer = SB3BRN(256, eps=1e-5, momentum=0.01, warmup_steps=100_000)
        layer.steps.fill_(200_000)
        peers.append(("sb3-contrib BatchRenorm1d (unbiased batch variance)", layer, False))
    return peers


def _brn_state(nk: BatchRenorm1d, peer: nn.Module) -> None:
    """The same running statistics and affine parameters on both sides (peer in its own convention)."""
    torch.manual_seed(2)
    nk.running_mean.copy_(torch.randn(256) * 0.3)
    nk.running_std.copy_(torch.rand(256) + 0.5)
    nk.weight.data.copy_(torch.rand(256) + 0.5)
    nk.bias.data.copy_(torch.randn(256) * 0.1)
    var = nk.running_std.square() - nk.eps
    if hasattr(peer, "running_var"):  # torchrl
        peer.running_mean.copy_(nk.running_mean)
        peer.running_var.copy_(var)
        peer.weight.data.copy_(nk.weight)
        peer.bias.data.copy_(nk.bias)
    else:  # sb3-contrib
        peer.ra_mean.copy_(nk.running_mean)
        peer.ra_var.copy_(var)
        peer.scale.data.copy_(nk.weight)
        peer.bias.data.copy_(nk.bias)


def brn_difference(peer: nn.Module) -> float:
    nk = BatchRenorm1d(256, schedule="crossq").double().train()
    nk.num_batches_tracked.fill_(200_000)
    other = copy.deepcopy(peer).double().train()
    _brn_state(nk, other)
    torch.manual_seed(3)
    x = (torch.randn(512, 256, dtype=torch.float64) * 2 + 1).requires_grad_()
    grad = torch.randn(512, 256, dtype=torch.float64)
    diffs = []
    outs = []
    for layer in (nk, other):
        y = layer(x)
        gx, *gp = torch.autograd.grad(y, [x, *layer.parameters()], grad)
        outs.append((y, gx, *gp))
    for a, b in zip(*outs):
        diffs.append((a - b).abs().max().item())
    return max(diffs)


def _brn_ratios(repeats: int) -> list[Ratio]:
    results = []
    for name, peer, same in brn_peers():
        diff = brn_difference(peer)
        verdict = _verdict(diff, same)
        print(
            f"check BatchRenorm1d vs {name}: max |Δ| of output and gradients (float64) = {diff:.3g}"
            f" -> {verdict}"
        )
        nk = BatchRenorm1d(256, schedule="crossq").train()
        nk.num_batches_tracked.fill_(200_000)
        x = torch.randn(512, 256).requires_grad_()
        grad = torch.randn_like(x)

        results.append(
            measure_ratio(
                f"BatchRenorm1d fwd+bwd (512, 256) past warm-up, {torch.get_num_threads()} thr; {verdict} "
                f"(max Δ {diff:.1e})",
                _train_step(nk, x, grad),
                name,
                _train_step(peer.train(), x, grad),
                repeats=repeats,
                inner=20,
            )
        )
    return results


def _lsuv_net() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, padding=1), nn.ReLU()]
    for _ in range(6):
        layers += [nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)]
    return nn.Sequential(*layers)


def _layer_variances(model: nn.Module, x: torch.Tensor) -> list[float]:
    out: list[float] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, y: out.append(y.var().item()))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def _lsuv_ratios(quick: bool, repeats: int) -> list[Ratio]:
    if not _have("lsuv", "lsuv"):
        return []
    import contextlib
    import io

    import lsuv

    from normkit.init import lsuv_init

    torch.manual_seed(4)
    x = torch.randn(32 if quick else 128, 3, 32, 32)

    def theirs(model: nn.Module) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            lsuv.lsuv_with_singlebatch(model, x, verbose=False)

    def mine(model: nn.Module) -> None:
        lsuv_init(model, x)

    va, vb = [], []
    for init, store in ((mine, va), (theirs, vb)):
        torch.manual_seed(5)
        model = _lsuv_net()
        init(model)
        store += _layer_variances(model, x)
    worst = max(max(abs(v - 1) for v in va), max(abs(v - 1) for v in vb))
    print(
        "check lsuv_init vs lsuv 0.3.0: each layer's output variance after init: "
        f"normkit {[round(v, 3) for v in va]}, lsuv {[round(v, 3) for v in vb]}; max |var − 1| = {worst:.3f}"
    )
    base = _lsuv_net()
    return [
        measure_ratio(
            f"lsuv_init, 7-conv + linear net, batch {x.shape[0]}, {torch.get_num_threads()} thr; "
            f"different orthogonal draws, same criterion (worst layer variance off 1 by {worst:.2f})",
            lambda: mine(copy.deepcopy(base)),
            "lsuv 0.3.0 lsuv_with_singlebatch",
            lambda: theirs(copy.deepcopy(base)),
            repeats=repeats,
            inner=1,
            warmup=1,
        )
    ]


def run(quick: bool) -> list[Ratio]:
    repeats = 3 if quick else 15
    results = _optimizer_ratios(quick, repeats)
    results += _sgdg_vs_geoopt(quick, repeats)
    results += _brn_ratios(repeats)
    results += _lsuv_ratios(quick, repeats)
    return results
