"""plan.json round trips and every invalid plan is refused with an error naming the culprit."""

import json

import hypothesis.strategies as st
import jax
import pytest
from hypothesis import given, settings

from autoshard_jax.optim import sparse
from autoshard_jax.sharding import plan as plan_lib
from autoshard_jax.sharding.plan import PlanError, ShardingPlan, plan_from_mapping
from autoshard_jax.sharding.stage import ShardedEmbeddingStage
from autoshard_jax.tables.spec import TableSpec

TABLES = [TableSpec("a", 1000, 16), TableSpec("b", 10, 4, 3.0), TableSpec("c", 64, 128)]
BIG = 1 << 30


def plan_json(**overrides):
    d = {"version": 1, "num_devices": 2, "memory_bytes_per_device": BIG,
         "placements": {"a": {"type": "table_wise", "device": 1}, "b": {"type": "row_wise"},
                        "c": {"type": "replicated"}},
         "meta": {"placer": "test"}}
    d.update(overrides)
    return d


def test_json_round_trip(tmp_path):
    plan = ShardingPlan.from_json(plan_json())
    path = tmp_path / "plan.json"
    plan_lib.save_plan(path, plan)
    loaded = plan_lib.load_plan(path)
    assert loaded == plan
    assert json.loads(path.read_text()) == plan_json()
    loaded.validate(TABLES)


def test_plan_from_mapping():
    plan = plan_from_mapping({"a": 0, "b": "row_wise", "c": "replicated"}, 2, BIG)
    assert plan.placements == {"a": {"type": "table_wise", "device": 0},
                               "b": {"type": "row_wise"}, "c": {"type": "replicated"}}


@pytest.mark.parametrize("overrides,match", [
    ({"version": 2}, "'version' must be 1"),
    ({"num_devices": 0}, "'num_devices' must be a positive integer"),
    ({"num_devices": True}, "'num_devices' must be a positive integer"),
    ({"memory_bytes_per_device": -5}, "'memory_bytes_per_device'"),
    ({"memory_bytes_per_device": 1.5}, "'memory_bytes_per_device'"),
    ({"placements": []}, "'placements' must be an object"),
    ({"meta": 3}, "'meta' must be an object"),
    ({"extra": 1}, r"unknown fields \['extra'\]"),
    ({"placements": {"a": {"type": "column_wise"}}}, "table 'a': unknown placement type"),
    ({"placements": {"a": {"type": "table_wise"}}}, "table 'a': table_wise placement needs"),
    ({"placements": {"a": {"type": "table_wise", "device": 2}}},
     "table 'a': device 2 is out of range for 2 devices"),
    ({"placements": {"a": {"type": "table_wise", "device": -1}}}, "table 'a': device -1"),
    ({"placements": {"a": {"type": "table_wise", "device": True}}},
     "table 'a': 'device' must be an integer"),
    ({"placements": {"a": {"type": "table_wise", "device": 1.0}}},
     "table 'a': 'device' must be an integer"),
    ({"placements": {"a": {"type": "row_wise", "device": 0}}},
     r"table 'a': row_wise placement has unknown fields \['device'\]"),
    ({"placements": {"a": "table_wise"}}, "table 'a': placement must be an object"),
])
def test_structural_errors(overrides, match):
    with pytest.raises(PlanError, match=match):
        ShardingPlan.from_json(plan_json(**overrides))


def test_missing_field_and_bad_file(tmp_path):
    d = plan_json()
    del d["placements"]
    with pytest.raises(PlanError, match="missing required field 'placements'"):
        ShardingPlan.from_json(d)
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="plan.json: not valid JSON"):
        plan_lib.load_plan(path)
    with pytest.raises(FileNotFoundError):
        plan_lib.load_plan(tmp_path / "nope.json")


def test_tables_must_be_placed_exactly_once():
    with pytest.raises(PlanError, match=r"does not place tables \['c'\]"):
        plan_from_mapping({"a": 0, "b": 1}, 2, BIG).validate(TABLES)
    with pytest.raises(PlanError, match=r"unknown tables \['zz'\]"):
        plan_from_mapping({"a": 0, "b": 1, "c": 1, "zz": 0}, 2, BIG).validate(TABLES)
    with pytest.raises(PlanError, match="plan is for 2 devices, the mesh has 4"):
        plan_from_mapping({"a": 0, "b": 1, "c": 1}, 2, BIG).validate(TABLES, num_devices=4)


def test_memory_counts_optimizer_state_and_names_device():
    # Table "a" alone: 1000 x 16 floats = 64000 bytes; packed it is 125 rows of 128.
    plan = plan_from_mapping({"a": 1, "b": 0, "c": 0}, 2, 1)
    layout = plan_lib.ShardingPlan(2, BIG, plan.placements).validate(TABLES)
    need = {k: layout.allocated_bytes(sparse.state_kinds(k))
            for k in ("sgd", "rowwise_adagrad", "adagrad")}
    assert need["rowwise_adagrad"] - need["sgd"] == 4 * layout.keys
    assert need["adagrad"] == 2 * need["sgd"]
    assert layout.real_bytes({}) == [10 * 4 * 4 + 64 * 128 * 4, 64000]
    for opt in ("sgd", "rowwise_adagrad", "adagrad"):
        exact = ShardingPlan(2, need[opt], plan.placements)
        exact.validate(TABLES, opt)
        tight = ShardingPlan(2, need[opt] - 3, plan.placements)
        with pytest.raises(PlanError, match=r"device 1 exceeds memory_bytes_per_device=\d+ "
                                            r"by 3 bytes"):
            tight.validate(TABLES, opt)
    # A RowOptimizer object is accounted like its name.
    with pytest.raises(PlanError, match="by 3 bytes"):
        ShardingPlan(2, need["adagrad"] - 3, plan.placements).validate(
            TABLES, sparse.adagrad(0.1))


def test_plan_that_does_not_fit_is_refused_before_allocation():
    plan = plan_from_mapping({"a": 0, "b": 0, "c": 1}, 2, 1000)
    before = len(jax.live_arrays())
    with pytest.raises(PlanError, match="exceeds memory_bytes_per_device=1000"):
        ShardedEmbeddingStage(TABLES, plan, sparse.sgd(0.1))
    assert len(jax.live_arrays()) == before


# --- property-based: the validator accepts exactly the valid plans ---------------------------

placement_st = st.one_of(
    st.fixed_dictionaries({"type": st.just("table_wise"),
                           "device": st.one_of(st.integers(-2, 6), st.booleans(),
                                               st.floats(0, 3), st.text(max_size=1))}),
    st.fixed_dictionaries({"type": st.sampled_from(["row_wise", "replicated", "column_wise",
                                                    "data_parallel", ""])}),
)


@settings(max_examples=150, deadline=None)
@given(num_devices=st.integers(1, 5),
       placements=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), placement_st,
                                  max_size=4),
       memory=st.integers(1, 400_000))
def test_validator_accepts_exactly_valid_plans(num_devices, placements, memory):
    def valid_placement(p):
        if p["type"] in ("row_wise", "replicated"):
            return True
        dev = p.get("device")
        return p["type"] == "table_wise" and isinstance(dev, int) and not isinstance(dev, bool) \
            and 0 <= dev < num_devices

    structurally_ok = all(valid_placement(p) for p in placements.values())
    try:
        plan = ShardingPlan.from_json(plan_json(num_devices=num_devices,
                                                memory_bytes_per_device=memory,
                                                placements=placements))
    except PlanError as e:
        assert not structurally_ok
        bad = [n for n, p in placements.items() if not valid_placement(p)]
        assert any(f"table {n!r}" in str(e) for n in bad)
        return
    assert structurally_ok
    assert ShardingPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    names = {s.name for s in TABLES}
    try:
        layout = plan.validate(TABLES, "rowwise_adagrad")
    except PlanError as e:
        msg = str(e)
        if set(placements) - names:
            assert "unknown tables" in msg
        elif names - set(placements):
            assert "does not place tables" in msg
        else:
            m = msg.split("by ")[1].split(" bytes")[0]
            assert "exceeds memory_bytes_per_device" in msg and int(m) > 0
        return
    assert set(placements) == names
    assert layout.allocated_bytes({"accumulator": "row"}) <= memory


def test_slab_beyond_int32_indexing_is_refused():
    specs = [TableSpec("huge", 40_000_000, 128), TableSpec("narrow", 10, 1)]
    plan = plan_from_mapping({"huge": 0, "narrow": 0}, 1, 1 << 45)
    with pytest.raises(PlanError, match="int32"):
        plan.validate(specs)
    ok = plan_from_mapping({"huge": "row_wise", "narrow": 0}, 8, 1 << 45)
    ok.validate(specs)  # 5M rows x 128 per device fits
