"""Scaling-law sweeps sized for one GPU or TPU: Criteo-Kaggle-shaped DLRM, 3 decades of data.

python -m launch.scaling_sweep --config=launch/configs/scaling_accelerator.py --workdir=DIR \\
    [--config.axis=data|embedding|over_arch|mlp|depth] [--config.data.path=train.txt] \\
    [--shard_index=i --num_shards=n]
python -m launch.fit_scaling --workdir=DIR

Model: the criteo_kaggle DLRM (26 tables, Criteo Kaggle cardinalities capped at 1M rows, dim 16,
bottom 512-256-64-16, top 512-256-1, dot), Adam 1e-3 + row-wise Adagrad 0.05 with warmup +
cosine per run, batch 4096. Synthetic teacher data by default; with `--config.data.path` one
Criteo TSV file (Kaggle train.txt: 45.8M lines, the last 4.58M held out, so the largest data
run of 268M samples needs the 1TB logs instead or a lower `scaling.data_samples`).

Cost (scaling_laws.accounting; training FLOPs only):
  data axis      6 runs, 262k .. 268M samples (3 decades):       1.05e15 FLOPs
  embedding axis 6 runs of 16.8M samples, dim 4 .. 128:           3.18e14 FLOPs
  mlp axis       5 runs of 16.8M samples, widths x0.25 .. x4:    7.57e14 FLOPs
  over_arch axis 5 runs of 16.8M samples, top widths x0.25 .. x4: 5.13e14 FLOPs
  total: 2.63e15 training FLOPs over 22 runs and 626M samples (4.2 MFLOP per sample)
Expected wall time, estimated, not measured (no accelerator was available to this session): on 2
CPU cores about 5-8 hours (the README's 1.6e11 FLOP/s of this model's step on 2 cores gives 4.6 h
of compute, plus host data generation and ~20 s of compilation and evaluation per run); on one
accelerator about 1-2 hours, input-bound: the compute is under a minute at ~5e13 FLOP/s, but the
synthetic stream is generated on the host at roughly 0.1M samples/s per core (TSV parsing is
similar), so the 626M samples dominate; the 268M-sample data run is 40% of it.
"""

from launch.configs import criteo_kaggle


def get_config():
    config = criteo_kaggle.get_config()
    config.axis = "all"
    config.data.kind = "synthetic"
    config.data.path = ""
    config.data.kaggle_days = 0
    config.data.train_days = ()
    config.data.eval_days = ()
    config.model.rows_cap = 1_000_000
    config.optim.dense = "adam"
    config.optim.dense_lr = 1e-3
    config.optim.embedding = "rowwise_adagrad"
    config.optim.embedding_lr = 0.05
    config.batch_size = 4096
    config.data.num_eval_batches = 64  # 262,144 held-out samples
    s = config.scaling = type(config)()
    s.axes = ("data", "embedding", "mlp", "over_arch")
    s.data_samples = tuple(2**18 * 4**k for k in range(6))  # 262k .. 268M
    s.param_samples = 2**24
    s.embedding_dims = (4, 8, 16, 32, 64, 128)
    s.over_arch_widths = (0.25, 0.5, 1.0, 2.0, 4.0)
    s.mlp_widths = (0.25, 0.5, 1.0, 2.0, 4.0)
    s.depths = (1, 2, 3, 4, 5)
    s.warmup_fraction = 0.02
    s.final_lr_fraction = 0.1
    s.checkpoint_every = 2000
    s.keep_run_checkpoints = False
    return config
