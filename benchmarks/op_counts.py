"""Aten operations dispatched per step on CPU: the proxy for CUDA kernel launches in BENCHMARKS.md's
"GPU plan (on paper)" (the count does not depend on machine load).

    python -m benchmarks.op_counts          # every case
    python -m benchmarks.op_counts brn      # the groups whose name contains "brn" (optim, enorm, brn, lsuv)

Counting: a ``TorchDispatchMode`` sees every aten op that reaches a backend kernel, below autograd and after
composite ops are decomposed — what a CUDA run would launch, one kernel per op — but not the ops a CPU kernel
calls internally (``torch.profiler``'s CPU event tree mixes those in: batch norm's CPU kernel calls
``zero_`` / ``copy_`` inside, so counting the profiler's leaves misses the kernel itself). A ``_foreach_`` op
counts once; on CUDA it is one launch per chunk of its tensor list (≤ 110 / 64 / 48 / 36 tensors per launch
for 1–4 lists, ≤ 320 blocks of 64 Ki elements), so one launch for a WRN-16-4's 44 tensors and a few for
WRN-28-10's large ones. Views and allocations (``view``, ``as_strided``, ``empty``, ...) launch nothing and
are left out of the kernel count; ``_local_scalar_dense`` (``.item()``, ``bool(tensor)``) is a host
synchronisation, counted apart.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = {
    "aten::view",
    "aten::_unsafe_view",
    "aten::as_strided",
    "aten::reshape",
    "aten::detach",
    "aten::alias",
    "aten::t",
    "aten::transpose",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::expand",
    "aten::permute",
    "aten::select",
    "aten::slice",
    "aten::unbind",
    "aten::split",
    "aten::split_with_sizes",
    "aten::unflatten",
    "aten::flatten",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::resize_",
    "aten::lift_fresh",
    "aten::view_as",
    "aten::expand_as",
    "aten::numpy_T",
    "aten::result_type",
    "aten::is_nonzero",
    "aten::_reshape_alias",
    "aten::contiguous",
    "aten::promote_types",
    "aten::_record_function_enter_new",  # the profiler's markers around torch.optim steps
    "aten::_record_function_exit",
}
SYNC = {"aten::_local_scalar_dense"}


class _Count(TorchDispatchMode):
    """Every aten op that reaches a backend kernel (below autograd, after composite ops are decomposed); the
    ops a kernel calls internally are not seen, as a CUDA launch of that kernel would not be."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[f"aten::{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object], warmup: int = 2) -> Counter[str]:
    """Aten ops dispatched by one call of ``fn`` after ``warmup`` calls (state initialised, caches warm)."""
    for _ in range(warmup):
        fn()
    with _Count() as mode:
        fn()
    return mode.counts


def count_python_calls(fn: Callable[[], object]) -> int:
    """Python function calls made by one call of ``fn`` (the host-side overhead, independent of load)."""
    calls = 0

    def hook(_frame: Any, event: str, _arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def summary(counts: Counter[str]) -> tuple[int, int, int]:
    """(kernel-launching ops, of which ``_foreach_`` ops, host synchronisations)."""
    kernels = sum(n for name, n in counts.items() if name not in NO_KERNEL and name not in SYNC)
    foreach = sum(n for name, n in counts.items() if name.startswith("aten::_foreach_"))
    syncs = sum(n for name, n in counts.items() if name in SYNC)
    return kernels, foreach, syncs


# --- the cases ---------------------------------------------------------------------------------------------


def _wrn16_4() -> nn.Module:
    from normkit.train.runner.models import wrn

    return wrn((3, 32, 32), 10, depth=16, widen_factor=4)


def _with_grads(model: nn.Module) -> nn.Module:
    from benchmarks.bench_family import _with_grads as family_grads

    return family_grads(model)


def _optimizer_cases() -> dict[str, Callable[[], object]]:
    from benchmarks.bench_grassmann import _params, wrn_manifold_shapes
    from normkit.optim import (
        LAMB,
        LARS,
        SGDG,
        SGDP,
        AdamG,
        AdamP,
        NormalizedOptimizer,
        scale_invariant_param_groups,
    )

    wd = 5e-4
    base = _with_grads(_wrn16_4())

    def on(make: Callable[[nn.Module], torch.optim.Optimizer]) -> Callable[[], object]:
        model = copy.deepcopy(base)
        for p, q in zip(model.parameters(), base.parameters()):
            p.grad = q.grad.clone()  # type: ignore[union-attr]
        return make(model).step

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd, foreach=True
        )

    shapes = wrn_manifold_shapes(16, 4)
    cases: dict[str, Callable[[], object]] = {
        "ref SGD(momentum, nesterov, wd, foreach), WRN-16-4 all 44 tensors": on(sgd),
        "ref AdamW(foreach), WRN-16-4 all 44 tensors": on(
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=wd, foreach=True)
        ),
        "NormalizedOptimizer(SGD(momentum, nesterov, wd, foreach), l2 tensor), WRN-16-4": on(
            lambda m: NormalizedOptimizer(sgd(m), "l2")
        ),
        "AdamP cosine test, WRN-16-4": on(lambda m: AdamP(m.parameters(), weight_decay=wd)),
        "AdamP graph groups, WRN-16-4": on(lambda m: AdamP(scale_invariant_param_groups(m), weight_decay=wd)),
        "SGDP cosine test (momentum, nesterov, wd), WRN-16-4": on(
            lambda m: SGDP(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd)
        ),
        "LARS (momentum, wd), WRN-16-4": on(lambda m: LARS(m.parameters(), lr=0.1, weight_decay=wd)),
        "LAMB (wd), WRN-16-4": on(lambda m: LAMB(m.parameters(), weight_decay=wd)),
        "ref SGD(momentum, nesterov, foreach), WRN-16-4 manifold 13 tensors": torch.optim.SGD(
            _params(shapes), lr=0.1, momentum=0.9, nesterov=True, foreach=True
        ).step,
        "ref Adam(foreach), WRN-16-4 manifold 13 tensors": torch.optim.Adam(
            _params(shapes), foreach=True
        ).step,
        "SGD-G ν 0.1, default (CPU: per tensor), 13 tensors": SGDG(
            _params(shapes), lr=0.2, grad_clip=0.1, grassmann=True
        ).step,
        "SGD-G ν 0.1, foreach=True (CUDA default), 13 tensors": SGDG(
            _params(shapes), lr=0.2, grad_clip=0.1, grassmann=True, foreach=True
        ).step,
        "SGD-G ν 0.1 ω 0.1, default, 13 tensors": SGDG(
            _params(shapes), lr=0.2, grad_clip=0.1, omega=0.1, grassmann=True
        ).step,
        "Adam-G ν 0.1, default (CPU: per tensor), 13 tensors": AdamG(
            _params(shapes), lr=0.05, grad_clip=0.1, grassmann=True
        ).step,
        "Adam-G ν 0.1, foreach=True (CUDA default), 13 tensors": AdamG(
            _params(shapes), lr=0.05, grad_clip=0.1, grassmann=True, foreach=True
        ).step,
    }
    return cases


def _enorm_cases() -> dict[str, Callable[[], object]]:
    from benchmarks.bench_enorm import fc_net
    from normkit.enorm import ENorm

    out: dict[str, Callable[[], object]] = {}
    for momentum in (0.0, 0.9):
        model = fc_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
        if momentum:
            x = torch.randn(8, 3072)
            F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
            opt.step()  # momentum buffers exist
        enorm = ENorm(model, opt, c=1.0)
        out[f"ENorm cycle, FC 15x500 (14 groups), SGD momentum {momentum}"] = enorm.cycle
    return out


def _brn_cases() -> dict[str, Callable[[], object]]:
    from benchmarks.bench_brn import _train_step
    from normkit.nn import BatchRenorm1d
    from normkit.nn.functional import batch_renorm

    out: dict[str, Callable[[], object]] = {}
    x = torch.randn(512, 256)
    grad = torch.randn_like(x)
    for label, needs_input_grad in (("with input grad (bench_brn)", True), ("no input grad", False)):
        xi = x.clone().requires_grad_(needs_input_grad)
        bn = nn.BatchNorm1d(256).train()
        out[f"brn: nn.BatchNorm1d fwd+bwd (512, 256), {label}"] = _train_step(bn, xi, grad)
        for step, what in ((200_000, "past warm-up"), (0, "in warm-up")):
            layer = BatchRenorm1d(256, schedule="crossq").train()
            layer.num_batches_tracked.fill_(step)
            out[f"brn: BatchRenorm1d crossq fwd+bwd (512, 256), {what}, {label}"] = _train_step(
                layer, xi, grad
            )
    # The layer inside a critic block (Linear 256→256 + norm + ReLU), as a step of a whole network times it.
    for norm in (nn.BatchNorm1d(256), _past_warmup(BatchRenorm1d(256, schedule="crossq"))):
        block = nn.Sequential(nn.Linear(256, 256), norm, nn.ReLU()).train()
        out[f"brn: Linear + {type(norm).__name__} + ReLU fwd+bwd (512, 256)"] = _train_step(block, x, grad)
    # The functional core alone (no module-level checks, limits given as numbers).
    state = BatchRenorm1d(256)
    w, b = state.weight, state.bias
    xf = x.clone().requires_grad_()

    def functional() -> None:
        w.grad = b.grad = xf.grad = None
        y = batch_renorm(xf, state.running_mean, state.running_std, w, b, True, 0.01, 1e-5, 3.0, 5.0)
        y.backward(grad)

    out["brn: normkit.nn.functional.batch_renorm fwd+bwd (512, 256), r_max 3, d_max 5 as numbers"] = (
        functional
    )
    return out


def _past_warmup(layer: Any) -> Any:
    layer.num_batches_tracked.fill_(200_000)
    return layer


def _lsuv_cases() -> dict[str, Callable[[], object]]:
    from normkit.init import lsuv_init

    def net() -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, padding=1), nn.ReLU()]
        for _ in range(6):
            layers += [nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    x = torch.randn(16, 3, 32, 32)
    base = net()

    def forward() -> None:
        with torch.no_grad():
            base(x)

    return {
        "lsuv: one forward, 7-conv + linear net": forward,
        "lsuv: lsuv_init, 7-conv + linear net": lambda: lsuv_init(copy.deepcopy(base), x),
    }


def all_cases() -> dict[str, Callable[[], dict[str, Callable[[], object]]]]:
    return {"optim": _optimizer_cases, "enorm": _enorm_cases, "brn": _brn_cases, "lsuv": _lsuv_cases}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("filters", nargs="*", help="substrings of the case names to count (default: all)")
    parser.add_argument("--detail", action="store_true", help="print each case's ops by name")
    args = parser.parse_args(argv)
    print("| case | kernel-launching aten ops | of which _foreach_ | host syncs | Python calls |")
    print("|---|---:|---:|---:|---:|")
    for group, make in all_cases().items():
        if args.filters and not any(f in group for f in args.filters):
            continue
        for name, fn in make().items():
            counts = count_ops(fn)
            kernels, foreach, syncs = summary(counts)
            calls = count_python_calls(fn)
            print(f"| {name} | {kernels} | {foreach} | {syncs} | {calls} |", flush=True)
            if args.detail:
                for op, n in counts.most_common():
                    print(f"    {n:5d} {op}")


if __name__ == "__main__":
    main()
