"""SAC with target networks vs CrossQ (Bhatt et al., ICLR 2024), small enough to read in one sitting.

Soft Actor-Critic (Haarnoja et al. 2018, with the automatic entropy temperature of the second SAC paper):
twin critics, clipped double-Q targets from Polyak-averaged target critics, a tanh-squashed Gaussian policy,
α tuned so that the policy entropy tracks −dim(A).

CrossQ changes three things (the paper's "few lines on top of SAC"):

- no target network: the bootstrap value Q(s', a') comes from the live critic;
- the critic evaluates (s, a) and (s', a') in ONE training-mode forward pass on the concatenated batch, so
  the normalization statistics are those of the mixture of both (a separate pass would normalize (s', a')
  with statistics it never contributed to, which the paper shows to be unstable);
- normalization in the critic — BatchNorm in the paper, Batch Renormalization (r_max 3, d_max 5 after a BN
  warm-up, momentum 0.01 in PyTorch's convention = 0.99 in Flax's) in the maintained ports — plus Adam with
  β1 = 0.5, a policy (and temperature) update every 3 critic updates, and wider critics (2 × 2048 in the
  paper). UTD stays 1: one critic update per environment step.

As in the ports, the actor loss reads the critic in eval mode (running statistics), and the actor has no
normalization. Where we differ from the paper: both algorithms use critics of width 256 and a learning rate
of 1e-3 (the paper's SAC baseline uses 3e-4), so that the four arms differ only in what the paper changes and
the suite fits a 2-core CPU budget; the BRN warm-up is scaled to the run's length (10 % of the steps, the
ports' 100 000 of 1 000 000). Needs ``gymnasium`` (``pip install 'normkit[rl]'``).

``run_rl(CrossQConfig(...))`` trains one agent; ``normkit compare --suite crossq`` runs the four arms × seeds.
"""

from __future__ import annotations

import concurrent.futures as futures
import copy
import csv
import dataclasses
import io
import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from normkit.nn import BatchRenorm1d, BRNSchedule
from normkit.train.checkpoint import atomic_write_text
from normkit.train.config import ConfigError
from normkit.train.provenance import code_version
from normkit.train.report import run_provenance

if TYPE_CHECKING:
    from normkit.train.compare import CompareResult, Job, Suite

__all__ = [
    "Agent",
    "CrossQConfig",
    "ReplayBuffer",
    "plan_suite",
    "run_rl",
    "run_suite",
    "sign_test",
]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclass(frozen=True)
class CrossQConfig:
    """One run. ``algorithm="sac"`` keeps target critics, ``"crossq"`` drops them (see the module doc)."""

    env: str = "Pendulum-v1"
    algorithm: str = "crossq"  # "sac" | "crossq"
    critic_norm: str = "brn"  # "none" | "bn" | "brn" (crossq only)
    total_steps: int = 6000  # environment steps
    learning_starts: int = 1000  # uniform random actions before the first update
    batch_size: int = 256
    gamma: float = 0.99
    lr: float = 1e-3
    adam_beta1: float = 0.5  # CrossQ's; SAC's is 0.9
    tau: float = 0.005  # SAC's Polyak rate for the target critics
    policy_delay: int = 3  # CrossQ's; SAC updates the actor every step
    actor_width: int = 256
    critic_width: int = 256  # the paper's CrossQ critics are 2048 wide
    norm_momentum: float = 0.01  # PyTorch convention: weight of the new batch statistic
    norm_eps: float = 1e-3
    brn_warmup_steps: int = 600  # critic updates as plain BN before r_max, d_max switch on
    brn_r_max: float = 3.0
    brn_d_max: float = 5.0
    eval_every: int = 1000  # environment steps between evaluations
    eval_episodes: int = 5
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.algorithm not in ("sac", "crossq"):
            raise ConfigError(f"algorithm must be 'sac' or 'crossq', got {self.algorithm!r}")
        if self.critic_norm not in ("none", "bn", "brn"):
            raise ConfigError(f"critic_norm must be 'none', 'bn' or 'brn', got {self.critic_norm!r}")
        if self.algorithm == "sac" and self.critic_norm != "none":
            raise ConfigError(
                "critic_norm applies to algorithm='crossq' only: normalized critics with target networks are "
                "what the CrossQ paper shows failing; use algorithm='crossq' or critic_norm='none'"
            )
        positive = ("total_steps", "batch_size", "policy_delay", "actor_width", "critic_width", "eval_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.eval_episodes < 1:
            raise ConfigError(f"eval_episodes must be positive, got {self.eval_episodes}")
        if not 0 <= self.learning_starts < self.total_steps:
            raise ConfigError(
                f"learning_starts must be in [0, total_steps={self.total_steps}), got {self.learning_starts}"
            )
        if not (0.0 < self.tau <= 1.0 and 0.0 <= self.gamma <= 1.0 and self.lr > 0):
            raise ConfigError(f"need 0 < tau <= 1, 0 <= gamma <= 1, lr > 0; got {self.tau}, {self.gamma}")
        if self.brn_warmup_steps < 0 or self.brn_r_max < 1.0 or self.brn_d_max < 0.0:
            raise ConfigError("need brn_warmup_steps >= 0, brn_r_max >= 1 and brn_d_max >= 0")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> CrossQConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ConfigError(f"unknown CrossQ options {unknown}; valid: {', '.join(sorted(valid))}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- networks -----------------------------------------------------------------------------------------------


def _norm(kind: str, width: int, cfg: CrossQConfig) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(width, eps=cfg.norm_eps, momentum=cfg.norm_momentum)
    if kind == "brn":
        # CrossQ's schedule: plain BN for the warm-up, then r_max, d_max at once (no ramp)
        schedule = BRNSchedule(cfg.brn_r_max, cfg.brn_d_max, warmup_steps=cfg.brn_warmup_steps)
        return BatchRenorm1d(width, eps=cfg.norm_eps, momentum=cfg.norm_momentum, schedule=schedule)
    return nn.Identity()


class QNetwork(nn.Module):
    """Q(s, a): [norm] → (Linear → norm → ReLU) × 2 → Linear, normalizing the input too, as the ports do."""

    def __init__(self, obs_dim: int, act_dim: int, width: int, norm: str, cfg: CrossQConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [_norm(norm, obs_dim + act_dim, cfg)]
        fan_in = obs_dim + act_dim
        for _ in range(2):
            layers += [nn.Linear(fan_in, width), _norm(norm, width, cfg), nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.net(torch.cat([obs, action], dim=1)).squeeze(1)


class TwinCritic(nn.Module):
    """Two Q-networks; ``forward`` returns their values stacked, shape (2, N)."""

    def __init__(self, obs_dim: int, act_dim: int, width: int, norm: str, cfg: CrossQConfig) -> None:
        super().__init__()
        self.q1 = QNetwork(obs_dim, act_dim, width, norm, cfg)
        self.q2 = QNetwork(obs_dim, act_dim, width, norm, cfg)

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        return torch.stack([self.q1(obs, action), self.q2(obs, action)])


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy scaled to the action box."""

    action_scale: Tensor
    action_bias: Tensor

    def __init__(self, obs_dim: int, act_dim: int, width: int, low: Tensor, high: Tensor) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(obs_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.mean = nn.Linear(width, act_dim)
        self.log_std = nn.Linear(width, act_dim)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """A reparameterized sample and its log-density in the action box (tanh and scale corrected)."""
        h = self.body(obs)
        mean, log_std = self.mean(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
        std = log_std.exp()
        u = mean + std * torch.randn_like(mean)
        squashed = torch.tanh(u)
        log_prob = -0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        # log|d action / d u| = log(scale) + log(1 - tanh²u), the latter written stably
        log_det = self.action_scale.log() + 2 * (math.log(2.0) - u - F.softplus(-2 * u))
        return squashed * self.action_scale + self.action_bias, (log_prob - log_det).sum(1)

    def deterministic(self, obs: Tensor) -> Tensor:
        return torch.tanh(self.mean(self.body(obs))) * self.action_scale + self.action_bias


# --- agent --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    obs: Tensor
    action: Tensor
    reward: Tensor
    next_obs: Tensor
    terminated: Tensor  # 1.0 where the episode truly ended (no bootstrap); time-limit ends still bootstrap


class ReplayBuffer:
    """Transitions in preallocated tensors; uniform sampling with the global torch generator."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device) -> None:
        self.obs = torch.zeros(capacity, obs_dim, device=device)
        self.action = torch.zeros(capacity, act_dim, device=device)
        self.reward = torch.zeros(capacity, device=device)
        self.next_obs = torch.zeros(capacity, obs_dim, device=device)
        self.terminated = torch.zeros(capacity, device=device)
        self.capacity, self.size, self.pos = capacity, 0, 0

    def add(self, obs: Any, action: Any, reward: float, next_obs: Any, terminated: bool) -> None:
        i = self.pos
        self.obs[i] = torch.as_tensor(obs, dtype=torch.float32)
        self.action[i] = torch.as_tensor(action, dtype=torch.float32)
        self.reward[i] = float(reward)
        self.next_obs[i] = torch.as_tensor(next_obs, dtype=torch.float32)
        self.terminated[i] = float(terminated)
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.obs.device)
        return Batch(
            self.obs[idx], self.action[idx], self.reward[idx], self.next_obs[idx], self.terminated[idx]
        )


class Agent(nn.Module):
    """Actor, twin critic, entropy temperature and their optimizers; ``update`` is one gradient step."""

    critic_target: TwinCritic | None

    def __init__(self, obs_dim: int, act_dim: int, low: Tensor, high: Tensor, cfg: CrossQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.actor = Actor(obs_dim, act_dim, cfg.actor_width, low, high)
        self.critic = TwinCritic(obs_dim, act_dim, cfg.critic_width, cfg.critic_norm, cfg)
        self.critic_target = None
        if cfg.algorithm == "sac":
            self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.target_entropy = -float(act_dim)
        betas = (cfg.adam_beta1, 0.999)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr, betas=betas)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr, betas=betas)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=cfg.lr, betas=betas)
        self.updates = 0

    def critic_loss(self, batch: Batch) -> Tensor:
        """½ Σ_i mean (Q_i(s, a) − y)², y = r + γ(1 − done)(min_i Q̄_i(s', a') − α log π(a'|s'))."""
        alpha = self.log_alpha.detach().exp()
        with torch.no_grad():
            next_action, next_log_prob = self.actor(batch.next_obs)
        self.critic.train()
        if self.critic_target is None:
            # CrossQ: one pass over [(s, a); (s', a')], so BN/BRN statistics cover both halves
            n = batch.obs.shape[0]
            q_all = self.critic(
                torch.cat([batch.obs, batch.next_obs]), torch.cat([batch.action, next_action])
            )
            q, q_next = q_all[:, :n], q_all[:, n:].detach()
        else:
            q = self.critic(batch.obs, batch.action)
            with torch.no_grad():
                q_next = self.critic_target(batch.next_obs, next_action)
        soft_value = q_next.min(0).values - alpha * next_log_prob
        target = batch.reward + self.cfg.gamma * (1.0 - batch.terminated) * soft_value
        return 0.5 * ((q - target) ** 2).mean(1).sum()

    def actor_and_alpha_losses(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Actor: mean(α log π(a|s) − min_i Q_i(s, a)) with the critic in eval mode; temperature:
        −mean(log α · (log π(a|s) + H̄)) with the target entropy H̄ = −dim(A)."""
        action, log_prob = self.actor(obs)
        self.critic.eval()
        q = self.critic(obs, action).min(0).values
        actor_loss = (self.log_alpha.detach().exp() * log_prob - q).mean()
        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        return actor_loss, alpha_loss

    def update(self, batch: Batch) -> None:
        """A critic step; every ``policy_delay`` updates an actor and temperature step; SAC's Polyak step."""
        loss = self.critic_loss(batch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimizer.step()
        self.updates += 1
        if self.updates % self.cfg.policy_delay == 0:
            actor_loss, alpha_loss = self.actor_and_alpha_losses(batch.obs)
            self.actor_optimizer.zero_grad(set_to_none=True)
            self.alpha_optimizer.zero_grad(set_to_none=True)
            (actor_loss + alpha_loss).backward()  # disjoint parameters: one backward serves both
            self.actor_optimizer.step()
            self.alpha_optimizer.step()
        if self.critic_target is not None:
            with torch.no_grad():
                for target, online in zip(self.critic_target.parameters(), self.critic.parameters()):
                    target.lerp_(online, self.cfg.tau)  # θ̄ ← (1 − τ) θ̄ + τ θ


# --- training -----------------------------------------------------------------------------------------------


def _make_env(name: str) -> Any:
    from normkit.train.data import require

    gym = require("gymnasium", "rl", "the CrossQ agent (normkit.train.crossq)")
    return gym.make(name)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate(agent: Agent, env: Any, episodes: int, seed: int) -> float:
    """Mean undiscounted return of the deterministic policy over ``episodes`` episodes (reset seeds seed,
    seed + 1, ...)."""
    device = agent.log_alpha.device
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = agent.actor.deterministic(
                    torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
                )
            obs, reward, terminated, truncated, _ = env.step(action[0].cpu().numpy())
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return statistics.fmean(returns)


@dataclass
class RLResult:
    config: dict[str, Any]
    curve: list[dict[str, float]]  # {"step", "return"} per evaluation
    final_return: float
    mean_return: float  # over all evaluations: a sample-efficiency summary (area under the curve)
    wall_time: float
    cpu_time: float  # seconds of CPU used by this process: what a loaded machine inflates least
    agent: Agent | None = None


def run_rl(cfg: CrossQConfig, log: Callable[[str], None] | None = None, keep_agent: bool = False) -> RLResult:
    """Train one agent for ``cfg.total_steps`` environment steps (UTD 1), evaluating every ``eval_every``.

    The seed fixes everything: network init, replay sampling and policy noise (torch, in a forked RNG so the
    caller's generator is untouched), the random warm-up actions (numpy) and the environment resets.
    """
    import numpy as np

    env, eval_env = _make_env(cfg.env), _make_env(cfg.env)
    device = _device(cfg.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        low = torch.as_tensor(env.action_space.low, dtype=torch.float32)
        high = torch.as_tensor(env.action_space.high, dtype=torch.float32)
        agent = Agent(obs_dim, act_dim, low, high, cfg).to(device)
        buffer = ReplayBuffer(cfg.total_steps, obs_dim, act_dim, device)
        eval_seed = 1_000_000 + 1000 * cfg.seed  # the same start states at every evaluation of a run
        curve: list[dict[str, float]] = []
        obs, _ = env.reset(seed=cfg.seed)
        env.action_space.seed(cfg.seed)
        for step in range(1, cfg.total_steps + 1):
            if step <= cfg.learning_starts:
                action = rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
            else:
                with torch.no_grad():
                    sample, _ = agent.actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
                action = sample[0].cpu().numpy()
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs, action, reward, next_obs, terminated)
            obs = env.reset()[0] if terminated or truncated else next_obs
            if step >= cfg.learning_starts and step >= cfg.batch_size:
                agent.update(buffer.sample(cfg.batch_size))
            if step % cfg.eval_every == 0 or step == cfg.total_steps:
                ret = evaluate(agent, eval_env, cfg.eval_episodes, eval_seed)
                curve.append({"step": step, "return": ret})
                if log is not None:
                    log(f"step {step}: return {ret:.1f} ({time.perf_counter() - start:.0f}s)")
    env.close()
    eval_env.close()
    return RLResult(
        cfg.to_dict(),
        curve,
        curve[-1]["return"],
        statistics.fmean(c["return"] for c in curve),
        time.perf_counter() - start,
        time.process_time() - cpu_start,
        agent if keep_agent else None,
    )


# --- the `normkit compare --suite crossq` runner ----------------------------------------------------------
# compare.py hands a suite of kind "rl" to these two functions: the suite's ``base`` and each arm's
# ``overrides`` are CrossQConfig options; the files written are those of every compare suite.


def plan_suite(
    suite: Suite,
    *,
    seeds: int | None,
    out: str | Path,
    methods: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Job]:
    """One job per arm × seed, every configuration validated before anything runs."""
    from normkit.train.compare import Job

    if methods or overrides:
        raise ConfigError(
            f"suite {suite.name} is a reinforcement-learning suite: its arms are fixed and --methods, "
            "--method-file, --data, --model, --epochs and --data-dir do not apply (use --seeds, --jobs, "
            "--out)"
        )
    n_seeds = seeds if seeds is not None else suite.seeds
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n_seeds}")
    jobs = []
    for arm in suite.arms:
        for seed in range(n_seeds):
            try:
                cfg = CrossQConfig.from_dict({**suite.base, **arm.overrides, "seed": seed})
            except (ConfigError, TypeError) as exc:
                raise ConfigError(f"suite {suite.name}, arm {arm.label!r}: {exc}") from exc
            jobs.append(
                Job(
                    arm.label, arm.method, seed, cfg.to_dict(), Path(out) / "runs" / arm.label / f"seed{seed}"
                )
            )
    return jobs


def _finished(job: Job) -> dict[str, Any] | None:
    path = job.out_dir / "result.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("config") == job.config else None


def _run_job(job: Job, threads: int) -> dict[str, Any]:
    job.out_dir.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with open(job.out_dir / "log.txt", "w") as log_file:

            def log(line: str) -> None:
                log_file.write(line + "\n")
                log_file.flush()

            result = run_rl(CrossQConfig.from_dict(job.config), log=log)
    finally:
        torch.set_num_threads(previous)  # a run in the calling process leaves its thread count alone
    record = {
        "arm": job.arm,
        "seed": job.seed,
        "config": job.config,
        "metrics": result.curve,
        "summary": {
            "final_return": result.final_return,
            "mean_return": result.mean_return,
            "wall_time": result.wall_time,
            "cpu_time": result.cpu_time,
            "threads": threads,
            "code": code_version(),  # which code trained it (results.csv's code_version, source_hash)
        },
    }
    atomic_write_text(job.out_dir / "result.json", json.dumps(record, indent=1))
    return record


def run_suite(
    suite: Suite, jobs: list[Job], out: str | Path, *, workers: int = 1, log: Callable[[str], None] = print
) -> CompareResult:
    """Run (or reuse) every job, ``workers`` at a time, then write results.csv, report.md and returns.png."""
    from normkit.train.compare import CompareResult

    if workers < 1:
        raise ConfigError(f"--jobs must be at least 1, got {workers}")
    _make_env(
        suite.base.get("env", CrossQConfig.env)
    ).close()  # a missing gymnasium fails here, not in a worker
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = {(j.arm, j.seed): r for j in jobs if (r := _finished(j)) is not None}
    todo = [j for j in jobs if (j.arm, j.seed) not in done]
    log(
        f"normkit compare: suite {suite.name}, {len(suite.arms)} arms x {len(jobs) // len(suite.arms)} seeds "
        f"= {len(jobs)} runs ({len(done)} already finished) -> {out}"
    )
    threads = max(1, (os.cpu_count() or 1) // workers)
    start, load_before = time.perf_counter(), _load()

    def progress(record: dict[str, Any]) -> None:
        done[(record["arm"], record["seed"])] = record
        log(
            f"[{len(done)}/{len(jobs)}] {record['arm']} seed {record['seed']}: final return "
            f"{record['summary']['final_return']:.1f} ({time.perf_counter() - start:.0f}s)"
        )

    if workers == 1:
        for job in todo:
            progress(_run_job(job, threads))
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for fut in futures.as_completed([pool.submit(_run_job, job, threads) for job in todo]):
                progress(fut.result())
    runs = [done[(j.arm, j.seed)] for j in jobs]
    result = CompareResult(suite, runs, out, len(jobs) - len(todo))
    machine = {"wall_time": time.perf_counter() - start, "load": (load_before, _load()), "workers": workers}
    result.report = write_rl_report(result, machine)
    log(f"wrote {result.report}")
    return result


# --- report -------------------------------------------------------------------------------------------------


def sign_test(differences: Sequence[float]) -> tuple[int, int, float]:
    """Exact two-sided sign test over paired differences: (wins, losses, p); ties are dropped."""
    wins = sum(d > 0 for d in differences)
    losses = sum(d < 0 for d in differences)
    n = wins + losses
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return wins, losses, min(1.0, 2 * tail)


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.0f} [{min(values):.0f} – {max(values):.0f}]"


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def write_rl_report(result: CompareResult, machine: dict[str, Any]) -> Path:
    """results.csv (one row per run), report.md (median [min–max] per arm, sign test vs the baseline arm,
    return at every evaluation) and returns.png when matplotlib is installed."""
    out, suite = result.out_dir, result.suite
    by_arm: dict[str, list[dict[str, Any]]] = {a.label: [] for a in suite.arms}
    for r in result.runs:
        by_arm[r["arm"]].append(r)

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["arm", "seed", "env_steps", "final_return", "mean_return", "wall_time_s", "cpu_time_s", "threads",
         "code_version", "source_hash"]
    )  # fmt: skip
    for r in result.runs:
        s = r["summary"]
        writer.writerow(
            [r["arm"], r["seed"], r["metrics"][-1]["step"], f"{s['final_return']:.2f}",
             f"{s['mean_return']:.2f}", f"{s['wall_time']:.1f}", f"{s['cpu_time']:.1f}", s["threads"],
             *run_provenance(s).values()]
        )  # fmt: skip
    atomic_write_text(out / "results.csv", buf.getvalue())

    n_seeds = min(len(v) for v in by_arm.values())
    lines = [f"# normkit compare: {suite.name}", "", suite.description, ""]
    if suite.claim:
        lines += [f"Claim under test: {suite.claim}", ""]
    lines += [
        f"Base configuration: {', '.join(f'{k}={v}' for k, v in suite.base.items())}; {n_seeds} seeds. "
        "Every run's full configuration is in `runs/<arm>/seed<k>/result.json`.",
        "",
        "Return = mean undiscounted return of the deterministic policy over the evaluation episodes. "
        "*Final*: at the last evaluation; *mean over evaluations*: the area under the learning curve, a "
        "sample-efficiency summary. Paired comparison with the baseline arm: exact two-sided sign test over "
        f"seeds (with {n_seeds} seeds the smallest possible p is {2 ** (1 - n_seeds):.3f}).",
        "",
        "| arm | final return (median [min – max]) | sign test vs baseline (wins–losses, p) "
        "| mean over evaluations | sign test vs baseline | wall s / run | CPU s / run |",
        "|---|---|---|---|---|---:|---:|",
    ]
    baseline = {r["seed"]: r["summary"] for r in by_arm[suite.arms[0].label]}

    def versus(arm: Any, runs: list[dict[str, Any]], key: str) -> str:
        if arm.baseline is None:
            return "baseline"
        pairs = [r["summary"][key] - baseline[r["seed"]][key] for r in runs if r["seed"] in baseline]
        wins, losses, p = sign_test(pairs)
        return f"{wins}–{losses}, p = {p:.2f}"

    for arm in suite.arms:
        runs = by_arm[arm.label]
        finals = [r["summary"]["final_return"] for r in runs]
        means = [r["summary"]["mean_return"] for r in runs]
        walls = [r["summary"]["wall_time"] for r in runs]
        cpus = [r["summary"]["cpu_time"] for r in runs]
        lines.append(
            f"| {arm.label} | {_spread(finals)} | {versus(arm, runs, 'final_return')} | {_spread(means)} "
            f"| {versus(arm, runs, 'mean_return')} | {statistics.median(walls):.0f} "
            f"| {statistics.median(cpus):.0f} |"
        )
    steps = [int(c["step"]) for c in result.runs[0]["metrics"]]
    lines += [
        "",
        "Median return [min – max] over seeds after each number of environment steps:",
        "",
        "| env steps | " + " | ".join(a.label for a in suite.arms) + " |",
        "|---:|" + "---|" * len(suite.arms),
    ]
    for i, step in enumerate(steps):
        cells = [_spread([r["metrics"][i]["return"] for r in by_arm[a.label]]) for a in suite.arms]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "Arms:", ""]
    for arm in suite.arms:
        lines.append(f"- `{arm.label}`: {', '.join(f'{k}={v}' for k, v in arm.overrides.items())}")
    threads = result.runs[0]["summary"]["threads"] if result.runs else 1
    lines += [
        "",
        f"Wall time of this call: {machine['wall_time']:.0f} s with {machine['workers']} parallel run(s) of "
        f"{threads} thread(s) on {os.cpu_count()} CPU(s), 1-minute load average {machine['load'][0]:.1f} "
        f"before and {machine['load'][1]:.1f} after; {result.reused} of {len(result.runs)} runs reused "
        "from an earlier call.",
        "",
    ]
    if _plot_returns(result, by_arm, out / "returns.png"):
        lines += ["![return against environment steps](returns.png)", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report


def _plot_returns(result: CompareResult, by_arm: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for arm, runs in by_arm.items():
        steps = [c["step"] for c in runs[0]["metrics"]]
        per_step = list(zip(*[[c["return"] for c in r["metrics"]] for r in runs]))
        (line,) = ax.plot(steps, [statistics.median(v) for v in per_step], label=arm, linewidth=1.6)
        ax.fill_between(
            steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2, color=line.get_color()
        )
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{result.suite.name}: return (median, min–max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
