"""launch.reproduce_autoshard: every method scored per task, Markdown tables, bar chart,
resumable results; bad flags exit 2."""

import json
import os
import types

import pytest

from autoshard_jax.errors import ConfigError, InputError, ResumeError
from autoshard_jax.placement import harness, split
from autoshard_jax.placement.tasks import evaluation_pool
from autoshard_jax.placement.trainer import train
from launch.reproduce_autoshard import reproduce
from tests.launch.test_shard import cli, last_error
from tests.launch.test_train_sharder import tiny_config


def args(workdir, **kw):
    f = dict(workdir=workdir, policy="", cost_model=None, tables=None, max_rows=5000,
             pool_seed=0, measure="predicted", clock="cpu", batch_size=512, num_tasks=2,
             base_tables=8, base_devices=2, settings="base,D=3", objectives="spmd,max_device",
             mem_factor=1.5, reference_budget=2, search_time_s=1.0, tie_rel=0.02, seed=0, rounds=0,
             reference_ms=0.0, report_only=False, reference_from=None, split="test",
             spmd_every_device=True)
    f.update(kw)
    return types.SimpleNamespace(**f)


def test_reports_every_method_and_resumes(tmp_path):
    policy = str(tmp_path / "policy")
    train(tiny_config(num_iterations=2), policy, log=lambda *_: None)
    work = str(tmp_path / "out")
    logged = []
    text = reproduce(args(work, policy=policy), log=logged.append)
    assert "no --policy was trained for objective max_device" in "\n".join(logged)
    for heading in ("## base (T=8, D=2", "## D=3 (T=8, D=3"):
        assert heading in text
    for method in ("| random | ", "| size_lookup_greedy | ", "| spmd_greedy | ",
                   "| greedy_search | ", "| reference | "):
        assert text.count(method) == 4  # 2 settings x 2 objectives
    # The policy was trained for spmd: max_device tables have no policy rows.
    assert text.count("| autoshard | ") == text.count("| autoshard_search | ") == 2
    lines = open(os.path.join(work, "results.jsonl")).read().splitlines()
    assert len(lines) == 8
    for rec in map(json.loads, lines):
        # The reference searches table-wise plans from the best of them (a max_device search
        # may split a table row-wise, split.ROW_WISE, and go below it).
        best = min(r["spmd_ms" if rec["objective"] == "spmd" else "max_ms"]
                   for m, r in rec["methods"].items()
                   if m != "reference" and split.ROW_WISE not in r["device_T"])
        ref = rec["methods"]["reference"]
        assert ref["spmd_ms" if rec["objective"] == "spmd" else "max_ms"] <= best + 1e-9
    assert os.path.exists(os.path.join(work, "bars_spmd.png"))
    reproduce(args(work, policy=policy), log=lambda *_: None)  # finished tasks are skipped
    assert open(os.path.join(work, "results.jsonl")).read().splitlines() == lines
    for objective in ("spmd", "max_device"):
        assert f"## Summary, objective {objective}" in text
    # The summary's verdict rows: one per setting and objective; spmd has the policy's rows.
    verdicts = [line for line in text.splitlines() if line.startswith(("| base | 2 |",
                                                                        "| D=3 | 2 |"))]
    assert len(verdicts) == 4 and sum("no learned method" in v for v in verdicts) == 2
    # --reference_from re-evaluates the methods against the stored reference plans, unsearched.
    again = str(tmp_path / "again")
    stored = os.path.join(work, "results.jsonl")
    reproduce(args(again, policy=policy, reference_from=stored), log=lambda *_: None)
    old = {(r["setting"], r["objective"], r["task"]): r for r in map(json.loads, lines)}
    for rec in map(json.loads, open(os.path.join(again, "results.jsonl"))):
        ref, before = rec["methods"]["reference"], old[rec["setting"], rec["objective"],
                                                       rec["task"]]["methods"]
        assert ref["reused"] and ref["device_T"] == before["reference"]["device_T"]
        assert rec["methods"]["lookup_greedy"] == before["lookup_greedy"] | {
            "time_s": rec["methods"]["lookup_greedy"]["time_s"]}
    with pytest.raises(InputError, match="is of another task"):  # other tasks: refused
        reproduce(args(str(tmp_path / "other"), seed=1, reference_from=stored),
                  log=lambda *_: None)
    with pytest.raises(InputError, match="have no record of D=4"):
        reproduce(args(str(tmp_path / "more"), settings="D=4", reference_from=stored),
                  log=lambda *_: None)
    with pytest.raises(InputError, match="not this --workdir's"):
        reproduce(args(work, reference_from=stored), log=lambda *_: None)
    # --report_only rebuilds the same sections from results.jsonl alone (no policy, no pool).
    rebuilt = reproduce(args(work, report_only=True, tables="/nonexistent.json"),
                        log=lambda *_: None)
    assert open(os.path.join(work, "results.md")).read() == rebuilt
    strip = lambda t: t.split("\n", 1)[1]  # noqa: E731  (the title names the source)
    assert sorted(strip(rebuilt).split("\n## ")) == sorted(strip(text).split("\n## "))
    with open(os.path.join(work, "results.jsonl"), "a") as out:  # a task recorded twice
        out.write(lines[0] + "\n")
    again = reproduce(args(work, report_only=True), log=lambda *_: None)
    assert strip(again) == strip(rebuilt)
    with pytest.raises(InputError, match="both trained for objective spmd"):
        reproduce(args(work, policy=f"{policy},{policy}"), log=lambda *_: None)


def test_train_split_draws_training_tables_and_a_workdir_keeps_its_tasks(tmp_path, monkeypatch):
    drawn = []

    def sample_task(*a, **kw):
        task = real(*a, **kw)
        drawn.append({s.name for s in task.specs})
        return task

    real = harness.sample_task
    monkeypatch.setattr(harness, "sample_task", sample_task)
    train_pool, test_pool = evaluation_pool(5000, 0)
    dev = str(tmp_path / "dev")
    quiet = lambda *_: None  # noqa: E731
    dev_args = dict(split="train", settings="base,unseen=0%", objectives="spmd", seed=7,
                    num_tasks=1)
    text = reproduce(args(dev, **dev_args), log=quiet)
    assert "(development split)" in text.splitlines()[0]
    assert len(drawn) == 2 and all(names <= {s.name for s in train_pool} for names in drawn)
    reproduce(args(str(tmp_path / "test"), settings="base", objectives="spmd", num_tasks=1),
              log=quiet)
    assert len(drawn) == 3 and drawn[2] <= {s.name for s in test_pool}
    with pytest.raises(InputError, match="unseen=50% mixes tables of both halves"):
        reproduce(args(str(tmp_path / "mix"), split="train", settings="unseen=50%"), log=quiet)
    # A resume with flags that draw other tasks is refused, naming each difference ...
    with pytest.raises(ResumeError, match=r"split: workdir's run.json \"train\", flags \"test\""):
        reproduce(args(dev, **{**dev_args, "split": "test"}), log=quiet)
    with pytest.raises(ResumeError, match="seed"):
        reproduce(args(dev, **{**dev_args, "seed": 8}), log=quiet)
    # ... and the same flags resume it: finished tasks are skipped, not run again.
    reproduce(args(dev, **{**dev_args, "num_tasks": 2}), log=quiet)
    assert len(open(os.path.join(dev, "results.jsonl")).read().splitlines()) == 4


def test_a_run_of_some_settings_keeps_the_others_in_the_report(tmp_path):
    work, quiet = str(tmp_path / "w"), (lambda *_: None)
    one = dict(objectives="spmd", num_tasks=1)
    reproduce(args(work, settings="base", **one), log=quiet)
    text = reproduce(args(work, settings="D=3", **one), log=quiet)
    assert "## base (T=8, D=2" in text and "## D=3 (T=8, D=3" in text
    assert open(os.path.join(work, "results.md")).read() == text
    assert "| base | 1 |" in text and "| D=3 | 1 |" in text  # both in the summary


@pytest.mark.parametrize("kw,err,culprit", [
    ({"num_tasks": 0}, ConfigError, "num_tasks"),
    ({"rounds": -1}, ConfigError, "rounds"),
    ({"objectives": "speed"}, InputError, "speed"),
    ({"settings": "base,X=7"}, InputError, "X=7"),
    ({"settings": "T=900"}, InputError, "T=900"),
    ({"tables": "/nonexistent.json"}, InputError, "nonexistent.json")])
def test_bad_flags(tmp_path, kw, err, culprit):
    with pytest.raises(err, match=culprit):
        reproduce(args(str(tmp_path / "w"), **kw), log=lambda *_: None)


def test_report_only_needs_finished_tasks(tmp_path):
    with pytest.raises(InputError, match="results.jsonl does not exist"):
        reproduce(args(str(tmp_path), report_only=True), log=lambda *_: None)
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(InputError, match="no finished tasks"):
        reproduce(args(str(tmp_path), report_only=True), log=lambda *_: None)


def test_report_only_keeps_the_named_settings_and_refuses_unknown_ones(tmp_path):
    work, quiet = str(tmp_path / "w"), (lambda *_: None)
    reproduce(args(work, num_tasks=1), log=quiet)  # base and D=3, both objectives
    only = reproduce(args(work, report_only=True, settings="D=3", objectives="max_device"),
                     log=quiet)
    assert "## D=3 (T=8, D=3" in only and "## base" not in only
    assert "objective max_device" in only and "objective spmd" not in only
    assert open(os.path.join(work, "results.md")).read() == only
    for settings, culprit in (("base,X=7", "unknown setting 'X=7'"),
                              ("D=8", r"no finished task of \['D=8'\]")):
        with pytest.raises(InputError, match=culprit):
            reproduce(args(work, report_only=True, settings=settings), log=quiet)


def test_cli_bad_flag_exits_2(tmp_path):
    proc = cli("launch.reproduce_autoshard", f"--workdir={tmp_path}", "--mem_factor=0.1")
    assert "mem_factor" in last_error(proc)


def test_oracle_ms_are_in_the_flags_unit_else_the_cost_models(tmp_path, monkeypatch):
    from autoshard_jax.cost import oracle
    from launch.reproduce_autoshard import oracle_unit

    monkeypatch.setattr(oracle, "_nominal_ms", {})  # this test's pins stay in this test
    monkeypatch.setattr(oracle, "reference_ms", lambda clock: 99.0)  # "calibrated here"
    model = types.SimpleNamespace(meta={"reference_ms": 12.5})
    cost = types.SimpleNamespace(model=model)
    f = args(str(tmp_path), measure="oracle")
    assert oracle_unit(f, cost) == "12.500 ms (the cost model's)"
    assert oracle._nominal_ms[(oracle.jax.devices()[0].platform, "cpu")] == 12.5
    f.reference_ms = 9.0
    assert oracle_unit(f, cost) == "9.000 ms (--reference_ms)"
    assert oracle._nominal_ms[(oracle.jax.devices()[0].platform, "cpu")] == 9.0
    f.reference_ms, model.meta = 0.0, {}  # an older model records no unit
    assert oracle_unit(f, cost) == "99.000 ms (calibrated in this process)"


def test_a_measuring_workdir_is_bound_to_its_cpu_type(tmp_path, monkeypatch):
    from autoshard_jax.cost import dataset
    from launch.reproduce_autoshard import check_workdir

    quiet = lambda *_: None  # noqa: E731
    f = args(str(tmp_path), measure="oracle", spmd_every_device=False)
    run_json = tmp_path / "run.json"
    name = dataset.cpu_name(dataset.host_cpu())
    check_workdir(f, quiet)
    assert json.loads(run_json.read_text())["cpu"] == name
    # A run.json from before the CPU was recorded takes this host's ...
    saved = json.loads(run_json.read_text())
    del saved["cpu"]
    run_json.write_text(json.dumps(saved))
    said = []
    check_workdir(f, said.append)
    assert "records no CPU type" in said[0]
    assert json.loads(run_json.read_text())["cpu"] == name
    # ... a machine of the same type resumes it, and another type cannot add its times.
    monkeypatch.setattr(dataset, "host_cpu", lambda: f"{name} (cache 1 KB)")
    check_workdir(f, quiet)
    monkeypatch.setattr(dataset, "host_cpu", lambda: "Another CPU (model 1)")
    with pytest.raises(ResumeError, match="cpu: workdir's run.json .*flags \"Another CPU\""):
        check_workdir(f, quiet)
    monkeypatch.setattr(dataset, "host_cpu", lambda: name)
    # The spmd step timed on every device is another measurement: recorded, and a resume that
    # changes it refused; a run.json from before the flag timed the busiest device alone.
    saved = json.loads(run_json.read_text())
    assert saved.pop("spmd_every_device") is False
    run_json.write_text(json.dumps(saved))
    check_workdir(f, quiet)
    with pytest.raises(ResumeError, match="spmd_every_device: workdir's run.json false"):
        check_workdir(args(str(tmp_path), measure="oracle", spmd_every_device=True), quiet)
    (tmp_path / "every").mkdir()
    every = args(str(tmp_path / "every"), measure="oracle", spmd_every_device=True)
    check_workdir(every, quiet)
    assert json.loads((tmp_path / "every" / "run.json").read_text())["spmd_every_device"]
    with pytest.raises(ResumeError, match="spmd_every_device"):
        check_workdir(args(str(tmp_path / "every"), measure="oracle", spmd_every_device=False),
                      quiet)
    # a max_device evaluation times no spmd step: it resumes under either flag
    check_workdir(args(str(tmp_path / "every"), measure="oracle", objectives="max_device",
                       spmd_every_device=False), quiet)
    (tmp_path / "predicted").mkdir()
    check_workdir(args(str(tmp_path / "predicted")), quiet)  # the cost model's times: no CPU
    predicted = json.loads((tmp_path / "predicted" / "run.json").read_text())
    assert "cpu" not in predicted and "spmd_every_device" not in predicted
    check_workdir(args(str(tmp_path / "predicted"), spmd_every_device=False), quiet)
