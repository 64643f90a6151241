"""The report of a comparison: what ran, per-arm statistics over seeds with paired verdicts, CSV, plots, HTML.

Statistics come from :mod:`normkit.train.stats` (exact sign-test intervals); this module only lays them out.
It knows nothing of how runs are scheduled (``compare`` imports it, never the other way round).
"""

from __future__ import annotations

import base64
import csv
import html as html_lib
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normkit.train.runner import TrainConfig, atomic_write_text, run_provenance
from normkit.train.study.stats import METHOD, PairedComparison, paired_comparison, summary
from normkit.train.study.suite import Arm, CompareResult

__all__ = [
    "ArmStats",
    "arm_statistics",
    "comparisons",
    "loss_axis_range",
    "read_results_csv",
    "write_csv",
    "write_report",
]

HARDWARE_NOTE = (
    "Exact figures depend on the hardware, the thread count and library versions (a rerun of the recorded "
    "brn suite's bn-noniid seed 0 on another CPU gave 92.78 % instead of 94.17 %); the verdicts, computed "
    "over seeds, are what should carry over."
)

CSV_COLUMNS = [
    "arm",
    "method",
    "baseline",
    "seed",
    "epochs",
    "final_test_acc",
    "final_test_loss",
    "final_train_loss",
    "mean_epoch_time_s",
    "diverged",
    "brn_warmup_only",
    "data",
    "model",
    "train_size",
    "test_size",
    "code_version",
    "source_hash",
]


# ------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class ArmStats:
    """One arm over its seeds (accuracies in %), with its paired comparison to its baseline (if any)."""

    arm: str
    method: str
    baseline: str
    accs: dict[int, float]  # final test accuracy % by seed
    loss_median: float
    epoch_time: float
    diverged: int  # seeds whose loss became non-finite
    warmup_only: int  # BRN seeds that never left the warm-up
    test_size: int | None
    vs_baseline: PairedComparison | None

    @property
    def seeds(self) -> int:
        return len(self.accs)

    @property
    def acc(self) -> tuple[float, float, float]:
        return summary(list(self.accs.values()))


def _is_true(v: Any) -> bool:
    return v is True or str(v).lower() in ("true", "1")


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def arm_statistics(rows: Sequence[dict[str, Any]], arms: Sequence[Arm] | None = None) -> list[ArmStats]:
    """Per-arm statistics from flat per-run rows (the columns of ``results.csv``; accuracies as fractions).

    ``arms`` gives the order and the baselines when the rows do not carry a ``baseline`` column.
    """
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_arm.setdefault(str(r["arm"]), []).append(r)
    order = [a.label for a in arms] if arms else list(by_arm)
    baselines = {a.label: a.baseline or "" for a in arms or []}
    methods = {a.label: a.method for a in arms or []}
    stats: dict[str, ArmStats] = {}
    for label in order:
        runs = by_arm.get(label, [])
        accs = {
            int(r["seed"]): 100 * _num(r["final_test_acc"]) for r in runs if r.get("final_test_acc") != ""
        }
        losses = [_num(r["final_test_loss"]) for r in runs]
        times = [_num(r.get("mean_epoch_time_s")) for r in runs]
        sizes = {int(_num(r["test_size"])) for r in runs if r.get("test_size") not in (None, "")}
        baseline = (
            str(runs[0].get("baseline") or "") if runs and "baseline" in runs[0] else baselines.get(label, "")
        )
        stats[label] = ArmStats(
            arm=label,
            method=str(runs[0].get("method", methods.get(label, label)))
            if runs
            else methods.get(label, label),
            baseline=baseline,
            accs=accs,
            loss_median=statistics.median(losses) if losses else math.nan,
            epoch_time=statistics.median([t for t in times if not math.isnan(t)] or [math.nan]),
            diverged=sum(
                _is_true(r.get("diverged")) or not math.isfinite(_num(r.get("final_train_loss")))
                for r in runs
            ),
            warmup_only=sum(_is_true(r.get("brn_warmup_only")) for r in runs),
            test_size=sizes.pop() if len(sizes) == 1 else None,
            vs_baseline=None,
        )
    out = []
    for s in stats.values():
        comp = None
        if s.baseline and s.baseline in stats:
            comp = paired_comparison(stats[s.baseline].accs, s.accs)
        out.append(ArmStats(**{**s.__dict__, "vs_baseline": comp}))
    return out


def comparisons(stats: Sequence[ArmStats]) -> list[list[str]]:
    """Arm labels grouped by comparison: each baseline followed by the arms compared with it; arms that are
    neither a baseline nor compared with one form their own group."""
    labels = [s.arm for s in stats]
    treated = {s.arm: s.baseline for s in stats if s.baseline in labels}
    groups: list[list[str]] = []
    for s in stats:
        if s.arm in treated:
            continue
        groups.append([s.arm, *[t for t in labels if treated.get(t) == s.arm]])
    return groups


# ---------------------------------------------------------------------------------------------- CSV


def _rows(result: CompareResult) -> list[dict[str, Any]]:
    arms = {a.label: a for a in result.suite.arms}
    rows = []
    for r in result.runs:
        last = r["metrics"][-1] if r["metrics"] else {}
        times = [m["time"] for m in r["metrics"]]
        s, cfg = r.get("summary", {}), r.get("config", {})
        rows.append(
            {
                "arm": r["arm"],
                "method": arms[r["arm"]].method,
                "baseline": arms[r["arm"]].baseline or "",
                "seed": r["seed"],
                "epochs": len(r["metrics"]),
                "final_test_acc": last.get("test_acc", ""),
                "final_test_loss": last.get("test_loss", ""),
                "final_train_loss": last.get("train_loss", ""),
                "mean_epoch_time_s": statistics.fmean(times) if times else "",
                "diverged": bool(s.get("diverged") or last.get("diverged")),
                "brn_warmup_only": bool(s.get("brn_warmup_only")),
                "data": cfg.get("data", s.get("data", "")),
                "model": cfg.get("model", s.get("model", "")),
                "train_size": s.get("train_size", ""),
                "test_size": s.get("test_size", ""),
                **run_provenance(s),
            }
        )
    return rows


def write_csv(result: CompareResult, path: Path) -> None:
    """One row per run (``CSV_COLUMNS``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(_rows(result))
    atomic_write_text(path, buf.getvalue())


def read_results_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``results.csv`` (older files have fewer columns; missing ones read as absent)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -------------------------------------------------------------------------------------------- plots


_FAMILIES = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys", "YlOrBr", "PuRd")


def _pyplot() -> Any:
    from normkit.train.runner import require

    matplotlib = require("matplotlib", "report", "the compare report's plots")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "report", "the compare report's plots")


def _curves(result: CompareResult, key: str) -> dict[str, list[list[float]]]:
    """Per arm, one list of values per epoch (one value per seed that reached that epoch)."""
    curves: dict[str, list[list[float]]] = {}
    for run in result.runs:
        per_epoch = curves.setdefault(run["arm"], [])
        for i, rec in enumerate(run["metrics"]):
            while len(per_epoch) <= i:
                per_epoch.append([])
            per_epoch[i].append(rec[key] * (100 if key.endswith("acc") else 1))
    return curves


def loss_axis_range(
    curves: dict[str, list[list[float]]], diverged: set[str], *, positive: bool = True
) -> tuple[float, float] | None:
    """(low, high) of the finite values of the arms that did not diverge — the plot's axis range."""
    values = [
        v
        for arm, per_epoch in curves.items()
        if arm not in diverged
        for vs in per_epoch
        for v in vs
        if math.isfinite(v) and (v > 0 or not positive)
    ]
    return (min(values), max(values)) if values else None


def _colours(plt: Any, group: int, n: int) -> list[Any]:
    """A colour family per comparison: the baseline darkest, the treatments lighter shades of it."""
    cmap = plt.get_cmap(_FAMILIES[group % len(_FAMILIES)])
    if n == 1:
        return [cmap(0.8)]
    return [cmap(0.95 - 0.5 * i / (n - 1)) for i in range(n)]


def _plot_curves(result: CompareResult, stats: list[ArmStats], key: str, ylabel: str, path: Path) -> None:
    plt = _pyplot()
    groups = comparisons(stats)
    diverged = {s.arm for s in stats if s.diverged}
    curves = _curves(result, key)
    ncols = 1 if len(groups) == 1 else 2
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.3 * nrows), dpi=100, squeeze=False)
    limits = loss_axis_range(curves, diverged, positive=key == "train_loss")
    for g, (ax, group) in enumerate(zip(axes.flat, groups)):
        for i, (arm, colour) in enumerate(zip(group, _colours(plt, g, len(group)))):
            per_epoch = curves.get(arm, [])
            if not per_epoch:
                continue
            epochs = list(range(1, len(per_epoch) + 1))
            med = [statistics.median(v) for v in per_epoch]
            label = (
                arm
                + (" (baseline)" if i == 0 and len(group) > 1 else "")
                + (" — diverged" if arm in diverged else "")
            )
            ax.plot(epochs, med, label=label, color=colour, linewidth=1.8, linestyle="--" if i == 0 else "-")
            ax.fill_between(
                epochs,
                [min(v) for v in per_epoch],
                [max(v) for v in per_epoch],
                color=colour,
                alpha=0.18,
                linewidth=0,
            )
        ax.set_title(f"{group[0]} vs {', '.join(group[1:])}" if len(group) > 1 else group[0], fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if key == "train_loss":
            ax.set_yscale("log")
        if limits is not None:  # diverged arms (non-finite or exploding losses) do not set the axis range
            lo, hi = limits
            if key == "train_loss":
                ax.set_ylim(lo / 1.5, hi * 1.5)
            else:
                pad = max(0.5, 0.05 * (hi - lo))
                ax.set_ylim(lo - pad, hi + pad)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle(f"{result.suite.name}: {ylabel} (median, min–max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_final(stats: list[ArmStats], suite: str, path: Path) -> None:
    plt = _pyplot()
    groups = comparisons(stats)
    colour = {}
    for g, group in enumerate(groups):
        for arm, c in zip(group, _colours(plt, g, len(group))):
            colour[arm] = c
    order = [arm for group in groups for arm in group]
    by_arm = {s.arm: s for s in stats}
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.42 * len(order)), dpi=100)
    ys = list(range(len(order)))[::-1]
    for y, arm in zip(ys, order):
        med, lo, hi = by_arm[arm].acc
        if math.isnan(med):
            continue
        ax.errorbar([med], [y], xerr=[[med - lo], [hi - med]], fmt="o", capsize=3, color=colour[arm])
    ax.set_yticks(ys, [a + (" (diverged)" if by_arm[a].diverged else "") for a in order], fontsize=8)
    ax.set_xlabel("final test accuracy % (median, min–max over seeds)")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(f"{suite}: final test accuracy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- markdown


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def _value(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def verdict_text(s: ArmStats) -> str:
    c = s.vs_baseline
    if c is None:
        return ""
    text = c.verdict
    if not c.enough_seeds:
        text += f" ({c.n} seeds cannot reach {100 * c.confidence:.0f} %)"
    return text


def delta_text(s: ArmStats) -> str:
    c = s.vs_baseline
    if c is None:
        return "baseline"
    return f"{c.median_difference:+.2f} [{c.low:+.2f}, {c.high:+.2f}] vs {s.baseline}"


def results_table(stats: Sequence[ArmStats], *, times: bool = True) -> list[str]:
    """The Markdown table of arms: accuracy median [min–max], paired Δ with interval, verdict, flags."""
    head = "| arm | seeds | final test acc % median [min–max] | paired Δ (pp) median [interval] | verdict |"
    sep = "|---|---:|---|---|---|"
    if times:
        head += " test loss | s / epoch |"
        sep += "---:|---:|"
    lines = [head, sep]
    for s in stats:
        med, lo, hi = s.acc
        flags = []
        if s.diverged:
            flags.append(f"**diverged** ({s.diverged}/{s.seeds} seeds)")
        if s.warmup_only:
            flags.append(f"BRN never left warm-up ({s.warmup_only}/{s.seeds} seeds): ran as BN")
        verdict = "; ".join([v for v in [verdict_text(s)] if v] + flags)
        row = f"| {s.arm} | {s.seeds} | {_fmt(med)} [{_fmt(lo)}–{_fmt(hi)}] | {delta_text(s)} | {verdict} |"
        if times:
            row += f" {_fmt(s.loss_median, 4)} | {_fmt(s.epoch_time, 2)} |"
        lines.append(row)
    return lines


def statistics_note(stats: Sequence[ArmStats]) -> str:
    sizes = {s.test_size for s in stats}
    size = sizes.pop() if len(sizes) == 1 else None
    size_text = (
        f"Test set: {size:,} examples (one example = {100 / size:.2f} points of accuracy). "
        if size
        else "Test set size: not recorded. "
    )
    conf = next((s.vs_baseline.confidence for s in stats if s.vs_baseline), 0.9)
    return (
        size_text
        + "Paired Δ: the treatment's final accuracy minus its baseline's on the same seed, median over "
        "seeds, "
        f"with the {METHOD} (coverage at least {100 * conf:.0f} %; with 5 seeds this is [min, max] of the "
        "differences, 93.75 %). Verdict: *better* / *worse* when that interval excludes 0, else *within "
        "noise*; fewer than 5 seeds cannot reach 90 % and never get a verdict other than *within noise*. "
        + false_positive_text(stats)
    )


def false_positive_text(stats: Sequence[ArmStats]) -> str:
    """The false-positive rate of the verdicts: a treatment that changes nothing is called *better* or
    *worse* only if every difference in the interval's tails has one sign, probability 1 − coverage under
    the sign test's null (median difference 0); ties at 0 only lower it."""
    rates = sorted(
        {(c.n, 1 - c.coverage) for s in stats if (c := s.vs_baseline) is not None and c.enough_seeds}
    )
    if not rates:
        return "False-positive rate: 0 (no comparison has enough seeds for a verdict)."
    text = ", ".join(f"{100 * r:.2f} % with {n} seeds" for n, r in rates)
    return (
        f"False-positive rate: a treatment that makes no difference is called *better* or *worse* with "
        f"probability at most {text} (per comparison)."
    )


def _what_ran(result: CompareResult) -> list[str]:
    """Data (sizes), model, epochs, seeds, the settings all arms share and each arm's own."""
    configs: dict[str, dict[str, Any]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    seeds: dict[str, list[int]] = {}
    for r in result.runs:
        configs.setdefault(r["arm"], {k: v for k, v in r.get("config", {}).items() if k != "seed"})
        summaries.setdefault(r["arm"], r.get("summary", {}))
        seeds.setdefault(r["arm"], []).append(r["seed"])
    if not configs:
        return []
    keys = sorted(set().union(*configs.values()))
    first = next(iter(configs.values()))
    common = {k: first.get(k) for k in keys if len({repr(c.get(k)) for c in configs.values()}) == 1}
    defaults = TrainConfig().to_dict()

    def size_text(s: dict[str, Any]) -> str:
        if s.get("train_size") is None:
            return "sizes not recorded"
        return f"{s['train_size']:,} train / {s['test_size']:,} test"

    lines = ["## What ran", ""]
    datasets = {(c.get("data"), size_text(summaries[a])) for a, c in configs.items()}
    lines.append("- data: " + "; ".join(f"{d} ({t})" for d, t in sorted(datasets, key=str)))
    models = sorted({str(c.get("model")) for c in configs.values()})
    epochs = sorted({str(c.get("epochs")) for c in configs.values()})
    n_seeds = sorted({len(v) for v in seeds.values()})
    lines.append(
        f"- model: {', '.join(models)}; epochs: {', '.join(epochs)}; seeds per arm: "
        f"{', '.join(map(str, n_seeds))}"
    )
    shown = {k: v for k, v in common.items() if k not in ("data", "model", "epochs") and v != defaults.get(k)}
    lines.append(
        "- shared settings (besides the harness defaults): "
        + (", ".join(f"{k}={_value(v)}" for k, v in shown.items()) or "none")
    )
    lines += ["- arms (settings that differ between arms; the full config of each run is in "
              "`runs/<arm>/seed<k>/config.json`):"]  # fmt: skip
    for arm in result.suite.arms:
        cfg = configs.get(arm.label, {})
        own = ", ".join(
            f"{k}={_value(cfg[k])}"
            for k in keys
            if k in cfg and k not in common and cfg[k] != defaults.get(k)
        )
        method = result.methods.get(arm.method)
        desc = method.description if method else arm.method
        source = f", from {method.source}" if method and method.source != "built-in" else ""
        versus = f"; compared with `{arm.baseline}`" if arm.baseline else ""
        lines.append(
            f"  - `{arm.label}` — method `{arm.method}` ({desc}{source}): {own or 'no own settings'}{versus}"
        )
    return [*lines, ""]


def provenance_text(rows: Sequence[dict[str, Any]]) -> str:
    """Which code trained these runs: one version, or each version with its number of runs."""
    counts: dict[str, int] = {}
    for r in rows:
        version = str(r.get("code_version") or "not recorded")
        counts[version] = counts.get(version, 0) + 1
    if not counts:
        return "code: no runs"
    if len(counts) == 1:
        return f"code: `{next(iter(counts))}` (every run)"
    return "code: **runs from different code** — " + ", ".join(f"`{v}` ({n} runs)" for v, n in counts.items())


def study_description(result: CompareResult) -> str:
    """The suite's own blurb, or — for a custom study (``plan`` clears the blurb when the arms or the data
    and model are the user's) — a sentence built from what ran."""
    if result.suite.description:
        return result.suite.description
    arms = result.suite.arms
    configs = [r.get("config", {}) for r in result.runs]
    data = sorted({str(c.get("data")) for c in configs}) or [str(result.suite.base.get("data", "?"))]
    models = sorted({str(c.get("model")) for c in configs}) or [str(result.suite.base.get("model", "?"))]
    compared = [f"`{a.label}` with `{a.baseline}`" for a in arms if a.baseline]
    methods = result.methods
    sources = sorted({m.source for m in methods.values() if m.source != "built-in"})
    return (
        f"A custom study: {len(arms)} arm{'s' if len(arms) != 1 else ''} "
        f"({', '.join(f'`{a.label}`' for a in arms)}) on {', '.join(data)} with model {', '.join(models)}"
        + (f"; compared: {', '.join(compared)}" if compared else "")
        + (f"; methods from {', '.join(sources)}" if sources else "")
        + "."
    )


def terminal_summary(result: CompareResult) -> str:
    """What ``normkit compare`` prints at the end: the results table, its statistics note and the report."""
    rows = _rows(result)
    stats = arm_statistics(rows, result.suite.arms)
    lines = [
        f"{result.suite.name}: {study_description(result)}",
        "",
        *results_table(stats),
        "",
        statistics_note(stats),
        "",
        provenance_text(rows),
        f"report: {result.report}",
    ]
    return "\n".join(lines)


def report_lines(result: CompareResult, stats: list[ArmStats]) -> list[str]:
    lines = [f"# normkit compare: {result.suite.name}", "", study_description(result), ""]
    if result.suite.claim:
        lines += [f"Claim under test: {result.suite.claim}", ""]
    lines += _what_ran(result)
    if lines[-1] == "":
        lines.insert(len(lines) - 1, "- " + provenance_text(_rows(result)))
    lines += ["## Results", ""]
    lines += results_table(stats)
    lines += ["", statistics_note(stats), "", HARDWARE_NOTE, ""]
    diverged = [s.arm for s in stats if s.diverged]
    if diverged:
        lines += [
            f"Diverged (non-finite training loss; stopped early, kept out of the loss plot's axis range): "
            f"{', '.join(diverged)}.",
            "",
        ]
    warm = [s.arm for s in stats if s.warmup_only]
    if warm:
        lines += [
            "BRN arms that ended inside the warm-up (r_max = 1, d_max = 0 throughout, i.e. plain batch "
            "norm): "
            f"{', '.join(warm)}.",
            "",
        ]
    lines += [
        "![test accuracy](accuracy.png)",
        "",
        "![training loss](train_loss.png)",
        "",
        "![final accuracy](final_accuracy.png)",
        "",
        f"Raw numbers: `results.csv` ({len(result.runs)} runs, {result.reused} reused from an earlier call).",
        "",
    ]
    return lines


def write_report(result: CompareResult, *, html: bool = False) -> Path:
    """Write report.md, results.csv, accuracy.png, train_loss.png, final_accuracy.png (and report.html)."""
    out = result.out_dir
    write_csv(result, out / "results.csv")
    stats = arm_statistics(_rows(result), result.suite.arms)
    _plot_curves(result, stats, "test_acc", "test accuracy %", out / "accuracy.png")
    _plot_curves(result, stats, "train_loss", "training loss", out / "train_loss.png")
    _plot_final(stats, result.suite.name, out / "final_accuracy.png")
    lines = report_lines(result, stats)
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    if html:
        atomic_write_text(out / "report.html", to_html(lines, out))
    return report


# ----------------------------------------------------------------------------------------------- HTML


def _inline(text: str) -> str:
    """Escape, then render the Markdown we emit inline: `code`, **bold**, *emphasis*."""
    import re

    t = html_lib.escape(text, quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", t)


def to_html(lines: list[str], out: Path) -> str:
    """The same report as one self-contained, valid HTML page (images embedded as data URIs)."""
    body: list[str] = []
    table: list[list[str]] = []
    items: list[tuple[int, str]] = []

    def flush() -> None:
        if table:
            head, *rest = table
            body.append(
                "<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead>"
            )
            body.append("<tbody>")
            for row in rest:
                body.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>")
            body.append("</tbody></table>")
            table.clear()
        if items:
            body.append("<ul>")
            open_sub = False
            for level, text in items:
                if level == 1 and not open_sub:
                    body[-1] = body[-1].removesuffix("</li>")
                    body.append("<ul>")
                    open_sub = True
                elif level == 0 and open_sub:
                    body.append("</ul></li>")
                    open_sub = False
                body.append(f"<li>{_inline(text)}</li>")
            if open_sub:
                body.append("</ul></li>")
            body.append("</ul>")
            items.clear()

    for line in lines:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                table.append(cells)
            continue
        if line.startswith("- ") or line.startswith("  - "):
            items.append((1 if line.startswith("  ") else 0, line.strip()[2:]))
            continue
        flush()
        if line.startswith("## "):
            body.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            data = base64.b64encode((out / src.rstrip(")")).read_bytes()).decode()
            body.append(f'<p><img alt="{html_lib.escape(alt)}" src="data:image/png;base64,{data}"></p>')
        elif line:
            body.append(f"<p>{_inline(line)}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}"
    )
    title = html_lib.escape(lines[0].lstrip("# ") if lines else "normkit report")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
