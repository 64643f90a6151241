"""Which code produced a result: the git commit of a checkout (``-dirty`` when its ``src/`` has changes) or
the package version, plus a hash of the source a run exercises.

Computed once per process (``functools.cache``): the commit is read from the ``.git`` files, without spawning
git; only the ``-dirty`` check runs ``git status`` once, and never inside a run. The source hash lets
``normkit report`` tell a table recorded with other code from one recorded with this code, also where there
is no git (an installed package).
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["SOURCE_EXCLUDED", "code_version", "git_commit", "run_provenance", "source_hash"]

PACKAGE = Path(__file__).resolve().parents[2]  # .../normkit (this file is normkit/train/runner/provenance.py)
# Modules that only parse commands or lay out results: they cannot change a number a run produces (a report's
# statistics are recomputed from results.csv each time), so a change to them does not make a table stale.
SOURCE_EXCLUDED = frozenset({"cli.py", "__main__.py", "report.py", "results.py", "stats.py", "provenance.py"})


def _git_dir(root: Path) -> Path | None:
    """The git directory of the checkout ``root`` (``.git`` is a file ``gitdir: ...`` in a worktree)."""
    dot = root / ".git"
    if dot.is_dir():
        return dot
    if dot.is_file():
        text = dot.read_text().strip()
        if text.startswith("gitdir:"):
            path = Path(text.split(":", 1)[1].strip())
            return path if path.is_absolute() else (root / path).resolve()
    return None


def _resolve_ref(git_dir: Path, name: str) -> str | None:
    """A ref's commit from the loose ref file or ``packed-refs``; a worktree keeps its branches in the
    common directory named by its ``commondir`` file."""
    dirs = [git_dir]
    common = git_dir / "commondir"
    if common.is_file():
        path = Path(common.read_text().strip())
        dirs.append(path if path.is_absolute() else (git_dir / path).resolve())
    for d in dirs:
        loose = d / name
        if loose.is_file():
            return loose.read_text().strip()
        packed = d / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split(" ", 1)
                if len(parts) == 2 and parts[1] == name and not line.startswith(("#", "^")):
                    return parts[0]
    return None


def checkout_root(package: Path = PACKAGE) -> Path | None:
    """The root of the source checkout ``package`` belongs to (``<root>/src/normkit``), if it is one."""
    root = package.parent.parent
    if package.parent.name == "src" and _git_dir(root) is not None:
        return root
    return None


def git_commit(root: Path) -> str | None:
    """The full commit hash HEAD points at in the checkout ``root``, read from the files (no git process)."""
    git_dir = _git_dir(root)
    if git_dir is None or not (git_dir / "HEAD").is_file():
        return None
    head = (git_dir / "HEAD").read_text().strip()
    if head.startswith("ref:"):
        return _resolve_ref(git_dir, head.split(":", 1)[1].strip())
    return head or None


def _src_dirty(root: Path) -> bool | None:
    """Whether ``root/src`` differs from HEAD (staged, unstaged or untracked); None when git cannot say."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all", "--", "src"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.strip())


def source_hash(package: Path = PACKAGE) -> str:
    """SHA-256 (first 16 hex digits) of the package's Python source a run exercises: the contents of every
    ``.py`` file except :data:`SOURCE_EXCLUDED` (by content only, so moving a file unchanged keeps it)."""
    files = sorted(
        hashlib.sha256(path.read_bytes()).hexdigest()
        for path in package.rglob("*.py")
        if path.name not in SOURCE_EXCLUDED and "__pycache__" not in path.parts
    )
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def code_version() -> dict[str, str]:
    """``{"version", "normkit", "torch", "source_hash"}`` and, from a checkout, ``"git"`` (the commit).

    ``version`` is what a table quotes: the commit's first 12 digits with ``-dirty`` when ``src/`` has
    uncommitted changes (``-unknown`` when git is not there to tell), else ``normkit <package version>``.
    """
    return dict(_code_version())


@functools.cache
def _code_version() -> dict[str, str]:
    import torch

    from normkit import __version__

    info = {"normkit": __version__, "torch": torch.__version__, "source_hash": source_hash()}
    root = checkout_root()
    commit = git_commit(root) if root is not None else None
    if commit is None:
        info["version"] = f"normkit {__version__}"
        return info
    info["git"] = commit
    dirty = _src_dirty(root) if root is not None else None
    info["version"] = commit[:12] + {True: "-dirty", False: "", None: "-unknown"}[dirty]
    return info


def run_provenance(summary: dict[str, Any]) -> dict[str, str]:
    """``code_version`` and ``source_hash`` of the code that trained a run, from its ``summary.json``.

    Records written before the source hash was kept give their commit with ``?`` (whether the tree was
    clean then is unknown) and an empty hash; records without any give ``not recorded``.
    """
    code = summary.get("code") or {}
    version = code.get("version")
    if version is None:
        version = f"{code['git'][:12]}?" if code.get("git") else "not recorded"
    return {"code_version": str(version), "source_hash": str(code.get("source_hash", ""))}
