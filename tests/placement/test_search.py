"""Cost-guided search and the policy: legal plans only (property test), search never worsens."""

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from autoshard_jax.placement import api, heuristics, search
from autoshard_jax.placement.costs import get_cost, objective_value, plan_costs, width_classes
from autoshard_jax.placement.inference import LoadedPolicy
from autoshard_jax.placement.memory import PlacementError, memory_model
from autoshard_jax.placement.policy import PolicyNet, init_params
from autoshard_jax.tables.spec import TableSpec

COST = get_cost(128)
NET = PolicyNet(hidden=16)
POLICY = LoadedPolicy(NET, init_params(jax.random.key(0), NET, 21), {"objective": "spmd"}, 0)
table_st = st.tuples(st.integers(1, 3000), st.sampled_from([8, 16, 32]), st.floats(0.2, 20.0))


@settings(max_examples=12, deadline=None)
@given(tables=st.lists(table_st, min_size=8, max_size=8), budget_kb=st.integers(40, 1500),
       method=st.sampled_from(["autoshard", "autoshard_search"]),
       objective=st.sampled_from(["spmd", "max_device"]))
def test_policy_and_search_plans_are_memory_legal(tables, budget_kb, method, objective):
    specs = [TableSpec(f"t{i}", r, d, p) for i, (r, d, p) in enumerate(tables)]
    try:
        dev = api.place(specs, 3, budget_kb * 1024, method, objective=objective, policy=POLICY,
                        cost=COST, search_rounds=5)
    except PlacementError as e:
        assert "does not fit" in str(e)
        return
    api.plan_of(specs, dev, 3, budget_kb * 1024).validate(specs)


def test_search_predicts_no_worse_than_any_heuristic_or_the_policy():
    rng = np.random.default_rng(0)
    specs = [TableSpec(f"t{i}", int(rng.integers(50, 3000)), int(rng.choice([8, 16, 32])),
                       float(rng.uniform(0.5, 20))) for i in range(20)]
    for objective in ("spmd", "max_device"):
        def predicted(method, objective=objective):
            # no search rounds: the start alone must already be the best of them
            dev = api.place(specs, 4, 1 << 30, method, objective=objective, policy=POLICY,
                            cost=COST, search_rounds=0)
            return objective_value(*plan_costs(COST, specs, dev, 4), objective)

        best = predicted("autoshard_search")
        for method in (*heuristics.HEURISTICS, "autoshard"):
            assert best <= predicted(method) + 1e-6, (objective, method)


def test_local_search_never_worsens_and_beats_a_bad_start():
    specs = [TableSpec(f"t{i}", 100, (8, 32)[i % 2], 1.0 + (i % 5)) for i in range(12)]
    mem = memory_model(specs, 1 << 30)
    bad = np.zeros(12, np.int64)  # everything on device 0
    for objective in ("spmd", "max_device"):
        before = objective_value(*plan_costs(COST, specs, bad, 3), objective)
        out = search.local_search(specs, 3, mem, COST, objective, bad)
        after = objective_value(*plan_costs(COST, specs, out, 3), objective)
        assert after < 0.6 * before
        start = heuristics.spmd_greedy(specs, 3, mem, width_classes(specs)[0])
        s0 = objective_value(*plan_costs(COST, specs, start, 3), objective)
        s1 = objective_value(*plan_costs(COST, specs, search.local_search(
            specs, 3, mem, COST, objective, start), 3), objective)
        assert s1 <= s0 + 1e-9


def test_cost_greedy_balances_equal_tables():
    specs = [TableSpec(f"t{i}", 100, 16, 4.0) for i in range(6)]
    dev = search.cost_greedy(specs, 3, memory_model(specs, 1 << 30), COST, "max_device",
                             np.ones(6))
    assert np.bincount(dev, minlength=3).tolist() == [2, 2, 2]
