"""The run configuration: one flat dataclass, JSON round-trip, checks that refuse bad combinations early."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from normkit.train.runner.data import DATASETS
from normkit.train.runner.factories import ImportPathError, check_factory, is_import_path
from normkit.train.runner.models import MODELS
from normkit.train.runner.recipes import get_recipe

__all__ = [
    "CHOICES",
    "ConfigError",
    "TrainConfig",
    "config_diff",
    "config_hash",
    "resolve_config",
    "resumed_config",
    "scaled_brn_steps",
]


class ConfigError(ValueError):
    """An invalid option or combination of options (raised before any training starts)."""


NORMS = ("l1", "l2", "l1_l2", "avg_l1", "avg_l2", "avg_l1_l2", "max", "linf", "min_max", "std")

CHOICES: dict[str, tuple[str, ...]] = {
    "data": tuple(DATASETS),
    "model": tuple(MODELS),
    "norm": ("bn", "brn", "none"),
    "init": ("default", "orthogonal", "lsuv"),
    "optimizer": ("sgd", "adam", "adamw", "sgdg", "adamg", "sgdp", "adamp", "lars", "lamb"),
    "schedule": ("constant", "multistep", "cosine", "linear"),
    "granularity": ("tensor", "layer", "unit", "global"),
    "grassmann_select": ("bn_input", "undercomplete"),
    "amp": ("none", "bf16", "fp16"),
    "normalize": NORMS,
    "clip": NORMS,
    "enorm_norm_layers": ("stop", "ignore", "affine"),
    "enorm_bias": ("scale", "keep"),
    "enorm_variant": ("normkit", "authors"),
    "brn_schedule": ("scaled", "paper"),
    "projection": ("auto", "graph"),
}

GRASSMANN = ("sgdg", "adamg")
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3, "sgdg": 0.01, "adamg": 0.01}
DEFAULT_LR.update({"sgdp": 0.05, "adamp": 1e-3, "lars": 0.05, "lamb": 1e-3})
PROJECTED = ("sgdp", "adamp")
TRUST_RATIO = ("lars", "lamb")
DEFAULT_LR_G = {"sgdg": 0.2, "adamg": 0.05}


# Options added after run directories existed: left out of a config (and its hash) at their default, so the
# runs recorded before them keep their identity.
_LATER_FIELDS: dict[str, Any] = {"fsdp": False, "enorm_variant": "normkit"}


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` means "the default for this model / optimizer"."""

    # data
    data: str = "digits"
    data_dir: str = "data"
    download: bool = False
    val_size: int = 0
    mnist1d_samples: int = 5000
    svhn_extra: bool = False
    subset: int | None = None
    batch_classes: int | None = None
    # model
    model: str = "cnn"
    depth: int | None = None
    width: int | None = None
    widen_factor: int | None = None
    dropout: float = 0.0
    norm: str | None = None
    brn_r_max: float | None = None
    brn_d_max: float | None = None
    brn_warmup_steps: int | None = None
    brn_r_max_steps: int | None = None
    brn_d_max_steps: int | None = None
    brn_momentum: float | None = None
    brn_virtual_batch_size: int | None = None
    # "scaled": the paper's step counts (warm-up 5 000, d_max at 25 000, r_max at 40 000) compressed to the
    # run's length (see ``scaled_brn_steps``); "paper": used as they are. Explicit brn_*_steps always win.
    brn_schedule: str = "scaled"
    # initialization
    init: str = "default"
    lsuv_tol: float = 0.1
    lsuv_max_iters: int = 10
    # optimization
    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float | None = None
    lr_g: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False
    grad_clip: float | None = None
    omega: float = 0.0
    grassmann_select: str = "bn_input"
    enorm: float = 0.0
    enorm_every: int = 1
    enorm_norm_layers: str = "stop"
    enorm_bias: str = "scale"
    # "authors": the arithmetic of the authors' FC code (facebookresearch/enorm ``_step_fc``): every factor
    # from the norms at the start of the cycle, the last hidden layer and biases left alone, optimizer state
    # and normalization running statistics untouched
    enorm_variant: str = "normkit"
    normalize: str | None = None
    clip: str | None = None
    clipnorm: float | None = None
    granularity: str = "tensor"
    projection: str = (
        "auto"  # sgdp/adamp: the paper's cosine test, or "graph" (known scale-invariant weights)
    )
    trust_coefficient: float = 0.001  # lars
    trust_clip: bool = False  # lars: LARC's clipping mode
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # run
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    compile: bool = False
    channels_last: bool = False
    sync_bn: bool = False
    fsdp: bool = False  # shard the model with FSDP2 under torchrun (DDP otherwise)
    eval_batch_size: int = 1000
    threads: int | None = None
    max_steps: int | None = None
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key, default in _LATER_FIELDS.items():  # absent at their default: older run identities hold
            if d[key] == default:
                del d[key]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**d)

    # resolved defaults ------------------------------------------------------------------------------------
    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def resolved_lr_g(self) -> float:
        return self.lr_g if self.lr_g is not None else DEFAULT_LR_G[self.optimizer]

    @property
    def resolved_norm(self) -> str:
        """bn, brn or none; "model" for a model of your own whose normalization layers are kept as built."""
        if is_import_path(self.model):
            return self.norm or "model"
        return self.norm or MODELS[self.model].default_norm

    def brn_options(self) -> dict[str, Any]:
        keys = {
            "r_max": self.brn_r_max,
            "d_max": self.brn_d_max,
            "warmup_steps": self.brn_warmup_steps,
            "r_max_steps": self.brn_r_max_steps,
            "d_max_steps": self.brn_d_max_steps,
            "momentum": self.brn_momentum,
            "virtual_batch_size": self.brn_virtual_batch_size,
        }
        return {k: v for k, v in keys.items() if v is not None}

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` for an invalid value or an incompatible combination."""
        for f in dataclasses.fields(self):
            v = _check_type(f.name, str(f.type), getattr(self, f.name))
            setattr(self, f.name, v)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name} must be a finite number, got {v}")
        for key, choices in CHOICES.items():
            value = getattr(self, key)
            if value is not None and value not in choices:
                if key in ("data", "model") and is_import_path(value):
                    continue  # your own, checked below
                own = ", or your own as package.module:factory" if key in ("data", "model") else ""
                raise ConfigError(f"invalid {key} {value!r} (choose from {', '.join(choices)}{own})")
        positive = (
            "epochs",
            "batch_size",
            "eval_batch_size",
            "enorm_every",
            "lsuv_max_iters",
            "mnist1d_samples",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("lr", "lr_g", "clipnorm", "grad_clip", "lsuv_tol"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ConfigError(f"{key} must be positive, got {v}")
        for key in (
            "weight_decay",
            "momentum",
            "omega",
            "enorm",
            "dropout",
            "label_smoothing",
            "warmup_epochs",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be non-negative, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        user_data, user_model = is_import_path(self.data), is_import_path(self.model)
        for kind, path in (("dataset", self.data), ("model", self.model)):
            if is_import_path(path):
                try:
                    check_factory(path, kind)
                except ImportPathError as exc:
                    raise ConfigError(str(exc)) from exc
        if user_data and self.download:
            raise ConfigError(f"--download fetches the built-in datasets; {self.data} is your own")
        if user_model and self.norm == "none":
            raise ConfigError(
                f"model {self.model!r} is built by your factory: norm 'none' cannot remove its normalization "
                "layers (leave norm unset to keep them, or use bn / brn to convert them)"
            )
        if user_data and self.batch_classes is not None and self.batch_classes < 1:
            raise ConfigError(f"batch_classes must be at least 1, got {self.batch_classes}")
        elif (
            not user_data
            and self.batch_classes is not None
            and not 1 <= self.batch_classes <= DATASETS[self.data].num_classes
        ):
            raise ConfigError(
                f"batch_classes must be between 1 and {DATASETS[self.data].num_classes} (the classes of "
                f"{self.data}), got {self.batch_classes}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"subset must be at least 1 training example, got {self.subset}")
        if self.val_size < 0:
            raise ConfigError(f"val_size must be non-negative, got {self.val_size}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.gamma > 0:
            raise ConfigError(f"gamma must be positive, got {self.gamma}")
        if self.brn_momentum is not None and not 0 < self.brn_momentum <= 1:
            raise ConfigError(
                f"brn_momentum must be in (0, 1] (weight of the new value), got {self.brn_momentum}"
            )
        if self.brn_r_max is not None and self.brn_r_max < 1:
            raise ConfigError(f"brn_r_max must be at least 1, got {self.brn_r_max}")
        if self.brn_d_max is not None and self.brn_d_max < 0:
            raise ConfigError(f"brn_d_max must be non-negative, got {self.brn_d_max}")
        for key in ("brn_warmup_steps", "brn_r_max_steps", "brn_d_max_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ConfigError(f"{key} must be non-negative, got {getattr(self, key)}")
        if self.brn_virtual_batch_size is not None and self.brn_virtual_batch_size < 1:
            raise ConfigError(f"brn_virtual_batch_size must be at least 1, got {self.brn_virtual_batch_size}")
        for key in ("depth", "width", "widen_factor"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")

        spec = None if user_model else MODELS[self.model]
        shape = () if user_data else DATASETS[self.data].input_shape
        if (
            spec is not None
            and not user_data
            and spec.input_dims is not None
            and len(shape) != spec.input_dims
        ):
            fits = [m for m, s in MODELS.items() if s.input_dims in (None, len(shape))]
            raise ConfigError(
                f"model {self.model!r} does not take {self.data} inputs of shape {shape}; "
                f"models for {self.data}: {', '.join(fits)}"
            )
        if self.model == "wrn" and self.depth is not None and (self.depth - 4) % 6:
            raise ConfigError(f"wrn depth must be 6n + 4 (10, 16, 22, 28, 40 ...), got {self.depth}")

        grassmann = self.optimizer in GRASSMANN
        if self.nesterov and self.momentum == 0 and self.optimizer in ("sgd", "sgdp", "lars", *GRASSMANN):
            raise ConfigError("nesterov needs momentum > 0 (pass --momentum or --no-nesterov)")
        if not grassmann:
            for key in ("lr_g", "grad_clip"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"{key} applies only to the Grassmann optimizers sgdg / adamg, not {self.optimizer}"
                        + (
                            " (for gradient clipping use --clip l2 --clipnorm X)"
                            if key == "grad_clip"
                            else ""
                        )
                    )
            if self.omega:
                raise ConfigError(f"omega applies only to sgdg / adamg, not {self.optimizer}")
        if grassmann and self.resolved_norm == "none":
            raise ConfigError(
                f"{self.optimizer} keeps weights that feed a normalization layer on the Grassmann manifold; "
                f"model {self.model!r} with norm 'none' has none: use --norm bn or --norm brn"
            )
        if self.enorm > 0 and self.optimizer in PROJECTED + TRUST_RATIO:
            raise ConfigError(
                f"--enorm cannot be combined with {self.optimizer}: ENorm transforms the state of SGD / "
                "Adam / AdamW only"
            )
        if self.enorm > 0 and grassmann:
            raise ConfigError(
                f"--enorm cannot be combined with {self.optimizer}: ENorm rescales weights and optimizer "
                "state of SGD / Adam / AdamW only, and Grassmann weights are kept at unit norm"
            )
        if self.channels_last and self.enorm > 0:
            raise ConfigError(
                "--channels-last cannot be combined with --enorm: ENorm rescales weights through views that "
                "need the default (contiguous) memory format; drop one of the two"
            )
        if self.resolved_norm in ("bn", "brn") and (self.subset == 1 or self.batch_size == 1):
            what = "--subset 1" if self.subset == 1 else "--batch-size 1"
            raise ConfigError(
                f"{what} gives batches of one example, and batch normalization needs at least 2 per batch "
                "(use a larger value or --norm none)"
            )
        if self.projection != "auto" and self.optimizer not in PROJECTED:
            raise ConfigError(f"--projection applies only to sgdp / adamp, not {self.optimizer}")
        if (self.trust_clip or self.trust_coefficient != 0.001) and self.optimizer != "lars":
            raise ConfigError(f"--trust-coefficient / --trust-clip apply only to lars, not {self.optimizer}")
        if not self.trust_coefficient > 0:
            raise ConfigError(f"trust_coefficient must be positive, got {self.trust_coefficient}")
        if self.normalize and self.clip:
            raise ConfigError("choose one of --normalize NORM and --clip NORM, not both")
        if self.clip and self.clipnorm is None:
            raise ConfigError("--clip NORM needs --clipnorm X (the threshold)")
        if self.clipnorm is not None and not self.clip:
            raise ConfigError("--clipnorm applies only with --clip NORM")
        if self.granularity != "tensor" and not (self.normalize or self.clip):
            raise ConfigError("--granularity applies only with --normalize or --clip")
        if self.brn_options() and self.resolved_norm != "brn":
            raise ConfigError(
                f"Batch Renormalization options {sorted(self.brn_options())} need --norm brn "
                f"(model {self.model!r} uses {self.resolved_norm!r})"
            )
        if self.brn_virtual_batch_size is not None and self.sync_bn:
            raise ConfigError("--brn-virtual-batch-size cannot be combined with --sync-bn")
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("schedule multistep needs --milestones (epochs, e.g. 60,120,160)")
        if self.milestones and self.schedule != "multistep":
            raise ConfigError(f"--milestones applies only to schedule multistep, not {self.schedule}")
        if sorted(self.milestones) != list(self.milestones):
            raise ConfigError(f"milestones must be increasing, got {self.milestones}")
        if self.init == "lsuv" and self.lsuv_tol >= 1:
            raise ConfigError(f"lsuv_tol must be below 1, got {self.lsuv_tol}")
        if self.svhn_extra and self.data != "svhn":
            raise ConfigError("--svhn-extra applies only to --data svhn")
        return self


_TYPE_NAMES = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_type(name: str, annotation: str, value: Any) -> Any:
    """Refuse a value of the wrong type (``epochs="ten"``, ``lr=True``) with one line naming it.

    JSON, TOML and method files give values of any type; a bool is not taken for a number, nor a float for a
    whole number.
    """
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    kind = next(k for k in kinds if k != "None")

    def whole(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy integers too

    if kind == "list[int]":
        ok = isinstance(value, list) and all(whole(v) for v in value)
        expected = "a list of whole numbers"
    else:
        ok = {
            "int": whole(value),
            "float": isinstance(value, numbers.Real) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }[kind]
        expected = _TYPE_NAMES[kind]
    if not ok:
        none = " or null" if "None" in kinds else ""
        raise ConfigError(f"{name} must be {expected}{none}, got {value!r} ({type(value).__name__})")
    if kind == "int":
        return int(value)  # a numpy integer becomes a Python int (JSON, hashes)
    if kind == "float" and not isinstance(value, (int, float)):
        return float(value)
    if kind == "list[int]":
        return [int(v) for v in value]
    return value


def config_hash(config: TrainConfig | dict[str, Any]) -> str:
    """A short hash of the exact configuration (canonical JSON): a run's identity."""
    d = config.to_dict() if isinstance(config, TrainConfig) else config
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """The differing settings, e.g. ``"epochs 1 -> 2, lr None -> 0.1"`` (at most ``limit`` named)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts) if parts else "no setting"


def scaled_brn_steps(total_steps: int) -> dict[str, int]:
    """The paper's BRN schedule compressed to a run of ``total_steps`` optimizer steps.

    Ioffe (2017) keeps r_max = 1, d_max = 0 for 5 000 steps, then reaches d_max = 5 at 25 000 and r_max = 3 at
    40 000. We keep those proportions and put the end of the r_max ramp at half the run: warm-up 1/16, d_max
    at 5/16, r_max at 1/2 of the steps — so a short run really trains with renormalization.
    """
    t = max(1, total_steps)
    return {
        "brn_warmup_steps": max(1, round(t / 16)),
        "brn_d_max_steps": max(2, round(5 * t / 16)),
        "brn_r_max_steps": max(2, round(t / 2)),
    }


def resumed_config(
    state: dict[str, Any], config: TrainConfig | dict[str, Any] | None
) -> tuple[TrainConfig, dict[str, Any]]:
    """(config to run, config as asked) to resume from a checkpoint's ``state``; ``config`` may change only
    ``epochs`` / ``device`` / ``data_dir`` / ``download``."""
    allowed = {"epochs", "device", "data_dir", "download"}
    extra = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    changed = {k for k, v in extra.items() if k not in allowed and state["config"].get(k) != v}
    if changed:
        raise ValueError(f"cannot change {sorted(changed)} when resuming; only {sorted(allowed)} may change")
    keep = {k: v for k, v in extra.items() if k in allowed}
    saved = dict(state["config"])
    if "brn_schedule" not in saved:  # written before the schedule was scaled by default
        saved["brn_schedule"] = "paper"
    return resolve_config({**saved, **keep}), {**state.get("request", state["config"]), **keep}


def resolve_config(config: TrainConfig | dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """A validated :class:`TrainConfig` from a config, a dict (e.g. a ``config.json``) or keyword overrides.

    A ``recipe`` key (in the dict or the overrides) starts from that recipe's settings.
    """
    base: dict[str, Any] = {}
    if isinstance(config, TrainConfig):
        base = config.to_dict()
    elif config is not None:
        base = dict(config)
    base.update(overrides)
    recipe = base.get("recipe")
    if recipe is not None:
        merged = {**get_recipe(recipe).config, **base}
        base = merged
    return TrainConfig.from_dict(base).validate()
