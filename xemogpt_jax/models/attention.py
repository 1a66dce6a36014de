"""Grouped-query attention with a hand-written backward pass.

The ``[B, heads, T, S]`` score tensor is the one large thing attention touches; on CPU its
passes through memory, not the FLOPs, set the cost. Differentiating
``jax.nn.dot_product_attention`` reads and writes it about twice as often as needed: XLA
transposes it for the key and value gradients, broadcasts the softmax denominator to its full
size, and stores both the probabilities and the masked scores. Here the query heads of one KV
head are stacked into one ``[G*T, S]`` matrix per (batch, KV head), the softmax denominator is
applied to the ``[T, head_dim]`` side instead of the scores, and the key and value gradients are
computed transposed (``[head_dim, S]``), so the only tensors of that size are the scores, their
exponentials (kept for the backward pass) and the score gradient. Masked positions behave as in
``jax.nn.dot_product_attention``: a row with no visible key attends uniformly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)  # what jax.nn.dot_product_attention fills


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """``softmax(q k^T * scale, where mask) v``: q ``[B, T, N, D]``, k/v ``[B, S, K, D]``, mask ``[B, 1, T, S]``.

    ``N`` must be a multiple of ``K`` (query head ``n`` reads KV head ``n // (N / K)``, as in HF).
    Scores and softmax run in fp32; the output has q's dtype.
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads cannot share {k.shape[2]} KV heads evenly")
    return _attention(q, k, v, mask, scale)


def _grouped(x: jax.Array, num_kv: int) -> jax.Array:
    """``[B, T, N, D] -> [B, K, G, T, D]``: the ``G = N / K`` query heads of each KV head together."""
    b, t, n, d = x.shape
    return x.reshape(b, t, num_kv, n // num_kv, d).transpose(0, 2, 3, 1, 4)


def _ungrouped(x: jax.Array) -> jax.Array:
    b, k, g, t, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d)


def _heads_first(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)


def _stacked_rows(x: jax.Array) -> jax.Array:
    """``[B, K, G, T, X] -> [B, K, G*T, X]`` (a reshape: no data moves)."""
    b, k, g, t, rest = x.shape
    return x.reshape(b, k, g * t, rest)


def _forward(q, k, v, mask, scale):
    """(output ``[B, K, G, T, D]``, exponentials ``[B, K, G, T, S]``, their row sums ``[B, K, G, T, 1]``)."""
    grouped = _grouped(q * jnp.asarray(scale, q.dtype), k.shape[2])
    scores = jnp.einsum("bkgtd,bksd->bkgts", grouped, _heads_first(k), preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, MASKED_SCORE)
    exponentials = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    totals = jnp.sum(exponentials, axis=-1, keepdims=True)
    weighted = jnp.einsum("bkgts,bksd->bkgtd", exponentials.astype(v.dtype), _heads_first(v),
                          preferred_element_type=jnp.float32)
    return (weighted / totals).astype(q.dtype), exponentials, totals


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
    return _ungrouped(_forward(q, k, v, mask, scale)[0])


def _attention_fwd(q, k, v, mask, scale):
    out, exponentials, totals = _forward(q, k, v, mask, scale)
    return _ungrouped(out), (q, k, v, mask, out, exponentials, totals)


def _attention_bwd(scale, residuals, out_grad):
    q, k, v, mask, out, exponentials, totals = residuals
    grad = _grouped(out_grad, k.shape[2])
    inverse = 1.0 / totals
    # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O)
    row_dot = jnp.sum(grad.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    prob_grad = jnp.einsum("bkgtd,bksd->bkgts", grad, _heads_first(v), preferred_element_type=jnp.float32)
    score_grad = (exponentials * inverse * (prob_grad - row_dot)).astype(q.dtype)
    q_grad = jnp.einsum("bkgts,bksd->bkgtd", score_grad, _heads_first(k), preferred_element_type=jnp.float32)
    # [D, G*T] @ [G*T, S]: transposing the small operand here keeps XLA from transposing the large one
    k_grad_t = jnp.matmul(_stacked_rows(_grouped(q, k.shape[2])).swapaxes(-1, -2), _stacked_rows(score_grad),
                          preferred_element_type=jnp.float32)
    v_grad_t = jnp.matmul(_stacked_rows((grad * inverse).astype(v.dtype)).swapaxes(-1, -2),
                          _stacked_rows(exponentials.astype(v.dtype)), preferred_element_type=jnp.float32)
    return (
        _ungrouped(q_grad * scale).astype(q.dtype),
        (k_grad_t * scale).transpose(0, 3, 1, 2).astype(k.dtype),
        v_grad_t.transpose(0, 3, 1, 2).astype(v.dtype),
        None,
    )


_attention.defvjp(_attention_fwd, _attention_bwd)
