"""Every recipe resolves to a valid config and trains one step on random data of its dataset's shape."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import torch

from normkit.train import DATASETS, RECIPES, TensorData, resolve_config, run
from normkit.train.runner.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_data(cfg: TrainConfig, n: int = 4) -> TensorData:
    info = DATASETS[cfg.data]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *info.input_shape, generator=g)
    y = torch.arange(n) % info.num_classes
    return TensorData(cfg.data, x, y, x.clone(), y.clone(), info.num_classes, augment=info.augment)


# The big networks of the Riemannian-BN tables cost seconds per CPU step. The default dry run keeps every
# setting but the width (WRN widen factor 1, VGG base width 16); the full-size dry run is slow-marked and
# runs with NORMKIT_SLOW=1.
_BIG = re.compile(r"wrn(28-10|40-10|22-8)|vgg")
_FULL = pytest.mark.skipif(
    not os.environ.get("NORMKIT_SLOW"), reason="full-size dry runs: set NORMKIT_SLOW=1"
)


def test_every_recipe_resolves_and_states_what_it_reproduces() -> None:
    assert len(RECIPES) >= 40
    for name, recipe in RECIPES.items():
        cfg = resolve_config(recipe=name)
        assert cfg.recipe == name and cfg.to_dict() == resolve_config(cfg.to_dict()).to_dict()
        assert recipe.reproduces and recipe.seed_command
    # spot checks against the seeds' commands and DESIGN.md's paper settings
    c = resolve_config(recipe="rbn-wrn28-10-cifar10-sgdg")
    assert (c.model, c.depth, c.widen_factor, c.optimizer) == ("wrn", 28, 10, "sgdg")
    assert (c.lr, c.lr_g, c.grad_clip, c.omega, c.dropout) == (0.01, 0.2, 0.1, 0.1, 0.3)
    assert (c.epochs, c.milestones, c.gamma, c.batch_size, c.nesterov) == (
        200,
        [60, 120, 160],
        0.2,
        128,
        True,
    )
    assert RECIPES["rbn-wrn28-10-cifar10-sgdg"].paper_number.startswith("3.85")  # type: ignore[union-attr]
    s = resolve_config(recipe="rbn-wrn22-8-svhn-adamg")
    assert (s.lr, s.lr_g, s.epochs, s.milestones, s.gamma, s.svhn_extra) == (
        0.001,
        0.005,
        160,
        [60, 120],
        0.1,
        True,
    )
    assert resolve_config(recipe="rbn-vgg19-cifar100-sgd").decay_norm_and_bias
    e = resolve_config(recipe="enorm-fc-cifar10")
    assert (e.enorm, e.depth, e.width, e.batch_size, e.epochs, e.lr, e.weight_decay, e.momentum) == (
        1.2,
        15,
        500,
        256,
        60,
        0.1,
        1e-3,
        0.0,
    )
    assert resolve_config(recipe="enorm-conv-cifar10").enorm == 1.1
    assert resolve_config(recipe="lsuv-mnist").init == "lsuv"
    assert resolve_config(recipe="brn-wrn16-4-cifar10").norm == "brn"
    n = resolve_config(recipe="normalized-mlp30")
    assert (n.depth, n.width, n.norm, n.dropout, n.normalize) == (30, 128, "bn", 0.2, "l2")


def _dry_run(name: str, **overrides: Any) -> None:
    cfg = resolve_config(recipe=name, batch_size=2, max_steps=1, eval_batch_size=4, device="cpu", **overrides)
    res = run(cfg, data=_random_data(cfg), save=False, log=lambda s: None)
    (m,) = res.metrics
    assert m["step"] == 1 and m["train_loss"] == m["train_loss"]


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_dry_run(name: str) -> None:
    narrow = {"width": 16} if "vgg" in name else {"widen_factor": 1}
    _dry_run(name, **(narrow if _BIG.search(name) else {}))


@pytest.mark.slow
@_FULL
@pytest.mark.parametrize("name", [n for n in RECIPES if _BIG.search(n)])
def test_recipe_dry_run_full_size(name: str) -> None:
    _dry_run(name)
