"""XEmoGPT assembled: frozen CLIP and HuBERT, the two cue bridges, projections, and the Qwen LLM.

Video: frames ``[B, F, H, W, 3]`` are folded into the batch for the CLIP tower; each frame's CLS
(before the post-layernorm) goes through the VECB and ``visual_llm_project``: F video tokens.
Audio: waveform ``[B, S]`` + sample mask -> HuBERT last hidden state + frame mask, padded frames
zeroed -> AECB -> ``audio_llm_project``: one token per frame (only valid frames have slots).

Tokens enter the LLM's embedding stream at the slots that :mod:`xemogpt_jax.prompt` lays out:
every position gathers ``audio_tokens[b, feature_index]`` and ``video_tokens[b, feature_index]``
and keeps the one its ``kind`` names, so one static-shape program serves batches that mix
video-only, audio-only, audio+video and text-only samples. A bridge gets gradient only through
the slots of samples that have its modality, which is the stage-3 rule of the spec.

The encoders are frozen in every stage, so their outputs pass through ``stop_gradient`` (unless
``train_encoders``, which only the tiny demo sets: its random-init towers must learn to see); the
same features may be precomputed (``clip_features``, ``audio_features`` + ``audio_frame_mask``)
and passed instead of frames/waveforms, with identical results.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from xemogpt_jax import losses, prompt
from xemogpt_jax.models import bridges
from xemogpt_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from xemogpt_jax.models.hubert import HubertConfig, HubertModel
from xemogpt_jax.models.layers import DType
from xemogpt_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from xemogpt_jax.sharding import constrain

HIDDEN_AXES = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class XEmoGPTConfig:
    """All parts' configs plus the bridge sizes; ``dtype`` is the compute dtype of CLIP, the VECB and projections.

    The text-head widths are the encoders' (CLIP's projection, the sentence encoder's output), so
    they have no defaults: :func:`xemogpt_jax.run_config.xemogpt_config` sets them from the run.
    """

    vision: CLIPVisionConfig
    hubert: HubertConfig
    llm: Qwen3Config
    video_text_dim: int  # CLIP text features after its projection
    audio_text_dim: int  # sentence-encoder embeddings
    vecb_layers: int = 2
    aecb_layers: int = 2
    num_frames: int = prompt.NUM_VIDEO_TOKENS
    max_audio_samples: int = 192_000  # the first 12 s at 16 kHz
    max_context: int = prompt.MAX_CONTEXT  # conditioning positions, for prompt.build_sample
    truncate: str = "tail"  # which end of an over-long condition prompt.build_sample keeps
    loss_chunk: int = 512  # positions whose vocabulary logits the loss holds at a time
    align_dim: int = bridges.ALIGN_DIM
    dtype: DType = None
    param_dtype: DType = jnp.float32
    train_encoders: bool = False  # let gradients reach CLIP and HuBERT (tiny random-init demo only)

    @property
    def vecb(self) -> bridges.VECBConfig:
        return bridges.VECBConfig(
            encoder=self.vision, num_layers=self.vecb_layers, num_frames=self.num_frames,
            align_dim=self.align_dim, text_dim=self.video_text_dim,
        )

    @property
    def aecb(self) -> bridges.AECBConfig:
        return bridges.AECBConfig(
            encoder=self.hubert, num_layers=self.aecb_layers, align_dim=self.align_dim, text_dim=self.audio_text_dim
        )

    def num_audio_tokens(self, num_samples: int) -> int:
        """Audio slots for a clip of ``num_samples`` samples: HuBERT frames of its first ``max_audio_samples``."""
        return int(self.hubert.conv_output_length(min(int(num_samples), self.max_audio_samples)))


def splice(
    text: jax.Array,
    kind: jax.Array,
    feature_index: jax.Array,
    audio_tokens: jax.Array | None,
    video_tokens: jax.Array | None,
) -> jax.Array:
    """Fill the audio/video slots of ``text [B, L, D]`` from ``[B, T, D]`` / ``[B, F, D]`` token tables.

    Everything is pinned to batch sharding first so the per-row gathers stay local to a device.
    """
    out = constrain(text, HIDDEN_AXES)
    for slot_kind, tokens in ((prompt.AUDIO, audio_tokens), (prompt.VIDEO, video_tokens)):
        if tokens is None:
            continue
        index = jnp.clip(feature_index, 0, tokens.shape[1] - 1)
        tokens = constrain(tokens.astype(text.dtype), HIDDEN_AXES)
        gathered = jnp.take_along_axis(tokens, index[..., None], axis=1)
        out = jnp.where((kind == slot_kind)[..., None], gathered, out)
    return out


class XEmoGPT(nnx.Module):
    """Frozen encoders + VECB/AECB + projections + LLM; ``__call__`` gives the stage-3 loss."""

    def __init__(self, config: XEmoGPTConfig, *, rngs: nnx.Rngs):
        c = config
        opts = dict(rngs=rngs, dtype=c.dtype, param_dtype=c.param_dtype)
        self.config = config
        self.vision_tower = CLIPVisionModel(c.vision, **opts)
        self.audio_tower = HubertModel(c.hubert, rngs=rngs)
        self.vecb = bridges.VECB(c.vecb, **opts)
        self.aecb = bridges.AECB(c.aecb, rngs=rngs)
        self.visual_llm_project = bridges.llm_projection(c.vision.hidden_size, c.llm.hidden_size, **opts)
        self.audio_llm_project = bridges.llm_projection(c.hubert.hidden_size, c.llm.hidden_size, **opts)
        self.llm = Qwen3ForCausalLM(c.llm, rngs=rngs)

    def clip_features(self, frames: jax.Array) -> jax.Array:
        """Normalised frames ``[B, F, H, W, 3]`` -> per-frame CLS before the post-layernorm ``[B, F, D_v]``."""
        batch, num_frames = frames.shape[:2]
        cls = self.vision_tower(frames.reshape(batch * num_frames, *frames.shape[2:])).cls_token
        return self._encoder_output(cls.reshape(batch, num_frames, -1))

    def audio_features(self, audio: jax.Array, audio_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Waveform ``[B, S]`` + sample mask -> (HuBERT last hidden ``[B, T, D_a]`` with padded frames 0, frame mask).

        Only the first ``max_audio_samples`` samples are used (the release's 12 s).
        """
        limit = self.config.max_audio_samples
        hidden, frame_mask = self.audio_tower(audio[:, :limit], audio_mask[:, :limit])
        hidden = jnp.where(frame_mask[..., None], hidden, jnp.zeros((), hidden.dtype))
        return self._encoder_output(hidden), frame_mask

    def _encoder_output(self, features: jax.Array) -> jax.Array:
        return features if self.config.train_encoders else jax.lax.stop_gradient(features)

    def video_tokens(self, clip_features: jax.Array) -> jax.Array:
        """``[B, F, D_v]`` CLS features -> ``[B, F, D_llm]`` video tokens."""
        return self.visual_llm_project(self.vecb(clip_features))

    def audio_tokens(self, audio_features: jax.Array, audio_frame_mask: jax.Array) -> jax.Array:
        """``[B, T, D_a]`` HuBERT features + frame mask -> ``[B, T, D_llm]`` audio tokens (padded frames project 0)."""
        return self.audio_llm_project(self.aecb(audio_features, audio_frame_mask))

    def input_embeddings(
        self,
        token_ids: jax.Array,
        kind: jax.Array,
        feature_index: jax.Array,
        *,
        frames: jax.Array | None = None,
        clip_features: jax.Array | None = None,
        audio: jax.Array | None = None,
        audio_mask: jax.Array | None = None,
        audio_features: jax.Array | None = None,
        audio_frame_mask: jax.Array | None = None,
    ) -> jax.Array:
        """The LLM input embeddings ``[B, L, D_llm]`` of a laid-out batch (also the start point of generation).

        Give video as ``frames`` or ``clip_features``, audio as ``audio`` + ``audio_mask`` or
        ``audio_features`` + ``audio_frame_mask``; a modality given neither way leaves its slots
        holding the embedding of token 0, so pass it whenever the batch has such slots.
        """
        if frames is not None:
            clip_features = self.clip_features(frames)
        if audio is not None:
            audio_features, audio_frame_mask = self.audio_features(audio, audio_mask)
        video = None if clip_features is None else self.video_tokens(clip_features)
        sound = None if audio_features is None else self.audio_tokens(audio_features, audio_frame_mask)
        return splice(self.llm.embed(token_ids), kind, feature_index, sound, video)

    def __call__(
        self,
        token_ids: jax.Array,
        kind: jax.Array,
        feature_index: jax.Array,
        labels: jax.Array,
        attention_mask: jax.Array,
        positions: jax.Array | None = None,
        *,
        frames: jax.Array | None = None,
        clip_features: jax.Array | None = None,
        audio: jax.Array | None = None,
        audio_mask: jax.Array | None = None,
        audio_features: jax.Array | None = None,
        audio_frame_mask: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """The causal-LM cross-entropy over the target tokens (pre-shifted ``labels``); the logits are never whole."""
        embeds = self.input_embeddings(
            token_ids, kind, feature_index, frames=frames, clip_features=clip_features, audio=audio,
            audio_mask=audio_mask, audio_features=audio_features, audio_frame_mask=audio_frame_mask,
        )
        hidden, _ = self.llm.hidden_states(
            inputs_embeds=embeds, attention_mask=attention_mask, positions=positions, dropout_rng=dropout_rng
        )
        loss, _ = losses.causal_lm_cross_entropy(hidden, self.llm.output_kernel(), labels, self.config.loss_chunk,
                                                  unroll=self.config.llm.unroll_layers)
        return loss
