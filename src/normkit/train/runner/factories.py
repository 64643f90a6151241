"""Your own models and datasets in the harness, given by import path: ``package.module:factory``.

The lowest module of the run layer: it imports nothing of normkit, and the data, model and config modules
call it.

- A model factory is called as ``factory(num_classes=..., in_shape=...)`` (``in_shape``: one example's shape,
  e.g. ``(3, 32, 32)``) and returns an ``nn.Module``. The harness options ``depth``, ``width``,
  ``widen_factor`` and ``dropout`` are passed too when *you* set them (``--width 8``) and the factory takes
  them; nothing else. What was passed is recorded in the run's ``summary.json`` (``built.model_call``).
- A dataset factory is called as ``factory()`` and returns ``(train, test)`` or ``(train, test, val)``; each
  split is a ``torch.utils.data.Dataset`` of ``(input, label)`` pairs (or of dicts with an input key such as
  ``"image"`` and a ``"label"`` key, as Hugging Face datasets give) or a pair of tensors ``(inputs,
  labels)``. Splits are held whole as tensors, like the built-in datasets; labels are class indices, and the
  number of classes is ``len(train.classes)`` when the training set has ``classes`` (torchvision's
  convention), else the largest label + 1. ``uint8`` inputs are taken as pixels (scaled to [0, 1]), other
  inputs as they are (as float32).

The module is imported like ``python -m`` would: the working directory is searched first, so a file
``mymodels.py`` next to where you run ``normkit`` is found without installing it (also in the worker
processes of ``normkit compare --jobs N``, which start in the same directory).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "ImportPathError",
    "UserCodeError",
    "UserData",
    "build_user_model",
    "check_factory",
    "factory_source_hash",
    "is_import_path",
    "load_factory",
    "load_user_data",
    "parameter_shapes_hash",
    "rebuilt_shapes_hash",
    "user_model_call",
]

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
MODEL_OPTIONS = ("depth", "width", "widen_factor", "dropout")


class ImportPathError(ValueError):
    """A ``package.module:factory`` that cannot be imported or called as documented."""


class UserCodeError(RuntimeError):
    """Your factory raised: ``str()`` is one line of context, :meth:`user_traceback` your code's frames."""

    def __init__(self, message: str, cause: BaseException | None = None, frames: str = "") -> None:
        super().__init__(message)
        self.frames = frames or (_user_frames(cause) if cause is not None else "")

    def __reduce__(self) -> Any:  # crosses process boundaries (compare --jobs N) with its frames as text
        return (type(self), (str(self), None, self.frames))

    def user_traceback(self) -> str:
        """The traceback of the exception your code raised, without the frames of normkit's own code."""
        return self.frames


def _user_frames(exc: BaseException) -> str:
    package = str(Path(__file__).resolve().parents[2])  # src/normkit
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not str(Path(f.filename).resolve()).startswith(package)
    ]
    lines = ["Traceback (your code; normkit's frames left out):\n"]
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def _call_user(path: str, what: str, factory: Callable[..., Any], **kwargs: Any) -> Any:
    """Call a user's factory; what it raises becomes a :class:`UserCodeError` naming the factory."""
    try:
        return factory(**kwargs)
    except Exception as exc:
        raise UserCodeError(f"your {what} factory {path} raised {type(exc).__name__}: {exc}", exc) from exc


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


def factory_source_hash(path: str) -> str | None:
    """A hash of the source file of the module that ``package.module:factory`` names (None if it has none).

    Bound into a run's completion record, so that editing your factory's file makes an old run stale.
    """
    module = sys.modules.get(path.partition(":")[0])
    if module is None:
        load_factory(path)
        module = sys.modules.get(path.partition(":")[0])
    filename = getattr(module, "__file__", None)
    if not filename or not os.path.isfile(filename):
        return None
    with open(filename, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


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


def user_model_call(
    path: str, input_shape: tuple[int, ...], num_classes: int, options: dict[str, Any]
) -> dict[str, Any]:
    """The keyword arguments the harness passes to a model factory: ``num_classes``, ``in_shape`` and those
    of ``options`` the user set (not None, not 0) that the factory takes."""
    factory = load_factory(path, "model")
    signature = _parameters(factory)
    extra: dict[str, Any] = {}
    if signature is not None:
        names, var_keyword = signature
        extra = {k: v for k, v in options.items() if v not in (None, 0, 0.0) and (var_keyword or k in names)}
    return {"num_classes": num_classes, "in_shape": tuple(input_shape), **extra}


def parameter_shapes_hash(model: nn.Module) -> str:
    """A hash of the model's parameter names and shapes: what was built, independent of its values."""
    text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rebuilt_shapes_hash(path: str, model_call: dict[str, Any]) -> str | None:
    """The parameter-shape hash of the model your factory builds *today* from the recorded arguments.

    Built on the ``meta`` device (no memory, no initialization); None when the factory cannot build there.
    """
    call = {k: tuple(v) if k == "in_shape" else v for k, v in model_call.items()}
    try:
        with torch.device("meta"):
            return parameter_shapes_hash(load_factory(path, "model")(**call))
    except Exception:
        return None


def build_user_model(
    path: str, input_shape: tuple[int, ...], num_classes: int, options: dict[str, Any]
) -> nn.Module:
    """``factory(num_classes=..., in_shape=...)``, plus the options in ``options`` that are set and taken."""
    factory = load_factory(path, "model")
    model = _call_user(path, "model", factory, **user_model_call(path, input_shape, num_classes, options))
    if not isinstance(model, nn.Module):
        raise ImportPathError(f"model {path!r} returned a {type(model).__name__}, not an nn.Module")
    return model


_INPUT_KEYS = ("input", "inputs", "image", "img", "pixel_values", "x", "features", "data")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def _pair(item: Any, path: str, which: str) -> Any:
    """An item as ``(input, label)``: pairs pass, dicts are read by their usual keys (Hugging Face style)."""
    if not isinstance(item, Mapping):
        return item
    x_key = next((k for k in _INPUT_KEYS if k in item), None)
    y_key = next((k for k in _LABEL_KEYS if k in item), None)
    if x_key is None or y_key is None:
        raise ImportPathError(
            f"dataset {path!r}: the {which} split's items are dicts with keys {sorted(map(str, item))}; "
            f"normkit reads an input key ({', '.join(_INPUT_KEYS)}) and a label key "
            f"({', '.join(_LABEL_KEYS)}), or return (input, label) pairs"
        )
    return item[x_key], item[y_key]


def _split_tensors(split: Any, path: str, which: str) -> tuple[Tensor, Tensor]:
    if isinstance(split, (tuple, list)) and len(split) == 2 and not isinstance(split[0], (tuple, list)):
        x, y = (torch.as_tensor(v) for v in split)
    elif hasattr(split, "__getitem__") and hasattr(split, "__len__"):
        items = [_pair(split[i], path, which) for i in range(len(split))]
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
    if len(y) == 0:
        raise ImportPathError(
            f"dataset {path!r}: the {which} split is empty (0 examples); every split needs at least one"
        )
    if x.dtype != torch.uint8:
        x = x.to(torch.float32)
    return x, y.to(torch.long)


@dataclass
class UserData:
    """A user dataset's splits as tensors (``data.py`` holds them as a ``TensorData``)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    x_val: Tensor | None = None
    y_val: Tensor | None = None


def load_user_data(path: str) -> UserData:
    """Call a dataset factory and check its splits (see the module doc)."""
    out = _call_user(path, "dataset", load_factory(path, "dataset"))
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
    return UserData(x_tr, y_tr, x_te, y_te, num_classes, x_val=x_val, y_val=y_val)
