"""FGD online study on MovieLens-100k (31 weekly periods, ASMG protocol) with the EmbMLP model.

python -m launch.fgd_online --config=launch/configs/fgd_movielens.py --workdir=runs/fgd/movielens

The data is read at run time from the recbole==1.2.1 wheel, fetched with pip into
`config.data.path` (default ~/.cache/autoshard_jax/recbole); a directory holding
ml-100k.inter/.item/.user works too. Pretrain on periods 0-9, update on 10..29, score 11..30;
the summary reports the last 7 test periods (24..30), as ASMG does.
"""

import os

from launch.configs import fgd_synthetic


def get_config():
    config = fgd_synthetic.get_config()
    config.name = "fgd_movielens"
    config.num_periods = 0  # 0: every period of the data (31 weeks)
    config.pretrain_periods = 10
    config.report_last = 7
    config.pretrain_epochs = 3
    config.data.kind = "movielens"
    config.data.path = os.path.expanduser("~/.cache/autoshard_jax/recbole")
    config.data.history = 30
    config.model.kind = "embmlp"
    config.model.embedding_dim = 8
    config.model.mlp = (40, 20, 10, 1)
    config.optim.lr = 1e-3
    config.optim.batch_size = 256
    config.optim.window = 7
    return config
