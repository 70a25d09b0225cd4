"""The cost network: fits a known non-additive cost, batched scoring, save/load, metrics,
ensembles of fits."""

import dataclasses
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoshard_jax.cost import dataset, fit
from autoshard_jax.cost.network import (
    CostEnsemble,
    class_onehot,
    load_cost_model,
    load_cost_models,
    num_inputs,
    save_cost_model,
    times_every_device,
    unique_rows_batch,
    width_classes,
)
from autoshard_jax.errors import DataError, InputError
from autoshard_jax.placement.costs import get_cost
from autoshard_jax.sharding.device_step import PROGRAM_VERSION
from autoshard_jax.tables.features import FEATURE_NAMES, table_features
from autoshard_jax.tables.ids import unique_rows
from autoshard_jax.tables.pools import synthetic_pool
from autoshard_jax.tables.spec import TableSpec

POOL = synthetic_pool(60, seed=5, max_rows=50_000)


def _true_cost(specs):
    """Non-additive: sublinear in the ids x width work, plus a per-set overhead that grows with
    the square of the table count (a fused kernel's bookkeeping)."""
    work = sum(s.pooling_factor * s.dim for s in specs)
    return 0.05 + 0.02 * work ** 0.8 + 0.01 * len(specs) ** 2


def _synthetic_sets(n, seed):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        k = int(rng.integers(1, 11))
        specs = [POOL[j] for j in rng.choice(len(POOL), k, replace=False)]
        c = _true_cost(specs)
        records.append({"kind": "set", "index": i, "tables": [s.name for s in specs],
                        "forward_ms": 0.4 * c, "backward_ms": 0.6 * c, "total_ms": c})
    return records


def _slower(records, pool):
    """The same sets measured on a machine 3x slower, as the oracle reports them (with specs)."""
    return [{**r, "total_ms": 3 * r["total_ms"], "forward_ms": 3 * r["forward_ms"],
             "backward_ms": 3 * r["backward_ms"],
             "specs": [pool[n].to_json() for n in r["tables"]]} for r in records]


def test_network_fits_a_known_non_additive_cost():
    records = _synthetic_sets(2000, seed=0)
    sets = fit.set_data(records, {s.name: s for s in POOL})
    model, _ = fit.fit_cost_model(sets, {}, fit.FitConfig(steps=1500, eval_every=250), {},
                                  log=lambda _: None)
    test = fit.split_mask(sets.index, "test")
    err = fit.mape(fit.predict_sets(model, sets, test), sets.total[test])
    assert err < 0.02
    # the additive assumption cannot represent it
    singles = {s.name: _true_cost([s]) for s in POOL}
    additive = [sum(singles[n] for n in names) for names in np.asarray(sets.names,
                                                                        dtype=object)[test]]
    assert fit.mape(additive, sets.total[test]) > 0.1


def test_reuse_noise_blurs_only_the_reuse_histograms():
    feats = jnp.asarray(table_features(POOL[:5]))
    pad = jnp.zeros_like(feats[:1]).at[:, :2].set(1.0)  # a padding row: no histogram
    x = jnp.stack([jnp.concatenate([feats, pad])] * 2)
    y = np.asarray(fit.jitter_reuse(jax.random.key(0), x, 0.3))
    first = FEATURE_NAMES.index("bin_0")
    bins, x = slice(first, None), np.asarray(x)
    np.testing.assert_array_equal(y[..., :first], x[..., :first])
    np.testing.assert_allclose(y[..., bins].sum(-1), x[..., bins].sum(-1), rtol=1e-5)
    assert (y[..., bins] >= 0).all() and np.abs(y[:, :5, bins] - x[:, :5, bins]).max() > 0.01
    assert not np.array_equal(y[0], y[1])  # each occurrence of a table gets its own draw
    np.testing.assert_array_equal(y[:, 5], x[:, 5])
    np.testing.assert_allclose(fit.jitter_reuse(jax.random.key(0), jnp.asarray(x), 0.0), x,
                               rtol=1e-6)


def test_unseen_scores_spread_ignores_a_common_scale():
    records = _synthetic_sets(300, seed=3)
    pool = {s.name: s for s in POOL}
    held = {s.name for s in POOL[40:]}
    seen = [r for r in records if not held & set(r["tables"])]
    unseen = [r for r in records if set(r["tables"]) <= held]
    model, _ = fit.fit_cost_model(fit.set_data(seen, pool), {}, fit.FitConfig(steps=200), {},
                                  log=lambda _: None)
    sets = fit.set_data(unseen, pool)
    got = fit.unseen_scores(model, sets, {})["max_device"]
    assert got["n"] == len(unseen) > 5 and 0 < got["spread"] < 1
    scaled = dataclasses.replace(sets, total=sets.total * 1.3)  # another unit
    again = fit.unseen_scores(model, scaled, {})["max_device"]
    assert again["spread"] == pytest.approx(got["spread"]) and again["mape"] != got["mape"]


def test_cost_fn_is_batched_and_device_count_agnostic(tmp_path):
    records = _synthetic_sets(200, seed=1)
    sets = fit.set_data(records, {s.name: s for s in POOL})
    model, _ = fit.fit_cost_model(sets, {}, fit.FitConfig(steps=20, eval_every=10,  # noisy too
                                                          reuse_noise=0.3), {"x": 1},
                                  log=lambda _: None)
    specs = POOL[:7]
    feats = jnp.asarray(table_features(specs))
    classes = jnp.asarray(class_onehot(specs))
    for d in (1, 3, 7):
        assign = jax.nn.one_hot(jnp.arange(7) % d, d)
        plans = jnp.stack([assign, jnp.roll(assign, 1, axis=1)])
        dev, spmd = jax.jit(jax.vmap(model.cost_fn, in_axes=(None, 0, None)))(feats, plans,
                                                                              classes)
        assert dev.shape == (2, d) and spmd.shape == (2,)
        assert np.all(np.asarray(dev) > 0) and np.all(np.asarray(spmd) > 0)
    # an empty device costs nothing
    dev, _ = model.cost_fn(feats, jnp.zeros((7, 2)).at[:, 0].set(1.0), classes)
    assert float(dev[1]) == 0.0
    save_cost_model(str(tmp_path), model)
    loaded = load_cost_model(str(tmp_path))
    np.testing.assert_allclose(loaded.cost_fn(feats, assign, classes)[1],
                               model.cost_fn(feats, assign, classes)[1], rtol=1e-6)
    assert loaded.meta["x"] == 1
    # a network of another program's costs predicts a program that no longer runs
    meta = json.loads((tmp_path / "cost_model.json").read_text())
    assert meta["program"] == PROGRAM_VERSION
    del meta["program"]  # saved before the stamp: version 1
    (tmp_path / "cost_model.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="SPMD program version 1.*retrain"):
        load_cost_model(str(tmp_path))


def test_unique_row_inputs_learn_what_the_histogram_hides(tmp_path):
    """Tables alike in rows, width and lookups whose costs follow the rows a batch touches:
    with the unique-row inputs a short fit predicts tables it never saw; without them not."""
    rng = np.random.default_rng(0)
    specs = []
    for i in range(200):  # a trace of reuse in the top bins sets how many rows a batch touches
        hist = np.zeros(17)
        hist[:4] = rng.dirichlet(np.ones(4)) * (1 - (top := 10 ** rng.uniform(-4, -1)))
        hist[int(rng.integers(9, 17))] = top
        specs.append(TableSpec(f"u{i}", 50_000, 16, 20.0, tuple(hist / hist.sum())))
    feats = table_features(specs)
    u_T = np.asarray(unique_rows(feats[:, 0], feats[:, 2], feats[:, 4:], 256))
    pool = {s.name: s for s in specs}
    records = [{"kind": "set", "index": i, "tables": [s.name], "forward_ms": 0.01 * u ** 0.5,
                "backward_ms": 0.02 * u ** 0.5, "total_ms": 0.03 * u ** 0.5}
               for i, (s, u) in enumerate(zip(specs, u_T, strict=True))]
    seen = fit.set_data(records[:150], pool)
    unseen = fit.set_data(records[150:], pool)
    errors = {}
    for flag in (False, True):
        meta = {"batch_size": 256, "unique_rows": flag}
        model, _ = fit.fit_cost_model(seen, {}, fit.FitConfig(steps=400, eval_every=100), meta,
                                      log=lambda _: None)
        errors[flag] = fit.unseen_scores(model, unseen, {})["max_device"]["mape"]
    assert errors[True] < 0.6 * errors[False], errors
    save_cost_model(str(tmp_path), model)  # the inputs follow the saved provenance
    loaded = load_cost_model(str(tmp_path))
    assert unique_rows_batch(loaded.meta) == 256 and loaded.mean_I.shape == (num_inputs(meta),)
    np.testing.assert_allclose(loaded.predict_sets([feats[:3]]), model.predict_sets([feats[:3]]),
                               rtol=1e-6)
    assert unique_rows_batch({"batch_size": 512}) is None  # networks fitted before the inputs


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(InputError, match="holds no cost model"):
        load_cost_model(str(tmp_path))
    (tmp_path / "cost_model.json").write_text("{broken")
    (tmp_path / "cost_model").mkdir()
    with pytest.raises(InputError, match="cost_model.json: not valid JSON"):
        load_cost_model(str(tmp_path))


def test_width_classes_follow_the_packed_layout():
    specs = [TableSpec("a", 10, 4), TableSpec("b", 10, 12), TableSpec("c", 10, 16),
             TableSpec("d", 10, 3)]
    cls, widths = width_classes(specs)
    assert widths == (4, 16) and cls.tolist() == [0, 1, 1, 0]  # 12 -> 16, 3 -> 4 (divisors)
    assert class_onehot(specs, 3).shape == (4, 3)


def test_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    b[:5] = a[:5]
    concordant = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
                     for i, j in itertools.combinations(range(30), 2))
    assert fit.kendall_tau(a, b) == pytest.approx(concordant / (30 * 29 / 2))
    assert fit.mape([1.1, 1.8], [1.0, 2.0]) == pytest.approx(0.1)
    assert fit.r2([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert fit.r2([1.0, 3.0], [2.0, 4.0]) == pytest.approx(1.0 - 2.0 / 2.0)
    assert math.isnan(fit.r2([1.0, 2.0], [2.0, 2.0]))  # a constant target: undefined
    assert fit.spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)


def test_update_fine_tunes_on_new_measurements():
    records = _synthetic_sets(300, seed=2)
    pool = {s.name: s for s in POOL}
    sets = fit.set_data(records, pool)
    model, _ = fit.fit_cost_model(sets, {}, fit.FitConfig(steps=30, eval_every=30), {},
                                  log=lambda _: None)
    # the machine got 3x slower: refinement on measured records moves predictions toward them
    slower = _slower(records[:100], pool)
    refined = model.update(slower)
    feats = [table_features([pool[n] for n in r["tables"]]) for r in slower]
    want = np.asarray([r["total_ms"] for r in slower])
    assert fit.mape(refined.predict_sets(feats), want) < fit.mape(model.predict_sets(feats), want)
    assert refined is not model and refined.params is not model.params


def test_the_bounded_exp_keeps_its_gradient_past_the_bound():
    # A head that overshoots the bound must still be pulled back: with a plain clip its
    # gradient was 0 and a fit stayed stuck there (session 13: train loss 4.4 -> 1856).
    from autoshard_jax.cost.network import _exp

    for x in (-25.0, 0.0, 25.0):
        np.testing.assert_allclose(float(_exp(jnp.float32(x))), np.exp(np.clip(x, -20, 20)),
                                   rtol=1e-5)
    assert float(jax.grad(lambda x: _exp(x))(jnp.float32(25.0))) > 0


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """Three small fits on the same records (seeds 0, 1, 2), saved: (models, workdirs)."""
    sets = fit.set_data(_synthetic_sets(200, seed=1), {s.name: s for s in POOL})
    root = tmp_path_factory.mktemp("fits")
    models, dirs = [], []
    for seed in (0, 1, 2):
        model, _ = fit.fit_cost_model(sets, {}, fit.FitConfig(steps=20, eval_every=10,
                                                               seed=seed),
                                      {"reference_ms": 6.5}, log=lambda _: None)
        save_cost_model(str(root / f"fit{seed}"), model)
        models.append(model)
        dirs.append(str(root / f"fit{seed}"))
    return models, dirs


def test_an_ensemble_predicts_the_mean_of_its_members(fits):
    _, dirs = fits
    members = [load_cost_model(d) for d in dirs]
    assert isinstance(load_cost_models(dirs[0]), type(members[0]))  # one workdir: the model
    ens = load_cost_models(",".join(dirs))
    assert isinstance(ens, CostEnsemble) and len(ens.members) == 3
    assert ens.meta["reference_ms"] == 6.5
    specs = POOL[:9]
    feats = jnp.asarray(table_features(specs))
    classes = jnp.asarray(class_onehot(specs))
    plans = jnp.stack([jax.nn.one_hot(jnp.arange(9) % 3, 3),
                       jax.nn.one_hot(jnp.arange(9) // 3, 3)])
    dev, spmd = jax.jit(jax.vmap(ens.cost_fn, in_axes=(None, 0, None)))(feats, plans, classes)
    want = [[m.cost_fn(feats, p, classes) for m in members] for p in plans]
    np.testing.assert_allclose(dev, [np.mean([np.asarray(o[0]) for o in w], 0) for w in want],
                               rtol=1e-5)
    np.testing.assert_allclose(spmd, [np.mean([float(o[1]) for o in w]) for w in want],
                               rtol=1e-5)
    # what planners get: `get_cost` with the comma-separated workdirs
    cost = get_cost(512, ",".join(dirs))
    assert cost.name == "learned:" + ",".join(dirs) and isinstance(cost.model, CostEnsemble)
    np.testing.assert_allclose(cost.fn(feats, plans[0], classes)[1], spmd[0], rtol=1e-5)
    # the members differ (else the ensemble would average nothing)
    assert not np.allclose(want[0][0][1], want[0][1][1])
    sets_feats = [table_features(POOL[:3]), table_features(POOL[3:8])]
    np.testing.assert_allclose(ens.predict_sets(sets_feats),
                               np.mean([m.predict_sets(sets_feats) for m in members], 0),
                               rtol=1e-6)


def test_a_pessimistic_ensemble_adds_its_members_spread(fits):
    models, dirs = fits
    ens = load_cost_models(",".join(dirs), pessimism=1.5)
    assert ens.pessimism == 1.5
    specs = POOL[:7]
    feats = jnp.asarray(table_features(specs))
    classes = jnp.asarray(class_onehot(specs))
    plan = jax.nn.one_hot(jnp.arange(7) % 2, 2)
    outs = [m.cost_fn(feats, plan, classes) for m in models]
    dev_MxD = np.asarray([o[0] for o in outs])
    spmd_M = np.asarray([float(o[1]) for o in outs])
    dev, spmd = jax.jit(ens.cost_fn)(feats, plan, classes)
    np.testing.assert_allclose(dev, dev_MxD.mean(0) + 1.5 * dev_MxD.std(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(spmd, spmd_M.mean() + 1.5 * spmd_M.std(ddof=1), rtol=1e-5)
    assert float(spmd) > float(load_cost_models(",".join(dirs)).cost_fn(feats, plan,
                                                                          classes)[1])
    # what a rollout asks instead (placement.env): device costs from per-device row sums
    bound = ens.bind(feats, classes)
    np.testing.assert_allclose(bound.device_ms(plan.T @ bound.rows_TxR), dev, rtol=1e-5)
    sets_feats = [table_features(POOL[:3]), table_features(POOL[3:8])]
    each_MxS = np.asarray([m.predict_sets(sets_feats) for m in models])
    np.testing.assert_allclose(ens.predict_sets(sets_feats),
                               each_MxS.mean(0) + 1.5 * each_MxS.std(0, ddof=1), rtol=1e-6)
    with pytest.raises(InputError, match="two or more"):
        load_cost_models(dirs[0], pessimism=1.0)
    for bad in (-0.5, float("nan"), float("inf"), True):
        with pytest.raises(InputError, match="finite number >= 0"):
            load_cost_models(",".join(dirs), pessimism=bad)
    with pytest.raises(InputError, match="needs an ensemble"):
        get_cost(512, None, 1.0)


def test_an_ensemble_refines_every_member(fits):
    pool = {s.name: s for s in POOL}
    ens = CostEnsemble(tuple(fits[0][:2]), pessimism=0.5)
    slower = _slower(_synthetic_sets(100, seed=2), pool)
    refined = ens.update(slower)
    assert isinstance(refined, CostEnsemble) and len(refined.members) == 2
    assert refined.pessimism == 0.5
    feats = [table_features([pool[n] for n in r["tables"]]) for r in slower]
    want = np.asarray([r["total_ms"] for r in slower])
    for old, new in zip(ens.members, refined.members, strict=True):
        assert fit.mape(new.predict_sets(feats), want) < fit.mape(old.predict_sets(feats), want)


def test_an_ensemble_refuses_mixed_units_and_repeats(fits, tmp_path):
    models, (a, b, _) = fits
    c = str(tmp_path / "other_unit")
    save_cost_model(c, dataclasses.replace(models[2], meta={"reference_ms": 9.0}))
    with pytest.raises(InputError, match="different units"):
        load_cost_models(f"{a},{c}")
    c = str(tmp_path / "other_batch")
    save_cost_model(c, dataclasses.replace(models[2], meta={"reference_ms": 6.5,
                                                           "batch_size": 64}))
    with pytest.raises(InputError, match="different units"):
        load_cost_models(f"{a},{c}")
    with pytest.raises(InputError, match="one workdir twice"):
        load_cost_models(f"{a},{b},{a}")
    with pytest.raises(InputError, match="no cost model workdir"):
        load_cost_models(" , ")
    with pytest.raises(InputError, match="holds no cost model"):
        load_cost_models(f"{a},{tmp_path / 'missing'}")


def _work_T(specs):
    return np.asarray([s.pooling_factor * s.dim for s in specs])


def test_the_spmd_head_predicts_every_devices_program(fits, tmp_path):
    # Every device runs the padded program on its own tables, and the step waits for the
    # slowest: one prediction per device, the step their max. A network of busiest-device data
    # (before session 33, `spmd_timing` unrecorded) predicts the busiest device's alone, which
    # is the same head on the same inputs.
    every = fits[0][0]  # fitted on no plan: as the oracle times them now
    assert every.net.every_device and times_every_device(every.meta)
    busiest = dataclasses.replace(every, meta={k: v for k, v in every.meta.items()
                                               if k != "spmd_timing"})
    assert not busiest.net.every_device
    specs = POOL[:9]
    feats = jnp.asarray(table_features(specs))
    classes = jnp.asarray(class_onehot(specs))
    assign = jax.nn.one_hot(jnp.asarray([0, 1, 2, 0, 1, 2, 2, 2, 1]), 3)
    _, _, compute_C, exchange = every.apply(every.params, feats, assign, classes)
    _, _, compute_1, _ = busiest.apply(busiest.params, feats, assign, classes)
    assert compute_C.shape == (3,) and compute_1.shape == (1,)
    top = int(np.argmax(np.asarray(assign).T @ _work_T(specs)))
    np.testing.assert_allclose(compute_1[0], compute_C[top], rtol=1e-5)
    np.testing.assert_allclose(every.cost_fn(feats, assign, classes)[1],
                               compute_C.max() + exchange, rtol=1e-5)
    # devices are exchangeable: permuting them permutes their programs
    perm = np.asarray([2, 0, 1])
    np.testing.assert_allclose(every.apply(every.params, feats, assign[:, perm], classes)[2],
                               compute_C[perm], rtol=1e-5)
    save_cost_model(str(tmp_path), busiest)  # the provenance says which head a model is
    assert not load_cost_model(str(tmp_path)).net.every_device
    assert load_cost_model(fits[1][0]).net.every_device
    with pytest.raises(InputError, match="different units"):  # an ensemble is of one timing
        load_cost_models(f"{tmp_path},{fits[1][0]}")


def _plan_records(n, seed):
    """Plans on 2-4 devices whose devices' programs cost _true_cost of their own tables plus
    a padding term, every device timed (as the oracle does since session 33)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        d = int(rng.choice([2, 4]))
        specs = [POOL[j] for j in rng.choice(len(POOL), int(rng.integers(d, 12)), replace=False)]
        device_T = rng.integers(d, size=len(specs))
        groups = [[s for s, k in zip(specs, device_T, strict=True) if k == g] for g in range(d)]
        padded = max(sum(s.pooling_factor * s.dim for s in g) for g in groups)
        each = [(_true_cost(g) if g else 0.05) + 0.002 * padded ** 0.8 for g in groups]
        records.append({"kind": "plan", "index": i, "num_devices": d,
                        "tables": [s.name for s in specs],
                        "placements": {s.name: {"type": "table_wise", "device": int(k)}
                                       for s, k in zip(specs, device_T, strict=True)},
                        "device_compute_ms": each, "compute_ms": max(each),
                        "exchange_ms": 0.1 * d, "total_ms": max(each) + 0.1 * d})
    return records


def test_a_fit_learns_each_devices_program():
    pool = {s.name: s for s in POOL}
    sets = fit.set_data(_synthetic_sets(600, seed=4), pool)
    records = _plan_records(600, seed=5)
    plans = fit.plan_data(records, pool)
    assert set(plans) == {2, 4} and not np.isnan(plans[2].device_compute).any()
    meta = {"spmd_timing": dataset.spmd_timings(records, "synthetic")}
    model, _ = fit.fit_cost_model(sets, plans, fit.FitConfig(steps=600, eval_every=200), meta,
                                  log=lambda _: None)
    assert model.net.every_device
    for p in plans.values():
        test = fit.split_mask(p.index, "test")
        got_MxD = np.asarray(jax.vmap(lambda x, a, k: model.apply(model.params, x, a, k)[2])(
            p.feats[test], p.assign[test], p.classes[test]))
        assert fit.mape(got_MxD.ravel(), p.device_compute[test].ravel()) < 0.1
        assert fit.mape(fit.predict_plans(model.cost_fn, p, test), p.total[test]) < 0.1
    # a network is fitted (and refined) only on plans timed as it predicts them
    busiest = [{**r, "device_compute_ms": []} for r in records]
    with pytest.raises(DataError, match="busiest device alone.*every device's program"):
        fit.fit_cost_model(sets, fit.plan_data(busiest, pool), fit.FitConfig(steps=1), meta)
    with pytest.raises(DataError, match="busiest device's program alone.*fit a new network"):
        fit.fit_cost_model(sets, plans, fit.FitConfig(steps=1), {"spmd_timing": "busiest"})
    # given no provenance, a network predicts plans as they were timed
    assert not fit.fit_cost_model(sets, fit.plan_data(busiest, pool), fit.FitConfig(steps=1),
                                  {})[0].net.every_device
