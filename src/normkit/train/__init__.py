"""The training harness behind the ``normkit`` command: datasets as device tensors, models, recipes, a loop.

The library core never imports this package; it uses only normkit's public API.

>>> from normkit.train import run
>>> result = run({"data": "digits", "model": "cnn", "epochs": 3}, "runs/demo")
>>> result.metrics[-1]["test_acc"]
"""

from normkit.train.checkpoint import load_checkpoint, save_checkpoint
from normkit.train.config import CHOICES, ConfigError, TrainConfig, resolve_config
from normkit.train.data import DATASETS, MissingDataError, TensorData, load_dataset
from normkit.train.engine import RunResult, Trainer, evaluate, evaluate_checkpoint, run
from normkit.train.models import MODELS, build_model
from normkit.train.recipes import RECIPES, Recipe, get_recipe

__all__ = [
    "CHOICES",
    "DATASETS",
    "MODELS",
    "RECIPES",
    "ConfigError",
    "MissingDataError",
    "Recipe",
    "RunResult",
    "TensorData",
    "TrainConfig",
    "Trainer",
    "build_model",
    "evaluate",
    "evaluate_checkpoint",
    "get_recipe",
    "load_checkpoint",
    "load_dataset",
    "resolve_config",
    "run",
    "save_checkpoint",
]
