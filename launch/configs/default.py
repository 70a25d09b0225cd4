"""Defaults shared by every DLRM config; each named config overrides what it needs.

Every field can be overridden on the command line, e.g. `--config.batch_size=4096`.
"""

import ml_collections

from autoshard_jax.tables.spec import CRITEO_KAGGLE_ROWS


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 2048
    config.num_train_steps = 1000
    config.log_every = 100
    config.eval_every = 0  # 0: evaluate only at the end
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.tables = ""  # path of a tables.json; overrides model.table_rows / embedding_dim
    config.plan = ""  # path of a plan.json (sharded training)
    config.num_devices = 0  # with a plan: must equal the plan's device count (0: not checked)

    config.data = ml_collections.ConfigDict()
    config.data.kind = "synthetic"  # or "criteo_tsv"
    config.data.path = ""  # Criteo TSV file or directory of day files
    config.data.num_dense = 13
    config.data.zipf_a = 1.2
    config.data.kaggle_days = 0  # >0: split a single file into this many days (Kaggle: 7)
    config.data.train_days = ()  # empty: every day (then eval_days must be empty too)
    config.data.eval_days = ()
    config.data.num_eval_batches = 20  # synthetic eval set size, in batches
    # Threads generating synthetic batches: one core makes ~150k samples/s, far below an
    # accelerator's step, so raise it on a GPU / TPU host (the stream does not change; it is
    # not part of the run's identity).
    config.data.workers = 1
    config.data.skip_bad_lines = False

    config.model = ml_collections.ConfigDict()
    config.model.table_rows = CRITEO_KAGGLE_ROWS
    config.model.rows_cap = 0  # >0: cap every table at this many rows (hashing trick)
    config.model.pooling_factor = 1.0
    config.model.embedding_dim = 16
    config.model.bottom_mlp = (512, 256, 64, 16)
    config.model.top_mlp = (512, 256, 1)
    config.model.interaction = "dot"
    config.model.self_interaction = False
    config.model.num_cross_layers = 0
    config.model.cross_rank = 0
    config.model.combiner = "sum"
    config.model.dtype = "float32"  # dense half's compute dtype: float32 | bfloat16 (params fp32)

    config.optim = ml_collections.ConfigDict()
    config.optim.dense = "sgd"
    config.optim.dense_lr = 0.1
    config.optim.embedding = "sgd"  # sgd | rowwise_adagrad | adagrad
    config.optim.embedding_lr = 0.1
    return config
