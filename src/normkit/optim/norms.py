"""Gradient norms for block-normalized and clipped optimizers: the registry and the functional core.

A *norm* maps a block of numbers (a tensor, a layer's tensors, a row, all gradients) to a non-negative scalar
``N``. The built-in norms follow the Keras seed (``keras-normalized-optimizers``) exactly, on a block of ``n``
numbers ``x`` (for complex ``x``, ``|x|`` is the modulus):

=============  ====================================
``l1``         ``Σ|x|``
``l2``         ``√Σ|x|²`` (the default)
``l1_l2``      ``(l1 + l2) / 2``
``avg_l1``     ``Σ|x| / n``
``avg_l2``     ``√(Σ|x|² / n)``
``avg_l1_l2``  ``(avg_l1 + avg_l2) / 2``
``max``        ``max|x|`` (alias ``linf``)
``min_max``    ``(max|x| + min|x|) / 2``
``std``        ``√(Σ|x − mean x|² / n)`` (population standard deviation, as Keras' ``K.std``); ``|mean x|``
               for a block without spread (see below)
=============  ====================================

The ε of the optimizers is *not* part of a norm: it is added once, by the caller, to ``N``.

**A block without spread under** ``std``. A constant block — every one-element tensor (a bias of one unit, a
scalar gain), a gradient that is the same number everywhere — has standard deviation 0, and normalizing by it
divides by ε alone (it moved a one-unit bias by 2.6·10⁴ in one step). Such a block has no spread to
measure, so ``std`` returns its size instead: ``|mean x|``, which for a constant block is also its root mean
square. The normalized block then has entries of magnitude 1, like any other block normalized by ``std``
(whose entries have unit spread), and the clipped block is clipped at ``c``. "Without spread" means
``std ≤ 8·ε_mach·|mean x|`` in the accumulation dtype: a spread below the rounding of the values is no
spread at all (it is what summation error makes of a constant block split over several tensors). A block of
zeros keeps norm 0 (and a zero gradient).

**Accumulation.** CPU reductions of float32 tensors accumulate in float32 in a few long runs, so ``Σ|x|``
over 2²⁴ elements is off by 1e-3 to 1e-1 (a VGG classifier gradient of 4096 × 25088 normalized to 1.0097).
Tensors over 2¹⁶ elements are therefore reduced in rows of 4096 and the row results added in float64:
the sums are then exact to 1e-7 whatever the size.

Three computational paths, all without host synchronisation:

* :func:`norm` — one block given as one tensor (the reference formula);
* :func:`tensor_stats` / :func:`finish` — per-tensor *statistics* (``Σ|x|``, ``√Σ|x|²``, ``max|x|``,
  ``min|x|``, mean and ``Σ|x − mean|²``) for a list of tensors with ``torch._foreach_norm`` (multi-tensor)
  or a loop (single-tensor), which :func:`combine_stats` merges exactly into blocks made of several tensors
  (a layer, all gradients; the standard deviation with Chan's parallel formula);
* :func:`row_stats` — the same statistics per row (output unit) of one tensor; :func:`unit_stats` for every
  unit of several tensors at once.

Custom norms (:func:`register_norm`, or a callable given directly) are plain functions ``fn(x) -> scalar``; a
block of several tensors is handed to them concatenated and flattened, rows through ``torch.vmap`` when the
function allows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BUILTIN_NORMS",
    "Norm",
    "NormFn",
    "available_norms",
    "combine_stats",
    "finish",
    "get_norm",
    "norm",
    "register_norm",
    "row_stats",
    "tensor_norms",
    "tensor_stats",
    "unit_stats",
    "unregister_norm",
]

NormFn = Callable[[Tensor], Tensor]
Stats = dict[str, Tensor]

# Which decomposable statistics each built-in norm needs.
_NEEDS: dict[str, frozenset[str]] = {
    "l1": frozenset({"l1"}),
    "l2": frozenset({"l2"}),
    "l1_l2": frozenset({"l1", "l2"}),
    "avg_l1": frozenset({"l1"}),
    "avg_l2": frozenset({"l2"}),
    "avg_l1_l2": frozenset({"l1", "l2"}),
    "max": frozenset({"max"}),
    "min_max": frozenset({"max", "min"}),
    "std": frozenset({"mean", "m2"}),
}
_ALIASES = {"linf": "max"}
BUILTIN_NORMS: tuple[str, ...] = (*_NEEDS, *_ALIASES)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype statistics are accumulated in: float64 for double inputs, float32 otherwise."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def finish(name: str, stats: Stats, n: Tensor | float) -> Tensor:
    """The built-in norm ``name`` of blocks from their statistics and element counts ``n``."""
    name = _ALIASES.get(name, name)
    if name == "l1":
        return stats["l1"]
    if name == "l2":
        return stats["l2"]
    if name == "l1_l2":
        return (stats["l1"] + stats["l2"]) * 0.5
    if name == "avg_l1":
        return stats["l1"] / n
    if name == "avg_l2":
        return stats["l2"] / n**0.5
    if name == "avg_l1_l2":
        return (stats["l1"] / n + stats["l2"] / n**0.5) * 0.5
    if name == "max":
        return stats["max"]
    if name == "min_max":
        return (stats["max"] + stats["min"]) * 0.5
    if name == "std":
        return _std_or_size(stats["m2"], stats["mean"], n)
    raise KeyError(name)


def _std_or_size(m2: Tensor, mean: Tensor, n: Tensor | float) -> Tensor:
    """``√(m2/n)``, or ``|mean|`` where that spread is below the rounding of the values (module docstring)."""
    if isinstance(n, Tensor) and n.is_complex():  # counts typed like the first statistic, a complex mean
        n = n.real
    std = (m2.real / n).sqrt()
    size = mean.abs().to(std.dtype)
    tol = 8.0 * torch.finfo(std.dtype).eps
    return torch.where(std <= tol * size, size, std)


class _BuiltinNorm:
    """The single-tensor formula of a built-in norm (statistics of the whole tensor, then :func:`finish`).

    A module-level class, not a closure, so that an optimizer holding it can be pickled (``torch.save``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__name__ = f"{name}_norm"

    def __call__(self, x: Tensor) -> Tensor:
        stats = {k: v[0] for k, v in tensor_stats([x], _NEEDS[self.name], foreach=False).items()}
        return finish(self.name, stats, float(x.numel()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_builtin_fn, (self.name,))  # the registry's own instance: ``fn is`` checks keep holding


def _builtin_fn(name: str) -> NormFn:
    return _REGISTRY[name].fn


@dataclass(frozen=True)
class Norm:
    """A norm: its name, the single-tensor function, and for built-ins the statistics it is computed from."""

    name: str
    fn: NormFn
    needs: frozenset[str] | None = None  # None: a custom norm, computed only through ``fn``

    @property
    def builtin(self) -> bool:
        return self.needs is not None

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def __reduce__(self) -> tuple[Any, ...]:
        # A norm of the registry is saved by name and is the registered one again when loaded (register a
        # custom norm before loading, as for load_state_dict); a plain callable is pickled as itself.
        if _REGISTRY.get(self.name) is self:
            return (get_norm, (self.name,))
        return (Norm, (self.name, self.fn, self.needs))


_REGISTRY: dict[str, Norm] = {name: Norm(name, _BuiltinNorm(name), needs) for name, needs in _NEEDS.items()}


def register_norm(name: str, fn: NormFn, *, overwrite: bool = False) -> None:
    """Register ``fn(x) -> scalar tensor`` (the norm of a block ``x``, without ε) under ``name``.

    Register a custom norm before constructing or loading (``load_state_dict``) an optimizer that names it.
    Built-in names cannot be replaced; other names only with ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a norm name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_norm({name!r}, fn): fn must be callable, got {type(fn).__name__}")
    if name in _NEEDS or name in _ALIASES:
        raise ValueError(f"{name!r} is a built-in norm and cannot be replaced")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a norm named {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = Norm(name, fn)


def unregister_norm(name: str) -> None:
    """Remove a custom norm from the registry (built-ins cannot be removed)."""
    if name in _NEEDS or name in _ALIASES:
        raise ValueError(f"{name!r} is a built-in norm and cannot be removed")
    _REGISTRY.pop(name, None)


def available_norms() -> list[str]:
    """Names accepted by :func:`get_norm`: the built-ins, their aliases and the registered custom norms."""
    return sorted([*_REGISTRY, *_ALIASES])


def get_norm(normalization: str | NormFn | Norm) -> Norm:
    """Resolve a norm name (built-in, alias or registered), a :class:`Norm`, or a callable."""
    if isinstance(normalization, Norm):
        return normalization
    if isinstance(normalization, str):
        key = _ALIASES.get(normalization, normalization)
        if key not in _REGISTRY:
            raise ValueError(
                f"unknown normalization {normalization!r}; available: {', '.join(available_norms())} "
                "(register a custom one with normkit.optim.register_norm)"
            )
        return _REGISTRY[key]
    if callable(normalization):
        for registered in _REGISTRY.values():  # a registered function keeps its name (for state_dict)
            if registered.fn is normalization:
                return registered
        return Norm(getattr(normalization, "__name__", "<callable>"), normalization)
    raise TypeError(f"normalization must be a name or a callable, got {type(normalization).__name__}")


def norm(x: Tensor, normalization: str | NormFn | Norm = "l2") -> Tensor:
    """The norm of one block given as one tensor (any shape), as a 0-dim real tensor."""
    result = get_norm(normalization)(x)
    return torch.as_tensor(result, device=x.device)


# ----------------------------------------------------------------------------------------------------
# Statistics: per tensor (foreach or loop), per row, and merged into blocks of several tensors.


def tensor_stats(
    tensors: Sequence[Tensor], needs: frozenset[str], *, foreach: bool = True, buckets: Sequence[int] = ()
) -> Stats:
    """Per-tensor statistics of same-device tensors, each a 1-D tensor of ``len(tensors)`` entries.

    Keys (those in ``needs``): ``l1`` = Σ|x|, ``l2`` = √Σ|x|², ``max`` = max|x|, ``min`` = min|x|,
    ``mean`` = mean x and ``m2`` = Σ|x − mean|². Accumulated in float32 (float64 for double inputs).
    ``foreach=True`` uses ``torch._foreach_norm``; otherwise (and always for the standard deviation's moments)
    one reduction per tensor. ``buckets``: sizes of leading runs of tensors with equal ``numel`` that are
    stacked and reduced in one kernel each (many small tensors: biases, norm-layer affines).
    """
    if not tensors:
        raise ValueError("tensor_stats needs at least one tensor")
    pieces: list[Stats] = []
    start = 0
    for size in buckets:
        chunk = tensors[start : start + size]
        first = chunk[0].shape
        if all(c.shape == first for c in chunk):  # stack as they are: a reshape per tensor costs more
            pieces.append(row_stats(_stacked(chunk, 1), needs))
        else:
            pieces.append(row_stats(torch.stack([c.reshape(-1) for c in chunk]), needs))
        start += size
    if start < len(tensors):
        pieces.append(_each_stats(tensors[start:], needs, foreach))
    return _concat(pieces)


def unit_stats(tensors: Sequence[Tensor], needs: frozenset[str], *, buckets: Sequence[int] = ()) -> Stats:
    """The statistics of :func:`row_stats` for every unit of several same-device tensors, concatenated in
    order. ``buckets``: sizes of leading runs of tensors of one shape, reduced together in one kernel each."""
    pieces: list[Stats] = []
    start = 0
    for size in buckets:
        chunk = tensors[start : start + size]
        pieces.append(row_stats(_stacked(chunk, num_units(chunk[0])), needs))
        start += size
    pieces += [row_stats(x, needs) for x in tensors[start:]]
    return _concat(pieces)


def _stacked(chunk: Sequence[Tensor], rows_each: int) -> Tensor:
    """Tensors of one shape as one matrix of ``rows_each`` rows per tensor (one reduction for all)."""
    return torch.stack(list(chunk)).reshape(len(chunk) * rows_each, -1)


def _concat(pieces: list[Stats]) -> Stats:
    if len(pieces) == 1:
        return pieces[0]
    return {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}


_LONG = 2**16  # above this many elements, Σ|x| and Σ|x|² are accumulated by rows (module docstring)
_ROW = 4096


def _long_norm(t: Tensor, order: float, acc: torch.dtype | None) -> Tensor:
    """``‖t‖_order`` (order 1 or 2) of a long tensor: rows of 4096 reduced in ``acc``, the rows' results
    added in float64 (float32 on devices without it), returned in the dtype the short path would give."""
    # element order does not matter to a norm: flatten in memory order (channels_last: a view, no copy)
    flat = t.permute(sorted(range(t.dim()), key=lambda d: -t.stride()[d])).reshape(-1)
    head = flat.numel() - flat.numel() % _ROW
    parts = [torch.linalg.vector_norm(flat[:head].view(-1, _ROW), order, dim=1, dtype=acc)]
    if head < flat.numel():
        parts.append(torch.linalg.vector_norm(flat[head:], order, dtype=acc).reshape(1))
    rows = torch.cat(parts)
    wide = torch.float32 if rows.device.type == "mps" else torch.float64
    return torch.linalg.vector_norm(rows.to(wide), order).to(rows.dtype)


def _each_stats(tensors: Sequence[Tensor], needs: frozenset[str], foreach: bool) -> Stats:
    acc = _acc_dtype(tensors[0].dtype)
    cplx = tensors[0].is_complex()  # vector_norm of complex input returns the real dtype by itself
    out: Stats = {}
    for key, order in (("l1", 1.0), ("l2", 2.0), ("max", math.inf), ("min", -math.inf)):
        if key not in needs:
            continue
        dtype = None if cplx else acc
        long = [key in ("l1", "l2") and t.numel() > _LONG for t in tensors]
        short = [t for t, is_long in zip(tensors, long) if not is_long]
        if not short:
            vals = []
        elif foreach:
            vals = list(torch._foreach_norm(short, order, dtype=dtype))
        else:
            vals = [torch.linalg.vector_norm(t, order, dtype=dtype) for t in short]
        if any(long):
            it = iter(vals)
            vals = [_long_norm(t, order, dtype) if is_long else next(it) for t, is_long in zip(tensors, long)]
        out[key] = torch.stack(vals)
    if "mean" in needs or "m2" in needs:
        means, m2s = [], []
        for t in tensors:
            var, mean = torch.var_mean(t.to(acc) if not t.is_complex() else t, correction=0)
            means.append(mean)
            m2s.append(var.to(acc) * t.numel())
        out["mean"] = torch.stack(means)
        out["m2"] = torch.stack(m2s)
    return out


def _rows(x: Tensor) -> Tensor:
    """``x`` as a matrix of units: ``(shape[0], -1)`` for ``x.ndim >= 2``, one row for scalars and vectors."""
    return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)


def row_stats(x: Tensor, needs: frozenset[str]) -> Stats:
    """The statistics of :func:`tensor_stats` for each unit of ``x``: a row of ``x.reshape(shape[0], -1)``
    (a scalar or vector is one unit, as in adaptive gradient clipping). One entry per unit."""
    rows = _rows(x)
    acc = _acc_dtype(x.dtype)
    out: Stats = {}
    for key, order in (("l1", 1.0), ("l2", 2.0), ("max", math.inf), ("min", -math.inf)):
        if key in needs:
            out[key] = torch.linalg.vector_norm(rows, order, dim=1, dtype=None if x.is_complex() else acc)
    if "mean" in needs or "m2" in needs:
        var, mean = torch.var_mean(rows if rows.is_complex() else rows.to(acc), dim=1, correction=0)
        out["mean"] = mean
        out["m2"] = var.to(acc) * rows.shape[1]
    return out


def num_units(x: Tensor) -> int:
    """Number of units (rows) of ``x`` for the ``"unit"`` granularity."""
    return x.shape[0] if x.ndim >= 2 else 1


def combine_stats(stats: Stats, counts: Tensor, segments: Tensor, num_segments: int) -> tuple[Stats, Tensor]:
    """Merge per-tensor statistics into per-block ones, exactly.

    ``counts[i]`` is the number of elements of tensor ``i`` (float, same device), ``segments[i]`` its block.
    Returns the block statistics and the blocks' element counts.
    """
    n = torch.zeros(num_segments, dtype=counts.dtype, device=counts.device).index_add_(0, segments, counts)
    out: Stats = {}
    if "l1" in stats:
        out["l1"] = _zeros_like(stats["l1"], num_segments).index_add_(0, segments, stats["l1"])
    if "l2" in stats:
        sq = stats["l2"].square()
        out["l2"] = _zeros_like(sq, num_segments).index_add_(0, segments, sq).sqrt()
    if "max" in stats:
        out["max"] = _zeros_like(stats["max"], num_segments).scatter_reduce_(
            0, segments, stats["max"], "amax", include_self=False
        )
    if "min" in stats:
        out["min"] = _zeros_like(stats["min"], num_segments).scatter_reduce_(
            0, segments, stats["min"], "amin", include_self=False
        )
    if "mean" in stats:
        c = counts.to(stats["mean"].dtype)
        total = _zeros_like(stats["mean"], num_segments).index_add_(0, segments, stats["mean"] * c)
        mean = total / n.to(total.dtype)
        spread = (stats["mean"] - mean[segments]).abs().square() * counts.to(stats["m2"].dtype)
        m2 = stats["m2"] + spread
        out["mean"] = mean
        out["m2"] = _zeros_like(m2, num_segments).index_add_(0, segments, m2)
    return out, n


def _zeros_like(v: Tensor, size: int) -> Tensor:
    return torch.zeros(size, dtype=v.dtype, device=v.device)


def tensor_norms(
    tensors: Sequence[Tensor], normalization: str | NormFn | Norm = "l2", *, foreach: bool = True
) -> Tensor:
    """The norm of each tensor (same device), as a 1-D tensor: the multi-tensor path of :func:`norm`."""
    nrm = get_norm(normalization)
    if nrm.needs is None:
        return torch.stack([torch.as_tensor(nrm.fn(t), device=t.device) for t in tensors])
    stats = tensor_stats(tensors, nrm.needs, foreach=foreach)
    counts = torch.tensor([float(t.numel()) for t in tensors], dtype=next(iter(stats.values())).dtype)
    counts = counts.to(tensors[0].device)
    return finish(nrm.name, stats, counts)
