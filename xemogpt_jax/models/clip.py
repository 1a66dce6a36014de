"""CLIP (vision and text towers, projections) in Flax NNX, numerically equal to HF transformers' CLIPModel.

XEmoGPT uses the vision tower frozen, taking per frame the CLS token of the last hidden state
*before* the post-layernorm, and the text tower + projection as the text side of the video
alignment loss. ``CLIPEncoderLayer`` is also the building block of the video cue bridge.

Images enter as NHWC float32 ``[N, H, W, 3]``, already normalised (see
``xemogpt_jax.preprocessing.image``). Attribute names follow HF so ``clip_params`` maps keys
almost one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, NamedTuple, Self

import jax
import jax.numpy as jnp
from flax import nnx

from xemogpt_jax.models.attention import AttentionConfig
from xemogpt_jax.models.layers import (
    DType,
    Embed,
    LayerNorm,
    Linear,
    SelfAttention,
    activation,
    default_init,
    param,
)
from xemogpt_jax.models.stack import scan_layers, stack_layers
from xemogpt_jax.sharding import constrain

HIDDEN_AXES = ("batch", "length", "embed")


def _known_fields(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in config.items() if k in names}


@dataclass(frozen=True)
class CLIPEncoderConfig:
    """What one pre-LN transformer layer needs; shared by both towers and the video cue bridge."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention: AttentionConfig = AttentionConfig()  # run-time option, not part of the HF architecture
    remat: str = "none"  # run-time option: layers.REMAT_CHOICES, per encoder layer
    unroll_layers: bool = False  # run-time option: unroll the layer scan (the compiler then costs every layer)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> Self:
        """Build from a HF config dict, ignoring keys this port does not use."""
        return cls(**_known_fields(cls, config))


@dataclass(frozen=True)
class CLIPVisionConfig(CLIPEncoderConfig):
    """HF ``CLIPVisionConfig`` fields the ViT uses (defaults are HF's)."""

    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class CLIPTextConfig(CLIPEncoderConfig):
    """HF ``CLIPTextConfig`` fields the text tower uses; ``eos_token_id == 2`` selects HF's legacy pooling."""

    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> Self:
        if not isinstance(config.get("eos_token_id", cls.eos_token_id), int):
            raise ValueError(f"CLIP text eos_token_id must be one int, got {config['eos_token_id']!r}")
        return super().from_hf(config)


@dataclass(frozen=True)
class CLIPConfig:
    """HF ``CLIPConfig``: both towers and the shared projection width."""

    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> CLIPConfig:
        """From a HF ``CLIPModel`` config.json (``text_config`` / ``vision_config`` sub-dicts)."""
        return cls(
            text=CLIPTextConfig.from_hf(config.get("text_config") or {}),
            vision=CLIPVisionConfig.from_hf(config.get("vision_config") or {}),
            projection_dim=config.get("projection_dim", cls.projection_dim),
            logit_scale_init_value=config.get("logit_scale_init_value", cls.logit_scale_init_value),
        )


class CLIPMLP(nnx.Module):
    def __init__(
        self, config: CLIPEncoderConfig, *, rngs: nnx.Rngs, dtype: DType = None, param_dtype: DType = jnp.float32
    ):
        kwargs = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, axes=("embed", "mlp"), **kwargs)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, axes=("mlp", "embed"), **kwargs)
        self.act = activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN layer: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(
        self, config: CLIPEncoderConfig, *, rngs: nnx.Rngs, dtype: DType = None, param_dtype: DType = jnp.float32
    ):
        kwargs = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = SelfAttention(
            config.hidden_size, config.num_attention_heads, attention=config.attention, **kwargs
        )
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = CLIPMLP(config, **kwargs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, attention_bias: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), attention_bias)
        x = x + self.mlp(self.layer_norm2(x))
        return constrain(x, HIDDEN_AXES)


class CLIPEncoder(nnx.Module):
    """``num_hidden_layers`` encoder layers, stacked and scanned (the compiler traces one layer)."""

    def __init__(
        self, config: CLIPEncoderConfig, *, rngs: nnx.Rngs, dtype: DType = None, param_dtype: DType = jnp.float32
    ):
        self.layers = stack_layers(
            lambda layer_rngs: CLIPEncoderLayer(config, rngs=layer_rngs, dtype=dtype, param_dtype=param_dtype),
            config.num_hidden_layers, rngs,
        )
        self.remat = config.remat
        self.unroll = config.unroll_layers

    def __call__(self, x: jax.Array, attention_bias: jax.Array | None = None) -> jax.Array:
        return scan_layers(self.layers, x, attention_bias, remat=self.remat, unroll=self.unroll)


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: jax.Array  # [N, 1 + patches, D], no post-layernorm (as HF)
    pooler_output: jax.Array  # [N, D]: post_layernorm(CLS)

    @property
    def cls_token(self) -> jax.Array:
        """[N, D]: the CLS token before the post-layernorm, XEmoGPT's per-frame feature."""
        return self.last_hidden_state[:, 0]


class CLIPVisionEmbeddings(nnx.Module):
    """Non-overlapping patch projection (a stride-p convolution as one matmul), CLS token, positions."""

    def __init__(
        self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: DType = None, param_dtype: DType = jnp.float32
    ):
        p, width = config.patch_size, config.hidden_size
        patch_shape = (p, p, config.num_channels, width)
        patch_axes = ("kernel", "kernel", "conv_in", "embed")
        self.patch_kernel = param(rngs, default_init, patch_shape, patch_axes, param_dtype)
        self.class_embedding = param(rngs, default_init, (width,), ("embed",), param_dtype)
        self.position_embedding = Embed(
            config.num_patches + 1, width, rngs=rngs, axes=("length", "embed"), param_dtype=param_dtype
        )
        self.config = config
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        n, height, width, channels = pixel_values.shape
        size, p = self.config.image_size, self.config.patch_size
        if (height, width) != (size, size):
            raise ValueError(f"image size {height}x{width} does not match the model's {size}x{size}")
        dtype = self.dtype or self.patch_kernel[...].dtype
        grid = size // p
        patches = pixel_values.astype(dtype).reshape(n, grid, p, grid, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, grid * grid, p * p * channels)
        tokens = jnp.matmul(patches, self.patch_kernel[...].astype(dtype).reshape(p * p * channels, -1))
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (n, 1, tokens.shape[-1]))
        tokens = jnp.concatenate([cls, tokens], axis=1)
        return tokens + self.position_embedding.embedding[...].astype(dtype)


class CLIPVisionModel(nnx.Module):
    """The ViT tower: embeddings, pre-layernorm, encoder, post-layernorm on the CLS token."""

    def __init__(
        self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: DType = None, param_dtype: DType = jnp.float32
    ):
        kwargs = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, **kwargs)
        self.pre_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, param_dtype=param_dtype)
        self.encoder = CLIPEncoder(config, **kwargs)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        x = constrain(self.pre_layernorm(self.embeddings(pixel_values)), HIDDEN_AXES)
        x = self.encoder(x)
        return CLIPVisionOutput(last_hidden_state=x, pooler_output=self.post_layernorm(x[:, 0]))


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, T, D], after the final layernorm (as HF)
    pooler_output: jax.Array  # [B, D]: the hidden state at each row's EOS position


class CLIPTextModel(nnx.Module):
    """The causal text tower; pools at the EOS position exactly as HF ``CLIPTextModel`` does."""

    def __init__(
        self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: DType = None, param_dtype: DType = jnp.float32
    ):
        self.config = config
        self.dtype = dtype
        self.token_embedding = Embed(config.vocab_size, config.hidden_size, rngs=rngs, param_dtype=param_dtype)
        self.position_embedding = Embed(
            config.max_position_embeddings,
            config.hidden_size,
            rngs=rngs,
            axes=("length", "embed"),
            param_dtype=param_dtype,
        )
        self.encoder = CLIPEncoder(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        batch, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            limit = self.config.max_position_embeddings
            raise ValueError(f"text length {length} exceeds max_position_embeddings {limit}")
        dtype = self.dtype or self.token_embedding.embedding[...].dtype
        x = self.token_embedding(input_ids, dtype) + self.position_embedding(jnp.arange(length), dtype)
        x = self.final_layer_norm(self.encoder(constrain(x, HIDDEN_AXES), causal_bias(attention_mask, length)))
        return CLIPTextOutput(last_hidden_state=x, pooler_output=x[jnp.arange(batch), self.eos_positions(input_ids)])

    def eos_positions(self, input_ids: jax.Array) -> jax.Array:
        """Where each row is pooled: the first ``eos_token_id``, or, for old configs with ``eos_token_id == 2``,
        the position of the largest token id (HF keeps that legacy rule for checkpoints such as OpenAI's)."""
        if self.config.eos_token_id == 2:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)


def causal_bias(attention_mask: jax.Array | None, length: int) -> jax.Array:
    """Additive fp32 [B or 1, 1, T, T] bias: a query sees keys at or before it that the padding mask keeps."""
    allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)


class CLIPModel(nnx.Module):
    """Both towers and their projections into the shared embedding space (HF ``CLIPModel``)."""

    def __init__(
        self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype: DType = None, param_dtype: DType = jnp.float32
    ):
        kwargs = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.text_model = CLIPTextModel(config.text, **kwargs)
        self.vision_model = CLIPVisionModel(config.vision, **kwargs)
        projection = dict(axes=("embed", "mlp"), use_bias=False, **kwargs)
        self.visual_projection = Linear(config.vision.hidden_size, config.projection_dim, **projection)
        self.text_projection = Linear(config.text.hidden_size, config.projection_dim, **projection)
        self.logit_scale = param(None, nnx.initializers.constant(config.logit_scale_init_value), (), (), param_dtype)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[N, projection_dim]: projected, post-layernormed CLS (not L2-normalised, as HF)."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """[B, projection_dim]: projected EOS-pooled text state (not L2-normalised, as HF)."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)
