"""The report of a comparison: Markdown table, CSV, PNG curves (median line, min–max band), optional HTML."""

from __future__ import annotations

import base64
import html as html_lib
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normkit.train.checkpoint import atomic_write_text

if TYPE_CHECKING:
    from normkit.train.compare import CompareResult

__all__ = ["write_report"]


def _curves(result: CompareResult, key: str) -> dict[str, list[list[float]]]:
    """Per arm, one list of values per epoch (one value per seed)."""
    curves: dict[str, list[list[float]]] = {}
    for run in result.runs:
        per_epoch = curves.setdefault(run["arm"], [])
        for i, rec in enumerate(run["metrics"]):
            while len(per_epoch) <= i:
                per_epoch.append([])
            value = rec[key] * (100 if key.endswith("acc") else 1)
            per_epoch[i].append(value)
    return curves


def _pyplot() -> Any:
    from normkit.train.data import require

    matplotlib = require("matplotlib", "report", "the compare report's plots")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "report", "the compare report's plots")


def _plot_curves(result: CompareResult, key: str, ylabel: str, path: Path) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for arm, per_epoch in _curves(result, key).items():
        epochs = list(range(1, len(per_epoch) + 1))
        med = [statistics.median(v) for v in per_epoch]
        (line,) = ax.plot(epochs, med, label=arm, linewidth=1.6)
        ax.fill_between(
            epochs,
            [min(v) for v in per_epoch],
            [max(v) for v in per_epoch],
            alpha=0.2,
            color=line.get_color(),
            linewidth=0,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if key == "train_loss":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{result.suite.name}: {ylabel} (median, min–max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_final(rows: list[dict[str, Any]], suite: str, path: Path) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)), dpi=110)
    labels = [r["arm"] for r in rows]
    med = [r["acc_median"] for r in rows]
    lo = [r["acc_median"] - r["acc_min"] for r in rows]
    hi = [r["acc_max"] - r["acc_median"] for r in rows]
    ys = list(range(len(rows)))[::-1]
    ax.errorbar(med, ys, xerr=[lo, hi], fmt="o", capsize=3)
    ax.set_yticks(ys, labels)
    ax.set_xlabel("final test accuracy % (median, min–max over seeds)")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(f"{suite}: final test accuracy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def write_report(result: CompareResult, *, html: bool = False) -> Path:
    """Write report.md, results.csv, accuracy.png, train_loss.png, final_accuracy.png (and report.html)."""
    from normkit.train.compare import METHODS, summarize, write_csv

    out = result.out_dir
    rows = summarize(result)
    write_csv(result, out / "results.csv")
    _plot_curves(result, "test_acc", "test accuracy %", out / "accuracy.png")
    _plot_curves(result, "train_loss", "training loss", out / "train_loss.png")
    _plot_final(rows, result.suite.name, out / "final_accuracy.png")

    first = result.runs[0]["metrics"] if result.runs else []
    base = result.suite.base
    lines = [
        f"# normkit compare: {result.suite.name}",
        "",
        result.suite.description,
        "",
    ]
    if result.suite.claim:
        lines += [f"Claim under test: {result.suite.claim}", ""]
    lines += [
        f"Base configuration: {', '.join(f'{k}={v}' for k, v in base.items())}; "
        f"{rows[0]['seeds'] if rows else 0} seeds, {len(first)} epochs. Every arm's full configuration is in "
        "`runs/<arm>/seed<k>/config.json`.",
        "",
        "| arm | method | final test acc % (median [min–max]) | Δ vs baseline | test loss (median) "
        "| s / epoch |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        delta = "baseline" if not r["baseline"] else f"{r['delta']:+.2f} vs {r['baseline']}"
        lines.append(
            f"| {r['arm']} | {r['method']} | {_fmt(r['acc_median'])} "
            f"[{_fmt(r['acc_min'])}–{_fmt(r['acc_max'])}] "
            f"| {delta} | {_fmt(r['loss_median'], 4)} | {_fmt(r['epoch_time'], 2)} |"
        )
    lines += ["", "Methods:", ""]
    for arm in result.suite.arms:
        method = METHODS.get(arm.method)
        desc = method.description if method else "user method"
        extra = f" ({', '.join(f'{k}={v}' for k, v in arm.overrides.items())})" if arm.overrides else ""
        lines.append(f"- `{arm.label}`: {desc}{extra}")
    lines += [
        "",
        "![test accuracy](accuracy.png)",
        "",
        "![training loss](train_loss.png)",
        "",
        "![final accuracy](final_accuracy.png)",
        "",
        f"Raw numbers: `results.csv` ({len(result.runs)} runs, {result.reused} reused from an earlier call).",
        "",
    ]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    if html:
        atomic_write_text(out / "report.html", _to_html(lines, out))
    return report


def _to_html(lines: list[str], out: Path) -> str:
    """The same report as one self-contained page: tables as HTML, images embedded as data URIs."""
    body: list[str] = []
    table: list[list[str]] = []

    def flush_table() -> None:
        if not table:
            return
        head, *rest = table
        body.append("<table><tr>" + "".join(f"<th>{html_lib.escape(c)}</th>" for c in head) + "</tr>")
        for row in rest:
            body.append("<tr>" + "".join(f"<td>{html_lib.escape(c)}</td>" for c in row) + "</tr>")
        body.append("</table>")
        table.clear()

    for line in lines:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                table.append(cells)
            continue
        flush_table()
        if line.startswith("# "):
            body.append(f"<h1>{html_lib.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            data = base64.b64encode((out / src.rstrip(")")).read_bytes()).decode()
            body.append(f'<p><img alt="{html_lib.escape(alt)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("- "):
            body.append(f"<li>{html_lib.escape(line[2:])}</li>")
        elif line:
            body.append(f"<p>{html_lib.escape(line)}</p>")
    flush_table()
    style = (
        "body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>"
        + "".join(body)
        + "</body></html>\n"
    )
