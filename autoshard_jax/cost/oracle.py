"""The cost oracle: measured embedding costs of table sets and sharding plans.

It times the per-device code that sharded training runs (`sharding.device_step`), on the real
backend (CPU, GPU or TPU), with ids drawn from each table's statistics (`tables.ids`).

* `measure_set` is the papers' protocol: one device runs a fused set of tables; forward (gather +
  pool) and backward (gradient spread + sparse optimizer update) are timed, total is their sum.
* `measure_plan` is this project's SPMD setting: every device runs one program whose width classes
  are padded to the most loaded device (`sharding.lookup_meta`), plus the all_to_all exchange of
  ids, pooled vectors and gradients. Compute is the slowest device's padded program (each timed
  on one device; `every_device=False`: the busiest device's, most ids x width, alone); exchange
  is the plan's collectives timed alone on its mesh.

Every timed repeat is normalized by a fixed reference embedding step run in the same round
(`timing.Reference`, on by default: `Protocol.normalize`), so costs are in "ms at the reference's
calibrated speed"; the reference is calibrated once per process and backend (`reference_ms`), or
pinned to a collection's stored value with `set_reference_ms` so a resumed collection keeps its
unit.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from autoshard_jax.cost.timing import (
    REFERENCE,
    Protocol,
    Reference,
    calibrate,
    time_programs,
    trimmed,
)
from autoshard_jax.errors import InputError
from autoshard_jax.optim.sparse import (
    BYTES_PER_VALUE,
    ELEMENT,
    ROW,
    make_row_optimizer,
    state_fills,
    state_kinds,
)
from autoshard_jax.sharding import mesh as mesh_lib
from autoshard_jax.sharding.device_step import (
    device_embedding_step,
    device_lookup,
    device_meta,
    device_update,
)
from autoshard_jax.sharding.layout import Layout, build_layout
from autoshard_jax.sharding.plan import ShardingPlan
from autoshard_jax.tables.ids import generate_ids
from autoshard_jax.tables.pools import synthetic_pool
from autoshard_jax.tables.spec import TableSpec, check_unique_names

# Learning rate of the timed optimizer step; its value does not change the cost.
_LR = 0.01
DEFAULT_PROTOCOL = Protocol()


# The reference step: a fixed set of five tables from the CPU cost pool (`reference_tables`),
# batch 512, SGD; about 10 ms on a 2-core AMD EPYC. A set like the measured ones moves with the
# host's slow phases as they do (measured: relative spread of one set's repeated measurements
# 0.076 raw -> 0.026 normalized, and normalized / raw within ~6% across sets of 1-14 tables);
# a small reference (two tables, 1 ms) or one drawing fresh ids from a 256 MB table tracked
# them worse (0.043 / no better than raw) and, being cached or not depending on the set timed
# before it, shrank big sets' costs against small ones.
REFERENCE_POOL_TABLES = (3, 17, 40, 77, 101)  # of synthetic_pool(120, seed=0, max_rows=100_000)
REFERENCE_BATCH = 512
_references: dict[tuple[str, int, str], Reference] = {}  # (platform, device id, clock)
_nominal_ms: dict[tuple[str, str], float] = {}  # (platform, clock) -> the unit, ms


class InfeasibleError(InputError):
    """A table set or plan that does not fit the device; names the device and the bytes."""


@dataclasses.dataclass(frozen=True)
class SetCost:
    """Cost of one device's fused tables, ms (trimmed means) and the total's relative spread."""

    forward_ms: float
    backward_ms: float
    total_ms: float
    spread: float
    reference_ms: float = 0.0  # the reference step's raw time meanwhile (0: not normalized)


@dataclasses.dataclass(frozen=True)
class PlanCost:
    """SPMD cost of a plan: padded per-device program + collectives, ms."""

    total_ms: float
    compute_ms: float
    exchange_ms: float
    spread: float
    busiest_device: int  # the device whose program `compute_ms` is (every_device: the slowest)
    exchange_bytes_per_device: int
    reference_ms: float = 0.0  # the reference step's raw time meanwhile (0: not normalized)
    device_compute_ms: tuple[float, ...] = ()  # each device's program (every_device only)


def device_memory_limit(device: jax.Device) -> int:
    """Bytes one device may use: the runtime's limit, or a quarter of host RAM on CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def draw_batch(specs: Sequence[TableSpec], batch_size: int, seed: int) -> tuple[list, list]:
    """(ids per table [B, H], pooled gradients per table [B, dim]) drawn from the specs."""
    rng = np.random.default_rng(seed)
    ids = [generate_ids(s, batch_size, rng) for s in specs]
    grads = [rng.normal(0.0, 1e-3, (batch_size, s.dim)).astype(np.float32) for s in specs]
    return ids, grads


def _device_buffers(layout: Layout, kinds: dict, fills: dict, device: jax.Device):
    """Zeroed slab and constant-filled optimizer state of one device, allocated on it."""
    # Host arrays moved to the device: no per-shape fill program to compile for every set.
    slab = np.zeros((layout.phys_rows, layout.width), np.float32)
    shapes = {ROW: (layout.keys,), ELEMENT: (layout.phys_rows, layout.width)}
    state = {n: np.full(shapes[k], fills[n], np.float32) for n, k in kinds.items()}
    return jax.device_put((slab, state), device)


def _buffer_bytes(layout: Layout, kinds: dict) -> int:
    per_kind = {ROW: layout.keys, ELEMENT: layout.phys_rows * layout.width}
    return BYTES_PER_VALUE * (layout.phys_rows * layout.width +
                              sum(per_kind[k] for k in kinds.values()))


def _whole_step(row_optimizer: str) -> Callable:
    """The whole step (the cost hook, `device_embedding_step`) jitted, slab and state donated.
    A plan's devices run programs of the same shapes that differ only in their arguments (ids,
    metadata), so one such function, its inputs on one device, is traced and compiled once for
    all of them: timing the 8 devices of 40-table plans took 2.5x less time than with one
    function per device (session 33, AMD EPYC Zen 5; the devices' times agreed within noise)."""
    opt = make_row_optimizer(row_optimizer, _LR)
    static = dict(row_optimizer=opt, kinds=tuple(state_kinds(opt).items()))
    return jax.jit(lambda slab, state, ids, g, step, meta: device_embedding_step(
        slab, state, ids, g, step, meta, **static)[1:], donate_argnums=(0, 1))


def _step_programs(layout: Layout, device_index: int, ids, grads, row_optimizer: str,
                   device: jax.Device, split: bool, whole: Callable | None = None):
    """Jitted programs of one device and a function making their fresh initial carries: the
    whole step (`whole`, by default a new `_whole_step`), or with `split` its forward and
    backward + update halves. The carries are donated, so each timing needs its own."""
    opt = make_row_optimizer(row_optimizer, _LR)
    kinds = state_kinds(opt)
    fills = state_fills(opt)
    ids_BxL, g_BxO = layout.device_inputs(ids, grads, device_index)
    meta = jax.device_put(device_meta(layout.all, device_index), device)
    ids_BxL, g_BxO = jax.device_put((ids_BxL, g_BxO), device)
    step = jax.device_put(np.int32(1), device)
    # Inputs are arguments, never closed-over constants: XLA would fold work on constants into
    # the compiled program, so the timing would miss it (and compiling would take seconds).
    inputs = (ids_BxL, g_BxO, step, meta)
    if not split:
        whole = whole or _whole_step(row_optimizer)
        return ({"total": lambda c: whole(*c, *inputs)},
                lambda: {"total": _device_buffers(layout, kinds, fills, device)})
    # A fresh function per build: jax caches traces and executables per function, so a jit of
    # module-level device_lookup kept every set's compiled forward alive after this module's
    # cache let it go (12 memory maps per set; an evaluation died at the kernel's 65,530 maps).
    forward = jax.jit(lambda slab, ids, meta: device_lookup(slab, ids, meta))
    static = dict(row_optimizer=opt, kinds=tuple(kinds.items()))
    update = jax.jit(lambda slab, state, ids, g, step, meta: device_update(
        slab, state, ids, g, step, meta, **static), donate_argnums=(0, 1))
    programs = {"forward": lambda c: (c[0], forward(c[0], ids_BxL, meta)),
                "backward": lambda c: update(*c, *inputs)}
    return programs, lambda: {"forward": (_device_buffers(layout, {}, {}, device)[0], None),
                              "backward": _device_buffers(layout, kinds, fills, device)}


# The programs of this process's recent measurements (least recently used first). An
# evaluation measures the same device sets and plans again and again (every plan in rounds, the
# reference search's incumbent in pairs), and building a set's programs anew retraced and
# recompiled them: 1.3 of the 2.0 s a 12-table set took, against 0.55 s of timing (AMD EPYC).
# The key holds everything a program depends on, the id draw's seed included, so a cached
# program runs exactly what a fresh one would. An entry holds compiled code and the device's
# ids and gradients, never the donated tables: ~10 MB each (RSS grew 609 MB over 60 sets of 4
# tables at batch 512). 160 entries hold a round of a 16-device max_device task (10 plans).
_PROGRAM_CACHE_SIZE = 160
# Compiled code also takes memory maps: ~100 per entry for a 12-table set (AMD EPYC, jax
# 0.10.2), and the kernel stops a process at vm.max_map_count (65,530 by default) with
# "LLVM compilation error: Cannot allocate memory" and a segfault. Past this fraction of the
# limit the older half of the cache is dropped.
_MAP_BUDGET = 0.5
# Resident memory too: a spmd evaluation times every device's program, and its process grew to
# 12.7 GB with 160 cached plans (session 35, AMD EPYC Zen 4) beside another as large, so the
# OOM killer ended it on a 24 GB machine; with 48 entries an 8-device setting still reached
# 7.3 GB. Past this fraction of physical memory the older half is dropped (the pipeline runs
# two evaluations side by side).
_RSS_BUDGET = 0.25
_programs: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
# Of the device's memory (`device_memory_limit`), what the slabs of the device programs timed
# together in one plan's rounds may take.
_CARRY_SHARE = 0.25


def _memory_maps() -> tuple[int, int] | None:
    """(this process's memory maps, the kernel's limit), or None where /proc has neither."""
    try:
        with open("/proc/self/maps") as f:
            count = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return count, int(f.read())
    except (OSError, ValueError):
        return None


def _resident_memory() -> tuple[int, int] | None:
    """(this process's resident bytes, the machine's physical bytes), or None where /proc
    has no statm."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    return pages * page, page * os.sysconf("SC_PHYS_PAGES")


def _under_pressure() -> bool:
    """Whether this process is near the kernel's memory-map limit or its share of memory."""
    maps = _memory_maps()  # ~10 ms at 30k maps, against ~1 s to build
    rss = _resident_memory()
    return ((maps is not None and maps[0] > _MAP_BUDGET * maps[1]) or
            (rss is not None and rss[0] > _RSS_BUDGET * rss[1]))


def _cached_programs(key: tuple, build: Callable[[], tuple]) -> tuple:
    """`build()`'s (programs, fresh carries), reused while `key` is among the recent ones."""
    if key in _programs:
        _programs.move_to_end(key)
        return _programs[key]
    if _programs and _under_pressure():
        for _ in range(len(_programs) // 2 + 1):
            _programs.popitem(last=False)
    _programs[key] = built = build()
    if len(_programs) > _PROGRAM_CACHE_SIZE:
        _programs.popitem(last=False)
    return built


def measure_set(specs: Sequence[TableSpec], batch_size: int, *, row_optimizer: str = "sgd",
                protocol: Protocol = DEFAULT_PROTOCOL, seed: int = 0,
                device: jax.Device | None = None, memory_bytes: int | None = None) -> SetCost:
    """Forward, backward + update and total ms of `specs` fused on one device (papers' cost).

    Args:
      specs: the tables on the device (at least one, unique names).
      batch_size: samples per step; each table sees batch_size x pooling_factor ids.
      row_optimizer: "sgd" (the papers' fused SGD), "rowwise_adagrad" or "adagrad".
      protocol: warm-up / repeats / trim of the timing.
      seed: seeds the id draw.
      device: where to run (default: the first device of the default backend).
      memory_bytes: the device's budget (default: `device_memory_limit`).
    Returns:
      A SetCost; raises InfeasibleError if the tables and state exceed the budget.
    """
    specs = _checked(specs, batch_size)
    device = device or jax.devices()[0]
    layout = build_layout(specs, {s.name: {"type": "table_wise", "device": 0} for s in specs}, 1)
    need = _buffer_bytes(layout, state_kinds(row_optimizer)) * 2  # forward and backward copies
    limit = memory_bytes if memory_bytes is not None else device_memory_limit(device)
    if need > limit:
        raise InfeasibleError(f"tables {[s.name for s in specs]} need {need} bytes on "
                              f"{device} (tables + {row_optimizer} state, timed twice), "
                              f"over its budget of {limit} bytes by {need - limit}")
    programs, carries = _cached_programs(
        ("set", specs, batch_size, row_optimizer, seed, device),
        lambda: _step_programs(layout, 0, *draw_batch(specs, batch_size, seed), row_optimizer,
                               device, split=True))
    timed, ref_ms = _timed(programs, carries(), protocol, device)
    # Training runs the two halves as separate programs too (lookup, then update), so the step
    # is their sum; repeats are interleaved, so repeat r of each half ran back to back.
    total = trimmed([f + b for f, b in zip(timed["forward"].raw_ms, timed["backward"].raw_ms,
                                           strict=True)], protocol.trim)
    return SetCost(timed["forward"].ms, timed["backward"].ms, total.ms, total.spread, ref_ms)


def reference_ms(clock: str, device: jax.Device | None = None) -> float:
    """The reference step's calibrated time on `device`'s backend: the unit of normalized costs
    (calibrated on first use in this process unless `set_reference_ms` pinned it)."""
    return reference_step(device or jax.devices()[0], clock).nominal_ms


def set_reference_ms(ms: float, clock: str, platform: str | None = None) -> None:
    """Pins the unit of normalized costs (a collection resumes in the unit it started with)."""
    if not ms > 0:
        raise InputError(f"reference_ms must be positive, got {ms!r}")
    platform = platform or jax.devices()[0].platform
    _nominal_ms[(platform, clock)] = float(ms)


def use_model_unit(model_meta: Mapping, clock: str) -> float | None:
    """Pins the unit of normalized costs to the one a cost model predicts in (its
    cost_model.json `reference_ms`: its first collection's calibration), so this process's
    measurements compare with its predictions, and with other processes' measurements (the
    unit calibrated per process moved 10-16 ms on one machine in one week). Returns the unit,
    or None where the model records none (older models): then it is calibrated here."""
    ms = model_meta.get("reference_ms")
    if ms is not None:
        set_reference_ms(ms, clock)
    return ms


def reference_tables() -> list[TableSpec]:
    """The tables of the reference step (see REFERENCE_POOL_TABLES)."""
    pool = synthetic_pool(120, seed=0, max_rows=100_000)
    return [pool[i] for i in REFERENCE_POOL_TABLES]


def reference_step(device: jax.Device, clock: str) -> Reference:
    """The reference step on `device` (cached), with its backend's nominal time. Simulated CPU
    devices share the host's cores and memory, so CPU measurements share one reference."""
    if device.platform == "cpu":
        device = jax.devices("cpu")[0]
    key = (device.platform, device.id, clock)
    if key not in _references:
        specs = reference_tables()
        layout = build_layout(specs, {s.name: {"type": "table_wise", "device": 0}
                                      for s in specs}, 1)
        ids, grads = draw_batch(specs, REFERENCE_BATCH, seed=0)
        programs, carries = _step_programs(layout, 0, ids, grads, "sgd", device, split=False)
        ref = calibrate(programs["total"], carries()["total"], clock)
        _nominal_ms.setdefault((device.platform, clock), ref.nominal_ms)
        _references[key] = ref
    ref = _references[key]
    ref.nominal_ms = _nominal_ms[(device.platform, clock)]  # the unit is kept in _nominal_ms alone
    return ref


def _timed(programs, carries, protocol: Protocol, device: jax.Device):
    """time_programs with the reference on `device` when the protocol normalizes."""
    ref = reference_step(device, protocol.clock) if protocol.normalize else None
    timed = time_programs(programs, carries, protocol, ref)
    return timed, (timed[REFERENCE].ms if ref is not None else 0.0)


def busiest_device(layout: Layout) -> int:
    """The device with the most real id values to gather (ids x packed width)."""
    load = [sum(layout.specs[p.table].pooling_factor * p.wpad for p in m) for m in layout.placed]
    return int(np.argmax(load))


def exchange_bytes(layout: Layout, batch_size: int) -> int:
    """Bytes one device sends through the step's collectives (ids once, pooled and grads)."""
    d = layout.num_devices
    ids = batch_size * layout.sh.num_positions * 4 * (d - 1) // d
    vectors = 2 * batch_size * layout.sh.num_cols * 4 * (d - 1) // d
    replicated = 0
    if "replicated" in layout.kinds:  # all_gathers of their ids and gradients
        per_sample = layout.rep.num_positions + layout.rep.num_cols
        replicated = batch_size * per_sample * 4 * (d - 1) // d
    return ids + vectors + replicated


def _exchange_program(layout: Layout, batch_size: int, mesh: jax.sharding.Mesh, ids):
    """The plan's collectives alone, with the sharded stage's shapes: ids routed once per step
    (all_to_all, all_gather of replicated ids), pooled vectors back, gradients forward again,
    all_gather of replicated gradients."""
    axis = mesh_lib.AXIS
    send_BxDxL, rep_BxL = layout.route_ids(ids)
    sharded = mesh_lib.batch_sharding(mesh)
    o_sh, o_rep = layout.sh.num_cols, layout.rep.num_cols

    def body(ids_bxDxL, ids_bxLr):
        b = ids_bxDxL.shape[0]
        routed_BxL = jax.lax.all_to_all(ids_bxDxL, axis, 1, 0, tiled=True)[:, 0]
        out_BxO = jnp.zeros((routed_BxL.shape[0], 1, o_sh), jnp.float32) + \
            routed_BxL[:, :1, None].astype(jnp.float32)
        back_bxDxO = jax.lax.all_to_all(out_BxO, axis, 0, 1, tiled=True)
        g_BxO = jax.lax.all_to_all(back_bxDxO, axis, 1, 0, tiled=True)[:, 0]
        rep_ids = jax.lax.all_gather(ids_bxLr, axis, axis=0, tiled=True)
        g_rep = jax.lax.all_gather(jnp.zeros((b, o_rep), jnp.float32), axis, axis=0, tiled=True)
        return (g_BxO.sum() + rep_ids.sum() + g_rep.sum())[None]

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(jax.P(axis), jax.P(axis)),
                               out_specs=jax.P(axis)))
    args = (jax.device_put(send_BxDxL, sharded), jax.device_put(rep_BxL, sharded))
    return (lambda carry: (fn(*args), carry[1])), (None, None)


def measure_plan(specs: Sequence[TableSpec], plan: ShardingPlan, batch_size: int, *,
                 row_optimizer: str = "sgd", protocol: Protocol = DEFAULT_PROTOCOL, seed: int = 0,
                 devices: Sequence[jax.Device] | None = None, every_device: bool = True
                 ) -> PlanCost:
    """SPMD step cost of a plan's embedding stage: padded compute + collectives.

    Every device runs the same padded shapes, but on its own tables: its real ids gather rows
    spread over those tables, its padding re-reads one zero row. A step waits for the slowest
    device, and the most ids x width need not be it: on session 32's 2-device plans (80, of 18
    tasks) the busiest by that count was not the slowest in 45, whose step it understated by
    0.9-1.4% at the median and up to 23%. So by default every device's program is timed, in
    the same interleaved rounds as far as their slabs fit in memory (else a group at a time),
    and the slowest taken; their programs share one compiled executable (`_whole_step`), so
    this costs D times the timing, not the compiling (`every_device=False`: the busiest
    alone, as sessions up to 32 measured).

    Args:
      specs: every table of the plan.
      plan: the plan (validated here, memory included: an over-budget plan raises PlanError).
      batch_size: global batch (divisible by the plan's device count).
      row_optimizer, protocol, seed: as in `measure_set`.
      devices: the mesh's devices (default: the backend's first `plan.num_devices`).
      every_device: time each device's program and take the slowest (False: the busiest
        device's alone).
    Returns:
      A PlanCost: total = compute (the slowest device's padded program; without
      `every_device` the busiest's) + exchange (the collectives on the mesh, per device: on
      simulated CPU devices the summed time / D).
    """
    specs = _checked(specs, batch_size)
    if batch_size % plan.num_devices:
        raise InputError(f"batch_size {batch_size} is not divisible by the plan's "
                         f"{plan.num_devices} devices")
    layout = plan.validate(specs, row_optimizer)
    mesh = mesh_lib.make_mesh(plan.num_devices, devices)
    dev_list = list(mesh.devices.flat)
    busiest = busiest_device(layout)
    timed_devices = range(plan.num_devices) if every_device else [busiest]

    def build():
        ids, grads = draw_batch(specs, batch_size, seed)
        programs, fresh = {}, {}  # fresh[name](): that program's initial carry
        whole = _whole_step(row_optimizer)  # every device's program on the busiest device
        for d in timed_devices:
            device_programs, carries = _step_programs(layout, d, ids, grads, row_optimizer,
                                                      dev_list[busiest], split=False,
                                                      whole=whole)
            programs[f"device{d}"] = device_programs["total"]
            fresh[f"device{d}"] = lambda carries=carries: carries()["total"]
        if plan.num_devices > 1:
            programs["exchange"], exchange = _exchange_program(layout, batch_size, mesh, ids)
            fresh["exchange"] = lambda: exchange
        return programs, fresh

    placements = tuple(sorted((n, tuple(sorted(p.items()))) for n, p in plan.placements.items()))
    programs, fresh = _cached_programs(
        ("plan", specs, placements, batch_size, row_optimizer, seed, tuple(dev_list),
         every_device), build)
    # The devices' programs are timed in the same interleaved rounds, as many at once as their
    # slabs (each a copy of the padded device's, live through the rounds) fit in a share of
    # the device's memory: the 16 slabs of a lopsided 16-device plan took 19 GB.
    per_group = max(1, int(_CARRY_SHARE * device_memory_limit(dev_list[busiest]) //
                           _buffer_bytes(layout, state_kinds(row_optimizer))))
    names = [f"device{d}" for d in timed_devices]
    timed, refs = {}, []
    for k in range(0, len(names), per_group):
        group = names[k:k + per_group] + (["exchange"] if k == 0 and "exchange" in programs
                                          else [])
        part, ref = _timed({n: programs[n] for n in group}, {n: fresh[n]() for n in group},
                           protocol, dev_list[busiest])
        timed.update(part)
        refs.append(ref)
    ref_ms = float(np.mean(refs))
    device_ms = {d: timed[f"device{d}"] for d in timed_devices}
    slowest = max(device_ms, key=lambda d: device_ms[d].ms)
    compute = device_ms[slowest].ms
    exchange = timed["exchange"].ms if "exchange" in timed else 0.0
    if dev_list[0].platform == "cpu":
        # Simulated devices share this process's cores: the collectives' time is every device's
        # share summed. One device's share (/ D) is what each waits on parallel hardware, and
        # what one device's compute above is comparable to.
        exchange /= plan.num_devices
    return PlanCost(compute + exchange, compute, exchange, device_ms[slowest].spread, slowest,
                    exchange_bytes(layout, batch_size) if plan.num_devices > 1 else 0, ref_ms,
                    tuple(t.ms for t in device_ms.values()) if every_device else ())


def _checked(specs: Sequence[TableSpec], batch_size: int) -> tuple[TableSpec, ...]:
    specs = tuple(specs)
    if not specs:
        raise InputError("a table set needs at least one table")
    check_unique_names(specs)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return specs
