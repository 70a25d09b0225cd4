"""Scaling-law sweeps on the synthetic teacher stream, sized for 2 CPU cores (`make scaling`).

python -m launch.scaling_sweep --config=launch/configs/scaling_cpu.py --workdir=/tmp/scaling
python -m launch.fit_scaling --workdir=/tmp/scaling

`--config=launch/configs/scaling_cpu.py:demo` is the small variant `make demo` runs. One axis:
`--config.axis=data|embedding|over_arch|mlp|depth`; Criteo: `--config.data.path=train.txt` (its last
10% of lines is held out). The model is the synthetic_small DLRM with 8 tables of 10 to 20k rows
(dim 16, bottom 64-32-16, top 64-32-1, dot; Adam 1e-3 + row-wise Adagrad 0.05, warmup + cosine
per run), batch 256, 65,536 held-out samples.

Cost (training FLOPs from scaling_laws.accounting; wall times measured 2026-11-28 on 2 AMD EPYC
cores shared with four other jobs, load average 12-24, jax 0.10.2 CPU):
  full study (`make scaling`): 25 runs, 2.51e11 FLOPs, 4.19M samples: data 9 runs of 4k..1M
    samples (2.4 decades, 1.31e11 FLOPs), embedding dim 1..32 (6 runs), mlp and over_arch width
    x0.125..x2 (5 runs each) of 131k samples (1.2e11 FLOPs together). Measured 51 min of sweep
    plus 1.5 min of fitting; each run pays 60-100 s of compilation and evaluation on the loaded
    machine, more than its training. Unloaded 2 cores: roughly 15-20 min (not measured). One
    accelerator: a few minutes, all of it compilation and host-side data generation.
  demo (`:demo`): the data axis only, 5 runs of 16k..256k samples (the runs below 16k sit in the
    small-data region, NE >= 1, and are not fitted), 3.18e10 FLOPs, 508k samples. Not timed
    unloaded; a first 10-run variant took 19 min on the loaded machine (per-run compilation),
    so expect ~2-3 min on 2 free cores.
"""

from launch.configs import synthetic_small


def get_config(variant: str = ""):
    config = synthetic_small.get_config()
    config.axis = "all"
    # Eight tables (10 to 20k rows, Zipf ids): compiling the step of 26 tables costs more than
    # training the smaller runs on 2 cores.
    config.model.table_rows = (20000, 10000, 5000, 2000, 1000, 300, 50, 10)
    config.batch_size = 256
    config.data.num_eval_batches = 256  # 65,536 held-out samples
    s = config.scaling = type(config)()
    s.axes = ("data", "embedding", "mlp", "over_arch")
    s.data_samples = tuple(4096 * 2**k for k in range(0, 9))  # 4k .. 1M
    s.param_samples = 131072
    s.embedding_dims = (1, 2, 4, 8, 16, 32)
    s.over_arch_widths = (0.125, 0.25, 0.5, 1.0, 2.0)
    s.mlp_widths = (0.125, 0.25, 0.5, 1.0, 2.0)
    s.depths = (1, 2, 3, 4)
    s.warmup_fraction = 0.05
    s.final_lr_fraction = 0.1
    s.checkpoint_every = 1000
    s.keep_run_checkpoints = False
    if variant == "demo":
        config.data.num_eval_batches = 128
        s.axes = ("data",)
        s.data_samples = tuple(16384 * 2**k for k in range(0, 5))  # 16k .. 256k
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of scaling_cpu (use '' or 'demo')")
    return config
