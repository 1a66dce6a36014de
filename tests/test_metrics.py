"""FLOP accounting for MFU: the traced count matches hand-computed FLOPs, loops counted per iteration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from xemogpt_jax import metrics, trainer

BATCH, WIDTH, LAYERS = 4, 8, 3


def _mlp_loss(weights: jax.Array, x: jax.Array, scanned: bool) -> jax.Array:
    if scanned:
        x, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, weights)
    else:
        for w in weights:
            x = jnp.tanh(x @ w)
    return jnp.sum(x)


@pytest.mark.parametrize("scanned", [True, False], ids=["scan", "unrolled"])
def test_a_train_step_counts_every_layer_forward_and_backward(scanned):
    weights, x = jnp.ones((LAYERS, WIDTH, WIDTH)), jnp.ones((BATCH, WIDTH))
    step = jax.jit(jax.grad(lambda w, x: _mlp_loss(w, x, scanned), argnums=(0, 1)))
    matmul = 2 * BATCH * WIDTH * WIDTH
    # per layer: the forward matmul, then the input and the weight gradients
    assert metrics.traced_flops(step, weights, x) == LAYERS * 3 * matmul


def test_remat_counts_the_recomputed_forward():
    weights, x = jnp.ones((LAYERS, WIDTH, WIDTH)), jnp.ones((BATCH, WIDTH))
    step = jax.jit(jax.grad(jax.checkpoint(lambda w, x: _mlp_loss(w, x, True)), argnums=(0, 1)))
    assert metrics.traced_flops(step, weights, x) == LAYERS * 4 * (2 * BATCH * WIDTH * WIDTH)


def test_convolutions_count_one_multiply_add_per_tap_and_input_feature():
    signal, kernel = jnp.ones((2, 3, 50)), jnp.ones((5, 3, 10))  # [N, C_in, T], [C_out, C_in, K]
    conv = jax.jit(lambda s, k: jax.lax.conv_general_dilated(s, k, window_strides=(5,), padding="VALID"))
    out_elements = 2 * 5 * 9  # N x C_out x ((50 - 10) / 5 + 1)
    assert metrics.traced_flops(conv, signal, kernel) == 2 * out_elements * 3 * 10


def test_a_cond_counts_its_costliest_branch():
    a = jnp.ones((4, 6))

    def branchy(flag, a):
        return jax.lax.cond(flag, lambda a: (a @ a.T).sum(), lambda a: (a.T @ a).sum(), a)

    assert metrics.traced_flops(jax.jit(branchy), True, a) == 2 * 6 * 6 * 4


def test_an_unknown_flop_source_is_refused_by_name():
    config = ml_collections.ConfigDict({"perf": {"flops_from": "compiled"}})
    with pytest.raises(ValueError, match="perf.flops_from must be 'traced' or 'params', got 'compiled'"):
        trainer.step_flops(None, None, {}, config, tokens=1)
