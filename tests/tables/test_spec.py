"""TableSpec validation and the tables.json format."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoshard_jax.tables import spec as spec_lib
from autoshard_jax.tables.spec import NUM_REUSE_BINS, TableSpec, TableSpecError

HIST = tuple(float(i) / 17 for i in range(NUM_REUSE_BINS))


@pytest.mark.parametrize("kwargs,field", [
    (dict(name="", rows=3, dim=2), "name"),
    (dict(name=5, rows=3, dim=2), "name"),
    (dict(name="t", rows=0, dim=2), "'rows'"),
    (dict(name="t", rows=-4, dim=2), "'rows'"),
    (dict(name="t", rows=3.0, dim=2), "'rows'"),
    (dict(name="t", rows=True, dim=2), "'rows'"),
    (dict(name="t", rows="3", dim=2), "'rows'"),
    (dict(name="t", rows=3, dim=0), "'dim'"),
    (dict(name="t", rows=3, dim=2.5), "'dim'"),
    (dict(name="t", rows=3, dim=False), "'dim'"),
    (dict(name="t", rows=3, dim=2, pooling_factor=0.0), "'pooling_factor'"),
    (dict(name="t", rows=3, dim=2, pooling_factor=-1.0), "'pooling_factor'"),
    (dict(name="t", rows=3, dim=2, pooling_factor=math.nan), "'pooling_factor'"),
    (dict(name="t", rows=3, dim=2, pooling_factor=math.inf), "'pooling_factor'"),
    (dict(name="t", rows=3, dim=2, pooling_factor=True), "'pooling_factor'"),
    (dict(name="t", rows=3, dim=2, pooling_factor="2"), "'pooling_factor'"),
    (dict(name="t", rows=3, dim=2, reuse_hist=(0.1,) * 16), "'reuse_hist'"),
    (dict(name="t", rows=3, dim=2, reuse_hist=(0.1,) * 18), "'reuse_hist'"),
    (dict(name="t", rows=3, dim=2, reuse_hist=(-0.1,) + (0.1,) * 16), "'reuse_hist'"),
    (dict(name="t", rows=3, dim=2, reuse_hist=(math.nan,) * 17), "'reuse_hist'"),
    (dict(name="t", rows=3, dim=2, reuse_hist=("a",) * 17), "'reuse_hist'"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(TableSpecError, match=field):
        TableSpec(**kwargs)


def test_table_spec_error_is_value_error():
    assert issubclass(TableSpecError, ValueError)


def test_hotness_and_bytes():
    assert TableSpec("t", 10, 4).hotness == 1
    assert TableSpec("t", 10, 4, 0.2).hotness == 1
    assert TableSpec("t", 10, 4, 2.0).hotness == 2
    assert TableSpec("t", 10, 4, 2.01).hotness == 3
    assert TableSpec("t", 10, 4).param_bytes() == 160
    assert TableSpec("t", 10, 4).param_bytes(2) == 80


def test_reuse_hist_normalised_to_float_tuple():
    s = TableSpec("t", 3, 2, reuse_hist=[1] * NUM_REUSE_BINS)
    assert s.reuse_hist == (1.0,) * NUM_REUSE_BINS
    assert all(type(h) is float for h in s.reuse_hist)
    hash(s)  # frozen and hashable even when given a list


def test_round_trip_file(tmp_path):
    specs = [TableSpec("a", 10, 4), TableSpec("b", 1000, 16, 2.5, HIST), TableSpec("c", 1, 1, 7)]
    path = tmp_path / "tables.json"
    spec_lib.save_tables(path, specs)
    raw = json.loads(path.read_text())
    assert raw["version"] == spec_lib.TABLES_VERSION
    assert [t["name"] for t in raw["tables"]] == ["a", "b", "c"]
    assert "reuse_hist" not in raw["tables"][0]
    assert spec_lib.load_tables(path) == specs
    assert spec_lib.load_tables(str(path)) == specs


def test_from_json_defaults():
    d = {"version": 1, "tables": [{"name": "a", "rows": 5, "dim": 2}]}
    (s,) = spec_lib.tables_from_json(d)
    assert s == TableSpec("a", 5, 2, 1.0, None)


@pytest.mark.parametrize("doc,match", [
    ([], "JSON object"),
    ({"tables": [{"name": "a", "rows": 1, "dim": 1}]}, "'version'"),
    ({"version": 2, "tables": [{"name": "a", "rows": 1, "dim": 1}]}, "'version' must be 1"),
    ({"version": "1", "tables": [{"name": "a", "rows": 1, "dim": 1}]}, "'version'"),
    ({"version": True, "tables": [{"name": "a", "rows": 1, "dim": 1}]}, "'version'"),
    ({"version": 1}, "'tables'"),
    ({"version": 1, "tables": []}, "'tables'"),
    ({"version": 1, "tables": {"name": "a"}}, "'tables'"),
    ({"version": 1, "tables": ["a"]}, r"tables\[0\] must be an object"),
    ({"version": 1, "tables": [{"name": "a", "rows": 1}]}, "missing required field 'dim'"),
    ({"version": 1, "tables": [{"name": "a", "rows": 1, "dim": 1},
                               {"rows": 1, "dim": 1}]}, r"tables\[1\].*'name'"),
    ({"version": 1, "tables": [{"name": "a", "rows": 1, "dim": 1, "hotness": 3}]},
     r"unknown fields \['hotness'\]"),
    ({"version": 1, "tables": [{"name": "a", "rows": 1, "dim": 1},
                               {"name": "a", "rows": 2, "dim": 1}]}, "duplicate table name 'a'"),
    ({"version": 1, "tables": [{"name": "a", "rows": 0, "dim": 1}]}, "'rows'"),
])
def test_tables_from_json_errors(doc, match):
    with pytest.raises(TableSpecError, match=match):
        spec_lib.tables_from_json(doc)


def test_duplicate_names_rejected_on_save(tmp_path):
    with pytest.raises(TableSpecError, match="duplicate table name 'x'"):
        spec_lib.save_tables(tmp_path / "t.json", [TableSpec("x", 1, 1), TableSpec("x", 2, 1)])
    with pytest.raises(TableSpecError, match="duplicate"):
        spec_lib.check_unique_names([TableSpec("x", 1, 1), TableSpec("y", 1, 1),
                                     TableSpec("x", 1, 1)])


def test_load_tables_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        spec_lib.load_tables(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TableSpecError, match="not valid JSON"):
        spec_lib.load_tables(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"version": 1, "tables": [{"name": "a", "rows": 1}]}))
    with pytest.raises(TableSpecError, match=r"wrong\.json.*missing required field 'dim'"):
        spec_lib.load_tables(wrong)


def test_criteo_tables():
    specs = spec_lib.criteo_tables(spec_lib.CRITEO_KAGGLE_ROWS, 16, rows_cap=100_000)
    assert len(specs) == 26
    assert specs[0].name == "cat_00" and specs[25].name == "cat_25"
    assert [s.rows for s in specs] == [min(r, 100_000) for r in spec_lib.CRITEO_KAGGLE_ROWS]
    assert all(s.dim == 16 for s in specs)
    uncapped = spec_lib.criteo_tables(spec_lib.CRITEO_1TB_MLPERF_ROWS, 128)
    assert uncapped[0].rows == 40_000_000
    assert spec_lib.tables_from_json(spec_lib.tables_to_json(specs)) == specs


valid_specs = st.builds(
    TableSpec,
    name=st.text(min_size=1, max_size=12),
    rows=st.integers(1, 2**40),
    dim=st.integers(1, 4096),
    pooling_factor=st.one_of(
        st.integers(1, 1000),
        st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)),
    reuse_hist=st.none() | st.lists(
        st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False),
        min_size=NUM_REUSE_BINS, max_size=NUM_REUSE_BINS),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(valid_specs, min_size=1, max_size=5, unique_by=lambda s: s.name))
def test_random_specs_round_trip(specs):
    doc = spec_lib.tables_to_json(specs)
    back = spec_lib.tables_from_json(json.loads(json.dumps(doc)))
    assert back == specs
    for a, b in zip(back, specs, strict=True):
        assert a.pooling_factor == b.pooling_factor and a.hotness == b.hotness
