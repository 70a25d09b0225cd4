"""Process-level runtime settings for training jobs on the CPU backend.

Kept free of heavy imports (no orbax, no flax) so benchmarks can use it without paying for them.
"""

from __future__ import annotations

import ctypes
import os

# XLA:CPU's MLIR fusion emitters hold ~150 MB more host memory after compiling the DLRM train step
# than the classic emitters, for the same step time (benchmarks/dlrm_throughput.py). On a host
# whose RAM is mostly embedding tables, that memory matters more than anything they buy.
CPU_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)


def configure_cpu_runtime() -> None:
    """Adds CPU_XLA_FLAGS to XLA_FLAGS (a user's own setting of a flag wins).

    Call before the first JAX computation: XLA reads XLA_FLAGS when the backend starts. The flags
    only affect the CPU backend.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_XLA_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags


def release_host_memory() -> None:
    """Returns freed compiler scratch to the OS (glibc), before big tables are allocated."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
