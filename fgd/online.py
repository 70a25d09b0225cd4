"""`run_online(config, workdir)`: the job behind launch/fgd_online.py.

Checks every config field before anything compiles, builds the stream / model / methods, runs
each (seed, method) through the protocol (resuming where a killed run stopped) and writes
metrics.jsonl, summary.json, results.md and auc.png into the workdir.
"""

from __future__ import annotations

import functools
import os
import time

import ml_collections
from absl import logging

from autoshard_jax.errors import ConfigError, DataError, check_range
from autoshard_jax.tables.spec import criteo_tables
from fgd import methods as M
from fgd import movielens, report
from fgd.models import dlrm_model, embmlp_model
from fgd.protocol import Records, Study, seconds_left, test_periods
from fgd.streams import DRIFTS, criteo_stream, synthetic_stream


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in str(text).split(",") if m.strip()]
    if not names:
        raise ConfigError("config.methods is empty; give e.g. bu,fgd")
    bad = [m for m in names if m not in M.METHODS]
    if bad:
        raise ConfigError(f"config.methods: unknown method(s) {bad}; choose from "
                          f"{','.join(M.METHODS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"config.methods lists a method twice: {names}")
    return names


def check_config(config: ml_collections.ConfigDict) -> list[str]:
    """Raises ConfigError naming the first bad field; returns the method list."""
    methods = parse_methods(config.methods)
    check_range("seeds", config.seeds, low=1, high=1000, integer=True)
    check_range("num_periods", config.num_periods, low=0, high=10000, integer=True)
    check_range("pretrain_periods", config.pretrain_periods, low=1, integer=True)
    check_range("pretrain_epochs", config.pretrain_epochs, low=1, high=1000, integer=True)
    check_range("report_last", config.report_last, low=0, integer=True)
    check_range("diag_rows", config.diag_rows, low=1, integer=True)
    o = config.optim
    check_range("optim.lr", o.lr, low=1e-8, high=10.0)
    check_range("optim.batch_size", o.batch_size, low=1, high=1 << 20, integer=True)
    check_range("optim.epochs", o.epochs, low=1, high=1000, integer=True)
    check_range("optim.window", o.window, low=1, integer=True)
    check_range("optim.history", o.history, low=1, high=16, integer=True)
    check_range("optim.meta_lr", o.meta_lr, low=0.0, high=10.0)
    check_range("optim.meta_steps", o.meta_steps, low=0, integer=True)
    check_range("optim.meta_batch", o.meta_batch, low=1, high=1 << 20, integer=True)
    check_range("optim.unroll_steps", o.unroll_steps, low=1, high=1000, integer=True)
    check_range("optim.sml_steps", o.sml_steps, low=0, integer=True)
    check_range("optim.sml_lr", o.sml_lr, low=0.0, high=10.0)
    if config.pretrain_periods < o.history + 1:
        raise ConfigError(f"config.pretrain_periods={config.pretrain_periods} must be >= "
                          f"optim.history + 1 = {o.history + 1} (the generator's first meta "
                          "pair needs that many past periods)")
    d = config.data
    if d.kind == "synthetic":
        if d.drift not in DRIFTS:
            raise ConfigError(f"config.data.drift must be one of {DRIFTS}, got {d.drift!r}")
        check_range("data.speed", d.speed, low=0.0, high=10.0)
        check_range("data.cycle", d.cycle, low=1, integer=True)
        check_range("data.change_every", d.change_every, low=1, integer=True)
        check_range("data.samples_per_period", d.samples_per_period, low=16, high=1 << 24,
                    integer=True)
        check_range("data.zipf_a", d.zipf_a, low=0.0, high=5.0)
        if config.num_periods and config.num_periods < config.pretrain_periods + 2:
            raise ConfigError(f"config.num_periods={config.num_periods} must be >= "
                              f"pretrain_periods + 2 = {config.pretrain_periods + 2}")
        if not config.num_periods:
            raise ConfigError("config.num_periods must be > 0 for the synthetic stream")
    elif d.kind in ("movielens", "criteo_tsv"):
        if not d.path:
            raise ConfigError(f"config.data.path must name the {d.kind} data (file or directory)")
    else:
        raise ConfigError("config.data.kind must be synthetic, movielens or criteo_tsv, got "
                          f"{d.kind!r}")
    if config.model.kind not in ("dlrm", "embmlp"):
        raise ConfigError(f"config.model.kind must be dlrm or embmlp, got {config.model.kind!r}")
    return methods


def hyper(config) -> M.Hyper:
    o = config.optim
    return M.Hyper(batch_size=o.batch_size, lr=o.lr, epochs=o.epochs, window=o.window,
                   history=o.history, meta_lr=o.meta_lr, meta_steps=o.meta_steps,
                   meta_batch=o.meta_batch, unroll_steps=o.unroll_steps, sml_steps=o.sml_steps,
                   sml_lr=o.sml_lr)


_PIECES: dict[str, M.Pieces] = {}


def _pieces(model, hp: M.Hyper) -> M.Pieces:
    """One set of jitted functions per (model, hyperparameters) in a process, so a second run
    (a resumed one, a test) reuses the compiled programs instead of compiling them again."""
    key = repr((model, hp))
    if key not in _PIECES:
        _PIECES[key] = M.Pieces(model, hp)
    return _PIECES[key]


def build_study(config: ml_collections.ConfigDict) -> Study:
    """Stream loader per seed, model and methods for a checked config."""
    d, m = config.data, config.model
    P = config.pretrain_periods
    if d.kind == "movielens":
        data = movielens.load(d.path, history=d.get("history", 30))
        T = config.num_periods or data.num_periods
        if T > data.num_periods:
            raise DataError(f"{d.path}: {data.num_periods} weekly periods, config.num_periods "
                            f"asks for {T}")
        model = embmlp_model(data.vocab, m.embedding_dim, tuple(m.mlp))

        def loader(seed):
            return functools.lru_cache(None)(data.period), None
    else:
        tables = criteo_tables(m.table_rows, m.embedding_dim, rows_cap=m.get("rows_cap", 0))
        model = dlrm_model(tables, m.bottom_mlp, m.top_mlp, m.interaction)
        if d.kind == "synthetic":
            T = config.num_periods

            def loader(seed):
                s = synthetic_stream(tables, d.num_dense, seed, d.zipf_a, d.drift, d.speed, T,
                                     d.samples_per_period, T, d.cycle, d.change_every)
                return functools.lru_cache(None)(s.period), s.info
        else:
            s = criteo_stream(d.path, tables, d.num_dense, P + 1, d.kaggle_days,
                              d.skip_bad_lines, d.max_rows_per_period)
            T = config.num_periods or s.num_periods
            if T > s.num_periods:
                raise DataError(f"{d.path}: {s.num_periods} days, config.num_periods asks "
                                f"for {T}")
            s.revealed = s.num_periods  # the loader; the protocol's own streams guard it
            load = functools.lru_cache(None)(s.period)

            def loader(seed):
                return load, None
    if T < P + 2:
        raise DataError(f"{d.path or d.kind}: {T} periods, need pretrain_periods + 2 = {P + 2}")
    return Study(loader, T, P, _pieces(model, hyper(config)),
                 pretrain_epochs=config.pretrain_epochs, diag_rows=config.diag_rows,
                 diagnostics=config.diagnostics)


def run_online(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) every (seed, method); returns the summary written to summary.json."""
    methods = check_config(config)
    seeds = list(range(config.seeds))
    study = build_study(config)
    os.makedirs(workdir, exist_ok=True)
    records = Records(os.path.join(workdir, "metrics.jsonl"))
    periods = test_periods(study.T, study.P, config.report_last)
    per_run = study.T - 1 - study.P
    total = len(seeds) * len(methods) * per_run
    all_keys = {(s, mm, p) for s in seeds for mm in methods for p in range(study.P, study.T)}
    if all_keys <= records.keys:
        logging.info("run already complete in %s (%d records); rewriting the summary only",
                     workdir, len(records.rows))
        print(f"run already complete in {workdir}; summary rewritten", flush=True)
    else:
        done_before = sum(1 for k in records.keys if k in all_keys and k[2] > study.P)
        start, counter = time.time(), {"done": 0}

        def progress(method, t, rec):
            counter["done"] += 1
            left = seconds_left(counter["done"], total - done_before, time.time() - start)
            print(f"[fgd] seed {seed} {method:>14s} period {rec['period']:3d}/{study.T - 1} "
                  f"auc {rec['auc']:.4f} ne {rec['ne']:.4f} | "
                  f"{done_before + counter['done']}/{total} ETA {left / 60:.1f} min", flush=True)

        for seed in seeds:
            for method in methods:
                if all((seed, method, p) in records.keys for p in range(study.P, study.T)):
                    continue
                study.run(seed, method, workdir, records, progress)
    title = f"{config.name}: " + (f"{config.data.kind}" if config.data.kind != "synthetic" else
                                  f"synthetic {config.data.drift} drift, speed "
                                  f"{config.data.speed}")
    return report.write_all(workdir, records.rows, methods, seeds, periods, title)
