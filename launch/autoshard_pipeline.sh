#!/usr/bin/env bash
# AutoShard end to end on this machine, the way the README's figures are made:
#   1. cost data: random sets and plans of the training tables timed by the oracle (two shards),
#   2. then a top-up of large random sets (30-100 tables: the devices of T=100-200 tasks);
#      measuring comes first, so a run cut short keeps the machine-bound part;
#   3. the cost network on the first collection;
#   4. one policy per objective against that network;
#   5. the planners' own plans (heuristics, policy, searches) on training tasks, timed;
#   6. sets and plans of another pool's tables (seed 2), which the final networks also fit
#      (session 25, Intel Xeon: with pool seed 2 the networks' spread of log error on unseen
#      tables fell from 0.064 to 0.059, and to 0.0586 with seeds 2 and 3; robust spread 0.049);
#   7. the heavy tables of the train half and of pool seed 2 re-dimmed to widths 64 and 128
#      (NeuroShard's augmentation; session 30), then three networks on everything with the
#      unique-row inputs (seeds 0, 1, 2; session 30: on pool seed 1's heavy tables the log
#      spread of single-table errors fell from 0.185 to 0.151, on its 20-60-table sets from
#      0.046 to 0.035) and, 8., both objectives' final policies
#      (3,000 iterations) against their mean: a policy trained hard against one fit exploits
#      that fit's errors (session 17), and seeds differ (session 16: seed 0 stalled);
#      (sessions 11-15 also fit a network on steps 1 and 5 alone, `cost_model_2`, and policies
#      on it; nothing later used them, and session 23 dropped the step);
#   9. the oracle evaluation of every method on held-out tasks (reproduce_autoshard).
# Each step resumes, or is skipped when its output is complete, so re-running the same command
# continues where it stopped. Two processes at a time, one pinned core each.
# Since session 33 every plan's SPMD step is timed on every device, the slowest device's
# program its compute (`--spmd_every_device`, the default of collect_costs, mine_plan_costs
# and reproduce_autoshard): a directory of busiest-device plans (before it) does not resume.
#
#   bash launch/autoshard_pipeline.sh [DIR] [PYTHON]   # default: runs/autoshard .venv/bin/python
#   SETTINGS=base,D=8 NUM_TASKS=4 EVAL_SEED=2 STOP_AFTER=policies bash launch/autoshard_pipeline.sh
#
# STOP_AFTER (costs, costs_large, cost_model, policies, mined, other_pools, wide_tables,
# cost_model_u, policies_u) ends the run after that step. Costs are the CPU type's own (the
# records' `cpu`; AMD EPYC and Intel Xeon differ by composition, one type reproduces across
# sessions): one DIR per CPU type. On AMD EPYC Zen 5 (session 26) the steps to the final
# policies took 1 h 45 min: costs 20 min, large sets 14, first network 4, policies 1, mining
# 11, other pool 23, three networks 27 (beside a test run), final policies 4; session 30's
# re-dimmed tables 13 min, its three networks 17 (three fits on both cores), policies 3.
# Measured on 2 AMD EPYC cores (session 11): costs 34 min, first network 8 min, policies 2 min,
# mining 16 min; session 15: large sets 30 min, third network 11 min (both cores); then an
# evaluation task takes ~2.5 min (spmd, D=4) or 4.5-10 min (max_device, D=4-8; T=100 ~10,
# T=200 ~24).
set -euo pipefail

DIR=${1:-runs/autoshard}
PY=${2:-.venv/bin/python}
SETTINGS=${SETTINGS:-base,T=10,T=100,T=200,D=2,D=8,D=16,unseen=0%,unseen=50%}
NUM_TASKS=${NUM_TASKS:-4}
EVAL_SEED=${EVAL_SEED:-2}
STOP_AFTER=${STOP_AFTER:-}
OBJECTIVES=(spmd max_device)
MINED_TASKS=(30 15)  # a max_device task times every device's tables: fewer tasks
mkdir -p "$DIR"

pin() {  # pin CORE CMD...: CMD on one core where taskset and a second core exist
  if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then taskset -c "$1" "${@:2}"
  else "${@:2}"; fi
}

side_by_side() {  # side_by_side FN: FN 0 and FN 1 at once; fails if either fails
  local first second rc=0
  "$1" 0 & first=$!
  sleep 20  # shard 0 of a collection writes its header first
  "$1" 1 & second=$!
  wait "$first" || rc=$?
  wait "$second" || rc=$?
  return "$rc"
}

done_with() {
  echo "== $1 done ($(date -u +%H:%M:%S))"
  if [ "$STOP_AFTER" = "$1" ]; then exit 0; fi
}

costs() {
  pin "$1" "$PY" -m launch.collect_costs --workdir="$DIR/costs" --pool=train_half \
    --num_shards=2 --shard_index="$1" --num_sets=1600 --num_plans=400 \
    --plan_devices=2,4,8,16 --plan_tables=8,120 --max_tables=30
}
side_by_side costs
done_with costs

costs_large() {  # large random sets (30-100 tables: the devices of T=100-200 tasks)
  pin "$1" "$PY" -m launch.collect_costs --workdir="$DIR/costs_large" --pool=train_half \
    --num_shards=2 --shard_index="$1" --nosingles --min_tables=30 --max_tables=100 \
    --num_sets=600 --num_plans=0
}
side_by_side costs_large
done_with costs_large

cost_model() {  # cost_model WORKDIR DATA [CORE [FLAG...]]
  if [ ! -f "$1/report.md" ]; then  # written last
    pin "${3:-0}" "$PY" -m launch.train_cost_model --workdir="$1" --data="$2" "${@:4}"
  fi
}
cost_model "$DIR/cost_model" "$DIR/costs"
done_with cost_model

policy() {  # policy K: objective K's policy in sharder$SUFFIX_OBJECTIVE (env: SUFFIX, and
  # COST_MODEL and ITERATIONS, by default cost_model$SUFFIX and the config's 300)
  local objective=${OBJECTIVES[$1]}
  pin "$1" "$PY" -m launch.train_sharder --config=launch/configs/sharder_runlocal.py \
    --workdir="$DIR/sharder${SUFFIX:-}_$objective" --config.objective="$objective" \
    --config.cost_model="${COST_MODEL:-$DIR/cost_model${SUFFIX:-}}" \
    --config.num_iterations="${ITERATIONS:-300}" --config.pool.max_rows=100000
}
side_by_side policy
done_with policies

mined() {
  local objective=${OBJECTIVES[$1]}
  pin "$1" "$PY" -m launch.mine_plan_costs --workdir="$DIR/mined_$objective" \
    --policy="$DIR/sharder_$objective" --objective="$objective" --num_tasks="${MINED_TASKS[$1]}"
}
side_by_side mined
done_with mined

other_pool() {  # other_pool K: shard K of the sets and plans of pool seed 2's tables; then
  # shard 0 measures the development sets of pool seed 1 the fits are scored on (`--unseen`)
  pin "$1" "$PY" -m launch.collect_costs --workdir="$DIR/costs_pool2" --pool=synthetic \
    --pool_size=856 --pool_seed=2 --num_shards=2 --shard_index="$1" --num_sets=1900 \
    --num_plans=400 --plan_devices=2,4,8,16 --plan_tables=8,120 --max_tables=30
  if [ "$1" = 0 ]; then
    pin 0 "$PY" -m launch.collect_costs --workdir="$DIR/unseen_dev" --pool=synthetic \
      --pool_size=856 --pool_seed=1 --nosingles --min_tables=20 --max_tables=60 \
      --num_plans=0 --num_sets=80
  fi
}
side_by_side other_pool
done_with other_pools

wide_tables() {  # wide_tables K: shard K of the heavy tables re-dimmed to widths 64 and 128
  # (NeuroShard's augmentation): the train half's, then pool seed 2's
  pin "$1" "$PY" -m launch.collect_costs --workdir="$DIR/costs_wide" --pool=train_half \
    --augment_dims=64,128 --augment_min_pooling=30 --max_tables=8 --num_sets=900 \
    --num_plans=0 --num_shards=2 --shard_index="$1"
  pin "$1" "$PY" -m launch.collect_costs --workdir="$DIR/costs_wide_pool2" --pool=synthetic \
    --pool_size=856 --pool_seed=2 --augment_dims=64,128 --augment_min_pooling=20 \
    --max_tables=8 --num_sets=1000 --num_plans=0 --num_shards=2 --shard_index="$1"
}
side_by_side wide_tables
done_with wide_tables

ALL_DATA="$DIR/costs,$DIR/mined_spmd,$DIR/mined_max_device,$DIR/costs_large,$DIR/costs_pool2"
ALL_DATA="$ALL_DATA,$DIR/costs_wide,$DIR/costs_wide_pool2"
cost_model_u() {  # cost_model_u SEED: the final networks, with the unique-row inputs (the
  # default); ~15 min per fit on one core (Zen 5, two at once)
  cost_model "$DIR/cost_model_u_seed$1" "$ALL_DATA" "$(( $1 % 2 ))" --seed="$1" \
    --unseen="$DIR/unseen_dev"
}
side_by_side cost_model_u
cost_model_u 2
done_with cost_model_u

COST_MODEL="$DIR/cost_model_u_seed0,$DIR/cost_model_u_seed1,$DIR/cost_model_u_seed2" \
  ITERATIONS=3000 SUFFIX=_u side_by_side policy  # ~4 min each (Zen 5)
done_with policies_u
POLICY=("$DIR/sharder_u_spmd" "$DIR/sharder_u_max_device")  # per objective

reproduce() {  # reproduce K SETTINGS: objective K's evaluation of SETTINGS
  local objective=${OBJECTIVES[$1]}
  pin "$1" "$PY" -m launch.reproduce_autoshard --workdir="$DIR/repro_$objective" \
    --measure=oracle --rounds=3 --num_tasks="$NUM_TASKS" --max_rows=100000 \
    --seed="$EVAL_SEED" --policy="${POLICY[$1]}" --objectives="$objective" \
    --settings="$2"
}

evaluate() {  # one process per setting: a process's memory maps grow with the plans it
  # measures (session 12: 48k of the kernel's 65,530 after 9 spmd settings), so a long
  # evaluation in one process can die; finished tasks are kept, so a rerun resumes either way
  local setting
  for setting in ${SETTINGS//,/ }; do reproduce "$1" "$setting"; done
  reproduce "$1" "$SETTINGS"  # every task is on disk: this only writes results.md
}
side_by_side evaluate
done_with evaluation
