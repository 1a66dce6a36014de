"""BERT encoder (HF ``BertModel``) in Flax NNX: the backbone of the sentence encoders.

EmoCue-360 embeds cues with all-MiniLM-L6-v2 and the audio bridge's text side uses LaBSE; both
are plain post-norm BERT encoders with absolute positions, so one module covers them. Parameter
names follow HF's module tree closely so ``bert_params`` stays a readable table.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xemogpt_jax.models.attention import AttentionConfig
from xemogpt_jax.models.layers import DType, Embed, LayerNorm, Linear, SelfAttention, activation, key_mask_bias
from xemogpt_jax.sharding import constrain


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    attention: AttentionConfig = AttentionConfig()  # run-time option, not part of the HF architecture

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> BertConfig:
        """Our config from a HF ``config.json`` dict; refuses what the port does not implement."""
        if config.get("model_type", "bert") != "bert":
            raise ValueError(f"model_type={config['model_type']!r} is not a BERT encoder; this port runs BERT only")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type={position_type!r} is not supported (only 'absolute')")
        if config.get("is_decoder", False) or config.get("add_cross_attention", False):
            raise ValueError("decoder / cross-attention BERT variants are not supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def head_dim(self) -> int:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        return self.hidden_size // self.num_attention_heads


class BertEmbeddings(nnx.Module):
    """word + absolute position + token type, then LayerNorm."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.word = Embed(config.vocab_size, d, rngs=rngs, axes=("vocab", "embed"))
        self.position = Embed(config.max_position_embeddings, d, rngs=rngs, axes=(None, "embed"))
        self.token_type = Embed(config.type_vocab_size, d, rngs=rngs, axes=(None, "embed"))
        self.norm = LayerNorm(d, eps=config.layer_norm_eps)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, dtype: DType) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.word(input_ids, jnp.float32) + self.position(positions, jnp.float32)
        x = x + self.token_type(token_type_ids, jnp.float32)
        return self.norm(x).astype(dtype)


class BertLayer(nnx.Module):
    """Post-norm block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: DType = None):
        d, f = config.hidden_size, config.intermediate_size
        self.attention = SelfAttention(
            config.hidden_size, config.num_attention_heads, rngs=rngs, dtype=dtype, attention=config.attention
        )
        self.attention_norm = LayerNorm(d, eps=config.layer_norm_eps)
        self.intermediate = Linear(d, f, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.output = Linear(f, d, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.output_norm = LayerNorm(d, eps=config.layer_norm_eps)
        self.act = activation(config.hidden_act)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = self.attention_norm(x + self.attention(x, key_mask_bias(key_mask)))
        x = self.output_norm(x + self.output(self.act(self.intermediate(x))))
        return constrain(x, ("batch", "length", "embed"))


class BertModel(nnx.Module):
    """``BertModel`` forward: returns (last_hidden_state [B,T,D], pooler_output [B,D] or None)."""

    def __init__(
        self,
        config: BertConfig,
        *,
        rngs: nnx.Rngs,
        add_pooling_layer: bool = True,
        dtype: DType = jnp.float32,
    ):
        self.config = config
        self.dtype = dtype
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.layers = nnx.List([BertLayer(config, rngs=rngs, dtype=dtype) for _ in range(config.num_hidden_layers)])
        d = config.hidden_size
        self.pooler = Linear(d, d, axes=("embed", None), rngs=rngs, dtype=dtype) if add_pooling_layer else None

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} > {self.config.max_position_embeddings} positions")
        key_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.embeddings(input_ids, token_type_ids, self.dtype)
        for layer in self.layers:
            x = layer(x, key_mask)
        pooled = jnp.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return x, pooled
