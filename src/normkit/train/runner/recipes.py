"""Named presets, one per command of the original READMEs (and per cell of the tables those commands fill).

Each recipe is a partial config (the rest are :class:`~normkit.train.config.TrainConfig` defaults) and says
which table and number it reproduces. ``normkit train --recipe NAME [overrides]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RECIPES", "Recipe", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    config: dict[str, Any]
    reproduces: str
    paper_number: str | None = None  # the number in the table, as printed there
    seed_command: str | None = None
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


RECIPES: dict[str, Recipe] = {}


def _add(recipe: Recipe) -> None:
    if recipe.name in RECIPES:
        raise ValueError(f"duplicate recipe {recipe.name}")
    RECIPES[recipe.name] = recipe


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)} (see `normkit recipes`)")
    return RECIPES[name]


# --------------------------------------------------------------------------- Cho & Lee 2017 (SGD-G/Adam-G)
# Table 1 (CIFAR, median error of 5 runs) and Table 2 (SVHN) of arXiv 1709.09603, as in the original README.
_RBN_CIFAR = {  # model: {dataset: (SGD, SGD-G, Adam-G)}
    "vgg13": {"cifar10": (5.88, 5.87, 6.05), "cifar100": (26.17, 25.29, 24.89)},
    "vgg19": {"cifar10": (6.49, 5.92, 6.02), "cifar100": (27.62, 25.79, 25.59)},
    "wrn28-10": {"cifar10": (3.89, 3.85, 3.78), "cifar100": (18.66, 18.19, 18.30)},
    "wrn40-10": {"cifar10": (3.72, 3.72, 3.80), "cifar100": (18.39, 18.04, 17.85)},
}
_RBN_SVHN = {
    "vgg13": (1.78, 1.74, 1.72),
    "vgg19": (1.94, 1.81, 1.77),
    "wrn16-4": (1.64, 1.67, 1.61),
    "wrn22-8": (1.64, 1.63, 1.55),
}


def _arch(name: str) -> dict[str, Any]:
    if name.startswith("wrn"):
        depth, widen = name[3:].split("-")
        return {"model": "wrn", "depth": int(depth), "widen_factor": int(widen)}
    return {"model": name}


def _seed_command(flags: str, method: str, cfg: dict[str, Any], cifar: bool, wrn: bool) -> str:
    cmd = f"python3 train.py {flags} --optimizer={method} "
    if method == "sgd":
        cmd += (
            f"--learnRate={cfg['lr']} --weightDecay=0.0005 --biasDecay=0.0005 --gammaDecay=0.0005 "
            "--betaDecay=0.0005 "
        )
    else:
        cmd += (
            f"--grassmann=True --learnRate={cfg['lr']} --learnRateG={cfg['lr_g']:g} "
            "--omega=0.1 --grad_clip=0.1 "
            "--weightDecay=0.0005 "
        )
    if wrn:
        cmd += f"--keep_prob={1 - cfg['dropout']:.1f} "
    if not cifar:
        cmd += "--learnRateDecay=0.1 "
    return cmd + f"--data={cfg['data']}"


def _rbn(arch: str, data: str, method: str, error: float) -> None:
    cifar = data != "svhn"
    wrn = arch.startswith("wrn")
    base: dict[str, Any] = {
        **_arch(arch),
        "data": data,
        "batch_size": 128,
        "epochs": 200 if cifar else 160,
        "schedule": "multistep",
        "milestones": [60, 120, 160] if cifar else [60, 120],
        "gamma": 0.2 if cifar else 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "dropout": (0.3 if cifar else 0.4) if wrn else 0.0,
    }
    if data == "svhn":
        base["svhn_extra"] = True
    lr_e = 0.01 if cifar else 0.001
    if method == "sgd":
        # the baseline decays every weight (--biasDecay/--gammaDecay/--betaDecay 0.0005)
        base.update(optimizer="sgd", lr=0.1 if cifar else 0.01, decay_norm_and_bias=True)
    else:
        lr_g = {"sgdg": 0.2, "adamg": 0.05}[method] if cifar else {"sgdg": 0.02, "adamg": 0.005}[method]
        base.update(optimizer=method, lr=lr_e, lr_g=lr_g, grad_clip=0.1, omega=0.1)
    table = "Table 1 (CIFAR)" if cifar else "Table 2 (SVHN)"
    label = {"sgd": "SGD", "sgdg": "SGD-G", "adamg": "Adam-G"}[method]
    depth_widen = arch.replace("wrn", "WRN-").upper() if wrn else arch.upper().replace("VGG", "VGG-")
    seed_flags = (
        f"--model=resnet --depth={base['depth']} --widen_factor={base['widen_factor']}"
        if wrn
        else f"--model={arch}"
    )
    _add(
        Recipe(
            f"rbn-{arch}-{data}-{method}",
            base,
            f"Cho & Lee 2017 (Riemannian BN), {table}: {depth_widen} on {data.upper()}, {label}",
            f"{error:.2f} % test error (median of 5 runs)",
            _seed_command(seed_flags, method, base, cifar, wrn),
            "SVHN: train + extra. Euclidean weights: SGD with Nesterov momentum 0.9, wd 5e-4."
            if not cifar
            else "Euclidean weights: SGD with Nesterov momentum 0.9, wd 5e-4.",
            ("rbn", method),
        )
    )


for _arch_name, _per_data in _RBN_CIFAR.items():
    for _data, _errors in _per_data.items():
        for _method, _err in zip(("sgd", "sgdg", "adamg"), _errors):
            _rbn(_arch_name, _data, _method, _err)
for _arch_name, _errors in _RBN_SVHN.items():
    for _method, _err in zip(("sgd", "sgdg", "adamg"), _errors):
        _rbn(_arch_name, "svhn", _method, _err)


# ------------------------------------------------------------------------------- Stock et al. 2019 (ENorm)
_ENORM_FC = {
    "model": "enorm-fc",
    "data": "cifar10",
    "depth": 15,
    "width": 500,
    "batch_size": 256,
    "epochs": 60,
    "lr": 0.1,
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 1e-3,
    "schedule": "linear",
    "val_size": 9040,
    "decay_norm_and_bias": True,  # their SGD decays every parameter
    "enorm_norm_layers": "ignore",  # the authors balance across BatchNorm (off when enorm = 0)
    "enorm_variant": "authors",  # with their _step_fc arithmetic (running statistics untouched)
}
_ENORM_CONV = {
    "model": "enorm-conv",
    "data": "cifar10",
    "batch_size": 256,
    "epochs": 128,
    "lr": 0.05,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 1e-3,
    "schedule": "linear",
    "val_size": 9040,
    "decay_norm_and_bias": True,
    "enorm_norm_layers": "ignore",
}
_ENORM_NOTE = (
    "The original README gives the commands but not the numbers; the paper's CIFAR-10 table holds them. "
    "The original main.py was run with --n-iter 5 (five runs): use --seed 0..4."
)
_add(
    Recipe(
        "enorm-fc-cifar10-baseline",
        {**_ENORM_FC, "enorm": 0.0},
        "Stock et al. 2019 (ENorm), CIFAR-10 fully connected net (15 intermediary layers): "
        "baseline without ENorm",
        None,
        "python main.py --dataset cifar10 --model-type linear --n-layers 15 --enorm 0 --epochs 60 --lr 0.1 "
        "--weight-decay 1e-3 --momentum 0 --n-iter 5",
        _ENORM_NOTE,
        ("enorm",),
    )
)
_add(
    Recipe(
        "enorm-fc-cifar10",
        {**_ENORM_FC, "enorm": 1.2},
        "Stock et al. 2019 (ENorm), CIFAR-10 fully connected net (15 intermediary layers): ENorm c = 1.2",
        None,
        "python main.py --dataset cifar10 --model-type linear --n-layers 15 --enorm 1.2 --epochs 60 --lr 0.1 "
        "--weight-decay 1e-3 --momentum 0 --n-iter 5",
        _ENORM_NOTE,
        ("enorm",),
    )
)
_add(
    Recipe(
        "enorm-conv-cifar10-baseline",
        {**_ENORM_CONV, "enorm": 0.0},
        "Stock et al. 2019 (ENorm), CIFAR-10 fully convolutional net: baseline without ENorm",
        None,
        "python main.py --dataset cifar10 --model-type conv --enorm 0 --epochs 128 --lr 0.05 "
        "--weight-decay 1e-3 --momentum 0.9 --n-iter 5",
        _ENORM_NOTE,
        ("enorm",),
    )
)
_add(
    Recipe(
        "enorm-conv-cifar10",
        {**_ENORM_CONV, "enorm": 1.1},
        "Stock et al. 2019 (ENorm), CIFAR-10 fully convolutional net: ENorm c = 1.1",
        None,
        "python main.py --dataset cifar10 --model-type conv --enorm 1.1 --epochs 128 --lr 0.05 "
        "--weight-decay 1e-3 --momentum 0.9 --n-iter 5",
        _ENORM_NOTE,
        ("enorm",),
    )
)


# --------------------------------------------------------------------------- Mishkin & Matas 2016 (LSUV)
# The original Torch MNIST example, accuracy after 10 epochs (its table, last row).
_LSUV_MNIST = {
    "model": "mnist-convnet",
    "data": "mnist",
    "epochs": 10,
    "batch_size": 10,
    "optimizer": "sgd",
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "schedule": "constant",
}
_LSUV_NOTE = (
    "Batch size 10 is the Torch MNIST demo's default (not stated); plain SGD, constant lr. "
    "The original test is on the full MNIST (60 000 / 10 000); `--data mnist-t10k` runs it offline on the "
    "real test set split 8 000 / 2 000."
)
for _name, _init, _lr, _acc in (
    ("lsuv-mnist", "lsuv", 0.1, "98.96 %"),
    ("lsuv-mnist-lr0.05", "lsuv", 0.05, "98.91 %"),
    ("lsuv-mnist-lr0.001", "lsuv", 0.001, "96.15 %"),
    ("orthogonal-mnist-lr0.001", "orthogonal", 0.001, "95.29 %"),
):
    _add(
        Recipe(
            _name,
            {**_LSUV_MNIST, "init": _init, "lr": _lr},
            f"LSUV seed (Torch MNIST example), table column '{'with' if _init == 'lsuv' else 'without'} lsuv "
            f"(lr={_lr})', epoch 10",
            f"{_acc} test accuracy after 10 epochs",
            f"th mnist-example.lua {'--lsuv ' if _init == 'lsuv' else ''}-r {_lr}",
            _LSUV_NOTE,
            ("lsuv",),
        )
    )


# ------------------------------------------------------------------ Ioffe 2017 (Batch Renormalization)
_BRN_WRN = {
    "model": "wrn",
    "depth": 16,
    "widen_factor": 4,
    "data": "cifar10",
    "dropout": 0.0,
    "batch_size": 128,
    "epochs": 100,
    "optimizer": "sgd",
    "lr": 0.1,
    "schedule": "cosine",
}
for _name, _norm in (("brn-wrn16-4-cifar10", "brn"), ("bn-wrn16-4-cifar10", "bn")):
    _add(
        Recipe(
            _name,
            {**_BRN_WRN, "norm": _norm},
            "Batch Renormalization seed (Keras): WRN-16-4 on CIFAR-10, no dropout, "
            + ("Batch Renormalization" if _norm == "brn" else "the BatchNorm baseline"),
            None,
            "WRN-16-4 on CIFAR-10 with BatchNormalization vs BatchRenormalization (the original code's plot)",
            "The original shows training curves only (no table); the paper's own numbers are Inception-v3 on "
            "ImageNet (76.5 % BRN vs 74.2 % BN at microbatch 4), out of reach here. It ran "
            "without data augmentation; normkit's CIFAR loader crops and flips (its curves overfit).",
            ("brn",),
        )
    )


# -------------------------------------------------------------- Yu et al. 2017 (normalized gradients)
_MLP30 = {
    "model": "mlp",
    "depth": 30,
    "width": 128,
    "norm": "bn",
    "dropout": 0.2,
    "data": "mnist",
    "batch_size": 128,
    "epochs": 20,
    "weight_decay": 1e-4,
    "schedule": "constant",
}
for _name, _extra, _label in (
    ("normalized-mlp30-sgd", {"optimizer": "sgd", "lr": 0.01}, "SGD (Nesterov momentum 0.9)"),
    (
        "normalized-mlp30",
        {"optimizer": "sgd", "lr": 0.01, "normalize": "l2"},
        "normalized SGD (l2, per tensor), Nesterov momentum 0.9",
    ),
    ("normalized-mlp30-adam", {"optimizer": "adam", "lr": 1e-3}, "Adam"),
    (
        "normalized-mlp30-adam-max",
        {"optimizer": "adam", "lr": 1e-3, "normalize": "max"},
        "normalized Adam (max)",
    ),
    (
        "clipped-mlp30-adam",
        {"optimizer": "adam", "lr": 1e-3, "clip": "l2", "clipnorm": 0.5},
        "Adam with per-tensor l2 clipping at 0.5 (the original ClippedOptimizer example)",
    ),
):
    _add(
        Recipe(
            _name,
            {**_MLP30, **_extra},
            f"Normalized-optimizers seed, deep MLP (30 dense layers of 128, BN, dropout 0.2): {_label}",
            None,
            "SGD(0.01, momentum=0.9, nesterov=True) / Adam(0.001), wrapped in NormalizedOptimizer(..., 'l2')",
            "The original reports training / test curves only; compare them with `normkit compare`.",
            ("normalized",),
        )
    )


# ------------------------------------ Heo et al. 2021 (AdamP / SGDP), You et al. 2017 / 2020 (LARS / LAMB)
# The optimizers' reference defaults (AdamP: δ 0.1, wd_ratio 0.1; LARS: η 0.001; LARC clipping: η 0.02) on
# the harness's settings: the small-scale reproductions of docs/results.md and CIFAR-10 WRN-28-10 runs.
_FAMILY_DIGITS = {"data": "digits", "model": "cnn", "epochs": 12, "batch_size": 128}
_FAMILY_LARGE = {
    "data": "mnist1d",
    "mnist1d_samples": 20000,
    "model": "mlp",
    "depth": 3,
    "width": 256,
    "norm": "bn",
    "epochs": 20,
    "batch_size": 2048,
    "warmup_epochs": 3,
}
_FAMILY_WRN = {
    "data": "cifar10",
    "model": "wrn",
    "depth": 28,
    "widen_factor": 10,
    "dropout": 0.3,
    "batch_size": 128,
    "epochs": 200,
    "schedule": "cosine",
}


def _family_usage(cfg: dict[str, Any]) -> str:
    """The optimizer call the recipe makes (no original command exists for it)."""
    opt = cfg["optimizer"]
    if opt == "sgdp":
        wd = cfg["weight_decay"]
        return f"SGDP(params, lr={cfg['lr']:g}, momentum=0.9, nesterov=True, weight_decay={wd:g})"
    if opt == "adamp":
        groups = "scale_invariant_param_groups(model)" if cfg.get("projection") == "graph" else "params"
        return f"AdamP({groups}, lr={cfg.get('lr', 1e-3):g}, weight_decay={cfg['weight_decay']:g})"
    if opt == "lars":
        clip = ", trust_clip=True" if cfg.get("trust_clip") else ""
        return (
            f"LARS(params, lr={cfg['lr']:g}, trust_coefficient={cfg.get('trust_coefficient', 1e-3):g}{clip})"
        )
    return f"LAMB(params, lr={cfg['lr']:g})"


for _name, _base, _extra, _label in (
    (
        "sgdp-digits-cnn",
        _FAMILY_DIGITS,
        {"optimizer": "sgdp", "lr": 0.1, "weight_decay": 5e-4},
        "SGDP (cosine test), BN CNN on digits",
    ),
    (
        "adamp-digits-cnn",
        _FAMILY_DIGITS,
        {"optimizer": "adamp", "weight_decay": 1e-2},
        "AdamP (cosine test), BN CNN on digits",
    ),
    (
        "adamp-graph-digits-cnn",
        _FAMILY_DIGITS,
        {"optimizer": "adamp", "projection": "graph", "weight_decay": 1e-2},
        "AdamP on the graph's scale-invariant weights, BN CNN on digits",
    ),
    (
        "sgdp-cifar10-wrn28-10",
        _FAMILY_WRN,
        {"optimizer": "sgdp", "lr": 0.1, "weight_decay": 5e-4},
        "SGDP, WRN-28-10 on CIFAR-10 (cosine schedule, Nesterov momentum 0.9)",
    ),
    (
        "adamp-cifar10-wrn28-10",
        _FAMILY_WRN,
        {"optimizer": "adamp", "lr": 1e-3, "weight_decay": 1e-2},
        "AdamP, WRN-28-10 on CIFAR-10 (cosine schedule)",
    ),
    (
        "larc-mnist1d-b2048",
        _FAMILY_LARGE,
        {"optimizer": "lars", "lr": 0.8, "trust_clip": True, "trust_coefficient": 0.02},
        "LARS in LARC's clipping mode at batch 2 048 (lr 0.05 × 16), MNIST-1D",
    ),
    (
        "lars-mnist1d-b2048",
        _FAMILY_LARGE,
        {"optimizer": "lars", "lr": 8.0},
        "LARS (η 0.001) at batch 2 048, MNIST-1D",
    ),
    (
        "lamb-mnist1d-b2048",
        _FAMILY_LARGE,
        {"optimizer": "lamb", "lr": 1.6e-2},
        "LAMB at batch 2 048 (lr 1e-3 × 16), MNIST-1D",
    ),
):
    _add(
        Recipe(
            _name,
            {**_base, **_extra},
            f"Scale-invariance family: {_label}",
            None,
            _family_usage(_extra),
            "The optimizers' reference defaults on the harness's settings; not a cell of the papers' tables "
            "(their ImageNet / BERT runs are out of reach here). See docs/results.md for the small-scale "
            "comparisons.",
            ("family", str(_extra["optimizer"])),
        )
    )
