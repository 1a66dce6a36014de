"""The hand-written attention backward equals autodiff through jax.nn.dot_product_attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xemogpt_jax.models import attention as attention_module
from xemogpt_jax.models.attention import attention


def _inputs(batch, queries, keys, heads, kv_heads, dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, out_weights = (
        jnp.asarray(rng.normal(size=shape), dtype)
        for shape in ((batch, queries, heads, dim), (batch, keys, kv_heads, dim), (batch, keys, kv_heads, dim),
                      (batch, queries, heads, dim))
    )
    lengths = rng.integers(1, keys + 1, size=batch)
    lengths[0] = keys
    valid = np.arange(keys)[None] < lengths[:, None]
    offset = keys - queries  # the queries are the last ones, as when decoding with a cache
    causal = np.arange(keys)[None, :] <= (offset + np.arange(queries))[:, None]
    mask = jnp.asarray((causal[None] & valid[:, None, :])[:, None])
    return q, k, v, mask, out_weights


def _reference(q, k, v, mask, scale):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


@pytest.mark.parametrize(
    "batch, queries, keys, heads, kv_heads, dim, causal",
    [(3, 17, 17, 4, 2, 8, False), (3, 17, 17, 4, 2, 8, True), (2, 9, 9, 3, 3, 16, True), (2, 5, 12, 6, 1, 8, False)],
    ids=["grouped", "grouped-causal-blocks", "one-head-per-kv-causal-blocks", "cache-shaped"],
)
def test_attention_and_its_gradients_match_dot_product_attention(
    monkeypatch, batch, queries, keys, heads, kv_heads, dim, causal
):
    monkeypatch.setattr(attention_module, "CAUSAL_BLOCK", 4)  # several blocks, the last one short
    q, k, v, mask, out_weights = _inputs(batch, queries, keys, heads, kv_heads, dim, jnp.float32)
    scale = dim**-0.5

    def ours_fn(q, k, v, mask, scale):
        return attention(q, k, v, mask, scale, causal=causal)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask, scale) * out_weights)

    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(ours_fn(q, k, v, mask, scale), _reference(q, k, v, mask, scale),
                                   rtol=1e-5, atol=1e-6)
        ours = jax.jit(jax.grad(loss(ours_fn), argnums=(0, 1, 2)))(q, k, v)
        reference = jax.jit(jax.grad(loss(_reference), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_a_row_with_no_visible_key_attends_uniformly():
    q, k, v, mask, _ = _inputs(1, 4, 4, 2, 1, 8, jnp.float32)
    mask = mask.at[:, :, 0].set(False)
    out = attention(q, k, v, mask, 8**-0.5)
    np.testing.assert_allclose(out[0, 0], jnp.broadcast_to(v[0].mean(axis=0), (2, 8)), rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, 8**-0.5)), argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_bf16_inputs_keep_their_dtype_and_stay_close_to_fp32():
    q, k, v, mask, out_weights = _inputs(2, 8, 8, 4, 2, 16, jnp.float32)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = attention(*low, mask, 0.25)
    grads = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, 0.25).astype(jnp.float32) * out_weights),
                     argnums=(0, 1, 2))(*low)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v, mask, 0.25), atol=5e-2)


def test_bad_shapes_are_refused_with_the_reason():
    q, k, v, mask, _ = _inputs(1, 4, 4, 3, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="3 query heads cannot share 2 KV heads"):
        attention(q, k, v, mask, 1.0)
    q, k, v, mask, _ = _inputs(1, 4, 6, 2, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="causal attention needs as many keys as queries, got 6 and 4"):
        attention(q, k, v, mask, 1.0, causal=True)
