"""Summary statistics the evaluation reports share (AutoShard's gaps, FGD's paired differences)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_se(x_N: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean; the SE is NaN for one value (no spread to estimate)."""
    x_N = np.asarray(x_N, np.float64)
    if x_N.size == 0:
        raise ValueError("mean_se of no values")
    se = float(x_N.std(ddof=1) / np.sqrt(x_N.size)) if x_N.size > 1 else float("nan")
    return float(x_N.mean()), se
