"""Exact parameter counts and training FLOPs of a DLRM config (the model in autoshard_jax/models).

Why analytic: a sweep needs parameters and compute for every run before it trains (ordering, ETA,
the compute axis), and XLA's own count is only available after compiling. The count mirrors what
the project's train step computes (autoshard_jax/train/step.py), with XLA's conventions: a
multiply-add is 2 FLOPs, an element-wise op is 1. Tests check it against
`jax.jit(step).lower(...).compile().cost_analysis()`.

Counted per sample:
  forward   dense layers (2*in*out + bias + ReLU), the dot interaction's full Gram matrix
            (2*N*N*E, N = tables + 1) or nothing for concatenation, DCNv2 cross layers, and
            embedding pooling (2*H*E per table for H id slots of width E);
  backward  2x the forward matmuls (input and weight gradients; the first bottom layer has no
            input gradient), bias and ReLU gradients, two Gram products and their sum (plus the
            scatter of the kept pairs), pooling gradients;
  update    the row optimizer on each gathered row (per sample) and the dense optax optimizer on
            every dense parameter (per step, divided by the batch size).
Embedding lookups themselves are gathers: 0 FLOPs, which is why embedding scaling is nearly free
in compute (the paper's point).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections

from autoshard_jax.models.dlrm import num_dot_features
from autoshard_jax.tables.spec import TableSpec
from autoshard_jax.train.loop import build_tables

# FLOPs per updated value: sgd scales and adds; Adam-type keeps two moments (+ sqrt, divide, ...).
ROW_OPTIMIZER_FLOPS = {"sgd": 2, "rowwise_adagrad": 5, "adagrad": 7}
DENSE_OPTIMIZER_FLOPS = {"sgd": 2, "adagrad": 6, "rmsprop": 8, "adam": 12, "adamw": 14}


@dataclasses.dataclass(frozen=True)
class ParamCount:
    embedding: int
    dense: int

    @property
    def total(self) -> int:
        return self.embedding + self.dense

    def to_json(self) -> dict:
        return {"embedding": self.embedding, "dense": self.dense, "total": self.total}


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs of one training step, split as counted (see the module docstring)."""

    forward_per_sample: int
    backward_per_sample: int
    row_update_per_sample: int
    dense_update_per_step: int
    batch_size: int

    @property
    def per_step(self) -> int:
        per_sample = self.forward_per_sample + self.backward_per_sample + self.row_update_per_sample
        return self.batch_size * per_sample + self.dense_update_per_step

    @property
    def train_per_sample(self) -> float:
        return self.per_step / self.batch_size

    def to_json(self) -> dict:
        return {"forward_per_sample": self.forward_per_sample,
                "backward_per_sample": self.backward_per_sample,
                "row_update_per_sample": self.row_update_per_sample,
                "dense_update_per_step": self.dense_update_per_step,
                "train_per_sample": self.train_per_sample, "per_step": self.per_step}


def _layer_shapes(features: Sequence[int], width_in: int) -> list[tuple[int, int]]:
    shapes = []
    for width in features:
        shapes.append((width_in, int(width)))
        width_in = int(width)
    return shapes


@dataclasses.dataclass(frozen=True)
class _Arch:
    """The shapes of the dense half, derived once from a config."""

    bottom: list[tuple[int, int]]
    top: list[tuple[int, int]]
    cross_width: int
    num_cross: int
    cross_rank: int
    dot_vectors: int  # 0 for concatenation
    dot_width: int


def _arch(config: ml_collections.ConfigDict, tables: Sequence[TableSpec]) -> _Arch:
    m = config.model
    bottom = _layer_shapes(m.bottom_mlp, config.data.num_dense)
    bottom_out = bottom[-1][1]
    if m.interaction == "dot":
        n = len(tables) + 1
        width = bottom_out + num_dot_features(n, m.self_interaction)
        dot_vectors, dot_width = n, bottom_out
    elif m.interaction == "cat":
        width = bottom_out + sum(t.dim for t in tables)
        dot_vectors, dot_width = 0, 0
    else:
        raise ValueError(
            f"config.model.interaction must be 'dot' or 'cat', got {m.interaction!r}")
    return _Arch(bottom=bottom, top=_layer_shapes(m.top_mlp, width), cross_width=width,
                 num_cross=int(m.num_cross_layers), cross_rank=int(m.cross_rank),
                 dot_vectors=dot_vectors, dot_width=dot_width)


def _cross_matmuls(a: _Arch) -> list[tuple[int, int]]:
    if a.cross_rank:
        return [(a.cross_width, a.cross_rank), (a.cross_rank, a.cross_width)] * a.num_cross
    return [(a.cross_width, a.cross_width)] * a.num_cross


def count_params(config: ml_collections.ConfigDict) -> ParamCount:
    """Embedding rows x dims, and every dense weight and bias (DLRMDense's parameter tree)."""
    tables = build_tables(config)
    a = _arch(config, tables)
    dense = sum(i * o + o for i, o in a.bottom + a.top)
    w = a.cross_width
    if a.cross_rank:  # V (no bias) then U (bias)
        dense += a.num_cross * (w * a.cross_rank + a.cross_rank * w + w)
    else:
        dense += a.num_cross * (w * w + w)
    return ParamCount(embedding=sum(t.rows * t.dim for t in tables), dense=dense)


def count_flops(config: ml_collections.ConfigDict) -> FlopCount:
    """Training FLOPs of one step of `config` (forward, backward, updates)."""
    tables = build_tables(config)
    a = _arch(config, tables)
    layers = a.bottom + a.top
    relus = sum(o for _, o in a.bottom) + sum(o for _, o in a.top[:-1])
    biases = sum(o for _, o in layers)
    matmul = sum(2 * i * o for i, o in layers)
    cross_mm = sum(2 * i * o for i, o in _cross_matmuls(a))
    # Cross layer: bias of W (or U), x0 * proj and the residual add.
    cross_ew = a.num_cross * 3 * a.cross_width
    gram = 2 * a.dot_vectors * a.dot_vectors * a.dot_width
    slots = sum(t.hotness * t.dim for t in tables)
    pool = 2 * slots
    # The Gram gradient sums its two products (N*N*E adds) and scatters the kept pairs back.
    n = a.dot_vectors
    gram_grad = n * n * a.dot_width + n * (n - 1) // 2 if n else 0
    forward = matmul + biases + relus + cross_mm + cross_ew + gram + pool

    first_in, first_out = a.bottom[0]
    backward = (2 * matmul - 2 * first_in * first_out  # no gradient w.r.t. the dense input
                + biases + relus + 2 * cross_mm + 2 * cross_ew + 2 * gram + gram_grad + slots)
    row_opt = ROW_OPTIMIZER_FLOPS.get(config.optim.embedding, 5)
    dense_opt = DENSE_OPTIMIZER_FLOPS.get(config.optim.dense, 12)
    params = count_params(config)
    return FlopCount(forward_per_sample=forward, backward_per_sample=backward,
                     row_update_per_sample=row_opt * slots,
                     dense_update_per_step=dense_opt * params.dense,
                     batch_size=int(config.batch_size))


def xla_step_flops(config: ml_collections.ConfigDict) -> float:
    """FLOPs of the compiled train step by XLA's cost analysis (compiles; small configs only)."""
    import jax

    from autoshard_jax.data import SyntheticClickStream
    from autoshard_jax.optim.sparse import make_dense_optimizer, make_row_optimizer
    from autoshard_jax.train.loop import build_dense_model
    from autoshard_jax.train.step import LocalEmbeddingStage, init_train_state, make_train_step

    tables = build_tables(config)
    stream = SyntheticClickStream(tables, num_dense=config.data.num_dense, seed=config.seed)
    example = stream.batch(0, config.batch_size)
    model = build_dense_model(config)
    stage = LocalEmbeddingStage(tables, make_row_optimizer(config.optim.embedding, 0.1),
                                config.model.combiner)
    tx = make_dense_optimizer(config.optim.dense, 1e-3)
    state = jax.eval_shape(lambda k: init_train_state(k, model, stage, tx, example),
                           jax.random.key(0))
    compiled = jax.jit(make_train_step(model, stage, tx)).lower(state, example).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX returns one dict per computation
        cost = cost[0]
    return float(cost["flops"])
