"""Shared pytest setup: simulated CPU devices so mesh code runs without accelerators."""

import os
import sys

import jax

# The device count is fixed when the backend first initialises, so set it before any JAX op.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
