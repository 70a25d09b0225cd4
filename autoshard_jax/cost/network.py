"""The neural cost model: DeepSets over a device's tables, for both cost settings.

Per table, an encoder maps normalised features to an embedding; a device is the *sum* of its
tables' embeddings (fused multi-table costs are not additive in ms, but they are a function of
the set, which a sum of learned embeddings can represent).

* max_device (the papers'): heads on a device's sum predict its forward and backward ms; a plan
  costs its slowest device.
* spmd (this project's execution): every width class is padded to its most loaded device, so the
  plan's program is described by the element-wise *max over devices* of each class's per-device
  sum; a class head turns that and one device's own tables into that device's ms, summed over
  classes, and the step waits for the slowest device; plus an exchange head for the
  collectives (zero on one device): their exact per-sample traffic (`exchange_terms`) times a
  learned ms per unit.

Heads output log-ms, so the sums stay positive and relative errors are what training minimises.
`CostModel.cost_fn(feats_TxF, assign_TxD, class_TxK) -> (device_ms_D, spmd_ms)` is pure, jittable
and vmappable: the placement policy and search score thousands of plans with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from autoshard_jax.cost.analytical import BoundCost, exchange_terms
from autoshard_jax.cost.dataset import BUSIEST, EVERY_DEVICE
from autoshard_jax.errors import InputError
from autoshard_jax.sharding.device_step import PROGRAM_VERSION
from autoshard_jax.sharding.layout import padded_width
from autoshard_jax.tables.features import FEATURE_NAMES, NUM_FEATURES
from autoshard_jax.tables.ids import unique_rows
from autoshard_jax.tables.spec import TableSpec

MODEL_VERSION = 3
_DIM = FEATURE_NAMES.index("dim")


def encode_features(feats_TxF: jax.Array, unique_batch: int | None = None) -> jax.Array:
    """Raw table features -> the network's inputs [T, 26]: log scales plus the work terms that
    grow linearly with a table's ids (so sums over tables can stay linear where costs are).

    With `unique_batch` (the batch size the costs refer to), three more [T, 29]: the log of the
    rows a batch touches (`tables.ids.unique_rows`), of those rows' values and of the unique
    share of the lookups. The histogram's bins carry it only through its rarest top bins, which
    a network does not learn from ~1,300 tables: session 30's ensemble erred with a log spread
    of 0.185 on single heavy tables of an unseen pool, most where tables alike in rows, width
    and lookups touch 100 or 2,000 rows."""
    rows, dim, pf, size = (feats_TxF[:, i] for i in range(4))
    hotness = jnp.maximum(1.0, jnp.ceil(pf))
    extra = jnp.stack([jnp.log(rows), jnp.log2(dim), jnp.log1p(pf), jnp.log1p(pf * dim),
                       jnp.log1p(size * 1e3), pf * dim / 256.0, hotness * dim / 256.0,
                       rows * dim / 1e7, jnp.ones_like(pf)], axis=1)
    parts = [extra, feats_TxF[:, 4:]]
    if unique_batch is not None:
        u_T = unique_rows(rows, pf, feats_TxF[:, 4:], unique_batch, xp=jnp)
        lookups_T = jnp.maximum(pf * unique_batch, 1.0)
        parts.append(jnp.stack([jnp.log(u_T), jnp.log(u_T * dim), jnp.log(u_T / lookups_T)],
                               axis=1))
    return jnp.concatenate(parts, axis=1)


NUM_INPUTS = 9 + NUM_FEATURES - 4
NUM_UNIQUE_INPUTS = 3  # with encode_features' unique_batch


def num_inputs(meta: dict) -> int:
    """The network's input width for a model of this provenance (`unique_rows_batch`)."""
    return NUM_INPUTS + (NUM_UNIQUE_INPUTS if unique_rows_batch(meta) is not None else 0)


def unique_rows_batch(meta: dict) -> int | None:
    """The batch size the unique-row inputs are computed at, or None for models fitted without
    them (`unique_rows` in cost_model.json; those of sessions up to 29)."""
    return int(meta["batch_size"]) if meta.get("unique_rows") else None


def times_every_device(meta: dict) -> bool:
    """Whether a model of this provenance predicts every device's padded program, the step
    taking the slowest (`spmd_timing` in cost_model.json; models before session 33 predict the
    busiest device's alone, as their data was timed)."""
    return meta.get("spmd_timing", BUSIEST) == EVERY_DEVICE


NUM_WORK = 4  # columns of work_terms


def work_terms(feats_TxF: jax.Array) -> jax.Array:
    """[T, 4] non-negative terms a device's cost grows with, summed exactly per device: ids x
    width, padded slots x width, table bytes, and 1 (the table count)."""
    rows, dim, pf = feats_TxF[:, 0], feats_TxF[:, 1], feats_TxF[:, 2]
    hotness = jnp.maximum(1.0, jnp.ceil(pf))
    return jnp.stack([pf * dim / 256.0, hotness * dim / 256.0, rows * dim / 1e7,
                      jnp.ones_like(pf)], axis=1)


def width_classes(specs: Sequence[TableSpec]) -> tuple[np.ndarray, tuple[int, ...]]:
    """(class index of each table [T], packed width of each class): the SPMD width classes of
    these tables packed into one slab (width = the widest table, as `sharding.layout` packs)."""
    width = max(s.dim for s in specs)
    packed = [padded_width(s.dim, width) for s in specs]
    widths = tuple(sorted(set(packed)))
    return np.asarray([widths.index(w) for w in packed], np.int32), widths


def class_onehot(specs: Sequence[TableSpec], num_classes: int | None = None) -> np.ndarray:
    """One-hot width class [T, K] (K = `num_classes`, padded, or the number of classes)."""
    cls_T, widths = width_classes(specs)
    k = num_classes or len(widths)
    if len(widths) > k:
        raise InputError(f"{len(widths)} width classes, the cost model takes at most {k}")
    return np.eye(k, dtype=np.float32)[cls_T]


def _exp(log_ms: jax.Array) -> jax.Array:
    """exp of a head's log-ms, bounded: an overflow to inf would turn the zero assignments of
    padded tables (0 * inf) into NaN. The bound passes gradients through (straight-through):
    with a plain clip a head that overshot it got none and stayed there, as session 13's fit
    on the 428 training tables did at step ~200 (train loss 4.4 -> 1856 for good)."""
    return jnp.exp(log_ms + jax.lax.stop_gradient(jnp.clip(log_ms, -20.0, 20.0) - log_ms))


class _MLP(nn.Module):
    sizes: Sequence[int]

    @nn.compact
    def __call__(self, x):
        for i, n in enumerate(self.sizes):
            x = nn.Dense(n)(x)
            if i < len(self.sizes) - 1:
                x = nn.relu(x)
        return x


class CostNet(nn.Module):
    """Inputs are normalised (`CostModel` does it): x_TxI, assign_TxD (0/1), class_TxK (0/1).

    Every head is an additive prior times a learned correction: each table gets its own
    forward / backward ms (what it would cost alone), a device sums them (the sum-of-singles
    estimate) and a DeepSets head over the device's tables multiplies that by exp(correction),
    which is where fusion's non-additivity lives. Starting from the additive estimate makes the
    network at least as good as summing singles from few measurements.

    `tables` (per table, independent of the plan) and `devices` (per assignment) are split so
    that a planner scoring many assignments of one table set encodes the tables once; a
    device's cost depends on its tables only through sums of their rows (`device_ms`), which a
    planner adding one table at a time can keep instead of recomputing.
    """

    hidden: int = 128
    embed_dim: int = 32
    # spmd: the class head predicts every device's padded program and the step takes the
    # slowest (costs timed so, session 33 on); False: the busiest device's alone (older data).
    every_device: bool = True

    def setup(self):
        # attribute names are the parameter names (those of the saved checkpoints)
        self.encoder = _MLP((self.hidden, self.hidden))
        self.embed = nn.Dense(self.embed_dim)
        self.single = nn.Dense(2)
        self.device_head = _MLP((64, 2))
        self.class_head = _MLP((64, 1))
        self.exchange_head = _MLP((64, 1))

    def __call__(self, x_TxI, work_TxW, assign_TxD, class_TxK, logdim_T, traffic_2):
        e_TxE, single_Tx2 = self.tables(x_TxI)
        return self.devices(e_TxE, single_Tx2, work_TxW, assign_TxD, class_TxK, logdim_T,
                            traffic_2)

    def device_ms(self, sums_DxR):
        """(fwd_D, bwd_D) from each device's sums of its tables' rows [e | work | single]."""
        e_DxE, w_DxW, base_Dx2 = jnp.split(sums_DxR, [self.embed_dim,
                                                      self.embed_dim + NUM_WORK], axis=1)
        used_D = w_DxW[:, -1] > 0  # the table count
        # Costs span decades: the corrections also see the log of the exact work totals.
        s_DxE = jnp.concatenate([e_DxE, jnp.log1p(w_DxW), jnp.log(base_Dx2 + 1e-6)], 1)
        corr_Dx2 = self.device_head(s_DxE)
        dev_Dx2 = jnp.where(used_D[:, None], base_Dx2 * _exp(corr_Dx2), 0.0)
        return dev_Dx2[:, 0], dev_Dx2[:, 1]

    def tables(self, x_TxI):
        """(embedding e_TxE, alone-on-a-device forward / backward ms single_Tx2) per table."""
        h_TxH = nn.relu(self.encoder(x_TxI))
        return nn.relu(self.embed(h_TxH)), _exp(self.single(h_TxH))

    def devices(self, e_TxE, single_Tx2, work_TxW, assign_TxD, class_TxK, logdim_T, traffic_2):
        """(fwd_D, bwd_D, compute_C, exchange_ms) of one assignment of the encoded tables:
        compute_C is each device's padded program (C = D; the step's compute is their max), or
        without `every_device` the busiest device's alone (C = 1)."""
        fwd_D, bwd_D = self.device_ms(
            assign_TxD.T @ jnp.concatenate([e_TxE, work_TxW, single_Tx2], axis=1))
        # spmd: per (device, class) sums; the padded program follows each class's busiest
        # device (element-wise max over devices).
        ab_TxDxK = assign_TxD[:, :, None] * class_TxK[:, None, :]
        z_DxKxE = jnp.einsum("tdk,te->dke", ab_TxDxK, e_TxE)
        w_DxKxW = jnp.einsum("tdk,tw->dkw", ab_TxDxK, work_TxW)
        base_DxK = jnp.einsum("tdk,t->dk", ab_TxDxK, single_Tx2.sum(1))
        base_K = base_DxK.max(axis=0)
        m_KxE = jnp.concatenate([z_DxKxE.max(axis=0), jnp.log1p(w_DxKxW.max(axis=0)),
                                 jnp.log(base_K + 1e-6)[:, None]], axis=1)
        # Every device runs the padded program on its own tables: they are its real work, the
        # rest of each class's padded size reads the spare zero row. A step waits for the
        # slowest device (older data timed the busiest, most ids x width, alone).
        own_CxKxE = jnp.concatenate([z_DxKxE, jnp.log1p(w_DxKxW)], axis=2)
        if not self.every_device:
            own_CxKxE = own_CxKxE[jnp.argmax(assign_TxD.T @ work_TxW[:, 0])][None]
        n_K = class_TxK.sum(0)
        width_K = (class_TxK * logdim_T[:, None]).sum(0) / jnp.maximum(n_K, 1.0)
        c, k = own_CxKxE.shape[:2]
        head_in = jnp.concatenate([jnp.broadcast_to(m_KxE, (c, *m_KxE.shape)), own_CxKxE,
                                   jnp.broadcast_to(width_K[:, None], (c, k, 1))], axis=2)
        class_ms_CxK = base_K[None] * _exp(self.class_head(head_in)[..., 0])
        compute_C = jnp.sum(jnp.where(n_K > 0, class_ms_CxK, 0.0), axis=1)
        # exchange: the collectives' traffic (values per sample leaving each device) times a
        # learned time per value, which depends on the device count and the message sizes.
        num_devices = assign_TxD.shape[1]
        share = 1.0 - 1.0 / num_devices
        values = (traffic_2[0] + 2.0 * traffic_2[1]) * share
        ex_in = jnp.concatenate([m_KxE.sum(0), jnp.log(jnp.asarray([num_devices], jnp.float32)),
                                 jnp.asarray([share], jnp.float32), jnp.log1p(traffic_2),
                                 jnp.log1p(values)[None]])
        exchange = values / 256.0 * _exp(self.exchange_head(ex_in)[0])
        exchange = jnp.where(num_devices > 1, exchange, 0.0)
        return fwd_D, bwd_D, compute_C, exchange


@dataclasses.dataclass
class CostModel:
    """A trained cost network with its normalisation statistics and provenance."""

    params: dict
    mean_I: np.ndarray
    std_I: np.ndarray
    meta: dict
    # as the provenance says (`times_every_device`), so a saved model loads as it was
    net: CostNet = dataclasses.field(init=False)

    def __post_init__(self):
        self.net = CostNet(every_device=times_every_device(self.meta))

    def apply(self, params, feats_TxF, assign_TxD, class_TxK):
        """All heads: (fwd_D, bwd_D, compute_C, exchange_ms) for one plan or set (see
        CostNet.devices; the step's compute is compute_C's max)."""
        return self._bind_heads(params, feats_TxF, class_TxK)[0](assign_TxD)

    def _bind_heads(self, params, feats_TxF, class_TxK):
        """(heads(assign_TxD), the device rows [e | work | single], device_ms(sums)) of one
        table set: the tables are encoded once."""
        x_TxI = (encode_features(feats_TxF, unique_rows_batch(self.meta)) - self.mean_I[None]) \
            / self.std_I[None]
        logdim_T = jnp.log2(feats_TxF[:, _DIM])
        work_TxW = work_terms(feats_TxF)
        variables = {"params": params}
        e_TxE, single_Tx2 = self.net.apply(variables, x_TxI, method=CostNet.tables)

        def heads(assign_TxD):
            return self.net.apply(variables, e_TxE, single_Tx2, work_TxW, assign_TxD,
                                  class_TxK, logdim_T,
                                  exchange_terms(feats_TxF, assign_TxD, class_TxK),
                                  method=CostNet.devices)

        def device_ms(sums_DxR):
            fwd_D, bwd_D = self.net.apply(variables, sums_DxR, method=CostNet.device_ms)
            return fwd_D + bwd_D
        return heads, jnp.concatenate([e_TxE, work_TxW, single_Tx2], axis=1), device_ms

    def bind(self, feats_TxF, class_TxK) -> BoundCost:
        """`cost_fn` fixed to one table set (see BoundCost): the tables are encoded once, and a
        device's cost follows from its sums of their rows."""
        heads, rows_TxR, device_ms = self._bind_heads(self.params, feats_TxF, class_TxK)

        def cost_of(assign_TxD):
            fwd_D, bwd_D, compute_C, exchange = heads(assign_TxD)
            return fwd_D + bwd_D, compute_C.max() + exchange
        return BoundCost(cost_of, rows_TxR, device_ms)

    def cost_fn(self, feats_TxF, assign_TxD, class_TxK):
        """(device_ms_D: each device's own tables, papers' cost; spmd_ms: the plan's step)."""
        return self.bind(feats_TxF, class_TxK).cost_of(assign_TxD)

    def update(self, records: list[dict], pool: dict[str, TableSpec] | None = None
               ) -> CostModel:
        """A copy fine-tuned on new oracle records ({"kind": "set" | "plan", "tables", ...}
        as `cost.dataset` writes them); table specs from `pool` or each record's "specs"."""
        from autoshard_jax.cost.fit import finetune

        pool = dict(pool or {})
        for r in records:
            pool.update({d["name"]: TableSpec.from_json(d) for d in r.get("specs", ())})
        return finetune(self, records, pool)

    def predict_sets(self, sets_feats: Sequence[np.ndarray]) -> np.ndarray:
        """Predicted total ms of table sets, each fused on one device (one batched call)."""
        t = max(f.shape[0] for f in sets_feats)
        pad = np.zeros((len(sets_feats), t, NUM_FEATURES), np.float32)
        pad[:, :, :2] = 1.0  # a 1-row, 1-wide table on no device: contributes nothing
        assign = np.zeros((len(sets_feats), t, 1), np.float32)
        for i, f in enumerate(sets_feats):
            pad[i, :len(f)], assign[i, :len(f)] = f, 1.0
        fn = jax.jit(jax.vmap(lambda x, a: self.cost_fn(x, a, a)[0][0]))
        return np.asarray(fn(jnp.asarray(pad), jnp.asarray(assign)), np.float64)


@dataclasses.dataclass(frozen=True)
class CostEnsemble:
    """The mean prediction of cost networks fitted independently (another seed or learning
    rate) to costs in one unit; with `pessimism` k > 0, the mean plus k times the members'
    standard deviation (per device, and of the step).

    A planner that optimises one network finds the plans that network underestimates: on
    session 16's held-out tasks (max_device) the policy's plans measured 2.2% +- 0.7% above its
    network's prediction and the network-guided searches' 3.7% and 9.5% above, relative to the
    heuristics' plans, while two other fits on the same data saw no such bias in the policy's
    plans (+0.1% and -0.1%, +- 0.5%). Those errors are the fit's own, so a mean of fits leaves
    less to exploit; where the fits disagree the cost is least known, and the pessimistic score
    keeps a planner from preferring such plans (as in model-based offline RL).
    """

    members: tuple[CostModel, ...]
    pessimism: float = 0.0

    @property
    def meta(self) -> dict:
        """The first member's provenance (the unit, `reference_ms`, is common to all)."""
        return self.members[0].meta

    def _combine(self, x_M, xp):
        """Mean over the members' axis 0, plus `pessimism` sample standard deviations."""
        mean = xp.mean(x_M, axis=0)
        if not self.pessimism:
            return mean
        return mean + self.pessimism * xp.std(x_M, axis=0, ddof=1)

    def bind(self, feats_TxF, class_TxK) -> BoundCost:
        """As CostModel.bind; the rows are the members' rows side by side."""
        members = [m.bind(feats_TxF, class_TxK) for m in self.members]
        cuts = np.cumsum([b.rows_TxR.shape[1] for b in members])[:-1].tolist()

        def cost_of(assign_TxD):
            outs = [b.cost_of(assign_TxD) for b in members]
            return (self._combine(jnp.stack([o[0] for o in outs]), jnp),
                    self._combine(jnp.stack([o[1] for o in outs]), jnp))

        def device_ms(sums_DxR):
            parts = jnp.split(sums_DxR, cuts, axis=1)
            return self._combine(jnp.stack([b.device_ms(p) for b, p in
                                            zip(members, parts, strict=True)]), jnp)
        return BoundCost(cost_of, jnp.concatenate([b.rows_TxR for b in members], axis=1),
                         device_ms)

    def cost_fn(self, feats_TxF, assign_TxD, class_TxK):
        """The members' combined (device_ms_D, spmd_ms)."""
        return self.bind(feats_TxF, class_TxK).cost_of(assign_TxD)

    def update(self, records: list[dict], pool: dict[str, TableSpec] | None = None
               ) -> CostEnsemble:
        """Every member fine-tuned on the same new oracle records."""
        return CostEnsemble(tuple(m.update(records, pool) for m in self.members), self.pessimism)

    def predict_sets(self, sets_feats: Sequence[np.ndarray]) -> np.ndarray:
        """The members' combined predicted total ms of each set fused on one device."""
        return self._combine(np.asarray([m.predict_sets(sets_feats) for m in self.members]), np)


def init_params(net: CostNet, rng: jax.Array, inputs: int = NUM_INPUTS) -> dict:
    t, d, k = 3, 2, 2
    return net.init(rng, jnp.zeros((t, inputs)), jnp.ones((t, 4)), jnp.ones((t, d)),
                    jnp.ones((t, k)), jnp.zeros((t,)), jnp.ones((2,)))["params"]


def save_cost_model(workdir: str, model: CostModel) -> None:
    """Weights and normalisation in an orbax checkpoint, provenance in cost_model.json."""
    path = os.path.abspath(os.path.join(workdir, "cost_model"))
    tree = {"params": model.params, "mean_I": np.asarray(model.mean_I),
            "std_I": np.asarray(model.std_I)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, jax.tree.map(np.asarray, tree), force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(workdir, "cost_model.json"), "w") as f:
        # fitted to costs of this program (cost.dataset refuses others' data)
        json.dump({"version": MODEL_VERSION, **model.meta, "program": PROGRAM_VERSION}, f,
                  indent=1)


def load_cost_model(workdir: str) -> CostModel:
    """The model `launch.train_cost_model --workdir=DIR` wrote."""
    meta_path = os.path.join(workdir, "cost_model.json")
    path = os.path.abspath(os.path.join(workdir, "cost_model"))
    if not os.path.exists(meta_path) or not os.path.isdir(path):
        raise InputError(f"{workdir} holds no cost model (cost_model.json and cost_model/): "
                         "train one with python -m launch.train_cost_model --workdir=DIR")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{meta_path}: not valid JSON ({e})") from e
    if meta.get("version") != MODEL_VERSION:
        raise InputError(f"{meta_path}: cost model version {meta.get('version')!r}, this code "
                         f"reads version {MODEL_VERSION}")
    if meta.get("program", 1) != PROGRAM_VERSION:
        raise InputError(f"{meta_path}: the network predicts costs of SPMD program version "
                         f"{meta.get('program', 1)}, but this code runs version "
                         f"{PROGRAM_VERSION} (sharding.device_step.PROGRAM_VERSION): retrain it "
                         "on costs collected afresh")
    tree = ocp.StandardCheckpointer().restore(path)
    params = jax.tree.map(jnp.asarray, tree["params"])
    return CostModel(params, np.asarray(tree["mean_I"]), np.asarray(tree["std_I"]), meta)


def load_cost_models(workdirs: str, pessimism: float = 0.0) -> CostModel | CostEnsemble:
    """One model, or the ensemble of several comma-separated workdirs (one unit required;
    `pessimism`: see CostEnsemble)."""
    dirs = [d.strip() for d in workdirs.split(",") if d.strip()]
    if not dirs:
        raise InputError(f"no cost model workdir in {workdirs!r}")
    if isinstance(pessimism, bool) or not isinstance(pessimism, (int, float)) \
            or not 0 <= pessimism < float("inf"):
        raise InputError(f"cost pessimism must be a finite number >= 0, got {pessimism!r}")
    if pessimism and len(dirs) < 2:
        raise InputError(f"cost pessimism {pessimism} needs two or more cost model workdirs "
                         f"(it weighs their disagreement), got {workdirs!r}")
    if len(set(dirs)) < len(dirs):
        raise InputError(f"cost model workdirs {workdirs!r} name one workdir twice: an "
                         "ensemble averages distinct fits")
    models = [load_cost_model(d) for d in dirs]
    if len(models) == 1:
        return models[0]
    units = {d: (m.meta.get("reference_ms"), m.meta.get("batch_size"),
                 m.meta.get("spmd_timing", BUSIEST))
             for d, m in zip(dirs, models, strict=True)}
    if len(set(units.values())) > 1:
        raise InputError(f"cost models predict in different units ((reference_ms, batch_size, "
                         f"spmd_timing) "
                         f"{units}): an ensemble averages fits to costs in one unit (the same "
                         "collections)")
    return CostEnsemble(tuple(models), float(pessimism))
