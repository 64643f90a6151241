"""The timm and Lightning integrations, with the real packages, on CPU."""

import copy

import pytest
import torch
import torch.nn as nn

from normkit.nn import BatchRenorm1d, BatchRenorm2d, SyncBatchRenorm
from normkit.optim import SGDG, AdamG, ClippedOptimizer, NormalizedOptimizer

timm_optim = pytest.importorskip("timm.optim")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # inside Lightning, not ours


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),  # "0" feeds BatchNorm: scale-invariant
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3),  # "3" feeds ReLU, then the classifier: Euclidean
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10),
    )


def loss_of(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


@pytest.fixture
def registered():
    from normkit.integrations.timm import register, unregister

    register()
    register()  # idempotent
    yield
    unregister()


def test_timm_sgdg_gets_graph_selected_groups(registered):
    model = bn_net()
    opt = timm_optim.create_optimizer_v2(model, "sgdg", lr=0.01, lr_g=0.2, weight_decay=5e-4, grad_clip=0.1)
    assert isinstance(opt, SGDG)
    grass = [g for g in opt.param_groups if g.get("grassmann")]
    assert len(grass) == 1 and [id(p) for p in grass[0]["params"]] == [id(model[0].weight)]
    assert grass[0]["lr"] == 0.2 and grass[0]["weight_decay"] == 0.0
    euclid = [p for g in opt.param_groups if not g.get("grassmann") for p in g["params"]]
    assert {id(p) for p in euclid} == {id(p) for n, p in model.named_parameters() if n != "0.weight"}
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[3].weight), id(model[6].weight)}  # no decay on biases, BN, manifold
    assert all(g["lr"] == 0.01 for g in opt.param_groups if not g.get("grassmann"))
    loss_of(model).backward()
    opt.step()
    rows = model[0].weight.detach().reshape(8, -1).double().norm(dim=1)
    torch.testing.assert_close(rows, torch.ones(8, dtype=torch.float64), atol=1e-5, rtol=0)


def test_timm_adamg_and_lookahead(registered):
    model = bn_net()
    opt = timm_optim.create_optimizer_v2(model, "adamg", lr=0.01)
    assert isinstance(opt, AdamG)
    assert [g["lr"] for g in opt.param_groups if g.get("grassmann")] == [0.05]  # the paper's Adam-G rate
    wrapped = timm_optim.create_optimizer_v2(bn_net(), "lookahead_sgdg", lr=0.01)
    assert type(wrapped).__name__ == "Lookahead" and isinstance(wrapped._base_optimizer, SGDG)


def test_timm_normalized_sgd_step_matches_formula(registered):
    model = bn_net()
    before = [p.detach().double().clone() for p in model.parameters()]
    opt = timm_optim.create_optimizer_v2(model, "normalized_sgd", lr=0.1, momentum=0.9)
    assert isinstance(opt, NormalizedOptimizer)
    assert isinstance(opt.inner, torch.optim.SGD)
    loss_of(model).backward()
    grads = [p.grad.detach().double().clone() for p in model.parameters()]
    opt.step()
    # first step with momentum: buffer = normalized gradient; p ← p − lr · g / (‖g‖₂ + 1e-7) per tensor
    for p, p0, g in zip(model.parameters(), before, grads):
        expected = p0 - 0.1 * g / (g.norm() + 1e-7)
        torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=0)


def test_timm_spellings_and_clipped(registered):
    assert isinstance(
        timm_optim.create_optimizer_v2(bn_net(), "normalized-adamw", lr=1e-3), NormalizedOptimizer
    )
    clipped = timm_optim.create_optimizer_v2(bn_net(), "clipped_adam", lr=1e-3, clipnorm=0.5)
    assert isinstance(clipped, ClippedOptimizer) and isinstance(clipped.inner, torch.optim.Adam)
    assert {"sgdg", "adamg", "normalized-sgd", "clipped-adamw"} <= set(timm_optim.list_optimizers())
    with pytest.raises(ValueError, match="clipnorm"):
        timm_optim.create_optimizer_v2(bn_net(), "clipped_sgd", lr=0.1)
    with pytest.raises(ValueError, match="grassmann=True"):
        timm_optim.create_optimizer_v2(list(bn_net().parameters()), "sgdg", lr=0.1)
    # timm's own names are untouched
    assert type(timm_optim.create_optimizer_v2(bn_net(), "sgd", lr=0.1)) is torch.optim.SGD


def test_timm_unregister_restores_timm():
    from normkit.integrations.timm import register, unregister

    register()
    unregister()
    assert "sgdg" not in timm_optim.list_optimizers()
    # without normkit, timm reads "normalized_sgd" as plain "sgd" — the trap register() removes
    assert type(timm_optim.create_optimizer_v2(bn_net(), "normalized_sgd", lr=0.1)) is torch.optim.SGD


# --- Lightning ---------------------------------------------------------------------------------------------

L = pytest.importorskip("lightning")


def mlp(norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32),
        BatchRenorm1d(32) if norm else nn.Identity(),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


def loader(n: int = 64, batch: int = 16) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(2)
    x = 3 * torch.randn(n, 12, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def trainer(**kwargs) -> "L.Trainer":
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**options, **kwargs})


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's "few workers" / "no validation" notes
def test_lightning_lsuv_init_gives_unit_variance():
    from normkit.integrations.lightning import LSUVInit

    model = Classifier(mlp(), lr=0.0)  # lr 0: the weights after fit are the initialized ones
    callback = LSUVInit(tol=0.05)
    trainer(max_steps=1, callbacks=[callback]).fit(model, loader())
    assert [r.name for r in callback.report.initialized] == ["net.0", "net.3", "net.5"]
    x, _ = next(iter(loader()))
    h1 = model.net[0](x)
    h3 = model.net[3](torch.relu(h1))
    for h in (h1, h3):
        assert abs(h.double().var().item() - 1.0) < 0.05


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_enorm_callback_equals_manual_loop(accumulate):
    from normkit.enorm import ENorm
    from normkit.integrations.lightning import ENormCallback

    model = Classifier(mlp())
    reference = copy.deepcopy(model.net)
    callback = ENormCallback(c=1.0)
    trainer(max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[callback]).fit(model, loader())
    assert callback.enorm._calls == 8 // accumulate  # one call per optimizer step
    assert len(callback.enorm.groups) == 2

    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    enorm = ENorm(reference, opt, c=1.0)
    for _ in range(2):
        for i, (x, y) in enumerate(loader()):
            (nn.functional.cross_entropy(reference(x), y) / accumulate).backward()
            if (i + 1) % accumulate == 0:
                opt.step()
                opt.zero_grad()
                enorm.step()
    for p, q in zip(model.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_sync_plugin_converts_batchrenorm_that_lightning_skips():
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    from normkit.integrations.lightning import SyncBatchRenormPlugin

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        BatchRenorm2d(4, warmup_steps=0),
        nn.Flatten(),
        nn.Linear(144, 8),
        nn.BatchNorm1d(8),
    )
    x = torch.randn(5, 3, 8, 8)
    net(x)  # move the statistics away from their initial values
    net.eval()
    expected = net(x)
    assert isinstance(TorchSyncBatchNorm().apply(copy.deepcopy(net))[1], BatchRenorm2d)  # Lightning's own

    plugin = SyncBatchRenormPlugin()
    weight = net[1].weight
    synced = plugin.apply(net)
    assert isinstance(synced[1], SyncBatchRenorm) and isinstance(synced[4], nn.SyncBatchNorm)
    reverted = plugin.revert(synced)
    assert type(reverted[1]) is BatchRenorm2d and type(reverted[4]) is nn.BatchNorm1d
    assert reverted[1].weight is weight and reverted[1].warmup_steps == 0
    torch.testing.assert_close(reverted(x), expected)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sync_plugin_in_a_ddp_fit():
    from normkit.integrations.lightning import SyncBatchRenormPlugin

    seen = []

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(type(pl_module.net[1]))

    model = Classifier(mlp(norm=True))
    fit = trainer(max_steps=2, strategy="ddp", plugins=[SyncBatchRenormPlugin()], callbacks=[Probe()])
    fit.fit(model, loader())
    assert seen == [SyncBatchRenorm]  # synchronized while training
    assert type(model.net[1]) is BatchRenorm1d  # the user's classes afterwards
    assert model.net[1].num_batches_tracked.item() == 2


def test_core_never_imports_the_integrations_or_their_packages():
    import subprocess
    import sys

    code = (
        "import sys, normkit, normkit.train, normkit.cli, normkit.integrations.timm\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'lightning', 'pytorch_lightning')"
        " or m == 'normkit.integrations.lightning')\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
