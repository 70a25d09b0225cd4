"""Training the cost network on oracle measurements, its baselines, and the held-out report.

Records (see `dataset.py`) are split 80/10/10 by entry index; the network is trained on "train",
its best step chosen on "val", and every model is scored on "test" only. Baselines, on the same
split: the sum of single-table costs (the additive assumption fused costs break), a linear model
on summed table features, and the analytical TorchRec-style estimator with its one bandwidth
constant fitted on "train".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from autoshard_jax.cost import dataset
from autoshard_jax.cost.analytical import analytical_cost_fn
from autoshard_jax.cost.network import (
    CostModel,
    class_onehot,
    encode_features,
    init_params,
    num_inputs,
    unique_rows_batch,
)
from autoshard_jax.errors import DataError
from autoshard_jax.tables.features import FEATURE_NAMES, table_features
from autoshard_jax.tables.spec import TableSpec

# A harmless table that fills padded rows (its assignment row is zero, so it adds nothing).
_BINS = FEATURE_NAMES.index("bin_0")  # first reuse-histogram column of the raw features
_PAD_FEATS = table_features([TableSpec("pad", 1, 1)])[0]
MAX_CLASSES = 8


@dataclasses.dataclass
class SetData:
    """Measured sets as one fused device each, padded to T tables: feats [N, T, F], assign
    [N, T, 1] (0 on padding), targets [N]."""

    index: np.ndarray
    feats: np.ndarray
    assign: np.ndarray
    forward: np.ndarray
    backward: np.ndarray
    total: np.ndarray
    names: list


@dataclasses.dataclass
class PlanData:
    """Measured plans with D devices, padded to T tables: feats [M, T, F], assign [M, T, D],
    classes [M, T, K], targets [M], and each device's program [M, D] where every device was
    timed (NaN elsewhere)."""

    index: np.ndarray
    feats: np.ndarray
    assign: np.ndarray
    classes: np.ndarray
    compute: np.ndarray
    exchange: np.ndarray
    total: np.ndarray
    names: list
    device_compute: np.ndarray


def _pad(rows: np.ndarray, t: int) -> np.ndarray:
    out = np.tile(_PAD_FEATS, (t, 1))
    out[:len(rows)] = rows
    return out


def set_data(records: list[dict], pool: dict[str, TableSpec]) -> SetData:
    sets = [r for r in records if r["kind"] == "set" and r.get("repeat_of") is None]
    if not sets:
        raise DataError("no measured table sets in the cost data")
    t = max(len(r["tables"]) for r in sets)
    feats, assign = [], []
    for r in sets:
        specs = [_spec(pool, n) for n in r["tables"]]
        feats.append(_pad(table_features(specs), t))
        a = np.zeros((t, 1), np.float32)
        a[:len(specs)] = 1.0
        assign.append(a)
    col = lambda k: np.asarray([r[k] for r in sets], np.float64)  # noqa: E731
    return SetData(col("index").astype(int), np.stack(feats), np.stack(assign), col("forward_ms"),
                   col("backward_ms"), col("total_ms"), [r["tables"] for r in sets])


def plan_data(records: list[dict], pool: dict[str, TableSpec]) -> dict[int, PlanData]:
    """Plans grouped by device count (a group shares one padded shape)."""
    plans = [r for r in records if r["kind"] == "plan" and r.get("repeat_of") is None]
    out = {}
    for d in sorted({r["num_devices"] for r in plans}):
        group = [r for r in plans if r["num_devices"] == d]
        t = max(len(r["tables"]) for r in group)
        feats, assign, classes = [], [], []
        for r in group:
            specs = [_spec(pool, n) for n in r["tables"]]
            feats.append(_pad(table_features(specs), t))
            a = np.zeros((t, d), np.float32)
            for i, s in enumerate(specs):
                p = r["placements"][s.name]
                if p["type"] == "table_wise":
                    a[i, p["device"]] = 1.0
                else:  # row_wise / replicated: every device does part / all of the work
                    a[i, :] = 1.0
            assign.append(a)
            c = np.zeros((t, MAX_CLASSES), np.float32)
            c[:len(specs)] = class_onehot(specs, MAX_CLASSES)
            classes.append(c)
        col = lambda k, g=group: np.asarray([r[k] for r in g], np.float64)  # noqa: E731
        per_device = np.asarray([r.get("device_compute_ms") or [r["compute_ms"]] if
                                 dataset.spmd_timing(r) == dataset.EVERY_DEVICE else
                                 [np.nan] * d for r in group], np.float64)
        out[d] = PlanData(col("index").astype(int), np.stack(feats), np.stack(assign),
                          np.stack(classes), col("compute_ms"), col("exchange_ms"),
                          col("total_ms"), [r["tables"] for r in group], per_device)
    return out


def _spec(pool: dict[str, TableSpec], name: str) -> TableSpec:
    if name not in pool:
        raise DataError(f"cost data names table {name!r}, which the pool (tables.json) lacks")
    return pool[name]


def split_mask(index: np.ndarray, part: str, seed: int = 0) -> np.ndarray:
    return np.asarray([dataset.split_of(int(i), seed) == part for i in index])


# --- metrics -------------------------------------------------------------------------------
def mape(pred, true) -> float:
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    return float(np.mean(np.abs(pred - true) / np.abs(true)))


def r2(pred, true) -> float:
    """Coefficient of determination; nan where the target is constant (R^2 is undefined)."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    spread = np.sum((true - true.mean()) ** 2)
    if spread == 0.0:
        return float("nan")
    return float(1.0 - np.sum((pred - true) ** 2) / spread)


def kendall_tau(a, b) -> float:
    """Kendall's tau-b (ties counted in neither direction), O(n^2): n is a few thousand."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    da, db = da[iu], db[iu]
    denom = math.sqrt(float(np.sum(da != 0)) * float(np.sum(db != 0)))
    return float(np.sum(da * db) / denom) if denom else 0.0


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def scores(pred, true) -> dict:
    return {"mape": mape(pred, true), "r2": r2(pred, true), "kendall_tau": kendall_tau(pred, true),
            "n": int(len(true))}


# --- training -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FitConfig:
    steps: int = 3000
    batch_sets: int = 256
    batch_plans: int = 32
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4  # AdamW's decoupled decay
    # Log-normal noise (sd) on each reuse-histogram bin of every table in a training batch, the
    # histogram renormalised: 17 exact bins fingerprint a table, which lets the network learn
    # per-table corrections that do not carry over to unseen tables.
    reuse_noise: float = 0.0
    eval_every: int = 100
    seed: int = 0


def _normaliser(sets: SetData | None, plans: dict[int, PlanData], train: dict,
                batch: int | None):
    rows = []
    if sets is not None:
        m = train["sets"]
        rows.append(sets.feats[m][sets.assign[m][..., 0] > 0])
    for d, p in plans.items():
        m = train[d]
        rows.append(p.feats[m][p.assign[m].sum(-1) > 0])
    x = np.asarray(encode_features(jnp.asarray(np.concatenate(rows)), batch))
    return x.mean(0), np.maximum(x.std(0), 1e-3)


def fit_cost_model(sets: SetData | None, plans: dict[int, PlanData], config: FitConfig,
                   meta: dict, log=print, start: CostModel | None = None
                   ) -> tuple[CostModel, list[dict]]:
    """Trains the network on the train split (both settings at once); keeps the best val step.

    With `start`, fine-tunes that model (its normalisation kept) on all the given data.
    """
    if start is None:
        if "spmd_timing" not in meta:  # a network predicts plans as its data timed them
            meta = {"spmd_timing": plan_timing(plans), **meta}
        train = {"sets": split_mask(sets.index, "train")} if sets is not None else {}
        val = {"sets": split_mask(sets.index, "val")} if sets is not None else {}
        for d, p in plans.items():
            train[d], val[d] = split_mask(p.index, "train"), split_mask(p.index, "val")
        mean_I, std_I = _normaliser(sets, plans, train, unique_rows_batch(meta))
        model = CostModel(None, mean_I, std_I, meta)
        params = init_params(model.net, jax.random.key(config.seed), num_inputs(meta))
    else:
        train = {"sets": np.ones(len(sets.index), bool)} if sets is not None else {}
        train.update({d: np.ones(len(p.index), bool) for d, p in plans.items()})
        val = train
        model = CostModel(start.params, start.mean_I, start.std_I, start.meta)
        params = start.params
    check_timing(model, plans)
    tx = optax.adamw(optax.cosine_decay_schedule(config.learning_rate, config.steps),
                     weight_decay=config.weight_decay)
    opt_state = tx.init(params)

    def set_loss(params, feats, assign, fwd, bwd):
        f, b, _, _ = jax.vmap(lambda x, a: model.apply(params, x, a, a))(feats, assign)
        return jnp.mean((jnp.log(f[:, 0]) - jnp.log(fwd)) ** 2 +
                        (jnp.log(b[:, 0]) - jnp.log(bwd)) ** 2)

    def plan_loss(params, feats, assign, classes, compute, exchange, device_compute):
        _, _, c_MxC, e = jax.vmap(lambda x, a, k: model.apply(params, x, a, k))(
            feats, assign, classes)
        ex_term = jnp.where(exchange > 0, (jnp.log(e) - jnp.log(jnp.maximum(exchange, 1e-6)))
                            ** 2, 0.0)
        if model.net.every_device:  # every device's program is a target of its own
            compute_term = jnp.mean((jnp.log(c_MxC) - jnp.log(device_compute)) ** 2, axis=1)
        else:  # the busiest device's
            compute_term = (jnp.log(c_MxC[:, 0]) - jnp.log(compute)) ** 2
        return jnp.mean(compute_term + ex_term)

    @jax.jit
    def step(params, opt_state, set_batch, plan_batches, key):
        if config.reuse_noise:
            keys = jax.random.split(key, 1 + len(plan_batches))
            if set_batch is not None:
                set_batch = (jitter_reuse(keys[0], set_batch[0], config.reuse_noise),
                             *set_batch[1:])
            plan_batches = tuple((jitter_reuse(k, b[0], config.reuse_noise), *b[1:])
                                 for k, b in zip(keys[1:], plan_batches, strict=True))

        def loss_fn(p):
            loss = set_loss(p, *set_batch) if set_batch is not None else 0.0
            for b in plan_batches:
                loss = loss + plan_loss(p, *b)
            return loss
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    validate = _validator(model, sets, plans, val)
    rng = np.random.default_rng(config.seed)
    noise_key = jax.random.key(config.seed + 1)
    pick = lambda mask, n: rng.choice(np.flatnonzero(mask), n)  # noqa: E731
    best, best_val, history = params, math.inf, []
    for i in range(config.steps):
        set_batch = None
        if sets is not None and train["sets"].any():
            j = pick(train["sets"], config.batch_sets)
            set_batch = (sets.feats[j], sets.assign[j], sets.forward[j], sets.backward[j])
        plan_batches = []
        for d, p in plans.items():
            if train[d].any():
                j = pick(train[d], config.batch_plans)
                plan_batches.append((p.feats[j], p.assign[j], p.classes[j], p.compute[j],
                                     p.exchange[j], p.device_compute[j]))
        key = jax.random.fold_in(noise_key, i) if config.reuse_noise else None
        params, opt_state, loss = step(params, opt_state, set_batch, tuple(plan_batches), key)
        if (i + 1) % config.eval_every == 0 or i + 1 == config.steps:
            v = validate(params)
            history.append({"step": i + 1, "train_loss": float(loss), "val_mape": v})
            if v < best_val:
                best, best_val = jax.tree.map(lambda x: x, params), v
            if (i + 1) % (10 * config.eval_every) == 0:
                log(f"step {i + 1}: train loss {float(loss):.4f}, val MAPE {v:.4f}")
    model.params = best
    return model, history


def plan_timing(plans: dict[int, PlanData]) -> str:
    """How these plans' compute was timed (`dataset.EVERY_DEVICE` where every plan of two or
    more devices has each device's program, or there is none; else `dataset.BUSIEST`)."""
    timed_each = all(not np.isnan(p.device_compute).any() for d, p in plans.items() if d > 1)
    return dataset.EVERY_DEVICE if timed_each else dataset.BUSIEST


def check_timing(model: CostModel, plans: dict[int, PlanData]) -> None:
    """Raises unless the plans were timed as the model predicts them: every device's program
    (`device_compute` known) for an every-device network; a busiest-device network is
    refitted only on busiest-device plans."""
    for d, p in plans.items():
        timed_each = ~np.isnan(p.device_compute).any(axis=1)
        if model.net.every_device and not timed_each.all():
            raise DataError(f"{(~timed_each).sum()} plan(s) of {d} devices were timed on the "
                            "busiest device alone, but the network predicts every device's "
                            "program: collect the plans afresh (the oracle now times every "
                            "device)")
        if not model.net.every_device and d > 1 and timed_each.any():
            raise DataError(f"the network predicts the busiest device's program alone (fitted "
                            f"before session 33), but {timed_each.sum()} plan(s) of {d} "
                            "devices were timed on every device: fit a new network")


def jitter_reuse(key: jax.Array, feats_NxTxF: jax.Array, sigma: float) -> jax.Array:
    """Every table's reuse bins times exp(sigma * N(0, 1)), renormalised to the histogram's
    own total (tables without a histogram, e.g. padding, are left as they are)."""
    bins = feats_NxTxF[..., _BINS:]
    noisy = bins * jnp.exp(sigma * jax.random.normal(key, bins.shape))
    total, new_total = bins.sum(-1, keepdims=True), noisy.sum(-1, keepdims=True)
    noisy = jnp.where(new_total > 0, noisy * total / jnp.maximum(new_total, 1e-30), bins)
    return feats_NxTxF.at[..., _BINS:].set(noisy)


def predict_sets(model: CostModel, sets: SetData, mask: np.ndarray) -> np.ndarray:
    fn = jax.jit(jax.vmap(lambda x, a: model.cost_fn(x, a, a)[0][0]))
    return np.asarray(fn(sets.feats[mask], sets.assign[mask]), np.float64)


def predict_plans(model_fn, plans: PlanData, mask: np.ndarray) -> np.ndarray:
    fn = jax.jit(jax.vmap(lambda x, a, k: model_fn(x, a, k)[1]))
    return np.asarray(fn(plans.feats[mask], plans.assign[mask], plans.classes[mask]), np.float64)


def _validator(model: CostModel, sets, plans, val) -> Callable[[dict], float]:
    """params -> mean validation MAPE over the settings, compiled once per shape."""
    def set_total(params, x, a):
        f, b, _, _ = model.apply(params, x, a, a)
        return f[0] + b[0]

    def plan_total(params, x, a, k):
        _, _, c_C, e = model.apply(params, x, a, k)
        return c_C.max() + e

    set_fn = jax.jit(jax.vmap(set_total, in_axes=(None, 0, 0)))
    plan_fn = jax.jit(jax.vmap(plan_total, in_axes=(None, 0, 0, 0)))
    parts = []
    if sets is not None and val["sets"].any():
        m = val["sets"]
        parts.append((set_fn, (sets.feats[m], sets.assign[m]), sets.total[m]))
    for d, p in plans.items():
        if val[d].any():
            m = val[d]
            parts.append((plan_fn, (p.feats[m], p.assign[m], p.classes[m]), p.total[m]))

    def validate(params) -> float:
        errs = [mape(np.asarray(fn(params, *args), np.float64), y) for fn, args, y in parts]
        return float(np.mean(errs)) if errs else math.inf
    return validate


# --- baselines ------------------------------------------------------------------------------
def _set_feature_sums(sets: SetData, batch: int | None) -> np.ndarray:
    x = np.asarray(jax.vmap(lambda f: encode_features(f, batch))(jnp.asarray(sets.feats)))
    return np.einsum("ntf,nt->nf", x, sets.assign[..., 0])


def _plan_feature_sums(p: PlanData, batch: int | None) -> np.ndarray:
    """Per class, max over devices of summed features (the padded program), summed over
    classes; plus the device count: what a linear model of the SPMD cost can see."""
    x = np.asarray(jax.vmap(lambda f: encode_features(f, batch))(jnp.asarray(p.feats)))
    z = np.einsum("ntf,ntd,ntk->ndkf", x, p.assign, p.classes)
    d = p.assign.shape[-1]
    return np.concatenate([z.max(1).sum(1), np.full((len(p.index), 1), np.log(d))], axis=1)


def _lstsq(x_train, y_train, x_test):
    w, *_ = np.linalg.lstsq(x_train, y_train, rcond=None)
    return x_test @ w


def _scale(pred_train, y_train) -> float:
    return float(pred_train @ y_train / max(pred_train @ pred_train, 1e-30))


def evaluate(model: CostModel, sets: SetData | None, plans: dict[int, PlanData],
             batch_size: int, singles: dict[str, float]) -> dict:
    """Held-out scores of the network and the three baselines, per setting."""
    analytic = analytical_cost_fn(batch_size)
    report = {}
    if sets is not None and split_mask(sets.index, "test").any():
        tr, te = split_mask(sets.index, "train"), split_mask(sets.index, "test")
        y = sets.total
        entry = {"network": scores(predict_sets(model, sets, te), y[te])}
        known = np.asarray([all(n in singles for n in names) for names in sets.names])
        if (te & known).any():
            sums = np.asarray([sum(singles.get(n, 0.0) for n in names) for names in sets.names])
            entry["sum_of_singles"] = scores(sums[te & known], y[te & known])
        feats = _set_feature_sums(sets, unique_rows_batch(model.meta))
        entry["linear"] = scores(_lstsq(feats[tr], y[tr], feats[te]), y[te])
        a_fn = jax.jit(jax.vmap(lambda x, a: analytic(x, a, a)[0][0]))
        a = np.asarray(a_fn(sets.feats, sets.assign), np.float64)
        entry["analytical"] = scores(a[te] * _scale(a[tr], y[tr]), y[te])
        report["max_device"] = entry
    if plans:
        preds = {k: [] for k in ("network", "linear", "analytical", "sum_of_singles")}
        true = []
        for _, p in plans.items():
            tr, te = split_mask(p.index, "train"), split_mask(p.index, "test")
            if not te.any():
                continue
            true.append(p.total[te])
            preds["network"].append(predict_plans(model.cost_fn, p, te))
            feats = _plan_feature_sums(p, unique_rows_batch(model.meta))
            preds["linear"].append(_lstsq(feats[tr], p.total[tr], feats[te]) if tr.any()
                                   else np.full(te.sum(), np.nan))
            a = predict_plans(analytic, p, np.ones(len(p.index), bool))
            preds["analytical"].append(a[te] * _scale(a[tr], p.total[tr]))
            preds["sum_of_singles"].append(_plan_singles(p, te, singles))
        if true:
            y = np.concatenate(true)
            report["spmd"] = {}
            for name, v in preds.items():
                v = np.concatenate(v)
                ok = ~np.isnan(v)
                if ok.any():
                    report["spmd"][name] = scores(v[ok], y[ok])
    return report


def unseen_scores(model: CostModel, sets: SetData | None, plans: dict[int, PlanData]) -> dict:
    """The network's scores on every entry of collections whose tables its training data never
    had (e.g. `collect_costs --pool=synthetic --pool_seed=1`), per setting.

    Besides `scores`, `spread` is the standard deviation of log(predicted / measured) about its
    mean: what a planner comparing plans of one task faces, since a scale common to all entries
    drops out of its choice (and the unit of a separately calibrated collection is such a scale).
    """
    out = {}
    if sets is not None:
        out["max_device"] = _with_spread(predict_sets(model, sets, np.ones(len(sets.index), bool)),
                                         sets.total)
    if plans:
        pred = [predict_plans(model.cost_fn, p, np.ones(len(p.index), bool))
                for p in plans.values()]
        out["spmd"] = _with_spread(np.concatenate(pred),
                                   np.concatenate([p.total for p in plans.values()]))
    return out


def _with_spread(pred: np.ndarray, true: np.ndarray) -> dict:
    log_err = np.log(pred / true)
    return {**scores(pred, true), "spread": float(np.std(log_err - log_err.mean()))}


def _plan_singles(p: PlanData, mask: np.ndarray, singles: dict[str, float]) -> np.ndarray:
    """SPMD sum of singles: per width class, the busiest device's summed single-table ms."""
    out = []
    for i in np.flatnonzero(mask):
        names = p.names[i]
        if not all(n in singles for n in names):
            out.append(np.nan)
            continue
        s_T = np.zeros(p.feats.shape[1])
        s_T[:len(names)] = [singles[n] for n in names]
        z_DxK = np.einsum("t,td,tk->dk", s_T, p.assign[i], p.classes[i])
        out.append(z_DxK.max(0).sum())
    return np.asarray(out)


def noise(records: list[dict]) -> dict:
    """Noise floor (mean relative difference of two measurements of one entry) and ceiling
    (Kendall tau between the two), per kind."""
    out = {}
    for kind in ("set", "plan"):
        pairs = dataset.noise_pairs(records, kind)
        if len(pairs) >= 3:
            rel = np.abs(pairs[:, 0] - pairs[:, 1]) / pairs[:, 0]
            out[kind] = {"floor_mape": float(rel.mean()), "ceiling_tau":
                         kendall_tau(pairs[:, 0], pairs[:, 1]), "pairs": int(len(pairs))}
    return out


def singles_of(records: list[dict]) -> dict[str, float]:
    return {r["tables"][0]: r["total_ms"] for r in records
            if r["kind"] == "set" and len(r["tables"]) == 1 and r.get("repeat_of") is None}



def finetune(model: CostModel, records: list[dict], pool: dict[str, TableSpec],
             steps: int = 200, learning_rate: float = 1e-3) -> CostModel:
    """The AutoShard loop's refinement: a few steps on new oracle measurements."""
    records = [{**r, "index": i} for i, r in enumerate(records)]
    sets = set_data(records, pool) if any(r["kind"] == "set" for r in records) else None
    plans = plan_data(records, pool)
    config = FitConfig(steps=steps, learning_rate=learning_rate, eval_every=steps,
                       batch_sets=64, batch_plans=16)
    refined, _ = fit_cost_model(sets, plans, config, model.meta, log=lambda _: None,
                                start=model)
    return refined
