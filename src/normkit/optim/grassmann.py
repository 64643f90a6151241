"""SGD-G and Adam-G: optimization on the Grassmann manifold G(1, n) (Cho & Lee, NIPS 2017, arXiv 1709.09603).

A weight whose output feeds a per-channel normalization layer is scale-invariant: each output unit's weight
row ``w`` (``p.reshape(p.shape[0], -1)``) only matters through the line it spans, a point ``y = w/‖w‖`` of
G(1, n). SGD-G (paper Algorithm 1) and Adam-G (Algorithm 2) move ``y`` along geodesics:

* ``g`` the gradient with respect to ``y`` (plus ``2ω(YYᵀY − Y)`` when the orthogonality regularizer is on),
  ``h = g − (yᵀg) y``, ``ĥ = h · min(1, ν/‖h‖)`` (per row; ν = ``grad_clip``);
* SGD-G: ``d = γ τ − η ĥ``, ``y ← exp_y(d)``, ``τ ← transport of d along d`` (τ holds the learning rate, as in
  the paper, so a changed ``lr`` acts on new gradients only);
* Adam-G: ``m ← β1 m + (1 − β1) ĥ``, ``v ← β2 v + (1 − β2) ‖ĥ‖²`` (one scalar per row),
  ``Δ = −η √(1 − β2ᵗ)/(1 − β1ᵗ) · m/√(v + ε)``, ``y ← exp_y(Δ)``, ``m ← transport of m along Δ``.

Parameter groups with ``grassmann=False`` are updated by SGD with ``momentum``, ``nesterov`` and
``weight_decay`` (the paper's choice for the other weights with both methods), through ``torch.optim.sgd``.

Where we differ from the reference code (not from the paper): the gradient is taken with respect to the unit
point (``‖w‖·∂f/∂w``, equal to the reference's ``∂f/∂w`` once the rows are unit, i.e. from the second step or
with ``unit_init``); the ω gradient is added to the gradient we project, never written into ``p.grad``;
clipping uses no boolean mask (no host synchronisation); channels_last tensors are handled through a row
view in memory order (every per-row operation is invariant to the order of a row's elements); bf16/fp16
weights keep an fp32 copy of their rows in the optimizer state (``state["master"]``), since bf16 rounding
destroys the small geodesic steps.

How it runs: eagerly, each tensor's step is 12 full-size kernels with no temporaries, about 25 reads and
writes of a row matrix against about 11 for SGD with momentum (so SGD-G costs about 2× SGD where memory
bandwidth bounds both, as on CPUs). The rotation of (y, d) is applied with its cos/sin coefficients (exact for
every angle, several half turns included) in three passes through one reused work buffer the size of the
largest weight, which also serves the row dot products; ``1/‖w‖`` is folded into the rotation's coefficients
instead of normalizing ``w`` in a pass of its own; ‖h‖ comes from the Gram identity. Adam-G's bias
corrections are computed in float64 (``1 − 0.99`` keeps 17 bits in float32).

Sharded models (FSDP2 ``fully_shard``, DTensor ``Shard(0)`` / ``Replicate()``): every row lies whole on one
rank, so the row math runs on the local shards, with no communication; the state (τ, m, v) is made of
DTensors placed like the parameter (``torch.distributed.checkpoint`` saves it sharded). The ω term needs
``YᵀY`` over all rows (``YYᵀY = Y·YᵀY``): each shard's ``n × n`` part, one all_reduce per step for all
tensors of all groups. A Grassmann weight whose rows are split (``Shard(1)``) is refused before the step.

Non-finite gradients: ``nonfinite="propagate" | "skip" | "raise"`` (see :class:`SGDG`).
``foreach=True`` (default on accelerators) concatenates the rows of all tensors of equal row length and runs
one batch per length. Under ``torch.compile`` the same formulas run in a functional form that inductor fuses
into a few loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _torch_sgd

from normkit._dtensor import check_rows_local, is_dtensor, local, reduce_partials_each, zeros_rows
from normkit.optim._checks import check_betas, check_lr, check_number
from normkit.optim._nonfinite import check_policy, nonfinite_verdict
from normkit.optim._wrapper import PicklableOptimizer

__all__ = ["SGDG", "AdamG", "grassmann_param_groups", "orthogonality_penalty"]

_FULL_PRECISION = (torch.float32, torch.float64)
_Block = tuple[int, int, int]  # (first row, number of tensors, rows per tensor) of equal-shape tensors


# --- functional core: math on a batch of rows ----------------------------------------------------------


def _safe_inverse(norm: Tensor) -> Tensor:
    tiny = torch.finfo(norm.dtype).tiny
    return torch.where(norm > tiny, norm.clamp_min(tiny).reciprocal(), torch.zeros_like(norm))


def _sq_norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1, keepdim=True).square_()


def _dot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    # (a*b).sum into a reused buffer: several times faster on CPU than linalg.vecdot or a batched matmul
    return torch.mul(a, b, out=scratch).sum(1, keepdim=True)


def _tangent_(
    w: Tensor,
    g: Tensor,
    omega: float,
    blocks: Sequence[_Block],
    scratch: Tensor,
    need_h2: bool = True,
    grams: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Describe the tangent gradient at the unit rows ``y = w/‖w‖`` without forming it.

    The gradient with respect to ``y`` is ``‖w‖ g`` (``g = ∂f/∂w``, f scale-invariant), plus with ``omega``
    the regularizer's ``2ω(YYᵀY − Y)`` (``Y``: the unit rows of one tensor, a block of ``blocks``). Returns
    ``(src, a, b, ‖h‖², inv_r)`` with the projected gradient ``h = a·src + b·w`` (never formed); ``src`` is
    ``g`` or ``scratch``. ``y = w·inv_r``: without ``omega`` the rows ``w`` are left as they are (the
    geodesic step folds ``1/‖w‖`` into its coefficients, saving a pass); with ``omega`` they are normalized
    in place and ``inv_r`` is None. ``‖h‖² = ‖g_y‖² − (yᵀg_y)²`` (used by clipping and Adam-G's v; garbage
    if not ``need_h2``). ``grams``: per block, ``YᵀY`` ``(count, n, n)`` summed over *all* rows of each
    tensor (across the mesh when its rows are sharded); the ω term is then ``Y(YᵀY − I)`` from the local
    rows (equal to ``YYᵀY − Y``)."""
    sq_r = _sq_norm(w)
    r = sq_r.sqrt()
    inv_r = _safe_inverse(r)
    if omega:
        w.mul_(inv_r)
        gy = torch.mul(g, r, out=scratch)
        n = w.shape[1]
        for b, (start, count, rows) in enumerate(blocks):
            ys = w[start : start + count * rows].view(count, rows, n)
            target = gy[start : start + count * rows].view(count, rows, n)
            if grams is not None:  # sharded rows: Y(YᵀY − I) with the mesh-wide YᵀY
                cols = grams[b].clone()
                cols.diagonal(dim1=1, dim2=2).sub_(1.0)
                target.baddbmm_(ys, cols, alpha=2.0 * omega)
                continue
            gram = torch.bmm(ys, ys.transpose(1, 2))
            gram.diagonal(dim1=1, dim2=2).sub_(1.0)
            target.baddbmm_(gram, ys, alpha=2.0 * omega)
        s = (w * gy).sum(1, keepdim=True)
        h2 = _sq_norm(gy).sub_(s.square()).clamp_min_(0.0)
        return gy, torch.ones_like(r), s.neg_(), h2, None
    s = _dot(w, g, scratch)  # = yᵀ(‖w‖ g)
    h2 = _sq_norm(g).mul_(sq_r).sub_(s.square()).clamp_min_(0.0) if need_h2 else s
    return g, r, s.neg_().mul_(inv_r), h2, inv_r


def _clip_scale(h2: Tensor, grad_clip: float) -> Tensor:
    """``min(1, ν/‖h‖)`` per row (no mask, no host synchronisation)."""
    return (grad_clip * _safe_inverse(h2.sqrt())).clamp_(max=1.0)


def _rotation(sq_v: Tensor, k: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, ``(cos θ, k sinc θ, −k‖v‖² sinc θ)`` with ``θ = |k|‖v‖``, from ``‖v‖²``.

    The geodesic of ``k v`` rotates the pair ``(y, v)`` in its plane by θ; these are the rotation's
    coefficients, exact for every θ (several turns included): ``cos² + (θ sinc θ)² = 1`` to rounding, so the
    rows stay unit; where they point is as precise as θ, i.e. ``‖v‖`` in the math dtype.
    """
    theta = sq_v.sqrt()
    if isinstance(k, Tensor):
        theta.mul_(k.abs())
    elif k != 1.0:
        theta.mul_(abs(k))
    # sin θ/θ from the same θ as cos θ (torch.sinc(θ/π) rounds θ/π: cos² + sin² would be off by θ·2⁻²³);
    # sin θ/θ is exact to rounding for every θ > 0, the limit 1 is only needed at 0
    a = torch.where(theta > 0, torch.sin(theta).div_(theta), 1.0)
    if isinstance(k, Tensor) or k != 1.0:
        a.mul_(k)
    return torch.cos(theta), a, torch.mul(a, sq_v).neg_()


def _geodesic_(
    w: Tensor, v: Tensor, k: Tensor | float, sq_v: Tensor, inv_r: Tensor | None, scratch: Tensor
) -> None:
    """In place: ``w ← exp_y(k v)`` and ``v ← transport of v along k v`` (``y = w·inv_r``, unit rows; ``v``
    tangent at ``y``; ``inv_r`` None when ``w`` is already unit).

    With ``θ = |k|‖v‖`` the pair moves by ``y ← y cos θ + k v sinc θ``, ``v ← v cos θ − k‖v‖² sinc θ · y``: a
    rotation in the plane of ``(y, v)`` that keeps ``‖y‖ = 1`` and ``‖v‖`` for every θ. For SGD-G (k = 1,
    v = d) the second formula is the paper's ``(u cos θ − y sin θ) θ``. Three passes through ``scratch``
    (``k sinc θ · v``; ``v`` in place; ``w`` from ``scratch``), with ``1/‖w‖`` folded into the coefficients —
    the memory traffic of the three in-place shears (``α = k tan(θ/2)/θ``) we used before plus the pass that
    normalized ``w``, without their blow-up at θ = π, 3π, ...
    """
    cos, a, b = _rotation(sq_v, k)
    cos_w, b_w = (cos, b) if inv_r is None else (cos * inv_r, b.mul_(inv_r))
    torch.mul(v, a, out=scratch)  # k sinc θ · v (the old v, for the new y)
    v.mul_(cos).addcmul_(w, b_w)
    torch.addcmul(scratch, w, cos_w, out=w)


def _compiled_tangent(
    w: Tensor,
    g: Tensor,
    omega: float,
    blocks: Sequence[_Block],
    grad_clip: float | None,
    grams: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Functional form of the tangent gradient for torch.compile: ``(y, ĥ, ‖ĥ‖²)``."""
    r = torch.linalg.vector_norm(w, dim=1, keepdim=True)
    y = w * _safe_inverse(r)
    gy = g * r
    if omega:
        n = w.shape[1]
        parts = []
        for b, (start, count, rows) in enumerate(blocks):
            ys = y[start : start + count * rows].view(count, rows, n)
            if grams is not None:  # sharded rows: Y(YᵀY − I) with the mesh-wide YᵀY (see _tangent_)
                cols = grams[b] - torch.eye(n, dtype=y.dtype, device=y.device)
                parts.append(torch.bmm(ys, cols).reshape(count * rows, n))
                continue
            gram = torch.bmm(ys, ys.transpose(1, 2)) - torch.eye(rows, dtype=y.dtype, device=y.device)
            parts.append(torch.bmm(gram, ys).reshape(count * rows, n))
        gy = gy + (2.0 * omega) * torch.cat(parts)
    h = gy - (y * gy).sum(1, keepdim=True) * y
    h2 = (h * h).sum(1, keepdim=True)
    if grad_clip is not None:
        c = _clip_scale(h2, grad_clip)
        h, h2 = h * c, h2 * c.square()
    return y, h, h2


def _compiled_geodesic(y: Tensor, v: Tensor, k: Tensor | float) -> tuple[Tensor, Tensor]:
    cos, a, b = _rotation((v * v).sum(1, keepdim=True), k)
    return y * cos + v * a, v * cos + y * b


def sgdg_rows_(
    w: Tensor,
    g: Tensor,
    tau: Tensor,
    *,
    lr: float | Tensor,
    momentum: float,
    grad_clip: float | None,
    omega: float,
    blocks: Sequence[_Block] = (),
    scratch: Tensor | None = None,
    grams: Sequence[Tensor] | None = None,
) -> None:
    """One SGD-G step on a batch of rows, in place: ``w`` (rows of the weights, any positive scale; left
    unit) and ``tau`` (momentum τ, tangent at ``w/‖w‖``). ``g``: gradient rows (read only). All ``(R, n)``.
    ``blocks``: the tensors' row ranges, for the ω term; ``scratch``: an optional ``(R, n)`` work buffer;
    ``grams``: the ω term's mesh-wide ``YᵀY`` per block when the rows are a shard (see ``_tangent_``)."""
    if torch.compiler.is_compiling():
        # The same formulas written functionally: inductor fuses them into a few loops, and its CPU code
        # generation fails on the in-place sequence below. One multi-tensor copy writes the results.
        # Reading the inputs through one stacked copy keeps inductor from aliasing reads and writes.
        w0, tau0 = torch.stack([w, tau]).unbind(0)
        y, h, _ = _compiled_tangent(w0, g, omega, blocks, grad_clip, grams)
        torch._foreach_copy_([w, tau], list(_compiled_geodesic(y, momentum * tau0 - lr * h, 1.0)))
        return
    scratch = torch.empty_like(w) if scratch is None else scratch
    src, a, b, h2, inv_r = _tangent_(w, g, omega, blocks, scratch, grad_clip is not None, grams)
    step = _clip_scale(h2, grad_clip).mul_(-lr) if grad_clip is not None else -lr
    tau.mul_(momentum).addcmul_(src, a.mul_(step)).addcmul_(w, b.mul_(step))  # d = γτ − ηĥ
    _geodesic_(w, tau, 1.0, _sq_norm(tau), inv_r, scratch)  # w ← exp_y(d), τ ← transport of d along d


def _bias_correction(step: Tensor, beta1: float, beta2: float) -> Tensor:
    """``√(1 − β2ᵗ)/(1 − β1ᵗ)`` in float64, with ``1 − βᵗ = −expm1(t log β)``: in float32, ``1 − 0.99`` keeps
    only 17 bits (a relative error of some 1e-6 on the step size: 1e-5 rad on a step of 10π)."""
    dtype = torch.float32 if step.device.type == "mps" else torch.float64
    t = step.to(dtype)
    log1, log2 = (math.log(b) if b > 0 else -math.inf for b in (beta1, beta2))
    return torch.expm1(t * log2).neg_().sqrt_().div_(torch.expm1(t * log1).neg_())


def adamg_rows_(
    w: Tensor,
    g: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    grad_clip: float | None,
    omega: float,
    blocks: Sequence[_Block] = (),
    scratch: Tensor | None = None,
    grams: Sequence[Tensor] | None = None,
) -> None:
    """One Adam-G step on a batch of rows, in place: ``w`` ``(R, n)``, ``exp_avg`` (m, ``(R, n)``, tangent),
    ``exp_avg_sq`` (v, ``(R, 1)``), ``step`` (t after this step's increment; scalar or ``(R, 1)`` tensor)."""
    bias = _bias_correction(step, beta1, beta2).mul_(-lr).to(w.dtype)
    if torch.compiler.is_compiling():  # see sgdg_rows_
        w0, m0 = torch.stack([w, exp_avg]).unbind(0)
        y, h, h2 = _compiled_tangent(w0, g, omega, blocks, grad_clip, grams)
        m = beta1 * m0 + (1.0 - beta1) * h
        v = beta2 * exp_avg_sq + (1.0 - beta2) * h2
        new_w, new_m = _compiled_geodesic(y, m, bias * (v + eps).rsqrt())
        torch._foreach_copy_([w, exp_avg, exp_avg_sq], [new_w, new_m, v])
        return
    scratch = torch.empty_like(w) if scratch is None else scratch
    src, a, b, h2, inv_r = _tangent_(w, g, omega, blocks, scratch, True, grams)
    if grad_clip is not None:
        c = _clip_scale(h2, grad_clip)
        h2.mul_(c.square())
        a.mul_(c)
        b.mul_(c)
    exp_avg.mul_(beta1).addcmul_(src, a.mul_(1.0 - beta1)).addcmul_(w, b.mul_(1.0 - beta1))
    exp_avg_sq.mul_(beta2).add_(h2, alpha=1.0 - beta2)
    # Δ = k m with k = −η √(1 − β2ᵗ)/(1 − β1ᵗ) / √(v + ε) per row
    k = (exp_avg_sq + eps).rsqrt_().mul_(bias)
    _geodesic_(w, exp_avg, k, _sq_norm(exp_avg), inv_r, scratch)  # w ← exp_y(Δ), m ← transport along Δ


# --- row views of parameters and state -------------------------------------------------------------------


def _memory_order(t: Tensor) -> tuple[int, ...]:
    """Dimension 0, then the others by decreasing stride (so permuted, channels_last is contiguous)."""
    strides = t.stride()
    return (0, *sorted(range(1, t.dim()), key=lambda d: -strides[d]))


class _Rows:
    """Row matrices of one tensor (a view when the layout allows, else a copy written back by ``commit``)."""

    __slots__ = ("perm", "rows", "target")

    def __init__(self, target: Tensor, perm: tuple[int, ...]) -> None:
        permuted = target.permute(perm)
        self.target: Tensor | None = None
        if permuted.is_contiguous():
            self.rows = permuted.view(target.shape[0], -1)
        else:
            self.rows = permuted.reshape(target.shape[0], -1)
            self.target = target
        self.perm = perm

    def commit(self) -> None:
        if self.target is not None:
            permuted = self.target.permute(self.perm)
            permuted.copy_(self.rows.view(permuted.shape))


def _grad_rows(grad: Tensor, perm: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return grad.permute(perm).reshape(grad.shape[0], -1).to(dtype)


# --- the optimizers --------------------------------------------------------------------------------------


def _auto_foreach(params: list[Tensor]) -> bool:
    """Like torch's optimizers: the batched path when every tensor is on an accelerator."""
    return bool(params) and all(p.device.type != "cpu" for p in params)


class _GrassmannBase(PicklableOptimizer):
    """Shared by SGD-G and Adam-G: group validation, the Euclidean (SGD) groups, fp32 state, state loading."""

    _manifold_keys: tuple[str, ...] = ()
    _transient = ("_work",)  # the scratch buffer of the single-tensor path: rebuilt on demand, never saved

    def __init__(self, params: Any, defaults: dict[str, Any], nonfinite: str = "propagate") -> None:
        if defaults.get("maximize"):
            raise ValueError("maximize=True is not supported: minimize the negated objective instead.")
        self._check_group({**defaults, "params": []})  # the defaults, as torch.optim checks them up front
        self.nonfinite = check_policy(type(self).__name__, nonfinite)
        self.skipped_steps = 0
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``Optimizer.add_param_group``; a group with bad settings raises before anything is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        # a generator would be consumed by the check: read it once, hand the list on
        group["params"] = (
            [params] if isinstance(params, Tensor) else params if isinstance(params, set) else list(params)
        )
        checked = {**self.defaults, **group}
        if not isinstance(checked["params"], set):
            self._check_group(checked)
        super().add_param_group(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_lr(name, group["lr"])
        if group.get("maximize"):
            raise ValueError(
                f"{name}: maximize=True is not supported: minimize the negated objective instead."
            )
        check_number(name, "momentum", group["momentum"], 0.0, 1.0, high_open=True)
        if not group["grassmann"]:
            check_number(name, "weight_decay", group["weight_decay"])
            if group["nesterov"] and group["momentum"] <= 0:
                raise ValueError(f"{name}: nesterov=True needs momentum > 0 (Euclidean group).")
            return
        if group["weight_decay"] != 0:
            raise ValueError(
                f"{name}: a Grassmann group (grassmann=True) was given weight_decay={group['weight_decay']}. "
                "Weight decay on scale-invariant weights only changes the effective learning rate (the rows "
                "are kept at unit norm), so the paper uses none: set weight_decay=0 on that group "
                "(grassmann_param_groups does) and keep weight decay for the Euclidean groups."
            )
        if group["grad_clip"] is not None:
            check_number(name, "grad_clip (ν)", group["grad_clip"], low_open=True, why="None turns it off")
        check_number(name, "omega (ω)", group["omega"], why="0 turns the regularizer off")
        for p in group["params"]:
            if p.dim() < 2:
                raise ValueError(
                    f"{name}: a Grassmann parameter of shape {tuple(p.shape)} has no rows; manifold weights "
                    "need at least 2 dimensions (row i = weights of output unit i). Put biases and "
                    "normalization parameters in a grassmann=False group (see grassmann_param_groups)."
                )
            if not p.is_floating_point() or p.is_complex():
                raise ValueError(f"{name}: Grassmann parameters must be real floating point, got {p.dtype}.")

    def _scratch(self, like: Tensor) -> Tensor:
        """A work buffer shaped like ``like``, kept between steps (not optimizer state: never saved) so the
        single-tensor path allocates nothing per step. Its size is that of the largest manifold weight."""
        work: dict[tuple[torch.device, torch.dtype], Tensor] = self.__dict__.setdefault("_work", {})
        key = (like.device, like.dtype)
        buf = work.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = work[key] = torch.empty(like.numel(), device=like.device, dtype=like.dtype)
        return buf[: like.numel()].view(like.shape)

    def _prepare(self, p: Tensor, state: dict[str, Any]) -> tuple[Tensor, torch.dtype]:
        """The tensor holding the rows we update (the parameter, or its fp32 copy) and the math dtype."""
        if p.dtype in _FULL_PRECISION:
            return p, p.dtype
        master = state.get("master")
        if master is None:
            master = state["master"] = p.detach().to(torch.float32, memory_format=torch.preserve_format)
        return master, torch.float32

    def _euclidean_step(self, group: dict[str, Any]) -> None:
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
            params.append(p)
            grads.append(p.grad)
            bufs.append(self.state[p].get("momentum_buffer"))
        if not params:
            return
        foreach = group["foreach"] if group["foreach"] is not None else _auto_foreach(params)
        _torch_sgd(
            params,
            grads,
            bufs,
            foreach=foreach,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=0.0,
            nesterov=group["nesterov"],
            maximize=False,
        )
        if group["momentum"]:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf

    def _manifold_params(self, group: dict[str, Any]) -> list[Tensor]:
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
            out.append(p)
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite != "propagate":
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            if nonfinite_verdict(type(self).__name__, self.nonfinite, params, [p.grad for p in params]):
                self.skipped_steps += 1
                return loss
        for group in self.param_groups:  # before anything changes: rows split across ranks cannot work
            if group["grassmann"]:
                check_rows_local(type(self).__name__, group["params"], "Grassmann (row-wise) math")
        grams = self._sharded_grams()
        for group in self.param_groups:
            if group["grassmann"]:
                params = self._manifold_params(group)
                if params:
                    foreach = group["foreach"] if group["foreach"] is not None else _auto_foreach(params)
                    self._grassmann_step(group, params, foreach, grams)
            else:
                self._euclidean_step(group)
        return loss

    def _sharded_grams(self) -> dict[int, Tensor] | None:
        """For DTensor manifold weights with ω: each tensor's ``YᵀY`` (``n × n``, unit rows, columns in the
        row view's order) summed over all its rows — each shard's, then one all_reduce for every such tensor
        of every group. None when there are none (plain tensors take the batched ``YYᵀ`` form)."""
        params = [
            p
            for group in self.param_groups
            if group["grassmann"] and group["omega"]
            for p in group["params"]
            if p.grad is not None
        ]
        if not any(is_dtensor(p) for p in params):
            return None
        partial = []
        for p in params:
            work = local(self._prepare(p, self.state[p])[0])
            rows = _Rows(work, _memory_order(work)).rows
            y = rows * _safe_inverse(torch.linalg.vector_norm(rows, dim=1, keepdim=True))
            partial.append((y.T @ y).unsqueeze(0))
        return {id(p): g for p, g in zip(params, reduce_partials_each(partial, params, "sum"))}

    def _grassmann_step(
        self, group: dict[str, Any], params: list[Tensor], foreach: bool, grams: dict[int, Tensor] | None
    ) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """As ``Optimizer.state_dict``, plus ``"nonfinite"``: the policy and the ``skipped_steps`` count."""
        sd = super().state_dict()
        sd["nonfinite"] = {"policy": self.nonfinite, "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but the state of manifold weights stays in the math dtype (fp32
        for bf16/fp16 weights; torch would cast it to the parameter's dtype) with the parameter's memory
        layout. Euclidean groups load as in ``torch.optim.SGD`` (their bf16 momentum stays bf16), so a
        resumed run continues bit for bit."""
        saved = state_dict["state"]
        nonfinite = state_dict.get(
            "nonfinite", {"policy": self.nonfinite, "skipped_steps": self.skipped_steps}
        )
        policy = check_policy(type(self).__name__, nonfinite["policy"])
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "nonfinite"})
        self.nonfinite, self.skipped_steps = policy, int(nonfinite["skipped_steps"])
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            if not group["grassmann"]:
                continue
            for pid, p in zip(saved_group["params"], group["params"]):
                if pid not in saved or p not in self.state:
                    continue
                st = self.state[p]
                dtype = p.dtype if p.dtype in _FULL_PRECISION else torch.float32
                for key, value in saved[pid].items():
                    if not isinstance(value, Tensor) or key not in (*self._manifold_keys, "master"):
                        continue
                    if value.shape == p.shape:
                        st[key] = torch.empty_like(p, dtype=dtype).copy_(value)
                    else:
                        st[key] = value.to(device=p.device, dtype=dtype if key != "step" else value.dtype)


def _group_rows(items: list[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    groups: dict[Any, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _blocks(sizes: list[int]) -> list[_Block]:
    """Runs of consecutive tensors with the same number of rows (the ω term is one batched matmul per run)."""
    blocks: list[_Block] = []
    start = 0
    for rows in sizes:
        if blocks and blocks[-1][2] == rows and blocks[-1][0] + blocks[-1][1] * rows == start:
            b = blocks[-1]
            blocks[-1] = (b[0], b[1] + 1, rows)
        else:
            blocks.append((start, 1, rows))
        start += rows
    return blocks


class _Slot:
    """One manifold parameter's rows, gradient rows and state rows for a step."""

    __slots__ = ("dtype", "grad", "master", "n", "param", "rows", "state", "target", "work")

    def __init__(self, opt: _GrassmannBase, p: Tensor, keys: Sequence[str]) -> None:
        # A DTensor parameter (FSDP2: Shard(0), rows whole on this rank) is updated through its local shard;
        # its state is created as DTensors placed like it (so torch.distributed.checkpoint saves it sharded).
        st = opt.state[p]
        work, dtype = opt._prepare(p, st)
        self.master = work is not p
        param, work = local(p), local(work)
        perm = _memory_order(work)
        self.param, self.work, self.dtype = param, work, dtype
        self.target = _Rows(work, perm)
        self.rows = work.shape[0]
        self.n = self.target.rows.shape[1]
        assert p.grad is not None
        self.grad = _grad_rows(local(p.grad), perm, dtype)
        self.state: dict[str, _Rows] = {}
        for key in keys:
            buf = st.get(key)
            if buf is None:
                buf = st[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            buf = local(buf)
            self.state[key] = _Rows(buf, _memory_order(buf))

    def commit(self) -> None:
        self.target.commit()
        for r in self.state.values():
            r.commit()


def _commit(slots: list[_Slot]) -> None:
    """Write back row copies, then the fp32 rows into bf16/fp16 parameters (one foreach copy)."""
    for s in slots:
        s.commit()
    low = [s for s in slots if s.master]
    if low:
        torch._foreach_copy_([s.param for s in low], [s.work for s in low])


def _batched(slots: list[_Slot], update: Callable[..., None], keys: Sequence[str]) -> None:
    """Concatenate the rows of tensors with equal row length, update them in one batch, copy back."""
    slots_sorted = sorted(slots, key=lambda s: s.rows)
    sizes = [s.rows for s in slots_sorted]
    if len(slots_sorted) == 1:
        s = slots_sorted[0]
        update(s.target.rows, s.grad, *(s.state[k].rows for k in keys), blocks=_blocks(sizes))
        return
    w = torch.cat([s.target.rows for s in slots_sorted])
    g = torch.cat([s.grad for s in slots_sorted])
    bufs = [torch.cat([s.state[k].rows for s in slots_sorted]) for k in keys]
    update(w, g, *bufs, blocks=_blocks(sizes))
    torch._foreach_copy_([s.target.rows for s in slots_sorted], list(w.split(sizes)))
    for k, buf in zip(keys, bufs):
        torch._foreach_copy_([s.state[k].rows for s in slots_sorted], list(buf.split(sizes)))


class SGDG(_GrassmannBase):
    """SGD-G (Cho & Lee 2017, Algorithm 1) for ``grassmann=True`` groups, SGD for the others.

    Args:
        params: parameters or param groups (see :func:`grassmann_param_groups`).
        lr: default learning rate for groups that do not set one (η; the paper's ``lr_g`` in Grassmann
            groups, ``lr_e`` in the others). 1e-3 as in ``torch.optim.SGD``; ``grassmann_param_groups``
            sets both.
        momentum: γ (Grassmann) / SGD momentum (Euclidean). The paper uses 0.9 for both.
        nesterov: Nesterov momentum, Euclidean groups only (SGD-G has none in the paper; ignored there).
        weight_decay: Euclidean groups only; a Grassmann group with weight decay raises ``ValueError``.
        grad_clip: ν, the per-row norm threshold of the tangent gradient (None = off; paper: 0.1).
        omega: ω, weight of the orthogonality regularizer (ω/2)‖YYᵀ − I‖² (0 = off; paper: 0.1).
        grassmann: default for groups that do not say.
        foreach: batch the rows of all tensors with equal row length (default: on accelerators only).
        nonfinite: what a step does when a gradient holds NaN or ±inf: ``"propagate"`` (default, as
            ``torch.optim``: the row and its momentum become NaN; no check, no synchronisation), ``"skip"``
            (parameters and state are left untouched for that step, counted in ``skipped_steps``, which the
            ``state_dict`` keeps) or ``"raise"`` (:class:`~normkit.optim.NonFiniteGradientError` before
            anything changes). ``"skip"``/``"raise"`` cost one fused reduction over the gradients and one host
            synchronisation per step.

    State per manifold weight: ``momentum_buffer`` (τ, the parameter's shape; it holds the learning rate as
    in the paper), plus ``master`` (fp32 rows) for bf16/fp16 weights.
    """

    _manifold_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        omega: float = 0.0,
        *,
        grassmann: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        nonfinite: str = "propagate",
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            omega=omega,
            grassmann=grassmann,
            foreach=foreach,
            maximize=maximize,
        )
        super().__init__(params, defaults, nonfinite)

    def _grassmann_step(
        self, group: dict[str, Any], params: list[Tensor], foreach: bool, grams: dict[int, Tensor] | None
    ) -> None:
        slots = [_Slot(self, p, self._manifold_keys) for p in params]
        kwargs = dict(
            lr=group["lr"], momentum=group["momentum"], grad_clip=group["grad_clip"], omega=group["omega"]
        )
        mine = [grams[id(p)] for p in params] if grams is not None and group["omega"] else None
        if foreach and mine is None:
            _multi_tensor_sgdg(slots, **kwargs)
        else:
            _single_tensor_sgdg(self, slots, mine, **kwargs)
        _commit(slots)


def _single_tensor_sgdg(opt: SGDG, slots: list[_Slot], grams: list[Tensor] | None, **kwargs: Any) -> None:
    for i, s in enumerate(slots):
        tau = s.state["momentum_buffer"].rows
        scratch = opt._scratch(s.target.rows)
        gram = None if grams is None else [grams[i]]
        sgdg_rows_(s.target.rows, s.grad, tau, blocks=[(0, 1, s.rows)], scratch=scratch, grams=gram, **kwargs)


def _multi_tensor_sgdg(slots: list[_Slot], **kwargs: Any) -> None:
    def update(w: Tensor, g: Tensor, tau: Tensor, *, blocks: list[_Block]) -> None:
        sgdg_rows_(w, g, tau, blocks=blocks, **kwargs)

    for group in _group_rows(slots, lambda s: (s.work.device, s.dtype, s.n)).values():
        _batched(group, update, ("momentum_buffer",))


class AdamG(_GrassmannBase):
    """Adam-G (Cho & Lee 2017, Algorithm 2) for ``grassmann=True`` groups, SGD for the others.

    Args as :class:`SGDG`, plus ``betas`` (β1, β2; paper: 0.9, 0.99) and ``eps`` (ε inside the square root,
    ``m/√(v + ε)``, as in the paper). ``momentum``/``nesterov``/``weight_decay`` act on Euclidean groups.

    State per manifold weight: ``step`` (a float32 scalar tensor on the parameter's device, so the bias
    corrections need no host synchronisation), ``exp_avg`` (m, the parameter's shape, tangent) and
    ``exp_avg_sq`` (v, one scalar per row: shape ``(rows,)``), plus ``master`` for bf16/fp16 weights.
    """

    _manifold_keys = ("exp_avg", "exp_avg_sq", "step")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        omega: float = 0.0,
        *,
        grassmann: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        nonfinite: str = "propagate",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            omega=omega,
            grassmann=grassmann,
            foreach=foreach,
            maximize=maximize,
        )
        super().__init__(params, defaults, nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_betas("AdamG", group["betas"])
        check_number(
            "AdamG",
            "eps",
            group["eps"],
            low_open=True,
            why="it keeps a denominator away from zero: with eps = 0 a gradient entry or weight row of "
            "zeros gives 0/0 = NaN",
        )

    def _grassmann_step(
        self, group: dict[str, Any], params: list[Tensor], foreach: bool, grams: dict[int, Tensor] | None
    ) -> None:
        steps, slots = [], []
        for p in params:
            st = self.state[p]
            dtype = self._prepare(p, st)[1]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg_sq"] = zeros_rows(p, dtype)  # placed like p's rows (a DTensor for FSDP2)
            steps.append(st["step"])
            slots.append(_Slot(self, p, ("exp_avg",)))
        if foreach:
            torch._foreach_add_(steps, 1.0)
        else:
            for t in steps:
                t.add_(1.0)
        b1, b2 = group["betas"]
        kwargs = dict(
            lr=group["lr"],
            beta1=b1,
            beta2=b2,
            eps=group["eps"],
            grad_clip=group["grad_clip"],
            omega=group["omega"],
        )
        mine = [grams[id(p)] for p in params] if grams is not None and group["omega"] else None
        if foreach and mine is None:
            _multi_tensor_adamg(self, slots, params, **kwargs)
        else:
            _single_tensor_adamg(self, slots, params, mine, **kwargs)
        _commit(slots)


def _single_tensor_adamg(
    opt: AdamG, slots: list[_Slot], params: list[Tensor], grams: list[Tensor] | None, **kwargs: Any
) -> None:
    for i, (s, p) in enumerate(zip(slots, params)):
        st = opt.state[p]
        adamg_rows_(
            s.target.rows,
            s.grad,
            s.state["exp_avg"].rows,
            local(st["exp_avg_sq"]).view(-1, 1),
            st["step"],
            blocks=[(0, 1, s.rows)],
            scratch=opt._scratch(s.target.rows),
            grams=None if grams is None else [grams[i]],
            **kwargs,
        )


def _multi_tensor_adamg(opt: AdamG, slots: list[_Slot], params: list[Tensor], **kwargs: Any) -> None:
    state_of = {id(s): opt.state[p] for s, p in zip(slots, params)}
    for group in _group_rows(slots, lambda s: (s.work.device, s.dtype, s.n)).values():
        group = sorted(group, key=lambda s: s.rows)
        sq = [local(state_of[id(s)]["exp_avg_sq"]).view(-1, 1) for s in group]
        step = torch.cat([state_of[id(s)]["step"].expand(s.rows) for s in group]).unsqueeze(1)
        v = sq[0] if len(group) == 1 else torch.cat(sq)

        def update(
            w: Tensor, g: Tensor, m: Tensor, *, blocks: list[_Block], v: Tensor = v, step: Tensor = step
        ) -> None:
            adamg_rows_(w, g, m, v, step, blocks=blocks, **kwargs)

        _batched(group, update, ("exp_avg",))
        if len(group) > 1:
            torch._foreach_copy_(sq, list(v.split([s.rows for s in group])))


# --- parameter selection and the regularizer --------------------------------------------------------------


def _select_weights(
    model: nn.Module, select: str, example_input: Any = None
) -> tuple[list[nn.Parameter], list[nn.Module]]:
    from normkit import graph as G

    model = G.unwrap_model(model)
    if select == "bn_input":
        g = G.trace(model, example_input)
        commuting = {G.OpKind.IDENTITY, G.OpKind.SCALE_COMMUTING}

        def invariant(name: str) -> bool:
            node = g[name]
            return node.kind in (G.LayerKind.LINEAR, G.LayerKind.CONV) and (
                g.feeds_normalization(name, per_channel=True)
                # ReLU / pooling commute with a positive scale per channel, not once a bias is added first
                or (
                    getattr(node.module, "bias", None) is None
                    and g.traced
                    and g.feeds_normalization(name, per_channel=True, through=commuting)
                )
            )

        chosen = [
            node.module
            for node in g.execution_order((G.LayerKind.LINEAR, G.LayerKind.CONV))
            if invariant(node.name)
            # a shared weight is scale invariant only if every one of its uses is
            and all(
                h is not None and invariant(h)
                for h in G.weight_holders(g, getattr(node.module, "weight", None))  # type: ignore[arg-type]
            )
        ]
    elif select == "undercomplete":
        chosen = [
            m
            for m in model.modules()
            if G.layer_kind(m) is G.LayerKind.CONV and m.weight.shape[0] < m.weight[0].numel()  # type: ignore[index]
        ]
    else:
        raise ValueError(f"select must be 'bn_input' or 'undercomplete', got {select!r}.")
    weights: list[nn.Parameter] = []
    for m in chosen:
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.requires_grad and all(w is not x for x in weights):
            weights.append(w)
    norms = [m for m in model.modules() if G.is_normalization(m)]
    return weights, norms


@torch.no_grad()
def _unit_rows_(w: Tensor) -> None:
    from normkit._dtensor import local, rows_are_local

    if not rows_are_local(w):
        raise ValueError(
            f"unit_init needs each weight row whole on one rank; a weight is sharded as "
            f"{tuple(w.placements)!r}. Use Shard(0) (fully_shard's default) or Replicate(), or "  # type: ignore[attr-defined]
            "grassmann_param_groups(..., unit_init=False) and initialize before sharding."
        )
    w = local(w)  # Shard(0) / Replicate(): every row on this rank is whole, no communication
    rows = w.reshape(w.shape[0], -1)
    norm = torch.linalg.vector_norm(rows.float(), dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    w.div_(norm.view(-1, *([1] * (w.dim() - 1))).to(w.dtype))


def grassmann_param_groups(
    model: nn.Module,
    lr: float,
    lr_g: float,
    weight_decay: float = 5e-4,
    select: str = "bn_input",
    unit_init: bool = True,
    *,
    grad_clip: float | None = None,
    omega: float | None = None,
    example_input: Any = None,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`SGDG` / :class:`AdamG`.

    * ``select="bn_input"``: every conv/linear weight whose every output path goes straight into a per-channel
      normalization layer (BatchNorm, BatchRenorm, InstanceNorm), found by ``normkit.graph.trace`` — those
      are exactly the scale-invariant ones (a weight shared by several layers only if every use is).
      ``select="undercomplete"``: the reference code's rule, conv
      weights with ``out < in·k·k`` (whatever follows them). Transposed convolutions are never chosen (their
      output units are columns, not rows).
    * Groups: the chosen weights (``grassmann=True``, ``lr=lr_g``, no weight decay, and ``grad_clip`` /
      ``omega`` when given); the other weights (``lr``, ``weight_decay``); biases and normalization
      parameters (``lr``, no weight decay). Empty groups are left out.
    * ``unit_init``: the chosen weights are rescaled in place to unit rows (the paper's initialization).
    * ``example_input``: passed to ``normkit.graph.trace`` (needed for models fx cannot trace).
    """
    weights, norms = _select_weights(model, select, example_input)
    chosen = {id(w) for w in weights}
    norm_params = {id(p) for m in norms for p in m.parameters(recurse=False)}
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for p in model.parameters():
        if not p.requires_grad or id(p) in chosen:
            continue
        (no_decay if p.dim() <= 1 or id(p) in norm_params else decay).append(p)
    if unit_init:
        for w in weights:
            _unit_rows_(w)
    grass: dict[str, Any] = {"params": weights, "grassmann": True, "lr": lr_g, "weight_decay": 0.0}
    if grad_clip is not None:
        grass["grad_clip"] = grad_clip
    if omega is not None:
        grass["omega"] = omega
    groups = [
        grass,
        {"params": decay, "grassmann": False, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "grassmann": False, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def orthogonality_penalty(
    model_or_params: nn.Module | Optimizer | Iterable[Tensor], omega: float | None = None
) -> Tensor:
    """The orthogonality regularizer ``Σ (ω/2)‖YYᵀ − I‖²_F`` over manifold weights (``Y``: unit rows), for
    logging (no gradient; the optimizers add its gradient themselves).

    ``model_or_params``: an :class:`SGDG` / :class:`AdamG` (its Grassmann groups, each with its own ω unless
    ``omega`` is given), a model (the ``bn_input`` weights; ``omega`` required) or an iterable of weights
    (``omega`` required).
    """
    pairs: list[tuple[Tensor, float]]
    if isinstance(model_or_params, Optimizer):
        pairs = [
            (p, group["omega"] if omega is None else omega)
            for group in model_or_params.param_groups
            if group.get("grassmann")
            for p in group["params"]
        ]
    else:
        if omega is None:
            raise ValueError("orthogonality_penalty: pass omega= (ω) when giving a model or parameters.")
        params = (
            _select_weights(model_or_params, "bn_input")[0]
            if isinstance(model_or_params, nn.Module)
            else list(model_or_params)
        )
        pairs = [(p, omega) for p in params]
    total: Tensor | None = None
    sharded = [(p, om) for p, om in pairs if is_dtensor(p)]
    if sharded:
        check_rows_local("orthogonality_penalty", [p for p, _ in sharded])
        # ‖YYᵀ − I‖² = ‖YᵀY‖² − 2 tr(YᵀY) + rows, with YᵀY (n × n) summed over the shards: one all_reduce
        grams = []
        for p, _ in sharded:
            rows = local(p.detach())
            rows = rows.reshape(rows.shape[0], -1).to(torch.promote_types(rows.dtype, torch.float32))
            y = rows * _safe_inverse(torch.linalg.vector_norm(rows, dim=1, keepdim=True))
            grams.append(y.T @ y)
        for (p, om), gram in zip(sharded, reduce_partials_each(grams, [p for p, _ in sharded], "sum")):
            term = (gram.square().sum() - 2.0 * gram.diagonal().sum() + p.shape[0]) * (0.5 * om)
            total = term if total is None else total + term.to(total.device)
        pairs = [(p, om) for p, om in pairs if not is_dtensor(p)]
    for p, om in pairs:
        rows = p.detach().reshape(p.shape[0], -1)
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        y = rows * _safe_inverse(torch.linalg.vector_norm(rows, dim=1, keepdim=True))
        gram = y @ y.T
        gram.diagonal().sub_(1.0)
        term = gram.square().sum() * (0.5 * om)
        total = term if total is None else total + term.to(total.device)
    return total if total is not None else torch.zeros(())
