"""Comparisons from Python (a notebook, a script): run a study and get its table back.

>>> from normkit.train import compare_methods
>>> study = compare_methods(["bn-sgd", "brn-sgd"], data="digits", model="mlp", epochs=5, seeds=3)
>>> study.rows[1]["test_acc_median"], study.rows[1]["delta_vs_baseline"]
>>> print(study)                      # the table as Markdown; pandas.DataFrame(study.rows) works too

It is ``normkit compare`` without the command line: the same runs, resumable, in the same ``out`` folder
(``report.md``, ``results.csv``, plots).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normkit.train.runner import ConfigError, TrainConfig
from normkit.train.study.comparison import SUITES, compare

__all__ = ["Study", "compare_methods"]


@dataclass
class Study:
    """A finished comparison.

    Attributes:
        rows: one dict per arm, in the suite's order: ``arm``, ``method``, ``baseline`` (the arm it is
            compared with, "" for a baseline), ``seeds``, ``test_acc_median`` / ``test_acc_min`` /
            ``test_acc_max`` (final test accuracy in %, over seeds), ``test_loss_median``,
            ``delta_vs_baseline`` (difference of the medians in percentage points, None for a baseline).
        runs: one dict per run: ``arm``, ``seed``, ``metrics`` (one dict per epoch), ``summary``.
        out_dir: the study's folder; ``report`` its ``report.md``.
    """

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    out_dir: Path
    report: Path | None = None

    def to_markdown(self) -> str:
        """The rows as a Markdown table."""
        lines = [
            "| arm | method | seeds | test acc % median [min–max] | Δ vs baseline (pp) |",
            "|---|---|---:|---|---|",
        ]
        for r in self.rows:
            delta = (
                "baseline"
                if r["delta_vs_baseline"] is None
                else f"{r['delta_vs_baseline']:+.2f} vs {r['baseline']}"
            )
            lines.append(
                f"| {r['arm']} | {r['method']} | {r['seeds']} | {r['test_acc_median']:.2f} "
                f"[{r['test_acc_min']:.2f}–{r['test_acc_max']:.2f}] | {delta} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _rows(suite: Any, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for arm in suite.arms:
        finals = [r["metrics"][-1] for r in runs if r["arm"] == arm.label and r["metrics"]]
        accs = [100 * m["test_acc"] for m in finals]
        losses = [m["test_loss"] for m in finals]
        nan = float("nan")
        rows.append(
            {
                "arm": arm.label,
                "method": arm.method,
                "baseline": arm.baseline or "",
                "seeds": len(accs),
                "test_acc_median": statistics.median(accs) if accs else nan,
                "test_acc_min": min(accs) if accs else nan,
                "test_acc_max": max(accs) if accs else nan,
                "test_loss_median": statistics.median(losses) if losses else nan,
            }
        )
    medians = {r["arm"]: r["test_acc_median"] for r in rows}
    for r in rows:
        r["delta_vs_baseline"] = r["test_acc_median"] - medians[r["baseline"]] if r["baseline"] else None
    return rows


def compare_methods(
    methods: Sequence[str] | None = None,
    *,
    suite: str | None = None,
    method_file: str | Path | None = None,
    seeds: int | None = None,
    jobs: int = 1,
    out: str | Path = "runs/compare",
    html: bool = False,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> Study:
    """Run ``methods`` (the first one is the baseline of the others) or a named ``suite``, over ``seeds``.

    Args:
        methods: method names (``normkit compare --list``, or your own from ``method_file``); default: the
            suite's arms.
        suite: a built-in suite (``default``, ``brn``, ``lsuv`` ...); its base setting is the starting point.
        method_file: a JSON / TOML file of your own methods (``{"name": {config keys ...}}``).
        seeds, jobs, out, html: as ``normkit compare --seeds --jobs --out --html``.
        log: where progress lines go (default: nowhere).
        **options: any ``normkit train`` setting applied to every run (config keys: ``data``, ``model``,
            ``epochs``, ``batch_size`` ...), including your own ``model="package.module:factory"`` and
            ``data="package.module:factory"``.

    Raises:
        ConfigError: an unknown option or method, or an invalid combination, before anything runs.
    """

    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - valid - {"seed"})
    if unknown or "seed" in options:
        bad = unknown or ["seed"]
        raise ConfigError(
            f"unknown option(s) {bad} (seeds are chosen by seeds=N); valid: "
            + ", ".join(sorted(valid - {"seed"}))
        )
    if suite is not None and suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    result = compare(
        SUITES[suite or "default"],
        out,
        methods=methods,
        method_file=method_file,
        overrides=options,
        seeds=seeds,
        jobs=jobs,
        html=html,
        log=log or (lambda line: None),
    )
    return Study(_rows(result.suite, result.runs), result.runs, Path(result.out_dir), result.report)
