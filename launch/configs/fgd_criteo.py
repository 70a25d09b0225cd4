"""FGD online study on Criteo TSV days (day files or Kaggle's train.txt split into 7 days).

python -m launch.fgd_online --config=launch/configs/fgd_criteo.py --workdir=runs/fgd/criteo \
    --config.data.path=train.txt

A directory of day files (day_0, day_1, ...) is one period per file; a single file is split into
`data.kaggle_days` equal consecutive chunks. Rows per period are capped for CPU runs.
"""

from autoshard_jax.tables.spec import CRITEO_KAGGLE_ROWS
from launch.configs import fgd_synthetic


def get_config():
    config = fgd_synthetic.get_config()
    config.name = "fgd_criteo"
    config.methods = "bu,bu_w,hint,fgd,fgd_l2o"
    config.seeds = 3
    config.num_periods = 0  # 0: every day of the data
    config.pretrain_periods = 2
    config.diagnostics = False
    config.data.kind = "criteo_tsv"
    config.data.path = ""
    config.data.kaggle_days = 7
    config.data.skip_bad_lines = False
    config.data.max_rows_per_period = 200000
    config.model.table_rows = CRITEO_KAGGLE_ROWS
    config.model.rows_cap = 20000
    config.model.embedding_dim = 16
    config.model.bottom_mlp = (64, 16)
    config.model.top_mlp = (64, 32, 1)
    config.optim.batch_size = 1024
    return config
