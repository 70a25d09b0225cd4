"""`ShardedEmbeddingStage`: DLRM embeddings placed on a device mesh by a `ShardingPlan`.

It implements the `autoshard_jax.embedding.EmbeddingStage` protocol, so `make_train_step` trains
with it unchanged. The dense half stays data-parallel (replicated parameters, batch split
over "d"). The embedding half runs inside one `jax.shard_map`:

* table_wise / row_wise: ids go to their owners with an `all_to_all`, each device gathers and
  pools for the whole batch (`device_lookup`), pooled columns come back with a second
  `all_to_all`; row-wise partial sums are added on the way back.
* replicated: looked up locally on the batch shard; ids and gradients are all-gathered so every
  replica applies the same update and stays identical.

The update routes gradients the same way and applies the row optimizer in place on each local
slab (`device_update`). Batches are routed on the host (`prepare_batch`) into static shapes,
so one plan compiles once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from autoshard_jax.data.batch import Batch
from autoshard_jax.embedding.stage import StageIds
from autoshard_jax.embedding.state import TrainState
from autoshard_jax.models.embedding import check_combiner, draw_rows, table_scale
from autoshard_jax.optim.sparse import ELEMENT, ROW, RowOptimizer, state_fills, state_kinds
from autoshard_jax.sharding import mesh as mesh_lib
from autoshard_jax.sharding.device_step import device_lookup, device_update
from autoshard_jax.sharding.lookup_meta import GroupMeta, LookupMeta
from autoshard_jax.sharding.plan import ShardingPlan
from autoshard_jax.tables.spec import TableSpec

P = jax.P
AXIS = mesh_lib.AXIS
INIT_CHUNK_VALUES = 1 << 16  # values drawn per loop iteration of `init_tables`


class ShardedEmbeddingStage:
    """Embedding stage executing `plan`; params {"slab": [D, R, W]}, state {leaf: [D, ...]}.

    The plan is validated (memory included) before anything is allocated.

    Args:
      tables: the table specs, in feature order.
      plan: where each table lives.
      row_optimizer: the sparse optimizer of every table.
      combiner: "sum" or "mean" pooling.
      mesh: a one-axis ("d") mesh of plan.num_devices devices; default: `mesh.make_mesh`.
      devices: the devices of the default mesh (default: jax.devices()).
    """

    def __init__(self, tables: Sequence[TableSpec], plan: ShardingPlan,
                 row_optimizer: RowOptimizer, combiner: str = "sum",
                 mesh: jax.sharding.Mesh | None = None,
                 devices: Sequence[jax.Device] | None = None):
        check_combiner(combiner)
        self.tables = tuple(tables)
        self.plan = plan
        self.row_optimizer = row_optimizer
        self.combiner = combiner
        self.kinds = state_kinds(row_optimizer)
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(plan.num_devices, devices)
        self.layout = plan.validate(self.tables, row_optimizer, num_devices=self.mesh.shape[AXIS])
        self.sharded = mesh_lib.batch_sharding(self.mesh)
        self.replicated = mesh_lib.replicated(self.mesh)
        self._fills = state_fills(row_optimizer)

    # --- parameters and state ---------------------------------------------------------------
    def init_tables(self, rng: jax.Array) -> dict:
        """Same values as `LocalEmbeddingStage.init_tables(rng)`, drawn on the devices.

        Every device runs one loop over its own list of row chunks (`_init_items`, indexed by
        its mesh position) and draws only the rows it holds (`models.embedding.draw_rows`)
        straight into its slab: no host and no other device ever holds a table it does not
        own. One random draw of one shape serves every table, so the program compiles once per
        plan, fast.
        Traceable.
        """
        keys = jax.random.split(rng, len(self.tables))
        slab = jax.jit(self._draw_slabs, in_shardings=self.replicated,
                       out_shardings=self.sharded)(keys)
        return {"slab": slab}

    def _draw_slabs(self, keys: jax.Array) -> jax.Array:
        lay = self.layout
        items = {k: jnp.asarray(v) for k, v in _init_items(lay).items()}
        scale_T = jnp.asarray([table_scale(s) for s in lay.specs], jnp.float32)
        n = -(-INIT_CHUNK_VALUES // lay.width)  # logical rows per item

        def body(keys):
            mine = {k: v[jax.lax.axis_index(AXIS)] for k, v in items.items()}

            def fill(i, slab_RxW):
                it = {k: v[i] for k, v in mine.items()}
                local_N = it["first_local"] + jnp.arange(n, dtype=jnp.int32)
                rows_N = local_N * it["stride"] + it["offset"]
                valid_N = (local_N < it["local_rows"]) & (rows_N < it["rows"])
                scale = scale_T[it["table"]]
                # W values per row, of which the first dim are the table's (`draw_rows`).
                values_NxW = draw_rows(keys[it["table"]], lay.width, jnp.where(valid_N, rows_N, 0),
                                       scale, width=lay.width)
                col_W = jnp.arange(lay.width, dtype=jnp.int32)
                # (row, column) indices, not flat ones: a slab may hold more than 2**31 values.
                row_N = it["row_off"] + local_N // it["pack"]
                col_NxW = ((local_N % it["pack"]) * it["wpad"])[:, None] + col_W[None]
                keep_NxW = valid_N[:, None] & (col_W[None] < it["dim"])
                row_NxW = jnp.where(keep_NxW, row_N[:, None], lay.phys_rows)  # dropped
                return slab_RxW.at[row_NxW, col_NxW].set(values_NxW, mode="drop")

            slab_RxW = jax.lax.pcast(jnp.zeros((lay.phys_rows, lay.width), jnp.float32),
                                     (AXIS,), to="varying")  # each device's own slab
            slab_RxW = jax.lax.fori_loop(0, mine["table"].shape[0], fill, slab_RxW)
            return slab_RxW[None]

        return jax.shard_map(body, mesh=self.mesh, in_specs=P(), out_specs=P(AXIS))(keys)

    @property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """Stacked shapes by state kind: the slab and ELEMENT state [D, R, W], ROW state [D, A]."""
        lay = self.layout
        return {ROW: (lay.num_devices, lay.keys),
                ELEMENT: (lay.num_devices, lay.phys_rows, lay.width)}

    def abstract_tables(self) -> dict:
        return {"slab": jax.ShapeDtypeStruct(self._shapes[ELEMENT], jnp.float32,
                                             sharding=self.sharded)}

    def state_shardings(self, state: TrainState) -> TrainState:
        """Embedding leaves split over "d" (one slab per device), everything else replicated."""
        rep = jax.tree.map(lambda _: self.replicated, state)
        shard = lambda tree: jax.tree.map(lambda _: self.sharded, tree)  # noqa: E731
        return rep.replace(
            params={**rep.params, "embedding": shard(state.params["embedding"])},
            opt_state={**rep.opt_state, "embedding": shard(state.opt_state["embedding"])})

    def init_state(self, tables: dict) -> dict:
        """Constant-filled optimizer state, created on the devices (traceable)."""
        del tables
        return jax.jit(lambda: {name: jnp.full(self._shapes[kind], self._fills[name],
                                               jnp.float32)
                                for name, kind in self.kinds.items()},
                       out_shardings=self.sharded)()

    def _stacked(self, fn) -> jax.Array:
        lay = self.layout
        sample = fn(0)
        return jax.make_array_from_callback(
            (lay.num_devices, *sample.shape), self.sharded,
            lambda index: fn(index[0].start or 0)[None])

    def tables_from_dict(self, tables: Mapping[str, np.ndarray]) -> dict:
        """Sharded params from per-table host arrays (to import, or compare with a local run).

        Args:
          tables: {name: [rows, dim]}.

        Returns:
          {"slab": [D, R, W]} split over "d".
        """
        return {"slab": self._stacked(lambda d: self.layout.pack_device(tables, d))}

    def tables_to_dict(self, tables: dict, replica_device: int = 0) -> dict[str, np.ndarray]:
        """Per-table host arrays from sharded params; `tables_from_dict` inverted.

        Args:
          tables: {"slab": [D, R, W]}.
          replica_device: the device whose copy of replicated tables is returned.

        Returns:
          {name: [rows, dim]} numpy.
        """
        return self.layout.unpack(np.asarray(tables["slab"]), replica_device=replica_device)

    def state_from_dict(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
        """Sharded optimizer state from LocalEmbeddingStage's layout.

        Args:
          state: {table: {leaf: [rows] (ROW) | [rows, dim] (ELEMENT)}}.

        Returns:
          {leaf: [D, A] | [D, R, W]} split over "d".
        """
        out = {}
        for name, kind in self.kinds.items():
            per_table = {t: s[name] for t, s in state.items()}
            out[name] = self._stacked(
                lambda d, p=per_table, k=kind: self.layout.pack_device(p, d, k == ROW))
        return out

    def state_to_dict(self, state: dict, replica_device: int = 0) -> dict:
        """LocalEmbeddingStage's state layout from sharded state; `state_from_dict` inverted."""
        per_leaf = {name: self.layout.unpack(np.asarray(state[name]), kind == ROW,
                                             replica_device)
                    for name, kind in self.kinds.items()}
        return {s.name: {name: per_leaf[name][s.name] for name in self.kinds}
                for s in self.tables}

    # --- host preprocessing -------------------------------------------------------------------
    def prepare_batch(self, batch: Batch) -> Batch:
        """Routes a host batch into static shapes on the mesh (`Layout.route_ids`).

        Args:
          batch: {"dense", "ids", "label"}: this process's rows of the global batch (all of it
            in a single-process run; process p holds rows p*b .. (p+1)*b - 1, the rows of its
            devices); ids of table t may have fewer than `hotness` columns (padded with -1),
            never more; the global B must divide by D. Id values are the data source's to check
            (`data.batch.check_ids`), not re-checked per step here.

        Returns:
          {"dense": [B, Q], "label": [B], "ids": {"sh": [B, D, L], "rep": [B, Lr],
          ("count": [B, T] with the mean combiner)}}, global arrays batch-split over "d"
          (`jax.make_array_from_process_local_data`).
        """
        lay = self.layout
        ids = [np.asarray(x) for x in batch["ids"]]
        if len(ids) != len(self.tables):
            raise ValueError(f"expected ids for {len(self.tables)} tables, got {len(ids)}")
        b = ids[0].shape[0]
        processes = jax.process_count()
        if b * processes % lay.num_devices:
            raise ValueError(f"batch size {b * processes} is not divisible by the "
                             f"{lay.num_devices} devices of the plan")
        for t, (s, x) in enumerate(zip(self.tables, ids, strict=True)):
            if x.ndim != 2 or x.shape[0] != b or x.shape[1] > s.hotness:
                raise ValueError(f"table {s.name!r}: ids must be [{b}, <= {s.hotness}], got "
                                 f"{x.shape}")
            if x.shape[1] < s.hotness:
                x = np.pad(x, ((0, 0), (0, s.hotness - x.shape[1])), constant_values=-1)
            ids[t] = x.astype(np.int32)
        send_BxDxL, rep_BxL = lay.route_ids(ids)
        routed = {"sh": send_BxDxL, "rep": rep_BxL}
        if self.combiner == "mean":
            routed["count"] = np.stack([(x >= 0).sum(1) for x in ids], 1).astype(np.float32)
        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(
                self.sharded, x, (x.shape[0] * processes, *x.shape[1:]))

        return {"dense": put(batch["dense"]), "label": put(batch["label"]),
                "ids": {k: put(v) for k, v in routed.items()}}

    # --- lookup and update ---------------------------------------------------------------------
    def _meta(self, group: GroupMeta) -> LookupMeta:
        """This device's view of a group's metadata (inside shard_map)."""
        d = jax.lax.axis_index(AXIS)
        return jax.tree.map(lambda x: jnp.asarray(x)[d], group.arrays())

    def route(self, ids: StageIds) -> StageIds:
        """Sends ids to their owners once per step; lookup and update both read the result.

        Returns:
          `ids` plus "routed": [D * B, L], device d's block the whole batch's ids of group "sh"
          in its local row numbering, and "rep_all": [D * B, Lr], every device's block the whole
          batch's ids of replicated tables (each replica applies every update).
        """

        def body(ids_bxDxL, ids_bxLr):
            routed_BxL = jax.lax.all_to_all(ids_bxDxL, AXIS, 1, 0, tiled=True)[:, 0]
            return routed_BxL, jax.lax.all_gather(ids_bxLr, AXIS, axis=0, tiled=True)

        routed, rep_all = jax.shard_map(
            body, mesh=self.mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=(P(AXIS), P(AXIS)),
        )(ids["sh"], ids["rep"])
        return {**ids, "routed": routed, "rep_all": rep_all}

    def lookup(self, tables: dict, ids: StageIds) -> tuple[jax.Array, ...]:
        lay = self.layout

        def body(slab_1xRxW, routed_BxL, ids_bxLr):
            slab_RxW = slab_1xRxW[0]
            out_BxO = device_lookup(slab_RxW, routed_BxL, self._meta(lay.sh))
            back_bxDxO = jax.lax.all_to_all(out_BxO[:, None], AXIS, 0, 1, tiled=True)
            rep_bxO = device_lookup(slab_RxW, ids_bxLr, self._meta(lay.rep))
            pooled = []
            for t, s in enumerate(self.tables):
                kind = lay.kinds[t]
                if kind == "table_wise":
                    dev = lay.devices[t]
                    c = lay.sh.col[dev, t]
                    pooled.append(back_bxDxO[:, dev, c:c + s.dim])
                elif kind == "row_wise":
                    c = lay.sh.col[0, t]
                    pooled.append(back_bxDxO[:, :, c:c + s.dim].sum(axis=1))
                else:
                    c = lay.rep.col[0, t]
                    pooled.append(rep_bxO[:, c:c + s.dim])
            return tuple(pooled)

        pooled = jax.shard_map(
            body, mesh=self.mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS)),
            out_specs=tuple(P(AXIS) for _ in self.tables),
        )(tables["slab"], ids["routed"], ids["rep"])
        if self.combiner == "mean":
            count_BxT = jnp.maximum(ids["count"], 1.0)
            pooled = tuple(p / count_BxT[:, t:t + 1] for t, p in enumerate(pooled))
        return pooled

    def update(self, tables: dict, state: dict, ids: StageIds, g_pooled: Sequence[jax.Array],
               step: jax.Array) -> tuple[dict, dict]:
        lay = self.layout
        g_pooled = tuple(g_pooled)
        if self.combiner == "mean":
            count_BxT = jnp.maximum(ids["count"], 1.0)
            g_pooled = tuple(g / count_BxT[:, t:t + 1] for t, g in enumerate(g_pooled))
        names = sorted(self.kinds)

        def body(slab_1xRxW, state_leaves, routed_BxL, rep_ids_BxL, step, g_pooled):
            b = g_pooled[0].shape[0]
            g_bxDxO = jnp.stack([self._columns(g_pooled, lay.sh, d, lay.sh.num_cols, b)
                                 for d in range(lay.num_devices)], axis=1)
            g_BxO = jax.lax.all_to_all(g_bxDxO, AXIS, 1, 0, tiled=True)[:, 0]
            g_rep_bxO = self._columns(g_pooled, lay.rep, 0, lay.rep.num_cols, b)
            g_rep_BxO = jax.lax.all_gather(g_rep_bxO, AXIS, axis=0, tiled=True)
            slab_RxW, new_state = device_update(
                slab_1xRxW[0], {n: x[0] for n, x in zip(names, state_leaves, strict=True)},
                jnp.concatenate([routed_BxL, rep_ids_BxL], axis=1),
                jnp.concatenate([g_BxO, g_rep_BxO], axis=1), step, self._meta(lay.all),
                row_optimizer=self.row_optimizer, kinds=self.kinds)
            return slab_RxW[None], tuple(new_state[n][None] for n in names)

        slab, leaves = jax.shard_map(
            body, mesh=self.mesh,
            in_specs=(P(AXIS), tuple(P(AXIS) for _ in names), P(AXIS), P(AXIS), P(),
                      tuple(P(AXIS) for _ in g_pooled)),
            out_specs=(P(AXIS), tuple(P(AXIS) for _ in names)),
        )(tables["slab"], tuple(state[n] for n in names), ids["routed"], ids["rep_all"],
          jnp.asarray(step), g_pooled)
        return {"slab": slab}, dict(zip(names, leaves, strict=True))

    def _columns(self, g_pooled, group, device: int, num_cols: int, b: int) -> jax.Array:
        """Gradients of the tables that `device` looks up in `group`, in its column order."""
        mine = sorted((c, t) for (d, t), c in group.col.items() if d == device)
        parts = [g_pooled[t] for _, t in mine]
        used = sum(x.shape[1] for x in parts)
        parts.append(jnp.zeros((b, num_cols - used), jnp.float32))
        return jnp.concatenate(parts, axis=1)


def _init_items(lay) -> dict[str, np.ndarray]:
    """Each device's row chunks to draw, as [D, N] int32 arrays (N: the most on any device).

    Item i of device d draws logical rows first_local .. first_local + n - 1 of one placed table
    (global row = local * stride + offset), written at its packed place in the slab. Devices
    with fewer items repeat a no-op item (local_rows 0).
    """
    n = -(-INIT_CHUNK_VALUES // lay.width)
    per_device = []
    for d in range(lay.num_devices):
        items = []
        for p in lay.placed[d]:
            s = lay.specs[p.table]
            stride, offset = (lay.num_devices, d) if p.kind == "row_wise" else (1, 0)
            for first in range(0, p.local_rows, n):
                items.append((p.table, first, p.local_rows, stride, offset, s.rows, p.row_off,
                              p.pack, p.wpad, s.dim))
        per_device.append(items)
    num = max(1, max(len(items) for items in per_device))
    fields = ("table", "first_local", "local_rows", "stride", "offset", "rows", "row_off",
              "pack", "wpad", "dim")
    out = {f: np.zeros((lay.num_devices, num), np.int32) for f in fields}
    out["stride"][:] = out["pack"][:] = 1
    for d, items in enumerate(per_device):
        for i, item in enumerate(items):
            for f, v in zip(fields, item, strict=True):
                out[f][d, i] = v
    return out
