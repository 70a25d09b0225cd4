"""Sparse, in-place embedding optimizers.

Each optimizer updates only the rows a batch touched. It takes the flat ids of a batch (-1 for
padding) and the gradient of each gathered row, combines duplicate ids, and scatters the update
into the table. Under `jax.jit(..., donate_argnums=...)` the scatter reuses the table's buffer,
so a step costs O(batch) memory and time, never O(table).

The optimizer state of a table is a dict of arrays whose leading axis is the table's rows, so
sharding code can stack and split it exactly like the table itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

RowState = dict[str, jax.Array]
ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]

# Tables and optimizer state are float32: every byte count in the package derives from this.
BYTES_PER_VALUE = 4
# A state leaf holds one value per row ([R]) or one per table value ([R, E]); sharding stacks and
# packs each kind differently, memory accounting counts them differently.
ROW, ELEMENT = "row", "element"
StateKinds = dict[str, str]  # {leaf name: ROW | ELEMENT}


def _lr(learning_rate: ScalarOrSchedule, step: jax.Array) -> jax.Array:
    return learning_rate(step) if callable(learning_rate) else jnp.asarray(learning_rate)


def dropped_padding(ids_N: jax.Array, rows: int) -> jax.Array:
    """Maps padding (-1, or anything out of range) to `rows`, an index every scatter drops.

    Args:
      ids_N: flat ids, -1 for padding.
      rows: the table's row count.

    Returns:
      ids_N with every id outside [0, rows) replaced by `rows`.
    """
    return jnp.where((ids_N >= 0) & (ids_N < rows), ids_N, rows)


def combine_duplicates(ids_N: jax.Array, grads_NxE: jax.Array, rows: int):
    """Unique ids (out-of-range filler `rows`) and the summed gradient of each.

    Row-wise adaptive optimizers need one gradient per row: updating twice with the two halves
    of a duplicated id would not equal the dense update.

    Args:
      ids_N: flat ids, -1 (or out of range) for padding.
      grads_NxE: the gradient of each id's gathered row.
      rows: the table's row count.

    Returns:
      (unique_N, summed_NxE): sorted unique ids padded with `rows`, and the summed gradient of
      each (zeros on the padding).
    """
    n = ids_N.shape[0]
    ids_N = dropped_padding(ids_N, rows)
    unique_N, inverse_N = jnp.unique(ids_N, size=n, fill_value=rows, return_inverse=True)
    summed_NxE = jax.ops.segment_sum(grads_NxE, inverse_N.reshape(-1), num_segments=n)
    return unique_N, summed_NxE


@dataclasses.dataclass(frozen=True)
class RowOptimizer:
    """A sparse optimizer over one table.

    Attributes:
      name: the optimizer's name (for logs and state-kind lookups).
      init: table_RxE -> state {leaf: [R] | [R, E]}.
      update: (table_RxE, state, ids_N, grads_NxE, step) -> (table_RxE, state); ids_N are flat
        ids with -1 padding (duplicates allowed), grads_NxE the gradient of each id's row.
    """

    name: str
    init: Callable[[jax.Array], RowState]
    update: Callable[..., tuple[jax.Array, RowState]]


def sgd(learning_rate: ScalarOrSchedule) -> RowOptimizer:
    """Plain SGD; duplicates need no combining because the scatter-add sums them.

    Args:
      learning_rate: a float or a schedule step -> lr.

    Returns:
      A stateless RowOptimizer.
    """

    def init(table_RxE):
        del table_RxE
        return {}

    def update(table_RxE, state, ids_N, grads_NxE, step):
        rows = table_RxE.shape[0]
        delta_NxE = (-_lr(learning_rate, step) * grads_NxE).astype(table_RxE.dtype)
        table_RxE = table_RxE.at[dropped_padding(ids_N, rows)].add(delta_NxE, mode="drop")
        return table_RxE, state

    return RowOptimizer("sgd", init, update)


def rowwise_adagrad(learning_rate: ScalarOrSchedule, eps: float = 1e-8,
                    initial_accumulator_value: float = 0.0) -> RowOptimizer:
    """Row-wise Adagrad (FBGEMM / TorchRec): one accumulator per row of mean(g^2) over the width.

    acc[r] += mean_e(g[r]^2);  w[r] -= lr * g[r] / (sqrt(acc[r]) + eps).  Memory is [R], not [R, E].

    Args:
      learning_rate: a float or a schedule step -> lr.
      eps: added to sqrt(acc) in the denominator.
      initial_accumulator_value: the accumulator's starting value.

    Returns:
      A RowOptimizer with state {"accumulator": [R]}.
    """

    def init(table_RxE):
        return {"accumulator": jnp.full(table_RxE.shape[:1], initial_accumulator_value,
                                        jnp.float32)}

    def update(table_RxE, state, ids_N, grads_NxE, step):
        rows = table_RxE.shape[0]
        unique_N, g_NxE = combine_duplicates(ids_N, grads_NxE.astype(jnp.float32), rows)
        acc_R = state["accumulator"].at[unique_N].add(jnp.mean(g_NxE**2, axis=1), mode="drop")
        acc_N = acc_R.at[unique_N].get(mode="fill", fill_value=1.0)
        delta_NxE = -_lr(learning_rate, step) * g_NxE / (jnp.sqrt(acc_N)[:, None] + eps)
        table_RxE = table_RxE.at[unique_N].add(delta_NxE.astype(table_RxE.dtype), mode="drop")
        return table_RxE, {"accumulator": acc_R}

    return RowOptimizer("rowwise_adagrad", init, update)


def adagrad(learning_rate: ScalarOrSchedule, eps: float = 1e-7,
            initial_accumulator_value: float = 0.1) -> RowOptimizer:
    """Element-wise Adagrad with optax.adagrad's formula, applied to touched rows only.

    Untouched rows have a zero gradient, for which optax's update is zero too, so this equals
    `optax.adagrad` on the dense gradient.

    Args:
      learning_rate: a float or a schedule step -> lr.
      eps: added to the accumulator under the square root, as optax does.
      initial_accumulator_value: the accumulator's starting value.

    Returns:
      A RowOptimizer with state {"accumulator": [R, E]}.
    """

    def init(table_RxE):
        return {"accumulator": jnp.full(table_RxE.shape, initial_accumulator_value, jnp.float32)}

    def update(table_RxE, state, ids_N, grads_NxE, step):
        rows = table_RxE.shape[0]
        unique_N, g_NxE = combine_duplicates(ids_N, grads_NxE.astype(jnp.float32), rows)
        acc_RxE = state["accumulator"].at[unique_N].add(g_NxE**2, mode="drop")
        acc_NxE = acc_RxE.at[unique_N].get(mode="fill", fill_value=1.0)
        scale_NxE = jnp.where(acc_NxE > 0, jax.lax.rsqrt(acc_NxE + eps), 0.0)
        delta_NxE = -_lr(learning_rate, step) * g_NxE * scale_NxE
        table_RxE = table_RxE.at[unique_N].add(delta_NxE.astype(table_RxE.dtype), mode="drop")
        return table_RxE, {"accumulator": acc_RxE}

    return RowOptimizer("adagrad", init, update)


ROW_OPTIMIZERS = {"sgd": sgd, "rowwise_adagrad": rowwise_adagrad, "adagrad": adagrad}


def make_row_optimizer(name: str, learning_rate: ScalarOrSchedule, **kwargs) -> RowOptimizer:
    """A row optimizer by name.

    Args:
      name: one of ROW_OPTIMIZERS ("sgd", "rowwise_adagrad", "adagrad").
      learning_rate: a float or a schedule step -> lr.
      **kwargs: passed to the factory (eps, initial_accumulator_value).

    Returns:
      The RowOptimizer.
    """
    if name not in ROW_OPTIMIZERS:
        raise ValueError(f"unknown embedding optimizer {name!r}; "
                         f"choose from {sorted(ROW_OPTIMIZERS)}")
    return ROW_OPTIMIZERS[name](learning_rate, **kwargs)


def state_kinds(row_optimizer: RowOptimizer | str) -> StateKinds:
    """The kind (ROW or ELEMENT) of each leaf of an optimizer's state, probed abstractly.

    Args:
      row_optimizer: a RowOptimizer or the name of one (then no learning rate is needed).

    Returns:
      {leaf name: ROW | ELEMENT}; empty for stateless SGD.
    """
    if isinstance(row_optimizer, str):
        row_optimizer = make_row_optimizer(row_optimizer, 0.0)
    probe = jax.eval_shape(row_optimizer.init, jax.ShapeDtypeStruct((2, 3), jnp.float32))
    kinds = {}
    for name, leaf in probe.items():
        if leaf.shape == (2,):
            kinds[name] = ROW
        elif leaf.shape == (2, 3):
            kinds[name] = ELEMENT
        else:
            raise ValueError(f"optimizer {row_optimizer.name!r} state {name!r} has shape "
                             f"{leaf.shape} for a [2, 3] table; only [R] or [R, E] are supported")
    return kinds


def state_fills(row_optimizer: RowOptimizer) -> dict[str, float]:
    """Initial value of each state leaf (row optimizers start from constant fills).

    Args:
      row_optimizer: the optimizer.

    Returns:
      {leaf name: fill value}, so sharded code can create stacked state without a table.
    """
    probe = row_optimizer.init(jnp.zeros((1, 1), jnp.float32))
    return {name: float(jnp.asarray(leaf).reshape(-1)[0]) for name, leaf in probe.items()}


def make_dense_optimizer(name: str, learning_rate: ScalarOrSchedule,
                         **kwargs) -> optax.GradientTransformation:
    """Any optax optimizer by name, for the dense parameters.

    Args:
      name: an optax factory name (`sgd`, `adam`, `adagrad`, `adamw`, ...).
      learning_rate: a float or an optax schedule.
      **kwargs: passed to the factory.

    Returns:
      The optax GradientTransformation.
    """
    factory = getattr(optax, name, None)
    tx = factory(learning_rate, **kwargs) if callable(factory) else None
    if not isinstance(tx, optax.GradientTransformation):
        raise ValueError(f"unknown optax optimizer {name!r} (expected e.g. 'sgd', 'adam', "
                         "'adagrad')")
    return tx
