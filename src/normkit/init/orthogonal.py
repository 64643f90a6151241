"""Orthonormal initialization (Saxe et al. 2014), the pre-initialization step of LSUV.

Each layer's weight, seen as a matrix with one row per output unit and one column per input it reads
(``(out, in)`` for a linear layer, ``(out, in/groups · kernel)`` per group for a convolution), is set to a
random (Haar-distributed) semi-orthogonal matrix: orthonormal rows when there are no more rows than columns,
orthonormal columns otherwise. Where we differ from ``torch.nn.init.orthogonal_``: grouped and depthwise
convolutions get one orthogonal matrix per group (the groups read disjoint inputs), and a transposed
convolution's weight ``(in, out/groups, *kernel)`` is orthogonalized over its *output* channels, like the
convolution it is the adjoint of the transpose of — ``orthogonal_`` would use the input channels as rows.
transformers' ``Conv1D`` (GPT-2) is a linear layer whose weight is stored ``(in, out)``: its rows are the
columns of that weight.

Sharded weights (DTensor: FSDP2 ``fully_shard``, tensor parallel) get the same full matrix as in one process:
every rank draws the same Gaussian matrix (from ``generator``, or from a copy of rank 0's default generator
sent to every rank — one broadcast of a few KB) and keeps its own shard. Cost: each rank computes the QR of
every full weight, one layer at a time (the compute and the peak memory of one layer's init in one process),
but no weight is gathered or sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from normkit._dtensor import is_dtensor
from normkit.graph import LayerKind, layer_kind, unwrap_model
from normkit.init._sharded import shared_generator
from normkit.init._weights import WeightAccess

__all__ = [
    "Include",
    "init_layer_kind",
    "orthogonal_init",
    "orthogonal_matrix",
    "orthogonal_weight",
    "orthogonalize",
    "select_layers",
    "weight_is_in_out",
]

#: Which layers to touch: qualified names or modules, or a predicate on (name, module); None = all supported.
Include = Iterable[str | nn.Module] | Callable[[str, nn.Module], bool] | None

_SUPPORTED = (LayerKind.LINEAR, LayerKind.CONV, LayerKind.CONV_TRANSPOSE)


def weight_is_in_out(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's layers): a linear layer ``x @ W + b``, ``W`` stored ``(in, out)``.
    Recognized by class, so the core does not import transformers."""
    return any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in type(module).__mro__
    )


def init_layer_kind(module: nn.Module) -> LayerKind | None:
    """:func:`normkit.graph.layer_kind`, with transformers' ``Conv1D`` counted as a linear layer."""
    return LayerKind.LINEAR if weight_is_in_out(module) else layer_kind(module)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the QR runs in: float64 for a float64 result, float32 otherwise (as ``orthogonal_``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _semi_orthogonal(
    rows: int, cols: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | None
) -> Tensor:
    """A Haar-random ``rows × cols`` semi-orthogonal matrix in ``dtype`` on ``device`` (a view, maybe a
    transposed one). The Gaussian matrix is drawn as the transpose of a row-major one, i.e. in the
    column-major layout LAPACK works in, so the QR copies nothing in."""
    big, small = max(rows, cols), min(rows, cols)
    gen_device = generator.device if generator is not None else device
    a = torch.randn(small, big, generator=generator, dtype=dtype, device=gen_device).to(device).mT
    q, r = torch.linalg.qr(a)
    q.mul_(torch.sign(torch.sign(torch.diagonal(r)) + 0.5))  # Mezzadri's sign fix; sign 0 counts as +1
    return q if rows >= cols else q.mT


def orthogonal_matrix(
    rows: int,
    cols: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """A Haar-random ``rows × cols`` matrix with orthonormal rows (rows ≤ cols) or columns (rows > cols).

    QR of a Gaussian matrix with the signs of R's diagonal folded into Q (Mezzadri 2007), computed in float64
    for a float64 result and in float32 otherwise (like ``torch.nn.init.orthogonal_``: the float32 QR is
    orthonormal to float32 rounding and twice as fast), on ``device`` unless ``generator`` lives elsewhere.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"orthogonal_matrix needs positive sizes, got {rows} × {cols}")
    dev = torch.device(device) if device is not None else None
    m = _semi_orthogonal(rows, cols, generator, _math_dtype(dtype), dev)
    return m.to(dtype=dtype, device=device).contiguous()


def orthogonal_weight(
    shape: Sequence[int],
    *,
    groups: int = 1,
    transposed: bool = False,
    gain: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """An orthonormal weight of a linear (``(out, in)``), conv (``(out, in/groups, *k)``) or transposed conv
    (``(in, out/groups, *k)``, ``transposed=True``) layer: one semi-orthogonal matrix per group, rows = output
    channels, times ``gain``. Computed in float32 (float64 for a float64 weight), written once into the
    result: no copy beyond the QR's own."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"a layer weight has at least 2 dimensions, got shape {shape}")
    if shape[0] % groups:
        raise ValueError(f"weight shape {shape} does not split into {groups} groups along dimension 0")
    dev = torch.device(device) if device is not None else None
    math_dtype = _math_dtype(dtype)
    kernel = shape[2:]
    k = math.prod(kernel)
    w = torch.empty(shape, dtype=dtype, device=dev)
    if transposed:
        in_g, out_g = shape[0] // groups, shape[1]
        for g in range(groups):
            m = _semi_orthogonal(out_g, in_g * k, generator, math_dtype, dev)
            w[g * in_g : (g + 1) * in_g].copy_(m.reshape(out_g, in_g, *kernel).transpose(0, 1))
    else:
        out_g, in_g = shape[0] // groups, shape[1]
        for g in range(groups):
            m = _semi_orthogonal(out_g, in_g * k, generator, math_dtype, dev)
            w[g * out_g : (g + 1) * out_g].view(out_g, -1).copy_(m)
    if gain != 1.0:
        w.mul_(gain)
    return w


def _module_weight(
    access: WeightAccess, module: nn.Module, *, gain: float, generator: torch.Generator | None
) -> Tensor:
    if weight_is_in_out(module):  # (in, out): the transpose of a linear weight
        rows = orthogonal_weight(
            access.shape[::-1], gain=gain, generator=generator, dtype=access.dtype, device=_device(access)
        )
        return rows.T.contiguous()
    transposed = layer_kind(module) is LayerKind.CONV_TRANSPOSE
    groups = int(getattr(module, "groups", 1))
    return orthogonal_weight(
        access.shape,
        groups=groups,
        transposed=transposed,
        gain=gain,
        generator=generator,
        dtype=access.dtype,
        device=_device(access),
    )


def _device(access: WeightAccess) -> torch.device:
    w = access.get()
    return w.to_local().device if is_dtensor(w) else w.device  # type: ignore[attr-defined]


def select_layers(model: nn.Module, include: Include) -> list[tuple[str, nn.Module]]:
    """The supported layers (linear, conv, transposed conv) of ``model`` chosen by ``include``, in
    ``named_modules`` order. Unknown names and unsupported modules in ``include`` raise ValueError."""
    supported = [(n, m) for n, m in model.named_modules() if init_layer_kind(m) in _SUPPORTED]
    if include is None:
        return supported
    if callable(include) and not isinstance(include, nn.Module):
        return [(n, m) for n, m in supported if include(n, m)]
    if isinstance(include, (str, nn.Module)):
        include = [include]
    by_name = dict(supported)
    by_id = {id(m): n for n, m in supported}
    all_names = {n for n, _ in model.named_modules()}
    wanted: set[str] = set()
    for item in include:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(
                    f"include= names a {type(item).__name__} that is not a linear / conv layer of the model"
                )
            wanted.add(by_id[id(item)])
        elif isinstance(item, str):
            if item not in by_name:
                why = "is not a linear / conv layer" if item in all_names else "is no module of the model"
                raise ValueError(
                    f"include= names {item!r}, which {why}; supported layers are {list(by_name)}"
                )
            wanted.add(item)
        else:
            raise TypeError(f"include= takes names, modules or a predicate, got {type(item).__name__}")
    return [(n, m) for n, m in supported if n in wanted]


class Snapshot:
    """Copies of the parameters and buffers of some modules, to put back after a failed init."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        mods = list(modules)
        tensors = {id(t): t for m in mods for t in (*m.parameters(), *m.buffers())}
        with torch.no_grad():
            self._saved = [(t, t.detach().clone()) for t in tensors.values()]
        # hook-based weight_norm keeps the weight as a plain tensor attribute, recomputed before each forward
        self._weight_attrs = [
            (m, m.weight) for m in mods if "weight" in m.__dict__ and isinstance(m.__dict__["weight"], Tensor)
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self._saved:
                t.copy_(saved)
        for m, w in self._weight_attrs:
            m.weight = w


def broadcast_layers(modules: Iterable[nn.Module], group: dist.ProcessGroup | None = None) -> None:
    """Copy rank 0's parameters of ``modules`` to every rank (no-op without an initialized process group).
    DTensor parameters are skipped: their shards are built alike on every rank (see the module docstring)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if not is_dtensor(p):
                    dist.broadcast(p.data, src, group=group)


def orthogonal_init(
    model: nn.Module,
    *,
    gain: float = 1.0,
    zero_bias: bool = True,
    include: Include = None,
    generator: torch.Generator | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> list[str]:
    """Orthonormal init of every linear / conv / transposed-conv layer (or those in ``include``); biases set
    to zero unless ``zero_bias=False``. Returns the qualified names of the layers initialized.

    Weight-normalized and parametrized layers get the orthogonal matrix as their *effective* weight; a layer
    whose parametrization cannot express it raises (the model is then left untouched). Under
    ``torch.distributed`` rank 0's matrices are broadcast, so every rank holds the same weights. Sharded
    (DTensor) weights are built whole on every rank from the same random stream and each rank keeps its shard:
    the full weight equals the one a single process draws from the same seed (see the module docstring for
    the cost).
    """
    if not math.isfinite(gain) or gain <= 0:
        raise ValueError(f"gain must be a positive number, got {gain}")
    model = unwrap_model(model)
    layers = select_layers(model, include)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear / nn.Conv*d / nn.ConvTranspose*d layer"
            + (" chosen by include=" if include is not None else "")
            + "; orthogonal_init has nothing to initialize"
        )
    access = [WeightAccess(n, m) for n, m in layers]  # refuses spectral norm before anything changes
    snapshot = Snapshot(m for _, m in layers)
    try:
        orthogonalize(
            layers, access, gain=gain, zero_bias=zero_bias, generator=generator, group=process_group
        )
    except BaseException:
        snapshot.restore()
        raise
    return [n for n, _ in layers]


def orthogonalize(
    layers: Sequence[tuple[str, nn.Module]],
    access: Sequence[WeightAccess],
    *,
    gain: float = 1.0,
    zero_bias: bool = True,
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """The orthogonal init of already chosen layers (no argument checks, no snapshot)."""
    generator = shared_generator([acc.get() for acc in access], generator)
    for acc, (_, module) in zip(access, layers):
        acc.set(_module_weight(acc, module, gain=gain, generator=generator))
        bias = getattr(module, "bias", None)
        if zero_bias and isinstance(bias, Tensor):
            with torch.no_grad():
                bias.zero_()
    broadcast_layers([m for _, m in layers], group)
