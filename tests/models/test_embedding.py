"""Embedding bags against a numpy loop reference; padding, pooling gradient and table init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoshard_jax.models import embedding
from autoshard_jax.tables.spec import TableSpec


def bag_reference(table_RxE: np.ndarray, ids_BxH: np.ndarray, combiner: str) -> np.ndarray:
    """Loop over samples and slots, skipping -1: the definition of a pooled bag."""
    out_BxE = np.zeros((ids_BxH.shape[0], table_RxE.shape[1]), np.float64)
    for b, bag in enumerate(ids_BxH):
        real = [int(i) for i in bag if i != -1]
        for i in real:
            out_BxE[b] += table_RxE[i]
        if combiner == "mean" and real:
            out_BxE[b] /= len(real)
    return out_BxE


def random_ids(rng: np.random.Generator, rows: int, b: int, h: int, pad_frac=0.35):
    ids_BxH = rng.integers(0, rows, size=(b, h)).astype(np.int32)
    ids_BxH[rng.random((b, h)) < pad_frac] = -1  # padding anywhere in the bag, not only at the end
    ids_BxH[0, :] = -1  # an all-padding bag
    ids_BxH[1, :] = rows - 1  # the last row, several times
    ids_BxH[2, 0] = -1
    ids_BxH[2, 1:] = 0
    return ids_BxH


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_embedding_bag_matches_loop_reference(combiner):
    rng = np.random.default_rng(0)
    table_RxE = rng.normal(size=(13, 4)).astype(np.float32)
    ids_BxH = random_ids(rng, 13, 16, 5)
    got = np.asarray(embedding.embedding_bag(jnp.asarray(table_RxE), jnp.asarray(ids_BxH),
                                             combiner))
    want = bag_reference(table_RxE, ids_BxH, combiner)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[0], np.zeros(4))  # all-padding bag pools to zeros


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_padding_never_reaches_a_row(combiner):
    table_RxE = np.ones((10, 3), np.float32)
    table_RxE[-1] = 1e6  # where jnp.take would wrap -1 to
    table_RxE[0] = 1e6  # where the clamped padding reads
    ids_BxH = np.array([[-1, 3, -1, 4], [-1, -1, -1, -1], [5, -1, -1, -1], [-1, -1, 2, -1]],
                       np.int32)
    got = np.asarray(embedding.embedding_bag(jnp.asarray(table_RxE), jnp.asarray(ids_BxH),
                                             combiner))
    want = bag_reference(table_RxE, ids_BxH, combiner)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.abs(got).max() <= 2.0  # no sentinel leaked
    # The real rows 0 and R-1 still do contribute when named explicitly.
    ids_real = jnp.asarray([[0, -1], [-1, 9]], jnp.int32)
    got_real = np.asarray(embedding.embedding_bag(jnp.asarray(table_RxE), ids_real, combiner))
    np.testing.assert_allclose(got_real, np.full((2, 3), 1e6), rtol=1e-6)


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_collection_matches_reference(combiner):
    specs = [TableSpec("a", 11, 4, 3.0), TableSpec("b", 7, 4, 1.0), TableSpec("c", 5, 2, 2.0)]
    ebc = embedding.EmbeddingBagCollection(specs, combiner)
    rng = np.random.default_rng(1)
    ids = tuple(jnp.asarray(random_ids(rng, s.rows, 8, s.hotness)) for s in specs)
    params = ebc.init(jax.random.key(0), ids)["params"]
    assert set(params) == {"a", "b", "c"}
    for s in specs:
        assert params[s.name].shape == (s.rows, s.dim)
    out = ebc.apply({"params": params}, ids)
    assert len(out) == 3
    for s, ids_BxH, got in zip(specs, ids, out, strict=True):
        want = bag_reference(np.asarray(params[s.name]), np.asarray(ids_BxH), combiner)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected ids for 3 tables"):
        ebc.apply({"params": params}, ids[:2])


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_pool_backward_is_the_vjp_of_pool_rows(combiner):
    rng = np.random.default_rng(2)
    ids_BxH = jnp.asarray(random_ids(rng, 9, 6, 4))
    rows_BxHxE = jnp.asarray(rng.normal(size=(6, 4, 3)).astype(np.float32))
    g_BxE = jnp.asarray(rng.normal(size=(6, 3)).astype(np.float32))
    _, vjp = jax.vjp(lambda r: embedding.pool_rows(r, ids_BxH, combiner), rows_BxHxE)
    (want,) = vjp(g_BxE)
    got = embedding.pool_backward(g_BxE, ids_BxH, combiner)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    # And against jax.grad of a scalar loss.
    loss = lambda r: jnp.sum(embedding.pool_rows(r, ids_BxH, combiner) * g_BxE)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.grad(loss)(rows_BxHxE)),
                               rtol=1e-6, atol=1e-7)
    # Padded slots get no gradient.
    pad = np.asarray(ids_BxH) < 0
    assert np.all(np.asarray(got)[pad] == 0)


def test_bad_combiner_raises():
    with pytest.raises(ValueError, match="combiner"):
        embedding.check_combiner("max")
    with pytest.raises(ValueError, match="combiner"):
        embedding.embedding_bag(jnp.ones((3, 2)), jnp.zeros((2, 2), jnp.int32), "max")
    ebc = embedding.EmbeddingBagCollection([TableSpec("a", 3, 2)], "max")
    with pytest.raises(ValueError, match="combiner"):
        ebc.init(jax.random.key(0), (jnp.zeros((2, 1), jnp.int32),))


def test_table_init_small_bounds_and_determinism():
    init = embedding.table_init
    a = np.asarray(init(jax.random.key(3), (100, 8)))
    b = np.asarray(init(jax.random.key(3), (100, 8)))
    c = np.asarray(init(jax.random.key(4), (100, 8)))
    bound = 0.1
    assert a.shape == (100, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.abs(a) <= bound)
    assert a.max() > 0.8 * bound and a.min() < -0.8 * bound  # spans the range


@pytest.mark.parametrize("rows,chunk_rows", [(103, 10), (100, 10), (11, 10), (64, 7)])
def test_table_init_chunked_fills_every_row(rows, chunk_rows, monkeypatch):
    monkeypatch.setattr(embedding, "INIT_CHUNK_ROWS", chunk_rows)
    init = embedding.table_init
    table = np.asarray(jax.jit(init, static_argnums=1)(jax.random.key(5), (rows, 3)))
    again = np.asarray(jax.jit(init, static_argnums=1)(jax.random.key(5), (rows, 3)))
    bound = (1.0 / rows) ** 0.5
    assert table.shape == (rows, 3)
    assert np.all(np.any(table != 0, axis=1)), "a row was left at zero"
    assert np.all(np.abs(table) <= bound)
    np.testing.assert_array_equal(table, again)
    # Chunks draw distinct bits: no two rows of the table are identical.
    assert len(np.unique(table, axis=0)) == rows
    # Chunking never changes a row's value: each row is drawn from its own key.
    monkeypatch.setattr(embedding, "INIT_CHUNK_ROWS", 1 << 14)
    np.testing.assert_array_equal(table, np.asarray(init(jax.random.key(5), (rows, 3))))
