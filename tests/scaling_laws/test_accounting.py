"""Parameter and FLOP counts: hand-computed for a tiny config, and against XLA's cost analysis."""

import jax
import numpy as np
import pytest

from autoshard_jax.train.loop import build_dense_model
from launch.configs import default
from scaling_laws.accounting import count_flops, count_params, xla_step_flops


def _tiny(interaction="dot", dense="sgd", embedding="sgd", batch=4):
    c = default.get_config()
    c.data.num_dense = 3
    c.model.table_rows = (5, 7)
    c.model.embedding_dim = 2
    c.model.bottom_mlp = (4, 2)
    c.model.top_mlp = (3, 1)
    c.model.interaction = interaction
    c.optim.dense, c.optim.embedding = dense, embedding
    c.batch_size = batch
    return c


def test_tiny_config_by_hand():
    p = count_params(_tiny())
    assert p.embedding == 5 * 2 + 7 * 2
    # bottom 3->4->2, dot over 3 vectors: 2 + 3 features, top 5->3->1 (weights + biases)
    assert p.dense == (3 * 4 + 4) + (4 * 2 + 2) + (5 * 3 + 3) + (3 * 1 + 1)
    f = count_flops(_tiny())
    matmul = 2 * (3 * 4 + 4 * 2 + 5 * 3 + 3 * 1)
    forward = matmul + (4 + 2 + 3 + 1) + (4 + 2 + 3) + 2 * 3 * 3 * 2 + 2 * (2 + 2)
    assert f.forward_per_sample == forward == 139
    backward = (2 * matmul - 2 * 3 * 4) + 10 + 9 + 2 * 36 + (3 * 3 * 2 + 3) + 4
    assert f.backward_per_sample == backward == 244
    assert f.row_update_per_sample == 2 * 4 and f.dense_update_per_step == 2 * 48
    assert f.per_step == 4 * (139 + 244 + 8) + 96 == 1660


def test_cat_interaction_by_hand():
    p = count_params(_tiny("cat"))
    assert p.dense == (3 * 4 + 4) + (4 * 2 + 2) + (6 * 3 + 3) + (3 * 1 + 1)  # 2 + 2 * 2 wide
    assert count_flops(_tiny("cat")).forward_per_sample == \
        2 * (12 + 8 + 18 + 3) + 10 + 9 + 2 * (2 + 2)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_dense_params_match_the_model(interaction):
    c = _tiny(interaction)
    c.model.num_cross_layers, c.model.cross_rank = 2, 3
    pooled = (np.zeros((1, 2), np.float32),) * 2
    shapes = jax.eval_shape(build_dense_model(c).init, jax.random.key(0),
                            np.zeros((1, 3), np.float32), pooled)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count_params(c).dense == n


@pytest.mark.parametrize("interaction,dense,embedding", [("dot", "adam", "rowwise_adagrad"),
                                                          ("cat", "sgd", "sgd")])
def test_flops_agree_with_xla_within_10_percent(interaction, dense, embedding):
    c = _tiny(interaction, dense, embedding, batch=32)
    c.model.table_rows = (300, 200, 100, 50)
    c.model.embedding_dim = 8
    c.model.bottom_mlp = (32, 8)
    c.model.top_mlp = (64, 32, 1)
    ours, xla = count_flops(c).per_step, xla_step_flops(c)
    assert abs(ours - xla) / xla < 0.10, (ours, xla)
