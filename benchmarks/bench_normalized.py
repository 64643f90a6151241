"""NormalizedOptimizer / ClippedOptimizer step cost against the bare inner step (issue 6: target ≤ 1.2×).

The candidate is ``wrapper.step()`` (transform the gradients in place, then the inner step), the reference
``inner.step()`` alone on a copy of the same parameters with the same gradients; both SGD with
``foreach=True``. Parameter shapes: WRN-16-4 (2.75 M parameters in 44 tensors) and the seed's 30 × 128 MLP
with BatchNorm (0.5 M parameters in 122 tensors).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks.timing import Ratio, measure_ratio
from normkit.optim import ClippedOptimizer, NormalizedOptimizer

TITLE = "Normalized / clipped gradient wrappers: step vs the inner SGD step (foreach)"


def wrn_16_4(num_classes: int = 10) -> nn.Module:
    """The parameter tensors of WRN-16-4 (pre-activation blocks, 1×1 shortcut convs where widths change)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False)]
    cin = 16
    for width in (64, 128, 256):
        for _ in range(2):
            layers += [nn.BatchNorm2d(cin), nn.Conv2d(cin, width, 3, padding=1, bias=False)]
            layers += [nn.BatchNorm2d(width), nn.Conv2d(width, width, 3, padding=1, bias=False)]
            if cin != width:
                layers.append(nn.Conv2d(cin, width, 1, bias=False))
            cin = width
    layers += [nn.BatchNorm2d(cin), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def mlp_30x128(inputs: int = 40, num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    cin = inputs
    for _ in range(30):
        layers += [nn.Linear(cin, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.2)]
        cin = 128
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)


Wrap = Callable[[torch.optim.Optimizer, nn.Module], object]


def _pair(
    make: Callable[[], nn.Module], sgd_kwargs: dict, wrap: Wrap
) -> tuple[Callable[[], object], Callable[[], object], int, int]:
    torch.manual_seed(0)
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a.parameters(), b.parameters()):
        pa.grad = torch.randn_like(pa)
        pb.grad = pa.grad.clone()
    wrapped = wrap(torch.optim.SGD(a.parameters(), foreach=True, **sgd_kwargs), a)
    plain = torch.optim.SGD(b.parameters(), foreach=True, **sgd_kwargs)
    n = sum(p.numel() for p in a.parameters())
    return wrapped.step, plain.step, n, len(list(a.parameters()))  # type: ignore[attr-defined]


def run(quick: bool) -> list[Ratio]:
    reps = dict(repeats=5, inner=2, warmup=2) if quick else dict(repeats=41, inner=5, warmup=5)
    configs = {
        "SGD(momentum=0.9, nesterov, wd=5e-4)": dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4),
        "SGD(lr only)": dict(lr=1e-3),
    }
    wrappers: dict[str, Wrap] = {
        "Normalized l2 tensor": lambda o, m: NormalizedOptimizer(o, "l2"),
        "Normalized l2 layer": lambda o, m: NormalizedOptimizer(o, "l2", "layer", model=m),
        "Normalized avg_l1_l2 tensor": lambda o, m: NormalizedOptimizer(o, "avg_l1_l2"),
        "Clipped l2 0.5 tensor": lambda o, m: ClippedOptimizer(o, "l2", 0.5),
        "Clipped relative (AGC) unit": lambda o, m: ClippedOptimizer(o, relative=True),
    }
    plan = [
        # (model, sgd config, wrapper, target): the target is on the l2-normalized SGD step
        ("WRN-16-4", "SGD(momentum=0.9, nesterov, wd=5e-4)", "Normalized l2 tensor", 1.2),
        ("WRN-16-4", "SGD(lr only)", "Normalized l2 tensor", 1.2),
        ("MLP 30x128+BN", "SGD(momentum=0.9, nesterov, wd=5e-4)", "Normalized l2 tensor", 1.2),
        ("MLP 30x128+BN", "SGD(lr only)", "Normalized l2 tensor", 1.2),
        ("WRN-16-4", "SGD(momentum=0.9, nesterov, wd=5e-4)", "Normalized l2 layer", None),
        ("WRN-16-4", "SGD(momentum=0.9, nesterov, wd=5e-4)", "Normalized avg_l1_l2 tensor", None),
        ("WRN-16-4", "SGD(momentum=0.9, nesterov, wd=5e-4)", "Clipped l2 0.5 tensor", None),
        ("WRN-16-4", "SGD(momentum=0.9, nesterov, wd=5e-4)", "Clipped relative (AGC) unit", None),
        ("MLP 30x128+BN", "SGD(momentum=0.9, nesterov, wd=5e-4)", "Normalized l2 layer", None),
        ("MLP 30x128+BN", "SGD(momentum=0.9, nesterov, wd=5e-4)", "Clipped relative (AGC) unit", None),
    ]
    makers = {"WRN-16-4": wrn_16_4, "MLP 30x128+BN": mlp_30x128}
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: on a shared 2-core machine, 2 OpenMP threads measure contention
    try:
        _measure(plan, makers, configs, wrappers, reps, out)
    finally:
        torch.set_num_threads(threads)
    return out


def _measure(plan: list, makers: dict, configs: dict, wrappers: dict, reps: dict, out: list[Ratio]) -> None:
    for model_name, cfg, wrapper, target in plan:
        cand, ref, n, k = _pair(makers[model_name], configs[cfg], wrappers[wrapper])
        out.append(
            measure_ratio(
                f"{wrapper}({cfg}).step, {model_name} ({n / 1e6:.2f} M params, {k} tensors), 1 thread",
                cand,
                f"{cfg}.step",
                ref,
                target=target,
                **reps,  # type: ignore[arg-type]
            )
        )
        print(f"  {out[-1].name}: {out[-1].ratio:.2f}×", flush=True)
    # Where the time goes: the gradient transform alone (no inner step) against the inner step alone.
    for model_name in makers:
        cfg = "SGD(momentum=0.9, nesterov, wd=5e-4)"
        cand, ref, n, k = _pair(makers[model_name], configs[cfg], wrappers["Normalized l2 tensor"])
        opt = cand.__self__  # type: ignore[attr-defined]

        def transform(opt: NormalizedOptimizer = opt) -> None:
            with torch.no_grad():
                opt._transform()

        grads = [p.grad for p in opt._candidates()]

        def floor(grads: list = grads) -> None:
            # the least an exact in-place transform does: one norm and one multiply per gradient tensor
            scale = torch.stack(torch._foreach_norm(grads)).add_(1e-7).reciprocal_()
            torch._foreach_mul_(grads, scale.unbind())

        for name, fn in (
            ("l2 tensor transform of .grad alone", transform),
            ("floor (_foreach_norm + _foreach_mul_ of .grad, nothing else)", floor),
        ):
            out.append(
                measure_ratio(
                    f"{name}, {model_name} ({n / 1e6:.2f} M params), 1 thread", fn, f"{cfg}.step", ref, **reps
                )
            )
            print(f"  {out[-1].name}: {out[-1].ratio:.2f}×", flush=True)
