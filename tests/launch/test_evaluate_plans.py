"""launch.evaluate_plans: one record per plan in order, the contract's fields; bad input exit 2."""

import io
import json

import pytest

from autoshard_jax.cost.timing import Protocol
from autoshard_jax.errors import InputError
from autoshard_jax.placement.api import plan_of
from autoshard_jax.sharding.plan import save_plan
from autoshard_jax.tables.spec import TableSpec, save_tables
from launch.evaluate_plans import evaluate_main
from tests.launch.test_shard import cli, last_error

SPECS = [TableSpec("a", 64, 8, 2.0), TableSpec("b", 32, 16, 1.0), TableSpec("c", 50, 8, 3.0)]
FIELDS = {"plan", "device_ms", "max_ms", "min_max_ratio", "spmd_ms", "padding_overhead"}


@pytest.fixture()
def files(tmp_path):
    tables = str(tmp_path / "tables.json")
    save_tables(tables, SPECS)
    paths = []
    for name, dev in (("split", [0, 1, 1]), ("one", [0, 0, 0])):
        paths.append(str(tmp_path / f"{name}.json"))
        save_plan(paths[-1], plan_of(SPECS, dev, 2, 1 << 20))
    return tables, paths


def test_records_in_order_with_contract_fields(files):
    tables, paths = files
    buf = io.StringIO()
    quick = Protocol(warmup=1, repeats=3, trim=0)
    recs = evaluate_main(tables, ",".join(paths), batch_size=16, out=buf, protocol=quick)
    printed = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert printed == recs and [r["plan"] for r in recs] == paths
    for r in recs:
        assert FIELDS == set(r)
        assert len(r["device_ms"]) == 2 and r["max_ms"] == max(r["device_ms"])
        assert r["min_max_ratio"] == pytest.approx(min(r["device_ms"]) / r["max_ms"])
        assert r["spmd_ms"] > 0 and r["padding_overhead"] >= 1.0
    assert recs[1]["device_ms"][1] == 0.0 and recs[1]["min_max_ratio"] == 0.0  # empty device
    (step,) = evaluate_main(tables, paths[0], batch_size=16, measure="step", out=io.StringIO(),
                            protocol=quick)
    assert set(step) == FIELDS | {"step_ms"} and step["step_ms"] > 0


def test_spmd_every_device_reaches_the_oracle(files, monkeypatch):
    from autoshard_jax.cost import oracle

    tables, paths = files
    seen = []
    real = oracle.measure_plan
    monkeypatch.setattr(oracle, "measure_plan",
                        lambda *a, **k: seen.append(k["every_device"]) or real(*a, **k))
    quick = Protocol(warmup=1, repeats=3, trim=0)
    for every in (False, True):
        (rec,) = evaluate_main(tables, paths[0], batch_size=16, out=io.StringIO(),
                               protocol=quick, spmd_every_device=every)
        assert rec["spmd_ms"] > 0
    assert seen == [False, True]


@pytest.mark.parametrize("kw,culprit", [({"batch_size": 0}, "batch_size"),
                                        ({"batch_size": 15}, "divisible"),
                                        ({"measure": "guess"}, "--measure")])
def test_bad_arguments(files, kw, culprit):
    tables, paths = files
    with pytest.raises(InputError, match=culprit):
        evaluate_main(tables, paths[0], **kw)


def test_cli_plan_for_other_tables_exits_2(files, tmp_path):
    tables, _ = files
    bad = str(tmp_path / "bad.json")
    save_plan(bad, plan_of(SPECS[:2] + [TableSpec("zzz", 5, 8)], [0, 1, 1], 2, 1 << 20))
    assert "bad.json" in last_error(cli("launch.evaluate_plans", f"--tables={tables}",
                                        f"--plans={bad}"))
