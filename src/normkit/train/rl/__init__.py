"""Reinforcement learning in the harness: the CrossQ / SAC agent (:mod:`~normkit.train.rl.crossq`) and the
suite that plugs it into ``normkit compare`` (:mod:`~normkit.train.rl.suite`) through the study layer's suite
interface. Needs ``gymnasium`` (``pip install 'normkit[rl]'``) to run."""

from normkit.train.rl.crossq import Agent, Batch, CrossQConfig, ReplayBuffer, evaluate, run_rl
from normkit.train.rl.suite import CROSSQ_SUITE, RL, plan_suite, sign_test, write_rl_report

__all__ = [
    "CROSSQ_SUITE",
    "RL",
    "Agent",
    "Batch",
    "CrossQConfig",
    "ReplayBuffer",
    "evaluate",
    "plan_suite",
    "run_rl",
    "sign_test",
    "write_rl_report",
]
