# The README's two commands. Both build .venv with python3 and install the package into it;
# `make test PYTHON=python3.12` builds and uses .venv-python3.12 instead (one venv per Python).
PYTHON ?= python3
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo test lint install bench clean fgd scaling costs autoshard

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job, then a short run of each research line (whole demo: well under 30 min on 2 cores).
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) -m launch.train_dlrm --config=launch/configs/synthetic_small.py --workdir=$(DEMO_DIR)/dlrm
	$(PY) -m launch.collect_costs --workdir=$(DEMO_DIR)/costs --pool=synthetic --pool_size=30 \
	    --num_sets=60 --num_plans=12 --plan_tables=6,16
	$(PY) -m launch.train_cost_model --workdir=$(DEMO_DIR)/cost_model --data=$(DEMO_DIR)/costs \
	    --steps=1000
	$(PY) -m launch.train_sharder --config=launch/configs/sharder_runlocal.py \
	    --workdir=$(DEMO_DIR)/sharder --config.cost_model=analytical \
	    '--config.train_shapes=((50,4),)' \
	    --config.num_iterations=60 --config.eval_every=20 --config.checkpoint_every=20
	$(PY) -m launch.reproduce_autoshard --workdir=$(DEMO_DIR)/repro --policy=$(DEMO_DIR)/sharder \
	    --num_tasks=3 --settings=base,T=100,D=8 --reference_budget=3 --search_time_s=3
	$(PY) -m launch.fgd_online --config=launch/configs/fgd_synthetic.py --workdir=$(DEMO_DIR)/fgd \
	    --config.seeds=1 --config.methods=bu,hint,fgd --config.num_periods=10 \
	    --config.pretrain_periods=4 --config.data.samples_per_period=2048
	$(PY) -m launch.scaling_sweep --config=launch/configs/scaling_cpu.py:demo --workdir=$(DEMO_DIR)/scaling
	$(PY) -m launch.fit_scaling --workdir=$(DEMO_DIR)/scaling --bootstrap=200 --allow_unfit

lint: $(STAMP)
	$(VENV)/bin/ruff check . --extend-exclude '.venv-*'

# Two workers, one test file each at a time (a file's module fixtures are built once): the
# suite took 23.5 min in one process on 2 cores, over the 15 min it is meant to fit in.
# The slowest tests are listed at the end, so every run shows where that budget goes.
test: lint
	$(PY) -m pytest tests -n 2 --dist loadfile --durations=15

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[torch]'
	$(PY) benchmarks/dlrm_throughput.py

# Fuller CPU studies (each resumable: re-run the same command to continue).
FGD_DIR ?= runs/fgd
fgd: $(STAMP)
	$(PY) -m launch.fgd_online --config=launch/configs/fgd_synthetic.py --workdir=$(FGD_DIR)/periodic --jax_cache_dir=$(FGD_DIR)/.jax_cache
	$(PY) -m launch.fgd_online --config=launch/configs/fgd_synthetic.py --workdir=$(FGD_DIR)/linear --config.data.drift=linear --config.data.speed=0.05 --config.methods=bu,hint,fgd --jax_cache_dir=$(FGD_DIR)/.jax_cache
	$(PY) -m launch.fgd_online --config=launch/configs/fgd_synthetic.py --workdir=$(FGD_DIR)/none --config.data.drift=none --config.data.speed=0 --config.methods=bu,hint,fgd --jax_cache_dir=$(FGD_DIR)/.jax_cache
	$(PY) -m launch.fgd_online --config=launch/configs/fgd_movielens.py --workdir=$(FGD_DIR)/movielens --jax_cache_dir=$(FGD_DIR)/.jax_cache

costs: $(STAMP)
	$(PY) -m launch.collect_costs --workdir=runs/costs
	$(PY) -m launch.train_cost_model --workdir=runs/cost_model --data=runs/costs

# AutoShard end to end: cost data, cost network, policies, mined plans, retraining, evaluation
# (hours; resumable: re-run to continue). See launch/autoshard_pipeline.sh.
AUTOSHARD_DIR ?= runs/autoshard
autoshard: $(STAMP)
	bash launch/autoshard_pipeline.sh $(AUTOSHARD_DIR) $(PY)
scaling: $(STAMP)
	$(PY) -m launch.scaling_sweep --config=launch/configs/scaling_cpu.py --workdir=runs/scaling
	$(PY) -m launch.fit_scaling --workdir=runs/scaling --allow_unfit

clean:
	rm -rf $(VENV) runs *.egg-info
