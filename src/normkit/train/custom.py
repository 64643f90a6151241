"""Your own models and datasets in the harness, given by import path: ``package.module:factory``.

- A model factory is called as ``factory(num_classes=..., in_shape=...)`` (``in_shape``: one example's shape,
  e.g. ``(3, 32, 32)``) and returns an ``nn.Module``. The harness options ``depth``, ``width``,
  ``widen_factor`` and ``dropout`` are passed too when they are set and the factory takes them.
- A dataset factory is called as ``factory()`` and returns ``(train, test)`` or ``(train, test, val)``; each
  split is a ``torch.utils.data.Dataset`` of ``(input, label)`` pairs or a pair of tensors ``(inputs,
  labels)``. Splits are held whole as tensors, like the built-in datasets; labels are class indices, and the
  number of classes is ``len(train.classes)`` when the training set has ``classes`` (torchvision's
  convention), else the largest label + 1. ``uint8`` inputs are taken as pixels (scaled to [0, 1]), other
  inputs as they are (as float32).

The module is imported like ``python -m`` would: the working directory is searched first, so a file
``mymodels.py`` next to where you run ``normkit`` is found without installing it (also in the worker
processes of ``normkit compare --jobs N``, which start in the same directory).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "ImportPathError",
    "build_user_model",
    "check_factory",
    "is_import_path",
    "load_factory",
    "load_user_data",
]

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
MODEL_OPTIONS = ("depth", "width", "widen_factor", "dropout")


class ImportPathError(ValueError):
    """A ``package.module:factory`` that cannot be imported or called as documented."""


def is_import_path(name: object) -> bool:
    """True for ``package.module:attribute`` (the form of a user model or dataset)."""
    return isinstance(name, str) and _IMPORT_PATH.match(name) is not None


def load_factory(path: str, what: str = "factory") -> Callable[..., Any]:
    """Import the object ``package.module:attribute`` names (the working directory is searched first)."""
    if not is_import_path(path):
        raise ImportPathError(f"{what} {path!r} is not an import path of the form package.module:factory")
    module_name, _, attribute = path.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does; the console script does not put it there
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ImportPathError(
                f"{what} {path!r}: no module named {exc.name!r} in the working directory {cwd} or the "
                "installed packages (run from the folder that holds it, or install it)"
            ) from exc
        raise ImportPathError(f"{what} {path!r}: importing {module_name} failed: {exc}") from exc
    except Exception as exc:
        raise ImportPathError(
            f"{what} {path!r}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ImportPathError(f"{what} {path!r}: {module_name} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ImportPathError(f"{what} {path!r} is a {type(obj).__name__}, not a callable factory")
    return obj  # type: ignore[no-any-return]


def _parameters(factory: Callable[..., Any]) -> tuple[set[str], bool] | None:
    """(keyword parameter names, takes **kwargs), or None when the signature cannot be read."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def check_factory(path: str, kind: str) -> None:
    """Import a model (``kind="model"``) or dataset factory and check it can be called as documented."""
    factory = load_factory(path, kind)
    signature = _parameters(factory)
    if signature is None:
        return
    names, var_keyword = signature
    if kind == "model":
        missing = [n for n in ("num_classes", "in_shape") if n not in names]
        if missing and not var_keyword:
            raise ImportPathError(
                f"model {path!r} must take the keyword arguments num_classes and in_shape "
                f"(missing: {', '.join(missing)})"
            )


def build_user_model(
    path: str, input_shape: tuple[int, ...], num_classes: int, options: dict[str, Any]
) -> nn.Module:
    """``factory(num_classes=..., in_shape=...)``, plus the options in ``options`` that are set and taken."""
    factory = load_factory(path, "model")
    signature = _parameters(factory)
    extra: dict[str, Any] = {}
    if signature is not None:
        names, var_keyword = signature
        extra = {k: v for k, v in options.items() if v not in (None, 0, 0.0) and (var_keyword or k in names)}
    model = factory(num_classes=num_classes, in_shape=tuple(input_shape), **extra)
    if not isinstance(model, nn.Module):
        raise ImportPathError(f"model {path!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _split_tensors(split: Any, path: str, which: str) -> tuple[Tensor, Tensor]:
    if isinstance(split, (tuple, list)) and len(split) == 2 and not isinstance(split[0], (tuple, list)):
        x, y = (torch.as_tensor(v) for v in split)
    elif hasattr(split, "__getitem__") and hasattr(split, "__len__"):
        items = [split[i] for i in range(len(split))]
        if not items:
            raise ImportPathError(f"dataset {path!r}: the {which} split is empty")
        try:
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            y = torch.as_tensor([int(item[1]) for item in items])
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise ImportPathError(
                f"dataset {path!r}: the {which} split's items must be (input, label) pairs with tensor or "
                f"array inputs of one shape and integer labels (a torchvision dataset needs "
                f"transform=ToTensor()): {exc}"
            ) from exc
    else:
        raise ImportPathError(
            f"dataset {path!r}: the {which} split must be a torch Dataset or an (inputs, labels) pair of "
            f"tensors, got {type(split).__name__}"
        )
    if len(x) != len(y) or y.dim() != 1:
        raise ImportPathError(
            f"dataset {path!r}: the {which} split has {len(x)} inputs and labels of shape {tuple(y.shape)}; "
            "expected one integer label per input"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ImportPathError(
            f"dataset {path!r}: the {which} labels must be integer class indices, got {y.dtype}"
        )
    if x.dtype != torch.uint8:
        x = x.to(torch.float32)
    return x, y.to(torch.long)


def load_user_data(path: str) -> Any:
    """Call a dataset factory and hold its splits as a :class:`~normkit.train.data.TensorData`."""
    from normkit.train.data import TensorData

    out = load_factory(path, "dataset")()
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise ImportPathError(
            f"dataset {path!r} must return (train, test) or (train, test, val), got {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
        )
    splits = [_split_tensors(s, path, w) for s, w in zip(out, ("train", "test", "val"))]
    shapes = {tuple(x.shape[1:]) for x, _ in splits}
    if len(shapes) > 1:
        raise ImportPathError(f"dataset {path!r}: the splits' inputs differ in shape: {sorted(shapes)}")
    classes = getattr(out[0], "classes", None)
    num_classes = len(classes) if classes is not None else 1 + max(int(y.max()) for _, y in splits)
    if any(int(y.min()) < 0 or int(y.max()) >= num_classes for _, y in splits):
        raise ImportPathError(f"dataset {path!r}: labels must lie in 0 .. {num_classes - 1}")
    (x_tr, y_tr), (x_te, y_te) = splits[:2]
    x_val, y_val = splits[2] if len(splits) == 3 else (None, None)
    return TensorData(path, x_tr, y_tr, x_te, y_te, num_classes, x_val=x_val, y_val=y_val)
