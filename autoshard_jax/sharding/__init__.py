"""Sharding plans and their execution on a one-axis device mesh.

plan.py (plan.json schema + validation), layout.py (row packing, per-device metadata, host id
routing), device_step.py (one device's lookup/update: the cost hook), stage.py
(`ShardedEmbeddingStage`, the shard_map execution), mesh.py, synthetic_plans.py (reference
plans for tests and benchmarks).
"""
