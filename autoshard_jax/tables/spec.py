"""Embedding-table specifications and the versioned `tables.json` format.

A `TableSpec` is everything the rest of the project needs to know about one table: how many rows,
how wide, how many ids a sample looks up (pooling factor) and how often rows are reused. One
categorical feature reads one table, in the order the specs are listed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

from autoshard_jax.errors import InputError

TABLES_VERSION = 1
NUM_REUSE_BINS = 17  # dlrm_datasets locality bins: (0,1], (1,2], (2,4], ..., (16384,32768], >32768


class TableSpecError(InputError):
    """A table spec or tables.json file that cannot be used; the message names the bad field."""


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One embedding table.

    Attributes:
      name: unique name, used as the parameter key and in sharding plans.
      rows: number of rows (hash size / cardinality).
      dim: embedding width.
      pooling_factor: mean number of ids one sample looks up in this table (>= 1 for multi-hot).
      reuse_hist: optional 17-bin locality signature (fractions of unique rows by access count).
    """

    name: str
    rows: int
    dim: int
    pooling_factor: float = 1.0
    reuse_hist: tuple[float, ...] | None = None

    def __post_init__(self):
        where = f"table {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise TableSpecError(f"table name must be a non-empty string, got {self.name!r}")
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise TableSpecError(f"{where}: 'rows' must be a positive integer, got {self.rows!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise TableSpecError(f"{where}: 'dim' must be a positive integer, got {self.dim!r}")
        pf = self.pooling_factor
        if isinstance(pf, bool) or not isinstance(pf, (int, float)) or not math.isfinite(pf) \
                or pf <= 0:
            raise TableSpecError(f"{where}: 'pooling_factor' must be a positive number, got {pf!r}")
        if self.reuse_hist is not None:
            hist = tuple(self.reuse_hist)
            if len(hist) != NUM_REUSE_BINS:
                raise TableSpecError(
                    f"{where}: 'reuse_hist' must have {NUM_REUSE_BINS} bins, got {len(hist)}")
            if any(not isinstance(h, (int, float)) or not math.isfinite(h) or h < 0
                   for h in hist):
                raise TableSpecError(f"{where}: 'reuse_hist' must hold non-negative numbers")
            object.__setattr__(self, "reuse_hist", tuple(float(h) for h in hist))

    @property
    def hotness(self) -> int:
        """Static number of id slots per sample: the pooling factor rounded up."""
        return max(1, math.ceil(self.pooling_factor))

    def param_bytes(self, bytes_per_value: int = 4) -> int:
        return self.rows * self.dim * bytes_per_value

    def to_json(self) -> dict:
        out = {"name": self.name, "rows": self.rows, "dim": self.dim,
               "pooling_factor": self.pooling_factor}
        if self.reuse_hist is not None:
            out["reuse_hist"] = list(self.reuse_hist)
        return out

    @classmethod
    def from_json(cls, d: dict, index: int = 0) -> TableSpec:
        if not isinstance(d, dict):
            raise TableSpecError(f"tables[{index}] must be an object, got {type(d).__name__}")
        for key in ("name", "rows", "dim"):
            if key not in d:
                raise TableSpecError(f"tables[{index}] is missing required field {key!r}")
        unknown = set(d) - {"name", "rows", "dim", "pooling_factor", "reuse_hist"}
        if unknown:
            raise TableSpecError(f"tables[{index}] ({d.get('name')!r}) has unknown fields "
                                 f"{sorted(unknown)}")
        return cls(name=d["name"], rows=d["rows"], dim=d["dim"],
                   pooling_factor=d.get("pooling_factor", 1.0), reuse_hist=d.get("reuse_hist"))


def check_unique_names(specs: Sequence[TableSpec]) -> None:
    seen = set()
    for s in specs:
        if s.name in seen:
            raise TableSpecError(f"duplicate table name {s.name!r}")
        seen.add(s.name)


def tables_to_json(specs: Sequence[TableSpec]) -> dict:
    check_unique_names(specs)
    return {"version": TABLES_VERSION, "tables": [s.to_json() for s in specs]}


def tables_from_json(d: dict) -> list[TableSpec]:
    if not isinstance(d, dict):
        raise TableSpecError("tables.json must hold a JSON object")
    if isinstance(d.get("version"), bool) or d.get("version") != TABLES_VERSION:
        raise TableSpecError(f"tables.json 'version' must be {TABLES_VERSION}, got "
                             f"{d.get('version')!r}")
    tables = d.get("tables")
    if not isinstance(tables, list) or not tables:
        raise TableSpecError("tables.json 'tables' must be a non-empty list")
    specs = [TableSpec.from_json(t, i) for i, t in enumerate(tables)]
    check_unique_names(specs)
    return specs


def load_versioned_json(path: str | os.PathLike, what: str, parse, error_cls: type[ValueError]):
    """Reads one of the project's JSON interchange files; errors name the file and the field."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file {os.fspath(path)!r} does not exist")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise error_cls(f"{os.fspath(path)}: not valid JSON: {e}") from e
    try:
        return parse(d)
    except error_cls as e:
        raise error_cls(f"{os.fspath(path)}: {e}") from e


def save_tables(path: str | os.PathLike, specs: Sequence[TableSpec]) -> None:
    with open(path, "w") as f:
        json.dump(tables_to_json(specs), f, indent=1)


def load_tables(path: str | os.PathLike) -> list[TableSpec]:
    return load_versioned_json(path, "tables", tables_from_json, TableSpecError)


# Criteo Kaggle (Display Advertising Challenge) categorical cardinalities, in feature order.
CRITEO_KAGGLE_ROWS = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                      8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18,
                      15, 286181, 105, 142572)

# Criteo 1TB vocabularies as used by MLPerf DLRM-DCNv2 (max_ind_range 40M).
CRITEO_1TB_MLPERF_ROWS = (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000,
                          3067956, 405282, 10, 2209, 11938, 155, 4, 976, 14, 40000000, 40000000,
                          40000000, 590152, 12973, 108, 36)


def criteo_tables(rows: Sequence[int], dim: int, rows_cap: int = 0,
                  pooling_factor: float = 1.0) -> list[TableSpec]:
    """Tables named cat_00..cat_NN for the given cardinalities, optionally capped at rows_cap."""
    return [TableSpec(f"cat_{i:02d}", min(r, rows_cap) if rows_cap else r, dim, pooling_factor)
            for i, r in enumerate(rows)]
