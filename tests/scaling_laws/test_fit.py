"""The fitter recovers known power laws, reports honest intervals and refuses bad series."""

import numpy as np
import pytest

from autoshard_jax.errors import InputError
from scaling_laws.fit import (
    JointFit,
    check_series,
    extrapolation_check,
    fit_no_constant,
    fit_power_law,
)

X = 4096 * 2.0 ** np.arange(9)
TRUE = (3.0, 0.35, 0.8)


def _law(x, a, b, c):
    return a * x ** -b + c


def test_recovers_known_parameters_within_bootstrap_intervals():
    rng = np.random.default_rng(3)
    y = _law(X, *TRUE) * np.exp(rng.normal(0, 0.002, X.shape))
    fit = fit_power_law(X, y, bootstrap=300)
    for name, true in zip("abc", TRUE, strict=True):
        lo, hi = fit.ci[name]
        assert lo <= true <= hi, (name, true, fit.ci)
    assert abs(fit.c - TRUE[2]) < 0.01 and abs(fit.b - TRUE[1]) < 0.05
    lo, hi = fit.band(X)
    assert np.all(lo <= hi) and fit.bootstrap_params.shape == (300, 3)


def test_exact_points_give_exact_fits_and_extrapolation():
    y = _law(X, *TRUE)
    fit = fit_power_law(X, y, bootstrap=0)
    np.testing.assert_allclose([fit.a, fit.b, fit.c], TRUE, rtol=1e-3)
    squares = fit_power_law(X, y, loss="squares", bootstrap=0)
    np.testing.assert_allclose(squares.predict(X), y, rtol=1e-4)
    ext = extrapolation_check(X, y, holdout=1, bootstrap=0)
    assert ext["relative_error"] < 1e-3
    assert ext["held_out_x"] == [X[-1]]


def test_no_constant_baseline_is_a_log_log_line():
    a, b = fit_no_constant(X, 2.0 * X ** -0.5)
    assert a == pytest.approx(2.0) and b == pytest.approx(0.5)


def test_too_short_series_names_axis_and_count():
    with pytest.raises(InputError, match=r"axis data: 3 finished runs.*at least 4"):
        check_series("data", X[:3], _law(X[:3], *TRUE))


def test_non_monotone_series_is_refused():
    y = _law(X, *TRUE)
    y[4] = y[2]
    with pytest.raises(InputError, match="axis embedding: NE is not decreasing"):
        check_series("embedding", X, y)
    with pytest.raises(InputError, match="not decreasing"):
        check_series("mlp", X[:5], np.full(5, 0.9))
    with pytest.raises(InputError, match="share x"):
        check_series("mlp", np.array([1.0, 2, 2, 3]), np.array([4.0, 3, 2, 1]))


def test_small_wiggles_within_tolerance_are_accepted():
    y = _law(X, *TRUE)
    y[-1] = y[-2] * 1.001
    check_series("data", X, y, tolerance=0.005)


def test_compute_optimal_allocation_minimises_the_joint_law():
    law = JointFit(A=50.0, alpha=0.4, B=300.0, beta=0.3, E=0.7)
    k, budget = 6.0, 1e15
    n, d = law.compute_optimal(budget, k)
    assert k * n * d == pytest.approx(budget)
    best = law.predict(n, d)
    for f in (0.8, 1.25):
        assert law.predict(n * f, budget / (k * n * f)) > best


def test_flat_series_within_noise_is_refused():
    y = 0.89 * (1 - 0.001 * np.arange(5))  # 0.4% over the axis: within 2 x tolerance
    with pytest.raises(InputError, match="axis over_arch: NE is flat over its 5 runs"):
        check_series("over_arch", X[:5], y, tolerance=0.005)
