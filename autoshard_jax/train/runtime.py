"""Process-level runtime settings for training jobs on the CPU backend.

Kept free of heavy imports (no orbax, no flax) so benchmarks can use it without paying for them.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

# XLA:CPU's MLIR fusion emitters hold ~150 MB more host memory after compiling the DLRM train step
# than the classic emitters, for the same step time (benchmarks/dlrm_throughput.py). On a host
# whose RAM is mostly embedding tables, that memory matters more than anything they buy. Newer
# XLA (jax 0.12) has only the fusion emitters and no such flag; it is then left out.
CPU_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)

# glibc serves an allocation above its mmap threshold (adaptive, capped at 32 MiB) with a fresh
# mmap and unmaps it on free. XLA:CPU allocates a program's temporary buffer on every call, so a
# step whose buffer is past 32 MiB (the Criteo-Kaggle DLRM step at batch 2048 with the dot
# interaction) page-faults all of it in again each step: ~10k faults, a third of the dense
# forward+backward on a 2-core AMD EPYC. Fixed thresholds keep such buffers in the heap for reuse;
# tables (bigger) are still mapped, and `release_host_memory` still returns freed memory.
# XLA:CPU runs programs on its worker threads, whose glibc arenas grow in heaps of at most
# 64 MiB: a larger buffer is mapped afresh on every call whatever the threshold (a 100-table
# embedding step with a 66 MB temporary: 16k faults, 122 instead of 84 ms per call), so all
# threads share the main arena (M_ARENA_MAX = 1), which has no such cap.
MALLOC_REUSE_BYTES = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters


def _cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "autoshard_jax", "xla_flags.json")


def _jaxlib_build() -> str:
    """Names the XLA that will parse XLA_FLAGS (jaxlib's version and location), without
    importing it."""
    try:
        dist = importlib.metadata.distribution("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
    return f"{dist.version}@{dist.locate_file('')}"


def _xla_accepts(flag: str) -> bool:
    """Starts the CPU backend in a child process with only `flag` set: XLA aborts a process whose
    XLA_FLAGS holds a flag it does not know, so only a child can ask."""
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    try:
        done = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def supported_xla_flags(flags: Sequence[str]) -> list[str]:
    """The subset of `flags` the installed XLA accepts, in order.

    XLA's flag set changes between releases (jax 0.12's XLA dropped
    --xla_cpu_use_fusion_emitters and aborts on it), so each flag is tried once per jaxlib build
    and the answer is cached in ~/.cache/autoshard_jax/xla_flags.json.
    """
    path, build = _cache_path(), _jaxlib_build()
    try:
        with open(path) as f:
            cache = json.load(f)
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    known = cache.get(build, {})
    missing = [flag for flag in flags if not isinstance(known.get(flag), bool)]
    if missing:
        known = {**known, **{flag: _xla_accepts(flag) for flag in missing}}
        cache[build] = known
        try:  # best effort: an unwritable cache only means probing again next time
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as f:
                json.dump(cache, f, indent=1)
            os.replace(f.name, path)
        except OSError:
            pass
    return [flag for flag in flags if known[flag]]


def configure_cpu_runtime() -> None:
    """Adds those CPU_XLA_FLAGS the installed XLA knows to XLA_FLAGS (a user's own setting of a
    flag wins) and keeps step-sized buffers in the heap (`reuse_step_buffers`).

    Call before the first JAX computation: XLA reads XLA_FLAGS when the backend starts. The flags
    only affect the CPU backend.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    wanted = [flag for flag in CPU_XLA_FLAGS if flag.split("=")[0] not in flags]
    for flag in supported_xla_flags(wanted):
        flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
    reuse_step_buffers()


def reuse_step_buffers() -> bool:
    """Keeps freed buffers below MALLOC_REUSE_BYTES in glibc's heap, one arena for all threads
    (see MALLOC_REUSE_BYTES); False where the C library is not glibc (nothing changed). Call
    before JAX starts its threads: a thread keeps the arena it first allocated from."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_REUSE_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_REUSE_BYTES)
                    and libc.mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False


def release_host_memory() -> None:
    """Returns freed compiler scratch to the OS (glibc), before big tables are allocated."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
