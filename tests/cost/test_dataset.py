"""Several cost collections read together: indices kept apart, clashing names renamed."""

import json

import numpy as np
import pytest

from autoshard_jax.cost import dataset
from autoshard_jax.errors import DataError
from autoshard_jax.sharding.device_step import PROGRAM_VERSION
from autoshard_jax.tables.spec import TableSpec, save_tables


def _collection(path, specs, totals, reference_ms=None, program=PROGRAM_VERSION):
    """A collection dir: set entry i measures specs[0] with totals[i]; entry 1 re-measures 0
    (records stamped with `program`; None: unstamped, as before the stamp)."""
    path.mkdir()
    save_tables(str(path / dataset.TABLES_FILE), specs)
    if reference_ms is not None:
        (path / dataset.COLLECTION_FILE).write_text(json.dumps({"reference_ms": reference_ms}))
    rows = [{"kind": "set", "index": i, "repeat_of": None, "tables": [specs[0].name],
             "total_ms": t} for i, t in enumerate(totals)]
    rows.append({"kind": "set", "index": 1, "repeat_of": 0, "tables": [specs[0].name],
                 "total_ms": totals[0] + 0.5})
    if program is not None:
        rows = [{**r, "program": program} for r in rows]
    (path / dataset.DATA_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_collections_keep_their_indices_apart(tmp_path):
    specs = [TableSpec("t0", 100, 8)]
    a = _collection(tmp_path / "a", specs, [1.0, 2.0])
    b = _collection(tmp_path / "b", specs, [10.0, 20.0])
    records, pool = dataset.read_collections([a, b])
    assert pool == {"t0": specs[0]}
    assert [r["index"] for r in records] == [0, 1, 1, dataset.INDEX_STRIDE,
                                             dataset.INDEX_STRIDE + 1, dataset.INDEX_STRIDE + 1]
    # Each repeat pairs with its own collection's first measurement, never the other's.
    np.testing.assert_allclose(dataset.noise_pairs(records, "set"), [[1.0, 1.5], [10.0, 10.5]])
    # The first collection keeps the split it has alone.
    alone, _ = dataset.read_collections([a])
    assert [dataset.split_of(r["index"]) for r in alone] == \
        [dataset.split_of(r["index"]) for r in records[:3]]


def test_a_name_meaning_another_spec_is_renamed_in_its_collection(tmp_path):
    # Random sets from the cost pool and mined plans from the evaluation pool share names
    # (t000 ...) for different tables; each record must keep meaning its own table.
    a = _collection(tmp_path / "a", [TableSpec("t0", 100, 8)], [1.0])
    b = _collection(tmp_path / "b", [TableSpec("t0", 100, 16), TableSpec("t1", 50, 4)], [2.0])
    c = _collection(tmp_path / "c", [TableSpec("t0", 100, 8)], [3.0])  # a's t0 again: kept
    records, pool = dataset.read_collections([a, b, c])
    assert pool == {"t0": TableSpec("t0", 100, 8), "t0@1": TableSpec("t0@1", 100, 16),
                    "t1": TableSpec("t1", 50, 4)}
    assert [r["tables"] for r in records] == [["t0"]] * 2 + [["t0@1"]] * 2 + [["t0"]] * 2
    plan = {"kind": "plan", "tables": ["t0", "t1"],
            "placements": {"t0": {"type": "table_wise", "device": 1}, "t1": {"type": "row_wise"}}}
    assert dataset._renamed_tables(plan, {"t0": "t0@1"}) == {
        "tables": ["t0@1", "t1"],
        "placements": {"t0@1": {"type": "table_wise", "device": 1}, "t1": {"type": "row_wise"}}}


def test_collections_are_rescaled_to_the_first_ones_unit(tmp_path):
    # Normalized times are reference-step multiples x that collection's calibration: the same
    # program measured in a collection calibrated at 15 ms instead of 10 reads 1.5x larger.
    specs = [TableSpec("t0", 100, 8)]
    a = _collection(tmp_path / "a", specs, [2.0], reference_ms=10.0)
    b = _collection(tmp_path / "b", specs, [3.0], reference_ms=15.0)
    records, _ = dataset.read_collections([a, b])
    np.testing.assert_allclose([r["total_ms"] for r in records], [2.0, 2.5, 2.0, 3.5 * 10 / 15])
    # Collections scored against a model (train_cost_model --unseen) take its data's unit.
    alone, _ = dataset.read_collections([b], unit_of=[a])
    np.testing.assert_allclose([r["total_ms"] for r in alone], [3.0 * 10 / 15, 3.5 * 10 / 15])


def test_a_plans_device_programs_are_rescaled_with_it(tmp_path):
    # Every device's program of a plan is in its collection's unit too: after rescaling, the
    # slowest is still the plan's compute (the every-device fit trains on them).
    specs = [TableSpec("t0", 100, 8), TableSpec("t1", 100, 8)]
    a = _collection(tmp_path / "a", specs, [2.0], reference_ms=10.0)
    b = _collection(tmp_path / "b", specs, [3.0], reference_ms=15.0)
    plan = {"kind": "plan", "index": 0, "repeat_of": None, "tables": ["t0", "t1"],
            "num_devices": 2, "placements": {"t0": {"type": "table_wise", "device": 0},
                                             "t1": {"type": "table_wise", "device": 1}},
            "device_compute_ms": [4.0, 6.0], "compute_ms": 6.0, "exchange_ms": 1.5,
            "total_ms": 7.5, "program": PROGRAM_VERSION}
    with open(tmp_path / "b" / dataset.DATA_FILE, "a") as f:
        f.write(json.dumps(plan) + "\n")
    records, _ = dataset.read_collections([a, b])
    (got,) = [r for r in records if r["kind"] == "plan"]
    np.testing.assert_allclose(got["device_compute_ms"], [4.0 * 10 / 15, 6.0 * 10 / 15])
    assert max(got["device_compute_ms"]) == pytest.approx(got["compute_ms"])
    assert dataset.spmd_timings(records, "ab") == dataset.EVERY_DEVICE
    # a one-device plan's program is the only one: it fits either timing
    alone = {**plan, "num_devices": 1, "device_compute_ms": [], "placements": {
        n: {"type": "table_wise", "device": 0} for n in ("t0", "t1")}}
    assert dataset.spmd_timings(records + [alone], "ab") == dataset.EVERY_DEVICE
    busiest = {**plan, "device_compute_ms": []}
    assert dataset.spmd_timings([alone, busiest], "ab") == dataset.BUSIEST
    assert dataset.spmd_timings([alone], "ab") is None


def test_raw_and_normalized_collections_are_not_mixed(tmp_path):
    specs = [TableSpec("t0", 100, 8)]
    a = _collection(tmp_path / "a", specs, [2.0], reference_ms=10.0)
    b = _collection(tmp_path / "b", specs, [3.0])
    with pytest.raises(DataError, match="mix raw and normalized times"):
        dataset.read_collections([a, b])
    with pytest.raises(DataError, match=r"in the unit of .*a.* mix raw and normalized times"):
        dataset.read_collections([b], unit_of=[a])


@pytest.mark.parametrize("program, shown", [(None, "\\[1\\]"), (PROGRAM_VERSION + 1,
                                                                  f"\\[{PROGRAM_VERSION + 1}\\]")])
def test_costs_of_another_program_are_refused(tmp_path, program, shown):
    # Costs of another version of the SPMD program (unstamped ones predate the stamp: version
    # 1) are not this program's costs, alone or beside current ones.
    specs = [TableSpec("t0", 100, 8)]
    current = _collection(tmp_path / "a", specs, [2.0])
    other = _collection(tmp_path / "b", specs, [3.0], program=program)
    for paths in ([other], [current, other]):
        with pytest.raises(DataError, match=f"b.*program version {shown}.*collect afresh"):
            dataset.read_collections(paths)
