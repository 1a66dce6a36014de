"""The Qwen3 / Qwen2 / Qwen2.5 decoder-only language model in Flax NNX.

One module covers both families through the config: Qwen3 has per-head q/k RMSNorm and no
qkv bias, Qwen2/2.5 has qkv bias and no q/k norm. The decoder layers are stacked (created
with ``nnx.vmap``, applied with ``jax.lax.scan``) so a 36-layer model traces one layer; every
stacked parameter gets a leading ``"layers"`` logical axis.

Caching: :class:`KVCache` has a fixed number of slots. Each call writes its ``T`` tokens at
slots ``[index, index + T)`` for every row; a per-slot validity mask makes left padding,
right padding and ragged decode all the same case. RoPE positions default to the running
count of valid tokens per row, which is what HF computes from ``attention_mask``. A call with
a cache runs the layers one by one rather than scanned: each layer's keys and values live in
buffers of their own, laid out for the attention products, so a decode step updates them in
place and copies neither the cache nor a layer's weights out of their stacks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from xemogpt_jax.models import lora as lora_lib
from xemogpt_jax.models.attention import AttentionConfig, attention, cached_attention, dot_product_attention
from xemogpt_jax.models.layers import (
    QKV_PROJ,
    DType,
    Embed,
    Linear,
    RMSNorm,
    activation,
    default_init,
    matmul,
    remat_name,
    remat_policy,
)
from xemogpt_jax.models.stack import prefix_layers_axis, unstack_layers
from xemogpt_jax.sharding import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture plus run-time options (compute dtype, remat, LoRA); ``from_hf`` reads a HF config.json.

    Sizes have no defaults: published ones are presets (:mod:`xemogpt_jax.models.presets`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    model_type: str = "qwen3"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # run-time options, not part of the HF architecture
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"  # layers.REMAT_CHOICES; the old booleans read True = full, False = none
    attention: AttentionConfig = AttentionConfig()
    # Unroll the layer scan: no stacked-buffer initialisation and slicing (11% of an 8-layer, 512-wide
    # stage-3 step on 2 CPU cores); compile time grows with the depth.
    unroll_layers: bool = False
    lora: lora_lib.LoraConfig | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> Qwen3Config:
        """Build from a HF ``config.json`` dict (``qwen3`` or ``qwen2``); ``overrides`` set run-time options."""
        model_type = hf.get("model_type", "qwen3")
        if model_type not in ("qwen3", "qwen2"):
            raise ValueError(f"unsupported model_type {model_type!r}; expected 'qwen3' or 'qwen2'")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
        if hf.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        heads = hf["num_attention_heads"]
        is_qwen3 = model_type == "qwen3"
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qk_norm=is_qwen3,
            attention_bias=hf.get("attention_bias", False) if is_qwen3 else True,
            hidden_act=hf.get("hidden_act", "silu"),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        return cls(**fields, **overrides)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict for this architecture (inverse of :meth:`from_hf`)."""
        is_qwen3 = self.model_type == "qwen3"
        hf: dict[str, Any] = dict(
            architectures=["Qwen3ForCausalLM" if is_qwen3 else "Qwen2ForCausalLM"],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_sliding_window=False,
        )
        if is_qwen3:
            hf.update(head_dim=self.head_dim, attention_bias=self.attention_bias)
        return hf

    def __post_init__(self) -> None:
        object.__setattr__(self, "remat", remat_name(self.remat))

    def replace(self, **changes: Any) -> Qwen3Config:
        return dataclasses.replace(self, **changes)


def parse_dtype(name: str | Any) -> Any:
    """``"bfloat16"`` -> ``jnp.bfloat16``; dtypes pass through."""
    return _DTYPES[name] if isinstance(name, str) else name


@struct.dataclass
class SharedPrompt:
    """Prompt slots that groups of consecutive cache rows share (a row's beams): per layer, keys
    ``[P, KV, hd, L]`` and values ``[P, KV, L, hd]``; slot validity ``[P, L]``."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array


class LayerCache(NamedTuple):
    """What one layer's attention reads and writes in a cached forward: its keys and values (laid out as in
    :class:`KVCache`), the first slot to write, and its share of a shared prompt (or None)."""

    k: jax.Array
    v: jax.Array
    index: jax.Array
    prompt: tuple[jax.Array, jax.Array, jax.Array] | None


@struct.dataclass
class KVCache:
    """Per layer: keys ``[B, KV, hd, S]`` (transposed, as the score product reads them) and values
    ``[B, KV, S, hd]``; slot validity ``[B, S]``, next slot, valid tokens per row; with ``prompt``, slots
    every group of ``B / P`` rows sees before its own (see :meth:`share_prompt`)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array
    lengths: jax.Array
    prompt: SharedPrompt | None = None

    @property
    def size(self) -> int:
        return self.mask.shape[1]

    def share_prompt(self, group: int, slots: int) -> KVCache:
        """This filled cache as the shared prompt of ``group`` rows per row, each with ``slots`` empty slots.

        Beam search: a row's beams start from one prompt and differ only in what they generate, so the
        prompt is stored once per row rather than per beam, and reordering beams moves only their own slots.
        """
        if self.prompt is not None:
            raise ValueError("this cache already shares a prompt")
        rows, (heads, width) = self.mask.shape[0] * group, self.k[0].shape[1:3]
        return KVCache(
            k=tuple(jnp.zeros((rows, heads, width, slots), k.dtype) for k in self.k),
            v=tuple(jnp.zeros((rows, heads, slots, width), v.dtype) for v in self.v),
            mask=jnp.zeros((rows, slots), bool),
            index=jnp.zeros((), jnp.int32),
            lengths=jnp.repeat(self.lengths, group),
            prompt=SharedPrompt(self.k, self.v, self.mask),
        )

    def take_rows(self, rows: jax.Array) -> KVCache:
        """The cache of rows ``rows`` (beam search's reordering; each row keeps to its shared prompt's group)."""
        return KVCache(
            k=tuple(jnp.take(k, rows, axis=0) for k in self.k),
            v=tuple(jnp.take(v, rows, axis=0) for v in self.v),
            mask=jnp.take(self.mask, rows, axis=0),
            index=self.index,
            lengths=jnp.take(self.lengths, rows, axis=0),
            prompt=self.prompt,
        )

    def layer(self, layer: int) -> LayerCache:
        """Layer ``layer``'s buffers; its shared prompt as :func:`~xemogpt_jax.models.attention.cached_attention`
        takes it."""
        prompt = None if self.prompt is None else (self.prompt.k[layer], self.prompt.v[layer], self.prompt.mask)
        return LayerCache(self.k[layer], self.v[layer], self.index, prompt)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[B, T, hd]`` in fp32, laid out as HF's ``rotate_half`` expects."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, N, hd]``; cos/sin are cast to ``x``'s dtype first, as HF does."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def _dropout_key(key: jax.Array | None, salt: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, salt)


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k RMSNorm and qkv bias."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, h, kv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def proj(name: str, n_in: int, n_out: int, axes: tuple[str, str], bias: bool) -> Linear:
            return lora_lib.make_linear(
                name, n_in, n_out, axes=axes, use_bias=bias, lora=c.lora,
                dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs,
            )

        self.q_proj = proj("q_proj", d, h * hd, ("embed", "heads"), c.attention_bias)
        self.k_proj = proj("k_proj", d, kv * hd, ("embed", "kv_heads"), c.attention_bias)
        self.v_proj = proj("v_proj", d, kv * hd, ("embed", "kv_heads"), c.attention_bias)
        self.o_proj = proj("o_proj", h * hd, d, ("heads", "embed"), False)
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, eps=c.rms_norm_eps, param_dtype=c.param_dtype)
            self.k_norm = RMSNorm(hd, eps=c.rms_norm_eps, param_dtype=c.param_dtype)
        else:
            self.q_norm = None
            self.k_norm = None

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        attend: jax.Array,
        cached: LayerCache | None,
        dropout_key: jax.Array | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c = self.config
        b, t, _ = x.shape
        q = checkpoint_name(self.q_proj(x, dropout_key=_dropout_key(dropout_key, 0)), QKV_PROJ)
        k = checkpoint_name(self.k_proj(x, dropout_key=_dropout_key(dropout_key, 1)), QKV_PROJ)
        v = checkpoint_name(self.v_proj(x, dropout_key=_dropout_key(dropout_key, 2)), QKV_PROJ)
        q = q.reshape(b, t, c.num_attention_heads, c.head_dim)
        k = k.reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        updated = None
        impl = c.attention.resolved()
        if cached is not None:  # T queries against the cache's S slots, in its own layout, on every backend
            cache_k = jax.lax.dynamic_update_slice(cached.k, k.transpose(0, 2, 3, 1).astype(cached.k.dtype),
                                                   (0, 0, 0, cached.index))
            cache_v = jax.lax.dynamic_update_slice(cached.v, v.transpose(0, 2, 1, 3).astype(cached.v.dtype),
                                                   (0, 0, cached.index, 0))
            updated = (cache_k, cache_v)
            out = cached_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), attend, c.head_dim**-0.5,
                                   cached.prompt)
        elif impl == "blocked":
            out = attention(q, k, v, attend, c.head_dim**-0.5, causal=True)
        else:  # training / a cache-less forward: causal over the row's valid keys
            out = dot_product_attention(
                q, k, v, scale=c.head_dim**-0.5, config=c.attention, causal=True,
                key_mask=attend[:, 0, -1, :], mask=attend, where="llm",
            )
        out = out.reshape(b, t, c.num_attention_heads * c.head_dim)
        return self.o_proj(out, dropout_key=_dropout_key(dropout_key, 3)), updated


class MLP(nnx.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        c = config
        d, f = c.hidden_size, c.intermediate_size

        def proj(name: str, n_in: int, n_out: int, axes: tuple[str, str]) -> Linear:
            return lora_lib.make_linear(
                name, n_in, n_out, axes=axes, use_bias=False, lora=c.lora,
                dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs,
            )

        self.gate_proj = proj("gate_proj", d, f, ("embed", "mlp"))
        self.up_proj = proj("up_proj", d, f, ("embed", "mlp"))
        self.down_proj = proj("down_proj", f, d, ("mlp", "embed"))
        self.act = activation(c.hidden_act)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        gate = self.gate_proj(x, dropout_key=_dropout_key(dropout_key, 4))
        up = self.up_proj(x, dropout_key=_dropout_key(dropout_key, 5))
        hidden = constrain(self.act(gate) * up, ("batch", "length", "mlp"))
        return self.down_proj(hidden, dropout_key=_dropout_key(dropout_key, 6))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention then SwiGLU MLP."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=config.param_dtype)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, param_dtype=config.param_dtype
        )
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, cos, sin, attend, cached, dropout_key):
        attn, updated = self.self_attn(self.input_layernorm(x), cos, sin, attend, cached, dropout_key)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), dropout_key)
        return constrain(x, ("batch", "length", "embed")), updated


class Qwen3ForCausalLM(nnx.Module):
    """Token ids or input embeddings -> fp32 next-token logits; optionally through a :class:`KVCache`."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, rngs=rngs, param_dtype=config.param_dtype)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(layer_rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, rngs=layer_rngs)

        self.layers = make_layers(rngs)
        prefix_layers_axis(self.layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=config.param_dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                config.hidden_size, config.vocab_size, axes=("embed", "vocab"), use_bias=False,
                kernel_init=default_init, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs,
            )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings ``[B, T, D]`` in the compute dtype (what multimodal callers splice into).

        The (vocab, embed)-sharded table is gathered whole first, so the lookup runs on each device's
        own rows of batch-sharded ids; left to itself, XLA cannot partition a gather from a table
        sharded on the looked-up axis and rematerialises it in full.
        """
        table = constrain(self.embed_tokens.embedding[...], (None, None))
        ids = constrain(input_ids, ("batch", "length"))
        x = jnp.take(table, ids, axis=0).astype(self.config.dtype or table.dtype)
        return constrain(x, ("batch", "length", "embed"))

    def init_cache(self, batch_size: int, max_length: int, dtype: DType = None) -> KVCache:
        """An empty cache with ``max_length`` slots per row."""
        c = self.config
        kv, hd, dtype = c.num_key_value_heads, c.head_dim, dtype or c.dtype
        return KVCache(
            k=tuple(jnp.zeros((batch_size, kv, hd, max_length), dtype) for _ in range(c.num_hidden_layers)),
            v=tuple(jnp.zeros((batch_size, kv, max_length, hd), dtype) for _ in range(c.num_hidden_layers)),
            mask=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    def hidden_states(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        dropout_rng: jax.Array | None = None,
        layers: Sequence[DecoderLayer] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states ``[B, T, D]`` (and the updated cache when one is given; then ``layers``,
        when given, are :meth:`layer_list`'s)."""
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(c.dtype)
        b, t, _ = x.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            base = jnp.zeros((b,), jnp.int32)
            key_valid = valid
            query_slots = jnp.arange(t)
        else:
            base = cache.lengths
            key_valid = jax.lax.dynamic_update_slice(cache.mask, valid, (0, cache.index))
            query_slots = cache.index + jnp.arange(t)
        if positions is None:
            positions = base[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        key_slots = jnp.arange(key_valid.shape[1])
        attend = (key_slots[None, :] <= query_slots[:, None])[None] & key_valid[:, None, :]
        attend = attend[:, None]  # [B, 1, T, S] broadcast over heads
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        x = constrain(x, ("batch", "length", "embed"))

        layer_keys = (
            None if dropout_rng is None else jax.random.split(dropout_rng, c.num_hidden_layers)
        )
        if cache is not None:
            x, keys, values = self._cached_layers(x, cos, sin, attend, cache, layer_keys, layers)
            new_cache = KVCache(k=keys, v=values, mask=key_valid, index=cache.index + t,
                                lengths=cache.lengths + valid.sum(axis=1, dtype=jnp.int32), prompt=cache.prompt)
            return self.norm(x), new_cache

        if isinstance(self.layers, nnx.List):
            for i, layer in enumerate(self.layers):
                x, _ = layer(x, cos, sin, attend, None, None if layer_keys is None else layer_keys[i])
            return self.norm(x), None

        graphdef, layer_state = nnx.split(self.layers)

        def body(h, xs):
            state, key = xs
            h, _ = nnx.merge(graphdef, state)(h, cos, sin, attend, None, key)
            return h, None

        remat, policy = remat_policy(c.remat)
        if remat:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (layer_state, layer_keys), unroll=c.unroll_layers)
        return self.norm(x), None

    def unstack_layers(self) -> None:
        """Decoding's layout (:func:`~xemogpt_jax.models.stack.unstack_layers`): then :meth:`layer_list` copies
        nothing, and the layers run one after another instead of in a scan."""
        if not isinstance(self.layers, nnx.List):
            self.layers = unstack_layers(self.layers, self.config.num_hidden_layers)

    def layer_list(self) -> list[DecoderLayer]:
        """Each layer on its own: the unstacked layers, or their weights sliced out of the stacks.

        A decode loop slices them once, before its ``while_loop``: sliced inside, each step would copy
        every layer's weights out of the stacks again (XLA does not hoist those slices).
        """
        if isinstance(self.layers, nnx.List):
            return list(self.layers)
        graphdef, layer_state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], layer_state))
                for i in range(self.config.num_hidden_layers)]

    def _cached_layers(self, x, cos, sin, attend, cache: KVCache, layer_keys, layers):
        """The layers one after another, each on its own cache buffers (updated in place in a decode loop)."""
        keys, values = [], []
        for i, layer in enumerate(layers or self.layer_list()):
            key = None if layer_keys is None else layer_keys[i]
            x, (k, v) = layer(x, cos, sin, attend, cache.layer(i), key)
            keys.append(k)
            values.append(v)
        return x, tuple(keys), tuple(values)

    def output_kernel(self) -> jax.Array:
        """The vocabulary projection ``[D, V]`` in the compute dtype: the tied embedding transposed, or ``lm_head``."""
        kernel = self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return kernel.astype(self.config.dtype or kernel.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 vocabulary logits from final hidden states."""
        return matmul(hidden, self.output_kernel().astype(hidden.dtype)).astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        dropout_rng: jax.Array | None = None,
        layers: Sequence[DecoderLayer] | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """fp32 logits ``[B, T, V]``; with ``cache``, ``(logits, updated_cache)``.

        ``attention_mask`` [B, T] marks real tokens (1) and padding (0); ``positions`` default to
        the running count of real tokens. LoRA dropout is active only when ``dropout_rng`` is given.
        """
        hidden, new_cache = self.hidden_states(
            input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            positions=positions, cache=cache, dropout_rng=dropout_rng, layers=layers,
        )
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)
