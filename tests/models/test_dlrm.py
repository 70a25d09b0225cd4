"""DLRM forward pass against a numpy reference built from the same parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoshard_jax.models import dlrm
from autoshard_jax.tables.spec import TableSpec


def np_mlp(params: dict, x: np.ndarray, n_layers: int, final_relu: bool) -> np.ndarray:
    for i in range(n_layers):
        layer = params[f"layer_{i}"]
        x = x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
        if i < n_layers - 1 or final_relu:
            x = np.maximum(x, 0.0)
    return x


def np_bag(table: np.ndarray, ids_BxH: np.ndarray, combiner: str) -> np.ndarray:
    out = np.zeros((ids_BxH.shape[0], table.shape[1]))
    for b, bag in enumerate(ids_BxH):
        real = [i for i in bag if i >= 0]
        for i in real:
            out[b] += table[i]
        if combiner == "mean" and real:
            out[b] /= len(real)
    return out


def np_dot_interaction(bottom: np.ndarray, pooled: list, self_interaction: bool) -> np.ndarray:
    """dlrm_s_pytorch.interact_features: li/lj lists, offset 1 with self-interaction."""
    vectors = [bottom, *pooled]
    n = len(vectors)
    offset = 1 if self_interaction else 0
    pairs = [(i, j) for i in range(n) for j in range(i + offset)]
    dots = [np.sum(vectors[i] * vectors[j], axis=1) for i, j in pairs]
    return np.concatenate([bottom, np.stack(dots, axis=1)], axis=1)


def np_cross(params: dict, x0: np.ndarray, num_layers: int, rank: int) -> np.ndarray:
    x = x0
    for i in range(num_layers):
        if rank:
            v = np.asarray(params[f"cross_{i}_v"]["kernel"], np.float64)
            assert "bias" not in params[f"cross_{i}_v"]
            u = params[f"cross_{i}_u"]
            proj = (x @ v) @ np.asarray(u["kernel"], np.float64) + np.asarray(u["bias"],
                                                                                np.float64)
        else:
            w = params[f"cross_{i}"]
            proj = x @ np.asarray(w["kernel"], np.float64) + np.asarray(w["bias"], np.float64)
        x = x0 * proj + x
    return x


def np_dlrm(params, dense, ids, *, tables, bottom_mlp, top_mlp, interaction="dot",
            self_interaction=False, num_cross_layers=0, cross_rank=0, combiner="sum"):
    emb, dp = params["embedding"], params["dense"]
    pooled = [np_bag(np.asarray(emb[s.name], np.float64), np.asarray(i), combiner)
              for s, i in zip(tables, ids, strict=True)]
    bottom = np_mlp(dp["bottom_mlp"], np.asarray(dense, np.float64), len(bottom_mlp), True)
    if interaction == "dot":
        x = np_dot_interaction(bottom, pooled, self_interaction)
    else:
        x = np.concatenate([bottom, *pooled], axis=1)
    if num_cross_layers:
        x = np_cross(dp["cross"], x, num_cross_layers, cross_rank)
    return np_mlp(dp["top_mlp"], x, len(top_mlp), False)[:, 0]


def make_inputs(tables, batch=6, dense_dim=5, seed=0):
    rng = np.random.default_rng(seed)
    dense = jnp.asarray(rng.normal(size=(batch, dense_dim)).astype(np.float32))
    ids = []
    for s in tables:
        ids_BxH = rng.integers(0, s.rows, size=(batch, s.hotness)).astype(np.int32)
        ids_BxH[rng.random(ids_BxH.shape) < 0.3] = -1
        ids.append(jnp.asarray(ids_BxH))
    return dense, tuple(ids)


DOT_TABLES = [TableSpec("t0", 10, 4, 2.0), TableSpec("t1", 7, 4, 1.0), TableSpec("t2", 5, 4, 3.0)]
CAT_TABLES = [TableSpec("t0", 10, 3, 2.0), TableSpec("t1", 7, 5, 1.0)]

CONFIGS = [
    dict(tables=DOT_TABLES, bottom_mlp=(8, 4), top_mlp=(6, 1)),
    dict(tables=DOT_TABLES, bottom_mlp=(4,), top_mlp=(6, 3, 1), self_interaction=True,
         combiner="mean"),
    dict(tables=CAT_TABLES, bottom_mlp=(6, 2), top_mlp=(4, 1), interaction="cat"),
    dict(tables=CAT_TABLES, bottom_mlp=(3,), top_mlp=(4, 1), interaction="cat",
         num_cross_layers=2),
    dict(tables=DOT_TABLES, bottom_mlp=(4,), top_mlp=(1,), num_cross_layers=2, cross_rank=3,
         self_interaction=True),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_dlrm_matches_numpy_reference(config):
    model = dlrm.DLRM(**config)
    dense, ids = make_inputs(config["tables"])
    params = model.init(jax.random.key(1), dense, ids)["params"]
    assert set(params) == {"embedding", "dense"}
    # Make the biases non-zero so a missing bias would be caught.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if path[-1].key == "bias" else x, params)
    got = np.asarray(model.apply({"params": params}, dense, ids))
    want = np_dlrm(params, dense, ids, **config)
    assert got.shape == (dense.shape[0],)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("self_interaction", [False, True])
def test_dot_interaction_order(self_interaction):
    """Explicit lower-triangle order: (1,0), (2,0), (2,1), ... (with (i,i) first in row i)."""
    rng = np.random.default_rng(3)
    bottom = rng.normal(size=(2, 3)).astype(np.float32)
    pooled = rng.normal(size=(2, 3, 3)).astype(np.float32)
    got = np.asarray(dlrm.dot_interaction(jnp.asarray(bottom), jnp.asarray(pooled),
                                          self_interaction))
    vec = np.concatenate([bottom[:, None], pooled], axis=1)
    if self_interaction:
        pairs = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (3, 3)]
    else:
        pairs = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    want = np.concatenate(
        [bottom, np.stack([(vec[:, i] * vec[:, j]).sum(-1) for i, j in pairs], axis=1)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape[1] == 3 + dlrm.num_dot_features(4, self_interaction)


def test_param_tree_layout():
    config = CONFIGS[-1]
    model = dlrm.DLRM(**config)
    dense, ids = make_inputs(config["tables"])
    params = model.init(jax.random.key(0), dense, ids)["params"]
    assert set(params["dense"]) == {"bottom_mlp", "cross", "top_mlp"}
    assert set(params["dense"]["cross"]) == {"cross_0_u", "cross_0_v", "cross_1_u", "cross_1_v"}
    n = len(config["tables"]) + 1
    assert params["dense"]["top_mlp"]["layer_0"]["kernel"].shape[0] == 4 + n * (n + 1) // 2


def test_dot_width_mismatch_raises():
    model = dlrm.DLRM(CAT_TABLES, bottom_mlp=(3,), top_mlp=(4, 1), interaction="dot")
    dense, ids = make_inputs(CAT_TABLES)
    with pytest.raises(ValueError, match="share one width"):
        model.init(jax.random.key(0), dense, ids)
    # Bottom width differs from equal table widths.
    model = dlrm.DLRM(DOT_TABLES, bottom_mlp=(5,), top_mlp=(4, 1), interaction="dot")
    dense, ids = make_inputs(DOT_TABLES)
    with pytest.raises(ValueError, match=r"widths \[4, 5\]"):
        model.init(jax.random.key(0), dense, ids)


def test_top_mlp_must_end_in_one():
    model = dlrm.DLRM(DOT_TABLES, bottom_mlp=(4,), top_mlp=(4, 2))
    dense, ids = make_inputs(DOT_TABLES)
    with pytest.raises(ValueError, match="top_mlp must end in 1"):
        model.init(jax.random.key(0), dense, ids)


def test_bad_interaction_raises():
    model = dlrm.DLRM(DOT_TABLES, bottom_mlp=(4,), top_mlp=(1,), interaction="bilinear")
    dense, ids = make_inputs(DOT_TABLES)
    with pytest.raises(ValueError, match="interaction must be one of"):
        model.init(jax.random.key(0), dense, ids)


def autodiff_dot_interaction(bottom, pooled, self_interaction):
    """The formulation before the hand-written gradient: Gram by einsum, lower triangle by a
    gather, differentiated by JAX."""
    vectors = jnp.concatenate([bottom[:, None, :], pooled], axis=1)
    gram = jnp.einsum("bne,bme->bnm", vectors, vectors)
    rows, cols = jnp.tril_indices(vectors.shape[1], k=0 if self_interaction else -1)
    return jnp.concatenate([bottom, gram[:, rows, cols]], axis=1)


@pytest.mark.parametrize("self_interaction", [False, True])
def test_dot_interaction_gradient_matches_autodiff(self_interaction):
    rng = np.random.default_rng(4)
    bottom = jnp.asarray(rng.normal(size=(5, 4)).astype(np.float32))
    pooled = jnp.asarray(rng.normal(size=(5, 6, 4)).astype(np.float32))
    out, vjp = jax.vjp(lambda b, p: dlrm.dot_interaction(b, p, self_interaction), bottom, pooled)
    want, want_vjp = jax.vjp(lambda b, p: autodiff_dot_interaction(b, p, self_interaction),
                             bottom, pooled)
    np.testing.assert_array_equal(out, want)
    g = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
    for got_g, want_g in zip(vjp(g), want_vjp(g), strict=True):
        np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-5)
    # Second order (reverse over reverse) goes through the hand-written gradient too.
    hvp = jax.grad(lambda p: (jax.grad(
        lambda q: (dlrm.dot_interaction(bottom, q, self_interaction) ** 2).sum())(p) ** 2).sum())
    hvp_want = jax.grad(lambda p: (jax.grad(
        lambda q: (autodiff_dot_interaction(bottom, q, self_interaction) ** 2).sum())(p) ** 2
    ).sum())
    np.testing.assert_allclose(hvp(pooled), hvp_want(pooled), rtol=1e-4, atol=1e-3)


def test_dense_gradients_match_autodiff_interaction(monkeypatch):
    """The whole dense half's gradients (params and pooled) equal the old formulation's."""
    config = CONFIGS[1]
    model = dlrm.DLRM(**config)
    dense, ids = make_inputs(config["tables"], batch=16)
    params = model.init(jax.random.key(2), dense, ids)["params"]
    loss = lambda p: (model.apply({"params": p}, dense, ids) ** 2).mean()  # noqa: E731
    got = jax.grad(loss)(params)
    monkeypatch.setattr(dlrm, "dot_interaction", autodiff_dot_interaction)
    want = jax.grad(loss)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[4]])
def test_bfloat16_compute_close_to_float32_with_float32_params(config):
    dense, ids = make_inputs(config["tables"], batch=32)
    model32 = dlrm.DLRM(**config)
    model16 = dlrm.DLRM(**config, dtype="bfloat16")
    params = model32.init(jax.random.key(1), dense, ids)["params"]
    params16 = model16.init(jax.random.key(1), dense, ids)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
    jax.tree.map(np.testing.assert_array_equal, params, params16)  # same init, same tree
    want = model32.apply({"params": params}, dense, ids)
    got = model16.apply({"params": params}, dense, ids)
    assert got.dtype == jnp.float32
    # bfloat16 keeps 8 bits of mantissa: close, but not float32-equal (the cast is real).
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() > 0
    jaxpr = str(jax.make_jaxpr(lambda p: model16.apply({"params": p}, dense, ids))(params))
    assert "bf16[32" in jaxpr
    grads = jax.grad(lambda p: model16.apply({"params": p}, dense, ids).sum())(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_bad_dtype_raises():
    model = dlrm.DLRM(DOT_TABLES, bottom_mlp=(4,), top_mlp=(1,), dtype="float16")
    dense, ids = make_inputs(DOT_TABLES)
    with pytest.raises(ValueError, match="dtype must be one of"):
        model.init(jax.random.key(0), dense, ids)
