"""The run directory's records as a run writes them: config.json, metrics.jsonl, checkpoint.pt, best.pt and,
last, summary.json (the completion record) — each atomically, under the directory's lock.

The order within an epoch is the crash-safety contract: checkpoint first, then the metrics it contains, so
that after a kill ``metrics.jsonl`` is never ahead of the checkpoint (a resume rewrites it from the
checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from normkit.train.runner.checkpoint import (
    atomic_write_text,
    crash_point,
    remove_stale_temps,
    save_checkpoint,
)
from normkit.train.runner.config import TrainConfig
from normkit.train.runner.rundir import RUN_FILES, Claim, DirectoryLock, RunDirError, existing_run
from normkit.train.runner.sharding import SHARDED_DIR, prune_sharded

__all__ = ["Records"]


class Records:
    """Writes one run's files in ``claim.out`` (nothing when it is None or on ranks other than 0).

    Entering takes the directory's lock — a second ``normkit train --out SAME`` is refused while this one
    runs — and checks again under it that the directory still holds nothing this run would destroy.
    """

    def __init__(self, claim: Claim, cfg: TrainConfig, *, main: bool = True) -> None:
        self.claim = claim
        self.cfg = cfg
        self.out: Path | None = claim.out
        self.write = claim.out is not None and main
        self.lock: DirectoryLock | None = None

    def __enter__(self) -> Records:
        if not self.write:
            return self
        out = self.out
        assert out is not None
        self.lock = DirectoryLock(out, "train", remove=True)
        self.lock.__enter__()
        try:
            if self.claim.fresh and not self.claim.overwrite:
                existing = existing_run(out)  # another run may have finished here since step 2 looked
                if existing is not None and existing.has_results:
                    raise RunDirError(existing.refusal(self.cfg.to_dict(), out))
            remove_stale_temps(out)
            if self.claim.fresh:
                for name in RUN_FILES:  # a fresh start: nothing of an earlier run may survive beside it
                    (out / name).unlink(missing_ok=True)
                prune_sharded(out, set())
            else:
                (out / "summary.json").unlink(missing_ok=True)  # no longer complete until written again
            atomic_write_text(out / "config.json", self.cfg.to_json() + "\n")
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.lock is not None:
            self.lock.__exit__(*exc)

    def metrics(self, metrics: list[dict[str, Any]]) -> None:
        if self.write:
            assert self.out is not None
            atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))

    def epoch(self, trainer: Any, rec: dict[str, Any], rank_rng: Any) -> None:
        """Checkpoint (and best.pt when this epoch is the best), then the metrics."""
        if not self.write:
            return
        assert self.out is not None
        ckpt = trainer.state_dict(rank_rng)
        save_checkpoint(ckpt, self.out / "checkpoint.pt")
        crash_point(f"after-checkpoint:{trainer.epoch}")
        if trainer.best.get("epoch") == rec["epoch"]:
            save_checkpoint(ckpt, self.out / "best.pt")
        if "sharded" in ckpt:  # --fsdp: keep the shards checkpoint.pt and best.pt name, drop older ones
            best = trainer.best.get("epoch")
            prune_sharded(self.out, {ckpt["sharded"], f"{SHARDED_DIR}/epoch-{best}"})
        self.metrics(trainer.metrics)
        crash_point(f"after-metrics:{trainer.epoch}")

    def complete(self, summary: dict[str, Any]) -> None:
        """The completion record, written last: only now is the run finished."""
        if self.write:
            assert self.out is not None
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
