"""FGD online study on the drifting synthetic CTR stream (project DLRM), the CPU study setting.

python -m launch.fgd_online --config=launch/configs/fgd_synthetic.py --workdir=runs/fgd/periodic

The default is the study's predictable stream: two teacher regimes at right angles that alternate
every period (periodic, cycle 2, speed pi/2). The other streams of the study override the drift:
slow smooth drift `--config.data.drift=linear --config.data.speed=0.05 --config.methods=bu,hint,fgd`
and stationary `--config.data.drift=none --config.data.speed=0 --config.methods=bu,hint,fgd`.
The demo variant (`make demo`): `--config.seeds=1 --config.methods=bu,hint,fgd
--config.num_periods=10 --config.pretrain_periods=4 --config.data.samples_per_period=2048`.
"""

import ml_collections

STUDY_METHODS = "bu,bu_w,full,hint,sml,fgd,fgd_unroll,fgd_l2o"  # + fgd_l2o_unroll


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "fgd_synthetic"
    config.methods = STUDY_METHODS
    config.seeds = 5  # seeds 0..seeds-1 (data, teacher and initialisation)
    config.num_periods = 14
    config.pretrain_periods = 6
    config.pretrain_epochs = 2
    config.report_last = 0  # >0: the summary scores only the last this-many test periods
    config.diagnostics = True
    config.diag_rows = 4096

    config.data = ml_collections.ConfigDict()
    config.data.kind = "synthetic"
    config.data.path = ""
    config.data.drift = "periodic"  # none | linear | periodic | abrupt
    config.data.speed = 1.5708  # radians the teacher rotates per period (per regime step)
    config.data.cycle = 2  # periodic: regimes recur every this many periods
    config.data.change_every = 5  # abrupt: a jump every this many periods
    config.data.samples_per_period = 4096
    config.data.num_dense = 13
    config.data.zipf_a = 1.1

    config.model = ml_collections.ConfigDict()
    config.model.kind = "dlrm"
    config.model.table_rows = (400, 200, 1000, 50, 2000, 100, 300, 20)
    config.model.embedding_dim = 8
    config.model.bottom_mlp = (32, 8)
    config.model.top_mlp = (32, 16, 1)
    config.model.interaction = "dot"

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 3e-3  # Adam, fresh each period
    config.optim.batch_size = 256
    config.optim.epochs = 1  # passes over the update data per period
    config.optim.window = 3  # bu_w
    config.optim.history = 1  # H: older periods the FGD generator sees
    config.optim.meta_lr = 0.05
    config.optim.meta_steps = 20
    config.optim.meta_batch = 1024
    config.optim.unroll_steps = 5
    config.optim.sml_steps = 20
    config.optim.sml_lr = 1e-3  # SML's TR_lr
    return config
