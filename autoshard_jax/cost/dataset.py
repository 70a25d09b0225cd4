"""Cost datasets: measured table sets and plans as JSONL, appended one line per measurement.

Each line is one measurement: {"kind": "set" | "plan", "index": i, ...} plus the backend, batch
size and software versions. A collection is resumable: an entry is identified by (kind, index,
repeat) and is never measured twice; a torn last line (a kill mid-write) is dropped on reopen.
Table specs live beside the data in the collection's `tables.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import jax
import numpy as np

from autoshard_jax.errors import DataError
from autoshard_jax.host import cpu_name, host_cpu
from autoshard_jax.sharding.device_step import PROGRAM_VERSION
from autoshard_jax.tables.spec import TableSpec, load_tables

DATA_FILE = "costs.jsonl"
TABLES_FILE = "tables.json"
COLLECTION_FILE = "collection.json"
MS_FIELDS = ("total_ms", "forward_ms", "backward_ms", "compute_ms", "exchange_ms")
INDEX_STRIDE = 10_000_000  # index offset per collection when several are read together


def environment() -> dict:
    """Backend, CPU and versions stamped on every record (costs are only comparable within
    one)."""
    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": device.device_kind,
            "cpu": host_cpu(), "jax": jax.__version__,
            "jaxlib": getattr(jax.lib, "__version__", jax.__version__),
            "program": PROGRAM_VERSION}


def cpu_mismatch(meta: dict) -> str | None:
    """Why a cost model's predictions may not rank this host's costs (its data was measured on
    another CPU type), or None. Models without a recorded CPU are not judged."""
    cpu, here = meta.get("cpu"), cpu_name(host_cpu())
    if meta.get("backend", "cpu") != "cpu" or cpu is None or cpu_name(cpu) == here:
        return None
    return (f"the cost model was fit on costs measured on {cpu_name(cpu)!r}, but this host's "
            f"CPU is {here!r}: its ranking of plans may not hold here (collect costs on this "
            "CPU type: launch/autoshard_pipeline.sh with a new directory)")


def check_program(records: list[dict], where: str) -> None:
    """Raises unless every record timed this code's SPMD program (unstamped records: version 1).

    A collection resumed, or a network trained, across a program change would silently mix
    costs of two programs."""
    stale = sorted({r.get("program", 1) for r in records} - {PROGRAM_VERSION})
    if stale:
        raise DataError(f"{where}: costs measured on SPMD program version {stale}, but this "
                        f"code runs version {PROGRAM_VERSION} (sharding.device_step."
                        "PROGRAM_VERSION), whose steps cost differently: collect afresh in a "
                        "new workdir")


EVERY_DEVICE, BUSIEST = "every_device", "busiest"


def spmd_timing(record: dict) -> str:
    """How a plan record's compute was timed: every device's program, the slowest taken
    (`device_compute_ms` holds them all; the oracle's default since session 33), or the busiest
    device's alone (records before it)."""
    timed = len(record.get("device_compute_ms") or ())
    return EVERY_DEVICE if record["num_devices"] in (1, timed) else BUSIEST


def spmd_timings(records: list[dict], where: str) -> str | None:
    """The one spmd timing of these records' plans (None: no plan), or DataError if they mix
    two: a network fitted to both would learn neither step."""
    timings = {spmd_timing(r) for r in records  # one device: both timings alike
               if r["kind"] == "plan" and r["num_devices"] > 1}
    if len(timings) > 1:
        raise DataError(f"{where}: plan costs timed on every device mixed with plan costs "
                        "timed on the busiest device alone (collected before session 33): "
                        "collect the plans afresh (the oracle now times every device)")
    return timings.pop() if timings else None


def entry_key(record: dict) -> tuple[str, int, bool]:
    return record["kind"], int(record["index"]), record.get("repeat_of") is not None


def read_records(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """All records of a JSONL cost file; with `repair`, a torn last line is cut off the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    records, good_bytes = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            good_bytes += len(line) + (1 if number < len(lines) else 0)
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "kind" not in record or "index" not in record:
                raise ValueError("not a cost record")
        except ValueError as e:
            if number == len(lines) or (number == len(lines) - 1 and not lines[-1]):
                if repair:  # torn write at the end: drop it, the entry is measured again
                    with open(path, "r+b") as f:
                        f.truncate(good_bytes)
                break
            raise DataError(f"{os.fspath(path)}:{number}: not a cost record ({e}); remove or "
                            "fix the line") from e
        records.append(record)
        good_bytes += len(line) + 1
    return records


class RecordWriter:
    """Appends records to a JSONL file, flushed and fsynced line by line (a kill loses none)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_files(paths: str | list[str]) -> Iterator[dict]:
    """Records of one or more cost files or collection directories."""
    for p in [paths] if isinstance(paths, str) else paths:
        path = os.path.join(p, DATA_FILE) if os.path.isdir(p) else p
        if not os.path.exists(path):
            raise FileNotFoundError(f"cost data {path!r} does not exist: run "
                                    "`python -m launch.collect_costs --workdir=DIR` first")
        yield from read_records(path)


def read_collections(paths: list[str], unit_of: list[str] | None = None
                     ) -> tuple[list[dict], dict[str, TableSpec]]:
    """(records, pool by name) of several collections trained on together.

    Entry indices restart in every collection, so the k-th one's are offset by k x
    INDEX_STRIDE: splits and noise pairs never mix two collections' entries, and the first
    collection keeps its own split. Each collection is normalized to its own calibration of the
    reference step (`reference_ms` in its collection.json); times are rescaled to the unit of
    `unit_of` (other collections a model was trained on; default: `paths`), which is its first
    collection's. Collections may come from different pools (random sets from the cost pool,
    planners' plans from the evaluation pool's train half): a name that an earlier collection
    gave another spec is renamed `<name>@<k>` in the k-th collection's records."""
    records, pool = [], {}
    unit = collections_unit(unit_of or paths)
    for k, path in enumerate(paths):
        shift = k * INDEX_STRIDE
        base = path if os.path.isdir(path) else os.path.dirname(path)
        ref = _collection_unit(base)
        if (unit is None) != (ref is None):
            unit_src = "" if unit_of is None else f" (in the unit of {unit_of[0]})"
            raise DataError(f"collections in {paths}{unit_src} mix raw and normalized times "
                            f"({path}: {'raw' if ref is None else 'normalized'}): collect them "
                            "with one protocol")
        scale = unit / ref if unit and ref else 1.0
        raw = list(iter_files(path))  # first: a missing collection is named as such
        check_program(raw, path)
        renamed = {}
        for spec in load_tables(os.path.join(base, TABLES_FILE)):
            if pool.setdefault(spec.name, spec) != spec:
                renamed[spec.name] = name = f"{spec.name}@{k}"
                pool[name] = dataclasses.replace(spec, name=name)
        records += [{**r, **{f: r[f] * scale for f in MS_FIELDS if f in r},
                     **({"device_compute_ms": [ms * scale for ms in r["device_compute_ms"]]}
                        if r.get("device_compute_ms") else {}),
                     "index": r["index"] + shift,
                     "repeat_of": None if r.get("repeat_of") is None else r["repeat_of"] + shift,
                     **_renamed_tables(r, renamed)}
                    for r in raw]
    return records, pool


def _renamed_tables(record: dict, renamed: dict[str, str]) -> dict:
    """The record's table-name fields with `renamed` applied (nothing when it is empty)."""
    if not renamed:
        return {}
    out = {"tables": [renamed.get(n, n) for n in record["tables"]]}
    if "placements" in record:
        out["placements"] = {renamed.get(n, n): p for n, p in record["placements"].items()}
    return out


def collections_unit(paths: list[str]) -> float | None:
    """The unit `read_collections(paths)` rescales every time to: the first collection's."""
    first = paths[0]
    return _collection_unit(first if os.path.isdir(first) else os.path.dirname(first))


def _collection_unit(base: str) -> float | None:
    """The reference step's calibrated ms a collection is normalized to (None: raw times)."""
    path = os.path.join(base, COLLECTION_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    return saved.get("reference_ms") if saved.get("normalize", True) else None


def noise_pairs(records: list[dict], kind: str, field: str = "total_ms") -> np.ndarray:
    """[P, 2] (first, repeated) measurements of the entries measured twice."""
    first = {r["index"]: r[field] for r in records
             if r["kind"] == kind and r.get("repeat_of") is None}
    pairs = [(first[r["repeat_of"]], r[field]) for r in records
             if r["kind"] == kind and r.get("repeat_of") is not None and r["repeat_of"] in first]
    return np.asarray(pairs, np.float64).reshape(-1, 2)


def split_of(index: int, seed: int = 0) -> str:
    """Deterministic 80/10/10 train / val / test split by entry index (hash, not order)."""
    h = (index * 2654435761 + seed * 97) % 2**32 / 2**32
    return "train" if h < 0.8 else ("val" if h < 0.9 else "test")
