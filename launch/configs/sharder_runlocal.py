"""AutoShard policy training on this CPU: under 15 minutes on 2 cores.

python -m launch.train_sharder --config=launch/configs/sharder_runlocal.py --workdir=/tmp/sharder

Trains on 50-table / 4-device and 30-table / 8-device tasks from the train half of an 856-table
synthetic pool (dims 4..128, rows capped for CPU), objective `spmd`, against a cost network:
`--config.cost_model=DIR` names a trained one (`launch.train_cost_model`); without it the
launcher measures sets and plans of the training tables with the oracle and fits one first
(`own_costs`), `--config.cost_model=analytical` takes the analytical estimator instead.
The demo variant: `--config.num_iterations=60 --config.eval_every=20`.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.tables = ""  # a tables.json pool instead of the synthetic one
    c.pool = ml_collections.ConfigDict(
        {"num_tables": 856, "seed": 0, "dims": (4, 8, 16, 32, 64, 128), "max_rows": 1_000_000})
    c.train_shapes = ((50, 4), (30, 8))  # (tables, devices) of training tasks, cycled
    c.mem_factor = 1.5  # memory cap: x the balanced share of packed bytes
    c.unseen = 0.0  # fraction of training-task tables from the test half (0: protocol)
    c.objective = "spmd"  # or "max_device"
    c.reward = "cost"  # or "ratio" (AutoShard's min/max balance)
    c.cost_model = ""  # cost network workdir(s, comma-separated: their mean); "analytical";
    # "" = measure and fit one first
    c.cost_pessimism = 0.0  # with several workdirs: optimise their mean + k x their std
    c.max_device_sigma = 0.0  # max_device reward: expected measured max under this per-device
    # log error (placement.costs.expected_max), of device costs floored at their costliest table
    c.max_device_shared = False  # max_device reward: the slowest device of two or more tables
    # (floored; placement.search's shared maximum), which breaks ties a lone table sets
    # what "" measures: every training table alone, then random sets and plans (2 cores: 11 min,
    # then 1 min to fit; the whole runlocal run took 12.6 min, session 14)
    c.own_costs = ml_collections.ConfigDict({
        "num_sets": 650, "num_plans": 60, "max_tables": 20, "plan_tables": (8, 60),
        "plan_devices": (2, 4, 8), "steps": 1500, "max_processes": 8})
    c.batch_size = 512  # the batch size costs refer to
    c.num_iterations = 300
    c.tasks_per_batch = 16
    c.episodes_per_task = 4
    c.learning_rate = 1e-3
    c.entropy_coef = 0.01
    c.value_coef = 0.5
    c.hidden = 128
    c.log_every = 10
    c.eval_every = 50
    c.num_eval_tasks = 16
    c.checkpoint_every = 50
    c.refine_every = 0  # oracle measurement + cost-model refinement period (0: off)
    c.refine_plans = 4
    return c
