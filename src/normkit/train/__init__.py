"""The training harness behind the ``normkit`` command: datasets as device tensors, models, recipes, a loop.

The library core never imports this package; it uses only normkit's public API.

>>> from normkit.train import run
>>> result = run({"data": "digits", "model": "cnn", "epochs": 3}, "runs/demo")
>>> result.metrics[-1]["test_acc"]

>>> from normkit.train import compare_methods
>>> study = compare_methods(["bn-sgd", "brn-sgd"], data="digits", model="mlp", epochs=5, seeds=3)
>>> study.rows                       # one dict per arm: median / range of the final test accuracy, Δ

``model`` and ``data`` may name your own factories, ``"package.module:factory"``
(:mod:`normkit.train.custom`).
"""

from normkit.train.checkpoint import load_checkpoint, save_checkpoint
from normkit.train.config import CHOICES, ConfigError, TrainConfig, resolve_config
from normkit.train.data import DATASETS, MissingDataError, TensorData, load_dataset
from normkit.train.engine import RunResult, Trainer, evaluate, evaluate_checkpoint, run
from normkit.train.models import MODELS, build_model
from normkit.train.recipes import RECIPES, Recipe, get_recipe
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
