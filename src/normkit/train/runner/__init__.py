"""The run layer: one training run from a resolved config to its run directory.

``config`` + ``recipes`` → (``rundir``) → ``process`` → ``data`` → ``build`` → ``loop`` → ``records``; read
:mod:`normkit.train.runner.api` top-down. Your own models and datasets enter through ``factories``;
``checkpoint`` writes and reads files atomically. The study layer (:mod:`normkit.train.study`) uses only the
names exported here.
"""

from normkit.train.runner.api import evaluate_checkpoint, run
from normkit.train.runner.build import (
    Built,
    ModelOutputError,
    brn_steps,
    build_optimizer,
    build_run,
    lr_factor,
)
from normkit.train.runner.checkpoint import (
    CheckpointError,
    RunFileError,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from normkit.train.runner.config import (
    CHOICES,
    ConfigError,
    TrainConfig,
    config_diff,
    config_hash,
    resolve_config,
    scaled_brn_steps,
)
from normkit.train.runner.data import (
    DATASETS,
    MissingDataError,
    MissingDependencyError,
    TensorData,
    load_dataset,
    require,
)
from normkit.train.runner.factories import ImportPathError, UserCodeError, is_import_path
from normkit.train.runner.loop import Trainer, TrainingInterrupted, evaluate
from normkit.train.runner.models import MODELS, build_model
from normkit.train.runner.provenance import run_provenance, source_hash
from normkit.train.runner.recipes import RECIPES, Recipe, get_recipe
from normkit.train.runner.rundir import (
    DirectoryLock,
    RunDirError,
    RunResult,
    check_writable,
    code_version,
    existing_run,
    finished_run,
    iter_metrics,
)

__all__ = [
    "CHOICES",
    "DATASETS",
    "MODELS",
    "RECIPES",
    "Built",
    "CheckpointError",
    "ConfigError",
    "DirectoryLock",
    "ImportPathError",
    "MissingDataError",
    "MissingDependencyError",
    "ModelOutputError",
    "Recipe",
    "RunDirError",
    "RunFileError",
    "RunResult",
    "TensorData",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "UserCodeError",
    "atomic_write_text",
    "brn_steps",
    "build_model",
    "build_optimizer",
    "build_run",
    "check_writable",
    "code_version",
    "config_diff",
    "config_hash",
    "evaluate",
    "evaluate_checkpoint",
    "existing_run",
    "finished_run",
    "get_recipe",
    "is_import_path",
    "iter_metrics",
    "load_checkpoint",
    "load_dataset",
    "lr_factor",
    "require",
    "resolve_config",
    "run",
    "run_provenance",
    "save_checkpoint",
    "scaled_brn_steps",
    "source_hash",
]
