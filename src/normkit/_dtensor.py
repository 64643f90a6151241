"""What every technique needs to know about DTensor parameters (FSDP2 ``fully_shard``, tensor parallel).

FSDP2 shards each parameter on dim 0 (``Shard(0)``): for Linear / Conv weights that is the output dimension,
so every row (one unit's incoming weights) lies whole on one rank and row-wise math can run on the local
shard. A norm over a whole sharded tensor, or over all tensors, needs one reduction across the mesh.

The helpers: predicates (:func:`is_dtensor`, :func:`rows_are_local`, :func:`needs_reduction`), the local
shard (:func:`local`), the clear error for a placement that cannot work (:func:`check_rows_local`,
:func:`placement_error`), state placed like a parameter's rows (:func:`zeros_rows`), and the one generic
reduction: compute every tensor's partial result on its local shard, stack them, and call
:func:`reduce_partials` (or :func:`reduce_partials_each` for partials of different shapes) once — one
``all_reduce`` for all sharded tensors of a step, replicated and plain tensors left as computed.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, cast

import torch

try:  # public since torch 2.5; the library supports torch >= 2.4 without DTensor support there
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a parameter, gradient or state of a sharded model)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor (no communication); any other tensor unchanged."""
    return cast(Any, tensor).to_local() if is_dtensor(tensor) else tensor


def rows_are_local(tensor: torch.Tensor) -> bool:
    """True when every row ``tensor.reshape(len(tensor), -1)[i]`` lies whole on one rank: a plain tensor, or a
    DTensor whose placements are ``Replicate()`` or ``Shard(0)`` only."""
    if not is_dtensor(tensor):
        return True
    placements = cast(Any, tensor).placements
    return all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in placements)


def _sharded_mesh_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    """The mesh dimensions (of size > 1) over which a DTensor's local pieces differ: ``Shard`` or ``Partial``
    placements. A reduction of local partial results must run over exactly these."""
    if not is_dtensor(tensor):
        return ()
    dt = cast(Any, tensor)
    return tuple(
        d for d, p in enumerate(dt.placements) if not isinstance(p, Replicate) and dt.device_mesh.size(d) > 1
    )


def needs_reduction(tensor: torch.Tensor) -> bool:
    """True when a quantity summed over the whole of ``tensor`` needs a reduction across ranks (a DTensor
    sharded on a mesh dimension of size > 1); False for plain tensors and replicated DTensors."""
    return bool(_sharded_mesh_dims(tensor))


def placement_error(owner: str, tensor: torch.Tensor, what: str, alternative: str) -> ValueError:
    """The error for math that cannot run on ``tensor``'s placement (named, with the alternative)."""
    placements = tuple(cast(Any, tensor).placements) if is_dtensor(tensor) else ()
    return ValueError(
        f"{owner}: a parameter of shape {tuple(tensor.shape)} is a DTensor with placements {placements}: "
        f"{what}. {alternative}"
    )


def check_rows_local(owner: str, tensors: Sequence[torch.Tensor], what: str = "row-wise math") -> None:
    """Raise a clear ``ValueError`` if a row of one of ``tensors`` is split across ranks (a placement other
    than ``Shard(0)`` / ``Replicate()``), naming the placement and the alternative."""
    for t in tensors:
        if not rows_are_local(t):
            raise placement_error(
                owner,
                t,
                f"its rows (output units, dim 0) are split across ranks, and {what} needs each row whole on "
                "one rank",
                "Shard it on dim 0 (FSDP2's fully_shard does) or replicate it (Replicate()); tensor "
                "parallelism that splits the input dimension (Shard(1), ColwiseParallel's input side) is not "
                "supported here.",
            )


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def _reduction_plan(sources: Sequence[torch.Tensor], op: str) -> list[tuple[Any, tuple[int, ...], list[int]]]:
    """``(mesh, mesh dims, indices of sources)`` for each distinct way the sharded sources are split."""
    if op not in _OPS:
        raise ValueError(f"reduce_partials: op must be one of {tuple(_OPS)}, got {op!r}")
    # keyed by the mesh's value (DeviceMesh compares by its ranks): fully_shard builds one mesh object per
    # call, all equal, and they must share one collective
    keys: dict[tuple[Any, tuple[int, ...]], tuple[Any, tuple[int, ...], list[int]]] = {}
    for i, s in enumerate(sources):
        dims = _sharded_mesh_dims(s)
        if dims:
            mesh = cast(Any, s).device_mesh
            keys.setdefault((mesh, dims), (mesh, dims, []))[2].append(i)
    return list(keys.values())


def _all_reduce_(buf: torch.Tensor, mesh: Any, dims: tuple[int, ...], op: str) -> None:
    import torch.distributed as dist

    reduce_op = getattr(dist.ReduceOp, _OPS[op])
    for d in dims:
        dist.all_reduce(buf, reduce_op, group=mesh.get_group(d))


def reduce_partials(partials: torch.Tensor, sources: Sequence[torch.Tensor], op: str = "sum") -> torch.Tensor:
    """Reduce local partial results across the mesh, like ``torch.nn.utils.get_total_norm`` does for norms.

    ``partials[i]`` (first dimension) is what this rank computed from its local shard of ``sources[i]`` (for
    a norm: the sum of squares of its piece). Entries of sources that are sharded (``Shard``/``Partial`` on
    a mesh dimension of size > 1) are reduced with ``op`` (``"sum"``, ``"max"`` or ``"min"``) over exactly
    those mesh dimensions; the others (plain tensors, replicated DTensors: the local piece is the whole) are
    left as they are. Returns a new tensor (``partials`` is not modified).

    All entries are reduced in **one** ``all_reduce`` per distinct (mesh, mesh dimension): one for FSDP2
    (a 1-D mesh). Stack every tensor's partials first and call this once per step. Like any collective it
    is queued without host synchronisation on accelerators; on CPU (gloo) it blocks until done.
    """
    if partials.shape[0] != len(sources):
        raise ValueError(f"reduce_partials: {partials.shape[0]} partials for {len(sources)} sources")
    plan = _reduction_plan(sources, op)
    if not plan:
        return partials
    out = partials.clone()
    for mesh, dims, idx in plan:
        if len(idx) == len(sources):
            _all_reduce_(out, mesh, dims, op)
            continue
        index = host_to_device(idx, torch.long, out.device)
        buf = out[index]
        _all_reduce_(buf, mesh, dims, op)
        out[index] = buf
    return out


def reduce_partials_each(
    partials: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], op: str = "sum"
) -> list[torch.Tensor]:
    """:func:`reduce_partials` for partials of different shapes, one tensor per source (flattened into one
    buffer, so still one ``all_reduce`` per distinct mesh split)."""
    parts = list(partials)
    if len(parts) != len(sources):
        raise ValueError(f"reduce_partials_each: {len(parts)} partials for {len(sources)} sources")
    plan = _reduction_plan(sources, op)
    result = list(parts)
    for mesh, dims, idx in plan:
        dtype = parts[idx[0]].dtype
        for i in idx[1:]:
            dtype = torch.promote_types(dtype, parts[i].dtype)
        flat = torch.cat([parts[i].reshape(-1).to(dtype) for i in idx])
        _all_reduce_(flat, mesh, dims, op)
        for i, piece in zip(idx, flat.split([parts[i].numel() for i in idx])):
            result[i] = piece.view(parts[i].shape).to(parts[i].dtype)
    return result


def host_to_device(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers (indices, counts) as a tensor on ``device``, copied without waiting for the device
    (``torch.tensor(..., device=cuda)`` would synchronise the stream)."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def zeros_rows(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Zeros of shape ``(len(tensor),)`` (one number per row) placed like ``tensor``'s rows: a DTensor with
    the same mesh and placements when ``tensor`` is one (rows local: ``Shard(0)`` / ``Replicate()``)."""
    dtype = tensor.dtype if dtype is None else dtype
    if not is_dtensor(tensor):
        return torch.zeros(tensor.shape[0], dtype=dtype, device=tensor.device)
    dt = cast(Any, tensor)
    piece = torch.zeros(dt.to_local().shape[0], dtype=dtype, device=dt.to_local().device)
    return DTensor.from_local(
        piece,
        dt.device_mesh,
        dt.placements,
        run_check=False,
        shape=torch.Size([tensor.shape[0]]),
        stride=(1,),
    )


Request = dict[str, tuple[torch.Tensor, list[torch.Tensor]]]  # op → (partials (k, ...), their k sources)
Reply = dict[str, torch.Tensor]


def drive(tasks: Sequence[Generator[Request, Reply, Any]]) -> list[Any]:
    """Run computations that pause for reductions across the mesh, batching their reductions.

    Each task is a generator (e.g. one optimizer step per parameter group) that yields a request
    ``{op: (partials, sources)}`` (``op`` in ``"sum"``, ``"max"``, ``"min"``; ``partials`` of shape
    ``(k, ...)`` for ``k`` sources, see :func:`reduce_partials`) and receives ``{op: reduced partials}``.
    The requests of all tasks paused at the same round are concatenated and reduced together: one
    ``all_reduce`` per op per round for the whole step, however many tasks (groups) there are. Returns
    the tasks' return values. A task that never yields (plain tensors) just runs to its end.
    """
    results: list[Any] = [None] * len(tasks)
    pending: dict[int, Request] = {}

    def advance(i: int, reply: Reply | None) -> None:
        try:
            pending[i] = tasks[i].send(reply)  # type: ignore[arg-type]
        except StopIteration as stop:
            results[i] = stop.value

    for i in range(len(tasks)):
        advance(i, None)
    while pending:
        requests, pending_now = dict(pending), sorted(pending)
        pending.clear()
        replies: dict[int, Reply] = {i: {} for i in pending_now}
        ops = sorted({op for r in requests.values() for op in r})
        for op in ops:
            users = [i for i in pending_now if op in requests[i]]
            parts = [requests[i][op][0] for i in users]
            sources = [s for i in users for s in requests[i][op][1]]
            reduced = reduce_partials(torch.cat(parts), sources, op)
            for i, piece in zip(users, reduced.split([p.shape[0] for p in parts])):
                replies[i][op] = piece
        for i in pending_now:
            advance(i, replies[i])
    return results


def run(task: Generator[Request, Reply, Any]) -> Any:
    """Run one task of :func:`drive` (its reductions unbatched with any other)."""
    return drive([task])[0]
