"""`train_and_evaluate(config, workdir)`: the DLRM training job behind launch/train_dlrm.py.

One batch per step and a deterministic data source, so the data position is the step: a run
restored from a checkpoint at step k reads batch k next and continues bit-identically.
Multi-process (multi-host) runs need a plan over every process's devices: each process reads its
rows of every global batch (`data.DataSource`), process 0 alone writes metrics and logs progress,
and eval rows are gathered from every process for exact metrics (`train.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator

import jax
import ml_collections
from absl import logging

from autoshard_jax.data import Batch, DataSource
from autoshard_jax.embedding import EmbeddingStage, LocalEmbeddingStage
from autoshard_jax.errors import ConfigError, check_local_dir
from autoshard_jax.models.dlrm import DLRMDense
from autoshard_jax.optim.sparse import (
    RowOptimizer,
    make_dense_optimizer,
    make_row_optimizer,
    state_kinds,
)
from autoshard_jax.sharding.plan import load_plan
from autoshard_jax.sharding.stage import ShardedEmbeddingStage
from autoshard_jax.tables.spec import TableSpec, criteo_tables, load_tables
from autoshard_jax.train.checkpoint import Checkpointer, abstract_state
from autoshard_jax.train.config_checks import validate_config
from autoshard_jax.train.distributed import gather_rows, local_rows
from autoshard_jax.train.metrics import EvalAccumulator, evaluate_predictions
from autoshard_jax.train.prefetch import prefetch
from autoshard_jax.train.run_identity import check_same_run, run_identity
from autoshard_jax.train.runtime import release_host_memory
from autoshard_jax.train.step import setup_training


def build_tables(config: ml_collections.ConfigDict) -> list[TableSpec]:
    """Tables from `config.tables` (a tables.json path) or from the model's row list."""
    if config.get("tables"):
        return load_tables(config.tables)
    m = config.model
    return criteo_tables(m.table_rows, m.embedding_dim, rows_cap=m.get("rows_cap", 0),
                         pooling_factor=m.get("pooling_factor", 1.0))


def build_dense_model(config: ml_collections.ConfigDict) -> DLRMDense:
    m = config.model
    return DLRMDense(bottom_mlp=tuple(m.bottom_mlp), top_mlp=tuple(m.top_mlp),
                     interaction=m.interaction, self_interaction=m.self_interaction,
                     num_cross_layers=m.num_cross_layers, cross_rank=m.cross_rank,
                     dtype=m.get("dtype", "float32"))


class MetricsWriter:
    """metrics.jsonl in the workdir; on resume, records past the restored step are dropped.

    The file is rewritten through a temporary file and a rename, so a full disk or a kill during
    the rewrite never loses the records already there. `final` is the final record of a run
    that already finished at the restored step (None otherwise).
    """

    def __init__(self, workdir: str, resume_step: int, writes: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.final = None
        self.writes = writes  # process 0 of a multi-process run; the others only read
        if os.path.exists(self.path):
            kept, dropped = [], False
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # torn by a kill mid-write
                        logging.warning("dropping unreadable line of %s: %r", self.path, line)
                        dropped = True
                        continue
                    if record.get("step", 0) <= resume_step:
                        kept.append(json.dumps(record) + "\n")
                        if record.get("final") and record.get("step") == resume_step:
                            self.final = record
                    else:
                        dropped = True
            if dropped and writes:
                self._guard(self._replace, kept)

    def _replace(self, lines: list[str]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.path)

    def _guard(self, fn, *args) -> None:
        """Runs a write; an OS error (full disk) names this file, which stays as it was."""
        try:
            fn(*args)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write {self.path}: {exc.strerror}",
                          self.path) from exc

    def write(self, record: dict) -> None:
        if not self.writes:
            return

        def append():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self._guard(append)


def evaluate(eval_step, params, batches: Iterator[Batch], place) -> dict | None:
    """Exact metrics over every process's eval rows (the same result on every process)."""
    labels, logits, masks = [], [], []
    for batch in batches:
        masks.append(batch.pop("mask"))
        labels.append(batch["label"])
        logits.append(local_rows(eval_step(params, place(batch))))
    if not labels:
        return None
    acc = EvalAccumulator()
    acc.add(*(gather_rows(x) for x in (labels, logits, masks)))
    return acc.compute() if acc.num_examples else None


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: rely on orbax's preemption detection only
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def build_stage(config: ml_collections.ConfigDict, tables: list[TableSpec],
                row_opt: RowOptimizer) -> EmbeddingStage:
    """The local stage, or the sharded one when `config.plan` names a plan.json.

    The plan is validated (memory included) before any table is allocated.
    """
    if not config.plan:
        return LocalEmbeddingStage(tables, row_opt, config.model.combiner)
    plan = load_plan(config.plan)
    if config.num_devices and config.num_devices != plan.num_devices:
        raise ConfigError(f"--config.num_devices={config.num_devices} but {config.plan} is a "
                          f"plan for {plan.num_devices} devices")
    stage = ShardedEmbeddingStage(tables, plan, row_opt, config.model.combiner)
    kinds = state_kinds(row_opt)
    allocated = stage.layout.allocated_bytes(kinds)  # per device: SPMD shapes are equal
    for d, b in enumerate(stage.layout.real_bytes(kinds)):
        logging.info("device %d: %.2f MB of embedding parameters + optimizer state "
                     "(%.2f MB allocated)", d, b / 2**20, allocated / 2**20)
    logging.info("plan %s: padding overhead %.3f (allocated / real bytes)", config.plan,
                 stage.layout.padding_overhead(kinds))
    return stage


def _format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from workdir's latest checkpoint if any); returns the final eval metrics."""
    validate_config(config)
    if jax.process_count() > 1 and not config.plan:
        raise ConfigError(f"a run over {jax.process_count()} processes needs a sharding plan "
                          "over their devices: set config.plan")
    is_main = jax.process_index() == 0  # writes metrics and logs progress
    check_local_dir(workdir)
    os.makedirs(workdir, exist_ok=True)
    tables = build_tables(config)
    data = DataSource(config, tables, jax.process_index(), jax.process_count())
    dense_model = build_dense_model(config)
    row_opt = make_row_optimizer(config.optim.embedding, config.optim.embedding_lr)
    dense_tx = make_dense_optimizer(config.optim.dense, config.optim.dense_lr)
    param_bytes = sum(t.param_bytes() for t in tables)
    logging.info("DLRM: %d tables, %.1f MB of embeddings, devices %s", len(tables),
                 param_bytes / 2**20, jax.devices())
    rng = jax.random.key(config.seed)
    stage = build_stage(config, tables, row_opt)
    # Compiled against an abstract state before any table exists, so a resumed run never holds
    # a fresh state beside the restored one.
    setup = setup_training(stage, dense_model, dense_tx, data.example())
    train_step, eval_step, place = setup.train_step, setup.eval_step, setup.place
    release_host_memory()  # the compiler's scratch, before the tables are allocated

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                        save_interval_steps=config.checkpoint_every)
    identity = run_identity(config)
    try:
        # The record's run identity is checked before any array is read; a step that does not
        # read back falls back to the newest intact one (checkpoint.py).
        restored = ckpt.restore_latest(
            abstract_state(setup.abstract),
            check=lambda meta: check_same_run(meta.get("run", {}), identity, ckpt.directory))
        if restored is not None and restored[0] > config.num_train_steps:
            raise ConfigError(f"config.num_train_steps={config.num_train_steps} but "
                              f"{ckpt.directory} holds step {restored[0]}: raise "
                              "num_train_steps to continue that run, or use a new workdir")
    except BaseException:
        ckpt.close()
        raise
    if restored is not None:
        start, state, meta = restored
        logging.info("Resumed from step %d (data position %d)", start, meta["data_position"])
    else:
        start, meta = 0, {}
        state = setup.init(rng)
    writer = MetricsWriter(workdir, start, writes=is_main)
    num_steps = config.num_train_steps
    if writer.final is not None and start == num_steps:
        ckpt.close()
        return _already_finished(workdir, writer.final)
    final = None
    t_start, t_last, step_last = time.time(), time.time(), start
    train_batches = prefetch(data.train(start, meta.get("data", {})), place)
    with ckpt, _Preemption() as preemption, contextlib.closing(train_batches) as batches:
        step = start
        for step in range(start + 1, num_steps + 1):
            try:
                batch = next(batches)
            except StopIteration:
                if step == start + 1 and writer.final is not None:
                    return _already_finished(workdir, writer.final)
                logging.warning("training data ran out after step %d of config.num_train_steps="
                                "%d (%d batches of %d samples); evaluating there", step - 1,
                                num_steps, step - 1, config.batch_size)
                step -= 1
                break
            state, metrics = train_step(state, batch)
            if (step % config.log_every == 0 or step == num_steps) and is_main:
                loss = float(metrics["loss"])
                now = time.time()
                rate = (step - step_last) * config.batch_size / max(now - t_last, 1e-9)
                eta = (num_steps - step) * config.batch_size / max(rate, 1e-9)
                logging.info("step %d/%d  %.0f samples/s  loss %.5f  ETA %s", step, num_steps,
                             rate, loss, _format_eta(eta))
                writer.write({"step": step, "loss": loss, "samples_per_s": rate,
                              "elapsed_s": now - t_start})
                t_last, step_last = now, step
            if config.eval_every and step % config.eval_every == 0 and step != num_steps:
                result = evaluate(eval_step, state.params, data.eval(), place)
                if result and is_main:
                    logging.info("eval at step %d: %s", step, _fmt(result))
                    writer.write({"step": step, "eval": result})
            if ckpt.should_save(step) or preemption.requested:
                ckpt.save(step, state, {"data_position": step, "run": identity,
                                        "data": data.position(step)},
                          force=preemption.requested)
            if preemption.requested:
                logging.warning("SIGTERM: saved step %d, stopping", step)
                _report_skipped_lines(data)
                return {"preempted_at": step}
        batches.close()  # the producer stops here, not when the garbage collector finds it
        ckpt.save(step, state, {"data_position": step, "run": identity,
                                "data": data.position(step)}, force=True)
        final = evaluate(eval_step, state.params, data.eval(), place)
        if final and is_main:
            final.update(_teacher_metrics(data))
            logging.info("final eval at step %d: %s", step, _fmt(final))
            writer.write({"step": step, "eval": final, "final": True})
    _report_skipped_lines(data)
    return final or {}


def _already_finished(workdir: str, record: dict) -> dict:
    """A re-run of a finished run: says so and returns its final eval, writing nothing."""
    logging.warning("the run in %s already finished at step %d (final eval recorded in "
                    "metrics.jsonl); nothing to do. Raise config.num_train_steps to train on, or "
                    "use a new workdir", workdir, record["step"])
    return record["eval"]


def _teacher_metrics(data: DataSource) -> dict:
    """What the synthetic teacher itself scores on the eval batches: the reachable ceiling."""
    predictions = data.teacher_predictions()
    if predictions is None:
        return {}
    teacher = evaluate_predictions(*predictions)
    return {"teacher_auc": teacher["auc"], "teacher_ne": teacher["ne"]}


def _report_skipped_lines(data: DataSource) -> None:
    report = data.skipped_lines_report()
    if report:
        logging.warning("skipped malformed lines: %s", report)


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items())
