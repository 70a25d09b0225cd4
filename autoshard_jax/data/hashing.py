"""Stateless integer hashing in numpy.

The synthetic teacher needs a weight per (table, id) for tables with up to ~10^9 rows, so weights
are computed from a hash of the id on demand instead of being stored.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TWO_PI = 2.0 * np.pi


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array: a fast bijection with good avalanche."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_gaussians(keys: np.ndarray, num: int) -> np.ndarray:
    """`num` standard normals per uint64 key (Box-Muller on hash halves): keys.shape + (num,)."""
    out = np.empty(keys.shape + (num,), dtype=np.float64)
    h = np.asarray(keys, dtype=np.uint64)
    for j in range(0, num, 2):
        h = splitmix64(h)
        u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * 2.0**-32
        u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0**-32
        r = np.sqrt(-2.0 * np.log(u1))
        out[..., j] = r * np.cos(_TWO_PI * u2)
        if j + 1 < num:
            out[..., j + 1] = r * np.sin(_TWO_PI * u2)
    return out
