"""normkit's optimizers in timm's optimizer factory.

>>> import timm.optim
>>> from normkit.integrations.timm import register
>>> register()
>>> optimizer = timm.optim.create_optimizer_v2(model, "sgdg", lr=0.01, lr_g=0.2, weight_decay=5e-4)

After :func:`register`, ``create_optimizer_v2`` (and timm's ``train.py --opt``) knows:

- ``sgdg`` / ``adamg``: SGD-G / Adam-G. Given a model, the weights that feed a per-channel normalization layer
  are found from the graph (:func:`normkit.optim.grassmann_param_groups`) and kept on the Grassmann manifold
  with learning rate ``lr_g`` (default: the paper's 0.2 for SGD-G, 0.05 for Adam-G); the other parameters get
  ``lr``, with weight decay on the weight matrices only. Extra options: ``lr_g``, ``grad_clip``, ``omega``,
  ``select`` ("bn_input" | "undercomplete"), ``example_input`` (for models torch.fx cannot trace).
- ``normalized_sgd`` / ``normalized_adam`` / ``normalized_adamw`` and ``clipped_sgd`` / ``clipped_adam`` /
  ``clipped_adamw``: the inner torch optimizer on timm's usual parameter groups, wrapped in
  :class:`~normkit.optim.NormalizedOptimizer` / :class:`~normkit.optim.ClippedOptimizer`. Extra options:
  ``normalization`` (default "l2"), ``granularity`` (the model is passed for "layer"; clipping with
  ``relative=True`` defaults to "unit"), ``norm_eps``; for clipping ``clipnorm`` or ``relative=True,
  clip_factor=...``.

The registry holds optimizer *classes*, as timm expects: :class:`~normkit.optim.SGDG`,
:class:`~normkit.optim.AdamG` and :class:`NormalizedSGD` … :class:`ClippedAdamW` here, whose signatures are
the inner ``torch.optim`` class's plus the wrapper's options (so timm passes ``eps`` / ``betas`` /
``momentum`` exactly where the class takes them). ``sgdg`` / ``adamg`` need weights that feed BatchNorm:
on a model without any they refuse with that reason, before the model is touched.

timm reads an optimizer name ``a_b`` as "optimizer ``b``" (``lookahead_b`` as Lookahead around ``b``), so a
name with an underscore would silently build plain ``b``. The optimizers are therefore registered with hyphens
(``normalized-sgd``), and :func:`register` makes ``create_optimizer`` accept the underscore spellings too; the
``lookahead_`` prefix works with every name. Needs ``pip install 'normkit[timm]'`` (timm ≥ 1.0).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from normkit.nn import BatchRenorm2d, SyncBatchRenorm
from normkit.optim import SGDG, AdamG, ClippedOptimizer, NormalizedOptimizer
from normkit.optim.grassmann import _unit_rows_

__all__ = [
    "CLASSES",
    "NAMES",
    "BatchRenormAct2d",
    "ClippedAdam",
    "ClippedAdamW",
    "ClippedSGD",
    "NormalizedAdam",
    "NormalizedAdamW",
    "NormalizedSGD",
    "SyncBatchRenormAct",
    "register",
    "register_norm_converters",
    "unregister",
]

# Paper defaults (Cho & Lee 2017, CIFAR): lr_e 0.01, lr_g 0.2 (SGD-G) / 0.05 (Adam-G).
_DEFAULT_LR = 0.01
_DEFAULT_LR_G = {"sgdg": 0.2, "adamg": 0.05}
_INNER: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
NAMES: tuple[str, ...] = (
    "sgdg",
    "adamg",
    *(f"{kind}-{inner}" for kind in ("normalized", "clipped") for inner in _INNER),
)


def _timm_optim() -> Any:
    try:
        import timm.optim._optim_factory as factory
    except ImportError as exc:
        raise ImportError("normkit.integrations.timm needs timm: pip install 'normkit[timm]'") from exc
    return factory


class _TimmWrapper:
    """What the timm-facing wrapper classes share: the inner ``torch.optim`` class and a signature that
    shows the inner optimizer's own arguments (timm and its users inspect it, e.g. for ``eps``)."""

    inner_class: type[torch.optim.Optimizer]
    _wrapper_options: tuple[inspect.Parameter, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "inner_class" not in cls.__dict__:
            return
        inner = [
            p for p in inspect.signature(cls.inner_class).parameters.values() if p.kind is not p.VAR_KEYWORD
        ]
        names = {p.name for p in inner}
        own = [p for p in cls._wrapper_options if p.name not in names]
        cls.__signature__ = inspect.Signature([*inner, *own])  # type: ignore[attr-defined]


def _kw(name: str, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)


_COMMON = (
    _kw("normalization", "l2"),
    _kw("granularity", None),
    _kw("norm_eps", 1e-7),
    _kw("model", None),
    _kw("exclude", ()),
    _kw("nonfinite", "propagate"),
)


class _NormalizedForTimm(_TimmWrapper, NormalizedOptimizer):
    """:class:`~normkit.optim.NormalizedOptimizer` around ``inner_class`` built from the same arguments."""

    _wrapper_options = _COMMON

    def __init__(
        self,
        params: Any,
        *inner_args: Any,
        normalization: str = "l2",
        granularity: Any = None,
        norm_eps: float = 1e-7,
        model: nn.Module | None = None,
        exclude: Any = (),
        nonfinite: str = "propagate",
        **inner_options: Any,
    ) -> None:
        super().__init__(
            self.inner_class(params, *inner_args, **inner_options),
            normalization,
            granularity or "tensor",
            norm_eps,
            model=model,
            exclude=exclude,
            nonfinite=nonfinite,
        )


class _ClippedForTimm(_TimmWrapper, ClippedOptimizer):
    """:class:`~normkit.optim.ClippedOptimizer` around ``inner_class`` built from the same arguments."""

    _wrapper_options = (
        *_COMMON,
        _kw("clipnorm", None),
        _kw("relative", False),
        _kw("clip_factor", 0.01),
        _kw("weight_eps", 1e-3),
    )

    def __init__(
        self,
        params: Any,
        *inner_args: Any,
        normalization: str = "l2",
        granularity: Any = None,
        norm_eps: float = 1e-7,
        model: nn.Module | None = None,
        exclude: Any = (),
        nonfinite: str = "propagate",
        clipnorm: float | None = None,
        relative: bool = False,
        clip_factor: float = 0.01,
        weight_eps: float = 1e-3,
        **inner_options: Any,
    ) -> None:
        if clipnorm is None and not relative:
            raise ValueError(
                f"{type(self).__name__} needs clipnorm=c (absolute clipping) or relative=True, "
                "clip_factor=... (adaptive gradient clipping)"
            )
        super().__init__(
            self.inner_class(params, *inner_args, **inner_options),
            normalization,
            clipnorm,
            norm_eps,
            granularity=granularity,
            relative=relative,
            clip_factor=clip_factor,
            weight_eps=weight_eps,
            model=model,
            exclude=exclude,
            nonfinite=nonfinite,
        )


class NormalizedSGD(_NormalizedForTimm):
    """``torch.optim.SGD`` on block-normalized gradients (timm name ``normalized-sgd``)."""

    inner_class = torch.optim.SGD


class NormalizedAdam(_NormalizedForTimm):
    """``torch.optim.Adam`` on block-normalized gradients (timm name ``normalized-adam``)."""

    inner_class = torch.optim.Adam


class NormalizedAdamW(_NormalizedForTimm):
    """``torch.optim.AdamW`` on block-normalized gradients (timm name ``normalized-adamw``)."""

    inner_class = torch.optim.AdamW


class ClippedSGD(_ClippedForTimm):
    """``torch.optim.SGD`` on clipped gradients (timm name ``clipped-sgd``)."""

    inner_class = torch.optim.SGD


class ClippedAdam(_ClippedForTimm):
    """``torch.optim.Adam`` on clipped gradients (timm name ``clipped-adam``)."""

    inner_class = torch.optim.Adam


class ClippedAdamW(_ClippedForTimm):
    """``torch.optim.AdamW`` on clipped gradients (timm name ``clipped-adamw``)."""

    inner_class = torch.optim.AdamW


CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "sgdg": SGDG,
    "adamg": AdamG,
    "normalized-sgd": NormalizedSGD,
    "normalized-adam": NormalizedAdam,
    "normalized-adamw": NormalizedAdamW,
    "clipped-sgd": ClippedSGD,
    "clipped-adam": ClippedAdam,
    "clipped-adamw": ClippedAdamW,
}


def _infos() -> list[Any]:
    OptimInfo = _timm_optim().OptimInfo
    infos = [
        OptimInfo(
            "sgdg",
            SGDG,
            "SGD-G on the Grassmann manifold for BN-input weights (normkit), SGD for the rest",
            has_eps=False,
            has_momentum=True,
            defaults={"nesterov": True},
        ),
        OptimInfo(
            "adamg",
            AdamG,
            "Adam-G: Adam on the Grassmann manifold for BN-input weights (normkit), SGD for the rest",
            has_momentum=True,
            has_betas=True,
            defaults={"nesterov": True},
        ),
    ]
    for kind in ("normalized", "clipped"):
        for inner in _INNER:
            cls = CLASSES[f"{kind}-{inner}"]
            infos.append(
                OptimInfo(
                    f"{kind}-{inner}",
                    cls,
                    f"{inner} on {kind} gradients per block (normkit)",
                    has_eps="eps" in inspect.signature(cls).parameters,
                    has_momentum="momentum" in inspect.signature(cls).parameters,
                    has_betas="betas" in inspect.signature(cls).parameters,
                )
            )
    return infos


def _no_grassmann_group(name: str, model: nn.Module | None, select: str) -> ValueError:
    """The refusal when SGD-G / Adam-G would have nothing to put on the manifold."""
    if model is None:
        return ValueError(
            f"{name}: no parameter group is marked grassmann=True. Pass the model itself to "
            "create_optimizer_v2 (the weights that feed normalization layers are then found from its graph), "
            "or groups from normkit.optim.grassmann_param_groups(model, ...)"
        )
    what = (
        "no conv/linear weight of this model feeds a per-channel normalization layer (BatchNorm, "
        "BatchRenorm, InstanceNorm) directly"
        if select == "bn_input"
        else "no conv weight of this model is undercomplete (out < in·k·k)"
    )
    return ValueError(
        f"{name}: {what}, so SGD-G/Adam-G has no scale-invariant weight to keep on the Grassmann manifold "
        "(the method needs weights whose scale the network ignores). Use 'sgd' / 'adamw' for this model, "
        "'sgdp' / 'adamp' if some weights feed other normalizations (LayerNorm, GroupNorm), or add "
        "BatchNorm after the layers; for a model torch.fx cannot trace pass example_input=..."
    )


def _canonical(opt: str) -> tuple[str, str]:
    """(``lookahead_`` prefix or "", normkit name) of a name as typed, or ("", "") when not ours."""
    name = opt.lower()
    prefix = "lookahead_" if name.startswith("lookahead_") else ""
    base = name[len(prefix) :].replace("_", "-")
    return (prefix, base) if base in NAMES else ("", "")


def _create_optimizer(
    original: Callable[..., Any], model_or_params: Any, opt: str, *args: Any, **kwargs: Any
) -> Any:
    prefix, name = _canonical(opt)
    if not name:
        return original(model_or_params, opt, *args, **kwargs)
    if args:  # timm passes everything by keyword; keep positional calls of the registry method working
        names = ("lr", "weight_decay", "momentum", "foreach", "weight_decay_exclude_1d")
        kwargs.update(zip(names, args))
    model = model_or_params if isinstance(model_or_params, nn.Module) else None
    if name in _DEFAULT_LR_G:
        lr: float = kwargs["lr"] if kwargs.get("lr") is not None else _DEFAULT_LR
        kwargs["lr"] = lr
        lr_g = kwargs.pop("lr_g", _DEFAULT_LR_G[name])
        select = kwargs.pop("select", "bn_input")
        example_input = kwargs.pop("example_input", None)
        group_fn = kwargs.get("param_group_fn")
        if model is not None and group_fn is None:
            from normkit.optim import grassmann_param_groups

            weight_decay = kwargs.get("weight_decay", 0.0)
            # the groups are built (and checked) here, before timm builds anything
            groups = grassmann_param_groups(
                model,
                lr=lr,
                lr_g=lr_g,
                weight_decay=weight_decay,
                select=select,
                unit_init=False,
                example_input=example_input,
            )
            if not any(g.get("grassmann") for g in groups):
                raise _no_grassmann_group(name, model, select)
            _unit_rows(groups)  # the paper's initialization, once the choice is known to be usable
            kwargs["param_group_fn"] = lambda _model: groups
            kwargs["weight_decay"] = weight_decay  # the groups carry their own; this is the default
        else:
            params = group_fn(model) if group_fn is not None else model_or_params
            params = list(params)
            if not any(isinstance(g, dict) and g.get("grassmann") for g in params):
                raise _no_grassmann_group(name, None, select)
            if group_fn is None:
                model_or_params = params
            else:
                kwargs["param_group_fn"] = lambda _model: params
    elif model is not None:
        kwargs.setdefault("model", model)
    return original(model_or_params, prefix + name, **kwargs)


def _unit_rows(groups: list[dict[str, Any]]) -> None:
    for group in groups:
        if group.get("grassmann"):
            for w in group["params"]:
                _unit_rows_(w)


_ORIGINAL_ATTR = "_normkit_original_create_optimizer"


def register() -> None:
    """Add normkit's optimizers to timm's default optimizer registry (idempotent).

    Afterwards ``timm.optim.create_optimizer_v2(model, "sgdg" | "adamg" | "normalized_sgd" | ..., lr=...)``
    builds them, ``timm.optim.list_optimizers("*normalized*")`` lists them.
    """
    factory = _timm_optim()
    registry = factory.default_registry
    for info in _infos():
        if info.name not in registry._optimizers:  # quiet on a second call (timm warns on overwrites)
            registry.register(info)
    if not hasattr(registry, _ORIGINAL_ATTR):
        original = registry.create_optimizer
        setattr(registry, _ORIGINAL_ATTR, original)
        registry.create_optimizer = functools.partial(_create_optimizer, original)


def unregister() -> None:
    """Undo :func:`register`: timm's registry as it was."""
    registry = _timm_optim().default_registry
    for name in NAMES:
        registry._optimizers.pop(name, None)
    if hasattr(registry, _ORIGINAL_ATTR):
        delattr(registry, "create_optimizer")  # the instance attribute; the class method shows again
        delattr(registry, _ORIGINAL_ATTR)


# --- timm's fused batch norm + activation layers, as Batch Renormalization ---------------------------------
# (separate from the optimizer registration above; normkit.nn.convert_batchnorm imports this module the first
# time a model holds a timm batch-norm layer and calls register_norm_converters)

__all__ += ["BatchRenormAct2d", "SyncBatchRenormAct", "register_norm_converters"]


def _timm_act(act_layer: Any, act_kwargs: dict[str, Any] | None, inplace: bool, apply_act: bool) -> nn.Module:
    """The activation timm's ``BatchNormAct2d`` would build (``act_layer`` a name, a class or None)."""
    if not apply_act or act_layer is None:
        return nn.Identity()
    try:
        from timm.layers import create_act_layer
    except ImportError as exc:
        raise ImportError("normkit.integrations.timm needs timm: pip install 'normkit[timm]'") from exc
    act = create_act_layer(act_layer, **{"inplace": inplace, **(act_kwargs or {})})
    return nn.Identity() if act is None else act


class _DropAct:
    """Drop + activation after the normalization, timm's order: ``act(drop(norm(x, mask)))``. Mixed in
    before a BRN layer, it takes ``BatchNormAct2d``'s arguments and hands the rest to the layer."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        apply_act: bool = True,
        act_layer: Any = nn.ReLU,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Any = None,
        **brn_options: Any,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, **brn_options)  # type: ignore[call-arg]
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _timm_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.act(self.drop(super().forward(input, mask)))  # type: ignore[misc]


class BatchRenormAct2d(_DropAct, BatchRenorm2d):
    """Batch Renormalization + drop + activation: timm's ``BatchNormAct2d`` with BRN in place of batch norm.

    ``BatchRenormAct2d(num_features, eps=1e-5, momentum=0.01, affine=True, apply_act=True, act_layer=nn.ReLU,
    act_kwargs=None, inplace=True, drop_layer=None, **brn_options)``: the arguments of ``BatchNormAct2d``
    (``act_layer`` by name or class, built by timm) and those of ``BatchRenorm2d`` (``schedule``, ``r_max``
    ...). ``forward(x, mask=None)`` is ``act(drop(BatchRenorm2d.forward(x, mask)))``, timm's order.
    ``convert_batchnorm(model)`` turns every ``BatchNormAct2d`` into one, with the same ``act`` and ``drop``
    modules and the same eval function.
    """


class SyncBatchRenormAct(_DropAct, SyncBatchRenorm):
    """``SyncBatchRenorm`` + drop + activation: :class:`BatchRenormAct2d` with statistics over a process group
    (timm's ``SyncBatchNormAct`` with BRN). The arguments of ``BatchRenormAct2d`` and ``process_group=``."""


def _copy_act(src: nn.Module, dst: nn.Module) -> nn.Module:
    # The same activation and drop modules (timm's SyncBatchNormAct may lack them: it then has none).
    dst.drop = getattr(src, "drop", nn.Identity())
    dst.act = getattr(src, "act", nn.Identity())
    return dst


def register_norm_converters() -> None:
    """Teach :func:`normkit.nn.convert_batchnorm` timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``
    (idempotent; ``convert_batchnorm`` calls it itself when a model holds one).

    ``to="renorm"``: ``BatchNormAct2d`` → :class:`BatchRenormAct2d`, ``SyncBatchNormAct`` →
    :class:`SyncBatchRenormAct`; ``to="batchnorm"``: back; ``to="sync"``: ``BatchRenormAct2d`` →
    :class:`SyncBatchRenormAct` and ``BatchNormAct2d`` → timm's ``SyncBatchNormAct`` (timm's own conversion).
    Activation and drop modules are kept (the same objects).
    """
    try:
        from timm.layers import convert_sync_batchnorm
        from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
    except ImportError as exc:
        raise ImportError("normkit.integrations.timm needs timm: pip install 'normkit[timm]'") from exc
    from normkit.nn.convert import _bn_to_renorm, _renorm_to_bn, _renorm_to_sync, register_converter

    def renorm(cls: type[Any]) -> Any:
        return lambda m, g, o, n: _copy_act(m, _bn_to_renorm(m, cls, n, o))

    def batchnorm(cls: type[Any]) -> Any:
        return lambda m, g, o, n: _copy_act(m, _renorm_to_bn(m, cls, getattr(m, "process_group", None)))

    register_converter(BatchNormAct2d, "renorm", renorm(BatchRenormAct2d))
    register_converter(SyncBatchNormAct, "renorm", renorm(SyncBatchRenormAct))
    register_converter(BatchRenormAct2d, "batchnorm", batchnorm(BatchNormAct2d))
    register_converter(SyncBatchRenormAct, "batchnorm", batchnorm(SyncBatchNormAct))
    register_converter(
        BatchRenormAct2d,
        "sync",
        lambda m, g, o, n: _copy_act(m, _renorm_to_sync(m, g, o, n, SyncBatchRenormAct)),
    )
    register_converter(BatchNormAct2d, "sync", lambda m, g, o, n: convert_sync_batchnorm(m, g))
