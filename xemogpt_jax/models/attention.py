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

import dataclasses
import functools
import logging
import math

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


def cached_attention(
    q: jax.Array,
    keys_t: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    scale: float,
    prompt: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Queries ``[B, T, N, D]`` against a cache in its own layout: keys ``[B, K, D, S]``, values ``[B, K, S, D]``.

    Both products then read the cache as stored (no per-step transpose of it), and a decode step's
    ``T = 1`` makes the only relaid tensor the small query. ``mask [B, 1, T, S]``; fp32 scores and
    softmax, as :func:`attention` (forward only: nothing differentiates through a cache).

    ``prompt``: keys ``[P, K, D, L]``, values ``[P, K, L, D]`` and validity ``[P, L]`` of slots that each
    group of ``B / P`` consecutive rows shares and sees whole (beam search's prompt, read once per group
    rather than copied into every beam); one softmax runs over both.
    """
    grouped = _grouped(q * jnp.asarray(scale, q.dtype), keys_t.shape[1])
    scores = jnp.einsum("bkgtd,bkds->bkgts", grouped, keys_t, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, MASKED_SCORE)
    if prompt is not None:
        prompt_keys, prompt_values, prompt_mask = prompt
        shared_rows = _rows_by_prompt(grouped, prompt_mask.shape[0])  # [P, K, B/P*G*T, D]
        prompt_scores = jnp.einsum("pkqd,pkds->pkqs", shared_rows, prompt_keys.astype(q.dtype),
                                   preferred_element_type=jnp.float32)
        prompt_scores = jnp.where(prompt_mask[:, None, None], prompt_scores, MASKED_SCORE)
        scores = jnp.concatenate([_rows_by_cache(prompt_scores, scores.shape), scores], axis=-1)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights.astype(values.dtype)
    own = weights[..., weights.shape[-1] - values.shape[2]:]
    out = jnp.einsum("bkgts,bksd->bkgtd", own, values, preferred_element_type=jnp.float32)
    if prompt is not None:
        shared = _rows_by_prompt(weights[..., :prompt_mask.shape[1]], prompt_mask.shape[0])
        out = out + _rows_by_cache(jnp.einsum("pkqs,pksd->pkqd", shared, prompt_values.astype(values.dtype),
                                              preferred_element_type=jnp.float32), out.shape)
    return _ungrouped((out / total).astype(q.dtype))


def _rows_by_prompt(x: jax.Array, prompts: int) -> jax.Array:
    """``[B, K, G, T, X] -> [P, K, B/P*G*T, X]``: the rows sharing a prompt stacked per (prompt, KV head)."""
    b, k, g, t, width = x.shape
    return x.reshape(prompts, b // prompts, k, g * t, width).transpose(0, 2, 1, 3, 4).reshape(prompts, k, -1, width)


def _rows_by_cache(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`_rows_by_prompt`, to ``shape[:-1]`` plus ``x``'s last axis."""
    prompts, k, _, width = x.shape
    b, _, g, t = shape[:4]
    return x.reshape(prompts, k, b // prompts, g * t, width).transpose(0, 2, 1, 3, 4).reshape(b, k, g, t, width)


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


# --------------------------------------------------------------------------------------------------
# The one attention switch (``model.attention``) for the LLM and every encoder and bridge.

BACKENDS = ("auto", "blocked", "xla", "splash", "cudnn")
_LANES = 128  # splash blocks are multiples of this on TPU; shorter sequences use one block of this size


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Which attention runs, and the splash block sizes.

    ``impl``: ``auto`` (``splash`` on TPU, ``cudnn`` on GPU, ``blocked`` on CPU), ``blocked`` (this
    module's kernel for the LLM, the fp32 einsum of :class:`layers.SelfAttention` for the encoders:
    today's code, bit for bit), ``xla`` (``jax.nn.dot_product_attention(implementation=None)``),
    ``splash`` (the Pallas TPU kernel) or ``cudnn`` (``jax.nn.dot_product_attention(implementation=
    "cudnn")``; an error where cuDNN cannot run it, never a fallback). ``interpret`` runs splash in
    Pallas interpret mode (tests on CPU).
    """

    impl: str = "auto"
    block_q: int = 512
    block_kv: int = 512
    interpret: bool = False

    def __post_init__(self):
        if self.impl not in BACKENDS:
            raise ValueError(f"model.attention={self.impl!r}; expected one of {BACKENDS}")
        if self.block_q <= 0 or self.block_kv <= 0:
            raise ValueError(f"splash block sizes must be positive, got {self.block_q}, {self.block_kv}")

    def resolved(self, dtype: jnp.dtype | None = None) -> str:
        """The backend that runs on the default platform, for inputs of ``dtype`` (see :func:`backend_for`)."""
        return self.impl if self.impl != "auto" else backend_for(jax.default_backend(), dtype)


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's fused attention refuses float32 inputs


def backend_for(platform: str, dtype: jnp.dtype | None = None) -> str:
    """What ``auto`` runs on a platform (``tpu``, ``gpu``, ``cpu``).

    On a GPU that is ``cudnn`` for bf16/fp16 inputs (or an unknown dtype) and ``xla`` for float32, which
    cuDNN cannot run: an f32 model (``--dtype float32``) still works on a GPU, and the log says which ran.
    """
    if platform == "gpu":
        return "cudnn" if dtype is None or jnp.dtype(dtype) in CUDNN_DTYPES else "xla"
    return {"tpu": "splash"}.get(platform, "blocked")


def _log_choice(impl: str, where: str) -> None:
    # at trace time: once per compiled program, not per step
    logging.getLogger(__name__).info("attention: %s runs %s", where, impl)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    config: AttentionConfig,
    causal: bool = False,
    key_mask: jax.Array | None = None,
    mask: jax.Array | None = None,
    where: str = "attention",
) -> jax.Array:
    """The non-``blocked`` backends: q ``[B, T, N, D]``, k/v ``[B, S, K, D]`` (``N`` a multiple of ``K``).

    The visible keys of query ``t`` are ``key_mask [B, S]`` (all when ``None``), and with ``causal``
    only those at or before ``t`` (``S == T``). ``mask [B, 1, T, S]``, when given, is the same set
    spelled out, for the XLA path (splash and cuDNN build it from ``key_mask`` and ``causal``; cuDNN needs
    the valid keys first, see :func:`_valid_key_counts`).
    """
    impl = config.resolved(q.dtype)
    _log_choice(impl, where)
    if impl == "splash":
        return splash_attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask, config=config)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=_valid_key_counts(key_mask),
            implementation="cudnn",
        )
    if impl == "xla":
        if mask is None:
            mask = _dense_mask(key_mask, causal, q.shape[1], k.shape[1])
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=None)
    raise ValueError(f"dot_product_attention does not run {impl!r} (the blocked paths are the callers' own)")


def _valid_key_counts(key_mask: jax.Array | None) -> jax.Array | None:
    """cuDNN masks padding from each row's count of valid keys (no ``[B, 1, T, S]`` bias, none in the backward).

    A count says "the first n keys", which holds for every cache-less batch here: training, scoring and the
    encoders pad on the right (generation's left-padded prefill reads the KV cache instead). A row with
    no valid key gets one, so cuDNN never divides by an empty softmax; such a row is padding, and its
    output is masked where it is used, as with every other backend.
    """
    if key_mask is None:
        return None
    return jnp.maximum(jnp.sum(key_mask.astype(jnp.int32), axis=-1), 1)


def _dense_mask(key_mask, causal, queries, keys):
    if key_mask is None and not causal:
        return None
    allowed = jnp.ones((1, 1, queries, keys), bool)
    if causal:
        allowed = allowed & (jnp.arange(keys)[None, :] <= jnp.arange(queries)[:, None])[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.astype(bool)[:, None, None, :]
    return allowed


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    causal: bool,
    key_mask: jax.Array | None,
    config: AttentionConfig,
) -> jax.Array:
    """Splash attention (Pallas, TPU) over ``[B, T, N, D]`` queries and ``[B, S, K, D]`` keys/values.

    Key padding is given to the kernel as segment ids (queries id 1; keys 1 when valid, 0 when
    padding), so a packed batch later needs only other ids, no other kernel. Lengths are padded to
    a multiple of the block sizes here (padded keys get id 0, padded query rows are dropped).
    A query row that sees no key (every key padding, or in causal mode every key up to it) gives
    **zeros** (and passes no gradient), where ``jax.nn.dot_product_attention`` gives the mean of
    all values. Grouped-query heads run as one multi-query kernel per KV head. Under a mesh the
    kernel runs in ``shard_map``: batch over the ``batch`` rule's axes, heads over ``tensor``
    (each axis only where it divides the size).
    """
    b, t, n, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if n % kv_heads:
        raise ValueError(f"{n} query heads cannot share {kv_heads} KV heads evenly")
    if causal and s != t:
        raise ValueError(f"causal splash attention needs as many keys as queries, got {s} and {t}")
    key_valid = jnp.ones((b, s), bool) if key_mask is None else key_mask.astype(bool)
    if causal:
        sees_a_key = jnp.cumsum(key_valid, axis=1) > 0  # [B, T]: some valid key at or before t
    else:
        sees_a_key = jnp.broadcast_to(key_valid.any(axis=1, keepdims=True), (b, t))

    block_q = min(config.block_q, _round_up(t, _LANES))
    block_kv = min(config.block_kv, _round_up(s, _LANES))
    if causal:  # one padded length for both, so the causal diagonal stays where it was
        step = math.lcm(block_q, block_kv)
        tp = sp = _round_up(t, step)
    else:
        tp, sp = _round_up(t, block_q), _round_up(s, block_kv)
    q = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    q_ids = jnp.ones((b, tp), jnp.int32)
    kv_ids = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, sp - s)))

    # [B, T, N, D] -> [B, K, G, T, D] and [B, S, K, D] -> [B, K, S, D]
    q = q.reshape(b, tp, kv_heads, n // kv_heads, d).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    group = n // kv_heads
    blocks = _splash_blocks(block_q, block_kv)

    def run(q, k, v, q_ids, kv_ids):
        # ``make_splash_mqa`` is built inside the shard_map body: its mask info is per-shard static data
        head_mask = _splash.CausalMask((tp, sp)) if causal else _splash.FullMask((tp, sp))
        kernel = _splash.make_splash_mqa(
            _splash.MultiHeadMask([head_mask] * group), block_sizes=blocks, head_shards=1, q_seq_shards=1,
            interpret=config.interpret,
        )
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over KV heads
        per_example = lambda q, k, v, qi, ki: per_head(q, k, v, _splash.SegmentIds(q=qi, kv=ki))  # noqa: E731
        return jax.vmap(per_example)(q, k, v, q_ids, kv_ids)

    out = _sharded(run, q, k, v, q_ids, kv_ids)  # [B, K, G, Tp, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, d)[:, :t]
    return jnp.where(sees_a_key[:, :, None, None], out, jnp.zeros((), out.dtype))


class _SplashModules:
    """The Pallas splash modules, imported on first use (the CPU path never loads Pallas)."""

    def __getattr__(self, name):
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask

        for module in (splash_attention_kernel, splash_attention_mask):
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(name)


_splash = _SplashModules()


def _splash_blocks(block_q: int, block_kv: int):
    return _splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv,
    )


def _sharded(fn, q, k, v, q_ids, kv_ids):
    """``fn`` under ``shard_map`` when a mesh is active: batch over the batch axes, KV heads over ``tensor``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, q_ids, kv_ids)
    from jax.sharding import PartitionSpec as P

    from xemogpt_jax.sharding import LOGICAL_AXIS_RULES

    def fitting(axes, size):
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a in mesh.shape)
        kept = []
        for axis in axes:
            if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
                kept.append(axis)
        return tuple(kept) or None

    batch = fitting(LOGICAL_AXIS_RULES["batch"], q.shape[0])
    heads = fitting("tensor", q.shape[1])
    spec5, spec4, spec2 = P(batch, heads, None, None, None), P(batch, heads, None, None), P(batch, None)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(spec5, spec4, spec4, spec2, spec2), out_specs=spec5, check_vma=False
    )(q, k, v, q_ids, kv_ids)
