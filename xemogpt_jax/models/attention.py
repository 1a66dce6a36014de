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
``jax.nn.dot_product_attention``: a row with no visible key attends uniformly (to the keys of its
block, in causal mode).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)  # what jax.nn.dot_product_attention fills
CAUSAL_BLOCK = 128  # query rows per block when the mask is causal (blocks skip the keys after their last row)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, *, causal: bool = False
) -> jax.Array:
    """``softmax(q k^T * scale, where mask) v``: q ``[B, T, N, D]``, k/v ``[B, S, K, D]``, mask ``[B, 1, T, S]``.

    ``N`` must be a multiple of ``K`` (query head ``n`` reads KV head ``n // (N / K)``, as in HF).
    ``causal=True`` promises that the mask hides every key after its query (``S == T``, no cache):
    the queries are then processed in blocks that skip the keys no row of theirs can see, about
    half the work at long lengths. Scores and softmax run in fp32; the output has q's dtype.
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads cannot share {k.shape[2]} KV heads evenly")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs as many keys as queries, got {k.shape[1]} and {q.shape[1]}")
    return _attention(q, k, v, mask, scale, causal)


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


def _query_blocks(queries: int, causal: bool) -> list[tuple[int, int]]:
    """Query row ranges computed apart: with a causal mask, rows ``[a, b)`` see only keys ``[0, b)``."""
    if not causal:
        return [(0, queries)]
    return [(start, min(start + CAUSAL_BLOCK, queries)) for start in range(0, queries, CAUSAL_BLOCK)]


def _forward(q, k, v, mask, scale, causal):
    """(output ``[B, K, G, T, D]``, per query block: exponentials ``[B, K, G, rows, keys]`` and row sums)."""
    grouped = _grouped(q * jnp.asarray(scale, q.dtype), k.shape[2])
    keys_t, values_t = _heads_first(k), _heads_first(v)
    outs, exponentials, totals = [], [], []
    for start, stop in _query_blocks(q.shape[1], causal):
        visible = stop if causal else k.shape[1]
        scores = jnp.einsum("bkgtd,bksd->bkgts", grouped[:, :, :, start:stop], keys_t[:, :, :visible],
                            preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, :, None, start:stop, :visible], scores, MASKED_SCORE)
        block = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        total = jnp.sum(block, axis=-1, keepdims=True)
        weighted = jnp.einsum("bkgts,bksd->bkgtd", block.astype(v.dtype), values_t[:, :, :visible],
                              preferred_element_type=jnp.float32)
        outs.append((weighted / total).astype(q.dtype))
        exponentials.append(block)
        totals.append(total)
    return jnp.concatenate(outs, axis=3), tuple(exponentials), tuple(totals)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, scale, causal):
    return _ungrouped(_forward(q, k, v, mask, scale, causal)[0])


def _attention_fwd(q, k, v, mask, scale, causal):
    out, exponentials, totals = _forward(q, k, v, mask, scale, causal)
    return _ungrouped(out), (q, k, v, out, exponentials, totals)


def _attention_bwd(scale, causal, residuals, out_grad):
    q, k, v, out, exponentials, totals = residuals
    grad, grouped_q = _grouped(out_grad, k.shape[2]), _grouped(q, k.shape[2])
    keys_t, values_t = _heads_first(k), _heads_first(v)
    # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O)
    row_dots = jnp.sum(grad.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    q_grads, k_grad_t, v_grad_t = [], 0.0, 0.0
    for (start, stop), block, total in zip(_query_blocks(q.shape[1], causal), exponentials, totals):
        visible = block.shape[-1]
        rows = slice(start, stop)
        inverse = 1.0 / total
        prob_grad = jnp.einsum("bkgtd,bksd->bkgts", grad[:, :, :, rows], values_t[:, :, :visible],
                               preferred_element_type=jnp.float32)
        score_grad = (block * inverse * (prob_grad - row_dots[:, :, :, rows])).astype(q.dtype)
        q_grads.append(jnp.einsum("bkgts,bksd->bkgtd", score_grad, keys_t[:, :, :visible],
                                  preferred_element_type=jnp.float32))
        # [D, G*rows] @ [G*rows, keys]: transposing the small operand keeps XLA from transposing the large one
        unseen = ((0, 0), (0, 0), (0, 0), (0, k.shape[1] - visible))
        k_grad_t += jnp.pad(jnp.matmul(_stacked_rows(grouped_q[:, :, :, rows]).swapaxes(-1, -2),
                                       _stacked_rows(score_grad), preferred_element_type=jnp.float32), unseen)
        weighted_grad = _stacked_rows((grad[:, :, :, rows] * inverse).astype(v.dtype)).swapaxes(-1, -2)
        v_grad_t += jnp.pad(jnp.matmul(weighted_grad, _stacked_rows(block.astype(v.dtype)),
                                       preferred_element_type=jnp.float32), unseen)
    return (
        _ungrouped(jnp.concatenate(q_grads, axis=3) * scale).astype(q.dtype),
        (k_grad_t * scale).transpose(0, 3, 1, 2).astype(k.dtype),
        v_grad_t.transpose(0, 3, 1, 2).astype(v.dtype),
        None,
    )


_attention.defvjp(_attention_fwd, _attention_bwd)
