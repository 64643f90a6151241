"""Equi-normalization (ENorm) — Stock, Graham, Gribonval & Jégou, ICLR 2019, arXiv 1902.10416.

A hidden unit *i* between two layers joined by positively homogeneous operations (ReLU, leaky ReLU, PReLU,
max / average pooling, zero padding, dropout, flatten ...) can be rescaled without changing the network
function: multiply its incoming weights (row *i* of the producer's weight, and its bias ``b[i]``) by
``d_i > 0`` and its outgoing weights (column *i* of the consumer's weight) by ``1/d_i``. ENorm picks

    d_i = (‖outgoing_i‖ / (c · ‖incoming_i‖))^{1/2}

unit by unit, sweeping the hidden layers in execution order (one *cycle*, a block coordinate descent as in
the paper, after every optimizer step). At the fixed point ‖outgoing_i‖ = c·‖incoming_i‖ for every balanced
unit. For a chain W_1 … W_q this is the minimizer over the rescalings of

    Σ_k c^{-2k} ‖W_k‖_p^p        (p = 2: the weight-decay term; c = 1: the plain sum of squared norms)

(for each unit the two terms c^{-2k} d² a² + c^{-2(k+1)} b²/d² are minimized at d² = b / (c·a), any p).
With c > 1 the deeper layers are allowed larger weights; this orientation of c is the reference code's
(``balancer = (right / (left * c)) ** 0.5``) and DESIGN.md's. On a DAG (residual additions, concatenations)
the same per-unit rule is applied; with c = 1 each update minimizes Σ ‖W‖_p^p over all the weights, so the
cycle is block coordinate descent on it (no depth index is needed).

Where we differ from the reference code (it paired layers by parameter order, skipped biases, ignored
BatchNorm and so changed the output by several % per cycle):

- the pairs come from :func:`normkit.graph.trace`: a layer is balanced only when *every* path from it reaches
  linear / convolution layers through operations that commute with positive per-channel scaling; a
  normalization layer (BatchNorm, GroupNorm, LayerNorm, BatchRenorm), a non-homogeneous activation (GELU,
  SiLU, tanh …) or the model output on any path leaves that layer's units alone (``norm_layers="stop"``).
  The reference balanced across BatchNorm, which changes the function (``norm_layers="ignore"`` does the
  same, and says so); ``norm_layers="affine"`` carries the unit's scale in the BatchNorm's γ, β instead,
  which keeps the function;
- producer biases are scaled with their rows (exactness; ``bias="keep"`` leaves them alone as the reference
  did); whether they count in the norms is an option (``include_bias``, default off, as the paper
  recommends). With c ≠ 1 trainable biases make training unstable in both codes: a warning says so;
- frozen weights (``requires_grad=False``) and weights outside the optimizer are left alone;
- outputs that meet in an addition (residual streams) share one scale per channel (a *tied group*: the norms
  are summed over all its producers); concatenations and flatten / reshape map a channel to a block of the
  consumer's inputs;
- each group's norms are read after the previous groups' rescalings (exact block coordinate descent; the
  reference read every norm before the rescaling that changes it, i.e. all at the start of the cycle:
  ``sweep="simultaneous"``);
- the last hidden layer is balanced too (``skip_last=True`` restores the reference's behaviour);
- optimizer state follows the gradients, which scale inversely to the weights: SGD momentum and Adam / AdamW
  ``exp_avg`` by ``1/d`` on the producer rows and ``d`` on the consumer columns, ``exp_avg_sq`` (and
  ``max_exp_avg_sq``) by the squares. The authors' FC code leaves the momentum buffers and BatchNorm's
  running statistics alone: ``ENorm.AUTHORS_FC`` (``optimizer_state="keep"``, ``running_stats="keep"`` and
  their sweep) reproduces their ``_step_fc`` step for step;
- a unit with a non-finite norm (an inf / NaN weight) is left alone, so one bad entry does not spread;
- DTensor parameters (FSDP2) are balanced shard by shard, one all-reduce per group (see :meth:`ENorm.cycle`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import parametrize

from normkit._dtensor import Replicate, Shard, is_dtensor, local
from normkit.graph import (
    ChannelBlocks,
    ChannelPath,
    ChannelPathError,
    LayerKind,
    ModelGraph,
    UntraceableModelError,
    channel_dim,
    channel_path,
    in_channels,
    is_per_channel_normalization,
    layer_kind,
    out_channels,
    tied_sources,
    trace,
    unwrap_model,
)

__all__ = [
    "ENorm",
    "ENormGroup",
    "ENormStructureError",
    "Skipped",
    "balance_",
    "balance_factors",
    "discover_groups",
    "unit_norms",
]

_CHANNEL_KINDS = (LayerKind.LINEAR, LayerKind.CONV, LayerKind.CONV_TRANSPOSE)
NORM_LAYER_MODES = ("stop", "ignore", "affine")
BIAS_MODES = ("scale", "keep")
SWEEPS = ("sequential", "simultaneous")
STATE_MODES = ("rescale", "keep")
NONFINITE_MODES = ("skip", "warn", "raise")
_SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
)
_GRAD_LIKE = ("momentum_buffer", "exp_avg")  # scale like the gradient
_SQUARE_LIKE = ("exp_avg_sq", "max_exp_avg_sq")  # scale like the squared gradient


class ENormStructureError(RuntimeError):
    """ENorm cannot work out the model's structure (untraceable model, invalid ``pairs``)."""


# --- functional core: pure tensor math on unit views ------------------------------------------------------
#
# Every tensor is seen through a 4-d *unit view* (G, A, C, B): the units are the G·C entries of dims 0 and 2
# (in that order), dims 1 and 3 hold the weights of one unit. A Linear weight's rows are (1, 1, out, in), its
# columns (1, out, in, 1); grouped convolutions need G > 1.


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def unit_norms(views: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """Σ over ``views`` of ‖unit‖_p^p, one value per unit (float32 at least), shape (G·C,)."""
    total: Tensor | None = None
    for v in views:
        acc = _acc_dtype(v)
        if v.dtype != acc:
            v = v.to(acc)
        if v.shape[1] == 1:  # rows: a contiguous reduction
            n = torch.linalg.vector_norm(v, ord=p, dim=3)
            term = n.square_() if p == 2 else n.pow_(p)
        else:  # columns: the strided vector_norm is several times slower than a plain sum
            term = (v * v if p == 2 else v.abs().pow_(p)).sum(dim=(1, 3), keepdim=True)
        term = term.reshape(-1)
        total = term if total is None else total.add_(term)
    if total is None:
        raise ValueError("unit_norms needs at least one view")
    return total


def balance_factors(incoming_pp: Tensor, outgoing_pp: Tensor, c: float = 1.0, p: float = 2.0) -> Tensor:
    """d = (‖out‖ / (c·‖in‖))^{1/2} from the p-th powers of the norms; 1 for a unit with a zero side or a
    non-finite one (an inf / NaN weight stays where it is instead of spreading over its row and column)."""
    d = (outgoing_pp / incoming_pp).mul_(c**-p).pow_(1.0 / (2.0 * p))
    ok = (incoming_pp > 0) & (outgoing_pp > 0) & torch.isfinite(d) & (d > 0)
    ok &= torch.isfinite(incoming_pp) & torch.isfinite(outgoing_pp)
    return d.masked_fill_(~ok, 1.0)


def _scale_(views: Sequence[Tensor], s: Tensor) -> None:
    if not views:
        return
    g = views[0].shape[0]
    if all(v.shape[0] == g and v.dtype == s.dtype for v in views):
        # one call for all views (a C++ loop on CPU, fused kernels where shapes allow)
        torch._foreach_mul_(list(views), [s.view(g, 1, -1, 1)] * len(views))
        return
    for v in views:
        v.mul_(s.view(v.shape[0], 1, v.shape[2], 1).to(v.dtype))


def balance_(
    norm_in: Sequence[Tensor],
    norm_out: Sequence[Tensor],
    *,
    times_d: Sequence[Tensor] = (),
    times_inv_d: Sequence[Tensor] = (),
    times_d2: Sequence[Tensor] = (),
    times_inv_d2: Sequence[Tensor] = (),
    c: float = 1.0,
    p: float = 2.0,
) -> Tensor:
    """One ENorm update of a group of units, in place; returns d.

    ``norm_in`` / ``norm_out``: unit views whose norms make ‖incoming‖ / ‖outgoing‖ (not scaled unless also
    listed below). The others are scaled by d, 1/d, d², 1/d²: incoming weights and biases by d, outgoing
    weights by 1/d, gradient-like state of the incoming tensors by 1/d and of the outgoing ones by d,
    squared-gradient state by the squares.
    """
    d = balance_factors(unit_norms(norm_in, p), unit_norms(norm_out, p), c, p)
    _apply_(d, times_d, times_inv_d, times_d2, times_inv_d2)
    return d


def _apply_(
    d: Tensor,
    times_d: Sequence[Tensor],
    times_inv_d: Sequence[Tensor],
    times_d2: Sequence[Tensor],
    times_inv_d2: Sequence[Tensor],
) -> None:
    inv = d.reciprocal()
    _scale_(times_d, d)
    _scale_(times_inv_d, inv)
    if times_d2:
        _scale_(times_d2, d.square())
    if times_inv_d2:
        _scale_(times_inv_d2, inv.square())


# --- how each weight is seen as units ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """How to see ``module.<attr>`` (or any tensor of its shape) as a unit view (G, A, C, B)."""

    module: nn.Module
    attr: str
    pre: tuple[int, ...]
    narrow: tuple[int, int, int] | None  # (dim, start, length) applied after ``pre``
    final: tuple[int, int, int, int]
    # Where the tensor's dim 0 (the dim FSDP shards) lands in the unit view, for views of a shard:
    # "units": rows offset + u*block ... are unit u's; "reduce": dim 0 is summed over (the A axis);
    # "groups": dim 0 is (G, rows per group), ``block`` = rows per group.
    dim0: str = "units"
    offset: int = 0
    block: int = 1

    def tensor(self) -> Tensor:
        return getattr(self.module, self.attr)  # type: ignore[no-any-return]

    def view(self, t: Tensor) -> Tensor:
        if not t.is_contiguous():
            raise RuntimeError(
                "ENorm needs contiguous weights and optimizer state; "
                f"{type(self.module).__name__}.{self.attr} has strides {t.stride()} (channels_last?). "
                "Convert it: model.to(memory_format=torch.contiguous_format), before creating the optimizer."
            )
        v = t.view(self.pre)
        if self.narrow is not None:
            v = v.narrow(*self.narrow)
        return v.view(self.final)

    def shard_view(self, t: Tensor, r0: int, where: str) -> tuple[Tensor, int, int]:
        """The unit view of rows ``r0 ... r0 + len(t)`` of the tensor (a rank's ``Shard(0)`` piece) and the
        range of units ``[u0, u1)`` it covers (all units when dim 0 is summed over: partial norms)."""
        n = int(t.shape[0])
        if not t.is_contiguous():
            self.view(t)  # raises the contiguity error
        if self.dim0 == "reduce":
            v = t.view((n, *self.pre[1:]))
            if self.narrow is not None:
                v = v.narrow(*self.narrow)
            return v.view(1, n, self.final[2], self.final[3]), 0, self.final[0] * self.final[2]
        if self.dim0 == "groups":
            rows = self.block
            if r0 % rows or n % rows:
                raise ValueError(
                    f"ENorm: {where} is sharded (Shard(0)) across one of its {self.pre[0]} groups (rows "
                    f"{r0}-{r0 + n - 1}, {rows} rows per group); grouped convolutions need whole groups per "
                    "rank. Keep this layer replicated (leave it out of fully_shard, or Replicate()), or "
                    "give it a size whose shards hold whole groups."
                )
            per = self.final[2]
            return t.view(n // rows, *self.pre[1:]), (r0 // rows) * per, ((r0 + n) // rows) * per
        first = max(self.offset, r0)
        width = self.final[2] * self.block
        last = min(self.offset + width, r0 + n)
        if last <= first:
            return t.new_empty((1, 1, 0, 1)), 0, 0  # no unit here: never used
        if (first - self.offset) % self.block or (last - self.offset) % self.block:
            raise ValueError(
                f"ENorm: {where} is sharded (Shard(0)) through the middle of one unit's block of "
                f"{self.block} rows; keep this layer replicated (leave it out of fully_shard, or "
                "Replicate())."
            )
        u0, u1 = (first - self.offset) // self.block, (last - self.offset) // self.block
        part = t.view(n, -1).narrow(0, first - r0, last - first)
        return part.view(1, 1, u1 - u0, -1), u0, u1


def _channels(module: nn.Module) -> int:
    if layer_kind(module) is LayerKind.NORM:
        return int(module.num_features)  # type: ignore[arg-type]
    return out_channels(module)


def _unit_slot(module: nn.Module, attr: str) -> _Slot:
    n = _channels(module)
    return _Slot(module, attr, (1, 1, n, 1), None, (1, 1, n, 1))


def _producer_slots(module: nn.Module) -> tuple[_Slot, _Slot | None]:
    """Rows (output channels) of a producer's weight, and its bias; for a normalization layer (the
    ``"affine"`` mode) its affine weight γ and bias β."""
    if layer_kind(module) is LayerKind.NORM:
        if getattr(module, "weight", None) is None:
            raise ChannelPathError(
                f"{type(module).__name__} has no affine weight (affine=False) to carry the units' scale"
            )
        bias = _unit_slot(module, "bias") if getattr(module, "bias", None) is not None else None
        return _unit_slot(module, "weight"), bias
    w: Tensor = module.weight  # type: ignore[assignment]
    n_out = out_channels(module)
    if layer_kind(module) is LayerKind.CONV_TRANSPOSE:  # weight (in, out/groups, *k)
        g = int(module.groups)  # type: ignore[arg-type]
        shape = (g, w.shape[0] // g, w.shape[1], w[0, 0].numel())
        if g == 1:  # dim 0 (inputs) is summed over
            weight = _Slot(module, "weight", shape[1:], None, shape, "reduce")
        else:
            weight = _Slot(module, "weight", shape, None, shape, "groups", 0, shape[1])
    else:  # weight (out, in/groups, *k)
        shape = (1, 1, n_out, w[0].numel())
        weight = _Slot(module, "weight", shape, None, shape)
    bias = None
    if getattr(module, "bias", None) is not None:
        bias = _Slot(module, "bias", (1, 1, n_out, 1), None, (1, 1, n_out, 1))
    return weight, bias


def _consumer_slot(module: nn.Module, n_units: int, offset: int, block: int) -> _Slot:
    """Columns of a consumer's weight fed by ``n_units`` channels, each a block of ``block`` inputs."""
    w: Tensor = module.weight  # type: ignore[assignment]
    kind = layer_kind(module)
    width = n_units * block
    if kind is LayerKind.LINEAR:  # (out, in)
        final = (1, w.shape[0], n_units, block)
        return _Slot(module, "weight", tuple(w.shape), (1, offset, width), final, "reduce")
    if kind is LayerKind.CONV_TRANSPOSE:  # (in, out/groups, *k): inputs are rows
        rest = w[0].numel()
        final = (1, 1, n_units, block * rest)
        return _Slot(module, "weight", (w.shape[0], rest), (0, offset, width), final, "units", offset, block)
    g = int(module.groups)  # type: ignore[arg-type]
    k = w[0, 0].numel()
    if g == 1:  # (out, in, *k)
        pre = (w.shape[0], w.shape[1], k)
        final = (1, w.shape[0], n_units, block * k)
        return _Slot(module, "weight", pre, (1, offset, width), final, "reduce")
    if offset != 0 or block != 1 or n_units != w.shape[1] * g:
        raise ChannelPathError(f"grouped convolution {type(module).__name__} fed by a part of its channels")
    pre4 = (g, w.shape[0] // g, w.shape[1], k)
    return _Slot(module, "weight", pre4, None, pre4, "groups", 0, pre4[1])


# --- structure: which units are balanced together ---------------------------------------------------------


@dataclass(frozen=True)
class ENormGroup:
    """Units balanced together: channel i of every producer (tied by additions when several) and the inputs
    they feed in each consumer, given as (consumer, offset, block): channel i feeds inputs
    ``offset + i*block ... offset + (i+1)*block - 1``."""

    producers: tuple[str, ...]
    consumers: tuple[tuple[str, int, int], ...]
    channels: int
    incoming: tuple[_Slot, ...]
    biases: tuple[_Slot, ...]
    outgoing: tuple[_Slot, ...]
    crossed: tuple[str, ...] = ()  # normalization layers between producers and consumers ("ignore")
    stats: tuple[_Slot, ...] = ()  # their running means (scaled by d); running variances follow (by d²)

    def __repr__(self) -> str:
        cross = f", crossed={self.crossed}" if self.crossed else ""
        return (
            f"ENormGroup(producers={self.producers}, consumers={self.consumers}, channels={self.channels}"
            f"{cross})"
        )


@dataclass(frozen=True)
class Skipped:
    """Layers whose units ENorm leaves alone, and why."""

    layers: tuple[str, ...]
    reason: str
    expected: bool  # by design (normalization, model output, unused): no warning


def _shared_parameter_owners(modules: dict[str, nn.Module]) -> set[str]:
    """Modules holding a parameter that another module holds too (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, module in modules.items():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def _build_group(
    modules: dict[str, nn.Module],
    producers: Sequence[str],
    consumers: Iterable[tuple[str, int, int]],
    crossed: Sequence[str] = (),
) -> ENormGroup:
    shared = _shared_parameter_owners(modules)
    unique = list(dict.fromkeys(consumers))
    for name in (*producers, *(n for n, _, _ in unique)):
        module = modules[name]
        if name in shared:
            raise ChannelPathError(f"{name!r} shares a parameter with another module")
        if parametrize.is_parametrized(module) or hasattr(module, "weight_g"):
            raise ChannelPathError(f"{name!r} has a parametrized weight (computed, not stored)")
    channels = _channels(modules[producers[0]])
    incoming, biases = [], []
    for name in producers:
        w, b = _producer_slots(modules[name])
        incoming.append(w)
        if b is not None:
            biases.append(b)
    outgoing = tuple(_consumer_slot(modules[n], channels, off, blk) for n, off, blk in unique)
    stats = tuple(
        _unit_slot(modules[n], "running_mean")
        for n in crossed
        if getattr(modules[n], "running_mean", None) is not None
    )
    return ENormGroup(
        tuple(producers),
        tuple(unique),
        channels,
        tuple(incoming),
        tuple(biases),
        outgoing,
        tuple(crossed),
        stats,
    )


def _crossable_norms(graph: ModelGraph) -> tuple[dict[str, str], list[Skipped]]:
    """Normalization layers a unit's scale can be carried across: per channel (BatchNorm, BatchRenorm,
    InstanceNorm), run once, fed directly (the very tensor) by one linear / convolution layer whose output
    feeds nothing else, with the channels on the normalized axis. Returns {norm layer: its producer}."""
    crossed: dict[str, str] = {}
    skips: list[Skipped] = []
    for node in graph:
        if node.kind is not LayerKind.NORM:
            continue
        src = graph[node.producers[0].src] if len(node.producers) == 1 and node.producers[0].src else None
        if src is None or src.kind not in _CHANNEL_KINDS:
            continue  # nothing rescalable feeds it: nothing to cross
        edge = node.producers[0]
        reason = None
        if not is_per_channel_normalization(node.module):
            reason = f"{type(node.module).__name__} normalizes across channels"
        elif node.calls > 1 or src.calls > 1:
            reason = "it or its input layer runs more than once per forward"
        elif not edge.direct:
            reason = f"operations stand between {src.name!r} and it"
        elif len(src.consumers) != 1:
            reason = f"the output of {src.name!r} is used elsewhere too"
        elif out_channels(src.module) != int(node.module.num_features):  # type: ignore[arg-type]
            n = node.module.num_features
            reason = f"{src.name!r} has {out_channels(src.module)} channels, it normalizes {n}"
        elif node.output_shape is not None and 1 - len(node.output_shape) != channel_dim(src.module):
            reason = f"the channels of {src.name!r} are not on its normalized axis"
        if reason is None:
            crossed[node.name] = src.name
        else:
            skips.append(Skipped((src.name,), f"cannot balance across {node.name!r}: {reason}", False))
    return crossed, skips


def _check_tied(
    graph: ModelGraph, members: tuple[str | None, ...], crossed: dict[str, str]
) -> tuple[list[ChannelPath], list[Skipped]]:
    layers = tuple(m for m in members if m is not None)
    skips: list[Skipped] = []
    if None in members:
        skips.append(Skipped(layers, "their output is added to the model input", False))
    for m in layers:
        node = graph[m]
        if m in crossed:
            continue
        if node.kind not in _CHANNEL_KINDS:
            expected = node.kind is LayerKind.NORM
            what = "a normalization layer" if expected else f"{type(node.module).__name__} (not rescalable)"
            skips.append(Skipped(layers, f"summed with the output of {m!r}, {what}", expected))
        elif node.calls > 1:
            skips.append(
                Skipped(layers, f"{m!r} runs {node.calls} times per forward (shared weights)", False)
            )
    paths: list[ChannelPath] = []
    for m in layers:
        node = graph[m]
        start = None
        if m in crossed:  # the channels leave the normalization layer where its input layer put them
            src = graph[crossed[m]].module
            start = ChannelBlocks(channel_dim(src), out_channels(src))
        elif node.kind not in _CHANNEL_KINDS:
            continue
        if not node.consumers:
            skips.append(Skipped(layers, f"the output of {m!r} is unused", True))
        for edge in node.consumers:
            try:
                paths.append(channel_path(graph, edge, start=start))
            except ChannelPathError as exc:
                dst = graph[edge.dst] if edge.dst is not None else None
                expected = edge.dst is None or (dst is not None and dst.kind is LayerKind.NORM)
                reason = str(exc)
                if "example input" in reason:
                    reason += " (ENorm(..., example_input=x))"
                skips.append(Skipped(layers, reason, expected))
                continue
            dst_node = graph[edge.dst]  # type: ignore[index]
            if dst_node.calls > 1:
                skips.append(
                    Skipped(layers, f"consumer {edge.dst!r} runs {dst_node.calls} times per forward", False)
                )
    counted = [crossed.get(m, m) for m in layers if m in crossed or graph[m].kind in _CHANNEL_KINDS]
    if len({out_channels(graph[m].module) for m in counted}) > 1:
        skips.append(Skipped(layers, "layers summed together with different channel counts", False))
    joins: dict[str, list[Any]] = {}
    for path in paths:
        for join in path.adds:
            joins.setdefault(join.name, []).append(join)
    for name, found in joins.items():
        first = found[0]
        if first.has_scalar:
            skips.append(Skipped(layers, f"{name}: adds a constant (not positively homogeneous)", False))
        if {j.input_index for j in found} != set(range(first.n_inputs)):
            skips.append(
                Skipped(layers, f"{name}: adds a tensor that is not the output of a rescalable layer", False)
            )
        if len({j.blocks for j in found}) > 1:
            skips.append(
                Skipped(layers, f"{name}: its operands hold the channels at different positions", False)
            )
    return paths, skips


def discover_groups(
    model: nn.Module,
    example_input: Any = None,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    norm_layers: str = "stop",
) -> tuple[list[ENormGroup], list[Skipped]]:
    """The groups of units ENorm balances, in execution order, and what it leaves alone (with the reason).

    From the traced graph (:func:`normkit.graph.trace`), or from ``pairs=[(producer, consumer), ...]`` by
    module names, in which case the ops between them are trusted to be positively homogeneous per channel and
    a consumer with k times more inputs than the producer has channels reads each channel as a block of k
    (channel-major flatten). ``norm_layers`` as in :class:`ENorm`: with ``"ignore"`` a group's producer is
    the layer before the normalization layer, with ``"affine"`` the normalization layer itself (its γ, β).
    """
    if norm_layers not in NORM_LAYER_MODES:
        raise ValueError(f"norm_layers must be one of {', '.join(NORM_LAYER_MODES)}, got {norm_layers!r}")
    inner = unwrap_model(model)
    modules = dict(inner.named_modules())
    if pairs is not None:
        return _groups_from_pairs(modules, pairs), []
    try:
        graph = trace(inner, example_input, fallback=False)
    except UntraceableModelError as exc:
        raise ENormStructureError(
            f"ENorm needs the operations between layers, which only the torch.fx graph shows (a hooked "
            f"forward pass sees the layers, not what lies between them), and {exc} "
            "Give the pairs explicitly by module names instead: "
            "ENorm(model, optimizer, pairs=[('fc1', 'fc2'), ('fc2', 'fc3')]) (each producer with every layer "
            "its output feeds, through positively homogeneous operations only); "
            "print(normkit.graph.trace(model, example_input)) lists the layers in execution order."
        ) from exc
    groups: list[ENormGroup] = []
    skipped: list[Skipped] = []
    crossed, cross_skips = _crossable_norms(graph) if norm_layers != "stop" else ({}, [])
    skipped.extend(cross_skips)
    carried = set(crossed.values())  # their units are balanced through the normalization layer they feed
    for members in tied_sources(graph):
        layers = tuple(m for m in members if m is not None)
        if None not in members and all(m in carried for m in layers):
            continue
        if not any(graph[m].kind in _CHANNEL_KINDS or m in crossed for m in layers):
            continue
        paths, skips = _check_tied(graph, members, crossed)
        if not skips:
            try:
                consumers = [(p.edge.dst, p.blocks.offset, p.blocks.block) for p in paths]
                if norm_layers == "ignore":
                    producers = [crossed.get(m, m) for m in layers]
                    through = [m for m in layers if m in crossed]
                else:
                    producers, through = list(layers), []
                groups.append(_build_group(modules, producers, consumers, through))  # type: ignore[arg-type]
                continue
            except ChannelPathError as exc:
                skips = [Skipped(layers, str(exc), False)]
        skipped.extend(skips)
    return groups, skipped


def _groups_from_pairs(modules: dict[str, nn.Module], pairs: Sequence[tuple[str, str]]) -> list[ENormGroup]:
    by_producer: dict[str, list[tuple[str, int, int]]] = {}
    for producer, consumer in pairs:
        for name in (producer, consumer):
            if name not in modules or layer_kind(modules[name]) not in _CHANNEL_KINDS:
                raise ENormStructureError(
                    f"pairs: {name!r} is not a Linear / Conv / ConvTranspose module of the model"
                )
        n_out, n_in = out_channels(modules[producer]), in_channels(modules[consumer])
        if n_in % n_out:
            raise ENormStructureError(
                f"pairs: {producer!r} has {n_out} output channels but {consumer!r} reads {n_in} inputs"
            )
        by_producer.setdefault(producer, []).append((consumer, 0, n_in // n_out))
    try:
        return [_build_group(modules, [p], cons) for p, cons in by_producer.items()]
    except ChannelPathError as exc:
        raise ENormStructureError(f"pairs: {exc}") from exc


# --- the object ------------------------------------------------------------------------------------------


# --- DTensor parameters (FSDP2 ``fully_shard``, Shard(0) / Replicate() on a 1-D mesh) -------------------
#
# Row i of a producer's weight lies whole on one rank (Shard(0) splits dim 0, the output units); column i of
# the consumer's weight is spread over every rank's rows. Each rank therefore computes, per group, a
# zero-padded vector of the incoming norms of its own units and the partial sums of the outgoing norms over
# its own rows; one all-reduce (sum) of both gives every rank the whole of both, so d is known everywhere
# and each rank rescales its own shard. A replicated (or plain) tensor is counted on the mesh's rank 0 only.


@dataclass
class _Piece:
    """A rank's unit view of (part of) a tensor: it covers units ``[u0, u1)`` of its group."""

    view: Tensor
    u0: int
    u1: int
    counted: bool  # adds its norms to the reduction (False on all ranks but one for a replicated tensor)


@dataclass
class _ShardedViews:
    n: int  # units in the group
    norm_in: list[_Piece]
    norm_out: list[_Piece]
    times_d: list[_Piece]
    times_inv_d: list[_Piece]
    times_d2: list[_Piece]
    times_inv_d2: list[_Piece]


class _Mesh:
    """The one 1-D device mesh every DTensor of an ENorm lives on, and this rank's place on it."""

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        self.mesh: Any = None
        for t in tensors:
            if is_dtensor(t):
                self.mesh = t.device_mesh  # type: ignore[attr-defined]
                break
        self.group = self.mesh.get_group() if self.mesh is not None and self.mesh.ndim == 1 else None
        self.first = self.mesh is None or self.mesh.ndim != 1 or self.mesh.get_local_rank() == 0

    def piece(self, slot: _Slot, t: Tensor, where: str) -> _Piece:
        if not is_dtensor(t):
            v = slot.view(t)
            return _Piece(v, 0, v.shape[0] * v.shape[2], self.first)
        placements = tuple(t.placements)  # type: ignore[attr-defined]
        mesh = t.device_mesh  # type: ignore[attr-defined]
        if mesh.ndim != 1 or mesh != self.mesh:
            raise ValueError(
                f"ENorm: {where} is a DTensor on a {mesh.ndim}-D device mesh {tuple(mesh.shape)} with "
                f"placements {placements}; ENorm handles DTensors on one 1-D mesh shared by all its weights "
                "(FSDP2 fully_shard, Shard(0) / Replicate()). For HSDP / tensor-parallel layouts, "
                "redistribute the weights to one 1-D mesh or balance the unwrapped model."
            )
        placement = placements[0]
        if isinstance(placement, Replicate):
            v = slot.view(t.to_local())  # type: ignore[attr-defined]
            return _Piece(v, 0, v.shape[0] * v.shape[2], self.first)
        if not (isinstance(placement, Shard) and placement.dim == 0):
            raise ValueError(
                f"ENorm: {where} is sharded as {placement!r}; ENorm needs each unit's weights whole on one "
                "rank: Shard(0) (fully_shard's default) or Replicate(). Redistribute it first: "
                "param.redistribute(mesh, [Shard(0)])."
            )
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
        v, u0, u1 = slot.shard_view(t.to_local(), int(offset[0]) if len(offset) else 0, where)  # type: ignore[attr-defined]
        return _Piece(v, u0, u1, True)


def _piece_norms(pieces: Sequence[_Piece], n: int, p: float, like: Tensor) -> Tensor:
    """This rank's share of Σ‖unit‖_p^p over ``pieces``: a length-``n`` vector, zero where it has none."""
    total = torch.zeros(n, dtype=_acc_dtype(like), device=like.device)
    for piece in pieces:
        if piece.counted and piece.u1 > piece.u0:
            total[piece.u0 : piece.u1] += unit_norms([piece.view], p).to(total.dtype)
    return total


def _scale_pieces_(pieces: Sequence[_Piece], s: Tensor) -> None:
    for piece in pieces:
        if piece.u1 > piece.u0:
            v = piece.view
            v.mul_(s[piece.u0 : piece.u1].view(v.shape[0], 1, v.shape[2], 1).to(v.dtype))


def _apply_pieces_(d: Tensor, views: _ShardedViews) -> None:
    inv = d.reciprocal()
    _scale_pieces_(views.times_d, d)
    _scale_pieces_(views.times_inv_d, inv)
    if views.times_d2:
        _scale_pieces_(views.times_d2, d.square())
    if views.times_inv_d2:
        _scale_pieces_(views.times_inv_d2, inv.square())


@dataclass
class _GroupViews:
    """One group's unit views, sorted by what a cycle does with them (see :func:`balance_`)."""

    norm_in: list[Tensor]
    norm_out: list[Tensor]
    times_d: list[Tensor]
    times_inv_d: list[Tensor]
    times_d2: list[Tensor]
    times_inv_d2: list[Tensor]


class ENorm:
    """Equi-normalization cycles interleaved with an optimizer.

    ``enorm = ENorm(model, optimizer, c=1.0)``; after each ``optimizer.step()`` call ``enorm.step()``.

    Args:
        model: the network (a DDP / compile wrapper is looked through).
        optimizer: SGD, Adam or AdamW, whose state is rescaled with the weights; ``None`` to rescale only the
            weights. Any other optimizer raises (its state would no longer match the weights).
        c: asymmetric scaling coefficient, finite and positive: at the fixed point ‖outgoing‖ = c·‖incoming‖
            per unit (the paper uses 1.2 for its FC net and 1.1 for its conv net).
        p: order of the entrywise norms (2 in the paper).
        every: run the cycles every ``every`` calls of :meth:`step`.
        example_input: an input of the model; needed for tensor shapes when a flatten / reshape or a
            concatenation sits between two layers.
        cycles: sweeps over the network per run.
        include_bias: count producer biases in ‖incoming‖ (with ``bias="scale"``).
        bias: ``"scale"`` (default): producer biases are scaled with their rows, which keeps the function;
            ``"keep"``: biases are left alone, as the authors' code does ("more stable"); the function then
            changes wherever a bias is non-zero. With c ≠ 1, trainable biases on balanced layers make
            training unstable in both modes (a warning says so): use bias-free layers, as the paper's
            networks, or c = 1.
        norm_layers: what a normalization layer (BatchNorm, BatchRenorm, InstanceNorm) between two layers
            does to the units it normalizes.

            - ``"stop"`` (default): it ends the chain; those units are left alone. The function is kept.
            - ``"ignore"``: the authors' practice ("ignore the BatchNorm weights and perform the ENorm cycle
              as usual"): rows of the layer before it and columns of the layer after it are balanced as if it
              were not there. **The function changes**: the normalization cancels the row scaling, the column
              scaling remains (a warning at construction says so). Its running statistics are scaled with
              the rows (mean by d, variance by d²) so that eval mode cancels the rows too; the reference code
              left them to catch up.
            - ``"affine"`` (ours, function-preserving): the unit's scale is carried by the normalization
              layer's affine γ, β (scaled by d) against the columns of the layer after it (by 1/d);
              ‖incoming‖ is |γ_i| (with ``include_bias``, ‖(γ_i, β_i)‖). The layer before it is untouched.
              Exact in train and eval mode; needs ``affine=True``.

            Only a per-channel normalization fed directly by one linear / conv layer is crossed; any other is
            reported in :attr:`skipped`.
        sweep: ``"sequential"`` (default): each group's norms are read after the previous groups' rescalings
            (exact block coordinate descent); ``"simultaneous"``: every factor from the norms at the start of
            the cycle, as the reference code computes them (with ``skip_last=True`` and ``bias="keep"``, its
            exact arithmetic).
        skip_last: leave the last group alone, as the reference code did (for reproductions).
        include_frozen: also balance groups with a frozen weight (``requires_grad=False``) or one outside
            ``optimizer``; by default they are left alone and listed in :attr:`skipped`.
        pairs: ``[(producer, consumer), ...]`` by module names, instead of tracing the model.
        warn: warn once about the layers left alone for reasons other than normalization / model output.
        optimizer_state: ``"rescale"`` (default): momentum / Adam moments follow the weights (what keeps the
            optimizer's trajectory that of the unbalanced network); ``"keep"``: left alone, as the authors'
            FC code does (their conv code rescales SGD momentum).
        running_stats: ``"rescale"`` (default): with ``norm_layers="ignore"`` the running mean / variance of
            a crossed normalization layer follow its input rows; ``"keep"``: left alone, as the authors' code
            does (eval mode then sees the rescaled rows until the statistics catch up).
            ``ENorm(..., norm_layers="ignore", **ENorm.AUTHORS_FC)`` is the authors' ``_step_fc`` exactly.
        nonfinite: a unit whose norms are not finite (an inf / NaN weight) is always left alone (factor 1), so
            one bad entry never spreads over its row and column. ``"skip"`` (default) does that silently
            with no host synchronisation; ``"warn"`` also checks every cycle and warns, naming the tensors;
            ``"raise"`` raises ``FloatingPointError`` before anything is rescaled (both cost one host sync).

    DTensor parameters (FSDP2 ``fully_shard``, or ``Shard(0)`` / ``Replicate()`` on a 1-D mesh) are
    balanced shard by shard: a unit's incoming row lies on one rank, its outgoing column is spread over all
    ranks' rows, so each group needs the sum of one vector of 2 × (units) floats over the mesh: one
    all-reduce per group per cycle with ``sweep="sequential"`` (a group's incoming norms depend on the
    previous group's factors), one all-reduce per cycle with ``sweep="simultaneous"``; no host
    synchronisation. Other placements (``Shard(1)``, 2-D meshes, a grouped convolution cut inside a group)
    raise a ``ValueError`` naming the placement and the alternative.

    Attributes:
        groups: the :class:`ENormGroup` s balanced, in sweep order.
        skipped: ``(layers, reason)`` for every layer set left alone.
    """

    #: The authors' FC code (facebookresearch/enorm, ``_step_fc``): ``ENorm(model, optimizer, c,
    #: norm_layers="ignore", **ENorm.AUTHORS_FC)`` reproduces it step for step.
    AUTHORS_FC: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {
            "sweep": "simultaneous",
            "skip_last": True,
            "bias": "keep",
            "optimizer_state": "keep",
            "running_stats": "keep",
        }
    )

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        c: float = 1.0,
        p: float = 2.0,
        every: int = 1,
        example_input: Any = None,
        *,
        cycles: int = 1,
        include_bias: bool = False,
        bias: str = "scale",
        norm_layers: str = "stop",
        sweep: str = "sequential",
        skip_last: bool = False,
        include_frozen: bool = False,
        pairs: Sequence[tuple[str, str]] | None = None,
        warn: bool = True,
        optimizer_state: str = "rescale",
        running_stats: str = "rescale",
        nonfinite: str = "skip",
    ) -> None:
        for name, value, choices in (
            ("bias", bias, BIAS_MODES),
            ("norm_layers", norm_layers, NORM_LAYER_MODES),
            ("sweep", sweep, SWEEPS),
            ("optimizer_state", optimizer_state, STATE_MODES),
            ("running_stats", running_stats, STATE_MODES),
            ("nonfinite", nonfinite, NONFINITE_MODES),
        ):
            if value not in choices:
                raise ValueError(
                    f"ENorm {name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
                )
        if include_bias and bias == "keep":
            raise ValueError("include_bias=True counts biases that bias='keep' leaves alone: choose one")
        if optimizer is not None and not isinstance(optimizer, _SUPPORTED_OPTIMIZERS):
            raise TypeError(
                f"ENorm rescales the optimizer state of SGD, Adam and AdamW only; {type(optimizer).__name__} "
                "keeps state ENorm cannot transform consistently. Pass optimizer=None to rescale only the "
                "weights (that optimizer's state then refers to the unscaled network)."
            )
        if not (math.isfinite(c) and c > 0) or not (math.isfinite(p) and p > 0):
            raise ValueError(
                f"c and p must be finite and positive, got c={c}, p={p} (c = 1 balances symmetrically; the "
                "paper uses c = 1.1-1.2 and p = 2)"
            )
        if every < 1 or cycles < 1:
            raise ValueError(f"every and cycles must be at least 1, got every={every}, cycles={cycles}")
        self.model = model
        self.optimizer = optimizer
        self.c, self.p, self.every, self.cycles = float(c), float(p), int(every), int(cycles)
        self.include_bias = include_bias
        self.bias, self.norm_layers, self.sweep = bias, norm_layers, sweep
        self.optimizer_state, self.running_stats, self.nonfinite = optimizer_state, running_stats, nonfinite
        groups, skipped = discover_groups(model, example_input, pairs=pairs, norm_layers=norm_layers)
        if skip_last and groups:
            skipped.append(Skipped(groups[-1].producers, "skip_last=True", True))
            groups = groups[:-1]
        if not include_frozen:
            groups = self._without_frozen(model, optimizer, groups, skipped)
        self.groups: list[ENormGroup] = groups
        self.skipped: list[tuple[tuple[str, ...], str]] = [(s.layers, s.reason) for s in skipped]
        self._calls = 0
        slots = (s for g in groups for s in (*g.incoming, *self._biases(g), *g.outgoing, *g.stats))
        self._slots = list({(id(s.module), s.attr): s for s in slots}.values())
        self._views_key: tuple[int, ...] | None = None
        self._views_cache: list[Any] = []
        self._mesh = _Mesh(s.tensor() for s in self._slots)
        self._names = {id(m): n for n, m in unwrap_model(model).named_modules()}
        noisy = [s for s in skipped if not s.expected]
        if warn and noisy:
            lines = "; ".join(f"{', '.join(s.layers)}: {s.reason}" for s in noisy)
            warnings.warn(
                f"ENorm leaves these layers' units unbalanced (function kept): {lines}", stacklevel=2
            )
        if not groups:
            warnings.warn("ENorm found no pair of layers to balance in this model", stacklevel=2)
        crossed = [n for g in groups for n in g.crossed]
        if crossed:
            warnings.warn(
                f"ENorm(norm_layers='ignore') balances across {', '.join(crossed)}: a normalization layer "
                "cancels the scaling of the rows before it, not that of the columns after it, so every cycle "
                "changes the network's function (the paper authors' practice). norm_layers='affine' carries "
                "the scale in the layers' γ, β instead and keeps the function.",
                stacklevel=2,
            )
        names = {id(m): n for n, m in unwrap_model(model).named_modules()}
        biased = [
            names.get(id(s.module), "?")
            for g in groups
            for s in g.biases
            if layer_kind(s.module) in _CHANNEL_KINDS and s.tensor().requires_grad
        ]
        if self.c != 1.0 and biased:
            warnings.warn(
                f"ENorm with c = {self.c:g} balances layers with trainable biases ({', '.join(biased)}): "
                "c ≠ 1 shrinks the middle layers' activations while their biases keep their size, and "
                "training with SGD becomes unstable (measured: diverges within a few hundred steps, lr 0.1, "
                "in this code and in the authors'). Remedy: bias-free layers (bias=False, as in the paper's "
                "networks, with BatchNorm's β for the offset if needed), or c = 1.",
                stacklevel=2,
            )

    def _biases(self, group: ENormGroup) -> tuple[_Slot, ...]:
        return group.biases if self.bias == "scale" else ()

    def _without_frozen(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        groups: list[ENormGroup],
        skipped: list[Skipped],
    ) -> list[ENormGroup]:
        """The groups whose every rescaled parameter is trainable and (with an optimizer) optimized."""
        names = {id(m): n for n, m in unwrap_model(model).named_modules()}
        optimized = (
            {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer is not None else None
        )
        kept = []
        for group in groups:
            reason = None
            for slot in (*group.incoming, *self._biases(group), *group.outgoing):
                t = slot.tensor()
                where = f"{names.get(id(slot.module), '?')}.{slot.attr}"
                if not t.requires_grad:
                    reason = f"{where} is frozen (requires_grad=False)"
                elif optimized is not None and id(t) not in optimized:
                    reason = f"{where} is not in the optimizer"
                if reason is not None:
                    break
            if reason is None:
                kept.append(group)
            else:
                skipped.append(Skipped(group.producers, f"{reason}; include_frozen=True balances it", True))
        return kept

    def step(self) -> None:
        """Count a training step; every ``every`` steps run ``cycles`` ENorm cycles."""
        self._calls += 1
        if self._calls % self.every == 0:
            for _ in range(self.cycles):
                self.cycle()

    @torch.no_grad()
    def cycle(self) -> None:
        """One sweep over the groups in execution order: Gauss-Seidel (each group uses the previous groups'
        rescalings) or, with ``sweep="simultaneous"``, every factor from the norms at the start.

        On DTensor weights (FSDP2): one all-reduce per group with ``"sequential"`` (a group's incoming norms
        depend on the previous group's factors, which only now are known everywhere), one per cycle with
        ``"simultaneous"``; no host synchronisation (unless ``nonfinite`` is ``"warn"`` / ``"raise"``)."""
        if self.nonfinite != "skip":
            self._check_finite()
        all_views = self._views()
        if self._mesh.mesh is not None:
            self._cycle_sharded(all_views)
            return
        if self.sweep == "sequential":
            for views in all_views:
                balance_(
                    views.norm_in,
                    views.norm_out,
                    times_d=views.times_d,
                    times_inv_d=views.times_inv_d,
                    times_d2=views.times_d2,
                    times_inv_d2=views.times_inv_d2,
                    c=self.c,
                    p=self.p,
                )
            return
        factors = [
            balance_factors(unit_norms(v.norm_in, self.p), unit_norms(v.norm_out, self.p), self.c, self.p)
            for v in all_views
        ]
        for v, d in zip(all_views, factors):
            _apply_(d, v.times_d, v.times_inv_d, v.times_d2, v.times_inv_d2)

    def _cycle_sharded(self, all_views: list[_ShardedViews]) -> None:
        import torch.distributed as dist

        like = self._slots[0].tensor() if self._slots else torch.zeros(())
        like = local(like)

        def norms(v: _ShardedViews) -> Tensor:
            return torch.cat(
                [_piece_norms(v.norm_in, v.n, self.p, like), _piece_norms(v.norm_out, v.n, self.p, like)]
            )

        if self.sweep == "sequential":
            for v in all_views:
                both = norms(v)
                dist.all_reduce(both, group=self._mesh.group)
                _apply_pieces_(balance_factors(both[: v.n], both[v.n :], self.c, self.p), v)
            return
        if not all_views:
            return
        flat = torch.cat([norms(v) for v in all_views])
        dist.all_reduce(flat, group=self._mesh.group)
        start = 0
        for v in all_views:
            both = flat[start : start + 2 * v.n]
            start += 2 * v.n
            _apply_pieces_(balance_factors(both[: v.n], both[v.n :], self.c, self.p), v)

    def _check_finite(self) -> None:
        """Refuse (or report) non-finite weights before anything changes: one host synchronisation."""
        slots = [s for s in self._slots if s.attr in ("weight", "bias")]
        if not slots:
            return
        bad = torch.stack([~torch.isfinite(local(s.tensor())).all() for s in slots]).to(torch.float32)
        if self._mesh.group is not None:
            import torch.distributed as dist

            dist.all_reduce(bad, group=self._mesh.group)
        flags = bad.tolist()
        names = [f"{self._names.get(id(s.module), '?')}.{s.attr}" for s, f in zip(slots, flags) if f > 0]
        if not names:
            return
        message = (
            f"ENorm: non-finite values (inf / NaN) in {', '.join(names)}; the training step that produced "
            "them diverged (lower the learning rate, clip gradients, or skip non-finite steps)"
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(message + ". Nothing was rescaled.")
        warnings.warn(message + ". The units they touch are left alone this cycle.", stacklevel=3)

    def _views(self) -> list[Any]:
        """The unit views of every group's weights and optimizer state, rebuilt only when a tensor changed
        (a parameter replaced, state created or loaded): building them is most of a small network's cycle."""
        state = self._state()
        key: list[int] = []
        for t in self._tensors():
            key += (id(t), local(t).data_ptr())
            st = state.get(t)
            if st:
                key.extend(
                    local(st[k]).data_ptr() for k in (*_GRAD_LIKE, *_SQUARE_LIKE) if st.get(k) is not None
                )
            key.append(-1)
        signature = tuple(key)
        if signature != self._views_key:
            build = self._group_views if self._mesh.mesh is None else self._sharded_views
            self._views_cache = [build(group, state) for group in self.groups]
            self._views_key = signature
        return self._views_cache

    def _state(self) -> Any:
        if self.optimizer is None or self.optimizer_state == "keep":
            return {}
        return self.optimizer.state

    def _tensors(self) -> list[Tensor]:
        return [s.tensor() for s in self._slots]

    def _group_views(self, group: ENormGroup, state: Any) -> _GroupViews:
        w_in = [s.view(s.tensor()) for s in group.incoming]
        b_in = [s.view(s.tensor()) for s in self._biases(group)]
        w_out = [s.view(s.tensor()) for s in group.outgoing]
        stats = group.stats if self.running_stats == "rescale" else ()
        means = [s.view(s.tensor()) for s in stats]
        variances = [
            s.view(s.module.running_var)  # type: ignore[arg-type]
            for s in stats
        ]
        gl_in: list[Tensor] = []
        gl_out: list[Tensor] = []
        sq_in: list[Tensor] = []
        sq_out: list[Tensor] = []
        for slots, gl, sq in (
            ((*group.incoming, *self._biases(group)), gl_in, sq_in),
            (group.outgoing, gl_out, sq_out),
        ):
            for s in slots:
                st = state.get(s.tensor())
                if not st:
                    continue
                gl.extend(s.view(st[k]) for k in _GRAD_LIKE if st.get(k) is not None)
                sq.extend(s.view(st[k]) for k in _SQUARE_LIKE if st.get(k) is not None)
        return _GroupViews(
            norm_in=[*w_in, *b_in] if self.include_bias else w_in,
            norm_out=w_out,
            times_d=[*w_in, *b_in, *gl_out, *means],
            times_inv_d=[*w_out, *gl_in],
            times_d2=[*sq_out, *variances],
            times_inv_d2=sq_in,
        )

    def _sharded_views(self, group: ENormGroup, state: Any) -> _ShardedViews:
        def pieces(slots: Iterable[_Slot], key: str | None = None) -> list[_Piece]:
            found = []
            for s in slots:
                t = s.tensor() if key is None else state.get(s.tensor(), {}).get(key)
                if t is None:
                    continue
                where = f"{self._names.get(id(s.module), '?')}.{s.attr}" + (f" ({key})" if key else "")
                found.append(self._mesh.piece(s, t, where))
            return found

        ins = (*group.incoming, *self._biases(group))
        stats = group.stats if self.running_stats == "rescale" else ()
        w_in, b_in = pieces(group.incoming), pieces(self._biases(group))
        w_out = pieces(group.outgoing)
        means = [self._mesh.piece(s, s.tensor(), "running_mean") for s in stats]
        variances = [self._mesh.piece(s, s.module.running_var, "running_var") for s in stats]  # type: ignore[arg-type]
        gl_in = [x for k in _GRAD_LIKE for x in pieces(ins, k)]
        sq_in = [x for k in _SQUARE_LIKE for x in pieces(ins, k)]
        gl_out = [x for k in _GRAD_LIKE for x in pieces(group.outgoing, k)]
        sq_out = [x for k in _SQUARE_LIKE for x in pieces(group.outgoing, k)]
        return _ShardedViews(
            n=group.incoming[0].final[0] * group.incoming[0].final[2],
            norm_in=[*w_in, *b_in] if self.include_bias else w_in,
            norm_out=w_out,
            times_d=[*w_in, *b_in, *gl_out, *means],
            times_inv_d=[*w_out, *gl_in],
            times_d2=[*sq_out, *variances],
            times_inv_d2=sq_in,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._calls = int(state["calls"])

    def __repr__(self) -> str:
        return (
            f"ENorm(c={self.c}, p={self.p}, every={self.every}, cycles={self.cycles}, "
            f"norm_layers={self.norm_layers!r}, bias={self.bias!r}, sweep={self.sweep!r}, "
            f"groups={len(self.groups)}, skipped={len(self.skipped)})"
        )
