"""The online protocol: pretrain, then per period update -> deploy -> evaluate the next period.

Periods 0..P-1 pretrain the model; the pretrained model is deployed and scored on period P
(logged, not a test period). Then for t = P..T-2: each method updates on data up to t, deploys,
and is scored on t+1 (a test period), with the gradient diagnostics at the deployed parameters.
Each (seed, method) run checkpoints its state after every period (orbax) and appends one JSONL
record per period, so a killed run resumes at the period it was in and never writes a record
twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from autoshard_jax.data.batch import Batch
from autoshard_jax.errors import ResumeError
from autoshard_jax.train.checkpoint import Checkpointer
from autoshard_jax.train.metrics import auc, evaluate_predictions
from fgd import methods as M
from fgd.streams import PeriodStream, concat_batches
from fgd.transform import GATE_STATS, add_evidence, gate_from_evidence


def _sq(tree) -> float:
    return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


class Records:
    """metrics.jsonl: one line per (seed, method, period); existing keys are never rewritten."""

    def __init__(self, path: str):
        self.path = path
        self.rows: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:  # torn by a kill mid-write; recomputed
                        logging.warning("dropping unreadable line of %s: %r", path, line[:80])
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
        self.keys = {(r["seed"], r["method"], r["period"]) for r in self.rows}

    def add(self, record: dict) -> bool:
        key = (record["seed"], record["method"], record["period"])
        if key in self.keys:
            return False
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.rows.append(record)
        self.keys.add(key)
        return True


class Study:
    """Everything one launcher run needs: data loaders per seed, the model and the methods."""

    def __init__(self, loader: Callable[[int], tuple[Callable[[int], Batch], Callable | None]],
                 num_periods: int, pretrain_periods: int, pieces: M.Pieces, init_seed_offset=0,
                 pretrain_epochs: int = 1, diag_rows: int = 4096, diagnostics: bool = True):
        self.loader = loader
        self.T, self.P = num_periods, pretrain_periods
        self.pieces, self.hp = pieces, pieces.hp
        self.pretrain_epochs = pretrain_epochs
        self.diag_rows, self.diagnostics = diag_rows, diagnostics
        self._cache: dict[int, tuple] = {}
        self.init_seed_offset = init_seed_offset
        self._sml = M.make_sml_step(pieces)

    def source(self, seed: int):
        if seed not in self._cache:
            self._cache = {seed: self.loader(seed)}  # one seed's periods in memory at a time
        return self._cache[seed]

    def stream(self, seed: int, revealed: int) -> PeriodStream:
        load, info = self.source(seed)
        return PeriodStream(load, self.T, revealed, info)

    def init_params(self, seed: int):
        load, _ = self.source(seed)
        example = M.padded_batches(load(0), self.hp.batch_size, None)[0]
        return self.pieces.init(jax.random.key(seed + self.init_seed_offset), example)

    # ---- one method, one period ------------------------------------------------------------

    def initial_state(self, method: str, params) -> dict:
        state = {"params": params, "prev_params": params}
        gen = M.generator_for(method, self.hp.history)
        if method in M.FGD_VARIANTS:
            state["meta"] = gen.init(params, jax.random.key(3))
            state["meta_opt"] = self.pieces.meta_tx.init(state["meta"]["inner"])
            state["gate_stats"] = {k: jnp.zeros((), jnp.float32) for k in GATE_STATS}
        if method == "sml":
            state["psi"] = M.sml_init()
            state["psi_opt"] = self.pieces.sml_tx.init(state["psi"])
            state["prev_hat"] = params
        return state

    def update(self, method: str, state: dict, stream: PeriodStream, seed: int, t: int
               ) -> tuple[dict, dict]:
        """The method's update at the end of period t (data up to t only)."""
        pieces, hp = self.pieces, self.hp
        params, new, extra = state["params"], dict(state), {}
        lags = [stream.period(t - k) for k in range(min(hp.history + 2, t + 1))]
        if method == "bu":
            new["params"] = M.train_epochs(pieces, params, lags[0], seed, t, hp.epochs)
        elif method == "bu_w":
            data = concat_batches([stream.period(k) for k in range(max(0, t - hp.window + 1),
                                                                   t + 1)])
            new["params"] = M.train_epochs(pieces, params, data, seed, t, hp.epochs)
        elif method == "full":
            data = concat_batches([stream.period(k) for k in range(t + 1)])
            new["params"] = M.train_epochs(pieces, self.init_params(seed), data, seed, t,
                                           hp.epochs)
        elif method == "hint":
            new["params"] = M.train_fgd(pieces, M.HINT_GENERATOR, M.hint_meta(params), params,
                                        lags[:2], seed, t)
        elif method == "sml":
            step, transfer = self._sml
            if t > self.P:  # fit psi on the newest pair: (old, fine-tuned at t-1) -> D_t
                psi, opt = state["psi"], state["psi_opt"]
                for m in range(hp.sml_steps):
                    b = M._sample(lags[0], hp.meta_batch, M._rng(seed, t, 200 + m))
                    psi, opt, loss = step(psi, opt, state["prev_params"], state["prev_hat"], b)
                new["psi"], new["psi_opt"], extra["meta_loss"] = psi, opt, float(loss)
            hat = M.train_epochs(pieces, params, lags[0], seed, t, hp.epochs)
            new["params"] = transfer(new["psi"], params, hat)
            new["prev_hat"] = hat
        else:
            gen = M.generator_for(method, hp.history)
            objective = M.FGD_VARIANTS[method][1]
            stats = state["gate_stats"]
            if t > self.P:  # backtest last period's forecast (its meta fit ends at D_{t-1})
                gain_N = M.backtest_gain(pieces, gen.inner, state["meta"]["inner"],
                                         state["prev_params"], lags[1:hp.history + 2], lags[0],
                                         seed, t)
                stats = add_evidence(stats, gain_N)
                extra["backtest_gain"] = float(gain_N.mean())
            inner, opt, loss = M.meta_update(pieces, gen.inner, objective,
                                             state["meta"]["inner"], state["meta_opt"], params,
                                             state["prev_params"], lags, seed, t)
            gate = gate_from_evidence(stats)
            meta = {"inner": inner, "gate": jnp.asarray(gate, jnp.float32)}
            new["meta"], new["meta_opt"], new["gate_stats"] = meta, opt, stats
            extra["meta_loss"], extra["gate"] = loss, gate
            new["params"] = M.train_fgd(pieces, gen, meta, params, lags[:hp.history + 1], seed, t)
        new["prev_params"] = params
        return new, extra

    def evaluate(self, method: str, state: dict, stream: PeriodStream, t: int) -> dict:
        """Metrics of the deployed model on the newly revealed period t, and the diagnostics."""
        data = stream.period(t)
        logits_N = self.pieces.predict(state["params"], data)
        out = evaluate_predictions(data["label"], logits_N)
        info = stream.info(t)
        if "bayes_ne" in info:
            out["bayes_ne"] = info["bayes_ne"]
            out["teacher_auc"] = auc(data["label"], info["teacher_logit"])
        if self.diagnostics and t - 1 - self.hp.history >= 0:
            p = state["params"]
            g_next = self.pieces.full_grad(p, data, self.diag_rows)
            gs = [self.pieces.full_grad(p, stream.period(t - 1 - k), self.diag_rows)
                  for k in range(self.hp.history + 1)]
            out["grad_norm_sq"] = _sq(g_next)
            out["grad_variation"] = _sq(jax.tree.map(jnp.subtract, g_next, gs[0]))
            gen = M.generator_for(method, self.hp.history)
            if gen is not None:
                meta = M.hint_meta(p) if method == "hint" else state["meta"]
                forecast = gen(meta, gs[:gen.history + 1])
                out["forecast_error"] = _sq(jax.tree.map(jnp.subtract, forecast, g_next))
        return out

    # ---- one (seed, method) run -------------------------------------------------------------

    def pretrained(self, seed: int, ckpt_dir: str):
        params = self.init_params(seed)
        with Checkpointer(ckpt_dir, keep=1, async_save=False) as ckpt:
            if ckpt.latest_step() is not None:
                return _restore(ckpt, None, {"params": params})[0]["params"]
            stream = self.stream(seed, self.P)
            data = concat_batches([stream.period(k) for k in range(self.P)])
            params = M.train_epochs(self.pieces, params, data, seed, -1, self.pretrain_epochs)
            ckpt.save(0, {"params": params}, {"seed": seed}, force=True)
        return params

    def run(self, seed: int, method: str, workdir: str, records: Records,
            progress: Callable[[str, int, dict], None]) -> None:
        ckpt_root = os.path.join(workdir, "checkpoints")
        params0 = self.pretrained(seed, os.path.join(ckpt_root, f"pretrain_s{seed}"))
        state = self.initial_state(method, params0)
        with Checkpointer(os.path.join(ckpt_root, f"{method}_s{seed}"), keep=2,
                          async_save=False) as ckpt:
            latest = ckpt.latest_step()
            if latest is not None:
                state, meta = _restore(ckpt, latest, state)
                if meta.get("method") != method or meta.get("seed") != seed:
                    raise ResumeError(f"{ckpt.directory} step {latest} holds {meta}, not "
                                      f"method {method!r} seed {seed}")
                start, stream = latest + 1, self.stream(seed, latest + 2)
            else:
                start, stream = self.P, self.stream(seed, self.P)
                t, _ = stream.deploy()  # the pretrained model serves period P
                records.add({"seed": seed, "method": method, "period": t, "test": False,
                             **self.evaluate(method, state, stream, t)})
            for t in range(start, self.T - 1):
                tic = time.time()
                state, extra = self.update(method, state, stream, seed, t)
                nxt, _ = stream.deploy()
                rec = {"seed": seed, "method": method, "period": nxt, "test": True,
                       **self.evaluate(method, state, stream, nxt), **extra,
                       "seconds": time.time() - tic}
                records.add(rec)
                ckpt.save(t, state, {"seed": seed, "method": method, "period": t}, force=True)
                stream.forget_before(t - max(self.hp.window, self.hp.history + 2))
                progress(method, t, rec)


def _restore(ckpt: Checkpointer, step: int | None, target: Any) -> tuple[Any, dict]:
    try:
        return ckpt.restore(step, target)
    except (ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"cannot restore {ckpt.directory} step {step} into this config's state "
                          f"({str(e).splitlines()[0][:200]}); use a fresh --workdir") from None


def test_periods(num_periods: int, pretrain_periods: int, last_k: int) -> list[int]:
    """Periods scored after an update: P+1..T-1, or their last `last_k` when last_k > 0."""
    periods = list(range(pretrain_periods + 1, num_periods))
    return periods[-last_k:] if last_k else periods


def seconds_left(done: int, total: int, elapsed: float) -> float:
    return elapsed / done * (total - done) if done else float("nan")
