"""Run identity: what a checkpoint's run was, so a resume with another config is refused.

Stored in each checkpoint's JSON record beside the data position (train/checkpoint.py) and
checked against the config *before* any array is restored, so a mismatch is one line listing the
differing keys with both values instead of a shape error deep inside orbax. It covers every field
that changes the training data stream, the model, the optimizers, the tables and the plan; fields
a run may change when resumed (num_train_steps, log/eval/checkpoint intervals, eval data) are left
out on purpose.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from autoshard_jax.errors import ResumeError

# Fields of config.data that decide the training stream (eval_days / num_eval_batches do not).
_DATA_KEYS = ("kind", "path", "num_dense", "zipf_a", "kaggle_days", "train_days",
              "skip_bad_lines")
# A learning-rate schedule is identified by its values at these steps.
_SCHEDULE_PROBES = (0, 1, 10, 100, 1_000, 10_000, 100_000)


def file_digest(path: str) -> str:
    """SHA-1 of a file's bytes (tables.json, plan.json: their content, not their path)."""
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def _plain(value: Any) -> Any:
    """A JSON-able value as it will read back (tuples -> lists, schedules -> their values)."""
    if callable(value):
        return {"schedule": [float(value(s)) for s in _SCHEDULE_PROBES]}
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return json.loads(json.dumps(value))


def run_identity(config: Any) -> dict:
    """What decides the data order and the state layout; a resumed run must match it.

    Args:
      config: the training config.

    Returns:
      A JSON-able dict of dotted config keys (plus `tables` / `plan`: file digests).
    """
    d = config.data
    identity = {"seed": config.seed, "batch_size": config.batch_size}
    for key in _DATA_KEYS:
        if key in d:
            identity[f"data.{key}"] = d[key]
    if d.get("path"):
        identity["data.path"] = os.path.abspath(d.path)
    for block in ("model", "optim"):
        for key, value in config[block].items():
            identity[f"{block}.{key}"] = value
    if config.get("tables"):  # the tables come from the file, not model.table_rows
        identity["tables"] = file_digest(config.tables)
        identity.pop("model.table_rows", None)
    identity["plan"] = file_digest(config.plan) if config.get("plan") else ""
    return _plain(identity)


def check_same_run(saved: dict, current: dict, where: str, *, saved_as: str = "checkpoint",
                   current_as: str = "config") -> None:
    """Refuses to resume a checkpoint with a config that would read other data or state.

    Args:
      saved: the identity stored in the checkpoint.
      current: `run_identity(config)` of this run.
      where: the checkpoint directory, for the message.
      saved_as, current_as: what the two are called in the message (a launcher resuming a
        workdir from its flags names them so).

    Raises:
      ResumeError: naming every differing key with both values.
    """
    diffs = [f"{k}: {saved_as} {_short(saved.get(k, '<absent>'))}, {current_as} {_short(v)}"
             for k, v in current.items() if _plain(saved.get(k, "<absent>")) != v]
    if diffs:
        raise ResumeError(f"cannot resume from {where}: this run's {current_as} and the "
                          f"{saved_as} disagree ({'; '.join(diffs)}); rerun with the original "
                          f"{current_as} or use a new workdir")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."
