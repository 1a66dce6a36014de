"""Splash attention (Pallas, run here in interpret mode) against ``jax.nn.dot_product_attention``.

Interpret mode is slow, so the shapes are small: one 128 block plus a remainder (136 = 128 + 8 is
no multiple of the block, so the wrapper's padding runs every time). A fully padded query row
is zeros by splash's contract (``jax.nn.dot_product_attention`` would average all values there),
so the reference is zeroed on those rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xemogpt_jax.models.attention import AttentionConfig, splash_attention

SPLASH = AttentionConfig("splash", block_q=128, block_kv=128, interpret=True)
LENGTH = 136  # not a multiple of the 128 block


def _inputs(dtype, *, batch, heads, kv_heads, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((batch, LENGTH, heads, dim), (batch, LENGTH, kv_heads, dim), (batch, LENGTH, kv_heads, dim),
              (batch, LENGTH, heads, dim))
    return [jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes]


def _reference(q, k, v, key_mask, causal, scale):
    allowed = key_mask[:, None, None, :]
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((LENGTH, LENGTH), bool))[None, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale)
    sees = allowed.any(-1)[:, 0]  # [B, T]
    return jnp.where(sees[:, :, None, None], out, 0)


def _value_and_grads(fn, q, k, v, weights):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights.astype(jnp.float32))  # noqa: E731
    out = fn(q, k, v)
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _compare(key_mask, causal, dtype, tolerance, **shape):
    q, k, v, weights = _inputs(dtype, **shape)
    scale = 8**-0.5
    got = _value_and_grads(
        lambda q, k, v: splash_attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask, config=SPLASH),
        q, k, v, weights,
    )
    want = _value_and_grads(lambda q, k, v: _reference(q, k, v, key_mask, causal, scale), q, k, v, weights)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1])):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tolerance, rtol=tolerance, err_msg=name
        )


TOLERANCES = [pytest.param(jnp.float32, 1e-5, id="f32"), pytest.param(jnp.bfloat16, 2e-2, id="bf16")]


@pytest.mark.parametrize("dtype, tolerance", TOLERANCES)
def test_causal_grouped_query_with_padding(dtype, tolerance):
    """The LLM's case: causal, 4 query heads on 2 KV heads, one row right-padded, one left-padded."""
    positions = np.arange(LENGTH)
    key_mask = jnp.asarray(np.stack([positions < 100, positions >= 20]))  # left padding: rows 0-19 see no key
    _compare(key_mask, True, dtype, tolerance, batch=2, heads=4, kv_heads=2)


@pytest.mark.parametrize("dtype, tolerance", TOLERANCES)
def test_bidirectional_padded_keys_and_a_fully_padded_row(dtype, tolerance):
    """The encoders' case: key padding only; the third sample has no valid key at all (output zeros)."""
    positions = np.arange(LENGTH)
    key_mask = jnp.asarray(np.stack([positions < LENGTH, positions < 37, positions < 0]))
    _compare(key_mask, False, dtype, tolerance, batch=3, heads=2, kv_heads=2)
