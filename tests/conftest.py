"""Shared pytest setup: simulated CPU devices so mesh code runs without accelerators."""

import atexit
import os
import shutil
import sys
import tempfile

# One persistent XLA compilation cache per test run, shared by the xdist workers and by the
# launcher subprocesses the tests start (they inherit the environment): a launcher that tests
# run five times compiles once, and in-process tests that build the same program anew reuse
# it. Set by the first process (the run's controller), removed when it exits; a cache
# directory set by the caller is used as given.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="autoshard-jax-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after the cache settings, which jax reads on import)

# The device count is fixed when the backend first initialises, so set it before any JAX op.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
