"""The CrossQ suite (``normkit compare --suite crossq``): a kind of suite
(:class:`~normkit.train.study.suite.SuiteKind`) whose runs are :func:`~normkit.train.rl.crossq.run_rl` agents.

``compare`` plans, reuses, executes (``--jobs``, Ctrl-C) and reports it as it does the supervised suites; what
is particular to RL is here: the suite's ``base`` and each arm's ``overrides`` are
:class:`~normkit.train.rl.crossq.CrossQConfig` options, a run's record is its ``result.json``, and the report
compares returns with an exact sign test.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from normkit.train.rl.crossq import CrossQConfig, _make_env, run_rl
from normkit.train.runner import ConfigError, atomic_write_text, code_version, run_provenance
from normkit.train.study.suite import Arm, CompareResult, Job, Method, Suite

__all__ = ["CROSSQ_SUITE", "RL", "plan_suite", "sign_test", "write_rl_report"]


def _arm(method: str, baseline: str | None = None, label: str | None = None, **overrides: Any) -> Arm:
    return Arm(label or method, method, overrides, baseline)


def plan_suite(
    suite: Suite,
    *,
    seeds: int | None,
    out: str | Path,
    methods: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Job]:
    """One job per arm × seed, every configuration validated before anything runs."""
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
        [
            "arm",
            "seed",
            "env_steps",
            "final_return",
            "mean_return",
            "wall_time_s",
            "cpu_time_s",
            "threads",
            "code_version",
            "source_hash",
        ]
    )
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


class _RL:
    """The reinforcement-learning kind of suite."""

    kind = "rl"

    def plan(
        self,
        suite: Suite,
        *,
        methods: Sequence[str] | None,
        extra_methods: dict[str, Method] | None,
        overrides: dict[str, Any] | None,
        seeds: int | None,
        out: str | Path,
    ) -> tuple[Suite, list[Job]]:
        chosen = [*(methods or []), *(extra_methods or {})]
        return suite, plan_suite(suite, seeds=seeds, out=out, methods=chosen, overrides=overrides)

    def check(self, suite: Suite) -> None:
        _make_env(suite.base.get("env", CrossQConfig.env)).close()  # a missing gymnasium fails here, once

    def finished(self, job: Job) -> dict[str, Any] | None:
        return _finished(job)

    def conflicts(self, jobs: Sequence[Job]) -> list[tuple[Job, str]]:
        return []  # a result of other settings is never reused: its config differs, the run is redone

    def job_function(self, overwrite: bool) -> Callable[[Job, int], dict[str, Any]]:
        return _run_job

    def describe(self, record: dict[str, Any]) -> str:
        return f"{record['arm']} seed {record['seed']}: final return {record['summary']['final_return']:.1f}"

    def report(self, result: CompareResult, *, html: bool, machine: dict[str, Any]) -> Path:
        return write_rl_report(result, machine)


RL = _RL()


CROSSQ_SUITE = Suite(
    "crossq",
    "SAC with target critics vs CrossQ (no target network, one critic pass over (s, a) and (s', a')) "
    "with BRN, BN or no normalization in the critics, on gymnasium's Pendulum-v1 (needs normkit[rl]).",
    {
        "env": "Pendulum-v1",
        "total_steps": 5000,
        "learning_starts": 500,
        "eval_every": 500,
        "eval_episodes": 5,
        "batch_size": 128,
        "actor_width": 128,
        "critic_width": 128,
        "lr": 1e-3,
        "brn_warmup_steps": 500,
    },
    (
        _arm("sac", label="sac", algorithm="sac", critic_norm="none", adam_beta1=0.9, policy_delay=1),
        _arm("crossq", "sac", label="crossq-brn", critic_norm="brn"),
        _arm("crossq", "sac", label="crossq-bn", critic_norm="bn"),
        _arm("crossq", "sac", label="crossq-none", critic_norm="none"),
    ),
    seeds=5,
    claim="Bhatt et al. 2024: CrossQ (BatchNorm critics, no target network, UTD 1) matches or beats the "
    "sample efficiency of SAC and of REDQ / DroQ (UTD 20).",
    kind="rl",
    runner=RL,
)
