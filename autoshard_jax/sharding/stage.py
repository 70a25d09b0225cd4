"""`ShardedEmbeddingStage`: DLRM embeddings placed on a device mesh by a `ShardingPlan`.

It implements the `EmbeddingStage` protocol of `autoshard_jax.train.step`, so `make_train_step`
trains with it unchanged. The dense half stays data-parallel (replicated parameters, batch split
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from autoshard_jax.data.batch import Batch
from autoshard_jax.models.embedding import check_combiner, uniform_table_init
from autoshard_jax.optim.sparse import RowOptimizer
from autoshard_jax.sharding import mesh as mesh_lib
from autoshard_jax.sharding.device_step import constant_fill, device_lookup, device_update
from autoshard_jax.sharding.layout import state_kinds
from autoshard_jax.sharding.plan import ShardingPlan
from autoshard_jax.tables.spec import TableSpec

P = jax.P
AXIS = mesh_lib.AXIS


class ShardedEmbeddingStage:
    """Embedding stage executing `plan`; params {"slab": [D, R, W]}, state {leaf: [D, ...]}.

    The plan is validated (memory included) before anything is allocated.
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
        self.layout = plan.validate(self.tables, row_optimizer)
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(plan.num_devices, devices)
        if self.mesh.shape[AXIS] != plan.num_devices:
            raise ValueError(f"mesh has {self.mesh.shape[AXIS]} devices, plan needs "
                             f"{plan.num_devices}")
        self.sharded = mesh_lib.batch_sharding(self.mesh)
        self.replicated = mesh_lib.replicated(self.mesh)
        self._fills = constant_fill(row_optimizer, self.kinds)

    # --- parameters and state ---------------------------------------------------------------
    def init_tables(self, rng: jax.Array, chunk_bytes: int = 1 << 28) -> dict:
        """Same values as `LocalEmbeddingStage.init_tables(rng)`, packed per device.

        Tables are drawn in jitted groups of about `chunk_bytes` (one compile per group, bounded
        device memory) and packed on the host, so this runs eagerly, not under jit; the host
        briefly holds the whole model.
        """
        if isinstance(rng, jax.core.Tracer):
            raise TypeError("ShardedEmbeddingStage.init_tables runs eagerly; use "
                            "stage.init_params instead of jitting train.step's init")
        keys = jax.random.split(rng, len(self.tables))
        groups, size = [[]], 0
        for t, s in enumerate(self.tables):
            if groups[-1] and size + s.param_bytes() > chunk_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += s.param_bytes()
        host = {}
        for group in groups:
            specs = [self.tables[t] for t in group]
            draw = jax.jit(lambda ks, specs=specs: [
                uniform_table_init(s.rows)(k, (s.rows, s.dim))
                for s, k in zip(specs, ks, strict=True)])
            values = draw([keys[t] for t in group])
            host.update({s.name: np.asarray(v) for s, v in zip(specs, values, strict=True)})
        return self.tables_from_dict(host)

    @property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """Stacked shapes: the slab and element-wise state ("element"), row-wise state ("row")."""
        lay = self.layout
        return {"row": (lay.num_devices, lay.keys),
                "element": (lay.num_devices, lay.phys_rows, lay.width)}

    def init_state(self, tables: dict) -> dict:
        del tables
        return {name: jnp.full(self._shapes[kind], self._fills[name], jnp.float32,
                               device=self.sharded)
                for name, kind in self.kinds.items()}

    def _stacked(self, fn) -> jax.Array:
        lay = self.layout
        sample = fn(0)
        return jax.make_array_from_callback(
            (lay.num_devices, *sample.shape), self.sharded,
            lambda index: fn(index[0].start or 0)[None])

    def tables_from_dict(self, tables: Mapping[str, np.ndarray]) -> dict:
        """{name: [rows, dim]} -> sharded params, e.g. to import or compare with a local run."""
        return {"slab": self._stacked(lambda d: self.layout.pack_device(tables, d))}

    def tables_to_dict(self, tables: dict, replica_device: int = 0) -> dict[str, np.ndarray]:
        """Sharded params -> {name: [rows, dim]} numpy (replicated tables from one replica)."""
        return self.layout.unpack(np.asarray(tables["slab"]), replica_device=replica_device)

    def state_from_dict(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
        """{table: {leaf: [rows] | [rows, dim]}} (LocalEmbeddingStage layout) -> sharded state."""
        out = {}
        for name, kind in self.kinds.items():
            per_table = {t: s[name] for t, s in state.items()}
            out[name] = self._stacked(
                lambda d, p=per_table, k=kind: self.layout.pack_device(p, d, k == "row"))
        return out

    def state_to_dict(self, state: dict, replica_device: int = 0) -> dict:
        per_leaf = {name: self.layout.unpack(np.asarray(state[name]), kind == "row",
                                             replica_device)
                    for name, kind in self.kinds.items()}
        return {s.name: {name: per_leaf[name][s.name] for name in self.kinds}
                for s in self.tables}

    # --- host preprocessing -------------------------------------------------------------------
    def prepare_batch(self, batch: Batch) -> Batch:
        """Routes a {"dense", "ids", "label"} batch into static shapes on the mesh.

        ids of table t may have fewer than `hotness` columns (padded with -1), never more.
        """
        lay = self.layout
        ids = [np.asarray(x) for x in batch["ids"]]
        if len(ids) != len(self.tables):
            raise ValueError(f"expected ids for {len(self.tables)} tables, got {len(ids)}")
        b = ids[0].shape[0]
        if b % lay.num_devices:
            raise ValueError(f"batch size {b} is not divisible by the {lay.num_devices} devices "
                             "of the plan")
        for t, (s, x) in enumerate(zip(self.tables, ids, strict=True)):
            if x.ndim != 2 or x.shape[0] != b or x.shape[1] > s.hotness:
                raise ValueError(f"table {s.name!r}: ids must be [{b}, <= {s.hotness}], got "
                                 f"{x.shape}")
            if x.size and (x.min() < -1 or x.max() >= s.rows):
                raise ValueError(f"table {s.name!r}: ids must be in [-1, {s.rows}), got "
                                 f"[{x.min()}, {x.max()}]")
            if x.shape[1] < s.hotness:
                x = np.pad(x, ((0, 0), (0, s.hotness - x.shape[1])), constant_values=-1)
            ids[t] = x.astype(np.int32)
        send_BxDxL, rep_BxL = lay.route_ids(ids)
        routed = {"sh": send_BxDxL, "rep": rep_BxL}
        if self.combiner == "mean":
            routed["count"] = np.stack([(x >= 0).sum(1) for x in ids], 1).astype(np.float32)
        put = lambda x: jax.device_put(np.asarray(x), self.sharded)  # noqa: E731
        return {"dense": put(batch["dense"]), "label": put(batch["label"]),
                "ids": {k: put(v) for k, v in routed.items()}}

    # --- the EmbeddingStage protocol ----------------------------------------------------------
    def _meta(self, group) -> dict[str, jax.Array]:
        """This device's row of a GroupMeta (inside shard_map)."""
        d = jax.lax.axis_index(AXIS)
        return jax.tree.map(lambda x: jnp.asarray(x)[d], group.arrays())

    def lookup(self, tables: dict, ids: dict) -> tuple[jax.Array, ...]:
        lay = self.layout

        def body(slab_1xRxW, ids_bxDxL, ids_bxLr):
            slab_RxW = slab_1xRxW[0]
            routed_BxL = jax.lax.all_to_all(ids_bxDxL, AXIS, 1, 0, tiled=True)[:, 0]
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
        )(tables["slab"], ids["sh"], ids["rep"])
        if self.combiner == "mean":
            count_BxT = jnp.maximum(ids["count"], 1.0)
            pooled = tuple(p / count_BxT[:, t:t + 1] for t, p in enumerate(pooled))
        return pooled

    def update(self, tables: dict, state: dict, ids: dict, g_pooled: Sequence[jax.Array],
               step: jax.Array) -> tuple[dict, dict]:
        lay = self.layout
        g_pooled = tuple(g_pooled)
        if self.combiner == "mean":
            count_BxT = jnp.maximum(ids["count"], 1.0)
            g_pooled = tuple(g / count_BxT[:, t:t + 1] for t, g in enumerate(g_pooled))
        names = sorted(self.kinds)

        def body(slab_1xRxW, state_leaves, ids_bxDxL, ids_bxLr, step, g_pooled):
            b = ids_bxDxL.shape[0]
            g_bxDxO = jnp.stack([self._columns(g_pooled, lay.sh, d, lay.sh.num_cols, b)
                                 for d in range(lay.num_devices)], axis=1)
            g_BxO = jax.lax.all_to_all(g_bxDxO, AXIS, 1, 0, tiled=True)[:, 0]
            routed_BxL = jax.lax.all_to_all(ids_bxDxL, AXIS, 1, 0, tiled=True)[:, 0]
            g_rep_bxO = self._columns(g_pooled, lay.rep, 0, lay.rep.num_cols, b)
            rep_ids_BxL = jax.lax.all_gather(ids_bxLr, AXIS, axis=0, tiled=True)
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
        )(tables["slab"], tuple(state[n] for n in names), ids["sh"], ids["rep"],
          jnp.asarray(step), g_pooled)
        return {"slab": slab}, dict(zip(names, leaves, strict=True))

    def _columns(self, g_pooled, group, device: int, num_cols: int, b: int) -> jax.Array:
        """Gradients of the tables that `device` looks up in `group`, in its column order."""
        mine = sorted((c, t) for (d, t), c in group.col.items() if d == device)
        parts = [g_pooled[t] for _, t in mine]
        used = sum(x.shape[1] for x in parts)
        parts.append(jnp.zeros((b, num_cols - used), jnp.float32))
        return jnp.concatenate(parts, axis=1)

    # --- training helpers (duck-typed on train.step.TrainState: sharding sits below train/) ---
    def _dense_init_fn(self, dense_model: nn.Module, dense_tx: optax.GradientTransformation,
                       example_batch: Batch):
        b = np.asarray(example_batch["label"]).shape[0]
        dense_BxD = jnp.asarray(np.asarray(example_batch["dense"]))

        def init_dense(dense_rng):
            pooled = tuple(jnp.zeros((b, s.dim), jnp.float32) for s in self.tables)
            params = dense_model.init(dense_rng, dense_BxD, pooled)["params"]
            return params, dense_tx.init(params)

        return init_dense

    def init_params(self, rng: jax.Array, dense_model: nn.Module,
                    dense_tx: optax.GradientTransformation, example_batch: Batch
                    ) -> tuple[dict, dict]:
        """(params, opt_state) as `train.step.init_train_state` builds them (same rng use, same
        values), laid out on the mesh; wrap them in a TrainState with a replicated step."""
        emb_rng, dense_rng = jax.random.split(rng)
        tables = self.init_tables(emb_rng)
        init_dense = self._dense_init_fn(dense_model, dense_tx, example_batch)
        dense_params, dense_opt = jax.jit(init_dense, out_shardings=self.replicated)(dense_rng)
        return ({"embedding": tables, "dense": dense_params},
                {"embedding": self.init_state(tables), "dense": dense_opt})

    def abstract_params(self, dense_model: nn.Module, dense_tx: optax.GradientTransformation,
                        example_batch: Batch) -> tuple[dict, dict]:
        """Shapes, dtypes and shardings of `init_params`' result, allocating nothing: the target
        a checkpoint restores into and the step compiles against."""
        shapes = self._shapes
        sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32,  # noqa: E731
                                                 sharding=self.sharded)
        init_dense = self._dense_init_fn(dense_model, dense_tx, example_batch)
        dense_params, dense_opt = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
            jax.eval_shape(init_dense, jax.random.key(0)))
        return ({"embedding": {"slab": sds(shapes["element"])}, "dense": dense_params},
                {"embedding": {name: sds(shapes[kind]) for name, kind in self.kinds.items()},
                 "dense": dense_opt})

    def state_shardings(self, state):
        """NamedShardings of a TrainState-like pytree (`.params`, `.opt_state`, `.replace`):
        embedding leaves split over "d", everything else replicated."""
        rep = jax.tree.map(lambda _: self.replicated, state)
        shard = lambda tree: jax.tree.map(lambda _: self.sharded, tree)  # noqa: E731
        return rep.replace(
            params={**rep.params, "embedding": shard(state.params["embedding"])},
            opt_state={**rep.opt_state, "embedding": shard(state.opt_state["embedding"])})

    def jit(self, train_step, state):
        """`train.step.make_train_step(dense, self, tx)` jitted with the state's shardings and
        donation; one compilation per plan (batches from `prepare_batch` have static shapes)."""
        shardings = self.state_shardings(state)
        return jax.jit(train_step, in_shardings=(shardings, None),
                       out_shardings=(shardings, None), donate_argnums=0)
