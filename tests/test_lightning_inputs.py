"""Bad input to the Lightning callbacks (issue 22 item 16): refused with a message that names the problem and
the fix, at construction where the argument alone is wrong, else when the fit sets up — before any weight or
optimizer state changes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

L = pytest.importorskip("lightning")

from normkit.enorm import ENorm  # noqa: E402
from normkit.integrations.lightning import ENormCallback, LSUVInit  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),  # inside Lightning, not ours
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Lightning's "few workers" / "no validation" notes
]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(
        3 * torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=16)


class NoForward(L.LightningModule):
    """The common style: the network lives in ``self.net`` and ``training_step`` calls it; no ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def fit(module: L.LightningModule, callback: L.Callback, steps: int = 2) -> None:
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    ).fit(module, loader())


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed before the error"


# --- ENormCallback on a LightningModule without forward -----------------------------------------------------


def test_enorm_callback_without_forward_says_what_happened_and_how_to_select():
    module = NoForward()
    before = state(module)
    with pytest.raises(ValueError) as info:
        fit(module, ENormCallback(c=1.0))
    message = str(info.value)
    assert "NoForward" in message and "forward()" in message, message
    assert "select='net'" in message, message  # the fix, with the submodule's real name
    assert "traceable" not in message, message  # the old advice, which does not apply
    assert_unchanged(module, before)


@pytest.mark.parametrize("select", ["net", lambda m: m.net], ids=["name", "function"])
def test_enorm_callback_pointed_at_the_submodule_balances_it_like_enorm_by_hand(select):
    module = NoForward()
    reference = copy.deepcopy(module.net)
    callback = ENormCallback(c=1.0, select=select)
    fit(module, callback, steps=2)
    assert callback.enorm is not None and callback.enorm.model is module.net
    # the same training by hand: SGD momentum, one ENorm cycle after each step, same batches
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    enorm = ENorm(reference, opt, c=1.0)
    assert [g.producers for g in callback.enorm.groups] == [g.producers for g in enorm.groups] != []
    for x, y in loader():
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
        enorm.step()
    for (name, p), q in zip(module.net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=name)


def test_enorm_callback_select_name_that_does_not_exist_lists_the_submodules():
    module = NoForward()
    before = state(module)
    with pytest.raises(ValueError, match=r"no submodule 'body'.*'net'"):
        fit(module, ENormCallback(select="body"))
    assert_unchanged(module, before)


def test_enorm_callback_select_returning_a_non_module_is_refused():
    module = NoForward()
    with pytest.raises(TypeError, match=r"not an nn\.Module"):
        fit(module, ENormCallback(select=lambda m: m.net.parameters()))


# --- ENormCallback arguments --------------------------------------------------------------------------------


def test_enorm_callback_optimizer_index_out_of_range_is_a_clear_error_before_any_change():
    module = NoForward()
    before = state(module)
    callback = ENormCallback(select="net", optimizer_index=3)  # valid alone: the trainer is not known yet
    with pytest.raises(ValueError) as info:
        fit(module, callback)
    message = str(info.value)
    assert "optimizer_index=3" in message and "1 optimizer" in message and "SGD" in message, message
    assert not isinstance(info.value, IndexError)
    assert callback.enorm is None
    assert_unchanged(module, before)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"optimizer_index": -1}, ValueError, "optimizer_index must be ≥ 0"),
        ({"optimizer_index": 1.0}, TypeError, "optimizer_index must be an int"),
        ({"optimizer_index": True}, TypeError, "optimizer_index must be an int"),
        ({"c": 0.0}, ValueError, "c must be a finite positive"),
        ({"c": math.nan}, ValueError, "c must be a finite positive"),
        ({"c": math.inf}, ValueError, "c must be a finite positive"),
        ({"c": "1"}, ValueError, "c must be a finite positive"),
        ({"every": 0}, ValueError, "every must be at least 1"),
        ({"every": 2.5}, TypeError, "every must be an int"),
        ({"select": 3}, TypeError, "select must be a submodule name"),
        ({"bias": "drop"}, ValueError, "bias must be one of 'scale', 'keep'"),
        ({"norm_layers": "skip"}, ValueError, "norm_layers must be one of"),
        ({"sweep": "parallel"}, ValueError, "sweep must be one of"),
        ({"cycle": 2}, TypeError, r"unknown option\(s\) 'cycle'.*cycles"),
        ({"optimizer": None}, TypeError, r"unknown option\(s\) 'optimizer'"),
    ],
)
def test_enorm_callback_bad_arguments_are_refused_at_construction(kwargs, error, words):
    with pytest.raises(error, match=words):
        ENormCallback(**kwargs)


def test_enorm_callback_good_arguments_are_kept():
    cb = ENormCallback(1.2, 3, select="net", optimizer_index=1, cycles=2, bias="keep", norm_layers="ignore")
    assert (cb.c, cb.every, cb.select, cb.optimizer_index) == (1.2, 3, "net", 1)
    assert cb.enorm_options == {"cycles": 2, "bias": "keep", "norm_layers": "ignore"}


# --- LSUVInit arguments (construction-time checks only; its model selection is item 16's other half) --------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"tolerance": 0.1}, TypeError, r"unknown option\(s\) 'tolerance'.*\btol\b"),
        ({"data": torch.zeros(2)}, TypeError, r"unknown option\(s\) 'data'"),
        ({"batch_to_input": 0}, TypeError, "batch_to_input must be callable"),
    ],
)
def test_lsuv_callback_bad_arguments_are_refused_at_construction(kwargs, error, words):
    with pytest.raises(error, match=words):
        LSUVInit(**kwargs)


def test_lsuv_callback_known_options_are_accepted():
    assert LSUVInit(tol=0.05, max_iters=3, per_channel=True).lsuv_options == {
        "tol": 0.05,
        "max_iters": 3,
        "per_channel": True,
    }
