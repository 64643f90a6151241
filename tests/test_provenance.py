"""Provenance: the code version every run, results.csv row and report records, and `normkit report`'s check
of a table against the current code. Checked against git itself (a real repository in a temp folder)."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from normkit.cli import main
from normkit.train.runner import provenance
from normkit.train.runner.provenance import _src_dirty, code_version, git_commit, source_hash
from normkit.train.study import Suite, compare

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")

TINY = {
    "data": "digits",
    "model": "mlp",
    "depth": 1,
    "width": 8,
    "norm": "bn",
    "epochs": 1,
    "batch_size": 256,
}


def git(root: Path, *args: str) -> str:
    command = ["git", "-C", str(root), "-c", "user.email=t@example.com", "-c", "user.name=t", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A checkout shaped like normkit's: src/pkg with two modules, one of them a report module."""
    root = tmp_path / "repo"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "core.py").write_text("x = 1\n")
    (root / "src" / "pkg" / "report.py").write_text("y = 1\n")
    (root / "README.md").write_text("hello\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "one")
    return root


def test_commit_is_read_from_the_git_files_as_git_reports_it(repo: Path, tmp_path: Path) -> None:
    assert git_commit(repo) == git(repo, "rev-parse", "HEAD")
    (repo / "src" / "pkg" / "core.py").write_text("x = 2\n")
    git(repo, "commit", "-qam", "two")
    git(repo, "pack-refs", "--all")  # the branch now lives only in packed-refs
    assert not any((repo / ".git" / "refs" / "heads").iterdir())
    assert git_commit(repo) == git(repo, "rev-parse", "HEAD")
    first = git(repo, "rev-parse", "HEAD~1")
    git(repo, "checkout", "-q", first)  # detached HEAD
    assert git_commit(repo) == first
    git(repo, "checkout", "-q", "-")
    worktree = tmp_path / "wt"  # a worktree: .git is a file, its branch is in the common directory
    git(repo, "worktree", "add", "-q", "-b", "side", str(worktree))
    assert (worktree / ".git").is_file()
    assert git_commit(worktree) == git(worktree, "rev-parse", "HEAD")
    assert git_commit(tmp_path) is None  # not a checkout


def test_dirty_means_a_change_under_src_only(repo: Path) -> None:
    assert _src_dirty(repo) is False
    (repo / "README.md").write_text("changed\n")
    assert _src_dirty(repo) is False  # docs do not change what a run computes
    (repo / "src" / "pkg" / "new.py").write_text("z = 1\n")
    assert _src_dirty(repo) is True  # an untracked module counts
    (repo / "src" / "pkg" / "new.py").unlink()
    (repo / "src" / "pkg" / "core.py").write_text("x = 3\n")
    git(repo, "add", "-A")
    assert _src_dirty(repo) is True  # staged, not committed
    assert _src_dirty(repo.parent / "nowhere") is None  # git cannot tell


def test_source_hash_follows_the_code_a_run_exercises(repo: Path) -> None:
    package = repo / "src" / "pkg"
    before = source_hash(package)
    (package / "report.py").write_text("y = 2  # lays out results only\n")
    assert source_hash(package) == before
    (package / "sub").mkdir()
    (package / "core.py").rename(package / "sub" / "core.py")  # moved, unchanged
    assert source_hash(package) == before
    (package / "sub" / "core.py").write_text("x = 2\n")
    assert source_hash(package) != before


def test_code_version_of_this_checkout() -> None:
    import normkit

    package = Path(normkit.__file__).resolve().parent
    assert provenance.PACKAGE == package  # the hash covers the whole package, not the module's own folder
    info = code_version()
    root = provenance.checkout_root()
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists() and package == repo / "src" / "normkit":
        assert root == repo  # tests of a checkout: its commit must be found
    if root is None:  # an installed package: its version
        assert info["version"] == f"normkit {info['normkit']}"
        return
    head = git(root, "rev-parse", "HEAD")
    assert info["git"] == head
    dirty = git(root, "status", "--porcelain", "--untracked-files=all", "--", "src") != ""
    assert info["version"] == head[:12] + ("-dirty" if dirty else "")
    assert info["source_hash"] == source_hash()


def test_every_results_row_and_the_report_name_the_code(tmp_path: Path) -> None:
    suite = Suite("tiny", "one arm", TINY, (), seeds=1)
    result = compare(suite, tmp_path, methods=["bn-sgd"], log=lambda s: None)
    version = code_version()
    summary = json.loads((tmp_path / "runs" / "bn-sgd" / "seed0" / "summary.json").read_text())
    assert summary["code"]["version"] == version["version"]
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["code_version"], r["source_hash"]) for r in rows] == [
        (version["version"], version["source_hash"])
    ]
    assert f"code: `{version['version']}` (every run)" in Path(result.report or "").read_text()


def _study(root: Path, name: str, source_hash: str | None) -> None:
    """A results.csv of 5 seeds, with or without the provenance columns."""
    folder = root / name
    folder.mkdir(parents=True)
    head = "arm,method,baseline,seed,epochs,final_test_acc,final_test_loss,final_train_loss,test_size"
    extra = ",code_version,source_hash" if source_hash is not None else ""
    lines = [head + extra]
    for seed in range(5):
        tail = f",abc123def456,{source_hash}" if source_hash is not None else ""
        lines += [f"a,a,,{seed},1,0.5,1,1,100{tail}", f"b,b,a,{seed},1,0.7,1,1,100{tail}"]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")


def test_report_flags_tables_recorded_with_other_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "results"
    _study(root, "current", source_hash())
    _study(root, "old", "0123456789abcdef")
    _study(root, "legacy", None)
    md = tmp_path / "results.md"
    assert main(["report", str(root), "--markdown", str(md)]) == 0
    text = md.read_text()
    out, err = capsys.readouterr()
    current = text.split("normkit:results:current:begin")[1].split("normkit:results:current:end")[0]
    assert "Code: `abc123def456` (every run); the source is unchanged since" in current
    old = text.split("normkit:results:old:begin")[1]
    assert "**Stale**" in old.split("normkit:results:old:end")[0]
    legacy = text.split("normkit:results:legacy:begin")[1].split("normkit:results:legacy:end")[0]
    assert "`not recorded`" in legacy and "**Unverified**" in legacy
    verdicts = text.split("normkit:results:verdicts:begin")[1]
    assert "| old | b vs a |" in verdicts and "`abc123def456` (stale) |" in verdicts
    assert "current: code abc123def456\n" in out
    assert "warning: 2 table(s)" in err and "legacy, old" in err


def test_report_refuses_a_foreign_csv_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "results"
    _study(root, "good", source_hash())
    (root / "foreign").mkdir()
    (root / "foreign" / "results.csv").write_text("name,final_test_acc\nx,0.5\n")
    md = tmp_path / "results.md"
    assert main(["report", str(root), "--markdown", str(md)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a normkit results.csv" in err and "'arm'" in err
    assert "Traceback" not in err and not md.exists()


def test_report_refuses_a_missing_also_file_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "docs" / "results"
    _study(root, "good", source_hash())
    missing = tmp_path / "README.md"
    assert main(["report", str(root), "--also", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--also {missing}: no such file" in err
    assert not (tmp_path / "docs" / "results.md").exists()  # the default target was not written either
