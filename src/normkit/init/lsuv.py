"""Layer-sequential unit-variance (LSUV) init (Mishkin & Matas, "All you need is a good init", ICLR 2016).

The paper: pre-initialize every convolution and fully connected layer with an orthonormal matrix; then for
each layer L, in order, repeat "forward a mini-batch, v = Var(output of L over the whole blob),
W_L ← W_L / √v" until |v − 1| < tol (0.1) or T_max (10) tries.

How we do it. The output of a linear or convolution layer is linear in its weight: scaling W by s turns the
output y into s·(y − b) + b. So each layer's loop runs *inside a forward hook*, on the output the layer just
produced: measure v, scale the weight, apply the same scale to the output tensor, measure again — exactly the
values a new forward pass would give for that layer (the layers before it are already final), and the
corrected output flows on to the next layer. One forward pass of the network initializes every layer that runs
once per forward; the peers (PyPI ``lsuv``, LSUV-pytorch) run about two full passes per layer.

Where we differ from the paper, on purpose:
  * layers are taken in *execution* order (from :func:`normkit.graph.trace`), not in definition order;
  * the network runs in eval mode: normalization layers use (and keep) their running statistics, dropout is
    off;
  * a module called several times per forward is scaled on the statistics of all its calls; its loop needs
    one forward pass per try (its later calls read tensors that depend on its first call's scale);
  * by default (``skip_normalized``) a layer whose output goes straight into a normalization layer keeps its
    orthogonal init — the normalization cancels any scale;
  * ``target_var`` generalizes the unit variance: W ← W·√(target_var / v), stop when |v − target_var| < tol;
  * ``per_channel=True`` scales each output channel on its own variance (the paper uses the whole blob);
  * variance is the unbiased variance over all elements of the output (batch, channels, positions), as
    ``torch.var`` in the Torch reference; under ``torch.distributed``, the variance over every rank's batch.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from normkit._moments import merge_moments as _merge
from normkit.graph import LayerKind, UntraceableModelError, inspection_mode, trace, unwrap_model
from normkit.init._weights import WeightAccess, WeightAccessError
from normkit.init.orthogonal import (
    Include,
    Snapshot,
    broadcast_layers,
    orthogonalize,
    select_layers,
)

__all__ = [
    "LSUVError",
    "LSUVLayerRecord",
    "LSUVReport",
    "LayerStatus",
    "allreduce_moments",
    "blob_variance",
    "channel_moments",
    "lsuv_factor",
    "lsuv_init",
    "merge_moments",
    "moments_variance",
    "rescale_moments",
    "rescale_output",
    "weight_factor",
]


class LSUVError(RuntimeError):
    """LSUV cannot initialize this model as asked; the model is left as it was before the call."""


# --- functional core: pure tensor math -------------------------------------------------------------------


def channel_moments(y: Tensor, channel_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count per channel, mean, M2 = Σ(y − mean)²) of each channel of ``y`` along ``channel_dim``, in
    float64 (the reduction itself runs in the output's dtype, float32 at least)."""
    yf = y.detach()
    if not yf.is_floating_point() or yf.dtype in (torch.float16, torch.bfloat16):
        yf = yf.float()
    dims = [d for d in range(yf.dim()) if d != channel_dim]
    n = yf.numel() // yf.shape[channel_dim]
    var, mean = torch.var_mean(yf, dim=dims, correction=0)
    count = torch.tensor(float(n), dtype=torch.float64, device=y.device)
    return count, mean.double(), var.double() * n


def merge_moments(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of the union of several sets, elementwise (Chan et al.):
    M2 = Σ M2_i + Σ n_i (mean_i − mean)²."""
    if len(parts) == 1:
        return parts[0]
    counts, means, m2s = (torch.stack([p[k] for p in parts]) for k in range(3))
    return _merge(counts, means, m2s)


def blob_variance(count: Tensor, mean: Tensor, m2: Tensor) -> Tensor:
    """Unbiased variance over the whole blob (every channel together) from per-channel moments."""
    channels = mean.numel()
    grand = mean.mean()
    total_m2 = m2.sum() + count * (mean - grand).square().sum()
    return total_m2 / (count * channels - 1).clamp_min(1)


def rescale_moments(mean: Tensor, m2: Tensor, bias: Tensor | None, factor: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel moments of s·(y − b) + b from those of y: mean → s(mean − b) + b, M2 → s² M2."""
    b = bias if bias is not None else torch.zeros_like(mean)
    return factor * (mean - b) + b, factor.square() * m2


def allreduce_moments(
    count: Tensor, mean: Tensor, m2: Tensor, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The moments over every rank of ``group`` (exact: global mean first, then the spread about it)."""
    total = count.clone()
    dist.all_reduce(total, group=group)
    weighted = mean * count
    dist.all_reduce(weighted, group=group)
    gmean = weighted / total
    spread = m2 + count * (mean - gmean).square()
    dist.all_reduce(spread, group=group)
    return total, gmean, spread


def moments_variance(count: Tensor, m2: Tensor) -> Tensor:
    """Unbiased variance M2 / (n − 1), as ``torch.var``."""
    return m2 / (count - 1).clamp_min(1)


def lsuv_factor(var: Tensor, target_var: float = 1.0) -> Tensor:
    """The paper's weight correction, generalized to any target: √(target_var / var)."""
    return torch.sqrt(target_var / var)


def rescale_output(y: Tensor, bias: Tensor | None, factor: Tensor, channel_dim: int) -> Tensor:
    """The output the layer gives once its weight is multiplied by ``factor`` (scalar or per channel):
    s·(y − b) + b = s·y + (1 − s)·b, in one pass."""
    f = factor.to(y.dtype)
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    if f.dim() > 0:
        f = f.reshape(shape)
    if bias is None:
        return y * f
    b = bias.detach().to(y.dtype).reshape(shape)
    return torch.addcmul(b * (1 - f), y, f)


def weight_factor(factor: Tensor, weight_shape: torch.Size, kind: LayerKind, groups: int = 1) -> Tensor:
    """``factor`` (scalar, or one value per output channel) shaped to multiply a layer's weight: rows of a
    linear / conv weight ``(out, ...)``, the output axis of a transposed conv weight
    ``(in, out/groups, ...)``."""
    if factor.dim() == 0:
        return factor
    rest = [1] * (len(weight_shape) - 2)
    if kind is LayerKind.CONV_TRANSPOSE:
        in_ch, out_g = weight_shape[0], weight_shape[1]
        f = factor.reshape(groups, 1, out_g).expand(groups, in_ch // groups, out_g)
        return f.reshape(in_ch, out_g, *rest)
    return factor.reshape(-1, 1, *rest)


# --- report ----------------------------------------------------------------------------------------------


class LayerStatus(str, enum.Enum):
    INITIALIZED = "initialized"  # orthogonal pre-init (if asked) and LSUV scaling
    FEEDS_NORMALIZATION = "feeds normalization"  # orthogonal pre-init only (skip_normalized)
    EXCLUDED = "excluded"  # left out by include=
    UNSUPPORTED = "unsupported"  # a module with weights LSUV does not cover (RNN, embedding ...)
    NOT_RUN = "not run"  # a linear / conv module the traced forward never calls as a module


@dataclass(frozen=True)
class LSUVLayerRecord:
    """What LSUV did to one layer. Variances are over the init batch (per_channel: mean of the channels')."""

    name: str
    type: str
    status: LayerStatus
    var_before: float | None = None
    var_after: float | None = None
    iterations: int = 0
    converged: bool | None = None
    calls: int = 1
    scale: float | None = None  # total factor applied to the weight (per_channel: mean over channels)
    note: str = ""


@dataclass
class LSUVReport:
    """One record per layer, in execution order (layers the forward never runs come last)."""

    layers: list[LSUVLayerRecord]
    target_var: float
    tol: float
    forward_passes: int  # calls of the model's forward, partial ones included
    per_channel: bool = False
    _by_name: dict[str, LSUVLayerRecord] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {r.name: r for r in self.layers}

    def __getitem__(self, name: str) -> LSUVLayerRecord:
        return self._by_name[name]

    def __iter__(self) -> Iterator[LSUVLayerRecord]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def initialized(self) -> list[LSUVLayerRecord]:
        return [r for r in self.layers if r.status is LayerStatus.INITIALIZED]

    @property
    def converged(self) -> bool:
        """Every initialized layer reached |var − target| < tol."""
        return all(bool(r.converged) for r in self.initialized)

    def table(self) -> str:
        cols = f"{'var before':>11} {'var after':>10} {'iters':>5} conv"
        head = f"{'layer':<28} {'type':<16} {'status':<20} {cols}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            vb = f"{r.var_before:11.4g}" if r.var_before is not None else f"{'':11}"
            va = f"{r.var_after:10.4g}" if r.var_after is not None else f"{'':10}"
            conv = "" if r.converged is None else ("yes" if r.converged else "NO")
            name = r.name or "(model)"
            lines.append(
                f"{name[:28]:<28} {r.type[:16]:<16} {r.status.value:<20} {vb} {va} {r.iterations:>5} {conv}"
            )
        lines.append(
            f"target var {self.target_var:g} ± {self.tol:g}; "
            f"{self.forward_passes} forward pass(es) of the model"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --- data ------------------------------------------------------------------------------------------------


def _input_of(item: Any) -> Tensor:
    if isinstance(item, Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0]
    raise TypeError(
        f"LSUV data: expected a tensor batch or a tuple/list whose first element is the input tensor, got "
        f"{type(item).__name__}"
    )


class _Batches:
    """The input batches: one fixed batch, or batches drawn from an iterable (fresh ones on request)."""

    def __init__(self, data: Any, fresh: bool) -> None:
        self.data = data
        self.drawn = 0
        self._it: Iterator[Any] | None = None
        if isinstance(data, Tensor) or (
            isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor)
        ):
            if fresh:
                raise ValueError(
                    "fresh_batches=True needs an iterable of batches (a DataLoader, a list of batches); "
                    "data is a single batch. Pass a DataLoader, or fresh_batches=False."
                )
            self.first = _input_of(data)
            return
        if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
            raise TypeError(
                "LSUV data must be a tensor batch, a tuple/list (input, ...), or an iterable / DataLoader of "
                f"batches; got {type(data).__name__}"
            )
        self.first = self._draw()

    def _draw(self) -> Tensor:
        if self._it is None:
            self._it = iter(self.data)
        try:
            item = next(self._it)
        except StopIteration:
            again = iter(self.data)
            if self.drawn == 0 or again is self._it:
                raise LSUVError(
                    f"LSUV data ran out after {self.drawn} batch(es); give more batches (or a re-iterable "
                    "DataLoader), or fresh_batches=False"
                ) from None
            self._it = again
            try:
                item = next(self._it)
            except StopIteration:
                raise LSUVError("LSUV data yields no batch") from None
        self.drawn += 1
        x = _input_of(item)
        if x.numel() == 0:
            raise ValueError("LSUV data: the batch is empty")
        return x

    def fresh(self) -> Tensor:
        return self._draw()


def _to_model(x: Tensor, model: nn.Module) -> Tensor:
    p = next(iter(model.parameters()), None)
    if p is None:
        return x
    if x.is_floating_point() and p.is_floating_point() and x.dtype != p.dtype:
        x = x.to(p.dtype)
    return x.to(p.device)


# --- the engine ------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from a hook when the rest of the forward pass has nothing left to do."""


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: LayerKind
    calls: int  # per forward, from the graph
    access: WeightAccess
    groups: int
    settled: bool = False
    iterations: int = 0
    var_before: float | None = None
    var_after: float | None = None
    converged: bool = False
    scale: Tensor | None = None
    seen: int = 0  # calls in the current pass
    parts: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)

    def channel_dim(self, y: Tensor) -> int:
        if self.kind is LayerKind.LINEAR:
            return y.dim() - 1
        return 1 if y.dim() == len(self.access.shape) else 0


class _Engine:
    def __init__(
        self,
        layers: list[_Layer],
        *,
        tol: float,
        max_iters: int,
        target_var: float,
        per_channel: bool,
        fresh: bool,
        group: dist.ProcessGroup | None,
    ) -> None:
        self.layers = layers
        self.tol, self.max_iters, self.target = tol, max_iters, target_var
        self.per_channel, self.fresh, self.group = per_channel, fresh, group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.blocker: _Layer | None = None
        self.progress = False

    # statistics --------------------------------------------------------------------------------------
    def _moments(self, parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        count, mean, m2 = merge_moments(parts)
        if self.distributed:
            count, mean, m2 = allreduce_moments(count, mean, m2, self.group)
        return count, mean, m2

    def _variance(self, count: Tensor, mean: Tensor, m2: Tensor) -> Tensor:
        return moments_variance(count, m2) if self.per_channel else blob_variance(count, mean, m2)

    def _check_alive(self, layer: _Layer, var: Tensor) -> None:
        bad = ~torch.isfinite(var) | (var <= 0)
        if bool(bad.any()):
            what = (
                f"{int(bad.sum())} of its {var.numel()} output channels have"
                if var.dim() > 0
                else f"its output has variance {float(var):.3g}:"
            )
            raise LSUVError(
                f"LSUV: layer {layer.name!r} is dead — {what} zero or non-finite variance on the init "
                "batch, so no weight scale can give it the target variance. Check the input data (constant?) "
                "and the layers before it (a ReLU net with all-negative pre-activations?); the model was "
                "left as it was before the call."
            )

    def _done(self, var: Tensor) -> bool:
        return bool(((var - self.target).abs() < self.tol).all())

    @staticmethod
    def _summary(var: Tensor) -> float:
        return float(var.mean())

    def _apply(self, layer: _Layer, factor: Tensor) -> None:
        layer.access.scale_(weight_factor(factor, layer.access.shape, layer.kind, layer.groups))
        layer.scale = factor if layer.scale is None else layer.scale * factor
        layer.iterations += 1

    def _finish(self, layer: _Layer, var: Tensor) -> None:
        layer.var_after = self._summary(var)
        layer.converged = self._done(var)
        layer.settled = True
        self.progress = True

    # the loop inside the hook, for a layer run once per forward ------------------------------------------
    def _in_hook(self, layer: _Layer, y: Tensor) -> Tensor:
        """The paper's loop on this output: each try's variance follows exactly from the per-channel moments
        (scaling W by s maps mean → s(mean − b) + b and M2 → s² M2), so the output is touched twice: once to
        measure, once to apply the total factor."""
        cdim = layer.channel_dim(y)
        bias = getattr(layer.module, "bias", None)
        bias = bias.detach() if isinstance(bias, Tensor) else None
        count, mean, m2 = self._moments([channel_moments(y, cdim)])
        b64 = bias.double() if bias is not None else None
        var = self._variance(count, mean, m2)
        layer.var_before = self._summary(var)
        total: Tensor | None = None
        while True:
            self._check_alive(layer, var)
            if self._done(var) or layer.iterations >= self.max_iters:
                break
            factor = lsuv_factor(var, self.target)
            mean, m2 = rescale_moments(mean, m2, b64, factor)
            self._apply(layer, factor)
            total = factor if total is None else total * factor
            var = self._variance(count, mean, m2)
        self._finish(layer, var)
        return y if total is None else rescale_output(y, bias, total, cdim)

    # shared modules: one try per forward pass, decided at the module's last call -------------------------
    def _after_pass_shared(self, layer: _Layer) -> None:
        var = self._variance(*self._moments(layer.parts))
        layer.parts = []
        if layer.var_before is None:
            layer.var_before = self._summary(var)
        self._check_alive(layer, var)
        if self._done(var) or layer.iterations >= self.max_iters:
            self._finish(layer, var)
        else:
            self._apply(layer, lsuv_factor(var, self.target))
            self.progress = True

    def _hook(self, layer: _Layer) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            layer.seen += 1
            if layer.seen > layer.calls:
                raise LSUVError(
                    f"LSUV: layer {layer.name!r} ran {layer.seen} times in one forward pass, but the traced "
                    f"graph has {layer.calls} call(s): the forward depends on the data. Leave the layer out "
                    "with include=, or make the forward's structure fixed."
                )
            if not isinstance(out, Tensor):
                raise LSUVError(f"LSUV: layer {layer.name!r} returned a {type(out).__name__}, not a tensor")
            if layer.settled:
                return None
            if self.blocker is not None and self.blocker is not layer:
                return None  # downstream of a layer still being scaled in this pass: next pass
            if layer.calls > 1:
                self.blocker = layer
                layer.parts.append(channel_moments(out, layer.channel_dim(out)))
                if layer.seen == layer.calls:
                    self._after_pass_shared(layer)
                    if not layer.settled:
                        raise _Stop  # scaled: the rest of this pass would see stale values
                    self.blocker = None  # converged: the layers after it go on in this same pass
                    if self.fresh or all(lay.settled for lay in self.layers):
                        raise _Stop
                return None
            y = self._in_hook(layer, out)
            if self.fresh or all(lay.settled for lay in self.layers):
                raise _Stop
            return y

        return hook

    def run(self, model: nn.Module, batches: _Batches, forward_count: list[int]) -> None:
        x = _to_model(batches.first, model)
        first = True
        while not all(layer.settled for layer in self.layers):
            if self.fresh and not first:
                x = _to_model(batches.fresh(), model)
            first = False
            self.blocker, self.progress = None, False
            pending = [layer for layer in self.layers if not layer.settled]
            for layer in self.layers:
                layer.seen = 0
            handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in pending]
            try:
                forward_count[0] += 1
                with inspection_mode(model):
                    model(x)
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
            if self.blocker is not None and self.blocker.seen != self.blocker.calls:
                raise LSUVError(
                    f"LSUV: layer {self.blocker.name!r} ran {self.blocker.seen} time(s) in a forward "
                    f"pass, but the traced graph has {self.blocker.calls} call(s): the forward depends "
                    "on the data."
                )
            if not self.progress:
                names = [layer.name for layer in pending if layer.seen == 0]
                raise LSUVError(
                    f"LSUV: layer(s) {names} are in the traced graph but did not run in the forward pass on "
                    "the init batch; leave them out with include=."
                )


# --- the API ---------------------------------------------------------------------------------------------


def _check_number(name: str, value: float, *, positive: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def lsuv_init(
    model: nn.Module,
    data: Any,
    *,
    tol: float = 0.1,
    max_iters: int = 10,
    target_var: float = 1.0,
    orthogonal: bool = True,
    include: Include = None,
    skip_normalized: bool = True,
    fresh_batches: bool = False,
    per_channel: bool = False,
    zero_bias: bool = True,
    verbose: bool = False,
    process_group: dist.ProcessGroup | None = None,
) -> LSUVReport:
    """LSUV-initialize ``model`` in place (Mishkin & Matas 2016) and return the per-layer report.

    Args:
        model: the network (DDP / DataParallel / torch.compile wrappers are looked through).
        data: a tensor batch, a tuple/list whose first element is the input, or an iterable / DataLoader of
            such batches (its first batch is used, or a fresh one per layer with ``fresh_batches``).
        tol, max_iters, target_var: stop a layer's loop when |Var(output) − target_var| < tol, or after
            ``max_iters`` weight corrections (a warning names the layers that did not converge).
        orthogonal: orthonormal pre-initialization (:func:`normkit.init.orthogonal_init`) of every layer LSUV
            touches first, as in the paper; False keeps the current weights and only rescales them.
        include: only these layers (names, modules, or a predicate on (name, module)); default all
            ``nn.Linear``, ``nn.Conv*d``, ``nn.ConvTranspose*d`` layers.
        skip_normalized: a layer whose output goes straight into a normalization layer (BatchNorm,
            BatchRenorm, GroupNorm, LayerNorm ...) keeps its orthogonal init; False scales it too.
        fresh_batches: draw a new batch from ``data`` for each layer (the paper's practice); costs one partial
            forward pass per layer instead of one pass in all.
        per_channel: scale each output channel to the target variance on its own (not the paper).
        zero_bias: the orthogonal pre-init sets biases to zero (as the paper's); False keeps them.
        verbose: print the report as a table.
        process_group: the group whose ranks share the variance (default: the world, when initialized).

    Raises:
        LSUVError: a dead layer (zero-variance output) or a forward that does not match the traced structure;
            ValueError / TypeError for bad arguments. In every case the model's weights are restored first.
    """
    tol = _check_number("tol", tol)
    target_var = _check_number("target_var", target_var)
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be an int ≥ 1, got {max_iters!r}")
    inner = unwrap_model(model)
    if not isinstance(inner, nn.Module):
        raise TypeError(f"lsuv_init needs an nn.Module, got {type(model).__name__}")
    batches = _Batches(data, fresh_batches)
    forward_count = [0]

    try:
        graph = trace(inner)
    except UntraceableModelError:
        forward_count[0] += 1  # the hooked fallback runs the model once
        graph = trace(inner, _to_model(batches.first, inner))

    chosen = select_layers(inner, include)
    chosen_names = {n for n, _ in chosen}
    records: dict[str, LSUVLayerRecord] = {}
    todo: list[_Layer] = []
    pre_init: list[str] = []
    pre_access: dict[str, WeightAccess] = {}
    for node in graph:
        tname = type(node.module).__name__
        if node.kind is LayerKind.NORM:
            continue
        if node.kind is LayerKind.OTHER:
            records[node.name] = LSUVLayerRecord(
                node.name, tname, LayerStatus.UNSUPPORTED, calls=node.calls, note="LSUV covers linear/conv"
            )
            continue
        if node.name not in chosen_names:
            records[node.name] = LSUVLayerRecord(node.name, tname, LayerStatus.EXCLUDED, calls=node.calls)
            continue
        try:
            access = WeightAccess(node.name, node.module)
        except WeightAccessError as exc:
            raise LSUVError(str(exc)) from None
        pre_init.append(node.name)
        pre_access[node.name] = access
        if skip_normalized and graph.feeds_normalization(node.name):
            dst = type(graph[node.consumers[0].dst or ""].module).__name__
            records[node.name] = LSUVLayerRecord(
                node.name, tname, LayerStatus.FEEDS_NORMALIZATION, calls=node.calls, note=f"→ {dst}"
            )
            continue
        todo.append(
            _Layer(
                node.name, node.module, node.kind, node.calls, access, int(getattr(node.module, "groups", 1))
            )
        )
        records[node.name] = LSUVLayerRecord(node.name, tname, LayerStatus.INITIALIZED, calls=node.calls)
    not_run = [(n, m) for n, m in chosen if n not in graph]
    for n, m in not_run:
        records[n] = LSUVLayerRecord(
            n,
            type(m).__name__,
            LayerStatus.NOT_RUN,
            calls=0,
            note="not called as a module by the traced forward; left untouched",
        )
    if not todo and not pre_init:
        raise LSUVError(
            f"LSUV: {type(inner).__name__} has no linear / conv layer that its forward runs"
            + (" among those chosen by include=" if include is not None else "")
            + "; nothing to initialize"
        )

    snapshot = Snapshot(graph[n].module for n in pre_init)
    try:
        if orthogonal:
            ordered = [
                (n, m) for n, m in chosen if n in pre_access
            ]  # named_modules order, as orthogonal_init
            orthogonalize(
                ordered, [pre_access[n] for n, _ in ordered], zero_bias=zero_bias, group=process_group
            )
        elif dist.is_available() and dist.is_initialized():
            broadcast_layers([graph[n].module for n in pre_init], process_group)
        if todo:
            engine = _Engine(
                todo,
                tol=tol,
                max_iters=max_iters,
                target_var=target_var,
                per_channel=per_channel,
                fresh=fresh_batches,
                group=process_group,
            )
            engine.run(inner, batches, forward_count)
    except WeightAccessError as exc:
        snapshot.restore()
        raise LSUVError(str(exc)) from None
    except BaseException:
        snapshot.restore()
        raise

    for layer in todo:
        scale = None if layer.scale is None else float(layer.scale.double().mean())
        records[layer.name] = LSUVLayerRecord(
            layer.name,
            type(layer.module).__name__,
            LayerStatus.INITIALIZED,
            var_before=layer.var_before,
            var_after=layer.var_after,
            iterations=layer.iterations,
            converged=layer.converged,
            calls=layer.calls,
            scale=1.0 if scale is None else scale,
        )
    report = LSUVReport(list(records.values()), target_var, tol, forward_count[0], per_channel=per_channel)
    if verbose:
        print(report.table())
    slow = [r for r in report.initialized if not r.converged]
    if slow:
        warnings.warn(
            f"LSUV: {len(slow)} layer(s) did not reach |var − {target_var:g}| < {tol:g} in {max_iters} "
            "iterations: " + ", ".join(f"{r.name!r} (var {r.var_after:.4g})" for r in slow),
            RuntimeWarning,
            stacklevel=2,
        )
    skipped = [r for r in report if r.status in (LayerStatus.UNSUPPORTED, LayerStatus.NOT_RUN)]
    if skipped:
        warnings.warn(
            "LSUV left untouched: " + ", ".join(f"{r.name!r} ({r.type}, {r.status.value})" for r in skipped),
            RuntimeWarning,
            stacklevel=2,
        )
    return report
