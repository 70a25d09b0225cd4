"""Row-wise splits: the shards a split plan stands for, its memory, and when the search splits."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from autoshard_jax.placement import api, split
from autoshard_jax.placement.costs import Cost
from autoshard_jax.placement.evaluate import device_tables, evaluate_predicted
from autoshard_jax.placement.memory import memory_model
from autoshard_jax.sharding.layout import PlanError
from autoshard_jax.tables.spec import TableSpec

RW = split.ROW_WISE


def _lookups(feats_TxF, assign_TxD, class_TxK):
    """Additive: each table (or shard) costs 0.5 fixed plus pooling x dim / 100."""
    del class_TxK
    dev_D = (0.5 + feats_TxF[:, 2] * feats_TxF[:, 1] / 100.0) @ assign_TxD
    return dev_D, jnp.max(dev_D)


LOOKUPS = Cost(_lookups, "lookups", 128)
BIG = TableSpec("big", 900, 16, 40.0)  # 6.9 alone; a third of it 2.63
SMALL = [TableSpec(f"s{i}", 300, 16, 5.0) for i in range(6)]  # 1.3 each


def test_expand_is_the_per_device_measurements_tables():
    specs = [BIG] + SMALL
    device_T = np.array([RW, 0, 1, 1, RW, 2, 0])
    flat, flat_D = split.expand(specs, device_T, 3)
    pairs = list(zip(flat, flat_D, strict=True))
    per_device = [sorted((s.name, s.rows, s.pooling_factor) for s, d in pairs if d == dev)
                  for dev in range(3)]
    plan = api.plan_of(specs, device_T, 3, 1 << 30)
    assert plan.placements["big"] == {"type": "row_wise"}
    measured = [sorted((s.name, s.rows, s.pooling_factor) for s in dev)
                for dev in device_tables(specs, plan)]
    assert per_device == measured
    assert ("big", 300, 40.0 / 3) in per_device[2] and ("s3", 100, 5.0 / 3) in per_device[0]
    # The cost model's numbers of the plan are those of its shards, placed table-wise.
    shard = 0.5 + 40 / 3 * 0.16 + 0.5 + 5 / 3 * 0.16
    np.testing.assert_allclose(evaluate_predicted(specs, plan, LOOKUPS)["device_ms"],
                               [shard + 2.6, shard + 2.6, shard + 1.3], rtol=1e-5)


table_st = st.tuples(st.integers(1, 5000), st.sampled_from([4, 8, 16, 32]))


@settings(max_examples=40, deadline=None)
@given(tables=st.lists(table_st, min_size=2, max_size=7), num_devices=st.integers(2, 4),
       data=st.data(), budget_kb=st.integers(4, 400))
def test_fits_is_the_layouts_memory_check(tables, num_devices, data, budget_kb):
    specs = [TableSpec(f"t{i}", r, d, 2.0) for i, (r, d) in enumerate(tables)]
    device_T = np.asarray(data.draw(st.lists(st.integers(RW, num_devices - 1),
                                             min_size=len(specs), max_size=len(specs))))
    budget = budget_kb * 1024
    try:
        api.plan_of(specs, device_T, num_devices, budget).validate(specs)
        valid = True
    except PlanError:
        valid = False
    assert split.fits(memory_model(specs, budget), device_T, num_devices) == valid


def test_split_heavy_splits_the_table_that_alone_sets_the_maximum():
    """The big table alone costs 6.9; split over 3 devices (2.63 each) with two small tables
    beside each shard the maximum is 5.23. Splitting a small table next would raise it (a
    shard's fixed cost lands on every device): one split."""
    specs = [BIG] + SMALL
    mem = memory_model(specs, 1 << 30)
    start = np.array([0, 1, 1, 1, 2, 2, 2])
    out = split.split_heavy(specs, 3, mem, LOOKUPS, start)
    assert out[0] == RW and np.bincount(out[1:], minlength=3).tolist() == [2, 2, 2]
    dev = split.predicted_device_ms(specs, out, 3, LOOKUPS)
    np.testing.assert_allclose(dev, 2.6 + 0.5 + 40 / 3 * 0.16, rtol=1e-5)
    # Without the rebalancing the split would gain 5% only (6.9 -> 6.53): never alone.
    assert split.split_heavy(specs, 3, mem, LOOKUPS, start, min_gain=0.2).tolist() == \
        out.tolist()
    assert split.split_heavy(specs, 3, mem, LOOKUPS, start, min_gain=0.3).tolist() == \
        start.tolist()
    # Equal tables: a split only adds the shards' fixed cost everywhere.
    even = split.split_heavy(SMALL, 3, memory_model(SMALL, 1 << 30), LOOKUPS,
                             np.array([0, 0, 1, 1, 2, 2]))
    assert even.tolist() == [0, 0, 1, 1, 2, 2]
    # One device: nothing to split over.
    assert split.split_heavy(specs, 1, mem, LOOKUPS, np.zeros(7, int)).tolist() == [0] * 7


def test_split_heavy_keeps_memory():
    """Every device is full: the big table's shards fit nowhere, whatever moves."""
    specs = [BIG, TableSpec("a", 850, 16, 5.0), TableSpec("b", 850, 16, 5.0)]
    start = np.array([0, 1, 2])
    tight = memory_model(specs, int(memory_model(specs, 1).allocated(900, 900)))
    assert split.fits(tight, start, 3)
    assert split.split_heavy(specs, 3, tight, LOOKUPS, start).tolist() == start.tolist()
    roomy = memory_model(specs, 1 << 30)
    assert split.split_heavy(specs, 3, roomy, LOOKUPS, start)[0] == RW


def test_searches_split_for_max_device_only_and_when_asked():
    specs = [BIG] + SMALL
    for method in ("autoshard_search",):  # no policy: the cost-guided search
        dev = api.place(specs, 3, 1 << 30, method, objective="max_device", cost=LOOKUPS)
        assert dev[0] == RW and (dev[1:] >= 0).all()
        api.plan_of(specs, dev, 3, 1 << 30).validate(specs)
        plan = api.shard(specs, 3, 1 << 30, method, objective="max_device", cost=LOOKUPS)
        assert plan.placements["big"] == {"type": "row_wise"}
        assert plan.meta["predicted_max_ms"] < 6.9
        off = api.place(specs, 3, 1 << 30, method, objective="max_device", cost=LOOKUPS,
                        row_wise=False)
        assert (off >= 0).all()
        spmd = api.place(specs, 3, 1 << 30, method, objective="spmd", cost=LOOKUPS)
        assert (spmd >= 0).all()
    assert (api.place(specs, 3, 1 << 30, "lookup_greedy", objective="max_device",
                      cost=LOOKUPS) >= 0).all()


def test_make_room_moves_tables_off_the_fullest_device():
    """Device 0 is full: the big table's shards fit there only once a table leaves it (for
    the big table's freed device); with no room anywhere it gives up."""
    specs = [TableSpec("big", 900, 16, 40.0)] + [TableSpec(f"s{i}", 400, 16, 5.0)
                                                 for i in range(3)]
    start = np.array([1, 0, 0, 2])
    mem = memory_model(specs, 1 << 30)
    budget = int(mem.allocated(900, 900))  # device 0's 800 rows + 300 of shards: over
    tight = memory_model(specs, budget)
    cand = start.copy()
    cand[0] = RW
    assert split.fits(tight, start, 3) and not split.fits(tight, cand, 3)
    room = split.make_room(tight, cand, 3)
    assert split.fits(tight, room, 3) and room[0] == RW
    assert np.bincount(room[1:], minlength=3).tolist() == [1, 1, 1]
    assert split.make_room(memory_model(specs, int(mem.allocated(600, 600))), cand, 3) is None
