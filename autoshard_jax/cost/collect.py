"""Collects cost data: random table sets (1-15 tables) and random plans from a pool, measured by
the oracle and appended to `<workdir>/costs.jsonl` (see `dataset.py`).

Entry i of each kind is a pure function of (seed, i), so a resumed collection measures exactly
the entries a single run would have, and skips those already on disk. Every `repeat_every`-th
entry is measured a second time to give the noise floor the cost models are judged against.
Costs are normalized by the oracle's reference step (`oracle.reference_ms`); the collection
stores the reference's calibrated time and a resumed run measures in that same unit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from autoshard_jax.cost import dataset
from autoshard_jax.cost.oracle import measure_plan, measure_set, reference_ms, set_reference_ms
from autoshard_jax.cost.timing import Protocol
from autoshard_jax.errors import ConfigError, ResumeError, check_range
from autoshard_jax.sharding.plan import ShardingPlan
from autoshard_jax.sharding.synthetic_plans import (
    greedy_bytes_plan,
    random_plan,
    skewed_plan,
    unlimited_memory,
)
from autoshard_jax.tables.spec import TableSpec, load_tables, save_tables

# class_balanced: every width class's lookups spread evenly (what the spmd placers aim at), then a
# few random moves, so the data covers the near-optimal region that search and policy explore.
PLAN_STYLES = ("random", "skewed", "balanced", "class_split", "class_balanced")
_CLEAR_EVERY = 50


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    """What a collection measures; stored in the workdir and checked on resume."""

    num_sets: int = 2000
    num_plans: int = 500
    batch_size: int = 512
    max_tables: int = 15
    min_tables: int = 2
    singles: bool = True  # every pool table alone first (False: a top-up of large sets only)
    plan_tables: tuple[int, int] = (8, 40)
    plan_devices: tuple[int, ...] = (2, 4, 8)
    row_optimizer: str = "sgd"
    repeat_every: int = 10
    seed: int = 0
    warmup: int = 5
    repeats: int = 10
    trim: int = 2
    clock: str = "wall"
    normalize: bool = True  # by the oracle's reference step (see timing.Reference)
    # A plan's compute: its slowest device's program (False: the busiest device's alone, as
    # collections before session 33). Checked against the plans on disk when resuming.
    every_device: bool = True

    def check(self, pool_size: int) -> None:
        check_range("num_sets", self.num_sets, low=0, integer=True)
        check_range("num_plans", self.num_plans, low=0, integer=True)
        check_range("batch_size", self.batch_size, low=1, integer=True)
        check_range("max_tables", self.max_tables, low=1, high=pool_size, integer=True)
        check_range("min_tables", self.min_tables, low=1, high=self.max_tables, integer=True)
        check_range("repeat_every", self.repeat_every, low=0, integer=True)
        lo, hi = self.plan_tables
        if self.num_plans and not 1 <= lo <= hi <= pool_size:
            raise ConfigError(f"plan_tables must be 1 <= low <= high <= pool size {pool_size}, "
                              f"got {self.plan_tables}")
        for d in self.plan_devices:
            check_range("plan_devices", d, low=1, integer=True)
            if self.batch_size % d:
                raise ConfigError(f"batch_size {self.batch_size} is not divisible by "
                                  f"plan_devices entry {d}")
        try:
            Protocol(self.warmup, self.repeats, self.trim, self.clock, self.normalize)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def set_task(index: int, pool_size: int, config: CollectConfig) -> list[int]:
    """Pool indices of set i: the first `pool_size` sets are the singles (unless
    `config.singles` is off), then random sets of min_tables..max_tables tables."""
    if config.singles and index < pool_size:
        return [index]
    rng = np.random.default_rng([config.seed, 0, index])
    n = int(rng.integers(config.min_tables, config.max_tables + 1))
    return sorted(int(i) for i in rng.choice(pool_size, n, replace=False))


def plan_task(index: int, pool: Sequence[TableSpec], config: CollectConfig
              ) -> tuple[list[TableSpec], ShardingPlan]:
    """Tables and plan of plan entry i: random size, device count and placement style."""
    rng = np.random.default_rng([config.seed, 1, index])
    lo, hi = config.plan_tables
    num = int(rng.integers(lo, hi + 1))
    specs = [pool[i] for i in sorted(rng.choice(len(pool), num, replace=False))]
    d = int(rng.choice(config.plan_devices))
    style = PLAN_STYLES[index % len(PLAN_STYLES)]
    memory = unlimited_memory(specs)
    seed = int(rng.integers(2**31))
    if style == "random" or d == 1:
        plan = random_plan(specs, d, seed=seed, memory_bytes_per_device=memory)
    elif style == "skewed":
        plan = skewed_plan(specs, d, fraction=float(rng.uniform(0.2, 0.9)), seed=seed,
                           memory_bytes_per_device=memory)
    elif style == "balanced":
        plan = greedy_bytes_plan(specs, d, memory_bytes_per_device=memory, row_wise_above=2.0)
    elif style == "class_balanced":
        mapping = _class_balanced(specs, d, rng)
        plan = ShardingPlan(d, memory, {n: {"type": "table_wise", "device": v}
                                        for n, v in mapping.items()}, {"placer": style})
    else:  # every width class on as few devices as possible: balanced totals, padded classes
        dims = sorted({s.dim for s in specs})
        home = {dim: int(rng.integers(d)) for dim in dims}
        mapping = {s.name: home[s.dim] for s in specs}
        plan = ShardingPlan(d, memory, {n: {"type": "table_wise", "device": v}
                                        for n, v in mapping.items()}, {"placer": "class_split"})
    return specs, dataclasses.replace(plan, meta={**plan.meta, "style": style})


def _class_balanced(specs: Sequence[TableSpec], num_devices: int, rng: np.random.Generator
                    ) -> dict[str, int]:
    """Longest-first per width class onto the device with the least lookups of that class, then
    up to a fifth of the tables moved to random devices."""
    load = {}  # (dim, device) -> lookups
    mapping = {}
    for s in sorted(specs, key=lambda s: (s.dim, -s.pooling_factor, s.name)):
        dev = min(range(num_devices), key=lambda k: (load.get((s.dim, k), 0.0), k))
        load[(s.dim, dev)] = load.get((s.dim, dev), 0.0) + s.pooling_factor
        mapping[s.name] = dev
    names = sorted(mapping)
    for i in rng.choice(len(names), int(rng.integers(0, len(names) // 5 + 1)), replace=False):
        mapping[names[i]] = int(rng.integers(num_devices))
    return mapping


def schedule(config: CollectConfig) -> list[tuple[str, int, bool]]:
    """(kind, index, is_repeat) in measuring order: plans interleaved with sets in proportion,
    so a collection stopped early still holds both kinds; repeats right after their entry."""
    def entries(kind, count):
        for i in range(count):
            yield kind, i, False
            if config.repeat_every and i % config.repeat_every == config.repeat_every - 1:
                yield kind, i, True

    sets, plans = list(entries("set", config.num_sets)), list(entries("plan", config.num_plans))
    order = sorted([(k / max(1, len(sets)), 0, e) for k, e in enumerate(sets)] +
                   [(k / max(1, len(plans)), 1, e) for k, e in enumerate(plans)])
    return [e for _, _, e in order]


_RESUME_KEYS = ("seed", "batch_size", "max_tables", "min_tables", "singles", "plan_tables",
                "plan_devices", "row_optimizer", "warmup", "repeats", "trim", "repeat_every",
                "clock", "normalize")


def prepare_workdir(workdir: str, config, pool: Sequence[TableSpec] | None,
                    keys: Sequence[str] = _RESUME_KEYS) -> list[TableSpec]:
    """Writes (or checks) the collection's config and pool; returns the pool.

    `config` is a dataclass with `check(pool_size)` (a `CollectConfig` or another collector's);
    a rerun must agree with the stored config on `keys`."""
    os.makedirs(workdir, exist_ok=True)
    cfg_path = os.path.join(workdir, dataset.COLLECTION_FILE)
    tables_path = os.path.join(workdir, dataset.TABLES_FILE)
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                saved = json.load(f)
        except json.JSONDecodeError as e:
            raise ResumeError(f"{cfg_path}: not valid JSON ({e}); delete the workdir or fix "
                              "it") from e
        # a key added since the collection was written reads as its default
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        saved = {k: defaults[k] for k in keys if k not in saved and k in defaults} | saved
        diff = [f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in keys
                if saved.get(k) != wanted[k]]
        if diff:
            raise ResumeError(f"{workdir} holds a collection with other settings ("
                              f"{'; '.join(diff)}); use a new --workdir or the same flags")
        stored = load_tables(tables_path)
        if pool is not None and list(pool) != stored:
            raise ResumeError(f"{tables_path} differs from the pool given now; use a new "
                              "--workdir or the same --tables")
        pool = stored
        config.check(len(pool))
        if "reference_ms" in saved:
            wanted["reference_ms"] = saved["reference_ms"]
    else:
        if pool is None:
            raise ConfigError("a new collection needs a pool of tables")
        config.check(len(pool))  # before anything is written: a bad config leaves no trace
        save_tables(tables_path, pool)
    with open(cfg_path, "w") as f:
        json.dump(wanted, f, indent=1)
    return list(pool)


def check_spmd_timing(on_disk: list[dict], every_device: bool, path: str) -> None:
    """Raises unless the plans on disk were timed as this run times them (a resumed
    collection would mix the slowest device's programs with the busiest's)."""
    wanted = dataset.EVERY_DEVICE if every_device else dataset.BUSIEST
    found = dataset.spmd_timings(on_disk, path)
    if found not in (None, wanted):
        said = {dataset.EVERY_DEVICE: "every device's program (the slowest taken)",
                dataset.BUSIEST: "the busiest device's program alone"}
        raise ResumeError(f"{path}: its plans' compute is {said[found]}, this run times "
                          f"{said[wanted]}: use a new workdir")


def pin_reference_unit(workdir: str, clock: str, log: Callable[[str], None],
                        first_shard: bool) -> None:
    """Measures in the unit the collection started with, or stores this process's."""
    cfg_path = os.path.join(workdir, dataset.COLLECTION_FILE)
    with open(cfg_path) as f:
        saved = json.load(f)
    if "reference_ms" not in saved and not first_shard:
        raise ConfigError(f"{cfg_path} has no reference_ms yet: start shard 0 first (it "
                          "calibrates the unit every shard measures in)")
    if "reference_ms" in saved:
        now = reference_ms(clock)
        set_reference_ms(saved["reference_ms"], clock)
        log(f"costs normalized to the reference step at {saved['reference_ms']:.3f} ms "
            f"(calibrated when the collection started; {now:.3f} ms now)")
        return
    saved["reference_ms"] = reference_ms(clock)
    with open(cfg_path, "w") as f:
        json.dump(saved, f, indent=1)
    log(f"costs normalized to the reference step, calibrated at {saved['reference_ms']:.3f} ms")


def collect(workdir: str, config: CollectConfig, pool: Sequence[TableSpec] | None = None,
            log: Callable[[str], None] = print, stop_after: int | None = None,
            shard: tuple[int, int] = (0, 1)) -> dict:
    """Measures every missing entry; returns counts {"sets", "plans", "measured"}.

    `stop_after` ends the run after that many new measurements (tests use it as a clean kill).
    `shard=(k, n)` measures every n-th entry of the schedule from the k-th: n processes, each
    on its own core, fill one collection n times faster (records are appended one write each; start
    shard 0 first, the others measure in the unit it calibrates).
    """
    k, n = shard
    check_range("num_shards", n, low=1, integer=True)
    check_range("shard_index", k, low=0, high=n - 1, integer=True)
    pool = prepare_workdir(workdir, config, pool)
    path = os.path.join(workdir, dataset.DATA_FILE)
    on_disk = dataset.read_records(path, repair=True)
    dataset.check_program(on_disk, path)
    check_spmd_timing(on_disk, config.every_device, path)
    done = {dataset.entry_key(r) for r in on_disk}
    protocol = Protocol(config.warmup, config.repeats, config.trim, config.clock,
                        config.normalize)
    if config.normalize:
        pin_reference_unit(workdir, config.clock, log, first_shard=k == 0)
    env = dataset.environment()
    todo = [t for t in schedule(config)[k::n] if t not in done]
    log(f"{len(done)} entries on disk, {len(todo)} to measure")
    start, measured = time.perf_counter(), 0
    with dataset.RecordWriter(path) as writer:
        for kind, index, repeat in todo:
            if stop_after is not None and measured >= stop_after:
                break
            base = {"kind": kind, "index": index, "batch_size": config.batch_size,
                    "row_optimizer": config.row_optimizer, **env,
                    "repeat_of": index if repeat else None}
            if kind == "set":
                members = set_task(index, len(pool), config)
                specs = [pool[i] for i in members]
                cost = measure_set(specs, config.batch_size, row_optimizer=config.row_optimizer,
                                   protocol=protocol, seed=index)
                record = {**base, "tables": [s.name for s in specs], **dataclasses.asdict(cost)}
            else:
                specs, plan = plan_task(index, pool, config)
                cost = measure_plan(specs, plan, config.batch_size,
                                    row_optimizer=config.row_optimizer, protocol=protocol,
                                    seed=index, every_device=config.every_device)
                record = {**base, "tables": [s.name for s in specs],
                          "num_devices": plan.num_devices, "placements": plan.placements,
                          "style": plan.meta["style"], **dataclasses.asdict(cost)}
            writer.write(record)
            measured += 1
            if measured % _CLEAR_EVERY == 0:
                jax.clear_caches()  # every entry compiles new shapes: bound the process's memory
            if measured % 25 == 0 or measured == len(todo):
                rate = (time.perf_counter() - start) / measured
                log(f"{measured}/{len(todo)} measured, {rate:.2f} s each, ETA "
                    f"{rate * (len(todo) - measured) / 60:.1f} min")
    records = dataset.read_records(path)
    return {"sets": sum(r["kind"] == "set" for r in records),
            "plans": sum(r["kind"] == "plan" for r in records), "measured": measured}
