"""MLPerf DLRM-DCNv2 on Criteo 1TB (day_0 .. day_23 files; day 23 evaluates).

Embedding dim 128, bottom MLP 13-512-256-128, three low-rank (512) DCNv2 cross layers, top MLP
1024-1024-512-256-1, row-wise Adagrad embeddings, Adagrad dense, global batch 65536. The
embeddings (~180 GB in fp32) need a sharding plan over many devices: pass --config.plan.

python -m launch.train_dlrm --config=launch/configs/criteo_1tb_dcnv2.py --workdir=gs://... \
    --config.data.path=/data/criteo_1tb --config.plan=plan.json --jax_distributed
"""

from autoshard_jax.tables.spec import CRITEO_1TB_MLPERF_ROWS
from launch.configs import default


def get_config():
    config = default.get_config()
    config.data.kind = "criteo_tsv"
    config.data.train_days = tuple(range(23))
    config.data.eval_days = (23,)
    config.model.table_rows = CRITEO_1TB_MLPERF_ROWS
    config.model.embedding_dim = 128
    config.model.bottom_mlp = (512, 256, 128)
    config.model.top_mlp = (1024, 1024, 512, 256, 1)
    config.model.interaction = "cat"
    config.model.num_cross_layers = 3
    config.model.cross_rank = 512
    config.optim.dense = "adagrad"
    config.optim.dense_lr = 0.004
    config.optim.embedding = "rowwise_adagrad"
    config.optim.embedding_lr = 0.004
    config.batch_size = 65536
    config.num_train_steps = 67000  # about one epoch of 4.2B samples
    config.log_every = 500
    config.eval_every = 6700
    config.checkpoint_every = 5000
    return config
