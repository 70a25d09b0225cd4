"""Sharding plans and their execution on a one-axis device mesh.

plan.py (plan.json schema + validation), layout.py (row packing, memory, host id routing),
lookup_meta.py (per-device lookup metadata in width classes), device_step.py (one device's
lookup/update: the cost hook), stage.py (`ShardedEmbeddingStage`, the shard_map execution),
mesh.py, synthetic_plans.py (reference plans for tests and benchmarks).
"""
