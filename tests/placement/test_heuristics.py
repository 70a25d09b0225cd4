"""Heuristic placers on hand-made cases, memory legality (property test), 'does not fit'."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoshard_jax.placement import api, heuristics
from autoshard_jax.placement.api import plan_of
from autoshard_jax.placement.costs import width_classes
from autoshard_jax.placement.memory import PlacementError, memory_model
from autoshard_jax.sharding.plan import PlanError
from autoshard_jax.tables.spec import TableSpec

BIG = 1 << 40


def T(name, rows=100, dim=16, pf=1.0):
    return TableSpec(name, rows, dim, pf)


def test_dim_greedy_is_lpt_with_size_tiebreak():
    specs = [T("a", dim=64), T("b", dim=32), T("c", dim=32, rows=200), T("d", dim=16)]
    dev = heuristics.lpt(specs, 2, memory_model(specs, BIG),
                         heuristics.greedy_key(specs, "dim_greedy"))
    # a(64) -> 0; c(32, larger) -> 1; b(32) -> 1 (load 32 < 64); d(16): loads 64 vs 64, size
    # sums 100*64 vs (200+100)*32 = 6400 vs 9600 -> device 0.
    assert dev.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("method,expected", [
    ("size_greedy", [0, 1, 1]),          # sizes 3200, 1600, 1600: 0 | 1, 1
    ("lookup_greedy", [1, 0, 1]),        # dim x pf 320, 800, 160
    ("size_lookup_greedy", [1, 0, 1]),   # x log10(rows): 640, 1600, 320 (rows 100)
])
def test_greedy_keys(method, expected):
    specs = [T("a", rows=100, dim=32, pf=10.0), T("b", rows=100, dim=16, pf=50.0),
             T("c", rows=100, dim=16, pf=10.0)]
    dev = heuristics.lpt(specs, 2, memory_model(specs, BIG), heuristics.greedy_key(specs, method))
    assert dev.tolist() == expected
    np.testing.assert_allclose(heuristics.greedy_key(specs, "size_lookup_greedy"),
                               [32 * 10 * 2, 16 * 50 * 2, 16 * 10 * 2])


def test_greedy_skips_devices_without_memory():
    # Widest table 16 => one spare row of 64 B; budget fits "a" + spare, nothing else beside it.
    specs = [T("a", rows=1000, dim=16, pf=10.0), T("b", rows=10, dim=16, pf=5.0),
             T("c", rows=10, dim=16, pf=4.0)]
    mem = memory_model(specs, (1 + 1000) * 64)
    dev = heuristics.lpt(specs, 2, mem, heuristics.greedy_key(specs, "lookup_greedy"))
    assert dev.tolist() == [0, 1, 1]  # c would go to 0 (load 160 vs 80) but 0 is full


def test_torchrec_greedy_sorts_by_storage_and_balances_perf():
    specs = [T("small_hot", rows=10, dim=16, pf=50.0), T("big_cold", rows=10_000, dim=16),
             T("mid", rows=1000, dim=16, pf=20.0)]
    dev = heuristics.torchrec_greedy(specs, 2, memory_model(specs, BIG), batch_size=512)
    # storage order big_cold, mid, small_hot: big_cold -> 0, mid -> 1 (perf 0 < big's),
    # small_hot -> 0 (perf 1 of big_cold < perf 20 of mid).
    assert dev.tolist() == [0, 0, 1]


def test_spmd_greedy_balances_each_width_class():
    # The trap: one wide table and eight narrow ones. LPT on lookups piles every narrow
    # table on the other device (one class on one device: the SPMD program pads it everywhere).
    specs = [T("wide", dim=64, pf=1.0)] + [T(f"n{i}", dim=8, pf=1.0) for i in range(8)]
    mem = memory_model(specs, BIG)
    lpt = heuristics.lpt(specs, 2, mem, heuristics.greedy_key(specs, "lookup_greedy"))
    assert lpt.tolist() == [0] + [1] * 8
    spmd = heuristics.spmd_greedy(specs, 2, mem, width_classes(specs)[0])
    assert spmd[0] == 0 and np.bincount(spmd[1:], minlength=2).tolist() == [4, 4]


def test_random_is_seeded_and_legal():
    specs = [T(f"t{i}", rows=100 * (i + 1)) for i in range(12)]
    mem = memory_model(specs, 2600 * 64)
    a = heuristics.random_placement(specs, 4, mem, seed=3)
    assert a.tolist() == heuristics.random_placement(specs, 4, mem, seed=3).tolist()
    plan_of(specs, a, 4, 2600 * 64).validate(specs)


@pytest.mark.parametrize("method", heuristics.HEURISTICS)
def test_does_not_fit_names_the_table(method):
    specs = [T("ok", rows=10), T("huge", rows=10**6)]
    with pytest.raises(PlacementError, match="table 'huge'.*does not fit"):
        api.place(specs, 4, 100_000, method)


table_st = st.builds(lambda r, d, p: (r, d, p), st.integers(1, 5000),
                     st.sampled_from([4, 8, 16, 32, 64]), st.floats(0.1, 30.0))


@settings(max_examples=60, deadline=None)
@given(tables=st.lists(table_st, min_size=1, max_size=14), num_devices=st.integers(1, 5),
       budget_kb=st.integers(1, 3000), method=st.sampled_from(heuristics.HEURISTICS),
       row_optimizer=st.sampled_from(["sgd", "rowwise_adagrad", "adagrad"]))
def test_no_heuristic_returns_a_plan_over_memory(tables, num_devices, budget_kb, method,
                                                 row_optimizer):
    specs = [TableSpec(f"t{i}", r, d, p) for i, (r, d, p) in enumerate(tables)]
    budget = budget_kb * 1024
    try:
        plan = api.shard(specs, num_devices, budget, method, row_optimizer=row_optimizer)
    except PlacementError as e:
        assert "does not fit" in str(e)
        return
    plan.validate(specs, row_optimizer)  # the trusted accounting agrees


@settings(max_examples=40, deadline=None)
@given(tables=st.lists(table_st, min_size=1, max_size=10), num_devices=st.integers(1, 4),
       budget_kb=st.integers(1, 2000), seed=st.integers(0, 100),
       row_optimizer=st.sampled_from(["sgd", "rowwise_adagrad", "adagrad"]))
def test_memory_model_agrees_with_plan_validation(tables, num_devices, budget_kb, seed,
                                                  row_optimizer):
    """Placing tables one by one where `fits_D` allows is legal exactly when validate says so."""
    specs = [TableSpec(f"t{i}", r, d, p) for i, (r, d, p) in enumerate(tables)]
    budget = budget_kb * 1024
    mem = memory_model(specs, budget, row_optimizer)
    rng = np.random.default_rng(seed)
    dev = rng.integers(num_devices, size=len(specs))
    phys = np.bincount(dev, mem.phys_T, num_devices).astype(np.int64)
    keys = np.bincount(dev, mem.keys_T, num_devices).astype(np.int64)
    predicted_ok = mem.allocated(phys.max(), keys.max()) <= budget
    plan = plan_of(specs, dev, num_devices, budget)
    try:
        plan.validate(specs, row_optimizer)
        ok = True
    except PlanError:
        ok = False
    assert ok == predicted_ok
