"""The host CPU, as recorded beside measurements (cost records, scaling-law runs): on the CPU
backend the device kind is just "cpu", and costs are only comparable within one CPU type."""

from __future__ import annotations

import functools
import platform


@functools.cache
def host_cpu() -> str:
    """The host CPU as stamped on cost records: the model name, then family / model / stepping
    and cache size from /proc/cpuinfo (KVM shows one name, "Intel(R) Xeon(R) Processor", for
    several generations), or the platform's processor string elsewhere."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():  # the first processor's block ends
                    break
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    detail = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    if "cache size" in fields:
        detail.append(f"cache {fields['cache size']}")
    return f"{name} ({', '.join(detail)})" if detail else name


def cpu_name(stamp: str) -> str:
    """The model name of a `host_cpu` stamp: what costs are kept apart by. Costs of two CPU
    types differ by composition (summing measured singles errs 22% on the Intel Xeon, 9% on AMD
    EPYC Zen 4: fusion saves more on the Xeon), while the same entries re-measured in another
    session on a machine of the same name agreed (session 23: median ratio 1.007, Spearman
    0.999 over 2,000 entries), so the name, not the detail, is the unit of comparability."""
    return stamp.split(" (")[0]
