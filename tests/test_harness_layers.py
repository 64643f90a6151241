"""The harness's structure, checked on its source: no import circle anywhere in normkit (imports inside
functions included), the study layer reaches the run layer only through its public package, RL plugs into
studies through the suite interface only, and ``run(config)`` visits its step files once each, in order."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import normkit

SRC = Path(normkit.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """Every normkit module ``name`` imports, at module level or inside functions (``from pkg import x``
    counts as an import of ``pkg.x`` when that is a module, else of ``pkg``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_is_read_from_the_real_files() -> None:
    # a control: the parser sees imports inside functions, and the known edges of the harness
    assert "normkit.train.runner.factories" in GRAPH["normkit.train.runner.data"]
    assert "normkit.train.rl.suite" in GRAPH["normkit.train.study.comparison"]
    assert "normkit.train.study.results" in GRAPH["normkit.cli"]  # imported inside a function there
    assert len(MODULES) > 40


def test_no_import_circle_anywhere_in_normkit() -> None:
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_the_cycle_finder_finds_a_circle() -> None:
    GRAPH["normkit.train.runner.factories"].add("normkit.train.runner.data")  # the old custom <-> data
    try:
        assert _cycle() is not None
    finally:
        GRAPH["normkit.train.runner.factories"].discard("normkit.train.runner.data")


def test_layers_talk_one_way() -> None:
    def under(prefix: str) -> dict[str, set[str]]:
        return {m: e for m, e in GRAPH.items() if m == prefix or m.startswith(prefix + ".")}

    for module, edges in under("normkit.train.runner").items():
        bad = {e for e in edges if e.startswith(("normkit.train.study", "normkit.train.rl", "normkit.cli"))}
        bad |= {e for e in edges if e == "normkit.train"}
        assert not bad, f"the run layer must not import the layers above it: {module} -> {bad}"
    for module, edges in under("normkit.train.study").items():
        inner = {e for e in edges if e.startswith("normkit.train.runner.")}
        assert not inner, f"{module} must use the run layer's public API (normkit.train.runner): {inner}"
        rl = {e for e in edges if e.startswith("normkit.train.rl")}
        assert rl <= {"normkit.train.rl.suite"} and (not rl or module.endswith(".comparison")), (module, rl)
    for module, edges in under("normkit.train.rl").items():
        study = {e for e in edges if e.startswith("normkit.train.study")}
        assert study <= {"normkit.train.study.suite"}, f"RL plugs in through the suite interface: {study}"
        inner = {e for e in edges if e.startswith("normkit.train.runner.")}
        assert not inner, (module, inner)
    core = tuple(f"normkit.{m}" for m in ("geometry", "graph", "nn", "init", "optim", "enorm"))
    for module, edges in GRAPH.items():
        if module.startswith(core):
            assert not {e for e in edges if e.startswith(("normkit.train", "normkit.cli"))}, module


def test_run_visits_each_step_file_once_in_order(tmp_path: Path) -> None:
    """Profile a real ``run(config)``: the files it calls into, in order, collapse to the six steps."""
    from normkit.train import run

    runner = SRC / "train" / "runner"
    api = str(runner / "api.py")
    steps: list[str] = []

    def profile(frame, event, arg):  # type: ignore[no-untyped-def]
        if event != "call" or frame.f_back is None or frame.f_back.f_code.co_filename != api:
            return
        callee = Path(frame.f_code.co_filename)
        if callee.parent == runner and str(callee) != api and (not steps or steps[-1] != callee.stem):
            steps.append(callee.stem)

    sys.setprofile(profile)
    try:
        cfg = {"data": "digits", "model": "mlp", "depth": 1, "width": 8, "epochs": 1, "subset": 128}
        run(cfg, tmp_path / "run", log=lambda s: None)
    finally:
        sys.setprofile(None)
    assert steps == ["config", "rundir", "process", "data", "build", "loop"], steps


@pytest.mark.parametrize(
    "old, new",
    [
        ("normkit.train.engine", "normkit.train.runner"),
        ("normkit.train.data", "normkit.train.runner.data"),
        ("normkit.train.custom", "normkit.train.runner.factories"),
        ("normkit.train.compare", "normkit.train.study.comparison"),
        ("normkit.train.report", "normkit.train.study.report"),
        ("normkit.train.crossq", "normkit.train.rl"),
    ],
)
def test_old_module_paths_still_import_as_the_new_modules(old: str, new: str) -> None:
    import importlib

    assert importlib.import_module(old) is importlib.import_module(new)
