"""Projection onto the sphere around any optimizer: the light-weight relative of SGD-G.

A scale-invariant weight (it feeds a normalization layer) only matters through its direction. SGD-G
(:class:`normkit.optim.SGDG`) moves each unit row along great circles with transported momentum;
:class:`SphereProjection` keeps the inner optimizer's own update (SGD, Adam, AdamW ...) and only puts the
weights back on their sphere after it:

* optionally, before the inner step, the gradient's radial part is removed (``project_grad=True``):
  ``g ← g − ŵ⟨ŵ, g⟩`` with ``ŵ = w/‖w‖`` — the Riemannian gradient on the sphere;
* after the inner step, each unit is rescaled to its norm before the step (``radius=None``, so weight decay
  and the radial part of momentum cannot change it) or to a fixed ``radius`` (e.g. 1).

Sharded models (FSDP2 ``fully_shard``, DTensor parameters): row units (``Shard(0)`` / ``Replicate()``) are
handled on the local shards with no communication; whole-tensor units need two all_reduce per step (the
norms, with ``project_grad`` the radial parts, before the inner step; the norms after it).

A unit is a row ``w.reshape(out, -1)`` (an output channel: weights feeding a per-channel normalization) or
a whole tensor (weights feeding LayerNorm / GroupNorm). Given a ``model``, the units come from
:func:`normkit.optim.scale_invariant_weights` (the graph); or pass ``rows=`` / ``tensors=`` explicitly. A
zero row stays zero. The wrapper *is* an optimizer sharing ``param_groups``, ``state`` and ``defaults`` with
the inner one (schedulers and ``GradScaler`` work through it); all arithmetic is multi-tensor and sync-free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from normkit._dtensor import check_rows_local, is_dtensor, local, reduce_partials
from normkit.optim._checks import check_number
from normkit.optim._wrapper import OptimizerWrapper, check_wrappable

__all__ = ["SphereProjection"]

_STATE_KEY = "normkit_sphere"


def _unit_norms(tensors: list[Tensor], per_row: bool) -> list[Tensor]:
    """The norm of each unit, shaped to broadcast against its tensor."""
    if per_row:
        return [torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True) for t in tensors]
    return [n.view([1] * t.dim()) for n, t in zip(torch._foreach_norm(tensors), tensors)]


def _safe_inverse(x: Tensor) -> Tensor:
    tiny = torch.finfo(x.dtype).tiny
    return torch.where(x > tiny, x.clamp_min(tiny).reciprocal(), torch.zeros_like(x))


def remove_radial_(grads: list[Tensor], params: list[Tensor], per_row: bool) -> None:
    """``g ← g − w⟨w, g⟩/‖w‖²`` per unit, in place."""
    if not grads:
        return
    if per_row:
        dots = [torch.mul(g, w).sum(tuple(range(1, w.dim())), keepdim=True) for g, w in zip(grads, params)]
    else:
        dots = [torch.mul(g, w).sum().view([1] * w.dim()) for g, w in zip(grads, params)]
    sq = [n.square() for n in _unit_norms(params, per_row)]
    coefs = [d.mul_(_safe_inverse(s)) for d, s in zip(dots, sq)]
    torch._foreach_addcmul_(grads, params, coefs, value=-1.0)


def renormalize_(params: list[Tensor], targets: list[Tensor] | float, per_row: bool) -> None:
    """Rescale each unit of ``params`` to norm ``targets`` (one per unit, or a number), in place."""
    if not params:
        return
    norms = _unit_norms(params, per_row)
    if isinstance(targets, float):
        scales = [_safe_inverse(n).mul_(targets) for n in norms]
    else:
        scales = [_safe_inverse(n).mul_(t) for n, t in zip(norms, targets)]
    torch._foreach_mul_(params, scales)


def _sharded_step(
    inner: torch.optim.Optimizer,
    rows: list[Tensor],
    whole: list[Tensor],
    radius: float | None,
    project_grad: bool,
) -> None:
    """The step on DTensor weights: rows whole on a rank (``Shard(0)``/``Replicate()``) are handled on the
    local shards; whole-tensor units need sums over the mesh: before the step ``⟨g, w⟩`` and ``‖w‖²`` of all
    of them in one all_reduce, after it ``‖w‖²`` in one more."""
    rows_l = [local(p) for p in rows]
    whole_l = [local(p) for p in whole]

    def whole_sq(extra: list[Tensor]) -> list[Tensor]:
        sq = [(w * w).sum() for w in whole_l] + extra
        total = reduce_partials(torch.stack(sq), whole * (len(sq) // len(whole)), "sum")
        return list(total.unbind())

    if project_grad:
        remove_radial_([local(p.grad) for p in rows], rows_l, True)  # type: ignore[arg-type]
    before_whole: list[Tensor] | None = None
    if whole:
        grads = [local(p.grad) for p in whole]  # type: ignore[arg-type]
        dots = [torch.mul(g, w).sum() for g, w in zip(grads, whole_l)] if project_grad else []
        sums = whole_sq(dots)
        sq = sums[: len(whole)]
        if project_grad:
            coefs = [
                d.mul(_safe_inverse(n)).view([1] * w.dim())
                for d, n, w in zip(sums[len(whole) :], sq, whole_l)
            ]
            torch._foreach_addcmul_(grads, whole_l, coefs, value=-1.0)
        before_whole = [n.sqrt().view([1] * w.dim()) for n, w in zip(sq, whole_l)]
    before_rows = _unit_norms(rows_l, True) if radius is None and rows else None
    inner.step()
    if rows:
        renormalize_(rows_l, before_rows if before_rows is not None else float(radius or 0.0), True)
    if whole:
        now = [n.sqrt().view([1] * w.dim()) for n, w in zip(whole_sq([]), whole_l)]
        goal = before_whole if radius is None else [torch.full_like(n, float(radius)) for n in now]
        assert goal is not None
        torch._foreach_mul_(whole_l, [_safe_inverse(n).mul_(t) for n, t in zip(now, goal)])


class SphereProjection(OptimizerWrapper):
    """Keep scale-invariant weights on their sphere around any optimizer's step.

    Args:
        optimizer: the inner ``torch.optim.Optimizer`` (``param_groups``, ``state``, ``defaults`` shared).
        model: pick the units from the graph (:func:`normkit.optim.scale_invariant_weights`).
        rows: weights renormalized per output unit (instead of ``model``).
        tensors: weights renormalized as a whole (instead of ``model``).
        radius: ``None`` (default) keeps each unit's norm from before the step; a number sets it.
        project_grad: remove the gradient's radial part before the inner step (in place on ``.grad``).
        example_input: passed to :func:`normkit.graph.trace` with ``model``.

    Example::

        opt = SphereProjection(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        *,
        rows: Iterable[Tensor] | None = None,
        tensors: Iterable[Tensor] | None = None,
        radius: float | None = None,
        project_grad: bool = False,
        example_input: Any = None,
    ) -> None:
        check_wrappable("SphereProjection", optimizer)
        if radius is not None:
            check_number(
                "SphereProjection",
                "radius",
                radius,
                low_open=True,
                why="None keeps each unit's norm; an infinite radius would make every weight inf or NaN",
            )
        if model is not None and (rows is not None or tensors is not None):
            raise ValueError("give either model= (units from the graph) or rows= / tensors=, not both")
        if model is None and rows is None and tensors is None:
            raise ValueError("give model= (units from the graph) or the weights as rows= and/or tensors=")
        row_list: list[Tensor]
        tensor_list: list[Tensor]
        if model is not None:
            from normkit.optim.adamp import scale_invariant_weights

            found = scale_invariant_weights(model, example_input)
            row_list, tensor_list = list(found[0]), list(found[1])
        else:
            row_list, tensor_list = list(rows or ()), list(tensors or ())
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for p in row_list + tensor_list:
            if id(p) not in owned:
                raise ValueError(
                    f"a weight of shape {tuple(p.shape)} is not among the inner optimizer's parameters"
                )
        if len({id(p) for p in row_list + tensor_list}) != len(row_list) + len(tensor_list):
            raise ValueError("a weight is listed twice (rows and tensors must be disjoint)")
        for p in row_list:
            if p.dim() < 2:
                raise ValueError(f"rows= takes matrices or kernels, got a tensor of shape {tuple(p.shape)}")
        self.rows: list[Tensor] = row_list
        self.tensors: list[Tensor] = tensor_list
        self.radius = None if radius is None else float(radius)
        self.project_grad = bool(project_grad)
        self._wrap(optimizer)

    def _settings_repr(self) -> str:
        return (
            f"rows={len(self.rows)}, tensors={len(self.tensors)}, radius={self.radius}, "
            f"project_grad={self.project_grad}"
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` (if any), remove the radial gradient (``project_grad``), take the inner step,
        put the units back on their spheres."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        units = [(p, True) for p in self.rows if p.grad is not None]
        units += [(p, False) for p in self.tensors if p.grad is not None]
        rows = [p for p, per_row in units if per_row]
        whole = [p for p, per_row in units if not per_row]
        if any(is_dtensor(p) for p, _ in units):
            check_rows_local("SphereProjection", rows, "renormalizing each row (rows=)")
            with torch.no_grad():
                _sharded_step(self.inner, rows, whole, self.radius, self.project_grad)
            return loss
        with torch.no_grad():
            if self.project_grad:
                remove_radial_([p.grad for p in rows], rows, True)  # type: ignore[misc]
                remove_radial_([p.grad for p in whole], whole, False)  # type: ignore[misc]
            before_rows = _unit_norms(rows, True) if self.radius is None and rows else None
            before_whole = _unit_norms(whole, False) if self.radius is None and whole else None
        self.inner.step()
        with torch.no_grad():
            renormalize_(rows, before_rows if before_rows is not None else float(self.radius or 0.0), True)
            renormalize_(
                whole, before_whole if before_whole is not None else float(self.radius or 0.0), False
            )
        return loss

    # ---- state_dict ------------------------------------------------------------------------------------

    def _index(self) -> dict[int, int]:
        index: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        return index

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's ``state_dict`` plus the wrapper's settings under ``"normkit_sphere"``."""
        sd = self.inner.state_dict()
        index = self._index()
        sd[_STATE_KEY] = {
            "radius": self.radius,
            "project_grad": self.project_grad,
            "rows": [index[id(p)] for p in self.rows],
            "tensors": [index[id(p)] for p in self.tensors],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the inner state and the wrapper's settings (checked before anything is changed)."""
        state_dict = dict(state_dict)
        settings = state_dict.pop(_STATE_KEY, None)
        new: tuple[list[Tensor], list[Tensor]] | None = None
        if settings is not None:
            params = list({id(p): p for g in self.param_groups for p in g["params"]}.values())
            wanted = list(settings["rows"]) + list(settings["tensors"])
            if any(not 0 <= i < len(params) for i in wanted):
                raise ValueError(
                    "the state_dict names sphere units this optimizer does not have (from another model?)"
                )
            new = ([params[i] for i in settings["rows"]], [params[i] for i in settings["tensors"]])
            if any(p.dim() < 2 for p in new[0]):
                raise ValueError("the state_dict's row units do not match this optimizer's parameters")
        self.inner.load_state_dict(state_dict)
        if settings is not None and new is not None:
            self.rows, self.tensors = new
            self.radius = settings["radius"]
            self.project_grad = bool(settings["project_grad"])
