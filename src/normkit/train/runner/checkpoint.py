"""Checkpoints and run files: plain data written atomically, read with ``weights_only``, clear errors.

Every file of a run directory is written through a temporary file beside it and ``os.replace``: a crash (even
SIGKILL) leaves either the old or the new file, never a torn one. Temporary files left by a killed process are
removed by :func:`remove_stale_temps` when the run directory is next used. Files get the permissions the umask
gives ordinary files (0644 under the usual 022), like any file the user writes.
"""

from __future__ import annotations

import errno
import io
import os
import random
import re
import secrets
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "RunFileError",
    "atomic_write_text",
    "capture_rng",
    "load_checkpoint",
    "remove_stale_temps",
    "restore_rng",
    "save_checkpoint",
]

FORMAT_VERSION = 1
_TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A file that is not a readable normkit checkpoint (empty, truncated, corrupt, another format)."""


class RunFileError(OSError):
    """A run file could not be written (disk full, permissions, ...); the previous file is intact."""


def crash_point(tag: str) -> None:
    """Kill this process at the point ``tag`` (e.g. ``"after-checkpoint:2"``) when the environment variable
    ``NORMKIT_CRASH_AT`` equals it — for crash tests only. A real SIGKILL, so the tests see exactly what a
    power cut or the OOM killer leaves behind."""
    if os.environ.get("NORMKIT_CRASH_AT") == tag:
        os.kill(os.getpid(), signal.SIGKILL)


def _atomic(path: Path, write: Any, crash: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    # os.open with mode 0o666 lets the umask decide the permissions (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if crash:
            crash_point(crash)
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old or the new file
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, RunFileError):
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            reason = "the disk is full" if full else exc.strerror or exc
            raise RunFileError(
                exc.errno or 0, f"cannot write {path}: {reason} (the previous file is intact)"
            ) from exc
        raise


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``directory``; returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.glob(f".*{_TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    _atomic(Path(path), lambda f: f.write(text.encode()))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves a torn file.

    The checkpoint is serialized in memory first and written with one ``write``: a full disk is then an
    ``OSError`` naming it (torch's own zip writer reports it as an opaque ``RuntimeError``).
    """
    tag = f"before-replace-{Path(path).stem}:{state.get('epoch')}"

    def write(f: Any) -> None:
        buffer = io.BytesIO()
        torch.save({"format": FORMAT_VERSION, **state}, buffer)
        f.write(buffer.getbuffer())

    _atomic(Path(path), write, crash=tag)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint as data only (``torch.load(weights_only=True)``): no code runs on load.

    Raises :class:`FileNotFoundError` when there is none and :class:`CheckpointError` (one line, naming the
    file) when the file is empty, truncated, corrupt or not a normkit checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        # torch < 2.14: "Unsupported global: GLOBAL x.y"; 2.14: "Trying to load unsupported GLOBAL x.y ..."
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(exc), re.IGNORECASE)
        if found:
            raise CheckpointError(
                f"{path} holds Python objects ({found.group(1)}), not only tensors and plain data; refused: "
                "checkpoints are loaded weights only, so no code in them runs"
            ) from None
        raise CheckpointError(
            f"{path} ({size:,} bytes) is not a readable checkpoint (truncated or corrupt)"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a normkit checkpoint (format {FORMAT_VERSION})")
    return state


def capture_rng(data_generator: torch.Generator | None = None) -> dict[str, Any]:
    """All RNG states as tensors / plain lists (loadable with ``weights_only=True``)."""
    np_state: Any = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    if data_generator is not None:
        out["data"] = data_generator.get_state()
    return out


def restore_rng(state: dict[str, Any], data_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"].cpu())
