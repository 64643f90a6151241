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
  SiLU, tanh …) or the model output on any path leaves that layer's units alone;
- producer biases are scaled with their rows (exactness); whether they count in the norms is an option
  (``include_bias``, default off, as the paper recommends);
- outputs that meet in an addition (residual streams) share one scale per channel (a *tied group*: the norms
  are summed over all its producers); concatenations and flatten / reshape map a channel to a block of the
  consumer's inputs;
- each group's norms are read after the previous groups' rescalings (exact block coordinate descent; the
  reference read some norms before the previous rescaling was applied);
- the last hidden layer is balanced too (``skip_last=True`` restores the reference's behaviour);
- optimizer state follows the gradients, which scale inversely to the weights: SGD momentum and Adam / AdamW
  ``exp_avg`` by ``1/d`` on the producer rows and ``d`` on the consumer columns, ``exp_avg_sq`` (and
  ``max_exp_avg_sq``) by the squares.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import parametrize

from normkit.graph import (
    ChannelPath,
    ChannelPathError,
    LayerKind,
    ModelGraph,
    UntraceableModelError,
    channel_path,
    in_channels,
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
    """d = (‖out‖ / (c·‖in‖))^{1/2} from the p-th powers of the norms; 1 for a unit with a zero side."""
    ok = (incoming_pp * outgoing_pp) > 0
    d = (outgoing_pp / incoming_pp).mul_(c**-p).pow_(1.0 / (2.0 * p))
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
    inv = d.reciprocal()
    _scale_(times_d, d)
    _scale_(times_inv_d, inv)
    if times_d2:
        _scale_(times_d2, d.square())
    if times_inv_d2:
        _scale_(times_inv_d2, inv.square())
    return d


# --- how each weight is seen as units ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """How to see ``module.<attr>`` (or any tensor of its shape) as a unit view (G, A, C, B)."""

    module: nn.Module
    attr: str
    pre: tuple[int, ...]
    narrow: tuple[int, int, int] | None  # (dim, start, length) applied after ``pre``
    final: tuple[int, int, int, int]

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


def _producer_slots(module: nn.Module) -> tuple[_Slot, _Slot | None]:
    """Rows (output channels) of a producer's weight, and its bias."""
    w: Tensor = module.weight  # type: ignore[assignment]
    n_out = out_channels(module)
    if layer_kind(module) is LayerKind.CONV_TRANSPOSE:  # weight (in, out/groups, *k)
        g = int(module.groups)  # type: ignore[arg-type]
        shape = (g, w.shape[0] // g, w.shape[1], w[0, 0].numel())
        weight = _Slot(module, "weight", shape, None, shape)
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
        return _Slot(module, "weight", tuple(w.shape), (1, offset, width), (1, w.shape[0], n_units, block))
    if kind is LayerKind.CONV_TRANSPOSE:  # (in, out/groups, *k): inputs are rows
        rest = w[0].numel()
        return _Slot(module, "weight", (w.shape[0], rest), (0, offset, width), (1, 1, n_units, block * rest))
    g = int(module.groups)  # type: ignore[arg-type]
    k = w[0, 0].numel()
    if g == 1:  # (out, in, *k)
        pre = (w.shape[0], w.shape[1], k)
        return _Slot(module, "weight", pre, (1, offset, width), (1, w.shape[0], n_units, block * k))
    if offset != 0 or block != 1 or n_units != w.shape[1] * g:
        raise ChannelPathError(f"grouped convolution {type(module).__name__} fed by a part of its channels")
    pre4 = (g, w.shape[0] // g, w.shape[1], k)
    return _Slot(module, "weight", pre4, None, pre4)


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

    def __repr__(self) -> str:
        return f"ENormGroup(producers={self.producers}, consumers={self.consumers}, channels={self.channels})"


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
    modules: dict[str, nn.Module], producers: Sequence[str], consumers: Iterable[tuple[str, int, int]]
) -> ENormGroup:
    shared = _shared_parameter_owners(modules)
    unique = list(dict.fromkeys(consumers))
    for name in (*producers, *(n for n, _, _ in unique)):
        module = modules[name]
        if name in shared:
            raise ChannelPathError(f"{name!r} shares a parameter with another module")
        if parametrize.is_parametrized(module) or hasattr(module, "weight_g"):
            raise ChannelPathError(f"{name!r} has a parametrized weight (computed, not stored)")
    channels = out_channels(modules[producers[0]])
    incoming, biases = [], []
    for name in producers:
        w, b = _producer_slots(modules[name])
        incoming.append(w)
        if b is not None:
            biases.append(b)
    outgoing = tuple(_consumer_slot(modules[n], channels, off, blk) for n, off, blk in unique)
    return ENormGroup(tuple(producers), tuple(unique), channels, tuple(incoming), tuple(biases), outgoing)


def _check_tied(
    graph: ModelGraph, members: tuple[str | None, ...]
) -> tuple[list[ChannelPath], list[Skipped]]:
    layers = tuple(m for m in members if m is not None)
    skips: list[Skipped] = []
    if None in members:
        skips.append(Skipped(layers, "their output is added to the model input", False))
    for m in layers:
        node = graph[m]
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
        if node.kind not in _CHANNEL_KINDS:
            continue
        if not node.consumers:
            skips.append(Skipped(layers, f"the output of {m!r} is unused", True))
        for edge in node.consumers:
            try:
                paths.append(channel_path(graph, edge))
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
    if len({out_channels(graph[m].module) for m in layers if graph[m].kind in _CHANNEL_KINDS}) > 1:
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
) -> tuple[list[ENormGroup], list[Skipped]]:
    """The groups of units ENorm balances, in execution order, and what it leaves alone (with the reason).

    From the traced graph (:func:`normkit.graph.trace`), or from ``pairs=[(producer, consumer), ...]`` by
    module names, in which case the ops between them are trusted to be positively homogeneous per channel and
    a consumer with k times more inputs than the producer has channels reads each channel as a block of k
    (channel-major flatten).
    """
    inner = unwrap_model(model)
    modules = dict(inner.named_modules())
    if pairs is not None:
        return _groups_from_pairs(modules, pairs), []
    try:
        graph = trace(inner, example_input, fallback=False)
    except UntraceableModelError as exc:
        raise ENormStructureError(
            f"ENorm needs the traced graph to find which layers to balance, and {exc} "
            "Give the pairs explicitly by module names instead: "
            "ENorm(model, optimizer, pairs=[('fc1', 'fc2'), ('fc2', 'fc3')]) (each producer with every layer "
            "its output feeds, through positively homogeneous operations only)."
        ) from exc
    groups: list[ENormGroup] = []
    skipped: list[Skipped] = []
    for members in tied_sources(graph):
        layers = tuple(m for m in members if m is not None)
        if not any(graph[m].kind in _CHANNEL_KINDS for m in layers):
            continue
        paths, skips = _check_tied(graph, members)
        if not skips:
            try:
                consumers = [(p.edge.dst, p.blocks.offset, p.blocks.block) for p in paths]
                groups.append(_build_group(modules, layers, consumers))  # type: ignore[arg-type]
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
        c: asymmetric scaling coefficient: at the fixed point ‖outgoing‖ = c·‖incoming‖ per unit (the paper
            uses 1.2 for its FC net and 1.1 for its conv net).
        p: order of the entrywise norms (2 in the paper).
        every: run the cycles every ``every`` calls of :meth:`step`.
        example_input: an input of the model; needed for tensor shapes when a flatten / reshape or a
            concatenation sits between two layers.
        cycles: sweeps over the network per run.
        include_bias: count producer biases in ‖incoming‖ (they are always scaled with their rows).
        skip_last: leave the last group alone, as the reference code did (for reproductions).
        pairs: ``[(producer, consumer), ...]`` by module names, instead of tracing the model.
        warn: warn once about the layers left alone for reasons other than normalization / model output.

    Attributes:
        groups: the :class:`ENormGroup` s balanced, in sweep order.
        skipped: ``(layers, reason)`` for every layer set left alone.
    """

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
        skip_last: bool = False,
        pairs: Sequence[tuple[str, str]] | None = None,
        warn: bool = True,
    ) -> None:
        if optimizer is not None and not isinstance(optimizer, _SUPPORTED_OPTIMIZERS):
            raise TypeError(
                f"ENorm rescales the optimizer state of SGD, Adam and AdamW only; {type(optimizer).__name__} "
                "keeps state ENorm cannot transform consistently. Pass optimizer=None to rescale only the "
                "weights (that optimizer's state then refers to the unscaled network)."
            )
        if not c > 0 or not p > 0:
            raise ValueError(f"c and p must be positive, got c={c}, p={p}")
        if every < 1 or cycles < 1:
            raise ValueError(f"every and cycles must be at least 1, got every={every}, cycles={cycles}")
        self.model = model
        self.optimizer = optimizer
        self.c, self.p, self.every, self.cycles = float(c), float(p), int(every), int(cycles)
        self.include_bias = include_bias
        groups, skipped = discover_groups(model, example_input, pairs=pairs)
        if skip_last and groups:
            skipped.append(Skipped(groups[-1].producers, "skip_last=True", True))
            groups = groups[:-1]
        self.groups: list[ENormGroup] = groups
        self.skipped: list[tuple[tuple[str, ...], str]] = [(s.layers, s.reason) for s in skipped]
        self._calls = 0
        slots = (s for g in groups for s in (*g.incoming, *g.biases, *g.outgoing))
        self._slots = list({(id(s.module), s.attr): s for s in slots}.values())
        self._views_key: tuple[int, ...] | None = None
        self._views_cache: list[_GroupViews] = []
        noisy = [s for s in skipped if not s.expected]
        if warn and noisy:
            lines = "; ".join(f"{', '.join(s.layers)}: {s.reason}" for s in noisy)
            warnings.warn(
                f"ENorm leaves these layers' units unbalanced (function kept): {lines}", stacklevel=2
            )
        if not groups:
            warnings.warn("ENorm found no pair of layers to balance in this model", stacklevel=2)

    def step(self) -> None:
        """Count a training step; every ``every`` steps run ``cycles`` ENorm cycles."""
        self._calls += 1
        if self._calls % self.every == 0:
            for _ in range(self.cycles):
                self.cycle()

    @torch.no_grad()
    def cycle(self) -> None:
        """One sweep over the groups in execution order (Gauss-Seidel: each uses the previous rescalings)."""
        for views in self._views():
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

    def _views(self) -> list[_GroupViews]:
        """The unit views of every group's weights and optimizer state, rebuilt only when a tensor changed
        (a parameter replaced, state created or loaded): building them is most of a small network's cycle."""
        state = self.optimizer.state if self.optimizer is not None else {}
        key: list[int] = []
        for t in self._tensors():
            key += (id(t), t.data_ptr())
            st = state.get(t)
            if st:
                key.extend(st[k].data_ptr() for k in (*_GRAD_LIKE, *_SQUARE_LIKE) if st.get(k) is not None)
            key.append(-1)
        signature = tuple(key)
        if signature != self._views_key:
            self._views_cache = [self._group_views(group, state) for group in self.groups]
            self._views_key = signature
        return self._views_cache

    def _tensors(self) -> list[Tensor]:
        return [s.tensor() for s in self._slots]

    def _group_views(self, group: ENormGroup, state: Any) -> _GroupViews:
        w_in = [s.view(s.tensor()) for s in group.incoming]
        b_in = [s.view(s.tensor()) for s in group.biases]
        w_out = [s.view(s.tensor()) for s in group.outgoing]
        gl_in: list[Tensor] = []
        gl_out: list[Tensor] = []
        sq_in: list[Tensor] = []
        sq_out: list[Tensor] = []
        for slots, gl, sq in (
            ((*group.incoming, *group.biases), gl_in, sq_in),
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
            times_d=[*w_in, *b_in, *gl_out],
            times_inv_d=[*w_out, *gl_in],
            times_d2=sq_out,
            times_inv_d2=sq_in,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._calls = int(state["calls"])

    def __repr__(self) -> str:
        return (
            f"ENorm(c={self.c}, p={self.p}, every={self.every}, cycles={self.cycles}, "
            f"groups={len(self.groups)}, skipped={len(self.skipped)})"
        )
