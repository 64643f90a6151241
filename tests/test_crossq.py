"""The CrossQ / SAC agent of normkit.train.crossq and the `crossq` compare suite."""

import copy
import dataclasses
import math
import re

import pytest
import torch

from normkit.nn import BatchRenorm1d, BRNSchedule
from normkit.train.rl import Agent, Batch, CrossQConfig, run_rl, sign_test
from normkit.train.runner.config import ConfigError

pytest.importorskip("gymnasium")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: OpenMP threads only cost here

TINY = {
    "total_steps": 260,
    "learning_starts": 200,
    "batch_size": 32,
    "actor_width": 16,
    "critic_width": 16,
    "eval_every": 130,
    "eval_episodes": 1,
    "brn_warmup_steps": 20,
    "device": "cpu",
}
SAC = {"algorithm": "sac", "critic_norm": "none", "adam_beta1": 0.9, "policy_delay": 1}


def make_agent(bound: float = 2.0, **options) -> Agent:
    cfg = CrossQConfig(**{**TINY, **options})
    torch.manual_seed(0)
    return Agent(3, 1, torch.tensor([-bound]), torch.tensor([bound]), cfg)


def make_batch(n: int = 8, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(n, 3, generator=g),
        4 * torch.rand(n, 1, generator=g) - 2,
        -torch.rand(n, generator=g),
        torch.randn(n, 3, generator=g) + 1.5,  # s' shifted: statistics of one half alone are visibly off
        (torch.rand(n, generator=g) < 0.25).float(),
    )


def next_actions(agent: Agent, batch: Batch, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a' ~ π(s') and log π(a'|s') as the update will draw them: the update's first random draw."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return agent.actor(batch.next_obs)


@pytest.mark.parametrize("norm", ["bn", "brn"])
def test_joint_forward_concatenates_and_statistics_cover_both_halves(norm):
    agent, batch = make_agent(critic_norm=norm), make_batch()
    a_next, _ = next_actions(agent, batch, seed=5)
    calls = []
    first_norm = agent.critic.q1.net[0]
    assert isinstance(first_norm, BatchRenorm1d if norm == "brn" else torch.nn.BatchNorm1d)
    first_norm.register_forward_pre_hook(lambda m, args: calls.append((m.training, args[0].clone())))
    torch.manual_seed(5)
    agent.update(batch)
    train_calls = [x for training, x in calls if training]
    assert len(train_calls) == 1, "one training-mode critic pass per update"
    x = train_calls[0].double()
    n = batch.obs.shape[0]
    assert x.shape == (2 * n, 4)
    assert torch.equal(x[:n], torch.cat([batch.obs, batch.action], 1).double())
    assert torch.equal(x[n:], torch.cat([batch.next_obs, a_next], 1).double())
    # running statistics after one step from (0, 1), momentum 0.01, over all 2n rows
    mean, var = x.mean(0), x.var(0, unbiased=False)
    torch.testing.assert_close(first_norm.running_mean.double(), 0.01 * mean, rtol=1e-5, atol=1e-7)
    if norm == "bn":
        expected = 0.99 + 0.01 * x.var(0, unbiased=True)
        torch.testing.assert_close(first_norm.running_var.double(), expected, rtol=1e-5, atol=1e-7)
    else:
        expected = 0.99 + 0.01 * (var + 1e-3).sqrt()
        torch.testing.assert_close(first_norm.running_std.double(), expected, rtol=1e-5, atol=1e-7)
    half = x[:n].mean(0)  # what a pass over (s, a) alone would have recorded
    assert not torch.allclose(first_norm.running_mean.double(), 0.01 * half, atol=1e-4)


def _expected_critic_loss(agent: Agent, critic: torch.nn.Module, batch: Batch, seed: int, joint: bool):
    """½ Σ_i mean (Q_i(s, a) − y)² in float64, written out from the SAC / CrossQ formulas."""
    a_next, logp_next = next_actions(agent, batch, seed)
    critic = copy.deepcopy(critic).double().train()
    obs, act, nxt = batch.obs.double(), batch.action.double(), batch.next_obs.double()
    n = obs.shape[0]
    with torch.no_grad():
        if joint:
            q_all = critic(torch.cat([obs, nxt]), torch.cat([act, a_next.double()]))
            q, q_next = q_all[:, :n], q_all[:, n:]
        else:
            q = critic(obs, act)
            q_next = copy.deepcopy(agent.critic_target).double()(nxt, a_next.double())
    alpha = agent.log_alpha.detach().double().exp()
    y = batch.reward.double() + 0.99 * (1 - batch.terminated.double()) * (
        torch.minimum(q_next[0], q_next[1]) - alpha * logp_next.double()
    )
    return 0.5 * (((q[0] - y) ** 2).mean() + ((q[1] - y) ** 2).mean())


@pytest.mark.parametrize("norm", ["none", "bn", "brn"])
def test_crossq_has_no_target_network_and_bootstraps_from_the_live_critic(norm):
    agent, batch = make_agent(critic_norm=norm), make_batch()
    assert agent.critic_target is None
    owned = {id(p) for p in agent.parameters()}
    parts = [*agent.actor.parameters(), *agent.critic.parameters(), agent.log_alpha]
    assert owned == {id(p) for p in parts}, "no parameters besides actor, critic and temperature"
    expected = _expected_critic_loss(agent, agent.critic, batch, seed=3, joint=True)
    torch.manual_seed(3)
    loss = agent.critic_loss(batch)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_sac_bootstraps_from_its_target_critic():
    agent, batch = make_agent(**SAC), make_batch()
    with torch.no_grad():  # make the online critic differ from its target
        for p in agent.critic.parameters():
            p.add_(0.3 * torch.randn_like(p))
    expected = _expected_critic_loss(agent, agent.critic, batch, seed=3, joint=False)
    torch.manual_seed(3)
    loss = agent.critic_loss(batch)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    live = copy.deepcopy(agent)
    live.critic_target = None  # the CrossQ target: the same batch bootstrapped from the live critic
    torch.manual_seed(3)
    assert not torch.allclose(live.critic_loss(batch), loss, atol=1e-3)


def test_sac_target_critic_follows_by_polyak_averaging():
    agent = make_agent(**SAC, tau=0.05)
    before = [p.detach().double().clone() for p in agent.critic_target.parameters()]
    assert not any(p.requires_grad for p in agent.critic_target.parameters())
    agent.update(make_batch(16))
    for old, new, online in zip(before, agent.critic_target.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(new.double(), 0.95 * old + 0.05 * online.double(), rtol=1e-6, atol=1e-7)
    assert not all(
        torch.equal(o.double(), n.double()) for o, n in zip(before, agent.critic_target.parameters())
    )


@pytest.mark.parametrize(
    "bound, log_std, direction",
    [(1.0, -5.0, +1), (100.0, 0.0, -1)],  # entropy far below / far above the target −dim(A) = −1
)
def test_temperature_moves_toward_the_target_entropy(bound, log_std, direction):
    agent = make_agent(bound=bound, **SAC)
    with torch.no_grad():
        agent.actor.log_std.weight.zero_()
        agent.actor.log_std.bias.fill_(log_std)
    agent.update(make_batch(16))
    # Adam's first step is lr · g / (|g| + eps): the size of the step is lr, its sign that of H̄ − H
    assert agent.log_alpha.item() == pytest.approx(direction * agent.cfg.lr, rel=1e-3)


def test_actor_and_temperature_wait_for_the_policy_delay():
    agent = make_agent(critic_norm="brn", policy_delay=3)
    actor_before = copy.deepcopy(agent.actor.state_dict())
    batch = make_batch(16)
    for _ in range(2):
        agent.update(batch)
    assert agent.log_alpha.item() == 0.0
    assert all(torch.equal(actor_before[k], v) for k, v in agent.actor.state_dict().items())
    agent.update(batch)
    assert agent.log_alpha.item() != 0.0
    assert not all(torch.equal(actor_before[k], v) for k, v in agent.actor.state_dict().items())


def test_hard_switch_schedule_is_bn_then_renorm():
    schedule = BRNSchedule(3.0, 5.0, warmup_steps=10)  # what the BRN critic uses (CrossQ's switch)
    for step, limits in [(0, (1.0, 0.0)), (9, (1.0, 0.0)), (10, (3.0, 5.0)), (10**6, (3.0, 5.0))]:
        r_max, d_max = schedule.limits(torch.tensor(step))
        assert isinstance(r_max, torch.Tensor) and (r_max.item(), d_max.item()) == limits
    brn, bn = BatchRenorm1d(4, schedule=schedule), torch.nn.BatchNorm1d(4, momentum=0.01)
    x = 3 * torch.randn(32, 4) + 2
    torch.testing.assert_close(brn(x), bn(x))  # during the warm-up BRN is BN


def test_seeded_run_is_reproducible_bit_for_bit_and_leaves_the_caller_rng_alone():
    cfg = CrossQConfig(**TINY, critic_norm="brn", seed=3)
    state = torch.get_rng_state()
    first, second = run_rl(cfg, keep_agent=True), run_rl(cfg, keep_agent=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.curve == second.curve
    a, b = first.agent.state_dict(), second.agent.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = run_rl(dataclasses.replace(cfg, seed=4))
    assert other.curve != first.curve


@pytest.mark.parametrize(
    "options", [SAC, {"critic_norm": "brn"}, {"critic_norm": "bn"}, {"critic_norm": "none"}]
)
def test_a_few_hundred_steps_run_end_to_end(options):
    cfg = CrossQConfig(**{**TINY, **options})
    result = run_rl(cfg, keep_agent=True)
    assert [c["step"] for c in result.curve] == [130, 260]
    assert all(math.isfinite(c["return"]) for c in result.curve)
    updates = cfg.total_steps - cfg.learning_starts + 1
    assert result.agent.updates == updates
    if options.get("critic_norm") == "brn":
        layer = result.agent.critic.q1.net[0]
        assert layer.num_batches_tracked.item() == updates  # one training pass per update (UTD 1)
        r_max, d_max = layer.current_limits()
        assert (r_max.item(), d_max.item()) == (3.0, 5.0)  # past the 20-update warm-up


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="critic_norm applies to algorithm='crossq'"):
        CrossQConfig(algorithm="sac", critic_norm="bn")
    with pytest.raises(ConfigError, match="unknown CrossQ options"):
        CrossQConfig.from_dict({"critic_width": 8, "widht": 3})
    with pytest.raises(ConfigError, match="learning_starts"):
        CrossQConfig(total_steps=100, learning_starts=100)


def test_sign_test_is_exact():
    assert sign_test([1, 2, 3, 4, 5]) == (5, 0, 2 / 32)
    assert sign_test([1, 2, 3, 4, -5]) == (4, 1, 2 * 6 / 32)
    assert sign_test([1, 0, -1]) == (1, 1, 1.0)  # ties dropped


def test_missing_gymnasium_names_the_extra(monkeypatch):
    import sys

    from normkit.train.rl.crossq import _make_env
    from normkit.train.runner.data import MissingDependencyError

    monkeypatch.setitem(sys.modules, "gymnasium", None)
    with pytest.raises(MissingDependencyError, match=r"normkit\[rl\]"):
        _make_env("Pendulum-v1")


def test_compare_suite_runs_writes_the_usual_files_and_reuses_runs(tmp_path, capsys, monkeypatch):
    import os

    from normkit.cli import main
    from normkit.train.study.comparison import SUITES, compare

    assert main(["compare", "--list"]) == 0
    assert "crossq" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="reinforcement-learning suite"):
        compare("crossq", tmp_path, methods=["bn-sgd"], log=lambda s: None)
    assert not any(tmp_path.iterdir())
    suite = SUITES["crossq"]
    tiny = dataclasses.replace(suite, base={**suite.base, **TINY}, arms=suite.arms[:2], seeds=2)
    lines = []
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # the in-process run keeps to one thread
    result = compare(tiny, tmp_path, log=lines.append)
    csv_rows = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("arm,seed,env_steps,final_return") and len(csv_rows) == 5
    report = (tmp_path / "report.md").read_text()
    assert "| crossq-brn |" in report and re.search(r"\| [0-2]–[0-2], p = [01]\.\d\d \|", report)
    assert result.reused == 0
    again = compare(tiny, tmp_path, log=lines.append)
    assert (
        again.reused == 4
        and (tmp_path / "report.md").read_text().split("Wall time")[0] == report.split("Wall time")[0]
    )
