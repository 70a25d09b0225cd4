"""DLRM on Criteo Kaggle (Display Advertising Challenge): the public DLRM reference sizes.

Days 0-5 of train.txt train, day 6 evaluates (the DLRM convention: 7 equal consecutive chunks).

python -m launch.train_dlrm --config=launch/configs/criteo_kaggle.py --workdir=/tmp/kaggle \
    --config.data.path=/data/criteo_kaggle/train.txt
"""

from launch.configs import default


def get_config():
    config = default.get_config()
    config.data.kind = "criteo_tsv"
    config.data.kaggle_days = 7
    config.data.train_days = (0, 1, 2, 3, 4, 5)
    config.data.eval_days = (6,)
    config.batch_size = 2048
    config.num_train_steps = 19000  # about one epoch of days 0-5 (39.3M samples)
    config.log_every = 200
    config.checkpoint_every = 2000
    return config
