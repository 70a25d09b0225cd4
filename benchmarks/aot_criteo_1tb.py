"""Compiles criteo_1tb_dcnv2's init and train step for a byte-balanced plan on 64 devices, ahead
of time, and prints the per-device bytes: a check that the ~180 GB model fits a pod slice,
on a laptop.

Devices are simulated CPU devices and every input is a `jax.ShapeDtypeStruct`: nothing of the
model is allocated, only compiled (`.lower().compile()`).

python benchmarks/aot_criteo_1tb.py [--num_devices=64] [--batch_size=65536] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def aot_report(num_devices: int, batch_size: int | None = None,
               table_rows_cap: int = 0) -> dict:
    """Lowers and compiles the init and the train step; returns the figures.

    Args:
      num_devices: the mesh size (jax_num_cpu_devices must allow it).
      batch_size: the global batch (default: the config's 65536).
      table_rows_cap: > 0 caps every table's rows (a fast test of the same path).

    Returns:
      A JSON-able dict: the layout's per-device bytes and the compiled programs' memory.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from autoshard_jax.embedding import abstract_train_state, init_train_state
    from autoshard_jax.optim.sparse import make_dense_optimizer, make_row_optimizer, state_kinds
    from autoshard_jax.sharding.stage import ShardedEmbeddingStage
    from autoshard_jax.sharding.synthetic_plans import greedy_bytes_plan
    from autoshard_jax.train.loop import build_dense_model, build_tables
    from autoshard_jax.train.step import jit_train_step
    from launch.configs import criteo_1tb_dcnv2

    config = criteo_1tb_dcnv2.get_config()
    if table_rows_cap:
        config.model.rows_cap = table_rows_cap
    b = batch_size or config.batch_size
    tables = build_tables(config)
    row_opt = make_row_optimizer(config.optim.embedding, config.optim.embedding_lr)
    dense_tx = make_dense_optimizer(config.optim.dense, config.optim.dense_lr)
    dense_model = build_dense_model(config)
    plan = greedy_bytes_plan(tables, num_devices)
    stage = ShardedEmbeddingStage(tables, plan, row_opt, config.model.combiner)
    lay, kinds = stage.layout, state_kinds(row_opt)

    # Shapes only: the dense features' shape is all the init reads of a batch.
    example = {"dense": np.zeros((b, config.data.num_dense), np.float32)}
    abstract = abstract_train_state(stage, dense_model, dense_tx, example)
    shardings = stage.state_shardings(abstract)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=stage.sharded)  # noqa: E731
    batch = {"dense": sds((b, config.data.num_dense), jnp.float32), "label": sds((b,), jnp.float32),
             "ids": {"sh": sds((b, num_devices, lay.sh.num_positions), jnp.int32),
                     "rep": sds((b, lay.rep.num_positions), jnp.int32)}}

    t0 = time.perf_counter()
    init = jax.jit(lambda rng: init_train_state(rng, dense_model, stage, dense_tx, example),
                   out_shardings=shardings).lower(jax.random.key(0)).compile()
    t1 = time.perf_counter()
    step = jit_train_step(dense_model, stage, dense_tx, abstract).lower(abstract, batch).compile()
    t2 = time.perf_counter()

    def memory(compiled) -> dict:
        m = compiled.memory_analysis()
        if m is None:
            return {}
        return {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                "temp_size_in_bytes", "alias_size_in_bytes")
                if hasattr(m, k)}

    real = lay.real_bytes(kinds)
    state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                      for x in jax.tree.leaves(abstract))
    return {
        "num_devices": num_devices, "batch_size": b, "num_tables": len(tables),
        "table_bytes": sum(s.param_bytes() for s in tables),
        "state_bytes_total": state_bytes,
        "per_device_real_bytes_max": max(real), "per_device_real_bytes_min": min(real),
        "per_device_allocated_bytes": lay.allocated_bytes(kinds),
        "padding_overhead": lay.padding_overhead(kinds),
        "placements": {k: sum(1 for p in plan.placements.values() if p["type"] == k)
                       for k in ("table_wise", "row_wise", "replicated")},
        "init_compile_s": t1 - t0, "step_compile_s": t2 - t1,
        "init_memory": memory(init), "step_memory": memory(step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_devices", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=0, help="0: the config's")
    parser.add_argument("--rows_cap", type=int, default=0, help="cap table rows (quick check)")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    import jax

    jax.config.update("jax_num_cpu_devices", args.num_devices)
    report = aot_report(args.num_devices, args.batch_size or None, args.rows_cap)
    if args.json:
        print(json.dumps(report))
        return
    gb = 2**30
    print(f"criteo_1tb_dcnv2 on {report['num_devices']} devices, global batch "
          f"{report['batch_size']}, {report['num_tables']} tables "
          f"({report['placements']}), greedy byte-balanced plan")
    print(f"  tables {report['table_bytes'] / gb:.1f} GiB; state (tables + row-wise Adagrad + "
          f"dense) {report['state_bytes_total'] / gb:.1f} GiB in all")
    print(f"  per device: real {report['per_device_real_bytes_min'] / gb:.2f}-"
          f"{report['per_device_real_bytes_max'] / gb:.2f} GiB, allocated "
          f"{report['per_device_allocated_bytes'] / gb:.2f} GiB (padding overhead "
          f"{report['padding_overhead']:.3f})")
    for name in ("init", "step"):
        mem = {k: f"{v / gb:.2f} GiB" for k, v in report[f"{name}_memory"].items()}
        print(f"  {name}: compiled in {report[f'{name}_compile_s']:.1f} s, per device {mem}")


if __name__ == "__main__":
    main()
