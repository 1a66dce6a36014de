"""HuBERT (inference) in Flax NNX, numerically matching transformers' ``HubertModel``.

Both layer-norm arrangements are here: stable-layer-norm (pre-norm, as HuBERT-large and
TencentGameMate/chinese-hubert-large) and post-norm (HuBERT-base). :class:`HubertEncoderLayer`
is the post-norm layer on its own, reused by the Audio Emotional Cue Bridge. Time-step masking
(SpecAugment) and dropout are training-only in HF and are left out.

Layouts: convolutions run channels-last (``[B, T, C]``) with kernels stored ``[kernel, in, out]``
(PyTorch's ``[out, in, kernel]`` transposed by the key map); linear kernels are ``(in, out)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xemogpt_jax.models.attention import AttentionConfig
from xemogpt_jax.models.layers import (
    DType,
    LayerNorm,
    Linear,
    SelfAttention,
    activation,
    default_init,
    key_mask_bias,
    param,
)
from xemogpt_jax.models.stack import scan_layers, stack_layers
from xemogpt_jax.sharding import constrain

HIDDEN_AXES = ("batch", "length", None)


# HubertConfig fields that from_hf / to_hf do not map one to one onto HF config.json keys
RUNTIME_FIELDS = frozenset({"has_masked_spec_embed", "dtype", "param_dtype", "attention", "remat", "unroll_layers"})


@dataclasses.dataclass(frozen=True)
class HubertConfig:
    """The HF ``HubertConfig`` fields that shape inference, plus compute/parameter dtypes."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    feat_proj_layer_norm: bool = True
    has_masked_spec_embed: bool = True
    dtype: DType = None
    param_dtype: DType = jnp.float32
    attention: AttentionConfig = AttentionConfig()
    remat: str = "none"  # layers.REMAT_CHOICES, per encoder layer
    unroll_layers: bool = False  # unroll the encoder's layer scan (the compiler then costs every layer)

    def __post_init__(self) -> None:
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError("conv_dim, conv_kernel and conv_stride must have the same length")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> HubertConfig:
        """Build from a HF ``config.json`` dict; refuses features this port does not implement."""
        if hf.get("conv_pos_batch_norm", False):
            raise ValueError("conv_pos_batch_norm=True (HuBERT with batch-normed positional conv) is not supported")
        if hf.get("adapter_attn_dim") is not None:
            raise ValueError("attention adapters (adapter_attn_dim) are not supported")
        names = {f.name for f in dataclasses.fields(cls)} - RUNTIME_FIELDS
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in hf.items() if k in names}
        kwargs["has_masked_spec_embed"] = hf.get("mask_time_prob", 0.05) > 0 or hf.get("mask_feature_prob", 0.0) > 0
        return cls(**{**kwargs, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` fields this config determines (inverse of :meth:`from_hf`)."""
        skip = RUNTIME_FIELDS
        hf = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items() if k not in skip}
        hf.update(model_type="hubert", architectures=["HubertModel"], num_feat_extract_layers=len(self.conv_dim))
        if not self.has_masked_spec_embed:
            hf.update(mask_time_prob=0.0, mask_feature_prob=0.0)
        return hf

    def conv_output_length(self, num_samples: Any) -> Any:
        """Frames the feature encoder makes from ``num_samples`` (int or integer array), as PyTorch Conv1d."""
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            num_samples = (num_samples - kernel) // stride + 1
        return num_samples


class HubertFeedForward(nnx.Module):
    """Position-wise MLP: dense -> activation -> dense."""

    def __init__(self, config: HubertConfig, *, rngs: nnx.Rngs):
        opts = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
        self.intermediate_dense = Linear(config.hidden_size, config.intermediate_size, axes=("embed", "mlp"), **opts)
        self.output_dense = Linear(config.intermediate_size, config.hidden_size, axes=("mlp", "embed"), **opts)
        self.act = activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output_dense(self.act(self.intermediate_dense(x)))


class _EncoderLayerBase(nnx.Module):
    """Parameters shared by both layer arrangements (same HF names in both)."""

    def __init__(self, config: HubertConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=config.layer_norm_eps, param_dtype=config.param_dtype)
        dtypes = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.attention = SelfAttention(
            config.hidden_size, config.num_attention_heads, rngs=rngs, attention=config.attention, **dtypes
        )
        self.layer_norm = LayerNorm(config.hidden_size, **norm)
        self.feed_forward = HubertFeedForward(config, rngs=rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, **norm)


class HubertEncoderLayer(_EncoderLayerBase):
    """Post-norm layer: attention -> residual -> LayerNorm -> feed-forward residual -> final LayerNorm."""

    def __call__(self, x: jax.Array, attention_bias: jax.Array | None = None) -> jax.Array:
        x = self.layer_norm(x + self.attention(x, attention_bias))
        return self.final_layer_norm(x + self.feed_forward(x))


class HubertEncoderLayerStableLayerNorm(_EncoderLayerBase):
    """Pre-norm layer: LayerNorm before attention and before the feed-forward, residuals around both."""

    def __call__(self, x: jax.Array, attention_bias: jax.Array | None = None) -> jax.Array:
        x = x + self.attention(self.layer_norm(x), attention_bias)
        return x + self.feed_forward(self.final_layer_norm(x))


def _conv1d(x: jax.Array, kernel: jax.Array, stride: int, padding: Sequence[tuple[int, int]], groups: int = 1):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride,),
        padding=tuple(padding),
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=groups,
    )


class GroupNormPerChannel(nnx.Module):
    """``nn.GroupNorm(num_groups=C, num_channels=C)``: each channel normalised over time, in fp32."""

    def __init__(self, channels: int, *, eps: float = 1e-5, param_dtype: DType = jnp.float32):
        self.scale = param(None, nnx.initializers.ones, (channels,), ("norm",), param_dtype)
        self.bias = param(None, nnx.initializers.zeros, (channels,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(1, keepdims=True)
        var = jnp.square(xf - mean).mean(1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class HubertConvLayer(nnx.Module):
    """One strided Conv1d of the feature encoder, then an optional norm, then the activation."""

    def __init__(self, config: HubertConfig, layer_id: int, *, rngs: nnx.Rngs):
        in_dim = config.conv_dim[layer_id - 1] if layer_id > 0 else 1
        out_dim = config.conv_dim[layer_id]
        shape = (config.conv_kernel[layer_id], in_dim, out_dim)
        self.kernel = param(rngs, default_init, shape, ("kernel", "conv_in", "conv_out"), config.param_dtype)
        self.bias = (
            param(None, nnx.initializers.zeros, (out_dim,), ("conv_out",), config.param_dtype)
            if config.conv_bias
            else None
        )
        if config.feat_extract_norm == "layer":
            self.layer_norm = LayerNorm(out_dim, param_dtype=config.param_dtype)
        elif layer_id == 0:
            self.layer_norm = GroupNormPerChannel(out_dim, param_dtype=config.param_dtype)
        else:
            self.layer_norm = None
        self.stride = config.conv_stride[layer_id]
        self.act = activation(config.feat_extract_activation)
        self.dtype = config.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = _conv1d(x.astype(dtype), self.kernel[...].astype(dtype), self.stride, [(0, 0)])
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if self.layer_norm is not None:
            y = self.layer_norm(y)
        return self.act(y)


class HubertFeatureEncoder(nnx.Module):
    """Raw waveform ``[B, S]`` -> conv features ``[B, T, conv_dim[-1]]``."""

    def __init__(self, config: HubertConfig, *, rngs: nnx.Rngs):
        self.conv_layers = nnx.List([HubertConvLayer(config, i, rngs=rngs) for i in range(len(config.conv_dim))])

    def __call__(self, input_values: jax.Array) -> jax.Array:
        x = input_values[..., None]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class HubertFeatureProjection(nnx.Module):
    """Optional LayerNorm on conv features, then a Linear to the model width."""

    def __init__(self, config: HubertConfig, *, rngs: nnx.Rngs):
        conv_out = config.conv_dim[-1]
        self.layer_norm = (
            LayerNorm(conv_out, eps=config.layer_norm_eps, param_dtype=config.param_dtype)
            if config.feat_proj_layer_norm
            else None
        )
        self.projection = Linear(
            conv_out,
            config.hidden_size,
            axes=("conv_in", "embed"),
            rngs=rngs,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.projection(x)


class HubertPositionalConvEmbedding(nnx.Module):
    """Grouped, weight-normed "same" Conv1d over time, then the activation.

    Weight norm over PyTorch ``dim=2`` (the kernel position): ``w[k] = g[k] * v[k] / ||v[k]||``.
    ``g`` and ``v`` are stored rather than ``w`` so checkpoints round-trip under both HF namings
    (``weight_g``/``weight_v`` and ``parametrizations.weight.original0``/``original1``).
    """

    def __init__(self, config: HubertConfig, *, rngs: nnx.Rngs):
        dim, groups, width = config.hidden_size, config.num_conv_pos_embedding_groups, config.num_conv_pos_embeddings
        self.weight_v = param(
            rngs, default_init, (width, dim // groups, dim), ("kernel", "conv_in", "conv_out"), config.param_dtype
        )
        self.weight_g = param(None, nnx.initializers.ones, (width,), ("kernel",), config.param_dtype)
        self.bias = param(None, nnx.initializers.zeros, (dim,), ("conv_out",), config.param_dtype)
        self.groups = groups
        # PyTorch pads width // 2 on both sides; HF then drops the last step when the width is even.
        self.padding = (width // 2, width // 2 - (1 - width % 2))
        self.act = activation(config.feat_extract_activation)
        self.dtype = config.dtype

    def kernel(self) -> jax.Array:
        v = self.weight_v[...].astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))
        return v * (self.weight_g[...].astype(jnp.float32)[:, None, None] / norm)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = _conv1d(x.astype(dtype), self.kernel().astype(dtype), 1, [self.padding], self.groups)
        return self.act(y + self.bias[...].astype(dtype))


class HubertEncoder(nnx.Module):
    """Positional conv + transformer layers (stacked and scanned), in the arrangement the config names."""

    def __init__(self, config: HubertConfig, *, rngs: nnx.Rngs):
        layer_cls = HubertEncoderLayerStableLayerNorm if config.do_stable_layer_norm else HubertEncoderLayer
        self.pos_conv_embed = HubertPositionalConvEmbedding(config, rngs=rngs)
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, param_dtype=config.param_dtype)
        count = config.num_hidden_layers
        self.layers = stack_layers(lambda layer_rngs: layer_cls(config, rngs=layer_rngs), count, rngs)
        self.stable_layer_norm = config.do_stable_layer_norm
        self.remat = config.remat
        self.unroll = config.unroll_layers

    def __call__(self, x: jax.Array, frame_mask: jax.Array | None) -> jax.Array:
        bias = None
        if frame_mask is not None:
            x = jnp.where(frame_mask[..., None], x, 0)
            bias = key_mask_bias(frame_mask)
        x = x + self.pos_conv_embed(x)
        if not self.stable_layer_norm:
            x = self.layer_norm(x)
        x = scan_layers(self.layers, x, bias, remat=self.remat, unroll=self.unroll,
                        after=lambda h: constrain(h, HIDDEN_AXES))
        return self.layer_norm(x) if self.stable_layer_norm else x


class HubertModel(nnx.Module):
    """Waveform ``[B, S]`` (+ sample mask) -> ``(last_hidden_state [B, T, D], frame_mask [B, T] bool)``.

    ``last_hidden_state`` equals HF's, padded frames included (HF does not zero them after the
    layers); callers that need zeros there apply ``frame_mask``.
    """

    def __init__(self, config: HubertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.feature_extractor = HubertFeatureEncoder(config, rngs=rngs)
        self.feature_projection = HubertFeatureProjection(config, rngs=rngs)
        self.encoder = HubertEncoder(config, rngs=rngs)
        # Used only by HF's training-time SpecAugment; kept so checkpoints round-trip unchanged.
        self.masked_spec_embed = (
            param(rngs, nnx.initializers.uniform(1.0), (config.hidden_size,), ("embed",), config.param_dtype)
            if config.has_masked_spec_embed
            else None
        )

    def conv_output_length(self, num_samples: Any) -> Any:
        return self.config.conv_output_length(num_samples)

    def frame_mask(self, attention_mask: jax.Array, num_frames: int) -> jax.Array:
        """HF's ``_get_feature_vector_attention_mask``: frame t is valid iff t < conv_output_length(samples).

        HF marks index ``length - 1`` and fills leftwards, so a non-positive length wraps around like
        a PyTorch negative index (an all-padding row comes out all-valid); the modulo reproduces that.
        """
        lengths = self.conv_output_length(attention_mask.astype(jnp.int32).sum(-1))
        last = jnp.mod(lengths - 1, num_frames)
        return jnp.arange(num_frames)[None, :] <= last[:, None]

    def __call__(
        self, input_values: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        input_values = constrain(input_values, ("batch", "length"))
        features = constrain(self.feature_extractor(input_values), HIDDEN_AXES)
        batch, num_frames = features.shape[:2]
        frame_mask = None if attention_mask is None else self.frame_mask(attention_mask, num_frames)
        hidden = self.encoder(self.feature_projection(features), frame_mask)
        if frame_mask is None:
            frame_mask = jnp.ones((batch, num_frames), dtype=bool)
        return hidden, frame_mask
