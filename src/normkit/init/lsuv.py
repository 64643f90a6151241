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
  * each layer is measured in the mode training will run it: BatchNorm / BatchRenorm / InstanceNorm with
    running stats on batch statistics, dropout and every other train-only randomness off
    (``batch_statistics=False``: fully in eval mode, running statistics); the running statistics,
    ``num_batches_tracked`` and every module's train/eval flag are restored afterwards;
  * a layer is any weight the forward uses in a linear / conv computation: modules called as such, also
    inside modules fx keeps opaque (``nn.TransformerEncoder``), weights used through ``F.linear`` /
    ``F.conv*`` (Swin's attention; seen by a torch function mode), and ``nn.MultiheadAttention``'s q, k, v
    projections (rows of ``in_proj_weight``, each a layer, measured from the module's inputs) and
    ``out_proj`` (whose output is the module's output);
  * a layer whose output does not depend on its weight (all-zero input) keeps its weight (``NO_EFFECT``), and
    so does one whose correction would exceed ``max_scale`` (``OUT_OF_BOUNDS``) — never a 10⁸ scale;
  * the in-hook prediction is used only where it is exact: torch's own Linear / Conv / ConvTranspose forwards
    (also behind parametrizations, weight norm, FSDP2) and transformers' ``Conv1D`` (GPT-2; weight
    ``(in, out)``). Any other forward (timm's weight-standardized ``StdConv2d`` / ``ScaledStdConv2d``, NFNets,
    a custom subclass) runs the paper's loop for real inside the hook: scale, run the module again on the same
    input, measure. If its output follows a weight scale less than half-way (the forward normalizes the
    weight), its ``gain`` parameter is scaled instead when it has one (``ScaledStdConv2d``), else the weight
    is kept (``NO_EFFECT``). Every variance in the report is a measured one;
  * a weight registered by several modules (tied embedding ↔ LM head) is neither pre-initialized nor scaled
    (scaling it would move the other modules, already measured): status ``SHARED``, its output variance
    measured; a module holding only vectors (a norm layer LSUV does not know, a layer scale) is not listed;
  * a constant init batch is refused before anything changes: it would calibrate every layer on nothing;
  * a module called several times per forward is scaled on the statistics of all its calls; its loop needs
    one forward pass per try (its later calls read tensors that depend on its first call's scale);
  * by default (``skip_normalized``) a layer whose output goes straight into a normalization layer keeps its
    orthogonal init — the normalization cancels any scale;
  * ``target_var`` generalizes the unit variance: W ← W·√(target_var / v), stop when |v − target_var| < tol;
  * ``per_channel=True`` scales each output channel on its own variance (the paper uses the whole blob);
  * variance is the unbiased variance over all elements of the output (batch, channels, positions), as
    ``torch.var`` in the Torch reference; under ``torch.distributed``, the variance over every rank's batch
    (one all-gather of each rank's per-channel (count, mean, M2) per measurement, merged exactly).

Sharded models. Under FSDP2 (``fully_shard``) each rank runs its slice of the batch; the moments are merged
over the ranks, so every rank computes the same factors, and they are applied to each rank's shard of the
weight (rows of a ``Shard(0)`` weight by their own factors with ``per_channel``). The hooks run first among a
module's forward hooks, while FSDP2's gathered weight is still registered (a rerun of the module uses it);
after every pass the modules are resharded. Plain DTensor models (``Replicate`` / ``Shard`` parameters, a
DTensor batch) have DTensor outputs: their moments are taken over the whole DTensor (merged over the ranks
holding other rows, concatenated over those holding other channels). The orthogonal pre-init builds every full
matrix on every rank from rank 0's random stream and keeps the local shard (see
:mod:`normkit.init.orthogonal`). Refused with a clear message: weights found only by running the model
(``nn.MultiheadAttention``, ``F.linear`` on a module's weight) — run LSUV before sharding — and parametrized
layers with sharded parameters.
"""

from __future__ import annotations

import contextlib
import enum
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from normkit._dtensor import is_dtensor
from normkit._moments import merge_moments as _merge
from normkit.graph import (
    LayerKind,
    ParamIndex,
    UntraceableModelError,
    WeightCalls,
    add_functional_layers,
    attention_layer_names,
    call_weight_and_bias,
    functional_layer_name,
    functional_units,
    has_hidden_weights,
    is_per_channel_normalization,
    no_fused_attention,
    trace,
    unwrap_model,
)
from normkit.init._sharded import (
    dtensor_moments,
    fsdp_hooks_skip_tracing,
    local_channels,
    reshard,
    rewrap,
)
from normkit.init._weights import WeightAccess, WeightAccessError
from normkit.init.orthogonal import (
    Include,
    Snapshot,
    broadcast_layers,
    orthogonal_weight,
    orthogonalize,
    select_layers,
    weight_is_in_out,
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
    """The moments over every rank of ``group``: one all-gather of each rank's (count, mean, M2), merged in
    rank order on every rank (:func:`merge_moments`), so every rank gets bit-identical results."""
    packed = torch.cat([count.reshape(1), mean.reshape(-1), m2.reshape(-1)])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    c = mean.numel()
    parts = [(g[0], g[1 : 1 + c].reshape(mean.shape), g[1 + c :].reshape(m2.shape)) for g in gathered]
    return merge_moments(parts)


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


def weight_factor(
    factor: Tensor, weight_shape: torch.Size, kind: LayerKind, groups: int = 1, *, in_out: bool = False
) -> Tensor:
    """``factor`` (scalar, or one value per output channel) shaped to multiply a layer's weight: rows of a
    linear / conv weight ``(out, ...)``, the output axis of a transposed conv weight
    ``(in, out/groups, ...)``, the columns of an ``(in, out)`` weight (``in_out``: transformers' Conv1D)."""
    if factor.dim() == 0:
        return factor
    if in_out:
        return factor.reshape(1, -1)
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
    NOT_RUN = "not run"  # a linear / conv module whose weight the forward never uses
    NO_EFFECT = "no effect"  # the output does not change with the weight's scale: weight kept
    OUT_OF_BOUNDS = "out of bounds"  # the correction would exceed max_scale: weight kept
    SHARED = "shared weight"  # its weight is also another module's: kept, output variance measured


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


class _RowsAccess:
    """Rows of a parameter that act as one layer's weight (MultiheadAttention's q, k, v projections), with the
    interface of :class:`WeightAccess`."""

    def __init__(self, module: nn.Module, param: str, rows: tuple[int, int] | None) -> None:
        self.module, self.param, self.rows = module, param, rows

    def _tensor(self) -> Tensor:
        p = getattr(self.module, self.param)
        return p if self.rows is None else p[self.rows[0] : self.rows[1]]

    def get(self) -> Tensor:
        return self._tensor().detach()

    @property
    def shape(self) -> torch.Size:
        return self._tensor().shape

    @property
    def dtype(self) -> torch.dtype:
        return self._tensor().dtype

    @property
    def device(self) -> torch.device:
        return self._tensor().device

    def set(self, value: Tensor) -> None:
        with torch.no_grad():
            self._tensor().copy_(value)

    def save(self) -> Tensor:
        return self.get().clone()

    def restore(self, saved: Tensor) -> None:
        self.set(saved)

    def scale_(self, factor: Tensor) -> None:
        with torch.no_grad():
            t = self._tensor()
            t.mul_(factor.to(t.dtype))

    def bias(self) -> Tensor | None:
        """MultiheadAttention's bias of these rows: ``in_proj_bias`` is packed like ``in_proj_weight``, also
        when q, k, v have separate weights."""
        b = getattr(self.module, "in_proj_bias", None)
        if not isinstance(b, Tensor):
            return None
        if self.rows is not None:
            return b[self.rows[0] : self.rows[1]]
        e = b.shape[0] // 3
        i = ("q_proj_weight", "k_proj_weight", "v_proj_weight").index(self.param)
        return b[i * e : (i + 1) * e]


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: LayerKind
    calls: int  # per forward, from the graph
    access: WeightAccess | _RowsAccess
    groups: int
    settled: bool = False
    iterations: int = 0
    var_before: float | None = None
    var_after: float | None = None
    converged: bool = False
    scale: Tensor | None = None
    seen: int = 0  # calls in the current pass
    parts: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    status: LayerStatus = LayerStatus.INITIALIZED
    note: str = ""
    saved: Any = None  # the weight before a layer's first correction (access.save())
    functional: bool = False  # computed by F.linear / F.conv* on the weight, not by calling the module
    attention: tuple[nn.MultiheadAttention, int] | None = None  # (module, 0..3 = q, k, v, out_proj)
    in_out: bool = False  # weight stored (in, out): transformers' Conv1D
    linear: bool = True  # its forward is known to be linear in the weight: corrections are predicted exactly
    measure_only: bool = False  # a weight shared with another module: measured, never scaled
    gain: WeightAccess | None = None  # a parameter the output is linear in, when the weight's scale is not
    sharded: bool = False  # the weight is a DTensor (FSDP2 / tensor parallel)
    parts_global: bool = False  # the parts are already the moments over every rank (DTensor outputs)
    last: tuple[Tensor, Tensor] | None = None  # (variance, factor) of a multi-call layer's last correction

    def channel_dim(self, y: Tensor) -> int:
        if self.kind is LayerKind.LINEAR:
            return y.dim() - 1
        return 1 if y.dim() == len(self.access.shape) else 0

    def bias(self) -> Tensor | None:
        b = self.access.bias() if isinstance(self.access, _RowsAccess) else getattr(self.module, "bias", None)
        if is_dtensor(b):  # a sharded bias read between passes: gather it (one vector)
            b = b.full_tensor()  # type: ignore[union-attr]
        return b.detach() if isinstance(b, Tensor) else None


@contextlib.contextmanager
def measuring_mode(model: nn.Module, batch_statistics: bool = True) -> Iterator[None]:
    """The mode LSUV measures in: no grad, dropout (and every other train-only randomness) off, and — with
    ``batch_statistics`` — batch-statistics normalization layers (BatchNorm, BatchRenorm, InstanceNorm with
    running stats) in train mode, as training will run them. Their running statistics and
    ``num_batches_tracked`` and every module's train/eval flag are restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    norms = [m for m in model.modules() if batch_statistics and is_per_channel_normalization(m)]
    with torch.no_grad():
        saved = [(b, b.clone()) for m in norms for b in m.buffers(recurse=False)]
    model.eval()
    for m in norms:
        m.train()
    try:
        with torch.no_grad(), no_fused_attention():
            yield
    finally:
        with torch.no_grad():
            for b, old in saved:
                b.copy_(old)
        for m, flag in flags:
            m.training = flag


def _ignores_scale(var: Tensor, new_var: Tensor, factor: Tensor) -> bool:
    """Whether an output's variance followed a weight scale ``factor`` less than half-way (in log terms) from
    ``var`` to the ``factor² · var`` of a layer linear in its weight: e.g. a weight-standardized conv, whose
    output moves only through the ε of its standardization. Channels the factor hardly moved do not count."""
    moved = (factor.square() - 1).abs() > 1e-3
    if not bool(moved.any()):
        return False
    elasticity = torch.log(new_var / var) / torch.log(factor.square())
    return bool((elasticity < 0.5)[moved].all())


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
        max_scale: float = 1e4,
        batch_statistics: bool = True,
    ) -> None:
        self.layers = layers
        self.tol, self.max_iters, self.target = tol, max_iters, target_var
        self.per_channel, self.fresh, self.group = per_channel, fresh, group
        self.max_scale, self.batch_statistics = max_scale, batch_statistics
        self.distributed = dist.is_available() and dist.is_initialized()
        self.blocker: _Layer | None = None
        self.progress = False

    # statistics --------------------------------------------------------------------------------------
    def _moments(
        self, parts: list[tuple[Tensor, Tensor, Tensor]], already_global: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        count, mean, m2 = merge_moments(parts)
        if self.distributed and not already_global:
            count, mean, m2 = allreduce_moments(count, mean, m2, self.group)
        return count, mean, m2

    def _part(self, layer: _Layer, y: Tensor, cdim: int) -> tuple[Tensor, Tensor, Tensor]:
        """Moments of one output: of this rank's batch for a plain tensor; of the whole tensor for a DTensor
        output (its shards are merged here, so these moments are not reduced over ranks again)."""
        if not is_dtensor(y):
            return channel_moments(y, cdim)
        layer.parts_global = True
        try:
            return dtensor_moments(y, channel_moments(y.to_local(), cdim), cdim, merge_moments)  # type: ignore[attr-defined]
        except ValueError as exc:
            raise LSUVError(f"LSUV: layer {layer.name!r}: {exc}") from None

    def _measure(self, layer: _Layer, y: Tensor, cdim: int) -> tuple[Tensor, Tensor, Tensor]:
        """The moments of this output over the global batch (every rank's)."""
        part = self._part(layer, y, cdim)
        return self._moments([part], already_global=is_dtensor(y))

    def _variance(self, count: Tensor, mean: Tensor, m2: Tensor) -> Tensor:
        return moments_variance(count, m2) if self.per_channel else blob_variance(count, mean, m2)

    def _check_finite(self, layer: _Layer, var: Tensor) -> None:
        if not bool(torch.isfinite(var).all()):
            raise LSUVError(
                f"LSUV: layer {layer.name!r} gives a non-finite output variance on the init batch. Check the "
                "input data (inf / NaN?) and the layers before it; the model was left as it was before the "
                "call."
            )

    def _no_effect(self, count: Tensor, mean: Tensor, m2: Tensor, bias: Tensor | None, var: Tensor) -> Tensor:
        """Where the output does not depend on the weight: the part s·(y − b) that a weight scale s acts on
        is zero up to rounding (an all-zero input after dead ReLUs). No scale can reach the target there."""
        b = bias if bias is not None else torch.zeros_like(mean)
        zvar = self._variance(count, mean - b, m2)
        square = m2 / count + mean.square()  # mean of y² per channel
        if not self.per_channel:
            square = square.mean()
        eps = torch.finfo(torch.float32).eps
        return zvar <= (16 * eps) ** 2 * square + torch.finfo(torch.float64).tiny

    def _done(self, var: Tensor, dead: Tensor | None = None) -> bool:
        ok = (var - self.target).abs() < self.tol
        if dead is not None:
            ok = ok | dead
        return bool(ok.all())

    @staticmethod
    def _summary(var: Tensor, dead: Tensor | None = None) -> float:
        if dead is not None and dead.dim() > 0 and bool(dead.any()) and not bool(dead.all()):
            return float(var[~dead].mean())
        return float(var.mean())

    def _out_of_bounds(self, total: Tensor) -> bool:
        return bool(((total > self.max_scale) | (total < 1 / self.max_scale)).any())

    def _apply(self, layer: _Layer, factor: Tensor) -> None:
        shape = layer.access.shape
        in_out = layer.in_out and layer.access is not layer.gain
        layer.access.scale_(weight_factor(factor, shape, layer.kind, layer.groups, in_out=in_out))
        layer.scale = factor if layer.scale is None else layer.scale * factor

    def _finish(self, layer: _Layer, var: Tensor, dead: Tensor | None = None) -> None:
        layer.var_after = self._summary(var, dead)
        layer.converged = self._done(var, dead)
        layer.settled = True
        self.progress = True
        if dead is not None and bool(dead.any()):
            layer.note = f"{int(dead.sum())} of {dead.numel()} channels do not depend on the weight; kept"

    def _leave(self, layer: _Layer, var: Tensor, status: LayerStatus, note: str) -> None:
        """Give up on a layer: its weight stays (or is put back) as before the LSUV scaling."""
        if layer.saved is not None:
            layer.access.restore(layer.saved)
            layer.saved = None
        layer.scale = None
        layer.iterations = 0
        layer.status, layer.note = status, note
        layer.var_after = self._summary(var)
        layer.converged = False
        layer.settled = True
        self.progress = True

    def _bound_note(self, total: Tensor) -> str:
        worst = float(total.max()) if float(total.max()) > self.max_scale else float(total.min())
        return (
            f"would scale the weight by {worst:.3g}, beyond max_scale={self.max_scale:g}; weight kept "
            "(check the input scale, or raise max_scale)"
        )

    # the loop inside the hook, for a layer run once per forward ------------------------------------------
    def _in_hook(self, layer: _Layer, y: Tensor, bias: Tensor | None, rerun: Any = None) -> Tensor:
        """The paper's loop on this output: each try's variance follows exactly from the per-channel moments
        (scaling W by s maps mean → s(mean − b) + b and M2 → s² M2), so the output is touched twice: once to
        measure, once to apply the total factor. A module whose forward is not known to be linear in its
        weight runs the paper's loop for real instead (:meth:`_measured_loop`)."""
        cdim = layer.channel_dim(y)
        count, mean, m2 = self._measure(layer, y, cdim)
        b64 = bias.double() if bias is not None else None
        var = self._variance(count, mean, m2)
        layer.var_before = self._summary(var)
        self._check_finite(layer, var)
        if layer.measure_only:
            self._finish(layer, var)
            return y
        dead = self._no_effect(count, mean, m2, b64, var)
        if bool(dead.all()):
            self._leave(layer, var, LayerStatus.NO_EFFECT, "the output does not depend on the weight; kept")
            return y
        if not layer.linear and rerun is not None:
            return self._measured_loop(layer, y, var, dead, cdim, rerun)
        total = torch.ones_like(var)
        iterations = 0
        while not self._done(var, dead) and iterations < self.max_iters:
            factor = torch.where(dead, torch.ones_like(var), lsuv_factor(var, self.target))
            mean, m2 = rescale_moments(mean, m2, b64, factor)
            total = total * factor
            iterations += 1
            var = self._variance(count, mean, m2)
        if self._out_of_bounds(total):
            self._leave(layer, var, LayerStatus.OUT_OF_BOUNDS, self._bound_note(total))
            layer.var_after = layer.var_before
            return y
        if iterations:
            self._apply(layer, total)
        layer.iterations = iterations
        self._finish(layer, var, dead if dead.dim() > 0 else None)
        if not iterations:
            return y
        if is_dtensor(y):
            b = None if bias is None else local_channels(bias, y, cdim)
            new = rescale_output(y.to_local(), b, local_channels(total, y, cdim), cdim)  # type: ignore[attr-defined]
            return rewrap(new, y)
        return rescale_output(y, bias, total, cdim)

    def _measured_loop(
        self, layer: _Layer, y: Tensor, var: Tensor, dead: Tensor, cdim: int, rerun: Any
    ) -> Tensor:
        """The paper's loop for real, for a module whose output may not be linear in its weight (timm's
        weight-standardized convs, custom forwards): scale, run the module again on the same input, measure.
        If scaling the weight leaves the output unchanged, the module's ``gain`` (when it has one the output
        is linear in, as ``ScaledStdConv2d``) is scaled instead; else the weight is kept (``NO_EFFECT``)."""
        before = var
        layer.saved = layer.access.save()
        total = torch.ones_like(var)
        iterations = 0
        while not self._done(var, dead) and iterations < self.max_iters:
            factor = torch.where(dead, torch.ones_like(var), lsuv_factor(var, self.target))
            if self._out_of_bounds(total * factor):
                self._leave(layer, before, LayerStatus.OUT_OF_BOUNDS, self._bound_note(total * factor))
                return y  # the weight is back as it was: so is the output
            self._apply(layer, factor)
            total = total * factor
            iterations += 1
            y_new = rerun()
            new_var = self._variance(*self._measure(layer, y_new, cdim))
            self._check_finite(layer, new_var)
            if iterations == 1 and _ignores_scale(var, new_var, factor):
                # the output barely follows the weight's scale: the forward normalizes the weight
                layer.access.restore(layer.saved)
                layer.scale, total, iterations = None, torch.ones_like(var), 0
                if layer.gain is None or layer.access is layer.gain:
                    self._leave(
                        layer,
                        before,
                        LayerStatus.NO_EFFECT,
                        "its output does not change when its weight is scaled (the forward normalizes the "
                        "weight, e.g. weight standardization); kept",
                    )
                    return y
                layer.access = layer.gain
                layer.saved = layer.access.save()
                layer.note = "its forward normalizes the weight: LSUV scaled its gain instead"
                continue
            var, y = new_var, y_new
        layer.saved = None
        layer.iterations = iterations
        self._finish(layer, var, dead if dead.dim() > 0 else None)
        return y

    # shared modules: one try per forward pass, decided at the module's last call -------------------------
    def _after_pass_shared(self, layer: _Layer) -> bool:
        """One correction of a multi-call layer; True when its weight changed (the pass must stop)."""
        count, mean, m2 = self._moments(layer.parts, layer.parts_global)
        layer.parts = []
        var = self._variance(count, mean, m2)
        first = layer.var_before is None
        if first:
            layer.var_before = self._summary(var)
        self._check_finite(layer, var)
        if not layer.linear and layer.iterations == 1 and layer.last is not None:
            if _ignores_scale(layer.last[0], var, layer.last[1]):
                self._leave(
                    layer,
                    layer.last[0],
                    LayerStatus.NO_EFFECT,
                    "its output does not change when its weight is scaled (the forward normalizes the "
                    "weight); kept",
                )
                return True
        bias = layer.bias()
        dead = self._no_effect(count, mean, m2, bias.double() if bias is not None else None, var)
        if bool(dead.any()) and first:
            self._leave(layer, var, LayerStatus.NO_EFFECT, "the output does not depend on the weight; kept")
            return False
        if self._done(var) or layer.iterations >= self.max_iters:
            self._finish(layer, var)
            return False
        factor = lsuv_factor(var, self.target)
        total = factor if layer.scale is None else layer.scale * factor
        if self._out_of_bounds(total) or bool(dead.any()):
            changed = layer.saved is not None
            self._leave(layer, var, LayerStatus.OUT_OF_BOUNDS, self._bound_note(total))
            return changed
        if layer.saved is None:
            layer.saved = layer.access.save()
        layer.last = (var, factor)
        self._apply(layer, factor)
        layer.iterations += 1
        self.progress = True
        return True

    def process(self, layer: _Layer, out: Tensor, bias: Tensor | None, rerun: Any = None) -> Tensor | None:
        """A layer's output in the current pass: measure (and correct) it; the tensor to pass on, or None
        to keep ``out``."""
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
        if layer.calls > 1 and layer.measure_only:  # nothing changes: no need to block the layers after it
            layer.parts.append(self._part(layer, out, layer.channel_dim(out)))
            if layer.seen == layer.calls:
                var = self._variance(*self._moments(layer.parts, layer.parts_global))
                layer.parts = []
                layer.var_before = self._summary(var)
                self._check_finite(layer, var)
                self._finish(layer, var)
                if self.fresh or all(lay.settled for lay in self.layers):
                    raise _Stop
            return None
        if layer.calls > 1:
            self.blocker = layer
            layer.parts.append(self._part(layer, out, layer.channel_dim(out)))
            if layer.seen == layer.calls:
                if self._after_pass_shared(layer) or not layer.settled:
                    raise _Stop  # the rest of this pass would see stale values
                self.blocker = None  # settled unchanged: the layers after it go on in this same pass
                if self.fresh or all(lay.settled for lay in self.layers):
                    raise _Stop
            return None
        y = self._in_hook(layer, out, bias, rerun)
        if self.fresh or all(lay.settled for lay in self.layers):
            raise _Stop
        return y

    def _module_hook(self, layer: _Layer) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            def rerun() -> Any:  # the module's own forward on the same input, with its current weights
                return module.forward(*args, **kwargs)

            return self.process(layer, out, layer.bias(), rerun)

        return hook

    def _attention_hooks(self, module: nn.MultiheadAttention, units: list[_Layer | None]) -> list[Any]:
        """q, k, v are measured in a pre-hook (computed here from the module's inputs and its weights: the
        module then runs with the corrected weights); out_proj's output is the module's output."""
        q, k, v, out = units

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs = [
                args[i] if len(args) > i else kwargs.get(key)
                for i, key in enumerate(("query", "key", "value"))
            ]
            for layer, x in zip((q, k, v), inputs):
                if layer is None or not isinstance(x, Tensor):
                    continue
                bias = layer.bias()
                self.process(layer, F.linear(x, layer.access.get(), bias), bias)

        def post(mod: nn.Module, args: Any, result: Any) -> Any:
            if out is None:
                return None
            y = result[0] if isinstance(result, tuple) else result
            new = self.process(out, y, out.bias())
            if new is None:
                return None
            return (new, *result[1:]) if isinstance(result, tuple) else new

        return [
            module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post),
        ]

    def _function_handler(self, model: nn.Module, layers: list[_Layer]) -> Any:
        index = ParamIndex(model)
        by_name = {layer.name: layer for layer in layers}

        def handler(func: Any, kind: LayerKind, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            out = func(*args, **kwargs)
            weight, bias = call_weight_and_bias(args, kwargs)
            found = index.resolve(weight)
            if found is None:
                return out
            owner, param, rows = found
            module = index.modules[owner]
            n_rows = int(getattr(module, param).shape[0])
            units = functional_units(module, param, rows, n_rows)
            todo = [(u, by_name.get(functional_layer_name(owner, module, param, u, n_rows))) for u in units]
            if all(layer is None for _, layer in todo):
                return out
            cdim = out.dim() - 1 if kind is LayerKind.LINEAR else (1 if out.dim() == weight.dim() else 0)
            pieces: list[Tensor] = []
            at = rows[0]
            changed = False
            for (u0, u1), layer in todo:
                if u0 > at:
                    pieces.append(out.narrow(cdim, at - rows[0], u0 - at))
                part = out.narrow(cdim, u0 - rows[0], u1 - u0)
                b = bias[u0 - rows[0] : u1 - rows[0]].detach() if isinstance(bias, Tensor) else None
                new = self.process(layer, part, b) if layer is not None else None
                changed = changed or new is not None
                pieces.append(part if new is None else new)
                at = u1
            if at < rows[1]:
                pieces.append(out.narrow(cdim, at - rows[0], rows[1] - at))
            return torch.cat(pieces, cdim) if changed else out

        return handler

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
            handles = []
            attention: dict[int, tuple[nn.MultiheadAttention, list[_Layer | None]]] = {}
            functional: list[_Layer] = []
            for layer in pending:
                if layer.attention is not None:
                    mha, slot = layer.attention
                    attention.setdefault(id(mha), (mha, [None, None, None, None]))[1][slot] = layer
                elif layer.functional:
                    functional.append(layer)
                else:
                    # first among the forward hooks: under FSDP2 the gathered weight is still registered then
                    handles.append(
                        layer.module.register_forward_hook(
                            self._module_hook(layer), with_kwargs=True, prepend=layer.sharded
                        )
                    )
            for mha, slots in attention.values():
                handles.extend(self._attention_hooks(mha, slots))
            mode: Any = (
                WeightCalls(self._function_handler(model, functional))
                if functional
                else contextlib.nullcontext()
            )
            try:
                forward_count[0] += 1
                with measuring_mode(model, self.batch_statistics), mode:
                    model(x)
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
                reshard(model)  # a pass stopped half-way leaves FSDP2's gathered weights registered
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


# --- what a layer is ----------------------------------------------------------------------------------------

_LINEAR_FORWARDS = {
    nn.Linear.forward,
    nn.Conv1d.forward,
    nn.Conv2d.forward,
    nn.Conv3d.forward,
    nn.ConvTranspose1d.forward,
    nn.ConvTranspose2d.forward,
    nn.ConvTranspose3d.forward,
}
_CONV_FORWARDS = {None, nn.Conv1d._conv_forward, nn.Conv2d._conv_forward, nn.Conv3d._conv_forward}


def linear_in_weight(module: nn.Module) -> bool:
    """Whether ``module``'s forward is known to be linear in its (effective) weight: torch's own Linear / Conv
    forwards (also behind parametrizations, weight norm and FSDP2) and transformers' ``Conv1D``. Any other
    forward (timm's weight-standardized ``StdConv2d``, a custom subclass) is measured, not predicted."""
    if weight_is_in_out(module):
        return True
    cls = type(module)
    return cls.forward in _LINEAR_FORWARDS and getattr(cls, "_conv_forward", None) in _CONV_FORWARDS


def _gain_access(name: str, module: nn.Module) -> WeightAccess | None:
    """A per-output-channel (or scalar) ``gain`` parameter of a layer (timm's ``ScaledStdConv2d``), which the
    output is linear in even when the forward normalizes the weight."""
    gain = getattr(module, "gain", None)
    if not isinstance(gain, nn.Parameter) or (gain.dim() == 0 and gain.numel() != 1):
        return None
    out = int(getattr(module, "out_channels", getattr(module, "out_features", -1)))
    if gain.numel() not in (1, out) or (gain.dim() and gain.shape[0] != gain.numel()):
        return None
    return WeightAccess(f"{name}.gain", module, "gain")


def _parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every module that registers each parameter (by identity): tied weights have several owners."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, module))
    return owners


def _sharers(
    owners: dict[int, list[tuple[str, nn.Module]]], module: nn.Module, name: str, param: str
) -> list[str]:
    """The other modules whose parameter is this layer's weight (embedding ↔ LM head): scaling it would
    change them too, after they were measured."""
    p = module._parameters.get(param)
    if p is None:
        return []
    return [n for n, m in owners.get(id(p), []) if m is not module]


def _refuse_hidden_sharded(model: nn.Module, graph: Any) -> None:
    """Weights found only by running the model (functional calls, MultiheadAttention) are matched by their
    storage; FSDP2 passes gathered copies to those calls, so on a sharded model they cannot be followed."""
    if not any(is_dtensor(p) for p in model.parameters()):
        return
    owned = {id(p) for layer in graph for p in layer.module.parameters()}
    hidden = [n for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in owned]
    hidden += [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    raise LSUVError(
        "LSUV: on a sharded (FSDP2 / DTensor) model it cannot follow the weights used by functional calls "
        f"or inside nn.MultiheadAttention ({', '.join(hidden[:6])}{' ...' if len(hidden) > 6 else ''}). "
        "Run lsuv_init on the model before fully_shard / parallelize_module (an init needs no sharding), "
        "then shard it."
    )


def _check_varies(x: Tensor, group: dist.ProcessGroup | None) -> None:
    """Refuse a constant init batch (every element equal, over every rank's batch): the output variances
    would then say nothing about the data. One all-reduce under ``torch.distributed``."""
    if not x.is_floating_point() or x.numel() == 0:
        return
    with torch.no_grad():
        if is_dtensor(x):  # a global batch already: its reductions cover every rank
            spread = torch.stack([-x.amin().full_tensor(), x.amax().full_tensor()]).double()  # type: ignore[attr-defined]
        else:
            spread = torch.stack([-x.amin(), x.amax()]).double()
        if dist.is_available() and dist.is_initialized() and not is_dtensor(x):
            dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=group)
    if bool(spread[0] == -spread[1]):
        raise LSUVError(
            f"LSUV: the init batch is constant (every element equals {float(spread[1]):g}): each layer's "
            "output variance would come from its bias and weights alone, not from the data, and the layers "
            "after the first would be calibrated on nothing. Pass a batch of real inputs (e.g. one from the "
            "training DataLoader). The model was not changed."
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
    batch_statistics: bool = True,
    max_scale: float = 1e4,
) -> LSUVReport:
    """LSUV-initialize ``model`` in place (Mishkin & Matas 2016) and return the per-layer report.

    Args:
        model: the network (DDP / DataParallel / torch.compile wrappers are looked through; FSDP2 and DTensor
            models are initialized in place, shard by shard).
        data: a tensor batch, a tuple/list whose first element is the input, or an iterable / DataLoader of
            such batches (its first batch is used, or a fresh one per layer with ``fresh_batches``).
        tol, max_iters, target_var: stop a layer's loop when |Var(output) − target_var| < tol, or after
            ``max_iters`` weight corrections (a warning names the layers that did not converge).
        orthogonal: orthonormal pre-initialization (:func:`normkit.init.orthogonal_init`) of every layer LSUV
            touches first, as in the paper; False keeps the current weights and only rescales them.
        include: only these layers (names, modules, or a predicate on (name, module)); default all
            ``nn.Linear``, ``nn.Conv*d``, ``nn.ConvTranspose*d`` layers and transformers' ``Conv1D``.
        skip_normalized: a layer whose output goes straight into a normalization layer (BatchNorm,
            BatchRenorm, GroupNorm, LayerNorm ...) keeps its orthogonal init; False scales it too.
        fresh_batches: draw a new batch from ``data`` for each layer (the paper's practice); costs one partial
            forward pass per layer instead of one pass in all.
        per_channel: scale each output channel to the target variance on its own (not the paper).
        zero_bias: the orthogonal pre-init sets biases to zero (as the paper's); False keeps them.
        verbose: print the report as a table.
        process_group: the group whose ranks share the variance (default: the world, when initialized).
        batch_statistics: measure with batch-statistics normalization layers (BatchNorm, BatchRenorm,
            InstanceNorm with running stats) in train mode, as training runs them; dropout and every other
            train-only randomness stay off. Running statistics, ``num_batches_tracked`` and every module's
            train/eval flag are restored afterwards. False measures fully in eval mode (running statistics),
            for a model that will be trained with frozen normalization statistics.
        max_scale: the largest factor (and 1/max_scale the smallest) by which LSUV may scale a weight; a
            layer that would need more keeps its weight, with status ``OUT_OF_BOUNDS`` in the report. A layer
            whose output does not depend on its weight (all-zero input) keeps it too (``NO_EFFECT``).

    Raises:
        LSUVError: a constant init batch, a non-finite output, a forward that does not match the traced
            structure, or a sharded model LSUV cannot follow; ValueError / TypeError for bad arguments. The
            model is left as it was before the call in every case.
    """
    tol = _check_number("tol", tol)
    max_scale = _check_number("max_scale", max_scale)
    if max_scale <= 1:
        raise ValueError(f"max_scale must be > 1, got {max_scale!r}")
    target_var = _check_number("target_var", target_var)
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be an int ≥ 1, got {max_iters!r}")
    inner = unwrap_model(model)
    if not isinstance(inner, nn.Module):
        raise TypeError(f"lsuv_init needs an nn.Module, got {type(model).__name__}")
    batches = _Batches(data, fresh_batches)
    _check_varies(batches.first, process_group)
    forward_count = [0]

    reshard(inner)  # FSDP2: the sharded parameters are the ones to write
    with fsdp_hooks_skip_tracing(inner):
        try:
            graph = trace(inner)
        except UntraceableModelError:
            forward_count[0] += 1  # the hooked fallback runs the model once
            graph = trace(inner, _to_model(batches.first, inner))
        if has_hidden_weights(graph):
            # weights used by functional calls or inside modules fx keeps opaque: one run finds them
            _refuse_hidden_sharded(inner, graph)
            forward_count[0] += 1
            graph = add_functional_layers(graph, _to_model(batches.first, inner))
    reshard(inner)
    owners = _parameter_owners(inner)

    chosen = select_layers(inner, include)
    chosen_names = {n for n, _ in chosen}
    names_of = {id(m): n for n, m in inner.named_modules()}
    records: dict[str, LSUVLayerRecord] = {}
    todo: list[_Layer] = []
    pre_init: list[str] = []
    pre_access: dict[str, WeightAccess | _RowsAccess] = {}
    for node in graph:
        tname = type(node.module).__name__
        if node.kind is LayerKind.NORM:
            continue
        kind = node.kind
        in_out = kind is LayerKind.OTHER and weight_is_in_out(node.module)
        if in_out:
            kind = LayerKind.LINEAR  # transformers' Conv1D: a linear layer with its weight stored (in, out)
        elif kind is LayerKind.OTHER:
            if any(other.name.startswith(node.name + ".") for other in graph if other.functional):
                continue  # MultiheadAttention: its projections are layers of their own
            if not any(p.dim() >= 2 for p in node.module.parameters(recurse=False)):
                continue  # vectors only (a norm layer's gain, a layer scale): no weight LSUV would set
            records[node.name] = LSUVLayerRecord(
                node.name, tname, LayerStatus.UNSUPPORTED, calls=node.calls, note="LSUV covers linear/conv"
            )
            continue
        own_module = names_of.get(id(node.module)) == node.name
        wanted = (
            node.name in chosen_names
            if own_module
            else include is None
            or (callable(include) and not isinstance(include, nn.Module) and include(node.name, node.module))
        )
        if not wanted:
            records[node.name] = LSUVLayerRecord(node.name, tname, LayerStatus.EXCLUDED, calls=node.calls)
            continue
        try:
            access: WeightAccess | _RowsAccess = (
                WeightAccess(node.name, node.module)
                if own_module
                else _RowsAccess(node.module, node.param, node.rows)
            )
        except WeightAccessError as exc:
            raise LSUVError(str(exc)) from None
        sharers = _sharers(owners, node.module, node.name, node.param if not own_module else "weight")
        if sharers:
            todo.append(
                _Layer(
                    node.name,
                    node.module,
                    kind,
                    node.calls,
                    access,
                    int(getattr(node.module, "groups", 1)),
                    functional=node.functional,
                    in_out=in_out,
                    measure_only=True,
                    status=LayerStatus.SHARED,
                    note="shares its weight with " + ", ".join(repr(n) for n in sharers) + "; kept, measured",
                )
            )
            records[node.name] = LSUVLayerRecord(node.name, tname, LayerStatus.SHARED, calls=node.calls)
            continue
        if isinstance(access, _RowsAccess) and is_dtensor(getattr(node.module, node.param)):
            raise LSUVError(
                f"LSUV: {node.name!r} is a part of a sharded (DTensor) parameter used by a functional call "
                "(MultiheadAttention's packed projections); LSUV cannot rescale it sharded. Run lsuv_init "
                "before fully_shard / parallelize_module, or leave it out with include=."
            )
        pre_init.append(node.name)
        pre_access[node.name] = access
        if skip_normalized and graph.feeds_normalization(node.name):
            dst = type(graph[node.consumers[0].dst or ""].module).__name__
            records[node.name] = LSUVLayerRecord(
                node.name, tname, LayerStatus.FEEDS_NORMALIZATION, calls=node.calls, note=f"→ {dst}"
            )
            continue
        attention = None
        if isinstance(node.module, nn.MultiheadAttention):
            attention = (
                node.module,
                attention_layer_names(names_of[id(node.module)], node.module).index(node.name),
            )
        elif node.name.endswith("out_proj") and isinstance(
            parent := inner.get_submodule(node.name.rpartition(".")[0]) if "." in node.name else inner,
            nn.MultiheadAttention,
        ):
            attention = (parent, 3)
        todo.append(
            _Layer(
                node.name,
                node.module,
                kind,
                node.calls,
                access,
                int(getattr(node.module, "groups", 1)),
                functional=node.functional,
                attention=attention,
                in_out=in_out,
                linear=node.functional or attention is not None or linear_in_weight(node.module),
                gain=_gain_access(node.name, node.module),
                sharded=isinstance(access, WeightAccess) and access.sharded,
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
            note="its weight is not used by the forward on the init batch; left untouched",
        )
    if not todo and not pre_init:
        raise LSUVError(
            f"LSUV: {type(inner).__name__} has no linear / conv layer that its forward runs"
            + (" among those chosen by include=" if include is not None else "")
            + "; nothing to initialize"
        )

    snapshot = Snapshot({id(graph[n].module): graph[n].module for n in pre_init}.values())
    try:
        if orthogonal:
            modules_access = {n: a for n, a in pre_access.items() if isinstance(a, WeightAccess)}
            ordered = [(n, m) for n, m in chosen if n in modules_access]  # named_modules order
            orthogonalize(
                ordered, [modules_access[n] for n, _ in ordered], zero_bias=zero_bias, group=process_group
            )
            for n in pre_init:  # rows of a parameter (attention projections): one orthogonal block each
                acc = pre_access[n]
                if isinstance(acc, _RowsAccess):
                    acc.set(orthogonal_weight(acc.shape, dtype=acc.dtype, device=acc.device))
                    bias = acc.bias()
                    if zero_bias and bias is not None:
                        with torch.no_grad():
                            bias.zero_()
            if any(isinstance(pre_access[n], _RowsAccess) for n in pre_init):
                broadcast_layers(
                    {id(graph[n].module): graph[n].module for n in pre_init}.values(), process_group
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
                max_scale=max_scale,
                batch_statistics=batch_statistics,
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
            layer.status,
            var_before=layer.var_before,
            var_after=layer.var_after,
            iterations=layer.iterations,
            converged=layer.converged if layer.status is LayerStatus.INITIALIZED else None,
            calls=layer.calls,
            scale=1.0 if scale is None else scale,
            note=layer.note,
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
    kept = [
        r
        for r in report
        if r.status in (LayerStatus.NO_EFFECT, LayerStatus.OUT_OF_BOUNDS, LayerStatus.SHARED)
    ]
    if kept:
        warnings.warn(
            "LSUV kept the weights of: " + ", ".join(f"{r.name!r} ({r.note})" for r in kept),
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
