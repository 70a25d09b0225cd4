"""Run identity: what a checkpoint's run was, so a resume with another config is refused.

Stored in each checkpoint's JSON record beside the data position (train/checkpoint.py).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from autoshard_jax.errors import ResumeError


def file_digest(path: str) -> str:
    """SHA-1 of a file's bytes (tables.json, plan.json: their content, not their path)."""
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def run_identity(config: Any) -> dict:
    """What decides the data order and the state layout; a resumed run must match it.

    Args:
      config: the training config.

    Returns:
      A JSON-able dict.
    """
    d = config.data
    return {"seed": config.seed, "batch_size": config.batch_size, "data_kind": d.kind,
            "data_path": os.path.abspath(d.path) if d.path else "",
            "train_days": list(d.train_days), "kaggle_days": d.kaggle_days,
            "skip_bad_lines": d.skip_bad_lines,
            "tables": file_digest(config.tables) if config.tables else list(
                config.model.table_rows),
            "plan": file_digest(config.plan) if config.plan else ""}


def check_same_run(saved: dict, current: dict, where: str) -> None:
    """Refuses to resume a checkpoint with a config that would read other data or state.

    Args:
      saved: the identity stored in the checkpoint.
      current: `run_identity(config)` of this run.
      where: the checkpoint directory, for the message.

    Raises:
      ResumeError: naming every differing key.
    """
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in current.items()
             if saved.get(k) != v]
    if diffs:
        raise ResumeError(f"cannot resume from {where}: the config differs from the run that "
                          "wrote it (use a new workdir or the original config):\n  "
                          + "\n  ".join(diffs))
