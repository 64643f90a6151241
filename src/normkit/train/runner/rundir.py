"""Step 2 of a run: the run directory — what it already holds, whether this run may use it, and a lock.

A run directory holds ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``best.pt`` and, written last,
``summary.json``: the completion record. A run is *finished* when that record exists, its config hash is the
requested config's and what it recorded was built from the same code of your own factories (their module
files' hashes and the model's parameter shapes): editing ``mymodels.py`` makes an old run stale.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normkit.train.runner.checkpoint import load_checkpoint
from normkit.train.runner.config import TrainConfig, config_diff, config_hash
from normkit.train.runner.factories import factory_source_hash, is_import_path, rebuilt_shapes_hash

__all__ = [
    "RUN_FILES",
    "DirectoryLock",
    "Existing",
    "RunDirError",
    "RunResult",
    "check_writable",
    "code_version",
    "existing_run",
    "finished_run",
    "iter_metrics",
    "stale_reason",
]

RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "config.json")


class RunDirError(ValueError):
    """The output directory cannot take this run: a file, unwritable, or it holds other finished work."""


@dataclass
class RunResult:
    """What a run produced: the resolved config, one metrics dict per epoch and the summary."""

    config: TrainConfig
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` that is a file or lies in a place we cannot write — before any work."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose another --out")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunDirError(f"cannot create --out {out}: {probe} is a file")
    try:  # a real probe: permission bits say nothing for root, read-only mounts or pseudo file systems
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise RunDirError(f"cannot write to --out {out}: {probe} is not writable ({exc.strerror})") from None


class DirectoryLock:
    """An exclusive lock on an output directory (``DIR/.lock``, ``flock``) for one ``normkit COMMAND``: the
    kernel releases it when its process dies, so a lock left by a killed process is never an obstacle.

    ``remove``: delete the lock file on release (a run directory keeps only its run files). The file is
    unlinked while still locked, and a locker checks that the file it locked is still the one at the path, so
    two processes never both hold "the" lock.
    """

    def __init__(self, out: Path, command: str = "compare", *, remove: bool = False) -> None:
        self.path = out / ".lock"
        self.command = command
        self.remove = remove
        self.file: Any = None

    def __enter__(self) -> DirectoryLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            self.file = open(self.path, "a+")
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.seek(0)
                holder = self.file.read().strip() or "unknown"
                self.file.close()
                self.file = None
                raise RunDirError(
                    f"another normkit {self.command} ({holder}) is running on {self.path.parent}; wait for "
                    "it to finish or choose another --out"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            self.file.close()  # its holder removed it as we opened it: lock the file now at the path
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self.file.flush()
        return self

    @staticmethod
    def holder(out: Path) -> str | None:
        """Who holds the lock of ``out`` now (``"pid N on HOST"``), or None when nobody does."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return None
        try:
            with open(out / ".lock") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    return f.read().strip() or "unknown"
                return None  # closing releases the probe
        except OSError:
            return None

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            if self.remove:
                self.path.unlink(missing_ok=True)  # still locked: nobody can hold a lock on it meanwhile
            self.file.close()  # closing releases the flock
            self.file = None


def code_version() -> dict[str, str]:
    """normkit's version, the git commit of a checkout (with ``-dirty``), torch's version, the source hash."""
    from normkit.train.runner.provenance import code_version as version

    return version()


def stale_reason(config: dict[str, Any], built: dict[str, Any] | None) -> str | None:
    """Why a run recorded with ``built`` (its build fingerprint) no longer matches your factories' code, or
    None. Runs of built-in models and datasets, and records written before fingerprints, are never stale."""
    if not built:
        return None
    for key, what in (("model", "model_source"), ("data", "data_source")):
        path = config.get(key)
        if isinstance(path, str) and is_import_path(path) and what in built:
            try:
                now = factory_source_hash(path)
            except ValueError:
                now = None
            if now != built[what]:
                return f"the {key} factory {path} changed since this run (its module file differs)"
    model = config.get("model")
    if (
        isinstance(model, str)
        and is_import_path(model)
        and "parameter_shapes" in built
        and "model_call" in built
    ):
        shapes = rebuilt_shapes_hash(model, built["model_call"])
        if shapes is not None and shapes != built["parameter_shapes"]:
            return f"the model factory {model} now builds other parameter shapes than this run's"
    return None


@dataclass
class Existing:
    """What a run directory already holds."""

    out: Path
    record: dict[str, Any] | None  # a valid completion record (summary.json)
    checkpoint: dict[str, Any] | None  # the checkpoint's header fields (config, request, epoch, built)

    @property
    def finished(self) -> bool:
        return self.record is not None

    @property
    def hash(self) -> str | None:
        return self.record.get("config_hash") if self.record else None

    @property
    def checkpoint_hash(self) -> str | None:
        if self.checkpoint is None:
            return None
        return config_hash(self.checkpoint.get("request", self.checkpoint["config"]))

    @property
    def has_results(self) -> bool:
        return self.record is not None or self.checkpoint is not None

    def stale(self) -> str | None:
        """Why the finished run (else the checkpoint) no longer matches your factories' code, or None."""
        if self.record is not None:
            return stale_reason(self.record.get("config") or {}, self.record.get("built"))
        if self.checkpoint is not None:
            return stale_reason(self.old_config(), self.checkpoint.get("built"))
        return None

    def old_config(self) -> dict[str, Any]:
        if self.record is not None and isinstance(self.record.get("config"), dict):
            return dict(self.record["config"])
        if self.checkpoint is not None:
            return dict(self.checkpoint.get("request", self.checkpoint["config"]))
        return {}

    def refusal(self, request: dict[str, Any], out: Path) -> str:
        old = self.old_config()
        if self.finished:
            what = f"a finished run ({self.record.get('epochs_done')} epochs)"  # type: ignore[union-attr]
        else:
            what = f"an unfinished run (checkpoint at epoch {self.checkpoint.get('epoch')})"  # type: ignore[union-attr]
        if old == request:
            diff = "of this same configuration"
            hint = f"continue it with --resume {out}"
            if self.finished:
                hint = "pass --overwrite to train it again"
        else:
            diff = f"with other settings ({config_diff(old, request)})"
            hint = "pass --overwrite to replace it"
        return f"{out} already holds {what} {diff}; {hint}, or choose another --out"

    def result(self, cfg: TrainConfig) -> RunResult:
        metrics = list(iter_metrics(self.out))
        ran = self.out / "config.json"
        if ran.is_file():
            cfg = TrainConfig.from_dict(json.loads(ran.read_text()))
        return RunResult(cfg, metrics, dict(self.record or {}), self.out)


def _read_record(out: Path) -> dict[str, Any] | None:
    """The completion record in ``out`` if it is one (complete, with a config hash), else None."""
    path = out / "summary.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not record.get("complete") or "config_hash" not in record:
        return None
    if not (out / "metrics.jsonl").is_file():
        return None
    return record


def existing_run(out: Path) -> Existing | None:
    if not out.is_dir():
        return None
    record = _read_record(out)
    header: dict[str, Any] | None = None
    if (out / "checkpoint.pt").is_file():
        try:
            state = load_checkpoint(out / "checkpoint.pt")
            header = {k: state[k] for k in ("config", "request", "epoch", "built") if k in state}
        except (ValueError, OSError):
            header = None  # unreadable: nothing to resume from, nothing of value to protect
    if record is None and header is None and not any((out / f).exists() for f in RUN_FILES):
        return None
    return Existing(out, record, header)


def finished_run(out_dir: str | Path, cfg: TrainConfig) -> RunResult | None:
    """The finished run of exactly this config in ``out_dir``, or None (absent, other config, unfinished,
    or made by an earlier version of your own model / dataset factory).

    Finished means: a completion record (``summary.json``, written last) whose config hash is this config's.
    """
    out_dir = Path(out_dir)
    record = _read_record(out_dir)
    if record is None or record["config_hash"] != config_hash(cfg):
        return None
    if stale_reason(record.get("config") or {}, record.get("built")) is not None:
        return None
    return Existing(out_dir, record, None).result(cfg)


def iter_metrics(out_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Read a run directory's metrics.jsonl."""
    with open(Path(out_dir) / "metrics.jsonl") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


@dataclass
class Claim:
    """Step 2's answer: where the run goes and what it continues from.

    ``finished``: the run is done already (reuse); ``state``: a checkpoint to resume from; ``fresh``: nothing
    of an earlier run may survive beside this one (its files are cleared when the run starts writing).
    """

    out: Path | None
    state: dict[str, Any] | None = None
    finished: RunResult | None = None
    fresh: bool = True
    overwrite: bool = False


def claim(
    out: Path | None,
    cfg: TrainConfig,
    request: dict[str, Any],
    *,
    state: dict[str, Any] | None,
    reuse: bool,
    overwrite: bool,
    log: Any,
) -> Claim:
    """Decide what ``out`` means for this run — before anything is loaded, built or written.

    A resumed run (``state`` given) continues there. Otherwise: the finished run of this config is returned
    with ``reuse`` (unless your factory's code changed since: then it trains again, saying why), a checkpoint
    of it is resumed with ``reuse``, and a directory holding other results is refused unless ``overwrite``.
    """
    if out is None:
        return Claim(None, state, fresh=state is None)
    check_writable(out)
    holder = DirectoryLock.holder(out)
    if holder is not None:
        raise RunDirError(
            f"another normkit train ({holder}) is running on {out}; wait for it to finish or choose another "
            "--out"
        )
    if state is not None:
        return Claim(out, state, fresh=False)
    existing = existing_run(out)
    if existing is not None and reuse:
        same = config_hash(request)
        stale = existing.stale()
        if stale is not None and same in (existing.hash, existing.checkpoint_hash):
            log(f"{stale}: training it again")
            return Claim(out, None, overwrite=True)
        if existing.finished and existing.hash == same:
            return Claim(out, None, finished=existing.result(cfg))
        if existing.checkpoint is not None and existing.checkpoint_hash == same:
            return Claim(out, load_checkpoint(out / "checkpoint.pt"), fresh=False)
    if existing is not None and existing.has_results and not overwrite:
        raise RunDirError(existing.refusal(request, out))
    return Claim(out, None, overwrite=overwrite)
