"""The inference programs ``xemogpt-aot --infer`` compiles: a full clip prompt's prefill, and one decode step.

Inference runs :func:`xemogpt_jax.generate.generate` on the prompt embeddings the model makes from a
clip (16 frames, the config's longest audio, the prompt text). What decides its memory and speed is two
programs: the prefill (encoders, bridges, the prompt through the LLM, filling the KV cache) and one decode
step (one token per row against the cache). A decode step is compiled at 1 row per clip (greedy) and at
``beams`` rows per clip (the release's 5-beam search: the clip's prompt slots shared by its beams, each beam's
own slots reordered by its parent).
The model is built abstractly, as the train step is: no weight is allocated.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

# Prompt text around the media tokens (template, instruction, subtitle): a generous allowance.
PROMPT_TEXT_TOKENS = 128
# The stage-3 batch fields a prompt needs (the collate's names; no labels at inference).
PROMPT_FIELDS = ("token_ids", "kind", "feature_index", "attention_mask", "pixel_values", "input_values", "audio_mask")
# one layer's cache buffers (KVCache's layout: keys transposed, as the score product reads them)
KEY_AXES = ("batch", "kv_heads", "head_dim", "length")
VALUE_AXES = ("batch", "kv_heads", "length", "head_dim")


@dataclasses.dataclass
class Program:
    """One jitted inference program and its abstract, sharded arguments."""

    name: str
    jitted: Any
    args: tuple[Any, ...]
    tokens: int  # tokens it processes per call (prompt positions x rows, or one per row)

    def lower(self) -> Any:
        return self.jitted.lower(*self.args)


def prompt_length(model_config: Any, buckets: tuple[int, ...]) -> int:
    """The length bucket a full clip's prompt falls in: video and longest-audio tokens plus the text allowance."""
    needed = model_config.num_frames + model_config.num_audio_tokens(model_config.max_audio_samples)
    needed += PROMPT_TEXT_TOKENS
    return next((b for b in sorted(buckets) if b >= needed), needed)


def build_programs(config: Any, mesh: Any, batch_size: int, seq_len: int | None, beams: int,
                   max_new_tokens: int) -> list[Program]:
    """Prefill of ``batch_size`` clips and decode steps at 1 and ``beams`` rows per clip, sharded over ``mesh``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from xemogpt_jax import generate, sharding, stages
    from xemogpt_jax.models.qwen3 import KVCache

    task = stages.task_for(config, SimpleNamespace(eos_token_id=1, pad_token_id=0))

    def build() -> Any:
        built = task.build_model(nnx.Rngs(config.seed))
        generate.prepare_for_decoding(built.llm, mesh.devices.flat[0].platform)  # as explainer.load does
        return built

    model = nnx.eval_shape(build)
    length = seq_len or prompt_length(model.config, tuple(config.data.length_buckets))
    graphdef, state = nnx.split(model)

    def place(variable: Any) -> Any:
        value = variable.get_value()
        return variable.replace(jax.ShapeDtypeStruct(value.shape, value.dtype,
                                                     sharding=sharding.variable_sharding(variable, mesh)))

    state = jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    fields = task.abstract_batch(batch_size, length)
    batch = {name: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding.batch_sharding(mesh, len(spec.shape)))
             for name, spec in fields.items() if name in PROMPT_FIELDS}
    length = batch["token_ids"].shape[1]

    @jax.jit
    def prefill(state: Any, batch: dict[str, Any]) -> tuple[jax.Array, KVCache]:
        xemogpt = nnx.merge(graphdef, state)
        embeds = xemogpt.input_embeddings(batch["token_ids"], batch["kind"], batch["feature_index"],
                                          frames=batch["pixel_values"], audio=batch["input_values"],
                                          audio_mask=batch["audio_mask"])
        return generate._prefill(xemogpt.llm, xemogpt.llm.layer_list(), None, embeds, batch["attention_mask"],
                                 max_new_tokens)

    llm = model.llm

    def placed(leaf: jax.ShapeDtypeStruct, spec: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    def laid_out(buffers: Any) -> Any:
        """A cache's (or its shared prompt's) keys, values and slot mask, sharded as the model's cache is."""
        keys, values = sharding.logical_to_spec(KEY_AXES), sharding.logical_to_spec(VALUE_AXES)
        return dataclasses.replace(buffers, k=tuple(placed(k, keys) for k in buffers.k),
                                   v=tuple(placed(v, values) for v in buffers.v),
                                   mask=placed(buffers.mask, sharding.batch_sharding(mesh, 2).spec))

    def cache_for(rows: int) -> KVCache:
        """Greedy: the prompt's slots and the generated ones per row; beams: the prompt once per clip, shared."""
        shared = rows > batch_size

        def empty() -> KVCache:
            if shared:
                return llm.init_cache(batch_size, length).share_prompt(rows // batch_size, max_new_tokens)
            return llm.init_cache(rows, length + max_new_tokens)

        cache = laid_out(jax.eval_shape(empty))
        return dataclasses.replace(cache, index=placed(cache.index, jax.sharding.PartitionSpec()),
                                   lengths=placed(cache.lengths, sharding.batch_sharding(mesh, 1).spec),
                                   prompt=laid_out(cache.prompt) if shared else None)

    def decode(state: Any, tokens: jax.Array, parents: jax.Array | None, cache: KVCache):
        if parents is not None:  # beam search: each beam continues its parent's generated slots
            cache = cache.take_rows(parents)
        llm = nnx.merge(graphdef, state).llm
        return generate._decode_step(llm, llm.layer_list(), tokens, cache)

    decode_step = jax.jit(decode, donate_argnums=(3,))
    programs = [Program(f"prefill ({batch_size} clips x {length} prompt positions)", prefill, (state, batch),
                        batch_size * length)]
    for k in sorted({1, beams}):
        rows = batch_size * k
        tokens = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1))
        parents = tokens if k > 1 else None
        what = (f"greedy ({rows} rows, cache of {length + max_new_tokens})" if k == 1 else
                f"{k} beams ({rows} rows, {max_new_tokens} own slots each, a {length}-slot prompt per clip)")
        programs.append(Program(f"decode step, {what}",
                                decode_step, (state, tokens, parents, cache_for(rows)), rows))
    return programs
