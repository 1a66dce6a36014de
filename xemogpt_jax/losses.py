"""The training objectives of the three stages, as pure functions of arrays.

Everything here reduces over the arrays it is given; under ``jax.jit`` with a sharded batch those
arrays are the GLOBAL batch, so the contrastive losses see every pair across all devices and
processes (XLA inserts the gathers). All reductions are in fp32 whatever the compute dtype.

Stage 1: ``L = L_cva + l1 * L_ftd + l2 * L_mfm``; stage 2: ``L = L_caa``; stage 3: causal-LM
cross-entropy on target tokens. Shapes: ``B`` batch, ``T`` frames or tokens, ``D`` features.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from xemogpt_jax.models.layers import matmul
from xemogpt_jax.prompt import IGNORE_INDEX
from xemogpt_jax.sharding import constrain

CLIP_INIT_TEMPERATURE = 0.07
CLIP_MAX_LOGIT_SCALE = 100.0


def init_logit_scale(temperature: float = CLIP_INIT_TEMPERATURE) -> jax.Array:
    """CLIP's learnable log-scale parameter: ``log(1 / tau)``."""
    return jnp.asarray(math.log(1.0 / temperature), jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def info_nce(
    a: jax.Array, b: jax.Array, log_scale: jax.Array, max_scale: float = CLIP_MAX_LOGIT_SCALE
) -> jax.Array:
    """Symmetric InfoNCE over the batch on cosine similarities (CLIP's loss).

    ``a[i]`` and ``b[i]`` are a positive pair, every other row of the batch a negative. The scale
    ``exp(log_scale)`` (= 1/tau) is clipped at ``max_scale`` as CLIP does.
    """
    scale = jnp.minimum(jnp.exp(log_scale.astype(jnp.float32)), max_scale)
    logits = scale * l2_normalize(a) @ l2_normalize(b).T
    labels = jnp.arange(logits.shape[0])
    a_to_b = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1).mean()
    b_to_a = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0).mean()
    return 0.5 * (a_to_b + b_to_a)


def binary_cross_entropy_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean BCE, numerically stable for any logit."""
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    return jnp.mean(jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def shuffled_frame_order(key: jax.Array, batch: int, length: int) -> jax.Array:
    """``[B, T]`` int: an independent permutation of the frame axis per sample, never the identity.

    For frame temporal discrimination the permutation is applied to the RAW frame features, before
    the positional table is added (shuffling after it, as the release does, leaves nothing to
    discriminate). A draw that happens to be the identity is replaced by a shift by one.
    """
    order = jnp.argsort(jax.random.uniform(key, (batch, length)), axis=1)
    identity = jnp.arange(length)
    is_identity = jnp.all(order == identity, axis=1, keepdims=True)
    return jnp.where(is_identity, jnp.roll(identity, 1)[None, :], order)


def frame_temporal_discrimination(original_logits: jax.Array, shuffled_logits: jax.Array) -> jax.Array:
    """BCE with original order = 1 and shuffled order = 0, over both halves together."""
    logits = jnp.concatenate([original_logits.reshape(-1), shuffled_logits.reshape(-1)])
    labels = jnp.concatenate([jnp.ones(original_logits.size), jnp.zeros(shuffled_logits.size)])
    return binary_cross_entropy_with_logits(logits, labels)


def sample_frame_mask(key: jax.Array, shape: tuple[int, int], ratio: float = 0.5) -> jax.Array:
    """``[B, T]`` bool, True where a frame is masked (each frame independently with probability ``ratio``)."""
    return jax.random.bernoulli(key, ratio, shape)


def masked_frame_modeling(predicted: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """MSE over the masked frames only: mean over masked frames of the per-frame mean squared error.

    ``target`` is the frozen CLS feature (no gradient flows into it). Zero when nothing is masked.
    """
    error = predicted.astype(jnp.float32) - jax.lax.stop_gradient(target).astype(jnp.float32)
    per_frame = jnp.mean(jnp.square(error), -1)
    weights = mask.astype(jnp.float32)
    return jnp.sum(per_frame * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def causal_lm_cross_entropy(
    hidden: jax.Array, kernel: jax.Array, labels: jax.Array, chunk: int = 512, ignore_index: int = IGNORE_INDEX,
    unroll: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Causal-LM loss on target tokens from the final hidden states ``[B, T, D]`` and the output projection ``[D, V]``.

    ``labels[b, t]`` is the token position ``t`` must predict (pre-shifted, ``xemogpt_jax.prompt``'s
    convention), ``ignore_index`` where nothing is scored. Returns (mean loss over every target token of the
    global batch, number of target tokens), so logging can weight by tokens.

    The logits exist ``chunk`` positions at a time: whole, the ``[B, T, V]`` fp32 logits of a 151,936-token
    vocabulary are 1.2 GiB per 2048-token row, the largest buffer of a stage-3 step. Each chunk's gradient is
    taken in the same pass (as fused linear cross-entropy kernels do), so no logits are computed twice.
    ``unroll`` unrolls the loop over chunks (as ``model.unroll_layers`` does the layer scans, for cost compiles).
    """
    count = jnp.sum(labels != ignore_index)
    return _mean_target_nll(hidden, kernel, labels, chunk, ignore_index, unroll), count


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _mean_target_nll(hidden, kernel, labels, chunk, ignore_index, unroll):
    loss, _, _ = _chunked_nll(hidden, kernel, labels, chunk, ignore_index, unroll, grad_hidden=False,
                              grad_kernel=False)
    return loss


def _mean_target_nll_fwd(hidden, kernel, labels, chunk, ignore_index, unroll):
    loss, d_hidden, d_kernel = _chunked_nll(
        hidden.value, kernel.value, labels.value, chunk, ignore_index, unroll,
        grad_hidden=hidden.perturbed, grad_kernel=kernel.perturbed,
    )
    return loss, (d_hidden, d_kernel)


def _mean_target_nll_bwd(chunk, ignore_index, unroll, grads, g):
    d_hidden, d_kernel = grads
    scale = lambda d: None if d is None else (d * g).astype(d.dtype)  # noqa: E731
    return scale(d_hidden), scale(d_kernel), None


_mean_target_nll.defvjp(_mean_target_nll_fwd, _mean_target_nll_bwd, symbolic_zeros=True)


def _chunked_nll(
    hidden: jax.Array, kernel: jax.Array, labels: jax.Array, chunk: int, ignore_index: int, unroll: bool, *,
    grad_hidden: bool, grad_kernel: bool,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The mean target NLL and, as asked, its gradients for ``hidden`` and ``kernel``, a chunk of positions at a time
    (:func:`_position_chunks`)."""
    width, vocab = kernel.shape
    hidden_chunks, label_chunks, unchunk = _position_chunks(hidden, labels, chunk, ignore_index)
    weight = 1.0 / jnp.maximum(jnp.sum(labels != ignore_index), 1).astype(jnp.float32)
    kernel = constrain(kernel, (None, "vocab"))  # gathered once for every chunk

    def body(carry, chunk_xs):
        loss, d_kernel = carry
        h, target = chunk_xs
        logits = matmul(h, kernel).astype(jnp.float32)
        log_norm = jax.nn.logsumexp(logits, axis=-1)
        # the target's logit picked by comparison rather than a gather: its gradient is then elementwise
        is_target = target[..., None] == jnp.arange(vocab, dtype=target.dtype)
        token_weight = jnp.where(target != ignore_index, weight, 0.0)
        target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
        loss = loss + jnp.sum((log_norm - target_logit) * token_weight)
        if not (grad_hidden or grad_kernel):
            return (loss, d_kernel), None
        d_logits = ((jnp.exp(logits - log_norm[..., None]) - is_target) * token_weight[..., None]).astype(h.dtype)
        if grad_kernel:
            d_kernel = d_kernel + jnp.matmul(
                h.reshape(-1, width).T, d_logits.reshape(-1, vocab), preferred_element_type=jnp.float32
            )
        return (loss, d_kernel), matmul(d_logits, kernel.T) if grad_hidden else None

    d_kernel = jnp.zeros(kernel.shape, jnp.float32) if grad_kernel else None
    start = (jnp.zeros((), jnp.float32), d_kernel)
    (loss, d_kernel), d_hidden = jax.lax.scan(body, start, (hidden_chunks, label_chunks), unroll=unroll)
    return loss, None if d_hidden is None else unchunk(d_hidden), None if d_kernel is None else d_kernel.astype(
        kernel.dtype)


def _position_chunks(
    hidden: jax.Array, labels: jax.Array, chunk: int, ignore_index: int
) -> tuple[jax.Array, jax.Array, Callable[[jax.Array], jax.Array]]:
    """``[B, T, ...]`` hidden states and labels as ``ceil(T / chunk)`` equal chunks ``[P, B, T/P, ...]``, the last
    padded with ignored positions (a length bucket that ``chunk`` does not divide wastes at most a position per
    chunk), and the function that puts per-chunk results back as ``[B, T, ...]``."""
    batch, length = labels.shape
    pieces = -(-length // min(chunk, length))
    size = -(-length // pieces)
    pad = pieces * size - length
    by_chunk = lambda x: x.reshape(batch, pieces, size, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, pieces * size, *x.shape[3:])[:, :length]  # noqa: E731
    hidden_chunks = by_chunk(jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))))
    return hidden_chunks, by_chunk(jnp.pad(labels, ((0, 0), (0, pad)), constant_values=ignore_index)), unchunk


def target_logprobs(
    hidden: jax.Array, kernel: jax.Array, labels: jax.Array, chunk: int = 512, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """Each position's log-probability of its label ``[B, T]`` (0 where ``ignore_index``), from the final hidden
    states and the output projection, ``chunk`` positions at a time as the loss is: a scored continuation
    never holds the whole ``[B, T, V]`` logits."""
    hidden_chunks, label_chunks, unchunk = _position_chunks(hidden, labels, chunk, ignore_index)

    def body(_, chunk_xs):
        h, target = chunk_xs
        logits = matmul(h, kernel).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
        return None, jnp.where(target == ignore_index, 0.0, picked - jax.nn.logsumexp(logits, axis=-1))

    _, values = jax.lax.scan(body, None, (hidden_chunks, label_chunks))
    return unchunk(values)


def stage1_total(cva: jax.Array, ftd: jax.Array, mfm: jax.Array, ftd_weight: float, mfm_weight: float) -> jax.Array:
    """``L_cva + l1 * L_ftd + l2 * L_mfm``."""
    return cva + ftd_weight * ftd + mfm_weight * mfm
