"""The demo: a small DLRM on the synthetic Criteo-shaped stream, a few minutes on 2 CPU cores.

python -m launch.train_dlrm --config=launch/configs/synthetic_small.py --workdir=/tmp/dlrm_small
Add --config.model.dtype=bfloat16 for a bfloat16 dense half (parameters stay float32).
"""

from launch.configs import default


def get_config():
    config = default.get_config()
    config.model.table_rows = (1000, 500, 20000, 10000, 300, 24, 5000, 600, 3, 8000, 3000,
                               20000, 3000, 27, 7000, 20000, 10, 5000, 2000, 4, 20000, 18,
                               15, 10000, 100, 8000)
    config.model.embedding_dim = 16
    config.model.bottom_mlp = (64, 32, 16)
    config.model.top_mlp = (64, 32, 1)
    config.model.dtype = "float32"
    config.optim.dense = "adam"
    config.optim.dense_lr = 1e-3
    config.optim.embedding = "rowwise_adagrad"
    config.optim.embedding_lr = 0.05
    config.batch_size = 512
    config.num_train_steps = 3000
    config.eval_every = 1000
    config.data.num_eval_batches = 40
    config.log_every = 250
    config.checkpoint_every = 1000
    return config
