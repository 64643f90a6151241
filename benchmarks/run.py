"""Run the benchmarks and record them in BENCHMARKS.md.

    python -m benchmarks.run              # every benchmarks/bench_*.py
    python -m benchmarks.run brn lsuv     # some of them (their sections of BENCHMARKS.md are replaced)
    python -m benchmarks.run --quick      # fewer repetitions, for a smoke run (BENCHMARKS.md untouched)

Each ``benchmarks/bench_NAME.py`` defines ``TITLE: str`` and ``run(quick: bool) -> list[Ratio]`` (or a list of
rows of a table: ``run`` may return ``(header, rows)`` for figures that are not ratios, e.g. forward-pass
counts). Benchmarks are not tests: they print and record figures, they never fail on a slow machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import Ratio

HERE = Path(__file__).resolve().parent
OUTPUT = HERE.parent / "BENCHMARKS.md"
HEADER = """# Benchmarks

Ratios against a reference measured in the same process (interleaved repetitions, medians).
Regenerate with `make bench` or `python -m benchmarks.run NAME`.
"""


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {device}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}"
    )


def render(name: str, title: str, result: Any) -> str:
    stamp = datetime.date.today().isoformat()
    lines = [
        f"<!-- bench:{name} -->",
        f"## {title}",
        "",
        f"`python -m benchmarks.run {name}` — {stamp}, {machine()}",
        "",
    ]
    if isinstance(result, tuple):
        header, rows = result
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    else:
        lines.append("| measurement | reference | candidate ms | reference ms | ratio | target |")
        lines.append("|---|---|---:|---:|---:|---|")
        for r in result:
            assert isinstance(r, Ratio)
            target = f"≤ {r.target:g}× ({r.verdict})" if r.target is not None else ""
            lines.append(
                f"| {r.name} | {r.reference} | {r.candidate_ms:.3f} | {r.reference_ms:.3f} | "
                f"{r.ratio:.{2 if r.ratio >= 0.1 else 3}f}× | {target} |"
            )
    lines.append(f"<!-- /bench:{name} -->")
    return "\n".join(lines)


def update_file(sections: dict[str, str]) -> None:
    text = OUTPUT.read_text() if OUTPUT.exists() else HEADER
    for name, body in sections.items():
        pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
        found = pattern.search(text)
        if found:
            text = text[: found.start()] + body + text[found.end() :]
        else:
            text = text.rstrip("\n") + "\n\n" + body + "\n"
    OUTPUT.write_text(text if text.endswith("\n") else text + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(available())}")
    parser.add_argument("--quick", action="store_true", help="few repetitions; do not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {available()}")
    sections = {}
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        result = module.run(args.quick)
        sections[name] = render(name, module.TITLE, result)
        print(sections[name], flush=True)
    if not args.quick:
        update_file(sections)
        print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
