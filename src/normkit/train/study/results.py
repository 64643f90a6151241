"""Generated result tables: ``docs/results.md``'s verdict tables rebuilt from each study's ``results.csv``.

``normkit report docs/results`` reads ``docs/results/<study>/results.csv`` for every supervised study folder
present (accuracy per run; the RL suite's returns are reported by that suite itself) and
rewrites, in ``docs/results.md``, the blocks between ``<!-- normkit:results:<study>:begin -->`` and
``<!-- normkit:results:<study>:end -->`` (and the ``verdicts`` block listing every comparison). A study
without a block yet gets one appended at the end of the file. Text outside the blocks is never touched, so the
prose around the tables stays hand-written while every number in them is computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normkit.train.runner import atomic_write_text
from normkit.train.study.report import (
    HARDWARE_NOTE,
    ArmStats,
    arm_statistics,
    delta_text,
    provenance_text,
    read_results_csv,
    results_table,
    statistics_note,
    verdict_text,
)

__all__ = [
    "StudyProvenance",
    "check_results_csv",
    "study_provenance",
    "study_statistics",
    "update_results_markdown",
    "verdicts_table",
]

# Test-set sizes of the fixed splits, for results.csv files written before the CSV recorded them
# (digits: 1 797 images split 1 437 / 360; mnist-t10k: 8 000 / 2 000; MNIST-1D: 20 % of its samples).
_FIXED_TEST_SIZES = {"digits": 360, "mnist-t10k": 2000}


def _mark(name: str, end: bool) -> str:
    return f"<!-- normkit:results:{name}:{'end' if end else 'begin'} -->"


REQUIRED_COLUMNS = ("arm", "seed", "final_test_acc")


def check_results_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a study's ``results.csv``, refused in one line unless ``normkit compare`` wrote it."""
    rows = read_results_csv(path)
    if not rows:
        raise ValueError(f"{path} has no runs")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(
            f"{path} is not a normkit results.csv: it has no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(rows[0])}); move it out of the results folder or rewrite it with "
            "`normkit compare`"
        )
    for i, r in enumerate(rows, start=2):
        try:
            int(str(r["seed"]))
            float(str(r["final_test_acc"]) or "nan")
        except ValueError:
            raise ValueError(
                f"{path}, line {i}: seed {r['seed']!r} or final_test_acc {r['final_test_acc']!r} "
                "is not a number"
            ) from None
    return rows


def study_statistics(folder: Path, rows: list[dict[str, Any]] | None = None) -> list[ArmStats]:
    """Per-arm statistics of one study folder's results.csv (baselines from the CSV or the built-in suite)."""
    from normkit.train.study.comparison import SUITES

    if rows is None:
        rows = check_results_csv(folder / "results.csv")
    suite = SUITES.get(folder.name)
    arms = suite.arms if suite is not None and "baseline" not in rows[0] else None
    if not rows[0].get("test_size") and suite is not None:
        data = suite.base.get("data")
        size = _FIXED_TEST_SIZES.get(str(data))
        if data == "mnist1d":
            size = int(suite.base.get("mnist1d_samples", 5000)) // 5
        for r in rows:
            r["test_size"] = size if size is not None else ""
    return arm_statistics(rows, arms)


@dataclass(frozen=True)
class StudyProvenance:
    """Which code recorded a study's runs, and whether the source has changed since."""

    versions: tuple[str, ...]  # the code versions of its runs, in order of first appearance
    stale: bool | None  # True: recorded with other source; None: not known (runs predate the record)
    text: str  # one sentence for the tables

    @property
    def label(self) -> str:
        """Short form for a table cell: the version(s), with the staleness mark."""
        mark = {True: " (stale)", None: " (unverified)", False: ""}[self.stale]
        return ", ".join(f"`{v}`" for v in self.versions) + mark


def study_provenance(rows: list[dict[str, Any]], current_hash: str | None = None) -> StudyProvenance:
    """Compare the source hash every run recorded with ``current_hash`` (default: this code's)."""
    from normkit.train.runner import source_hash

    current = current_hash if current_hash is not None else source_hash()
    versions = tuple(dict.fromkeys(str(r.get("code_version") or "not recorded") for r in rows))
    hashes = {str(r.get("source_hash") or "") for r in rows}
    recorded = provenance_text(rows).removeprefix("code: ")
    if "" in hashes:
        stale: bool | None = None
        note = (
            "Code: " + recorded + ". **Unverified**: some runs predate the source-hash record, so "
            "whether the code changed since cannot be checked; rerun the suite to refresh."
        )
    elif hashes != {current}:
        stale = True
        note = (
            "Code: " + recorded + ". **Stale**: normkit's source has changed since these runs (source "
            f"{', '.join(sorted(hashes))}, now {current}); rerun the suite to refresh this table."
        )
    else:
        stale = False
        note = f"Code: {recorded}; the source is unchanged since (source hash {current})."
    return StudyProvenance(versions, stale, note)


def verdicts_table(
    studies: dict[str, list[ArmStats]], provenance: dict[str, StudyProvenance] | None = None
) -> list[str]:
    """Every comparison of every study: treatment vs baseline, paired Δ with its interval, the verdict, and
    (with ``provenance``) the code that recorded it."""
    code = provenance is not None
    lines = [
        "| study | comparison | baseline acc % | treatment acc % | paired Δ (pp) [interval] | seeds "
        "| verdict |" + (" code |" if code else ""),
        "|---|---|---:|---:|---|---:|---|" + ("---|" if code else ""),
    ]
    for name, stats in studies.items():
        cell = f" {provenance[name].label} |" if provenance is not None else ""
        by_arm = {s.arm: s for s in stats}
        for s in stats:
            if s.vs_baseline is None:
                continue
            base = by_arm[s.baseline]
            verdict = verdict_text(s) + (" (diverged)" if s.diverged else "")
            delta = delta_text(s).rsplit(" vs ", 1)[0]
            lines.append(
                f"| {name} | {s.arm} vs {s.baseline} | {base.acc[0]:.2f} | {s.acc[0]:.2f} | {delta} | "
                f"{s.vs_baseline.n} | {verdict} |{cell}"
            )
    return lines


def _has_accuracy(csv_path: Path) -> bool:
    """A supervised study's results.csv (test accuracy per run). Studies measured otherwise (the RL suite's
    returns) carry their own statistics in their report and are left out of these tables."""
    if not csv_path.is_file():
        return False
    with csv_path.open() as f:
        return "final_test_acc" in f.readline().strip().split(",")


def load_studies(root: Path) -> tuple[dict[str, list[ArmStats]], dict[str, StudyProvenance]]:
    """Statistics and provenance of every supervised study folder under ``root`` (all checked first)."""
    studies: dict[str, list[ArmStats]] = {}
    provenance: dict[str, StudyProvenance] = {}
    for folder in sorted(p for p in Path(root).iterdir() if _has_accuracy(p / "results.csv")):
        rows = check_results_csv(folder / "results.csv")
        provenance[folder.name] = study_provenance(rows)
        studies[folder.name] = study_statistics(folder, rows)
    if not studies:
        raise ValueError(f"no <study>/results.csv under {root}")
    return studies, provenance


def _block(name: str, lines: list[str]) -> str:
    note = "<!-- generated by `normkit report` from results.csv: do not edit between the marks -->"
    return "\n".join([_mark(name, False), note, "", *lines, "", _mark(name, True)])


def update_results_markdown(root: str | Path, markdown: str | Path, *, append: bool = True) -> list[str]:
    """Rewrite the generated blocks of ``markdown`` from ``root/*/results.csv``; returns the names written.

    ``append``: give studies without a block one at the end of the file (``False``: only rewrite the blocks
    the file already has — for a README that quotes only the verdicts).
    """
    root, markdown = Path(root), Path(markdown)
    studies, provenance = load_studies(root)
    text = markdown.read_text() if markdown.is_file() else "# Results\n"
    blocks = {
        "verdicts": _block("verdicts", [*verdicts_table(studies, provenance), "", HARDWARE_NOTE]),
        **{
            name: _block(
                name,
                [*results_table(stats, times=False), "", statistics_note(stats), "", provenance[name].text],
            )
            for name, stats in studies.items()
        },
    }
    appended, written = [], []
    for name, block in blocks.items():
        begin, end = re.escape(_mark(name, False)), re.escape(_mark(name, True))
        pattern = re.compile(begin + r".*?" + end, re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _, b=block: b, text)  # type: ignore[misc]
            written.append(name)
        elif append:
            appended.append(f"\n## {name} (generated)\n\n{block}\n")
            written.append(name)
    text = text.rstrip("\n") + "\n" + "".join(appended)
    atomic_write_text(markdown, text)
    return written
