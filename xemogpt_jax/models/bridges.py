"""The two emotional cue bridges (VECB, AECB), their pretraining heads, and the projections into the LLM.

Names follow the release's module tree (docs/architecture.md, section 7) so the export key map stays a table:
``visual_alignment_layer``, ``position_embedding``, ``attention_pooling.attn_vector``,
``visual_project``, ``text_project``, ``temporal_disc_head`` (layers 0 and 2 of a sequential),
``frame_reconstructor``; ``audio_alignment_layer``, ``audio_project``; ``visual_llm_project``,
``audio_llm_project``. The positional table is stored ``[F, D]`` (the release's is ``[1, F, D]``).

Layers are the ported HF ones (``clip.CLIPEncoderLayer``, ``hubert.HubertEncoderLayer``) built
from the frozen encoders' configs, so a bridge layer is exactly an encoder layer of that width.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from xemogpt_jax.models.clip import HIDDEN_AXES, CLIPEncoderConfig, CLIPEncoderLayer
from xemogpt_jax.models.hubert import HubertConfig, HubertEncoderLayer
from xemogpt_jax.models.layers import DType, Linear, call_layer, default_init, key_mask_bias, param
from xemogpt_jax.sharding import constrain

ALIGN_DIM = 768  # width of the bridge-pretraining embedding space (both sides of the contrastive losses)


@dataclass(frozen=True)
class VECBConfig:
    """Video Emotional Cue Bridge: ``num_layers`` CLIP layers shaped like the vision tower's, over F CLS features."""

    encoder: CLIPEncoderConfig
    text_dim: int  # CLIP text features after its text projection
    num_layers: int = 2
    num_frames: int = 16
    align_dim: int = ALIGN_DIM


@dataclass(frozen=True)
class AECBConfig:
    """Audio Emotional Cue Bridge: ``num_layers`` post-norm HuBERT layers of the audio encoder's shape."""

    encoder: HubertConfig
    text_dim: int  # sentence-encoder embeddings
    num_layers: int = 2
    align_dim: int = ALIGN_DIM


class AttentionPooling(nnx.Module):
    """``sum_t softmax_t(x_t . a) x_t`` over the frame axis with a learned vector ``a``."""

    def __init__(self, features: int, *, rngs: nnx.Rngs, param_dtype: DType = jnp.float32):
        self.attn_vector = param(rngs, default_init, (features,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        scores = jnp.einsum("bfd,d->bf", x.astype(jnp.float32), self.attn_vector[...].astype(jnp.float32))
        weights = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bf,bfd->bd", weights, x.astype(jnp.float32)).astype(x.dtype)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``x [B, T, D]`` over the frames where ``mask [B, T]`` is true (0 for an empty row)."""
    weights = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(x.astype(jnp.float32) * weights, axis=1)
    return (total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)).astype(x.dtype)


class VECB(nnx.Module):
    """Video Emotional Cue Bridge with its stage-1 heads.

    ``__call__`` gives ``H_v [B, F, D]``; the heads (pooling + projection, temporal discrimination,
    masked-frame reconstruction, text projection) are separate methods so stage 3 runs only the bridge.
    """

    def __init__(
        self, config: VECBConfig, *, rngs: nnx.Rngs, dtype: DType = None, param_dtype: DType = jnp.float32
    ):
        width, align = config.encoder.hidden_size, config.align_dim
        opts = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.position_embedding = param(
            rngs, default_init, (config.num_frames, width), ("frames", "embed"), param_dtype
        )
        self.visual_alignment_layer = nnx.List(
            CLIPEncoderLayer(config.encoder, **opts) for _ in range(config.num_layers)
        )
        self.attention_pooling = AttentionPooling(width, rngs=rngs, param_dtype=param_dtype)
        self.visual_project = Linear(width, align, axes=("embed", "mlp"), **opts)
        self.text_project = Linear(config.text_dim, align, axes=("embed", "mlp"), **opts)
        self.temporal_disc_head = nnx.Sequential(
            Linear(align, align, axes=("embed", "mlp"), **opts),
            jax.nn.relu,
            Linear(align, 1, axes=("mlp", None), **opts),
        )
        self.frame_reconstructor = Linear(width, width, axes=("embed", "mlp"), **opts)

    def __call__(
        self,
        frames: jax.Array,
        *,
        frame_order: jax.Array | None = None,
        masked_frames: jax.Array | None = None,
    ) -> jax.Array:
        """Raw per-frame CLS features ``[B, F, D]`` -> ``H_v [B, F, D]``.

        ``frame_order [B, F]`` (int) reorders the raw features and ``masked_frames [B, F]`` (bool,
        True = masked) zeroes them, both *before* the positional table is added, so a shuffled
        clip really differs from the original (frame temporal discrimination) and a masked frame
        keeps only its position (masked frame modeling).
        """
        if frame_order is not None:
            frames = jnp.take_along_axis(frames, frame_order[..., None], axis=1)
        if masked_frames is not None:
            frames = jnp.where(masked_frames[..., None], jnp.zeros((), frames.dtype), frames)
        if frames.shape[1] != self.config.num_frames:
            raise ValueError(f"VECB expects {self.config.num_frames} frames, got {frames.shape[1]}")
        # Pinned to batch sharding as the CLIP towers pin their inputs. Left to propagation, the CLIP
        # features arrive split over ``tensor`` on the feature axis, and XLA (0.10.2, CPU, (2, 2, 2) mesh,
        # width 64) then adds each layer's attention output to the wrong sample's residual (samples on
        # (data, fsdp) = (0, 1) and (1, 0) swapped; tools/xla_repro_swapped_residual.py shows it in plain JAX).
        x = constrain(frames + self.position_embedding[...].astype(frames.dtype), HIDDEN_AXES)
        for layer in self.visual_alignment_layer:
            x = call_layer(layer, self.config.encoder.remat, x)
        return x

    def video_embedding(self, hidden: jax.Array) -> jax.Array:
        """``[B, align_dim]``: attention-pooled bridge output, projected (the video side of L_cva)."""
        return self.visual_project(self.attention_pooling(hidden))

    def text_embedding(self, text_features: jax.Array) -> jax.Array:
        """``[B, align_dim]``: CLIP text features, projected (the text side of L_cva)."""
        return self.text_project(text_features)

    def temporal_logit(self, video_embedding: jax.Array) -> jax.Array:
        """``[B]``: logit that the frames were in their original order."""
        return self.temporal_disc_head(video_embedding)[..., 0]

    def reconstruct(self, hidden: jax.Array) -> jax.Array:
        """``[B, F, D]``: predicted frozen CLS feature of every frame."""
        return self.frame_reconstructor(hidden)


class AECB(nnx.Module):
    """Audio Emotional Cue Bridge with its stage-2 heads; padded frames stay exactly zero."""

    def __init__(self, config: AECBConfig, *, rngs: nnx.Rngs):
        enc = config.encoder
        opts = dict(rngs=rngs, dtype=enc.dtype, param_dtype=enc.param_dtype)
        self.config = config
        self.audio_alignment_layer = nnx.List(HubertEncoderLayer(enc, rngs=rngs) for _ in range(config.num_layers))
        self.audio_project = Linear(enc.hidden_size, config.align_dim, axes=("embed", "mlp"), **opts)
        self.text_project = Linear(config.text_dim, config.align_dim, axes=("embed", "mlp"), **opts)

    def __call__(self, hidden: jax.Array, frame_mask: jax.Array) -> jax.Array:
        """HuBERT hidden states ``[B, T, D]`` + valid-frame mask ``[B, T]`` -> ``H_a [B, T, D]``.

        Padded frames are zeroed before the layers, hidden from every query by an additive key
        mask, and zeroed again after (post-norm layers would otherwise give them non-zero values).
        """
        valid = frame_mask.astype(bool)[..., None]
        # pinned to batch sharding for the reason given in VECB.__call__
        x = constrain(jnp.where(valid, hidden, jnp.zeros((), hidden.dtype)), HIDDEN_AXES)
        bias = key_mask_bias(frame_mask.astype(bool))
        for layer in self.audio_alignment_layer:
            x = call_layer(layer, self.config.encoder.remat, x, bias)
        return jnp.where(valid, x, jnp.zeros((), x.dtype))

    def audio_embedding(self, hidden: jax.Array, frame_mask: jax.Array) -> jax.Array:
        """``[B, align_dim]``: masked mean of the bridge output, projected (the audio side of L_caa)."""
        return self.audio_project(masked_mean(hidden, frame_mask))

    def text_embedding(self, text_features: jax.Array) -> jax.Array:
        """``[B, align_dim]``: LaBSE sentence embeddings, projected (the text side of L_caa)."""
        return self.text_project(text_features)


def llm_projection(
    in_features: int, llm_width: int, *, rngs: nnx.Rngs, dtype: DType = None, param_dtype: DType = jnp.float32
) -> Linear:
    """One Linear from a bridge's width into the LLM's embedding width (one token per frame)."""
    return Linear(in_features, llm_width, axes=(None, "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
