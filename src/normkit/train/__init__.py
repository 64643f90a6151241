"""The training harness behind the ``normkit`` command, in two layers and a plug-in:

- :mod:`normkit.train.runner` — the *run* layer: config + recipes → data, model, optimizer, techniques →
  the loop → the run directory's records and checkpoints (``run(config)``);
- :mod:`normkit.train.study` — the *study* layer: suites and methods → plan → execute runs → statistics →
  report → result tables (``compare_methods``), using the run layer's public API only;
- :mod:`normkit.train.rl` — the CrossQ agent, a kind of suite for the study layer.

The library core never imports this package; it uses only normkit's public API.

>>> from normkit.train import run
>>> result = run({"data": "digits", "model": "cnn", "epochs": 3}, "runs/demo")
>>> result.metrics[-1]["test_acc"]

>>> from normkit.train import compare_methods
>>> study = compare_methods(["bn-sgd", "brn-sgd"], data="digits", model="mlp", epochs=5, seeds=3)
>>> study.rows                       # one dict per arm: median / range of the final test accuracy, Δ

``model`` and ``data`` may name your own factories, ``"package.module:factory"``
(:mod:`normkit.train.runner.factories`).

The modules of the flat layout before the two layers (``normkit.train.engine``, ``.config``, ``.data``,
``.models``, ``.recipes``, ``.checkpoint``, ``.custom``, ``.compare``, ``.suite``, ``.report``, ``.results``,
``.stats``, ``.crossq``) still import: each name is the module that took its place.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

from normkit.train.runner import (
    CHOICES,
    DATASETS,
    MODELS,
    RECIPES,
    ConfigError,
    MissingDataError,
    Recipe,
    RunResult,
    TensorData,
    TrainConfig,
    Trainer,
    build_model,
    evaluate,
    evaluate_checkpoint,
    get_recipe,
    load_checkpoint,
    load_dataset,
    resolve_config,
    run,
    save_checkpoint,
)
from normkit.train.study import Study, compare_methods

__all__ = [
    "CHOICES",
    "DATASETS",
    "MODELS",
    "RECIPES",
    "ConfigError",
    "MissingDataError",
    "Recipe",
    "RunResult",
    "Study",
    "TensorData",
    "TrainConfig",
    "Trainer",
    "build_model",
    "compare_methods",
    "evaluate",
    "evaluate_checkpoint",
    "get_recipe",
    "load_checkpoint",
    "load_dataset",
    "resolve_config",
    "run",
    "save_checkpoint",
]

# old module name -> the module that holds its names now
MOVED = {
    "engine": "normkit.train.runner",
    "config": "normkit.train.runner.config",
    "data": "normkit.train.runner.data",
    "models": "normkit.train.runner.models",
    "recipes": "normkit.train.runner.recipes",
    "checkpoint": "normkit.train.runner.checkpoint",
    "custom": "normkit.train.runner.factories",
    "compare": "normkit.train.study.comparison",
    "suite": "normkit.train.study.suite",
    "report": "normkit.train.study.report",
    "results": "normkit.train.study.results",
    "stats": "normkit.train.study.stats",
    "crossq": "normkit.train.rl",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import normkit.train.engine`` gives the module that took its place (the same object, so that
    ``monkeypatch.setattr("normkit.train.data.load_dataset", ...)`` patches the code that runs)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        prefix, _, name = fullname.rpartition(".")
        if prefix == __name__ and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: Any) -> ModuleType:
        return importlib.import_module(MOVED[spec.name.rpartition(".")[2]])

    def exec_module(self, module: ModuleType) -> None:
        pass  # already imported under its own name


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
