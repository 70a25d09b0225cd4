"""`train_and_evaluate(config, workdir)`: the DLRM training job behind launch/train_dlrm.py.

One batch per step and a deterministic data source, so the data position is the step: a run
restored from a checkpoint at step k reads batch k next and continues bit-identically.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from autoshard_jax.data import CriteoTSVReader, SyntheticClickStream
from autoshard_jax.models.dlrm import DLRMDense
from autoshard_jax.optim.sparse import make_dense_optimizer, make_row_optimizer
from autoshard_jax.sharding.layout import state_kinds
from autoshard_jax.sharding.plan import load_plan
from autoshard_jax.sharding.stage import ShardedEmbeddingStage
from autoshard_jax.tables.spec import TableSpec, criteo_tables, load_tables
from autoshard_jax.train.checkpoint import Checkpointer, abstract_state
from autoshard_jax.train.metrics import EvalAccumulator, evaluate_predictions
from autoshard_jax.train.prefetch import prefetch
from autoshard_jax.train.runtime import release_host_memory
from autoshard_jax.train.step import (
    Batch,
    LocalEmbeddingStage,
    TrainState,
    init_train_state,
    make_eval_step,
    make_train_step,
)


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
                     num_cross_layers=m.num_cross_layers, cross_rank=m.cross_rank)


class DataSource:
    """Train batches from a position, and a finite list of eval batches, for either data kind."""

    def __init__(self, config: ml_collections.ConfigDict, tables: list[TableSpec]):
        d = config.data
        self.batch_size = config.batch_size
        self.kind = d.kind
        if d.kind == "synthetic":
            self.stream = SyntheticClickStream(tables, num_dense=d.num_dense, seed=config.seed,
                                               zipf_a=d.zipf_a)
        elif d.kind == "criteo_tsv":
            if not d.path:
                raise ValueError("config.data.path must name a Criteo TSV file or directory")
            if not os.path.exists(d.path):
                raise FileNotFoundError(f"config.data.path {d.path!r} does not exist")
            if set(d.train_days) & set(d.eval_days):
                raise ValueError(f"config.data.train_days {tuple(d.train_days)} and eval_days "
                                 f"{tuple(d.eval_days)} overlap: eval data would be trained on")
            if d.eval_days and not d.train_days:
                raise ValueError("config.data.eval_days is set but train_days is empty (= every "
                                 "day, eval days included): list the train days")
            kaggle_days = d.kaggle_days or None
            common = dict(tables=tables, num_dense=d.num_dense, kaggle_days=kaggle_days,
                          skip_bad_lines=d.skip_bad_lines)
            self.train_reader = CriteoTSVReader(d.path, days=tuple(d.train_days) or None,
                                                **common)
            self.eval_reader = CriteoTSVReader(d.path, days=tuple(d.eval_days), drop_last=False,
                                               **common) if d.eval_days else None
        else:
            raise ValueError(
                f"config.data.kind must be 'synthetic' or 'criteo_tsv', got {d.kind!r}")
        self.num_eval_batches = d.num_eval_batches

    def reference_metrics(self) -> dict:
        """What the synthetic teacher itself scores on the eval batches: the reachable ceiling."""
        if self.kind != "synthetic":
            return {}
        teacher = evaluate_predictions(*self.stream.teacher_predictions(
            self.num_eval_batches * self.batch_size, batch_size=self.batch_size, split="eval"))
        return {"teacher_auc": teacher["auc"], "teacher_ne": teacher["ne"]}

    def train(self, start: int) -> Iterator[Batch]:
        if self.kind == "synthetic":
            return self.stream.batches(self.batch_size, start=start)
        return self.train_reader.batches(self.batch_size, start_batch=start)

    def eval(self) -> Iterator[Batch]:
        """Eval batches, padded to the batch size with a `mask` so shapes stay static."""
        if self.kind == "synthetic":
            batches = self.stream.batches(self.batch_size, num_batches=self.num_eval_batches,
                                          split="eval")
        elif self.eval_reader is None:
            return iter(())
        else:
            batches = self.eval_reader.batches(self.batch_size)
        return (pad_batch(b, self.batch_size) for b in batches)


def pad_batch(batch: Batch, batch_size: int) -> Batch:
    """Pads a short batch with padding ids and a False mask (one compiled eval shape)."""
    n = batch["label"].shape[0]
    pad = batch_size - n

    def grow(a, value):
        return np.concatenate([a, np.full((pad, *a.shape[1:]), value, a.dtype)]) if pad else a

    return {"dense": grow(batch["dense"], 0), "ids": tuple(grow(i, -1) for i in batch["ids"]),
            "label": grow(batch["label"], 0), "mask": grow(np.ones(n, bool), False)}


class MetricsWriter:
    """metrics.jsonl in the workdir; on resume, records past the restored step are dropped."""

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # torn by a kill mid-write
                        logging.warning("dropping unreadable line of %s: %r", self.path, line)
                        continue
                    if record.get("step", 0) <= resume_step:
                        kept.append(json.dumps(record) + "\n")
            with open(self.path, "w") as f:
                f.writelines(kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def evaluate(eval_step, params, batches: Iterator[Batch], place=jax.device_put) -> dict | None:
    acc = EvalAccumulator()
    for batch in batches:
        mask = batch.pop("mask")
        acc.add(batch["label"], eval_step(params, place(batch)), mask)
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


def _local_setup(config, tables, row_opt, dense_model, dense_tx, example, rng):
    """Stage, abstract state, state init, compiled step and batch placement on one device."""
    stage = LocalEmbeddingStage(tables, row_opt, config.model.combiner)
    example = jax.device_put(example)
    init_fn = jax.jit(lambda key: init_train_state(key, dense_model, stage, dense_tx, example))
    abstract = jax.eval_shape(init_fn, rng)
    train_step = jax.jit(make_train_step(dense_model, stage, dense_tx),
                         donate_argnums=0).lower(abstract, example).compile()
    return stage, abstract, init_fn.lower(rng).compile(), train_step, jax.device_put


def _sharded_setup(config, tables, row_opt, dense_model, dense_tx, example, rng):
    """Stage, abstract state, state init, compiled step and batch placement for a plan.json.

    `rng` is unused here (the returned init_fn takes it); the signature matches _local_setup.
    """
    del rng
    plan = load_plan(config.plan)
    if config.num_devices and config.num_devices != plan.num_devices:
        raise ValueError(f"--config.num_devices={config.num_devices} but {config.plan} is a plan "
                         f"for {plan.num_devices} devices")
    if plan.num_devices > jax.device_count():
        raise ValueError(f"{config.plan} needs {plan.num_devices} devices, {jax.device_count()} "
                         "are available (on CPU: --simulate_cpu_devices)")
    # Validates the plan (memory included) before any table is allocated.
    stage = ShardedEmbeddingStage(tables, plan, row_opt, config.model.combiner,
                                  devices=jax.devices()[:plan.num_devices])
    kinds = state_kinds(row_opt)
    real = stage.layout.real_bytes(kinds)
    allocated = stage.layout.allocated_bytes(kinds)  # per device: SPMD shapes are equal
    for d, b in enumerate(real):
        logging.info("device %d: %.2f MB of embedding parameters + optimizer state "
                     "(%.2f MB allocated)", d, b / 2**20, allocated / 2**20)
    logging.info("plan %s: padding overhead %.3f (allocated / real bytes)", config.plan,
                 stage.layout.padding_overhead(kinds))
    example_placed = stage.prepare_batch(example)
    params, opt_state = stage.abstract_params(dense_model, dense_tx, example)
    step0 = jax.ShapeDtypeStruct((), jnp.int32, sharding=stage.replicated)
    abstract = TrainState(step=step0, params=params, opt_state=opt_state)
    train_step = stage.jit(make_train_step(dense_model, stage, dense_tx),
                           abstract).lower(abstract, example_placed).compile()

    def init_fn(rng):
        params, opt_state = stage.init_params(rng, dense_model, dense_tx, example)
        step0 = jax.device_put(jnp.zeros((), jnp.int32), stage.replicated)
        return TrainState(step=step0, params=params, opt_state=opt_state)

    return stage, abstract, init_fn, train_step, stage.prepare_batch


def _format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from workdir's latest checkpoint if any); returns the final eval metrics."""
    if jax.process_count() > 1:
        raise NotImplementedError(
            "multi-host input pipelines (per-process data shards fed with "
            "jax.make_array_from_process_local_data) are not implemented yet; run single-host")
    os.makedirs(workdir, exist_ok=True)
    tables = build_tables(config)
    data = DataSource(config, tables)
    dense_model = build_dense_model(config)
    row_opt = make_row_optimizer(config.optim.embedding, config.optim.embedding_lr)
    dense_tx = make_dense_optimizer(config.optim.dense, config.optim.dense_lr)
    param_bytes = sum(t.param_bytes() for t in tables)
    logging.info("DLRM: %d tables, %.1f MB of embeddings, devices %s", len(tables),
                 param_bytes / 2**20, jax.devices())
    rng = jax.random.key(config.seed)
    example = (data.stream.batch(0, config.batch_size) if data.kind == "synthetic"
               else next(data.train(0)))
    setup = _sharded_setup if config.plan else _local_setup
    # Both compile against an abstract state before any table exists, so a resumed run never
    # holds a fresh state beside the restored one.
    stage, state, init_fn, train_step, place = setup(config, tables, row_opt, dense_model,
                                                     dense_tx, example, rng)
    release_host_memory()  # the compiler's scratch, before the tables are allocated
    eval_step = jax.jit(make_eval_step(dense_model, stage))

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                        save_interval_steps=config.checkpoint_every)
    start = ckpt.latest_step()
    identity = run_identity(config)
    if start is not None:
        state, meta = ckpt.restore(start, abstract_state(state))
        check_same_run(meta.get("run", {}), identity, ckpt.directory)
        logging.info("Resumed from step %d (data position %d)", start, meta["data_position"])
    else:
        start = 0
        state = init_fn(rng)
    writer = MetricsWriter(workdir, start)
    num_steps = config.num_train_steps
    final = None
    t_start, t_last, step_last = time.time(), time.time(), start
    with ckpt, _Preemption() as preemption:
        batches = prefetch(data.train(start), place)
        step = start
        for step in range(start + 1, num_steps + 1):
            try:
                batch = next(batches)
            except StopIteration:
                logging.info("Training data exhausted after %d steps", step - 1)
                step -= 1
                break
            state, metrics = train_step(state, batch)
            if step % config.log_every == 0 or step == num_steps:
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
                if result:
                    logging.info("eval at step %d: %s", step, _fmt(result))
                    writer.write({"step": step, "eval": result})
            if ckpt.should_save(step) or preemption.requested:
                ckpt.save(step, state, {"data_position": step, "run": identity},
                          force=preemption.requested)
            if preemption.requested:
                logging.warning("SIGTERM: saved step %d, stopping", step)
                _report_skipped_lines(data)
                return {"preempted_at": step}
        ckpt.save(step, state, {"data_position": step, "run": identity}, force=True)
        final = evaluate(eval_step, state.params, data.eval(), place)
        if final:
            final.update(data.reference_metrics())
            logging.info("final eval at step %d: %s", step, _fmt(final))
            writer.write({"step": step, "eval": final, "final": True})
    _report_skipped_lines(data)
    return final or {}


def _report_skipped_lines(data: DataSource) -> None:
    if data.kind == "criteo_tsv" and data.train_reader.stats.num_bad:
        logging.warning("skipped malformed lines: %s", data.train_reader.stats.report())


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def run_identity(config: ml_collections.ConfigDict) -> dict:
    """What decides the data order and the state layout; a resumed run must match it."""
    d = config.data
    return {"seed": config.seed, "batch_size": config.batch_size, "data_kind": d.kind,
            "data_path": os.path.abspath(d.path) if d.path else "",
            "train_days": list(d.train_days), "kaggle_days": d.kaggle_days,
            "skip_bad_lines": d.skip_bad_lines,
            "tables": _file_digest(config.tables) if config.tables else list(
                config.model.table_rows),
            "plan": _file_digest(config.plan) if config.plan else ""}


def check_same_run(saved: dict, current: dict, where: str) -> None:
    """Refuses to resume a checkpoint with a config that would read other data or state."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in current.items()
             if saved.get(k) != v]
    if diffs:
        raise ValueError(f"cannot resume from {where}: the config differs from the run that "
                         "wrote it (use a new workdir or the original config):\n  "
                         + "\n  ".join(diffs))


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items())
