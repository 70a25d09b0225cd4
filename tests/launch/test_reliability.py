"""Every fault class against `launch.train_dlrm`, end to end, as a user meets it.

Each case runs the launcher in a subprocess and asserts the exit status, that the last line of
stderr names the culprit (`error: ...` for a failure, the launcher's result for a run that must
work), and that nothing already written (checkpoints, metrics.jsonl) was lost or changed.
"""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from autoshard_jax.data import SyntheticClickStream
from autoshard_jax.sharding.plan import plan_from_mapping, save_plan
from autoshard_jax.tables.spec import TableSpec, criteo_tables, save_tables

REPO = Path(__file__).resolve().parents[2]
ROWS = (100, 200, 300, 50)
BASE = ["--config=launch/configs/synthetic_small.py", "--config.batch_size=64",
        "--config.num_train_steps=6", "--config.log_every=1", "--config.checkpoint_every=3",
        "--config.data.num_eval_batches=2", f"--config.model.table_rows={ROWS}",
        "--config.model.bottom_mlp=(32,16)", "--config.model.top_mlp=(32,1)"]
TSV = ["--config.data.kind=criteo_tsv", "--config.data.num_dense=13"]
INJECT_ENOSPC = """
import errno, os, runpy, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler as h
async def full(self, x, directory):
    if x.get("data_position", 0) > 6:
        path = os.path.join(str(directory), "metadata")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    with open(os.path.join(str(directory), "metadata"), "w") as f:
        f.write(__import__("json").dumps(x))
h.JsonCheckpointHandler._save_fn = full
sys.argv[0] = "train_dlrm"
runpy.run_module("launch.train_dlrm", run_name="__main__", alter_sys=True)
"""


def launch(workdir, *flags, script=None):
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "launch.train_dlrm"]
    out = subprocess.run([*cmd, f"--workdir={workdir}", *BASE, *flags], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    text = out.stdout if out.returncode == 0 else out.stderr
    lines = [line for line in text.splitlines() if line.strip()]
    return out.returncode, lines[-1] if lines else "", out


def snapshot(workdir):
    """Every file under workdir except error.log, with its bytes (what must not change)."""
    root = Path(workdir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "error.log"} if root.exists() else {}


def metrics(workdir):
    with open(Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(records, up_to):
    return [(r["step"], r["loss"]) for r in records if "loss" in r and r["step"] <= up_to]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run (checkpoints at 3 and 6), copied by the cases that need one."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    rc, last, out = launch(workdir)
    assert rc == 0, out.stderr[-3000:]
    return workdir


def tsv_file(path, n, gz=False, seed=0):
    lines = SyntheticClickStream(criteo_tables(ROWS, 16), seed=seed)
    tmp = Path(str(path) + ".plain")
    lines.write_tsv(tmp, n)
    if gz:
        with open(tmp, "rb") as src, gzip.open(path, "wb") as dst:
            dst.write(src.read())
        tmp.unlink()
    else:
        tmp.rename(path)
    return path


@dataclass
class Case:
    """setup(tmp, trained) -> (workdir, flags[, script]); `trained()` gives the base run's
    workdir (trained on first use). The launcher run must end as described."""

    setup: object
    rc: int
    last: str  # regex the last line must match (of stderr on failure, stdout on success)
    unchanged: bool = True  # the workdir's files are byte-identical afterwards
    check: object = None  # extra check(workdir, out)
    # No traceback anywhere on stderr. Known gap: after a failed async write, tensorstore's
    # callbacks print "Event loop is closed" tracebacks from native threads before the error line.
    quiet: bool = True


def _fresh(flags):
    return lambda tmp, trained: (tmp / "run", flags)


def _resume(flags):
    def setup(tmp, trained):
        shutil.copytree(trained(), tmp / "run")
        return tmp / "run", flags
    return setup


def _tsv(n, gz=False, truncate=False, name="train.txt", extra=()):
    def setup(tmp, trained):
        path = tsv_file(tmp / name, n, gz=gz)
        if truncate:
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])
        return tmp / "run", [*TSV, f"--config.data.path={path}", *extra]
    return setup


def _malformed(tmp, trained):
    path = tsv_file(tmp / "train.txt", 200)
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "1\t2\tnot-a-line\n"
    path.write_text("".join(lines))
    return tmp / "run", [*TSV, f"--config.data.path={path}"]


def _day_dir(tmp, trained):
    days = tmp / "days"
    days.mkdir()
    (days / "README.txt").write_text("Criteo-format days 0-2.\n")
    for d in range(3):
        tsv_file(days / f"day_{d}", 128 * (d + 1), seed=d)
    return tmp / "run", [*TSV, f"--config.data.path={days}", "--config.data.train_days=(0,1)",
                         "--config.data.eval_days=(2,)", "--config.data.skip_bad_lines=true"]


def _day_dir_check(workdir, out):
    day2 = np.loadtxt(Path(workdir).parent / "days" / "day_2", usecols=0, delimiter="\t")
    final = [r for r in metrics(workdir) if r.get("final")][-1]["eval"]
    assert final["num_examples"] == len(day2) == 384
    assert final["ctr"] == pytest.approx(day2.mean(), abs=1e-6)
    assert "README.txt" in out.stderr


def _bad_tables(tmp, trained):
    (tmp / "tables.json").write_text('{"version": 1, "tables": [{"name": "a", "rows": -4}]}')
    return tmp / "run", [f"--config.tables={tmp / 'tables.json'}"]


def _big_plan(tmp, trained):
    tables = [TableSpec(f"t{i}", 100, 16) for i in range(4)]
    save_tables(tmp / "tables.json", tables)
    save_plan(tmp / "plan.json", plan_from_mapping({t.name: "row_wise" for t in tables}, 16,
                                                   1 << 30))
    return tmp / "run", [f"--config.tables={tmp / 'tables.json'}", "--simulate_cpu_devices=4",
                         f"--config.plan={tmp / 'plan.json'}", "--config.model.interaction=cat"]


def _workdir_under_a_file(tmp, trained):
    (tmp / "file").write_text("")
    return tmp / "file" / "run", []


def _largest_array_file(step_dir):
    return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(),
               key=lambda f: f.stat().st_size)


def _corrupt(steps, how):
    def setup(tmp, trained):
        shutil.copytree(trained(), tmp / "run")
        for step in steps:
            step_dir = tmp / "run" / "checkpoints" / str(step)
            if how == "truncate":
                victim = _largest_array_file(step_dir)
                victim.write_bytes(victim.read_bytes()[:16])
            else:
                (step_dir / "meta" / "metadata").write_text('{"data_position": ')
        return tmp / "run", ["--config.num_train_steps=9"]
    return setup


def _fell_back(step, bad):
    def check(workdir, out):
        assert re.search(rf"checkpoint step {step} \(.*{bad}.*resuming from step 3", out.stderr)
        assert (Path(workdir) / "checkpoints" / f"corrupt.{step}").is_dir()
        assert [r["step"] for r in metrics(workdir) if "loss" in r] == list(range(1, 10))
        assert [r["step"] for r in metrics(workdir) if r.get("final")] == [9]
    return check


def _disk_full_injected(tmp, trained):
    shutil.copytree(trained(), tmp / "run")
    return tmp / "run", ["--config.num_train_steps=12", "--config.log_every=100"], INJECT_ENOSPC


def _no_partial_checkpoint(workdir, out):
    ckpts = Path(workdir) / "checkpoints"
    assert not list(ckpts.glob("*orbax-checkpoint-tmp*"))
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["3", "6"]


CASES = {
    # config checked before anything compiles, every field by its key
    "log_every=0": Case(_fresh(["--config.log_every=0"]), 2,
                        r"^error: config\.log_every must be >= 1, got 0"),
    "checkpoint_every=0": Case(_fresh(["--config.checkpoint_every=0"]), 2,
                               r"^error: config\.checkpoint_every must be >= 1, got 0"),
    "batch_size=-8": Case(_fresh(["--config.batch_size=-8"]), 2,
                          r"^error: config\.batch_size must be >= 1"),
    "eval day trained on": Case(_tsv(700, extra=["--config.data.kaggle_days=7",
                                                 "--config.data.train_days=(0,6)",
                                                 "--config.data.eval_days=(6,)"]), 2,
                                r"^error: config\.data\.train_days .* overlap"),
    # data
    "missing data path": Case(_fresh([*TSV, "--config.data.path=/nonexistent/train.txt"]), 2,
                              r"^error: .*/nonexistent/train\.txt"),
    "TSV shorter than a batch": Case(_tsv(10), 2,
                                     r"^error: .*train\.txt holds 10 samples, fewer than one "
                                     r"batch of 64"),
    "malformed line": Case(_malformed, 2, r"^error: .*train\.txt:3: malformed line"),
    "truncated gzip mid-training": Case(_tsv(600, gz=True, truncate=True, name="day_0.gz",
                                             extra=["--config.num_train_steps=50"]), 2,
                                        r"^error: .*day_0\.gz: corrupt or truncated compressed "
                                        r"file after line \d+", unchanged=False),
    "day directory with a README": Case(_day_dir, 0, r"^\}$", unchanged=False,
                                        check=_day_dir_check),
    # tables, plan, devices, workdir
    "bad tables.json": Case(_bad_tables, 2, r"^error: .*tables\.json: tables\[0\] is missing"),
    "plan for 16 devices on 4": Case(_big_plan, 2, r"^error: .*16 devices"),
    "workdir under a file": Case(_workdir_under_a_file, 2, r"^error: .*Not a directory"),
    # resume
    "resume with another zipf_a": Case(_resume(["--config.data.zipf_a=1.5"]), 2,
                                       r"^error: cannot resume .*data\.zipf_a: checkpoint 1\.2, "
                                       r"config 1\.5"),
    "resume with another embedding dim": Case(
        _resume(["--config.model.embedding_dim=8", "--config.model.bottom_mlp=(32,8)"]), 2,
        r"^error: cannot resume .*model\.embedding_dim: checkpoint 16, config 8"),
    "resume with another embedding optimizer": Case(
        _resume(["--config.optim.embedding=sgd"]), 2,
        r"^error: cannot resume .*optim\.embedding: checkpoint \"rowwise_adagrad\", "
        r"config \"sgd\""),
    "re-run a finished run": Case(_resume([]), 0, r"^\}$",
                                  check=lambda w, out: "already finished" in out.stderr),
    "truncated array file in the latest step": Case(_corrupt([6], "truncate"), 0, r"^\}$",
                                                    unchanged=False,
                                                    check=_fell_back(6, "6/state")),
    "broken meta JSON in the latest step": Case(_corrupt([6], "meta"), 0, r"^\}$",
                                                unchanged=False,
                                                check=_fell_back(6, "6/meta/metadata")),
    # tensorstore's reader threads may print "Event loop is closed" while the corrupt arrays
    # are probed; the named error is still the last line (launch/common.py redirects the rest).
    "no intact checkpoint": Case(_corrupt([3, 6], "truncate"), 2,
                                 r"^error: no intact checkpoint in .*step 6 .*step 3",
                                 unchanged=False, quiet=False),
    # write failures
    "disk full while checkpointing (injected)": Case(
        _disk_full_injected, 2,
        r"^error: cannot write checkpoint step 9 to .*9\.orbax-checkpoint-tmp.*No space left",
        unchanged=False, check=_no_partial_checkpoint, quiet=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, tmp_path, request):
    case = CASES[name]
    workdir, flags, *script = case.setup(tmp_path, lambda: request.getfixturevalue("trained"))
    before = snapshot(workdir)
    rc, last, out = launch(workdir, *flags, script=script[0] if script else None)
    assert rc == case.rc, out.stderr[-4000:]
    assert re.search(case.last, last), f"last line: {last!r}\n{out.stderr[-3000:]}"
    if case.rc and case.quiet:
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
    if case.unchanged:
        assert snapshot(workdir) == before
    elif before:  # the curve written before the fault is still there, bit for bit
        assert losses(metrics(workdir), 6) == losses(
            map(json.loads, before["metrics.jsonl"].decode().splitlines()), 6)
    if case.check:
        case.check(workdir, out)


def _mount_tmpfs(path, size):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_on_a_real_filesystem_then_resume(tmp_path, trained):
    """A full tmpfs: one line naming the path, nothing partial left, then a clean resume."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "16m"):
        pytest.skip("cannot mount a tmpfs here; the injected-fault case covers the writer")
    try:
        shutil.copytree(trained, disk / "run")
        before = snapshot(disk / "run")
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - (16 << 10)))
        flags = ["--config.num_train_steps=12", "--config.log_every=100"]
        rc, last, out = launch(disk / "run", *flags)
        assert rc == 2, out.stderr[-3000:]
        assert re.search(r"^error: cannot write .*disk/run.*No space left on device", last), last
        _no_partial_checkpoint(disk / "run", out)
        after = snapshot(disk / "run")
        assert {k: v for k, v in after.items() if k.startswith("checkpoints")} == {
            k: v for k, v in before.items() if k.startswith("checkpoints")}
        assert losses(metrics(disk / "run"), 6) == losses(
            map(json.loads, before["metrics.jsonl"].decode().splitlines()), 6)
        (disk / "filler").unlink()
        rc, last, out = launch(disk / "run", *flags)
        assert rc == 0, out.stderr[-3000:]
        assert "Resumed from step 6" in out.stderr
        assert [r["step"] for r in metrics(disk / "run") if r.get("final")] == [6, 12]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
