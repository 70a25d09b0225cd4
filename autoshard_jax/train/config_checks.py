"""`validate_config(config)`: the training config checked before anything is built or compiled.

Every numeric field has a range and every named choice a list; a bad value is a `ConfigError`
naming its key (`config.log_every must be >= 1, got 0`), not a ZeroDivisionError after a compile
or an internal parameter name from a library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optax

from autoshard_jax.errors import ConfigError, check_range
from autoshard_jax.models.dlrm import DTYPES, INTERACTIONS
from autoshard_jax.optim.sparse import ROW_OPTIMIZERS

# key: (low, high, integer). None = unbounded. Learning rates may also be optax schedules.
_NUMBERS: dict[str, tuple[Any, Any, bool]] = {
    "seed": (0, 2**32 - 1, True),
    "batch_size": (1, None, True),
    "num_train_steps": (1, None, True),
    "log_every": (1, None, True),
    "eval_every": (0, None, True),
    "checkpoint_every": (1, None, True),
    "keep_checkpoints": (1, None, True),
    "num_devices": (0, None, True),
    "data.num_dense": (0, None, True),
    "data.zipf_a": (0, None, False),
    "data.kaggle_days": (0, None, True),
    "data.num_eval_batches": (1, None, True),
    "data.workers": (1, 256, True),
    "model.rows_cap": (0, 2**31 - 1, True),
    "model.pooling_factor": (1e-9, None, False),
    "model.embedding_dim": (1, None, True),
    "model.num_cross_layers": (0, None, True),
    "model.cross_rank": (0, None, True),
    "optim.dense_lr": (0, None, False),
    "optim.embedding_lr": (0, None, False),
}
_CHOICES: dict[str, Sequence[str]] = {
    "data.kind": ("synthetic", "criteo_tsv"),
    "model.interaction": tuple(INTERACTIONS),
    "model.combiner": ("sum", "mean"),
    "model.dtype": tuple(DTYPES),
    "optim.embedding": tuple(sorted(ROW_OPTIMIZERS)),
}
_FLAGS = ("data.skip_bad_lines", "model.self_interaction")


def _get(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _has(config: Any, key: str) -> bool:
    node = config
    for part in key.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


def _int_list(config: Any, key: str, low: int, *, unique: bool = False,
              allow_empty: bool = True) -> list[int]:
    value = _get(config, key)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"config.{key} must be a list of integers, got {value!r}")
    if not value and not allow_empty:
        raise ConfigError(f"config.{key} must not be empty")
    for i, v in enumerate(value):
        check_range(f"{key}[{i}]", v, low=low, integer=True)
    if unique and len(set(value)) != len(value):
        raise ConfigError(f"config.{key} lists a value twice: {tuple(value)}")
    return list(value)


def validate_config(config: Any) -> None:
    """Raises ConfigError naming the first bad field of a training config (launch/configs)."""
    for key, (low, high, integer) in _NUMBERS.items():
        if _has(config, key) and not (key.endswith("_lr") and callable(_get(config, key))):
            check_range(key, _get(config, key), low=low, high=high, integer=integer)
    for key, choices in _CHOICES.items():
        if _has(config, key) and _get(config, key) not in choices:
            raise ConfigError(f"config.{key} must be one of {', '.join(choices)}; "
                              f"got {_get(config, key)!r}")
    for key in _FLAGS:
        if _has(config, key) and not isinstance(_get(config, key), bool):
            raise ConfigError(f"config.{key} must be true or false, got {_get(config, key)!r}")
    dense = config.optim.dense
    if not isinstance(dense, str) or not callable(getattr(optax, dense, None)):
        raise ConfigError(f"config.optim.dense must name an optax optimizer (sgd, adam, "
                          f"adagrad, ...), got {dense!r}")
    train_days = _int_list(config, "data.train_days", 0, unique=True)
    eval_days = _int_list(config, "data.eval_days", 0, unique=True)
    if set(train_days) & set(eval_days):
        raise ConfigError(f"config.data.train_days {tuple(train_days)} and eval_days "
                          f"{tuple(eval_days)} overlap: eval data would be trained on")
    if config.data.kaggle_days:
        for key, days in (("train_days", train_days), ("eval_days", eval_days)):
            if days and max(days) >= config.data.kaggle_days:
                raise ConfigError(f"config.data.{key} {tuple(days)} names a day past "
                                  f"config.data.kaggle_days={config.data.kaggle_days} "
                                  f"(days 0-{config.data.kaggle_days - 1})")
    if not config.get("tables"):
        _int_list(config, "model.table_rows", 1, allow_empty=False)
    _int_list(config, "model.bottom_mlp", 1, allow_empty=False)
    top = _int_list(config, "model.top_mlp", 1, allow_empty=False)
    if top[-1] != 1:
        raise ConfigError(f"config.model.top_mlp must end in 1 output (the click logit), got "
                          f"{tuple(top)}")
    if config.model.interaction == "dot" and not config.get("tables") and (
            config.model.bottom_mlp[-1] != config.model.embedding_dim):
        raise ConfigError(f"config.model.bottom_mlp must end in config.model.embedding_dim="
                          f"{config.model.embedding_dim} for the dot interaction, got "
                          f"{tuple(config.model.bottom_mlp)}")
