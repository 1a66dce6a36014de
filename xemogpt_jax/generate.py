"""Text generation for :class:`Qwen3ForCausalLM`: greedy, temperature/top-p sampling and beam search.

One jitted function per (model graph, generation config): a prefill over the (left- or
right-padded) prompt fills a static-size :class:`KVCache`, then a ``while_loop`` decodes one
token per step. Prompts may be token ids or input embeddings (the multimodal model's path).
Beam search follows transformers' vectorised ``_beam_search`` step for step (2K candidates,
finished-hypothesis pool, length penalty, early-stop heuristic) so its best beams agree. With
``do_sample`` it is transformers' beam sampling: the beams' log-probs are divided by the temperature
and top-p filtered (keeping at least one non-EOS token), and the 2K candidates are drawn without
replacement from the softmax of the accumulated scores (Gumbel top-k) instead of taken greedily.
The beams of a row share one copy of the prompt's cache (:meth:`KVCache.share_prompt`), so a
step's beam reordering moves only the slots the beams generated, and attention reads the prompt
once per row, not once per beam.

With ``on_step``, greedy and sampled decoding hand each step's tokens to the host as they are
chosen (an ordered ``io_callback`` in the loop), so a server can stream while the batch decodes.
Beam search cannot: its best beam is known only at the end.

Alongside the tokens, every decoding mode returns the model's log-probability of each token it
emitted (log-softmax of the raw logits, before repetition penalty, temperature or top-p, so the
figure means the same whichever decoding chose the token and equals a teacher-forced score) and,
with ``top_logprobs = k``, the k most likely tokens at each step; beam search keeps both per beam
and returns the chosen beam's.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from xemogpt_jax.models.qwen3 import KVCache, Qwen3ForCausalLM

_NEG = -1.0e9


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding options; hashable so each distinct config compiles once. ``eos_token_id`` may be an int,
    a sequence or ``None`` (normalised to a tuple)."""

    max_new_tokens: int = 32
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    repetition_penalty: float = 1.0  # HF's, over the generated tokens (the prompt is embeddings)
    top_logprobs: int = 0  # alternatives per step in Generated.top_ids / top_logprobs

    def __post_init__(self):
        eos = self.eos_token_id
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else () if eos is None else (eos,)
        object.__setattr__(self, "eos_token_id", eos)


class Step(NamedTuple):
    """One decode step of every row, as ``on_step`` receives it (host arrays; rows already done carry pad / 0)."""

    index: int
    tokens: np.ndarray  # int32 [B]
    logprobs: np.ndarray  # float32 [B]
    top_ids: np.ndarray  # int32 [B, top_logprobs]
    top_logprobs: np.ndarray  # float32 [B, top_logprobs]


OnStep = Callable[[Step], None]
_listeners: dict[int, OnStep] = {}  # on_step by the id a running generation passes to its callbacks
_listener_ids = itertools.count()
_listeners_lock = threading.Lock()


class Generated(NamedTuple):
    """Decoded tokens with the model's log-probabilities; rows are ``pad`` / 0 after EOS."""

    tokens: jax.Array  # int32 [B, N]
    logprobs: jax.Array  # float32 [B, N]: log p(token) under the raw logits
    top_ids: jax.Array  # int32 [B, N, top_logprobs], most likely first
    top_logprobs: jax.Array  # float32 [B, N, top_logprobs]


def generate(
    model: Qwen3ForCausalLM,
    input_ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    config: GenerationConfig = GenerationConfig(),
    rng: jax.Array | None = None,
    on_step: OnStep | None = None,
) -> Generated:
    """New tokens ``[B, max_new_tokens]`` (the best beam with ``num_beams > 1``; ``pad`` after EOS), each with
    its log-probability and the step's top alternatives.

    ``on_step`` (greedy or sampling only) is called on the host with every step as it is decoded, in
    order, before this returns.
    """
    prompt = input_ids if inputs_embeds is None else inputs_embeds
    if attention_mask is None:
        attention_mask = jnp.ones(prompt.shape[:2], jnp.int32)
    if config.do_sample and rng is None:
        raise ValueError("sampling needs an rng key")
    rng = jax.random.key(0) if rng is None else rng
    if on_step is not None and config.num_beams > 1:
        raise ValueError("on_step needs num_beams == 1: beam search knows its best beam only at the end")
    graphdef, state = nnx.split(model)
    if on_step is None:
        return _generate_jit(graphdef, state, input_ids, inputs_embeds, attention_mask, rng, config, None)
    with _listeners_lock:
        listener = next(_listener_ids)
        _listeners[listener] = on_step
    try:
        out = _generate_jit(graphdef, state, input_ids, inputs_embeds, attention_mask, rng, config,
                            jnp.int32(listener))
        return jax.block_until_ready(out)
    finally:
        with _listeners_lock:
            del _listeners[listener]


# Platforms whose compiler copies the layers a decode loop slices out of the stacks before its while_loop, and
# holds the copies beside the weights (XLA's CPU plan: exactly the layers' bytes more). The TPU compiler slices
# them in place, and unstacked layers cost it more temporaries instead (docs/tpu.md). GPU: not yet measured.
UNSTACKED_DECODING_PLATFORMS = ("cpu",)


def prepare_for_decoding(model: Qwen3ForCausalLM, platform: str) -> None:
    """Unstack ``model``'s layers (:meth:`Qwen3ForCausalLM.unstack_layers`) where that saves a copy of them while
    decoding on ``platform``; elsewhere the stacks stay."""
    if platform in UNSTACKED_DECODING_PLATFORMS:
        model.unstack_layers()


def _deliver(listener, index, tokens, logprobs, top_ids, top_logprobs) -> None:
    with _listeners_lock:
        on_step = _listeners[int(listener)]
    on_step(Step(int(index), *(np.asarray(x) for x in (tokens, logprobs, top_ids, top_logprobs))))


@partial(jax.jit, static_argnums=(0, 6))
def _generate_jit(graphdef, state, input_ids, inputs_embeds, attention_mask, rng, config: GenerationConfig,
                  listener: jax.Array | None):
    model = nnx.merge(graphdef, state)
    layers = model.layer_list()  # sliced once, outside the decode loop
    beams = config.num_beams > 1  # the beams' own cache slots come with share_prompt
    logits, cache = _prefill(model, layers, input_ids, inputs_embeds, attention_mask,
                             0 if beams else config.max_new_tokens)
    step = partial(_decode_step, model, layers)
    if beams:
        return _beam_search(step, logits, cache, config, rng)
    return _sample_loop(step, logits, cache, rng, config, listener)


StepFn = Callable[[jax.Array, KVCache], tuple[jax.Array, KVCache]]  # last tokens [B], cache -> logits [B, V], cache


def _prefill(model, layers, input_ids, inputs_embeds, attention_mask, free_slots):
    """Run the prompt once; logits at each row's last real token and the filled cache (``free_slots`` more)."""
    prompt = input_ids if inputs_embeds is None else inputs_embeds
    batch, length = prompt.shape[:2]
    cache = model.init_cache(batch, length + free_slots)
    hidden, cache = model.hidden_states(
        input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, layers=layers
    )
    last = jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(length), 0), axis=1)
    hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return model.logits(hidden_last), cache


def _decode_step(model, layers, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    logits, cache = model(tokens[:, None], attention_mask=jnp.ones((tokens.shape[0], 1), jnp.int32), cache=cache,
                          layers=layers)
    return logits[:, 0], cache


def _is_eos(tokens: jax.Array, config: GenerationConfig) -> jax.Array:
    hit = jnp.zeros(tokens.shape, bool)
    for eos in config.eos_token_id:
        hit = hit | (tokens == eos)
    return hit


def top_p_filter(logits: jax.Array, top_p: float, min_tokens_to_keep: int = 1) -> jax.Array:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (HF ``TopPLogitsWarper``)."""
    sorted_logits = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1.0 - top_p
    remove_sorted = remove_sorted.at[..., -min_tokens_to_keep:].set(False)
    threshold = jnp.min(jnp.where(remove_sorted, jnp.inf, sorted_logits), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def repetition_penalize(scores: jax.Array, generated: jax.Array, step: jax.Array, penalty: float) -> jax.Array:
    """HF ``RepetitionPenaltyLogitsProcessor`` over ``generated[:, :step]``: seen tokens' scores / penalty if
    positive, * penalty if negative."""
    if penalty == 1.0:
        return scores
    rows, vocab = scores.shape
    tokens = jnp.where(jnp.arange(generated.shape[1]) < step, generated, vocab)
    seen = jnp.zeros((rows, vocab), bool).at[jnp.arange(rows)[:, None], tokens].set(True, mode="drop")
    return jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def _log_probs_and_top(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw log-softmax ``[..., V]`` and its top ``k`` (ids, values) ``[..., k]``."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if k == 0:
        empty = log_probs[..., :0]
        return log_probs, empty.astype(jnp.int32), empty
    values, ids = jax.lax.top_k(log_probs, k)
    return log_probs, ids.astype(jnp.int32), values


def _choose(logits: jax.Array, key: jax.Array, config: GenerationConfig) -> jax.Array:
    if not config.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / config.temperature
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _sample_loop(step_fn: StepFn, logits, cache, rng, config: GenerationConfig, listener) -> Generated:
    """Greedy or sampled decoding; stops early once every row has produced EOS. With a ``listener`` id, each
    step's tokens and log-probs also go to the host as they are chosen."""
    batch = logits.shape[0]
    n, k = config.max_new_tokens, config.top_logprobs
    out = Generated(
        tokens=jnp.full((batch, n), config.pad_token_id, jnp.int32),
        logprobs=jnp.zeros((batch, n), jnp.float32),
        top_ids=jnp.zeros((batch, n, k), jnp.int32),
        top_logprobs=jnp.zeros((batch, n, k), jnp.float32),
    )

    def record(out: Generated, step, logits, chosen, done) -> Generated:
        """Write step ``step``'s token and log-probs (zeros on rows already done)."""
        log_probs, top_ids, top_values = _log_probs_and_top(logits, k)
        chosen_lp = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
        live = ~done
        values = (chosen, jnp.where(live, chosen_lp, 0.0), jnp.where(live[:, None], top_ids, 0),
                  jnp.where(live[:, None], top_values, 0.0))
        if listener is not None:
            io_callback(_deliver, None, listener, step, *values, ordered=True)
        return Generated(*(
            jax.lax.dynamic_update_slice(field, value[:, None], (0, step) + (0,) * (value.ndim - 1))
            for field, value in zip(out, values)
        ))

    first = _choose(logits, jax.random.fold_in(rng, 0), config)
    out = record(out, 0, logits, first, jnp.zeros((batch,), bool))
    done = _is_eos(first, config)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < n) & ~jnp.all(done)

    def body(carry):
        step, out, tokens, done, cache = carry
        logits, cache = step_fn(tokens, cache)
        penalized = repetition_penalize(logits, out.tokens, step, config.repetition_penalty)
        chosen = _choose(penalized, jax.random.fold_in(rng, step), config)
        chosen = jnp.where(done, config.pad_token_id, chosen)
        out = record(out, step, logits, chosen, done)
        return step + 1, out, chosen, done | _is_eos(chosen, config), cache

    _, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, first, done, cache))
    return out


def _gather_beams(x: jax.Array, indices: jax.Array) -> jax.Array:
    """``x[b, indices[b, j], ...]`` for ``x [B, K, ...]`` and ``indices [B, J]``."""
    idx = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _beam_log_probs(
    logits: jax.Array, config: GenerationConfig, generated: jax.Array | None = None, step: jax.Array | int = 0
) -> jax.Array:
    """Next-token scores of the beams: log-softmax, repetition penalty over ``generated[:, :step]``, then
    (sampling only) temperature and top-p, as HF orders them."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if generated is not None:
        log_probs = repetition_penalize(log_probs, generated, step, config.repetition_penalty)
    if not config.do_sample:
        return log_probs
    log_probs = log_probs / config.temperature
    if config.top_p < 1.0:
        log_probs = top_p_filter(log_probs, config.top_p, min_tokens_to_keep=max(1, len(config.eos_token_id)) + 1)
    return log_probs


def _top_candidates(accumulated: jax.Array, keep: int, key: jax.Array, config: GenerationConfig):
    """The ``keep`` best (or, sampling, drawn without replacement) candidates, scores descending."""
    if not config.do_sample:
        return jax.lax.top_k(accumulated, keep)
    _, drawn = jax.lax.top_k(accumulated + jax.random.gumbel(key, accumulated.shape), keep)
    scores = jnp.take_along_axis(accumulated, drawn, axis=1)
    order = jnp.argsort(-scores, axis=1, stable=True)
    return jnp.take_along_axis(scores, order, axis=1), jnp.take_along_axis(drawn, order, axis=1)


def _set_step(trace: jax.Array, values: jax.Array, step) -> jax.Array:
    """``trace[:, :, step] = values`` for a per-beam trace ``[B, J, N, ...]`` and values ``[B, J, ...]``."""
    return jax.lax.dynamic_update_slice(trace, values[:, :, None], (0, 0, step) + (0,) * (values.ndim - 2))


def _beam_search(step_fn: StepFn, logits, cache, config: GenerationConfig, rng: jax.Array) -> Generated:
    """transformers' beam search over ``K = num_beams`` beams per row; returns each row's best finished beam.

    Each beam also carries a trace (its tokens' raw log-probs and top alternatives) that follows
    it through the same gathers as its token sequence.
    """
    batch, vocab = logits.shape
    k, n, top = config.num_beams, config.max_new_tokens, config.top_logprobs
    keep = max(2, 1 + len(config.eos_token_id)) * k
    top_k_mask = jnp.arange(keep) < k
    cache = cache.share_prompt(k, n)
    log_probs = jnp.repeat(_beam_log_probs(logits, config)[:, None], k, axis=1)
    raw = tuple(jnp.repeat(x[:, None], k, axis=1) for x in _log_probs_and_top(logits, top))

    def empty_trace() -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jnp.zeros((batch, k, n), jnp.float32), jnp.zeros((batch, k, n, top), jnp.int32),
                jnp.zeros((batch, k, n, top), jnp.float32))

    state = dict(
        running_trace=empty_trace(),
        trace=empty_trace(),
        running_seq=jnp.full((batch, k, n), config.pad_token_id, jnp.int32),
        running_scores=jnp.zeros((batch, k)).at[:, 1:].set(_NEG),
        seqs=jnp.full((batch, k, n), config.pad_token_id, jnp.int32),
        scores=jnp.full((batch, k), _NEG),
        finished=jnp.zeros((batch, k), bool),
        unsatisfied=jnp.ones((batch, 1), bool),
    )

    def select(step, log_probs, raw, s):
        """One beam step given the next-token scores of the running beams (and their raw log-softmax with its
        top alternatives, for the traces); returns parents too."""
        accumulated = (log_probs + s["running_scores"][:, :, None]).reshape(batch, k * vocab)
        topk_scores, topk_idx = _top_candidates(accumulated, keep, jax.random.fold_in(rng, step), config)
        parents, tokens = topk_idx // vocab, (topk_idx % vocab).astype(jnp.int32)
        topk_seq = _set_step(_gather_beams(s["running_seq"], parents), tokens, step)
        raw_log_probs, top_ids, top_values = raw
        step_values = (jnp.take_along_axis(raw_log_probs.reshape(batch, k * vocab), topk_idx, axis=1),
                       _gather_beams(top_ids, parents), _gather_beams(top_values, parents))
        topk_trace = tuple(_set_step(_gather_beams(t, parents), v, step)
                           for t, v in zip(s["running_trace"], step_values))
        hits = _is_eos(tokens, config) | (step + 1 >= n)

        running_candidates = topk_scores + hits.astype(jnp.float32) * _NEG
        _, next_idx = jax.lax.top_k(running_candidates, k)
        running_seq = _gather_beams(topk_seq, next_idx)
        running_trace = tuple(_gather_beams(t, next_idx) for t in topk_trace)
        running_scores = _gather_beams(running_candidates, next_idx)
        next_parents = _gather_beams(parents, next_idx)

        just_finished = hits & top_k_mask[None, :]
        final = topk_scores / ((step + 1.0) ** config.length_penalty)
        if config.early_stopping:
            final = final + jnp.all(s["finished"], axis=-1, keepdims=True).astype(jnp.float32) * _NEG
        final = final + (~s["unsatisfied"]).astype(jnp.float32) * _NEG
        final = final + (~just_finished).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([s["scores"], final], axis=1)
        _, best = jax.lax.top_k(merged_scores, k)
        seqs = _gather_beams(jnp.concatenate([s["seqs"], topk_seq], axis=1), best)
        trace = tuple(_gather_beams(jnp.concatenate([f, t], axis=1), best) for f, t in zip(s["trace"], topk_trace))
        finished = _gather_beams(jnp.concatenate([s["finished"], just_finished], axis=1), best)
        scores = _gather_beams(merged_scores, best)

        best_running = running_scores[:, :1] / ((step + 1.0) ** config.length_penalty)
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
        unsatisfied = s["unsatisfied"] & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        new = dict(
            running_trace=running_trace, trace=trace, running_seq=running_seq, running_scores=running_scores,
            seqs=seqs, scores=scores, finished=finished, unsatisfied=unsatisfied,
        )
        return new, next_parents, running_seq[:, :, step]

    def still_running(s, step):
        exists_open = ~(jnp.all(s["finished"]) & config.early_stopping)
        return (step < n) & jnp.any(s["unsatisfied"]) & exists_open

    state, parents, tokens = select(0, log_probs, raw, state)

    def cond(carry):
        step, s, _, _, _ = carry
        return still_running(s, step)

    def body(carry):
        step, s, parents, tokens, cache = carry
        flat_parents = (parents + jnp.arange(batch)[:, None] * k).reshape(-1)
        cache = cache.take_rows(flat_parents)
        logits, cache = step_fn(tokens.reshape(-1), cache)
        generated = s["running_seq"].reshape(batch * k, n)
        log_probs = _beam_log_probs(logits, config, generated, step).reshape(batch, k, vocab)
        raw = tuple(x.reshape(batch, k, *x.shape[1:]) for x in _log_probs_and_top(logits, top))
        s, parents, tokens = select(step, log_probs, raw, s)
        return step + 1, s, parents, tokens, cache

    _, state, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, parents, tokens, cache))
    logprobs, top_ids, top_values = (t[:, 0] for t in state["trace"])
    return Generated(state["seqs"][:, 0], logprobs, top_ids, top_values)
