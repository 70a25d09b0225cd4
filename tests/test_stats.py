import math

import numpy as np
import pytest

from autoshard_jax.stats import mean_se


def test_mean_se_against_a_python_loop():
    x = [1.0, 4.0, 2.5, 7.0, 3.0]
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / (len(x) - 1)
    got_mean, got_se = mean_se(np.array(x))
    assert math.isclose(got_mean, mean) and math.isclose(got_se, math.sqrt(var / len(x)))


def test_one_value_has_no_standard_error_and_none_is_refused():
    mean, se = mean_se([3.0])
    assert mean == 3.0 and math.isnan(se)
    with pytest.raises(ValueError, match="no values"):
        mean_se([])
