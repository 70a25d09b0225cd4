"""Files written whole or not at all: a kill mid-write leaves the previous version, never a torn
one that a resumed run would fail to parse."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON at `path`, through a sibling temporary file and `os.replace`."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
