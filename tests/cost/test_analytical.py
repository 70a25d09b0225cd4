"""The TorchRec-style analytical estimator against hand-computed bytes / bandwidth."""

import jax.numpy as jnp
import numpy as np
import pytest

from autoshard_jax.cost import analytical
from autoshard_jax.placement.costs import class_onehot, table_features
from autoshard_jax.tables.spec import TableSpec

BW = analytical.Bandwidth(device_gbps=2.0, a2a_gbps=1.0)


def test_device_ms_is_bytes_over_bandwidth():
    s = TableSpec("a", 1000, 16, 3.0)
    # ids 4 B, rows read max(16, 32) x 4 B, output 16 x 4 B; penalty 1.75 below dim 64; x3.
    fwd = 256 * (3.0 * 4 + 3.0 * 32 * 4 + 16 * 4) * 1.75
    assert analytical.analytical_device_ms([s], 256, BW) == pytest.approx(3 * fwd / 2e9 * 1e3)
    wide = TableSpec("w", 10, 128, 1.0)
    assert analytical.analytical_device_ms([wide], 256, BW) == pytest.approx(
        3 * 256 * (4 + 512 + 512) * 1.0 / 2e9 * 1e3)
    both = analytical.analytical_device_ms([s, wide], 256, BW)
    assert both == pytest.approx(analytical.analytical_device_ms([s], 256, BW)
                                 + analytical.analytical_device_ms([wide], 256, BW))


def test_cost_fn_matches_per_device_estimate_and_spmd_by_hand():
    specs = [TableSpec("a", 100, 16, 2.0), TableSpec("b", 100, 16, 1.0),
             TableSpec("c", 100, 64, 1.5)]
    fn = analytical.analytical_cost_fn(128, BW)
    assign = np.asarray([[1, 0], [0, 1], [0, 1]], np.float32)
    dev, spmd = fn(jnp.asarray(table_features(specs)), jnp.asarray(assign),
                   jnp.asarray(class_onehot(specs)))
    np.testing.assert_allclose(dev, [analytical.analytical_device_ms([specs[0]], 128, BW),
                                     analytical.analytical_device_ms(specs[1:], 128, BW)],
                               rtol=1e-5)
    # SPMD: class 16 padded to 2 slots (a: ceil(2.0)), class 64 to 2 slots (c: ceil(1.5));
    # output columns padded to device 1's 16 + 64 = 80; exchange of ids and two vector passes.
    per16 = (4 + 32 * 4) * 1.75
    per64 = (4 + 64 * 4) * 1.15
    program = 128 * (2 * per16 + 2 * per64 + 80 * 4 * 1.75)
    exchange = 128 * 0.5 * ((2 + 2) * 4 + 2 * 80 * 4)
    want = 3 * program / 2e9 * 1e3 + exchange / 1e9 * 1e3
    assert float(spmd) == pytest.approx(want, rel=1e-5)
    per_dev, spmd2 = analytical.analytical_plan_ms(specs, [0, 1, 1], 2, 128, BW)
    np.testing.assert_allclose(per_dev, dev, rtol=1e-6)
    assert spmd2 == pytest.approx(float(spmd), rel=1e-6)


def test_fit_device_gbps_recovers_the_bandwidth():
    sets = [[TableSpec("a", 10, 16, 2.0)], [TableSpec("b", 10, 64, 7.0),
                                            TableSpec("c", 10, 8, 1.0)]]
    ms = [analytical.analytical_device_ms(s, 64, analytical.Bandwidth(7.5)) for s in sets]
    assert analytical.fit_device_gbps(sets, ms, 64) == pytest.approx(7.5, rel=1e-6)


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_exchange_terms_are_the_layouts_exchange_bytes(num_devices):
    """The traffic the cost models see equals what the sharded stage's collectives carry."""
    from autoshard_jax.cost.oracle import exchange_bytes
    from autoshard_jax.sharding.layout import build_layout
    from autoshard_jax.tables.pools import synthetic_pool

    rng = np.random.default_rng(num_devices)
    specs = synthetic_pool(24, seed=num_devices, max_rows=20_000)
    device_T = rng.integers(0, num_devices, len(specs))
    device_T[:num_devices] = np.arange(num_devices)  # every device holds a table
    layout = build_layout(specs, {s.name: {"type": "table_wise", "device": int(d)}
                                  for s, d in zip(specs, device_T, strict=True)}, num_devices)
    assign_TxD = np.eye(num_devices, dtype=np.float32)[device_T]
    positions, columns = analytical.exchange_terms(jnp.asarray(table_features(specs)),
                                                   jnp.asarray(assign_TxD),
                                                   jnp.asarray(class_onehot(specs)))
    batch = 512
    expected = exchange_bytes(layout, batch)
    got = 4 * batch * (positions + 2 * columns) * (num_devices - 1) / num_devices
    assert float(got) == pytest.approx(expected, rel=1e-6)
