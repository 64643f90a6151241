"""The README's usage snippets run as written (on a small BN conv net and random data)."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def namespace() -> dict:
    import normkit
    from normkit.enorm import ENorm
    from normkit.init import lsuv_init
    from normkit.nn import BatchRenorm2d, convert_batchnorm
    from normkit.optim import SGDG, AdamG, ClippedOptimizer, NormalizedOptimizer, grassmann_param_groups

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    batch = (torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    return {
        "torch": torch,
        "normkit": normkit,
        "model": model,
        "train_loader": [batch],
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "ENorm": ENorm,
        "lsuv_init": lsuv_init,
        "BatchRenorm2d": BatchRenorm2d,
        "convert_batchnorm": convert_batchnorm,
        "SGDG": SGDG,
        "AdamG": AdamG,
        "ClippedOptimizer": ClippedOptimizer,
        "NormalizedOptimizer": NormalizedOptimizer,
        "grassmann_param_groups": grassmann_param_groups,
    }


@pytest.mark.filterwarnings("ignore:ENorm")  # the generic snippet on this conv net balances what it can
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.splitlines()[0][:40] for s in SNIPPETS])
def test_readme_snippet_runs(snippet):
    ns = namespace()
    exec(compile(snippet, "README.md", "exec"), ns)
    # Whatever optimizer the snippet built must take a real step on the model.
    for value in list(ns.values()):
        if isinstance(value, torch.optim.Optimizer):
            x, y = ns["train_loader"][0]
            value.zero_grad()
            nn.functional.cross_entropy(ns["model"](x), y).backward()
            value.step()
    assert len(SNIPPETS) >= 5
