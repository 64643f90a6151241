"""Block-normalized and clipped gradients around any ``torch.optim`` optimizer.

Yu et al. 2017 (arXiv 1707.04822); adaptive gradient clipping: Brock et al. 2021 (arXiv 2102.06171).

:class:`NormalizedOptimizer` replaces the gradient ``g`` of each block by ``g / (N(g) + ε)``,
:class:`ClippedOptimizer` by ``g · min(1, c / (N(g) + ε))`` (or, ``relative=True``, with
``c = clip_factor · max(N(W), weight_eps)`` of the block's weights), and then lets the wrapped optimizer take
its own step (momentum, Adam moments ...) on the transformed gradients. ``N`` is a norm of
:mod:`normkit.optim.norms`; the ε is added once, to the norm. The transform is done **in place on
``.grad``** (like ``torch.nn.utils.clip_grad_norm_``): after ``step`` the gradients are the transformed ones.

Blocks (``granularity``):

* ``"tensor"`` — each parameter tensor (the original Keras code's behaviour);
* ``"layer"`` — all parameters owned directly by one module of ``model`` (the paper's block); a parameter
  that no module of ``model`` owns is a block of its own; a shared parameter belongs to the first module;
* ``"unit"`` — each output unit: row ``i`` of ``W.reshape(W.shape[0], -1)`` (a Linear row, a conv filter; for
  transposed convolutions the first dimension is the *input* channel); a vector or scalar is one unit;
* ``"global"`` — all gradients together (like ``clip_grad_norm_``).

The wrappers *are* optimizers and share ``param_groups``, ``state`` and ``defaults`` with the inner one, so
an LR scheduler built on the wrapper drives the inner learning rate, and ``GradScaler.unscale_`` /
``GradScaler.step`` see the same gradients.

Sharded models (FSDP2 ``fully_shard``, DTensor parameters): the norms come from the local shards. A unit
(row of a matrix sharded on dim 0) is whole on a rank: no communication. Blocks spanning ranks (a sharded
tensor, a layer, all gradients, a vector's one unit) merge each shard's statistics exactly: every block of
the step in **one** all_reduce (SUM for the l1/l2/std families, MAX for ``max`` / ``min_max``; AGC's
weight norms ride along). A custom norm needs the whole block and is refused on a block split across ranks
(built-in norms, or ``"unit"``, work); rows split across ranks (``Shard(1)``) are refused under ``"unit"``.

Non-finite gradients (``nonfinite=``): ``"propagate"`` (default) transforms and steps as given — one NaN
makes its whole block NaN (with ``"global"``, every gradient); ``"skip"`` leaves parameters, gradients and the
inner optimizer's state untouched for that step and counts it in ``skipped_steps``; ``"raise"`` raises
:class:`~normkit.optim.NonFiniteGradientError` before anything changes. The same policy applies to a block
whose *norm* is NaN or inf although its gradients are finite (a custom norm can return one, a float32 sum can
overflow): it is checked before any gradient is scaled. ``"skip"`` and ``"raise"`` cost two fused reductions
(the gradients, then the norms) and two host synchronisations per step; ``"propagate"`` none.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from normkit._dtensor import (
    check_rows_local,
    host_to_device,
    is_dtensor,
    local,
    needs_reduction,
    placement_error,
    reduce_partials,
)
from normkit.optim._checks import check_number
from normkit.optim._nonfinite import check_policy, nonfinite_norms_verdict, nonfinite_verdict
from normkit.optim._wrapper import OptimizerWrapper, check_wrappable
from normkit.optim.norms import (
    Norm,
    NormFn,
    Stats,
    combine_stats,
    finish,
    get_norm,
    num_units,
    row_stats,
    tensor_stats,
    unit_stats,
)

__all__ = ["ClippedOptimizer", "Granularity", "NormalizedOptimizer"]

Granularity = Literal["tensor", "layer", "unit", "global"]
_GRANULARITIES = ("tensor", "layer", "unit", "global")
_STATE_KEY = "normkit_wrapper"


_SMALL = 4096  # tensors up to this many elements are stacked by shape and reduced in one kernel per shape


class _Plan:
    """The layout of one set of gradients, cached between steps: device/dtype groups (each ordered with its
    small tensors first, bucketed by shape), blocks, element counts, and per group a buffer for the scales
    with its 0-dim views (made once: unbinding a fresh tensor every step costs as much as the multiply)."""

    def __init__(
        self, grads: list[Tensor], granularity: str, block_of: list[int], bucket: bool = True
    ) -> None:
        self.granularity = granularity
        self.dtensor = any(is_dtensor(g) for g in grads)  # sharded models take _transform_dtensor
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, g in enumerate(grads):
            if g.is_sparse:
                raise RuntimeError(
                    "normalized/clipped optimizers do not support sparse gradients (an nn.Embedding with "
                    "sparse=True?); use dense gradients or exclude=[that parameter]"
                )
            groups.setdefault((g.device, g.dtype), []).append(i)
        self.groups: list[list[int]] = []
        self.buckets: list[list[int]] = []
        for idx in groups.values():
            by_shape: dict[torch.Size, list[int]] = {}
            for i in idx:
                by_shape.setdefault(grads[i].shape, []).append(i)
            runs = [r for n, r in by_shape.items() if bucket and n.numel() <= _SMALL and len(r) > 1]
            taken = {i for r in runs for i in r}
            self.groups.append([i for r in runs for i in r] + [i for i in idx if i not in taken])
            self.buckets.append([len(r) for r in runs])
        self.checks = [(idx[0], grads[idx[0]].device, grads[idx[0]].dtype) for idx in self.groups]
        self.complex = [grads[idx[0]].is_complex() for idx in self.groups]
        self._scale_buffers: list[Tensor | None] = [None] * len(self.groups)
        self._scale_views: list[list[Tensor]] = [[] for _ in self.groups]
        self.counts = [
            torch.tensor([float(grads[i].numel()) for i in idx], device=grads[idx[0]].device)
            for idx in self.groups
        ]
        if granularity == "unit":
            # per group: units per tensor, each unit's element count, the shape a tensor's scales take
            self.units = [[num_units(grads[i]) for i in idx] for idx in self.groups]
            self.unit_counts = [
                torch.tensor(
                    [float(grads[i].numel() // u) for i, u in zip(idx, units) for _ in range(u)],
                    device=grads[idx[0]].device,
                )
                for idx, units in zip(self.groups, self.units)
            ]
            self.scale_shapes = [
                [
                    (u,) + (1,) * (grads[i].ndim - 1) if grads[i].ndim >= 2 else (1,) * grads[i].ndim
                    for i, u in zip(idx, units)
                ]
                for idx, units in zip(self.groups, self.units)
            ]
        if granularity in ("layer", "global"):
            order = [i for idx in self.groups for i in idx]
            ids: dict[int, int] = {}
            seg = [ids.setdefault(block_of[i], len(ids)) for i in order]
            self.num_blocks = len(ids)
            self.home = grads[order[0]].device
            self.segments = torch.tensor(seg, dtype=torch.long, device=self.home)
            self.all_counts = torch.cat([c.to(self.home) for c in self.counts])
            self.blocks: list[list[int]] = [[] for _ in range(self.num_blocks)]
            for i, s in zip(order, seg):
                self.blocks[s].append(i)

    def scale_views(self, k: int, scales: Tensor) -> list[Tensor]:
        """``scales`` (group ``k``, one per tensor) as a list of 0-dim tensors for ``_foreach_mul_``."""
        buf = self._scale_buffers[k]
        if buf is None or buf.dtype != scales.dtype or buf.device != scales.device:
            buf = self._scale_buffers[k] = torch.empty_like(scales)
            self._scale_views[k] = list(buf.unbind())
        buf.copy_(scales)
        return self._scale_views[k]

    def valid_for(self, grads: list[Tensor]) -> bool:
        """Cheap check that the gradients still have the devices/dtypes the plan was made for."""
        return all(grads[i].device == d and grads[i].dtype == t for i, d, t in self.checks)


def _layer_index(model: nn.Module | None) -> dict[int, int]:
    """``id(parameter)`` → position of the first module of ``model`` that owns it (the "layer" blocks)."""
    layer_of: dict[int, int] = {}
    if model is not None:
        for index, module in enumerate(model.modules()):
            for p in module.parameters(recurse=False):
                layer_of.setdefault(id(p), index)
    return layer_of


class _GradientTransform(OptimizerWrapper):
    """Common machinery of :class:`NormalizedOptimizer` and :class:`ClippedOptimizer`."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        normalization: str | NormFn = "l2",
        granularity: Granularity = "tensor",
        eps: float = 1e-7,
        *,
        model: nn.Module | None = None,
        exclude: Iterable[Tensor | nn.Module] = (),
        return_norms: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "propagate",
    ) -> None:
        check_wrappable(type(self).__name__, optimizer)
        if granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
        if granularity == "layer" and model is None:
            raise ValueError(
                'granularity="layer" needs the model: pass model=... (its modules are the blocks)'
            )
        check_number(
            type(self).__name__,
            "eps",
            eps,
            low_open=True,
            why="it is added to every block's norm, and a block of zeros has norm 0 (with eps = 0 its "
            "gradient would become 0/0 = NaN)",
        )
        self.nonfinite = check_policy(type(self).__name__, nonfinite)
        self.skipped_steps = 0
        self.norm: Norm = get_norm(normalization)
        self.granularity: str = granularity
        self.eps = float(eps)
        self.foreach = True if foreach is None else bool(foreach)
        self.return_norms = return_norms
        self.last_norms: dict[Tensor, Tensor] = {}
        self.model = model
        self._excluded: set[int] = set()
        for item in exclude:
            if isinstance(item, nn.Module):
                self._excluded.update(id(p) for p in item.parameters())
            elif isinstance(item, Tensor):
                self._excluded.add(id(item))
            else:
                raise TypeError(f"exclude takes parameters or modules, got {type(item).__name__}")
        self._layer_of = _layer_index(model)
        self._reset_caches()
        self._candidates_version = 0
        self._wrap(optimizer)

    # caches of the step (rebuilt on demand): never pickled or copied
    _transient = ("_plan", "_plan_key", "_candidates_key", "_candidates_list")

    def _reset_caches(self) -> None:
        self._plan: _Plan | None = None
        self._plan_key: tuple[Any, ...] | None = None
        self._candidates_key: tuple[tuple[int, int], ...] | None = None
        self._candidates_list: list[Tensor] = []

    def _unique_params(self) -> list[Tensor]:
        return list({id(p): p for group in self.param_groups for p in group["params"]}.values())

    def _getstate_extra(self) -> dict[str, Any]:
        # ``_excluded`` and ``_layer_of`` hold id()s, which a copy does not keep: save positions instead
        position = {id(p): i for i, p in enumerate(self._unique_params())}
        return {"_excluded": sorted(position[i] for i in self._excluded if i in position), "_layer_of": None}

    def _setstate_extra(self) -> None:
        unique = self._unique_params()
        self._excluded = {id(unique[i]) for i in self.__dict__["_excluded"]}
        self._layer_of = _layer_index(self.model)
        self._reset_caches()

    def _kind(self) -> str:
        """The wrapper's name in a ``state_dict``: the public class a subclass (e.g. timm's
        ``NormalizedSGD``) derives from, so that either loads the other's state."""
        for cls in type(self).__mro__:
            if cls.__name__ in ("NormalizedOptimizer", "ClippedOptimizer") and cls.__module__ == __name__:
                return cls.__name__
        return type(self).__name__

    def _settings_repr(self) -> str:
        out = f"normalization={self.norm.name!r}, granularity={self.granularity!r}, eps={self.eps:g}"
        return out + (f", nonfinite={self.nonfinite!r}" if self.nonfinite != "propagate" else "")

    # ---- step ------------------------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` (if any) first, transform the gradients in place, then step the inner one.

        The closure is not passed on, so a re-evaluation cannot undo the transform (optimizers that need to
        re-evaluate the closure, such as L-BFGS, are not supported).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite != "propagate":
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            if nonfinite_verdict(type(self).__name__, self.nonfinite, params, [p.grad for p in params]):
                self.skipped_steps += 1
                return loss
        with torch.no_grad():
            if not self._transform():
                self.skipped_steps += 1
                return loss
        self.inner.step()
        return loss

    def _scales(self, norms: Tensor, params: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _needs_param_norms(self) -> bool:
        return False

    def _candidates(self) -> list[Tensor]:
        """The parameters that may be transformed (not excluded, not empty), cached per group structure."""
        key = tuple((id(g["params"]), len(g["params"])) for g in self.param_groups)
        if key != self._candidates_key:
            seen: set[int] = set()
            self._candidates_list = []
            for group in self.param_groups:
                for p in group["params"]:
                    if id(p) not in self._excluded and id(p) not in seen and p.numel() > 0:
                        seen.add(id(p))
                        self._candidates_list.append(p)
            self._candidates_key = key
            self._candidates_version += 1
        return self._candidates_list

    def _collect(self) -> tuple[list[Tensor], list[Tensor], tuple[int, ...] | None]:
        """The parameters with gradients, their gradients and a plan key (None: all candidates)."""
        params = self._candidates()
        grads = [p.grad for p in params]
        if not any(g is None for g in grads):
            return params, grads, None  # type: ignore[return-value]
        present = [(p, g) for p, g in zip(params, grads) if g is not None]
        return [p for p, _ in present], [g for _, g in present], tuple(id(p) for p, _ in present)

    def _get_plan(self, params: list[Tensor], grads: list[Tensor], key: tuple[int, ...] | None) -> _Plan:
        full_key = (self._candidates_version, key)
        if self._plan is None or full_key != self._plan_key or not self._plan.valid_for(grads):
            next_block = len(self._layer_of) + 1 + 10**9
            block_of = []
            for i, p in enumerate(params):
                if self.granularity == "global":
                    block_of.append(0)
                elif self.granularity == "layer" and id(p) in self._layer_of:
                    block_of.append(self._layer_of[id(p)])
                else:
                    block_of.append(next_block + i)
            bucket = self.foreach and self.norm.needs is not None
            self._plan = _Plan(grads, self.granularity, block_of, bucket)
            self._plan_key = full_key
        return self._plan

    def _transform(self) -> bool:
        """Transform the gradients in place; False when the nonfinite policy refuses the step (a block's
        norm is NaN/inf: a custom norm can return one for finite gradients) and nothing was changed."""
        params, grads, key = self._collect()
        if not grads:
            self.last_norms = {}
            return True
        plan = self._get_plan(params, grads, key)
        if plan.dtensor:
            return self._transform_dtensor(params, grads)
        weights = [p.detach() for p in params] if self._needs_param_norms() else None
        if plan.granularity == "unit":
            norms = [self._unit_norms(plan, k, [grads[i] for i in idx]) for k, idx in enumerate(plan.groups)]
            wnorms = (
                [self._unit_norms(plan, k, [weights[i] for i in idx]) for k, idx in enumerate(plan.groups)]
                if weights is not None
                else None
            )
            if self._refuse_norms(norms + (wnorms or [])):
                return False
            for k, idx in enumerate(plan.groups):
                s = self._scales(norms[k], wnorms[k] if wnorms is not None else None)
                scales = [v.view(shape) for v, shape in zip(s.split(plan.units[k]), plan.scale_shapes[k])]
                torch._foreach_mul_([grads[i] for i in idx], scales)
        else:
            norms = self._grouped_norms(plan, grads)
            wnorms = self._grouped_norms(plan, weights) if weights is not None else None
            if self._refuse_norms(norms + (wnorms or [])):
                return False
            for k, idx in enumerate(plan.groups):
                s = self._scales(norms[k], wnorms[k] if wnorms is not None else None)
                if plan.complex[k]:
                    s = s.to(grads[idx[0]].real.dtype)
                torch._foreach_mul_([grads[i] for i in idx], plan.scale_views(k, s))
        if self.return_norms:
            if plan.granularity == "unit":
                self.last_norms = {
                    params[i]: n
                    for k, idx in enumerate(plan.groups)
                    for i, n in zip(idx, norms[k].split(plan.units[k]))
                }
            else:
                self.last_norms = {
                    params[i]: n for k, idx in enumerate(plan.groups) for i, n in zip(idx, norms[k].unbind())
                }
        return True

    def _refuse_norms(self, norms: list[Tensor]) -> bool:
        """The nonfinite policy applied to the blocks' norms (a custom norm may return NaN for finite
        gradients): True when the step must be skipped. Nothing to check, and no synchronisation, under
        ``"propagate"``."""
        if self.nonfinite == "propagate" or not norms:
            return False
        return nonfinite_norms_verdict(type(self).__name__, self.nonfinite, self.norm.name, norms)

    def _transform_dtensor(self, params: list[Tensor], grads: list[Tensor]) -> bool:
        """The transform on DTensor parameters (FSDP2, tensor parallel): every norm from the local shards.

        A row (``"unit"``) is whole on a rank under ``Shard(0)`` / ``Replicate()``: its norm is local. A block
        of whole tensors (``"tensor"``, ``"layer"``, ``"global"``, and a vector's single unit) is merged from
        each shard's statistics: the sums (``Σ|x|``, ``Σx²``, ``Σx`` and the spread) of every sharded tensor
        of the step in one ``all_reduce`` (SUM), ``max|x|`` and ``min|x|`` in one (MAX) — one collective per
        step for every built-in norm (``max`` and ``min_max`` use the MAX one, the others the SUM one), the
        weights' norms of adaptive clipping included. No host synchronisation. With ``return_norms`` a
        tensor's unit norms are those of this rank's rows."""
        nrm = self.norm
        owner = type(self).__name__
        unit = self.granularity == "unit"
        g_loc = [local(g) for g in grads]
        w_loc = [local(p.detach()) for p in params] if self._needs_param_norms() else None
        row_idx = [i for i, g in enumerate(grads) if unit and g.ndim >= 2]
        rows = set(row_idx)
        whole_idx = [i for i in range(len(grads)) if i not in rows]
        # checks first: nothing is changed when one fails
        check_rows_local(owner, [grads[i] for i in row_idx], 'the "unit" granularity')
        if not nrm.builtin:
            for i in whole_idx:
                if needs_reduction(grads[i]):
                    raise placement_error(
                        owner,
                        grads[i],
                        f"the custom norm {nrm.name!r} needs the whole block, which is split across ranks",
                        'Use a built-in norm (they reduce across the mesh), granularity="unit" on matrices '
                        "sharded on dim 0, or replicate the parameter.",
                    )
        # blocks of whole tensors
        if self.granularity == "global":
            seg = [0] * len(whole_idx)
        elif self.granularity == "layer":
            ids: dict[int, int] = {}
            seg = [ids.setdefault(self._layer_of.get(id(params[i]), -1 - i), len(ids)) for i in whole_idx]
        else:
            seg = list(range(len(whole_idx)))
        num_blocks = len(set(seg))
        tensor_sets = [g_loc] if w_loc is None else [g_loc, w_loc]
        block_norms: list[Tensor] = []
        if whole_idx:
            sources = [params[i] for i in whole_idx]
            if nrm.builtin:
                assert nrm.needs is not None
                counts = [float(grads[i].numel()) for i in whole_idx]
                block_norms = _sharded_block_norms(
                    nrm, [[ts[i] for i in whole_idx] for ts in tensor_sets], sources, counts, seg, num_blocks
                )
            else:
                home = g_loc[whole_idx[0]].device
                for ts in tensor_sets:
                    members: list[list[Tensor]] = [[] for _ in range(num_blocks)]
                    for i, s in zip(whole_idx, seg):
                        members[s].append(ts[i].reshape(-1).to(home))
                    block_norms.append(
                        torch.stack([torch.as_tensor(nrm.fn(torch.cat(m)), device=home) for m in members])
                    )
        targets: list[Tensor] = []
        factors: list[Tensor] = []
        norms_of: dict[Tensor, Tensor] = {}
        if whole_idx:
            scales = self._scales(block_norms[0], block_norms[1] if w_loc is not None else None)
            per_tensor = scales[host_to_device(seg, torch.long, scales.device)]
            for k, (i, s) in enumerate(zip(whole_idx, seg)):
                targets.append(g_loc[i])
                factors.append(per_tensor[k].to(g_loc[i].device, g_loc[i].real.dtype))
                norms_of[params[i]] = block_norms[0][s]
        for i in row_idx:
            x = g_loc[i]
            n_row = float(grads[i].shape[1:].numel())
            unit_norms = self._local_row_norms(x, n_row)
            w_norms = self._local_row_norms(w_loc[i], n_row) if w_loc is not None else None
            unit_scales = self._scales(unit_norms, w_norms)
            targets.append(x)
            factors.append(unit_scales.view((-1,) + (1,) * (x.ndim - 1)).to(x.real.dtype))
            norms_of[params[i]] = unit_norms
        if self._refuse_norms(block_norms + list(norms_of.values())):
            return False
        if targets:
            torch._foreach_mul_(targets, factors)
        self.last_norms = norms_of if self.return_norms else {}
        return True

    def _local_row_norms(self, x: Tensor, n_row: float) -> Tensor:
        """The norm of every row of a local shard whose rows are whole (``n_row`` elements each)."""
        nrm = self.norm
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=x.real.dtype, device=x.device)
        if nrm.needs is None:
            return self._row_norms(x)
        stats = row_stats(x, nrm.needs)
        return finish(nrm.name, stats, n_row)

    def _unit_norms(self, plan: _Plan, k: int, tensors: list[Tensor]) -> Tensor:
        """The norm of every unit of group ``k``'s tensors, concatenated (tensors of one small shape
        stacked into one reduction)."""
        nrm = self.norm
        if nrm.needs is None:
            return torch.cat([self._row_norms(x) for x in tensors])
        stats = unit_stats(tensors, nrm.needs, buckets=plan.buckets[k])
        return finish(nrm.name, stats, plan.unit_counts[k].to(stats[next(iter(stats))].dtype))

    def _row_norms(self, x: Tensor) -> Tensor:
        """A custom norm of every unit of ``x``."""
        nrm = self.norm
        rows_view = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
        try:
            return torch.vmap(nrm.fn)(rows_view)
        except Exception:  # a function vmap cannot batch: one call per unit
            return torch.stack([torch.as_tensor(nrm.fn(r), device=x.device) for r in rows_view])

    def _grouped_norms(self, plan: _Plan, tensors: Sequence[Tensor]) -> list[Tensor]:
        """For each device/dtype group, the norm of the block of each of its tensors (a 1-D tensor)."""
        nrm = self.norm
        if plan.granularity == "tensor":
            out = []
            for idx, counts, buckets in zip(plan.groups, plan.counts, plan.buckets):
                ts = [tensors[i] for i in idx]
                if nrm.needs is None:
                    out.append(torch.stack([torch.as_tensor(nrm.fn(t), device=t.device) for t in ts]))
                else:
                    stats = tensor_stats(ts, nrm.needs, foreach=self.foreach, buckets=buckets)
                    out.append(finish(nrm.name, stats, counts.to(stats[next(iter(stats))].dtype)))
            return out
        # "layer" / "global": merge per-tensor statistics into blocks on the home device.
        if nrm.needs is None:
            block_norms = torch.stack(
                [
                    torch.as_tensor(
                        nrm.fn(torch.cat([tensors[i].reshape(-1).to(plan.home) for i in members])),
                        device=plan.home,
                    )
                    for members in plan.blocks
                ]
            )
        else:
            per_group = [
                tensor_stats([tensors[i] for i in idx], nrm.needs, foreach=self.foreach, buckets=b)
                for idx, b in zip(plan.groups, plan.buckets)
            ]
            acc = (
                torch.float64
                if any(s[k].dtype == torch.float64 for s in per_group for k in s)
                else torch.float32
            )
            merged = {
                key: torch.cat(
                    [
                        s[key].to(plan.home, dtype=acc if not s[key].is_complex() else s[key].dtype)
                        for s in per_group
                    ]
                )
                for key in per_group[0]
            }
            stats, n = combine_stats(merged, plan.all_counts.to(acc), plan.segments, plan.num_blocks)
            block_norms = finish(nrm.name, stats, n)
        per_tensor = block_norms[plan.segments]
        out, start = [], 0
        for idx in plan.groups:
            dev = tensors[idx[0]].device
            out.append(per_tensor[start : start + len(idx)].to(dev))
            start += len(idx)
        return out

    # ---- state_dict ------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        index: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        name: str | None = self.norm.name
        if self.norm.needs is None and not _is_registered(self.norm):
            name = None  # an anonymous callable: cannot be named in a state_dict
        return {
            "wrapper": self._kind(),
            "normalization": name,
            "granularity": self.granularity,
            "eps": self.eps,
            "foreach": self.foreach,
            "return_norms": self.return_norms,
            "exclude": sorted(index[i] for i in self._excluded if i in index),
            "nonfinite": self.nonfinite,
            "skipped_steps": self.skipped_steps,
        }

    def _load_settings(self, settings: dict[str, Any]) -> None:
        name = settings["normalization"]
        if name is None:
            if self.norm.needs is not None or _is_registered(self.norm):
                raise ValueError(
                    "the state_dict was saved with an unregistered custom normalization function; construct "
                    f"{type(self).__name__} with that function (or register it by name) before loading"
                )
        else:
            try:
                self.norm = get_norm(name)
            except ValueError:
                raise ValueError(
                    f"the state_dict names the custom normalization {name!r}, which is not registered; call "
                    f"normkit.optim.register_norm({name!r}, fn) before load_state_dict"
                ) from None
        if settings["granularity"] == "layer" and self.model is None:
            raise ValueError('the state_dict uses granularity="layer": construct the wrapper with model=...')
        self.nonfinite = check_policy(type(self).__name__, settings.get("nonfinite", "propagate"))
        self.skipped_steps = int(settings.get("skipped_steps", 0))
        self.granularity = settings["granularity"]
        self.eps = float(settings["eps"])
        self.foreach = bool(settings["foreach"])
        self.return_norms = bool(settings["return_norms"])
        unique = self._unique_params()
        self._excluded = {id(unique[i]) for i in settings["exclude"]}
        self._plan, self._plan_key, self._candidates_key = None, None, None

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's ``state_dict`` plus the wrapper's settings under ``"normkit_wrapper"``
        (a plain optimizer of the inner type can load it; the extra key is ignored there)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.inner.state_dict()
        settings = self._settings()
        if _STATE_KEY in sd:  # the inner optimizer is a wrapper too: keep its settings, nested
            settings["inner"] = sd[_STATE_KEY]
        sd[_STATE_KEY] = settings
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the inner optimizer's state and, if present, the wrapper's settings (a custom norm name
        must be registered first)."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        settings = state_dict.pop(_STATE_KEY, None)
        backup = copy.copy(self.__dict__)
        if settings is not None:
            if settings.get("wrapper") != self._kind():
                raise ValueError(f"the state_dict is of a {settings.get('wrapper')}, not a {self._kind()}")
            inner_settings = settings.get("inner")
            if inner_settings is not None:
                if not isinstance(self.inner, _GradientTransform):
                    raise ValueError(
                        f"the state_dict is of a {settings['wrapper']} around a "
                        f"{inner_settings.get('wrapper')}, but this one wraps a {type(self.inner).__name__}"
                    )
                state_dict[_STATE_KEY] = inner_settings
        try:
            if settings is not None:
                self._load_settings(settings)
            self.inner.load_state_dict(state_dict)  # a wrapper inside restores itself if it fails
        except Exception:
            self.__dict__.update(backup)
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _sharded_block_norms(
    nrm: Norm,
    tensor_sets: list[list[Tensor]],
    sources: list[Tensor],
    counts: list[float],
    seg: list[int],
    num_blocks: int,
) -> list[Tensor]:
    """Block norms (one 1-D tensor per set of tensors: gradients, then weights) from the local shards of
    ``sources``: per-shard statistics, one all_reduce for the sums and/or one for the maxima over every
    set, then :func:`combine_stats` and :func:`finish` (float64; float32 on MPS)."""
    needs = nrm.needs
    assert needs is not None
    home = tensor_sets[0][0].device
    acc = torch.float32 if home.type == "mps" else torch.float64
    sums: list[Tensor] = []  # per set: (k, c) — Σ|x|, Σx², Σx, spread around the shard mean + (Σx)²/n_shard
    extremes: list[Tensor] = []  # per set: (k, 2) — max|x|, −min|x|
    for ts in tensor_sets:
        k = len(ts)
        nonempty = [j for j, t in enumerate(ts) if t.numel() > 0]
        st = tensor_stats([ts[j] for j in nonempty], needs, foreach=False) if nonempty else {}
        idx = host_to_device(nonempty, torch.long, home)

        def full(key: str, fill: float, st: Stats = st, idx: Tensor = idx, k: int = k) -> Tensor:
            out = torch.full((k,), fill, dtype=acc, device=home)
            if key in st:
                out[idx] = st[key].real.to(home, acc) if key != "mean" else st[key].to(home).real.to(acc)
            return out

        cols = []
        if "l1" in needs:
            cols.append(full("l1", 0.0))
        if "l2" in needs:
            cols.append(full("l2", 0.0).square())
        if "mean" in needs:
            n_loc = host_to_device([float(t.numel()) for t in ts], acc, home)
            s = full("mean", 0.0) * n_loc
            cols.append(s)
            cols.append(full("m2", 0.0) + torch.where(n_loc > 0, s.square() / n_loc.clamp_min(1.0), 0.0))
        if cols:
            sums.append(torch.stack(cols, 1))
        ext = []
        if "max" in needs:
            ext.append(full("max", 0.0))
        if "min" in needs:
            ext.append(full("min", math.inf).neg())
        if ext:
            extremes.append(torch.stack(ext, 1))
    all_sources = sources * len(tensor_sets)
    if sums:
        summed = reduce_partials(torch.cat(sums), all_sources, "sum")
        sums = list(summed.split(len(sources)))
    if extremes:
        top = reduce_partials(torch.cat(extremes), all_sources, "max")
        extremes = list(top.split(len(sources)))
    n = host_to_device(counts, acc, home)
    segments = host_to_device(seg, torch.long, home)
    out = []
    for j in range(len(tensor_sets)):
        stats: Stats = {}
        c = 0
        if "l1" in needs:
            stats["l1"] = sums[j][:, c]
            c += 1
        if "l2" in needs:
            stats["l2"] = sums[j][:, c].clamp_min(0.0).sqrt()
            c += 1
        if "mean" in needs:
            total, spread = sums[j][:, c], sums[j][:, c + 1]
            stats["mean"] = total / n
            stats["m2"] = (spread - total.square() / n).clamp_min(0.0)
        e = 0
        if "max" in needs:
            stats["max"] = extremes[j][:, e]
            e += 1
        if "min" in needs:
            stats["min"] = extremes[j][:, e].neg()
        merged, block_n = combine_stats(stats, n, segments, num_blocks)
        out.append(finish(nrm.name, merged, block_n))
    return out


def _is_registered(nrm: Norm) -> bool:
    try:
        return get_norm(nrm.name).fn is nrm.fn
    except ValueError:
        return False


class NormalizedOptimizer(_GradientTransform):
    """Block-normalized gradients: each block's gradient becomes ``g / (N(g) + eps)`` before the inner step.

    Args:
        optimizer: any ``torch.optim.Optimizer`` instance (``param_groups``, ``state``, ``defaults`` shared).
        normalization: a norm name (``l1``, ``l2``, ``l1_l2``, ``avg_l1``, ``avg_l2``, ``avg_l1_l2``, ``max``
            / ``linf``, ``min_max``, ``std``, or one registered with :func:`register_norm`) or a callable.
        granularity: ``"tensor"``, ``"layer"`` (needs ``model``), ``"unit"`` or ``"global"``.
        eps: added once to each block's norm; must be > 0.
        model: the module tree whose modules are the ``"layer"`` blocks.
        exclude: parameters or modules whose gradients are left as they are.
        return_norms: keep ``last_norms[param]``, the norm of the block of each parameter at the last step
            (a 0-dim tensor; per unit a 1-D tensor), for logging.
        foreach: multi-tensor (default) or per-tensor computation of the built-in norms.
        nonfinite: ``"propagate"`` (default, no check), ``"skip"`` (a step with a NaN/inf gradient changes
            nothing and is counted in ``skipped_steps``) or ``"raise"`` (error before anything changes); see
            the module docstring for the cost.

    Example::

        opt = NormalizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True),
                                  normalization="l2", granularity="tensor", eps=1e-7)
    """

    def _scales(self, norms: Tensor, params: Tensor | None) -> Tensor:
        return (norms + self.eps).reciprocal()


class ClippedOptimizer(_GradientTransform):
    """Clipped gradients: each block's gradient becomes ``g · min(1, c / (N(g) + eps))`` before the step.

    With ``relative=True`` (adaptive gradient clipping, Brock et al. 2021) the threshold is
    ``c = clip_factor · max(N(W), weight_eps)`` with ``N(W)`` the same norm of the block's *weights*; the
    granularity then defaults to ``"unit"``. Leave the classifier out with ``exclude=[model.fc]``.

    Args:
        optimizer, normalization, eps, model, exclude, return_norms, foreach, nonfinite: see
            NormalizedOptimizer.
        clipnorm: the threshold ``c`` (absolute clipping).
        granularity: default ``"tensor"`` (``"unit"`` when ``relative``).
        relative: clip relative to the weights' norm instead of ``clipnorm``.
        clip_factor: ``λ`` of adaptive gradient clipping.
        weight_eps: the floor of the weight norm (AGC's ε, 1e-3), so that zero-initialised weights can move.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        normalization: str | NormFn = "l2",
        clipnorm: float | None = None,
        eps: float = 1e-7,
        *,
        granularity: Granularity | None = None,
        relative: bool = False,
        clip_factor: float = 0.01,
        weight_eps: float = 1e-3,
        model: nn.Module | None = None,
        exclude: Iterable[Tensor | nn.Module] = (),
        return_norms: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "propagate",
    ) -> None:
        if relative:
            if clipnorm is not None:
                raise ValueError("give either clipnorm (absolute clipping) or relative=True, not both")
            check_number("ClippedOptimizer", "clip_factor", clip_factor, low_open=True)
            check_number(
                "ClippedOptimizer",
                "weight_eps",
                weight_eps,
                why="the floor of the weights' norm, so that zero-initialised weights can move",
            )
        elif clipnorm is None:
            raise ValueError("ClippedOptimizer: give clipnorm=c (a finite number > 0) or relative=True")
        else:
            check_number("ClippedOptimizer", "clipnorm", clipnorm, low_open=True, why="or use relative=True")
        super().__init__(
            optimizer,
            normalization,
            granularity if granularity is not None else ("unit" if relative else "tensor"),
            eps,
            model=model,
            exclude=exclude,
            return_norms=return_norms,
            foreach=foreach,
            nonfinite=nonfinite,
        )
        self.clipnorm = clipnorm
        self.relative = relative
        self.clip_factor = float(clip_factor)
        self.weight_eps = float(weight_eps)

    def _settings_repr(self) -> str:
        if self.relative:
            return super()._settings_repr() + f", relative=True, clip_factor={self.clip_factor:g}"
        return super()._settings_repr() + f", clipnorm={self.clipnorm:g}"

    def _needs_param_norms(self) -> bool:
        return self.relative

    def _scales(self, norms: Tensor, params: Tensor | None) -> Tensor:
        if params is not None:
            limit = params.clamp(min=self.weight_eps) * self.clip_factor
            return (limit / (norms + self.eps)).clamp(max=1.0)
        assert self.clipnorm is not None
        return (self.clipnorm / (norms + self.eps)).clamp(max=1.0)

    def _settings(self) -> dict[str, Any]:
        out = super()._settings()
        out.update(
            clipnorm=self.clipnorm,
            relative=self.relative,
            clip_factor=self.clip_factor,
            weight_eps=self.weight_eps,
        )
        return out

    def _load_settings(self, settings: dict[str, Any]) -> None:
        super()._load_settings(settings)
        self.clipnorm = settings["clipnorm"]
        self.relative = bool(settings["relative"])
        self.clip_factor = float(settings["clip_factor"])
        self.weight_eps = float(settings["weight_eps"])
