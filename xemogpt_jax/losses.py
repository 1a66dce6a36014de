"""The training objectives of the three stages, as pure functions of arrays.

Everything here reduces over the arrays it is given; under ``jax.jit`` with a sharded batch those
arrays are the GLOBAL batch, so the contrastive losses see every pair across all devices and
processes (XLA inserts the gathers). All reductions are in fp32 whatever the compute dtype.

Stage 1: ``L = L_cva + l1 * L_ftd + l2 * L_mfm``; stage 2: ``L = L_caa``; stage 3: causal-LM
cross-entropy on target tokens. Shapes: ``B`` batch, ``T`` frames or tokens, ``D`` features.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from xemogpt_jax.prompt import IGNORE_INDEX

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
    logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> tuple[jax.Array, jax.Array]:
    """Causal-LM loss on target tokens with pre-shifted labels (``xemogpt_jax.prompt``'s convention).

    ``labels[b, t]`` is the token the logits at position ``t`` must predict, ``ignore_index`` where
    nothing is scored (condition, feature slots, padding). Returns (mean loss over every target token
    of the global batch, number of target tokens), so logging can weight by tokens.
    """
    weights = (labels != ignore_index).astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    # logsumexp minus the target's logit, picked by comparison rather than a gather: the backward is
    # then elementwise (softmax - one-hot) instead of a scatter into a zeroed [B, L, V] array.
    is_target = labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    token_nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    count = jnp.sum(weights)
    return jnp.sum(token_nll * weights) / jnp.maximum(count, 1.0), count


def stage1_total(cva: jax.Array, ftd: jax.Array, mfm: jax.Array, ftd_weight: float, mfm_weight: float) -> jax.Array:
    """``L_cva + l1 * L_ftd + l2 * L_mfm``."""
    return cva + ftd_weight * ftd + mfm_weight * mfm
