"""placement.inference.planning_cost: the cost planners score with follows the policy's
training (its networks and pessimism) unless a cost model is given."""

import jax
import numpy as np

from autoshard_jax.cost.network import (
    NUM_INPUTS,
    CostEnsemble,
    CostModel,
    CostNet,
    init_params,
    save_cost_model,
)
from autoshard_jax.placement.inference import LoadedPolicy, planning_cost


def _untrained(tmp_path, seeds):
    """Saved networks at their initialisation, one per seed (they differ, as fits do)."""
    dirs = []
    for seed in seeds:
        model = CostModel(init_params(CostNet(), jax.random.key(seed)), np.zeros(NUM_INPUTS),
                          np.ones(NUM_INPUTS), {"reference_ms": 6.5, "batch_size": 512})
        save_cost_model(str(tmp_path / f"m{seed}"), model)
        dirs.append(str(tmp_path / f"m{seed}"))
    return ",".join(dirs)


def _policy(meta):
    return LoadedPolicy(net=None, params={}, meta=meta, step=0)


def test_the_policy_cost_carries_its_pessimism(tmp_path):
    both = _untrained(tmp_path, (0, 1))
    pol = _policy({"cost_model": f"learned:{both}", "cost_pessimism": 2.0})
    assert pol.cost_model_dir == both and pol.cost_pessimism == 2.0
    cost = planning_cost(512, None, pol)
    assert isinstance(cost.model, CostEnsemble) and cost.model.pessimism == 2.0
    # an explicit cost model replaces the policy's, at the plain mean
    given = planning_cost(512, both, pol)
    assert given.model.pessimism == 0.0
    # policies from before pessimism existed (no field) score with the mean
    old = planning_cost(512, None, _policy({"cost_model": f"learned:{both}"}))
    assert old.model.pessimism == 0.0


def test_no_policy_and_no_model_is_the_analytical_estimator():
    assert planning_cost(512, None, None).name == "analytical"
    assert planning_cost(512, None, _policy({"cost_model": "analytical"})).name == "analytical"
