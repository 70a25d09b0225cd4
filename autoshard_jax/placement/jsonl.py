"""Append-only JSONL logs of placement jobs (metrics, results), read back tolerantly."""

from __future__ import annotations

import json
import os


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every complete record; a torn line (a kill mid-write) is skipped, so its work reruns."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
