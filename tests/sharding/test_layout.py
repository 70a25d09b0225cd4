"""Row packing, memory accounting and host-side id routing of a plan's static layout."""

import numpy as np
import pytest

from autoshard_jax.sharding import layout as layout_lib
from autoshard_jax.sharding import lookup_meta
from autoshard_jax.sharding.plan import plan_from_mapping
from autoshard_jax.sharding.synthetic_plans import greedy_bytes_plan, random_tables
from autoshard_jax.tables.spec import TableSpec


def test_padded_width_divides_slab_width():
    assert layout_lib.padded_width(4, 128) == 4
    assert layout_lib.padded_width(12, 128) == 16
    assert layout_lib.padded_width(100, 128) == 128
    assert layout_lib.padded_width(7, 48) == 8
    with pytest.raises(ValueError, match="exceeds"):
        layout_lib.padded_width(130, 128)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_byte_balanced_plan_of_100_tables_on_8_devices_pads_at_most_10_percent(seed):
    specs = random_tables(100, seed=seed)
    layout = greedy_bytes_plan(specs, 8).validate(specs, "rowwise_adagrad")
    assert layout.padding_overhead() <= 1.10
    assert layout.padding_overhead({"accumulator": "row"}) <= 1.10


def test_packing_stores_narrow_tables_without_width_padding():
    specs = [TableSpec("w", 10, 64), TableSpec("n", 1000, 4), TableSpec("o", 30, 12)]
    lay = layout_lib.build_layout(specs, {"w": {"type": "table_wise", "device": 0},
                                          "n": {"type": "table_wise", "device": 1},
                                          "o": {"type": "table_wise", "device": 1}}, 2)
    n, o = lay.where(1, 1), lay.where(2, 1)
    assert (n.pack, n.wpad) == (16, 4) and (o.pack, o.wpad) == (4, 16)
    assert lay.phys_rows == (1000 // 16 + 1) + (30 // 4 + 1) + 1  # + the spare row
    assert lay.used_bytes({}) == [10 * 64 * 4, (lay.phys_rows - 1) * 64 * 4]


def test_route_ids_sends_each_id_to_its_owner():
    specs = [TableSpec("t", 10, 4, 2.0), TableSpec("r", 9, 4, 1.0), TableSpec("p", 5, 4, 1.0)]
    plan = plan_from_mapping({"t": 1, "r": "row_wise", "p": "replicated"}, 3, 1 << 20)
    lay = plan.validate(specs)
    ids = [np.array([[3, -1], [9, 9]], np.int32), np.array([[4], [8]], np.int32),
           np.array([[2], [-1]], np.int32)]
    send_BxDxL, rep_BxL = lay.route_ids(ids)
    r0, t1 = lay.sh.pos[0, 1], lay.sh.pos[1, 0]
    # Row-wise "r": row 4 lives on device 1 as local row 1, row 8 on device 2 as local row 2.
    assert send_BxDxL[:, 0, r0].tolist() == [-1, -1]
    assert send_BxDxL[:, 1, r0].tolist() == [1, -1]
    assert send_BxDxL[:, 2, r0].tolist() == [-1, 2]
    assert send_BxDxL[:, 1, t1:t1 + 2].tolist() == [[3, -1], [9, 9]]
    assert (send_BxDxL[:, 0, t1:t1 + 2] == -1).all()  # padding positions on other devices
    assert rep_BxL[:, lay.rep.pos[0, 2]].tolist() == [2, -1]


def test_lookups_are_grouped_by_packed_width():
    """An id reads only its table's packed width: one class per width, positions per class."""
    specs = [TableSpec("w", 10, 64, 2.0), TableSpec("n", 1000, 4, 3.0), TableSpec("o", 30, 12)]
    lay = layout_lib.build_layout(specs, {s.name: {"type": "table_wise", "device": 0}
                                          for s in specs}, 1)
    assert [c.width for c in lay.sh.classes] == [4, 16, 64]
    assert [c.num_positions for c in lay.sh.classes] == [3, 1, 2]
    assert [c.max_rows for c in lay.sh.classes] == [1000, 30, 10]
    assert (lay.sh.pos[0, 1], lay.sh.pos[0, 2], lay.sh.pos[0, 0]) == (0, 3, 4)
    assert lay.sh.num_positions == 6 and lay.sh.num_cols == 64 + 4 + 12


def test_a_class_of_one_table_per_device_gets_an_empty_second_slot():
    """MIN_SLOTS: a lone table's class has a padding slot (no key, no dim, zero columns)."""
    specs = [TableSpec("a", 50, 128, 4.0), TableSpec("b", 60, 128, 2.0), TableSpec("c", 9, 8)]
    plan = {"a": {"type": "table_wise", "device": 0}, "b": {"type": "table_wise", "device": 1},
            "c": {"type": "table_wise", "device": 1}}
    lay = layout_lib.build_layout(specs, plan, 2)
    assert [c.num_slots for c in lay.sh.classes] == [2, 2]
    wide = lay.sh.classes[1]
    assert (wide.slot_key_off[:, 1] == lookup_meta.NO_KEY).all()
    assert (wide.slot_dim[:, 1] == 0).all() and (wide.in_src[:, 1] == lay.sh.num_cols).all()
